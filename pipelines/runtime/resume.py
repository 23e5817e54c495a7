"""Resume by input fragment: what is left to do, found in the tasks that read the input.

A row is done when an earlier run committed its input position, to the results table
or to ``errors/``. The driver reads only the output's listing: each part's name gives
the positions it may hold and its row count (``outputs.PartSpan``). From that alone

- a finished output is recognised (every input row counted) without reading a part;
- a row group whose positions are all inside parts that hold exactly as many rows is
  skipped without being read;
- every other row group is read by its own task, which reads the ``row`` column of the
  few parts overlapping its positions and drops the rows found there.

So the driver holds one entry per part and per row group, never per row. Positions
mean the same rows as long as the input's files do: the plan checks them against the
sizes and versions recorded in ``run.json`` (``check_input_unchanged``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.runtime import io
from pipelines.runtime.outputs import PartSpan


@dataclass(frozen=True)
class PendingFragment:
    """A row group still (partly) to do, and the committed parts that may hold some of its rows."""

    fragment: io.ParquetFragment
    parts: tuple[str, ...]

    def to_item(self) -> dict:
        return {**vars(self.fragment), "parts": list(self.parts)}


@dataclass(frozen=True)
class ResumePlan:
    pending: list[PendingFragment]
    committed_rows: int  # rows the output holds (results and errors), from the parts' names

    @property
    def finished(self) -> bool:
        return not self.pending


def plan_resume(fragments: list[io.ParquetFragment], spans: list[PartSpan]) -> ResumePlan:
    """The row groups left to read, each with the parts its task must check; from names only.

    Rows are committed at most once (no run writes a committed position again), so parts
    whose positions lie inside a row group and hold as many rows as it has cover it.
    """
    input_rows = sum(fragment.num_rows for fragment in fragments)
    committed = sum(span.rows for span in spans)
    if committed >= input_rows and input_rows:
        return ResumePlan(pending=[], committed_rows=committed)
    spans = sorted(spans, key=lambda span: span.first)
    firsts = [span.first for span in spans]
    # a part may start before a row group and reach into it: look back as far as the longest part
    longest = max((span.last - span.first for span in spans), default=0)
    pending = []
    for fragment in fragments:
        first, end = fragment.first_row, fragment.first_row + fragment.num_rows
        start = bisect.bisect_left(firsts, first - longest)
        overlapping = [span for span in spans[start:bisect.bisect_left(firsts, end)] if span.overlaps(first, end)]
        inside = sum(span.rows for span in overlapping if span.first >= first and span.last < end)
        if inside == fragment.num_rows and all(span.first >= first and span.last < end for span in overlapping):
            continue
        pending.append(PendingFragment(fragment, tuple(span.uri for span in overlapping)))
    return ResumePlan(pending=pending, committed_rows=committed)


def committed_positions(parts: list[str], first: int, end: int) -> np.ndarray:
    """Input positions in [first, end) that ``parts`` hold (their ``row`` column only)."""
    found = [np.empty(0, np.int64)]
    for uri in parts:
        rows = io.read_parquet_file(uri, ["row"]).column("row").to_numpy()
        found.append(rows[(rows >= first) & (rows < end)])
    return np.unique(np.concatenate(found))


def read_pending_rows(batch: dict, columns: list[str] | None, rows_per_block: int) -> Iterator[pa.Table]:
    """Ray Data UDF: pending row groups -> tables of their rows not yet committed (with ``row``).

    ``rows_per_block``: rows per table read (``placement.rows_per_block``); Ray Data may
    still join a task's tables into one block, the job cuts blocks where it needs them.
    """
    for uri, group, first, rows, parts in zip(batch["uri"], batch["row_group"], batch["first_row"], batch["num_rows"], batch["parts"]):
        fragment = io.ParquetFragment(str(uri), int(group), int(first), int(rows))
        done = committed_positions([str(part) for part in parts], fragment.first_row, fragment.first_row + fragment.num_rows)
        for table in io.read_fragment(fragment, columns, rows_per_block):
            if len(done):
                table = table.filter(pc.invert(pc.is_in(table.column("row"), value_set=pa.array(done))))
            if len(table):
                yield table


def check_input_unchanged(recorded: list[dict] | None, current: list[dict], fragments: list[io.ParquetFragment]) -> None:
    """Positions in the output must mean the same input rows: the files an earlier run read
    are unchanged and start at the same position (new files after them are fine)."""
    problem = input_change(recorded, current, fragments)
    if problem:
        raise ValueError(
            f"{problem} since an earlier run into this output: committed rows are matched by their input position, "
            "which no longer holds; rerun with --overwrite, add new rows as new files that sort after the existing "
            "ones, or give the rows an 'id' column (rows with ids are matched by id)"
        )


def input_change(recorded: list[dict] | None, current: list[dict], fragments: list[io.ParquetFragment]) -> str | None:
    """How the input differs from what an earlier run recorded (None: its files and positions are as they were)."""
    if not recorded:
        return None  # no earlier run, or one before inputs were recorded
    now = {version["uri"]: version for version in current}
    starts = io.file_starts(fragments)
    for before in recorded:
        after = now.get(before["uri"])
        if after is None:
            problem = "is gone"
        elif (after["size"], after["version"]) != (before["size"], before["version"]):
            problem = "has changed"
        elif starts.get(before["uri"]) != before.get("first_row"):
            problem = f"now starts at input row {starts.get(before['uri'])}, not {before.get('first_row')} (a file was added before it)"
        else:
            continue
        return f"input file {before['uri']!r} {problem}"
    return None


def input_versions(fragments: list[io.ParquetFragment]) -> list[dict]:
    """Each input file's size, version and first input position, as run.json records them."""
    starts = io.file_starts(fragments)
    return [{**version, "first_row": starts[version["uri"]]} for version in io.file_versions(list(starts))]


def input_state(uri: str) -> str:
    """A digest of the input's files with their sizes and versions, as ``input_versions`` defines them.

    From one listing, no file read: a scheduled submission compares it to tell new or changed
    input from the input an earlier job ran on (``jobs.submit``).
    """
    digest = hashlib.sha256()
    for version in io.parquet_file_versions(uri):
        digest.update(json.dumps([version["uri"], version["size"], version["version"]]).encode() + b"\n")
    return digest.hexdigest()[:16]
