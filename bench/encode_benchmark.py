"""Benchmark: plain VAE-encoding loops against latentray's encode pipeline.

One run, one machine, one model, one corpus of JPEGs in a Parquet table, three variants:

    (a) plain loop, one image at a time   decode + resize/crop one image, then vae.encode it alone
    (b) plain loop, batched               decode + resize/crop --batch-size images, then one vae.encode
    (c) latentray                         run_encoding (default placement) on embedded Ray

(a) and (b) decode and crop with latentray's own functions (pipelines.encoding.image_decode, the
same Preprocessing latentray builds), and encode as latentray's VAE worker does:
pixels / 127.5 - 1, latent_dist.mean * scaling_factor, float32, torch on every core.

For each: images per second and its ratio to (a) and to (b), the peak resident memory,
and the largest latent difference from (a) (a check that every variant did the same
work; (c) stores float16, so its rounding shows). For (c) also the stage-compute
efficiency (the stages' summed busy seconds / the run's wall seconds) and where its
time went (Ray Data's per-operator statistics).

    python bench/encode_benchmark.py                      # small preset, 512 JPEGs of 256x256 -> 128x128
    python bench/encode_benchmark.py --model tiny --images 64 --json result.json

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import io as bytes_io
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image, ImageDraw

from workers.runtime.presets import PRESETS, materialize_preset

# shared with the other benchmarks; `python bench/encode_benchmark.py` puts bench/ first on sys.path
from common import (
    MemoryUsage, PeakMemorySampler, driver_and_ray_worker_pids, driver_peak, driver_pids, format_columns,
    machine_dictionary, mebibytes, optional, positive_integer, release_freed_memory, reset_driver_peak, start_ray,
    variants_dictionary, wait_for_actors_to_exit, write_json,
)

# what latentray should reach on this benchmark (printed beside the figures, never asserted)
TARGET_VS_ONE_AT_A_TIME = 3.0
TARGET_VS_BATCHED = 0.9
JPEG_QUALITY = 90
# the logger that prints Ray Data's per-operator statistics when a dataset finishes
RAY_DATA_STATS_LOGGER = "ray.data._internal.execution.streaming_executor"


# -- settings and results -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BenchmarkSettings:
    model: str
    images: int
    image_size: int  # side of the corpus' JPEGs
    size: int  # side of the crop every variant encodes
    batch_size: int
    seed: int
    memory_interval: float


@dataclass(kw_only=True)
class VariantResult:
    key: str
    label: str
    images: int
    wall_seconds: float
    images_per_second: float
    memory: MemoryUsage
    load_seconds: float | None = None  # plain loops only: loading the VAE, outside wall_seconds
    decode_seconds: float | None = None  # plain loops only: decode + resize/crop, inside wall_seconds
    encode_seconds: float | None = None  # plain loops only: vae.encode, inside wall_seconds
    stage_busy_seconds: dict[str, float] = field(default_factory=dict)
    compute_efficiency: float | None = None
    ratio_to_one_at_a_time: float | None = None
    ratio_to_batched: float | None = None
    max_latent_difference: float | None = None  # largest |difference| to (a)'s latents
    compared_latents: int = 0
    load_average_before: tuple[float, float, float] | None = None
    ray_data_stats: str | None = None
    notes: list[str] = field(default_factory=list)


# -- the corpus -----------------------------------------------------------------------------------


def make_image(index: int, size: int, seed: int) -> bytes:
    """A colourful JPEG, the same for the same (seed, index): gradient, shapes, a little grain."""
    rng = np.random.default_rng([seed, index])
    # 1. a smooth background: four random corner colours blended across the image
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    y, x = ramp[:, None, None], ramp[None, :, None]
    background = (corners[0, 0] * (1 - y) * (1 - x) + corners[0, 1] * (1 - y) * x
                  + corners[1, 0] * y * (1 - x) + corners[1, 1] * y * x)
    image = Image.fromarray(background.astype(np.uint8), "RGB")

    # 2. random shapes in random colours: edges and flat areas, as in photographs and drawings
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 16))):
        colour = tuple(int(value) for value in rng.integers(0, 256, 3))
        x0, y0 = (int(value) for value in rng.integers(-size // 4, size, 2))
        width, height = (int(value) for value in rng.integers(size // 10, size // 2, 2))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x0 + width, y0 + height), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + width, y0 + height), fill=colour)
        else:
            draw.polygon([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)], fill=colour)

    # 3. grain, so the JPEG holds fine detail to decode
    grain = rng.normal(0.0, 6.0, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = bytes_io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_corpus(settings: BenchmarkSettings, path: str) -> tuple[int, float]:
    """The corpus as a Parquet table (``id``, ``image`` bytes); returns (bytes of JPEG data, seconds)."""
    started = time.perf_counter()
    images = [make_image(index, settings.image_size, settings.seed) for index in range(settings.images)]
    table = pa.table({
        "id": [f"image-{index:05d}" for index in range(settings.images)],
        "image": pa.array(images, pa.binary()),
    })
    pq.write_table(table, path)
    return sum(len(image) for image in images), time.perf_counter() - started


def read_corpus(path: str) -> tuple[list[str], list[bytes]]:
    table = pq.read_table(path, columns=["id", "image"])
    return table.column("id").to_pylist(), table.column("image").to_pylist()


# -- (a) and (b): plain loops in this process -----------------------------------------------------


def encode_config(settings: BenchmarkSettings, images_path: str, output_directory: str):
    """The latentray run of (c); (a) and (b) take their preprocessing from the same config."""
    from pipelines.runtime.config import EncodeConfig

    return EncodeConfig(
        images=images_path, output=output_directory, model=settings.model, resolution=settings.size,
        crop="center", sample="mean", batch_size=settings.batch_size, overwrite=True,
    )


def latentray_preprocessing(config):
    """The Preprocessing latentray builds for ``config`` (the same function plan_encoding calls)."""
    from pipelines.encoding.encode import _preprocessing
    from pipelines.runtime.model_source import describe_model

    return _preprocessing(config, describe_model(config.model), config.resolution)


def load_vae(model_directory: str):
    import diffusers
    from diffusers import AutoencoderKL

    diffusers.utils.logging.disable_progress_bar()
    return AutoencoderKL.from_pretrained(os.path.join(model_directory, "vae"), local_files_only=True).eval()


class PlainEncoder:
    """Decode, crop and encode as latentray does, in this process, timing decode and encode apart."""

    def __init__(self, vae, preprocessing, run_seed: int):
        self.vae, self.preprocessing, self.run_seed = vae, preprocessing, run_seed
        self.decode_seconds = self.encode_seconds = 0.0

    def crop(self, row_id: str, data: bytes) -> np.ndarray:
        from pipelines.encoding.image_decode import preprocess
        from pipelines.runtime.row_ids import derived_seed

        started = time.perf_counter()
        # the row's seed as latentray derives it (a centre crop does not use it)
        pixels = preprocess(data, self.preprocessing, derived_seed(self.run_seed, row_id)).pixels
        self.decode_seconds += time.perf_counter() - started
        return pixels

    @torch.inference_mode()
    def encode(self, crops: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        # as VaeEncoderWorker: uint8 [0, 255] -> [-1, 1], channels first, float32
        images = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor
        result = latents.float().numpy()
        self.encode_seconds += time.perf_counter() - started
        return result


def encode_one_at_a_time(encoder: PlainEncoder, ids: list[str], images: list[bytes], batch_size: int) -> list[np.ndarray]:
    latents = []
    for row_id, data in zip(ids, images):
        latents.extend(encoder.encode(encoder.crop(row_id, data)[None]))
    return latents


def encode_batched(encoder: PlainEncoder, ids: list[str], images: list[bytes], batch_size: int) -> list[np.ndarray]:
    latents = []
    for start in range(0, len(ids), batch_size):
        crops = np.stack([encoder.crop(row_id, data) for row_id, data in zip(ids[start:start + batch_size], images[start:start + batch_size])])
        latents.extend(encoder.encode(crops))
    return latents


def run_plain_variant(
    key: str, label: str, encode, model_directory: str, preprocessing, images_path: str, settings: BenchmarkSettings,
) -> tuple[VariantResult, dict[str, np.ndarray]]:
    release_freed_memory()
    load_average = os.getloadavg()
    exact = reset_driver_peak()
    method = "driver VmHWM (exact peak)" if exact else f"driver RSS sampled every {settings.memory_interval}s"
    with PeakMemorySampler(driver_pids, settings.memory_interval, method) as sampler:
        started = time.perf_counter()
        vae = load_vae(model_directory)
        loaded = time.perf_counter()
        # reading the table is part of the loop's work, as it is of latentray's
        ids, images = read_corpus(images_path)
        encoder = PlainEncoder(vae, preprocessing, run_seed=0)
        latents = encode(encoder, ids, images, settings.batch_size)
        finished = time.perf_counter()
    memory = sampler.usage(driver_peak() if exact else 0)
    decode_seconds, encode_seconds = encoder.decode_seconds, encoder.encode_seconds
    del vae, encoder, images
    release_freed_memory()
    wall = finished - loaded
    result = VariantResult(
        key=key, label=label, images=len(latents), wall_seconds=wall, images_per_second=len(latents) / wall,
        load_seconds=loaded - started, decode_seconds=decode_seconds, encode_seconds=encode_seconds,
        memory=memory, load_average_before=load_average,
    )
    return result, dict(zip(ids, latents))


# -- (c): latentray on embedded Ray ---------------------------------------------------------------


class RayDataStats(logging.Handler):
    """Catches the per-operator statistics Ray Data logs when a dataset finishes (driver side only)."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.summaries: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Operator" in message and ("Wall time" in message or "wall time" in message.lower()):
            self.summaries.append(message)

    def __enter__(self) -> "RayDataStats":
        import ray.data

        context = ray.data.DataContext.get_current()
        self._previous = context.enable_auto_log_stats
        context.enable_auto_log_stats = True
        self._logger = logging.getLogger(RAY_DATA_STATS_LOGGER)
        self._previous_level = self._logger.level
        self._logger.addHandler(self)
        if not self._logger.isEnabledFor(logging.INFO):
            self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exception) -> None:
        import ray.data

        self._logger.removeHandler(self)
        self._logger.setLevel(self._previous_level)
        ray.data.DataContext.get_current().enable_auto_log_stats = self._previous


