"""Denoiser stage: embeddings -> final latents, by the family's own diffusers pipeline.

The stage holds the U-Net or transformer and the scheduler, and calls the pipeline's
``__call__`` with the text stage's embeddings, ``output_type="latent"`` and one CPU
generator per row (``torch.Generator("cpu").manual_seed(seed)``). diffusers draws each
row's initial noise and every stochastic step from that row's generator, so a row's
image equals what the family's pipeline draws for it alone, whatever rows share its batch.
Rows with a source image go through the family's Img2Img pipeline instead (``workers.runtime.init_images``).
"""

from __future__ import annotations

import json

import numpy as np

from workers.runtime.base import Batch, ModelWorker, embedding_columns, group_rows
from workers.runtime.columns import mark_failed, stack_column, with_placeholders
from workers.families import ModelFamily
from workers.runtime.schedulers import make_scheduler
from workers.runtime.devices import inference_mode, on_compute_thread
from workers.runtime.memory import out_of_memory_reason
from workers.runtime.init_images import Img2Img, row_strength
from workers.runtime.loras import LORA_CODE, LoraAdapters, LoraError, LoraFetch, row_loras
from workers.runtime.speed import WARMUP_STEPS, DenoiserSpeed


class DenoiserWorker(ModelWorker):
    STAGE = "denoiser"
    REQUIRED_COLUMNS = {
        "seed": "the row's random seed",
        "negative_prompt": "text to steer away from ('' for none)",
        "num_inference_steps": "denoising steps",
        "guidance_scale": "guidance scale (its meaning is the family's)",
        "height": "image height in pixels",
        "width": "image width in pixels",
    }
    OUTPUT_COLUMNS = ("latents",)

    @classmethod
    def required_columns(cls, family: ModelFamily) -> dict[str, str]:
        embeddings = {column: "text stage output" for column in embedding_columns(family)}
        return {**embeddings, **cls.REQUIRED_COLUMNS}

    @on_compute_thread
    def __init__(self, model, *, scheduler: str | None = None, true_cfg_scale: float | None = None,
                 compile_backend: str | None = None, attention_backend: str | None = None,
                 lora_files: LoraFetch | None = None, max_loras: int = 8, loras: LoraAdapters | None = None, **options):
        super().__init__(model, **options)
        self.pipe = self.load_pipeline(self.family.denoiser_components)
        # per-row LoRA adapters; a fused actor's stages share one set (one pipeline)
        self.loras = loras or LoraAdapters(self.pipe, lora_files, max_loras)
        # --compile, --attention-backend (``workers.runtime.speed``): off unless asked
        self.speed = DenoiserSpeed(getattr(self.pipe, self.family.denoiser_component),
                                   compile_backend=compile_backend, attention_backend=attention_backend)
        self.scheduler_name = scheduler
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.options = {"true_cfg_scale": self.family.true_cfg_scale(true_cfg_scale)}  # None: the family's default
        self.img2img = Img2Img(self.family)  # rows with a source image, over the same modules

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            # 1. rows share a denoising call only with rows of the same size, steps, guidance, conditioning
            # and strength (None: no source image), LoRA files and weights (last in the key)
            keys = [
                (int(batch["height"][row]), int(batch["width"][row]), int(batch["num_inference_steps"][row]),
                 float(batch["guidance_scale"][row]), *self.family.group_key(batch, row), row_strength(batch, row), row_loras(batch, row))
                for row in range(len(batch["seed"]))
            ]
            latents: list[np.ndarray | None] = [None] * len(keys)
            digests: list[list[str]] = [[] for _ in keys]

            # 2. denoise each group with its adapters (rows the text stage failed are skipped), halved when out of GPU memory
            for (height, width, steps, guidance, *_, strength, loras), rows in group_rows(keys).items():
                rows = self._apply_loras(batch, self.rows_to_compute(batch, rows), loras, digests)
                outputs = self.compute_rows(
                    batch, rows,
                    lambda part: self._denoise_warm(batch, part, height, width, steps, guidance, strength),
                    lambda row: out_of_memory_reason(height, width),
                )
                for row, latent in outputs.items():
                    latents[row] = latent

            # 3. embeddings and source crops are large and no later stage needs them
            for column in embedding_columns(self.family):
                batch.pop(column)
            batch.pop("init_pixels", None)
            batch["latents"] = stack_column(with_placeholders(latents))
            if "lora" in batch:  # what each row's files held, for the manifest
                batch["lora_sha256"] = np.array([json.dumps(row) for row in digests], dtype=object)
            batch.update(self.speed.pop_counts(len(keys)))
        return batch

    def _apply_loras(self, batch: Batch, rows: list[int], loras: tuple, digests: list[list[str]]) -> list[int]:
        """Activate a group's adapters (none: the base model); its rows, or none when a file cannot be applied."""
        if not rows:
            return rows
        try:
            adapters = self.loras.adapters([uri for uri, _ in loras])
        except LoraError as error:
            mark_failed(batch, {row: (LORA_CODE, str(error)) for row in rows}, self.STAGE)
            return []
        self.loras.activate(adapters, [scale for _, scale in loras])
        for row in rows:
            digests[row] = [adapter.sha256 for adapter in adapters]
        return rows

    def _denoise_warm(self, batch: Batch, rows: list[int], height: int, width: int, steps: int, guidance: float,
                      strength: float | None = None) -> np.ndarray:
        """``_denoise``, after a short warm-up call the first time a compiled denoiser sees this input shape,
        so that compiling is counted apart (``DenoiserSpeed``) and never mistaken for a recompile."""
        shape = (height, width, len(rows), guidance > 1, *self.family.group_key(batch, rows[0]), strength) if self.speed.compiling and rows else None
        if shape is not None and self.speed.needs_warmup(shape):
            with self.speed.warmup(shape):
                self._denoise(batch, rows, height, width, min(steps, WARMUP_STEPS), guidance, strength)
        with self.speed.call():
            return self._denoise(batch, rows, height, width, steps, guidance, strength)

    @inference_mode
    def _denoise(self, batch: Batch, rows: list[int], height: int, width: int, steps: int, guidance: float,
                 strength: float | None = None) -> np.ndarray:
        # 1. a fresh scheduler: schedulers keep state across steps
        self.pipe.scheduler = make_scheduler(self.scheduler_name, self.scheduler_config)

        # 2. the family's arguments (embeddings, extra conditioning), the row's settings, one CPU generator per row
        import torch

        arguments = {
            **self.family.denoise_arguments(self.pipe, batch, rows, self.options), "height": height, "width": width,
            "num_inference_steps": steps, "guidance_scale": self.family.guidance_argument(self.pipe, guidance),
            "generator": [torch.Generator("cpu").manual_seed(int(batch["seed"][row])) for row in rows],
        }

        # 3. diffusers' own loop; rows with a source image: the family's Img2Img pipeline, with the sources and strength
        pipe = self.pipe
        if strength is not None:
            pipe = self.img2img.pipeline(self.pipe)
            arguments = self.img2img.arguments(batch, rows, strength, arguments)
        latents = pipe(**arguments, output_type="latent", return_dict=False)[0]

        # 4. latents leave unpacked, [C, H/f, W/f], scaled as the denoiser sees them
        return self.family.unpack_latents(self.pipe, latents, height, width).float().cpu().numpy()
