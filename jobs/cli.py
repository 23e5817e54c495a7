"""The ``latentray`` command: demo, generate, encode, submit, report, adherence, model export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jobs import encode as encode_job
from jobs import generate as generate_job
from jobs.options import add_ray_options
from jobs.running import end_command, fail, fail_storage, run_encode, run_generate
from jobs.submit import add_submit_parsers

DEMO_PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a blue circle on a yellow background",
    "a white square on a red background",
    "a purple triangle on a green background",
    "an orange circle on a purple background",
    "a black triangle on an orange background",
]


def run_submit(args: argparse.Namespace) -> int:
    from jobs.submit import run_submit as submit_job

    try:
        return submit_job(args)
    except ValueError as error:
        return fail(str(error))
    except RuntimeError as error:  # Ray's job server refused a request (its SDK raises RuntimeError)
        return fail(f"Ray job server: {error}")


def run_report(args: argparse.Namespace) -> int:
    from pipelines.report import write_report
    from pipelines.runtime.io import StorageError

    try:
        written = write_report(args.output, samples=args.samples)
    except ValueError as error:
        return fail(str(error))
    except StorageError as error:  # the output could not be listed or read: exit 3, as a run
        return fail_storage(error)
    print(f"latentray: wrote {written.html} and {written.contact_sheet}", file=sys.stderr)
    return 0


def write_demo_prompts(path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"id": [f"demo-{i:02d}" for i in range(len(DEMO_PROMPTS))], "prompt": DEMO_PROMPTS}), path)


def run_demo(args: argparse.Namespace) -> int:
    prompts = os.path.join(args.output, "prompts.parquet")
    write_demo_prompts(prompts)
    # a demo starts fresh each time: a rerun with another model must not be refused
    argv = ["--prompts", prompts, "--output", args.output, "--model", args.model, "--steps", str(args.steps), "--overwrite"]
    if args.address:
        argv += ["--address", args.address, "--connect-timeout", str(args.connect_timeout)]
    status = run_generate(generate_job.build_parser().parse_args(argv))
    if status == 0:
        print(f"latentray: demo images in {os.path.join(args.output, 'images')}, manifest in {os.path.join(args.output, 'manifest')}", file=sys.stderr)
        report_adherence(args.output)
    return status


def report_adherence(output: str) -> dict:
    """Print and store how many images show the colour and shape their prompt asks for."""
    from pipelines.demo.adherence import score_generation
    from pipelines.runtime import io

    summary, _ = score_generation(output)
    io.write_json(io.join(output, "adherence.json"), summary)
    for group in ("seen", "held_out"):
        shares = summary[group]
        if shares["images"]:
            print(f"latentray: {group.replace('_', '-')} combinations: {shares['images']} images, colour matches "
                  f"{shares['color_match']:.0%}, shape matches {shares['shape_match']:.0%}", file=sys.stderr)
    return summary


def run_adherence(args: argparse.Namespace) -> int:
    try:
        summary = report_adherence(args.output)
    except ValueError as error:
        return fail(str(error))
    print(json.dumps(summary, indent=2))
    return 0


def run_model_export(args: argparse.Namespace) -> int:
    from workers.runtime.presets import BUILT_IN_MODELS, export_preset

    if args.name not in BUILT_IN_MODELS:
        return fail(f"unknown built-in model {args.name!r}; built-in models are {', '.join(BUILT_IN_MODELS)}")
    export_preset(args.name, args.directory)
    print(f"latentray: wrote the built-in model {args.name!r} as a diffusers directory to {args.directory}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentray", description="Batch generation and latent datasets for latent diffusion models on Ray.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="generate a few images with the built-in model on an embedded Ray",
                            description="Generate a few images with the built-in model on an embedded local Ray.")
    demo.add_argument("--output", default="latentray-demo", help="output folder (default: ./latentray-demo)")
    demo.add_argument("--model", default="demo", help="model (default: the built-in demo model, trained on coloured shapes)")
    demo.add_argument("--steps", type=int, default=20)
    add_ray_options(demo)
    demo.set_defaults(run=run_demo)

    generate = verbs.add_parser("generate", parents=[generate_job.build_parser()], add_help=False,
                                help="generate images for a Parquet table of prompts",
                                description=generate_job.build_parser().description)
    generate.set_defaults(run=run_generate)

    encode = verbs.add_parser("encode", parents=[encode_job.build_parser()], add_help=False,
                              help="encode a Parquet table of images into latents for training",
                              description=encode_job.build_parser().description)
    encode.set_defaults(run=run_encode)

    add_submit_parsers(verbs).set_defaults(run=run_submit)

    report = verbs.add_parser("report", help="write report.html and contact_sheet.png next to a run's outputs",
                              description="Write OUTPUT/report.html (self-contained) and OUTPUT/contact_sheet.png for a finished run.")
    report.add_argument("output", help="the run's output folder (any fsspec URI)")
    report.add_argument("--samples", type=int, default=16, help="images on the contact sheet (default: 16)")
    report.set_defaults(run=run_report)

    adherence = verbs.add_parser(
        "adherence", help="share of generated images whose colour and shape match their prompt",
        description="Analyse a generation output whose prompts are shape captions ('a red circle on a blue background'): "
                    "the share of images whose dominant foreground colour and shape class match the prompt, for seen and "
                    "held-out combinations. Writes OUTPUT/adherence.json.")
    adherence.add_argument("output", help="the generation output folder (any fsspec URI)")
    adherence.set_defaults(run=run_adherence)

    model = verbs.add_parser("model", help="built-in models", description="Built-in models.")
    model_verbs = model.add_subparsers(dest="model_verb", required=True)
    export = model_verbs.add_parser("export", help="write a built-in model as a standard diffusers directory",
                                    description="Write a built-in model as a diffusers directory that its family's pipeline "
                                                "(StableDiffusionPipeline, FluxPipeline, ...) loads with from_pretrained.")
    export.add_argument("name", help="built-in model: demo, or a preset (tiny, small, tiny-sdxl, small-sdxl, tiny-sd3, tiny-flux, tiny-zimage, tiny-qwenimage, ...)")
    export.add_argument("directory", help="directory to write")
    export.set_defaults(run=run_model_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return end_command(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
