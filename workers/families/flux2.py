"""FLUX.2: a 32-channel VAE whose latents the transformer sees as 2x2 patches (128 channels)
normalised by the VAE's batch-norm statistics, flow matching with an empirical shift.

``Flux2`` holds what every FLUX.2 pipeline shares (the VAE maths, sizes, schedulers);
``Flux2Klein`` runs ``Flux2KleinPipeline``: a Qwen3 text encoder (hidden states of layers
9, 18 and 27 side by side, 512 tokens), in two variants that its ``model_index.json``
tells apart (``is_distilled``): base (classifier-free guidance against a negative) and
step-distilled (a few steps, no guidance). FLUX.2 [dev] (``Flux2Pipeline``: Mistral3,
a guidance embedding, packed ``"latent"`` output) would be a second subclass of ``Flux2``.

Latents between stages and in a latent dataset are what the transformer sees: the VAE's
latents z (posterior mode) cut into 2x2 patches and normalised by the VAE's batch-norm
running statistics, ``(patchify(z) - bn.running_mean) / sqrt(bn.running_var + bn.eps)``,
``[128, H/16, W/16]``, as the pipeline's ``_encode_vae_image`` computes them for its image
conditioning. A trainer feeds a stored row to the transformer as the pipeline does:
``hidden_states = Flux2KleinPipeline._pack_latents(latent[None])`` (``[1, H/16 * W/16, 128]``)
with ``img_ids = _prepare_latent_ids(latent[None])``, and ``encoder_hidden_states =
prompt_embeds[None]`` (``[1, 512, 3 x text width]``) with ``txt_ids = _prepare_text_ids(...)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.families.base import FLOW_SCHEDULERS, ConfigReader, ModelFamily, ModelShape, to_numpy
from workers.families.tokenizers import chat_token_count

PATCH = 2  # the transformer sees 2x2 latent patches as one token (channels x 4)


class Flux2(ModelFamily):
    """What FLUX.2 pipelines share: the VAE's batch-norm maths, 16-pixel sizes, flow matching."""

    denoiser_component = "transformer"
    attention_dispatch = True  # its attention processors call diffusers' dispatch_attention_fn
    schedulers = FLOW_SCHEDULERS
    # each actor caps its memory to its share (workers.runtime.memory): shares follow the weights in bf16,
    # klein: Qwen3 4B/8B as large as its 4B/9B transformer, with room for activations
    split_gpu_shares = {"text_encoder": 0.45, "denoiser": 0.45, "vae_decoder": 0.1}
    default_max_sequence_length = 512

    def describe(self, read_config: ConfigReader) -> ModelShape:
        # stored latents are patchified: 4x the VAE's channels, one cell per 16 pixels;
        # the batch norm leaves them mean 0, std 1 (the factors the statistics report compares with)
        shape = super().describe(read_config)
        return ModelShape(**{
            **vars(shape), "latent_channels": shape.latent_channels * PATCH**2, "vae_scale_factor": shape.vae_scale_factor * PATCH,
            "scaling_factor": 1.0, "shift_factor": 0.0,
        })

    def default_size(self, denoiser_config: dict, vae_scale_factor: int) -> tuple[int, int]:
        return 128 * vae_scale_factor, 128 * vae_scale_factor  # the pipelines' default_sample_size

    def size_multiple(self, denoiser_config: dict, vae_scale_factor: int) -> int:
        return vae_scale_factor * PATCH

    def decode_latents(self, vae: Any, latents: Any) -> Any:
        # as the pipeline's tail: de-normalise, unpatchify, decode
        from diffusers import Flux2KleinPipeline

        mean, std = batch_norm_statistics(vae, latents)
        return vae.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]

    def encode_pixels(self, vae: Any, images: Any, sample: str, generators: list) -> Any:
        # as the pipeline's _encode_vae_image (the posterior's mode), or a sample from each row's generator
        posterior = vae.encode(images).latent_dist
        return normalise(vae, posterior.mode() if sample == "mean" else posterior.sample(generator=generators))


