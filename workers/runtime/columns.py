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
