import numpy as np
import pyarrow as pa
import pytest

from pipelines.generation.prompt_rows import PromptDefaults, normalize_prompts, resolve_row
from pipelines.runtime.repeated_ids import RepeatedIds
from pipelines.runtime.row_ids import derived_seed
from pipelines.runtime.schemas import check_prompt_schema

DEFAULTS = PromptDefaults(negative_prompt="", steps=10, guidance=7.5, height=64, width=64, seed=3, max_image_size=512, size_multiple=8)


@pytest.mark.parametrize("override, reason", [
    ({"prompt": None}, "prompt is null"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1, got 0"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0, got -1.0"),
    ({"height": 60}, "height must be a positive multiple of 8, got 60"),
    ({"width": 1024}, "width 1024 is above the maximum 512"),
    ({"seed": -5}, "seed must be between 0 and 2**63-1, got -5"),
])
def test_bad_rows_get_a_reason(override, reason):
    row = {"id": "a", "row": 0, "prompt": "a cat", **override}
    resolved, got = resolve_row(row, DEFAULTS)
    assert resolved is None and got == reason


def test_row_settings_override_defaults_and_missing_ones_fall_back():
    resolved, reason = resolve_row({"id": "a", "row": 4, "prompt": "cat", "num_inference_steps": 3, "width": 32, "seed": None}, DEFAULTS)
    assert reason is None
    assert resolved["num_inference_steps"] == 3 and resolved["width"] == 32 and resolved["height"] == 64
    assert resolved["seed"] == derived_seed(3, "a") and resolved["guidance_scale"] == 7.5


def test_derived_seed_depends_on_run_seed_and_id_only():
    assert derived_seed(0, "x") == derived_seed(0, "x")
    assert len({derived_seed(0, "x"), derived_seed(1, "x"), derived_seed(0, "y")}) == 3


def test_a_job_block_keeps_every_row_and_marks_the_bad_ones():
    table = pa.table({"id": ["a", "b", "a", None], "prompt": ["cat", "", "dog", "owl"], "row": [0, 1, 2, 3]})
    repeated = RepeatedIds.of_ids(["a", "b", "a", None])
    out = normalize_prompts(table, defaults=DEFAULTS, repeated=repeated).to_pydict()
    assert out["id"] == ["a", "b", "a", "000000003"] and out["prompt"] == ["cat", "", "dog", "owl"]
    assert out["failed_reason"] == ["", "prompt is empty", "id 'a' repeats the id of input row 0", "id is null"]
    assert out["failed_stage"] == ["", "validate", "validate", "validate"]
    assert out["seed"][0] == derived_seed(3, "a") and out["num_inference_steps"] == [10] * 4  # bad rows: valid placeholders


def test_a_processor_block_keeps_its_columns_and_needs_an_id_or_a_seed():
    table = pa.table({"prompt": ["cat", "dog"], "seed": [5, None], "score": [0.5, 0.7]})
    out = normalize_prompts(table, defaults=DEFAULTS)
    assert out.column_names[:3] == ["prompt", "seed", "score"] and "id" not in out.column_names
    assert out["score"].to_pylist() == [0.5, 0.7] and out["seed"].to_pylist() == [5, 0]
    assert out["failed_reason"].to_pylist() == ["", "seed is null and the row has no id to derive one from"]
    with pytest.raises(ValueError, match="neither an 'id' nor a 'seed' column"):
        normalize_prompts(pa.table({"prompt": ["cat"]}), defaults=DEFAULTS)
    with pytest.raises(ValueError, match="no 'prompt' column"):
        normalize_prompts(pa.table({"text": ["cat"], "id": ["a"]}), defaults=DEFAULTS)


def test_repeats_are_found_by_sorting_and_point_to_the_first_row():
    repeated = RepeatedIds.of_ids(["b", "a", None, "b", "c", "a", "b", None])
    assert repeated.positions.tolist() == [3, 5, 6] and repeated.first_positions.tolist() == [0, 1, 0]
    assert repeated.first_of(np.arange(8)).tolist() == [-1, -1, -1, 0, -1, 1, 0, -1]
    assert RepeatedIds.none().first_of(np.arange(3)).tolist() == [-1, -1, -1]


@pytest.mark.parametrize("schema, message", [
    (pa.schema([("text", pa.string())]), "no 'prompt' column (columns are: text)"),
    (pa.schema([("prompt", pa.int64())]), "column 'prompt' must hold strings, not int64"),
    (pa.schema([("prompt", pa.string()), ("seed", pa.float64())]), "column 'seed' must hold integers, not double"),
])
def test_schema_errors_name_the_column(schema, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_prompt_schema(schema, "prompts.parquet")
