"""What latentray knows about each model family, in one place.

A family says which diffusers components a model directory holds, how its latents
are scaled and how many channels they have. Adding a family (SDXL, a transformer
denoiser) means one new ``ModelFamily`` and one line in ``FAMILIES``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    name: str
    # diffusers class that `model_index.json` names for this family
    pipeline_class: str
    text_encoder_component: str = "text_encoder"
    tokenizer_component: str = "tokenizer"
    denoiser_component: str = "unet"
    vae_component: str = "vae"
    scheduler_component: str = "scheduler"
    # hidden states of the text encoder feed cross attention; SD 1.x/2.x has no pooled output
    has_pooled_text_output: bool = False


STABLE_DIFFUSION = ModelFamily(name="stable-diffusion", pipeline_class="StableDiffusionPipeline")

FAMILIES: dict[str, ModelFamily] = {family.pipeline_class: family for family in (STABLE_DIFFUSION,)}


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent cell of a diffusers VAE config: each block but the last halves the resolution."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def family_of(model_dir: str) -> ModelFamily:
    """The family of a diffusers model directory, read from its ``model_index.json``."""
    index_path = os.path.join(model_dir, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"model: {model_dir!r} is not a diffusers model directory (no model_index.json)")
    with open(index_path) as index_file:
        class_name = json.load(index_file).get("_class_name")
    if class_name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"model: {model_dir!r} is a {class_name!r}; latentray supports {known}")
    return FAMILIES[class_name]
