"""A torch training reader over the ``latents/`` parts of `latentray encode` output, at any fsspec URI.

    dataset = LatentDataset("s3://bucket/latents-512", batch_size=64, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=4)   # the dataset batches
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            batch["latent"]          # (64, 4, 64, 64), as stored (float16 by default); one shape per batch
            batch["prompt_embeds"]   # (64, 77, 768) with --text-embeddings; Z-Image, Qwen-Image: (64, longest, dim)
            batch["prompt_embeds_mask"]  # Z-Image, Qwen-Image only: (64, longest) bool, True at real tokens
            batch["original_size"], batch["crop_top_left"], batch["target_size"]  # (64, 2) int64: SDXL micro-conditioning
            batch["id"], batch["caption"]  # lists of strings

How it works (the design of MosaicML Streaming and LitData, on Parquet parts):

1. **A plan from footers.** The dataset reads each part's footer once (row count, row
   groups, and the latent shape of its rows, kept there as runs of rows of one shape) and
   never a row to plan. For an epoch it computes, in every rank and worker alike, the
   batches as arrays of row positions: parts in an order drawn from ``seed`` and the epoch,
   windows of consecutive parts of about ``shuffle_buffer`` rows, row groups of a window in
   random order, and per latent shape the batches that the window's rows fill (bucket
   batching: a batch holds one shape; rows left over join the next window, so the bucket mix
   follows the data; the shapes' batches are interleaved at random).
2. **Whole batches, round-robin.** Batch ``j`` goes to rank ``j % world_size``; a rank's
   batches go to its DataLoader workers in turn, which is the order a DataLoader returns
   them in. Each reader process fills its batches from a contiguous share of the window's
   row groups, shuffled within the share, so every row group is read by one process. Every
   rank gets the same number of batches, whatever the number of workers: with ``drop_last``
   the last partial batch of each shape and the last ``< world_size`` batches are left out
   (no row seen twice); without it partial batches are filled, and the plan padded to a
   multiple of ``world_size``, by repeating rows and batches from the epoch's start, as
   ``DistributedSampler`` does (every row seen).
3. **State is (epoch, batches yielded).** Resuming computes the plan again and starts at
   batch ``k``: skipped batches are never read. torchdata's ``StatefulDataLoader`` saves and
   restores it per worker; resume with the same number of workers.
4. **Reads**: a reader fetches only the row groups that hold its rows, only the columns asked
   for, ``prefetch`` parts ahead in background threads; it holds the rows of its batches in
   the current window, so memory follows ``shuffle_buffer`` and ``prefetch``, not the dataset
   size (the plan itself is 8 bytes per row). In DataLoader workers each batch is built in
   shared memory, so passing it to the training process copies nothing.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipelines.encoding.latent_output import shape_runs, tensor_values
from pipelines.runtime import io
from pipelines.runtime.schemas import LENGTH_SUFFIX, MASK_SUFFIX, SHAPE_RUNS_METADATA_KEY, is_ragged_type, is_tensor_type

SIZE_COLUMNS = ("original_size", "crop_top_left", "target_size")
TEXT_COLUMNS = ("id", "caption")
FOOTER_READ_THREADS = 16  # footers are small reads: many at once hide object-store latency
STATE_FIELDS = ("epoch", "batches_yielded", "seed", "batch_size", "shuffle", "drop_last", "rank", "world_size", "readers")


@dataclass(frozen=True)
class PartFooter:
    """What the plan knows of a part, from its Parquet footer."""

    uri: str
    first_row: int  # the position of its first row in the dataset (parts in sorted order)
    rows: int
    row_group_ends: tuple[int, ...]  # cumulative row counts of its row groups
    runs: tuple[tuple[tuple[int, ...], int, int], ...]  # (latent shape, first row in the part, rows)


def read_footers(uris: Sequence[str]) -> list[PartFooter]:
    """The footers of every part, read concurrently; positions follow the (sorted) order of ``uris``."""
    with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
        footers = list(pool.map(io.parquet_footer, uris))
    parts, position = [], 0
    for uri, footer in zip(uris, footers):
        group_rows = [footer.row_group(group).num_rows for group in range(footer.num_row_groups)]
        runs = _shape_runs_of(uri, footer)
        parts.append(PartFooter(uri, position, footer.num_rows, tuple(np.cumsum(group_rows, dtype=np.int64).tolist()), runs))
        position += footer.num_rows
    return parts


def _shape_runs_of(uri: str, footer) -> tuple:
    """Runs of rows of one latent shape: from the footer (written since issue 12), from a fixed-shape
    column type, or, for older bucket outputs only, from the small ``latent_shape`` column."""
    metadata = footer.metadata or {}
    if SHAPE_RUNS_METADATA_KEY in metadata:
        return tuple((tuple(shape), start, count) for shape, start, count in json.loads(metadata[SHAPE_RUNS_METADATA_KEY]))
    latent_type = footer.schema.to_arrow_schema().field("latent").type
    fixed = _fixed_shape(latent_type)
    if fixed is not None:
        return ((fixed, 0, footer.num_rows),) if footer.num_rows else ()
    shapes = [tuple(shape) for shape in io.read_parquet_file(uri, ["latent_shape"]).column("latent_shape").to_pylist()]
    return tuple((tuple(shape), start, count) for shape, start, count in shape_runs(shapes))


def _fixed_shape(data_type: pa.DataType) -> tuple[int, ...] | None:
    if isinstance(data_type, pa.FixedShapeTensorType):
        return tuple(data_type.shape)
    shape = []
    while pa.types.is_fixed_size_list(data_type):
        shape.append(data_type.list_size)
        data_type = data_type.value_type
    return tuple(shape) if shape and not pa.types.is_nested(data_type) else None


# -- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    batch_size: int
    shuffle_rows: bool
    shuffle_parts: bool
    seed: int
    shuffle_buffer: int
    drop_last: bool
    world_size: int


def plan_epoch(parts: Sequence[PartFooter], options: PlanOptions, epoch: int, readers: int = 1) -> np.ndarray:
    """Every batch of an epoch, for every rank: int64 (batches, batch_size) row positions.

    The number of batches is a multiple of ``world_size`` and does not depend on ``readers``
    (reader processes per rank: DataLoader workers, else 1); each batch holds one latent shape.
    Batch ``j`` is read by rank ``j % world_size``, reader ``(j // world_size) % readers``; the
    rows of a window go to its readers in runs of whole row groups (shuffled within each
    reader's share), so each row group is read by one process.
    """
    size, consumers = options.batch_size, options.world_size * readers
    generator = np.random.default_rng([options.seed, epoch])
    order = generator.permutation(len(parts)) if options.shuffle_parts or options.shuffle_rows else np.arange(len(parts))
    batches: list[np.ndarray] = []
    batch_shapes: list[tuple[int, ...]] = []
    carry: dict[tuple[int, ...], np.ndarray] = {}  # rows of a shape that did not fill a batch yet
    for window in _windows([parts[index] for index in order], options.shuffle_buffer):
        arriving = _positions_by_shape(window, generator if options.shuffle_rows else None)
        pools, shapes = {}, []  # per shape: the rows that fill batches in this window; a shape per batch
        for shape in sorted(set(arriving) | set(carry)):
            pool = np.concatenate([carry.get(shape, np.empty(0, np.int64)), arriving.get(shape, np.empty(0, np.int64))])
            full = len(pool) // size
            pools[shape], carry[shape] = pool[:full * size], pool[full * size:]
            shapes += [shape] * full
        if options.shuffle_rows:  # interleave the shapes' batches: the bucket mix follows the data
            shapes = [shapes[index] for index in generator.permutation(len(shapes))]
        first = len(batches)
        owners = [((first + slot) % options.world_size) * readers + ((first + slot) // options.world_size) % readers
                  for slot in range(len(shapes))]
        batches += _fill_slots(pools, shapes, owners, consumers, size, generator if options.shuffle_rows else None)
        batch_shapes += shapes
    if not options.drop_last:
        for shape in sorted(shape for shape, rows in carry.items() if len(rows)):
            earlier = [batch for batch, batch_shape in zip(batches, batch_shapes) if batch_shape == shape]
            rows_of_shape = np.concatenate([*earlier, carry[shape]])
            batches.append(np.concatenate([carry[shape], np.resize(rows_of_shape, size - len(carry[shape]))]))
    return _equal_per_rank(batches, size, options)


def _fill_slots(pools: dict, shapes: list, owners: list[int], consumers: int, size: int, generator) -> list[np.ndarray]:
    """A window's batches: each reader gets a contiguous share of each shape's rows (whole row groups, in
    the window's row-group order), shuffled within the share, cut into its batches in slot order."""
    needed = {}  # (consumer, shape) -> batches
    for shape, owner in zip(shapes, owners):
        needed[owner, shape] = needed.get((owner, shape), 0) + 1
    shares = {}
    for shape, pool in pools.items():
        start = 0
        for consumer in range(consumers):
            rows = pool[start:start + needed.get((consumer, shape), 0) * size]
            start += len(rows)
            shares[consumer, shape] = list((generator.permutation(rows) if generator is not None else rows).reshape(-1, size))
    return [shares[owner, shape].pop(0) for shape, owner in zip(shapes, owners)]


def _equal_per_rank(batches: list[np.ndarray], size: int, options: PlanOptions) -> np.ndarray:
    count = len(batches)
    if options.drop_last:
        batches = batches[:count - count % options.world_size]
    elif count % options.world_size:
        batches = batches + [batches[index % count] for index in range(options.world_size - count % options.world_size)]
    return np.stack(batches).astype(np.int64) if batches else np.empty((0, size), np.int64)


def _windows(parts: list[PartFooter], shuffle_buffer: int) -> Iterator[list[PartFooter]]:
    """Consecutive parts whose rows are shuffled together: at least one part, else up to ``shuffle_buffer`` rows."""
    window, rows = [], 0
    for part in parts:
        if window and rows + part.rows > shuffle_buffer:
            yield window
            window, rows = [], 0
        window.append(part)
        rows += part.rows
    if window:
        yield window


def _positions_by_shape(window: list[PartFooter], generator) -> dict[tuple[int, ...], np.ndarray]:
    """Row positions of a window per latent shape, row group after row group (row groups in a random order
    when shuffling): the unit a reader fetches."""
    groups = [(part, start, end) for part in window for start, end in zip((0, *part.row_group_ends[:-1]), part.row_group_ends)]
    if generator is not None:
        groups = [groups[index] for index in generator.permutation(len(groups))]
    found: dict[tuple[int, ...], list[np.ndarray]] = {}
    for part, group_start, group_end in groups:
        for shape, start, count in part.runs:
            low, high = max(group_start, start), min(group_end, start + count)
            if low < high:
                found.setdefault(shape, []).append(np.arange(part.first_row + low, part.first_row + high, dtype=np.int64))
    return {shape: np.concatenate(rows) for shape, rows in found.items()}


# -- the dataset ----------------------------------------------------------------------------------


class LatentDataset(IterableDataset):
    """Batches of a latent dataset for torch training (see the module doc for the plan, ranks and resume).

    A batch is a dict: tensor columns as torch tensors in their stored dtype, (batch, *shape),
    with one latent shape per batch (``latent``, ``latent_flipped``: (B, C, H, W)); the size
    columns as (B, 2) int64; ``id`` and ``caption`` as lists of strings ("" for a null caption).

    Caption embeddings of families that give each caption its own number of tokens (Z-Image,
    Qwen-Image: ``ModelFamily.fixed_length_embeddings`` False; stored unpadded, each row's
    tokens in ``<name>_length``) come padded to the batch's longest row, with a mask:

        batch["prompt_embeds"]       # (B, longest in the batch, dim), zeros after each row's tokens
        batch["prompt_embeds_mask"]  # (B, longest in the batch) bool, True at real tokens

    as diffusers' Qwen-Image pipeline takes them (``prompt_embeds``, ``prompt_embeds_mask``);
    Z-Image's transformer takes a list of unpadded rows: ``[e[m] for e, m in zip(embeds, mask)]``.
    Fixed-length embeddings (SD, SDXL, SD3, FLUX) come stacked as they are, with no mask.
    Without ``batch_size`` a row comes alone, at its own length (its mask all True).
    """

    def __init__(
        self, uri: str, *, columns: Sequence[str] | None = None, batch_size: int | None = None, shuffle: bool = False,
        shuffle_parts: bool = False, seed: int = 0, shuffle_buffer: int = 4096, drop_last: bool = False,
        rank: int | None = None, world_size: int | None = None, prefetch: int = 2,
    ):
        """``uri``: an encode output folder (its ``latents/`` is read) or a folder of parts.

        ``columns``: the subset to yield (default: every tensor column, the size columns, ``id``
        and ``caption``). ``batch_size``: rows per batch (stacked tensors, lists of strings);
        None yields single rows, for a DataLoader that batches them (fixed-size latents and
        embeddings only).
        ``shuffle``: rows in an order drawn from ``seed`` and the epoch, within windows of about
        ``shuffle_buffer`` rows of consecutive parts (whole parts; ``shuffle_parts`` alone shuffles
        only the order of parts). ``drop_last``: see the module doc. ``rank``/``world_size``:
        default from ``torch.distributed`` when it is initialised, else 0 and 1. ``prefetch``:
        parts read ahead in background threads (0: read when needed).
        """
        rank, world_size = _distributed_defaults(rank, world_size)
        _check_options(batch_size=batch_size, shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size, prefetch=prefetch, seed=seed)
        folder = io.join(uri, "latents") if io.exists(io.join(uri, "latents")) else uri
        self.parts = read_footers(io.list_parquet_files(folder))
        self.schema = io.parquet_schema(self.parts[0].uri)
        self.columns = _choose_columns(self.schema, columns)
        self.batch_size, self.shuffle, self.shuffle_parts, self.seed = batch_size, shuffle, shuffle_parts, seed
        self.shuffle_buffer, self.drop_last, self.rank, self.world_size, self.prefetch = shuffle_buffer, drop_last, rank, world_size, prefetch
        self.epoch = 0
        self._batches_yielded = 0  # by this process's iteration of the current epoch
        self._readers = 1  # reader processes of the rank when the state was taken (DataLoader workers, else 1)
        self._resume_from: dict | None = None
        self._plan: tuple[int, int, np.ndarray] | None = None  # (epoch, readers, plan) of the last epoch planned

    @property
    def options(self) -> PlanOptions:
        return PlanOptions(
            batch_size=self.batch_size or 1, shuffle_rows=self.shuffle, shuffle_parts=self.shuffle_parts, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, drop_last=self.drop_last, world_size=self.world_size,
        )

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` next (another order when shuffling). A state loaded for this epoch still resumes."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: must be an integer >= 0, got {epoch!r}")
        if self._resume_from is not None and self._resume_from["epoch"] != epoch:
            self._resume_from = None
        self.epoch = epoch
        self._batches_yielded = 0

    def plan(self, readers: int = 1) -> np.ndarray:
        """This epoch's batches for every rank, with ``readers`` processes per rank: int64 (batches, batch_size) row positions."""
        if self._plan is None or self._plan[:2] != (self.epoch, readers):
            self._plan = (self.epoch, readers, plan_epoch(self.parts, self.options, self.epoch, readers))
        return self._plan[2]

    def __len__(self) -> int:
        """Batches (rows without ``batch_size``) this rank yields per epoch."""
        return len(self.plan()) // self.world_size

    def state_dict(self) -> dict[str, Any]:
        """Where this reader stands: JSON-able, small; save it beside the model checkpoint."""
        return {
            "epoch": self.epoch, "batches_yielded": self._batches_yielded, "seed": self.seed, "batch_size": self.batch_size,
            "shuffle": self.shuffle, "drop_last": self.drop_last, "rank": self.rank, "world_size": self.world_size,
            "readers": self._readers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batch is the one the saved run would have yielded next."""
        missing = [name for name in STATE_FIELDS if name not in state]
        if missing:
            raise ValueError(f"state: missing {', '.join(missing)} (not a LatentDataset state?)")
        for name in ("seed", "batch_size", "shuffle", "drop_last", "rank", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(f"state: saved with {name}={state[name]!r}, this dataset has {name}={getattr(self, name)!r}")
        self.epoch = int(state["epoch"])
        self._batches_yielded = int(state["batches_yielded"])
        self._readers = int(state["readers"])
        self._resume_from = dict(state)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        readers, reader = (worker.num_workers, worker.id) if worker else (1, 0)
        start = self._take_resume_offset(readers)
        self._readers, self._batches_yielded = readers, start
        rank_batches = self.plan(readers)[self.rank::self.world_size]
        mine = rank_batches[reader::readers][start:]
        rows = RowReader(self.parts, self.columns, self.schema, mine, self.prefetch)
        try:
            for positions in mine:
                batch = rows.batch(positions)
                self._batches_yielded += 1  # before yielding: a state taken after this batch includes it
                yield batch if self.batch_size else {name: values[0] for name, values in batch.items()}
        finally:
            rows.close()

    def _take_resume_offset(self, readers: int) -> int:
        """Batches of this epoch to skip: those a loaded state had yielded (once), else none."""
        state, self._resume_from = self._resume_from, None
        if state is None or state["epoch"] != self.epoch:
            return 0
        if state["readers"] != readers:
            raise ValueError(
                f"state: taken with {state['readers']} reader process(es) per rank, resumed with {readers}; resume with the "
                "same DataLoader num_workers (torchdata's StatefulDataLoader saves and restores each worker's state)"
            )
        return int(state["batches_yielded"])


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    return rank, world_size


def _check_options(*, batch_size: int | None, shuffle_buffer: int, rank: int, world_size: int, prefetch: int, seed: int) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: must be an integer >= 1 or None, got {batch_size!r}")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer: must be an integer >= 1, got {shuffle_buffer!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be an integer in [0, world_size={world_size}), got {rank!r}")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch: must be an integer >= 0, got {prefetch!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")


def _choose_columns(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    """The requested columns, or by default every tensor column (found from the schema) plus sizes, id and caption."""
    tensors = [field.name for field in schema if is_tensor_type(field.type)]
    default = tensors + [name for name in (*SIZE_COLUMNS, *TEXT_COLUMNS) if name in schema.names]
    if columns is None:
        return default
    unknown = [name for name in columns if name not in schema.names]
    if unknown:
        raise ValueError(f"columns: {', '.join(unknown)} not in the latent dataset (it has {', '.join(schema.names)})")
    if not columns:
        raise ValueError("columns: asks for no column")
    return list(columns)


# -- reading a worker's rows ----------------------------------------------------------------------


class RowReader:
    """The rows of a sequence of batches: each part's needed row groups read once, in the order the
    batches first need them, ``prefetch`` parts ahead; rows dropped once their last batch is built."""

    def __init__(self, parts: Sequence[PartFooter], columns: list[str], schema: pa.Schema, batches: np.ndarray, prefetch: int):
        self.parts, self.columns, self.schema = parts, columns, schema
        self.kinds = {name: column_kind(schema.field(name).type) for name in columns}
        self.first_rows = np.array([part.first_row for part in parts], np.int64)
        needed = batches.reshape(-1)
        part_of = np.searchsorted(self.first_rows, needed, side="right") - 1
        _, first_use = np.unique(part_of, return_index=True)
        self.schedule = [int(part_of[index]) for index in np.sort(first_use)]  # parts in the order batches need them
        self.rows_of = {part: np.unique(needed[part_of == part]) for part in self.schedule}
        self.uses_left = {part: int((part_of == part).sum()) for part in self.schedule}
        self.loaded: dict[int, dict] = {}
        self.next_read = 0
        self.pool = ThreadPoolExecutor(max(1, prefetch)) if prefetch else None
        self.pending: dict[int, Future] = {}
        self.prefetch = prefetch

    def batch(self, positions: np.ndarray) -> dict[str, Any]:
        part_of = np.searchsorted(self.first_rows, positions, side="right") - 1
        while not all(int(part) in self.loaded for part in np.unique(part_of)):
            self._load_next()
        pieces = []  # per part: (the batch slots its rows fill, its values, the rows' indices in them)
        for part in np.unique(part_of):
            chunk = self.loaded[int(part)]
            in_batch = np.flatnonzero(part_of == part)
            pieces.append((in_batch, chunk["values"], np.searchsorted(chunk["positions"], positions[in_batch])))
            self.uses_left[int(part)] -= len(in_batch)
            if not self.uses_left[int(part)]:
                del self.loaded[int(part)]
        return _assemble(pieces, self.kinds, len(positions), shared=get_worker_info() is not None)

    def _load_next(self) -> None:
        for ahead in range(self.next_read, min(len(self.schedule), self.next_read + 1 + self.prefetch)):
            if self.pool is not None and self.schedule[ahead] not in self.pending:
                self.pending[self.schedule[ahead]] = self.pool.submit(self._read, self.schedule[ahead])
        part = self.schedule[self.next_read]
        self.loaded[part] = self.pending.pop(part).result() if part in self.pending else self._read(part)
        self.next_read += 1

    def _read(self, index: int) -> dict:
        """The needed rows of one part: only the row groups that hold them, only the wanted columns."""
        part = self.parts[index]
        positions = self.rows_of[index]
        # in DataLoader workers the workers are the parallelism: more threads would only contend
        table, in_table = io.read_parquet_rows(part.uri, positions - part.first_row, self._read_columns(), part.row_group_ends,
                                               use_threads=get_worker_info() is None)
        shapes = table.column("latent_shape").to_pylist() if "latent_shape" in table.column_names else None
        values = {name: _column_values(table.column(name), self.schema.field(name).type, name, shapes) for name in self.columns}
        if len(in_table) < table.num_rows:  # keep only the needed rows, not every row of a group read for a few
            values = {name: column[in_table] for name, column in values.items()}
        return {"positions": positions, "values": values}

    def _read_columns(self) -> list[str]:
        flat_latents = any(  # latents stored flat (older bucket outputs) need their shapes
            name.startswith("latent") and pa.types.is_list(self.schema.field(name).type)
            and not pa.types.is_nested(self.schema.field(name).type.value_type) for name in self.columns
        )
        return list(self.columns) + (["latent_shape"] if flat_latents and "latent_shape" not in self.columns else [])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _column_values(column: pa.ChunkedArray, data_type: pa.DataType, name: str, shapes: list | None):
    """Arrow -> numpy: tensors shaped (an (n, *shape) array, or an object array of per-row arrays),
    integers as int64, strings with null as "" (a missing caption is the empty caption)."""
    if is_tensor_type(data_type) or pa.types.is_fixed_size_list(data_type):
        values = tensor_values(column, shapes if name.startswith("latent") else None)
        if isinstance(values, np.ndarray):
            return values.astype(np.int64) if np.issubdtype(values.dtype, np.integer) else values
        holder = np.empty(len(values), dtype=object)
        for index, value in enumerate(values):  # one by one: numpy would broadcast equal shapes into one array
            holder[index] = value
        return holder
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return np.array(["" if value is None else value for value in column.to_pylist()], dtype=object)
    values = column.to_numpy()
    return values.astype(np.int64) if np.issubdtype(values.dtype, np.integer) else values


def column_kind(data_type: pa.DataType) -> str:
    """How a column batches: "text" (a list of strings), "padded" (rows of their own length, padded to the
    batch's longest with a mask: caption embeddings of Z-Image, Qwen-Image), "rows" (per-row arrays of any
    shape, stacked per batch: bucket latents), "array" (one numpy array for all rows, sliced per batch)."""
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "text"
    if is_ragged_type(data_type):
        return "padded"
    if (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)) and not isinstance(data_type, pa.FixedShapeTensorType):
        return "rows"
    return "array"


def _assemble(pieces: list[tuple[np.ndarray, dict, np.ndarray]], kinds: dict[str, str], size: int, shared: bool) -> dict[str, Any]:
    """One batch, rows in the plan's order: tensors stacked, strings as lists.

    Each tensor is filled in place by one gather per part. In a DataLoader worker it is made in
    shared memory first, so handing it to the training process copies nothing more.
    """
    batch = {}
    for name, kind in kinds.items():
        if kind == "text":
            batch[name] = _in_slots(pieces, name, size)
            continue
        if kind == "padded":
            batch[name], batch[name + MASK_SUFFIX] = _padded(_in_slots(pieces, name, size), shared)
            continue
        _, values, local = pieces[0]
        sample = np.asarray(values[name][local[0]])  # a row: shape and dtype of the batch's rows
        tensor = _new_tensor((size, *sample.shape), sample.dtype, shared)
        target = tensor.numpy()
        for in_batch, values, local in pieces:
            if kind == "rows":  # per-row arrays (bucket latents): one shape within a batch
                for slot, index in zip(in_batch, local):
                    target[slot] = values[name][index]
            else:
                target[in_batch] = values[name][local]
        batch[name] = tensor
    return batch


def _in_slots(pieces: list[tuple[np.ndarray, dict, np.ndarray]], name: str, size: int) -> list:
    """A column's values of one batch as a list, rows in the plan's order."""
    rows: list = [None] * size
    for in_batch, values, local in pieces:
        for slot, value in zip(in_batch, values[name][local]):
            rows[slot] = value
    return rows


def _padded(rows: list[np.ndarray], shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of their own length as one (rows, longest, *inner) tensor, zeros after each row's end, and the
    (rows, longest) mask, True at real tokens: the shape a batched attention takes."""
    longest = max(len(row) for row in rows)
    tensor = _new_tensor((len(rows), longest, *rows[0].shape[1:]), rows[0].dtype, shared).zero_()
    mask = _new_tensor((len(rows), longest), np.dtype(bool), shared).zero_()
    target, real = tensor.numpy(), mask.numpy()
    for slot, row in enumerate(rows):
        target[slot, :len(row)] = row
        real[slot, :len(row)] = True
    return tensor, mask


def _new_tensor(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor of a numpy dtype; in a DataLoader worker in shared memory, so handing
    the batch to the training process copies nothing more."""
    tensor = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
    return tensor.share_memory_() if shared else tensor


# -- other readers --------------------------------------------------------------------------------


def collate_nested_arrays(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """``collate_fn`` for Ray Data's ``iter_torch_batches`` over latent shards (one shape per batch):

        ray.data.read_parquet(".../latents").iter_torch_batches(batch_size=64, collate_fn=collate_nested_arrays)

    Ray Data turns nested list columns into numpy arrays of arrays (it makes n-dimensional arrays
    only of its own or Arrow's tensor extension types, which Hugging Face datasets refuses);
    this stacks them into (rows, C, H, W) tensors and leaves strings as lists.

    Caption embeddings of their own length (Z-Image, Qwen-Image): read ``<name>_length`` too, and
    ``<name>`` comes padded to the batch's longest row with ``<name>_mask`` True at real tokens, as
    ``LatentDataset`` batches it (the length column says which columns to pad, in every batch alike).
    """
    collated = {}
    for name, values in batch.items():
        if values.dtype == object and len(values) and isinstance(values[0], str):
            collated[name] = values.tolist()
        elif name + LENGTH_SUFFIX in batch:
            collated[name], collated[name + MASK_SUFFIX] = _padded([_stack_nested(np.asarray(value)) for value in values], shared=False)
        else:
            collated[name] = torch.from_numpy(_stack_nested(values, name))
    return collated


def _stack_nested(values: np.ndarray, name: str | None = None) -> np.ndarray:
    if values.dtype != object:
        return values
    rows = [_stack_nested(np.asarray(value)) for value in values]
    if name is not None and len({row.shape for row in rows}) > 1:
        hint = f"; to pad them with a mask, read {name}{LENGTH_SUFFIX} too" if len({row.shape[1:] for row in rows}) == 1 else ""
        raise ValueError(f"{name}: rows of shapes {sorted({row.shape for row in rows})} in one batch{hint}")
    return np.stack(rows)