def read_latentray_latents(output_directory: str) -> dict[str, np.ndarray]:
    """Latents by row id, from the output's latents/ table (its contract), in their stored dtype."""
    from pipelines.encoding.latent_output import latents_of
    from pipelines.runtime import io
    from pipelines.runtime.outputs import RunOutput

    latents = {}
    for uri in io.list_parquet_files(RunOutput(output_directory, "latents").results_uri):
        table = io.read_parquet_file(uri, ["id", "latent", "latent_shape"])
        latents.update(zip(table.column("id").to_pylist(), latents_of(table)))
    return latents


def run_latentray_variant(
    key: str, label: str, config, settings: BenchmarkSettings,
) -> tuple[VariantResult, dict[str, np.ndarray], dict]:
    from pipelines.encoding.encode import run_encoding

    wait_for_actors_to_exit(timeout=30.0)
    release_freed_memory()
    load_average = os.getloadavg()
    method = f"driver + Ray worker processes, RSS summed, sampled every {settings.memory_interval}s"
    with RayDataStats() as stats, PeakMemorySampler(driver_and_ray_worker_pids, settings.memory_interval, method) as sampler:
        record = run_encoding(config)
    busy = record.get("stage_busy_seconds", {})
    wall = record["wall_seconds"]
    result = VariantResult(
        key=key, label=label, images=record["counts"]["encoded_this_run"], wall_seconds=wall,
        images_per_second=record["images_per_second"] or 0.0, memory=sampler.usage(), stage_busy_seconds=busy,
        compute_efficiency=sum(busy.values()) / wall if wall else None, load_average_before=load_average,
        ray_data_stats="\n".join(stats.summaries) or None,
    )
    if record["status"] != "complete" or record["counts"]["error_rows"]:
        result.notes.append(f"run {record['status']}: counts {record['counts']}, errors {record['error_reasons']}")
    if not busy:
        result.notes.append("run.json has no stage_busy_seconds: compute efficiency unknown")
    return result, read_latentray_latents(config.output), record


