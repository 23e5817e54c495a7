"""Repeated ids at any input size, found by Ray tasks, not in the driver.

Every input row needs its own id (outputs are named and resumed by it); a repeat goes to
``errors/`` and the id's first row stays. Finding repeats needs every id at once; instead
of the driver holding them all, tasks read the id column in groups of row groups and
split it by a hash of the id into buckets (``_ids_by_bucket``), and one task per bucket
finds the repeats in it (``_repeats_in_bucket``). Only the repeats come back to the driver:
two integers per repeated row, none in the common case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.runtime import io
from pipelines.runtime.placement import TASK_CPUS

Item = TypeVar("Item")
ROWS_PER_TASK = 1_000_000  # ids per reading task and, about, per bucket
# Fewest rows per (group, bucket) piece: Ray keeps results under 100 KiB in the caller's
# memory, the driver's here, so groups grow with the buckets to keep pieces above that
PIECE_ROWS = 20_000


@dataclass(frozen=True)
class RepeatedIds:
    """Input positions of rows whose id an earlier row has, and that first row's position."""

    positions: np.ndarray  # sorted, int64
    first_positions: np.ndarray

    @classmethod
    def none(cls) -> "RepeatedIds":
        return cls(np.empty(0, np.int64), np.empty(0, np.int64))

    @classmethod
    def of_ids(cls, ids: list) -> "RepeatedIds":
        """From ids in input order that a process already holds (tests); None ids are never repeats."""
        table = pa.table({"id": pa.array([None if value is None else str(value) for value in ids], pa.string()),
                          "row": pa.array(np.arange(len(ids)), pa.int64())})
        return cls.of_pairs(*repeats_of(table.filter(pc.is_valid(table.column("id")))))

    @classmethod
    def of_pairs(cls, positions: np.ndarray, first_positions: np.ndarray) -> "RepeatedIds":
        order = np.argsort(positions, kind="stable")
        return cls(np.asarray(positions, np.int64)[order], np.asarray(first_positions, np.int64)[order])

    def __len__(self) -> int:
        return len(self.positions)

    def first_of(self, rows: np.ndarray) -> np.ndarray:
        """For each input position, the position of the first row with its id, or -1 when it is not a repeat."""
        rows = np.asarray(rows, np.int64)
        index = np.minimum(np.searchsorted(self.positions, rows), max(len(self.positions) - 1, 0))
        found = len(self.positions) > 0
        hit = (self.positions[index] == rows) if found else np.zeros(len(rows), bool)
        return np.where(hit, self.first_positions[index] if found else -1, -1)


def find_repeated_ids(fragments: list[io.ParquetFragment], id_column: str) -> RepeatedIds:
    """Every repeated id of the input's ``id_column`` (Ray must be connected)."""
    rows = sum(fragment.num_rows for fragment in fragments)
    if rows == 0:
        return RepeatedIds.none()
    buckets = bucket_count(rows)
    by_group = [remote_returning(_ids_by_bucket, buckets, group, id_column, buckets)
                for group in fragment_groups(fragments, rows_per_group(buckets))]
    found = ray.get([_repeats_in_bucket.remote(*[refs[bucket] for refs in by_group]) for bucket in range(buckets)])
    return RepeatedIds.of_pairs(np.concatenate([positions for positions, _ in found]), np.concatenate([first for _, first in found]))


# -- hash buckets of ids: shared with the encoding ledger ------------------------------------------


def bucket_count(rows: int) -> int:
    """Buckets for ``rows`` ids: about ``ROWS_PER_TASK`` per bucket task."""
    return max(1, -(-rows // ROWS_PER_TASK))


def fragment_groups(fragments: list[io.ParquetFragment], rows_per_group: int) -> list[list[io.ParquetFragment]]:
    """Consecutive row groups, about ``rows_per_group`` rows per group (at least one row group each)."""
    return groups_of_rows(fragments, [fragment.num_rows for fragment in fragments], rows_per_group)


def groups_of_rows(items: list[Item], rows: list[int], rows_per_group: int) -> list[list[Item]]:
    """Consecutive ``items`` holding ``rows`` rows each, cut once a group reaches ``rows_per_group`` rows."""
    groups, current, current_rows = [], [], 0
    for item, count in zip(items, rows):
        current.append(item)
        current_rows += count
        if current_rows >= rows_per_group:
            groups.append(current)
            current, current_rows = [], 0
    return groups + ([current] if current else [])


def rows_per_group(buckets: int, least: int = ROWS_PER_TASK) -> int:
    """Rows per group of a shuffle into ``buckets``: at least ``least``, and ``PIECE_ROWS`` per bucket."""
    return max(least, buckets * PIECE_ROWS)


def remote_returning(function, count: int, *args, **kwargs) -> list:
    """Call a remote function that returns ``count`` objects; their references as a list (Ray returns
    a bare reference for one)."""
    refs = function.options(num_returns=count).remote(*args, **kwargs)
    return refs if count > 1 else [refs]


def split_by_id_hash(table: pa.Table, column: str, buckets: int) -> tuple[pa.Table, ...] | pa.Table:
    """``table`` cut into ``buckets`` tables by a stable hash of the string ``column`` (the table itself for one)."""
    if buckets == 1:
        return table
    bucket = pd.util.hash_array(table.column(column).to_numpy(zero_copy_only=False)) % np.uint64(buckets)
    return tuple(table.filter(pa.array(bucket == index)) for index in range(buckets))


def read_ids(fragments: list[io.ParquetFragment], id_column: str) -> pa.Table:
    """The row groups' ids as strings (null where missing) and their input positions: columns ``id``, ``row``."""
    tables = [table for fragment in fragments for table in io.read_fragment(fragment, [id_column], 1 << 20)]
    if not tables:  # row groups without rows
        return pa.table({"id": pa.array([], pa.string()), "row": pa.array([], pa.int64())})
    table = pa.concat_tables(tables)
    return pa.table({"id": pc.cast(table.column(id_column), pa.string()), "row": table.column("row")})


@ray.remote(num_cpus=TASK_CPUS)
def _ids_by_bucket(fragments: list[io.ParquetFragment], id_column: str, buckets: int):
    table = read_ids(fragments, id_column)
    return split_by_id_hash(table.filter(pc.is_valid(table.column("id"))), "id", buckets)


@ray.remote(num_cpus=TASK_CPUS)
def _repeats_in_bucket(*tables: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return repeats_of(pa.concat_tables(tables))


def repeats_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(positions of repeats, positions of their first rows) among rows with ids; by sorting, not a set."""
    if len(table) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    table = table.select(["id", "row"])
    table = table.take(pc.sort_indices(table, [("id", "ascending"), ("row", "ascending")]))
    ids, rows = table.column("id"), table.column("row").to_numpy()
    same = np.asarray(pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False), bool)
    repeat = np.concatenate([[False], same])
    run_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(rows))))
    return rows[repeat].astype(np.int64), rows[run_start[repeat]].astype(np.int64)
