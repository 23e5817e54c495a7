"""Opt-in speed for the denoiser: regional ``torch.compile`` and diffusers' attention backends.

Both are off by default and change no output beyond the kernels' rounding (the CPU tests
compare images with and without them).

- ``--compile``: only the denoiser's repeated blocks are compiled (diffusers' regional
  compilation, ``compile_repeated_blocks``, where the model declares ``_repeated_blocks``;
  otherwise the blocks that repeat in its ``ModuleList``s, one by one: SD3). Every block of a
  class shares one compiled graph, so compiling takes seconds where the whole model takes
  minutes. The first denoising call of each input shape (size, rows, CFG path) is a warm-up
  of two steps whose time is counted apart; graphs compiled outside a warm-up are recompiles.
- ``--attention-backend NAME``: diffusers' ``set_attention_backend`` on the denoiser. The
  driver refuses, before any model loads, a name diffusers does not know, a backend whose
  package is not installed, one that downloads kernels at run time (``*_hub``: a job must
  not depend on the network), a family whose attention does not go through diffusers'
  dispatcher (U-Net, SD3: the setting would change nothing) and a GPU-only backend on CPU.

torch and diffusers are imported where they are used: the driver imports them only when
``--attention-backend`` is given.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from workers.runtime.columns import COUNT_COLUMN_PREFIX

if TYPE_CHECKING:
    import torch

    from workers.families import ModelFamily

# what ``--compile`` hands torch.compile; the tests use "aot_eager" (inductor on CPU takes ~75 s for a tiny model)
DEFAULT_COMPILE_BACKEND = "inductor"
# backends that compute on CPU too (torch's own SDPA); the others need CUDA kernels
CPU_ATTENTION_BACKENDS = ("native", "_native_math")
WARMUP_STEPS = 2  # shapes do not depend on the steps: two cover the first and the later steps' code paths
# counts the denoiser adds to a batch (summed into run.json's "compile")
GRAPHS_COLUMN = f"{COUNT_COLUMN_PREFIX}compile_graphs"
RECOMPILES_COLUMN = f"{COUNT_COLUMN_PREFIX}compile_recompiles"
WARMUP_MICROSECONDS_COLUMN = f"{COUNT_COLUMN_PREFIX}compile_warmup_microseconds"


# -- the driver: checks before any model loads -----------------------------------------------


def check_attention_backend(family: ModelFamily, name: str | None) -> None:
    """Refuse an attention backend this job cannot use (exit 2), naming why."""
    if name is None:
        return
    # 1. a family whose attention diffusers' dispatcher runs
    if not family.attention_dispatch:
        raise ValueError(f"attention_backend: {family.name} models' attention does not go through diffusers' attention "
                         "dispatcher, so a backend would change nothing; leave --attention-backend out")
    from diffusers.models.attention_dispatch import (
        _HUB_KERNELS_REGISTRY, AttentionBackendName, _check_attention_backend_requirements,
    )

    # 2. a name diffusers knows
    known = {member.value for member in AttentionBackendName}
    if name not in known:
        raise ValueError(f"attention_backend: unknown backend {name!r}; diffusers knows {', '.join(sorted(known))}")
    backend = AttentionBackendName(name)
    # 3. no kernels downloaded at run time
    if backend in _HUB_KERNELS_REGISTRY or name.endswith("_hub"):
        raise ValueError(f"attention_backend: {name!r} downloads its kernels from the Hugging Face Hub when a model "
                         "loads; latentray runs no download inside a job: install the kernel's package and use its "
                         "local backend (flash, _flash_3, sage, ...)")
    # 4. installed here (the workers' nodes run the same environment)
    try:
        _check_attention_backend_requirements(backend)
    except RuntimeError as error:
        raise ValueError(f"attention_backend: {name!r} is not installed: {error}") from None


def check_attention_device(name: str | None, device: str) -> None:
    """Refuse a GPU-only attention backend for a stage that runs on CPU."""
    if name is not None and device == "cpu" and name not in CPU_ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: {name!r} needs a GPU; the denoiser runs on CPU here, where only "
                         f"{', '.join(CPU_ATTENTION_BACKENDS)} compute")


# -- the worker -------------------------------------------------------------------------------


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles: those of the model's ``_repeated_blocks`` classes, else
    the elements of its ``ModuleList``s whose class (the model library's, not a torch layer) repeats
    there; outermost only: a block inside a chosen block is compiled with it."""
    import torch

    names = set(getattr(model, "_repeated_blocks", None) or ())
    if not names:
        seen: dict[str, int] = {}
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList):
                for element in module:
                    if type(element).__module__.startswith("torch."):
                        continue  # a Linear or Dropout: too small a region to be worth a graph
                    seen[type(element).__name__] = seen.get(type(element).__name__, 0) + 1
        names = {name for name, count in seen.items() if count > 1}
    chosen: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names or module is model:
            continue
        chosen.append(module)
        inside.update(id(child) for child in module.modules())
    return chosen