# -- comparison and report ------------------------------------------------------------------------


def max_latent_difference(latents: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float | None, int]:
    shared = [row_id for row_id in reference if row_id in latents]
    if not shared:
        return None, 0
    difference = max(float(np.abs(latents[row_id].astype(np.float32) - reference[row_id]).max()) for row_id in shared)
    return difference, len(shared)


def compare(results: list[VariantResult], latents: dict[str, dict[str, np.ndarray]]) -> None:
    by_key = {result.key: result for result in results}
    for result in results:
        for attribute, reference in (("ratio_to_one_at_a_time", "a"), ("ratio_to_batched", "b")):
            speed = by_key[reference].images_per_second
            setattr(result, attribute, result.images_per_second / speed if speed else None)
        result.max_latent_difference, result.compared_latents = max_latent_difference(latents[result.key], latents["a"])
        missing = len(latents["a"]) - len(latents[result.key])
        if missing > 0:
            result.notes.append(f"{missing} latent(s) missing compared to (a)")


def target_text(result: VariantResult) -> str:
    if result.key != "c":
        return ""
    met = lambda ratio, target: "-" if ratio is None else ("met" if ratio >= target else "MISSED")  # noqa: E731
    return (f">={TARGET_VS_ONE_AT_A_TIME:g}x (a): {met(result.ratio_to_one_at_a_time, TARGET_VS_ONE_AT_A_TIME)}, "
            f">={TARGET_VS_BATCHED:g}x (b): {met(result.ratio_to_batched, TARGET_VS_BATCHED)}")


