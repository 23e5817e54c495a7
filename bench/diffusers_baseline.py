"""The reference side of the whole-process benchmark: a plain diffusers process.

Loads the family's own pipeline (``DiffusionPipeline.from_pretrained``: the class the
model's ``model_index.json`` names), generates every prompt of a Parquet table in
batches with one CPU generator per prompt, and writes each image as a PNG, as a user's
own script would. Timed from outside, as a whole process (imports and loading included).

    python bench/diffusers_baseline.py --model DIR --prompts prompts.parquet --output DIR --steps 20 --size 128 --batch-size 8
    python bench/diffusers_baseline.py ... --device cuda --dtype bfloat16      # on a GPU (bench/gpu_benchmark.py)
"""

from __future__ import annotations

import argparse
import os
import sys

import pyarrow.parquet as pq
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local diffusers directory")
    parser.add_argument("--prompts", required=True, help="Parquet table with id, prompt, seed")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    options = parser.parse_args(argv)

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    pipe = DiffusionPipeline.from_pretrained(options.model, local_files_only=True, torch_dtype=getattr(torch, options.dtype)).to(options.device)
    pipe.set_progress_bar_config(disable=True)
    table = pq.read_table(options.prompts).to_pylist()
    os.makedirs(options.output, exist_ok=True)
    for start in range(0, len(table), options.batch_size):
        rows = table[start:start + options.batch_size]
        images = pipe(  # prompt= by name: the FLUX.2 pipelines' first positional argument is an image
            prompt=[row["prompt"] for row in rows], num_inference_steps=options.steps, guidance_scale=options.guidance,
            height=options.size, width=options.size, generator=[torch.Generator("cpu").manual_seed(row["seed"]) for row in rows],
        ).images
        for row, image in zip(rows, images):
            image.save(os.path.join(options.output, f"{row['id']}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
