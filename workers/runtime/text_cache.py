"""Each distinct text encoded once per job: a job-wide cache of text embeddings on Ray.

LLM text encoders (Qwen3, Qwen2.5-VL, Mistral) are the second largest model of their
families, and bulk generation draws many seeds per prompt: a text encoded again in every
batch repeats the most expensive call. The job cache is one Ray actor (or a few, sharded
by key) that holds, per text key, an ``ObjectRef`` of the embedding dict a text-stage
actor put into Ray's object store. Every text-stage actor of the job (fused or split, in
generation and in encoding) looks its batch's texts up in one RPC per shard, encodes only
the misses, and registers them in one RPC per shard.

Memory is bounded twice: the cache keeps at most ``budget_bytes`` of embeddings (least
recently used entries go first; an evicted text is encoded again when it returns), and
Ray spills the object store to disk under pressure. Nothing grows with the number of rows.

Two actors that miss the same text at the same moment both encode it: the second
registration finds the key taken and is counted as a duplicate (``stats()``). Waiting
for the other actor instead would idle an actor for as long as encoding takes.

numpy and ray only (no torch): the driver imports this module.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, Hashable, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

Embedding = dict[str, np.ndarray]  # one text's embedding columns (``ModelFamily.embedding_columns``)
Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")

# What an entry costs beyond its arrays: its key, the ObjectRef and Ray's bookkeeping of one
# object (owner, borrower, object-store header). Counted so that a budget also bounds the
# number of entries when embeddings are small (a 1M-prompt job of a tiny model)
ENTRY_OVERHEAD_BYTES = 1024


def embedding_bytes(embedding: Embedding) -> int:
    return sum(array.nbytes for array in embedding.values()) + ENTRY_OVERHEAD_BYTES


class LruBytes(Generic[Key, Value]):
    """A mapping bounded by bytes: least recently used entries leave first.

    An entry larger than the whole budget is not kept (it would evict everything else).
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes: must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.evicted = 0
        self._entries: OrderedDict[Key, tuple[Value, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key) -> Value | None:
        """The value, now the most recently used; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Key, value: Value, size: int) -> bool:
        """Keep ``value`` (``size`` bytes), evicting the least recently used beyond the budget; False if too large."""
        if size > self.budget_bytes:
            return False
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.bytes -= evicted_size
            self.evicted += 1
        return True


class TextCacheShard:
    """The Ray actor of one shard: text key -> ObjectRef of its embedding, LRU-bounded by bytes.

    Dropping an entry drops the last reference to its object once the encoding actor has let
    go of its own: Ray frees (or un-spills) it. Every method is a few dict operations.
    """

    def __init__(self, budget_bytes: int):
        self.entries: LruBytes[str, Any] = LruBytes(budget_bytes)
        self.lookups = self.hits = self.registered = self.duplicates = self.refused = 0

    def lookup(self, keys: list[str]) -> list[Any]:
        """Per key its ObjectRef (in a list, so that Ray hands the reference, not the object), or None."""
        found = [self.entries.get(key) for key in keys]
        self.lookups += len(keys)
        self.hits += sum(ref is not None for ref in found)
        return found

    def register(self, entries: list[tuple[str, list, int]]) -> None:
        """Entries as (key, [ObjectRef], bytes). A key already held was encoded twice at once: counted, first kept."""
        for key, ref, size in entries:
            if key in self.entries:
                self.duplicates += 1
                continue
            stored = self.entries.put(key, ref, size)
            self.registered += stored
            self.refused += not stored

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.entries), "bytes": self.entries.bytes, "budget_bytes": self.entries.budget_bytes,
            "lookups": self.lookups, "hits": self.hits, "registered": self.registered, "evicted": self.entries.evicted,
            "duplicates": self.duplicates, "too_large": self.refused,
        }


@dataclass(frozen=True)
class JobTextCache:
    """What a text-stage actor holds of the job cache: the shards' handles and the key namespace.

    ``namespace`` is what shapes an embedding besides its text (the model's fingerprint,
    family, token budget, dtype): two jobs, or two models, never share an entry.
    """

    shards: tuple[Any, ...]  # Ray actor handles of ``TextCacheShard``
    namespace: str

    @classmethod
    def start(cls, *, namespace: str, budget_bytes: int, shards: int = 1) -> "JobTextCache":
        """Start the shards (no CPU reserved: they must never hold back a model or I/O task)."""
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=0)(TextCacheShard)
        return cls(shards=tuple(actor.remote(budget_bytes // shards) for _ in range(shards)), namespace=namespace)

    def stop(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard)

    def stats(self) -> dict[str, int]:
        """Totals over the shards (one RPC each)."""
        import ray

        totals: dict[str, int] = {}
        for shard_stats in ray.get([shard.stats.remote() for shard in self.shards]):
            for name, value in shard_stats.items():
                totals[name] = totals.get(name, 0) + value
        return {"shards": len(self.shards), **totals}

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.namespace}\0{text}".encode()).hexdigest()

    def _shard_of(self, key: str) -> int:
        return int(key[:8], 16) % len(self.shards)

    def fetch(self, texts: list[str]) -> dict[str, Embedding]:
        """The embeddings the job cache holds for ``texts``: one lookup RPC per shard, then the objects."""
        import ray

        # 1. one batched lookup per shard, all in flight at once
        by_shard: dict[int, list[str]] = {}
        for text in texts:
            by_shard.setdefault(self._shard_of(self.key(text)), []).append(text)
        lookups = {index: self.shards[index].lookup.remote([self.key(text) for text in group]) for index, group in by_shard.items()}
        refs = {text: found[0] for index, group in by_shard.items() for text, found in zip(group, ray.get(lookups[index])) if found}
        # 2. the objects; one lost with its node or owner is a miss, encoded again
        return {text: embedding for text, embedding in zip(refs, _get_each(list(refs.values()))) if embedding is not None}

    def store(self, embeddings: dict[str, Embedding]) -> None:
        """Put each text's embedding into the object store and register it: one RPC per shard, not awaited."""
        import ray

        by_shard: dict[int, list[tuple[str, list, int]]] = {}
        for text, embedding in embeddings.items():
            key = self.key(text)
            by_shard.setdefault(self._shard_of(key), []).append((key, [ray.put(embedding)], embedding_bytes(embedding)))
        for index, entries in by_shard.items():
            # the call's arguments keep the objects alive until the shard holds them
            self.shards[index].register.remote(entries)


def _get_each(refs: list) -> list[Embedding | None]:
    """The objects, copied out of the object store (a zero-copy view would pin its object); None for a lost one."""
    import ray

    try:
        values = ray.get(refs)
    except ray.exceptions.RayError:  # rare: fetch one by one to keep the others
        values = [_get_one(ref) for ref in refs]
    return [None if value is None else {name: np.array(array) for name, array in value.items()} for value in values]


def _get_one(ref) -> Embedding | None:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        logger.warning("text cache: an embedding was lost (%s); its text is encoded again", type(error).__name__)
        return None
