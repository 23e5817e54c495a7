"""What a latent output holds, id by id, worked out by Ray tasks: the driver holds no row.

Encoding resumes by id and content, not by input position: a rerun skips a row whose id
the output holds under the same cache key, encodes it again when its bytes or caption
changed (the newer copy supersedes the older one), and the counts match input ids with
output ids. Each of these needs every id at once. As a hash join does, tasks split the
ids by a hash into buckets, and one task per bucket sees every entry of its ids:

    input row groups -> _input_entries  --\\                      /-> lookups per group of input row groups
                                            > bucket of the id --<--> stale copies per group of output parts
    output parts     -> _output_entries --/  (_settle_bucket)     \\-> counts

- ``look_up`` (before a run): each group's lookup (the done cache key of its rows, and
  for a repeated id the first row that has it) travels with the rows that read it
  (``read_rows_with_lookup``); copies that a newer run superseded (an interrupted
  rerun) are removed;
- ``settle`` (after a run): superseded copies removed, then where every input row ended.

The driver holds object references and counts: a few per bucket and group, none per row
(groups grow with the buckets, so that no piece is small enough for Ray to keep it in the
driver's memory: ``repeated_ids.PIECE_ROWS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.encoding.latent_output import remove_rows, upgrade_part
from pipelines.runtime import io
from pipelines.runtime.outputs import RunOutput
from pipelines.runtime.placement import TASK_CPUS
from pipelines.runtime.repeated_ids import (
    bucket_count, fragment_groups, groups_of_rows, read_ids, remote_returning, repeats_of, rows_per_group, split_by_id_hash,
)
from pipelines.runtime.schemas import ROW_KEYED_CODES

LOOKUP_GROUP_ROWS = 100_000  # input rows per lookup task, at least (see ``rows_per_group``)
PART_GROUP_ROWS = 200_000  # output rows per reading or rewriting task, at least
# what travels with each input row from its lookup
DONE_KEY_COLUMN, REPEAT_OF_COLUMN = "done_key", "repeat_of"
LOOKUP_SCHEMA = pa.schema([("row", pa.int64()), (DONE_KEY_COLUMN, pa.string()), (REPEAT_OF_COLUMN, pa.int64())])
STALE_SCHEMA = pa.schema([("part", pa.int64()), ("index", pa.int64())])
COUNTS = ("ok_rows", "error_rows", "encoded_this_run", "errors_this_run", "rows_not_in_input")
# A ledger of at most this many input and output rows runs its steps in the driver (a few MB): tasks
# would cost more than the work. It also keeps small jobs clear of a stall seen in Ray 2.60 on a
# 2-core machine under load: the first tasks of a ledger submitted while the previous job's actors
# were torn down were never leased (nothing queued or running anywhere; cause not found)
LEDGER_IN_DRIVER_ROWS = 50_000


@dataclass(frozen=True)
class OutputPart:
    uri: str
    is_results: bool  # a latents/ part (else an errors/ part)
    rows: int  # from its name


def output_parts(output: RunOutput) -> list[OutputPart]:
    """The output's parts, from its listing."""
    latents, errors = output.spans()
    return [OutputPart(span.uri, True, span.rows) for span in latents] + [OutputPart(span.uri, False, span.rows) for span in errors]


@dataclass(frozen=True)
class Lookup:
    """What a run needs from the ledger: its rows' lookups and what earlier runs left."""

    items: list[ray.ObjectRef]  # one table per input row group: the row group and the lookups of its rows
    # input rows with an id of their own (not null, not a repeat) that the output holds with a cache key:
    # skipped unless their content changed
    rows_done: int
    last_run: int  # the newest run found in the output (0 for none)
    superseded_rows_removed: int


