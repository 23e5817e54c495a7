"""One run skeleton for every latentray job: plan -> resume filter -> stages -> writers -> run record.

A job (generation, encoding) is a plan that answers a few questions (``PlannedJob``):
which stages for this cluster, what each row costs, the Ray Data pipeline from its
pending input rows to its commit task, and what the output holds at the end. ``run_job``
does the rest the same way for both: wiring checked before anything runs, blocks sized
from their work, ``run.json`` written at the start and the end, summaries of committed
parts collected (never rows), progress lines, ``latent_stats.json`` and the error counts from
the parts index, this run's summaries and the footers of parts neither covers
(``RunOutput.summarize``), the parts index saved for the next run. A plan that finds nothing left to do runs no dataset and loads no model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import ray.data

from pipelines.runtime import lease
from pipelines.runtime.outputs import CommittedParts, Listing, OutputSummary, RunOutput
from pipelines.runtime.placement import BlockWork, ClusterShape, rows_per_block
from pipelines.runtime.progress import ProgressReporter
from pipelines.runtime.run_record import library_versions, utc_now
from pipelines.runtime.schemas import TRANSIENT
from pipelines.runtime.stages import Stage, check_wiring
from pipelines.runtime.stats import latent_stats_report
from pipelines.runtime.text_cache import start_text_cache, stop_text_cache
from workers.runtime.speed import compile_record
from workers.runtime.columns import (  # numpy only: commit tasks import this module
    BUSY_COLUMN_PREFIX, COUNT_COLUMN_PREFIX, OOM_SPLITS_COLUMN_PREFIX, PEAK_MEMORY_COLUMN_PREFIX, combine_counts,
)

logger = logging.getLogger(__name__)


class PlannedJob(Protocol):
    label: str  # "generate", "encode"
    log_stats_warnings: bool  # also log latent_stats.json's warnings (else in the file only)
    config: Any
    model: Any  # ModelDescription
    output: RunOutput
    identity: dict
    listing: Listing | None  # the output as the plan listed it (None: not listed), for the steps before the run commits

    @property
    def input_rows(self) -> int: ...
    @property
    def rows_done_before(self) -> int: ...  # rows earlier runs committed
    @property
    def rows_to_read(self) -> int: ...  # input rows this run's blocks carry (blocks are sized from them)
    @property
    def finished(self) -> bool: ...  # nothing left to do

    def before_run(self) -> None: ...  # work on the cluster before the run (what the output holds)
    def placement(self, cluster: ClusterShape) -> str: ...
    def model_stages(self, placement: str, cluster: ClusterShape) -> list[Stage]: ...
    def stage_input_columns(self) -> set[str]: ...
    def row_work(self) -> tuple[int, int]: ...  # (pixels per row, model passes per row)
    def dataset(self, stages: list[Stage], block_rows: int) -> ray.data.Dataset: ...
    def record_fields(self) -> dict: ...  # what run.json holds beside the common fields
    def final_fields(self) -> dict: ...  # and what it holds once the run is over (of the whole output)
    # (input_rows, ok_rows, error_rows, ...; the listing they come from): of the output at the end of the run,
    # from ``listing`` where given (nothing committed since it was taken)
    def final_counts(self, totals: "RunTotals | None", listing: Listing | None) -> tuple[dict, Listing]: ...
    def error_reasons(self, summary: OutputSummary) -> dict[str, int]: ...  # of what the output holds
    def latent_stats_text(self) -> tuple[str, str]: ...  # (what the statistics are over, how warnings open)


# -- what a commit task returns -------------------------------------------------------------------


def pop_busy_seconds(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Remove the workers' busy-time columns from ``batch``; their sum per stage."""
    return {column.removeprefix(BUSY_COLUMN_PREFIX): float(np.sum(batch.pop(column)))
            for column in list(batch) if column.startswith(BUSY_COLUMN_PREFIX)}


def oom_splits_per_stage(counts: dict[str, int]) -> dict[str, int]:
    """Batches halved after out-of-memory errors, per stage (the workers' ``oom_splits_<stage>`` counts)."""
    prefix = OOM_SPLITS_COLUMN_PREFIX.removeprefix(COUNT_COLUMN_PREFIX)
    return {name.removeprefix(prefix): count for name, count in counts.items() if name.startswith(prefix) and count}


