"""Model families through the jobs: generation and encoding on a real local Ray, and the
whole-job checks that stop a run before any model loads (exit 2, a message, no traceback)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
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
FAMILY_SHAPES = {"tiny-flux": (16, 16, "flux"), "tiny-sdxl": (8, 4, "sdxl"), "tiny-flux2": (16, 128, "flux2-klein"),
                 "tiny-qwenimage": (16, 16, "qwenimage")}


# tiny-qwenimage split: captions of their own lengths cross the object store from the text stage to the
# denoiser unpadded, and are padded per call as the pipeline pads them (its result would differ otherwise)
@pytest.mark.parametrize("preset, placement", [("tiny-flux", "split"), ("tiny-sdxl", "fused"), ("tiny-flux2", "fused"), ("tiny-qwenimage", "split")])
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
    # the family's own true_cfg_scale default: FLUX 1 (off), Qwen-Image 4, as their pipelines
    assert record["identity"]["true_cfg_scale"] == (4.0 if preset == "tiny-qwenimage" else 1.0)


# -- encoding -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    rows = [{"id": f"img-{index}", "image": png(picture(index, 64, 64)), "caption": caption}
            for index, caption in enumerate(["a red circle", "word " * 40, None])]
    return write_table(folder / "images.parquet", rows)


# preset -> (latent channels, latent cells per side of a 64-pixel image): FLUX.2 stores 2x2 patches
LATENT_LAYOUTS = {"tiny-sdxl": (4, 8), "tiny-sd3": (16, 8), "tiny-flux": (16, 8), "tiny-flux2": (128, 4), "tiny-flux2-dev": (128, 4)}
# the long text encoder's token budget: short enough that the long caption loses tokens
# (FLUX.2 [klein]'s chat template alone takes 38 of them, [dev]'s with its system message about 200);
# SDXL's CLIP keeps 77
TOKEN_BUDGETS = {"tiny-sdxl": None, "tiny-sd3": 32, "tiny-flux": 32, "tiny-flux2": 64, "tiny-flux2-dev": 256}
FLUX2_PIPELINES = ("Flux2KleinPipeline", "Flux2Pipeline")


def reference_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """What the family's denoiser trains on, by diffusers' own functions (posterior means)."""
    vae = pipe.vae
    with torch.no_grad():
        if type(pipe).__name__ in FLUX2_PIPELINES:  # patchified, batch-norm normalised: their image conditioning
            return pipe._encode_vae_image(pixels, generator=None)
        return (vae.encode(pixels).latent_dist.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def reference_embeddings(pipe, preset: str, captions: list[str]) -> dict[str, torch.Tensor]:
    """What the family's encode_prompt returns for each caption, named as latentray stores it."""
    budget = TOKEN_BUDGETS[preset]
    with torch.no_grad():
        if preset in ("tiny-flux2", "tiny-flux2-dev"):
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
        if type(pipe).__name__ in FLUX2_PIPELINES:  # the tail of their __call__: de-normalise, unpatchify
            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            latents = pipe._unpatchify_latents(latents * std + mean)
        else:
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents).sample
    return (pipe.image_processor.postprocess(decoded, output_type="np") * 255).round().astype(np.uint8)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-flux2-dev"])
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
    if preset in ("tiny-flux2", "tiny-flux2-dev"):  # a trainer packs a stored row into the tokens the pipeline feeds its transformer
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
    if preset in ("tiny-flux", "tiny-flux2", "tiny-flux2-dev"):
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
    assert status == 2 and "is a 'KandinskyV22Pipeline' pipeline; latentray runs Flux2KleinPipeline, Flux2Pipeline, FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline" in err
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
    ("tiny-sdxl", ["--true-cfg-scale", "2"], "true_cfg_scale: sdxl models do not take it"),
    ("tiny", ["--max-sequence-length", "64"], "max_sequence_length: sd models have no long text encoder"),
    ("tiny-flux", ["--max-sequence-length", "600"], "max_sequence_length: flux models take at most 512 tokens, got 600"),
    ("tiny-flux", ["--width", "72"], "width: flux models need a multiple of 16, got 72"),
    ("tiny-qwenimage", ["--width", "72", "--true-cfg-scale", "2"], "width: qwenimage models need a multiple of 16, got 72"),
    ("tiny-qwenimage", ["--max-sequence-length", "1100"], "max_sequence_length: qwenimage models take at most 1024 tokens, got 1100"),
    ("tiny-flux2", ["--true-cfg-scale", "2"], "true_cfg_scale: FLUX.2 [klein] has no true CFG; base models run classifier-free guidance"),
    ("tiny-flux2", ["--height", "40"], "height: flux2-klein models need a multiple of 16, got 40"),
    ("tiny-flux2-dev", ["--true-cfg-scale", "2"], "true_cfg_scale: FLUX.2 [dev] has no true CFG; guidance_scale feeds its guidance embedding"),
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


