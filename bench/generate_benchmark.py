"""Benchmark: plain diffusers loops against latentray's fused and split pipelines.

One run, one machine, one model, one set of prompts and seeds, four variants:

    (a) diffusers, one prompt at a time   StableDiffusionPipeline called once per prompt
    (b) diffusers, batched                the same pipeline called with lists of --batch-size prompts
    (c) latentray, fused placement        run_generation(placement="fused") on embedded Ray
    (d) latentray, split placement        run_generation(placement="split") on embedded Ray

For each: images per second and its ratio to (b), the peak resident memory, and the
largest pixel difference from (b) (a check that every variant did the same work).
For (c) and (d) also the stage-compute efficiency: the stages' summed busy seconds
divided by the run's wall seconds.

    python bench/generate_benchmark.py                      # small preset, 48 prompts, 128x128, 20 steps
    python bench/generate_benchmark.py --model tiny --prompts 8 --steps 4 --json result.json

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from PIL import Image

from workers.presets import PRESETS, materialize_preset

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MEBIBYTE = 1024 * 1024
RAY_AGENT_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")

SUBJECTS = ["lighthouse", "fox", "teapot", "mountain lake", "city street", "sailing boat", "owl", "cactus"]
STYLES = ["at dawn, watercolor", "in the rain, oil painting", "at night, neon light",
          "in winter, pencil sketch", "under a clear sky, photograph", "in autumn, woodcut print"]


# -- settings and results -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BenchmarkSettings:
    model: str
    prompts: int
    steps: int
    batch_size: int
    size: int
    guidance: float
    seed: int
    memory_interval: float


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    seed: int


@dataclass(kw_only=True)
class MemoryUsage:
    """Resident memory of a set of processes: before the variant, and the peak during it (bytes)."""

    baseline_resident: int
    peak_resident: int
    peak_anonymous: int  # resident minus file-backed and shared pages: no library counted twice
    peak_processes: int
    method: str
    peak_by_process: dict[str, float] = field(default_factory=dict)  # "pid title" -> MiB, at the peak

    @property
    def above_baseline(self) -> int:
        return self.peak_resident - self.baseline_resident


@dataclass(kw_only=True)
class VariantResult:
    key: str
    label: str
    images: int
    wall_seconds: float
    images_per_second: float
    memory: MemoryUsage
    load_seconds: float | None = None  # diffusers only: pipeline loading, outside wall_seconds
    stage_busy_seconds: dict[str, float] = field(default_factory=dict)
    compute_efficiency: float | None = None
    ratio_to_batched: float | None = None
    max_pixel_difference: int | None = None  # largest |difference| to (b), in 0..255 levels
    notes: list[str] = field(default_factory=list)


# -- prompts --------------------------------------------------------------------------------------


def make_prompt_rows(count: int, first_seed: int) -> list[PromptRow]:
    """Distinct, deterministic prompts, each with its own seed, shared by every variant."""
    rows = []
    for index in range(count):
        subject = SUBJECTS[index % len(SUBJECTS)]
        style = STYLES[(index // len(SUBJECTS)) % len(STYLES)]
        # beyond the combinations the number keeps prompts distinct, so no text-encoder cache hit flatters latentray
        round_number = index // (len(SUBJECTS) * len(STYLES))
        prompt = f"a {subject} {style}" + (f", study {round_number + 1}" if round_number else "")
        rows.append(PromptRow(id=f"prompt-{index:05d}", prompt=prompt, seed=first_seed + index))
    return rows


def write_prompt_table(rows: list[PromptRow], path: str) -> None:
    table = pa.table({
        "id": [row.id for row in rows],
        "prompt": [row.prompt for row in rows],
        "seed": pa.array([row.seed for row in rows], pa.int64()),
    })
    pq.write_table(table, path)


# -- memory sampling ------------------------------------------------------------------------------


def read_memory(pid: int) -> tuple[int, int] | None:
    """(resident, anonymous) bytes of one process from /proc/PID/statm; None once it has exited."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            fields = statm.read().split()
    except OSError:
        return None
    resident, shared = int(fields[1]) * PAGE_BYTES, int(fields[2]) * PAGE_BYTES
    return resident, resident - shared


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # the command name may hold spaces and parentheses: fields start after the last ')'
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def descendant_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, parent in parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found, pending = [], list(children.get(root, []))
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def command_arguments(pid: int) -> list[str]:
    """A process' arguments; Ray's workers and agents overwrite the first with their title (``ray::...``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return [""]


def is_ray_worker(pid: int) -> bool:
    """Ray titles its worker processes ``ray::...``; until a new worker does, it runs default_worker.py.

    Raylet, GCS and the dashboard head are not workers; Ray's agents are titled
    ``ray::`` too but are per-node services, so they are left out as well.
    """
    arguments = command_arguments(pid)
    if arguments[0].startswith("ray::"):
        return arguments[0] not in RAY_AGENT_TITLES
    return any(argument.endswith("default_worker.py") for argument in arguments)


def wait_for_actors_to_exit(timeout: float) -> None:
    """Ray Data stops a finished run's actors asynchronously; wait so they are not in the next baseline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any("MapWorker" in command_arguments(pid)[0] for pid in descendant_pids(os.getpid())):
            return
        time.sleep(0.5)


