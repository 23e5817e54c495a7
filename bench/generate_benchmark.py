"""Benchmark: plain diffusers loops against latentray's fused and split pipelines, for any model family.

One run, one machine, one model, one set of prompts and seeds, four variants:

    (a) diffusers, one prompt at a time   the family's pipeline (StableDiffusionPipeline, FluxPipeline, ...) once per prompt
    (b) diffusers, batched                the same pipeline called with lists of --batch-size prompts
    (c) latentray, fused placement        run_generation(placement="fused") on embedded Ray
    (d) latentray, split placement        run_generation(placement="split") on embedded Ray

For each: images per second and its ratio to (b), the peak resident memory, and the
largest pixel difference from (b) (a check that every variant did the same work).
For (c) and (d) also the stage-compute efficiency: the stages' summed busy seconds
divided by the run's wall seconds.

    python bench/generate_benchmark.py                      # small preset, 48 prompts, 128x128, 20 steps
    python bench/generate_benchmark.py --model small-flux   # the same table for FLUX.1 (small-sdxl, small-sd3, small-zimage, small-qwenimage)
    python bench/generate_benchmark.py --model tiny --prompts 8 --steps 4 --json result.json

With ``--whole-process`` it times instead what a user feels: a plain diffusers process
(``bench/diffusers_baseline.py``: the family's pipeline, batched, PNGs written) against
the ``latentray generate`` command (embedded Ray, fused placement), each as a whole
process at two job sizes. The difference between the sizes gives the steady-state cost
per image; what remains of the small job is the fixed start-up (imports, Ray, actors,
model loading). It prints the steady-state ratio and the start-up of each side apart:

    python bench/generate_benchmark.py --whole-process --model small-flux --sizes 16 64

With ``--text-heavy`` it measures instead what encoding each distinct text once per job
saves: a model whose text encoder dominates (``small-zimage`` with its Qwen3 text encoder
made ``TEXT_HEAVY_WIDTH`` wide and ``TEXT_HEAVY_LAYERS`` deep, built into a temporary
folder), rows of ``--distinct`` prompts with a seed each, ``--text-actors`` text-stage
actors; latentray with the job text cache off (each actor encodes a text again) and on,
taking turns. It prints wall time, texts encoded and reused, the text encoder's busy
seconds and what the cache itself cost inside the actors (lookups, fetches, puts):

    python bench/generate_benchmark.py --text-heavy --prompts 64 --distinct 8 --size 64 --steps 4

With ``--loras N`` it measures what per-row LoRA costs: the same ``latentray generate``
command (embedded Ray, fused placement) on the same rows, once without a ``lora`` column and
once with rows cycling through N LoRA files (rank ``LORA_RANK`` on the denoiser's attention
projections, random weights, made with peft into a temporary folder), each as a whole
process at two job sizes, taking turns. It prints the steady-state ratio (the issue's goal:
within 10%) and the start-up of each apart (loading N adapters is a start-up cost):

    python bench/generate_benchmark.py --loras 4 --model small --sizes 16 64

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from PIL import Image

from pipelines.runtime.model_source import describe_model
from workers.runtime.presets import PRESETS, materialize_preset

# shared with the other benchmarks; `python bench/generate_benchmark.py` puts bench/ first on sys.path
from common import (
    MemoryUsage, PeakMemorySampler, driver_and_ray_worker_pids, driver_peak, driver_pids, format_columns,
    machine_dictionary, mebibytes, optional, positive_integer, release_freed_memory, reset_driver_peak, start_ray,
    variants_dictionary, wait_for_actors_to_exit, write_json,
)

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
    guidance: float | None  # None: the family's default
    seed: int
    memory_interval: float


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    seed: int


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


# -- (a) and (b): diffusers in this process -------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    # the rounding latentray's VAE decoder applies, so pixel differences compare like with like
    return (images * 255).round().astype(np.uint8)


def load_pipeline(model_directory: str):
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    # loading bars would interleave with the benchmark's output
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # the class model_index.json names: the family's own pipeline
    pipeline = DiffusionPipeline.from_pretrained(model_directory, local_files_only=True)
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
    from pipelines.generation.generate import run_generation
    from pipelines.runtime.config import GenerateConfig

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


def format_table(results: list[VariantResult]) -> str:
    header = ("variant", "images", "wall seconds", "images/s", "vs (b)", "compute efficiency", "peak RSS MiB",
              "above start MiB", "peak anonymous MiB", "max |Δpixel| vs (b)")
    rows = [(
        result.label, str(result.images), f"{result.wall_seconds:.1f}", f"{result.images_per_second:.3f}",
        optional(result.ratio_to_batched, "{:.2f}x"), optional(result.compute_efficiency, "{:.2f}"),
        mebibytes(result.memory.peak_resident), mebibytes(result.memory.above_baseline),
        mebibytes(result.memory.peak_anonymous), optional(result.max_pixel_difference, "{}"),
    ) for result in results]
    return format_columns(header, rows)


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
    return {
        "settings": {**asdict(settings), "scheduler": scheduler},
        "machine": machine_dictionary(),
        "ray_start_seconds": ray_start_seconds,
        "variants": variants_dictionary(results),
    }


# -- the benchmark --------------------------------------------------------------------------------


def scheduler_name(model_directory: str) -> str:
    with open(os.path.join(model_directory, "scheduler", "scheduler_config.json")) as config_file:
        return json.load(config_file)["_class_name"]


def run_benchmark(settings: BenchmarkSettings, json_path: str | None) -> dict:
    model_directory = materialize_preset(settings.model) if settings.model in PRESETS else settings.model
    model = describe_model(settings.model)
    if settings.size % model.shape.size_multiple:
        raise SystemExit(f"--size must be a multiple of {model.shape.size_multiple} for {model.family.name} models, got {settings.size}")
    if settings.guidance is None:  # the family's default, the same for every variant
        settings = replace(settings, guidance=model.shape.default_guidance)
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
    print(f"\nlatentray generation benchmark: model {settings.model} ({model.family.name}), {settings.prompts} prompts, "
          f"{settings.size}x{settings.size}, {settings.steps} steps, guidance {settings.guidance}, "
          f"batch size {settings.batch_size}, {scheduler}, {os.cpu_count()} CPUs\n")
    print(format_table(results))
    print()
    print(format_notes(results, ray_start_seconds))
    report = report_dictionary(settings, results, ray_start_seconds, scheduler)
    write_json(report, json_path)
    return report


# -- whole processes at two job sizes ---------------------------------------------------------------


@dataclass(kw_only=True)
class ProcessTiming:
    side: str
    seconds: dict[int, float]  # job size -> whole-process wall seconds
    # latentray only, job size -> where the fastest run's time went (``start_up_breakdown``)
    breakdown: dict[int, dict[str, float]] = field(default_factory=dict)

    def per_image(self) -> float:
        (small, small_seconds), (large, large_seconds) = sorted(self.seconds.items())
        return (large_seconds - small_seconds) / (large - small)

    def start_up(self) -> float:
        small, small_seconds = min(self.seconds.items())
        return small_seconds - small * self.per_image()


def time_process(command: list[str]) -> float:
    import subprocess

    started = time.perf_counter()
    finished = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(command[:4])} ... failed:\n{finished.stderr[-3000:]}")
    return seconds


def time_taking_turns(commands: dict[str, list[str]], timings: dict[str, "ProcessTiming"], size: int, repeats: int,
                      latentray_sides: set[str]) -> None:
    """Time each side's command ``repeats`` times, the sides taking turns; the fastest counts (a shared machine
    slows runs, never speeds them). A latentray side also keeps where its fastest run's time went."""
    for repeat in range(repeats):
        for side, command in commands.items():
            print(f"timing {size} images: {side} (run {repeat + 1} of {repeats}) ...", file=sys.stderr, flush=True)
            seconds = time_process(command)
            if seconds <= timings[side].seconds.get(size, seconds):
                timings[side].seconds[size] = seconds
                if side in latentray_sides:
                    timings[side].breakdown[size] = start_up_breakdown(seconds, command[command.index("--output") + 1])


