"""Fused generation worker: text stage, denoiser and VAE decoder in one actor, run in sequence.

One actor per device loads the family's whole pipeline once, so embeddings and latents
never leave the process. The stages are the very same worker classes as in split
placement, each handed that one pipeline.
"""

from __future__ import annotations

from workers.families import ModelFamily
from workers.generation.denoiser import DenoiserWorker
from workers.generation.text_encoder import TextEncoderWorker
from workers.generation.vae_decoder import VaeDecoderWorker
from workers.runtime.base import Batch
from workers.runtime.models import ModelDirectory
from workers.runtime.devices import on_compute_thread
from workers.runtime.loras import LoraFetch
from workers.runtime.text_cache import JobTextCache


class FusedGenerationWorker:
    STAGE = "fused"
    STAGES = (TextEncoderWorker, DenoiserWorker, VaeDecoderWorker)
    USES_TEXT_CACHE = True  # its text stage takes the job's text cache (``text_cache``)
    REQUIRED_COLUMNS = {**TextEncoderWorker.REQUIRED_COLUMNS, **DenoiserWorker.REQUIRED_COLUMNS}

    @classmethod
    def required_columns(cls, family: ModelFamily) -> dict[str, str]:
        return dict(cls.REQUIRED_COLUMNS)

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return ("prompt_truncated", "latents", "image")

    @on_compute_thread
    def __init__(self, model, *, scheduler: str | None = None, true_cfg_scale: float | None = None,
                 max_sequence_length: int | None = None, dtype: str = "auto", device: str | None = None,
                 vae_batch_size: int | None = None, text_cache: JobTextCache | None = None,
                 compile_backend: str | None = None, attention_backend: str | None = None,
                 lora_files: LoraFetch | None = None, max_loras: int = 8, **options):
        directory = model if isinstance(model, ModelDirectory) else ModelDirectory(model)
        family = directory.family
        directory.preload((*family.text_components, *family.denoiser_components, family.vae_component), dtype, device, options.get("gpu_share"))
        self.text_encoder = TextEncoderWorker(
            directory, max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale, dtype=dtype, device=device,
            text_cache=text_cache, lora_files=lora_files, max_loras=max_loras, **options,
        )
        # one pipeline, so one set of LoRA adapters: the denoiser applies what the text stage loaded
        self.denoiser = DenoiserWorker(directory, scheduler=scheduler, true_cfg_scale=true_cfg_scale, dtype=dtype, device=device,
                                       compile_backend=compile_backend, attention_backend=attention_backend,
                                       loras=self.text_encoder.loras, **options)
        self.vae_decoder = VaeDecoderWorker(directory, vae_batch_size=vae_batch_size, dtype=dtype, device=device, **options)

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        # 1. encode prompts; 2. denoise; 3. decode
        return self.vae_decoder(self.denoiser(self.text_encoder(batch)))