def driver_pids() -> list[int]:
    return [os.getpid()]


def driver_and_ray_worker_pids() -> list[int]:
    # embedded Ray starts raylet from this process, and raylet starts the workers: all are descendants
    return [os.getpid(), *[pid for pid in descendant_pids(os.getpid()) if is_ray_worker(pid)]]


def reset_driver_peak() -> bool:
    """Reset this process' high-water mark (VmHWM), so it measures one variant alone."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def driver_peak() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def release_freed_memory() -> None:
    """Hand freed heap back to the OS so the next variant's baseline is not inflated by this one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline stays a little high, the peak is still right


class PeakMemorySampler:
    """Background thread summing the resident memory of ``processes()`` every ``interval`` seconds.

    A sampler misses peaks shorter than its interval; the interval trades that against
    the CPU the sampling itself takes from the benchmark on a small machine.
    """

    def __init__(self, processes: Callable[[], list[int]], interval: float, method: str):
        self.processes, self.interval, self.method = processes, interval, method
        self.baseline_resident = self.peak_resident = self.peak_anonymous = self.peak_processes = 0
        self.peak_by_process: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory-sampler", daemon=True)

    def __enter__(self) -> "PeakMemorySampler":
        self.baseline_resident = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exception) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> int:
        readings = {pid: reading for pid in self.processes() if (reading := read_memory(pid)) is not None}
        resident = sum(reading[0] for reading in readings.values())
        if resident > self.peak_resident:
            self.peak_resident = resident
            # which processes make up the peak: read only at a new peak, titles cost more than sizes
            self.peak_by_process = {
                f"{pid} {' '.join(command_arguments(pid))[:80]}": round(reading[0] / MEBIBYTE, 1)
                for pid, reading in readings.items()
            }
        self.peak_anonymous = max(self.peak_anonymous, sum(reading[1] for reading in readings.values()))
        self.peak_processes = max(self.peak_processes, len(readings))
        return resident

    def usage(self, exact_peak: int = 0) -> MemoryUsage:
        return MemoryUsage(
            baseline_resident=self.baseline_resident, peak_resident=max(self.peak_resident, exact_peak),
            peak_anonymous=self.peak_anonymous, peak_processes=self.peak_processes, method=self.method,
            peak_by_process=self.peak_by_process,
        )


# -- (a) and (b): diffusers in this process -------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    # the rounding latentray's VAE decoder applies, so pixel differences compare like with like
    return (images * 255).round().astype(np.uint8)


