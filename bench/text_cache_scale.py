"""The job text cache at a million distinct texts: its memory stays within its byte budget.

Used by ``scale_benchmark.py --text-cache-keys N``. No model runs: a few text-stage stand-ins
(``TextCacheClient``, Ray actors of half a CPU each) drive the real cache (``JobTextCache``
and its ``TextCacheShard`` actors, started as ``start_text_cache`` starts them, on an
embedded Ray started as a job starts it) through the calls ``TextEncoderWorker.embed``
makes: per batch of rows, one ``fetch`` of the batch's distinct texts (look up, claim the
misses, get the hits' objects), a fake encoding of the claimed texts (a float16 array of
77 x ``WIDTH`` values whose first value names its text), one ``store`` (put, register),
and pauses for texts another actor is encoding. Every fetched embedding is checked
against its text.

The workload: N distinct texts, each asked ``asks`` times; texts come in windows of
``WINDOW``, whose asks are shuffled together (a prompt's seeds spread over ~``WINDOW x asks``
rows) and cut into batches of ``BATCH_ROWS`` rows dealt round-robin to the stand-ins.
A 10M-row job of 1M prompts asks ~10 times per text; ``asks=2`` samples that ratio
(one miss and one hit per text) to keep the run near 10 minutes on 2 cores: every text
is still registered once, and the budget fills and evicts as it would.

At checkpoints (10%, 25%, 50% and all of N distinct texts) it reports the cache's counts,
its claims left, the object store's use, and the resident memory of the driver, the
shard actors, the stand-ins (the objects' owners) and Ray's raylet and GCS: now and the
peak since the last checkpoint (sampled every ``SAMPLE_SECONDS``).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

import common

WINDOW = 10_000  # distinct texts asked in one stretch (their asks shuffled together)
BATCH_ROWS = 64  # rows per text-stage batch: one fetch and one store each (the scale runs' --batch-size)
CLIENTS = 3  # text-stage stand-ins
CLIENT_CPUS = 0.5  # fractional, as text-stage actors beside others on 2 cores
TOKENS, WIDTH = 77, 32  # the fake embedding: 77 x 32 float16 = 4,928 bytes (the tiny preset's CLIP states in half precision)
CHECKPOINT_SHARES = (0.1, 0.25, 0.5, 1.0)
SAMPLE_SECONDS = 0.5
# TextEncoderWorker's first and longest pause before asking again for texts another actor is
# encoding (copied: importing the worker would load torch into the driver this run measures)
WAIT_SECONDS, MAX_WAIT_SECONDS = 0.01, 0.5
# how the sampler tells the processes apart: Ray titles actor processes ``ray::CLASS[.method]``
# (the raylet holds the object store: its shared pages are the store's)
ROLES = {"driver": (), "cache shards": ("ray::TextCacheShard",), "text actors": ("ray::TextCacheClient",),
         "raylet": ("raylet",), "GCS": ("gcs_server",)}


@dataclass(kw_only=True)
class Workload:
    keys: int  # distinct texts
    asks: int  # job-cache lookups per text
    budget_bytes: int
    shards: int

    @property
    def windows(self) -> int:
        return math.ceil(self.keys / WINDOW)


@dataclass(kw_only=True)
class Checkpoint:
    texts: int  # distinct texts asked so far
    seconds: float  # since the first window
    cache: dict[str, int]  # JobTextCache.stats()
    claims: int  # claims the shards hold (texts claimed and not yet registered)
    client_counts: dict[str, float]  # summed over the stand-ins
    store_bytes: int  # the object store's use
    store_objects: int
    spilled_bytes: int
    rss_mib: dict[str, float]  # role -> resident MiB now
    peak_mib: dict[str, float]  # role -> peak resident MiB since the previous checkpoint
    anonymous_mib: dict[str, float]  # role -> resident MiB now, less shared and file-backed pages
    lookups_per_second: float  # since the previous checkpoint


@dataclass(kw_only=True)
class TextCacheRun:
    workload: Workload
    start_mib: dict[str, float]  # role -> resident MiB before the first window
    start_anonymous_mib: dict[str, float]
    checkpoints: list[Checkpoint] = field(default_factory=list)


# -- a text-stage actor without a model -----------------------------------------------------------


def text_of(index: int) -> str:
    return f"prompt {index:07d}: a watercolour of a lighthouse on a cliff at dusk, gulls, soft light"


def fake_embedding(index: int) -> dict[str, np.ndarray]:
    # its first value names its text (float16 holds whole numbers to 2048 exactly): a wrong fetch shows
    return {"prompt_embeds": np.full((TOKENS, WIDTH), index % 2048, np.float16)}


class TextCacheClient:
    """What ``TextEncoderWorker.embed`` does with the job cache, per batch, without its own per-actor
    cache (every ask reaches the job cache) and with a fake encoder."""

    def __init__(self, cache, workload: Workload, index: int, clients: int):
        self.cache, self.workload, self.index, self.clients = cache, workload, index, clients
        self.counts = {"rows": 0, "asked": 0, "encoded": 0, "fetched": 0, "wait_rounds": 0, "wrong": 0,
                       "fetch_seconds": 0.0, "store_seconds": 0.0}

    def run_window(self, window: int) -> None:
        for batch in self._batches(window):
            self._embed(batch)

    def take_counts(self) -> dict[str, float]:
        return dict(self.counts)

    def _batches(self, window: int) -> list[np.ndarray]:
        """This actor's share of the window's rows: each text ``asks`` times, shuffled, in batches."""
        ids = np.arange(window * WINDOW, min((window + 1) * WINDOW, self.workload.keys))
        rows = np.random.default_rng(window).permutation(np.repeat(ids, self.workload.asks))
        return [rows[start:start + BATCH_ROWS] for start in range(0, len(rows), BATCH_ROWS)][self.index::self.clients]

    def _embed(self, batch: np.ndarray) -> None:
        # 1. the batch's distinct texts, as the worker dedups them; 2. fetch, encode what is ours, store; 3. wait for the rest
        index_of = {text_of(index): int(index) for index in batch}
        wanted, pause = list(index_of), WAIT_SECONDS
        self.counts["rows"] += len(batch)
        while wanted:
            fetched, pending = self._timed("fetch_seconds", self.cache.fetch, wanted)
            ours = [text for text in wanted if text not in fetched and text not in pending]
            self._timed("store_seconds", self.cache.store, {text: fake_embedding(index_of[text]) for text in ours})
            self.counts["asked"] += len(wanted)
            self.counts["encoded"] += len(ours)
            self.counts["fetched"] += len(fetched)
            self.counts["wrong"] += sum(bool(embedding["prompt_embeds"][0, 0] != index_of[text] % 2048) for text, embedding in fetched.items())
            wanted = pending
            if wanted:
                self.counts["wait_rounds"] += 1
                time.sleep(pause)
                pause = min(2 * pause, MAX_WAIT_SECONDS)

    def _timed(self, name: str, call, argument):
        started = time.perf_counter()
        try:
            return call(argument)
        finally:
            self.counts[name] += time.perf_counter() - started


# -- memory and the object store ------------------------------------------------------------------


class RoleSampler:
    """Resident memory per role (``ROLES``) over this process's tree: now, and the peak since ``take``."""

    def __init__(self):
        self._roles: dict[int, str] = {os.getpid(): "driver"}  # pid -> role, read once known
        self.peaks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="role-memory-sampler", daemon=True)

    def __enter__(self) -> "RoleSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exception) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def sample(self) -> tuple[dict[str, int], dict[str, int]]:
        """(resident, anonymous) bytes per role now; the peaks follow the resident bytes."""
        resident, anonymous = dict.fromkeys(ROLES, 0), dict.fromkeys(ROLES, 0)
        for pid in [os.getpid(), *common.descendant_pids(os.getpid())]:
            role = self._roles.get(pid) or role_of(pid)
            if role is None:  # not known yet: a new worker takes its actor's title a moment after it starts
                continue
            self._roles[pid] = role
            reading = common.read_memory(pid)
            if reading is not None:
                resident[role] += reading[0]
                anonymous[role] += reading[1]
        with self._lock:
            self.peaks = {role: max(self.peaks.get(role, 0), value) for role, value in resident.items()}
        return resident, anonymous

    def take(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """(resident now, peak resident since the last call, anonymous now), MiB per role; the peaks start again."""
        resident, anonymous = self.sample()
        with self._lock:
            peaks, self.peaks = self.peaks, dict(resident)
        return mib(resident), mib(peaks), mib(anonymous)


def role_of(pid: int) -> str | None:
    title = common.command_arguments(pid)[0]
    return next((role for role, marks in ROLES.items() if any(title.startswith(mark) or os.path.basename(title) == mark for mark in marks)), None)


def mib(values: dict[str, int]) -> dict[str, float]:
    return {name: round(value / common.MEBIBYTE, 1) for name, value in values.items()}


def object_store() -> tuple[int, int, int]:
    """(bytes used, objects, bytes spilled so far) of the node's object store.

    From the raylet's node stats (what ``ray memory --stats-only`` prints): Ray has no public
    call for it without the dashboard, which the embedded Ray runs without."""
    import ray
    from ray._private.internal_api import node_stats

    node = ray.nodes()[0]
    stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False).store_stats
    return stats.object_store_bytes_used, stats.num_local_objects, stats.spilled_bytes_total


