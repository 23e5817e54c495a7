"""Model families through the jobs: generation and encoding on a real local Ray, and the
whole-job checks that stop a run before any model loads (exit 2, a message, no traceback)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from helpers import assert_images_match, diffusers_reference, export_variant, read_image, write_prompts
from image_helpers import picture, png, write_table
from jobs.cli import main
from pipelines.encoding.encode import run_encoding
from pipelines.encoding.latent_output import latents_of
from pipelines.generation.generate import run_generation
from pipelines.runtime import io
from pipelines.runtime.config import EncodeConfig, GenerateConfig
from workers.runtime.presets import export_preset, materialize_preset


def run_cli(args, capsys) -> tuple[int, str]:
    status = main(args)
    return status, capsys.readouterr().err


# -- generation ---------------------------------------------------------------------------------


# preset -> (size multiple, latent channels, family name)
FAMILY_SHAPES = {"tiny-flux": (16, 16, "flux"), "tiny-sdxl": (8, 4, "sdxl"), "tiny-flux2": (16, 128, "flux2-klein")}


@pytest.mark.parametrize("preset, placement", [("tiny-flux", "split"), ("tiny-sdxl", "fused"), ("tiny-flux2", "fused")])
def test_generation_draws_what_the_family_pipeline_draws(ray_session, tmp_path, preset, placement):
    rows = [
        {"id": "a", "prompt": "a red circle", "negative_prompt": "", "seed": 5, "height": 64, "width": 64},
        {"id": "b", "prompt": "a blue square", "negative_prompt": "blurry", "seed": 6, "height": 32, "width": 64},
        {"id": "odd", "prompt": "a green triangle", "negative_prompt": "", "seed": 7, "height": 40, "width": 64},
    ]
    table = [dict(row) for row in rows]
    if preset == "tiny-sdxl":  # SDXL micro-conditioning from per-row columns
        for row, size in zip(table, ([256, 256], None, None)):
            row["original_size"] = size
    prompts = write_prompts(tmp_path / "prompts.parquet", table)
    output = tmp_path / "out"
    record = run_generation(GenerateConfig(prompts=prompts, output=str(output), model=preset, steps=3, guidance=4.0, placement=placement))

    # the odd size goes to errors naming the family's multiple; the others equal diffusers
    multiple, channels, family = FAMILY_SHAPES[preset]
    counts = record["counts"]
    if multiple == 16:
        errors = pd.read_parquet(output / "errors").set_index("id")
        assert counts["ok_rows"] == 2 and counts["error_rows"] == 1
        assert errors.loc["odd", "reason"] == "height must be a positive multiple of 16, got 40"
    else:
        assert counts["ok_rows"] == 3 and counts["error_rows"] == 0
    manifest = pd.read_parquet(output / "manifest").set_index("id").sort_index()
    good = [row for row in table if row["height"] % multiple == 0]
    expected = diffusers_reference(materialize_preset(preset), [
        dict(row, num_inference_steps=3, guidance_scale=4.0) for row in good
    ])
    for row, image in zip(good, expected):
        assert_images_match(read_image(output / manifest.loc[row["id"], "image_path"]), image)
    stats = json.load(open(output / "latent_stats.json"))
    assert stats["latent_channels"] == channels and len(stats["mean"]) == channels
    assert record["identity"]["family"] == family


# -- encoding -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    rows = [{"id": f"img-{index}", "image": png(picture(index, 64, 64)), "caption": caption}
            for index, caption in enumerate(["a red circle", "word " * 40, None])]
    return write_table(folder / "images.parquet", rows)


# preset -> (latent channels, latent cells per side of a 64-pixel image): FLUX.2 stores 2x2 patches
LATENT_LAYOUTS = {"tiny-sdxl": (4, 8), "tiny-sd3": (16, 8), "tiny-flux": (16, 8), "tiny-flux2": (128, 4)}
# the long text encoder's token budget: short enough that the long caption loses tokens
# (FLUX.2's chat template alone takes 38 of them); SDXL's CLIP keeps 77
TOKEN_BUDGETS = {"tiny-sdxl": None, "tiny-sd3": 32, "tiny-flux": 32, "tiny-flux2": 64}


def reference_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """What the family's denoiser trains on, by diffusers' own functions (posterior means)."""
    vae = pipe.vae
    with torch.no_grad():
        if type(pipe).__name__ == "Flux2KleinPipeline":  # patchified, batch-norm normalised: its image conditioning
            return pipe._encode_vae_image(pixels, generator=None)
        return (vae.encode(pixels).latent_dist.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def reference_embeddings(pipe, preset: str, captions: list[str]) -> dict[str, torch.Tensor]:
    """What the family's encode_prompt returns for each caption, named as latentray stores it."""
    budget = TOKEN_BUDGETS[preset]
    with torch.no_grad():
        if preset == "tiny-flux2":
            return {"prompt_embeds": pipe.encode_prompt(captions, max_sequence_length=budget)[0]}
        if preset == "tiny-flux":
            prompt_embeds, pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=budget)
        elif preset == "tiny-sd3":
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False, max_sequence_length=budget)
        else:
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def reference_decode(pipe, latents: np.ndarray) -> np.ndarray:
    """uint8 images of latents as the denoiser sees them, decoded as the family's pipeline decodes its final latents."""
    vae, latents = pipe.vae, torch.from_numpy(latents)
    with torch.no_grad():
        if type(pipe).__name__ == "Flux2KleinPipeline":  # the tail of its __call__: de-normalise, unpatchify
            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            latents = pipe._unpatchify_latents(latents * std + mean)
        else:
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents).sample
    return (pipe.image_processor.postprocess(decoded, output_type="np") * 255).round().astype(np.uint8)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2"])
