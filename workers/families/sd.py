"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a U-Net, a 4-channel VAE (``StableDiffusionPipeline``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.families.base import ModelFamily, to_numpy


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    img2img_pipeline_class = "StableDiffusionImg2ImgPipeline"
    text_components = ("tokenizer", "text_encoder")
    # latentray's default since its first release (diffusers' is 50): kept so SD runs stay unchanged
    default_steps = 30
    default_guidance = 7.5
    guidance_rule = "classifier-free guidance when guidance_scale > 1"
    float16_safe = True  # U-Net: float16 allowed (the VAE stays in float32 where its config says force_upcast)

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        prompt_embeds, _ = pipe.encode_prompt(texts, device, 1, False)
        return {"prompt_embeds": to_numpy(prompt_embeds)}


# -- offline presets ----------------------------------------------------------------------------


def build_preset(size):
    """A ``StableDiffusionPipeline`` of ``size`` (``preset_parts.PresetSize``), seeded random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer()
    channels = tuple(size.denoiser_width * min(2**level, 2) for level in range(size.denoiser_depth))
    parts.seeded(0)
    unet = UNet2DConditionModel(
        sample_size=size.image_size // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=size.text_width, attention_head_dim=8, norm_num_groups=32,
    )
    parts.seeded(1)
    vae = parts.vae(size, latent_channels=4, scaling_factor=0.18215)
    parts.seeded(2)
    text_encoder = parts.clip_text_model(size, tokenizer)
    # Stable Diffusion 1.x's noise schedule
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