def start_up_breakdown(process_seconds: float, output: str) -> dict[str, float]:
    """Where a latentray process's time went, from its run.json: before the run (interpreter, imports, plan,
    Ray start), in the run outside model compute (actors starting and loading the model, commits, waits),
    and the stages' compute (summed over stages: in one fused actor they run one after the other)."""
    with open(os.path.join(output, "run.json")) as record_file:
        record = json.load(record_file)
    compute = sum(record["stage_busy_seconds"].values())
    return {"before_the_run": process_seconds - record["wall_seconds"], "run_outside_compute": record["wall_seconds"] - compute,
            "stage_compute": compute}


def run_whole_process_benchmark(settings: BenchmarkSettings, sizes: tuple[int, int], repeats: int, json_path: str | None) -> dict:
    model_directory = materialize_preset(settings.model) if settings.model in PRESETS else settings.model
    model = describe_model(settings.model)
    guidance = settings.guidance if settings.guidance is not None else model.shape.default_guidance
    bench_folder = os.path.dirname(os.path.abspath(__file__))
    timings = {"diffusers": ProcessTiming(side="diffusers", seconds={}), "latentray": ProcessTiming(side="latentray", seconds={})}
    with tempfile.TemporaryDirectory(prefix="latentray-benchmark-") as work_directory:
        for size in sizes:
            prompts_path = os.path.join(work_directory, f"prompts-{size}.parquet")
            write_prompt_table(make_prompt_rows(size, settings.seed), prompts_path)
            common_options = ["--steps", str(settings.steps), "--batch-size", str(settings.batch_size)]
            commands = {
                "diffusers": [
                    sys.executable, os.path.join(bench_folder, "diffusers_baseline.py"), "--model", model_directory,
                    "--prompts", prompts_path, "--output", os.path.join(work_directory, f"diffusers-{size}"),
                    "--guidance", str(guidance), "--size", str(settings.size), *common_options,
                ],
                "latentray": [
                    sys.executable, "-m", "jobs.cli", "generate", "--model", settings.model, "--prompts", prompts_path,
                    "--output", os.path.join(work_directory, f"latentray-{size}"), "--guidance", str(guidance),
                    "--height", str(settings.size), "--width", str(settings.size), "--placement", "fused", "--overwrite",
                    *common_options,
                ],
            }
            time_taking_turns(commands, timings, size, repeats, latentray_sides={"latentray"})
    diffusers, latentray = timings["diffusers"], timings["latentray"]
    header = ("side", *[f"{size} images (s)" for size in sizes], "steady state s/image", "images/s", "start-up (s)")
    rows = [(
        timing.side, *[f"{timing.seconds[size]:.1f}" for size in sizes], f"{timing.per_image():.3f}",
        f"{1 / timing.per_image():.3f}", f"{timing.start_up():.1f}",
    ) for timing in (diffusers, latentray)]
    print(f"\nwhole processes: model {settings.model} ({model.family.name}), {settings.size}x{settings.size}, {settings.steps} steps, "
          f"guidance {guidance}, batch size {settings.batch_size}, {os.cpu_count()} CPUs\n")
    print(format_columns(header, rows))
    ratio = diffusers.per_image() / latentray.per_image()
    print(f"\nsteady-state throughput, latentray / diffusers batched: {ratio:.2f}x; "
          f"start-up: latentray {latentray.start_up():.1f} s, diffusers {diffusers.start_up():.1f} s "
          f"({latentray.start_up() - diffusers.start_up():+.1f} s)")
    print("- each figure is a whole process as a user runs it: interpreter start, imports, model loading, Ray start "
          "and actors (latentray), generation, PNG writing; steady state = (T(large) - T(small)) / (large - small).")
    for size, parts in sorted(latentray.breakdown.items()):
        print(f"- latentray, {size} images: " + ", ".join(f"{name.replace('_', ' ')} {value:.1f} s" for name, value in parts.items()))
    report = {
        "settings": {**asdict(settings), "guidance": guidance, "sizes": list(sizes), "repeats": repeats},
        "machine": machine_dictionary(), "load_average": os.getloadavg(),
        "seconds": {timing.side: timing.seconds for timing in (diffusers, latentray)},
        "steady_state_ratio": ratio, "start_up_seconds": {timing.side: timing.start_up() for timing in (diffusers, latentray)},
        "latentray_breakdown_seconds": latentray.breakdown,
    }
    write_json(report, json_path)
    return report


