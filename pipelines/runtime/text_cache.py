"""The job text cache on the driver: started by ``run_job`` for the stages that encode texts.

The cache itself (``workers.runtime.text_cache``) is one or a few Ray actors; the driver
starts them, hands their handles to every stage whose worker declares ``USES_TEXT_CACHE``
(the text encoder, the caption encoder, the fused workers), records their totals in
run.json and stops them. The driver keeps no entry: its memory does not grow with rows.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ray

from pipelines.runtime.stages import Stage
from workers.runtime.text_cache import JobTextCache

# Default budget: this share of the cluster's object store. The rest carries the blocks in
# flight between stages (Ray Data keeps them under half of it); beyond the budget the least
# recently used embeddings are dropped, and under pressure Ray spills what is left to disk
TEXT_CACHE_SHARE = 0.25
# a floor for clusters that report no object store size
MIN_BUDGET_BYTES = 64 * 2**20
# one shard (one actor) per this many text-stage actors, at most MAX_SHARDS: every batch of
# every text actor makes one lookup and one register call, a few dict operations each
TEXT_ACTORS_PER_SHARD = 16
MAX_SHARDS = 8


def start_text_cache(plan: Any, stages: list[Stage]) -> JobTextCache | None:
    """Start the job's cache and hand it to the stages that encode texts; None when off or no stage encodes."""
    users = [stage for stage in stages if getattr(stage.worker, "USES_TEXT_CACHE", False)]
    if not users or not plan.config.text_cache:
        return None
    actors = sum(stage.options.concurrency or 1 for stage in users)
    cache = JobTextCache.start(
        namespace=text_namespace(plan), budget_bytes=budget_bytes(plan.config.text_cache_mib),
        shards=min(MAX_SHARDS, math.ceil(actors / TEXT_ACTORS_PER_SHARD)),
    )
    for stage in users:
        stage.constructor_kwargs["text_cache"] = cache
    return cache


def budget_bytes(text_cache_mib: int | None) -> int:
    """The configured budget, else ``TEXT_CACHE_SHARE`` of the cluster's object store."""
    if text_cache_mib is not None:
        return text_cache_mib * 2**20
    return max(MIN_BUDGET_BYTES, int(ray.cluster_resources().get("object_store_memory", 0) * TEXT_CACHE_SHARE))


def text_namespace(plan: Any) -> str:
    """What shapes an embedding besides its text: the model's content, family, token budget and precision."""
    config = plan.config
    return json.dumps({
        "model_fingerprint": plan.model.location.fingerprint, "family": plan.model.family.name,
        "max_sequence_length": config.max_sequence_length, "dtype": config.dtype,
    }, sort_keys=True)


def stop_text_cache(cache: JobTextCache | None, counts: dict[str, int]) -> dict | None:
    """The cache's totals for run.json (None when the run had none); its actors stopped.

    ``counts``: the run's summed worker counts, for the time text-stage actors spent on the cache
    (lookups, fetches, puts) and waiting for texts other actors were encoding.
    """
    if cache is None:
        return None
    try:
        return {**cache.stats(), "seconds_in_text_stage": round(counts.get("text_cache_microseconds", 0) / 1e6, 3),
                "seconds_waiting": round(counts.get("text_cache_wait_microseconds", 0) / 1e6, 3)}
    except ray.exceptions.RayError as error:  # the run's outcome does not depend on its cache
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        cache.stop()