def test_zimage_stores_each_caption_embedding_at_its_own_length(ray_session, tmp_path, captioned_images, capsys):
    """Z-Image's encoder gives each caption its own tokens: stored unpadded, read by pyarrow, DuckDB and
    Hugging Face datasets, batched by LatentDataset padded with a mask."""
    import datasets
    import duckdb
    from diffusers import DiffusionPipeline

    from pipelines import LatentDataset

    output = tmp_path / "latents"
    status, err = run_cli(["encode", "--images", captioned_images, "--output", str(output), "--model", "tiny-zimage", "--resolution", "64",
                           "--caption-column", "caption", "--text-embeddings", "--latent-dtype", "float32",
                           # split, batches of 2: embeddings cross the object store between actors, in blocks of mixed lengths
                           "--placement", "split", "--batch-size", "2"], capsys)
    assert status == 0, err
    table = pq.read_table(output / "latents").sort_by("id")
    assert all(latent.shape == (16, 8, 8) for latent in latents_of(table))

    # 1. per row, encode_prompt's output for its caption ("" for none), at its own length; no pooled embedding
    pipe = DiffusionPipeline.from_pretrained(materialize_preset("tiny-zimage"), local_files_only=True)
    captions = [text or "" for text in table.column("caption").to_pylist()]
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(list(captions), device="cpu", do_classifier_free_guidance=False)
    expected = {row_id: embedding.numpy() for row_id, embedding in zip(table.column("id").to_pylist(), expected)}
    lengths = table.column("prompt_embeds_length").to_pylist()
    assert len(set(lengths)) == 3 and "pooled_prompt_embeds" not in table.column_names
    width = next(iter(expected.values())).shape[1]
    assert table.schema.field("prompt_embeds").type == pa.list_(pa.list_(pa.float32(), width))  # [tokens][width]
    for row_id, stored, length in zip(table.column("id").to_pylist(), table.column("prompt_embeds").to_pylist(), lengths):
        assert np.asarray(stored).shape == expected[row_id].shape == (length, width)  # pyarrow as it is
        np.testing.assert_allclose(np.asarray(stored), expected[row_id], atol=1e-4)
    assert table.column("caption_truncated").to_pylist() == [False, False, False]  # Qwen keeps 512 tokens
    found = duckdb.sql(f"select id, len(prompt_embeds), len(prompt_embeds[1]), prompt_embeds_length from '{output}/latents/*.parquet'").fetchall()
    assert {row_id: (tokens, dim) for row_id, tokens, dim, _ in found} == {key: value.shape for key, value in expected.items()}
    assert all(tokens == length for _, tokens, _, length in found)

    # 2. Hugging Face datasets: each row's tensor at its own length
    hub = datasets.load_dataset("parquet", data_files=f"{output}/latents/*.parquet", split="train", cache_dir=str(tmp_path / "hf"))
    for row in hub.with_format("torch"):
        assert int(row["prompt_embeds_length"]) == len(row["prompt_embeds"])
        np.testing.assert_allclose(row["prompt_embeds"].numpy(), expected[row["id"]], atol=1e-4)

    # 3. LatentDataset: padded to the batch's longest row, True in the mask at real tokens, zeros after
    batch = next(iter(LatentDataset(str(output), batch_size=3, columns=["id", "latent", "prompt_embeds"])))
    embeds, mask = batch["prompt_embeds"], batch["prompt_embeds_mask"]
    assert embeds.shape == (3, max(lengths), width) and mask.dtype == torch.bool and mask.shape == (3, max(lengths))
    for row_id, row, real in zip(batch["id"], embeds, mask):
        assert int(real.sum()) == len(expected[row_id]) and bool(real[:len(expected[row_id])].all())
        np.testing.assert_allclose(row[real].numpy(), expected[row_id], atol=1e-4)
        assert not row[~real].any()

    # 4. Ray Data: the length column read beside the embeddings pads them the same way
    import ray.data

    from pipelines.encoding.latent_dataset import collate_nested_arrays

    columns = ["id", "prompt_embeds", "prompt_embeds_length"]
    for batch in ray.data.read_parquet(str(output / "latents"), columns=columns).iter_torch_batches(batch_size=3, collate_fn=collate_nested_arrays):
        assert batch["prompt_embeds"].shape == (3, max(lengths), width)
        assert batch["prompt_embeds_mask"].sum(dim=1).tolist() == batch["prompt_embeds_length"].tolist() == [len(expected[i]) for i in batch["id"]]


def test_flux_schnell_defaults_to_its_few_steps_and_no_guidance(tmp_path, model_cache):
    from pipelines.runtime.model_source import describe_model

    model = tmp_path / "schnell"
    export_preset("tiny-flux", str(model))
    config_path = model / "transformer" / "config.json"
    json.dump({**json.load(open(config_path)), "guidance_embeds": False}, open(config_path, "w"))
    schnell, dev = describe_model(str(model)).shape, describe_model("tiny-flux").shape
    assert (schnell.default_steps, schnell.default_guidance) == (4, 0.0)
    assert (dev.default_steps, dev.default_guidance, dev.size_multiple, dev.latent_channels) == (28, 3.5, 16, 16)


