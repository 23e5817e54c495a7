"""Each worker on the tiny preset, called directly (no Ray)."""

import numpy as np
import pytest

from helpers import assert_images_match, diffusers_reference
from workers.generation.denoiser import DenoiserWorker
from workers.generation.fused import FusedGenerationWorker
from workers.generation.text_encoder import TextEncoderWorker
from workers.generation.vae_decoder import VaeDecoderWorker


def request_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return {column: np.array([row[column] for row in rows], dtype=object if column in ("prompt", "negative_prompt") else None) for column in rows[0]}


ROWS = [
    {"prompt": "a red circle", "negative_prompt": "", "seed": 1, "num_inference_steps": 6, "guidance_scale": 7.5, "height": 64, "width": 64},
    {"prompt": "a blue square", "negative_prompt": "blurry", "seed": 2, "num_inference_steps": 6, "guidance_scale": 3.0, "height": 64, "width": 64},
    {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "num_inference_steps": 4, "guidance_scale": 1.0, "height": 32, "width": 48},
    {"prompt": "word " * 40, "negative_prompt": "", "seed": 4, "num_inference_steps": 6, "guidance_scale": 7.5, "height": 64, "width": 64},
]


@pytest.fixture(scope="module")
def fused(tiny_model_dir):
    return FusedGenerationWorker(tiny_model_dir, threads=2)


def test_fused_worker_draws_what_diffusers_draws_for_each_row(fused, tiny_model_dir):
    """Mixed sizes, steps, guidance on/off and negative prompts in one batch: every row as diffusers alone."""
    out = fused(request_batch(ROWS))
    for image, expected in zip(out["image"], diffusers_reference(tiny_model_dir, ROWS)):
        assert_images_match(image, expected)
    assert [image.shape for image in out["image"]] == [(64, 64, 3), (64, 64, 3), (32, 48, 3), (64, 64, 3)]
    assert out["prompt_truncated"].tolist() == [False, False, False, True]


def test_stochastic_scheduler_draws_per_row_noise(tiny_model_dir):
    rows = [dict(row, num_inference_steps=5) for row in ROWS[:2]]
    worker = FusedGenerationWorker(tiny_model_dir, scheduler="euler-a", threads=2)
    out = worker(request_batch(rows))
    for image, expected in zip(out["image"], diffusers_reference(tiny_model_dir, rows, scheduler="euler-a")):
        assert_images_match(image, expected)


def test_text_encoder_encodes_each_distinct_text_once(tiny_model_dir, monkeypatch):
    worker = TextEncoderWorker(tiny_model_dir, threads=1)
    encoded: list[list[str]] = []
    original = worker._encode
    monkeypatch.setattr(worker, "_encode", lambda texts: encoded.append(texts) or original(texts))
    batch = worker({"prompt": np.array(["cat", "dog", "cat"], dtype=object), "negative_prompt": np.array(["", "", "ugly"], dtype=object)})
    assert encoded == [["cat", "dog", "ugly"]]  # the empty negative prompt was cached at start-up
    np.testing.assert_array_equal(batch["prompt_embeds"][0], batch["prompt_embeds"][2])
    assert batch["prompt_embeds"].shape == (3, 77, 32)
    assert batch["busy_seconds_text_encoder"].shape == (3,)


def test_split_workers_chain_to_the_fused_result(fused, tiny_model_dir):
    batch = request_batch(ROWS[:2])
    split = VaeDecoderWorker(tiny_model_dir)(DenoiserWorker(tiny_model_dir)(TextEncoderWorker(tiny_model_dir)(dict(batch))))
    joined = fused(dict(batch))
    assert "prompt_embeds" not in split  # the denoiser drops embeddings no later stage needs
    np.testing.assert_array_equal(np.stack(split["image"]), np.stack(joined["image"]))
    assert split["latents"].shape == (2, 4, 8, 8) and split["image"].dtype == np.uint8
