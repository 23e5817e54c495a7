"""Resume by id: which input rows an output already holds, matched by id, found by Ray tasks.

Position matching (``resume``) needs input files that keep their rows in place. An input
with an ``id`` column may instead be rewritten, reordered or grown in place between runs:
its rows are matched with the output's rows by id, as a hash join does (the encoding
ledger's shape, ``repeated_ids``' buckets):

    input row groups -> (key, row) by hash --\\                           /-> done positions per group of row groups
                                              > one task per bucket --<
    output parts     -> (key, row) by hash --/  (_match_bucket)          \\-> how many input rows are done

The key is the id (a row without one: its position id, as its error row was committed).
An id that several input rows share (a repeat: an error row after the first) is matched
occurrence by occurrence, in position order: the first input row with an id matches the
first committed row with it, and so on, so each row is committed once. The driver holds
references and counts, never a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.runtime import io
from pipelines.runtime.outputs import PartSpan
from pipelines.runtime.placement import TASK_CPUS
from pipelines.runtime.repeated_ids import bucket_count, fragment_groups, groups_of_rows, read_ids, remote_returning, rows_per_group, split_by_id_hash

LOOKUP_GROUP_ROWS = 100_000  # input rows per group whose done positions travel together, at least
PART_GROUP_ROWS = 200_000  # output rows per reading task, at least
KEYS_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.int64())])


@dataclass(frozen=True)
class IdLookup:
    items: list[ray.ObjectRef]  # one table per group of row groups: each row group left to read, with its done positions
    done_rows: int  # input rows the output holds


def look_up_ids(fragments: list[io.ParquetFragment], spans: list[PartSpan], id_column: str) -> IdLookup:
    """The row groups left to read and the positions in them that the output holds (Ray must be connected)."""
    # 1. both sides split by the hash of the key: input row groups, then output parts
    buckets = bucket_count(sum(fragment.num_rows for fragment in fragments) + sum(span.rows for span in spans))
    inputs = [remote_returning(_input_keys, buckets, group, id_column, buckets) for group in fragment_groups(fragments, rows_per_group(buckets))]
    outputs = [remote_returning(_output_keys, buckets, [span.uri for span in group], buckets)
               for group in groups_of_rows(spans, [span.rows for span in spans], rows_per_group(buckets, PART_GROUP_ROWS))]
    # 2. one task per bucket matches its keys; its done positions come back cut by group of row groups
    lookup_groups = fragment_groups(fragments, rows_per_group(buckets, LOOKUP_GROUP_ROWS))
    starts = np.asarray([group[0].first_row for group in lookup_groups], np.int64)
    matched = [remote_returning(_match_bucket, 1 + len(lookup_groups), len(inputs), *[refs[bucket] for refs in inputs],
                                *[refs[bucket] for refs in outputs], lookup_starts=starts) for bucket in range(buckets)]
    done_rows = int(sum(ray.get([refs[0] for refs in matched])))
    # 3. per group of row groups: the row groups not wholly done, each with its done positions
    items = [_pending_items.remote(group, *[refs[1 + index] for refs in matched]) for index, group in enumerate(lookup_groups)]
    return IdLookup(items=items, done_rows=done_rows)


@ray.remote(num_cpus=TASK_CPUS)
def _input_keys(fragments: list[io.ParquetFragment], id_column: str, buckets: int):
    read = read_ids(fragments, id_column)
    positions = pc.utf8_lpad(pc.cast(read.column("row"), pa.string()), 9, "0")  # row_ids.position_id of many rows
    return split_by_id_hash(pa.table({"key": pc.coalesce(read.column("id"), positions), "row": read.column("row")}), "key", buckets)


@ray.remote(num_cpus=TASK_CPUS)
def _output_keys(uris: list[str], buckets: int):
    tables = [io.read_parquet_file(uri, ["id", "row"]).rename_columns(["key", "row"]).cast(KEYS_SCHEMA) for uri in uris]
    return split_by_id_hash(pa.concat_tables([KEYS_SCHEMA.empty_table(), *tables]), "key", buckets)


def _occurrences(table: pa.Table) -> pa.Table:
    """(key, row) sorted by key then row, with each row's occurrence of its key (0 for the first)."""
    table = table.take(pc.sort_indices(table, [("key", "ascending"), ("row", "ascending")]))
    keys = table.column("key")
    new = np.concatenate([[True], ~np.asarray(pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(zero_copy_only=False), bool)]) if len(table) else np.zeros(0, bool)
    starts = np.maximum.accumulate(np.where(new, np.arange(len(table)), 0)) if len(table) else np.zeros(0, np.int64)
    return table.append_column("occurrence", pa.array(np.arange(len(table)) - starts, pa.int64()))


@ray.remote(num_cpus=TASK_CPUS)
def _match_bucket(input_tables: int, *tables: pa.Table, lookup_starts: np.ndarray):
    """One bucket's keys on both sides: (done input rows, then their positions per group of row groups...)."""
    inputs = _occurrences(pa.concat_tables([KEYS_SCHEMA.empty_table(), *tables[:input_tables]]))
    outputs = _occurrences(pa.concat_tables([KEYS_SCHEMA.empty_table(), *tables[input_tables:]])).drop_columns(["row"])
    done = np.sort(inputs.join(outputs, ["key", "occurrence"], join_type="inner").column("row").to_numpy())
    cuts = np.concatenate([[0], np.searchsorted(done, lookup_starts[1:]), [len(done)]])
    return (len(done), *[done[cuts[index]:cuts[index + 1]] for index in range(len(lookup_starts))])


@ray.remote(num_cpus=TASK_CPUS)
def _pending_items(fragments: list[io.ParquetFragment], *done_pieces: np.ndarray) -> pa.Table:
    done = np.sort(np.concatenate([np.empty(0, np.int64), *done_pieces]))
    items = []
    for fragment in fragments:
        first, end = fragment.first_row, fragment.first_row + fragment.num_rows
        inside = done[np.searchsorted(done, first):np.searchsorted(done, end)]
        if len(inside) < fragment.num_rows:  # a row group wholly done is not read again
            items.append({**vars(fragment), "done": inside.tolist()})
    schema = pa.schema([("uri", pa.string()), ("row_group", pa.int64()), ("first_row", pa.int64()), ("num_rows", pa.int64()),
                        ("done", pa.list_(pa.int64()))])
    return pa.Table.from_pylist(items, schema=schema)


def read_rows_not_done(items: pa.Table, columns: list[str] | None, rows_per_block: int) -> Iterator[pa.Table]:
    """Ray Data UDF: row groups left to read -> their rows (with ``row``) that the output does not hold."""
    for item in items.to_pylist():
        fragment = io.ParquetFragment(item["uri"], item["row_group"], item["first_row"], item["num_rows"])
        done = pa.array(item["done"], pa.int64())
        for table in io.read_fragment(fragment, columns, rows_per_block):
            if len(done):
                table = table.filter(pc.invert(pc.is_in(table.column("row"), value_set=done)))
            if len(table):
                yield table
