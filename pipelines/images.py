"""Image encoding with Pillow (and, for latent datasets, decoding)."""

from __future__ import annotations

import io as bytes_io

import numpy as np
from PIL import Image

PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 HxWx3 pixels -> file bytes. No timestamps or other metadata: same pixels, same bytes."""
    buffer = bytes_io.BytesIO()
    options = {} if image_format == "png" else {"quality": quality}
    Image.fromarray(pixels, "RGB").save(buffer, PILLOW_FORMATS[image_format], **options)
    return buffer.getvalue()
