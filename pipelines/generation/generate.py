"""Bulk generation: a Parquet table of prompts -> images, manifest, errors and latent statistics.

    read row groups -> validate rows (CPU task) -> blocks sized from their work
    -> text encoder -> denoiser -> VAE decoder
    (actors: separate pools with ``split``, one actor with ``fused``) -> write images (CPU task)
    -> the driver commits manifest and error parts -> latent_stats.json, run.json
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from pipelines.generation.images import write_generated_images
from pipelines.generation.prompt_rows import PromptDefaults, normalize_prompts
from pipelines.runtime import io
from pipelines.runtime.config import GenerateConfig
from pipelines.runtime.model_source import ModelDescription, describe_model
from pipelines.runtime.outputs import RunOutput
from pipelines.runtime.placement import TASK_CPUS, BlockWork, ClusterShape, StageShare, rows_per_block, stage_options
from pipelines.runtime.progress import ProgressReporter
from pipelines.runtime.row_ids import duplicate_positions
from pipelines.runtime.run_record import library_versions, utc_now
from pipelines.runtime.schemas import ERRORS_SCHEMA, PROMPT_OPTIONAL_COLUMNS, check_prompt_schema, manifest_schema
from pipelines.runtime.stages import Stage, check_wiring
from pipelines.runtime.stats import latent_stats_report, stats_of_rows
from workers.generation.denoiser import DenoiserWorker
from workers.generation.fused import FusedGenerationWorker
from workers.generation.text_encoder import TextEncoderWorker
from workers.generation.vae_decoder import VaeDecoderWorker
from workers.runtime.schedulers import scheduler_label

logger = logging.getLogger(__name__)

# what latent_stats.json covers (the same format as encode's)
LATENT_STATS_OVER = "the final latents of the manifest rows (what the VAE decoder received)"
SPLIT_WORKERS = {"text_encoder": TextEncoderWorker, "denoiser": DenoiserWorker, "vae_decoder": VaeDecoderWorker}
# What each stage gets of the cluster: the denoiser does nearly all the work
SHARES = {
    "fused": {"fused": StageShare(cpu=1.0, gpu=1.0, heavy=True)},
    "split": {
        "text_encoder": StageShare(cpu=0.25, gpu=0.1, heavy=False),
        "denoiser": StageShare(cpu=0.5, gpu=0.7, heavy=True),
        "vae_decoder": StageShare(cpu=0.25, gpu=0.2, heavy=False),
    },
}


def resolve_placement(placement: str, cluster: ClusterShape) -> str:
    """``auto``: fused; as fast as split on CPU with less memory, and one GPU has nothing to fan out (see README)."""
    return "fused" if placement == "auto" else placement


def build_model_stages(config: GenerateConfig, model: ModelDescription, placement: str, cluster: ClusterShape) -> list[Stage]:
    workers = {"fused": FusedGenerationWorker} if placement == "fused" else SPLIT_WORKERS
    shares = SHARES[placement]
    if placement == "split":  # the GPU split is the family's: T5 and Qwen3 need more of a GPU than CLIP
        shares = {name: replace(share, gpu=model.family.split_gpu_shares[name]) for name, share in shares.items()}
    options = stage_options(shares, cluster, config.batch_size, config.stages, placement)
    stages = []
    for name, worker in workers.items():
        kwargs: dict[str, Any] = {"model": model.location, "dtype": config.dtype}
        if worker in (TextEncoderWorker, FusedGenerationWorker):
            kwargs["max_sequence_length"] = config.max_sequence_length
        if worker in (TextEncoderWorker, DenoiserWorker, FusedGenerationWorker):
            kwargs["true_cfg_scale"] = config.true_cfg_scale
        if worker in (DenoiserWorker, FusedGenerationWorker):
            kwargs["scheduler"] = config.scheduler
        stages.append(Stage(name=name, worker=worker, options=options[name], family=model.family, constructor_kwargs=kwargs))
    return stages


# -- driver: commit results as they stream in -----------------------------------------------------


class ManifestCommitter:
    """Buffers finished rows in the driver and commits them in parts.

    A part is committed at ``rows_per_part`` rows or after ``COMMIT_SECONDS``, whichever
    comes first: large parts keep the manifest to few files, the time bound keeps what
    a slow run loses on interruption to a minute of work.
    """

    COMMIT_SECONDS = 60.0

    def __init__(self, output: RunOutput, scheduler: str, rows_per_part: int, save_latents: bool):
        self.output, self.scheduler, self.rows_per_part, self.save_latents = output, scheduler, rows_per_part, save_latents
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.last_commit = time.monotonic()
        self.busy_seconds: dict[str, float] = {}
        self.ok_rows = self.error_rows = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for column in [c for c in batch if c.startswith("busy_seconds_")]:
            stage = column.removeprefix("busy_seconds_")
            self.busy_seconds[stage] = self.busy_seconds.get(stage, 0.0) + float(np.sum(batch.pop(column)))
        self.pending.append(batch)
        self.pending_rows += len(batch["id"])
        if self.pending_rows >= self.rows_per_part or time.monotonic() - self.last_commit >= self.COMMIT_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.last_commit = time.monotonic()
        if not self.pending:
            return
        batch = {column: _concat([part[column] for part in self.pending]) for column in self.pending[0]}
        self.pending, self.pending_rows = [], 0
        failed = batch["error_reason"] != ""
        errors = pa.Table.from_pydict({
            "id": [str(v) for v in batch["id"][failed]], "row": batch["row"][failed].astype(np.int64),
            "stage": list(batch["error_stage"][failed]), "reason": list(batch["error_reason"][failed]),
        }, schema=ERRORS_SCHEMA)
        ok = {column: values[~failed] for column, values in batch.items()}
        self.ok_rows += int((~failed).sum())
        self.error_rows += int(failed.sum())
        stats = stats_of_rows(ok["latent_count"], ok["latent_mean"], ok["latent_std"], ok["latent_min"], ok["latent_max"]) if len(ok["id"]) else None
        self.output.commit(self._manifest_table(ok), errors, stats)

    def _manifest_table(self, part: dict[str, np.ndarray]) -> pa.Table:
        rows = len(part["id"])
        columns = {
            "id": [str(v) for v in part["id"]], "prompt": list(part["prompt"]), "negative_prompt": list(part["negative_prompt"]),
            "seed": part["seed"].astype(np.int64), "num_inference_steps": part["num_inference_steps"].astype(np.int32),
            "guidance_scale": part["guidance_scale"].astype(np.float64), "height": part["height"].astype(np.int32),
            "width": part["width"].astype(np.int32), "scheduler": [self.scheduler] * rows,
            "image_path": list(part["image_path"]), "prompt_truncated": part["prompt_truncated"].astype(bool),
            "latent_mean": list(part["latent_mean"].astype(np.float32)), "latent_std": list(part["latent_std"].astype(np.float32)),
        }
        if self.save_latents:
            columns["latent"] = [np.asarray(latent, np.float32).ravel() for latent in part["latents"]]
            columns["latent_shape"] = [list(np.shape(latent)) for latent in part["latents"]]
        schema = manifest_schema(self.save_latents)
        return pa.Table.from_arrays([pa.array(columns[field.name], field.type) for field in schema], schema=schema)


def _concat(values: list[np.ndarray]) -> np.ndarray:
    if any(v.dtype == object for v in values) or len({v.shape[1:] for v in values}) > 1:
        column = np.empty(sum(len(v) for v in values), dtype=object)
        column[:] = [item for v in values for item in v]
        return column
    return np.concatenate(values)


# -- the run --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GenerationPlan:
    """Everything checked and known before Ray starts: a bad input fails here, fast."""

    config: GenerateConfig
    model: ModelDescription
    output: RunOutput
    identity: dict
    fragments: list[io.ParquetFragment]
    columns: list[str]
    done_ids: frozenset[str]
    duplicate_rows: dict[int, int]
    all_ids_done: bool = False  # an earlier run committed every input id (the run checks the counts)

    @property
    def input_rows(self) -> int:
        return sum(fragment.num_rows for fragment in self.fragments)


def plan_generation(config: GenerateConfig) -> GenerationPlan:
    # 1. the input, the model and the output, before any model loads
    schema, fragments = io.parquet_fragments(config.prompts)
    check_prompt_schema(schema, config.prompts)
    model = describe_model(config.model)
    config = config.with_model_defaults(model)
    output = RunOutput(config.output, "manifest")
    identity = {
        **config.output_identity(), "model": model.location.uri, "model_fingerprint": model.location.fingerprint,
        "family": model.family.name,
    }
    output.prepare(identity, config.overwrite)
    # 2. rows a previous run accounted for, and repeated ids
    ids = io.read_parquet_columns(config.prompts, ["id"]).column("id") if "id" in schema.names else None
    done_ids = output.done_ids()
    input_rows = sum(fragment.num_rows for fragment in fragments)
    return GenerationPlan(
        config=config, model=model, output=output, identity=identity, fragments=fragments,
        columns=["prompt", *[c for c in (*PROMPT_OPTIONAL_COLUMNS, *model.family.conditioning_columns) if c in schema.names]],
        done_ids=done_ids, duplicate_rows=duplicate_positions(ids.to_pylist()) if ids is not None else {},
        all_ids_done=_all_ids_done(ids, done_ids, input_rows),
    )


def _all_ids_done(ids: pa.ChunkedArray | None, done_ids: frozenset[str], input_rows: int) -> bool:
    """Whether an earlier run committed every input id (as a result or an error)."""
    if ids is None or not done_ids or len(done_ids) > input_rows:
        return False
    return pc.all(pc.is_in(ids, value_set=pa.array(list(done_ids), pa.string()))).as_py()


def run_generation(config: GenerateConfig | GenerationPlan) -> dict:
    """Run one generation job on the connected Ray cluster; return its run record (run.json)."""
    started = time.time()
    plan = config if isinstance(config, GenerationPlan) else plan_generation(config)
    config, model, output = plan.config, plan.model, plan.output
    if plan.all_ids_done:
        ok_rows, error_rows = output.counts()
        if ok_rows + error_rows == plan.input_rows:
            return _record_finished_output(plan, started, ok_rows, error_rows)

    # 3. stages for this cluster, wiring checked before anything runs
    cluster = ClusterShape.current()
    placement = resolve_placement(config.placement, cluster)
    stages = build_model_stages(config, model, placement, cluster)
    check_wiring(stages, {"id", "row", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "height", "width"}
                 | set(model.family.conditioning_columns))
    block_rows = generation_block_rows(plan, stages)
    record = _start_record(plan, placement, {stage.name: vars(stage.options) for stage in stages}, block_rows)
    output.write_json("run.json", record)

    # 4. the dataset: read -> validate -> model stages -> write images
    dataset = _build_dataset(plan, stages, block_rows)

    # 5. commit results in the driver as they stream in
    label = scheduler_label(config.scheduler, {"_class_name": model.scheduler_class})
    committer = ManifestCommitter(output, label, config.manifest_rows_per_part, config.save_latents)
    progress = ProgressReporter(label="generate", total=plan.input_rows, done=len(plan.done_ids))
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        committer.add(batch)
        progress.advance(len(batch["id"]))
    committer.flush()

    # 6. statistics and the run record, from what the output holds (earlier runs included)
    ok_rows, error_rows = output.counts()
    progress.finish(accounted=ok_rows + error_rows)
    stats = output.latent_stats()
    output.write_json("latent_stats.json", latent_stats_report(
        stats, latent_channels=model.shape.latent_channels, scaling_factor=model.shape.scaling_factor,
        shift_factor=model.shape.shift_factor, over=LATENT_STATS_OVER, suggests="the generated latents suggest"))
    wall = time.time() - started
    record.update(
        status="complete" if ok_rows + error_rows == plan.input_rows else "incomplete", finished_at=utc_now(),
        counts={"input_rows": plan.input_rows, "ok_rows": ok_rows, "error_rows": error_rows,
                "generated_this_run": committer.ok_rows, "accounted_before_this_run": len(plan.done_ids)},
        error_reasons=output.error_reasons(), wall_seconds=round(wall, 3),
        images_per_second=round(committer.ok_rows / wall, 4) if wall > 0 else None,
        stage_busy_seconds={name: round(seconds, 3) for name, seconds in committer.busy_seconds.items()},
    )
    output.write_json("run.json", record)
    if record["status"] != "complete":
        logger.warning("counts do not add up: %s", record["counts"])
    return record


def _start_record(plan: GenerationPlan, placement: str | None, stages: dict, rows_per_block: int | None) -> dict:
    return {
        "status": "running", "started_at": utc_now(), "identity": plan.identity, "config": plan.config.to_dict(),
        "model": plan.model.identity(), "placement": placement, "stages": stages, "rows_per_block": rows_per_block,
        "versions": library_versions(),
    }


def _record_finished_output(plan: GenerationPlan, started: float, ok_rows: int, error_rows: int) -> dict:
    """A rerun of a finished output: no dataset, no actor, no model; the run record says so."""
    ProgressReporter(label="generate", total=plan.input_rows, done=len(plan.done_ids)).finish(accounted=ok_rows + error_rows)
    record = _start_record(plan, placement=None, stages={}, rows_per_block=None)
    record.update(
        status="complete", finished_at=utc_now(),
        note="every input row was accounted for by an earlier run: nothing to generate, no model loaded",
        counts={"input_rows": plan.input_rows, "ok_rows": ok_rows, "error_rows": error_rows,
                "generated_this_run": 0, "accounted_before_this_run": len(plan.done_ids)},
        error_reasons=plan.output.error_reasons(), wall_seconds=round(time.time() - started, 3), images_per_second=0.0,
        stage_busy_seconds={},
    )
    plan.output.write_json("run.json", record)
    return record


def prompt_defaults(config: GenerateConfig, model: ModelDescription) -> PromptDefaults:
    return PromptDefaults(
        negative_prompt=config.negative_prompt, steps=config.steps, guidance=config.guidance,
        height=config.height or model.shape.default_height, width=config.width or model.shape.default_width,
        seed=config.seed, max_image_size=config.max_image_size, size_multiple=model.shape.size_multiple,
    )


def generation_block_rows(plan: GenerationPlan, stages: list[Stage]) -> int:
    """Rows per block: from the rows left to generate, the run's image size and steps, and the model pools."""
    defaults = prompt_defaults(plan.config, plan.model)
    return rows_per_block(BlockWork.of_stages(
        [stage.options for stage in stages], rows=max(0, plan.input_rows - len(plan.done_ids)),
        pixels_per_row=defaults.height * defaults.width, passes_per_row=defaults.steps,
    ))