def format_table(results: list[VariantResult]) -> str:
    header = ("variant", "images", "wall seconds", "images/s", "vs (a)", "vs (b)", "compute efficiency", "peak RSS MiB",
              "above start MiB", "peak anonymous MiB", "max |Δlatent| vs (a)", "targets")
    rows = [(
        result.label, str(result.images), f"{result.wall_seconds:.1f}", f"{result.images_per_second:.2f}",
        optional(result.ratio_to_one_at_a_time, "{:.2f}x"), optional(result.ratio_to_batched, "{:.2f}x"),
        optional(result.compute_efficiency, "{:.2f}"), mebibytes(result.memory.peak_resident),
        mebibytes(result.memory.above_baseline), mebibytes(result.memory.peak_anonymous),
        optional(result.max_latent_difference, "{:.2e}"), target_text(result),
    ) for result in results]
    return format_columns(header, rows)


def format_load(load: tuple[float, float, float] | None) -> str:
    return "-" if load is None else " / ".join(f"{value:.2f}" for value in load)


def format_notes(results: list[VariantResult], latents: dict[str, dict[str, np.ndarray]], ray_start_seconds: float,
                 corpus_note: str) -> str:
    by_key = {result.key: result for result in results}
    a, b, c = by_key["a"], by_key["b"], by_key["c"]
    reference = latents["a"]
    # what storing (a)'s latents as float16 alone changes: the floor for (c), which stores float16
    rounding = max(float(np.abs(latent.astype(np.float16).astype(np.float32) - latent).max()) for latent in reference.values())
    magnitude = max(float(np.abs(latent).max()) for latent in reference.values())
    c_vs_b, _ = max_latent_difference(latents["c"], {k: v.astype(np.float16).astype(np.float32) for k, v in latents["b"].items()})
    lines = [
        f"- corpus: {corpus_note}",
        f"- (a), (b): wall = reading the Parquet table + decode/crop + encode; loading the VAE took {a.load_seconds:.1f}s "
        f"and {b.load_seconds:.1f}s more. Inside wall: decode + resize/crop {a.decode_seconds:.1f}s / {b.decode_seconds:.1f}s, "
        f"vae.encode {a.encode_seconds:.1f}s / {b.encode_seconds:.1f}s. torch threads: {torch.get_num_threads()}.",
        "- (c): wall = run_encoding's wall_seconds: includes planning, actor start-up (importing torch and diffusers, "
        "loading the VAE), reading the table, hashing and decoding in Ray tasks, writing latents/ parts, latent_stats.json "
        f"and run.json. Starting Ray itself ({ray_start_seconds:.1f}s) is not included.",
    ]
    if c.stage_busy_seconds:
        busy = sum(c.stage_busy_seconds.values())
        stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in c.stage_busy_seconds.items())
        lines.append(
            f"- (c) compute efficiency = sum(stage_busy_seconds) / wall = {busy:.1f}s / {c.wall_seconds:.1f}s ({stages}). "
            f"While busy its VAE encoded {c.images / busy:.2f} images/s (vs (b)'s vae.encode alone: "
            f"{b.images / b.encode_seconds:.2f} images/s); the other {c.wall_seconds - busy:.1f}s of wall are start-up, "
            "waiting for decoded batches and writing."
        )
    lines += [
        "- memory: (a), (b) this process, from before loading the VAE; (c) this process plus every Ray worker process "
        "(ray::*, Ray Data's helper actors included; raylet, GCS and agents not), summed. Summed RSS counts shared pages "
        "once per process; 'peak anonymous' counts private memory only. 'above start' = peak minus the same sum just "
        "before the variant.",
        f"- max |Δlatent| vs (a): over {a.compared_latents} latents of |values| up to {magnitude:.2f}. (c) stores float16: "
        f"rounding (a)'s own latents to float16 changes them by up to {rounding:.2e}; (c) vs float16-rounded (b): "
        f"{optional(c_vs_b, '{:.2e}')}. CPU kernels also depend on batch size.",
        f"- targets: latentray >= {TARGET_VS_ONE_AT_A_TIME:g}x (a) and >= {TARGET_VS_BATCHED:g}x (b).",
        "- load average (1 / 5 / 15 min) before each variant: "
        + "; ".join(f"{result.key} {format_load(result.load_average_before)}" for result in results)
        + f" ({os.cpu_count()} CPUs). On shared machines timings vary by up to 1.5x between runs: compare figures "
        "from one run only.",
    ]
    for result in results:
        lines.extend(f"- {result.label}: {note}" for note in result.notes)
    return "\n".join(lines)


