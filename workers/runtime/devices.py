"""Device, precision and thread choices for model workers."""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA in half precision when present (bf16 where supported), else CPU in fp32.

    ``dtype`` may force one of ``DTYPES``; half precision on CPU is refused because
    it is slow and numerically different from every reference we compare against.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda")
        if dtype == "auto":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, DTYPES[dtype]
    if dtype not in ("auto", "float32"):
        raise ValueError(f"dtype: {dtype!r} needs a GPU; this worker runs on CPU in float32")
    return torch.device("cpu"), torch.float32


def set_torch_threads(threads: int | None) -> int:
    """Give torch the threads this actor should use.

    Ray sets OMP_NUM_THREADS=1 in workers, so without this an actor computes on one
    core however many it reserved. ``None`` means every core of the node.
    """
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def upcast_vae(vae: torch.nn.Module) -> None:
    """Keep a VAE that overflows in float16 (``force_upcast``: SDXL's) in float32, as diffusers does."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
