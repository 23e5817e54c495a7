"""VAE decoder stage: final latents -> uint8 RGB images (height x width x 3).

Latents arrive unpacked and as the denoiser sees them; the family maps them back to
what its VAE decodes (SD-like: ``latents / scaling_factor + shift_factor``), then
diffusers' postprocessing.
"""

from __future__ import annotations

import numpy as np

from workers.runtime.base import Batch, ModelWorker, group_rows
from workers.runtime.columns import mark_failed, stack_column, with_placeholders
from workers.runtime.devices import inference_mode, on_compute_thread, upcast_vae
from workers.runtime.memory import micro_batches, out_of_memory_reason, set_tiling

NON_FINITE_IMAGE = "non_finite_image"


class VaeDecoderWorker(ModelWorker):
    STAGE = "vae_decoder"
    REQUIRED_COLUMNS = {"latents": "final latents from the denoiser (unpacked, scaled as the denoiser sees them)"}
    OUTPUT_COLUMNS = ("image",)

    @on_compute_thread
    def __init__(self, model, *, vae_batch_size: int | None = None, **options):
        """``vae_batch_size``: rows per VAE call (``--stage vae_decoder.batch_size``); None: the whole batch."""
        from diffusers.image_processor import VaeImageProcessor  # in the actor: the driver only names this class

        super().__init__(model, **options)
        self.vae_batch_size = vae_batch_size
        self.vae = self.load_pipeline((self.family.vae_component,)).vae
        upcast_vae(self.vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.model.vae_scale_factor)

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            # 1. decode rows of one latent shape together, in micro-batches, halved when out of GPU memory
            latents = list(batch["latents"])
            images: list[np.ndarray | None] = [None] * len(latents)
            rows_left = self.rows_to_compute(batch, list(range(len(latents))))
            for shape, rows in group_rows([latents[row].shape for row in rows_left]).items():
                rows = [rows_left[index] for index in rows]
                height, width = (side * self.model.vae_scale_factor for side in shape[-2:])
                set_tiling(self.vae, height, width)
                for part in micro_batches(rows, self.vae_batch_size):
                    decoded = self.compute_rows(batch, part, lambda some: self._decode(np.stack([latents[row] for row in some])),
                                                lambda row: out_of_memory_reason(height, width))
                    self._keep_finite(batch, latents, decoded, images)

            # 2. latents stay in the batch: the writer keeps their statistics
            batch["image"] = stack_column(with_placeholders(images, np.uint8))
        return batch

    def _keep_finite(self, batch: Batch, latents: list[np.ndarray], decoded: dict[int, np.ndarray], images: list) -> None:
        """Decoded rows as uint8 images; an image with NaN or infinity (it would be written black) fails its row.

        A non-finite latent is the denoiser's failure: the commit reports it as such.
        """
        for row, pixels in decoded.items():
            if np.isfinite(pixels).all() or not np.isfinite(latents[row]).all():
                images[row] = to_uint8(pixels)
            else:
                mark_failed(batch, {row: (NON_FINITE_IMAGE, "the decoded image has non-finite values (NaN or infinity)")}, self.STAGE)

    @inference_mode
    def _decode(self, latents: np.ndarray) -> np.ndarray:
        """Pixels in [0, 1], float (height, width, 3) per row."""
        import torch

        latents_tensor = torch.from_numpy(latents).to(self.vae.device, self.vae.dtype)
        decoded = self.family.decode_latents(self.vae, latents_tensor)
        # as diffusers' postprocess: [-1, 1] -> [0, 1]
        return self.image_processor.postprocess(decoded, output_type="np")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """As diffusers' ``numpy_to_pil``: [0, 1] -> round to uint8."""
    return (pixels * 255).round().astype(np.uint8)
