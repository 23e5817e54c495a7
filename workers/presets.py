"""Built-in model presets, built deterministically in code (no hub, no download).

``tiny`` builds in about a second and exists for tests; ``small`` is sized so one
128x128 image at 20 steps takes about a second on two CPU cores (for benchmarks).
Both have random weights: they draw noise, but exercise every code path of a real
Stable Diffusion model (VAE with 4 blocks -> factor 8, CLIP text encoder, U-Net
with cross attention).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

# Bump when a preset's architecture or initialisation changes: cached copies are keyed by it.
PRESET_VERSION = 1
MAX_PROMPT_TOKENS = 77


@dataclass(frozen=True, kw_only=True)
class PresetSpec:
    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]
    vae_norm_groups: int
    text_width: int
    text_layers: int
    text_heads: int
    image_size: int


PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(
        unet_channels=(32, 64), vae_channels=(8, 16, 32, 32), vae_norm_groups=8,
        text_width=32, text_layers=2, text_heads=4, image_size=64,
    ),
    "small": PresetSpec(
        unet_channels=(64, 128, 128), vae_channels=(16, 32, 64, 64), vae_norm_groups=8,
        text_width=128, text_layers=4, text_heads=4, image_size=128,
    ),
}


def offline_clip_tokenizer():
    """A CLIP tokenizer built in memory: byte-level vocabulary, no merges.

    Every text tokenizes (one token per UTF-8 byte, ``</w>`` marking word ends), so
    no prompt maps to an unknown token and nothing needs downloading.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocabulary = {symbol: index for index, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=MAX_PROMPT_TOKENS)


def _unet_block_types(depth: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # like SD: cross attention in every block but the deepest
    down = tuple(["CrossAttnDownBlock2D"] * (depth - 1) + ["DownBlock2D"])
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (depth - 1))
    return down, up


def build_preset_pipeline(name: str):
    """A ``StableDiffusionPipeline`` with the preset's architecture and seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in PRESETS:
        raise ValueError(f"model: unknown preset {name!r}; presets are {', '.join(sorted(PRESETS))}")
    spec = PRESETS[name]
    tokenizer = offline_clip_tokenizer()
    latent_size = spec.image_size // 2 ** (len(spec.vae_channels) - 1)
    down_blocks, up_blocks = _unet_block_types(len(spec.unet_channels))

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=spec.unet_channels, down_block_types=down_blocks, up_block_types=up_blocks,
        cross_attention_dim=spec.text_width, attention_head_dim=8, norm_num_groups=32,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=spec.image_size,
        block_out_channels=spec.vae_channels, norm_num_groups=spec.vae_norm_groups,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_channels),
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=spec.text_width * 4,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        max_position_embeddings=MAX_PROMPT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    # Stable Diffusion 1.x's noise schedule
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# Models shipped as package data (trained, so not buildable in code): name -> folder in this package.
# `demo` is trained by `python -m jobs.train_demo` (see README).
SHIPPED_MODELS = {"demo": "demo_model"}
BUILT_IN_MODELS = (*PRESETS, *SHIPPED_MODELS)

# Classifier-free guidance when a run does not set one: Stable Diffusion's usual 7.5, except
# where a built-in model was measured to follow prompts better with another. The demo model's
# colour adherence on seen combinations: 89.9% at 7.5, 92.3% at 5 (91.1% at 4, 82.1% at 10).
DEFAULT_GUIDANCE = 7.5
RECOMMENDED_GUIDANCE = {"demo": 5.0}


def recommended_guidance(model: str) -> float:
    """The guidance scale a run of ``model`` uses unless told otherwise."""
    return RECOMMENDED_GUIDANCE.get(model, DEFAULT_GUIDANCE)


def shipped_model_dir(name: str) -> str:
    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIPPED_MODELS[name])
    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ValueError(f"model: the built-in {name!r} model is not installed at {directory} (reinstall latentray)")
    return directory


def export_preset(name: str, directory: str) -> str:
    """Write a built-in model as a standard diffusers directory (safetensors weights)."""
    if name in SHIPPED_MODELS:
        shutil.copytree(shipped_model_dir(name), directory, dirs_exist_ok=True)
    else:
        build_preset_pipeline(name).save_pretrained(directory, safe_serialization=True)
    return directory


def cache_root() -> str:
    return os.environ.get("LATENTRAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "latentray"))


def materialize_preset(name: str) -> str:
    """A built-in model as a local diffusers directory: a shipped one where it is installed,
    a code-built preset in the local cache, built once per node.

    Built into a temporary directory and renamed into place, so actors that start
    together on one node never see a half-written model.
    """
    if name in SHIPPED_MODELS:
        return shipped_model_dir(name)  # already a directory: nothing to build
    target = os.path.join(cache_root(), "presets", f"{name}-v{PRESET_VERSION}")
    if os.path.isfile(os.path.join(target, "model_index.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
    try:
        export_preset(name, staging)
        os.rename(staging, target)
    except OSError:
        if not os.path.isfile(os.path.join(target, "model_index.json")):
            raise
        # another process on this node finished first; its copy is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
