"""Generation as a Ray Data processor: ``processor(ds)`` appends latentray's model stages to a user's dataset.

``build_generation_processor(**options)`` takes ``latentray generate``'s options (less the
job's: input, output, overwrite, the job text cache) and returns a ``GenerationProcessor``;
``processor(ds)`` returns a new lazy dataset: the rows of ``ds``, every column kept, through
the job's own wiring (``generate.generation_rows``: validate, cut into blocks, model stages),
then one CPU task per block that adds the public columns (``GENERATED_COLUMNS``). The
processor reads nothing, resumes nothing and commits nothing: the job (``generate.py``)
adds those around the same wiring. ``generate_images`` is the one-call form for a notebook.
"""

from __future__ import annotations

import io as bytes_io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipelines.generation.images import encode_generated
from pipelines.generation.init_images import manifest_sources
from pipelines.generation.prompt_rows import PROMPT_ROW_COLUMNS
from pipelines.runtime.config import GenerationOptions, options_from
from pipelines.runtime.model_source import ModelDescription, describe_model
from pipelines.runtime.placement import TASK_CPUS, check_stage_names, vae_micro_batch
from pipelines.runtime.row_ids import position_id
from pipelines.runtime.schemas import INIT_IMAGE_MANIFEST_FIELDS, LATENT_FIELDS, LORA_FIELDS, MANIFEST_FIELDS
from workers.runtime.loras import check_lora_support, json_lists
from workers.runtime.columns import BUSY_COLUMN_PREFIX, COUNT_COLUMN_PREFIX, FAILED_CAUSE_COLUMN, FAILED_CODE_COLUMN, FAILED_REASON_COLUMN, FAILED_STAGE_COLUMN

if TYPE_CHECKING:  # ray and PIL load when a processor is applied, not when ``pipelines`` is imported
    import ray.data
    from PIL import Image

# what the processor adds to each row, with its Arrow type (the manifest's, for the columns they share)
_TYPES = {field.name: field.type for field in (*MANIFEST_FIELDS, *LATENT_FIELDS)}
GENERATED_COLUMNS = {
    "image": pa.binary(),  # the image file's bytes (image_format); null when the row failed
    "error": pa.string(),  # null when the row succeeded, else the reason the job writes to errors/
    "latent_mean": _TYPES["latent_mean"],  # per channel of the final latent (null when the row failed)
    "latent_std": _TYPES["latent_std"],
}
SAVED_LATENT_COLUMNS = {"latent": _TYPES["latent"], "latent_shape": _TYPES["latent_shape"]}  # with save_latents
# what only the job's commit reads: the processor's rows leave without them
_JOB_ONLY = ("latents", "error_stage", "error_reason", "error_cause", "latent_count", "latent_min", "latent_max",
             FAILED_STAGE_COLUMN, FAILED_CODE_COLUMN, FAILED_REASON_COLUMN, FAILED_CAUSE_COLUMN)


@dataclass(frozen=True)
class GenerationProcessor:
    """``processor(ds)``: ``ds`` with generated images (see the module). Built by ``build_generation_processor``."""

    options: GenerationOptions  # with the model's defaults filled in
    model: ModelDescription

    def __call__(self, dataset: "ray.data.Dataset") -> "ray.data.Dataset":
        from pipelines.generation.generate import build_model_stages, generation_rows, prompt_defaults, resolve_placement
        from pipelines.runtime.placement import ClusterShape
        from pipelines.runtime.stages import check_wiring

        # 1. stages for the cluster the dataset runs on (no model loads until it runs)
        cluster = ClusterShape.current()
        stages = build_model_stages(self.options, self.model, resolve_placement(self.options.placement, cluster), cluster)
        check_wiring(stages, set(PROMPT_ROW_COLUMNS) | set(self.model.family.conditioning_columns))
        # 2. the job's wiring; blocks of one model batch: the row count is unknown here, and a
        # block that small still holds seconds of model work against milliseconds of overhead
        block_rows = max(stage.options.batch_size for stage in stages)
        rows = generation_rows(dataset, stages, defaults=prompt_defaults(self.options, self.model), block_rows=block_rows)
        # 3. the public columns, one CPU task per block
        return rows.map_batches(
            finish_generated_rows, batch_size=None, num_cpus=TASK_CPUS,
            fn_kwargs={"image_format": self.options.image_format, "quality": self.options.image_quality,
                       "save_latents": self.options.save_latents, "channels": self.model.shape.latent_channels},
        )


