"""GPU benchmark: the families' models at their real shapes (random weights), and one whole job.

Nothing can be downloaded, so every model is built from its real config with random weights,
directly on the device in its dtype: what is timed is the real amount of work per step.

Sections (``--sections``, default all, in this order):

    flux        FLUX.1-dev transformer at 1024 px: ms per step at batch 1, 2, 4; each available
                attention backend (batch 1); compiled (regional) against eager, and the compile time
    sdxl        SDXL U-Net at 1024 px, float16 against bfloat16, batch 2 to 16
    vae         the FLUX/SD3 VAE: decode and encode throughput at 1024 px by batch size
    zimage      Z-Image transformer at 1024 px, batch 1 and 2
    qwenimage   Qwen-Image transformer at 1024 px, batch 1
    job         one whole ``latentray generate`` process against diffusers' own batched pipeline
                (``bench/diffusers_baseline.py``) on the same GPU, at 512 px, an SD 1.5-shaped model,
                at two job sizes: the steady-state ratio and the start-up difference (as the CPU
                benchmark's ``--whole-process``)

Every model row has its FLOPs per call (counted by torch's ``FlopCounterMode`` on one call), the
TFLOP/s reached and the fraction of the GPU's dense bf16 peak (``--peak-tflops``, else a table of
known GPUs), and the peak GPU memory of the section. Sections run until ``--budget-seconds``;
one that fails records its error and the others go on.

    python bench/gpu_benchmark.py --json gpu.json --markdown gpu.md      # one H100: about 7 minutes
    python bench/gpu_benchmark.py --smoke                                # every section on CPU, tiny shapes, < 1 minute

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

BENCH_FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_FOLDER))  # the project, when run as `python bench/gpu_benchmark.py`

from workers.runtime.speed import CPU_ATTENTION_BACKENDS, DEFAULT_COMPILE_BACKEND, DenoiserSpeed  # noqa: E402

SECTIONS = ("flux", "sdxl", "vae", "zimage", "qwenimage", "job")
PROCESS_SECONDS = 240  # one process of the whole-job section, at most
# what each section was expected to take on one H100 (rough, before any run): a section starts only when
# it should end within the budget, so that the whole command stays within --budget-seconds
EXPECTED_SECONDS = {"flux": 150, "sdxl": 45, "vae": 30, "zimage": 30, "qwenimage": 45, "job": 150}
# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the most specific name first
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))
# candidate attention backends for the FLUX section: those diffusers ships without a download
ATTENTION_CANDIDATES = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage", "xformers")

# real configs (diffusers' class defaults are the released models' where not given)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
Z_IMAGE: dict = {}  # ZImageTransformer2DModel's defaults are Z-Image's (dim 3840, 30 layers)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


@dataclass(frozen=True, kw_only=True)
class Settings:
    smoke: bool
    device: str
    sections: tuple[str, ...]
    budget_seconds: float
    compile_backend: str
    peak_tflops: float | None
    dtype: str  # bfloat16 (GPU); float32 in the smoke mode (half precision on CPU is slow, and its figures mean nothing)
    sdxl_dtypes: tuple[str, ...]
    size: int  # image side of the model sections
    text_tokens: int
    batches: tuple[int, ...]  # FLUX
    sdxl_batches: tuple[int, ...]
    vae_batches: tuple[int, ...]
    warmup: int  # calls before timing
    repeats: int  # timed calls
    job_size: int  # the whole job's image side
    job_steps: int
    job_sizes: tuple[int, ...]  # images per job; two sizes give the steady state and the start-up
    job_batch: int


@dataclass(kw_only=True)
class Row:
    section: str
    model: str
    variant: str  # dtype, attention backend, eager/compiled, decode/encode
    batch: int
    ms_per_call: float | None = None
    images_per_second: float | None = None
    gflops_per_call: float | None = None
    tflops_per_second: float | None = None
    fraction_of_bf16_peak: float | None = None
    peak_memory_gib: float | None = None  # None on CPU: not measured there
    note: str = ""


@dataclass(kw_only=True)
class Report:
    settings: dict
    machine: dict
    rows: list[Row] = field(default_factory=list)
    sections: dict[str, dict] = field(default_factory=dict)  # section -> status, seconds, extra figures


# -- building and timing ------------------------------------------------------------------------


def build(model_class: type, config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A model built directly on ``device`` in ``dtype`` (no float32 copy in host memory first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    if {parameter.dtype for parameter in model.parameters()} != {dtype}:  # a layer that ignored the default dtype
        model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def tiny_config(preset: str, component: str) -> dict:
    """A preset's component config: the smoke mode's shapes, valid by construction (read from the
    preset's cached directory, built once per machine)."""
    from workers.runtime.presets import materialize_preset

    with open(os.path.join(materialize_preset(preset), component, "config.json")) as config_file:
        return json.load(config_file)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def count_flops(call: Callable[[], Any]) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            call()
        return float(counter.get_total_flops())
    except Exception:  # an operator the counter cannot follow: no figure rather than a wrong one
        return None


def time_call(call: Callable[[], Any], settings: Settings) -> float:
    """Milliseconds per call after ``settings.warmup`` untimed calls."""
    for _ in range(settings.warmup):
        call()
    synchronize(settings.device)
    started = time.perf_counter()
    for _ in range(settings.repeats):
        call()
    synchronize(settings.device)
    return (time.perf_counter() - started) * 1000 / settings.repeats


def peak_memory_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(section: str, model: str, variant: str, batch: int, call: Callable[[], Any], settings: Settings,
            flops: float | None = None, note: str = "") -> Row:
    """One row: ms per call, images per second, FLOPs and the fraction of the bf16 peak.

    ``flops``: the work of this call when already counted (the same maths compiled, or on another
    attention backend, whose kernels the counter does not see)."""
    with torch.inference_mode():
        milliseconds = time_call(call, settings)
        flops = flops or count_flops(call)
    peak = settings.peak_tflops
    tflops = flops / (milliseconds / 1000) / 1e12 if flops else None
    return Row(section=section, model=model, variant=variant, batch=batch, ms_per_call=round(milliseconds, 2),
               images_per_second=round(batch / (milliseconds / 1000), 3),
               gflops_per_call=float(f"{flops / 1e9:.4g}") if flops else None, tflops_per_second=round(tflops, 2) if tflops else None,
               fraction_of_bf16_peak=round(tflops / peak, 3) if tflops and peak else None,
               peak_memory_gib=peak_memory_gib(settings.device), note=note)


def randn(*shape: int, settings: Settings, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=settings.device, dtype=dtype)


# -- model sections ---------------------------------------------------------------------------------


def flux_inputs(config: dict, batch: int, settings: Settings, dtype: torch.dtype) -> dict:
    side = settings.size // 16  # VAE factor 8, 2x2 patches packed into tokens
    image_ids = torch.zeros(side, side, 3, device=settings.device)
    image_ids[..., 1] += torch.arange(side, device=settings.device)[:, None]
    image_ids[..., 2] += torch.arange(side, device=settings.device)[None, :]
    return dict(
        hidden_states=randn(batch, side * side, config["in_channels"], settings=settings, dtype=dtype),
        encoder_hidden_states=randn(batch, settings.text_tokens, config["joint_attention_dim"], settings=settings, dtype=dtype),
        pooled_projections=randn(batch, config["pooled_projection_dim"], settings=settings, dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=settings.device, dtype=dtype),
        img_ids=image_ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(settings.text_tokens, 3, device=settings.device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=settings.device, dtype=dtype) if config.get("guidance_embeds") else None,
        return_dict=False,
    )


def run_flux(settings: Settings, report: Report) -> None:
    from diffusers import FluxTransformer2DModel

    dtype = getattr(torch, settings.dtype)
    config = tiny_config("tiny-flux", "transformer") if settings.smoke else FLUX_DEV
    model = build(FluxTransformer2DModel, config, settings.device, dtype)
    config = dict(model.config)
    name = "FLUX.1-dev transformer"
    # 1. batch sizes, diffusers' default attention
    for batch in settings.batches:
        inputs = flux_inputs(config, batch, settings, dtype)
        report.rows.append(measure("flux", name, f"{settings.dtype} eager", batch, lambda: model(**inputs), settings))
    # 2. each attention backend this machine has (none that downloads), batch 1: the same work as eager batch 1
    inputs = flux_inputs(config, 1, settings, dtype)
    flops = next((row.gflops_per_call * 1e9 for row in report.rows if row.section == "flux" and row.batch == 1 and row.gflops_per_call), None)
    tried = {}
    for backend in attention_backends(settings.device):
        try:
            DenoiserSpeed(model, compile_backend=None, attention_backend=backend)
            report.rows.append(measure("flux", name, f"attention {backend}", 1, lambda: model(**inputs), settings, flops=flops))
            tried[backend] = "measured"
        except Exception as error:  # a backend that refuses these shapes or this GPU
            tried[backend] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    DenoiserSpeed(model, compile_backend=None, attention_backend="native")
    # 3. regional compilation: its time, then its steps
    started = time.perf_counter()
    speed = DenoiserSpeed(model, compile_backend=settings.compile_backend, attention_backend=None)
    with torch.inference_mode():
        model(**inputs)
        synchronize(settings.device)
    compile_seconds = time.perf_counter() - started
    report.rows.append(measure("flux", name, f"{settings.dtype} compiled ({settings.compile_backend})", 1, lambda: model(**inputs), settings,
                               flops=flops, note=f"compile + first call {compile_seconds:.1f} s"))
    report.sections["flux"].update(attention_backends=tried, compile_seconds=round(compile_seconds, 2), compiled=speed.compiling)
    torch._dynamo.reset()


def attention_backends(device: str) -> list[str]:
    """The candidate backends that are installed (``check_attention_backend``'s test), usable on this device."""
    from workers.families import FAMILIES
    from workers.runtime.speed import check_attention_backend

    flux = next(family for family in FAMILIES.values() if family.name == "flux")
    usable = []
    for backend in ATTENTION_CANDIDATES:
        if device == "cpu" and backend not in CPU_ATTENTION_BACKENDS:
            continue
        try:
            check_attention_backend(flux, backend)
            usable.append(backend)
        except ValueError:
            continue
    return usable or ["native"]


def run_sdxl(settings: Settings, report: Report) -> None:
    from diffusers import UNet2DConditionModel

    config = tiny_config("tiny-sdxl", "unet") if settings.smoke else SDXL_UNET
    for dtype in (getattr(torch, name) for name in settings.sdxl_dtypes):
        model = build(UNet2DConditionModel, config, settings.device, dtype)
        real = dict(model.config)
        side = settings.size // 8
        text_embeds = real["projection_class_embeddings_input_dim"] - 6 * real["addition_time_embed_dim"]
        for batch in settings.sdxl_batches:
            inputs = dict(
                sample=randn(batch, real["in_channels"], side, side, settings=settings, dtype=dtype),
                timestep=torch.full((batch,), 500, device=settings.device), return_dict=False,
                encoder_hidden_states=randn(batch, 77, real["cross_attention_dim"], settings=settings, dtype=dtype),
                added_cond_kwargs={"text_embeds": randn(batch, text_embeds, settings=settings, dtype=dtype),
                                   "time_ids": torch.tensor([[settings.size, settings.size, 0, 0, settings.size, settings.size]] * batch,
                                                            device=settings.device, dtype=dtype)},
            )
            report.rows.append(measure("sdxl", "SDXL U-Net", str(dtype).removeprefix("torch."), batch, lambda: model(**inputs), settings,
                                       note="U-Net batch (with CFG, 2 per image)"))
        del model
        reset_memory(settings.device)


def run_vae(settings: Settings, report: Report) -> None:
    from diffusers import AutoencoderKL

    dtype = getattr(torch, settings.dtype)
    config = tiny_config("tiny-flux", "vae") if settings.smoke else FLUX_VAE
    vae = build(AutoencoderKL, config, settings.device, dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for batch in settings.vae_batches:
        latents = randn(batch, vae.config.latent_channels, settings.size // factor, settings.size // factor, settings=settings, dtype=dtype)
        images = randn(batch, 3, settings.size, settings.size, settings=settings, dtype=dtype)
        report.rows.append(measure("vae", "FLUX/SD3 VAE", f"decode {settings.dtype}", batch, lambda: vae.decode(latents, return_dict=False), settings))
        report.rows.append(measure("vae", "FLUX/SD3 VAE", f"encode {settings.dtype}", batch, lambda: vae.encode(images, return_dict=False), settings))


def run_zimage(settings: Settings, report: Report) -> None:
    from diffusers import ZImageTransformer2DModel

    dtype = getattr(torch, settings.dtype)
    config = tiny_config("tiny-zimage", "transformer") if settings.smoke else Z_IMAGE
    model = build(ZImageTransformer2DModel, config, settings.device, dtype)
    real = dict(model.config)
    side = settings.size // 8
    for batch in settings.batches[:2]:
        inputs = dict(
            x=[randn(real["in_channels"], 1, side, side, settings=settings, dtype=dtype) for _ in range(batch)],
            t=torch.full((batch,), 0.5, device=settings.device, dtype=dtype),
            cap_feats=[randn(settings.text_tokens, real["cap_feat_dim"], settings=settings, dtype=dtype) for _ in range(batch)],
            return_dict=False,
        )
        report.rows.append(measure("zimage", "Z-Image transformer", f"{settings.dtype} eager", batch, lambda: model(**inputs), settings))


def run_qwenimage(settings: Settings, report: Report) -> None:
    from diffusers import QwenImageTransformer2DModel

    dtype = getattr(torch, settings.dtype)
    config = tiny_config("tiny-qwenimage", "transformer") if settings.smoke else QWEN_IMAGE
    model = build(QwenImageTransformer2DModel, config, settings.device, dtype)
    real = dict(model.config)
    side = settings.size // 16
    batch = 1
    inputs = dict(
        hidden_states=randn(batch, side * side, real["in_channels"], settings=settings, dtype=dtype),
        encoder_hidden_states=randn(batch, settings.text_tokens, real["joint_attention_dim"], settings=settings, dtype=dtype),
        encoder_hidden_states_mask=torch.ones(batch, settings.text_tokens, device=settings.device, dtype=torch.long),
        timestep=torch.full((batch,), 0.5, device=settings.device, dtype=dtype), img_shapes=[[(1, side, side)]] * batch,
        return_dict=False,
    )
    report.rows.append(measure("qwenimage", "Qwen-Image transformer", f"{settings.dtype} eager", batch, lambda: model(**inputs), settings))


# -- the whole job --------------------------------------------------------------------------------


def build_job_model(directory: str, settings: Settings) -> str:
    """A diffusers directory for the job: the ``tiny`` preset (smoke), else an SD 1.5-shaped model with
    random weights: its U-Net exactly (diffusers' defaults, 860M parameters), CLIP 768 wide x 12 layers
    (a byte-level vocabulary), a VAE of 128-512 channels."""
    from diffusers import UNet2DConditionModel

    from workers.families import sd
    from workers.families.preset_parts import PresetSize
    from workers.runtime.presets import materialize_preset

    if settings.smoke:
        return materialize_preset("tiny")
    size = PresetSize(denoiser_width=32, denoiser_depth=2, transformer_width=0, transformer_depth=0,
                      vae_channels=(128, 256, 512, 512), text_width=768, text_layers=12, image_size=settings.job_size)
    pipeline = sd.build_preset(size)
    pipeline.unet = UNet2DConditionModel(sample_size=settings.job_size // 8, cross_attention_dim=768)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def time_process(command: list[str], environment: dict) -> float:
    started = time.perf_counter()
    finished = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment, timeout=PROCESS_SECONDS)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {finished.returncode}:\n{finished.stderr[-2000:]}")
    return seconds


def run_job(settings: Settings, report: Report) -> None:
    sys.path.insert(0, BENCH_FOLDER)
    from generate_benchmark import make_prompt_rows, write_prompt_table

    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(BENCH_FOLDER), os.environ.get("PYTHONPATH")]))}
    device, dtype = ("cpu", "float32") if settings.device == "cpu" else ("cuda", "bfloat16")
    seconds: dict[str, dict[int, float]] = {"diffusers": {}, "latentray": {}}
    with tempfile.TemporaryDirectory(prefix="latentray-gpu-benchmark-") as work:
        model = build_job_model(os.path.join(work, "model"), settings)
        for images in settings.job_sizes:
            prompts = os.path.join(work, f"prompts-{images}.parquet")
            write_prompt_table(make_prompt_rows(images, 0), prompts)
            common = ["--steps", str(settings.job_steps), "--batch-size", str(settings.job_batch)]
            commands = {
                "diffusers": [sys.executable, os.path.join(BENCH_FOLDER, "diffusers_baseline.py"), "--model", model, "--prompts", prompts,
                              "--output", os.path.join(work, f"diffusers-{images}"), "--guidance", "7.5", "--size", str(settings.job_size),
                              "--device", device, "--dtype", dtype, *common],
                "latentray": [sys.executable, "-m", "jobs.cli", "generate", "--model", model, "--prompts", prompts,
                              "--output", os.path.join(work, f"latentray-{images}"), "--guidance", "7.5", "--height", str(settings.job_size),
                              "--width", str(settings.job_size), "--placement", "fused", "--overwrite", *common],
            }
            for side, command in commands.items():
                print(f"gpu benchmark: job of {images} images, {side} ...", file=sys.stderr, flush=True)
                seconds[side][images] = round(time_process(command, environment), 2)
    figures: dict[str, Any] = {"process_seconds": seconds, "image_size": settings.job_size, "steps": settings.job_steps, "batch_size": settings.job_batch}
    if len(settings.job_sizes) >= 2:
        small, large = sorted(settings.job_sizes)[:2]
        per_image = {side: (times[large] - times[small]) / (large - small) for side, times in seconds.items()}
        start_up = {side: round(times[small] - small * per_image[side], 2) for side, times in seconds.items()}
        figures.update(seconds_per_image={side: round(value, 4) for side, value in per_image.items()},
                       steady_state_ratio=round(per_image["diffusers"] / per_image["latentray"], 3) if per_image["latentray"] > 0 else None,
                       start_up_seconds=start_up, start_up_difference_seconds=round(start_up["latentray"] - start_up["diffusers"], 2))
    else:
        figures["note"] = "one job size: no steady state or start-up split (needs two)"
    report.sections["job"].update(figures)


