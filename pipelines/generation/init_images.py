"""Source images of image-to-image rows: read, hashed, decoded as ``encode`` decodes, cut to the row's size.

A prompt row's ``init_image`` holds image bytes, or a path or URI read through fsspec (a
relative path is relative to the prompt table's folder, as ``encode``'s path column). The
validation task (``prompt_rows``) reads it, records where it came from (its URI, or
``input row N`` for bytes) and the sha256 of its bytes, and decodes it with
``pipelines.encoding.image_decode`` (decompression bombs refused from the header, EXIF
orientation, every mode to RGB), resized to cover the row's size and centre-cropped. The crop
travels to the denoiser as raw bytes (``init_pixels``); the manifest records the source, its
sha256 and the strength. A source that is not there, or not an image, is the row's error
(permanent); one the store refused or did not answer after its retries is a transient error,
which a rerun retries (the rule of ``encode``'s sources, ``io.is_transient``).

A row's identity stays its id (or input position), as for every generated row: a rerun resumes
without reading the sources of the rows it already holds (that would cost as much as the job's
own reading), so a source changed under its path after its row was generated leaves that row as
it is; its recorded sha256 shows it. A new id, or ``--overwrite``, generates it again.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.encoding.image_decode import ImageRejected, Preprocessing, decode_image, fit_to_target
from pipelines.runtime import io
from pipelines.runtime.config import DEFAULT_STRENGTH

INIT_IMAGE_COLUMNS = ("init_image", "strength")
DEFAULT_MAX_SOURCE_PIXELS = 89_478_485  # larger sources are refused from their header (encode's --max-image-pixels default)
# what an image-to-image row carries to the denoiser, beside its settings ("" and null for a text-to-image row)
INIT_IMAGE_FIELDS = {"init_image": pa.string(), "init_image_sha256": pa.string(), "strength": pa.float64(), "init_pixels": pa.binary()}
# a text-to-image row's: "" rather than null, which Ray Data hands to numpy stages as NaN in an all-null block
NO_SOURCE = {"init_image": "", "init_image_sha256": "", "strength": None, "init_pixels": b""}


@dataclass(frozen=True, kw_only=True)
class SourceSettings:
    """How a run reads and checks its rows' source images."""

    strength: float = DEFAULT_STRENGTH  # rows whose 'strength' is null
    max_pixels: int = DEFAULT_MAX_SOURCE_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels are composited on
    file_starts: tuple[tuple[int, str], ...] = ()  # (first input position, file URI), sorted: relative paths resolve against it

    def __post_init__(self) -> None:
        check_strength(self.strength)
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels: must be >= 1, got {self.max_pixels}")

    def base_of(self, row: int | None) -> str:
        """The input file holding input position ``row`` ("" without one: the processor's paths are URIs or local)."""
        if row is None or not self.file_starts:
            return ""
        return self.file_starts[bisect.bisect_right([start for start, _ in self.file_starts], row) - 1][1]


def check_strength(strength) -> None:
    if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:  # NaN fails both comparisons
        raise ValueError(f"strength: must be between 0 and 1, got {strength!r}")


def uses_init_images(columns) -> bool:
    return "init_image" in columns


@dataclass(frozen=True)
class Source:
    reference: str  # its URI, or "input row N" for bytes in the table
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_source(value, row: int | None, settings: SourceSettings) -> Source:
    """The bytes of a row's ``init_image`` (bytes, or a path / URI), or a ValueError naming the column.

    A read the store refused or did not answer after its retries (``io.is_transient``, as ``encode``'s
    sources) raises ``io.StorageError`` instead: not the row's fault, its error is transient."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Source(f"input row {row}" if row is not None else "input bytes", bytes(value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"init_image must be image bytes or a path, got {value!r}")
    uri = io.resolve_reference(settings.base_of(row), value.strip())
    try:
        return Source(uri, io.read_bytes(uri))
    except io.StorageError as error:  # read_bytes wraps any backend's failure
        if io.is_transient(error):
            raise
        raise ValueError(f"init_image: {error}") from None  # not there, a folder, not a valid URI: no retry changes it


def source_crop(source: Source, height: int, width: int, settings: SourceSettings) -> np.ndarray:
    """The source as uint8 (height, width, 3): decoded as ``encode`` decodes, resized to cover, centre-cropped."""
    # upscaling allowed (min_size 1): a small source still gives the row its size, as diffusers resizes it
    cut = Preprocessing(targets=((height, width),), crop="center", max_pixels=settings.max_pixels, min_size=1,
                        background=settings.background)
    try:
        return fit_to_target(decode_image(source.data, settings.max_pixels, settings.background), cut, 0).pixels
    except ImageRejected as rejected:
        raise ValueError(f"init_image {source.reference!r}: {rejected.message}") from None


def resolve_source(row: dict, height: int, width: int, settings: SourceSettings) -> tuple[dict, str | None]:
    """(the row's ``INIT_IMAGE_FIELDS``, None) or ({}, reason). A null ``init_image``: a text-to-image row.
    A source the store refused raises ``io.StorageError`` (``read_source``)."""
    value, strength = row.get("init_image"), row.get("strength")
    if strength is not None and not (isinstance(strength, float) and math.isnan(strength)) and value is None:
        return {}, f"strength is {strength!r} but the row has no init_image"
    if value is None:
        return dict(NO_SOURCE), None
    strength = settings.strength if strength is None else strength
    try:
        check_strength(strength)
        source = read_source(value, row.get("row"), settings)
        pixels = source_crop(source, height, width, settings)
    except ValueError as error:
        return {}, str(error)
    return {"init_image": source.reference, "init_image_sha256": source.sha256, "strength": float(strength),
            "init_pixels": pixels.tobytes()}, None


def manifest_sources(rows: dict[str, np.ndarray]) -> dict[str, list]:
    """The manifest's (and the processor's) source columns of generated rows: null for a text-to-image row
    (between stages "" and NaN)."""
    sources = [str(value) if value else None for value in rows["init_image"]]
    return {
        "init_image": sources,
        "init_image_sha256": [str(digest) if source else None for digest, source in zip(rows["init_image_sha256"], sources)],
        "strength": [float(strength) if source else None for strength, source in zip(rows["strength"], sources)],
    }