# -- the run --------------------------------------------------------------------------------------


def run_text_cache_benchmark(keys: int, asks: int, text_cache_mib: int | None) -> TextCacheRun:
    import ray

    from pipelines.runtime.text_cache import MAX_SHARDS, TEXT_ACTORS_PER_SHARD, budget_bytes
    from workers.runtime.text_cache import JobTextCache

    common.start_ray()
    try:
        # 1. the cache as a job starts it for this many text-stage actors, and the stand-ins
        workload = Workload(keys=keys, asks=asks, budget_bytes=budget_bytes(text_cache_mib),
                            shards=min(MAX_SHARDS, math.ceil(CLIENTS / TEXT_ACTORS_PER_SHARD)))
        cache = JobTextCache.start(namespace='{"model_fingerprint": "text-cache-scale"}', budget_bytes=workload.budget_bytes,
                                   shards=workload.shards)
        actor = ray.remote(num_cpus=CLIENT_CPUS)(TextCacheClient)
        clients = [actor.remote(cache, workload, index, CLIENTS) for index in range(CLIENTS)]
        # every actor up before the memory baseline is read
        ray.get([client.take_counts.remote() for client in clients] + [shard.stats.remote() for shard in cache.shards])
        with RoleSampler() as sampler:
            start, _, start_anonymous = sampler.take()
            run = TextCacheRun(workload=workload, start_mib=start, start_anonymous_mib=start_anonymous)
            run.checkpoints = drive(cache, clients, workload, sampler)
        cache.stop()
        return run
    finally:
        ray.shutdown()


