"""VAE encoder worker: RGB crops -> latents as the denoiser trains on them, as diffusers' training scripts compute them.

For SD-like VAEs (the family says; ``ModelFamily.encode_pixels``):

    latent = (posterior.mean or posterior.sample(generator) - shift_factor) * scaling_factor

``sample`` draws from each row's own CPU generator seeded with the row's seed, so a
row's latent does not depend on which rows share its batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from workers.runtime.base import Batch, ModelWorker, group_rows
from workers.runtime.columns import stack_column, with_placeholders
from workers.runtime.devices import inference_mode, on_compute_thread, upcast_vae
from workers.runtime.memory import micro_batches, out_of_memory_reason, set_tiling

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

SAMPLE_MODES = ("mean", "sample")


class VaeEncoderWorker(ModelWorker):
    STAGE = "vae_encoder"
    REQUIRED_COLUMNS = {
        "pixels": "RGB crops, (height, width, 3): uint8 in [0, 255], or float in [-1, 1]",
        "seed": "the row's random seed (draws the posterior sample)",
    }
    OUTPUT_COLUMNS = ("latent", "latent_flipped")  # latent_flipped only with flip=True
    DROPPED_COLUMNS = ("pixels",)

    @on_compute_thread
    def __init__(self, model, *, sample: str = "mean", flip: bool = False, vae_batch_size: int | None = None, **options):
        """``vae_batch_size``: rows per VAE call (``--stage vae_encoder.batch_size``); None: the whole batch."""
        if sample not in SAMPLE_MODES:
            raise ValueError(f"sample: must be one of {', '.join(SAMPLE_MODES)}, got {sample!r}")
        super().__init__(model, **options)
        self.vae = self.load_pipeline((self.family.vae_component,)).vae
        upcast_vae(self.vae)
        self.sample, self.flip, self.vae_batch_size = sample, flip, vae_batch_size

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            # 1. rows of one crop size share a forward pass (rows the caption stage failed are skipped)
            crops = list(batch["pixels"])
            encoded: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
            rows_left = self.rows_to_compute(batch, list(range(len(crops))))
            for shape, rows in group_rows([crops[row].shape for row in rows_left]).items():
                rows = [rows_left[index] for index in rows]
                set_tiling(self.vae, shape[0], shape[1])
                # 2. in micro-batches, halved when out of GPU memory
                for part in micro_batches(rows, self.vae_batch_size):
                    encoded.update(self.compute_rows(batch, part, lambda some: self._encode_rows(batch, crops, some),
                                                     lambda row: out_of_memory_reason(shape[0], shape[1])))

            # 3. pixels are large and no later stage needs them
            for column in self.DROPPED_COLUMNS:
                batch.pop(column)
            batch["latent"] = stack_column(with_placeholders([encoded[row][0] if row in encoded else None for row in range(len(crops))]))
            if self.flip:
                batch["latent_flipped"] = stack_column(with_placeholders([encoded[row][1] if row in encoded else None for row in range(len(crops))]))
        return batch

    def _encode_rows(self, batch: Batch, crops: list[np.ndarray], rows: list[int]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(latent, flipped latent or None) per row: the crops, then their mirror images, each row
        drawing from its own generator in that order (fresh for every try, so a retried row draws the same)."""
        import torch

        group = np.stack([crops[row] for row in rows])
        generators = [torch.Generator("cpu").manual_seed(int(batch["seed"][row])) for row in rows]
        latents = list(self._encode(group, generators))
        flipped = list(self._encode(group[:, :, ::-1], generators)) if self.flip else [None] * len(rows)
        return list(zip(latents, flipped))

    @inference_mode
    def _encode(self, crops: np.ndarray, generators: list[torch.Generator]) -> np.ndarray:
        # as diffusers' VaeImageProcessor.preprocess: [0, 255] -> [-1, 1], channels first
        import torch

        images = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
        if crops.dtype == np.uint8:
            images = images.float() / 127.5 - 1.0
        latents = self.family.encode_pixels(self.vae, images.to(self.vae.device, self.vae.dtype), self.sample, generators)
        # float32 between stages keeps the object store format independent of the GPU dtype
        return latents.float().cpu().numpy()
