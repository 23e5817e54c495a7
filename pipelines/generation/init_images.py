"""Source images of image-to-image rows: read, hashed, decoded as ``encode`` decodes, cut to the row's size.

A prompt row's ``init_image`` holds image bytes, or a path or URI read through fsspec (a
relative path is relative to the prompt table's folder, as ``encode``'s path column). The
validation task (``prompt_rows``) reads it, records where it came from (its URI, or
``input row N`` for bytes) and the sha256 of its bytes, and decodes it with
``pipelines.encoding.image_decode`` (decompression bombs refused from the header, EXIF
orientation, every mode to RGB), resized to cover the row's size and centre-cropped. The crop
travels to the denoiser as raw bytes (``init_pixels``); the manifest records the source, its
sha256 and the strength.

A row's identity includes its source's content and its strength: a rerun regenerates the rows
whose source bytes or strength changed since they were committed (``reopen_changed_sources``).
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
    """The bytes of a row's ``init_image`` (bytes, or a path / URI), or a ValueError naming the column."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Source(f"input row {row}" if row is not None else "input bytes", bytes(value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"init_image must be image bytes or a path, got {value!r}")
    uri = io.resolve_reference(settings.base_of(row), value.strip())
    try:
        return Source(uri, io.read_bytes(uri))
    except Exception as error:  # any backend's failure means the same to the user: no bytes
        raise ValueError(f"init_image: cannot read {uri!r}: {type(error).__name__}: {error}") from None


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
    """(the row's ``INIT_IMAGE_FIELDS``, None) or ({}, reason). A null ``init_image``: a text-to-image row."""
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


# -- reruns: a changed source is another row -------------------------------------------------------


def reopen_changed_sources(results_uri: str, fragments: list[io.ParquetFragment], columns: list[str], settings: SourceSettings) -> int:
    """Before a rerun: take out of the manifest the image-to-image rows whose source bytes or strength
    differ from what the input gives them now, so that the run regenerates exactly those. Return how many.

    A row is matched by its id (by its input position without an ``id`` column); a path or URI is
    read and hashed again (once per distinct value), bytes in the input are hashed where they are.
    A source that cannot be read now is left to its row (the committed image stays).
    """
    key_column = "id" if "id" in columns else "row"
    current = _current_sources(fragments, [column for column in ("id", *INIT_IMAGE_COLUMNS) if column in columns], key_column, settings)
    reopened = 0
    for part in io.list_parts(results_uri):
        if "init_image_sha256" not in io.parquet_schema(part).names:  # a part of a run without init images
            continue
        table = io.read_parquet_file(part)
        committed = zip(table.column(key_column).cast(pa.string()).to_pylist(), table.column("init_image_sha256").to_pylist(),
                        table.column("strength").to_pylist())
        changed = [current.get(key) not in (None, (digest or "", strength)) for key, digest, strength in committed]
        if any(changed):  # the part again without those rows (named from its rows, as every part)
            io.remove_tree(part)
            kept = table.filter(pa.array([not change for change in changed]))
            if len(kept):
                io.write_parquet_part(kept, results_uri)
            reopened += sum(changed)
    return reopened


def _current_sources(fragments: list[io.ParquetFragment], columns: list[str], key_column: str,
                     settings: SourceSettings) -> dict[str, tuple[str, float | None] | None]:
    """(sha256, strength) of each input row's source now, by ``key_column``; None where it cannot be read."""
    digests: dict[str, str | None] = {}
    current: dict[str, tuple[str, float | None] | None] = {}
    for fragment in fragments:
        for table in io.read_fragment(fragment, columns, 1 << 16):
            for record in table.to_pylist():
                value, strength = record["init_image"], record.get("strength")
                if value is None:
                    current[str(record[key_column])] = ("", None)
                    continue
                if not isinstance(value, str):
                    digest = hashlib.sha256(value).hexdigest()
                elif (digest := digests.get(value, "")) == "":
                    try:
                        digest = digests[value] = read_source(value, record["row"], settings).sha256
                    except ValueError:
                        digest = digests[value] = None
                strength = settings.strength if strength is None or math.isnan(strength) else float(strength)
                current[str(record[key_column])] = None if digest is None else (digest, strength)
    return current


def manifest_sources(rows: dict[str, np.ndarray]) -> dict[str, list]:
    """The manifest's (and the processor's) source columns of generated rows: null for a text-to-image row
    (between stages "" and NaN)."""
    sources = [str(value) if value else None for value in rows["init_image"]]
    return {
        "init_image": sources,
        "init_image_sha256": [str(digest) if source else None for digest, source in zip(rows["init_image_sha256"], sources)],
        "strength": [float(strength) if source else None for strength, source in zip(rows["strength"], sources)],
    }
