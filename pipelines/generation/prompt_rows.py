"""Validation and normalisation of prompt rows: each row gets fully resolved settings, or the reason it has none.

Runs as a CPU task in Ray Data, before any model. Every row goes on with its own
columns: a bad row is marked failed (stage ``validate``) and the model stages skip it,
so that the job's commit writes it to ``errors/`` and the processor returns it with its
``error``; the others carry every setting explicitly, so workers never see a missing value.
A failure is the row's own (permanent) except a source image the store refused or did not
answer after its retries (``FAILED_CAUSE_COLUMN``: transient, a rerun retries the row).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.generation.init_images import INIT_IMAGE_COLUMNS, INIT_IMAGE_FIELDS, NO_SOURCE, SourceSettings, resolve_source, uses_init_images
from pipelines.runtime import io
from pipelines.runtime.repeated_ids import RepeatedIds
from pipelines.runtime.row_ids import MAX_SEED, derived_seed, position_id
from pipelines.runtime.schemas import LORA_COLUMNS, PAIR_COLUMNS, PERMANENT, TRANSIENT, check_prompt_schema
from workers.runtime.columns import FAILED_CAUSE_COLUMN, FAILED_CODE_COLUMN, FAILED_REASON_COLUMN, FAILED_STAGE_COLUMN


# what a validated row carries to the model stages (and the family's conditioning columns it has)
PROMPT_ROW_COLUMNS = ("id", "row", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "height", "width")
# the settings a row resolves, with their types (a bad row holds the run's defaults there)
SETTING_TYPES = {
    "negative_prompt": pa.string(), "seed": pa.int64(), "num_inference_steps": pa.int64(), "guidance_scale": pa.float64(),
    "height": pa.int64(), "width": pa.int64(),
}
VALIDATE_STAGE, INVALID_CODE = "validate", "invalid_row"


@dataclass(frozen=True, kw_only=True)
class PromptDefaults:
    """The run-level values a row falls back to, and the limits it must respect."""

    negative_prompt: str
    steps: int
    guidance: float
    height: int
    width: int
    seed: int
    max_image_size: int
    size_multiple: int  # the VAE's downsampling factor
    lora: tuple[str, ...] = ()  # the files and weights of rows whose 'lora' is null
    lora_scale: tuple[float, ...] = ()  # empty: 1 per file
    max_loras: int = 8  # files a row may name (what one actor keeps loaded)
    init_images: SourceSettings = field(default_factory=SourceSettings)  # rows' source images: default strength, limits

    def placeholder(self) -> dict:
        """The settings a bad row carries to the model stages, which skip it: valid values, never used."""
        return {"negative_prompt": self.negative_prompt, "seed": 0, "num_inference_steps": self.steps,
                "guidance_scale": self.guidance, "height": self.height, "width": self.width}


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def resolve_row(row: dict, defaults: PromptDefaults) -> tuple[dict | None, str | None]:
    """(the row's resolved settings, None) or (None, reason). ``row["id"]`` (a string or None) seeds a row without a seed.
    A source image the store refused raises ``io.StorageError`` (not the row's fault: ``resolve_with_cause``)."""
    prompt = row.get("prompt")
    if _missing(prompt):
        return None, "prompt is null"
    if not str(prompt).strip():
        return None, "prompt is empty"

    def setting(column: str, default):
        value = row.get(column)
        return default if _missing(value) else value

    steps = int(setting("num_inference_steps", defaults.steps))
    if steps < 1:
        return None, f"num_inference_steps must be >= 1, got {steps}"
    guidance = float(setting("guidance_scale", defaults.guidance))
    if not guidance >= 0:
        return None, f"guidance_scale must be >= 0, got {guidance}"
    size = {}
    for column in ("height", "width"):
        value = int(setting(column, getattr(defaults, column)))
        if value < defaults.size_multiple or value % defaults.size_multiple:
            return None, f"{column} must be a positive multiple of {defaults.size_multiple}, got {value}"
        if value > defaults.max_image_size:
            return None, f"{column} {value} is above the maximum {defaults.max_image_size}"
        size[column] = value
    seed = row.get("seed")
    if _missing(seed) and _missing(row.get("id")):
        return None, "seed is null and the row has no id to derive one from"
    seed = derived_seed(defaults.seed, row["id"]) if _missing(seed) else int(seed)
    if not 0 <= seed <= MAX_SEED:
        return None, f"seed must be between 0 and 2**63-1, got {seed}"
    pairs = {}
    for column in [column for column in PAIR_COLUMNS if column in row]:
        value = row[column]
        if value is None or (not hasattr(value, "__len__") and _missing(value)):
            pairs[column] = None  # the family's default
        elif len(value) != 2 or any(_missing(number) or int(number) < 0 for number in value):
            return None, f"{column} must be two integers >= 0, got {list(value)}"
        else:
            pairs[column] = [int(number) for number in value]
    loras, reason = resolve_loras(row, defaults)
    if reason:
        return None, reason
    # last: reading and decoding a source image is the costliest check
    source, reason = resolve_source(row, size["height"], size["width"], defaults.init_images) if "init_image" in row else ({}, None)
    if reason:
        return None, reason
    return {
        "negative_prompt": str(setting("negative_prompt", defaults.negative_prompt)),
        "seed": seed, "num_inference_steps": steps, "guidance_scale": guidance, **size, **pairs, **loras, **source,
    }, None


def resolve_with_cause(row: dict, defaults: PromptDefaults) -> tuple[dict | None, str | None, str]:
    """``resolve_row`` with whose fault a failure is: (settings, None, PERMANENT) or (None, reason, cause)."""
    try:
        return (*resolve_row(row, defaults), PERMANENT)
    except io.StorageError as error:  # the store refused the row's source after its retries: a rerun retries the row
        return None, f"init_image: {error}", TRANSIENT


def uses_loras(columns, defaults: PromptDefaults) -> bool:
    """Whether rows carry LoRA columns: the table has one, or the run names default files."""
    return bool(defaults.lora) or any(column in columns for column in LORA_COLUMNS)


def resolve_loras(row: dict, defaults: PromptDefaults) -> tuple[dict, str | None]:
    """({"lora": [URI, ...], "lora_scale": [weight, ...]}, None), or ({}, reason). A null 'lora' is the
    run's --lora (with --lora-scale); '' or [] is none. One number weighs every file, as diffusers' set_adapters."""
    value, scale = row.get("lora"), row.get("lora_scale")
    scale_missing = scale is None or (not hasattr(scale, "__len__") and _missing(scale))
    if value is None:
        uris = list(defaults.lora)
        scale = list(defaults.lora_scale) if scale_missing and defaults.lora_scale else scale
    else:
        uris = ([value] if value else []) if isinstance(value, str) else list(value)
    if any(not isinstance(uri, str) or not uri.strip() for uri in uris):
        return {}, f"lora must hold non-empty URIs, got {uris}"
    if len(set(uris)) != len(uris):
        return {}, f"lora names a file twice: {uris}"
    if len(uris) > defaults.max_loras:
        return {}, f"lora names {len(uris)} files, above --max-loras-per-actor {defaults.max_loras}"
    if scale is None or (not hasattr(scale, "__len__") and _missing(scale)):
        scales = [1.0] * len(uris)
    elif not uris:
        return {}, f"lora_scale is {scale!r} but the row has no lora"
    elif hasattr(scale, "__len__"):
        scales = list(scale)
        if len(scales) != len(uris):
            return {}, f"lora_scale has {len(scales)} values for {len(uris)} lora files"
    else:
        scales = [scale] * len(uris)
    if any(number is None or not math.isfinite(float(number)) for number in scales):
        return {}, f"lora_scale must be finite numbers, got {list(scales)}"
    return {"lora": uris, "lora_scale": [float(number) for number in scales]}, None


# a LoRA job reads its rows this many blocks at a time, for ``normalize_prompts`` to group them by adapter set
LORA_GROUPING_BLOCKS = 8


def normalize_prompts(table: pa.Table, *, defaults: PromptDefaults, repeated: RepeatedIds | None = None) -> pa.Table:
    """Resolve a block of prompt rows: ``table`` with each row's settings resolved and bad rows marked failed.

    Every column of ``table`` stays; the setting columns (``SETTING_TYPES``, the family's
    pairs) hold the resolved values, and the failure columns say why a row has none.
    ``repeated``: a job's, whose ids name its outputs: every row then has an id (its
    position, ``row``, without an ``id`` column) and every repeat of an id is an error
    naming the id's first row. Without it (the processor) ids are the user's own.
    """
    # 1. the columns a block must have, and each row's id as a string (None when absent)
    check_prompt_schema(table.schema, "the dataset")
    ids = row_ids(table, job=repeated is not None)
    first_rows = repeated.first_of(table.column("row").to_numpy()) if repeated is not None else np.full(table.num_rows, -1)

    # 2. each row's settings, or why it has none
    read = [column for column in ("prompt", "row", *SETTING_TYPES, *PAIR_COLUMNS, *LORA_COLUMNS, *INIT_IMAGE_COLUMNS)
            if column in table.column_names]
    loras, init_images = uses_loras(table.column_names, defaults), uses_init_images(table.column_names)
    settings, reasons, causes = [], [], []
    for row, row_id, first_row in zip(table.select(read).to_pylist(), ids, first_rows):
        resolved, reason, cause = resolve_with_cause({**row, "id": row_id}, defaults)
        if repeated is not None and row_id is None:
            resolved, reason, cause = None, "id is null", PERMANENT
        elif first_row >= 0:
            resolved, reason, cause = None, f"id {row_id!r} repeats the id of input row {first_row}", PERMANENT
        settings.append(resolved or {**defaults.placeholder(), **{column: None for column in PAIR_COLUMNS if column in row},
                                     "lora": [], "lora_scale": [], **NO_SOURCE})
        reasons.append(reason or "")
        causes.append(cause if reason else "")

    # 3. the settings and failures as columns beside the input's own (a job's ids as strings)
    columns = {column: pa.array([row[column] for row in settings], kind) for column, kind in SETTING_TYPES.items()}
    columns.update({column: pa.array([row[column] for row in settings], pa.list_(pa.int64()))
                    for column in PAIR_COLUMNS if column in table.column_names})
    if loras:  # each row's files and weights, resolved ([] for none; a failed row's are never used), as JSON
        # lists: Ray Data's numpy batches cannot hand lists of strings back to Arrow
        for column in LORA_COLUMNS:
            columns[column] = pa.array([json.dumps(row.get(column, [])) for row in settings], pa.string())
    if init_images:  # each row's source, its sha256 and strength, and its crop as raw bytes ("" and null: none)
        columns.update({column: pa.array([row[column] for row in settings], kind) for column, kind in INIT_IMAGE_FIELDS.items()})
    if repeated is not None:
        columns["id"] = pa.array([row_id if row_id is not None else position_id(row) for row_id, row in zip(ids, table.column("row").to_pylist())], pa.string())
    failed = [bool(reason) for reason in reasons]
    columns.update({
        FAILED_STAGE_COLUMN: pa.array([VALIDATE_STAGE if fail else "" for fail in failed], pa.string()),
        FAILED_CODE_COLUMN: pa.array([INVALID_CODE if fail else "" for fail in failed], pa.string()),
        FAILED_REASON_COLUMN: pa.array(reasons, pa.string()),
        FAILED_CAUSE_COLUMN: pa.array(causes, pa.string()),
    })
    for column, values in columns.items():
        index = table.column_names.index(column) if column in table.column_names else -1
        table = table.set_column(index, column, values) if index >= 0 else table.append_column(column, values)

    # 4. a job's rows of one adapter set side by side (a stable sort, so reruns form the same batches): cut into
    # blocks, they reach the denoiser as calls of one set, not a small call per set in every batch. A job finds
    # its rows by id or position, never by order; the processor keeps its rows' order.
    if loras and repeated is not None:
        table = table.take(pc.sort_indices(table, sort_keys=[(column, "ascending") for column in LORA_COLUMNS]))
    return table


def row_ids(table: pa.Table, *, job: bool) -> list[str | None]:
    """Each row's id as a string: its ``id``, else (a job) its input position; None where it has none.

    The processor's rows may do without ids when each has a ``seed``: a dataset with neither column is refused.
    """
    if "id" in table.column_names:
        return [None if _missing(value) else str(value) for value in table.column("id").to_pylist()]
    if job:
        return [position_id(row) for row in table.column("row").to_pylist()]
    if "seed" not in table.column_names:
        raise ValueError("the dataset has neither an 'id' nor a 'seed' column: a row's seed is its 'seed', "
                         "else derived from the run's seed and its 'id'; give the rows either column")
    return [None] * table.num_rows
