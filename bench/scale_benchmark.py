"""Scale: driver memory, whole-tree memory and time per row at 100k, 1M and 10M input rows, and a rerun.

    python bench/scale_benchmark.py                                   # generate at 100k, 1M, 10M rows; encode at 100k and 1M
    python bench/scale_benchmark.py --rows 100000 1000000 --encode-rows 100000 --json scale.json
    python bench/scale_benchmark.py --rows --encode-rows --parts 10000 50000    # only the end of run at many parts
    python bench/scale_benchmark.py --rows --encode-rows --parts 300000 --parts-store local    # the same in a local folder
    python bench/scale_benchmark.py --rows --encode-rows --text-cache-keys 1000000            # only the job text cache at 1M texts

Rows need little model work, so the figures show what latentray itself costs per row: one
row in ``--real-every`` is a real prompt (the tiny model draws it at 16x16 in 1 step) and
reaches the manifest; the others have empty prompts and go to ``errors/``. Encoding works
the same way: one row in ``--real-every`` holds a real 16x16 PNG, the others bytes that are
no image. Each job runs as the user runs it (``python -m jobs.cli ...``, embedded Ray); a
sampler reads the resident memory of the driver and of every process under it (Ray's
GCS, raylet and workers are its descendants) every 0.2 s. After the largest generation
run, the same command runs again on its finished output: a rerun must find nothing to do.
The largest encoding run is rerun the same way.

``--parts N ...`` adds the end of a run at N manifest parts on the local S3 server
(``end_of_run_parts.py``): a real output of N parts, the end of its run and its rerun.

``--text-cache-keys N`` adds the job text cache at N distinct texts (``text_cache_scale.py``):
text-stage stand-ins drive the real cache actors; its memory, the object store's use and
the driver's memory as the distinct texts pass its byte budget.

Goals (issue 11): driver peak RSS at 10M <= 1.5x that at 100k; time per row at 10M <=
1.2x that at 100k; the rerun of a finished output under 5% of the first run's wall time.
It asserts nothing; speed is never checked by tests.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import common
from end_of_run_parts import print_parts_report, run_parts_benchmark
from text_cache_scale import print_text_cache_report, run_text_cache_benchmark

ROW_GROUP_ROWS = 100_000
SIZE = 16  # pixels: the tiny model's smallest useful image, so model work stays negligible


@dataclass(kw_only=True)
class ScaleRun:
    job: str  # generate, generate-rerun, encode
    rows: int
    wall_seconds: float
    driver_peak_mib: float
    tree_peak_mib: float
    exit_code: int

    @property
    def microseconds_per_row(self) -> float:
        return self.wall_seconds / self.rows * 1e6


# -- inputs ---------------------------------------------------------------------------------------


def row_ids(rows: int) -> pa.Array:
    return pa.array(np.char.add("row-", np.arange(rows).astype(str)).astype(object))


def write_prompt_table(path: str, rows: int, real_every: int) -> None:
    prompts = np.full(rows, "", dtype=object)
    prompts[::real_every] = "a red circle on a blue background"
    table = pa.table({"id": row_ids(rows), "prompt": pa.array(prompts, pa.string()), "seed": pa.array(np.arange(rows))})
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_table(path: str, rows: int, real_every: int) -> None:
    images = np.full(rows, b"no image here", dtype=object)
    images[::real_every] = png_bytes()
    table = pa.table({"id": row_ids(rows), "image": pa.array(images, pa.binary()),
                      "caption": pa.array(np.full(rows, "a red square", dtype=object), pa.string())})
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


# -- one timed process ----------------------------------------------------------------------------


def run_measured(job: str, rows: int, command: list[str]) -> ScaleRun:
    """Run ``command`` to its end, sampling the driver's and the whole tree's resident memory."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"driver": 0, "tree": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            driver = common.read_memory(process.pid)
            if driver is not None:
                peaks["driver"] = max(peaks["driver"], driver[0])
                tree = driver[0] + sum((common.read_memory(pid) or (0, 0))[0] for pid in common.descendant_pids(process.pid))
                peaks["tree"] = max(peaks["tree"], tree)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, errors = process.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if process.returncode not in (0, 1):  # 1: the run finished with error rows, as designed here
        print(f"  {job} at {rows:,} rows exited {process.returncode}:\n{errors[-2000:]}", file=sys.stderr)
    return ScaleRun(job=job, rows=rows, wall_seconds=wall, driver_peak_mib=peaks["driver"] / common.MEBIBYTE,
                    tree_peak_mib=peaks["tree"] / common.MEBIBYTE, exit_code=process.returncode)


def generate_command(prompts: str, output: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "generate", "--model", "tiny", "--prompts", prompts, "--output", output,
            "--steps", "1", "--height", str(SIZE), "--width", str(SIZE), "--batch-size", "64", *extra]


def encode_command(images: str, output: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "encode", "--model", "tiny", "--images", images, "--output", output,
            "--resolution", str(SIZE), "--batch-size", "64", *extra]


# -- the benchmark --------------------------------------------------------------------------------