# -- the benchmark --------------------------------------------------------------------------------


def run_benchmark(settings: BenchmarkSettings, json_path: str | None) -> dict:
    load_at_start = os.getloadavg()
    print(f"load average at start (1 / 5 / 15 min): {format_load(load_at_start)} on {os.cpu_count()} CPUs", flush=True)
    model_directory = materialize_preset(settings.model) if settings.model in PRESETS else settings.model
    results: list[VariantResult] = []
    latents: dict[str, dict[str, np.ndarray]] = {}

    with tempfile.TemporaryDirectory(prefix="latentray-encode-benchmark-") as work_directory:
        images_path = os.path.join(work_directory, "images.parquet")
        print(f"writing {settings.images} JPEGs ...", file=sys.stderr, flush=True)
        corpus_bytes, corpus_seconds = write_corpus(settings, images_path)
        corpus_note = (f"{settings.images} JPEGs of {settings.image_size}x{settings.image_size} (quality {JPEG_QUALITY}, "
                       f"{corpus_bytes / settings.images / 1024:.1f} KiB each on average), one Parquet file; made in "
                       f"{corpus_seconds:.1f}s, outside every variant")
        config = encode_config(settings, images_path, os.path.join(work_directory, "output"))
        preprocessing = latentray_preprocessing(config)

        # plain loops first, before Ray exists: Ray's idle processes would take CPU from them
        torch.set_num_threads(os.cpu_count() or 1)
        # the first load imports diffusers' modules; without this, (a) alone would pay for them
        load_vae(model_directory)
        for key, label, encode in (("a", "(a) plain loop, one at a time", encode_one_at_a_time),
                                   ("b", "(b) plain loop, batched", encode_batched)):
            print(f"running {label} ...", file=sys.stderr, flush=True)
            result, latents[key] = run_plain_variant(key, label, encode, model_directory, preprocessing, images_path, settings)
            results.append(result)

        ray_start_seconds = start_ray()
        try:
            label = "(c) latentray"
            print(f"running {label} ...", file=sys.stderr, flush=True)
            result, latents["c"], record = run_latentray_variant("c", label, config, settings)
            results.append(result)
        finally:
            ray.shutdown()

    compare(results, latents)
    load_at_end = os.getloadavg()
    print(f"\nlatentray encode benchmark: model {settings.model} (VAE only), {settings.images} images "
          f"{settings.image_size}x{settings.image_size} -> {settings.size}x{settings.size} centre crop, posterior mean, "
          f"batch size {settings.batch_size}, placement {record.get('placement')}, {os.cpu_count()} CPUs\n")
    print(format_table(results))
    print()
    print(format_notes(results, latents, ray_start_seconds, corpus_note))
    if results[-1].ray_data_stats:
        print("\nRay Data statistics of (c):\n" + results[-1].ray_data_stats)
    print(f"\nload average (1 / 5 / 15 min): at start {format_load(load_at_start)}, at end {format_load(load_at_end)}")
    report = {
        "settings": asdict(settings),
        "machine": machine_dictionary(),
        "load_average": {"start": load_at_start, "end": load_at_end},
        "ray_start_seconds": ray_start_seconds,
        "targets": {"vs_one_at_a_time": TARGET_VS_ONE_AT_A_TIME, "vs_batched": TARGET_VS_BATCHED},
        "latentray_record": {name: record.get(name) for name in ("status", "placement", "stages", "counts", "wall_seconds",
                                                                   "images_per_second", "stage_busy_seconds")},
        "variants": variants_dictionary(results),
    }
    write_json(report, json_path)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare plain decode + VAE-encode loops with latentray's encode pipeline on the same model and "
                    "corpus (images/s, ratios to the one-at-a-time and batched loops, stage-compute efficiency, "
                    "peak memory, latent differences).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="small", help=f"preset name ({', '.join(PRESETS)}) or a local diffusers directory; its VAE is used")
    parser.add_argument("--images", type=positive_integer, default=512, help="number of generated JPEGs")
    parser.add_argument("--image-size", type=positive_integer, default=256, help="side of the generated JPEGs in pixels")
    parser.add_argument("--size", type=positive_integer, default=128,
                        help="side of the centre crop every variant encodes, a multiple of 8 (latentray's --resolution)")
    parser.add_argument("--batch-size", type=positive_integer, default=16, help="images per vae.encode for (b) and (c)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    parser.add_argument("--memory-interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.size % 8:
        parser.error(f"--size must be a multiple of 8, got {options.size}")
    if options.size > options.image_size:
        parser.error(f"--size ({options.size}) must not exceed --image-size ({options.image_size}): latentray refuses to upscale")
    settings = BenchmarkSettings(
        model=options.model, images=options.images, image_size=options.image_size, size=options.size,
        batch_size=options.batch_size, seed=options.seed, memory_interval=options.memory_interval,
    )
    run_benchmark(settings, options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
