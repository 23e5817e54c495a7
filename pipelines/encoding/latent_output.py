"""The output side of a latent-dataset run: latents parts, superseded rows, accounting, statistics.

``commit_latents`` runs as a CPU task in Ray Data after the encoders and imports no
model code: it writes each batch as one ``latents/`` part (exact partial statistics in
its footer, see ``pipelines.runtime.outputs``) and hands the driver a one-row summary, so
latents never travel through the driver.

A row is never held twice. Every row records the ``run`` that wrote it; when a rerun
writes a row again (its content changed, or an unreadable path is retried), the older
part is rewritten without the older copy (``remove_rows``, called by the tasks of
``pipelines.encoding.ledger`` at the end of the run). An interrupted run can leave both
copies for a moment; the next run removes the older one before it encodes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.runtime import io
from pipelines.runtime.job import part_summary, pop_busy_seconds
from pipelines.runtime.outputs import RunOutput, write_errors_part
from pipelines.runtime.schemas import (
    EMBEDDING_COLUMNS, ENCODE_ERRORS_SCHEMA, LENGTH_SUFFIX, PERMANENT, SHAPE_RUNS_METADATA_KEY, is_ragged_type, is_tensor_type,
    latents_schema, tensor_type,
)
from pipelines.runtime.stats import stats_of_latents
from workers.runtime.columns import FAILED_CODE_COLUMN, FAILED_REASON_COLUMN, FAILED_STAGE_COLUMN, failed_rows, pop_counts

ENCODE_STAGE = "vae_encoder"  # the ``stage`` of errors found after encoding


@dataclass(frozen=True, kw_only=True)
class LatentLayout:
    """Which columns the ``latents/`` table has, and how latents are stored."""

    dtype: str  # float16 | float32
    fixed_shape: bool  # one latent shape for every row (no buckets): nested fixed-size lists [C][H][W]
    flip: bool
    caption: bool
    # the caption embedding columns (the family's, named as diffusers' encode_prompt returns them); () for none
    text_embeddings: tuple[str, ...] = ()
    # the family's ``fixed_length_embeddings``: False stores [tokens, dim] embeddings at each caption's own length
    fixed_length_embeddings: bool = True


# -- the write task -------------------------------------------------------------------------------


def commit_latents(batch: dict[str, np.ndarray], *, output: RunOutput, layout: LatentLayout, run: int) -> dict[str, np.ndarray]:
    """Ray Data task: encoded rows -> one ``latents/`` part (non-finite rows to ``errors/``) -> a summary row."""
    busy, counts = pop_busy_seconds(batch), pop_counts(batch)
    rows = len(batch["id"])

    # 1. the values as stored: checks and statistics are of what readers will see
    dtype = np.dtype(layout.dtype)
    with np.errstate(over="ignore"):  # values beyond float16 become infinite: those rows go to errors below
        latents = [np.asarray(latent).astype(dtype) for latent in batch["latent"]]
        flipped = [np.asarray(latent).astype(dtype) for latent in batch["latent_flipped"]] if layout.flip else None
    failed = failed_rows(batch)  # an encoder could not compute them (out of GPU memory): placeholders, no latent
    finite = np.array([not failed[i] and np.isfinite(latents[i]).all() and (flipped is None or np.isfinite(flipped[i]).all())
                       for i in range(rows)], dtype=bool)

    # 2. rows an encoder failed, and rows the VAE returned no usable latent for
    errors = _error_rows(batch, np.flatnonzero(failed), run) + _non_finite_errors(batch, np.flatnonzero(~finite & ~failed), layout, run)
    errors_table = pa.Table.from_pylist(errors, schema=ENCODE_ERRORS_SCHEMA) if errors else None

    # 3. one part of the good rows, with the exact statistics of their latents in its footer
    keep = np.flatnonzero(finite)
    table = latents_table(batch, keep, latents, flipped, layout, run) if len(keep) else None
    stats = stats_of_latents([latents[i] for i in keep])
    parts = output.commit(table, errors_table, stats)
    return part_summary(ok_rows=len(keep), error_rows=rows - len(keep), busy=busy, counts=counts, parts=parts)


def _error_row(batch: dict, i: int, run: int, **fields) -> dict:
    # the row's own: out of memory even alone, non-finite values (encode's transient errors are unreadable paths)
    return {"id": str(batch["id"][i]), "row": int(batch["row"][i]), "source": str(batch["source"][i]),
            "content_hash": str(batch["content_hash"][i]), "cache_key": str(batch["cache_key"][i]), "run": run,
            "cause": PERMANENT, **fields}


def _non_finite_errors(batch: dict, rows: np.ndarray, layout: LatentLayout, run: int) -> list[dict]:
    overflow = "; values beyond float16's range (65504) overflow: try --latent-dtype float32" if layout.dtype == "float16" else ""
    return [_error_row(batch, i, run, stage=ENCODE_STAGE, code="non_finite_latent", reason=f"the latent has NaN or infinite values{overflow}")
            for i in rows]


def _error_rows(batch: dict, rows: np.ndarray, run: int) -> list[dict]:
    """Rows a model stage marked failed, with its stage, code and reason. No cache key: a rerun
    (a larger GPU, smaller images) retries them, as it retries unreadable paths."""
    return [_error_row(batch, i, run, stage=str(batch[FAILED_STAGE_COLUMN][i]), code=str(batch[FAILED_CODE_COLUMN][i]),
                       reason=str(batch[FAILED_REASON_COLUMN][i]), cache_key=None) for i in rows]


def latents_table(batch: dict, keep: np.ndarray, latents: list[np.ndarray], flipped: list[np.ndarray] | None, layout: LatentLayout, run: int) -> pa.Table:
    """The kept rows as a ``latents/`` part: sorted by latent shape, the shape runs in the footer."""
    keep = keep[np.argsort(_shape_order([latents[i].shape for i in keep]), kind="stable")]
    kept = [latents[i] for i in keep]
    embedding_names = [name for name in EMBEDDING_COLUMNS if name in batch] if layout.text_embeddings else []
    embeddings = {name: [np.asarray(batch[name][i]).astype(layout.dtype) for i in keep] for name in embedding_names}
    embedding_shapes = {name: stored_shape(values, layout.fixed_length_embeddings) for name, values in embeddings.items()}
    schema = latents_schema(
        latent_shape=kept[0].shape if layout.fixed_shape else None, dtype=layout.dtype, flip=layout.flip,
        caption=layout.caption, embedding_shapes=embedding_shapes,
    )
    columns = {
        "id": pa.array([str(batch["id"][i]) for i in keep], pa.string()),
        "latent": tensor_column(kept, schema.field("latent").type),
        "latent_shape": pairs_column([latent.shape for latent in kept], 3),
        "original_size": pairs_column(batch["original_size"][keep], 2),
        "crop_top_left": pairs_column(batch["crop_top_left"][keep], 2),
        "target_size": pairs_column(batch["target_size"][keep], 2),
        "source": pa.array([str(batch["source"][i]) for i in keep], pa.string()),
        "content_hash": pa.array([str(batch["content_hash"][i]) for i in keep], pa.string()),
        "cache_key": pa.array([str(batch["cache_key"][i]) for i in keep], pa.string()),
        "row": pa.array(batch["row"][keep], pa.int64()),
        "seed": pa.array(batch["seed"][keep], pa.int64()),
        "run": pa.array(np.full(len(keep), run), pa.int32()),
    }
    if layout.flip:
        columns["latent_flipped"] = tensor_column([flipped[i] for i in keep], schema.field("latent_flipped").type)
    if layout.caption:
        columns["caption"] = captions_column(batch, keep)
    for name, values in embeddings.items():
        columns[name] = tensor_column(values, schema.field(name).type)
        if embedding_shapes[name][0] is None:
            columns[name + LENGTH_SUFFIX] = pa.array([len(value) for value in values], pa.int32())
    if embeddings:
        columns["caption_truncated"] = pa.array(batch["caption_truncated"][keep], pa.bool_())
    return with_shape_runs(pa.Table.from_arrays([columns[field.name] for field in schema], schema=schema))


def captions_column(batch: dict, keep: np.ndarray) -> pa.Array:
    """The kept rows' captions, null where the row had none (``caption_null``: see ``encode_rows.CAPTION_COLUMNS``)."""
    captions = batch["caption"]
    nulls = batch["caption_null"] if "caption_null" in batch else [caption is None for caption in captions]
    return pa.array([None if nulls[i] else str(captions[i]) for i in keep], pa.string())


