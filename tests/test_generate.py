"""The generation pipeline end to end on a real local Ray, tiny preset, local folders."""

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from helpers import assert_images_match, diffusers_reference, read_image, recording_actor, write_prompts
from pipelines.generation.generate import build_model_stages, generated_rows, plan_generation, run_generation
from pipelines.runtime.job import job_block_rows
from pipelines.runtime.config import GenerateConfig, StageOptions
from pipelines.runtime.placement import ClusterShape

STEPS = 4
GOOD_ROWS = [
    {"id": "cat", "prompt": "a cat", "seed": 11},
    {"id": "dog", "prompt": "a dog", "negative_prompt": "blurry", "seed": 12, "guidance_scale": 3.0},
    {"id": "owl", "prompt": "an owl", "height": 32, "width": 48},
    {"id": "fox", "prompt": "a fox", "num_inference_steps": 2, "guidance_scale": 1.0},
    {"id": "long", "prompt": "word " * 40},
    {"id": "elk", "prompt": "an elk", "seed": 7},
]
BAD_ROWS = {
    "empty": ({"prompt": "  "}, "prompt is empty"),
    "null": ({"prompt": None}, "prompt is null"),
    "steps": ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps must be >= 1, got 0"),
    "guidance": ({"prompt": "x", "guidance_scale": -2.0}, "guidance_scale must be >= 0, got -2.0"),
    "odd-size": ({"prompt": "x", "height": 60}, "height must be a positive multiple of 8, got 60"),
    "huge": ({"prompt": "x", "width": 4096}, "width 4096 is above the maximum 2048"),
}
COLUMNS = ("id", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "height", "width")


