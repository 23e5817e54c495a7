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
from typing import Any, ClassVar, Iterator

import numpy as np

from workers.runtime.columns import BUSY_COLUMN_PREFIX
from workers.runtime.devices import pick_device, set_torch_threads
from workers.families import ModelFamily
from workers.runtime.models import ModelDirectory, ModelSource

Batch = dict[str, np.ndarray]


class ModelWorker:
    STAGE: ClassVar[str]
    REQUIRED_COLUMNS: ClassVar[dict[str, str]]  # column -> what it holds, for every family
    OUTPUT_COLUMNS: ClassVar[tuple[str, ...]]

    def __init__(self, model: ModelSource | ModelDirectory, *, dtype: str = "auto", device: str | None = None, threads: int | None = None):
        self.model = model if isinstance(model, ModelDirectory) else ModelDirectory(model)
        self.family: ModelFamily = self.model.family
        # the driver resolves both (``pipelines.runtime.precision``); None / "auto": decided here
        self.device, self.dtype = pick_device(dtype, device, self.family)
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
        started = time.perf_counter()
        yield
        rows = len(next(iter(batch.values())))
        batch[self.busy_column()] = np.full(rows, (time.perf_counter() - started) / max(rows, 1))


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