def test_encoding_stores_the_family_latents_and_encode_prompt_embeddings(ray_session, tmp_path, captioned_images, preset):
    from diffusers import DiffusionPipeline

    output = tmp_path / "latents"
    record = run_encoding(EncodeConfig(
        images=captioned_images, output=str(output), model=preset, resolution=64, caption_column="caption",
        text_embeddings=True, latent_dtype="float32", max_sequence_length=TOKEN_BUDGETS[preset],
    ))
    assert record["counts"]["ok_rows"] == 3
    table = pq.read_table(output / "latents").sort_by("id")
    pipe = DiffusionPipeline.from_pretrained(materialize_preset(preset), local_files_only=True)

    # 1. latents: what the family's denoiser sees, [C, H/f, W/f]
    pixels = torch.from_numpy(np.stack([picture(index, 64, 64) for index in range(3)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = np.stack(latents_of(table))
    channels, cells = LATENT_LAYOUTS[preset]
    assert latents.shape == (3, channels, cells, cells)
    np.testing.assert_allclose(latents, reference_latents(pipe, pixels).numpy(), atol=1e-4)
    if preset == "tiny-flux2":  # a trainer packs a stored row into the tokens the pipeline feeds its transformer
        with torch.no_grad():
            tokens, _ = pipe.prepare_image_latents([pixels[:1]], batch_size=1, generator=None, device="cpu", dtype=torch.float32)
        np.testing.assert_allclose(pipe._pack_latents(torch.from_numpy(latents[:1])).numpy(), tokens.numpy(), atol=1e-4)

    # 2. embeddings: what the family's encode_prompt returns for the caption ("" for none), within 1e-4
    captions = [text or "" for text in table.column("caption").to_pylist()]
    for name, expected in reference_embeddings(pipe, preset, captions).items():
        np.testing.assert_allclose(np.stack(latents_of(table, name)), expected.numpy(), atol=1e-4)
    assert table.column("caption_truncated").to_pylist() == [False, True, False]  # the long caption past the budget
    stats = json.load(open(output / "latent_stats.json"))
    assert len(stats["mean"]) == channels

    # 3. the report decodes sample latents with the family's VAE, as the family's pipeline decodes
    if preset in ("tiny-flux", "tiny-flux2"):
        from pipelines.report import decoded_samples, write_report

        samples = decoded_samples(str(output), json.load(open(output / "run.json")), 3)
        for sample, pixels in zip(samples, reference_decode(pipe, latents)):
            assert_images_match(np.asarray(sample.image), pixels)
        assert os.path.isfile(write_report(str(output), samples=3).contact_sheet)


# -- whole-job problems: exit 2 before any model loads -------------------------------------------


def test_unknown_pipeline_class_is_named_with_the_supported_ones(tmp_path, capsys, model_cache):
    model = tmp_path / "model"
    shutil.copytree(materialize_preset("tiny"), model)
    index = json.load(open(model / "model_index.json"))
    json.dump({**index, "_class_name": "KandinskyV22Pipeline"}, open(model / "model_index.json", "w"))
    prompts = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", str(model)], capsys)
    assert status == 2 and "is a 'KandinskyV22Pipeline' pipeline; latentray runs Flux2KleinPipeline, FluxPipeline" in err
    assert "Traceback" not in err


def test_missing_component_and_pickled_weights_are_named(tmp_path, capsys, model_cache):
    prompts = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    model = tmp_path / "flux"
    export_preset("tiny-flux", str(model))
    index = json.load(open(model / "model_index.json"))
    json.dump({key: value for key, value in index.items() if key != "text_encoder_2"}, open(model / "model_index.json", "w"))
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", str(model)], capsys)
    assert status == 2 and "has no 'text_encoder_2' component" in err

    json.dump(index, open(model / "model_index.json", "w"))
    weights = model / "text_encoder_2" / "model.safetensors"
    weights.rename(model / "text_encoder_2" / "pytorch_model.bin")
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", str(model)], capsys)
    assert status == 2 and "component 'text_encoder_2'" in err and "no .safetensors weights" in err


def test_sd3_without_t5_runs_as_diffusers_allows(tmp_path, model_cache):
    from workers.generation.denoiser import DenoiserWorker
    from workers.generation.fused import FusedGenerationWorker
    from workers.generation.text_encoder import TextEncoderWorker
    from workers.generation.vae_decoder import VaeDecoderWorker

    model = tmp_path / "sd3"
    export_preset("tiny-sd3", str(model))
    index = json.load(open(model / "model_index.json"))
    json.dump({**index, "text_encoder_3": [None, None], "tokenizer_3": [None, None]}, open(model / "model_index.json", "w"))
    shutil.rmtree(model / "text_encoder_3")
    shutil.rmtree(model / "tokenizer_3")
    row = {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32}
    batch = {name: np.array([value], dtype=object if isinstance(value, str) else None) for name, value in row.items()}
    image = FusedGenerationWorker(str(model), threads=2)(batch)["image"][0]
    reference = diffusers_reference(str(model), [row], load_options={"text_encoder_3": None, "tokenizer_3": None})
    assert_images_match(image, reference[0])
    # split: the text stage reads the transformer's config (T5's place is zeros of its width), not its weights
    stages = [TextEncoderWorker(str(model), threads=2), DenoiserWorker(str(model), threads=2), VaeDecoderWorker(str(model), threads=2)]
    for stage in stages:
        batch = stage(batch)
    assert_images_match(batch["image"][0], reference[0])


@pytest.mark.parametrize("model, flags, message", [
    ("tiny-flux", ["--scheduler", "ddim"], "scheduler: 'ddim' does not fit flux models; choose one of flow-euler"),
    ("tiny", ["--scheduler", "flow-euler"], "scheduler: 'flow-euler' does not fit sd models"),
    ("tiny-zimage", ["--scheduler", "flow-heun"], "scheduler: 'flow-heun' does not fit zimage models; choose one of flow-euler"),
    ("tiny-sdxl", ["--true-cfg-scale", "2"], "true_cfg_scale: only FLUX models take it"),
    ("tiny", ["--max-sequence-length", "64"], "max_sequence_length: sd models have no long text encoder"),
    ("tiny-flux", ["--max-sequence-length", "600"], "max_sequence_length: flux models take at most 512 tokens, got 600"),
    ("tiny-flux", ["--width", "72"], "width: flux models need a multiple of 16, got 72"),
    ("tiny-flux2", ["--true-cfg-scale", "2"], "true_cfg_scale: FLUX.2 [klein] has no true CFG; base models run classifier-free guidance"),
    ("tiny-flux2", ["--height", "40"], "height: flux2-klein models need a multiple of 16, got 40"),
])
def test_options_that_do_not_fit_the_family_stop_the_run(tmp_path, capsys, model_cache, model, flags, message):
    prompts = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", model, *flags], capsys)
    assert status == 2 and message in err, err


# -- model identity -----------------------------------------------------------------------------


def test_fingerprint_reads_unchanged_weights_once(tmp_path, monkeypatch, model_cache):
    model = tmp_path / "model"
    export_preset("tiny", str(model))
    cache = tmp_path / "cache"
    reads: list[str] = []
    original = io._file_digest
    monkeypatch.setattr(io, "_file_digest", lambda path: reads.append(path) or original(path))
    first = io.fingerprint_tree(str(model), str(cache))
    files = len(reads)
    assert files >= 5
    assert io.fingerprint_tree(str(model), str(cache)) == first and len(reads) == files  # nothing read again
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte changed: that file is read again
    os.utime(weights, ns=(0, 10**18))
    assert io.fingerprint_tree(str(model), str(cache)) != first and len(reads) == files + 1


def test_zimage_encodes_latents_and_says_why_not_embeddings(ray_session, tmp_path, captioned_images, capsys):
    status, err = run_cli(["encode", "--images", captioned_images, "--output", str(tmp_path / "refused"), "--model", "tiny-zimage",
                           "--resolution", "64", "--caption-column", "caption", "--text-embeddings"], capsys)
    assert status == 2 and "text_embeddings: zimage caption embeddings differ in length per caption" in err
    record = run_encoding(EncodeConfig(images=captioned_images, output=str(tmp_path / "latents"), model="tiny-zimage", resolution=64))
    latents = latents_of(pq.read_table(tmp_path / "latents" / "latents"))
    assert record["counts"]["ok_rows"] == 3 and all(latent.shape == (16, 8, 8) for latent in latents)


def test_flux_schnell_defaults_to_its_few_steps_and_no_guidance(tmp_path, model_cache):
    from pipelines.runtime.model_source import describe_model

    model = tmp_path / "schnell"
    export_preset("tiny-flux", str(model))
    config_path = model / "transformer" / "config.json"
    json.dump({**json.load(open(config_path)), "guidance_embeds": False}, open(config_path, "w"))
    schnell, dev = describe_model(str(model)).shape, describe_model("tiny-flux").shape
    assert (schnell.default_steps, schnell.default_guidance) == (4, 0.0)
    assert (dev.default_steps, dev.default_guidance, dev.size_multiple, dev.latent_channels) == (28, 3.5, 16, 16)


def test_flux2_klein_exports_for_diffusers_and_describes_each_variant(tmp_path, model_cache):
    from diffusers import Flux2KleinPipeline

    from pipelines.runtime.model_source import describe_model

    # `latentray model export` writes what Flux2KleinPipeline loads: the base variant
    assert main(["model", "export", "tiny-flux2", str(tmp_path / "base")]) == 0
    pipe = Flux2KleinPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    assert not pipe.config.is_distilled and pipe.text_encoder.config.num_hidden_layers == 28
    assert pipe.transformer.config.joint_attention_dim == 3 * pipe.text_encoder.config.hidden_size
    assert not list((tmp_path / "base").rglob("*.bin"))  # safetensors only

    # the distilled variant is the same layout with is_distilled: its few steps, guidance ignored
    distilled = export_variant("tiny-flux2", tmp_path / "distilled", is_distilled=True)
    base, step_distilled = describe_model(str(tmp_path / "base")).shape, describe_model(distilled).shape
    assert (base.default_steps, base.default_guidance, step_distilled.default_steps, step_distilled.default_guidance) == (50, 4.0, 4, 1.0)
    assert (base.size_multiple, base.latent_channels, base.vae_scale_factor, base.default_height) == (16, 128, 16, 1024)
