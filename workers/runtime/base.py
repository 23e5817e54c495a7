"""What every model worker shares: model directory, device, threads, busy-time accounting.

A worker is a callable class for ``ray.data.Dataset.map_batches``: a batch is a dict
of numpy arrays, the same dict (with the worker's output columns) comes back.
``required_columns(family)`` and ``output_columns(family)`` let the pipeline check its
wiring before any actor starts; they depend on the model family (SDXL's text stage
also sends pooled embeddings, for example).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np

from workers.runtime.columns import BUSY_COLUMN_PREFIX, OOM_SPLITS_COLUMN_PREFIX, failed_rows, mark_failed
from workers.runtime.devices import pick_device, set_torch_threads
from workers.families import ModelFamily
from workers.runtime.memory import OUT_OF_MEMORY, cap_gpu_memory, peak_memory_column, reset_peak_memory, run_in_halves
from workers.runtime.models import ModelDirectory, ModelSource

Batch = dict[str, np.ndarray]


class ModelWorker:
    STAGE: ClassVar[str]
    REQUIRED_COLUMNS: ClassVar[dict[str, str]]  # column -> what it holds, for every family
    OUTPUT_COLUMNS: ClassVar[tuple[str, ...]]

    def __init__(self, model: ModelSource | ModelDirectory, *, dtype: str = "auto", device: str | None = None, threads: int | None = None,
                 gpu_share: float | None = None):
        self.model = model if isinstance(model, ModelDirectory) else ModelDirectory(model)
        self.family: ModelFamily = self.model.family
        # the driver resolves both (``pipelines.runtime.precision``); None / "auto": decided here
        self.device, self.dtype = pick_device(dtype, device, self.family)
        cap_gpu_memory(self.device.type, gpu_share)  # before any model loads
        self._oom_splits = 0  # batch halvings after out-of-memory errors, in the batch being computed
        if self.device.type == "cpu":
            set_torch_threads(threads)

    @classmethod
    def required_columns(cls, family: ModelFamily) -> dict[str, str]:
        return dict(cls.REQUIRED_COLUMNS)

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return cls.OUTPUT_COLUMNS

    def load_pipeline(self, components: tuple[str, ...], **options: Any) -> Any:
        return self.model.pipeline(components, self.device, self.dtype, **options)

    @classmethod
    def busy_column(cls) -> str:
        return f"{BUSY_COLUMN_PREFIX}{cls.STAGE}"

    @contextmanager
    def busy(self, batch: Batch) -> Iterator[None]:
        """Time the computation of one batch and spread it over its rows.

        Summing the column over all rows gives the stage's total compute time,
        whatever batches and workers the rows went through.
        """
        started, self._oom_splits = time.perf_counter(), 0
        reset_peak_memory(self.device.type)
        yield
        rows = len(next(iter(batch.values())))
        batch[self.busy_column()] = np.full(rows, (time.perf_counter() - started) / max(rows, 1))
        mark_failed(batch, {}, self.STAGE)  # every batch carries the failure columns, whatever its stages
        # the batch's halvings on its first row: summed over rows, the stage's count
        batch[f"{OOM_SPLITS_COLUMN_PREFIX}{self.STAGE}"] = np.array([self._oom_splits] + [0] * (rows - 1), dtype=np.int64)[:rows]
        batch.update(peak_memory_column(self.device.type, self.STAGE, rows))

    def rows_to_compute(self, batch: Batch, rows: list[int]) -> list[int]:
        """``rows`` without those an earlier stage could not compute."""
        failed = failed_rows(batch)
        return [row for row in rows if not failed[row]]

    def compute_rows(self, batch: Batch, rows: list[int], compute: Callable[[list[int]], Sequence[Any]],
                     reason: Callable[[int], str]) -> dict[int, Any]:
        """``compute(rows)``, halved on out-of-memory errors (``workers.runtime.memory``); the outputs per row.

        A row that does not fit alone is marked failed in ``batch`` with ``reason(row)``;
        the caller leaves it out of its output column (a placeholder) and the job goes on.
        """
        run = run_in_halves(rows, compute)
        self._oom_splits += run.splits
        if run.failed:
            mark_failed(batch, {row: (OUT_OF_MEMORY, reason(row)) for row in run.failed}, self.STAGE)
        return run.outputs


def embedding_columns(family: ModelFamily, *, negative: bool = True) -> tuple[str, ...]:
    """The columns a family's text stage fills: each embedding, and its negative when asked."""
    names = family.embedding_columns
    return names + tuple(f"negative_{name}" for name in names) if negative else names


def group_rows(keys: list[tuple]) -> dict[tuple, list[int]]:
    """Row indices per distinct key, in first-seen order (rows batched only with compatible rows)."""
    groups: dict[tuple, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups
