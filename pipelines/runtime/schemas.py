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
    "width": "image width in pixels, a multiple of the model's size multiple (8 for SD/SDXL, 16 for SD3/FLUX/Z-Image/Qwen-Image)",
    # SDXL micro-conditioning, as StableDiffusionXLPipeline's arguments of the same meaning
    "original_size": "SDXL: [height, width] the image is conditioned as coming from (default: its size)",
    "crop_top_left": "SDXL: [top, left] crop it is conditioned on (default: [0, 0])",
    "target_size": "SDXL: [height, width] it is conditioned to look like (default: its size)",
    # per-row LoRA (``workers.runtime.loras``): rows are denoised with these adapters applied
    "lora": "URI of a LoRA .safetensors file (any fsspec location), or a list of them; default: the run's --lora",
    "lora_scale": "weight of each LoRA: a number (every file) or a list matching 'lora'; default: the run's --lora-scale, else 1",
    # image-to-image (``pipelines.generation.init_images``): rows start from a source image
    "init_image": "source image: bytes, or a path or URI (relative: to the prompt table's folder); null: text-to-image",
    "strength": "how far from the source image, 0 to 1 (diffusers' strength); default: the run's --strength (0.8)",
}
LORA_COLUMNS = ("lora", "lora_scale")
PAIR_COLUMNS = ("original_size", "crop_top_left", "target_size")
_STRING_COLUMNS = {"prompt", "negative_prompt"}
_INTEGER_COLUMNS = {"seed", "num_inference_steps", "height", "width"}
_NUMBER_COLUMNS = {"guidance_scale"}


def _is_string(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type)


def _is_binary(data_type: pa.DataType) -> bool:
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type) or pa.types.is_binary_view(data_type)


def _is_number(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type)


