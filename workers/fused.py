"""Fused workers: every model of a job in one actor, run in sequence.

Generation: text encoder, denoiser and VAE decoder. Encoding: caption encoder and VAE encoder.

One actor per device holds every component, so embeddings and latents never leave
the process. The stages are the very same worker classes as in split placement.
"""

from __future__ import annotations

from workers.base import Batch
from workers.denoiser import DenoiserWorker
from workers.models import ModelDirectory
from workers.text_encoder import CaptionEncoderWorker, TextEncoderWorker
from workers.vae_decoder import VaeDecoderWorker
from workers.vae_encoder import VaeEncoderWorker


class FusedGenerationWorker:
    STAGE = "fused"
    STAGES = (TextEncoderWorker, DenoiserWorker, VaeDecoderWorker)
    REQUIRED_COLUMNS = {**TextEncoderWorker.REQUIRED_COLUMNS, **{
        column: text for column, text in DenoiserWorker.REQUIRED_COLUMNS.items() if column not in TextEncoderWorker.OUTPUT_COLUMNS
    }}
    OUTPUT_COLUMNS = ("prompt_truncated", "latents", "image")

    def __init__(self, model, *, scheduler: str | None = None, **options):
        directory = ModelDirectory(model)  # resolved once for all three stages
        self.text_encoder = TextEncoderWorker(directory, **options)
        self.denoiser = DenoiserWorker(directory, scheduler=scheduler, **options)
        self.vae_decoder = VaeDecoderWorker(directory, **options)

    def __call__(self, batch: Batch) -> Batch:
        # 1. encode prompts; 2. denoise; 3. decode
        return self.vae_decoder(self.denoiser(self.text_encoder(batch)))


class FusedEncodingWorker:
    STAGE = "fused"
    STAGES = (CaptionEncoderWorker, VaeEncoderWorker)
    REQUIRED_COLUMNS = {**CaptionEncoderWorker.REQUIRED_COLUMNS, **VaeEncoderWorker.REQUIRED_COLUMNS}
    OUTPUT_COLUMNS = CaptionEncoderWorker.OUTPUT_COLUMNS + VaeEncoderWorker.OUTPUT_COLUMNS

    def __init__(self, model, *, sample: str = "mean", flip: bool = False, **options):
        directory = ModelDirectory(model)  # resolved once for both stages
        self.caption_encoder = CaptionEncoderWorker(directory, **options)
        self.vae_encoder = VaeEncoderWorker(directory, sample=sample, flip=flip, **options)

    def __call__(self, batch: Batch) -> Batch:
        # 1. encode captions; 2. encode images
        return self.vae_encoder(self.caption_encoder(batch))