def stored_shape(values: list[np.ndarray], fixed_length: bool) -> tuple[int | None, ...]:
    """An embedding column's shape in the schema: its rows' shape, tokens (the first of [tokens, dim]) left
    free when the family's captions have lengths of their own. Set by the family, never by the rows: a
    part whose captions happen to share a length has the type of every other part."""
    shape = values[0].shape
    return shape if fixed_length or len(shape) < 2 else (None, *shape[1:])


def _shape_order(shapes: list[tuple[int, ...]]) -> np.ndarray:
    """A sort key per row that groups equal shapes (shapes ordered as tuples)."""
    distinct = sorted(set(shapes))
    return np.array([distinct.index(shape) for shape in shapes], dtype=np.int64)


def with_shape_runs(table: pa.Table) -> pa.Table:
    """``table`` with its rows' latent shapes, as runs, in the schema metadata (the Parquet footer)."""
    metadata = dict(table.schema.metadata or {})
    metadata[SHAPE_RUNS_METADATA_KEY] = json.dumps(shape_runs([tuple(shape) for shape in table.column("latent_shape").to_pylist()])).encode()
    return table.replace_schema_metadata(metadata)


def shape_runs(shapes: list[tuple[int, ...]]) -> list[list]:
    """Consecutive rows of one shape as [shape, first_row, rows]: one run per shape in a sorted part."""
    runs: list[list] = []
    for row, shape in enumerate(shapes):
        if runs and tuple(runs[-1][0]) == shape:
            runs[-1][2] += 1
        else:
            runs.append([list(shape), row, 1])
    return runs


