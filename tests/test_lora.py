"""Per-row LoRA: rows name LoRA files and weights; each image equals diffusers' pipeline after
``load_lora_weights`` and ``set_adapters``, rows without one equal the base model, and files that
cannot be applied send their rows to errors/. Tiny SD preset, 32 px, 2 steps, real local Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from helpers import assert_images_match, read_image, write_prompts
from jobs import cli
from pipelines.generation.generate import run_generation
from pipelines.runtime.config import GenerateConfig

STEPS, SIZE = 2, 32
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def save_lora(model_dir: str, path: str, seed: int, *, unet: bool = True, text_encoder: bool = False, alpha: int = 4) -> str:
    """A LoRA of the tiny model with random non-zero weights (so it changes the image), saved as diffusers saves one;
    ``alpha`` other than the rank (4) is stored as diffusers' training scripts store it: in the header's metadata."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(seed)
    layers = {}
    if unet:
        config = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)
        inject_adapter_in_model(config, pipe.unet)
        layers["unet_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        layers["unet_lora_adapter_metadata"] = config.to_dict() if alpha != 4 else None
    if text_encoder:
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
    StableDiffusionPipeline.save_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), **layers)
    return path


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """Four LoRAs of the tiny model (one with text-encoder layers), and three files that cannot be applied."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("loras")
    files = {
        "a": save_lora(tiny_model_dir, str(root / "a.safetensors"), 1),
        "b": save_lora(tiny_model_dir, str(root / "b.safetensors"), 2, text_encoder=True),
        "c": save_lora(tiny_model_dir, str(root / "c.safetensors"), 3, alpha=12),  # scaled by alpha / rank = 3
    }
    weights = load_file(files["a"])
    files["pickled"] = str(root / "pickled.bin")
    torch.save(weights, files["pickled"])
    # another model's LoRA: the same layer names at other widths (every weight's shape differs)...
    save_file({key: torch.zeros(value.shape[0], 3) if ".down." in key else value for key, value in weights.items()},
              str(root / "wider.safetensors"))
    files["wider"] = str(root / "wider.safetensors")
    # ... and layer names this model does not have
    save_file({key.replace("to_q", "to_query"): value for key, value in weights.items()}, str(root / "renamed.safetensors"))
    files["renamed"] = str(root / "renamed.safetensors")
    files["missing"] = str(root / "missing.safetensors")
    return files


def rows_of(loras: dict[str, str]) -> list[dict]:
    def row(row_id, prompt, seed, names=None, scale=None):
        return {"id": row_id, "prompt": prompt, "seed": seed, "lora": None if names is None else [loras[name] for name in names],
                "lora_scale": scale}

    # with --max-loras-per-actor 2, a, b, c and a again make the actor evict and reload adapters
    return [
        row("a", "a red cat", 1, ["a"], [0.7]),
        row("base-after-a", "a red cat", 1, []),
        row("b", "a blue dog", 2, ["b"]),  # text-encoder layers too
        row("base-after-b", "a blue dog", 2, []),  # same prompt: its embedding must not come from b's
        row("ab", "a blue dog", 3, ["a", "b"], [0.5, 1.0]),
        row("c", "a green owl", 4, ["c"], [1.5]),
        row("a-again", "a red cat", 5, ["a"]),
        row("missing", "x", 6, ["missing"]),
        row("pickled", "x", 7, ["pickled"]),
        row("wider", "x", 8, ["wider"]),
        row("renamed", "x", 9, ["renamed"]),
        row("scales", "x", 10, ["a"], [0.5, 0.5]),
        row("inf", "x", 11, ["a"], [float("inf")]),
    ]


BAD_REASONS = {
    "missing": "cannot read it",
    "pickled": "not a safetensors file",
    "wider": "its keys do not fit the model",
    "renamed": "its keys do not fit the model",
    "scales": "lora_scale has 2 values for 1 lora files",
    "inf": "lora_scale must be finite numbers",
}


def reference(model_dir: str, row: dict) -> np.ndarray:
    """diffusers' own pipeline after load_lora_weights(file) and set_adapters(..., adapter_weights=scale)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    names = [f"adapter{index}" for index in range(len(row["lora"] or []))]
    for name, path in zip(names, row["lora"] or []):
        pipe.load_lora_weights(path, adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=row["lora_scale"] or [1.0] * len(names))
    image = pipe(row["prompt"], num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                 generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def lora_run(ray_session, loras, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-run")
    prompts = write_prompts(root / "prompts.parquet", rows_of(loras))
    config = GenerateConfig(prompts=prompts, output=str(root / "out"), model="tiny", steps=STEPS, height=SIZE, width=SIZE,
                            batch_size=16, max_loras_per_actor=2, placement="fused")
    return root / "out", run_generation(config)


def test_each_row_equals_diffusers_with_its_loras_and_rows_without_equal_the_base_model(lora_run, loras, tiny_model_dir):
    output, record = lora_run
    manifest = pd.read_parquet(output / "manifest").set_index("id")
    for row in rows_of(loras):
        if row["id"] in BAD_REASONS:
            continue
        assert_images_match(read_image(output / manifest.loc[row["id"], "image_path"]), reference(tiny_model_dir, row))
    # the LoRAs changed the images: the test would pass with LoRAs ignored otherwise
    assert np.abs(read_image(output / manifest.loc["a", "image_path"]).astype(int)
                  - read_image(output / manifest.loc["base-after-a", "image_path"])).max() > 10


def test_files_that_cannot_be_applied_go_to_errors_with_the_reason_and_the_job_goes_on(lora_run, loras):
    output, record = lora_run
    errors = pd.read_parquet(output / "errors").set_index("id")
    assert sorted(errors.index) == sorted(BAD_REASONS)
    for row_id, reason in BAD_REASONS.items():
        assert reason in errors.loc[row_id, "reason"], errors.loc[row_id, "reason"]
    counts = record["counts"]
    assert record["status"] == "complete" and counts["error_rows"] == len(BAD_REASONS)
    assert counts["ok_rows"] + counts["error_rows"] == counts["input_rows"] == len(rows_of(loras))


def test_manifest_records_each_rows_files_digests_and_weights_and_run_json_the_set(lora_run, loras):
    import hashlib

    output, record = lora_run
    manifest = pd.read_parquet(output / "manifest").set_index("id")
    digest = {name: hashlib.sha256(open(loras[name], "rb").read()).hexdigest() for name in ("a", "b", "c")}
    assert list(manifest.loc["ab", "lora"]) == [loras["a"], loras["b"]]
    assert list(manifest.loc["ab", "lora_sha256"]) == [digest["a"], digest["b"]]
    assert list(manifest.loc["ab", "lora_scale"]) == [0.5, 1.0]
    assert list(manifest.loc["a-again", "lora_scale"]) == [1.0]
    assert list(manifest.loc["base-after-a", "lora"]) == [] and list(manifest.loc["base-after-a", "lora_sha256"]) == []
    used = {entry["uri"]: entry for entry in json.loads((output / "run.json").read_text())["loras"]}
    assert set(used) == {loras["a"], loras["b"], loras["c"]}
    assert used[loras["a"]]["sha256"] == digest["a"] and used[loras["a"]]["rows"] == 3
    assert used[loras["a"]]["scales"] == [0.5, 0.7, 1.0]


@pytest.mark.parametrize("options, message", [
    (["--lora-scale", "0.5"], "lora_scale: given without lora"),
    (["--lora", "/a.safetensors", "--lora", "/b.safetensors", "--lora-scale", "0.5"], "lora_scale: 1 values for 2 lora files"),
    (["--lora", "/a.safetensors", "--placement", "split"], "placement: per-row LoRA runs in fused placement"),
])
def test_whole_job_lora_problems_stop_the_cli_before_any_model_loads(tmp_path, capsys, options, message):
    prompts = write_prompts(tmp_path / "prompts.parquet", [{"prompt": "a cat"}])
    status = cli.main(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", "tiny", *options])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_ray_job_carries_the_lora_options_and_refuses_a_relative_file(tmp_path):
    from jobs.submit import job_request_from_arguments

    prompts = write_prompts(tmp_path / "prompts.parquet", [{"prompt": "a cat"}])
    arguments = ["--prompts", prompts, "--output", str(tmp_path / "out"), "--model", "tiny"]
    request = job_request_from_arguments("generate", [*arguments, "--lora", "s3://bucket/a.safetensors", "--lora-scale", "0.5"])
    assert "--lora s3://bucket/a.safetensors --lora-scale 0.5" in request.entrypoint
    other = job_request_from_arguments("generate", [*arguments, "--lora", "s3://bucket/a.safetensors", "--lora-scale", "0.6"])
    assert other.fingerprint != request.fingerprint  # another weight is another job
    with pytest.raises(ValueError, match="lora: 'a.safetensors' is a relative path"):
        job_request_from_arguments("generate", [*arguments, "--lora", "a.safetensors"])


def test_processor_applies_run_default_loras_to_rows_without_their_own(lora_run, loras, ray_session, model_cache):
    """--lora / --lora-scale as the processor's options: a null 'lora' takes them, [] is the base model; a file
    on object storage (moto's S3) is copied once into the node's cache and applies as the local one."""
    import io as bytes_io

    import boto3
    import ray.data
    from PIL import Image

    from pipelines import build_generation_processor

    boto3.client("s3").create_bucket(Bucket="latentray-lora")
    boto3.client("s3").upload_file(loras["a"], "latentray-lora", "loras/a.safetensors")
    output, _ = lora_run
    manifest = pd.read_parquet(output / "manifest").set_index("id")
    processor = build_generation_processor(model="tiny", steps=STEPS, height=SIZE, width=SIZE, lora=[loras["a"]], lora_scale=[0.7])
    rows = [{"id": "default", "prompt": "a red cat", "seed": 1, "lora": None},
            {"id": "none", "prompt": "a red cat", "seed": 1, "lora": []},
            {"id": "missing", "prompt": "a red cat", "seed": 1, "lora": [loras["missing"]]},
            {"id": "s3", "prompt": "a red cat", "seed": 5, "lora": ["s3://latentray-lora/loras/a.safetensors"]},
            {"id": "s3-again", "prompt": "a blue dog", "seed": 5, "lora": ["s3://latentray-lora/loras/a.safetensors"]}]
    results = {row["id"]: row for row in processor(ray.data.from_items(rows, override_num_blocks=1)).take_all()}
    for row_id, job_row in (("default", "a"), ("none", "base-after-a"), ("s3", "a-again")):
        image = np.asarray(Image.open(bytes_io.BytesIO(results[row_id]["image"])).convert("RGB"))
        assert_images_match(image, read_image(output / manifest.loc[job_row, "image_path"]))
    assert list(results["default"]["lora"]) == [loras["a"]] and list(results["default"]["lora_scale"]) == [0.7]
    assert list(results["default"]["lora_sha256"]) == list(manifest.loc["a", "lora_sha256"])
    assert list(results["none"]["lora"]) == [] and results["none"]["error"] is None
    assert "cannot read it" in results["missing"]["error"] and results["missing"]["image"] is None
    assert list(results["s3"]["lora_sha256"]) == list(results["default"]["lora_sha256"]) and results["s3-again"]["error"] is None
    copies = [path.name for path in (model_cache / "files").rglob("*.safetensors") if not path.is_symlink()]
    assert copies == ["a.safetensors"]  # one copy on the node (local files are used where they are)


def test_a_rerun_after_a_lora_file_changed_is_refused_and_an_unchanged_one_has_nothing_to_do(lora_run, loras, tmp_path):
    """A row's LoRA is its file's content: an output whose rows used other bytes under the same URI is not resumed."""
    import shutil

    from pipelines.generation.generate import plan_generation

    output, record = lora_run
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    config = GenerateConfig(**{**record["config"], "output": str(copy)})
    assert plan_generation(config).finished  # unchanged files: every row accounted for, no model loads
    # the bytes of c as an earlier run saw them differ from the file now
    run = json.loads((copy / "run.json").read_text())
    for entry in run["loras"]:
        if entry["uri"] == loras["c"]:
            entry["sha256"] = "0" * 64
    (copy / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"lora: .*c\.safetensors' changed since 1 rows .* --overwrite"):
        plan_generation(config)


# the pipeline classes' save_lora_weights name the denoiser's layers after it
FAMILY_PRESETS = ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-zimage", "tiny-qwenimage", "tiny-flux2"]


def save_denoiser_lora(preset: str, path: str, seed: int) -> str:
    """A LoRA on the attention projections of a preset's U-Net or transformer, random non-zero weights."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from workers.runtime.presets import materialize_preset

    pipe = DiffusionPipeline.from_pretrained(materialize_preset(preset), local_files_only=True)
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]), getattr(pipe, name))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, name)))
    type(pipe).save_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), **{f"{name}_lora_layers": layers})
    return path


@pytest.mark.slow  # a job per family: 6-13 s each alone, ~20 s on a loaded machine
@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_every_family_applies_a_lora_as_its_diffusers_pipeline(ray_session, tmp_path, preset):
    from helpers import diffusers_reference
    from workers.runtime.presets import materialize_preset

    lora = save_denoiser_lora(preset, str(tmp_path / "lora.safetensors"), 7)
    rows = [{"id": "lora", "prompt": "a red circle", "seed": 5, "lora": [lora], "lora_scale": [0.8]},
            {"id": "base", "prompt": "a red circle", "seed": 5, "lora": [], "lora_scale": None}]
    prompts = write_prompts(tmp_path / "prompts.parquet", rows)
    record = run_generation(GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model=preset, steps=2, guidance=4.0,
                                           height=SIZE, width=SIZE))
    assert record["counts"]["ok_rows"] == 2, record["error_reasons"]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest").set_index("id")
    settings = {"negative_prompt": "", "num_inference_steps": 2, "guidance_scale": 4.0, "height": SIZE, "width": SIZE}
    images = {row_id: read_image(tmp_path / "out" / manifest.loc[row_id, "image_path"]) for row_id in ("lora", "base")}
    for row_id, loras in (("lora", [(lora, 0.8)]), ("base", None)):
        row = next(row for row in rows if row["id"] == row_id)
        assert_images_match(images[row_id], diffusers_reference(materialize_preset(preset), [{**row, **settings}], loras=loras)[0])
    assert np.abs(images["lora"].astype(int) - images["base"]).max() > 0  # the LoRA changed the image
