"""Ray job entry point for latent datasets: ``python -m jobs.encode --images ... --output ...``."""

from __future__ import annotations

import argparse
import sys

from jobs.options import add_encode_options
from jobs.running import end_command, run_encode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentray encode",
        description="Encode a Parquet table of images into latents (and caption embeddings) for training, "
                    "with per-row errors, exact latent statistics and a content-keyed cache for incremental reruns.",
    )
    add_encode_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_encode(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(end_command(main()))