def look_up(output: RunOutput, fragments: list[io.ParquetFragment], id_column: str | None) -> Lookup:
    """Before a run: remove superseded copies; each input row's done key and repeat, per row group."""
    parts = output_parts(output)
    buckets, in_driver = _bucket_count(fragments, parts), _in_driver(fragments, parts)
    lookup_groups = fragment_groups(fragments, rows_per_group(buckets, LOOKUP_GROUP_ROWS))
    result = _shuffle(output, parts, fragments, id_column, buckets, lookup_groups=lookup_groups, current_run=None, in_driver=in_driver)
    # one items table per row group, as before the lookups: one reading task each
    items = [ref for group, refs in zip(lookup_groups, result.lookups) for ref in _call(in_driver, _lookup_items, len(group), group, *refs)]
    return Lookup(items=items or [ray.put(_items_table([], LOOKUP_SCHEMA.empty_table()))], rows_done=result.summary["rows_done"],
                  last_run=result.summary["last_run"], superseded_rows_removed=result.removed)


def settle(output: RunOutput, fragments: list[io.ParquetFragment], id_column: str | None, run: int) -> dict[str, int]:
    """After run ``run``: remove superseded copies (position-keyed errors of earlier runs too: this run
    wrote every one that still applies); return where the input rows ended and what the run wrote."""
    parts = output_parts(output)
    result = _shuffle(output, parts, fragments, id_column, _bucket_count(fragments, parts), lookup_groups=[], current_run=run,
                      in_driver=_in_driver(fragments, parts))
    counts = {name: result.summary[name] for name in COUNTS}
    input_rows = sum(fragment.num_rows for fragment in fragments)
    return {"input_rows": input_rows, **counts, "superseded_rows_removed": result.removed,
            "cached_rows": input_rows - counts["encoded_this_run"] - counts["errors_this_run"]}


# -- the shuffle ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShuffleResult:
    summary: dict[str, int]
    lookups: list[list[ray.ObjectRef]]  # per lookup group, one table per bucket
    removed: int


def _bucket_count(fragments: list[io.ParquetFragment], parts: list[OutputPart]) -> int:
    return bucket_count(_ledger_rows(fragments, parts))


def _in_driver(fragments: list[io.ParquetFragment], parts: list[OutputPart]) -> bool:
    return _ledger_rows(fragments, parts) <= LEDGER_IN_DRIVER_ROWS


def _ledger_rows(fragments: list[io.ParquetFragment], parts: list[OutputPart]) -> int:
    return sum(fragment.num_rows for fragment in fragments) + sum(part.rows for part in parts)


def _call(in_driver: bool, function, count: int, *args, **kwargs) -> list[ray.ObjectRef]:
    """``remote_returning``; for a small ledger (``LEDGER_IN_DRIVER_ROWS``) the same function called
    here, on its arguments' values, its results put in the object store as a task's would be."""
    if not in_driver:
        return remote_returning(function, count, *args, **kwargs)
    values = function._function(*[ray.get(arg) if isinstance(arg, ray.ObjectRef) else arg for arg in args], **kwargs)
    return [ray.put(value) for value in (values if count > 1 else [values])]


def _shuffle(output: RunOutput, parts: list[OutputPart], fragments: list[io.ParquetFragment], id_column: str | None,
             buckets: int, lookup_groups: list[list[io.ParquetFragment]], current_run: int | None, in_driver: bool) -> _ShuffleResult:
    # 1. both sides split by the hash of the id: input row groups, then output parts
    inputs = [_call(in_driver, _input_entries, buckets, group, id_column, buckets)
              for group in fragment_groups(fragments, rows_per_group(buckets))]
    part_groups = groups_of_rows(parts, [part.rows for part in parts], rows_per_group(buckets, PART_GROUP_ROWS))
    part_group_starts = np.cumsum([0] + [len(group) for group in part_groups])[:-1]
    outputs = [_call(in_driver, _output_entries, 1 + buckets, output, group, int(start), buckets)
               for start, group in zip(part_group_starts, part_groups)]

    # 2. one task per bucket: lookups, stale copies and counts of its ids
    returns = 1 + len(lookup_groups) + len(part_groups)
    settled = [
        _call(
            in_driver, _settle_bucket, returns, len(inputs), *[refs[bucket] for refs in inputs], *[refs[1 + bucket] for refs in outputs],
            lookup_starts=np.asarray([group[0].first_row for group in lookup_groups], np.int64),
            part_group_starts=np.asarray(part_group_starts, np.int64), current_run=current_run,
        )
        for bucket in range(buckets)
    ]
    summary = _sum_summaries(ray.get([refs[0] for refs in settled]))

    # 3. stale copies out, one task per group of parts (their names as their reading task left them)
    removed = ray.get([
        _call(in_driver, _remove_stale, 1, output, refs[0], [part.is_results for part in group], int(start),
              *[bucket_refs[1 + len(lookup_groups) + index] for bucket_refs in settled])[0]
        for index, (start, group, refs) in enumerate(zip(part_group_starts, part_groups, outputs))
    ])
    lookups = [[bucket_refs[1 + group] for bucket_refs in settled] for group in range(len(lookup_groups))]
    return _ShuffleResult(summary=summary, lookups=lookups, removed=int(sum(removed)))


