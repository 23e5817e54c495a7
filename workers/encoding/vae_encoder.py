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
from workers.runtime.columns import stack_column
from workers.runtime.devices import inference_mode, on_compute_thread, upcast_vae

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
    def __init__(self, model, *, sample: str = "mean", flip: bool = False, **options):
        if sample not in SAMPLE_MODES:
            raise ValueError(f"sample: must be one of {', '.join(SAMPLE_MODES)}, got {sample!r}")
        super().__init__(model, **options)
        self.vae = self.load_pipeline((self.family.vae_component,)).vae
        upcast_vae(self.vae)
        self.sample, self.flip = sample, flip

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        import torch

        with self.busy(batch):
            # 1. rows of one crop size share a forward pass
            crops = list(batch["pixels"])
            latents: list[np.ndarray | None] = [None] * len(crops)
            flipped: list[np.ndarray | None] = [None] * len(crops)
            for _, rows in group_rows([crop.shape for crop in crops]).items():
                group = np.stack([crops[row] for row in rows])
                generators = [torch.Generator("cpu").manual_seed(int(batch["seed"][row])) for row in rows]

                # 2. encode the crops, then their mirror images: each row draws from its own generator in that order
                for row, latent in zip(rows, self._encode(group, generators)):
                    latents[row] = latent
                if self.flip:
                    for row, latent in zip(rows, self._encode(group[:, :, ::-1], generators)):
                        flipped[row] = latent

            # 3. pixels are large and no later stage needs them
            for column in self.DROPPED_COLUMNS:
                batch.pop(column)
            batch["latent"] = stack_column(latents)
            if self.flip:
                batch["latent_flipped"] = stack_column(flipped)
        return batch

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
