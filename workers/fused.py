"""Fused workers: every model of a job in one actor, run in sequence.

Generation: text stage, denoiser and VAE decoder. Encoding: caption encoder and VAE encoder.

One actor per device loads the family's whole pipeline once, so embeddings and latents
never leave the process. The stages are the very same worker classes as in split
placement, each handed that one pipeline.
"""

from __future__ import annotations

from workers.base import Batch, embedding_columns
from workers.denoiser import DenoiserWorker
from workers.devices import pick_device
from workers.families import ModelFamily
from workers.models import ModelDirectory
from workers.text_encoder import CaptionEncoderWorker, TextEncoderWorker
from workers.vae_decoder import VaeDecoderWorker
from workers.vae_encoder import VaeEncoderWorker


def _load_all(model, components: tuple[str, ...], dtype: str) -> ModelDirectory:
    """The model directory with every component of the fused stages loaded once."""
    directory = model if isinstance(model, ModelDirectory) else ModelDirectory(model)
    device, torch_dtype = pick_device(dtype)
    directory.pipeline(components, device, torch_dtype)
    return directory


class FusedGenerationWorker:
    STAGE = "fused"
    STAGES = (TextEncoderWorker, DenoiserWorker, VaeDecoderWorker)
    REQUIRED_COLUMNS = {**TextEncoderWorker.REQUIRED_COLUMNS, **DenoiserWorker.REQUIRED_COLUMNS}

    @classmethod
    def required_columns(cls, family: ModelFamily) -> dict[str, str]:
        return dict(cls.REQUIRED_COLUMNS)

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return ("prompt_truncated", "latents", "image")

    def __init__(self, model, *, scheduler: str | None = None, true_cfg_scale: float = 1.0,
                 max_sequence_length: int | None = None, dtype: str = "auto", **options):
        directory = ModelDirectory(model) if not isinstance(model, ModelDirectory) else model
        family = directory.family
        components = (*family.text_components, *family.denoiser_components, family.vae_component)
        directory = _load_all(directory, components, dtype)
        self.text_encoder = TextEncoderWorker(directory, max_sequence_length=max_sequence_length, dtype=dtype, **options)
        self.denoiser = DenoiserWorker(directory, scheduler=scheduler, true_cfg_scale=true_cfg_scale, dtype=dtype, **options)
        self.vae_decoder = VaeDecoderWorker(directory, dtype=dtype, **options)

    def __call__(self, batch: Batch) -> Batch:
        # 1. encode prompts; 2. denoise; 3. decode
        return self.vae_decoder(self.denoiser(self.text_encoder(batch)))


class FusedEncodingWorker:
    STAGE = "fused"
    STAGES = (CaptionEncoderWorker, VaeEncoderWorker)
    REQUIRED_COLUMNS = {**CaptionEncoderWorker.REQUIRED_COLUMNS, **VaeEncoderWorker.REQUIRED_COLUMNS}

    @classmethod
    def required_columns(cls, family: ModelFamily) -> dict[str, str]:
        return dict(cls.REQUIRED_COLUMNS)

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return (*embedding_columns(family, negative=False), "caption_truncated", *VaeEncoderWorker.OUTPUT_COLUMNS)

    def __init__(self, model, *, sample: str = "mean", flip: bool = False, max_sequence_length: int | None = None,
                 dtype: str = "auto", **options):
        directory = ModelDirectory(model) if not isinstance(model, ModelDirectory) else model
        family = directory.family
        directory = _load_all(directory, (*family.text_components, family.vae_component), dtype)
        self.caption_encoder = CaptionEncoderWorker(directory, max_sequence_length=max_sequence_length, dtype=dtype, **options)
        self.vae_encoder = VaeEncoderWorker(directory, sample=sample, flip=flip, dtype=dtype, **options)

    def __call__(self, batch: Batch) -> Batch:
        # 1. encode captions; 2. encode images
        return self.vae_encoder(self.caption_encoder(batch))
