"""Ray job entry point for bulk generation: ``python -m jobs.generate --prompts ... --output ...``."""

from __future__ import annotations

import argparse
import sys

from jobs.options import add_generate_options
from jobs.running import end_command, run_generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentray generate",
        description="Generate one image per row of a Parquet prompt table, with a manifest, errors and latent statistics.",
    )
    add_generate_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_generate(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(end_command(main()))