def drive(cache, clients: list, workload: Workload, sampler: RoleSampler) -> list[Checkpoint]:
    """Every window through the stand-ins (the next once all are done), a checkpoint at each share of the texts."""
    import ray

    marks = sorted({min(workload.keys, math.ceil(share * workload.keys / WINDOW) * WINDOW) for share in CHECKPOINT_SHARES})
    checkpoints: list[Checkpoint] = []
    started = time.perf_counter()
    for window in range(workload.windows):
        ray.get([client.run_window.remote(window) for client in clients])
        texts = min(workload.keys, (window + 1) * WINDOW)
        if texts in marks:
            point = checkpoint(cache, clients, sampler, texts, time.perf_counter() - started, checkpoints[-1] if checkpoints else None)
            checkpoints.append(point)
            print(f"  text cache: {texts:,} distinct texts, {point.seconds:.0f} s, {point.cache['entries']:,} entries, "
                  f"shards {point.rss_mib['cache shards']:.0f} MiB, driver {point.rss_mib['driver']:.0f} MiB", file=sys.stderr, flush=True)
    return checkpoints


def checkpoint(cache, clients: list, sampler: RoleSampler, texts: int, seconds: float, previous: Checkpoint | None) -> Checkpoint:
    import ray

    counts: dict[str, float] = {}
    for client_counts in ray.get([client.take_counts.remote() for client in clients]):
        for name, value in client_counts.items():
            counts[name] = counts.get(name, 0) + value
    # the claims left: each is registered or forgotten by its actor, so none should stay between windows
    claims = sum(ray.get([shard.__ray_call__.remote(lambda shard: len(shard.claims)) for shard in cache.shards]))
    store_bytes, store_objects, spilled = object_store()
    now, peaks, anonymous = sampler.take()
    stats = cache.stats()
    since = (stats["lookups"] - previous.cache["lookups"], seconds - previous.seconds) if previous else (stats["lookups"], seconds)
    return Checkpoint(texts=texts, seconds=seconds, cache=stats, claims=claims, client_counts=counts, store_bytes=store_bytes,
                      store_objects=store_objects, spilled_bytes=spilled, rss_mib=now, peak_mib=peaks, anonymous_mib=anonymous,
                      lookups_per_second=since[0] / since[1])


# -- the report -----------------------------------------------------------------------------------


