"""FLUX.1 dev and schnell: CLIP (pooled) and T5, a transformer on packed 2x2 latents,
a 16-channel VAE with a shift, flow matching with dynamic shift (``FluxPipeline``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.families.base import FLOW_SCHEDULERS, ModelFamily, ModelShape, to_numpy


class Flux(ModelFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    img2img_pipeline_class = "FluxImg2ImgPipeline"
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    denoiser_component = "transformer"
    attention_dispatch = True  # its attention processors call diffusers' dispatch_attention_fn
    embedding_columns = ("prompt_embeds", "pooled_prompt_embeds")
    default_steps = 28
    default_guidance = 3.5
    guidance_rule = (
        "the guidance embedding of distilled models (dev); schnell has none. A negative prompt "
        "takes effect with --true-cfg-scale > 1 (true classifier-free guidance)"
    )
    schedulers = FLOW_SCHEDULERS
    # each actor caps its memory to its share (workers.runtime.memory): shares follow the weights in bf16,
    # FLUX.1: T5-XXL 9.5 GB beside a 24 GB transformer, with room for activations
    split_gpu_shares = {"text_encoder": 0.25, "denoiser": 0.65, "vae_decoder": 0.1}
    default_max_sequence_length = 512
    max_sequence_length_limit = 512
    takes_true_cfg_scale = True

    def describe(self, read_config) -> ModelShape:
        shape = super().describe(read_config)
        if (read_config(f"{self.denoiser_component}/config.json") or {}).get("guidance_embeds"):
            return shape
        # schnell (no guidance embedding) is distilled to a few steps
        return ModelShape(**{**vars(shape), "default_steps": 4, "default_guidance": 0.0})

    def default_size(self, denoiser_config: dict, vae_scale_factor: int) -> tuple[int, int]:
        return 128 * vae_scale_factor, 128 * vae_scale_factor  # FluxPipeline.default_sample_size

    def size_multiple(self, denoiser_config: dict, vae_scale_factor: int) -> int:
        return vae_scale_factor * 2  # 2x2 latent patches per token

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            texts, None, device=device, max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        return {"prompt_embeds": to_numpy(prompt_embeds), "pooled_prompt_embeds": to_numpy(pooled)}

    def token_limits(self, pipe: Any, max_sequence_length: int | None) -> list[tuple[Any, int]]:
        return [(pipe.tokenizer, pipe.tokenizer_max_length), (pipe.tokenizer_2, max_sequence_length or self.default_max_sequence_length)]

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        arguments = super().denoise_arguments(pipe, batch, rows, options)
        if self.runs_true_cfg(batch, rows, options):
            arguments["true_cfg_scale"] = options["true_cfg_scale"]
        else:
            # as diffusers with negative_prompt=None: no second pass
            arguments = {name: value for name, value in arguments.items() if not name.startswith("negative_")}
        return arguments

    def unpack_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)


# -- offline presets ----------------------------------------------------------------------------


def build_preset(size):
    """A ``FluxPipeline`` of ``size`` (dev-like: with a guidance embedding), seeded random weights."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import clip_tokenizer, t5_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    t5_width = 2 * size.text_width
    heads = 2
    head_dim = size.transformer_width // heads
    parts.seeded(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=max(1, size.transformer_depth // 2), num_single_layers=size.transformer_depth,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_width,
        pooled_projection_dim=size.text_width, guidance_embeds=True,
        axes_dims_rope=(head_dim // 2, head_dim // 4, head_dim // 4),
    )
    parts.seeded(1)
    vae = parts.vae(size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    parts.seeded(2)
    text_encoder = parts.clip_text_model(size, tokenizer)
    parts.seeded(3)
    text_encoder_2 = parts.t5_encoder(size, tokenizer_2, width=t5_width)
    scheduler = parts.flow_scheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
