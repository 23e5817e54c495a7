"""The output protocol shared by every latentray job.

An output folder holds a results table (``manifest/`` or ``latents/``), an
``errors/`` table, ``latent_stats.json`` and ``run.json``. Rows are committed in
Parquet parts written by the tasks that hold the rows, named from the rows' input
positions and ids (``io.part_name``); a part is written whole, after the files its
rows point to, so a row present in the results table is complete. Each part carries
the partial latent statistics of its rows in its footer metadata: the corpus
statistics are an exact merge of those partials, across reruns and resumes.

What the driver reads of an output is its listing (``PartSpan``: positions and row
count from each part's name) and its parts index: its memory follows the number of
parts, not of rows.

The parts index (``_parts_index.parquet`` in the output, ``PartsIndex``) spares the end
of a run and a rerun reading a footer per part (300k parts at a few ms each are
minutes): it holds groups of parts, each with its parts' names and versions and their
merged statistics and error counts. The commit tasks send the driver their parts'
partials (``RunOutput.commit``), which it groups as blocks finish (``CommittedParts``);
at the end of the run ``summarize`` checks every group against the listing (a group
whose part is gone or rewritten is dropped, its other parts read again), reads the
footers of the parts no group covers (a killed run's, parts rewritten by tasks) in
parallel, and the run saves the index for the next.

Error rows whose cause is outside the row (``schemas.TRANSIENT``: storage that failed
after its retries) are written in parts of their own, named ``transient-part-...``, so
the listing alone tells them apart. A rerun deletes those parts before it resumes
(``reopen_transient_errors``): their rows are pending again and go through the run like
any row not yet done. Each delete removes whole rows, so a row is never in both tables;
a run that dies after the delete leaves them pending, for the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.runtime import io, lease
from pipelines.runtime.schemas import ERROR_CAUSES, PERMANENT, TRANSIENT
from pipelines.runtime.stats import ChannelStats, merge_all

logger = logging.getLogger(__name__)

STATS_METADATA_KEY = b"latentray.latent_stats"
REASONS_METADATA_KEY = b"latentray.error_counts"  # an errors part's rows per reason (and per code)
ERRORS_FOLDER = "errors"
TRANSIENT_PART_PREFIX = "transient-"  # an errors part of transient rows only (see the module's docstring)
PART_NAME = re.compile(r"part-(\d+)-(\d+)-(\d+)-[0-9a-f]+\.parquet$")
# error reasons counted by name in run.json; rarer ones beyond this many are counted together
MAX_DISTINCT_REASONS = 1000
OTHER_REASONS = "(other reasons)"
INDEX_NAME = "_parts_index.parquet"  # "_": readers of the output's tables skip it
INDEX_GROUP_PARTS = 256  # parts per group of the index: a part gone or rewritten costs reading its group again
INDEX_SCHEMA = pa.schema([
    # a group: its folder, its parts' file names, a digest of their names and versions (``_fingerprint``),
    # their merged statistics and error counts (JSON: ``ChannelStats.to_dict()``, ``Counts``)
    ("folder", pa.string()), ("names", pa.list_(pa.string())), ("fingerprint", pa.string()),
    ("stats", pa.string()), ("counts", pa.string()),
])
COUNTED_ERROR_COLUMNS = ("reason", "code", "cause")  # an errors part's footer counts its rows per value of these

Counts = dict[str, dict[str, int]]  # rows per value of each counted column: {"reason": {"bad prompt": 3}, ...}
# what the results and errors folders held at one moment: folder ("manifest", "errors") -> {part URI: version},
# sorted. Steps of a run with nothing committed between them share one (a listing is a request per 1,000 parts)
Listing = dict[str, dict[str, str]]


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


def add_counts(total: Counts, counts: Counts) -> Counts:
    """Add ``counts`` into ``total`` (in place), whatever columns they count; beyond ``MAX_DISTINCT_REASONS``
    values of a column the rest are counted under ``OTHER_REASONS``."""
    for column, values in counts.items():
        merged = total.setdefault(column, {})
        for value, number in values.items():
            if value not in merged and len(merged) >= MAX_DISTINCT_REASONS:
                value = OTHER_REASONS
            merged[value] = merged.get(value, 0) + number
    return total


@dataclass
class PartGroup:
    """Parts of one folder summarised together (a row of the parts index): their names, their merged
    statistics (results parts) and error counts (errors parts)."""

    folder: str  # the results folder ("manifest", "latents") or "errors"
    names: list[str] = field(default_factory=list)  # the parts' file names
    stats: ChannelStats | None = None
    counts: Counts = field(default_factory=dict)
    fingerprint: str | None = None  # of the names and versions summarised; None until checked against a listing

    def add(self, name: str, stats: ChannelStats | None, counts: Counts) -> None:
        self.names.append(name)
        if stats is not None:
            self.stats = stats if self.stats is None else self.stats.merge(stats)
        add_counts(self.counts, counts)

    @property
    def full(self) -> bool:
        return len(self.names) >= INDEX_GROUP_PARTS


@dataclass
class CommittedParts:
    """What this run's commit tasks reported of the parts they wrote (``RunOutput.commit``), grouped as it
    arrives: the driver keeps each part's name and one merged partial per group, not one per part."""

    groups: list[PartGroup] = field(default_factory=list)
    _open: dict[str, PartGroup] = field(default_factory=dict)  # the group each folder's next part joins

    def add(self, records: Iterable[dict]) -> None:
        for record in records:
            group = self._open.get(record["folder"])
            if group is None or group.full:
                group = self._open[record["folder"]] = PartGroup(record["folder"])
                self.groups.append(group)
            stats = ChannelStats.from_dict(record["stats"]) if record.get("stats") else None
            group.add(record["name"], stats, record.get("counts") or {})