def _is_list_of(data_type: pa.DataType, is_value) -> bool:
    lists = pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type)
    return lists and (is_value(data_type.value_type) or pa.types.is_null(data_type.value_type))


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
        if field.name in PAIR_COLUMNS and not (
            (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)) and pa.types.is_integer(kind.value_type) or pa.types.is_null(kind)
        ):
            raise ValueError(f"{where}: column {field.name!r} must hold lists of two integers, not {kind}")
        if field.name == "lora" and not (_is_string(kind) or pa.types.is_null(kind) or _is_list_of(kind, _is_string)):
            raise ValueError(f"{where}: column 'lora' must hold URI strings or lists of them, not {kind}")
        if field.name == "lora_scale" and not (_is_number(kind) or pa.types.is_null(kind) or _is_list_of(kind, _is_number)):
            raise ValueError(f"{where}: column 'lora_scale' must hold numbers or lists of numbers, not {kind}")
        if field.name == "init_image" and not (_is_string(kind) or _is_binary(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{where}: column 'init_image' must hold image bytes or path strings, not {kind}")
        if field.name == "strength" and not (_is_number(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{where}: column 'strength' must hold numbers, not {kind}")
        if field.name == "id" and not (_is_string(kind) or pa.types.is_integer(kind)):
            raise ValueError(f"{where}: column 'id' must hold strings or integers, not {kind}")


# -- generation outputs ---------------------------------------------------------------------------

MANIFEST_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("row", pa.int64()),  # position of the row in the input (files in sorted order)
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


# Runs that use LoRAs (a 'lora' or 'lora_scale' column, or --lora): each row's files, their content
# and weights, in the row's order (empty lists for a row without LoRA)
LORA_FIELDS = [
    pa.field("lora", pa.list_(pa.string())),  # URIs as the row (or --lora) gave them
    pa.field("lora_sha256", pa.list_(pa.string())),  # sha256 of each file's bytes, as the actor loaded it
    pa.field("lora_scale", pa.list_(pa.float64())),
]


INIT_IMAGE_MANIFEST_FIELDS = [
    pa.field("init_image", pa.string()),  # the source: its URI, or "input row N" for bytes; null: a text-to-image row
    pa.field("init_image_sha256", pa.string()),  # sha256 of the source's bytes, as the row was generated from them
    pa.field("strength", pa.float64()),
]


def manifest_schema(save_latents: bool, loras: bool = False, init_images: bool = False) -> pa.Schema:
    return pa.schema(MANIFEST_FIELDS + (LORA_FIELDS if loras else []) + (INIT_IMAGE_MANIFEST_FIELDS if init_images else [])
                     + (LATENT_FIELDS if save_latents else []))


# Why a row is in errors/: its own fault, or something outside it. A rerun leaves the first kind
# and retries the second. Parts written before causes were recorded have no column: permanent.
PERMANENT, TRANSIENT = "permanent", "transient"
ERROR_CAUSES = {
    PERMANENT: "the row itself: a bad prompt, an undecodable or missing image, a repeated id, a size that does not fit even alone",
    TRANSIENT: "outside the row: a write or read of storage that failed after its retries; a rerun retries the row",
}

ERRORS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("row", pa.int64()),  # position of the row in the input (files in sorted order)
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("cause", pa.string()),  # one of ERROR_CAUSES
])


# -- image table (input of `latentray encode`) ----------------------------------------------------


def image_source_kind(data_type: pa.DataType) -> str | None:
    """How a column holds image bytes: "bytes" (binary), "struct" (HF datasets' {bytes, path}), or None."""
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type) or pa.types.is_binary_view(data_type):
        return "bytes"
    if pa.types.is_struct(data_type) and data_type.get_field_index("bytes") >= 0:
        inner = data_type.field("bytes").type
        if pa.types.is_binary(inner) or pa.types.is_large_binary(inner) or pa.types.is_binary_view(inner):
            return "struct"
    return None


def check_image_schema(
    schema: pa.Schema, where: str, *, image_column: str, path_column: str | None, caption_column: str | None, id_column: str | None,
) -> None:
    """Refuse an image table whose source, caption or id column is missing or of the wrong type, naming it.

    ``id_column`` None: the ``id`` column when there is one (else ids from positions);
    a named id column must exist.
    """
    columns = ", ".join(schema.names) or "none"
    if path_column is not None:
        if path_column not in schema.names:
            raise ValueError(f"{where}: no {path_column!r} column for --path-column (columns are: {columns})")
        if not _is_string(schema.field(path_column).type):
            raise ValueError(f"{where}: column {path_column!r} must hold path or URI strings, not {schema.field(path_column).type}")
    elif image_column not in schema.names:
        raise ValueError(
            f"{where}: no {image_column!r} column (columns are: {columns}); name the column of image bytes "
            "with --image-column, or a column of paths/URIs with --path-column"
        )
    elif image_source_kind(schema.field(image_column).type) is None:
        kind = schema.field(image_column).type
        hint = f"; if it holds paths or URIs, pass --path-column {image_column}" if _is_string(kind) else ""
        raise ValueError(f"{where}: column {image_column!r} must hold image bytes (binary, or a struct with a 'bytes' field), not {kind}{hint}")
    if caption_column is not None:
        if caption_column not in schema.names:
            raise ValueError(f"{where}: no {caption_column!r} column for --caption-column (columns are: {columns})")
        kind = schema.field(caption_column).type
        if not (_is_string(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{where}: column {caption_column!r} must hold strings, not {kind}")
    if id_column is not None and id_column not in schema.names:
        raise ValueError(f"{where}: no {id_column!r} column for --id-column (columns are: {columns})")
    id_name = id_column or "id"
    if id_name in schema.names:
        kind = schema.field(id_name).type
        if not (_is_string(kind) or pa.types.is_integer(kind)):
            raise ValueError(f"{where}: column {id_name!r} must hold strings or integers, not {kind}")


# -- latent dataset outputs -----------------------------------------------------------------------

LATENT_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}

# Tensor columns of latents/ parts beside ``latent``: text-encoder outputs. Each is written
# when the encoders return it (``prompt_embeds`` [tokens, dim]; SDXL/SD3/FLUX add
# ``pooled_prompt_embeds`` [dim]). Readers never use this list: they find tensor columns
# from the schema (see ``is_tensor_type``).
EMBEDDING_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds")

# Families whose encoder gives each caption its own number of tokens (``ModelFamily.
# fixed_length_embeddings`` False: Z-Image, Qwen-Image) store [tokens, dim] embeddings at
# that length, no padding: a variable-size list of fixed-size lists (``is_ragged_type``), and
# the tokens in ``<name>_length``. Readers that batch them pad to the batch's longest row
# and add ``<name>_mask`` (True at real tokens).
LENGTH_SUFFIX = "_length"
MASK_SUFFIX = "_mask"

# Footer key of a latents/ part: its rows' latent shapes as runs [[shape, first_row, rows], ...].
# Parts are written sorted by shape (one run per shape), so a reader plans bucket batches
# from footers alone, never reading a row to learn its shape.
SHAPE_RUNS_METADATA_KEY = b"latentray.latent_shape_runs"


def tensor_type(shape: tuple[int | None, ...] | None, dtype: str, dimensions: int | None = None) -> pa.DataType:
    """A tensor column's type: nested lists, one level per dimension.

    With ``shape`` (every row has it) the lists are fixed-size, so the type itself says
    [C, H, W]; ``None`` (aspect buckets: shapes differ between rows) gives variable-size
    nested lists of ``dimensions`` levels, each row still nested [C][H][W]. A ``None``
    inside ``shape`` makes that level alone variable-size: ``(None, 2560)`` is a caption
    embedding of its own number of tokens, each 2560 wide (``is_ragged_type``).

    Why not Arrow's ``fixed_shape_tensor`` extension type: Hugging Face ``datasets``
    refuses extension types ("does not have a datasets dtype equivalent"), and a
    per-bucket tensor type would split the output into tables that no longer read as
    one. Plain nested lists load in pyarrow, pandas, DuckDB, Ray Data and ``datasets``
    (whose torch format yields [C, H, W] tensors) alike.
    """
    value_type = LATENT_DTYPES[dtype]
    if shape is None:
        if dimensions is None or dimensions < 1:
            raise ValueError(f"dimensions: a variable-shape tensor column needs dimensions >= 1, got {dimensions}")
        for _ in range(dimensions):
            value_type = pa.list_(value_type)
        return value_type
    for size in reversed(shape):
        value_type = pa.list_(value_type) if size is None else pa.list_(value_type, size)
    return value_type


def is_ragged_type(data_type: pa.DataType) -> bool:
    """Rows of their own length and one fixed inner shape: a variable-size list of fixed-size lists of floats
    ([tokens][dim] caption embeddings of Z-Image or Qwen-Image). Bucket latents ([C][H][W], every level
    variable) are not: a batch holds one latent shape, while token counts differ within a batch."""
    if not (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)):
        return False
    inner = data_type.value_type
    if not pa.types.is_fixed_size_list(inner):
        return False
    while pa.types.is_fixed_size_list(inner):
        inner = inner.value_type
    return pa.types.is_floating(inner)


def is_tensor_type(data_type: pa.DataType) -> bool:
    """A column that holds one float tensor per row: nested (fixed-size) lists of floats, or Arrow's tensor type."""
    if isinstance(data_type, pa.FixedShapeTensorType):
        return True
    if not (pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type)):
        return False
    while pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type):
        data_type = data_type.value_type
    return pa.types.is_floating(data_type)


