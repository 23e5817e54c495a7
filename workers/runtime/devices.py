"""Device, precision and thread choices for model workers.

torch is imported where it is used, never when a module is: the driver imports the worker
classes (for their column declarations) and need not load torch (0.8 s of every start-up).
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

    from workers.families import ModelFamily


DEVICE_KINDS = ("cpu", "cuda")


def check_dtype(family: ModelFamily, dtype: str) -> None:
    """Refuse float16 for a family that overflows in it (NaN or black images), before any model loads."""
    if dtype == "float16" and not family.float16_safe:
        raise ValueError(
            f"dtype: float16 overflows in {family.name} models (NaN or black images); "
            f"use bfloat16 (their default on CUDA) or float32"
        )


def resolve_dtype(family: ModelFamily, dtype: str, device: str) -> str:
    """The dtype a stage runs in, as a plain string: the driver resolves it (no torch there).

    ``auto`` is the family's ``cuda_dtype`` on CUDA and float32 on CPU. Half precision on
    CPU is refused: slow, and numerically unlike every reference we compare against.
    """
    check_dtype(family, dtype)
    if device == "cpu":
        if dtype not in ("auto", "float32"):
            raise ValueError(f"dtype: {dtype!r} needs a GPU; this stage runs on CPU (no GPU in the cluster, or num_gpus=0), in float32")
        return "float32"
    return family.cuda_dtype if dtype == "auto" else dtype


def pick_device(dtype: str = "auto", device: str | None = None, family: ModelFamily | None = None) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype a worker loads its models in.

    The driver passes both resolved (``device`` "cuda" or "cpu", ``dtype`` a concrete
    name): the worker uses exactly those, so what a run records is what ran. Called
    directly (``device`` None, ``dtype`` "auto"): CUDA when present, in the family's dtype.
    """
    import torch

    # 1. the device: as given, else CUDA when torch sees one
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and dtype not in ("auto", "float32"):
            raise ValueError(f"dtype: {dtype!r} needs a GPU; this worker runs on CPU in float32")
    if device not in DEVICE_KINDS:
        raise ValueError(f"device: must be one of {', '.join(DEVICE_KINDS)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: this stage was given a GPU, but torch sees none (CUDA_VISIBLE_DEVICES, driver, or a CPU build of torch)")

    # 2. the dtype: as given, else the family's for this device
    if dtype == "auto":
        if family is not None:
            dtype = resolve_dtype(family, dtype, device)
        else:  # no family: any bf16-capable GPU in bf16
            dtype = "float32" if device == "cpu" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return torch.device(device), getattr(torch, dtype)


def set_torch_threads(threads: int | None) -> int:
    """Give torch the threads this actor should use.

    Ray sets OMP_NUM_THREADS=1 in workers, so without this an actor computes on one
    core however many it reserved. ``None`` means every core of the node.
    """
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def upcast_vae(vae: torch.nn.Module) -> None:
    """Keep a VAE that overflows in float16 (``force_upcast``: SDXL's) in float32, as diffusers does."""
    import torch

    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)


Method = TypeVar("Method", bound=Callable)
_compute_thread = threading.local()


def _mark_compute_thread() -> None:
    _compute_thread.active = True


# one per process, started on first use; its one thread loads the models and runs every batch
_compute_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentray-compute", initializer=_mark_compute_thread)


def inference_mode(method: Method) -> Method:
    """``torch.inference_mode()`` around a method (torch imported at the first call, not at import)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)

    return run  # type: ignore[return-value]


def on_compute_thread(method: Method) -> Method:
    """Run a worker's ``__init__`` or ``__call__`` on the process's one compute thread.

    Ray Data builds an actor's worker in the actor's main thread but calls it from a thread
    of its own. Once two threads have run PyTorch's OpenMP regions, each keeps a thread
    team of its own on the same cores, and on CPU every batch ran about 40% slower
    (measured: the ``small`` model, a batch of 8 at 128 px, 3.3 s -> 4.6 s). Loading and
    computing on one thread keeps one team, whichever thread Ray calls from. Calls
    already on that thread (a fused worker calling its stages) run directly.
    """

    @functools.wraps(method)
    def run(*args, **kwargs):
        if getattr(_compute_thread, "active", False):
            return method(*args, **kwargs)
        return _compute_executor.submit(method, *args, **kwargs).result()

    return run  # type: ignore[return-value]
