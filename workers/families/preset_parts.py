"""Components of the offline presets, built from configs with seeded random weights.

Sized like the real models' structure (a VAE with 4 blocks -> factor 8, CLIP with a
77-token window, T5 and Qwen3 encoders), only narrow, so each family's preset
exercises every code path of the real model in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.families.tokenizers import CLIP_MAX_TOKENS


@dataclass(frozen=True, kw_only=True)
class PresetSize:
    denoiser_width: int  # U-Net base channels
    denoiser_depth: int  # U-Net levels
    transformer_width: int  # SD3, FLUX, Z-Image: transformer width
    transformer_depth: int  # and layers
    vae_channels: tuple[int, ...]
    text_width: int
    text_layers: int
    image_size: int  # the preset's default height and width


PRESET_SIZES = {
    "tiny": PresetSize(denoiser_width=32, denoiser_depth=2, transformer_width=32, transformer_depth=2, vae_channels=(8, 16, 32, 32), text_width=32, text_layers=2, image_size=64),
    "small": PresetSize(denoiser_width=64, denoiser_depth=3, transformer_width=192, transformer_depth=4, vae_channels=(16, 32, 64, 64), text_width=128, text_layers=4, image_size=128),
}


def seeded(seed: int):
    """Each component from its own seed: a preset is the same on every machine and run."""
    import torch  # here: describing a preset (its sizes) must not load torch

    torch.manual_seed(seed)


def vae(size: PresetSize, *, latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    flow = shift_factor is not None  # SD3/FLUX-style VAEs have no quant convolutions
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=size.image_size,
        block_out_channels=size.vae_channels, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * len(size.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(size.vae_channels),
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=not flow, use_post_quant_conv=not flow,
    )


def clip_text_model(size: PresetSize, tokenizer, *, with_projection: bool = False, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=size.text_width, intermediate_size=size.text_width * 4,
        num_hidden_layers=size.text_layers, num_attention_heads=4, max_position_embeddings=CLIP_MAX_TOKENS,
        projection_dim=projection_dim or size.text_width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_encoder(size: PresetSize, tokenizer, *, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=width * 2, num_layers=size.text_layers,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def qwen3_config(size: PresetSize, tokenizer, **options):
    """A Qwen3 text encoder's config at the preset's width (Z-Image, FLUX.2 [klein]); ``options`` override."""
    from transformers import Qwen3Config

    return Qwen3Config(**{
        "vocab_size": len(tokenizer), "hidden_size": size.text_width, "intermediate_size": size.text_width * 2,
        "num_hidden_layers": size.text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": size.text_width // 4,  # Qwen3Config defaults it to 128 whatever the width
        "max_position_embeddings": 1024, "pad_token_id": tokenizer.pad_token_id, **options,
    })


def flow_scheduler(**options):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**options)
