"""Image-to-image in bulk: rows with an 'init_image' (a path, a URI or bytes) and a 'strength' equal the family's
diffusers Img2Img pipeline; bad sources and strengths go to errors/; families without one are refused; a rerun
resumes by id. Tiny models, 32 px, 3 steps, real local Ray and Parquet."""

from __future__ import annotations

import hashlib
import inspect
import io as bytes_io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import assert_images_match, read_image, text_arguments, write_prompts
from jobs import cli
from pipelines.generation.generate import run_generation
from pipelines.runtime.config import GenerateConfig

STEPS, SIZE, GUIDANCE = 3, 32, 4.0


def save_source(path, seed: int, size=(SIZE, SIZE)) -> str:
    """A PNG of random colour blocks (the Img2Img output must keep some of it)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).save(path)
    return str(path)


def img2img_reference(model_dir: str, row: dict, source: str, strength: float) -> np.ndarray:
    """What the family's diffusers Img2Img pipeline draws for one row from its source image file."""
    import diffusers
    import torch

    from workers.families import FAMILIES

    index = diffusers.DiffusionPipeline.load_config(model_dir)
    pipe = getattr(diffusers, FAMILIES[index["_class_name"]].img2img_pipeline_class).from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    size = {name: SIZE for name in ("height", "width") if name in inspect.signature(pipe.__call__).parameters}
    # Qwen-Image reads guidance_scale only with a guidance embedding (its CFG is true_cfg_scale), as latentray passes it
    guidance = None if index["_class_name"] == "QwenImagePipeline" else GUIDANCE
    image = pipe(**text_arguments(pipe, row["prompt"], None), image=Image.open(source), strength=strength,
                 num_inference_steps=STEPS, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(row["seed"]),
                 output_type="np", **size).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2img")
    (root / "junk.png").write_bytes(b"not an image at all")
    return {"root": root, "a": save_source(root / "sources" / "a.png", 1), "b": save_source(root / "sources" / "b.png", 2),
            "wide": save_source(root / "sources" / "wide.png", 3, size=(48, 40))}


def rows_of(sources: dict) -> list[dict]:
    return [
        {"id": "a", "prompt": "a red cat", "seed": 1, "init_image": "sources/a.png", "strength": 0.6},  # relative to the table
        {"id": "b-default", "prompt": "a blue dog", "seed": 2, "init_image": sources["b"], "strength": None},  # --strength
        {"id": "wide", "prompt": "a green owl", "seed": 3, "init_image": "sources/wide.png", "strength": 0.5},  # resized, cropped
        {"id": "text", "prompt": "a red cat", "seed": 1, "init_image": None, "strength": None},  # text-to-image
        {"id": "missing", "prompt": "x", "seed": 4, "init_image": "sources/missing.png", "strength": 0.5},
        {"id": "junk", "prompt": "x", "seed": 5, "init_image": "junk.png", "strength": 0.5},
        {"id": "too-strong", "prompt": "x", "seed": 6, "init_image": "sources/a.png", "strength": 1.5},
        {"id": "nan", "prompt": "x", "seed": 7, "init_image": "sources/a.png", "strength": float("nan")},
        {"id": "no-source", "prompt": "x", "seed": 8, "init_image": None, "strength": 0.5},
    ]


BAD_REASONS = {
    "missing": "init_image: cannot read",
    "junk": "not a recognised image format",
    "too-strong": "strength: must be between 0 and 1, got 1.5",
    "nan": "strength: must be between 0 and 1, got nan",
    "no-source": "strength is 0.5 but the row has no init_image",
}


@pytest.fixture(scope="module")
def img2img_run(ray_session, sources):
    root = sources["root"]
    prompts = write_prompts(root / "prompts.parquet", rows_of(sources))
    config = GenerateConfig(prompts=prompts, output=str(root / "out"), model="tiny", steps=STEPS, guidance=GUIDANCE,
                            height=SIZE, width=SIZE, strength=0.7, batch_size=8, placement="fused")
    return root / "out", run_generation(config)


def test_rows_equal_diffusers_img2img_and_text_rows_stay_text_to_image(img2img_run, sources, tiny_model_dir):
    output, _ = img2img_run
    manifest = pd.read_parquet(output / "manifest").set_index("id")
    images = {row_id: read_image(output / manifest.loc[row_id, "image_path"]) for row_id in ("a", "b-default", "text")}
    rows = {row["id"]: row for row in rows_of(sources)}
    assert_images_match(images["a"], img2img_reference(tiny_model_dir, rows["a"], sources["a"], 0.6))
    assert_images_match(images["b-default"], img2img_reference(tiny_model_dir, rows["b-default"], sources["b"], 0.7))
    # same prompt and seed as "a": only the source image makes them differ
    assert np.abs(images["a"].astype(int) - images["text"]).max() > 10


def test_bad_sources_and_strengths_go_to_errors_naming_the_column_and_the_job_goes_on(img2img_run, sources):
    output, record = img2img_run
    errors = pd.read_parquet(output / "errors").set_index("id")
    assert sorted(errors.index) == sorted(BAD_REASONS)
    for row_id, reason in BAD_REASONS.items():
        assert reason in errors.loc[row_id, "reason"], errors.loc[row_id, "reason"]
    assert set(errors["cause"]) == {"permanent"}  # a missing source included (a refused read: tests/test_faults.py)
    counts = record["counts"]
    assert record["status"] == "complete" and counts["error_rows"] == len(BAD_REASONS)
    assert counts["ok_rows"] + counts["error_rows"] == counts["input_rows"] == len(rows_of(sources))


def test_manifest_records_each_rows_source_its_sha256_and_strength(img2img_run, sources):
    output, _ = img2img_run
    manifest = pd.read_parquet(output / "manifest").set_index("id")
    assert manifest.loc["a", "init_image"] == "file://" + sources["a"]  # resolved against the table's folder
    assert manifest.loc["a", "init_image_sha256"] == hashlib.sha256(open(sources["a"], "rb").read()).hexdigest()
    assert manifest.loc["a", "strength"] == 0.6 and manifest.loc["b-default", "strength"] == 0.7
    assert manifest.loc["wide", "init_image_sha256"] == hashlib.sha256(open(sources["wide"], "rb").read()).hexdigest()
    assert pd.isna(manifest.loc["text", "init_image"]) and pd.isna(manifest.loc["text", "strength"])


def test_the_report_shows_each_source_beside_its_result(img2img_run, sources):
    from pipelines.report import generated_samples, write_report

    output, record = img2img_run
    samples = {sample.row_id: sample for sample in generated_samples(str(output), 16, record)}
    assert np.array_equal(np.asarray(samples["a"].source), np.asarray(Image.open(sources["a"]).convert("RGB")))
    assert samples["wide"].source.size == (48, 40) and samples["text"].source is None
    written = write_report(str(output))
    page = open(written.html).read()
    assert 'alt="source of a"' in page and 'alt="source of text"' not in page


def test_a_lora_row_with_a_source_image_equals_diffusers_img2img_with_the_lora(ray_session, tiny_model_dir, tmp_path):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from test_lora import save_lora

    lora = save_lora(tiny_model_dir, str(tmp_path / "style.safetensors"), seed=7)
    source = save_source(tmp_path / "source.png", 11)
    row = {"id": "both", "prompt": "a red cat", "seed": 5, "init_image": source, "strength": 0.6, "lora": lora, "lora_scale": 0.8}
    config = GenerateConfig(prompts=write_prompts(tmp_path / "prompts.parquet", [row]), output=str(tmp_path / "out"), model="tiny",
                            steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE)
    assert run_generation(config)["counts"]["ok_rows"] == 1
    manifest = pd.read_parquet(tmp_path / "out" / "manifest")

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    expected = pipe(row["prompt"], image=Image.open(source), strength=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert_images_match(read_image(tmp_path / "out" / manifest["image_path"][0]), (expected * 255).round().astype(np.uint8))


def test_a_rerun_resumes_by_id_and_another_strength_is_another_output(ray_session, tmp_path):
    rows = [{"id": "a", "prompt": "a red cat", "seed": 1, "init_image": save_source(tmp_path / "a.png", 1), "strength": None},
            {"id": "text", "prompt": "a red cat", "seed": 3, "init_image": None, "strength": None}]
    prompts = write_prompts(tmp_path / "prompts.parquet", rows)
    config = GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny", steps=STEPS, height=SIZE, width=SIZE)
    assert run_generation(config)["counts"]["generated_this_run"] == 2
    assert run_generation(config)["counts"]["generated_this_run"] == 0  # resumed by id: nothing left to do
    with pytest.raises(ValueError, match=r"different configuration \(strength was 0.8, now 0.5"):
        run_generation(GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny", steps=STEPS, height=SIZE,
                                      width=SIZE, strength=0.5))


def test_processor_takes_source_bytes_and_its_strength_option(img2img_run, sources, tiny_model_dir, ray_session):
    import ray.data

    from pipelines import build_generation_processor

    processor = build_generation_processor(model="tiny", steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE, strength=0.6)
    data = open(sources["a"], "rb").read()
    rows = [{"id": "bytes", "prompt": "a red cat", "seed": 1, "init_image": data}]
    result = processor(ray.data.from_items(rows, override_num_blocks=1)).take_all()[0]
    assert result["error"] is None and result["init_image"] == "input bytes" and result["strength"] == 0.6
    assert result["init_image_sha256"] == hashlib.sha256(data).hexdigest()
    image = np.asarray(Image.open(bytes_io.BytesIO(result["image"])).convert("RGB"))
    assert_images_match(image, img2img_reference(tiny_model_dir, rows[0], sources["a"], 0.6))


@pytest.mark.parametrize("model, options, message", [
    ("tiny-flux2", [], "init_image: flux2-klein models (Flux2KleinPipeline) have no image-to-image pipeline"),
    ("tiny", ["--placement", "split"], "placement: image-to-image rows (init_image) run in fused placement"),
    ("tiny", ["--strength", "1.2"], "strength: must be between 0 and 1, got 1.2"),
])
def test_whole_job_problems_stop_the_cli_with_exit_2_before_any_model_loads(tmp_path, capsys, model, options, message):
    prompts = write_prompts(tmp_path / "prompts.parquet", [{"prompt": "a cat", "init_image": "a.png"}])
    status = cli.main(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", model, *options])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.slow  # a job per family: ~10-20 s each on this machine
@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-zimage", "tiny-qwenimage"])
def test_every_family_with_an_img2img_pipeline_equals_it(ray_session, tmp_path, preset):
    from workers.runtime.presets import materialize_preset

    source = save_source(tmp_path / "source.png", 4)
    rows = [{"id": "a", "prompt": "a red circle", "seed": 5, "init_image": source, "strength": 0.6},
            {"id": "b", "prompt": "a blue square", "seed": 6, "init_image": source, "strength": 0.6}]
    prompts = write_prompts(tmp_path / "prompts.parquet", rows)
    record = run_generation(GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model=preset, steps=STEPS,
                                           guidance=GUIDANCE, height=SIZE, width=SIZE))
    assert record["counts"]["ok_rows"] == 2, record["error_reasons"]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest").set_index("id")
    for row in rows:
        expected = img2img_reference(materialize_preset(preset), row, source, 0.6)
        assert_images_match(read_image(tmp_path / "out" / manifest.loc[row["id"], "image_path"]), expected)
