"""Batch columns from per-row arrays: numpy only (no torch), so CPU tasks of the pipelines use it too."""

from __future__ import annotations

import numpy as np

# each model worker adds a column "busy_seconds_<stage>": seconds its model was busy on the batch,
# spread over the rows; the pipelines' commit tasks sum and remove it
BUSY_COLUMN_PREFIX = "busy_seconds_"
# a worker may add columns "count_<name>": whole numbers (e.g. texts encoded) the commit tasks sum
# and remove like the busy seconds; run.json holds each total as <name>
COUNT_COLUMN_PREFIX = "count_"


def stack_column(arrays: list[np.ndarray]) -> np.ndarray:
    """One batch column from per-row arrays: stacked when shapes agree, else an object array.

    Rows of different sizes can share a batch; Ray Data stores the object form as a
    variable-shaped tensor column.
    """
    if len({array.shape for array in arrays}) <= 1:
        return np.stack(arrays) if arrays else np.empty((0,))
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column

# Rows a model stage could not compute (out of GPU memory, a non-finite image) carry why in
# these columns ("" for the others); later stages skip them, and the commit tasks write them
# to errors/ with their stage and reason. Each worker also adds "count_oom_splits_<stage>": how
# often it halved a batch after running out of GPU memory (the batch's count on its first row).
FAILED_STAGE_COLUMN = "failed_stage"
FAILED_CODE_COLUMN = "failed_code"
FAILED_REASON_COLUMN = "failed_reason"
# Whose fault a failure is ("permanent" or "transient", the pipelines' error causes). Only the pipelines'
# validation sets it, as it alone reads storage for a row (a source image the store refused: transient);
# "" or no column: the row's own, as every model stage's failure.
FAILED_CAUSE_COLUMN = "failed_cause"
OOM_SPLITS_COLUMN_PREFIX = f"{COUNT_COLUMN_PREFIX}oom_splits_"  # a count: run.json groups them per stage
# "count_peak_<...>" columns are maxima, not sums: a stage's peak GPU memory is the largest of its batches'
PEAK_COUNT_PREFIX = "peak_"
PEAK_MEMORY_COLUMN_PREFIX = f"{COUNT_COLUMN_PREFIX}{PEAK_COUNT_PREFIX}gpu_memory_bytes_"


def combine_counts(name: str, first: int, second: int) -> int:
    """Two totals of the count ``name``: the larger for a peak, else their sum."""
    return max(first, second) if name.startswith(PEAK_COUNT_PREFIX) else first + second


def failed_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows an earlier stage marked failed (all False when none did)."""
    rows = len(next(iter(batch.values()))) if batch else 0
    if FAILED_REASON_COLUMN not in batch:
        return np.zeros(rows, dtype=bool)
    return np.array([bool(reason) for reason in batch[FAILED_REASON_COLUMN]], dtype=bool)


def mark_failed(batch: dict[str, np.ndarray], failures: dict[int, tuple[str, str]], stage: str) -> None:
    """Record ``failures`` (row -> (code, reason)) in the batch's failure columns, first failure kept."""
    rows = len(next(iter(batch.values())))
    for column in (FAILED_STAGE_COLUMN, FAILED_CODE_COLUMN, FAILED_REASON_COLUMN):
        if column not in batch:
            batch[column] = np.array([""] * rows, dtype=object)
    for row, (code, reason) in failures.items():
        if not batch[FAILED_REASON_COLUMN][row]:
            batch[FAILED_STAGE_COLUMN][row], batch[FAILED_CODE_COLUMN][row], batch[FAILED_REASON_COLUMN][row] = stage, code, reason


def with_placeholders(values: list[np.ndarray | None], dtype=np.float32) -> list[np.ndarray]:
    """Per-row outputs with an empty array for each failed row (``None``): of the others' number of
    dimensions, so the column stays a tensor column that Ray Data can carry."""
    ndim = next((value.ndim for value in values if value is not None), 1)
    return [np.zeros((0,) * ndim, dtype) if value is None else value for value in values]


def pop_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
    """Remove the workers' count columns (``count_<name>``: texts encoded, batches halved, ...) from ``batch``; their sums."""
    counts = {}
    for column in [column for column in batch if column.startswith(COUNT_COLUMN_PREFIX)]:
        name, values = column.removeprefix(COUNT_COLUMN_PREFIX), batch.pop(column)
        counts[name] = int(np.max(values, initial=0) if name.startswith(PEAK_COUNT_PREFIX) else np.sum(values))
    return counts