def test_qwenimage_encodes_normalised_latents_and_decodes_them_as_its_pipeline(ray_session, tmp_path, captioned_images):
    from diffusers import QwenImagePipeline

    from pipelines.report import decoded_samples

    # 1. latents: the posterior mean of one video frame, normalised per channel, [16, H/8, W/8]
    output = tmp_path / "latents"
    record = run_encoding(EncodeConfig(images=captioned_images, output=str(output), model="tiny-qwenimage", resolution=64,
                                       latent_dtype="float32", caption_column="caption", text_embeddings=True))
    assert record["counts"]["ok_rows"] == 3
    table = pq.read_table(output / "latents").sort_by("id")
    latents = np.stack(latents_of(table))
    pipe = QwenImagePipeline.from_pretrained(materialize_preset("tiny-qwenimage"), local_files_only=True)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    pixels = torch.from_numpy(np.stack([picture(index, 64, 64) for index in range(3)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = (vae.encode(pixels[:, :, None]).latent_dist.mean - mean) / std
    assert latents.shape == (3, 16, 8, 8)
    np.testing.assert_allclose(latents, expected[:, :, 0].numpy(), atol=1e-3)
    stats = json.load(open(output / "latent_stats.json"))
    assert (len(stats["mean"]), stats["scaling_factor"], stats["shift_factor"]) == (16, 1.0, 0.0)

    # 2. caption embeddings: encode_prompt's (at __call__'s 512 tokens), each at its own length (the mask's)
    captions = ["" if caption is None else caption for caption in table.column("caption").to_pylist()]
    with torch.no_grad():
        expected_embeds, mask = pipe.encode_prompt(captions, device="cpu", max_sequence_length=512)
    lengths = mask.sum(dim=1).tolist()
    assert table.column("prompt_embeds_length").to_pylist() == lengths and len(set(lengths)) == 3
    for stored, embedding, length in zip(table.column("prompt_embeds").to_pylist(), expected_embeds, lengths):
        np.testing.assert_allclose(np.array(stored), embedding[:length].numpy(), atol=1e-4)

    # 3. the report decodes them as QwenImagePipeline decodes its latents: latents * std + mean
    samples = decoded_samples(str(output), json.load(open(output / "run.json")), 3)
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents)[:, :, None] * std + mean).sample[:, :, 0]
    expected_pixels = (pipe.image_processor.postprocess(decoded, output_type="np") * 255).round().astype(np.uint8)
    for sample, image in zip(samples, expected_pixels):
        assert_images_match(np.asarray(sample.image), image)


def test_qwenimage_exports_a_pipeline_directory_and_describes_it(tmp_path, capsys, model_cache):
    from diffusers import QwenImagePipeline

    from pipelines.runtime.model_source import describe_model

    model = tmp_path / "qwen"
    assert main(["model", "export", "tiny-qwenimage", str(model)]) == 0
    pipe = QwenImagePipeline.from_pretrained(str(model), local_files_only=True)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 64
    shape = describe_model(str(model)).shape
    # the pipeline's defaults (1024 px, 50 steps); latents already normalised: no scale or shift
    assert (shape.default_height, shape.default_width, shape.size_multiple, shape.vae_scale_factor) == (1024, 1024, 16, 8)
    assert (shape.latent_channels, shape.scaling_factor, shape.shift_factor, shape.default_steps) == (16, 1.0, 0.0, 50)
    assert shape.default_guidance == 0.0  # the released model has no guidance embedding
    config_path = model / "transformer" / "config.json"
    json.dump({**json.load(open(config_path)), "guidance_embeds": True}, open(config_path, "w"))
    assert describe_model(str(model)).shape.default_guidance == 4.0


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


def test_flux2_dev_exports_for_diffusers_and_describes_it(tmp_path, model_cache):
    import importlib.util

    from diffusers import Flux2Pipeline

    from pipelines.runtime.model_source import describe_model

    # `latentray model export` writes what Flux2Pipeline loads: Mistral3 with the layers the pipeline stacks
    model = tmp_path / "dev"
    assert main(["model", "export", "tiny-flux2-dev", str(model)]) == 0
    pipe = Flux2Pipeline.from_pretrained(str(model), local_files_only=True)
    assert pipe.text_encoder.config.text_config.num_hidden_layers == 40 and pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.joint_attention_dim == 3 * pipe.text_encoder.config.text_config.hidden_size
    assert not list(model.rglob("*.bin"))  # safetensors only
    shape = describe_model(str(model)).shape
    assert (shape.default_steps, shape.default_guidance, shape.size_multiple, shape.latent_channels) == (50, 4.0, 16, 128)

    # a released directory's PixtralProcessor needs torchvision: without it, the reason before any actor starts
    index = json.load(open(model / "model_index.json"))
    json.dump({**index, "tokenizer": ["transformers", "PixtralProcessor"]}, open(model / "model_index.json", "w"))
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ValueError, match="PixtralProcessor .FLUX.2 \\[dev\\]., which transformers loads only with torchvision"):
            describe_model(str(model))
