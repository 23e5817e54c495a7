"""Validation and normalisation of prompt rows: each row becomes a fully resolved request or an error.

Runs as a CPU task in Ray Data, before any model. Rows that fail go to ``errors/``
with the reason; the others carry every setting explicitly, so workers never see a
missing value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from pipelines.runtime.outputs import write_errors_part
from pipelines.runtime.repeated_ids import RepeatedIds
from pipelines.runtime.row_ids import MAX_SEED, derived_seed, position_id
from pipelines.runtime.schemas import ERRORS_SCHEMA, PAIR_COLUMNS


# what a validated row carries to the model stages (and the family's conditioning columns it has)
PROMPT_ROW_COLUMNS = ("id", "row", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "height", "width")


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


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def resolve_row(row: dict, defaults: PromptDefaults) -> tuple[dict | None, str | None]:
    """(resolved row, None) or (None, reason)."""
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
    return {
        "id": row["id"], "row": int(row["row"]), "prompt": str(prompt),
        "negative_prompt": str(setting("negative_prompt", defaults.negative_prompt)),
        "seed": seed, "num_inference_steps": steps, "guidance_scale": guidance, **size, **pairs,
    }, None


def normalize_prompts(table: pa.Table, *, defaults: PromptDefaults, repeated: RepeatedIds, errors_uri: str) -> pd.DataFrame:
    """Resolve a block of prompt rows; write its bad rows to ``errors/``; return the good ones.

    ``repeated`` knows the position of every repeat of an id and of the id's first row.
    """
    frame = table.to_pandas()
    if "id" in frame.columns:
        frame["id"] = [None if _missing(value) else str(value) for value in frame["id"]]
    else:
        frame["id"] = [position_id(row) for row in frame["row"]]
    first_rows = repeated.first_of(frame["row"].to_numpy())

    good, bad = [], []
    for row, first_row in zip(frame.to_dict("records"), first_rows):
        if _missing(row["id"]):
            bad.append({"id": position_id(row["row"]), "row": row["row"], "stage": "validate", "reason": "id is null"})
            continue
        if first_row >= 0:
            reason = f"id {row['id']!r} repeats the id of input row {first_row}"
            bad.append({"id": row["id"], "row": row["row"], "stage": "validate", "reason": reason})
            continue
        resolved, reason = resolve_row(row, defaults)
        if resolved is None:
            bad.append({"id": row["id"], "row": row["row"], "stage": "validate", "reason": reason})
        else:
            good.append(resolved)

    if bad:
        write_errors_part(pa.Table.from_pylist(bad, schema=ERRORS_SCHEMA), errors_uri)
    columns = [*PROMPT_ROW_COLUMNS, *[column for column in PAIR_COLUMNS if column in frame.columns]]
    return pd.DataFrame(good, columns=columns)
