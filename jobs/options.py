"""Command-line options shared by the ``latentray`` verbs and the ``python -m jobs.*`` entry points."""

from __future__ import annotations

import argparse

from pipelines.config import (
    CROPS, DEFAULT_MAX_IMAGE_PIXELS, LATENT_DTYPES, SAMPLE_MODES, EncodeConfig, GenerateConfig, StageOptions, parse_stage_option,
)
from workers.schedulers import SCHEDULERS


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join: HOST:PORT, ray://HOST:PORT, or auto for the cluster `ray start` "
                        "made on this machine (default: RAY_ADDRESS, else a new embedded local Ray)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up joining --address after this many seconds, with exit code 2 (default: 60)")


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
    parser.add_argument("--model", default="demo", help="built-in model (demo: the default, tiny, small) or diffusers directory, local or any fsspec URI")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale (default: the model's recommended one: 5 for demo, else 7.5)")
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


def add_encode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="Parquet file or folder of images (any fsspec URI)")
    parser.add_argument("--output", required=True, help="output folder (any fsspec URI)")
    parser.add_argument("--model", default="tiny", help="built-in model (demo, tiny, small) or diffusers directory, local or any fsspec URI")
    parser.add_argument("--resolution", type=int, help="square crop side; with --buckets the side of the pixel budget (default: the model's size)")
    parser.add_argument("--crop", choices=CROPS, default="center", help="where the crop is cut: centre, or a position seeded per row (default: center)")
    parser.add_argument("--buckets", nargs="?", const="auto", metavar="WxH,...",
                        help="aspect-ratio buckets: alone, SDXL-style sizes of about resolution^2 pixels; "
                             "or a list of WIDTHxHEIGHT sizes. Each image goes to the nearest aspect ratio")
    parser.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default: 64)")
    parser.add_argument("--flip", action="store_true", help="also store the latent of the horizontally mirrored crop")
    parser.add_argument("--image-column", default="image", help="column of image bytes: binary, or a struct with 'bytes' as HF datasets writes (default: image)")
    parser.add_argument("--path-column", help="column of image paths/URIs instead (relative ones resolve against the table's folder)")
    parser.add_argument("--caption-column", help="column of captions, stored beside the latents")
    parser.add_argument("--id-column", help="column of row ids (default: 'id' when present, else the row's position)")
    parser.add_argument("--text-embeddings", action="store_true", help="also store the caption's text-encoder hidden states")
    parser.add_argument("--sample", choices=SAMPLE_MODES, default="mean",
                        help="latent from the VAE posterior: its mean, or a sample drawn with the row's seed (default: mean)")
    parser.add_argument("--latent-dtype", choices=LATENT_DTYPES, default="float16", help="stored precision of latents and embeddings (default: float16)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each row derives its seed (random crop, sampling) from it and its id")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"larger images are refused from their header, before decoding (default: {DEFAULT_MAX_IMAGE_PIXELS}, Pillow's)")
    parser.add_argument("--min-image-size", type=int,
                        help="shortest side accepted, smaller images go to errors (default: an image must cover its target: no upscaling)")
    parser.add_argument("--background", default="white", help="colour transparent pixels are composited on (default: white)")
    add_stage_options(parser)
    add_ray_options(parser)


def encode_config(args: argparse.Namespace) -> EncodeConfig:
    return EncodeConfig(
        images=args.images, output=args.output, model=args.model, resolution=args.resolution, crop=args.crop,
        buckets=args.buckets, bucket_step=args.bucket_step, flip=args.flip, image_column=args.image_column,
        path_column=args.path_column, caption_column=args.caption_column, id_column=args.id_column,
        text_embeddings=args.text_embeddings, sample=args.sample, latent_dtype=args.latent_dtype, seed=args.seed,
        max_image_pixels=args.max_image_pixels, min_image_size=args.min_image_size, background=args.background,
        batch_size=args.batch_size, placement=args.placement, overwrite=args.overwrite, dtype=args.dtype,
        stages=stage_overrides(args.stage),
    )


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
