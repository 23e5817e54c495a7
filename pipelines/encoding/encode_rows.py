"""Input rows of a latent-dataset run: id, source bytes, cache key, decoded crop, or an error.

``prepare_images`` runs as a CPU task in Ray Data, before any model, and imports no
model code. Each input row leaves it in one of three ways: skipped (the output already
holds it under the same cache key), as an error row written to ``errors/`` with a
reason code, or as a crop ready for the VAE encoder.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.encoding.ledger import DONE_KEY_COLUMN, REPEAT_OF_COLUMN
from pipelines.encoding.image_decode import ImageRejected, Preprocessing, preprocess
from pipelines.runtime import io
from pipelines.runtime.outputs import write_errors_part
from pipelines.runtime.row_ids import derived_seed, position_id
from pipelines.runtime.schemas import ENCODE_ERRORS_SCHEMA, PERMANENT, TRANSIENT
from workers.runtime.columns import mark_failed, stack_column  # numpy only: this task loads no torch

PREPARE_STAGE = "prepare"  # the ``stage`` of errors found here
# what a prepared row carries to the encoders (and ``CAPTION_COLUMNS`` when the table has captions)
PREPARED_COLUMNS = ("id", "row", "source", "content_hash", "cache_key", "seed", "pixels", "original_size", "crop_top_left", "target_size")
# Between stages a missing caption travels as "" with ``caption_null`` True, never as None: Ray Data
# stores a block's column of Nones as Arrow nulls, hands them to the next numpy stage as float NaN,
# and then cannot concatenate that block with blocks of strings (the run stops). The commit task
# stores null again.
CAPTION_COLUMNS = ("caption", "caption_null")


@dataclass(frozen=True, kw_only=True)
class SourceColumns:
    """Which input columns hold what (``None``: the table has no such column)."""

    image: str | None  # image bytes (binary, or a struct with ``bytes``)
    path: str | None  # paths/URIs of image files, relative ones resolved against the table's file
    caption: str | None
    id: str | None

    def to_read(self) -> list[str]:
        return [c for c in dict.fromkeys((self.id, self.path or self.image, self.caption)) if c is not None]


@dataclass(frozen=True, kw_only=True)
class RowSettings:
    """Everything a task needs to turn input rows into crops, the same for every row of a run."""

    columns: SourceColumns
    preprocessing: Preprocessing
    seed: int  # the run's seed; rows derive theirs from it and their id
    encoding_key: str  # model fingerprint + preprocessing config: part of every row's cache key
    run: int
    file_starts: tuple[tuple[int, str], ...]  # (position of the file's first row, file URI), sorted

    def file_of(self, row: int) -> tuple[str, int]:
        """The input file holding input position ``row``, and the row's index inside it."""
        index = bisect.bisect_right([start for start, _ in self.file_starts], row) - 1
        start, uri = self.file_starts[index]
        return uri, row - start


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(content: str, caption: str | None, encoding_key: str) -> str:
    """Equal keys, equal output rows: same bytes, same caption, same model and preprocessing."""
    caption_part = "\0null" if caption is None else "\0text:" + caption
    return hashlib.sha256(f"{content}{caption_part}\0{encoding_key}".encode()).hexdigest()


class RowError(Exception):
    """Why a row cannot be encoded; ``cause``: the row's own fault (``PERMANENT``) or outside it (``TRANSIENT``)."""

    def __init__(self, code: str, message: str, source: str | None = None, content: str | None = None, key: str | None = None,
                 cause: str = PERMANENT):
        super().__init__(message)
        self.code, self.message, self.source, self.content, self.key, self.cause = code, message, source, content, key, cause


def read_source(record: dict, row: int, settings: RowSettings) -> tuple[bytes, str]:
    """(image bytes, source reference) of one input row."""
    columns = settings.columns
    if columns.path is not None:
        reference = record.get(columns.path)
        if reference is None or not str(reference).strip():
            raise RowError("missing_source", f"column {columns.path!r} is empty")
        base = settings.file_of(row)[0] if row is not None else ""  # the processor's paths: URIs, or relative to the working folder
        uri = io.resolve_reference(base, str(reference).strip())
        try:
            return io.read_bytes(uri), uri
        except Exception as error:  # any backend error means the same to the user: no bytes; a rerun retries a refusal
            raise RowError("unreadable_path", f"cannot read {uri!r}: {type(error).__name__}: {error}", source=uri,
                           cause=TRANSIENT if io.is_transient(error) else PERMANENT) from None
    reference = "{}#row={}".format(*settings.file_of(row)) if row is not None else ""
    value = record.get(columns.image)
    data = value.get("bytes") if isinstance(value, dict) else value  # HF datasets: {"bytes", "path"}
    if data is None:
        raise RowError("missing_source", f"column {columns.image!r} holds no bytes", source=reference)
    return bytes(data), reference


def prepare_row(record: dict, row_id: str | None, row: int | None, settings: RowSettings) -> dict | None:
    """A row ready for encoding, None when the output already holds it (its ``done_key``), or ``RowError``.

    ``row``: the row's input position (None in the processor); ``row_id`` None: the seed derives
    from the content instead (the processor's rows without an id column)."""
    # 1. the source bytes, their hash and the row's cache key
    data, source = read_source(record, row, settings)
    content = content_hash(data)
    caption = None if settings.columns.caption is None else record.get(settings.columns.caption)
    key = cache_key(content, caption, settings.encoding_key)
    if record.get(DONE_KEY_COLUMN) == key:
        return None

    # 2. decode, resize, crop
    seed = derived_seed(settings.seed, content if row_id is None else row_id)
    try:
        fitted = preprocess(data, settings.preprocessing, seed)
    except ImageRejected as rejected:
        raise RowError(rejected.code, rejected.message, source, content, key) from None
    return {
        "id": row_id, "row": row, "source": source, "content_hash": content, "cache_key": key, "seed": seed,
        "caption": caption, "pixels": fitted.pixels, "original_size": fitted.original_size,
        "crop_top_left": fitted.crop_top_left, "target_size": fitted.target_size,
    }


