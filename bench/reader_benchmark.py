"""Samples per second of latentray's training reader against a plain scan and Hugging Face datasets.

    python bench/reader_benchmark.py                      # 4096 rows, local and through a local S3 server (moto)
    python bench/reader_benchmark.py --rows 8192 --json reader.json

The dataset is written by latentray's own commit task (the ``latents/`` parts `latentray encode`
writes): float16 latents [4, S, S] and caption embeddings [77, W], in parts of --rows-per-part rows.
Every variant yields batches of --batch-size rows as torch tensors (latent, prompt_embeds,
target_size) plus the ids as a list of strings, and touches every tensor it gets:

  (a) plain scan   pyarrow ``iter_batches`` over the parts in order, nested lists viewed as tensors
                   without copying; one process, no shuffle: the floor of reading these files.
  (b) LatentDataset  batch_size, shuffle (seed 0), 2 DataLoader workers (``batch_size=None``).
  (c) HF iter      ``datasets.load_dataset("parquet").with_format("torch").iter(batch_size)``:
                   sequential, no shuffle (its fastest path); after its one-off conversion to an
                   Arrow cache (``prepare`` seconds, not counted in samples/s).
  (d) HF loader    the same dataset in ``DataLoader(batch_size, shuffle=True, num_workers=2)``,
                   as most training scripts use it.

Each variant runs --repeats times, the variants taking turns; the fastest run counts (shared machines
vary up to 1.5x).
It asserts nothing; speed is never checked by tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

import common

COLUMNS = ["id", "latent", "prompt_embeds", "target_size"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    rows: int
    rows_per_part: int
    latent_size: int
    embedding_width: int
    batch_size: int
    workers: int
    repeats: int
    s3: bool
    hf_loader: bool


# -- the dataset ----------------------------------------------------------------------------------


def write_dataset(settings: Settings, uri: str) -> int:
    """A latents/ output written by latentray's commit task; returns its size in bytes."""
    from pipelines.encoding.latent_output import LatentLayout, commit_latents
    from pipelines.runtime import io
    from pipelines.runtime.outputs import RunOutput

    output = RunOutput(uri, "latents")
    layout = LatentLayout(dtype="float16", fixed_shape=True, flip=False, caption=True, text_embeddings=True)
    generator = np.random.default_rng(0)
    size = settings.latent_size
    for first in range(0, settings.rows, settings.rows_per_part):
        rows = min(settings.rows_per_part, settings.rows - first)
        ids = [f"{index:08d}" for index in range(first, first + rows)]
        commit_latents({
            "id": np.array(ids, dtype=object), "row": np.arange(first, first + rows), "seed": np.arange(rows),
            "source": np.array(["s"] * rows, dtype=object), "content_hash": np.array(["h"] * rows, dtype=object),
            "cache_key": np.array(ids, dtype=object), "original_size": np.full((rows, 2), size * 8),
            "crop_top_left": np.zeros((rows, 2)), "target_size": np.full((rows, 2), size * 8),
            "latent": generator.standard_normal((rows, 4, size, size), np.float32),
            "caption": np.array([f"caption {row_id}" for row_id in ids], dtype=object),
            "prompt_embeds": generator.standard_normal((rows, 77, settings.embedding_width), np.float32),
            "caption_truncated": np.zeros(rows, bool),
        }, output=output, layout=layout, run=1)
    fs, path = io.filesystem(io.join(uri, "latents"))
    return int(sum(fs.du(path, total=False).values()))


def copy_to_s3(local: str, remote: str) -> None:
    from pipelines.runtime import io

    for part in io.list_parquet_files(io.join(local, "latents")):
        io.write_bytes(io.join(remote, "latents", os.path.basename(part)), io.read_bytes(part))