def peak_memory_per_stage(counts: dict[str, int], busy: dict[str, float]) -> dict[str, float | None]:
    """Each model stage's peak GPU memory in GiB (resident models included), from the workers' ``peak_``
    counts; None where it was not measured (a stage on CPU)."""
    prefix = PEAK_MEMORY_COLUMN_PREFIX.removeprefix(COUNT_COLUMN_PREFIX)
    peaks = {name.removeprefix(prefix): count for name, count in counts.items() if name.startswith(prefix)}
    return {stage: round(peaks[stage] / 2**30, 3) if stage in peaks else None for stage in sorted(set(busy) | set(peaks))}


def part_summary(
    *, ok_rows: int, error_rows: int, busy: dict[str, float], counts: dict[str, int] | None = None, parts: list[dict] | None = None,
) -> dict[str, np.ndarray]:
    """The one row a commit task sends the driver per block: row counts, busy seconds, the workers' counts
    (texts encoded, batches halved after out-of-memory errors, ...), the parts it wrote with their partial
    statistics and error counts (``RunOutput.commit``); no row data."""
    return {"ok_rows": np.array([ok_rows]), "error_rows": np.array([error_rows]), "busy": np.array([json.dumps(busy)], dtype=object),
            "counts": np.array([json.dumps(counts or {})], dtype=object), "parts": np.array([json.dumps(parts or [])], dtype=object)}


@dataclass
class RunTotals:
    """What this run's commit tasks reported."""

    ok_rows: int = 0
    error_rows: int = 0
    busy_seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # the workers' counts (texts_encoded, texts_reused)
    parts: CommittedParts = field(default_factory=CommittedParts)  # the parts written, for the end of the run

    def add(self, summary: dict[str, np.ndarray]) -> int:
        ok, errors = int(summary["ok_rows"].sum()), int(summary["error_rows"].sum())
        self.ok_rows += ok
        self.error_rows += errors
        for text in summary["busy"]:
            for stage, seconds in json.loads(text).items():
                self.busy_seconds[stage] = self.busy_seconds.get(stage, 0.0) + seconds
        for text in summary.get("counts", ()):
            for name, count in json.loads(text).items():
                self.counts[name] = combine_counts(name, self.counts.get(name, 0), count)
        for text in summary.get("parts", ()):
            self.parts.add(json.loads(text))
        return ok + errors


# -- the run --------------------------------------------------------------------------------------


def run_job(plan: PlannedJob) -> dict:
    """Run a planned job on the connected Ray cluster (none needed when it is finished); return run.json.

    The output's lease (taken by the plan, ``RunOutput.prepare``) is given back at the end, however it ends.
    """
    try:
        return _run_job(plan)
    finally:
        lease.release(plan.output.uri)


def _run_job(plan: PlannedJob) -> dict:
    started = time.time()
    if plan.finished:
        progress = ProgressReporter(label=plan.label, total=plan.input_rows, done=plan.rows_done_before)
        record = _start_record(plan, placement=None, stages=[], block_rows=None)
        record["note"] = "every input row was accounted for by an earlier run: nothing to do, no model loaded"
        # transient errors left beside a finished output hold rows committed since (a block Ray retried
        # after its first try wrote them): they go, as a run would retry them
        plan.output.reopen_transient_errors(plan.listing)
        return _finish(plan, record, started, progress, totals=None, listing=plan.listing)

    # 1. stages for this cluster, wiring checked before anything runs; then what the output holds,
    # rows of transient errors pending again (this run retries them)
    cluster = ClusterShape.current()
    placement = plan.placement(cluster)
    stages = plan.model_stages(placement, cluster)
    check_wiring(stages, plan.stage_input_columns())
    retried = plan.output.reopen_transient_errors(plan.listing)
    plan.before_run()
    progress = ProgressReporter(label=plan.label, total=plan.input_rows, done=plan.rows_done_before)
    block_rows = job_block_rows(plan, stages)
    record = _start_record(plan, placement, stages, block_rows)
    record["transient_errors_retried"] = retried
    plan.output.write_json("run.json", record)

    # 2. pending rows -> stages -> commit tasks; the driver receives one summary per committed block.
    # The text stages share one cache of embeddings for the job (its actors stop with the run)
    totals = RunTotals()
    text_cache = start_text_cache(plan, stages)
    try:
        for summary in plan.dataset(stages, block_rows).iter_batches(batch_size=None, batch_format="numpy"):
            progress.advance(totals.add(summary))
    finally:
        record["text_cache"] = stop_text_cache(text_cache, totals.counts)
    return _finish(plan, record, started, progress, totals)


