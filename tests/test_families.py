"""Every model family, worker by worker (no Ray): each row's image equals what that family's
own diffusers pipeline draws for the row alone, whatever the batch or the placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_images_match, diffusers_reference, export_variant
from workers.generation.denoiser import DenoiserWorker
from workers.generation.fused import FusedGenerationWorker
from workers.generation.text_encoder import TextEncoderWorker
from workers.generation.vae_decoder import VaeDecoderWorker
from workers.runtime.presets import materialize_preset

FAMILY_PRESETS = ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-zimage", "tiny-qwenimage", "tiny-flux2", "tiny-flux2-dev"]
# families whose LLM text encoder (Qwen, Mistral) keeps 512 tokens (the long prompt fits)
LLM_TEXT_PRESETS = ("tiny-zimage", "tiny-qwenimage", "tiny-flux2", "tiny-flux2-dev")
LONG_PROMPT = "word " * 40  # 200 byte-level tokens: past CLIP's 77


def rows_for(preset: str) -> list[dict]:
    """Mixed prompts, negative prompts, steps, guidance and sizes (multiples of 16 fit every family)."""
    rows = [
        {"prompt": "a red circle", "negative_prompt": "", "seed": 1, "num_inference_steps": 4, "guidance_scale": 4.5, "height": 64, "width": 64},
        {"prompt": "a blue square on white", "negative_prompt": "blurry", "seed": 2, "num_inference_steps": 4, "guidance_scale": 3.0, "height": 64, "width": 64},
        {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "num_inference_steps": 3, "guidance_scale": 4.5, "height": 32, "width": 48},
        {"prompt": LONG_PROMPT, "negative_prompt": "", "seed": 4, "num_inference_steps": 4, "guidance_scale": 4.5, "height": 64, "width": 64},
    ]
    if preset == "tiny-sdxl":  # micro-conditioning from per-row columns; None: diffusers' defaults
        for row in rows:
            row.update(original_size=None, crop_top_left=None, target_size=None)
        rows[1].update(original_size=[128, 96], crop_top_left=[8, 0], target_size=[64, 64])
    return rows


def request_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for column in rows[0]:
        values = [row[column] for row in rows]
        if column in ("prompt", "negative_prompt") or any(value is None or isinstance(value, list) for value in values):
            array = np.empty(len(values), dtype=object)
            array[:] = [None if value is None else (np.array(value) if isinstance(value, list) else value) for value in values]
            batch[column] = array
        else:
            batch[column] = np.array(values)
    return batch


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def family_model(request, model_cache):
    preset = request.param
    return preset, materialize_preset(preset), FusedGenerationWorker(preset, threads=2)


def test_each_row_equals_the_family_pipeline_alone(family_model):
    preset, model_dir, fused = family_model
    rows = rows_for(preset)
    out = fused(request_batch(rows))
    for image, expected in zip(out["image"], diffusers_reference(model_dir, rows)):
        assert_images_match(image, expected)
    assert [image.shape for image in out["image"]] == [(64, 64, 3), (64, 64, 3), (32, 48, 3), (64, 64, 3)]
    # the long prompt loses tokens to CLIP's 77; the Qwen and Mistral encoders of Z-Image, Qwen-Image and FLUX.2 keep 512
    assert out["prompt_truncated"].tolist() == [False, False, False, preset not in LLM_TEXT_PRESETS]


def test_batch_size_and_split_placement_change_nothing(family_model):
    preset, model_dir, fused = family_model
    rows = rows_for(preset)
    batched = fused(request_batch(rows))
    # the same input and settings twice: the same bytes (torch threads are a setting: CPU sums depend on them)
    again = fused(request_batch(rows))
    for row in range(len(rows)):
        np.testing.assert_array_equal(again["image"][row], batched["image"][row])
    one_by_one = [fused(request_batch([row]))["image"][0] for row in rows]
    text, denoiser, decoder = (TextEncoderWorker(preset, threads=2), DenoiserWorker(preset, threads=2), VaeDecoderWorker(preset, threads=2))
    split = decoder(denoiser(text(request_batch(rows))))
    for row in range(len(rows)):
        assert_images_match(one_by_one[row], batched["image"][row])
        assert_images_match(split["image"][row], batched["image"][row])


def test_flux_true_cfg_with_a_negative_prompt_as_diffusers(model_cache):
    model_dir = materialize_preset("tiny-flux")
    rows = rows_for("tiny-flux")[:2]  # no negative prompt, then "blurry"
    out = FusedGenerationWorker("tiny-flux", true_cfg_scale=2.5, threads=2)(request_batch(rows))
    for image, expected in zip(out["image"], diffusers_reference(model_dir, rows, true_cfg_scale=2.5)):
        assert_images_match(image, expected)


def test_flow_match_scheduler_variant_as_diffusers(model_cache):
    model_dir = materialize_preset("tiny-sd3")
    rows = rows_for("tiny-sd3")[:2]
    out = FusedGenerationWorker("tiny-sd3", scheduler="flow-euler-karras", threads=2)(request_batch(rows))
    for image, expected in zip(out["image"], diffusers_reference(model_dir, rows, scheduler="flow-euler-karras")):
        assert_images_match(image, expected)


def test_qwenimage_true_cfg_per_call_as_diffusers(model_cache):
    # negative prompts of different lengths share one true-CFG call (each side padded and masked
    # as the pipeline pads a batch); the row without one runs without CFG; 1 turns CFG off
    model_dir = materialize_preset("tiny-qwenimage")
    base = {"num_inference_steps": 2, "guidance_scale": 0.0, "height": 32, "width": 32}
    rows = [
        {**base, "prompt": "a red circle", "negative_prompt": "blurry", "seed": 1},
        {**base, "prompt": "a blue square on white paper", "negative_prompt": "low quality, washed out colours", "seed": 2},
        {**base, "prompt": "a green triangle", "negative_prompt": "", "seed": 3},
    ]
    for true_cfg_scale in (2.5, 1.0):
        out = FusedGenerationWorker("tiny-qwenimage", true_cfg_scale=true_cfg_scale, threads=2)(request_batch(rows))
        for image, expected in zip(out["image"], diffusers_reference(model_dir, rows, true_cfg_scale=true_cfg_scale)):
            assert_images_match(image, expected)


def test_qwenimage_captions_keep_their_own_length_within_the_token_budget(model_cache):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(materialize_preset("tiny-qwenimage"), transformer=None, vae=None, local_files_only=True)
    with torch.no_grad():
        short = pipe.encode_prompt("a red circle", max_sequence_length=512)[0][0]
    budget = len(short)  # the short caption fits exactly; the long one loses tokens
    text = TextEncoderWorker("tiny-qwenimage", max_sequence_length=budget, threads=2)
    out = text(request_batch([{"prompt": "a red circle", "negative_prompt": "blurry"}, {"prompt": LONG_PROMPT, "negative_prompt": ""}]))
    assert [len(embedding) for embedding in out["prompt_embeds"]] == [budget, budget]
    assert out["prompt_truncated"].tolist() == [False, True]
    # each as encode_prompt returns it for the caption alone (no padding of the batch left)
    with torch.no_grad():
        long = pipe.encode_prompt(LONG_PROMPT, max_sequence_length=budget)[0][0]
        blurry = pipe.encode_prompt("blurry", max_sequence_length=budget)[0][0]
    for stored, expected in zip([*out["prompt_embeds"], out["negative_prompt_embeds"][0]], [short, long, blurry]):
        np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5)


def test_flux2_klein_distilled_ignores_guidance_and_negatives_as_diffusers(tmp_path, model_cache):
    model = export_variant("tiny-flux2", tmp_path / "distilled", is_distilled=True)
    rows = rows_for("tiny-flux2")[:2]  # guidance 4.5, then 3.0 with the negative prompt "blurry"
    out = FusedGenerationWorker(model, threads=2)(request_batch(rows))
    for image, expected in zip(out["image"], diffusers_reference(model, rows)):
        assert_images_match(image, expected)
