"""A torch dataset over the ``latents/`` parts of `latentray encode` output, at any fsspec URI.

    dataset = LatentDataset("s3://bucket/latents-512")
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=4)
    for batch in loader:
        batch["latent"]          # (64, 4, 64, 64), as stored (float16 by default)
        batch["prompt_embeds"]   # (64, 77, 768) with --text-embeddings
        batch["original_size"], batch["crop_top_left"], batch["target_size"]  # (64, 2): SDXL micro-conditioning

Parts are streamed one record batch at a time and split between DataLoader workers
(and between ranks with ``rank``/``world_size``), so each row is read once per epoch.
With --buckets rows differ in shape: batch them per ``target_size`` (a bucket sampler);
the default collate only stacks rows of one shape.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipelines import io
from pipelines.latent_output import latents_of

TENSOR_COLUMNS = ("latent", "latent_flipped", "prompt_embeds")
SIZE_COLUMNS = ("original_size", "crop_top_left", "target_size")
TEXT_COLUMNS = ("id", "caption")
ROWS_PER_READ = 256


class LatentDataset(IterableDataset):
    def __init__(
        self, uri: str, *, columns: Sequence[str] | None = None, shuffle_parts: bool = False, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ):
        """``uri``: an encode output folder (its ``latents/`` is read) or a folder of parts.

        ``columns``: the subset to yield (default: every tensor, size and text column present).
        ``shuffle_parts``: visit parts in an order drawn from ``seed`` + the epoch (``set_epoch``).
        """
        folder = io.join(uri, "latents") if io.exists(io.join(uri, "latents")) else uri
        self.parts = io.list_parquet_files(folder)
        available = io.parquet_schema(self.parts[0]).names if self.parts else []
        wanted = [c for c in (*TENSOR_COLUMNS, *SIZE_COLUMNS, *TEXT_COLUMNS) if c in available]
        unknown = set(columns or ()) - set(wanted)
        if unknown:
            raise ValueError(f"columns: {', '.join(sorted(unknown))} not in the latent dataset (it has {', '.join(wanted)})")
        self.columns = list(columns) if columns else wanted
        self.shuffle_parts, self.seed, self.epoch = shuffle_parts, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_parts(self) -> list[str]:
        """The parts this rank and DataLoader worker read: every (rank, worker) a disjoint share."""
        parts = list(self.parts)
        if self.shuffle_parts:
            random.Random(self.seed + self.epoch).shuffle(parts)
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        shards, shard = self.world_size * workers, self.rank * workers + worker_id
        return parts[shard::shards]

    def __iter__(self) -> Iterator[dict]:
        read = list(self.columns)
        if "latent_shape" not in read and any(c in read for c in ("latent", "latent_flipped")):
            read.append("latent_shape")  # flat latents (buckets) need their shape
        for part in self.my_parts():
            for batch in io.iter_parquet_batches(part, read, ROWS_PER_READ):
                yield from rows_of(batch, self.columns)


def rows_of(batch, columns: Sequence[str]) -> Iterator[dict]:
    """A record batch of a latents part -> one dict per row: tensors, int64 size pairs, strings."""
    values: dict[str, list] = {}
    for column in columns:
        if column in TENSOR_COLUMNS:
            values[column] = [torch.from_numpy(np.array(array)) for array in latents_of(batch, column)]
        elif column in SIZE_COLUMNS:
            pairs = np.asarray(batch.column(column).flatten().to_numpy(zero_copy_only=False), np.int64).reshape(-1, 2)
            values[column] = list(torch.from_numpy(pairs))
        else:  # a null caption is the empty caption (as the caption encoder reads it), which collates
            values[column] = ["" if value is None else value for value in batch.column(column).to_pylist()]
    for index in range(batch.num_rows):
        yield {column: values[column][index] for column in columns}
