"""Entry point that trains the built-in demo model: ``python -m jobs.train_demo --output DIR``.

The stages live in ``pipelines.demo.train``; this module parses the arguments and gives the
stages that run jobs (encode, evaluate) their Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.demo import train
from pipelines.demo.train import SCALES, STAGES, TrainDemoConfig
from workers.runtime.presets import RECOMMENDED_GUIDANCE


@contextmanager
def ray_for(config: TrainDemoConfig) -> Iterator[None]:
    """Ray for one stage: the cluster at --address, or an embedded one stopped afterwards (training gets the CPUs back)."""
    import ray

    from jobs.ray_runtime import connect

    started_here = not ray.is_initialized()
    connect(config.address, num_cpus=2)  # num_cpus only applies to an embedded Ray
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_demo", description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="local folder for the corpus, latents, model and records")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="full (default) or smoke (toy size, ~1 minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (default: 2)")
    parser.add_argument("--from-stage", choices=STAGES, default="corpus", help="rerun from this stage, reusing earlier ones' output")
    parser.add_argument("--train-images", type=int, help="override the scale's number of training images")
    parser.add_argument("--vae-steps", type=int, help="override the scale's VAE steps")
    parser.add_argument("--unet-steps", type=int, help="override the scale's U-Net steps")
    parser.add_argument("--guidance", type=float, default=RECOMMENDED_GUIDANCE["demo"],
                        help=f"guidance scale of the evaluation (default: {RECOMMENDED_GUIDANCE['demo']:g}, the demo model's)")
    parser.add_argument("--address", help="Ray cluster for encode and evaluate (default: RAY_ADDRESS, else an embedded local Ray)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("latentray.train_demo", "workers.demo.training"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        config = TrainDemoConfig(
            output=args.output, scale=args.scale, seed=args.seed, threads=args.threads, from_stage=args.from_stage,
            train_images=args.train_images, vae_steps=args.vae_steps, unet_steps=args.unet_steps, guidance=args.guidance,
            address=args.address,
        )
    except ValueError as error:
        print(f"train_demo: error: {error}", file=sys.stderr)
        return 2
    record = train.run(config, ray_for)
    print(json.dumps({key: record[key] for key in ("sizes", "estimated_full_scale_seconds")} | {
        "stages": {name: {key: value for key, value in figures.items() if key != "training"} for name, figures in record["stages"].items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