def _build_dataset(plan: GenerationPlan, stages: list[Stage], block_rows: int) -> ray.data.Dataset:
    config = plan.config
    # batches form identically on every run, so reruns produce byte-identical images
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_items([vars(f) for f in plan.fragments], override_num_blocks=max(1, len(plan.fragments)))
    dataset = dataset.map_batches(
        io.read_fragments_batch, batch_size=1, num_cpus=TASK_CPUS, fn_kwargs={"columns": plan.columns, "rows_per_block": block_rows},
    )
    dataset = dataset.map_batches(
        normalize_prompts, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
        fn_kwargs={"defaults": prompt_defaults(config, plan.model), "duplicate_rows": plan.duplicate_rows,
                   "done_ids": plan.done_ids, "errors_uri": plan.output.errors_uri},
    )
    # A task's results leave it as one block, whatever its UDF yields: without this cut a
    # row group of prompts would reach a single actor as one block, and its images would
    # all appear when that block is done. Cut after validation, so blocks count real work.
    dataset = dataset.repartition(target_num_rows_per_block=block_rows)
    for stage in stages:
        dataset = stage.apply(dataset)
    return dataset.map_batches(
        write_generated_images, batch_size=config.batch_size, num_cpus=TASK_CPUS,
        fn_kwargs={"output": config.output, "image_format": config.image_format,
                   "quality": config.image_quality, "keep_latents": config.save_latents},
    )