def _list_levels(data_type: pa.DataType) -> list[int | None]:
    """The list levels of a nested list type, outermost first: the fixed size, or None for variable-size."""
    levels = []
    while pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type):
        levels.append(data_type.list_size if pa.types.is_fixed_size_list(data_type) else None)
        data_type = data_type.value_type
    return levels


def tensor_column(arrays: list[np.ndarray], arrow_type: pa.DataType) -> pa.Array:
    """Same-dtype arrays as a column of ``arrow_type``: each level a fixed-size list where the type fixes its
    size (one shape: [C][H][W]; one width: [tokens][dim]), else a list of each row's own size."""
    column = pa.array(np.concatenate([np.ascontiguousarray(array).ravel() for array in arrays]))
    levels = _list_levels(arrow_type)
    for depth in reversed(range(len(levels))):
        if levels[depth] is not None:
            column = pa.FixedSizeListArray.from_arrays(column, levels[depth])
            continue
        # a variable level d has one list per index of the first d dimensions of every row
        lengths = np.concatenate([np.full(int(np.prod(array.shape[:depth])), array.shape[depth]) for array in arrays])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), column)
    return column.cast(arrow_type)


def tensor_values(column: pa.Array | pa.ChunkedArray, shapes: list | None = None) -> np.ndarray | list[np.ndarray]:
    """A tensor column as numpy, without copying the values: one (rows, *shape) array when the type fixes the
    shape, else one array per row, shaped.

    Reads every encoding latentray has written: nested fixed-size lists, nested lists, Arrow's
    fixed-shape tensor type (outputs before issue 12), and flat lists whose shapes are given in
    ``shapes`` (the ``latent_shape`` column of older bucket outputs and of --save-latents manifests).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    levels = _list_levels(column.type)
    rows = len(column)
    if all(size is not None for size in levels):
        values = column
        for _ in levels:
            values = values.flatten()  # flatten() honours slicing; .values would not
        return values.to_numpy(zero_copy_only=False).reshape(rows, *levels)
    if shapes is not None and len(levels) == 1:
        return _split_rows(column.flatten().to_numpy(zero_copy_only=False), [tuple(shape) for shape in shapes])
    return _split_rows(*_nested_values_and_shapes(column, len(levels)))


def _nested_values_and_shapes(column: pa.Array, depth: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The innermost values of a nested list column and each row's shape (rows are rectangular)."""
    rows = len(column)
    first = np.arange(rows)  # at the current level: the index of each row's first list
    dimensions = []
    level = column
    for _ in range(depth):
        lengths = pc.list_value_length(level).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        inside = first < len(lengths)
        size = np.zeros(rows, np.int64)
        size[inside] = lengths[first[inside]]
        dimensions.append(size)
        first = np.concatenate([[0], np.cumsum(lengths)])[np.minimum(first, len(lengths))]
        level = level.flatten()
    shapes = [tuple(int(size[row]) for size in dimensions) for row in range(rows)]
    return level.to_numpy(zero_copy_only=False), shapes


