"""Running a planned job, shared by the ``latentray`` command and ``python -m jobs.generate`` / ``jobs.encode``.

Plan first (bad input fails there, with exit 2, before Ray starts or any model loads),
then connect to Ray, run, and print the run's summary.

Exit codes: 0 complete; 1 the counts do not add up; 2 a problem with the whole job (bad
input or options, an output another run is writing, no Ray); 3 the output (or input)
could not be listed, read or written after the file system's retries, or the run ended
incomplete with rows whose errors were transient (storage that failed for them): nothing
committed was lost, rerun the same command (it retries exactly those rows). A run
stopped by SIGTERM (``ray job stop``, an Airflow task's timeout, ``kill``) gives its
output's lease back as it ends and exits 143: the next run need not wait for it to expire.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, TextIO

from jobs import reaper
from jobs.options import encode_config, generate_config

if TYPE_CHECKING:  # pipelines (pyarrow, fsspec) load only when a job runs
    from pipelines.runtime.io import StorageError


_started_embedded_ray: list[bool] = []  # a job of this command started the local Ray it ran on


def end_command(status: int) -> int:
    """Return ``status``; or, when a job of this command started its own local Ray, exit with it now:
    everything is committed and reported, Ray's orderly shutdown would add ~2 s to every run,
    and the reaper (``jobs.reaper``) stops that Ray at once."""
    if _started_embedded_ray:
        reaper.exit_process(status)
    return status


BAD_JOB, STORAGE_FAILED = 2, 3  # exit codes (see the module's docstring)


def fail(message: str, status: int = BAD_JOB) -> int:
    print(f"latentray: error: {message}", file=sys.stderr)
    return status


def storage_error_in(error: BaseException) -> StorageError | None:
    """The ``io.StorageError`` behind ``error``: itself, the cause Ray wrapped (a task's), or the one
    whose text a dataset's error carries (Ray Data keeps only the text of a UDF's error)."""
    from pipelines.runtime.io import StorageError

    first, seen = error, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        ray_cause = getattr(error, "cause", None)  # a RayTaskError keeps the task's own exception here
        if isinstance(error, StorageError):
            # Ray raises a task's error as a class that is both RayTaskError and the cause's: report the plain one
            return ray_cause if isinstance(ray_cause, StorageError) else error
        error = ray_cause if isinstance(ray_cause, BaseException) else (error.__cause__ or error.__context__)
    return StorageError.in_text(str(first))


def fail_storage(error: StorageError) -> int:
    return fail(f"{error}. Nothing committed was lost: rerun the same command once the storage answers again.", STORAGE_FAILED)


def run_planned_job(verb: str, plan_job, run_job, config_from_args, args: argparse.Namespace, summary_keys: tuple[str, ...]) -> int:
    """Plan (bad input fails here, before Ray starts), connect to Ray, run, print the summary.

    Storage that failed (``io.StorageError``, in the driver or in a Ray task) ends the
    command with exit 3 and the location, never a traceback.
    """
    from pipelines.runtime import lease

    # stdout carries the summary alone, so that it parses as JSON: Ray forwards its workers' and
    # raylet's messages ("a worker died ...") to the driver's sys.stdout while the job runs
    summary_stream, sys.stdout = sys.stdout, sys.stderr
    try:
        with sigterm_ends_the_run():
            return _plan_and_run(verb, plan_job, run_job, config_from_args, args, summary_keys, summary_stream)
    except Exception as error:
        storage = storage_error_in(error)
        if storage is None:
            raise
        return fail_storage(storage)
    finally:
        sys.stdout = summary_stream
        lease.release_all()  # a plan that failed after taking the output's lease (a run gives it back itself)


@contextmanager
def sigterm_ends_the_run() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the main thread, so the run's ``finally`` blocks run: the
    output's lease is given back at once. Python's default ends the process where it stands, and the
    next run into the output (a resubmitted Ray job) was refused until the lease expired.
    ``ray.init`` installs Ray's own handler (it aborts the process): ``_handle_sigterm`` again after it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    _handle_sigterm()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _handle_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)


def _stop(signum: int, frame) -> None:
    print("latentray: stopped (SIGTERM); what was committed stays, rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def _plan_and_run(
    verb: str, plan_job, run_job, config_from_args, args: argparse.Namespace, summary_keys: tuple[str, ...], summary_stream: TextIO,
) -> int:
    from jobs.ray_runtime import EMBEDDED, RayConnectionError, connect

    try:
        plan = plan_job(config_from_args(args))
    except ValueError as error:
        return fail(str(error))
    if plan.finished:  # every input row is committed: no Ray, no model, only the run record
        return _print_summary(run_job(plan), summary_keys, summary_stream)
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
    _handle_sigterm()  # ray.init replaced ours
    print(f"latentray: {verb} {plan.input_rows} rows on {where} -> {plan.config.output}", file=sys.stderr)
    try:
        record = run_job(plan)
    except ValueError as error:
        return fail(str(error))
    return _print_summary(record, summary_keys, summary_stream)


def _print_summary(record: dict, summary_keys: tuple[str, ...], stream: TextIO) -> int:
    print(json.dumps({key: record[key] for key in summary_keys}, indent=2), file=stream, flush=True)
    transient = record.get("error_causes", {}).get("transient", 0)
    if transient:
        reasons = record.get("transient_error_reasons") or {}
        example = max(reasons, key=reasons.get) if reasons else "unknown"
        return fail(f"run incomplete: {transient} of {record['counts']['input_rows']} rows failed for a cause outside them "
                    f"(transient; e.g. {example}). Nothing committed was lost: rerun the same command to retry exactly those rows.",
                    STORAGE_FAILED)
    return 0 if record["status"] == "complete" else 1


def run_generate(args: argparse.Namespace) -> int:
    from pipelines.generation.generate import plan_generation, run_generation

    keys = ("status", "counts", "error_causes", "wall_seconds", "images_per_second", "stage_busy_seconds", "texts_encoded", "texts_reused")
    return run_planned_job("generating", plan_generation, run_generation, generate_config, args, keys)


def run_encode(args: argparse.Namespace) -> int:
    from pipelines.encoding.encode import plan_encoding, run_encoding

    keys = ("status", "counts", "error_reasons", "error_causes", "wall_seconds", "images_per_second", "stage_busy_seconds", "texts_encoded", "texts_reused")
    return run_planned_job("encoding", plan_encoding, run_encoding, encode_config, args, keys)
