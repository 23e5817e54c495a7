"""Encoding as a Ray Data processor: ``processor(ds)`` appends latentray's encoders to a user's dataset.

``build_encoding_processor(**options)`` takes ``latentray encode``'s options (less the job's:
input, output, overwrite, rows per part, the job text cache) and returns an
``EncodingProcessor``; ``processor(ds)`` returns a new lazy dataset: the rows of ``ds``, every
column kept, through the job's own wiring (``encode.encoding_rows``: cut into blocks, decode
and crop, encoders), then one CPU task per block that adds the latent columns of ``latents/``
parts and ``error``. It does not read, skip cached rows, commit, or record: those are the job's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipelines.encoding.encode_rows import CAPTION_COLUMNS, PREPARED_COLUMNS, RowSettings, SourceColumns
from pipelines.encoding.image_decode import Preprocessing
from pipelines.encoding.latent_output import pairs_column, tensor_column
from pipelines.runtime.config import EncodingOptions, options_from
from pipelines.runtime.model_source import ModelDescription, describe_model
from pipelines.runtime.placement import TASK_CPUS, check_stage_names, vae_micro_batch
from pipelines.runtime.schemas import SIZE_TYPE, tensor_type
from workers.runtime.columns import BUSY_COLUMN_PREFIX, COUNT_COLUMN_PREFIX, FAILED_CODE_COLUMN, FAILED_REASON_COLUMN, FAILED_STAGE_COLUMN, failed_rows

if TYPE_CHECKING:  # ray loads when a processor is applied
    import ray.data

# the dimensions of each caption embedding a family may return (``EMBEDDING_COLUMNS``)
EMBEDDING_DIMENSIONS = {"prompt_embeds": 2, "pooled_prompt_embeds": 1}
PAIR_COLUMNS = ("original_size", "crop_top_left", "target_size")


@dataclass(frozen=True)
class EncodingProcessor:
    """``processor(ds)``: ``ds`` with latents (see the module). Built by ``build_encoding_processor``."""

    options: EncodingOptions
    model: ModelDescription
    preprocessing: Preprocessing

    def __call__(self, dataset: "ray.data.Dataset") -> "ray.data.Dataset":
        from pipelines.encoding.encode import build_model_stages, encoding_rows, resolve_placement
        from pipelines.runtime.placement import ClusterShape
        from pipelines.runtime.stages import check_wiring

        # 1. stages for the cluster the dataset runs on (no model loads until it runs)
        options = self.options
        cluster = ClusterShape.current()
        stages = build_model_stages(options, self.model, resolve_placement(options.placement, options.text_embeddings), cluster)
        check_wiring(stages, set(PREPARED_COLUMNS) | (set(CAPTION_COLUMNS) if options.caption_column else set()))
        # 2. the job's wiring, rows as they are (no positions, no cache: nothing is skipped); blocks of one
        # model batch, as the generation processor's
        settings = RowSettings(
            columns=SourceColumns(image=None if options.path_column else options.image_column, path=options.path_column,
                                  caption=options.caption_column, id=options.id_column or "id"),
            preprocessing=self.preprocessing, seed=options.seed, encoding_key="", run=0, file_starts=(),
        )
        block_rows = max(stage.options.batch_size for stage in stages)
        rows = encoding_rows(dataset, stages, settings=settings, block_rows=block_rows, errors_uri=None)
        # 3. the latent columns, one CPU task per block
        return rows.map_batches(
            finish_encoded_rows, batch_size=None, num_cpus=TASK_CPUS,
            fn_kwargs={"dtype": options.latent_dtype, "flip": options.flip, "caption_column": options.caption_column,
                       "embeddings": self.model.family.embedding_columns if options.text_embeddings else ()},
        )


def build_encoding_processor(config: EncodingOptions | None = None, **options: Any) -> EncodingProcessor:
    """A processor for ``latentray encode``'s options, as keyword arguments named like its flags
    (``model``, ``resolution``, ``buckets``, ``flip``, ``caption_column``, ``text_embeddings``, ...) or one
    config object. Starts no Ray and loads no weights; a bad option raises ``ValueError`` naming it, here."""
    from pipelines.encoding.encode import SHARES, VAE_ONLY, checked_preprocessing, resolve_placement

    # 1. the options, checked alone and then against the model's family
    chosen = options_from(EncodingOptions, config, options)
    model = describe_model(chosen.model)
    _, preprocessing = checked_preprocessing(chosen, model)
    # 2. stage settings name stages of the placement (their resources need the cluster: applied later)
    placement = resolve_placement(chosen.placement, chosen.text_embeddings)
    shares = VAE_ONLY if placement == "vae_only" else SHARES[placement]
    overrides, _ = vae_micro_batch(chosen.stages, "vae_encoder", shares)
    check_stage_names(overrides, shares, placement)
    return EncodingProcessor(chosen, model, preprocessing)


def finish_encoded_rows(batch: dict[str, np.ndarray], *, dtype: str, flip: bool, caption_column: str | None,
                        embeddings: tuple[str, ...]) -> pa.Table:
    """Ray Data task: encoded rows -> the processor's rows: the input's columns, the latent columns of
    ``latents/`` parts (null where the row failed; tensors as variable-size nested lists of ``dtype``, so that
    every block has one schema) and ``error``; without the workers' internal columns."""
    from ray.data.block import BlockAccessor

    # 1. the rows with a latent; values beyond float16 become infinite: those rows fail as the job's do
    failed = failed_rows(batch)
    with np.errstate(over="ignore"):
        latents = [np.asarray(latent).astype(dtype) for latent in batch["latent"]]
        flipped = [np.asarray(latent).astype(dtype) for latent in batch["latent_flipped"]] if flip else None
    reasons = [str(reason) if fail else None for reason, fail in zip(batch.get(FAILED_REASON_COLUMN, [""] * len(failed)), failed)]
    for row, latent in enumerate(latents):
        if reasons[row] is None and not (np.isfinite(latent).all() and (flipped is None or np.isfinite(flipped[row]).all())):
            reasons[row] = "the latent has NaN or infinite values" + ("; values beyond float16's range (65504) overflow" if dtype == "float16" else "")
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    # kept row -> its index among the kept rows; a failed row -> null (``take`` of a null index is null)
    slots = pa.array(np.cumsum(keep) - 1, pa.int64(), mask=~keep)

    def scattered(column: pa.Array) -> pa.Array:
        return column.take(slots)

    def tensors(values: list[np.ndarray], dimensions: int) -> pa.Array:
        kind = tensor_type(None if dimensions == 3 else (None,) * dimensions, dtype, dimensions=dimensions)
        kept = [value for value, ok in zip(values, keep) if ok]
        return scattered(tensor_column(kept, kind)) if kept else pa.nulls(len(keep), kind)

    # 2. the latent columns, as latents/ parts name them
    added = {"latent": tensors(latents, 3),
             "latent_shape": scattered(pairs_column([latent.shape for latent, ok in zip(latents, keep) if ok] or np.zeros((0, 3)), 3))}
    if flip:
        added["latent_flipped"] = tensors(flipped, 3)
    for name in PAIR_COLUMNS:
        added[name] = scattered(pairs_column(np.asarray(batch[name])[keep].reshape(-1, 2), 2)).cast(SIZE_TYPE)
    for name in embeddings:
        added[name] = tensors([np.asarray(value) for value in batch[name]], EMBEDDING_DIMENSIONS[name])
    if embeddings:
        added["caption_truncated"] = pa.array([bool(value) if ok else None for value, ok in zip(batch["caption_truncated"], keep)], pa.bool_())
    added["content_hash"] = pa.array([str(value) or None for value in batch["content_hash"]], pa.string())
    added["seed"] = pa.array([int(value) if ok else None for value, ok in zip(batch["seed"], keep)], pa.int64())
    added["error"] = pa.array(reasons, pa.string())

    # 3. the input's columns as they came (a caption column named "caption" gets its nulls back)
    if caption_column == "caption":
        batch["caption"] = np.array([None if null else text for text, null in zip(batch["caption"], batch["caption_null"])], dtype=object)
    internal = {"latent", "latent_flipped", "caption_truncated", "caption_null", FAILED_STAGE_COLUMN, FAILED_CODE_COLUMN,
                FAILED_REASON_COLUMN, *added, *embeddings, *([] if caption_column == "caption" else ["caption"] if caption_column else [])}
    for column in [c for c in batch if c in internal or c.startswith((BUSY_COLUMN_PREFIX, COUNT_COLUMN_PREFIX))]:
        batch.pop(column)
    table = BlockAccessor.batch_to_block(batch)
    for column, values in added.items():
        table = table.append_column(column, values)
    return table
