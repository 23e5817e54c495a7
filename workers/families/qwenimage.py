"""Qwen-Image: a Qwen2.5-VL text encoder prompted through a fixed template, a dual-stream
transformer on packed 2x2 latents, a 16-channel video VAE normalised per channel, flow
matching with dynamic shift (``QwenImagePipeline``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.families.base import FLOW_SCHEDULERS, ModelFamily, ModelShape, to_numpy


class QwenImage(ModelFamily):
    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    img2img_pipeline_class = "QwenImageImg2ImgPipeline"
    text_components = ("tokenizer", "text_encoder")
    denoiser_component = "transformer"
    attention_dispatch = True  # its attention processors call diffusers' dispatch_attention_fn
    default_steps = 50  # QwenImagePipeline's
    # the released model has no guidance embedding: it ignores a row's guidance (see describe)
    default_guidance = 0.0
    guidance_rule = (
        "the guidance embedding of guidance-distilled models (transformer guidance_embeds); the released "
        "Qwen-Image has none and ignores it. Classifier-free guidance is --true-cfg-scale (default 4, as "
        "QwenImagePipeline), on rows with a negative prompt (' ' guides away from an empty text)"
    )
    schedulers = FLOW_SCHEDULERS
    # each actor caps its memory to its share (workers.runtime.memory): shares follow the weights in bf16,
    # Qwen2.5-VL 7B (17 GB) beside a 41 GB transformer, with room for activations
    split_gpu_shares = {"text_encoder": 0.25, "denoiser": 0.65, "vae_decoder": 0.1}
    default_max_sequence_length = 512  # __call__'s (encode_prompt's own default is 1024)
    max_sequence_length_limit = 1024  # QwenImagePipeline.check_inputs refuses more
    takes_true_cfg_scale = True
    default_true_cfg_scale = 4.0
    fixed_length_embeddings = False  # the pipeline drops each caption's padding and template tokens

    # -- the driver: configs only ------------------------------------------------------------

    def vae_scale_factor(self, vae_config: dict) -> int:
        # as QwenImagePipeline: each temporal-downsample entry is one spatial halving
        return 2 ** len(vae_config.get("temperal_downsample", [False, True, True]))

    def describe(self, read_config) -> ModelShape:
        shape = super().describe(read_config)
        vae = read_config(f"{self.vae_component}/config.json") or {}
        distilled = bool((read_config(f"{self.denoiser_component}/config.json") or {}).get("guidance_embeds"))
        return ModelShape(**{
            **vars(shape), "latent_channels": int(vae.get("z_dim", 16)),
            # latents between stages are already normalised by the VAE's per-channel mean and std
            "scaling_factor": 1.0, "shift_factor": 0.0,
            # no guidance-distilled checkpoint is released: the scale true CFG uses on the base model
            "default_guidance": self.default_true_cfg_scale if distilled else self.default_guidance,
        })

    def default_size(self, denoiser_config: dict, vae_scale_factor: int) -> tuple[int, int]:
        return 128 * vae_scale_factor, 128 * vae_scale_factor  # QwenImagePipeline.default_sample_size

    def size_multiple(self, denoiser_config: dict, vae_scale_factor: int) -> int:
        return vae_scale_factor * 2  # 2x2 latent patches per token

    # -- the text stage ----------------------------------------------------------------------

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        # 1. the pipeline's template and dropped template tokens, __call__'s token budget, one image per prompt
        embeddings, mask = pipe.encode_prompt(
            list(texts), device=device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        # 2. each caption at its own length: the mask marks the batch's padding (None: none)
        lengths = [embeddings.shape[1]] * len(texts) if mask is None else mask.sum(dim=1).tolist()
        return {"prompt_embeds": [array[:length] for array, length in zip(to_numpy(embeddings), lengths)]}

    def is_truncated(self, pipe: Any, text: str, max_sequence_length: int | None) -> bool:
        # the template's first tokens are dropped from the embedding; the rest count against the budget
        tokens = len(pipe.tokenizer(pipe.prompt_template_encode.format(text)).input_ids)
        budget = min(max_sequence_length or self.default_max_sequence_length, pipe.tokenizer_max_length)
        return tokens - pipe.prompt_template_encode_start_idx > budget

    # -- the denoiser stage ------------------------------------------------------------------

    def guidance_argument(self, pipe: Any, guidance: float) -> float | None:
        # the pipeline requires guidance for a guidance-distilled transformer and warns about it otherwise
        return guidance if pipe.transformer.config.guidance_embeds else None

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        # 1. captions padded to the call's longest, masked as encode_prompt masks a batch; the
        # text stage cut them to the run's budget already, so the pipeline's own cut keeps them whole
        arguments = dict(zip(("prompt_embeds", "prompt_embeds_mask"), padded([batch["prompt_embeds"][row] for row in rows], pipe)))
        arguments["max_sequence_length"] = self.max_sequence_length_limit

        # 2. true CFG for rows with a negative prompt; the others run as diffusers with negative_prompt=None
        if not self.runs_true_cfg(batch, rows, options):
            return {**arguments, "true_cfg_scale": 1.0}  # the pipeline's 4.0 would only warn without a negative
        negatives = padded([batch["negative_prompt_embeds"][row] for row in rows], pipe)
        return {**arguments, **dict(zip(("negative_prompt_embeds", "negative_prompt_embeds_mask"), negatives)),
                "true_cfg_scale": options["true_cfg_scale"]}

    def unpack_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        # the pipeline's unpacking gives one video frame, [B, C, 1, h, w]
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]

    # -- the VAE stages ----------------------------------------------------------------------

    def decode_latents(self, vae: Any, latents: Any) -> Any:
        # as QwenImagePipeline's decode: latents / (1 / std) + mean, one frame of the video VAE
        mean, inverse_std = channel_statistics(vae, latents)
        frames = latents.unsqueeze(2) / inverse_std + mean
        return vae.decode(frames, return_dict=False)[0][:, :, 0]

    def encode_pixels(self, vae: Any, images: Any, sample: str, generators: list) -> Any:
        # as QwenImageImg2ImgPipeline prepares image latents: (latents - mean) * (1 / std), one frame
        posterior = vae.encode(images.unsqueeze(2)).latent_dist
        latents = posterior.mean if sample == "mean" else posterior.sample(generator=generators)
        mean, inverse_std = channel_statistics(vae, latents)
        return ((latents - mean) * inverse_std)[:, :, 0]


def channel_statistics(vae: Any, like: Any) -> tuple[Any, Any]:
    """The VAE's per-channel latent mean and 1 / std, ``[1, C, 1, 1, 1]``, computed as the pipelines do."""
    import torch

    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inverse_std