def print_text_cache_report(run: TextCacheRun) -> dict:
    workload, last = run.workload, run.checkpoints[-1]
    print(f"\njob text cache: {workload.keys:,} distinct texts asked {workload.asks} times each, in windows of {WINDOW:,} texts; "
          f"{CLIENTS} text-stage stand-ins of {CLIENT_CPUS} CPU, batches of {BATCH_ROWS} rows; {workload.shards} shard(s); "
          f"{os.cpu_count()} CPUs\n")
    print(common.format_columns(
        ("distinct texts", "s", "lookups/s", "entries", "registered", "hits", "waits", "evicted", "duplicates", "claims left",
         "store MiB", "store objects", *(f"{role} MiB" for role in ROLES)),
        [(f"{point.texts:,}", f"{point.seconds:.0f}", f"{point.lookups_per_second:,.0f}", f"{point.cache['entries']:,}",
          f"{point.cache['registered']:,}", f"{point.cache['hits']:,}", f"{point.cache['waits']:,}", f"{point.cache['evicted']:,}",
          f"{point.cache['duplicates']:,}", f"{point.claims:,}", common.mebibytes(point.store_bytes), f"{point.store_objects:,}",
          *(f"{point.rss_mib[role]:,.0f} ({point.peak_mib[role]:,.0f})" for role in ROLES))
         for point in run.checkpoints],
    ))
    print("- MiB per role: resident now (peak since the row before); before the first text: "
          + ", ".join(f"{role} {value:,.0f}" for role, value in run.start_mib.items()) + ".")
    print_budget(workload)
    counts = last.client_counts
    print(f"- texts encoded {int(counts['encoded']):,} for {workload.keys:,} distinct texts; {int(counts['wrong'])} wrong embeddings fetched; "
          f"{int(counts['wait_rounds']):,} waits for texts another actor was encoding; {common.mebibytes(last.spilled_bytes)} MiB spilled.")
    print(f"- text actors' time in the cache: {counts['fetch_seconds'] / max(1, counts['asked']) * 1e6:.0f} us a looked-up text (fetch), "
          f"{counts['store_seconds'] / max(1, counts['encoded']) * 1e6:.0f} us an encoded text (put, register).")
    held = print_bookkeeping(run)
    growth = print_growth(run)
    return {"workload": asdict(workload), "window": WINDOW, "batch_rows": BATCH_ROWS, "clients": CLIENTS, "client_cpus": CLIENT_CPUS,
            "entry_bytes": entry_bytes(), "start_mib": run.start_mib, "start_anonymous_mib": run.start_anonymous_mib,
            "checkpoints": [asdict(point) for point in run.checkpoints], "private_bytes_per_entry": held, "growth_bytes_per_text": growth,
            "machine": common.machine_dictionary()}


def entry_bytes() -> int:
    from workers.runtime.text_cache import embedding_bytes

    return embedding_bytes(fake_embedding(0))


def print_budget(workload: Workload) -> None:
    """How many entries the budget holds, and how large an embedding may be for all the distinct texts to fit."""
    entry = entry_bytes()
    overhead = entry - TOKENS * WIDTH * 2
    largest = workload.budget_bytes // workload.keys - overhead
    print(f"- budget {common.mebibytes(workload.budget_bytes)} MiB: {workload.budget_bytes // entry:,} entries of {entry:,} bytes "
          f"({TOKENS}x{WIDTH} float16 and {overhead:,} counted per entry); all {workload.keys:,} texts would fit "
          + (f"at up to {largest:,} bytes an embedding." if largest > 0 else "at no size (the per-entry count alone exceeds it)."))


def print_bookkeeping(run: TextCacheRun) -> dict[str, float]:
    """Private (anonymous) bytes per entry held at the end, above the start: what an entry costs outside the object store
    (the text actors' and the raylet's resident memory also counts the object store's pages they touched)."""
    last = run.checkpoints[-1]
    held = {role: (last.anonymous_mib[role] - run.start_anonymous_mib[role]) * common.MEBIBYTE / max(1, last.cache["entries"])
            for role in ("cache shards", "text actors", "raylet")}
    print(f"- outside the object store, per entry held at the end ({last.cache['entries']:,}): private bytes above the start: "
          + ", ".join(f"{role} {value:,.0f}" for role, value in held.items())
          + " (the text actors own the objects; their figure includes what grows with every text, below).")
    return held


def print_growth(run: TextCacheRun) -> dict[str, float]:
    """Resident bytes per role per new distinct text, between the first and last checkpoints whose cache was full:
    what grows with distinct texts beyond the bounded entries."""
    full = [point for point in run.checkpoints if point.cache["evicted"] > 0]
    if len(full) < 2:
        print("- the budget filled at fewer than two checkpoints: no growth with a full cache to show.")
        return {}
    first, last = full[0], full[-1]
    growth = {role: (last.rss_mib[role] - first.rss_mib[role]) * common.MEBIBYTE / (last.texts - first.texts) for role in ROLES}
    print(f"- from {first.texts:,} to {last.texts:,} distinct texts, the cache full ({first.cache['entries']:,} and "
          f"{last.cache['entries']:,} entries), resident bytes per new text: " + ", ".join(f"{role} {value:,.0f}" for role, value in growth.items())
          + "; anonymous (not shared) MiB at the end: " + ", ".join(f"{role} {value:,.0f}" for role, value in last.anonymous_mib.items()) + ".")
    return growth