SIZE_TYPE = pa.list_(pa.int32(), 2)  # [height, width] or [top, left], as SDXL's micro-conditioning orders them


def latents_schema(
    *, latent_shape: tuple[int, ...] | None, dtype: str, flip: bool, caption: bool,
    embedding_shapes: dict[str, tuple[int, ...]] | None = None,
) -> pa.Schema:
    """The ``latents/`` table of `latentray encode`; optional columns follow the run's options.

    ``embedding_shapes``: shape per text-encoder output column (``EMBEDDING_COLUMNS``),
    empty or None without --text-embeddings; a shape ``(None, dim)`` stores each caption at
    its own number of tokens, which ``<name>_length`` holds.
    """
    unknown = set(embedding_shapes or ()) - set(EMBEDDING_COLUMNS)
    if unknown:
        raise ValueError(f"embedding_shapes: unknown columns {sorted(unknown)} (known: {', '.join(EMBEDDING_COLUMNS)})")
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("latent", tensor_type(latent_shape, dtype, dimensions=3)),
        pa.field("latent_shape", pa.list_(pa.int32(), 3)),  # (channels, height, width) of this row's latent
    ]
    if flip:
        fields.append(pa.field("latent_flipped", tensor_type(latent_shape, dtype, dimensions=3)))  # of the horizontally mirrored crop
    fields += [
        pa.field("original_size", SIZE_TYPE),  # of the decoded, upright image
        pa.field("crop_top_left", SIZE_TYPE),  # in the resized image
        pa.field("target_size", SIZE_TYPE),  # of the crop: the bucket, or the square --resolution
    ]
    if caption:
        fields.append(pa.field("caption", pa.string()))
    for name in EMBEDDING_COLUMNS:  # fixed order, whatever order the encoders returned them in
        if name in (embedding_shapes or {}):
            shape = tuple(embedding_shapes[name])
            fields.append(pa.field(name, tensor_type(shape, dtype)))
            if shape and shape[0] is None:
                fields.append(pa.field(name + LENGTH_SUFFIX, pa.int32()))  # tokens of this row's caption
    if embedding_shapes:
        fields.append(pa.field("caption_truncated", pa.bool_()))
    fields += [
        pa.field("source", pa.string()),  # the image's URI, or <Parquet file>#row=<n> for bytes in the table
        pa.field("content_hash", pa.string()),  # sha256 of the source bytes
        pa.field("cache_key", pa.string()),  # content, caption, model and preprocessing: equal keys, equal rows
        pa.field("row", pa.int64()),  # position in the input (files in sorted order)
        pa.field("seed", pa.int64()),  # the row's seed (random crop, --sample sample)
        pa.field("run", pa.int32()),  # the run that wrote the row: a newer run's row supersedes an older one
    ]
    return pa.schema(fields)


