"""Images for latent-dataset tests: generated pictures and hand-made odd files, made with Pillow here."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

BACKGROUND = (255, 255, 255)


def picture(seed: int, width: int, height: int) -> np.ndarray:
    """A smooth, asymmetric uint8 RGB picture (gradients and a disc): unlike its rotations and mirror image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.28)
        channels.append(127.5 + 90 * np.sin(fx * x / width * 6.28 + phase) * np.cos(fy * y / height * 3.14))
    pixels = np.stack(channels, axis=2)
    cx, cy, radius = rng.uniform(0.2, 0.4) * width, rng.uniform(0.2, 0.4) * height, min(width, height) / 5
    pixels[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = rng.uniform(0, 255, size=3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    return encoded(Image.fromarray(pixels), "PNG")


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    return encoded(Image.fromarray(pixels), "JPEG", quality=quality)


def exif_rotated_jpeg(pixels: np.ndarray) -> bytes:
    """A JPEG whose stored pixels are ``pixels`` and whose EXIF says: rotate 90 degrees clockwise to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def upright_of_exif_jpeg(data: bytes) -> bytes:
    """The same picture stored upright, losslessly: the JPEG's decoded pixels rotated 90 degrees clockwise."""
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return png(np.ascontiguousarray(np.rot90(raw, k=-1)))


def alpha_png(pixels: np.ndarray) -> bytes:
    """Left third transparent, middle third half transparent, the rest opaque."""
    alpha = np.full(pixels.shape[:2], 255, np.uint8)
    third = pixels.shape[1] // 3
    alpha[:, :third] = 0
    alpha[:, third:2 * third] = 128
    return png(np.dstack([pixels, alpha]))


def palette_png_with_transparency(width: int, height: int) -> bytes:
    """Palette image: index 0 transparent (left half), index 1 red, index 2 blue."""
    indices = np.ones((height, width), np.uint8)
    indices[:, : width // 2] = 0
    indices[: height // 2, width // 2:] = 2
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 255, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    return encoded(image, "PNG", transparency=0)


def gray16_png(width: int, height: int) -> bytes:
    """16-bit grayscale: a horizontal ramp over the whole 0..65535 range."""
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    return png(np.tile(ramp, (height, 1)))


def cmyk_jpeg(pixels: np.ndarray) -> bytes:
    return encoded(Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=95)


def decompression_bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A real 8x8 PNG whose header claims ``width`` x ``height`` pixels (CRC fixed, so the header is valid)."""
    data = bytearray(png(np.zeros((8, 8, 3), np.uint8)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc_start = ihdr + 13
    data[crc_start:crc_start + 4] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:crc_start])) & 0xFFFFFFFF)
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def write_table(path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path), row_group_size=8)
    return str(path)