def build_generation_processor(config: GenerationOptions | None = None, **options: Any) -> GenerationProcessor:
    """A processor for ``latentray generate``'s options, as keyword arguments named like its flags
    (``model``, ``steps``, ``guidance``, ``stages={"fused": {"concurrency": 2}}``, ...) or one config object.

    Starts no Ray and loads no weights: it reads the model's configs (a built-in model is built
    into the model cache once). A bad option raises ``ValueError`` naming it, here.
    """
    from pipelines.generation.generate import SHARES, resolve_placement

    # 1. the options, checked alone and then against the model's family
    chosen = options_from(GenerationOptions, config, options)
    model = describe_model(chosen.model)
    chosen = chosen.with_model_defaults(model)
    if chosen.uses_loras:  # a dataset's 'lora' column is checked when its rows reach the workers
        check_lora_support(model.family, chosen.placement)
    # 2. stage settings name stages of the placement (their resources need the cluster: applied later)
    placement = resolve_placement(chosen.placement, cluster=None)
    overrides, _ = vae_micro_batch(chosen.stages, "vae_decoder", SHARES[placement])
    check_stage_names(overrides, SHARES[placement], placement)
    return GenerationProcessor(chosen, model)


def finish_generated_rows(batch: dict[str, np.ndarray], *, image_format: str, quality: int, save_latents: bool, channels: int) -> pa.Table:
    """Ray Data task: generated rows -> the processor's rows: the input's columns, the resolved settings,
    ``GENERATED_COLUMNS`` (and ``SAVED_LATENT_COLUMNS``); without the workers' internal columns."""
    from ray.data.block import BlockAccessor

    # 1. image bytes, latent statistics, and why a row failed
    batch = encode_generated(batch, image_format, quality, channels)
    failed = batch["error_reason"] != ""
    added = {
        "image": list(batch.pop("image")),
        "error": [reason or None for reason in batch["error_reason"]],
        "latent_mean": [None if fail else values for values, fail in zip(batch["latent_mean"].astype(np.float32), failed)],
        "latent_std": [None if fail else values for values, fail in zip(batch["latent_std"].astype(np.float32), failed)],
    }
    types = dict(GENERATED_COLUMNS)
    if "lora" in batch:  # LoRA files, their content and weights, typed as the manifest's (a block may have none)
        for field in LORA_FIELDS:
            added[field.name] = json_lists(batch.pop(field.name))
            types[field.name] = field.type
    if "init_image" in batch:  # each row's source, its content and strength, typed as the manifest's
        added.update(manifest_sources(batch))
        for field in INIT_IMAGE_MANIFEST_FIELDS:
            batch.pop(field.name)
            types[field.name] = field.type
    if save_latents:  # flattened float32 and its shape, as the manifest stores them
        added["latent"] = [None if fail else np.asarray(latent, np.float32).ravel() for latent, fail in zip(batch["latents"], failed)]
        added["latent_shape"] = [None if fail else list(np.shape(latent)) for latent, fail in zip(batch["latents"], failed)]
        types.update(SAVED_LATENT_COLUMNS)
    # 2. the rest as Ray Data converts any batch; then the added columns with fixed types, so that a
    # block where every row failed (or none did) has the same schema as the others
    for column in [*_JOB_ONLY, "latent_mean", "latent_std", *[c for c in batch if c.startswith((BUSY_COLUMN_PREFIX, COUNT_COLUMN_PREFIX))]]:
        batch.pop(column, None)
    table = BlockAccessor.batch_to_block(batch)
    for column, kind in types.items():
        table = table.append_column(pa.field(column, kind), pa.array(added[column], kind))
    return table


def generate_images(prompts: list[str], *, seeds: list[int] | None = None, negative_prompts: list[str] | None = None,
                    **options: Any) -> list["Image.Image"]:
    """One image per prompt, in the order of ``prompts``, equal to what ``latentray generate`` draws for
    a prompt table of these rows (row ``i`` has id ``position_id(i)``, so a row without a seed derives
    the CLI's). ``options``: ``build_generation_processor``'s. Runs on the Ray this process joined, else
    on a new local one (as ``latentray`` without ``--address``). A row that fails raises ``ValueError``.
    """
    import ray
    import ray.data
    from PIL import Image

    # 1. the processor (bad options fail here) and the rows
    processor = build_generation_processor(**options)
    for name, values in (("seeds", seeds), ("negative_prompts", negative_prompts)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{name}: {len(values)} values for {len(prompts)} prompts")
    rows = [{"id": position_id(index), "prompt": prompt} for index, prompt in enumerate(prompts)]
    for column, values in (("seed", seeds), ("negative_prompt", negative_prompts)):
        for row, value in zip(rows, values or ()):
            row[column] = value
    if not rows:
        return []
    # 2. Ray: the caller's, else a new local one
    if not ray.is_initialized():
        from pipelines.runtime.local_ray import start_local_ray

        start_local_ray()
    # 3. generate; the rows come back in any order: put them in the prompts' order by id
    results = processor(ray.data.from_items(rows, override_num_blocks=1)).select_columns(["id", "image", "error"]).take_all()
    by_id = {row["id"]: row for row in results}
    failures = [f"prompt {index}: {by_id[row['id']]['error']}" for index, row in enumerate(rows) if by_id[row["id"]]["error"]]
    if failures:
        raise ValueError("; ".join(failures))
    images = [Image.open(bytes_io.BytesIO(by_id[row["id"]]["image"])) for row in rows]
    for image in images:
        image.load()  # decoded now: the caller gets images, not open files
    return images
