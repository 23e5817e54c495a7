"""Safe image decoding and resize/crop for latent datasets: Pillow and numpy, no torch.

    bytes -> decode_image (header checks, decode, EXIF orientation, any mode -> RGB)
          -> fit_to_target (nearest bucket, resize to cover, center or seeded random crop)
          -> uint8 (height, width, 3) pixels + original size + crop top-left

Failures raise ``ImageRejected`` with a reason code of ``ENCODE_ERROR_CODES``.
"""

from __future__ import annotations

import io as bytes_io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from pipelines.runtime.schemas import ENCODE_ERROR_CODES

# downscaling filter: Lanczos keeps detail and does not alias (its support widens with the scale)
RESAMPLING = Image.Resampling.LANCZOS
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# modes Pillow converts to RGB exactly as their definition says
DIRECT_MODES = ("RGB", "RGBX", "L", "1", "P", "YCbCr", "HSV")
BUCKET_MAX_ASPECT_RATIO = 4.0  # as SDXL's bucket list: from 1:4 to 4:1


class ImageRejected(Exception):
    """An image latentray will not encode, with a reason code and a message."""

    def __init__(self, code: str, message: str):
        assert code in ENCODE_ERROR_CODES, code
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How every image of a run is decoded and cut to its target."""

    targets: tuple[tuple[int, int], ...]  # (height, width): one square size, or aspect buckets
    crop: str  # "center" | "random" (seeded per row)
    max_pixels: int  # larger images are refused from their header, before decoding
    min_size: int | None  # shortest side accepted; None: the image must cover its target
    background: tuple[int, int, int]  # what transparent pixels are composited on


@dataclass(frozen=True)
class Fitted:
    pixels: np.ndarray  # uint8 (height, width, 3)
    original_size: tuple[int, int]  # (height, width) of the upright decoded image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]


def preprocess(data: bytes, settings: Preprocessing, seed: int) -> Fitted:
    return fit_to_target(decode_image(data, settings.max_pixels, settings.background), settings, seed)


# -- decoding -------------------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int, background: tuple[int, int, int]) -> Image.Image:
    """Image file bytes -> an upright RGB image, or ``ImageRejected``."""
    # 1. identify from the header: Image.open reads no pixel data
    if not data:
        raise ImageRejected("undecodable", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            image = Image.open(bytes_io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageRejected("too_large", f"refused before decoding: {error}") from None
    except UnidentifiedImageError:
        raise ImageRejected("undecodable", f"not a recognised image format ({len(data)} bytes)") from None
    except Exception as error:  # a corrupt header fails in format-specific ways
        raise ImageRejected("undecodable", f"corrupt image header: {type(error).__name__}: {error}") from None

    # 2. refuse decompression bombs before a single pixel is decoded
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} = {width * height} pixels, above the limit of {max_pixels} (refused before decoding)")

    # 3. decode the pixels
    try:
        image.load()
    except Exception as error:
        text = str(error)
        code = "truncated" if "truncat" in text.lower() or isinstance(error, EOFError) else "undecodable"
        raise ImageRejected(code, f"{image.format or 'image'} {width}x{height}: {type(error).__name__}: {text}") from None

    # 4. the orientation the camera recorded
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:
        raise ImageRejected("undecodable", f"unreadable EXIF orientation: {type(error).__name__}: {error}") from None

    # 5. RGB
    return to_rgb(image, background)


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB, keeping what the pixels mean.

    Pillow's plain ``convert("RGB")`` drops alpha (transparent pixels show whatever
    colour they hold), clips 16-bit and float values instead of scaling them, and
    cannot convert LAB; each of those gets its own path here.
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        # 16-bit grayscale (PNG, TIFF); "I" holds those too when Pillow widens them
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return _gray_to_rgb(values)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageRejected("unsupported_mode", "float image with NaN or infinite values")
        # float images hold intensities in [0, 1] (TIFF, EXR conventions)
        return _gray_to_rgb(np.clip(values, 0.0, 1.0) * 255.0)
    if image.has_transparency_data:
        # alpha band (RGBA, LA, PA, RGBa, La), transparent palette entry, or colour key
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "LAB":
        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, lab_to_srgb)
    if mode in DIRECT_MODES:
        return image.convert("RGB")
    raise ImageRejected("unsupported_mode", f"pixel mode {mode!r} has no RGB conversion")


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.round(values).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the embedded ICC profile when there is one (print CMYK is far from naive inversion)."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(bytes_io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # an unusable profile: fall back to the device conversion below
    return image.convert("RGB")


# -- resize and crop ------------------------------------------------------------------------------


def aspect_buckets(resolution: int, step: int, max_ratio: float = BUCKET_MAX_ASPECT_RATIO) -> list[tuple[int, int]]:
    """SDXL-style buckets: (height, width) multiples of ``step`` with at most ``resolution``**2 pixels.

    For each width, the tallest height within the pixel budget, and the same size
    turned portrait/landscape; ratios up to ``max_ratio``.
    """
    budget = resolution * resolution
    sizes = set()
    for width in range(step, budget // step + 1, step):
        height = budget // width // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes, key=lambda size: size[1] / size[0])


def nearest_target(width: int, height: int, targets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The target whose aspect ratio is closest to the image's (in log ratio: 2:1 is as far from 1:1 as 1:2)."""
    ratio = math.log(width / height)
    return min(targets, key=lambda target: abs(math.log(target[1] / target[0]) - ratio))


def fit_to_target(image: Image.Image, settings: Preprocessing, seed: int) -> Fitted:
    """Resize an RGB image to cover its target, then crop the target out of it."""
    width, height = image.size
    target_height, target_width = nearest_target(width, height, settings.targets)
    # 1. refuse images that would need upscaling (or are below the asked minimum)
    scale = max(target_width / width, target_height / height)
    if settings.min_size is None and scale > 1:
        raise ImageRejected("too_small", f"{width}x{height} is smaller than its target {target_width}x{target_height}")
    if settings.min_size is not None and min(width, height) < settings.min_size:
        raise ImageRejected("too_small", f"{width}x{height} has a side below the minimum {settings.min_size}")

    # 2. resize so the target just fits inside
    resized_width = max(target_width, round(width * scale))
    resized_height = max(target_height, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        image = image.resize((resized_width, resized_height), RESAMPLING)

    # 3. crop: centred, or at a position drawn from the row's seed (identical on every rerun)
    if settings.crop == "random":
        rng = np.random.default_rng(seed)
        top = int(rng.integers(0, resized_height - target_height + 1))
        left = int(rng.integers(0, resized_width - target_width + 1))
    else:
        top, left = (resized_height - target_height) // 2, (resized_width - target_width) // 2
    pixels = np.asarray(image.crop((left, top, left + target_width, top + target_height)), dtype=np.uint8)
    return Fitted(pixels=pixels, original_size=(height, width), crop_top_left=(top, left), target_size=(target_height, target_width))
