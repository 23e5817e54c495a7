"""Stable Diffusion XL (base): two CLIP text encoders, a U-Net with micro-conditioning (``StableDiffusionXLPipeline``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.families.base import ModelFamily, to_numpy

MICRO_CONDITIONING = {
    "original_size": "SDXL micro-conditioning [height, width] (default: the image size)",
    "crop_top_left": "SDXL micro-conditioning [top, left] (default: [0, 0])",
    "target_size": "SDXL micro-conditioning [height, width] (default: the image size)",
}
# our column name -> the argument of StableDiffusionXLPipeline.__call__
CALL_ARGUMENTS = {"original_size": "original_size", "crop_top_left": "crops_coords_top_left", "target_size": "target_size"}


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    img2img_pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    embedding_columns = ("prompt_embeds", "pooled_prompt_embeds")
    default_steps = 50
    default_guidance = 5.0
    guidance_rule = "classifier-free guidance when guidance_scale > 1"
    conditioning_columns = MICRO_CONDITIONING
    float16_safe = True  # U-Net: float16 allowed (the VAE stays in float32 where its config says force_upcast)

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        # both encoders' penultimate hidden states, concatenated; the pooled projection of the second
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(texts, device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": to_numpy(prompt_embeds), "pooled_prompt_embeds": to_numpy(pooled)}

    def empty_negative(self, pipe: Any, encoded_empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # SDXL base is trained with zeros for "no negative prompt" (force_zeros_for_empty_prompt)
        if pipe.config.get("force_zeros_for_empty_prompt", True):
            return {name: np.zeros_like(value) for name, value in encoded_empty.items()}
        return encoded_empty

    def token_limits(self, pipe: Any, max_sequence_length: int | None) -> list[tuple[Any, int]]:
        return [(tokenizer, tokenizer.model_max_length) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2) if tokenizer is not None]

    def group_key(self, batch: dict[str, np.ndarray], row: int) -> tuple:
        return tuple(_pair(batch, column, row) for column in MICRO_CONDITIONING)

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        arguments = super().denoise_arguments(pipe, batch, rows, options)
        for column, argument in CALL_ARGUMENTS.items():
            value = _pair(batch, column, rows[0])  # one value per group (group_key)
            if value is not None:
                arguments[argument] = value
        return arguments


def _pair(batch: dict[str, np.ndarray], column: str, row: int) -> tuple[int, int] | None:
    """A row's micro-conditioning pair, None when the column or the value is absent (diffusers' default)."""
    if column not in batch:
        return None
    value = batch[column][row]
    if value is None or len(value) == 0:
        return None
    return int(value[0]), int(value[1])


# -- offline presets ----------------------------------------------------------------------------


def build_preset(size):
    """A ``StableDiffusionXLPipeline`` of ``size``: two CLIP encoders, a text_time U-Net, seeded random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import clip_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    channels = tuple(size.denoiser_width * min(2**level, 2) for level in range(size.denoiser_depth))
    time_embed_dim = 8
    parts.seeded(0)
    unet = UNet2DConditionModel(
        sample_size=size.image_size // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        attention_head_dim=8, use_linear_projection=True, norm_num_groups=32,
        # as SDXL: cross attention over both encoders' hidden states side by side; the pooled
        # projection and six size numbers (original size, crop, target size) as extra embedding
        cross_attention_dim=2 * size.text_width, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + size.text_width,
    )
    parts.seeded(1)
    vae = parts.vae(size, latent_channels=4, scaling_factor=0.13025)
    parts.seeded(2)
    text_encoder = parts.clip_text_model(size, tokenizer)
    parts.seeded(3)
    text_encoder_2 = parts.clip_text_model(size, tokenizer_2, with_projection=True)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
