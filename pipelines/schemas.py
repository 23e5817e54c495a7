"""Every Parquet table latentray reads or writes, in one place."""

from __future__ import annotations

import pyarrow as pa

# -- prompt table (input of `latentray generate`) -------------------------------------------------

PROMPT_REQUIRED_COLUMNS = {"prompt": "text to draw"}
# optional per-row overrides of the run's defaults, with the arrow types they may have
PROMPT_OPTIONAL_COLUMNS = {
    "id": "unique row id (string or integer); default: the row's position in the input",
    "negative_prompt": "text to steer away from",
    "seed": "integer seed; default: derived from the run's --seed and the row id",
    "num_inference_steps": "denoising steps",
    "guidance_scale": "classifier-free guidance scale",
    "height": "image height in pixels, a multiple of 8",
    "width": "image width in pixels, a multiple of 8",
}
_STRING_COLUMNS = {"prompt", "negative_prompt"}
_INTEGER_COLUMNS = {"seed", "num_inference_steps", "height", "width"}
_NUMBER_COLUMNS = {"guidance_scale"}


def _is_string(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type)


def check_prompt_schema(schema: pa.Schema, where: str) -> None:
    """Refuse a prompt table whose columns are missing or of the wrong type, naming the column."""
    if "prompt" not in schema.names:
        raise ValueError(f"{where}: no 'prompt' column (columns are: {', '.join(schema.names) or 'none'})")
    for field in schema:
        kind = field.type
        if field.name in _STRING_COLUMNS and not (_is_string(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{where}: column {field.name!r} must hold strings, not {kind}")
        if field.name in _INTEGER_COLUMNS and not (pa.types.is_integer(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{where}: column {field.name!r} must hold integers, not {kind}")
        if field.name in _NUMBER_COLUMNS and not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{where}: column {field.name!r} must hold numbers, not {kind}")
        if field.name == "id" and not (_is_string(kind) or pa.types.is_integer(kind)):
            raise ValueError(f"{where}: column 'id' must hold strings or integers, not {kind}")


# -- generation outputs ---------------------------------------------------------------------------

MANIFEST_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("num_inference_steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("scheduler", pa.string()),
    pa.field("image_path", pa.string()),  # relative to the run's output
    pa.field("prompt_truncated", pa.bool_()),
    pa.field("latent_mean", pa.list_(pa.float32())),  # per channel of the final latent
    pa.field("latent_std", pa.list_(pa.float32())),
]


# With --save-latents: the final latent, flattened, and its (channels, height, width).
# Not a fixed-shape tensor column: rows of one run may have different sizes, and every
# part of the manifest must share one schema to read as one table.
LATENT_FIELDS = [pa.field("latent", pa.list_(pa.float32())), pa.field("latent_shape", pa.list_(pa.int32()))]


def manifest_schema(save_latents: bool) -> pa.Schema:
    return pa.schema(MANIFEST_FIELDS + (LATENT_FIELDS if save_latents else []))


ERRORS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("row", pa.int64()),  # position of the row in the input (files in sorted order)
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
])