def _sum_summaries(summaries: list[dict[str, int]]) -> dict[str, int]:
    total = {name: sum(summary[name] for summary in summaries) for name in summaries[0] if name != "last_run"}
    return {**total, "last_run": max(summary["last_run"] for summary in summaries)}


def _position_ids(rows: pa.Array) -> pa.Array:
    """``row_ids.position_id`` of many rows at once."""
    return pc.utf8_lpad(pc.cast(rows, pa.string()), 9, "0")


@ray.remote(num_cpus=TASK_CPUS)
def _input_entries(fragments: list[io.ParquetFragment], id_column: str | None, buckets: int):
    """Input rows as (key, row, has_id): the key is the id, or the position id of a row without one."""
    if id_column is None:
        rows = pa.array(np.concatenate([np.arange(f.first_row, f.first_row + f.num_rows) for f in fragments]), pa.int64())
        table = pa.table({"key": _position_ids(rows), "row": rows, "has_id": pa.array(np.ones(len(rows), bool))})
    else:
        read = read_ids(fragments, id_column)
        ids, rows = read.column("id"), read.column("row")
        table = pa.table({"key": pc.coalesce(ids, _position_ids(rows)), "row": rows, "has_id": pc.is_valid(ids)})
    return split_by_id_hash(table, "key", buckets)


@ray.remote(num_cpus=TASK_CPUS)
def _output_entries(output: RunOutput, parts: list[OutputPart], first_part: int, buckets: int):
    """Output rows as (key, row, run, cache_key, position_keyed, is_results, part, index); first, the parts'
    names (a part written by an older version is rewritten in today's encoding here, before any new part)."""
    uris, tables = [], []
    for number, part in enumerate(parts):
        uri = upgrade_part(output, part.uri) if part.is_results else part.uri
        uris.append(uri)
        read = io.read_parquet_file(uri, ["id", "row", "run", "cache_key"] + ([] if part.is_results else ["code"]))
        position_keyed = (np.zeros(len(read), bool) if part.is_results
                          else pc.is_in(read.column("code"), pa.array(sorted(ROW_KEYED_CODES))).to_numpy(zero_copy_only=False))
        tables.append(pa.table({
            "key": read.column("id"), "row": read.column("row"), "run": pc.cast(read.column("run"), pa.int64()),
            "cache_key": read.column("cache_key"), "position_keyed": pa.array(position_keyed, pa.bool_()),
            "is_results": pa.array(np.full(len(read), part.is_results)),
            "part": pa.array(np.full(len(read), first_part + number), pa.int64()), "index": pa.array(np.arange(len(read)), pa.int64()),
        }).cast(_EMPTY_OUTPUT_ENTRIES.schema))  # a column of nulls only reads as type null
    table = pa.concat_tables(tables) if tables else _EMPTY_OUTPUT_ENTRIES
    split = split_by_id_hash(table, "key", buckets)
    return (uris, *(split if buckets > 1 else (split,)))


_EMPTY_OUTPUT_ENTRIES = pa.schema([
    ("key", pa.string()), ("row", pa.int64()), ("run", pa.int64()), ("cache_key", pa.string()), ("position_keyed", pa.bool_()),
    ("is_results", pa.bool_()), ("part", pa.int64()), ("index", pa.int64()),
]).empty_table()