class DenoiserSpeed:
    """The denoiser's compile and attention settings, applied once; per-shape warm-ups and compile counts."""

    def __init__(self, model: torch.nn.Module, *, compile_backend: str | None, attention_backend: str | None):
        self.compile_backend = compile_backend
        self._warm: set[tuple] = set()
        self._graphs_before = 0
        self.counts = {GRAPHS_COLUMN: 0, RECOMPILES_COLUMN: 0, WARMUP_MICROSECONDS_COLUMN: 0}
        # 1. the attention backend first: compiled blocks trace the attention they will run
        if attention_backend is not None:
            model.set_attention_backend(attention_backend)
        # 2. regional compilation: diffusers' where the model declares its blocks, else ours one by one
        if compile_backend is not None:
            if getattr(model, "_repeated_blocks", None):
                model.compile_repeated_blocks(backend=compile_backend)
            else:
                for block in repeated_blocks(model):
                    block.compile(backend=compile_backend)

    @property
    def compiling(self) -> bool:
        return self.compile_backend is not None

    def needs_warmup(self, shape: tuple) -> bool:
        return self.compiling and shape not in self._warm

    @contextmanager
    def warmup(self, shape: tuple) -> Iterator[None]:
        """Time a warm-up call of ``shape``; the graphs it compiles are expected, not recompiles."""
        started, graphs = time.perf_counter(), compiled_graphs()
        yield
        self._warm.add(shape)
        self.counts[WARMUP_MICROSECONDS_COLUMN] += int((time.perf_counter() - started) * 1e6)
        self.counts[GRAPHS_COLUMN] += compiled_graphs() - graphs

    @contextmanager
    def call(self) -> Iterator[None]:
        """A denoising call after its shape's warm-up: any graph it compiles is a recompile."""
        graphs = compiled_graphs() if self.compiling else 0
        yield
        if self.compiling:
            new = compiled_graphs() - graphs
            self.counts[GRAPHS_COLUMN] += new
            self.counts[RECOMPILES_COLUMN] += new

    def pop_counts(self, rows: int) -> dict[str, Any]:
        """This batch's compile counts as count columns (on the first row), reset for the next batch."""
        import numpy as np

        if not self.compiling:
            return {}
        columns = {name: np.array([value] + [0] * (rows - 1), dtype=np.int64)[:rows] for name, value in self.counts.items()}
        self.counts = dict.fromkeys(self.counts, 0)
        return columns


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_record(counts: dict[str, int]) -> dict | None:
    """run.json's ``compile``: graphs compiled, recompiles, warm-up seconds, from the commit tasks' sums of
    the denoisers' counts (None without ``--compile``: no denoiser counted)."""
    prefix = COUNT_COLUMN_PREFIX
    if GRAPHS_COLUMN.removeprefix(prefix) not in counts:
        return None
    return {
        "graphs_compiled": counts.get(GRAPHS_COLUMN.removeprefix(prefix), 0),
        "recompiles": counts.get(RECOMPILES_COLUMN.removeprefix(prefix), 0),
        "warmup_seconds": round(counts.get(WARMUP_MICROSECONDS_COLUMN.removeprefix(prefix), 0) / 1e6, 3),
    }
