"""The end of a run and a finished output's rerun at many manifest parts on the local S3 server.

Used by ``scale_benchmark.py --parts N ...``. A 10M-row job at 1024 px commits blocks of
32 rows: about 300k ``manifest/`` parts. No model runs here: the parts are real (the
manifest's schema, each with its latents' partial statistics in its footer; one block in
10 with two rows in ``errors/``), written by threads through ``RunOutput.commit`` as the
commit tasks write them, to a moto server in its own process (``moto_server``), and their
reports reach the run's totals as the commit tasks' summaries do. Then

- end of run: the job skeleton's end (``job._finish``: counts, ``latent_stats.json``, the
  parts index, ``run.json``), timed from the last commit;
- finished rerun: the whole ``latentray generate`` process on the finished output (it
  plans, finds every row counted, connects no Ray, loads no model, writes the record);
- the listing alone, and what reading every footer one by one would cost (from a sample).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BLOCK_ROWS = 32
CHANNELS = 4
ERROR_EVERY = 10  # one block in this many has two rows in errors/
WRITE_THREADS = 32
FOOTER_SAMPLE = 300
# beyond this many parts the plain listing is not timed: moto sorts every name under the prefix for each
# page of 1,000, so one request after another takes time growing with the square of the parts
PLAIN_LISTING_MAX_PARTS = 50_000


@dataclass(kw_only=True)
class PartsRun:
    store: str  # "s3": the local moto server; "local": a local folder
    parts: int  # manifest parts
    errors_parts: int
    create_seconds: float
    listing_seconds: float  # one listing of manifest/ and errors/ (``io.list_parts``: on S3, by prefixes at once)
    plain_listing_seconds: float  # the same, one request after another (fsspec's ``find``); NaN: not timed
    end_of_run_seconds: float
    end_of_run_footers_read: int
    rerun_seconds: float  # the whole `latentray generate` process
    rerun_exit_code: int
    footer_milliseconds: float  # one footer read alone (the cost per part of reading them one by one)

    @property
    def one_by_one_seconds(self) -> float:
        return (self.parts + self.errors_parts) * self.footer_milliseconds / 1000


def start_moto() -> subprocess.Popen:
    """A moto S3 server in its own process (it must not share this process's GIL), its address in the environment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="parts-bench")
            return server
        except Exception:  # not listening yet
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError("moto_server did not start")


def block(index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The columns a commit task has for one block of rows, with per-row latent aggregates."""
    rows = np.arange(index * BLOCK_ROWS, (index + 1) * BLOCK_ROWS)
    count = len(rows)
    return {
        "id": np.array([f"row-{row}" for row in rows], dtype=object), "row": rows, "prompt": np.full(count, "a red circle", dtype=object),
        "negative_prompt": np.full(count, "", dtype=object), "seed": rows, "num_inference_steps": np.full(count, 28),
        "guidance_scale": np.full(count, 4.5), "height": np.full(count, 1024), "width": np.full(count, 1024),
        "image_path": np.array([f"images/{row}.png" for row in rows], dtype=object), "prompt_truncated": np.zeros(count, bool),
        "latent_count": np.full(count, 128 * 128), "latent_mean": rng.normal(0, 0.1, (count, CHANNELS)),
        "latent_std": rng.uniform(0.9, 1.1, (count, CHANNELS)), "latent_min": rng.uniform(-5, -4, (count, CHANNELS)),
        "latent_max": rng.uniform(4, 5, (count, CHANNELS)),
    }


def write_parts(output, parts: int) -> tuple[list[list[dict]], float]:
    """``parts`` blocks committed as the commit tasks commit them (threads, straight to S3); their reports."""
    from pipelines.generation.commit import manifest_table
    from pipelines.runtime.schemas import ERRORS_SCHEMA
    from pipelines.runtime.stats import stats_of_rows

    def commit(index: int) -> list[dict]:
        rows = block(index, np.random.default_rng(index))
        failed = np.zeros(BLOCK_ROWS, bool)
        if index % ERROR_EVERY == 0:
            failed[-2:] = True
        ok = {column: values[~failed] for column, values in rows.items()}
        errors = None
        if failed.any():
            errors = pa.table({"id": list(rows["id"][failed]), "row": rows["row"][failed], "stage": ["validate"] * int(failed.sum()),
                               "reason": ["prompt is null"] * int(failed.sum()), "cause": ["permanent"] * int(failed.sum())},
                              schema=ERRORS_SCHEMA)
        stats = stats_of_rows(ok["latent_count"], ok["latent_mean"], ok["latent_std"], ok["latent_min"], ok["latent_max"])
        return output.commit(manifest_table(ok, "FlowMatchEulerDiscreteScheduler", False), errors, stats)

    started = time.perf_counter()
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        reports = list(pool.map(commit, range(parts)))
    return reports, time.perf_counter() - started


def generate_arguments(prompts: str, output: str) -> list[str]:
    return ["--model", "tiny", "--prompts", prompts, "--output", output, "--steps", "1", "--height", "16", "--width", "16"]


def run_case(parts: int, work: str, store: str) -> PartsRun:
    from jobs.generate import build_parser
    from jobs.options import generate_config
    from pipelines.generation.generate import plan_generation
    from pipelines.runtime import io, job, lease
    from pipelines.runtime.progress import ProgressReporter

    # 1. the input (local: only the output's side is measured) and the plan of a first run
    prompts = os.path.join(work, f"prompts-{parts}.parquet")
    pq.write_table(pa.table({"prompt": pa.array(np.full(parts * BLOCK_ROWS, "a red circle", dtype=object), pa.string())}), prompts,
                   row_group_size=1_000_000)
    output_uri = f"s3://parts-bench/out-{parts}" if store == "s3" else os.path.join(work, f"out-{parts}")
    arguments = generate_arguments(prompts, output_uri)
    plan = plan_generation(generate_config(build_parser().parse_args(arguments)))

    # 2. the parts, as the run's commit tasks write them; their summaries reach the totals
    print(f"parts: writing {parts:,} manifest parts to {output_uri} ...", file=sys.stderr, flush=True)
    reports, create_seconds = write_parts(plan.output, parts)
    totals = job.RunTotals()
    for report in reports:
        totals.add(job.part_summary(ok_rows=0, error_rows=0, busy={}, parts=report))
    totals.ok_rows, totals.error_rows = parts * BLOCK_ROWS - 2 * len(range(0, parts, ERROR_EVERY)), 2 * len(range(0, parts, ERROR_EVERY))

    # 3. the end of the run, from the last commit to run.json
    record = job._start_record(plan, "fused", [], BLOCK_ROWS)
    progress = ProgressReporter(label="generate", total=plan.input_rows, done=0)
    started = time.perf_counter()
    try:
        finished = job._finish(plan, record, started, progress, totals)
    finally:
        lease.release(plan.output.uri)
    end_of_run_seconds = time.perf_counter() - started
    assert finished["status"] == "complete", finished["counts"]
    footers_read = plan.output.summarize().footers_read  # 0: the index covers every part

    # 4. the finished output's rerun: the whole command
    print(f"parts: rerun of the finished {parts:,}-part output ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    rerun = subprocess.run([sys.executable, "-m", "jobs.cli", "generate", *arguments], capture_output=True, text=True)
    rerun_seconds = time.perf_counter() - started
    if rerun.returncode != 0:
        print(rerun.stderr[-2000:], file=sys.stderr)

    # 5. the listing alone, and one footer read alone (what reading them one by one costs per part)
    started = time.perf_counter()
    manifest, errors = io.list_parts(plan.output.results_uri), io.list_parts(plan.output.errors_uri)
    listing_seconds = time.perf_counter() - started
    plain_listing_seconds = float("nan")
    if parts <= PLAIN_LISTING_MAX_PARTS:
        started = time.perf_counter()
        for folder in (plan.output.results_uri, plan.output.errors_uri):
            fs, path = io.filesystem(folder)
            fs.find(path)
        plain_listing_seconds = time.perf_counter() - started
    sample = manifest[:: max(1, len(manifest) // FOOTER_SAMPLE)][:FOOTER_SAMPLE]
    started = time.perf_counter()
    for uri in sample:
        io.parquet_metadata(uri)
    footer_milliseconds = (time.perf_counter() - started) / len(sample) * 1000
    os.remove(prompts)
    return PartsRun(store=store, parts=len(manifest), errors_parts=len(errors), create_seconds=create_seconds, listing_seconds=listing_seconds,
                    plain_listing_seconds=plain_listing_seconds,
                    end_of_run_seconds=end_of_run_seconds, end_of_run_footers_read=footers_read, rerun_seconds=rerun_seconds,
                    rerun_exit_code=rerun.returncode, footer_milliseconds=footer_milliseconds)


def run_parts_benchmark(counts: list[int], work_dir: str | None, store: str = "s3") -> list[PartsRun]:
    """The cases on the local S3 server (``store="s3"``) or in a local folder (``"local"``)."""
    server = start_moto() if store == "s3" else None
    try:
        with tempfile.TemporaryDirectory(prefix="latentray-parts-", dir=work_dir) as work:
            return [run_case(parts, work, store) for parts in counts]
    finally:
        if server is not None:
            server.terminate()
            server.wait()


def print_parts_report(runs: list[PartsRun]) -> list[dict]:
    import common

    print(f"\nend of run at many parts: {os.cpu_count()} CPUs\n")
    print(common.format_columns(
        ("store", "manifest parts", "errors parts", "create (s)", "parts/s", "listing (s)", "one request at a time (s)", "end of run (s)", "rerun process (s)",
         "footer (ms)", "one by one (s)"),
        [(run.store, f"{run.parts:,}", f"{run.errors_parts:,}", f"{run.create_seconds:.0f}", f"{run.parts / run.create_seconds:.0f}",
          f"{run.listing_seconds:.1f}", f"{run.plain_listing_seconds:.1f}", f"{run.end_of_run_seconds:.1f}", f"{run.rerun_seconds:.1f}", f"{run.footer_milliseconds:.1f}",
          f"{run.one_by_one_seconds:.0f}") for run in runs],
    ))
    print("- end of run: counts, latent_stats.json, the parts index and run.json after the last commit; "
          "rerun: the whole `latentray generate` process on the finished output (no Ray, no model);\n"
          "- one by one: every footer read in turn, as the end of a run did before the parts index (sample of "
          f"{FOOTER_SAMPLE} reads).")
    return [vars(run) | {"one_by_one_seconds": run.one_by_one_seconds} for run in runs]
