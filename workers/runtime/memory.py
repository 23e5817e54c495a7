"""GPU memory: each actor's share, peaks per stage, recovering from out-of-memory errors by halving
batches, and VAE tiling for large images.

Ray's fractional GPUs (``num_gpus=0.3``) only count: an actor may still take the whole GPU and
starve the actors beside it. An actor given a fraction caps its own process to it
(``cap_gpu_memory``), so split placement on one GPU cannot starve a neighbour: the actor that
outgrows its share gets the out-of-memory error, and halves its batch.

One out-of-memory batch used to kill its actor and the whole block. Every model call of
every worker goes through ``run_in_halves``: on a CUDA out-of-memory error the cached
memory is freed and the rows are retried in two halves, down to one row; a row that still
does not fit fails alone (the worker records it, the commit writes it to ``errors/``) and
the others go on. Rows keep their own seeds and generators, so a row computed in a smaller
batch is the row the full batch would have computed (up to the batch-size dependence of
the kernels, none for a batch of one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from workers.runtime.columns import PEAK_MEMORY_COLUMN_PREFIX

OUT_OF_MEMORY = "out_of_memory"  # the failure code of a row that does not fit even alone
# Images above this many pixels are decoded and encoded by the VAE in tiles (diffusers'
# ``enable_tiling``): 2048x2048. A VAE's activations grow with the pixels (about 3 GB per
# 1024x1024 image for Qwen-Image-class VAEs); tiles bound them, at the cost of faint seams,
# so smaller images, which fit whole, never tile. Tiling depends on the size only: reruns agree.
TILE_ABOVE_PIXELS = 2048 * 2048


def cap_gpu_memory(device: str, share: float | None) -> None:
    """Cap this process's CUDA allocations to ``share`` of the GPU (a fraction below 1; nothing otherwise, or on CPU)."""
    if device != "cuda" or share is None or not 0 < share < 1:
        return
    import torch

    torch.cuda.set_per_process_memory_fraction(share)


def reset_peak_memory(device: str) -> None:
    """Start measuring a batch's peak from what is allocated now (the resident models)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_column(device: str, stage: str, rows: int) -> dict[str, np.ndarray]:
    """The batch's peak of allocated GPU memory (models included), in bytes, on its first row; nothing on
    CPU, where it is not measured (run.json then says null, not 0)."""
    if device != "cuda" or rows == 0:
        return {}
    import torch

    return {f"{PEAK_MEMORY_COLUMN_PREFIX}{stage}": np.array([torch.cuda.max_memory_allocated()] + [0] * (rows - 1), dtype=np.int64)}


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, as torch raises it (``torch.cuda.OutOfMemoryError``)."""
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError)


def free_cached_memory() -> None:
    """Give the allocator's cached blocks back, so that the halves start from what is really free."""
    import gc

    import torch

    gc.collect()  # the failed call's tensors, held by the error's frames until now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class HalvedRun:
    """What ``run_in_halves`` computed: outputs per row, the rows that never fit, how often it halved."""

    outputs: dict[int, Any] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    splits: int = 0


def run_in_halves(rows: list[int], compute: Callable[[list[int]], Sequence[Any]]) -> HalvedRun:
    """``compute(rows)`` (one output per row, in order); on out-of-memory, the two halves in turn.

    Halves run in row order, each split again when it does not fit, down to single rows.
    """
    result = HalvedRun()
    pending = [rows] if rows else []  # no rows (all failed earlier): no model call with an empty batch
    while pending:
        part = pending.pop(0)
        out_of_memory = False
        try:
            result.outputs.update(zip(part, compute(part)))
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = True  # freed below, once the error (and the tensors its frames hold) is gone
        if not out_of_memory:
            continue
        free_cached_memory()
        if len(part) == 1:
            result.failed.append(part[0])
            continue
        middle = (len(part) + 1) // 2
        pending[:0] = [part[:middle], part[middle:]]
        result.splits += 1
    return result


def out_of_memory_reason(height: int, width: int) -> str:
    return f"out of GPU memory at {width}x{height}"


def micro_batches(rows: list[int], size: int | None) -> list[list[int]]:
    """``rows`` in runs of ``size`` (None: one run)."""
    size = size or max(len(rows), 1)
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def set_tiling(vae: Any, height: int, width: int) -> None:
    """Tile the VAE's work for images above ``TILE_ABOVE_PIXELS``; whole images otherwise."""
    if not hasattr(vae, "enable_tiling"):
        return
    if height * width > TILE_ABOVE_PIXELS:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
