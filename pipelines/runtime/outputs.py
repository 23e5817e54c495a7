"""The output protocol shared by every latentray job.

An output folder holds a results table (``manifest/`` or ``latents/``), an
``errors/`` table, ``latent_stats.json`` and ``run.json``. Rows are committed in
Parquet parts written by the tasks that hold the rows, named from the rows' input
positions and ids (``io.part_name``); a part is written whole, after the files its
rows point to, so a row present in the results table is complete. Each part carries
the partial latent statistics of its rows in its footer metadata: the corpus
statistics are an exact merge of those partials, across reruns and resumes.

What the driver reads of an output is its listing (``PartSpan``: positions and row
count from each part's name) and footers: its memory follows the number of parts,
not of rows.

Error rows whose cause is outside the row (``schemas.TRANSIENT``: storage that failed
after its retries) are written in parts of their own, named ``transient-part-...``, so
the listing alone tells them apart. A rerun deletes those parts before it resumes
(``reopen_transient_errors``): their rows are pending again and go through the run like
any row not yet done. Each delete removes whole rows, so a row is never in both tables;
a run that dies after the delete leaves them pending, for the next run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.runtime import io, lease
from pipelines.runtime.schemas import ERROR_CAUSES, PERMANENT, TRANSIENT
from pipelines.runtime.stats import ChannelStats, merge_all

STATS_METADATA_KEY = b"latentray.latent_stats"
REASONS_METADATA_KEY = b"latentray.error_counts"  # an errors part's rows per reason (and per code)
ERRORS_FOLDER = "errors"
TRANSIENT_PART_PREFIX = "transient-"  # an errors part of transient rows only (see the module's docstring)
PART_NAME = re.compile(r"part-(\d+)-(\d+)-(\d+)-[0-9a-f]+\.parquet$")
# error reasons counted by name in run.json; rarer ones beyond this many are counted together
MAX_DISTINCT_REASONS = 1000
OTHER_REASONS = "(other reasons)"


@dataclass(frozen=True)
class PartSpan:
    """One committed part: the input positions it may hold (first..last) and its row count."""

    uri: str
    first: int
    last: int
    rows: int

    @classmethod
    def of(cls, uri: str) -> "PartSpan":
        """From the part's name; parts named otherwise (written by hand or by older versions) from their footer."""
        match = PART_NAME.search(uri)
        if match:
            return cls(uri, int(match[1]), int(match[2]), int(match[3]))
        footer = io.parquet_footer(uri)
        if "row" not in footer.schema.to_arrow_schema().names:
            raise ValueError(f"{uri!r} has no 'row' column: written by an older latentray; rerun with --overwrite or choose another --output")
        column = footer.schema.to_arrow_schema().get_field_index("row")
        lows, highs = [], []
        for group in range(footer.num_row_groups):
            statistics = footer.row_group(group).column(column).statistics
            if statistics is None or not statistics.has_min_max:  # no statistics: the part may hold any position
                return cls(uri, 0, 2**62, footer.num_rows)
            lows.append(statistics.min)
            highs.append(statistics.max)
        return cls(uri, min(lows, default=0), max(highs, default=-1), footer.num_rows)

    def overlaps(self, first: int, end: int) -> bool:
        return self.first < end and self.last >= first

    @property
    def transient(self) -> bool:
        """An errors part of rows whose cause is outside them: a rerun retries them."""
        return self.uri.rsplit("/", 1)[-1].startswith(TRANSIENT_PART_PREFIX)


