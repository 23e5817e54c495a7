"""FLUX.2: a 32-channel VAE whose latents the transformer sees as 2x2 patches (128 channels)
normalised by the VAE's batch-norm statistics, flow matching with an empirical shift.

One module, two families: ``Flux2`` holds what every FLUX.2 pipeline shares (the VAE
maths, sizes, schedulers, the ``encode_prompt`` both pipelines have, the refusal of true
CFG), so the VAE stages and a latent dataset are the same for both; its subclasses are
what differs, the text encoder and what guidance means:

- ``Flux2Klein`` runs ``Flux2KleinPipeline``: a Qwen3 text encoder (hidden states of layers
  9, 18 and 27 side by side, 512 tokens), in two variants that its ``model_index.json``
  tells apart (``is_distilled``): base (classifier-free guidance against a negative) and
  step-distilled (a few steps, no guidance). Its ``"latent"`` output is unpacked and
  de-normalised VAE latents.
- ``Flux2Dev`` runs ``Flux2Pipeline`` (FLUX.2 [dev]): a Mistral3 text encoder (hidden states
  of layers 10, 20 and 30, after the pipeline's system message, 512 tokens) and a guidance
  embedding: one transformer pass per step, no negative prompt. Its ``"latent"`` output is
  the packed tokens, already normalised.

Latents between stages and in a latent dataset are what the transformer sees: the VAE's
latents z (posterior mode) cut into 2x2 patches and normalised by the VAE's batch-norm
running statistics, ``(patchify(z) - bn.running_mean) / sqrt(bn.running_var + bn.eps)``,
``[128, H/16, W/16]``, as the pipelines' ``_encode_vae_image`` computes them for their image
conditioning. A trainer feeds a stored row to the transformer as the pipelines do:
``hidden_states = _pack_latents(latent[None])`` (``[1, H/16 * W/16, 128]``) with
``img_ids = _prepare_latent_ids(latent[None])``, and ``encoder_hidden_states =
prompt_embeds[None]`` (``[1, 512, 3 x text width]``) with ``txt_ids = _prepare_text_ids(...)``;
[dev] also takes ``guidance`` (the scale, one per row), [klein] ``guidance=None``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import numpy as np

from workers.families.base import FLOW_SCHEDULERS, ConfigReader, ModelFamily, ModelShape, stack, to_numpy
from workers.families.tokenizers import chat_token_count

PATCH = 2  # the transformer sees 2x2 latent patches as one token (channels x 4)


class Flux2(ModelFamily):
    """What FLUX.2 pipelines share: the VAE's batch-norm maths, 16-pixel sizes, flow matching,
    ``encode_prompt`` (stacked hidden states, fixed length) and no true CFG."""

    text_components = ("tokenizer", "text_encoder")
    denoiser_component = "transformer"
    attention_dispatch = True  # its attention processors call diffusers' dispatch_attention_fn
    schedulers = FLOW_SCHEDULERS
    # each actor caps its memory to its share (workers.runtime.memory): shares follow the weights in bf16,
    # klein: Qwen3 4B/8B as large as its 4B/9B transformer; dev: Mistral 3 24B (48 GB) beside a 32B
    # transformer (64 GB), with room for activations
    split_gpu_shares = {"text_encoder": 0.45, "denoiser": 0.45, "vae_decoder": 0.1}
    default_max_sequence_length = 512
    variant: ClassVar[str]  # "[klein]", "[dev]": for messages
    guidance_summary: ClassVar[str]  # what guidance_scale does instead of true CFG, for the refusal

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

    def check_options(self, *, scheduler: str | None, max_sequence_length: int | None, true_cfg_scale: float | None) -> None:
        super().check_options(scheduler=scheduler, max_sequence_length=max_sequence_length, true_cfg_scale=1.0)
        if true_cfg_scale is not None and true_cfg_scale != 1.0:  # None: not asked for
            raise ValueError(f"true_cfg_scale: FLUX.2 {self.variant} has no true CFG; {self.guidance_summary}")

    # -- the text stage ----------------------------------------------------------------------

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        # fixed length with the padding kept: the transformer attends to every one of the tokens
        prompt_embeds, _ = pipe.encode_prompt(texts, device=device, max_sequence_length=max_sequence_length or self.default_max_sequence_length)
        return {"prompt_embeds": to_numpy(prompt_embeds)}

    def is_truncated(self, pipe: Any, text: str, max_sequence_length: int | None) -> bool:
        return self.prompt_tokens(pipe, text) > (max_sequence_length or self.default_max_sequence_length)

    def prompt_tokens(self, pipe: Any, text: str) -> int:
        """Tokens of ``text`` as the pipeline sends it to its text encoder (chat template included)."""
        raise NotImplementedError

    # -- the VAE stages ----------------------------------------------------------------------

    def decode_latents(self, vae: Any, latents: Any) -> Any:
        # as the pipelines' tail: de-normalise, unpatchify, decode
        from diffusers import Flux2KleinPipeline

        mean, std = batch_norm_statistics(vae, latents)
        return vae.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]

    def encode_pixels(self, vae: Any, images: Any, sample: str, generators: list) -> Any:
        # as the pipelines' _encode_vae_image (the posterior's mode), or a sample from each row's generator
        posterior = vae.encode(images).latent_dist
        return normalise(vae, posterior.mode() if sample == "mean" else posterior.sample(generator=generators))


class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    default_steps = 50  # base; a distilled model's own below (describe)
    default_guidance = 4.0
    guidance_rule = (
        "base models: classifier-free guidance against the negative prompt ('' for none) when guidance_scale > 1; "
        "distilled models (is_distilled) ignore guidance_scale and negative prompts (no guidance embedding)"
    )
    variant = "[klein]"
    guidance_summary = "base models run classifier-free guidance with guidance_scale > 1, distilled models take no guidance"

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

    def prompt_tokens(self, pipe: Any, text: str) -> int:
        return chat_token_count(pipe.tokenizer, text, enable_thinking=False)

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        arguments = super().denoise_arguments(pipe, batch, rows, options)
        # the pipeline reads negatives only for classifier-free guidance (rows of a group share their guidance)
        if pipe.config.is_distilled or float(batch["guidance_scale"][rows[0]]) <= 1:
            arguments.pop("negative_prompt_embeds")
        return arguments

    def unpack_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        # the pipeline returns VAE latents (de-normalised, 32 channels): back to what the transformer saw
        return normalise(pipe.vae, latents.float())  # float32: no second rounding in half precision


class Flux2Dev(Flux2):
    name = "flux2-dev"
    pipeline_class = "Flux2Pipeline"
    default_steps = 50  # Flux2Pipeline.__call__'s
    default_guidance = 4.0
    guidance_rule = (
        "the transformer's guidance embedding (guidance-distilled: one pass per step, no classifier-free guidance); "
        "Flux2Pipeline takes no negative prompt, so a row's negative prompt is ignored"
    )
    variant = "[dev]"
    guidance_summary = "guidance_scale feeds its guidance embedding, and it takes no negative prompt"

    def describe(self, read_config: ConfigReader) -> ModelShape:
        # a released [dev] directory's tokenizer is a PixtralProcessor, which transformers builds only
        # with torchvision: say so before any actor starts, not as an import error in every actor
        tokenizer_class = ((read_config("model_index.json") or {}).get("tokenizer") or [None, None])[1]
        if tokenizer_class == "PixtralProcessor" and importlib.util.find_spec("torchvision") is None:
            raise ValueError(
                "model: its tokenizer is a PixtralProcessor (FLUX.2 [dev]), which transformers loads only with torchvision: "
                "install the torchvision build that matches your torch"
            )
        return super().describe(read_config)

    def reads_negative(self, true_cfg_scale: float) -> bool:
        return False  # the text stage encodes no negative prompt: the pipeline has no use for one

    def prompt_tokens(self, pipe: Any, text: str) -> int:
        # the pipeline's own messages (its system message, then the prompt), rendered by its processor or
        # tokenizer; the template writes the BOS itself, so the text tokenizer adds no special tokens
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        rendered = pipe.tokenizer.apply_chat_template(format_input([text], system_message=pipe.system_message)[0], tokenize=False)
        tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # a PixtralProcessor holds the tokenizer
        return len(tokenizer(rendered, add_special_tokens=False).input_ids)

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        return {"prompt_embeds": stack([batch["prompt_embeds"][row] for row in rows], pipe)}  # no negative: no CFG

    def unpack_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        # the pipeline returns its packed tokens [B, h * w, 128], already normalised: put each token
        # back at its position id, as the pipeline's own decode does
        cells = pipe.vae_scale_factor * PATCH
        grid = latents.new_empty(latents.shape[0], 0, height // cells, width // cells)  # only its shape is read
        return pipe._unpack_latents_with_ids(latents.float(), pipe._prepare_latent_ids(grid).to(latents.device))


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

KLEIN_TEXT_LAYERS = 28  # Qwen3-4B's: the pipeline stacks the hidden states of layers 9, 18 and 27
DEV_TEXT_LAYERS = 40  # Mistral Small 3.1's: the pipeline stacks the hidden states of layers 10, 20 and 30


def build_preset(size):
    """A base (CFG) ``Flux2KleinPipeline`` of ``size``, seeded random weights; set ``is_distilled``
    in its ``model_index.json`` for the distilled variant (the weights' layout is the same)."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    parts.seeded(0)
    transformer = flux2_transformer(size, guidance_embeds=False)  # [klein] has none: the pipeline passes guidance=None
    parts.seeded(1)
    vae = flux2_vae(size)
    parts.seeded(2)
    # the released model's 28 layers at the preset's width; the byte vocabulary has no BOS
    text_encoder = Qwen3ForCausalLM(parts.qwen3_config(
        size, tokenizer, num_hidden_layers=KLEIN_TEXT_LAYERS, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    ))
    return Flux2KleinPipeline(
        scheduler=flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=False,
    )


def build_dev_preset(size):
    """A ``Flux2Pipeline`` (FLUX.2 [dev]) of ``size``, seeded random weights: a Mistral3 text encoder
    and its tokenizer with the Mistral chat template, a transformer with a guidance embedding.

    The tokenizer component is the Mistral tokenizer itself, not the ``PixtralProcessor`` that wraps
    it in the released model: transformers builds that processor only with torchvision, and the
    pipeline calls nothing of it but ``apply_chat_template``, which renders and tokenizes text the same.
    """
    from diffusers import Flux2Pipeline

    from workers.families import preset_parts as parts
    from workers.families.tokenizers import mistral_tokenizer

    tokenizer = mistral_tokenizer()
    parts.seeded(0)
    transformer = flux2_transformer(size, guidance_embeds=True)
    parts.seeded(1)
    vae = flux2_vae(size)
    parts.seeded(2)
    text_encoder = mistral3_text_encoder(size, tokenizer)
    return Flux2Pipeline(scheduler=flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def flux2_transformer(size, *, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    heads = 2
    head_dim = size.transformer_width // heads
    return Flux2Transformer2DModel(
        in_channels=32 * PATCH**2, num_layers=max(1, size.transformer_depth // 2), num_single_layers=size.transformer_depth,
        attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=3 * size.text_width,  # three hidden-state layers side by side
        axes_dims_rope=(head_dim // 4,) * 4,  # time, height, width, sequence: adding up to the head width
        guidance_embeds=guidance_embeds,
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


def flux2_scheduler():
    """The released FLUX.2 models' scheduler config (the pipelines compute their own empirical shift, mu)."""
    from workers.families import preset_parts as parts

    return parts.flow_scheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True,
    )


def mistral3_text_encoder(size, tokenizer):
    """``Mistral3ForConditionalGeneration`` at the preset's width with the released model's 40 layers;
    its Pixtral vision tower is always built, though text-to-image never runs it."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": size.text_width,
            "intermediate_size": size.text_width * 2, "num_hidden_layers": DEV_TEXT_LAYERS, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": size.text_width // 4, "max_position_embeddings": 1024, "sliding_window": None,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": size.image_size, "patch_size": 16},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False,
    ))
