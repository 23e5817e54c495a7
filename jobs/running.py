"""Running a planned job, shared by the ``latentray`` command and ``python -m jobs.generate`` / ``jobs.encode``.

Plan first (bad input fails there, with exit 2, before Ray starts or any model loads),
then connect to Ray, run, and print the run's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs import reaper
from jobs.options import encode_config, generate_config


_started_embedded_ray: list[bool] = []  # a job of this command started the local Ray it ran on


def end_command(status: int) -> int:
    """Return ``status``; or, when a job of this command started its own local Ray, exit with it now:
    everything is committed and reported, Ray's orderly shutdown would add ~2 s to every run,
    and the reaper (``jobs.reaper``) stops that Ray at once."""
    if _started_embedded_ray:
        reaper.exit_process(status)
    return status


def fail(message: str) -> int:
    print(f"latentray: error: {message}", file=sys.stderr)
    return 2


def run_planned_job(verb: str, plan_job, run_job, config_from_args, args: argparse.Namespace, summary_keys: tuple[str, ...]) -> int:
    """Plan (bad input fails here, before Ray starts), connect to Ray, run, print the summary."""
    from jobs.ray_runtime import EMBEDDED, RayConnectionError, connect

    try:
        plan = plan_job(config_from_args(args))
    except ValueError as error:
        return fail(str(error))
    if plan.finished:  # every input row is committed: no Ray, no model, only the run record
        return _print_summary(run_job(plan), summary_keys)
    try:
        where = connect(args.address, timeout=args.connect_timeout)
    except RayConnectionError as error:
        status = fail(str(error))
        if error.init_still_running:
            # Ray's atexit handlers would wait for the stuck ray.init: leave now, the message is out
            sys.stderr.flush()
            os._exit(status)
        return status
    if where == EMBEDDED:
        _started_embedded_ray.append(True)
    print(f"latentray: {verb} {plan.input_rows} rows on {where} -> {plan.config.output}", file=sys.stderr)
    try:
        record = run_job(plan)
    except ValueError as error:
        return fail(str(error))
    return _print_summary(record, summary_keys)


def _print_summary(record: dict, summary_keys: tuple[str, ...]) -> int:
    print(json.dumps({key: record[key] for key in summary_keys}, indent=2))
    return 0 if record["status"] == "complete" else 1


def run_generate(args: argparse.Namespace) -> int:
    from pipelines.generation.generate import plan_generation, run_generation

    keys = ("status", "counts", "wall_seconds", "images_per_second", "stage_busy_seconds", "texts_encoded", "texts_reused")
    return run_planned_job("generating", plan_generation, run_generation, generate_config, args, keys)


def run_encode(args: argparse.Namespace) -> int:
    from pipelines.encoding.encode import plan_encoding, run_encoding

    keys = ("status", "counts", "error_reasons", "wall_seconds", "images_per_second", "stage_busy_seconds", "texts_encoded", "texts_reused")
    return run_planned_job("encoding", plan_encoding, run_encoding, encode_config, args, keys)
