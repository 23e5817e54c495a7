"""Encoding workers on the tiny preset, called directly (no Ray), against diffusers' own VAE; stage placement."""

import numpy as np
import pytest
import torch

from image_helpers import picture
from workers.encoding.caption_encoder import CaptionEncoderWorker
from workers.encoding.vae_encoder import VaeEncoderWorker
from workers.generation.text_encoder import TextEncoderWorker

SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    return [picture(0, 64, 64), picture(1, 64, 64), picture(2, 48, 80)]  # mixed sizes in one batch (buckets)


@pytest.fixture(scope="module")
def reference_vae(tiny_model_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(f"{tiny_model_dir}/vae", local_files_only=True).eval()


def pixels_column(crops: list[np.ndarray]) -> np.ndarray:
    column = np.empty(len(crops), dtype=object)
    column[:] = crops
    return column


@torch.inference_mode()
def reference_latents(vae, crop: np.ndarray, seed: int, sample: bool) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' training-script recipe for one row alone: (latent, latent of the mirrored crop)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    results = []
    for pixels in (crop, crop[:, ::-1]):
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        posterior = vae.encode(image).latent_dist
        latent = posterior.sample(generator=generator) if sample else posterior.mean
        results.append((latent * vae.config.scaling_factor)[0].numpy())
    return results[0], results[1]


@pytest.mark.parametrize("sample", ["mean", "sample"])
def test_vae_encoder_computes_what_diffusers_computes_for_each_row_alone(tiny_model_dir, reference_vae, crops, sample):
    worker = VaeEncoderWorker(tiny_model_dir, sample=sample, flip=True, threads=2)
    batch = worker({"pixels": pixels_column(crops), "seed": np.array(SEEDS)})
    assert "pixels" not in batch and batch["busy_seconds_vae_encoder"].shape == (3,)
    assert [latent.shape for latent in batch["latent"]] == [(4, 8, 8), (4, 8, 8), (4, 10, 6)]
    for crop, seed, latent, flipped in zip(crops, SEEDS, batch["latent"], batch["latent_flipped"]):
        expected, expected_flipped = reference_latents(reference_vae, crop, seed, sample == "sample")
        np.testing.assert_allclose(latent, expected, atol=1e-5)
        np.testing.assert_allclose(flipped, expected_flipped, atol=1e-5)
        assert np.abs(latent - flipped).max() > 1e-3  # the mirror image really is another image


def test_float_pixels_in_minus_one_to_one_equal_uint8_pixels(tiny_model_dir, crops):
    worker = VaeEncoderWorker(tiny_model_dir, threads=2)
    as_uint8 = worker({"pixels": np.stack(crops[:2]), "seed": np.array(SEEDS[:2])})["latent"]
    as_float = worker({"pixels": np.stack(crops[:2]).astype(np.float32) / 127.5 - 1.0, "seed": np.array(SEEDS[:2])})["latent"]
    np.testing.assert_allclose(as_float, as_uint8, atol=1e-6)


def test_caption_encoder_matches_the_prompt_encoder_and_encodes_null_as_empty(tiny_model_dir):
    captions = CaptionEncoderWorker(tiny_model_dir, threads=1)({"caption": np.array(["a cat", None, "word " * 40], dtype=object)})
    prompts = TextEncoderWorker(tiny_model_dir, threads=1)({"prompt": np.array(["a cat", ""], dtype=object), "negative_prompt": np.array(["", ""], dtype=object)})
    assert captions["prompt_embeds"].shape == (3, 77, 32)
    np.testing.assert_array_equal(captions["prompt_embeds"][:2], prompts["prompt_embeds"])
    assert captions["caption_truncated"].tolist() == [False, False, True]


@pytest.mark.parametrize("sample", ["mean", "sample"])
def test_qwenimage_latents_are_normalised_as_its_img2img_pipeline_prepares_them(model_cache, crops, sample):
    from diffusers import AutoencoderKLQwenImage, QwenImageImg2ImgPipeline

    from workers.runtime.presets import materialize_preset

    worker = VaeEncoderWorker("tiny-qwenimage", sample=sample, threads=2)
    batch = worker({"pixels": pixels_column(crops), "seed": np.array(SEEDS)})
    assert [latent.shape for latent in batch["latent"]] == [(16, 8, 8), (16, 8, 8), (16, 10, 6)]  # one frame of the video VAE

    # each row alone: the posterior mean normalised per channel, or the pipeline's own sample
    # from the row's generator, (latent - latents_mean) / latents_std
    vae = AutoencoderKLQwenImage.from_pretrained(f"{materialize_preset('tiny-qwenimage')}/vae", local_files_only=True).eval()
    img2img = QwenImageImg2ImgPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    for crop, seed, latent in zip(crops, SEEDS, batch["latent"]):
        image = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0
        with torch.inference_mode():
            if sample == "sample":
                expected = img2img._encode_vae_image(image, generator=[torch.Generator("cpu").manual_seed(seed)])
            else:
                expected = (vae.encode(image).latent_dist.mean - mean) / std
        np.testing.assert_allclose(latent, expected[0, :, 0].numpy(), atol=1e-4)