@dataclass
class RunOutput:
    uri: str
    results_folder: str  # "manifest" for generation, "latents" for encoding

    @property
    def results_uri(self) -> str:
        return io.join(self.uri, self.results_folder)

    @property
    def errors_uri(self) -> str:
        return io.join(self.uri, ERRORS_FOLDER)

    def prepare(self, identity: dict, overwrite: bool) -> dict | None:
        """Make the output ready for a run with ``identity``; return the previous run record, if any.

        A previous run with another identity (model, settings that change outputs) is
        refused: mixing two configurations in one output would make it meaningless.
        The output's lease is taken first (``lease.take``: another live run is refused,
        exit 2) and held until ``run_job`` ends; it is given back when preparing fails.
        """
        io.check_writable(self.uri)
        lease.take(self.uri)
        try:
            return self._prepare(identity, overwrite)
        except BaseException:
            lease.release(self.uri)
            raise

    def _prepare(self, identity: dict, overwrite: bool) -> dict | None:
        previous = io.read_json(io.join(self.uri, "run.json"))
        if overwrite:
            for name in (self.results_folder, ERRORS_FOLDER, "images", "run.json", "latent_stats.json"):
                io.remove_tree(io.join(self.uri, name))
            return None
        if previous is not None and previous.get("status") == "running":
            # the previous run was killed (this run holds the lease: no live run writes here); its writes in
            # flight left temporary files
            io.remove_temporary_files(self.uri)
        if previous is not None and previous.get("identity") != identity:
            changes = _describe_changes(previous.get("identity", {}), identity)
            raise ValueError(
                f"output {self.uri!r} already holds a run with a different configuration ({changes}); "
                "rerun with --overwrite to start fresh, or choose another --output"
            )
        return previous

    def spans(self) -> tuple[list[PartSpan], list[PartSpan]]:
        """(results parts, errors parts) committed so far, from the listing."""
        return tuple([PartSpan.of(uri) for uri in _part_uris(folder)] for folder in (self.results_uri, self.errors_uri))

    def commit(self, results: pa.Table | None, errors: pa.Table | None, stats: ChannelStats | None) -> None:
        """Commit rows: errors first, results last (a results part marks its rows done)."""
        if errors is not None and len(errors):
            write_errors_part(errors, self.errors_uri)
        if results is not None and len(results):
            if stats is not None:
                metadata = dict(results.schema.metadata or {})
                metadata[STATS_METADATA_KEY] = json.dumps(stats.to_dict()).encode()
                results = results.replace_schema_metadata(metadata)
            io.write_parquet_part(results, self.results_uri)

    def reopen_transient_errors(self) -> int:
        """Delete the errors parts of transient rows, before a run resumes: their rows are pending again
        and this run retries them. Return how many rows."""
        reopened = [span for span in self.spans()[1] if span.transient]
        for span in reopened:
            io.remove_tree(span.uri)
        return sum(span.rows for span in reopened)

    def error_causes(self) -> dict[str, int]:
        """Error rows per cause (``schemas.ERROR_CAUSES``), from the listing alone."""
        errors = self.spans()[1]
        transient = sum(span.rows for span in errors if span.transient)
        return {PERMANENT: sum(span.rows for span in errors) - transient, TRANSIENT: transient}

    def transient_error_reasons(self) -> dict[str, int]:
        """Transient error rows per reason, from the footers of their parts (few: storage that failed)."""
        counts: dict[str, int] = {}
        for span in self.spans()[1]:
            for reason, number in (_part_reasons(span.uri, "reason").items() if span.transient else ()):
                counts[reason] = counts.get(reason, 0) + number
        return counts

    def counts(self) -> tuple[int, int]:
        """(result rows, error rows) committed in the output so far, from the parts' names."""
        results, errors = self.spans()
        return sum(span.rows for span in results), sum(span.rows for span in errors)

    def latent_stats(self) -> ChannelStats | None:
        """Exact statistics over every committed latent, merged from the parts' footers."""
        partials = []
        for part in _part_uris(self.results_uri):
            metadata = io.parquet_metadata(part)
            if STATS_METADATA_KEY in metadata:
                partials.append(ChannelStats.from_dict(json.loads(metadata[STATS_METADATA_KEY])))
        return merge_all(partials)

    def error_reasons(self, column: str = "reason") -> dict[str, int]:
        """Error rows per value of ``column`` (the message; encoding also has a reason ``code``).

        Read part by part (bounded memory at any size); beyond ``MAX_DISTINCT_REASONS``
        distinct values the rest are counted under ``OTHER_REASONS``.
        """
        counts: dict[str, int] = {}
        for uri in _part_uris(self.errors_uri):
            for value, number in _part_reasons(uri, column).items():
                if value not in counts and len(counts) >= MAX_DISTINCT_REASONS:
                    value = OTHER_REASONS
                counts[value] = counts.get(value, 0) + number
        return counts

    def write_json(self, name: str, value: dict) -> None:
        io.write_json(io.join(self.uri, name), value)


def write_errors_part(table: pa.Table, errors_uri: str) -> list[str]:
    """``errors/`` parts of ``table``'s rows: one of its permanent rows, one of its transient rows (named
    apart, ``TRANSIENT_PART_PREFIX``); each with its rows per reason (and per code) in its footer:
    ``error_reasons`` then reads footers, not 10 million reasons. Rows without a cause (a table
    written before causes were recorded) are permanent."""
    if "cause" not in table.column_names:
        return [_write_errors(table, errors_uri, prefix="")]
    unknown = set(pc.unique(table.column("cause")).to_pylist()) - set(ERROR_CAUSES) - {None}
    if unknown:
        raise ValueError(f"cause: {sorted(unknown)} are not error causes ({', '.join(ERROR_CAUSES)})")
    transient = pc.fill_null(pc.equal(table.column("cause"), TRANSIENT), False)
    written = []
    for rows, prefix in ((table.filter(pc.invert(transient)), ""), (table.filter(transient), TRANSIENT_PART_PREFIX)):
        if len(rows):
            written.append(_write_errors(rows, errors_uri, prefix))
    return written


def _write_errors(table: pa.Table, errors_uri: str, prefix: str) -> str:
    counts = {column: _value_counts(table.column(column)) for column in ("reason", "code") if column in table.column_names}
    metadata = {**(table.schema.metadata or {}), REASONS_METADATA_KEY: json.dumps(counts).encode()}
    return io.write_parquet_part(table.replace_schema_metadata(metadata), errors_uri, prefix)


def _value_counts(column: pa.ChunkedArray | pa.Array) -> dict:
    return {item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(column)}


def _part_reasons(uri: str, column: str) -> dict:
    """An errors part's rows per value of ``column``: from its footer, or its column (parts written before footers had them)."""
    counts = json.loads(io.parquet_metadata(uri).get(REASONS_METADATA_KEY, b"{}"))
    return counts[column] if column in counts else _value_counts(io.read_parquet_file(uri, [column]).column(column))


def _part_uris(folder: str) -> list[str]:
    # a folder not there yet holds no part; a listing that failed raises io.StorageError, never "no parts"
    return io.list_parts(folder)


def _describe_changes(before: dict, after: dict) -> str:
    changes = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append(f"{key} was {before.get(key)!r}, now {after.get(key)!r}")
    return "; ".join(changes) or "unknown difference"