def job_block_rows(plan: PlannedJob, stages: list[Stage]) -> int:
    """Rows per block: from the rows this run reads, what each costs, and the model pools."""
    pixels_per_row, passes_per_row = plan.row_work()
    return rows_per_block(BlockWork.of_stages(
        [stage.options for stage in stages], rows=plan.rows_to_read,
        pixels_per_row=pixels_per_row, passes_per_row=passes_per_row,
    ))


def _start_record(plan: PlannedJob, placement: str | None, stages: list[Stage], block_rows: int | None) -> dict:
    return {
        "status": "running", "started_at": utc_now(), "identity": plan.identity, "config": plan.config.to_dict(),
        "model": plan.model.identity(), "placement": placement, "stages": {stage.name: stage_record(stage) for stage in stages},
        "rows_per_block": block_rows, "versions": library_versions(), **plan.record_fields(),
    }


def stage_record(stage: Stage) -> dict:
    """What run.json says of a stage: its options, the device and dtype its workers loaded in, its GPU share
    (each actor's memory is capped to it when below 1)."""
    kwargs = stage.constructor_kwargs
    return {**vars(stage.options), "device": kwargs.get("device"), "dtype": kwargs.get("dtype"), "gpu_share": kwargs.get("gpu_share")}


def _finish(plan: PlannedJob, record: dict, started: float, progress: ProgressReporter, totals: RunTotals | None,
            listing: Listing | None = None) -> dict:
    # 3. counts, statistics and the run record, from what the output holds (earlier runs included): one
    # listing for both, ``listing`` where nothing was committed since it was taken
    counts, listing = plan.final_counts(totals, listing)
    progress.finish(accounted=counts["ok_rows"] + counts["error_rows"])
    summary = plan.output.summarize(totals.parts if totals else None, listing)
    over, suggests = plan.latent_stats_text()
    shape = plan.model.shape
    report = latent_stats_report(summary.stats, latent_channels=shape.latent_channels, scaling_factor=shape.scaling_factor,
                                 shift_factor=shape.shift_factor, over=over, suggests=suggests)
    plan.output.write_json("latent_stats.json", report)
    for warning in report["warnings"] if plan.log_stats_warnings else []:
        logger.warning("%s", warning)
    wall = time.time() - started
    produced = totals.ok_rows if totals else 0
    causes = summary.error_causes()
    record.update(
        status=run_status(counts, causes), error_causes=causes,
        finished_at=utc_now(), counts=counts, error_reasons=plan.error_reasons(summary), wall_seconds=round(wall, 3),
        images_per_second=round(produced / wall, 4) if wall > 0 else None,
        stage_busy_seconds={name: round(seconds, 3) for name, seconds in (totals.busy_seconds if totals else {}).items()},
        oom_splits=oom_splits_per_stage(totals.counts if totals else {}),
        # per worker stage (text_encoder, denoiser, ...; in a fused actor, each of its stages): GiB, or null on CPU
        peak_gpu_memory_gib=peak_memory_per_stage(totals.counts, totals.busy_seconds) if totals else {},
        # distinct texts of each batch: encoded by a text encoder, or served from a cache (the run's only)
        texts_encoded=totals.counts.get("texts_encoded", 0) if totals else 0,
        texts_reused=totals.counts.get("texts_reused", 0) if totals else 0,
        # --compile: graphs compiled, recompiles (graphs compiled after a shape's warm-up), warm-up seconds
        compile=compile_record(totals.counts if totals else {}),
    )
    record.update(plan.final_fields())
    if causes[TRANSIENT]:
        record["transient_error_reasons"] = plan.output.transient_error_reasons(summary)
    lease.check(plan.output.uri)  # a run whose lease another run took does not write the record over the other's
    plan.output.save_index(summary)
    plan.output.write_json("run.json", record)
    if counts["ok_rows"] + counts["error_rows"] != counts["input_rows"]:
        logger.warning("counts do not add up: %s", record["counts"])
    return record


def run_status(counts: dict, causes: dict[str, int]) -> str:
    """``complete``: every input row is in the results, or in errors for a cause of its own; else
    ``incomplete``: rows unaccounted for, or rows whose errors were transient (a rerun retries them)."""
    accounted = counts["ok_rows"] + counts["error_rows"] == counts["input_rows"]
    return "complete" if accounted and not causes.get(TRANSIENT) else "incomplete"
