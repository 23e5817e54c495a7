import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


def test_block_writes_errors_and_returns_good_rows(tmp_path):
    table = pa.table({"id": ["a", "b", "a", None], "prompt": ["cat", "", "dog", "owl"], "row": [0, 1, 2, 3]})
    repeated = RepeatedIds.of_ids(["a", "b", "a", None])
    good = normalize_prompts(table, defaults=DEFAULTS, repeated=repeated, errors_uri=str(tmp_path / "errors"))
    assert good["id"].tolist() == ["a"]
    errors = pq.read_table(tmp_path / "errors").to_pylist()
    assert {(e["row"], e["reason"]) for e in errors} == {
        (1, "prompt is empty"), (2, "id 'a' repeats the id of input row 0"), (3, "id is null"),
    }


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
