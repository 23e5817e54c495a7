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


def pick_device(dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA in half precision when present (bf16 where supported), else CPU in fp32.

    ``dtype`` may force float32, float16 or bfloat16; half precision on CPU is refused because
    it is slow and numerically different from every reference we compare against.
    """
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda")
        if dtype == "auto":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, getattr(torch, dtype)
    if dtype not in ("auto", "float32"):
        raise ValueError(f"dtype: {dtype!r} needs a GPU; this worker runs on CPU in float32")
    return torch.device("cpu"), torch.float32


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
