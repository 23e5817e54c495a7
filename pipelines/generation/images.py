"""Image encoding with Pillow (and, for latent datasets, decoding)."""

from __future__ import annotations

import hashlib
import io as bytes_io
import time
from urllib.parse import quote

import numpy as np
from PIL import Image

from pipelines.runtime import io
from pipelines.runtime.schemas import PERMANENT, TRANSIENT
from workers.runtime.columns import FAILED_CAUSE_COLUMN, FAILED_REASON_COLUMN, FAILED_STAGE_COLUMN, failed_rows

PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# File systems refuse names above 255 bytes (ext4, overlayfs): a quoted id longer than
# this gets a prefix of itself plus a hash instead, far below every limit
MAX_QUOTED_NAME = 96
HASHED_PREFIX = 64
# Attempts at writing one image before the row goes to errors (stage "write")
WRITE_ATTEMPTS = 3
WRITE_RETRY_SECONDS = 0.5


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 HxWx3 pixels -> file bytes. No timestamps or other metadata: same pixels, same bytes."""
    buffer = bytes_io.BytesIO()
    options = {} if image_format == "png" else {"quality": quality}
    Image.fromarray(pixels, "RGB").save(buffer, PILLOW_FORMATS[image_format], **options)
    return buffer.getvalue()


def image_name(row_id: str) -> str:
    """A short, stable file name for a row id (without extension).

    The id quoted to a safe name when that is short and not hidden; else (long ids,
    ids whose quoting makes them long, ids starting with a dot) the quoted id's first
    characters, ``~`` and 16 hex digits of the id's sha256: bounded whatever the id.
    The manifest keeps the exact id beside the path.
    """
    quoted = quote(row_id, safe="")
    if len(quoted) <= MAX_QUOTED_NAME and not quoted.startswith("."):
        return quoted
    prefix = ""
    for character in row_id.lstrip("."):  # whole characters: never half an escape or of a UTF-8 sequence
        piece = quote(character, safe="")
        if len(prefix) + len(piece) > HASHED_PREFIX:
            break
        prefix += piece
    return f"{prefix}~{hashlib.sha256(row_id.encode()).hexdigest()[:16]}"


def image_path(row_id: str, image_format: str) -> str:
    """Where a row's image lives, relative to the output."""
    return f"images/{image_name(row_id)}.{EXTENSIONS[image_format]}"


def write_with_retries(uri: str, data: bytes) -> str | None:
    """Write an object, retrying transient failures; None when written, else why it could not be."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            io.write_bytes(uri, data)
            return None
        except Exception as error:  # any backend's error: the row goes to errors with its text
            # a StorageError names the temporary and final paths: the row's reason is its cause
            failure = error.reason if isinstance(error, io.StorageError) else f"{type(error).__name__}: {error}"
            if attempt + 1 < WRITE_ATTEMPTS:
                time.sleep(WRITE_RETRY_SECONDS * (attempt + 1))
    return f"cannot write the image after {WRITE_ATTEMPTS} attempts: {failure}"


def encode_generated(batch: dict[str, np.ndarray], image_format: str, quality: int, channels: int | None = None) -> dict[str, np.ndarray]:
    """Each row's image as file bytes (``image``; None for a row without one) and its latent's per-channel aggregates.

    A row a model stage failed (out of GPU memory, a non-finite image, an invalid row: the
    stage and reason it recorded) or whose latent is not finite (stage ``denoiser``) gets
    ``error_stage``, ``error_reason`` and ``error_cause`` (the row's own unless the stage
    recorded otherwise, ``FAILED_CAUSE_COLUMN``) instead of an image. ``channels``: the latent's
    (statistics of failed rows are NaN of that size); None: from the batch's other rows.
    Imports no model code (no torch here): it runs in CPU tasks.
    """
    images, reasons, stages, causes = [], [], [], []
    aggregates: dict[str, list] = {"latent_count": [], "latent_mean": [], "latent_std": [], "latent_min": [], "latent_max": []}
    failed = failed_rows(batch)
    channels = channels or next((np.shape(latent)[0] for latent, fail in zip(batch["latents"], failed) if not fail), 1)
    for index in range(len(failed)):
        if failed[index]:  # no latent (a placeholder): no statistics, no image
            for name in aggregates:
                aggregates[name].append(0 if name == "latent_count" else np.full(channels, np.nan))
            images.append(None)
            reasons.append(str(batch[FAILED_REASON_COLUMN][index]))
            stages.append(str(batch[FAILED_STAGE_COLUMN][index]))
            causes.append((str(batch[FAILED_CAUSE_COLUMN][index]) if FAILED_CAUSE_COLUMN in batch else "") or PERMANENT)
            continue
        values = np.asarray(batch["latents"][index], np.float64)
        values = values.reshape(values.shape[0], -1)
        for name, value in zip(aggregates, (values.shape[1], values.mean(1), values.std(1), values.min(1), values.max(1))):
            aggregates[name].append(value)
        finite = bool(np.isfinite(values).all())
        images.append(encode_image(batch["image"][index], image_format, quality) if finite else None)
        reasons.append("" if finite else "the final latent has non-finite values (NaN or infinity)")
        stages.append("" if finite else "denoiser")
        causes.append("" if finite else PERMANENT)
    batch.update({name: np.array(values) for name, values in aggregates.items()})
    batch.update(image=_objects(images), error_reason=np.array(reasons, dtype=object), error_stage=np.array(stages, dtype=object),
                 error_cause=np.array(causes, dtype=object))
    return batch


def write_generated_images(batch: dict[str, np.ndarray], output: str, image_format: str, quality: int, keep_latents: bool) -> dict[str, np.ndarray]:
    """Ray Data task: store each row's image; replace pixels by per-channel latent aggregates (``encode_generated``).

    A row whose image cannot be written gets an error reason (stage ``write``) instead of
    an image; the other rows go on. ``error_cause`` says whose fault each failure is: the
    row's (a model stage's failure, a non-finite latent) or the storage's (a write, or the
    read of a source image, that failed after its retries: a rerun retries the row). Runs apart from the model actors (no torch here).
    """
    batch = encode_generated(batch, image_format, quality)
    paths = []
    for index, (row_id, data) in enumerate(zip(batch["id"], batch.pop("image"))):
        if data is None:
            paths.append("")
            continue
        path = image_path(str(row_id), image_format)
        failure = write_with_retries(io.join(output, path), data)
        paths.append("" if failure else path)
        if failure:
            batch["error_reason"][index], batch["error_stage"][index], batch["error_cause"][index] = failure, "write", TRANSIENT
    if not keep_latents:
        batch.pop("latents")
    batch["image_path"] = np.array(paths, dtype=object)
    return batch


def _objects(values: list) -> np.ndarray:
    """A 1-d object array of ``values`` (numpy would make a 2-d array of equal-length byte strings)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column
