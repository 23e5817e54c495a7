"""Z-Image: one Qwen3 text encoder prompted through its chat template, a single-stream
transformer, a 16-channel VAE with a shift, flow matching (``ZImagePipeline``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.families.base import ModelFamily, to_numpy
from workers.families.tokenizers import chat_token_count


class ZImage(ModelFamily):
    name = "zimage"
    pipeline_class = "ZImagePipeline"
    img2img_pipeline_class = "ZImageImg2ImgPipeline"
    text_components = ("tokenizer", "text_encoder")
    denoiser_component = "transformer"
    attention_dispatch = True  # its attention processors call diffusers' dispatch_attention_fn
    default_steps = 50
    default_guidance = 5.0
    guidance_rule = "classifier-free guidance when guidance_scale > 0 (cond + scale * (cond - uncond))"
    # ZImagePipeline passes its own sigmas and mu: only the flow-match Euler scheduler takes both
    schedulers = ("flow-euler",)
    # each actor caps its memory to its share (workers.runtime.memory): shares follow the weights in bf16,
    # Qwen3-4B (8 GB) beside a 12 GB transformer, with room for activations
    split_gpu_shares = {"text_encoder": 0.4, "denoiser": 0.5, "vae_decoder": 0.1}
    default_max_sequence_length = 512
    fixed_length_embeddings = False  # the pipeline drops each caption's padding

    def default_size(self, denoiser_config: dict, vae_scale_factor: int) -> tuple[int, int]:
        return 1024, 1024  # ZImagePipeline's default

    def size_multiple(self, denoiser_config: dict, vae_scale_factor: int) -> int:
        return vae_scale_factor * 2

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        # one embedding per text, as long as its tokens (padding dropped by the pipeline);
        # the pipeline rewrites the list it is given into chat-templated text: give it a copy
        embeddings, _ = pipe.encode_prompt(
            list(texts), device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        return {"prompt_embeds": [to_numpy(embedding.unsqueeze(0))[0] for embedding in embeddings]}

    def is_truncated(self, pipe: Any, text: str, max_sequence_length: int | None) -> bool:
        limit = max_sequence_length or self.default_max_sequence_length
        return chat_token_count(pipe.tokenizer, text, enable_thinking=True) > limit

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        import torch

        # the transformer takes a list of captions of their own lengths
        return {
            column: [torch.from_numpy(np.asarray(batch[column][row])).to(pipe.device, pipe.dtype) for row in rows]
            for column in ("prompt_embeds", "negative_prompt_embeds")
        }


# -- offline presets ----------------------------------------------------------------------------


def build_preset(size):
    """A ``ZImagePipeline`` of ``size``: a Qwen3 text encoder, a single-stream transformer, seeded random weights."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    heads = 2
    head_dim = size.transformer_width // heads
    parts.seeded(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=size.transformer_width, n_layers=size.transformer_depth,
        n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, cap_feat_dim=size.text_width,
        # rotary axes (caption/frame, height, width) must add up to the head width; the first
        # axis indexes caption tokens: above the longest padded caption plus one
        axes_dims=[head_dim // 2, head_dim // 4, head_dim // 4], axes_lens=[1024, 128, 128],
    )
    import torch

    with torch.no_grad():  # created uninitialised by the model; the transformer attends to them
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    parts.seeded(1)
    vae = parts.vae(size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    parts.seeded(2)
    text_encoder = Qwen3Model(parts.qwen3_config(size, tokenizer))
    return ZImagePipeline(
        scheduler=parts.flow_scheduler(shift=3.0), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