def _split_rows(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    sizes = [int(np.prod(shape)) for shape in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return [flat[offsets[row]:offsets[row + 1]].reshape(shape) for row, shape in enumerate(shapes)]


def pairs_column(values, size: int) -> pa.Array:
    flat = np.asarray(values, dtype=np.int32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), size)


def latents_of(table: pa.Table | pa.RecordBatch, column: str = "latent") -> list[np.ndarray]:
    """Per-row tensors of a column of a ``latents/`` (or manifest) table, shaped, in their stored dtype."""
    values = table.column(column)
    shapes = table.column("latent_shape").to_pylist() if "latent_shape" in table.column_names and column.startswith("latent") else None
    return list(tensor_values(values, shapes))


# -- parts rewritten: older encodings, superseded copies (the ledger's tasks call these) -------------


def upgrade_part(output: RunOutput, uri: str) -> str:
    """Rewrite a ``latents/`` part written before issue 12 (Arrow fixed-shape tensors, flat bucket lists) in
    today's encoding; return the part's name now. Parts of one output must share column types to read
    as one table, so a rerun converts older parts before adding new ones."""
    if SHAPE_RUNS_METADATA_KEY in (io.parquet_schema(uri).metadata or {}):
        return uri  # written by this version
    new = _in_current_encoding(io.read_parquet_file(uri))
    output.commit(new, None, stats_of_latents(latents_of(new)))
    new_uri = io.join(output.results_uri, io.part_name(new.column("row").to_numpy(), new.column("id").to_pylist()))
    if new_uri != uri:
        io.remove_tree(uri)  # the rows' new order (or an older naming) named a new part
    return new_uri


def remove_rows(output: RunOutput, uri: str, indices: np.ndarray, is_results: bool) -> None:
    """Write the part's other rows as a new part (statistics recomputed), then delete the old part."""
    keep = np.ones(io.parquet_footer(uri).num_rows, bool)
    keep[indices] = False
    kept = io.read_parquet_file(uri).filter(pa.array(keep))
    if len(kept):
        if is_results:
            output.commit(with_shape_runs(kept), None, stats_of_latents(latents_of(kept)))
        else:
            write_errors_part(kept, output.errors_uri)
    io.remove_tree(uri)


def _in_current_encoding(table: pa.Table) -> pa.Table:
    """A latents/ table with every tensor column as nested lists and rows grouped by latent shape."""
    latents = latents_of(table)
    order = np.argsort(_shape_order([latent.shape for latent in latents]), kind="stable")
    fixed = len({latent.shape for latent in latents}) == 1
    fields, columns = [], []
    for field in table.schema:
        column = table.column(field.name)
        # caption embeddings at their own length were never stored otherwise: only their rows move
        if is_tensor_type(field.type) and not is_ragged_type(field.type):
            arrays = latents_of(table, field.name)
            dtype = str(arrays[0].dtype)
            shape = arrays[0].shape if fixed or not field.name.startswith("latent") else None
            field = pa.field(field.name, tensor_type(shape, dtype, dimensions=arrays[0].ndim))
            column = tensor_column([arrays[index] for index in order], field.type)
        else:
            column = column.take(pa.array(order))
        fields.append(field)
        columns.append(column)
    metadata = {key: value for key, value in (table.schema.metadata or {}).items() if key != b"ARROW:schema"}
    return with_shape_runs(pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=metadata)))
