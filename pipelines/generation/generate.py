"""Bulk generation: a Parquet table of prompts -> images, manifest, errors and latent statistics.

    row groups left to do (CPU task: drops rows committed already) -> validate rows (CPU task)
    -> blocks sized from their work -> text encoder -> denoiser -> VAE decoder
    (actors: separate pools with ``split``, one actor with ``fused``)
    -> commit (CPU task per block: images, manifest part, errors part) -> one summary per block
    -> latent_stats.json, run.json (``pipelines.runtime.job``, the skeleton shared with encoding)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.data

from pipelines.generation.commit import commit_generated
from pipelines.generation.init_images import SourceSettings, uses_init_images
from pipelines.generation.prompt_rows import LORA_GROUPING_BLOCKS, PROMPT_ROW_COLUMNS, PromptDefaults, normalize_prompts, uses_loras
from pipelines.runtime import io
from pipelines.runtime.config import GenerateConfig, GenerationOptions
from pipelines.runtime.job import RunTotals, run_job
from pipelines.runtime.lora_files import LoraFiles, check_loras_unchanged, loras_used, previous_loras
from pipelines.runtime.model_source import ModelDescription, describe_model
from pipelines.runtime.outputs import Listing, OutputSummary, RunOutput
from pipelines.runtime.placement import TASK_CPUS, ClusterShape, StageShare, stage_options, vae_micro_batch
from pipelines.runtime.precision import carry_precision, resolve_stages, settle_precision, stage_precision
from pipelines.runtime.repeated_ids import RepeatedIds, find_repeated_ids
from pipelines.runtime.id_resume import IdLookup, look_up_ids, read_rows_not_done
from pipelines.runtime.resume import (
    PendingFragment, ResumePlan, check_input_unchanged, input_change, input_versions, plan_resume, read_pending_rows,
)
from pipelines.runtime.schemas import PROMPT_OPTIONAL_COLUMNS, check_prompt_schema
from pipelines.runtime.stages import Stage, cut_into_blocks
from workers.generation.denoiser import DenoiserWorker
from workers.generation.fused import FusedGenerationWorker
from workers.generation.text_encoder import TextEncoderWorker
from workers.generation.vae_decoder import VaeDecoderWorker
from workers.runtime.init_images import check_init_image_support
from workers.runtime.loras import check_lora_support
from workers.runtime.schedulers import scheduler_label
from workers.runtime.speed import DEFAULT_COMPILE_BACKEND, check_attention_device

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
# the model roles each stage runs: a run's precision is recorded per role, whatever the placement
ROLES = {"fused": tuple(SPLIT_WORKERS), **{name: (name,) for name in SPLIT_WORKERS}}


def resolve_placement(placement: str, cluster: ClusterShape | None) -> str:
    """``auto``: fused; as fast as split on CPU with less memory, and one GPU has nothing to fan out (see README)."""
    return "fused" if placement == "auto" else placement


def build_model_stages(config: GenerationOptions, model: ModelDescription, placement: str, cluster: ClusterShape) -> list[Stage]:
    workers = {"fused": FusedGenerationWorker} if placement == "fused" else SPLIT_WORKERS
    shares = SHARES[placement]
    if placement == "split":  # the GPU split is the family's: T5 and Qwen3 need more of a GPU than CLIP
        shares = {name: replace(share, gpu=model.family.split_gpu_shares[name]) for name, share in shares.items()}
    overrides, vae_batch = vae_micro_batch(config.stages, "vae_decoder", shares)
    options = stage_options(shares, cluster, config.batch_size, overrides, placement)
    stages = []
    for name, worker in workers.items():
        kwargs: dict[str, Any] = {"model": model.location, "dtype": config.dtype}
        if worker in (TextEncoderWorker, FusedGenerationWorker):
            kwargs["max_sequence_length"] = config.max_sequence_length
        if worker in (TextEncoderWorker, DenoiserWorker, FusedGenerationWorker):
            kwargs["true_cfg_scale"] = config.true_cfg_scale
        if worker in (DenoiserWorker, FusedGenerationWorker):
            kwargs["scheduler"] = config.scheduler
            kwargs["compile_backend"] = DEFAULT_COMPILE_BACKEND if config.compile else None
            kwargs["attention_backend"] = config.attention_backend
        if worker in (VaeDecoderWorker, FusedGenerationWorker):
            kwargs["vae_batch_size"] = vae_batch
        if worker in (TextEncoderWorker, DenoiserWorker, FusedGenerationWorker):
            kwargs.update(lora_files=LoraFiles(), max_loras=config.max_loras_per_actor)
        stages.append(Stage(name=name, worker=worker, options=options[name], family=model.family, constructor_kwargs=kwargs))
    resolve_stages(stages, model.family, config.dtype)
    for stage in stages:
        if "attention_backend" in stage.constructor_kwargs:  # the denoiser's stage: its device is now known
            check_attention_device(config.attention_backend, stage.constructor_kwargs["device"])
    return stages


# -- the plan -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GenerationPlan:
    """Everything checked and known before Ray starts: a bad input fails here, fast (``PlannedJob``)."""

    label = "generate"
    log_stats_warnings = False
    config: GenerateConfig
    model: ModelDescription
    output: RunOutput
    identity: dict
    fragments: list[io.ParquetFragment]
    columns: list[str]
    input_files: list[dict]
    resume: ResumePlan
    listing: Listing | None = None  # the output as planned (``PlannedJob``); transient errors reopened leave it
    # an input with ids that the listing does not show unchanged and wholly done: rows matched by id (``before_run``)
    by_id: bool = False
    ids: IdLookup | None = None
    loras: bool = False  # rows carry LoRA files: the manifest records them, run.json the set used
    init_images: bool = False  # rows may start from a source image: the manifest records it, its sha256 and strength

    @property
    def input_rows(self) -> int:
        return sum(fragment.num_rows for fragment in self.fragments)

    @property
    def rows_done_before(self) -> int:
        return self.ids.done_rows if self.ids else self.resume.committed_rows

    @property
    def rows_to_read(self) -> int:
        return max(0, self.input_rows - self.rows_done_before)

    @property
    def finished(self) -> bool:
        return self.resume.finished

    def before_run(self) -> None:
        """By id: which input rows the output holds, found by tasks. By position: nothing (the output's listing says)."""
        if self.by_id:
            results, errors = self.output.spans(self.listing)
            self.ids = look_up_ids(self.fragments, results + errors, "id")

    def placement(self, cluster: ClusterShape) -> str:
        return resolve_placement(self.config.placement, cluster)

    def model_stages(self, placement: str, cluster: ClusterShape) -> list[Stage]:
        stages = build_model_stages(self.config, self.model, placement, cluster)
        settle_precision(self.identity, stage_precision(stages, ROLES), self.output.uri)
        return stages

    def stage_input_columns(self) -> set[str]:
        return set(PROMPT_ROW_COLUMNS) | set(self.model.family.conditioning_columns)

    def row_work(self) -> tuple[int, int]:
        defaults = prompt_defaults(self.config, self.model)
        return defaults.height * defaults.width, defaults.steps

    def dataset(self, stages: list[Stage], block_rows: int) -> ray.data.Dataset:
        return _build_dataset(self, stages, block_rows)

    def record_fields(self) -> dict:
        return {"input_files": self.input_files}

    def final_fields(self) -> dict:
        return {"loras": loras_used(self.output)} if self.loras else {}

    def final_counts(self, totals: RunTotals | None, listing: Listing | None) -> tuple[dict, Listing]:
        listing = self.output.listing() if listing is None else listing
        ok_rows, error_rows = self.output.counts(listing)
        return {"input_rows": self.input_rows, "ok_rows": ok_rows, "error_rows": error_rows,
                "generated_this_run": totals.ok_rows if totals else 0, "accounted_before_this_run": self.rows_done_before}, listing

    def error_reasons(self, summary: OutputSummary) -> dict[str, int]:
        return summary.error_reasons()

    def latent_stats_text(self) -> tuple[str, str]:
        return LATENT_STATS_OVER, "the generated latents suggest"

    @property
    def scheduler_label(self) -> str:
        return scheduler_label(self.config.scheduler, {"_class_name": self.model.scheduler_class})


def plan_generation(config: GenerateConfig) -> GenerationPlan:
    # 1. the input, the model and the output, before any model loads
    schema, fragments = io.parquet_fragments(config.prompts)
    check_prompt_schema(schema, config.prompts)
    model = describe_model(config.model)
    config = config.with_model_defaults(model)
    loras = uses_loras(schema.names, prompt_defaults(config, model))
    if loras:
        check_lora_support(model.family, config.placement)
    init_images = uses_init_images(schema.names)
    if init_images:
        check_init_image_support(model.family, config.placement)
    output = RunOutput(config.output, "manifest")
    identity = {
        **config.output_identity(), "model": model.location.uri, "model_fingerprint": model.location.fingerprint,
        "family": model.family.name,
    }
    if loras:  # the manifest has LoRA columns: an output without them takes no such rows (one schema per output)
        identity["lora_columns"] = True
    if init_images:  # likewise for the source image columns; the run's strength is then one of its defaults
        identity.update(init_image_columns=True, strength=config.strength)
    carry_precision(identity, output.uri, config.overwrite)
    if loras and not config.overwrite:  # a row's LoRA is its file's content: a changed file is refused
        check_loras_unchanged(previous_loras(output), output.uri)
    previous = output.prepare(identity, config.overwrite)
    # 2. what earlier runs committed, from the output's listing. An input with ids may be rewritten,
    # reordered or grown in place: its rows are matched by id, by tasks, once Ray is connected
    # (``before_run``), unless the listing alone shows an unchanged input wholly done. An input
    # without ids is matched by position, which its files must keep. Rows of transient errors are
    # not done: the run deletes their parts before it starts (``run_job``) and retries them.
    input_files, recorded = input_versions(fragments), (previous or {}).get("input_files")
    if "id" not in schema.names:
        check_input_unchanged(recorded, input_files, fragments)
    listing = output.listing()
    results, errors = output.spans(listing)
    errors = [span for span in errors if not span.transient]
    resume = plan_resume(fragments, results + errors)
    by_id = "id" in schema.names and bool(results or errors) and (input_change(recorded, input_files, fragments) is not None or not resume.finished)
    return GenerationPlan(
        config=config, model=model, output=output, identity=identity, fragments=fragments, input_files=input_files,
        columns=["prompt", *[c for c in (*PROMPT_OPTIONAL_COLUMNS, *model.family.conditioning_columns) if c in schema.names]],
        resume=ResumePlan(pending=[PendingFragment(fragment, ()) for fragment in fragments], committed_rows=0) if by_id else resume,
        listing=listing, by_id=by_id, loras=loras, init_images=init_images,
    )


def run_generation(config: GenerateConfig | GenerationPlan) -> dict:
    """Run one generation job on the connected Ray cluster; return its run record (run.json)."""
    return run_job(config if isinstance(config, GenerationPlan) else plan_generation(config))


def prompt_defaults(config: GenerationOptions, model: ModelDescription, fragments: list[io.ParquetFragment] = ()) -> PromptDefaults:
    """The run's defaults for its rows; ``fragments``: the job's input, against whose files rows' relative paths resolve."""
    return PromptDefaults(
        negative_prompt=config.negative_prompt, steps=config.steps, guidance=config.guidance,
        height=config.height or model.shape.default_height, width=config.width or model.shape.default_width,
        seed=config.seed, max_image_size=config.max_image_size, size_multiple=model.shape.size_multiple,
        lora=tuple(config.lora), lora_scale=tuple(config.lora_scale), max_loras=config.max_loras_per_actor,
        init_images=SourceSettings(strength=config.strength,
                                   file_starts=tuple(sorted((start, uri) for uri, start in io.file_starts(list(fragments)).items()))),
    )


def _build_dataset(plan: GenerationPlan, stages: list[Stage], block_rows: int) -> ray.data.Dataset:
    config = plan.config
    # 4. one commit task per block: images, then its manifest and errors parts
    return generated_rows(plan, stages, block_rows).map_batches(
        commit_generated, batch_size=None, num_cpus=TASK_CPUS,
        fn_kwargs={"output": plan.output, "image_format": config.image_format, "quality": config.image_quality,
                   "scheduler": plan.scheduler_label, "save_latents": config.save_latents, "loras": plan.loras,
                   "init_images": plan.init_images},
    )


def generated_rows(plan: GenerationPlan, stages: list[Stage], block_rows: int) -> ray.data.Dataset:
    """The job's pipeline up to the last model stage: its pending rows, then ``generation_rows``."""
    # 1. repeated ids, found by tasks (the driver receives only the repeats)
    repeated = find_repeated_ids(plan.fragments, "id") if "id" in plan.columns else RepeatedIds.none()
    # batches form identically on every run, so reruns produce byte-identical images
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # a LoRA job's rows are read several blocks at a time, to be grouped by adapter set (``normalize_prompts``)
    read_rows = block_rows * (LORA_GROUPING_BLOCKS if plan.loras else 1)
    # 2. the row groups left to do; each task drops the rows committed there already (by id, or by position)
    if plan.ids is not None:
        dataset = ray.data.from_arrow_refs(plan.ids.items).map_batches(
            read_rows_not_done, batch_format="pyarrow", batch_size=1, num_cpus=TASK_CPUS,
            fn_kwargs={"columns": plan.columns, "rows_per_block": read_rows},
        )
    else:
        items = [pending.to_item() for pending in plan.resume.pending]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        dataset = dataset.map_batches(
            read_pending_rows, batch_size=1, num_cpus=TASK_CPUS, fn_kwargs={"columns": plan.columns, "rows_per_block": read_rows},
        )
    defaults = prompt_defaults(plan.config, plan.model, plan.fragments)
    return generation_rows(dataset, stages, defaults=defaults, block_rows=block_rows, repeated=repeated)


def generation_rows(
    dataset: ray.data.Dataset, stages: list[Stage], *, defaults: PromptDefaults, block_rows: int, repeated: RepeatedIds | None = None,
) -> ray.data.Dataset:
    """Prompt rows -> generated rows (``latents``, ``image`` pixels, failure columns): the one wiring of the
    model stages, shared by the job (``generated_rows``) and the generation processor.

    Every row goes through with its own columns; a bad row is marked failed and the models skip it.
    ``repeated``: the job's (its ids name its outputs, see ``normalize_prompts``).
    """
    # 1. validate and resolve each row's settings (CPU task per block)
    dataset = dataset.map_batches(
        normalize_prompts, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
        fn_kwargs={"defaults": defaults, "repeated": repeated},
    )
    # 2. A task's results leave it as one block, whatever its UDF yields: without this cut a
    # row group of prompts would reach a single actor as one block, and its images would
    # all appear when that block is done. Invalid rows ride along: the models skip them.
    dataset = cut_into_blocks(dataset, block_rows)
    # 3. the model stages
    for stage in stages:
        dataset = stage.apply(dataset)
    return dataset
