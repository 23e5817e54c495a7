"""The output protocol shared by every latentray job.

An output folder holds a results table (``manifest/`` or ``latents/``), an
``errors/`` table, ``latent_stats.json`` and ``run.json``. Rows are committed in
Parquet parts named from their ids; a part is written whole, after the files its
rows point to, so a row present in the results table is complete. Each part carries
the partial latent statistics of its rows in its footer metadata: the corpus
statistics are an exact merge of those partials, across reruns and resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.runtime import io
from pipelines.runtime.stats import ChannelStats, merge_all

STATS_METADATA_KEY = b"latentray.latent_stats"
ERRORS_FOLDER = "errors"


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
        """
        io.check_writable(self.uri)
        previous = io.read_json(io.join(self.uri, "run.json"))
        if overwrite:
            for name in (self.results_folder, ERRORS_FOLDER, "images", "run.json", "latent_stats.json"):
                io.remove_tree(io.join(self.uri, name))
            return None
        if previous is not None and previous.get("identity") != identity:
            changes = _describe_changes(previous.get("identity", {}), identity)
            raise ValueError(
                f"output {self.uri!r} already holds a run with a different configuration ({changes}); "
                "rerun with --overwrite to start fresh, or choose another --output"
            )
        return previous

    def done_ids(self) -> frozenset[str]:
        """Ids a previous run already accounted for (committed results or errors)."""
        ids: set[str] = set()
        for folder in (self.results_uri, self.errors_uri):
            table = io.read_parquet_folder(folder, columns=["id"])
            if table is not None:
                ids.update(table.column("id").to_pylist())
        return frozenset(ids)

    def commit(self, results: pa.Table | None, errors: pa.Table | None, stats: ChannelStats | None) -> None:
        """Commit rows: errors first, results last (a results part marks its rows done)."""
        if errors is not None and len(errors):
            io.write_parquet_part(errors, self.errors_uri, errors.column("id").to_pylist())
        if results is not None and len(results):
            if stats is not None:
                metadata = dict(results.schema.metadata or {})
                metadata[STATS_METADATA_KEY] = json.dumps(stats.to_dict()).encode()
                results = results.replace_schema_metadata(metadata)
            io.write_parquet_part(results, self.results_uri, results.column("id").to_pylist())

    def counts(self) -> tuple[int, int]:
        """(result rows, error rows) committed in the output so far."""
        return tuple(
            0 if (table := io.read_parquet_folder(folder, columns=["id"])) is None else len(table)
            for folder in (self.results_uri, self.errors_uri)
        )

    def latent_stats(self) -> ChannelStats | None:
        """Exact statistics over every committed latent, merged from the parts' footers."""
        partials = []
        for part in io.list_parquet_files(self.results_uri) if io.exists(self.results_uri) else []:
            metadata = io.parquet_metadata(part)
            if STATS_METADATA_KEY in metadata:
                partials.append(ChannelStats.from_dict(json.loads(metadata[STATS_METADATA_KEY])))
        return merge_all(partials)

    def error_reasons(self, column: str = "reason") -> dict[str, int]:
        """Error rows per value of ``column`` (the message; encoding also has a reason ``code``)."""
        table = io.read_parquet_folder(self.errors_uri, columns=[column])
        if table is None:
            return {}
        counts = pc.value_counts(table.column(column))
        return {item["values"].as_py(): item["counts"].as_py() for item in counts}

    def write_json(self, name: str, value: dict) -> None:
        io.write_json(io.join(self.uri, name), value)


def _describe_changes(before: dict, after: dict) -> str:
    changes = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append(f"{key} was {before.get(key)!r}, now {after.get(key)!r}")
    return "; ".join(changes) or "unknown difference"
