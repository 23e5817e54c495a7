"""Compose latentray's processors with your own Ray Data steps: filter, generate, score, keep the best; encode.

    # prompts.parquet: a `prompt` column (and `id`, or `seed`); images.parquet: `image` bytes and a `caption`
    python examples/compose_processors.py --prompts prompts.parquet --output best/ --model tiny --keep 4
    python examples/compose_processors.py --prompts prompts.parquet --images images.parquet --output best/ --model tiny

Generation: read the prompts, drop those you do not want (your filter), generate (the processor:
one image per row, every column of the row kept), score each image with your own function, keep the
best rows, and write them as Parquet, images included as PNG bytes. Encoding: read images, drop those
without a caption, encode (latents and caption embeddings), keep the rows that encoded, write Parquet.

What the processors do not do, and this script does not either: resume an interrupted run, commit each
row exactly once, skip rows an earlier run did, write errors/, run.json or latent_stats.json. That is
what ``latentray generate`` / ``latentray encode`` add around the very same processors; use them for
datasets that must survive a failure halfway.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", required=True, help="Parquet file or folder of prompts")
    parser.add_argument("--images", help="Parquet file or folder of images (image bytes, caption) to encode too")
    parser.add_argument("--output", required=True, help="folder for best/ (and latents/)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--keep", type=int, default=8, help="the best images kept")
    return parser


def wanted(row: dict) -> bool:
    """Your filter: here, prompts of at least three words."""
    return len(str(row["prompt"] or "").split()) >= 3


def score(row: dict) -> dict:
    """Your scorer, on the processor's columns: here, colourfulness (Hasler and Suesstrunk); -1 for a failed row."""
    from PIL import Image

    if row["error"] is not None:
        return {**row, "score": -1.0}
    pixels = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), np.float64)
    red_green, yellow_blue = pixels[..., 0] - pixels[..., 1], (pixels[..., 0] + pixels[..., 1]) / 2 - pixels[..., 2]
    colourfulness = np.hypot(red_green.std(), yellow_blue.std()) + 0.3 * np.hypot(red_green.mean(), yellow_blue.mean())
    return {**row, "score": float(colourfulness)}


def main(argv: list[str] | None = None) -> int:
    import ray
    import ray.data

    from pipelines import build_encoding_processor, build_generation_processor

    args = build_parser().parse_args(argv)
    # 1. the processors: options are latentray's flags, checked here, before Ray or any model starts
    generate = build_generation_processor(model=args.model, steps=args.steps, height=args.size, width=args.size, batch_size=8)
    encode = build_encoding_processor(model=args.model, resolution=args.size, caption_column="caption", text_embeddings=True) if args.images else None
    ray.init(address="local", include_dashboard=False)  # or your cluster; the processors use whatever Ray this process joined

    # 2. generation: your filter -> the processor -> your scorer -> the best rows -> Parquet
    prompts = ray.data.read_parquet(args.prompts).filter(wanted)
    best = generate(prompts).map(score).filter(lambda row: row["error"] is None).sort("score", descending=True).limit(args.keep)
    best.drop_columns(["latent_mean", "latent_std"]).write_parquet(f"{args.output}/best")

    # 3. encoding: rows with a caption -> the processor -> the rows that encoded -> Parquet
    if encode is not None:
        images = ray.data.read_parquet(args.images).filter(lambda row: row["caption"] is not None)
        encode(images).filter(lambda row: row["error"] is None).drop_columns(["image"]).write_parquet(f"{args.output}/latents")
    print(f"wrote {args.output}/best" + (f" and {args.output}/latents" if encode else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
