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

A lookup that misses claims the text for the asking actor: another actor that asks for it
before the embedding is registered is told it is pending and waits for it (polling) rather
than encoding it again. Rows of few prompts and many seeds reach every actor in its first
batch: without claims, actors that start together would all encode the same texts. A claim
older than ``CLAIM_SECONDS`` (its actor died, or is that slow) passes to the next actor that
asks; a text then encoded twice is counted as a duplicate (``stats()``). A claim also passes at
once to its own actor asking again: a restarted actor (Ray Data restarts a killed one and
resubmits its batch) would otherwise wait ``CLAIM_SECONDS`` for the texts its dead process claimed.

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
# object (owner, borrower, object-store header): measured ~8 KB of process memory (3.7 KB in the
# shard, 2.1 in the raylet, 2-4 in the actor that owns it; bench/text_cache_scale.py). Counted so
# that a budget also bounds the entries, and that memory, when embeddings are small
ENTRY_OVERHEAD_BYTES = 8192
# how long a claimed text waits for its embedding before another actor may encode it
CLAIM_SECONDS = 120.0
# what a lookup answers for a text another actor has claimed and not yet registered
PENDING = "pending"


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

    def pop(self, key: Key) -> Value | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
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

    def __init__(self, budget_bytes: int, claim_seconds: float = CLAIM_SECONDS):
        self.entries: LruBytes[str, Any] = LruBytes(budget_bytes)
        self.claim_seconds = claim_seconds
        # key -> (when, which actor) it was claimed; at most the texts being encoded now
        self.claims: dict[str, tuple[float, str | None]] = {}
        self.lookups = self.hits = self.waits = self.registered = self.duplicates = self.refused = 0

    def lookup(self, keys: list[str], asker: str | None = None) -> list[Any]:
        """Per key: its ObjectRef (in a list, so that Ray hands the reference, not the object); ``PENDING``
        when another actor is encoding it; None when the asker is to encode it (now claimed for it).
        ``asker``: the asking actor's id (None for a task): its own claims pass back to it."""
        import time

        now = time.monotonic()
        answers = []
        for key in keys:
            ref = self.entries.get(key)
            if ref is None and self._claimed_by_another(key, asker, now):
                ref = PENDING
            elif ref is None:
                self.claims[key] = (now, asker)
            answers.append(ref)
        self.lookups += len(keys)
        self.hits += sum(answer is not None and answer != PENDING for answer in answers)
        self.waits += sum(answer == PENDING for answer in answers)
        return answers

    def _claimed_by_another(self, key: str, asker: str | None, now: float) -> bool:
        """A live claim by someone else: not expired, and not the asker's own (nor its dead process's, if restarted)."""
        claimed_at, claimant = self.claims.get(key, (-self.claim_seconds, None))
        return now - claimed_at < self.claim_seconds and (asker is None or claimant != asker)

    def forget(self, keys: list[str]) -> None:
        """Drop claims an actor gives up (its encoding failed) and entries whose object was lost: the next asker encodes them."""
        for key in keys:
            self.claims.pop(key, None)
            self.entries.pop(key)

    def register(self, entries: list[tuple[str, list, int]]) -> None:
        """Entries as (key, [ObjectRef], bytes). A key already held was encoded twice: counted, first kept."""
        for key, ref, size in entries:
            self.claims.pop(key, None)
            if key in self.entries:
                self.duplicates += 1
                continue
            stored = self.entries.put(key, ref, size)
            self.registered += stored
            self.refused += not stored

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.entries), "bytes": self.entries.bytes, "budget_bytes": self.entries.budget_bytes,
            "lookups": self.lookups, "hits": self.hits, "waits": self.waits, "registered": self.registered, "evicted": self.entries.evicted,
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

    def fetch(self, texts: list[str]) -> tuple[dict[str, Embedding], list[str]]:
        """What the job cache holds for ``texts``, and the texts other actors are encoding now (to ask again).

        One lookup RPC per shard, then the objects. Every other text is claimed for the caller,
        which encodes it and ``store``s it (or ``release``s it).
        """
        import ray

        # 1. one batched lookup per shard, all in flight at once
        by_shard = self._by_shard(texts)
        asker = ray.get_runtime_context().get_actor_id()  # None in a task
        lookups = {index: self.shards[index].lookup.remote([self.key(text) for text in group], asker) for index, group in by_shard.items()}
        answers = {text: answer for index, group in by_shard.items() for text, answer in zip(group, ray.get(lookups[index]))}
        refs = {text: answer[0] for text, answer in answers.items() if answer is not None and answer != PENDING}
        # 2. the objects; one lost with its node or owner is a miss, encoded again
        found = {text: embedding for text, embedding in zip(refs, _get_each(list(refs.values()))) if embedding is not None}
        lost = [text for text in refs if text not in found]
        if lost:
            self.forget(lost)  # asked again: then encoded by whoever claims them
        return found, [text for text, answer in answers.items() if answer == PENDING or text in lost]

    def forget(self, texts: list[str]) -> None:
        """Drop the claims on ``texts`` (their encoding failed), and their entries (their objects were lost); not awaited."""
        for index, group in self._by_shard(texts).items():
            self.shards[index].forget.remote([self.key(text) for text in group])

    def _by_shard(self, texts: list[str]) -> dict[int, list[str]]:
        by_shard: dict[int, list[str]] = {}
        for text in texts:
            by_shard.setdefault(self._shard_of(self.key(text)), []).append(text)
        return by_shard

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
