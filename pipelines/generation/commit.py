"""The write stage of generation: images, then the block's manifest and errors parts, then a summary.

``commit_generated`` runs as a CPU task in Ray Data after the VAE decoder, one call per
block, and imports no model code. It writes each row's image, then the block's rows that
failed (non-finite latent, image write) as ``errors/`` parts (one per cause) and the others as one
``manifest/`` part carrying the exact partial statistics of their latents in its footer.
Parts are named from the rows' input positions and ids (``io.part_name``): a retried
block replaces its own parts. The driver receives one summary row per block.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.generation.images import write_generated_images
from pipelines.generation.init_images import manifest_sources
from pipelines.runtime.job import part_summary, pop_busy_seconds
from pipelines.runtime.outputs import RunOutput
from pipelines.runtime.schemas import ERRORS_SCHEMA, manifest_schema
from pipelines.runtime.stats import stats_of_rows
from workers.runtime.columns import pop_counts
from workers.runtime.loras import json_lists


def commit_generated(
    batch: dict[str, np.ndarray], *, output: RunOutput, image_format: str, quality: int, scheduler: str, save_latents: bool,
    loras: bool = False, init_images: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data task: a block of generated rows -> images, one manifest part, one errors part -> a summary row."""
    busy, counts = pop_busy_seconds(batch), pop_counts(batch)
    # 1. images first: a manifest row never points to an image that is not there
    batch = write_generated_images(batch, output.uri, image_format, quality, keep_latents=save_latents)

    # 2. the rows that failed, then the others with the exact statistics of their latents
    failed = batch["error_reason"] != ""
    ok = {column: values[~failed] for column, values in batch.items()}
    results, stats = None, None
    if len(ok["id"]):
        results = manifest_table(ok, scheduler, save_latents, loras, init_images)
        stats = stats_of_rows(ok["latent_count"], ok["latent_mean"], ok["latent_std"], ok["latent_min"], ok["latent_max"])
    parts = output.commit(results, errors_table(batch, failed), stats)
    return part_summary(ok_rows=len(ok["id"]), error_rows=int(failed.sum()), busy=busy, counts=counts, parts=parts)


def errors_table(batch: dict[str, np.ndarray], failed: np.ndarray) -> pa.Table | None:
    if not failed.any():
        return None
    return pa.Table.from_pydict({
        "id": [str(v) for v in batch["id"][failed]], "row": batch["row"][failed].astype(np.int64),
        "stage": list(batch["error_stage"][failed]), "reason": list(batch["error_reason"][failed]),
        "cause": list(batch["error_cause"][failed]),
    }, schema=ERRORS_SCHEMA)


def manifest_table(rows: dict[str, np.ndarray], scheduler: str, save_latents: bool, loras: bool = False,
                   init_images: bool = False) -> pa.Table:
    count = len(rows["id"])
    columns = {
        "id": [str(v) for v in rows["id"]], "row": rows["row"].astype(np.int64), "prompt": list(rows["prompt"]),
        "negative_prompt": list(rows["negative_prompt"]), "seed": rows["seed"].astype(np.int64),
        "num_inference_steps": rows["num_inference_steps"].astype(np.int32), "guidance_scale": rows["guidance_scale"].astype(np.float64),
        "height": rows["height"].astype(np.int32), "width": rows["width"].astype(np.int32), "scheduler": [scheduler] * count,
        "image_path": list(rows["image_path"]), "prompt_truncated": rows["prompt_truncated"].astype(bool),
        "latent_mean": list(rows["latent_mean"].astype(np.float32)), "latent_std": list(rows["latent_std"].astype(np.float32)),
    }
    if save_latents:
        columns["latent"] = [np.asarray(latent, np.float32).ravel() for latent in rows["latents"]]
        columns["latent_shape"] = [list(np.shape(latent)) for latent in rows["latents"]]
    if loras:  # each row's files, their content and weights, in the row's order
        for column in ("lora", "lora_sha256", "lora_scale"):
            columns[column] = json_lists(rows[column])
    if init_images:  # each row's source, its content and strength (null: a text-to-image row)
        columns.update(manifest_sources(rows))
    schema = manifest_schema(save_latents, loras, init_images)
    return pa.Table.from_arrays([pa.array(columns[field.name], field.type) for field in schema], schema=schema)