def start_s3_server() -> Callable[[], None]:
    """moto's S3 server on 127.0.0.1 (as tests/conftest.py); the standard AWS variables point every client at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import boto3

    boto3.client("s3").create_bucket(Bucket="reader-benchmark")
    return server.stop


# -- the variants ---------------------------------------------------------------------------------


def nested_tensor(column):
    """A nested fixed-size list column as a (rows, *shape) tensor, without copying (what pyarrow offers)."""
    import pyarrow as pa
    import torch

    shape = []
    while pa.types.is_fixed_size_list(column.type):
        shape.append(column.type.list_size)
        column = column.flatten()
    return torch.from_numpy(column.to_numpy(zero_copy_only=False).reshape(-1, *shape))


def plain_scan(uri: str, settings: Settings) -> Iterator[dict]:
    import pyarrow.parquet as pq

    from pipelines.runtime import io

    for part in io.list_parquet_files(io.join(uri, "latents")):
        fs, path = io.filesystem(part)
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(settings.batch_size, columns=COLUMNS):
                yield {"id": batch.column("id").to_pylist(), **{name: nested_tensor(batch.column(name)) for name in COLUMNS[1:]}}


def latent_dataset(uri: str, settings: Settings) -> Iterator[dict]:
    import torch

    from pipelines import LatentDataset

    dataset = LatentDataset(uri, columns=COLUMNS, batch_size=settings.batch_size, shuffle=True, seed=0)
    yield from torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=settings.workers)


def hugging_face(uri: str, cache: str):
    import datasets

    from pipelines.runtime import io

    datasets.disable_progress_bars()
    files = io.list_parquet_files(io.join(uri, "latents"))
    hub = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    return hub.with_format("torch", columns=COLUMNS)


def hugging_face_iter(hub, settings: Settings) -> Iterator[dict]:
    yield from hub.iter(batch_size=settings.batch_size)


def hugging_face_loader(hub, settings: Settings) -> Iterator[dict]:
    import torch

    yield from torch.utils.data.DataLoader(hub, batch_size=settings.batch_size, shuffle=True, num_workers=settings.workers,
                                           generator=torch.Generator().manual_seed(0))


def consume(batches: Iterator[dict]) -> tuple[int, float]:
    """Rows seen, and a checksum that makes every variant touch every tensor it gets."""
    rows, total = 0, 0.0
    for batch in batches:
        rows += len(batch["id"])
        total += float(batch["latent"][:, 0, 0, 0].float().sum()) + float(batch["prompt_embeds"][:, 0, 0].float().sum())
    return rows, total


@dataclass(kw_only=True)
class Result:
    key: str
    where: str
    seconds: float
    rows: int
    peak_mib: float
    prepare_seconds: float | None = None

    @property
    def samples_per_second(self) -> float:
        return self.rows / self.seconds


def measure(key: str, where: str, run: Callable[[], Iterator[dict]], settings: Settings, prepare_seconds: float | None = None) -> Result:
    common.release_freed_memory()
    processes = lambda: [os.getpid(), *common.descendant_pids(os.getpid())]  # noqa: E731 (DataLoader workers are children)
    with common.PeakMemorySampler(processes, 0.05, "RSS of this process and its DataLoader workers") as sampler:
        started = time.perf_counter()
        rows, _ = consume(run())
        seconds = time.perf_counter() - started
    if rows < settings.rows:  # LatentDataset may pad its last batch by repeating rows (drop_last=False)
        raise RuntimeError(f"{key} ({where}) yielded {rows} rows of {settings.rows}")
    return Result(key=key, where=where, seconds=seconds, rows=rows, peak_mib=sampler.usage().peak_resident / common.MEBIBYTE,
                  prepare_seconds=prepare_seconds)


def run_benchmark(settings: Settings, json_path: str | None) -> dict:
    import torch

    torch.set_num_threads(1)  # reading is what is measured; the workers are the parallelism
    work = tempfile.mkdtemp(prefix="reader-benchmark-")
    stop_server = start_s3_server() if settings.s3 else None
    try:
        local = os.path.join(work, "dataset")
        size = write_dataset(settings, local)
        places = {"local": local}
        if settings.s3:
            places["s3"] = "s3://reader-benchmark/dataset"
            copy_to_s3(local, places["s3"])
        print(f"{settings.rows} rows in parts of {settings.rows_per_part}, {size / common.MEBIBYTE:.0f} MiB "
              f"(latent [4, {settings.latent_size}, {settings.latent_size}], prompt_embeds [77, {settings.embedding_width}], float16)", flush=True)
        variants = []
        for where, uri in places.items():
            started = time.perf_counter()
            hub = hugging_face(uri, os.path.join(work, f"hf-{where}"))
            prepare = time.perf_counter() - started
            variants += [
                ("(a) plain scan", where, lambda uri=uri: plain_scan(uri, settings), None),
                ("(b) LatentDataset", where, lambda uri=uri: latent_dataset(uri, settings), None),
                ("(c) HF iter", where, lambda hub=hub: hugging_face_iter(hub, settings), prepare),
            ] + ([("(d) HF loader", where, lambda hub=hub: hugging_face_loader(hub, settings), prepare)] if settings.hf_loader else [])
        # variants take turns, so a busy moment on a shared machine hits them all alike; the fastest run counts
        best: dict[tuple[str, str], Result] = {}
        for repeat in range(settings.repeats):
            for key, where, run, prepare in variants:
                result = measure(key, where, run, settings, prepare)
                if (key, where) not in best or result.seconds < best[key, where].seconds:
                    best[key, where] = result
                print(f"  run {repeat + 1}: {key:<18} {where:<5} {result.samples_per_second:10,.0f} samples/s", flush=True)
        results = list(best.values())
    finally:
        if stop_server is not None:
            stop_server()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(results))
    report = {"settings": settings.__dict__, "dataset_bytes": size, "load_average": os.getloadavg(),
              "results": [{**result.__dict__, "samples_per_second": result.samples_per_second} for result in results],
              "machine": common.machine_dictionary()}
    common.write_json(report, json_path)
    return report


def format_table(results: list[Result]) -> str:
    scans = {result.where: result for result in results if result.key.startswith("(a)")}
    rows = [(result.key, result.where, f"{result.samples_per_second:,.0f}",
             f"{result.samples_per_second / scans[result.where].samples_per_second:.2f}x", f"{result.peak_mib:,.0f}",
             "-" if result.prepare_seconds is None else f"{result.prepare_seconds:.1f}") for result in results]
    return common.format_columns(("variant", "where", "samples/s", "vs (a)", "peak MiB", "prepare s"), rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=common.positive_integer, default=4096)
    parser.add_argument("--rows-per-part", type=common.positive_integer, default=512)
    parser.add_argument("--latent-size", type=common.positive_integer, default=32, help="latent side (32: 256 px images)")
    parser.add_argument("--embedding-width", type=common.positive_integer, default=768, help="prompt_embeds width (768: SD 1.x)")
    parser.add_argument("--batch-size", type=common.positive_integer, default=64)
    parser.add_argument("--workers", type=common.positive_integer, default=2, help="DataLoader workers of (b) and (d)")
    parser.add_argument("--repeats", type=common.positive_integer, default=5, help="runs per variant; the fastest counts")
    parser.add_argument("--no-s3", action="store_true", help="local files only")
    parser.add_argument("--no-hf-loader", action="store_true", help="skip (d), which reads row by row")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(rows=args.rows, rows_per_part=args.rows_per_part, latent_size=args.latent_size,
                        embedding_width=args.embedding_width, batch_size=args.batch_size, workers=args.workers,
                        repeats=args.repeats, s3=not args.no_s3, hf_loader=not args.no_hf_loader)
    run_benchmark(settings, args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