# -- per-row LoRA: rows cycling through N adapters against the same rows without ------------------------

LORA_RANK = 16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def save_random_lora(model_directory: str, path: str, seed: int) -> str:
    """A LoRA on the denoiser's attention projections with random non-zero weights, saved as diffusers saves one."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = DiffusionPipeline.from_pretrained(model_directory, local_files_only=True)
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    torch.manual_seed(seed)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False, target_modules=LORA_TARGETS)
    inject_adapter_in_model(config, getattr(pipe, name))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, name)))
    type(pipe).save_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), **{f"{name}_lora_layers": layers})
    return path


def run_lora_benchmark(settings: BenchmarkSettings, sizes: tuple[int, int], repeats: int, lora_count: int, json_path: str | None) -> dict:
    model_directory = materialize_preset(settings.model) if settings.model in PRESETS else settings.model
    model = describe_model(settings.model)
    guidance = settings.guidance if settings.guidance is not None else model.shape.default_guidance
    sides = ("without LoRA", f"{lora_count} LoRAs")
    timings = {side: ProcessTiming(side=side, seconds={}) for side in sides}
    with tempfile.TemporaryDirectory(prefix="latentray-lora-benchmark-") as work_directory:
        # 1. the adapters, and per job size one table without and one with a lora column (row i: file i mod N)
        files = [save_random_lora(model_directory, os.path.join(work_directory, f"lora-{index}.safetensors"), seed=index)
                 for index in range(lora_count)]
        for size in sizes:
            plain_path = os.path.join(work_directory, f"prompts-{size}.parquet")
            write_prompt_table(make_prompt_rows(size, settings.seed), plain_path)
            table = pq.read_table(plain_path)
            lora_path = os.path.join(work_directory, f"prompts-{size}-loras.parquet")
            pq.write_table(table.append_column("lora", pa.array([files[row % lora_count] for row in range(size)])), lora_path)
            commands = {side: [
                sys.executable, "-m", "jobs.cli", "generate", "--model", settings.model, "--prompts", prompts_path,
                "--output", os.path.join(work_directory, f"{index}-{size}"), "--guidance", str(guidance),
                "--height", str(settings.size), "--width", str(settings.size), "--placement", "fused", "--overwrite",
                "--steps", str(settings.steps), "--batch-size", str(settings.batch_size),
            ] for index, (side, prompts_path) in enumerate(zip(sides, (plain_path, lora_path)))}
            # 2. the sides take turns
            time_taking_turns(commands, timings, size, repeats, latentray_sides=set(sides))
    # 3. the figures
    plain, with_loras = (timings[side] for side in sides)
    header = ("side", *[f"{size} images (s)" for size in sizes], "steady state s/image", "start-up (s)")
    rows = [(timing.side, *[f"{timing.seconds[size]:.1f}" for size in sizes], f"{timing.per_image():.3f}", f"{timing.start_up():.1f}")
            for timing in (plain, with_loras)]
    print(f"\nper-row LoRA: model {settings.model} ({model.family.name}), {settings.size}x{settings.size}, {settings.steps} steps, "
          f"batch size {settings.batch_size}, rows cycling through {lora_count} LoRAs of rank {LORA_RANK}, {os.cpu_count()} CPUs\n")
    print(format_columns(header, rows))
    ratio = plain.per_image() / with_loras.per_image()
    print(f"\nsteady-state throughput, with LoRAs / without: {ratio:.2f}x ({(1 / ratio - 1):+.0%} time per image); "
          f"start-up: {with_loras.start_up() - plain.start_up():+.1f} s with LoRAs")
    for side in sides:
        for size, parts in sorted(timings[side].breakdown.items()):
            print(f"- {side}, {size} images: " + ", ".join(f"{name.replace('_', ' ')} {value:.1f} s" for name, value in parts.items()))
    report = {
        "settings": {**asdict(settings), "guidance": guidance, "sizes": list(sizes), "repeats": repeats, "loras": lora_count,
                     "lora_rank": LORA_RANK},
        "machine": machine_dictionary(), "load_average": os.getloadavg(),
        "seconds": {side: timings[side].seconds for side in sides}, "steady_state_ratio": ratio,
        "start_up_seconds": {side: timings[side].start_up() for side in sides},
    }
    write_json(report, json_path)
    return report


# -- text-heavy: each distinct text encoded once per job ----------------------------------------------

# small-zimage's Qwen3 is 128 wide and 4 layers deep: next to its transformer it costs little.
# 4x wider and 3x deeper, it takes most of a 64x64 image at 4 steps, as an 8B LLM does beside
# a distilled few-step transformer
TEXT_HEAVY_WIDTH = 512
TEXT_HEAVY_LAYERS = 12


def build_text_heavy_model(directory: str) -> str:
    """``small-zimage`` with a wider, deeper text encoder (the transformer reads the wider captions), as a diffusers folder."""
    from workers.families import zimage
    from workers.families.preset_parts import PRESET_SIZES

    size = replace(PRESET_SIZES["small"], text_width=TEXT_HEAVY_WIDTH, text_layers=TEXT_HEAVY_LAYERS)
    zimage.build_preset(size).save_pretrained(directory, safe_serialization=True)
    return directory


def make_repeated_prompt_rows(count: int, distinct: int, first_seed: int) -> list[PromptRow]:
    """``count`` rows cycling ``distinct`` prompts, each row with its own seed: many seeds per prompt."""
    prompts = [row.prompt for row in make_prompt_rows(distinct, first_seed)]
    return [PromptRow(id=f"prompt-{index:05d}", prompt=prompts[index % distinct], seed=first_seed + index) for index in range(count)]


@dataclass(kw_only=True)
class TextCacheResult:
    text_cache: str  # "off" | "on"
    wall_seconds: float
    images: int
    texts_encoded: int
    texts_reused: int
    text_encoder_seconds: float  # the text stage's busy seconds, the cache's own time included
    other_stage_seconds: float  # denoiser and VAE decoder busy seconds
    cache_seconds: float  # inside the text stage: lookups, fetches, puts, registrations
    cache: dict | None = None  # run.json's text_cache
    max_pixel_difference: int | None = None  # vs the run with the cache off


def run_text_cache_variant(text_cache: bool, model: str, prompts_path: str, output_directory: str, settings: BenchmarkSettings,
                           placement: str, text_actors: int) -> tuple[TextCacheResult, dict[str, np.ndarray]]:
    from pipelines.generation.generate import run_generation
    from pipelines.runtime.config import GenerateConfig, StageOptions

    stage = "fused" if placement == "fused" else "text_encoder"
    threads = {"threads": max(1, (os.cpu_count() or 1) // text_actors)} if placement == "fused" else {}
    config = GenerateConfig(
        prompts=prompts_path, output=output_directory, model=model, steps=settings.steps, guidance=settings.guidance,
        height=settings.size, width=settings.size, batch_size=settings.batch_size, placement=placement, overwrite=True,
        stages={stage: StageOptions(concurrency=text_actors, **threads)}, text_cache=text_cache,
    )
    wait_for_actors_to_exit(timeout=30.0)
    record = run_generation(config)
    busy = record.get("stage_busy_seconds", {})
    cache = record.get("text_cache")
    result = TextCacheResult(
        text_cache="on" if text_cache else "off", wall_seconds=record["wall_seconds"], images=record["counts"]["generated_this_run"],
        texts_encoded=record["texts_encoded"], texts_reused=record["texts_reused"], text_encoder_seconds=busy.get("text_encoder", 0.0),
        other_stage_seconds=sum(seconds for name, seconds in busy.items() if name != "text_encoder"),
        cache_seconds=(cache or {}).get("seconds_in_text_stage", 0.0), cache=cache,
    )
    return result, read_latentray_images(output_directory)


def run_text_heavy_benchmark(settings: BenchmarkSettings, distinct: int, placement: str, text_actors: int, repeats: int,
                             json_path: str | None) -> dict:
    results: dict[str, TextCacheResult] = {}
    images: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="latentray-benchmark-") as work_directory:
        print("building the text-heavy model ...", file=sys.stderr, flush=True)
        model = build_text_heavy_model(os.path.join(work_directory, "model"))
        guidance = settings.guidance if settings.guidance is not None else describe_model(model).shape.default_guidance
        settings = replace(settings, model=model, guidance=guidance)
        prompts_path = os.path.join(work_directory, "prompts.parquet")
        write_prompt_table(make_repeated_prompt_rows(settings.prompts, distinct, settings.seed), prompts_path)
        ray_start_seconds = start_ray()
        try:
            # the variants take turns and the fastest run of each counts: a shared machine slows runs, never speeds them
            for repeat in range(repeats):
                for key in ("off", "on") if repeat % 2 == 0 else ("on", "off"):  # each goes first (Ray cold) once in two
                    print(f"running latentray, text cache {key} (run {repeat + 1} of {repeats}) ...", file=sys.stderr, flush=True)
                    result, images[key] = run_text_cache_variant(key == "on", model, prompts_path, os.path.join(work_directory, key),
                                                                 settings, placement, text_actors)
                    if key not in results or result.wall_seconds < results[key].wall_seconds:
                        results[key] = result
        finally:
            ray.shutdown()
    results["on"].max_pixel_difference = max_pixel_difference(images["on"], images["off"])
    print(format_text_heavy(results, settings, distinct, placement, text_actors, ray_start_seconds))
    report = {
        "settings": {**asdict(settings), "model": f"small-zimage, text encoder {TEXT_HEAVY_WIDTH} wide x {TEXT_HEAVY_LAYERS} layers",
                     "distinct_prompts": distinct, "placement": placement, "text_actors": text_actors, "repeats": repeats},
        "machine": machine_dictionary(), "load_average": os.getloadavg(), "ray_start_seconds": ray_start_seconds,
        "variants": {key: asdict(result) for key, result in results.items()},
    }
    write_json(report, json_path)
    return report


def format_text_heavy(results: dict[str, TextCacheResult], settings: BenchmarkSettings, distinct: int, placement: str,
                      text_actors: int, ray_start_seconds: float) -> str:
    off, on = results["off"], results["on"]
    header = ("text cache", "images", "wall s", "images/s", "texts encoded", "texts reused", "text encoder busy s",
              "of which cache s", "other stages busy s", "max |Δpixel| vs off")
    rows = [(
        result.text_cache, str(result.images), f"{result.wall_seconds:.1f}", f"{result.images / result.wall_seconds:.3f}",
        str(result.texts_encoded), str(result.texts_reused), f"{result.text_encoder_seconds:.1f}", f"{result.cache_seconds:.2f}",
        f"{result.other_stage_seconds:.1f}", optional(result.max_pixel_difference, "{}"),
    ) for result in (off, on)]
    per_text = off.text_encoder_seconds / off.texts_encoded if off.texts_encoded else 0.0
    saved = off.text_encoder_seconds - (on.text_encoder_seconds - on.cache_seconds)
    lines = [
        f"\nlatentray text-heavy benchmark: small-zimage with a {TEXT_HEAVY_WIDTH}-wide, {TEXT_HEAVY_LAYERS}-layer Qwen3, "
        f"{settings.prompts} rows of {distinct} distinct prompts, {settings.size}x{settings.size}, {settings.steps} steps, "
        f"batch size {settings.batch_size}, {placement} placement, {text_actors} text-stage actors, {os.cpu_count()} CPUs\n",
        format_columns(header, rows), "",
        f"- encoding: {off.texts_encoded - on.texts_encoded} fewer texts encoded with the cache; the text encoder's busy time "
        f"without the cache's own {saved:.1f}s lower (about {per_text:.2f}s per text encoded without it); the cache cost "
        f"{on.cache_seconds:.2f}s in the actors (lookups, fetches, puts), {on.cache_seconds / max(on.texts_reused, 1) * 1000:.1f} ms "
        f"per text reused, and {(on.cache or {}).get('seconds_waiting', 0.0):.2f}s of waiting for texts another actor was "
        f"encoding. Net: {off.text_encoder_seconds - on.text_encoder_seconds:.1f}s of text-encoder busy time saved.",
        f"- wall: {off.wall_seconds:.1f}s without the cache, {on.wall_seconds:.1f}s with it ({off.wall_seconds / on.wall_seconds:.2f}x); "
        f"actors start up inside wall time (Ray itself took {ray_start_seconds:.1f}s to start, not included).",
        f"- the cache with it on: {json.dumps(on.cache)}",
        "- without the job cache each text-stage actor encodes every text it meets once (its own cache); with it, once per "
        "job: an actor that asks for a text another actor is encoding waits for it ('waits'; 'duplicates' counts texts "
        "encoded twice after a claim expired).",
        "- the first run on a fresh Ray starts its actors cold: with --repeats 2 each variant goes first once and the "
        "fastest run of each counts.",
        "- timings on a shared machine vary by up to 1.5x between runs: figures are indicative; compare within one run.",
    ]
    return "\n".join(lines)


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
    parser.add_argument("--size", type=positive_integer, default=128, help="image height and width in pixels, a multiple of the family's (8 or 16)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model family's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--memory-interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--whole-process", action="store_true",
                        help="time a plain diffusers process and the latentray command as whole processes at two job sizes")
    parser.add_argument("--sizes", type=positive_integer, nargs=2, default=(16, 64), metavar=("SMALL", "LARGE"),
                        help="job sizes (prompts) of --whole-process and --loras")
    parser.add_argument("--repeats", type=positive_integer, default=2,
                        help="--whole-process, --text-heavy, --loras: runs per variant; the fastest counts")
    parser.add_argument("--text-heavy", action="store_true",
                        help="time latentray with the job text cache off and on, on a model whose text encoder dominates "
                             "(--model is not used), rows of --distinct prompts with a seed each")
    parser.add_argument("--distinct", type=positive_integer, default=8, help="--text-heavy: distinct prompts the rows cycle through")
    parser.add_argument("--placement", choices=("fused", "split"), default="fused", help="--text-heavy: latentray's placement")
    parser.add_argument("--text-actors", type=positive_integer, default=2,
                        help="--text-heavy: text-stage actors (fused actors, or the split text encoder's pool)")
    parser.add_argument("--loras", type=positive_integer, metavar="N",
                        help="time the latentray command with rows cycling through N LoRA files against the same rows without")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    settings = BenchmarkSettings(
        model=options.model, prompts=options.prompts, steps=options.steps, batch_size=options.batch_size,
        size=options.size, guidance=options.guidance, seed=options.seed, memory_interval=options.memory_interval,
    )
    if options.loras:
        run_lora_benchmark(settings, tuple(sorted(options.sizes)), options.repeats, options.loras, options.json)
    elif options.text_heavy:
        run_text_heavy_benchmark(settings, options.distinct, options.placement, options.text_actors, options.repeats, options.json)
    elif options.whole_process:
        run_whole_process_benchmark(settings, tuple(sorted(options.sizes)), options.repeats, options.json)
    else:
        run_benchmark(settings, options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