class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    text_components = ("tokenizer", "text_encoder")
    default_steps = 50  # base; a distilled model's own below (describe)
    default_guidance = 4.0
    guidance_rule = (
        "base models: classifier-free guidance against the negative prompt ('' for none) when guidance_scale > 1; "
        "distilled models (is_distilled) ignore guidance_scale and negative prompts (no guidance embedding)"
    )

    @property
    def denoiser_components(self) -> tuple[str, ...]:
        # the pipeline's "latent" output is de-normalised by the VAE's batch-norm statistics:
        # the denoiser needs the VAE's weights too (a few percent of the transformer's)
        return (*super().denoiser_components, self.vae_component)

    def describe(self, read_config: ConfigReader) -> ModelShape:
        shape = super().describe(read_config)
        if not (read_config("model_index.json") or {}).get("is_distilled"):
            return shape
        # step-distilled: 4 steps, and guidance 1 (ignored by the pipeline, which warns above 1)
        return ModelShape(**{**vars(shape), "default_steps": 4, "default_guidance": 1.0})

    def check_options(self, *, scheduler: str | None, max_sequence_length: int | None, true_cfg_scale: float | None) -> None:
        super().check_options(scheduler=scheduler, max_sequence_length=max_sequence_length, true_cfg_scale=1.0)
        if true_cfg_scale is not None and true_cfg_scale != 1.0:  # None: not asked for
            raise ValueError(
                "true_cfg_scale: FLUX.2 [klein] has no true CFG; base models run classifier-free guidance "
                "with guidance_scale > 1, distilled models take no guidance"
            )

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        # fixed length with the padding kept: the transformer attends to every one of the tokens
        prompt_embeds, _ = pipe.encode_prompt(texts, device=device, max_sequence_length=max_sequence_length or self.default_max_sequence_length)
        return {"prompt_embeds": to_numpy(prompt_embeds)}

    def is_truncated(self, pipe: Any, text: str, max_sequence_length: int | None) -> bool:
        limit = max_sequence_length or self.default_max_sequence_length
        return chat_token_count(pipe.tokenizer, text, enable_thinking=False) > limit

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        arguments = super().denoise_arguments(pipe, batch, rows, options)
        # the pipeline reads negatives only for classifier-free guidance (rows of a group share their guidance)
        if pipe.config.is_distilled or float(batch["guidance_scale"][rows[0]]) <= 1:
            arguments.pop("negative_prompt_embeds")
        return arguments

    def unpack_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        # the pipeline returns VAE latents (de-normalised, 32 channels): back to what the transformer saw
        return normalise(pipe.vae, latents.float())  # float32: no second rounding in half precision


def batch_norm_statistics(vae: Any, latents: Any) -> tuple[Any, Any]:
    """Per-channel mean and std of patchified latents, ``[1, 128, 1, 1]``, as the pipelines compute them."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return mean, std


def normalise(vae: Any, latents: Any) -> Any:
    """VAE latents ``[B, 32, h, w]`` -> what the transformer sees, ``[B, 128, h/2, w/2]``."""
    from diffusers import Flux2KleinPipeline

    patches = Flux2KleinPipeline._patchify_latents(latents)
    mean, std = batch_norm_statistics(vae, patches)
    return (patches - mean) / std


# -- offline presets ----------------------------------------------------------------------------

TEXT_LAYERS = 28  # Qwen3-4B's: the pipeline stacks the hidden states of layers 9, 18 and 27


def build_preset(size):
    """A base (CFG) ``Flux2KleinPipeline`` of ``size``, seeded random weights; set ``is_distilled``
    in its ``model_index.json`` for the distilled variant (the weights' layout is the same)."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    heads = 2
    head_dim = size.transformer_width // heads
    parts.seeded(0)
    transformer = Flux2Transformer2DModel(
        in_channels=32 * PATCH**2, num_layers=max(1, size.transformer_depth // 2), num_single_layers=size.transformer_depth,
        attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=3 * size.text_width,  # three hidden-state layers side by side
        axes_dims_rope=(head_dim // 4,) * 4,  # time, height, width, sequence: adding up to the head width
        guidance_embeds=False,  # [klein] has none: the pipeline passes guidance=None
    )
    parts.seeded(1)
    vae = flux2_vae(size)
    parts.seeded(2)
    # the released model's 28 layers at the preset's width; the byte vocabulary has no BOS
    text_encoder = Qwen3ForCausalLM(parts.qwen3_config(
        size, tokenizer, num_hidden_layers=TEXT_LAYERS, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    ))
    scheduler = parts.flow_scheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True,
    )
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=False,
    )


def flux2_vae(size):
    """An ``AutoencoderKLFlux2`` with batch-norm statistics away from (0, 1), so normalising them is tested."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        latent_channels=32, block_out_channels=size.vae_channels, norm_num_groups=8, sample_size=size.image_size,
        down_block_types=["DownEncoderBlock2D"] * len(size.vae_channels), up_block_types=["UpDecoderBlock2D"] * len(size.vae_channels),
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae

