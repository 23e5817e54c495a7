"""Where each model stage runs: resources per stage, derived from the cluster's shape.

Shared by every job (generation, encoding). A job names its stages and the share of
the cluster each one gets; ``stage_options`` turns that into per-stage actor pools.
Imports no model code: the driver sizes stages before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import ray

from pipelines.runtime.config import StageOptions

# CPU reserved by each light task (read, decode, write): fractions so that actors
# never leave a read or write task without a CPU to run on (see ``stage_options``)
TASK_CPUS = 0.25
# What the actors leave free: two light tasks, and the whole CPU of the task in which Ray
# Data cuts blocks to size (``Dataset.repartition``, which takes no resource arguments)
FREE_CPUS = max(2 * TASK_CPUS, 1.0)


@dataclass(frozen=True)
class ClusterShape:
    cpus: float
    gpus: float

    @classmethod
    def current(cls) -> "ClusterShape":
        if not ray.is_initialized():  # a processor applied before any Ray: say so, rather than Ray's own error
            raise ValueError("no Ray in this process: join or start one first (ray.init(...)); stages are sized from its resources")
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


def _default_threads(share: StageShare, cluster: ClusterShape, concurrency: int) -> int | None:
    """Torch threads per actor; None: every core of the actor's node.

    A light stage keeps to one thread. Heavy CPU actors share the cores: two actors with
    every core each ran 13x slower on 2 cores than one (threads spinning against each other).
    """
    if cluster.gpus or (share.heavy and concurrency == 1):
        return None
    return max(1, int(cluster.cpus // concurrency)) if share.heavy else 1


def stage_options(
    shares: dict[str, StageShare], cluster: ClusterShape, batch_size: int, overrides: dict[str, StageOptions], placement: str,
) -> dict[str, StageOptions]:
    """Resources per stage: the user's settings, the rest filled in for this cluster.

    GPU: one set of actors per GPU, each a share of it. CPU: one actor per stage, and
    CPU reservations derived from the final pool sizes so that actors never take every
    CPU: read, write and block-cutting tasks must always find ``FREE_CPUS``, or the
    dataset stalls.
    """
    check_stage_names(overrides, shares, placement)
    gpus = int(cluster.gpus)
    budget = max(cluster.cpus - FREE_CPUS, TASK_CPUS)
    options = {}
    for name, share in shares.items():
        chosen = overrides.get(name, StageOptions())
        concurrency = chosen.concurrency or max(1, gpus)
        default = StageOptions(
            batch_size=batch_size, concurrency=concurrency,
            num_gpus=share.gpu if gpus else 0,
            num_cpus=1.0 if gpus else min(1.0, budget * share.cpu / concurrency),
            threads=_default_threads(share, cluster, concurrency),
        )
        options[name] = chosen.merged_over(default)
    reserved = sum(option.num_cpus * option.concurrency for option in options.values())
    if reserved > cluster.cpus - FREE_CPUS:
        raise ValueError(
            f"stages reserve {reserved:g} of the cluster's {cluster.cpus:g} CPUs; read, write and block-cutting tasks need "
            f"{FREE_CPUS:g} free or the run stalls: lower num_cpus or concurrency of {', '.join(options)}"
        )
    return options


def check_stage_names(overrides: dict[str, StageOptions], shares: dict[str, StageShare], placement: str) -> None:
    """Refuse settings for a stage the placement does not have (known before the cluster is)."""
    unknown = set(overrides) - set(shares)
    if unknown:
        raise ValueError(f"stages: {', '.join(sorted(unknown))} not in the {placement} placement (stages: {', '.join(shares)})")


def vae_micro_batch(overrides: dict[str, StageOptions], stage: str, shares: dict[str, StageShare]) -> tuple[dict[str, StageOptions], int | None]:
    """Rows per VAE call of ``stage`` (None: a whole batch), and the overrides left for ``stage_options``.

    ``--stage vae_decoder.batch_size=N`` (or ``vae_encoder``) sizes the VAE's own calls, whose
    memory grows with the pixels: the stage's batches where the VAE is a stage of its own,
    the calls inside the fused actor otherwise (only ``batch_size`` applies there).
    """
    chosen = overrides.get(stage)
    if chosen is None or stage in shares:
        return overrides, chosen.batch_size if chosen else None
    others = [field.name for field in fields(chosen) if field.name != "batch_size" and getattr(chosen, field.name) is not None]
    if others:
        raise ValueError(f"stages: {stage} runs inside the fused actor here, where only {stage}.batch_size applies (not {', '.join(others)})")
    return {name: options for name, options in overrides.items() if name != stage}, chosen.batch_size


# -- work granularity -----------------------------------------------------------------------------

# Ray Data hands a whole block to one actor task, and a task's results leave it only when
# the task ends: the block is the unit of spreading work, of progress and of loss.
# Enough blocks per actor that every actor starts with work, the last ones end together, and
# a killed actor or driver loses little: each actor has one block in flight, an eighth of its share
BLOCKS_PER_ACTOR = 8
# Model work one block may carry, in pixels x model passes: 2**30 is 32 images of 1024x1024
# at 32 steps, about two minutes of one GPU with SDXL: what a killed actor loses and what
# a viewer waits for between results
MAX_BLOCK_PIXEL_STEPS = 2**30
# Pixels one block may hold (decoded crops, images, latents): 2**26 is 64 Mi pixels,
# 192 MiB as 8-bit RGB, 256 crops of 512x512
MAX_BLOCK_PIXELS = 2**26
# Rows per block when rows cost little: large enough that per-block overhead (a task, an
# object, a progress update: milliseconds) stays far below the block's work
MAX_ROWS_PER_BLOCK = 4096


@dataclass(frozen=True, kw_only=True)
class BlockWork:
    """The work of a job's model stages, as far as sizing its blocks needs it."""

    rows: int  # rows the blocks carry: input rows not done yet (generation), every input row (encoding)
    pixels_per_row: int  # height x width of a row's image
    passes_per_row: int  # model passes per row: denoising steps (generation), 1 (encoding)
    actors: int  # actors of the largest model stage pool
    batch_size: int  # rows per model batch (the largest of the model stages)

    def __post_init__(self) -> None:
        if not isinstance(self.rows, int) or self.rows < 0:
            raise ValueError(f"rows: must be a whole number >= 0, got {self.rows!r}")
        for name in ("pixels_per_row", "passes_per_row", "actors", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a whole number >= 1, got {value!r}")

    @classmethod
    def of_stages(cls, options: list[StageOptions], *, rows: int, pixels_per_row: int, passes_per_row: int) -> "BlockWork":
        """The work of model stages with these (resolved) options: the largest pool and batch set the blocks."""
        return cls(
            rows=rows, pixels_per_row=pixels_per_row, passes_per_row=passes_per_row,
            actors=max(option.concurrency for option in options), batch_size=max(option.batch_size for option in options),
        )


def rows_per_block(work: BlockWork) -> int:
    """Rows per Ray Data block for the model stages: whole model batches, sized from the work they hold.

    Small jobs (few rows per actor) get blocks of one batch or a few, so that every actor
    starts at once and results appear batch by batch. Large jobs get larger blocks, up to
    the first bound a block reaches: its model work, its pixels, ``MAX_ROWS_PER_BLOCK``.
    """
    # 1. spread: BLOCKS_PER_ACTOR blocks for every actor
    spread = math.ceil(work.rows / (work.actors * BLOCKS_PER_ACTOR))
    # 2. bounds: what one block carries in model work and in memory
    by_work = MAX_BLOCK_PIXEL_STEPS // (work.pixels_per_row * work.passes_per_row)
    by_pixels = MAX_BLOCK_PIXELS // work.pixels_per_row
    rows = min(spread, by_work, by_pixels, MAX_ROWS_PER_BLOCK)
    # 3. whole batches, at least one: a block cut mid-batch would run a partial batch
    return max(1, rows // work.batch_size) * work.batch_size
