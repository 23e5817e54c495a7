"""The Python API: generation and encoding as Ray Data processors that users compose with their own steps,
``generate_images``, and the jobs built on the same wiring. Real local Ray, tiny preset, a handful of rows."""

from __future__ import annotations

import io as bytes_io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import assert_images_match, read_image, write_prompts
from pipelines import build_generation_processor, generate_images
from pipelines.generation.generate import run_generation
from pipelines.runtime.config import GenerateConfig
from pipelines.runtime.row_ids import derived_seed

OPTIONS = {"model": "tiny", "steps": 2, "height": 32, "width": 32, "batch_size": 4}
ROWS = [
    {"id": "a", "prompt": "a red cat", "topic": "cats"},
    {"id": "b", "prompt": "a blue dog", "topic": "dogs", "seed": 5, "negative_prompt": "blurry"},
    {"id": "c", "prompt": "  ", "topic": "cats"},  # invalid: an error row, never a failed dataset
    {"id": "d", "prompt": "a green owl", "topic": "skip"},  # the user's filter drops it
    {"id": "e", "prompt": "a fox", "topic": "dogs", "num_inference_steps": 1, "guidance_scale": 1.0},
]
COLUMNS = ("id", "prompt", "topic", "seed", "negative_prompt", "num_inference_steps", "guidance_scale")


def table_rows() -> list[dict]:
    return [{column: row.get(column) for column in COLUMNS} for row in ROWS]


@pytest.fixture(scope="module")
def cli_run(ray_session, tmp_path_factory):
    """What the job (``latentray generate``) writes for the rows: the reference the processor must equal."""
    root = tmp_path_factory.mktemp("api")
    prompts = write_prompts(root / "prompts.parquet", table_rows())
    run_generation(GenerateConfig(prompts=prompts, output=str(root / "out"), save_latents=True, **OPTIONS))
    manifest = pd.read_parquet(root / "out" / "manifest").set_index("id")
    return root / "out", manifest, pd.read_parquet(root / "out" / "errors").set_index("id")


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_generate_resumes_by_id_after_the_input_was_rewritten_in_place(cli_run, tmp_path):
    """The CLI fixture's output, rerun on its input rewritten in place: reordered, one new row before the
    others and an invalid one after them. Only the new row is generated; nothing twice."""
    import shutil

    output = tmp_path / "out"
    shutil.copytree(cli_run[0], output)
    prompts = os.path.join(os.path.dirname(cli_run[0]), "prompts.parquet")  # the path run.json names
    new, bad = {**dict.fromkeys(COLUMNS), "id": "new", "prompt": "an owl"}, {**dict.fromkeys(COLUMNS), "id": "bad"}
    write_prompts(prompts, [new, *reversed(table_rows()), bad])
    config = GenerateConfig(prompts=prompts, output=str(output), save_latents=True, **OPTIONS)
    record = run_generation(config)
    counts = record["counts"]
    assert record["status"] == "complete" and counts["generated_this_run"] == 1 and counts["accounted_before_this_run"] == len(ROWS)
    assert (counts["input_rows"], counts["ok_rows"], counts["error_rows"]) == (len(ROWS) + 2, len(ROWS), 2)
    assert sorted(pd.read_parquet(output / "manifest")["id"]) == ["a", "b", "d", "e", "new"]  # each id once
    assert sorted(pd.read_parquet(output / "errors")["id"]) == ["bad", "c"]
    again = run_generation(config)  # finished: from the listing alone, no Ray work
    assert again["stages"] == {} and again["counts"]["generated_this_run"] == 0


@pytest.fixture(scope="module")
def processed(ray_session):
    """The user's filter before the processor, the user's scoring map after it: one dataset run."""
    import ray.data

    def score(row: dict) -> dict:  # the user's own function, on the processor's columns
        pixels = None if row["image"] is None else np.asarray(Image.open(bytes_io.BytesIO(row["image"])))
        return {**row, "score": -1.0 if pixels is None else float(pixels.mean())}

    processor = build_generation_processor(save_latents=True, **OPTIONS)
    dataset = ray.data.from_items(table_rows(), override_num_blocks=2).filter(lambda row: row["topic"] != "skip")
    return {row["id"]: row for row in processor(dataset).map(score).take_all()}