def load_pipeline(model_directory: str):
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    # loading bars would interleave with the benchmark's output
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipeline = StableDiffusionPipeline.from_pretrained(model_directory, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_one_at_a_time(pipeline, rows: list[PromptRow], settings: BenchmarkSettings) -> list[np.ndarray]:
    images = []
    for row in rows:
        output = pipeline(
            prompt=row.prompt, height=settings.size, width=settings.size, num_inference_steps=settings.steps,
            guidance_scale=settings.guidance, generator=torch.Generator("cpu").manual_seed(row.seed), output_type="np",
        )
        images.extend(to_uint8(output.images))
    return images


def generate_batched(pipeline, rows: list[PromptRow], settings: BenchmarkSettings) -> list[np.ndarray]:
    images = []
    for start in range(0, len(rows), settings.batch_size):
        batch = rows[start:start + settings.batch_size]
        output = pipeline(
            prompt=[row.prompt for row in batch], height=settings.size, width=settings.size,
            num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            # one generator per prompt: each image depends on its own seed only, as in (a) and latentray
            generator=[torch.Generator("cpu").manual_seed(row.seed) for row in batch], output_type="np",
        )
        images.extend(to_uint8(output.images))
    return images


def run_diffusers_variant(
    key: str, label: str, generate: Callable, model_directory: str, rows: list[PromptRow], settings: BenchmarkSettings,
) -> tuple[VariantResult, dict[str, np.ndarray]]:
    release_freed_memory()
    exact = reset_driver_peak()
    method = "driver VmHWM (exact peak)" if exact else f"driver RSS sampled every {settings.memory_interval}s"
    with PeakMemorySampler(driver_pids, settings.memory_interval, method) as sampler:
        started = time.perf_counter()
        pipeline = load_pipeline(model_directory)
        loaded = time.perf_counter()
        images = generate(pipeline, rows, settings)
        finished = time.perf_counter()
    memory = sampler.usage(driver_peak() if exact else 0)
    del pipeline
    release_freed_memory()
    wall = finished - loaded
    result = VariantResult(
        key=key, label=label, images=len(images), wall_seconds=wall, images_per_second=len(images) / wall,
        load_seconds=loaded - started, memory=memory,
    )
    return result, {row.id: image for row, image in zip(rows, images)}


# -- (c) and (d): latentray on embedded Ray -------------------------------------------------------


def start_ray() -> float:
    """Start embedded Ray once for both latentray variants; return its start-up seconds."""
    from jobs.ray_runtime import connect

    if os.environ.pop("RAY_ADDRESS", None):
        # memory is sampled from this process' descendants, so the cluster must be local and embedded
        print("note: RAY_ADDRESS ignored; the benchmark starts its own embedded Ray", file=sys.stderr)
    started = time.perf_counter()
    connect()
    # progress bars would interleave with the results table
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - started


def read_latentray_images(output_directory: str) -> dict[str, np.ndarray]:
    """Images by row id, found through the manifest (the output's contract), not by file name."""
    manifest = pq.read_table(os.path.join(output_directory, "manifest"), columns=["id", "image_path"])
    images = {}
    for row_id, image_path in zip(manifest.column("id").to_pylist(), manifest.column("image_path").to_pylist()):
        with Image.open(os.path.join(output_directory, image_path)) as image:
            images[row_id] = np.asarray(image.convert("RGB"))
    return images


def run_latentray_variant(
    key: str, label: str, placement: str, prompts_path: str, output_directory: str, settings: BenchmarkSettings,
) -> tuple[VariantResult, dict[str, np.ndarray]]:
    from pipelines.config import GenerateConfig
    from pipelines.generate import run_generation

    config = GenerateConfig(
        prompts=prompts_path, output=output_directory, model=settings.model, steps=settings.steps,
        guidance=settings.guidance, height=settings.size, width=settings.size, batch_size=settings.batch_size,
        placement=placement, overwrite=True,
    )
    wait_for_actors_to_exit(timeout=30.0)
    release_freed_memory()
    method = f"driver + Ray worker processes, RSS summed, sampled every {settings.memory_interval}s"
    with PeakMemorySampler(driver_and_ray_worker_pids, settings.memory_interval, method) as sampler:
        record = run_generation(config)
    busy = record.get("stage_busy_seconds", {})
    wall = record["wall_seconds"]
    result = VariantResult(
        key=key, label=label, images=record["counts"]["generated_this_run"], wall_seconds=wall,
        images_per_second=record["images_per_second"] or 0.0, memory=sampler.usage(), stage_busy_seconds=busy,
        compute_efficiency=sum(busy.values()) / wall if wall else None,
    )
    if record["status"] != "complete" or record["counts"]["error_rows"]:
        result.notes.append(f"run {record['status']}: counts {record['counts']}, errors {record['error_reasons']}")
    return result, read_latentray_images(output_directory)


# -- comparison and report ------------------------------------------------------------------------


def max_pixel_difference(images: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> int | None:
    shared = [row_id for row_id in reference if row_id in images]
    if not shared:
        return None
    return max(int(np.abs(images[row_id].astype(np.int16) - reference[row_id].astype(np.int16)).max()) for row_id in shared)


def compare_to_batched(results: list[VariantResult], images: dict[str, dict[str, np.ndarray]], batched_key: str) -> None:
    batched = next(result for result in results if result.key == batched_key)
    for result in results:
        result.ratio_to_batched = result.images_per_second / batched.images_per_second if batched.images_per_second else None
        result.max_pixel_difference = max_pixel_difference(images[result.key], images[batched_key])
        missing = len(images[batched_key]) - len(images[result.key])
        if missing > 0:
            result.notes.append(f"{missing} image(s) missing compared to (b)")


def mebibytes(value: int) -> str:
    return f"{value / MEBIBYTE:,.0f}"


def optional(value: float | int | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_table(results: list[VariantResult]) -> str:
    header = ("variant", "images", "wall seconds", "images/s", "vs (b)", "compute efficiency", "peak RSS MiB",
              "above start MiB", "peak anonymous MiB", "max |Δpixel| vs (b)")
    rows = [header] + [(
        result.label, str(result.images), f"{result.wall_seconds:.1f}", f"{result.images_per_second:.3f}",
        optional(result.ratio_to_batched, "{:.2f}x"), optional(result.compute_efficiency, "{:.2f}"),
        mebibytes(result.memory.peak_resident), mebibytes(result.memory.above_baseline),
        mebibytes(result.memory.peak_anonymous), optional(result.max_pixel_difference, "{}"),
    ) for result in results]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    # variant names left-aligned, figures right-aligned
    lines = [
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_notes(results: list[VariantResult], ray_start_seconds: float) -> str:
    by_key = {result.key: result for result in results}
    lines = [
        f"- (a), (b): wall = generation only; loading the pipeline took {by_key['a'].load_seconds:.1f}s and "
        f"{by_key['b'].load_seconds:.1f}s more. torch threads: {torch.get_num_threads()}.",
        "- (c), (d): wall = run_generation's wall_seconds: includes actor start-up (importing torch and diffusers, "
        "loading the model in each actor), reading prompts, writing PNGs and the manifest. "
        f"Starting Ray itself ({ray_start_seconds:.1f}s) is not included. (d) runs after (c) on the same Ray and "
        "reuses the idle task workers (c) left, with torch already imported.",
        "- compute efficiency = sum(stage_busy_seconds) / wall. Busy seconds are wall-clock time inside the actors: "
        "in split placement stages overlap (so it can exceed 1), and a stage's busy time also counts time lost to "
        "other actors starting up on the same cores.",
        "- memory: (a), (b) this process, from before loading the pipeline; (c), (d) this process plus every Ray "
        "worker process (ray::*, Ray Data's helper actors included; raylet, GCS and agents not), summed. Summed RSS "
        "counts shared pages (torch libraries, Ray's object store) once per process; 'peak anonymous' counts "
        "private memory only. 'above start' = peak minus the same sum just before the variant.",
        "- max |Δpixel| vs (b): largest difference from (b) over all images, in levels of 255; CPU kernels depend on "
        "batch size, so up to 1 is expected.",
        "- on shared machines timings vary by up to 1.5x between runs: compare figures from one run only.",
    ]
    for result in results:
        lines.extend(f"- {result.label}: {note}" for note in result.notes)
    return "\n".join(lines)


def report_dictionary(settings: BenchmarkSettings, results: list[VariantResult], ray_start_seconds: float, scheduler: str) -> dict:
    import diffusers

    variants = {}
    for result in results:
        entry = asdict(result)
        entry["memory"]["above_baseline"] = result.memory.above_baseline
        variants[result.key] = entry
    return {
        "settings": {**asdict(settings), "scheduler": scheduler},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "diffusers": diffusers.__version__, "ray": ray.__version__},
        "ray_start_seconds": ray_start_seconds,
        "variants": variants,
    }


# -- the benchmark --------------------------------------------------------------------------------


def scheduler_name(model_directory: str) -> str:
    with open(os.path.join(model_directory, "scheduler", "scheduler_config.json")) as config_file:
        return json.load(config_file)["_class_name"]


def run_benchmark(settings: BenchmarkSettings, json_path: str | None) -> dict:
    model_directory = materialize_preset(settings.model) if settings.model in PRESETS else settings.model
    rows = make_prompt_rows(settings.prompts, settings.seed)
    results: list[VariantResult] = []
    images: dict[str, dict[str, np.ndarray]] = {}

    # diffusers first, before Ray exists: Ray's idle processes would take CPU from the plain loops
    torch.set_num_threads(os.cpu_count() or 1)
    # the first load imports diffusers' and transformers' modules; without this, (a) alone would pay for them
    load_pipeline(model_directory)
    for key, label, generate in (("a", "(a) diffusers, one at a time", generate_one_at_a_time),
                                 ("b", "(b) diffusers, batched", generate_batched)):
        print(f"running {label} ...", file=sys.stderr, flush=True)
        result, images[key] = run_diffusers_variant(key, label, generate, model_directory, rows, settings)
        results.append(result)

    with tempfile.TemporaryDirectory(prefix="latentray-benchmark-") as work_directory:
        prompts_path = os.path.join(work_directory, "prompts.parquet")
        write_prompt_table(rows, prompts_path)
        ray_start_seconds = start_ray()
        try:
            for key, label, placement in (("c", "(c) latentray, fused", "fused"), ("d", "(d) latentray, split", "split")):
                print(f"running {label} ...", file=sys.stderr, flush=True)
                output_directory = os.path.join(work_directory, f"output-{placement}")
                result, images[key] = run_latentray_variant(key, label, placement, prompts_path, output_directory, settings)
                results.append(result)
        finally:
            ray.shutdown()

    compare_to_batched(results, images, "b")
    scheduler = scheduler_name(model_directory)
    print(f"\nlatentray generation benchmark: model {settings.model}, {settings.prompts} prompts, "
          f"{settings.size}x{settings.size}, {settings.steps} steps, guidance {settings.guidance}, "
          f"batch size {settings.batch_size}, {scheduler}, {os.cpu_count()} CPUs\n")
    print(format_table(results))
    print()
    print(format_notes(results, ray_start_seconds))
    report = report_dictionary(settings, results, ray_start_seconds, scheduler)
    if json_path:
        with open(json_path, "w") as json_file:
            json.dump(report, json_file, indent=2)
        print(f"\nfigures written to {json_path}")
    return report


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare plain diffusers loops with latentray's fused and split pipelines on the same model, "
                    "prompts and seeds (images/s, ratio to batched diffusers, stage-compute efficiency, peak memory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="small", help=f"preset name ({', '.join(PRESETS)}) or a local diffusers directory")
    parser.add_argument("--prompts", type=positive_integer, default=48, help="number of prompts")
    parser.add_argument("--steps", type=positive_integer, default=20, help="denoising steps")
    parser.add_argument("--batch-size", type=positive_integer, default=8, help="prompts per batch for (b), (c) and (d)")
    parser.add_argument("--size", type=positive_integer, default=128, help="image height and width in pixels, a multiple of 8")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--memory-interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.size % 8:
        parser.error(f"--size must be a multiple of 8, got {options.size}")
    settings = BenchmarkSettings(
        model=options.model, prompts=options.prompts, steps=options.steps, batch_size=options.batch_size,
        size=options.size, guidance=options.guidance, seed=options.seed, memory_interval=options.memory_interval,
    )
    run_benchmark(settings, options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
