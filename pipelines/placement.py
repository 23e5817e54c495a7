"""Where each model stage runs: resources per stage, derived from the cluster's shape.

Shared by every job (generation, encoding). A job names its stages and the share of
the cluster each one gets; ``stage_options`` turns that into per-stage actor pools.
Imports no model code: the driver sizes stages before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from pipelines.config import StageOptions

# CPU reserved by each light task (read, decode, write): fractions so that actors
# never leave a read or write task without a CPU to run on (see ``stage_options``)
TASK_CPUS = 0.25


@dataclass(frozen=True)
class ClusterShape:
    cpus: float
    gpus: float

    @classmethod
    def current(cls) -> "ClusterShape":
        resources = ray.cluster_resources()
        return cls(cpus=resources.get("CPU", 1.0), gpus=resources.get("GPU", 0.0))


@dataclass(frozen=True)
class StageShare:
    """What one stage gets of the cluster, relative to the other stages of its placement."""

    cpu: float  # share of the actors' CPU budget on a CPU-only cluster
    gpu: float  # share of one GPU per actor on a GPU cluster
    # a heavy stage gives torch every core of its node; a light one keeps to one thread
    # so that it does not fight the heavy stage for cores
    heavy: bool


def stage_options(
    shares: dict[str, StageShare], cluster: ClusterShape, batch_size: int, overrides: dict[str, StageOptions], placement: str,
) -> dict[str, StageOptions]:
    """Resources per stage: the user's settings, the rest filled in for this cluster.

    GPU: one set of actors per GPU, each a share of it. CPU: one actor per stage, and
    CPU reservations derived from the final pool sizes so that actors never take every
    CPU: a read or write task must always find one, or the dataset stalls.
    """
    unknown = set(overrides) - set(shares)
    if unknown:
        raise ValueError(f"stages: {', '.join(sorted(unknown))} not in the {placement} placement (stages: {', '.join(shares)})")
    gpus = int(cluster.gpus)
    budget = max(cluster.cpus - 2 * TASK_CPUS, TASK_CPUS)
    options = {}
    for name, share in shares.items():
        chosen = overrides.get(name, StageOptions())
        concurrency = chosen.concurrency or max(1, gpus)
        default = StageOptions(
            batch_size=batch_size, concurrency=concurrency,
            num_gpus=share.gpu if gpus else 0,
            num_cpus=1.0 if gpus else min(1.0, budget * share.cpu / concurrency),
            # None: every core of the actor's own node
            threads=None if gpus or share.heavy else 1,
        )
        options[name] = chosen.merged_over(default)
    reserved = sum(option.num_cpus * option.concurrency for option in options.values())
    if reserved > cluster.cpus - TASK_CPUS:
        raise ValueError(
            f"stages reserve {reserved:g} of the cluster's {cluster.cpus:g} CPUs; read and write tasks need "
            f"{TASK_CPUS:g} free or the run stalls: lower num_cpus or concurrency of {', '.join(options)}"
        )
    return options
