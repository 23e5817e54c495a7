"""What a model family is to latentray: its diffusers pipeline, split into our stages.

diffusers already knows each family's maths. A family module says how latentray
cuts that pipeline into stage actors and what travels between them:

- the text stage holds the tokenizers and text encoders and calls the pipeline's own
  ``encode_prompt``; its outputs are columns named as the pipeline's ``__call__``
  arguments (``prompt_embeds``, ``pooled_prompt_embeds``, ...);
- the denoiser stage holds the U-Net or transformer and the scheduler and calls the
  pipeline itself with those embeddings, per-row CPU generators and
  ``output_type="latent"``; latents leave it unpacked, ``[C, H/f, W/f]``;
- the VAE stages scale and shift latents by the VAE's config.

Everything a family does differently lives in its module (``workers/families/<name>.py``):
components per stage, the embeddings it produces, extra conditioning, the size multiple,
default steps and guidance, the schedulers that fit it, and its offline presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

# scheduler names (workers/schedulers.py) for noise-prediction families and for flow-matching ones
CLASSIC_SCHEDULERS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler-a", "heun", "dpm++", "dpm++-karras", "dpm++-sde", "unipc")
FLOW_SCHEDULERS = ("flow-euler", "flow-euler-karras", "flow-euler-exponential")

ConfigReader = Callable[[str], "dict | None"]  # relative path in the model directory -> parsed JSON, None when absent


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the driver needs to know of a model before any weights load (read from its configs)."""

    default_height: int
    default_width: int
    size_multiple: int  # height and width must be multiples of this
    vae_scale_factor: int  # pixels per latent cell
    latent_channels: int
    # the denoiser sees (latent - shift_factor) * scaling_factor
    scaling_factor: float
    shift_factor: float
    default_steps: int
    default_guidance: float


