"""Stable Diffusion 3 / 3.5: CLIP-L, CLIP-G and T5 (optional), an MMDiT transformer,
a 16-channel VAE with a shift, flow matching (``StableDiffusion3Pipeline``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.families.base import FLOW_SCHEDULERS, ModelFamily, to_numpy


class StableDiffusion3(ModelFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    img2img_pipeline_class = "StableDiffusion3Img2ImgPipeline"
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
    # diffusers runs SD3 without T5 (zeros in its place): a directory may leave it out
    optional_components = ("tokenizer_3", "text_encoder_3")
    # without T5 the text stage still needs the transformer's joint_attention_dim: its config, no weights
    text_stage_configs = ("transformer",)
    denoiser_component = "transformer"
    embedding_columns = ("prompt_embeds", "pooled_prompt_embeds")
    default_steps = 28
    default_guidance = 7.0
    guidance_rule = "classifier-free guidance when guidance_scale > 1"
    schedulers = FLOW_SCHEDULERS + ("flow-heun",)
    # each actor caps its memory to its share (workers.runtime.memory): shares follow the weights in bf16,
    # SD3.5 large: T5-XXL and two CLIPs (11 GB) beside a 16 GB transformer, with room for activations
    split_gpu_shares = {"text_encoder": 0.4, "denoiser": 0.5, "vae_decoder": 0.1}
    default_max_sequence_length = 256
    max_sequence_length_limit = 512

    def size_multiple(self, denoiser_config: dict, vae_scale_factor: int) -> int:
        # latents are cut into patch_size x patch_size tokens
        return vae_scale_factor * int(denoiser_config.get("patch_size", 2))

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            texts, None, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        return {"prompt_embeds": to_numpy(prompt_embeds), "pooled_prompt_embeds": to_numpy(pooled)}

    def token_limits(self, pipe: Any, max_sequence_length: int | None) -> list[tuple[Any, int]]:
        limits = [(pipe.tokenizer, pipe.tokenizer_max_length), (pipe.tokenizer_2, pipe.tokenizer_max_length)]
        if pipe.text_encoder_3 is not None:
            limits.append((pipe.tokenizer_3, max_sequence_length or self.default_max_sequence_length))
        return limits


# -- offline presets ----------------------------------------------------------------------------


def build_preset(size):
    """A ``StableDiffusion3Pipeline`` of ``size``: CLIP-L, CLIP-G, T5, an MMDiT, seeded random weights."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import clip_tokenizer, t5_tokenizer

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    # SD3 pads the two CLIP encoders' concatenated hidden states to T5's width
    t5_width = 2 * size.text_width
    heads = 4
    parts.seeded(0)
    transformer = SD3Transformer2DModel(
        sample_size=size.image_size // 8, patch_size=2, in_channels=16, out_channels=16,
        num_layers=size.transformer_depth, attention_head_dim=size.transformer_width // heads, num_attention_heads=heads,
        joint_attention_dim=t5_width, caption_projection_dim=size.transformer_width,
        pooled_projection_dim=2 * size.text_width, pos_embed_max_size=96,
    )
    parts.seeded(1)
    vae = parts.vae(size, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    parts.seeded(2)
    text_encoder = parts.clip_text_model(size, tokenizer, with_projection=True)
    parts.seeded(3)
    text_encoder_2 = parts.clip_text_model(size, tokenizer_2, with_projection=True)
    parts.seeded(4)
    text_encoder_3 = parts.t5_encoder(size, tokenizer_3, width=t5_width)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=parts.flow_scheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