def run_benchmark(options: argparse.Namespace) -> list[ScaleRun]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="latentray-scale-", dir=options.work_dir) as work:
        for rows in options.rows:
            prompts = os.path.join(work, f"prompts-{rows}.parquet")
            write_prompt_table(prompts, rows, options.real_every)
            output = os.path.join(work, f"generate-{rows}")
            print(f"generate: {rows:,} rows ...", file=sys.stderr, flush=True)
            runs.append(run_measured("generate", rows, generate_command(prompts, output, ["--overwrite"])))
            if rows == max(options.rows):
                print(f"generate: rerun of the finished {rows:,}-row output ...", file=sys.stderr, flush=True)
                runs.append(run_measured("generate rerun", rows, generate_command(prompts, output, [])))
            os.remove(prompts)
        for rows in options.encode_rows:
            images = os.path.join(work, f"images-{rows}.parquet")
            write_image_table(images, rows, options.real_every)
            output = os.path.join(work, f"encode-{rows}")
            print(f"encode: {rows:,} rows ...", file=sys.stderr, flush=True)
            runs.append(run_measured("encode", rows, encode_command(images, output, ["--overwrite"])))
            if rows == max(options.encode_rows):
                # encoding resumes by id and content: a rerun reads every row and skips those whose cache key is held
                print(f"encode: rerun of the finished {rows:,}-row output ...", file=sys.stderr, flush=True)
                runs.append(run_measured("encode rerun", rows, encode_command(images, output, [])))
    return runs


def print_report(runs: list[ScaleRun], options: argparse.Namespace) -> dict:
    print(f"\nscale: tiny model, one real row in {options.real_every} ({SIZE}x{SIZE}, 1 step), the others to errors/; "
          f"{os.cpu_count()} CPUs\n")
    print(common.format_columns(
        ("job", "rows", "wall (s)", "us/row", "driver peak (MiB)", "tree peak (MiB)", "exit"),
        [(run.job, f"{run.rows:,}", f"{run.wall_seconds:.1f}", f"{run.microseconds_per_row:.1f}",
          f"{run.driver_peak_mib:,.0f}", f"{run.tree_peak_mib:,.0f}", str(run.exit_code)) for run in runs],
    ))
    goals = {job: _goals(runs, job) for job in ("generate", "encode") if any(run.job == job for run in runs)}
    print("- wall time is the whole process: interpreter, Ray's start and stop, the model actor's start, every row.")
    return {"runs": [asdict(run) | {"microseconds_per_row": run.microseconds_per_row} for run in runs], "goals": goals,
            "settings": {"real_every": options.real_every, "size": SIZE}, "machine": common.machine_dictionary()}


def _goals(runs: list[ScaleRun], job: str) -> dict:
    """The issue's three ratios for ``job``, printed and returned."""
    first = [run for run in runs if run.job == job]
    smallest, largest = min(first, key=lambda run: run.rows), max(first, key=lambda run: run.rows)
    rerun = next((run for run in runs if run.job == f"{job} rerun"), None)
    goals = {
        "driver_peak_ratio": largest.driver_peak_mib / smallest.driver_peak_mib,
        "time_per_row_ratio": largest.microseconds_per_row / smallest.microseconds_per_row,
        "rerun_share_of_first_run": rerun.wall_seconds / largest.wall_seconds if rerun else None,
    }
    print(f"\n{job}, {largest.rows:,} vs {smallest.rows:,} rows: driver peak {goals['driver_peak_ratio']:.2f}x (goal <= 1.5x), "
          f"time per row {goals['time_per_row_ratio']:.2f}x (goal <= 1.2x)"
          + (f"; rerun of the finished output: {goals['rerun_share_of_first_run']:.0%} of the first run"
             + (" (goal < 5%)" if job == "generate" else "") if rerun else ""))
    return goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=common.positive_integer, nargs="*", default=[100_000, 1_000_000, 10_000_000],
                        help="generation job sizes; the largest is rerun on its finished output")
    parser.add_argument("--encode-rows", type=common.positive_integer, nargs="*", default=[100_000, 1_000_000],
                        help="encoding job sizes (none: skip encoding)")
    parser.add_argument("--real-every", type=common.positive_integer, default=1000,
                        help="one row in N is real work (a prompt, a PNG); the others go to errors/")
    parser.add_argument("--parts", type=common.positive_integer, nargs="*", default=[],
                        help="also time the end of a run and a finished rerun at N manifest parts on the local S3 server")
    parser.add_argument("--parts-store", choices=("s3", "local"), default="s3",
                        help="--parts: the local S3 server (moto), or a local folder under --work-dir (its listing takes "
                             "seconds where moto's grows with the square of the objects: what is left is the driver's own work)")
    parser.add_argument("--text-cache-keys", type=common.positive_integer, metavar="N",
                        help="also drive the job text cache with N distinct texts (no model) and report its memory")
    parser.add_argument("--text-cache-asks", type=common.positive_integer, default=2,
                        help="--text-cache-keys: lookups per distinct text (a 10M-row job of 1M prompts makes ~10; "
                             "2 keeps 1M texts near 10 minutes on 2 cores)")
    parser.add_argument("--text-cache-mib", type=common.positive_integer,
                        help="--text-cache-keys: the cache's budget (default: a job's, a quarter of the object store)")
    parser.add_argument("--work-dir", help="where inputs and outputs go (default: the system's temp folder)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    options = parser.parse_args(argv)
    runs = run_benchmark(options)
    report = print_report(runs, options) if runs else {}
    if options.parts:
        report["parts"] = print_parts_report(run_parts_benchmark(options.parts, options.work_dir, options.parts_store))
    if options.text_cache_keys:
        report["text_cache"] = print_text_cache_report(
            run_text_cache_benchmark(options.text_cache_keys, options.text_cache_asks, options.text_cache_mib))
    common.write_json(report, options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
