"""Fused worker: text encoder, denoiser and VAE decoder in one actor, run in sequence.

One actor per device holds every component, so embeddings and latents never leave
the process. The stages are the very same worker classes as in split placement.
"""

from __future__ import annotations

from workers.base import Batch
from workers.denoiser import DenoiserWorker
from workers.models import ModelDirectory
from workers.text_encoder import TextEncoderWorker
from workers.vae_decoder import VaeDecoderWorker


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
