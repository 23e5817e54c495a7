"""Image encoding with Pillow (and, for latent datasets, decoding)."""

from __future__ import annotations

import io as bytes_io
from urllib.parse import quote

import numpy as np
from PIL import Image

from pipelines import io

PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 HxWx3 pixels -> file bytes. No timestamps or other metadata: same pixels, same bytes."""
    buffer = bytes_io.BytesIO()
    options = {} if image_format == "png" else {"quality": quality}
    Image.fromarray(pixels, "RGB").save(buffer, PILLOW_FORMATS[image_format], **options)
    return buffer.getvalue()


def image_path(row_id: str, image_format: str) -> str:
    """Where a row's image lives, relative to the output: named from its id (quoted to be a safe file name)."""
    return f"images/{quote(row_id, safe='')}.{EXTENSIONS[image_format]}"


def write_generated_images(batch: dict[str, np.ndarray], output: str, image_format: str, quality: int, keep_latents: bool) -> dict[str, np.ndarray]:
    """Ray Data task: store each row's image; replace pixels by per-channel latent aggregates.

    A row whose latent is not finite gets an error reason instead of an image. Runs
    apart from the model actors and imports no model code (no torch in this worker).
    """
    paths, reasons = [], []
    aggregates: dict[str, list] = {"latent_count": [], "latent_mean": [], "latent_std": [], "latent_min": [], "latent_max": []}
    for index, row_id in enumerate(batch["id"]):
        values = np.asarray(batch["latents"][index], np.float64)
        values = values.reshape(values.shape[0], -1)
        for name, value in zip(aggregates, (values.shape[1], values.mean(1), values.std(1), values.min(1), values.max(1))):
            aggregates[name].append(value)
        if not np.isfinite(values).all():
            paths.append("")
            reasons.append("the final latent has non-finite values (NaN or infinity)")
            continue
        path = image_path(str(row_id), image_format)
        io.write_bytes(io.join(output, path), encode_image(batch["image"][index], image_format, quality))
        paths.append(path)
        reasons.append("")
    batch.pop("image")
    if not keep_latents:
        batch.pop("latents")
    batch.update({name: np.array(values) for name, values in aggregates.items()})
    batch.update(image_path=np.array(paths, dtype=object), error_reason=np.array(reasons, dtype=object))
    return batch