@ray.remote(num_cpus=TASK_CPUS)
def _settle_bucket(input_tables: int, *tables: pa.Table, lookup_starts: np.ndarray, part_group_starts: np.ndarray, current_run: int | None):
    """One bucket's ids on both sides: (summary, lookup per lookup group..., stale copies per part group...)."""
    inputs = pa.concat_tables(tables[:input_tables]).to_pandas() if input_tables else pd.DataFrame(columns=["key", "row", "has_id"])
    outputs = pa.concat_tables([_EMPTY_OUTPUT_ENTRIES, *tables[input_tables:]]).to_pandas()

    # 1. the newest copy of each row stays: of its id, or of its position for errors keyed by position.
    # Positions are compared within the bucket of the error's id only; an interrupted run can leave two
    # errors for one position under different ids (null, then repeated) until the end of the next run,
    # which removes every position-keyed error of earlier runs
    position_keyed = outputs["position_keyed"].to_numpy(bool)
    supersede_key = outputs["key"].where(~position_keyed, "\0row:" + outputs["row"].astype(str))
    stale = outputs["run"].to_numpy() < outputs.groupby(supersede_key)["run"].transform("max").to_numpy()
    if current_run is not None:
        stale |= position_keyed & (outputs["run"].to_numpy() < current_run)
    live = outputs[~stale]

    # 2. repeated ids: the first row keeps the id
    with_id = inputs[inputs["has_id"].to_numpy(bool)]
    repeat_rows, first_rows = repeats_of(pa.table({"id": pa.array(with_id["key"], pa.string()), "row": pa.array(with_id["row"], pa.int64())}))
    repeated = inputs["row"].isin(repeat_rows).to_numpy()
    regular = inputs[inputs["has_id"].to_numpy(bool) & ~repeated]  # rows keyed by their id

    summary = {"last_run": int(outputs["run"].max()) if len(outputs) else 0, "rows_done": 0}
    results: list[pa.Table] = []
    if len(lookup_starts):
        # 3. lookups: the done cache key of every regular row the output holds, the first row of every repeat
        done = live[~live["position_keyed"] & live["cache_key"].notna()].drop_duplicates("key", keep="last")
        found = regular[["key", "row"]].merge(done[["key", "cache_key"]], on="key")
        lookup = pd.concat([
            pd.DataFrame({"row": found["row"], DONE_KEY_COLUMN: found["cache_key"], REPEAT_OF_COLUMN: -1}),
            pd.DataFrame({"row": repeat_rows, DONE_KEY_COLUMN: None, REPEAT_OF_COLUMN: first_rows}),
        ]).sort_values("row")
        summary["rows_done"] = len(found)
        results += _split_by_start(pa.Table.from_pandas(lookup, LOOKUP_SCHEMA, preserve_index=False), "row", lookup_starts)
    if current_run is not None:
        # 4. where each input row ended (after the stale copies are gone) and what this run wrote
        ended = live["is_results"].to_numpy(bool)
        latent_ids = live.loc[ended, "key"]
        error_ids = live.loc[~ended & ~live["position_keyed"].to_numpy(bool), "key"]
        error_positions = live.loc[~ended & live["position_keyed"].to_numpy(bool), "row"]
        in_latents = regular["key"].isin(latent_ids)
        by_position = inputs[~inputs["has_id"].to_numpy(bool) | repeated]
        summary.update(
            ok_rows=int(in_latents.sum()),
            error_rows=int((~in_latents & regular["key"].isin(error_ids)).sum() + by_position["row"].isin(error_positions).sum()),
            encoded_this_run=int((ended & (live["run"] == current_run)).sum()),
            errors_this_run=int((~ended & (live["run"] == current_run)).sum()),
            rows_not_in_input=int((~pd.concat([latent_ids, error_ids]).drop_duplicates().isin(inputs.loc[inputs["has_id"].to_numpy(bool), "key"])).sum()),
        )
    stale_copies = pa.table({"part": pa.array(outputs["part"][stale], pa.int64()), "index": pa.array(outputs["index"][stale], pa.int64())})
    results += _split_by_start(stale_copies.sort_by("part"), "part", part_group_starts)
    return (summary, *results) if len(results) else summary


def _split_by_start(table: pa.Table, column: str, starts: np.ndarray) -> list[pa.Table]:
    """``table`` (sorted by ``column``) cut at ``starts``: one table per group, rows below ``starts[0]`` in the first."""
    values = table.column(column).to_numpy()
    cuts = np.searchsorted(values, starts[1:], side="left")
    bounds = np.concatenate([[0], cuts, [len(values)]])
    return [table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(len(starts))]