def test_rows_keep_their_columns_and_gain_the_generated_ones(processed):
    assert sorted(processed) == ["a", "b", "c", "e"]
    assert {row["topic"] for row in processed.values()} == {"cats", "dogs"}
    good = processed["a"]
    assert good["error"] is None and good["prompt"] == "a red cat" and good["score"] > 0
    assert good["seed"] == derived_seed(0, "a") and processed["b"]["seed"] == 5  # derived from the id as the CLI does
    assert Image.open(bytes_io.BytesIO(good["image"])).format == "PNG"
    assert len(good["latent_mean"]) == len(good["latent_std"]) == 4 and list(good["latent_shape"]) == [4, 4, 4]
    assert processed["e"]["num_inference_steps"] == 1 and processed["a"]["num_inference_steps"] == 2
    assert not {"latents", "failed_reason", "error_stage"} & set(good) and not [c for c in good if c.startswith(("busy_", "count_"))]


def test_a_bad_row_carries_the_reason_the_cli_writes_to_errors(processed, cli_run):
    _, _, errors = cli_run
    bad = processed["c"]
    assert bad["error"] == errors.loc["c", "reason"] == "prompt is empty"
    assert bad["image"] is None and bad["latent_mean"] is None and bad["score"] == -1.0 and bad["prompt"] == "  "


def test_images_and_latents_equal_the_clis(processed, cli_run):
    output, manifest, _ = cli_run
    for row_id in ("a", "b", "e"):
        row = processed[row_id]
        assert row["seed"] == manifest.loc[row_id, "seed"]
        assert_images_match(np.asarray(Image.open(bytes_io.BytesIO(row["image"]))), read_image(output / manifest.loc[row_id, "image_path"]))
        np.testing.assert_allclose(np.asarray(row["latent"]), np.asarray(manifest.loc[row_id, "latent"]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(row["latent_mean"]), np.asarray(manifest.loc[row_id, "latent_mean"]), rtol=1e-4, atol=1e-5)


def test_generate_images_returns_the_clis_images_in_prompt_order(cli_run):
    output, manifest, _ = cli_run
    images = generate_images(["a blue dog", "a red cat"], seeds=[5, int(manifest.loc["a", "seed"])], negative_prompts=["blurry", ""], **OPTIONS)
    for image, row_id in zip(images, ("b", "a")):
        assert isinstance(image, Image.Image) and image.size == (32, 32)
        assert_images_match(np.asarray(image.convert("RGB")), read_image(output / manifest.loc[row_id, "image_path"]))


def test_a_dataset_without_a_prompt_column_fails_on_its_first_batch_naming_it(ray_session):
    import ray.data

    processor = build_generation_processor(**OPTIONS)
    with pytest.raises(Exception, match="no 'prompt' column"):
        processor(ray.data.from_items([{"id": "a", "text": "a cat"}])).take_all()


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps: must be >= 1"),
    ({"stepz": 3}, "stepz: not an option"),
    ({"image_format": "gif"}, "image_format: must be one of"),
    ({"scheduler": "flow-euler"}, "scheduler: 'flow-euler' does not fit sd models"),
    ({"height": 36}, "height: sd models need a multiple of 8"),
    ({"stages": {"denoiser": {"batch_size": 2}}}, "stages: denoiser not in the fused placement"),
    ({"stages": {"fused": {"batchsize": 2}}}, "stages: fused: unknown option"),
])
def test_a_bad_option_fails_at_build_time_naming_it(model_cache, options, message):
    with pytest.raises(ValueError, match=message):
        build_generation_processor(**{"model": "tiny", **options})


def test_building_starts_no_ray_and_writes_nothing(model_cache, tmp_path):
    import ray

    before = ray.is_initialized()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        processor = build_generation_processor(model="tiny")
    finally:
        os.chdir(cwd)
    assert ray.is_initialized() == before and os.listdir(tmp_path) == []
    assert processor.options.steps == 30 and processor.options.guidance == 7.5  # the family's defaults, resolved


# -- encoding ------------------------------------------------------------------------------------