# Reason codes of `latentray encode` errors: every input row ends in latents/ or in errors/ with one.
ENCODE_ERROR_CODES = {
    "undecodable": "not an image Pillow can read: zero bytes, unknown format or corrupt data",
    "truncated": "the file ends before its image data does",
    "too_large": "more pixels than --max-image-pixels, refused from the header before decoding",
    "too_small": "smaller than --min-image-size (by default: than its target; latentray does not upscale unless asked)",
    "unsupported_mode": "a pixel format latentray cannot convert to RGB",
    "unreadable_path": "the URI in --path-column could not be read",
    "missing_source": "the row has no image bytes or path",
    "null_id": "the row's id is null",
    "duplicate_id": "the row repeats the id of an earlier row (the earlier row is kept)",
    "non_finite_latent": "the VAE returned NaN or infinity for the row",
    "out_of_memory": "the row did not fit in GPU memory even alone (its batch was halved down to it); a rerun retries it",
}
# errors that belong to an input position rather than to an id (the id is missing or taken)
ROW_KEYED_CODES = frozenset({"null_id", "duplicate_id"})

# The generation errors table plus what encoding knows about a failed row; ``reason`` holds the message.
ENCODE_ERRORS_SCHEMA = pa.schema(list(ERRORS_SCHEMA) + [
    pa.field("code", pa.string()),  # one of ENCODE_ERROR_CODES
    pa.field("source", pa.string()),
    pa.field("content_hash", pa.string()),  # null when the source could not be read
    pa.field("cache_key", pa.string()),  # null when the source could not be read: such rows are retried
    pa.field("run", pa.int32()),
])


# -- procedural shapes corpus (training data of the demo model; an image table for `latentray encode`) --

SHAPES_CORPUS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary()),  # PNG bytes
    pa.field("caption", pa.string()),  # "a red circle on a blue background"
    pa.field("color", pa.string()),  # what the caption names: palette colour of the shape
    pa.field("shape", pa.string()),  # circle, square or triangle
    pa.field("background", pa.string()),  # palette colour of the background
    pa.field("left", pa.int32()),  # the shape's square bounding box, pixels
    pa.field("top", pa.int32()),
    pa.field("size", pa.int32()),
])


# -- adherence of generated images to their prompts -----------------------------------------------

ADHERENCE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("held_out", pa.bool_()),  # the prompt's (colour, shape) was kept out of training
    pa.field("expected_color", pa.string()),
    pa.field("expected_shape", pa.string()),
    pa.field("expected_background", pa.string()),
    pa.field("found_color", pa.string()),  # null: the analyser found no foreground
    pa.field("found_shape", pa.string()),  # null: no single compact shape
    pa.field("found_background", pa.string()),  # null: no uniform background
    pa.field("color_match", pa.bool_()),
    pa.field("shape_match", pa.bool_()),
    pa.field("background_match", pa.bool_()),
    pa.field("reason", pa.string()),  # why the analyser found nothing ("" when it found a shape)
])
