"""VAE decoder stage: final latents -> uint8 RGB images (height x width x 3).

Latents arrive unpacked and as the denoiser sees them; the family maps them back to
what its VAE decodes (SD-like: ``latents / scaling_factor + shift_factor``), then
diffusers' postprocessing.
"""

from __future__ import annotations

import numpy as np

from workers.runtime.base import Batch, ModelWorker, group_rows
from workers.runtime.columns import stack_column
from workers.runtime.devices import inference_mode, on_compute_thread, upcast_vae


class VaeDecoderWorker(ModelWorker):
    STAGE = "vae_decoder"
    REQUIRED_COLUMNS = {"latents": "final latents from the denoiser (unpacked, scaled as the denoiser sees them)"}
    OUTPUT_COLUMNS = ("image",)

    @on_compute_thread
    def __init__(self, model, **options):
        from diffusers.image_processor import VaeImageProcessor  # in the actor: the driver only names this class

        super().__init__(model, **options)
        self.vae = self.load_pipeline((self.family.vae_component,)).vae
        upcast_vae(self.vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.model.vae_scale_factor)

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            # 1. decode rows of one latent shape together
            latents = list(batch["latents"])
            images: list[np.ndarray | None] = [None] * len(latents)
            for _, rows in group_rows([latent.shape for latent in latents]).items():
                for row, image in zip(rows, self._decode(np.stack([latents[r] for r in rows]))):
                    images[row] = image
            # 2. latents stay in the batch: the writer keeps their statistics
            batch["image"] = stack_column(images)
        return batch

    @inference_mode
    def _decode(self, latents: np.ndarray) -> np.ndarray:
        import torch

        latents_tensor = torch.from_numpy(latents).to(self.vae.device, self.vae.dtype)
        decoded = self.family.decode_latents(self.vae, latents_tensor)
        # as diffusers' postprocess + numpy_to_pil: [-1, 1] -> [0, 1] -> round to uint8
        pixels = self.image_processor.postprocess(decoded, output_type="np")
        return (pixels * 255).round().astype(np.uint8)