ENCODE_OPTIONS = {"model": "tiny", "resolution": 32, "crop": "random", "flip": True, "caption_column": "text",
                  "text_embeddings": True, "batch_size": 4}


def dense(value) -> np.ndarray:
    """A nested-list tensor value (lists, or numpy arrays of arrays as pandas reads them) as one float32 array."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value.astype(np.float32)
    return np.stack([dense(np.asarray(item)) if np.ndim(item) else np.float32(item) for item in value])


def image_rows() -> list[dict]:
    from image_helpers import jpeg, picture, png

    return [
        {"id": "p0", "image": png(picture(0, 48, 32)), "text": "a red square", "split": "train"},
        {"id": "p1", "image": jpeg(picture(1, 40, 40)), "text": None, "split": "train"},
        {"id": "junk", "image": b"<html>not an image</html>", "text": "junk", "split": "train"},
        {"id": "p2", "image": png(picture(2, 64, 32)), "text": "held out", "split": "test"},  # the user's filter drops it
    ]


@pytest.fixture(scope="module")
def encoded_both(ray_session, tmp_path_factory):
    """The job's latents/ and the processor's rows (the user's filter before it, a map after it) for the same images."""
    import ray.data

    from image_helpers import write_table
    from pipelines import build_encoding_processor
    from pipelines.encoding.encode import run_encoding
    from pipelines.runtime.config import EncodeConfig

    root = tmp_path_factory.mktemp("encode-api")
    table = write_table(root / "images.parquet", image_rows())
    run_encoding(EncodeConfig(images=table, output=str(root / "out"), **ENCODE_OPTIONS))
    job = pd.read_parquet(root / "out" / "latents").set_index("id")
    job_errors = pd.read_parquet(root / "out" / "errors").set_index("id")

    processor = build_encoding_processor(**ENCODE_OPTIONS)
    dataset = ray.data.from_items(image_rows(), override_num_blocks=2).filter(lambda row: row["split"] == "train")
    rows = processor(dataset).map(lambda row: {**row, "has_latent": row["latent"] is not None}).take_all()
    return job, job_errors, {row["id"]: row for row in rows}


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_encoding_rows_keep_their_columns_and_equal_the_jobs_latents(encoded_both):
    job, _, rows = encoded_both
    assert sorted(rows) == ["junk", "p0", "p1"]
    for row_id in ("p0", "p1"):
        row = rows[row_id]
        assert row["error"] is None and row["has_latent"] and row["split"] == "train" and isinstance(row["image"], bytes)
        assert row["text"] == (None if pd.isna(job.loc[row_id, "caption"]) else job.loc[row_id, "caption"])
        assert row["seed"] == job.loc[row_id, "seed"]
        for column in ("latent_shape", "original_size", "crop_top_left", "target_size"):
            assert list(row[column]) == list(job.loc[row_id, column]), column
        for column in ("latent", "latent_flipped", "prompt_embeds"):
            np.testing.assert_allclose(dense(row[column]), dense(job.loc[row_id, column]), rtol=1e-3, atol=1e-3, err_msg=column)
        assert row["caption_truncated"] == job.loc[row_id, "caption_truncated"]
        assert row["content_hash"] == job.loc[row_id, "content_hash"]


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_an_undecodable_image_is_an_error_row_with_the_jobs_reason(encoded_both):
    _, job_errors, rows = encoded_both
    junk = rows["junk"]
    assert junk["error"] == job_errors.loc["junk", "reason"] and junk["latent"] is None and not junk["has_latent"]
    assert junk["text"] == "junk" and junk["content_hash"] == job_errors.loc["junk", "content_hash"]


# -- imports and Ray -----------------------------------------------------------------------------


def test_import_is_cheap_and_the_processors_cpu_tasks_load_no_model_code():
    """``import pipelines`` loads neither torch nor Ray; the processor modules (imported by their CPU tasks) no torch."""
    import subprocess
    import sys

    code = ("import sys, pipelines; before = sorted(m for m in ('torch', 'ray') if m in sys.modules); "
            "import pipelines.generation.processor, pipelines.encoding.processor; "
            "print(before, sorted(m for m in ('torch', 'diffusers', 'workers.runtime.base') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[] []"
