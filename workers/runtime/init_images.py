"""Image-to-image rows on the denoiser: the family's diffusers Img2Img pipeline over the loaded modules.

A row with a source image (``init_image`` names it; ``init_pixels`` holds its uint8 crop at
the row's size, decoded before any model by ``pipelines.encoding.image_decode``) and a
``strength`` is denoised by the family's image-to-image pipeline, built once per actor
with ``from_pipe`` over the very same modules: no weight loads twice, and LoRA adapters
apply as they are. diffusers then does the maths itself, in its own order: it VAE-encodes
each source drawing from the row's generator (``retrieve_latents``), keeps the strength's
part of the schedule (``get_timesteps``) and noises the latents to its first step
(``add_noise`` / ``scale_noise``) from that same generator. So a row's image is what the
Img2Img pipeline draws for it alone, whatever rows share its batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from workers.runtime.base import Batch


def check_init_image_support(family: Any, placement: str) -> None:
    """Rows with an ``init_image`` need the family's Img2Img pipeline in diffusers and fused placement (exit 2 otherwise)."""
    import diffusers

    if family.img2img_pipeline_class is None or not hasattr(diffusers, family.img2img_pipeline_class):
        raise ValueError(f"init_image: {family.name} models ({family.pipeline_class}) have no image-to-image pipeline "
                         f"in diffusers {diffusers.__version__}; remove the 'init_image' column or use another model")
    if placement == "split":
        # the Img2Img pipeline VAE-encodes the source inside its denoising call: one actor must hold both
        raise ValueError("placement: image-to-image rows (init_image) run in fused placement (--placement fused or auto); "
                         "a split denoiser actor holds no VAE to encode the source image with")


def row_strength(batch: Batch, row: int) -> float | None:
    """The row's strength when it starts from a source image; None for a text-to-image row."""
    if "init_image" not in batch or not batch["init_image"][row]:
        return None
    return float(batch["strength"][row])


class Img2Img:
    """One actor's image-to-image pipeline, built on first use over its text-to-image pipeline's modules."""

    def __init__(self, family: Any):
        self.family, self._pipe = family, None

    def pipeline(self, pipe: Any) -> Any:
        """The Img2Img pipeline sharing ``pipe``'s modules, with ``pipe``'s current scheduler."""
        if self._pipe is None:
            import diffusers

            check_init_image_support(self.family, "fused")  # the processor's rows: their columns are known only here
            self._pipe = getattr(diffusers, self.family.img2img_pipeline_class).from_pipe(pipe)
            self._pipe.set_progress_bar_config(disable=True)
        self._pipe.scheduler = pipe.scheduler  # the denoiser makes a fresh one per call
        return self._pipe

    def arguments(self, batch: Batch, rows: list[int], strength: float, call: dict[str, Any]) -> dict[str, Any]:
        """``call`` (the text-to-image call's arguments) with the rows' sources and strength, as the Img2Img
        pipeline takes them (SD and SDXL take their size from the image: no height or width)."""
        from PIL import Image

        accepted = inspect.signature(self._pipe.__call__).parameters
        images = [Image.fromarray(source_pixels(batch, row)) for row in rows]
        return {**{name: value for name, value in call.items() if name in accepted}, "image": images, "strength": strength}


def source_pixels(batch: Batch, row: int) -> np.ndarray:
    """A row's source crop, uint8 (height, width, 3): it travels as raw bytes (Arrow holds no ragged arrays)."""
    return np.frombuffer(batch["init_pixels"][row], np.uint8).reshape(int(batch["height"][row]), int(batch["width"][row]), 3)