def prompt_rows() -> list[dict]:
    rows = [dict(row) for row in GOOD_ROWS]
    rows += [{"id": row_id, **row} for row_id, (row, _) in BAD_ROWS.items()]
    rows.append({"id": "cat", "prompt": "a second cat"})  # repeated id: an error, the first "cat" stays
    return [{column: row.get(column) for column in COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", prompt_rows())


def generate(prompts: str, output, **options) -> dict:
    config = GenerateConfig(prompts=prompts, output=str(output), model="tiny", steps=STEPS, **options)
    return run_generation(config)


@pytest.fixture(scope="module")
def first_run(ray_session, prompts, tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    return output, generate(prompts, output, save_latents=True, batch_size=4)


def manifest(output) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(output, "manifest")).set_index("id").sort_index()


def images(output) -> dict[str, np.ndarray]:
    frame = manifest(output)
    return {row_id: read_image(os.path.join(output, path)) for row_id, path in frame["image_path"].items()}


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_counts_add_up_and_every_bad_row_has_its_reason(first_run):
    output, record = first_run
    assert record["status"] == "complete"
    assert record["counts"]["input_rows"] == len(prompt_rows()) == 13
    assert record["counts"]["ok_rows"] == len(GOOD_ROWS)
    assert record["counts"]["error_rows"] == len(BAD_ROWS) + 1
    errors = pd.read_parquet(os.path.join(output, "errors"))
    reasons = dict(zip(errors["id"] + "@" + errors["row"].astype(str), errors["reason"]))
    for row_id, (_, reason) in BAD_ROWS.items():
        assert reason in reasons.values()
    assert reasons["cat@12"] == "id 'cat' repeats the id of input row 0"
    assert set(errors["stage"]) == {"validate"}
    assert json.load(open(output / "run.json"))["counts"] == record["counts"]


def test_manifest_describes_each_image(first_run):
    output, _ = first_run
    frame = manifest(output)
    assert sorted(frame.index) == sorted(row["id"] for row in GOOD_ROWS)
    assert frame.loc["owl", ["height", "width"]].tolist() == [32, 48]
    assert frame.loc["fox", "num_inference_steps"] == 2 and frame.loc["cat", "num_inference_steps"] == STEPS
    assert frame.loc["dog", "negative_prompt"] == "blurry" and frame.loc["cat", "seed"] == 11
    assert frame["prompt_truncated"].to_dict() == {row["id"]: row["id"] == "long" for row in GOOD_ROWS}
    assert set(frame["scheduler"]) == {"DDIMScheduler"}
    for row_id, image in images(output).items():
        assert image.shape == (frame.loc[row_id, "height"], frame.loc[row_id, "width"], 3)
        assert frame.loc[row_id, "image_path"] == f"images/{row_id}.png"
        latent = np.asarray(frame.loc[row_id, "latent"]).reshape(frame.loc[row_id, "latent_shape"])
        assert latent.shape == (4, image.shape[0] // 8, image.shape[1] // 8)
        np.testing.assert_allclose(frame.loc[row_id, "latent_mean"], latent.reshape(4, -1).astype(np.float64).mean(axis=1), rtol=1e-5, atol=1e-6)


def test_latent_stats_equal_numpy_over_the_latents(first_run):
    output, _ = first_run
    stats = json.load(open(output / "latent_stats.json"))
    latents = [np.asarray(latent, np.float64).reshape(4, -1) for latent in manifest(output)["latent"]]  # channel-first
    values = np.concatenate(latents, axis=1)
    np.testing.assert_allclose(stats["mean"], values.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], values.std(axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats["min"], values.min(axis=1), rtol=1e-6)
    assert stats["count"] == [values.shape[1]] * 4
    # the format of encode's latent_stats.json (pipelines.runtime.stats.latent_stats_report)
    assert {"latent_channels", "over", "scaling_factor", "shift_factor", "all_channels", "suggested", "warnings"} <= set(stats)


def test_images_equal_what_diffusers_draws_for_each_row(first_run, tiny_model_dir):
    output, _ = first_run
    frame = manifest(output).reset_index()
    expected = diffusers_reference(tiny_model_dir, frame.to_dict("records"))
    actual = images(output)
    for row, reference in zip(frame["id"], expected):
        assert_images_match(actual[row], reference)


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_batch_size_workers_and_placement_do_not_change_images(first_run, prompts, tmp_path):
    reference = images(first_run[0])
    variants = {  # the reference ran one worker, batch 4
        "two-workers-batch-1": {"stages": {"fused": StageOptions(concurrency=2, threads=1)}, "batch_size": 1},
        "split": {"placement": "split", "batch_size": 8},
    }
    for name, options in variants.items():
        record = generate(prompts, tmp_path / name, **options)
        assert record["counts"]["ok_rows"] == len(GOOD_ROWS), name
        for row_id, image in images(tmp_path / name).items():
            assert_images_match(image, reference[row_id])


def test_same_input_and_config_twice_gives_identical_files(first_run, prompts, tmp_path):
    output = tmp_path / "again"
    generate(prompts, output, save_latents=True, batch_size=4)
    for name in os.listdir(first_run[0] / "images"):
        assert (output / "images" / name).read_bytes() == (first_run[0] / "images" / name).read_bytes(), name


def test_rerun_resumes_a_partial_output_without_duplicates(first_run, prompts, tmp_path):
    output = tmp_path / "partial"
    shutil.copytree(first_run[0], output)
    # keep only the errors and two committed rows, as if the run had stopped early
    frame = manifest(output)
    shutil.rmtree(output / "manifest")
    frame.loc[["cat", "dog"]].reset_index().to_parquet(output / "manifest.parquet")
    os.makedirs(output / "manifest")
    os.replace(output / "manifest.parquet", output / "manifest" / "part-kept.parquet")

    record = generate(prompts, output, save_latents=True, batch_size=4)
    assert record["counts"]["generated_this_run"] == len(GOOD_ROWS) - 2
    assert record["counts"]["ok_rows"] + record["counts"]["error_rows"] == record["counts"]["input_rows"]
    assert sorted(manifest(output).index) == sorted(row["id"] for row in GOOD_ROWS)

    again = generate(prompts, output, save_latents=True, batch_size=4)
    assert again["counts"]["generated_this_run"] == 0 and again["status"] == "complete"
    # a finished output: no dataset, no actor, no model, and the counts still add up
    assert again["stages"] == {} and again["stage_busy_seconds"] == {}
    assert again["counts"]["ok_rows"] + again["counts"]["error_rows"] == again["counts"]["input_rows"]


def test_rerun_with_another_config_is_refused_unless_overwrite(first_run, prompts, tmp_path):
    output = tmp_path / "changed"
    shutil.copytree(first_run[0], output)
    with pytest.raises(ValueError, match=r"different configuration \(steps was 4, now 3\).*--overwrite"):
        run_generation(GenerateConfig(prompts=prompts, output=str(output), model="tiny", steps=3, save_latents=True))
    record = run_generation(GenerateConfig(prompts=prompts, output=str(output), model="tiny", steps=3, overwrite=True))
    assert record["counts"]["generated_this_run"] == len(GOOD_ROWS)
    assert set(manifest(output)["num_inference_steps"]) == {3, 2}


def block_image_path(output, row_id: str) -> str:
    """A directory where the row's image must go: a real write error that no retry of the run fixes."""
    from pipelines.generation.images import image_path

    blocked = output / image_path(row_id, "png")
    blocked.mkdir(parents=True)
    (blocked / "keep").write_text("x")
    return blocked


def test_long_and_odd_ids_get_bounded_names_and_a_failed_write_is_a_transient_error(ray_session, tmp_path):
    from pipelines.generation.images import image_path

    odd_ids = ["x" * 300, "a/b c", "ünï code", "..", "%41", "blocked"]
    prompts = write_prompts(tmp_path / "odd.parquet", {"id": odd_ids, "prompt": [f"prompt {i}" for i in range(len(odd_ids))]})
    output = tmp_path / "odd-out"
    block_image_path(output, "blocked")

    record = generate(prompts, output, batch_size=2)

    # 1. the other rows complete; the blocked one is an error whose cause is outside it: the run is incomplete
    counts = record["counts"]
    assert counts["input_rows"] == len(odd_ids) == counts["ok_rows"] + counts["error_rows"]
    assert record["status"] == "incomplete" and record["error_causes"] == {"permanent": 0, "transient": 1}
    frame = manifest(output)
    assert sorted(frame.index) == sorted(set(odd_ids) - {"blocked"})  # exact ids, 300 characters included
    for row_id, path in frame["image_path"].items():
        assert path == image_path(row_id, "png") and len(os.path.basename(path).encode()) <= 100
        assert read_image(output / path).shape == (64, 64, 3)
    errors = pd.read_parquet(output / "errors")
    assert errors[["id", "row", "stage", "cause"]].values.tolist() == [["blocked", 5, "write", "transient"]]
    assert "cannot write the image after 3 attempts: IsADirectoryError" in errors["reason"][0]
    assert list(record["transient_error_reasons"].values()) == [1]
    assert not [name for name in os.listdir(output / "images") if name.startswith(".tmp-")]  # no orphan temporary files
    # (a rerun retries it: by position below; by id, on object storage, in tests/test_faults.py)


def test_a_rerun_by_input_position_retries_exactly_the_transient_errors(ray_session, tmp_path):
    from pipelines.runtime.row_ids import position_id

    prompts = write_prompts(tmp_path / "plain.parquet", {"prompt": ["a cat", "a dog", "  ", "an owl"]})  # no ids: matched by position
    output = tmp_path / "plain-out"
    blocked = block_image_path(output, position_id(1))
    first = generate(prompts, output, batch_size=2, height=32, width=32)
    assert first["status"] == "incomplete" and first["error_causes"] == {"permanent": 1, "transient": 1}

    shutil.rmtree(blocked)
    again = generate(prompts, output, batch_size=2, height=32, width=32)
    assert again["status"] == "complete" and again["error_causes"] == {"permanent": 1, "transient": 0}
    assert again["transient_errors_retried"] == 1
    assert again["counts"]["generated_this_run"] == 1 and again["counts"]["accounted_before_this_run"] == 3
    assert sorted(manifest(output)["row"]) == [0, 1, 3]
    assert pd.read_parquet(output / "errors")[["row", "cause"]].values.tolist() == [[2, "permanent"]]

    # a transient error left beside a row committed since (a block Ray retried after its first try wrote it)
    # goes on the finished rerun, which loads no model
    import pyarrow as pa

    from pipelines.runtime.outputs import write_errors_part

    write_errors_part(pa.table({"id": [position_id(3)], "row": pa.array([3], pa.int64()), "reason": ["x"], "cause": ["transient"]}),
                      str(output / "errors"))
    last = generate(prompts, output, batch_size=2, height=32, width=32)
    assert last["stages"] == {} and last["status"] == "complete" and last["error_causes"] == {"permanent": 1, "transient": 0}


def test_a_small_job_reaches_every_actor_block_by_block(ray_session, tmp_path):
    # 48 rows, 2 actors, batches of 4: 4-row blocks, so both actors work and results stream back
    ids = [f"row{index:02d}" for index in range(48)]
    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": row_id, "prompt": f"shape {row_id}"} for row_id in ids])
    config = GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny", steps=2, height=32, width=32,
                            batch_size=4, stages={"fused": StageOptions(concurrency=2, threads=1)})
    plan = plan_generation(config)
    stages = build_model_stages(plan.config, plan.model, "fused", ClusterShape.current())
    stages = [replace(stage, worker=recording_actor(stage.worker, seconds_per_batch=0.5)) for stage in stages]
    block_rows = job_block_rows(plan, stages)
    assert block_rows == 4

    actor_of: dict[str, int] = {}
    arrivals = 0
    for batch in generated_rows(plan, stages, block_rows).iter_batches(batch_size=None, batch_format="numpy"):
        arrivals += 1
        for row_id, pid in zip(batch["id"], batch["actor_pid"]):
            assert row_id not in actor_of, f"{row_id} generated twice"
            actor_of[str(row_id)] = int(pid)
    assert sorted(actor_of) == ids
    rows_per_actor = {pid: list(actor_of.values()).count(pid) for pid in set(actor_of.values())}
    assert len(rows_per_actor) == 2, rows_per_actor
    # results leave the actors block by block, not as one block at the end of the job
    assert arrivals >= 48 // block_rows // 2, arrivals
