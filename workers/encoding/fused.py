"""Fused encoding worker: caption encoder and VAE encoder in one actor, run in sequence.

One actor per device loads the family's text encoders and VAE once; the stages are the
very same worker classes as in split placement, each handed that one pipeline.
"""

from __future__ import annotations

from workers.encoding.caption_encoder import CaptionEncoderWorker
from workers.encoding.vae_encoder import VaeEncoderWorker
from workers.families import ModelFamily
from workers.runtime.base import Batch, embedding_columns
from workers.runtime.models import ModelDirectory
from workers.runtime.devices import on_compute_thread
from workers.runtime.text_cache import JobTextCache


class FusedEncodingWorker:
    STAGE = "fused"
    STAGES = (CaptionEncoderWorker, VaeEncoderWorker)
    USES_TEXT_CACHE = True  # its caption stage takes the job's text cache (``text_cache``)
    REQUIRED_COLUMNS = {**CaptionEncoderWorker.REQUIRED_COLUMNS, **VaeEncoderWorker.REQUIRED_COLUMNS}

    @classmethod
    def required_columns(cls, family: ModelFamily) -> dict[str, str]:
        return dict(cls.REQUIRED_COLUMNS)

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return (*embedding_columns(family, negative=False), "caption_truncated", *VaeEncoderWorker.OUTPUT_COLUMNS)

    @on_compute_thread
    def __init__(self, model, *, sample: str = "mean", flip: bool = False, max_sequence_length: int | None = None,
                 dtype: str = "auto", device: str | None = None, vae_batch_size: int | None = None,
                 text_cache: JobTextCache | None = None, **options):
        directory = model if isinstance(model, ModelDirectory) else ModelDirectory(model)
        family = directory.family
        directory.preload((*family.text_components, family.vae_component), dtype, device, options.get("gpu_share"))
        self.caption_encoder = CaptionEncoderWorker(
            directory, max_sequence_length=max_sequence_length, dtype=dtype, device=device, text_cache=text_cache, **options,
        )
        self.vae_encoder = VaeEncoderWorker(directory, sample=sample, flip=flip, vae_batch_size=vae_batch_size, dtype=dtype, device=device, **options)

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        # 1. encode captions; 2. encode images
        return self.vae_encoder(self.caption_encoder(batch))
