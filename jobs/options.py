"""Command-line options shared by the ``latentray`` verbs and the ``python -m jobs.*`` entry points."""

from __future__ import annotations

import argparse

from pipelines.config import GenerateConfig, StageOptions, parse_stage_option
from workers.schedulers import SCHEDULERS


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")


def add_stage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--placement", choices=("auto", "fused", "split"), default="auto",
                        help="fused: one actor holds every model; split: one actor pool per model (default: auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model batch (default: 8)")
    parser.add_argument("--stage", action="append", default=[], metavar="STAGE.OPTION=VALUE",
                        help="per-stage scheduling, repeatable: e.g. denoiser.num_gpus=1, text_encoder.batch_size=64, "
                             "fused.concurrency=4; options: batch_size, concurrency, num_gpus, num_cpus, threads")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="model precision (default: fp16/bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--overwrite", action="store_true", help="delete what the output holds and start fresh")


def add_generate_options(parser: argparse.ArgumentParser, *, prompts_required: bool = True) -> None:
    parser.add_argument("--prompts", required=prompts_required, help="Parquet file or folder of prompts (any fsspec URI)")
    parser.add_argument("--output", required=prompts_required, help="output folder (any fsspec URI)")
    parser.add_argument("--model", default="tiny", help="preset (tiny, small) or diffusers directory, local or any fsspec URI")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    parser.add_argument("--height", type=int, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, help="image width (default: the model's)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt for rows without one")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's scheduler)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; rows without a seed derive theirs from it and their id")
    parser.add_argument("--image-format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--image-quality", type=int, default=95, help="jpeg/webp quality (default: 95)")
    parser.add_argument("--save-latents", action="store_true", help="store each final latent in the manifest")
    parser.add_argument("--max-image-size", type=int, default=2048, help="largest height or width a row may ask for")
    add_stage_options(parser)
    add_ray_options(parser)


def stage_overrides(texts: list[str]) -> dict[str, StageOptions]:
    overrides: dict[str, dict] = {}
    for text in texts:
        stage, option, value = parse_stage_option(text)
        overrides.setdefault(stage, {})[option] = value
    return {stage: StageOptions(**values) for stage, values in overrides.items()}


def generate_config(args: argparse.Namespace) -> GenerateConfig:
    return GenerateConfig(
        prompts=args.prompts, output=args.output, model=args.model, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt, scheduler=args.scheduler,
        seed=args.seed, batch_size=args.batch_size, image_format=args.image_format, image_quality=args.image_quality,
        save_latents=args.save_latents, placement=args.placement, overwrite=args.overwrite,
        max_image_size=args.max_image_size, dtype=args.dtype, stages=stage_overrides(args.stage),
    )