RUNNERS = {"flux": run_flux, "sdxl": run_sdxl, "vae": run_vae, "zimage": run_zimage, "qwenimage": run_qwenimage, "job": run_job}


# -- the report -----------------------------------------------------------------------------------


def machine(settings: Settings) -> dict:
    import diffusers

    gpu = torch.cuda.get_device_name() if settings.device == "cuda" else None
    return {"device": settings.device, "gpu": gpu, "cpus": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda, "bf16_peak_tflops": settings.peak_tflops}


def known_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def markdown(report: Report) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    columns = ("section", "model", "variant", "batch", "ms_per_call", "images_per_second", "gflops_per_call", "tflops_per_second",
               "fraction_of_bf16_peak", "peak_memory_gib", "note")
    lines = [f"GPU benchmark on {report.machine.get('gpu') or 'CPU (smoke: tiny shapes, figures mean nothing)'}, "
             f"torch {report.machine['torch']}, diffusers {report.machine['diffusers']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(getattr(row, column)) for column in columns) + " |" for row in report.rows]
    lines += ["", "| section | status | seconds | figures |", "|---|---|---|---|"]
    for name, section in report.sections.items():
        extra = {key: value for key, value in section.items() if key not in ("status", "seconds")}
        lines.append(f"| {name} | {section.get('status')} | {section.get('seconds')} | {json.dumps(extra) if extra else ''} |")
    return "\n".join(lines) + "\n"


def run(settings: Settings, after_section: Callable[[Report], None] = lambda report: None) -> Report:
    """Every section in turn; ``after_section`` sees the report after each (the files are written as it goes,
    so that a run stopped from outside still leaves what it measured)."""
    report = Report(settings=asdict(settings), machine=machine(settings))
    started = time.perf_counter()
    for name in settings.sections:
        spent = time.perf_counter() - started
        expected = 0 if settings.smoke else EXPECTED_SECONDS[name]
        if spent + expected > settings.budget_seconds:
            report.sections[name] = {"status": f"skipped: {spent:.0f} s spent, ~{expected} s more would pass the budget of "
                                               f"{settings.budget_seconds:g} s"}
            continue
        print(f"gpu benchmark: {name} ...", file=sys.stderr, flush=True)
        report.sections[name] = {"status": "running"}
        reset_memory(settings.device)
        section_started = time.perf_counter()
        try:
            RUNNERS[name](settings, report)
            report.sections[name]["status"] = "done"
        except Exception as error:  # record it; the other sections still run
            report.sections[name]["status"] = f"failed: {type(error).__name__}: {str(error)[:500]}"
        report.sections[name]["seconds"] = round(time.perf_counter() - section_started, 1)
        report.sections[name]["peak_memory_gib"] = peak_memory_gib(settings.device)
        reset_memory(settings.device)
        after_section(report)
    return report


def settings_from(options: argparse.Namespace) -> Settings:
    device = "cpu" if options.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu benchmark: no CUDA GPU here; --smoke runs every section on CPU with tiny shapes")
    sections = tuple(options.sections.split(",")) if options.sections else SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"gpu benchmark: unknown sections {', '.join(sorted(unknown))}; sections are {', '.join(SECTIONS)}")
    if options.smoke:
        return Settings(smoke=True, device=device, sections=sections, budget_seconds=options.budget_seconds,
                        compile_backend=options.compile_backend or "eager", peak_tflops=options.peak_tflops, dtype="float32",
                        sdxl_dtypes=("float32",), size=32, text_tokens=8, batches=(1, 2), sdxl_batches=(2,), vae_batches=(1,),
                        warmup=0, repeats=1, job_size=32, job_steps=1, job_sizes=(1,), job_batch=1)
    return Settings(smoke=False, device=device, sections=sections, budget_seconds=options.budget_seconds,
                    compile_backend=options.compile_backend or DEFAULT_COMPILE_BACKEND, peak_tflops=options.peak_tflops or known_peak(device),
                    dtype="bfloat16", sdxl_dtypes=("float16", "bfloat16"), size=1024, text_tokens=512, batches=(1, 2, 4), sdxl_batches=(2, 4, 8, 16), vae_batches=(1, 2, 4, 8), warmup=2,
                    repeats=5, job_size=512, job_steps=20, job_sizes=(16, 64), job_batch=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every section on CPU with tiny shapes (the test suite runs this)")
    parser.add_argument("--sections", help=f"comma-separated, in this order: {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--budget-seconds", type=float, default=510.0,
                        help="a section that would end after this (by its expected time) is skipped (default: 510, 8.5 minutes)")
    parser.add_argument("--compile-backend", help=f"torch.compile backend of the compiled row (default: {DEFAULT_COMPILE_BACKEND}; eager with --smoke)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from a table of known GPUs)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    return parser


def write_files(report: Report, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        with open(json_path, "w") as json_file:
            json.dump(asdict(report), json_file, indent=2, default=str)
    if markdown_path:
        with open(markdown_path, "w") as markdown_file:
            markdown_file.write(markdown(report))


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    report = run(settings_from(options), lambda partial: write_files(partial, options.json, options.markdown))
    print(markdown(report))
    failed = [name for name, section in report.sections.items() if str(section.get("status", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