def padded(embeddings: list[np.ndarray], pipe: Any) -> tuple[Any, Any]:
    """Captions of their own lengths as one zero-padded batch and its mask (ones, then zeros),
    as ``QwenImagePipeline._get_qwen_prompt_embeds`` builds them."""
    import torch

    longest = max(len(embedding) for embedding in embeddings)
    values = np.zeros((len(embeddings), longest, embeddings[0].shape[-1]), np.float32)
    mask = np.zeros((len(embeddings), longest), np.int64)
    for row, embedding in enumerate(embeddings):
        values[row, :len(embedding)] = embedding
        mask[row, :len(embedding)] = 1
    return torch.from_numpy(values).to(pipe.device, pipe.dtype), torch.from_numpy(mask).to(pipe.device)


# -- offline presets ----------------------------------------------------------------------------


def build_preset(size):
    """A ``QwenImagePipeline`` of ``size``: a Qwen2.5-VL text encoder, the dual-stream transformer, seeded random weights."""
    from diffusers import QwenImagePipeline

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    parts.seeded(0)
    transformer = qwen_transformer(size)
    parts.seeded(1)
    vae = qwen_vae(size)
    parts.seeded(2)
    text_encoder = qwen_text_encoder(size, tokenizer)
    # Qwen-Image's scheduler config: dynamic exponential shift, stretched to end at sigma 0.02
    scheduler = parts.flow_scheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def qwen_transformer(size):
    from diffusers import QwenImageTransformer2DModel

    heads = 2
    head_dim = size.transformer_width // heads
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16 * 4, out_channels=16, num_layers=size.transformer_depth, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=size.text_width, guidance_embeds=False,
        # rotary axes (frame, height, width) add up to the head width, each even (real: 16, 56, 56 of 128)
        axes_dims_rope=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
    )


def qwen_vae(size):
    from diffusers import AutoencoderKLQwenImage

    base = size.vae_channels[0]
    # the real model's per-channel statistics (the class defaults): decoding exercises the normalisation
    return AutoencoderKLQwenImage(
        base_dim=base, z_dim=16, dim_mult=[channels // base for channels in size.vae_channels], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def qwen_text_encoder(size, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 4
    half_head = size.text_width // heads // 2
    # multimodal rotary sections (time, height, width) add up to half the head width (real: 16, 24, 24 of 64)
    time = half_head // 4
    space = half_head - time
    vocabulary = len(tokenizer)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocabulary, "hidden_size": size.text_width, "intermediate_size": size.text_width * 2,
            "num_hidden_layers": size.text_layers, "num_attention_heads": heads, "num_key_value_heads": 2,
            "max_position_embeddings": 2048, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "rope_parameters": {"mrope_section": [time, space // 2, space - space // 2], "rope_type": "default", "rope_theta": 1e6},
        },
        # the vision tower is always built, though text-to-image never runs it
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": size.text_width,
                       "fullatt_block_indexes": [0]},
        # image and video token ids outside the vocabulary: no text ever holds them
        vocab_size=vocabulary, image_token_id=vocabulary + 1, video_token_id=vocabulary + 2,
        vision_start_token_id=vocabulary + 3, vision_end_token_id=vocabulary + 4,
    ))