def prepare_images(table: pa.Table, *, settings: RowSettings, errors_uri: str | None) -> dict[str, np.ndarray]:
    """Ray Data task: a block of input rows -> crops to encode.

    The job (``errors_uri``): each row comes with its lookup (``ledger.read_rows_with_lookup``):
    ``done_key``, the cache key the output holds for its id, and ``repeat_of``, the first row with
    its id when it repeats one; done rows leave, bad rows are written to ``errors/`` here (errors
    tied to a position, null or repeated id, are written again on every run: they cost nothing to
    find, and a newer copy supersedes the older one). The processor (no ``errors_uri``,
    ``processor_rows``): every row stays, with its own columns.
    """
    if errors_uri is None:
        return processor_rows(table, settings)
    good, bad = [], []
    id_column = settings.columns.id
    for record in table.to_pylist():
        row, first_row = int(record["row"]), int(record[REPEAT_OF_COLUMN])
        raw_id = record.get(id_column) if id_column is not None else position_id(row)
        row_id = position_id(row) if raw_id is None else str(raw_id)
        try:
            if raw_id is None:
                raise RowError("null_id", f"column {id_column!r} is null")
            if first_row >= 0:
                raise RowError("duplicate_id", f"id {row_id!r} repeats the id of input row {first_row}")
            prepared = prepare_row(record, row_id, row, settings)
        except RowError as error:
            bad.append({
                "id": row_id, "row": row, "stage": PREPARE_STAGE, "reason": error.message, "code": error.code,
                "source": error.source, "content_hash": error.content, "cache_key": error.key, "run": settings.run,
                "cause": error.cause,
            })
            continue
        if prepared is not None:
            good.append(prepared)

    if bad:
        write_errors_part(pa.Table.from_pylist(bad, schema=ENCODE_ERRORS_SCHEMA), errors_uri)
    if not good:
        return {}  # Ray Data passes no empty block on to the encoders (and empty tensor columns do not convert)
    return crops_batch(good, with_caption=settings.columns.caption is not None)


# what the processor's rows carry of a prepared row (the user's columns keep their own id and source)
PROCESSOR_PREPARED = ("content_hash", "seed", "pixels", "original_size", "crop_top_left", "target_size", *CAPTION_COLUMNS)


def processor_rows(table: pa.Table, settings: RowSettings) -> dict[str, np.ndarray]:
    """The processor's prepare: every row keeps its columns and gains its crop; a bad row is marked failed
    (stage ``prepare``, its code and reason) with a 1x1 placeholder crop that the encoders skip."""
    from ray.data.block import BlockAccessor

    # 1. each row's crop, or why it has none
    columns = settings.columns
    source = columns.path or columns.image
    if source not in table.column_names:
        raise ValueError(f"the dataset has no {source!r} column (columns are: {', '.join(table.column_names)})")
    ids = table.column(columns.id).to_pylist() if columns.id in table.column_names else [None] * table.num_rows
    prepared, failures = [], {}
    for index, (record, row_id) in enumerate(zip(table.to_pylist(), ids)):
        try:
            prepared.append(prepare_row(record, None if row_id is None else str(row_id), None, settings))
        except RowError as error:
            failures[index] = (error.code, error.message)
            caption = None if columns.caption is None else record.get(columns.caption)
            prepared.append({"content_hash": error.content or "", "seed": 0, "caption": caption, "pixels": np.zeros((1, 1, 3), np.uint8),
                             "original_size": (0, 0), "crop_top_left": (0, 0), "target_size": (0, 0)})
    if not prepared:
        return {}
    # 2. the input's columns as Ray Data hands any batch, then the crops and the failures
    batch = BlockAccessor.for_block(table).to_batch_format("numpy")
    crops = crops_batch([{**row, "id": "", "row": 0, "source": "", "cache_key": ""} for row in prepared], with_caption=columns.caption is not None)
    batch.update({name: values for name, values in crops.items() if name in PROCESSOR_PREPARED})
    mark_failed(batch, failures, PREPARE_STAGE)
    return batch


def crops_batch(rows: list[dict], with_caption: bool) -> dict[str, np.ndarray]:
    """Prepared rows as a numpy batch; pixels of different sizes (buckets) as an object column."""
    def strings(name: str) -> np.ndarray:
        return np.array([r[name] for r in rows], dtype=object)

    def pairs(name: str) -> np.ndarray:
        return np.array([r[name] for r in rows], dtype=np.int32).reshape(len(rows), 2)

    batch = {
        "id": strings("id"), "row": np.array([r["row"] for r in rows], np.int64), "source": strings("source"),
        "content_hash": strings("content_hash"), "cache_key": strings("cache_key"),
        "seed": np.array([r["seed"] for r in rows], np.int64),
        "original_size": pairs("original_size"), "crop_top_left": pairs("crop_top_left"), "target_size": pairs("target_size"),
        "pixels": stack_column([r["pixels"] for r in rows]),
    }
    if with_caption:
        batch["caption"] = np.array(["" if r["caption"] is None else r["caption"] for r in rows], dtype=object)
        batch["caption_null"] = np.array([r["caption"] is None for r in rows], dtype=bool)
    return batch
