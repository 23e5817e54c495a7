"""Command-line options shared by the ``latentray`` verbs and the ``python -m jobs.*`` entry points."""

from __future__ import annotations

import argparse

from pipelines.runtime.config import (
    CROPS, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_LORAS, DEFAULT_STRENGTH, LATENT_DTYPES, SAMPLE_MODES, EncodeConfig, GenerateConfig, StageOptions, parse_stage_option,
)
from workers.runtime.presets import PRESETS
from workers.runtime.schedulers import SCHEDULERS


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
                             "fused.concurrency=4; options: batch_size, concurrency, num_gpus, num_cpus, threads. "
                             "vae_decoder.batch_size / vae_encoder.batch_size: rows per VAE call, also inside the fused actor")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="model precision (default: bfloat16 on CUDA, float32 on CPU; float16 only for SD 1.x/2.x and SDXL: "
                             "the transformer families overflow in it). Part of the output's identity")
    parser.add_argument("--overwrite", action="store_true", help="delete what the output holds and start fresh")
    parser.add_argument("--text-cache", choices=("on", "off"), default="on",
                        help="on: one cache of text embeddings for the whole job, so each distinct prompt, negative prompt "
                             "or caption is encoded once, whatever batch or actor its rows reach (default: on)")
    parser.add_argument("--text-cache-mib", type=int, metavar="MIB",
                        help="the text cache's budget; beyond it the least recently used texts are dropped and encoded "
                             "again when they return (default: a quarter of the cluster's object store)")


def add_generate_options(parser: argparse.ArgumentParser, *, prompts_required: bool = True) -> None:
    parser.add_argument("--prompts", required=prompts_required, help="Parquet file or folder of prompts (any fsspec URI)")
    parser.add_argument("--output", required=prompts_required, help="output folder (any fsspec URI)")
    parser.add_argument("--model", default="demo",
                        help=f"built-in model (demo: the default; {', '.join(PRESETS)}) or diffusers directory "
                             "(SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, Z-Image, Qwen-Image), local or any fsspec URI")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model family's: SD 30, SDXL 50, SD3 28, FLUX dev 28, schnell 4, Z-Image 50, Qwen-Image 50)")
    parser.add_argument("--guidance", type=float,
                        help="guidance scale, as the family's diffusers pipeline reads it (default: the family's: SD 7.5, SDXL 5, "
                             "SD3 7, FLUX 3.5, Z-Image 5; the demo model 5). Qwen-Image reads it only with a guidance embedding; "
                             "its classifier-free guidance is --true-cfg-scale")
    parser.add_argument("--true-cfg-scale", type=float,
                        help="FLUX and Qwen-Image: above 1, rows with a negative prompt run true classifier-free guidance "
                             "(diffusers' true_cfg_scale; default: the family's: FLUX 1, Qwen-Image 4)")
    parser.add_argument("--max-sequence-length", type=int,
                        help="T5/Qwen tokens per prompt for SD3 (default 256), FLUX (512), Z-Image (512), Qwen-Image (512, at most 1024)")
    parser.add_argument("--height", type=int, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, help="image width (default: the model's)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt for rows without one")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's scheduler)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; rows without a seed derive theirs from it and their id")
    parser.add_argument("--image-format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--image-quality", type=int, default=95, help="jpeg/webp quality (default: 95)")
    parser.add_argument("--save-latents", action="store_true", help="store each final latent in the manifest")
    parser.add_argument("--max-image-size", type=int, default=2048, help="largest height or width a row may ask for")
    parser.add_argument("--compile", action="store_true",
                        help="compile the denoiser's repeated blocks with torch.compile (regional compilation); each new "
                             "input shape costs a warm-up (tens of seconds per actor on a GPU), counted in run.json's compile")
    parser.add_argument("--attention-backend", metavar="NAME",
                        help="diffusers' attention backend for the denoiser (FLUX.1, FLUX.2, Z-Image, Qwen-Image): e.g. "
                             "_native_cudnn, _native_flash, flash (flash-attn installed), sage (sageattention installed); "
                             "backends that download kernels (*_hub) are refused (default: diffusers' native)")
    parser.add_argument("--lora", action="append", default=[], metavar="URI",
                        help="LoRA .safetensors file (any fsspec URI) for rows whose 'lora' column is null (or absent); "
                             "repeatable: several files apply together")
    parser.add_argument("--lora-scale", action="append", type=float, default=[], metavar="WEIGHT",
                        help="weight of each --lora, in their order (default: 1 each)")
    parser.add_argument("--max-loras-per-actor", type=int, default=DEFAULT_MAX_LORAS, metavar="N",
                        help=f"LoRA adapters an actor keeps loaded; beyond, the least recently used is dropped (default: {DEFAULT_MAX_LORAS})")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, metavar="S",
                        help="image-to-image: how far rows move from their 'init_image', 0 to 1, where their 'strength' "
                             f"is null (default: {DEFAULT_STRENGTH}, as diffusers)")
    add_stage_options(parser)
    add_ray_options(parser)


def add_encode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="Parquet file or folder of images (any fsspec URI)")
    parser.add_argument("--output", required=True, help="output folder (any fsspec URI)")
    parser.add_argument("--model", default="tiny",
                        help=f"built-in model (demo, {', '.join(PRESETS)}) or diffusers directory, local or any fsspec URI; its VAE (and text encoders) are used")
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
    parser.add_argument("--text-embeddings", action="store_true",
                        help="also store the caption's embeddings as the family's encode_prompt returns them "
                             "(prompt_embeds; pooled_prompt_embeds for SDXL, SD3, FLUX; Z-Image: each caption at its own "
                             "number of tokens, unpadded, with prompt_embeds_length)")
    parser.add_argument("--max-sequence-length", type=int,
                        help="T5 tokens kept per caption for SD3 (default 256) and FLUX (512), Qwen tokens for Z-Image (512): "
                             "a 512-token T5-XXL embedding is 4 MiB in float16")
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
        text_embeddings=args.text_embeddings, max_sequence_length=args.max_sequence_length, sample=args.sample, latent_dtype=args.latent_dtype, seed=args.seed,
        max_image_pixels=args.max_image_pixels, min_image_size=args.min_image_size, background=args.background,
        batch_size=args.batch_size, placement=args.placement, overwrite=args.overwrite, dtype=args.dtype,
        stages=stage_overrides(args.stage), **text_cache_fields(args),
    )


def text_cache_fields(args: argparse.Namespace) -> dict:
    return {"text_cache": args.text_cache == "on", "text_cache_mib": args.text_cache_mib}


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
        true_cfg_scale=args.true_cfg_scale, max_sequence_length=args.max_sequence_length,
        seed=args.seed, batch_size=args.batch_size, image_format=args.image_format, image_quality=args.image_quality,
        save_latents=args.save_latents, placement=args.placement, overwrite=args.overwrite,
        max_image_size=args.max_image_size, dtype=args.dtype, stages=stage_overrides(args.stage), **text_cache_fields(args),
        compile=args.compile, attention_backend=args.attention_backend,
        lora=args.lora, lora_scale=args.lora_scale, max_loras_per_actor=args.max_loras_per_actor, strength=args.strength,
    )