@dataclass(frozen=True)
class OutputSummary:
    """What an output holds over all its parts (``RunOutput.summarize``), and the parts index that says so."""

    stats: ChannelStats | None  # exact statistics of every committed latent
    counts: Counts  # error rows per value of each counted column
    groups: list[PartGroup]  # the parts index: every listed part in exactly one group
    footers_read: int  # parts neither the index nor this run's commits covered
    index_changed: bool

    def error_reasons(self, column: str = "reason") -> dict[str, int]:
        """Error rows per value of ``column`` (the message; encoding also has a reason ``code``)."""
        return dict(self.counts.get(column, {}))

    def error_causes(self) -> dict[str, int]:
        """Error rows per cause (``schemas.ERROR_CAUSES``); rows without one (older parts) are permanent."""
        rows = sum(self.counts.get("reason", {}).values())
        transient = self.counts.get("cause", {}).get(TRANSIENT, 0)
        return {PERMANENT: rows - transient, TRANSIENT: transient}


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
            for name in (self.results_folder, ERRORS_FOLDER, "images", "run.json", "latent_stats.json", INDEX_NAME):
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

    def listing(self) -> Listing:
        """Each part of the results and errors folders with its version. A listing that failed raises
        ``io.StorageError``, never "no parts"; a folder not there yet holds none."""
        return {folder: io.list_part_versions(io.join(self.uri, folder)) for folder in (self.results_folder, ERRORS_FOLDER)}

    def spans(self, listing: Listing | None = None) -> tuple[list[PartSpan], list[PartSpan]]:
        """(results parts, errors parts) committed so far, from ``listing`` (else a listing now)."""
        listing = self.listing() if listing is None else listing
        return tuple([PartSpan.of(uri) for uri in listing[folder]] for folder in (self.results_folder, ERRORS_FOLDER))

    def commit(self, results: pa.Table | None, errors: pa.Table | None, stats: ChannelStats | None) -> list[dict]:
        """Commit rows: errors first, results last (a results part marks its rows done).

        Returns what the driver keeps of each part written (``CommittedParts``): its folder, name,
        statistics or error counts; a few hundred bytes, no rows.
        """
        records = []
        if errors is not None and len(errors):
            for uri, counts in write_errors_part(errors, self.errors_uri):
                records.append({"folder": ERRORS_FOLDER, "name": posixpath.basename(uri), "counts": counts})
        if results is not None and len(results):
            if stats is not None:
                metadata = dict(results.schema.metadata or {})
                metadata[STATS_METADATA_KEY] = json.dumps(stats.to_dict()).encode()
                results = results.replace_schema_metadata(metadata)
            uri = io.write_parquet_part(results, self.results_uri)
            records.append({"folder": self.results_folder, "name": posixpath.basename(uri), "stats": stats.to_dict() if stats else None})
        return records

    def reopen_transient_errors(self, listing: Listing | None = None) -> int:
        """Delete the errors parts of transient rows, before a run resumes: their rows are pending again
        and this run retries them. Return how many rows. They leave ``listing`` too: it stays what the
        output holds."""
        listing = self.listing() if listing is None else listing
        reopened = [span for span in self.spans(listing)[1] if span.transient]
        for span in reopened:
            io.remove_tree(span.uri)
            del listing[ERRORS_FOLDER][span.uri]
        return sum(span.rows for span in reopened)

    def transient_error_reasons(self, summary: OutputSummary) -> dict[str, int]:
        """Transient error rows per reason, from the footers of their parts (few: storage that failed)."""
        uris = [io.join(self.uri, ERRORS_FOLDER, name) for group in summary.groups if group.folder == ERRORS_FOLDER
                for name in group.names if name.startswith(TRANSIENT_PART_PREFIX)]
        counts: Counts = {}
        for uri, metadata in zip(uris, io.parquet_metadata_of_many(uris)):
            add_counts(counts, _footer_counts(uri, metadata))
        return dict(counts.get("reason", {}))

    def counts(self, listing: Listing | None = None) -> tuple[int, int]:
        """(result rows, error rows) committed in the output so far, from the parts' names."""
        results, errors = self.spans(listing)
        return sum(span.rows for span in results), sum(span.rows for span in errors)

    def latent_stats(self) -> ChannelStats | None:
        """Exact statistics over every committed latent (``summarize``)."""
        return self.summarize().stats

    def error_reasons(self, column: str = "reason") -> dict[str, int]:
        """Error rows per value of ``column`` (``summarize``); beyond ``MAX_DISTINCT_REASONS`` distinct
        values the rest are counted under ``OTHER_REASONS``."""
        return self.summarize().error_reasons(column)

    def summarize(self, committed: CommittedParts | None = None, listing: Listing | None = None) -> OutputSummary:
        """Statistics and error counts over every part the output lists, exact, and the parts index for them.

        Each listed part is counted once, from the first of: a group of the saved index whose parts
        are all listed with the versions it summarised; a group of this run's commits (``committed``)
        whose parts are all listed and in no such group; its footer, read in parallel with the others'.
        """
        # 1. the listing (``listing``, else one now), each part with its version; then the groups that still hold
        listed = {folder: {posixpath.basename(uri): version for uri, version in parts.items()}
                  for folder, parts in (self.listing() if listing is None else listing).items()}
        saved = self._read_index()
        kept: list[PartGroup] = []
        covered: set[tuple[str, str]] = set()
        for group in saved + (committed.groups if committed else []):
            fingerprint = _listed_fingerprint(group, listed.get(group.folder, {}), covered)
            if fingerprint is None or group.fingerprint not in (None, fingerprint):
                continue  # a part gone, rewritten or counted already: its other parts are read below
            group.fingerprint = fingerprint
            kept.append(group)
            covered.update((group.folder, name) for name in group.names)

        # 2. the parts no group covers (a killed run's, parts rewritten by tasks): their footers, in parallel
        uncovered = [(folder, name) for folder, names in listed.items() for name in names if (folder, name) not in covered]
        read = self._read_parts(uncovered, listed)

        # 3. the totals
        groups = kept + read
        stats = merge_all([group.stats for group in groups if group.stats is not None])
        counts: Counts = {}
        for group in groups:
            add_counts(counts, group.counts)
        unchanged = len(kept) == len(saved) and all(a is b for a, b in zip(kept, saved)) and not read
        return OutputSummary(stats=stats, counts=counts, groups=groups, footers_read=len(uncovered), index_changed=not unchanged)

    def save_index(self, summary: OutputSummary) -> None:
        """Write the parts index of ``summary`` (whole: a reader sees the previous index or this one)."""
        if not summary.index_changed:
            return
        rows = [{"folder": group.folder, "names": group.names, "fingerprint": group.fingerprint,
                 "stats": json.dumps(group.stats.to_dict()) if group.stats is not None else None, "counts": json.dumps(group.counts)}
                for group in summary.groups]
        io.write_parquet(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), io.join(self.uri, INDEX_NAME))

    def _read_index(self) -> list[PartGroup]:
        """The saved parts index; none when there is none. An index that does not parse is ignored (every
        footer is read again); one that could not be read stops the run (``io.StorageError``)."""
        uri = io.join(self.uri, INDEX_NAME)
        data = io.read_bytes_if_any(uri)
        if data is None:
            return []
        try:
            rows = pq.read_table(pa.BufferReader(data)).to_pylist()
            return [PartGroup(row["folder"], list(row["names"]), ChannelStats.from_dict(json.loads(row["stats"])) if row["stats"] else None,
                              json.loads(row["counts"]), row["fingerprint"]) for row in rows]
        except (pa.ArrowException, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring the parts index %s (%s): every part's footer is read", uri, error)
            return []

    def _read_parts(self, parts: list[tuple[str, str]], listed: dict[str, dict[str, str]]) -> list[PartGroup]:
        """Groups of ``parts`` (folder, name), from their footers read in parallel."""
        uris = [io.join(self.uri, folder, name) for folder, name in parts]
        groups: list[PartGroup] = []
        for (folder, name), uri, metadata in zip(parts, uris, io.parquet_metadata_of_many(uris)):
            if not groups or groups[-1].folder != folder or groups[-1].full:
                groups.append(PartGroup(folder))
            stats = ChannelStats.from_dict(json.loads(metadata[STATS_METADATA_KEY])) if STATS_METADATA_KEY in metadata else None
            groups[-1].add(name, stats, _footer_counts(uri, metadata) if folder == ERRORS_FOLDER else {})
        for group in groups:
            group.fingerprint = _fingerprint(group.names, [listed[group.folder][name] for name in group.names])
        return groups

    def write_json(self, name: str, value: dict) -> None:
        io.write_json(io.join(self.uri, name), value)


def write_errors_part(table: pa.Table, errors_uri: str) -> list[tuple[str, Counts]]:
    """``errors/`` parts of ``table``'s rows: one of its permanent rows, one of its transient rows (named
    apart, ``TRANSIENT_PART_PREFIX``); each with its rows per reason, code and cause in its footer (the
    end of a run reads footers, or the parts index, not 10 million reasons). Returns each part's URI
    and counts. Rows without a cause (a table written before causes were recorded) are permanent."""
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


def _write_errors(table: pa.Table, errors_uri: str, prefix: str) -> tuple[str, Counts]:
    counts = error_counts(table)
    metadata = {**(table.schema.metadata or {}), REASONS_METADATA_KEY: json.dumps(counts).encode()}
    return io.write_parquet_part(table.replace_schema_metadata(metadata), errors_uri, prefix), counts


def error_counts(table: pa.Table) -> Counts:
    """An errors table's rows per value of each counted column it has."""
    return {column: _value_counts(table.column(column)) for column in COUNTED_ERROR_COLUMNS if column in table.column_names}


def _value_counts(column: pa.ChunkedArray | pa.Array) -> dict:
    return {item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(column)}


def _footer_counts(uri: str, metadata: dict[bytes, bytes]) -> Counts:
    """An errors part's counts: from its footer, or its columns (parts written before footers had them)."""
    if REASONS_METADATA_KEY in metadata:
        return json.loads(metadata[REASONS_METADATA_KEY])
    return error_counts(io.read_parquet_file(uri))


def _fingerprint(names: list[str], versions: list[str]) -> str:
    return hashlib.sha1("\n".join(f"{name}\0{version}" for name, version in zip(names, versions)).encode()).hexdigest()


def _listed_fingerprint(group: PartGroup, listed: dict[str, str], covered: set[tuple[str, str]]) -> str | None:
    """The fingerprint of ``group``'s parts as listed now; None when one is not listed, is covered by
    another group, or is named twice (each part is counted once)."""
    if len(set(group.names)) != len(group.names):
        return None
    if any(name not in listed or (group.folder, name) in covered for name in group.names):
        return None
    return _fingerprint(group.names, [listed[name] for name in group.names])


def _describe_changes(before: dict, after: dict) -> str:
    changes = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append(f"{key} was {before.get(key)!r}, now {after.get(key)!r}")
    return "; ".join(changes) or "unknown difference"
