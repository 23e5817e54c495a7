"""The built-in demo model's architecture: a small Stable Diffusion 1.x, built from code.

64x64 images; an AutoencoderKL with 4 blocks (factor 8, as SD) -> 8x8x4 latents; a
frozen, randomly initialised CLIP text encoder (nothing can be downloaded) behind a
tokenizer whose merges make each word of the procedural captions one token; a
UNet2DConditionModel with cross attention; a DDIM scheduler. ``jobs.train_demo`` trains
the VAE and the U-Net and saves the result as a standard diffusers directory.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import torch

from workers.families.tokenizers import clip_tokenizer

END_OF_WORD = "</w>"


@dataclass(frozen=True, kw_only=True)
class DemoArchitecture:
    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # 4 blocks: 64x64 -> 8x8, SD's factor 8
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128)  # 8x8 -> 4x4; self-attention at 8x8 already sees the whole latent
    unet_layers_per_block: int = 1
    unet_attention_heads: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # captions are 9 tokens with start and end; room for a few words spelled out byte by byte
    max_tokens: int = 32

    def __post_init__(self) -> None:
        if len(self.vae_channels) != 4:
            raise ValueError(f"vae_channels: needs 4 blocks (factor 8, as Stable Diffusion), got {self.vae_channels}")
        if any(channels % self.vae_norm_groups for channels in self.vae_channels):
            raise ValueError(f"vae_norm_groups: must divide every vae_channels entry {self.vae_channels}, got {self.vae_norm_groups}")
        if self.image_size % 8 or self.image_size < 16:
            raise ValueError(f"image_size: must be a multiple of 8, at least 16, got {self.image_size}")
        if len(self.unet_channels) < 2 or any(channels % 32 for channels in self.unet_channels):
            raise ValueError(f"unet_channels: needs >= 2 blocks of multiples of 32 (norm groups), got {self.unet_channels}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_heads: must divide text_width {self.text_width}, got {self.text_heads}")
        if self.max_tokens < 12:
            raise ValueError(f"max_tokens: must hold a caption (>= 12), got {self.max_tokens}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


# -- tokenizer ------------------------------------------------------------------------------------


def learn_word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word one token, learned on the words themselves.

    Plain BPE training, most frequent pair first, ties broken alphabetically: the same
    words always give the same merges (the tokenizers library's trainer is not used
    because its tie-breaking is not part of its contract).
    """
    if not all(word.isascii() and word.isalpha() and word.islower() for word in words):
        raise ValueError(f"words: caption words must be lowercase ASCII letters, got {words}")
    segmented = [[*word[:-1], word[-1] + END_OF_WORD] for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in segmented for pair in pairwise(symbols))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = [_apply_merge(symbols, best) for symbols in segmented]


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def caption_tokenizer(words: list[str], max_tokens: int):
    """A CLIP tokenizer: the offline byte-level vocabulary plus one token per caption word.

    The 512 byte symbols stay in the vocabulary, so any other text still tokenizes
    (byte by byte) and nothing maps to an unknown token.
    """
    from transformers import CLIPTokenizer

    base = clip_tokenizer()
    vocabulary = dict(base.get_vocab())
    merges = learn_word_merges(words)
    for left, right in merges:
        vocabulary.setdefault(left + right, len(vocabulary))
    return CLIPTokenizer(vocab=vocabulary, merges=merges, model_max_length=max_tokens)


def write_vocab_and_merges(tokenizer, directory: str) -> None:
    """Also write ``vocab.json`` and ``merges.txt``: transformers 4 loads a CLIPTokenizer only from those."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    with open(os.path.join(directory, "vocab.json"), "w") as vocab_file:
        json.dump(model["vocab"], vocab_file, ensure_ascii=False, sort_keys=True)
    with open(os.path.join(directory, "merges.txt"), "w") as merges_file:
        merges_file.write("#version: 0.2\n")
        merges_file.writelines(" ".join(pair if isinstance(pair, list) else pair.split(" ")) + "\n" for pair in model["merges"])


# -- components -----------------------------------------------------------------------------------


def build_vae(architecture: DemoArchitecture, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(architecture.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=architecture.latent_channels, sample_size=architecture.image_size,
        block_out_channels=architecture.vae_channels, layers_per_block=architecture.vae_layers_per_block,
        norm_num_groups=architecture.vae_norm_groups,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
    )


def build_text_encoder(architecture: DemoArchitecture, tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=architecture.text_width, intermediate_size=architecture.text_width * 4,
        num_hidden_layers=architecture.text_layers, num_attention_heads=architecture.text_heads,
        max_position_embeddings=architecture.max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(architecture: DemoArchitecture, seed: int):
    from diffusers import UNet2DConditionModel

    depth = len(architecture.unet_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=architecture.latent_size, in_channels=architecture.latent_channels,
        out_channels=architecture.latent_channels, layers_per_block=architecture.unet_layers_per_block,
        block_out_channels=architecture.unet_channels,
        # as SD: cross attention in every block but the deepest
        down_block_types=tuple(["CrossAttnDownBlock2D"] * (depth - 1) + ["DownBlock2D"]),
        up_block_types=tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (depth - 1)),
        cross_attention_dim=architecture.text_width, attention_head_dim=architecture.unet_attention_heads,
        norm_num_groups=32,
    )


def build_scheduler():
    """DDIM over DDPM's linear noise schedule, sampling from the last timestep.

    Not SD's scaled_linear: at its last step 7% of the signal is left, which a model
    of 8x8 latents learns to lean on and then never finds in the pure noise sampling
    starts from (brightness and colour drift). Linear leaves under 1%, and "trailing"
    spacing makes the first sampling step t=999.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="epsilon",
    )


def assemble_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(pipeline, directory: str) -> str:
    """A standard diffusers directory, safetensors weights, loadable by transformers 4 and 5."""
    pipeline.save_pretrained(directory, safe_serialization=True)
    write_vocab_and_merges(pipeline.tokenizer, os.path.join(directory, "tokenizer"))
    return directory