class ModelFamily:
    """One family of diffusers pipelines. Subclasses set the class attributes and override
    the hooks where the family differs; the defaults are Stable Diffusion's."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # `model_index.json` ``_class_name``
    # diffusers' image-to-image pipeline of the family (rows with an ``init_image``); None: such rows are refused
    img2img_pipeline_class: ClassVar[str | None] = None
    text_components: ClassVar[tuple[str, ...]]  # tokenizers and text encoders (the text stage)
    optional_components: ClassVar[tuple[str, ...]] = ()  # may be missing from a directory (SD3's T5)
    # components whose config (not weights) the text stage reads
    text_stage_configs: ClassVar[tuple[str, ...]] = ()
    denoiser_component: ClassVar[str] = "unet"
    vae_component: ClassVar[str] = "vae"
    scheduler_component: ClassVar[str] = "scheduler"
    # per-text outputs of the text stage; each also travels as ``negative_<name>``
    embedding_columns: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    # every text's embedding has one shape (padded to the tokenizer's length). False (Z-Image,
    # Qwen-Image): [tokens, dim] embeddings are as long as each text's tokens, and travel,
    # are stored (with ``<name>_length``) and reach the denoiser at that length, unpadded
    fixed_length_embeddings: ClassVar[bool] = True
    default_steps: ClassVar[int]
    default_guidance: ClassVar[float]
    guidance_rule: ClassVar[str]  # what guidance_scale means, for the README and errors
    schedulers: ClassVar[tuple[str, ...]] = CLASSIC_SCHEDULERS
    # default token budget of the long text encoder (T5, Qwen); None: the family has no such option
    default_max_sequence_length: ClassVar[int | None] = None
    max_sequence_length_limit: ClassVar[int | None] = None  # the pipeline's own upper bound (T5: 512)
    takes_true_cfg_scale: ClassVar[bool] = False  # diffusers' true_cfg_scale (FLUX, Qwen-Image)
    # the pipeline's own default: FLUX 1.0 (off), Qwen-Image 4.0; a run's --true-cfg-scale overrides it
    default_true_cfg_scale: ClassVar[float] = 1.0
    # per-row columns beyond the common ones (name -> what it holds), passed to the denoiser
    conditioning_columns: ClassVar[dict[str, str]] = {}
    # split placement on GPUs: each stage's share of one GPU per actor set (Ray's fractional GPUs), which
    # each actor also caps its memory to (``workers.runtime.memory.cap_gpu_memory``): shares follow the
    # models' weights, with room for activations. CLIP is small next to a U-Net; T5-XXL and Qwen3 are
    # the second largest models of their families
    split_gpu_shares: ClassVar[dict[str, float]] = {"text_encoder": 0.1, "denoiser": 0.7, "vae_decoder": 0.2}
    # precision on CUDA (CPU always runs float32): what ``--dtype auto`` resolves to, and whether
    # ``--dtype float16`` is allowed. Transformer families (and any new family, unless it says
    # otherwise) overflow in float16 (NaN or black images): bfloat16, float16 refused
    cuda_dtype: ClassVar[str] = "bfloat16"
    float16_safe: ClassVar[bool] = False
    # whether the denoiser's attention runs through diffusers' dispatcher, so that
    # ``--attention-backend`` applies (diffusers 0.42: FLUX.1, FLUX.2, Z-Image, Qwen-Image; not the
    # U-Net's or SD3's attention processors)
    attention_dispatch: ClassVar[bool] = False

    @property
    def denoiser_components(self) -> tuple[str, ...]:
        return (self.denoiser_component, self.scheduler_component)

    @property
    def required_components(self) -> tuple[str, ...]:
        every = (*self.text_components, *self.denoiser_components, self.vae_component)
        return tuple(name for name in every if name not in self.optional_components)

    # -- the driver: configs only ------------------------------------------------------------

    def vae_scale_factor(self, vae_config: dict) -> int:
        """Pixels per latent cell: each block of a diffusers ``AutoencoderKL`` but the last halves the resolution."""
        return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    def describe(self, read_config: ConfigReader) -> ModelShape:
        vae = read_config(f"{self.vae_component}/config.json") or {}
        vae_scale_factor = self.vae_scale_factor(vae)
        denoiser = read_config(f"{self.denoiser_component}/config.json") or {}
        height, width = self.default_size(denoiser, vae_scale_factor)
        return ModelShape(
            default_height=height, default_width=width,
            size_multiple=self.size_multiple(denoiser, vae_scale_factor), vae_scale_factor=vae_scale_factor,
            latent_channels=int(vae.get("latent_channels", 4)),
            scaling_factor=float(vae.get("scaling_factor", 0.18215)), shift_factor=float(vae.get("shift_factor") or 0.0),
            default_steps=self.default_steps, default_guidance=self.default_guidance,
        )

    def default_size(self, denoiser_config: dict, vae_scale_factor: int) -> tuple[int, int]:
        """The pipeline's default height and width (diffusers: the denoiser's sample size in pixels)."""
        sample_size = denoiser_config.get("sample_size", 64)
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * vae_scale_factor, width * vae_scale_factor

    def size_multiple(self, denoiser_config: dict, vae_scale_factor: int) -> int:
        return vae_scale_factor

    def check_options(self, *, scheduler: str | None, max_sequence_length: int | None, true_cfg_scale: float | None) -> None:
        """Options that do not fit this family stop the run (exit 2), with the reason."""
        if scheduler is not None and scheduler not in self.schedulers:
            raise ValueError(f"scheduler: {scheduler!r} does not fit {self.name} models; choose one of {', '.join(self.schedulers)}")
        if max_sequence_length is not None and self.default_max_sequence_length is None:
            raise ValueError(f"max_sequence_length: {self.name} models have no long text encoder to limit (CLIP's 77 tokens are fixed)")
        if max_sequence_length is not None and self.max_sequence_length_limit and max_sequence_length > self.max_sequence_length_limit:
            raise ValueError(f"max_sequence_length: {self.name} models take at most {self.max_sequence_length_limit} tokens, got {max_sequence_length}")
        if true_cfg_scale is not None and true_cfg_scale != 1.0 and not self.takes_true_cfg_scale:
            raise ValueError(f"true_cfg_scale: {self.name} models do not take it; they use guidance_scale for classifier-free guidance")

    # -- the text stage ----------------------------------------------------------------------

    def encode_texts(self, pipe: Any, texts: list[str], device: Any, max_sequence_length: int | None) -> dict[str, list[np.ndarray]]:
        """Embeddings of each text, per column of ``embedding_columns`` (float32 numpy arrays)."""
        raise NotImplementedError

    def empty_negative(self, pipe: Any, encoded_empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What "no negative prompt" encodes to: as diffusers' ``negative_prompt=None``."""
        return encoded_empty

    def true_cfg_scale(self, requested: float | None) -> float:
        """A run's true_cfg_scale: the one it asked for, else the family's pipeline's default."""
        return self.default_true_cfg_scale if requested is None else requested

    def reads_negative(self, true_cfg_scale: float) -> bool:
        """Whether the denoiser uses negative-prompt embeddings at all (true-CFG families: only with true CFG)."""
        # without true CFG a negative prompt changes nothing, as in diffusers
        return true_cfg_scale > 1 if self.takes_true_cfg_scale else True

    def token_limits(self, pipe: Any, max_sequence_length: int | None) -> list[tuple[Any, int]]:
        """(tokenizer, tokens it keeps) for every tokenizer a prompt goes through."""
        return [(pipe.tokenizer, pipe.tokenizer.model_max_length)]

    def is_truncated(self, pipe: Any, text: str, max_sequence_length: int | None) -> bool:
        """Whether any of the family's tokenizers drops tokens of ``text`` (diffusers truncates silently)."""
        return any(
            len(tokenizer(text, truncation=False, verbose=False).input_ids) > limit
            for tokenizer, limit in self.token_limits(pipe, max_sequence_length)
        )

    # -- the denoiser stage ------------------------------------------------------------------

    def group_key(self, batch: dict[str, np.ndarray], row: int) -> tuple:
        """What else, besides size, steps and guidance, rows of one denoising call must share."""
        if self.takes_true_cfg_scale:  # rows with a negative prompt take the true-CFG path (twice the passes)
            return (bool(batch["negative_prompt"][row]),)
        return ()

    def runs_true_cfg(self, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> bool:
        """Whether a group of rows (one ``group_key``) runs diffusers' true CFG: a true-CFG family,
        ``true_cfg_scale > 1`` and a negative prompt, as the pipeline decides it."""
        return self.takes_true_cfg_scale and options["true_cfg_scale"] > 1 and bool(batch["negative_prompt"][rows[0]])

    def guidance_argument(self, pipe: Any, guidance: float) -> float | None:
        """What the pipeline's ``guidance_scale`` receives for a row's guidance (Qwen-Image: None
        unless its transformer has a guidance embedding)."""
        return guidance

    def denoise_arguments(self, pipe: Any, batch: dict[str, np.ndarray], rows: list[int], options: dict) -> dict[str, Any]:
        """Keyword arguments of the pipeline's ``__call__`` for one group of rows: their embeddings
        (positive and negative, as diffusers names them) and the family's extra conditioning.
        ``options`` holds the run's settings (``true_cfg_scale``, resolved to the family's default)."""
        return {
            column: stack([batch[column][row] for row in rows], pipe)
            for name in self.embedding_columns for column in (name, f"negative_{name}")
        }

    def unpack_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        """Latents as ``[B, C, H/f, W/f]`` (FLUX packs 2x2 patches into tokens)."""
        return latents

    # -- the VAE stages ----------------------------------------------------------------------
    # Latents between stages and in a latent dataset are what the denoiser sees (and trains
    # on); how a VAE maps them to and from pixels is the family's: SD-like VAEs scale and
    # shift by their config, Qwen-Image's normalises per channel, FLUX.2's by batch-norm
    # statistics.

    def decode_latents(self, vae: Any, latents: Any) -> Any:
        """Pixels in [-1, 1], ``[B, 3, H, W]``, of latents as the denoiser sees them (``[B, C, h, w]``)."""
        scaling_factor, shift_factor = vae_factors(vae)
        return vae.decode(latents / scaling_factor + shift_factor, return_dict=False)[0]

    def encode_pixels(self, vae: Any, images: Any, sample: str, generators: list) -> Any:
        """Latents as the denoiser sees them (``[B, C, h, w]``) of pixels in [-1, 1], ``[B, 3, H, W]``:
        the posterior's mean, or a sample drawn from each row's generator, as diffusers' training scripts."""
        scaling_factor, shift_factor = vae_factors(vae)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean if sample == "mean" else posterior.sample(generator=generators)
        return (latents - shift_factor) * scaling_factor


def vae_factors(vae: Any) -> tuple[float, float]:
    """An SD-like VAE's ``scaling_factor`` and ``shift_factor`` (0 where its config has none)."""
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def stack(values: list[np.ndarray], pipe: Any):
    """One batch tensor of per-row embeddings, on the pipeline's device and in its dtype."""
    import torch

    return torch.from_numpy(np.stack(values)).to(pipe.device, pipe.dtype)


def to_numpy(tensor) -> list[np.ndarray]:
    # float32 between stages keeps the object-store format independent of the GPU dtype
    return list(tensor.float().cpu().numpy())