@ray.remote(num_cpus=TASK_CPUS)
def _remove_stale(output: RunOutput, uris: list[str], is_results: list[bool], first_part: int, *stale_tables: pa.Table) -> int:
    """Rewrite the parts of one group without their stale copies; return how many rows went."""
    stale = pa.concat_tables([STALE_SCHEMA.empty_table(), *stale_tables])
    removed = 0
    for part, indices in stale.to_pandas().groupby("part")["index"]:
        number = int(part) - first_part
        remove_rows(output, uris[number], indices.to_numpy(), is_results=is_results[number])
        removed += len(indices)
    return removed


# -- the lookups, beside the rows that read them --------------------------------------------------


@ray.remote(num_cpus=TASK_CPUS)
def _lookup_items(fragments: list[io.ParquetFragment], *lookups: pa.Table):
    """One items table per row group of the group: the row group and the lookups of its rows."""
    lookup = pa.concat_tables([LOOKUP_SCHEMA.empty_table(), *lookups]).sort_by("row")
    rows = lookup.column("row").to_numpy()
    tables = []
    for fragment in fragments:
        first, end = np.searchsorted(rows, [fragment.first_row, fragment.first_row + fragment.num_rows])
        tables.append(_items_table([fragment], lookup.slice(int(first), int(end - first))))
    return tables[0] if len(tables) == 1 else tuple(tables)


def _items_table(fragments: list[io.ParquetFragment], lookup: pa.Table) -> pa.Table:
    """One row per row group, with the lookups of its rows (``lookup``, sorted by row) as lists."""
    rows = lookup.column("row").to_numpy()
    starts = np.array([f.first_row for f in fragments] + [f.first_row + f.num_rows for f in fragments[-1:]], np.int64)
    offsets = pa.array(np.searchsorted(rows, starts).astype(np.int32)) if fragments else pa.array([0], pa.int32())

    def lists(column: str) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, lookup.column(column).combine_chunks())

    return pa.table({
        "uri": pa.array([f.uri for f in fragments], pa.string()), "row_group": pa.array([f.row_group for f in fragments], pa.int64()),
        "first_row": pa.array([f.first_row for f in fragments], pa.int64()), "num_rows": pa.array([f.num_rows for f in fragments], pa.int64()),
        "lookup_row": lists("row"), "lookup_done_key": lists(DONE_KEY_COLUMN), "lookup_repeat_of": lists(REPEAT_OF_COLUMN),
    })


def read_rows_with_lookup(items: pa.Table, columns: list[str], rows_per_block: int) -> Iterator[pa.Table]:
    """Ray Data UDF: row groups and their lookups -> their rows (with ``row``), each with its
    ``done_key`` (null: the output does not hold its id) and ``repeat_of`` (-1: not a repeat)."""
    for number in range(len(items)):
        item = items.slice(number, 1)
        fragment = io.ParquetFragment(*(item.column(name)[0].as_py() for name in ("uri", "row_group", "first_row", "num_rows")))
        lookup_rows = pc.list_flatten(item.column("lookup_row")).to_numpy()
        done_keys = pc.list_flatten(item.column("lookup_done_key"))
        repeat_of = pc.list_flatten(item.column("lookup_repeat_of")).to_numpy()
        for table in io.read_fragment(fragment, columns, rows_per_block):
            rows = table.column("row").to_numpy()
            index = np.minimum(np.searchsorted(lookup_rows, rows), max(len(lookup_rows) - 1, 0))
            hit = (lookup_rows[index] == rows) if len(lookup_rows) else np.zeros(len(rows), bool)
            keys = done_keys.take(pa.array(index)) if len(lookup_rows) else pa.nulls(len(rows), pa.string())
            yield (table.append_column(DONE_KEY_COLUMN, pc.if_else(pa.array(hit), keys, pa.scalar(None, pa.string())))
                   .append_column(REPEAT_OF_COLUMN, pa.array(np.where(hit, repeat_of[index] if len(lookup_rows) else -1, -1), pa.int64())))
