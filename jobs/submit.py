"""Submitting latentray jobs to a Ray cluster through Ray's Jobs API, idempotently.

A job's submission id is derived from what it produces: its kind, input, output, the
options that change outputs (``output_identity()`` of its config), and the input's state
(its files with their sizes and versions, from one listing), never from resources or
batch sizes. So submitting the same job again

- while it runs attaches to it instead of starting a second one;
- after it failed or was stopped starts the next attempt (``...-2``, ``...-3``), which
  skips every row the earlier attempts committed (the output protocol's resume);
- after it succeeded does nothing, unless the input changed since: a file added or
  rewritten is a new job, which resumes into the same output and does only the new rows
  (what a scheduled submission relies on). While a job of the same output and options
  runs on an earlier state of the input, a new state attaches to it: one writer per
  output; the next submission after it ends picks up the rest.

Nothing secret goes into the job: Ray shows a job's runtime environment and entrypoint
on its dashboard and in its logs, so workers find storage credentials on their own
nodes (instance roles, the standard AWS variables set there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from jobs import options
from pipelines.runtime.resume import input_state as listed_input_state

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE_STATUSES = frozenset({"PENDING", "RUNNING"})
# Where the job runs (the cluster address) is no part of what it is: neither in its identity nor its entrypoint.
NOT_PASSED_TO_THE_JOB = frozenset({"help", "address", "connect_timeout"})
# Not shipped to the cluster: caches, outputs of local runs, version control.
WORKING_DIR_EXCLUDES = [
    ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".venv", "build", "dist",
    "latentray-demo", "bench-output", "tests",
]
PACKAGES = ("jobs", "pipelines", "workers")


# -- what to run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobKind:
    """A latentray job: ``python -m jobs.<name>``, its parser, and its typed config."""

    name: str
    input_option: str  # the option naming its input table

    def parser(self) -> argparse.ArgumentParser:
        return importlib.import_module(f"jobs.{self.name}").build_parser()

    def config(self, args: argparse.Namespace):
        return getattr(options, f"{self.name}_config")(args)


KINDS = {"generate": JobKind("generate", "prompts"), "encode": JobKind("encode", "images")}


def job_kind(name: str) -> JobKind:
    if name not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {name!r}")
    return KINDS[name]


@dataclass(frozen=True, kw_only=True)
class JobRequest:
    kind: str
    arguments: tuple[str, ...]  # the job's own command-line options, canonical
    output: str
    configuration: str  # fingerprint of kind, input, output, model and the options that change outputs
    input_state: str  # fingerprint of the input's files, sizes and versions (``resume.input_state``)

    @property
    def fingerprint(self) -> str:
        """The job's: its configuration on this state of its input."""
        return hashlib.sha256(f"{self.configuration}:{self.input_state}".encode()).hexdigest()[:16]

    @property
    def entrypoint(self) -> str:
        return shlex.join(["python", "-m", f"jobs.{self.kind}", *self.arguments])

    @property
    def id_prefix(self) -> str:
        return f"latentray-{self.kind}-{self.fingerprint}"

    def attempt_id(self, attempt: int) -> str:
        return f"{self.id_prefix}-{attempt}"


def job_request(kind_name: str, args: argparse.Namespace, input_state: str | None = None) -> JobRequest:
    """The job for parsed options; its config is validated here (ValueError naming the field).

    ``input_state``: the input's, when the caller listed it already (an Airflow run lists
    it once, so that its submit and wait tasks name the same job); else listed here.
    """
    # 1. the options, validated as the job will
    kind = job_kind(kind_name)
    config = kind.config(args)
    input_uri = getattr(args, kind.input_option)
    for name in (kind.input_option, "output"):
        check_cluster_path(name, getattr(args, name))
    for uri in getattr(args, "lora", None) or []:  # LoRA files are read on the cluster's nodes too
        check_cluster_path("lora", uri)
    # 2. what the job produces, and from which state of its input (one listing, no file read)
    identity = {"kind": kind.name, "input": input_uri, "output": config.output, "model": config.model, **config.output_identity()}
    configuration = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return JobRequest(kind=kind.name, arguments=tuple(canonical_arguments(kind.parser(), args)), output=config.output,
                      configuration=configuration, input_state=input_state or listed_input_state(input_uri))


def job_request_from_arguments(kind_name: str, arguments: list[str], input_state: str | None = None) -> JobRequest:
    """The same from a command line, as the Airflow DAG builds it: errors raise ValueError, never exit."""
    parser = job_kind(kind_name).parser()

    def refuse(message: str):
        raise ValueError(f"options for {kind_name}: {message} (arguments: {shlex.join(arguments)})")

    parser.error = refuse  # argparse would print usage and exit the worker process
    return job_request(kind_name, parser.parse_args(arguments), input_state)


def check_cluster_path(name: str, value: str) -> None:
    """A relative path would resolve inside the job's copy of the project on the cluster."""
    if "://" not in value and not os.path.isabs(value):
        raise ValueError(f"{name}: {value!r} is a relative path; a job on a cluster needs an absolute path "
                         "or a URI every node reaches (e.g. s3://bucket/...)")


def canonical_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Parsed options back to a command line: only what differs from the defaults, in parser order.

    Rebuilt from the parsed values, not copied from the user's tokens, so that the job
    runs exactly the configuration its submission id was derived from.
    """
    arguments: list[str] = []
    for action in parser._actions:  # argparse has no public accessor for its options
        if action.dest in NOT_PASSED_TO_THE_JOB or not action.option_strings:
            continue
        value, flag = getattr(args, action.dest, None), action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            arguments += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            for item in value or []:
                arguments += [flag, str(item)]
        elif value is not None and value != action.default:
            arguments += [flag, str(value)]
    return arguments


# -- the cluster ----------------------------------------------------------------------------------


def cluster_address(address: str | None) -> str:
    address = address or next((os.environ[name] for name in ADDRESS_VARIABLES if os.environ.get(name)), None)
    if not address:
        raise ValueError("address: give the Ray dashboard address of the cluster, e.g. --address http://HEAD:8265 (or set RAY_ADDRESS)")
    return address


def auth_token() -> tuple[str | None, str]:
    """The cluster token, looked up as Ray does; and where it came from (never the token itself).

    Ray's order: RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
    Ray's own client sends it only when RAY_AUTH_MODE=token is set in this process,
    while a head started by ``ray start`` enforces it by default: so it is sent
    whenever one is found, unless RAY_AUTH_MODE=disabled.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH: cannot read the token file {str(path)!r}: {error.strerror}") from None
        if not token:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH: the token file {str(path)!r} is empty")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def token_help(address: str, source: str, rejected: bool) -> str:
    problem = f"rejected the token from {source}" if rejected else f"needs an authentication token ({source})"
    return (
        f"the Ray cluster at {address} {problem} (Ray token authentication): set RAY_AUTH_TOKEN to the cluster's "
        "token, or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token "
        "(`ray get-auth-token` on the head node prints it)"
    )


@contextlib.contextmanager
def _address_variables_hidden(address: str) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override the address it is given; an explicit address wins here."""
    saved = {name: os.environ[name] for name in ADDRESS_VARIABLES if os.environ.get(name) not in (None, address)}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


def connect_jobs_api(address: str | None):
    """A JobSubmissionClient for the cluster; connection and token problems become ValueErrors."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = cluster_address(address)
    token, source = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with _address_variables_hidden(address):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise ValueError(token_help(address, source, rejected=token is not None)) from None
    except ConnectionError as error:
        raise ValueError(f"address: no Ray job server answers at {address} ({error}); is the dashboard running?") from None


def status_name(details) -> str:
    return str(getattr(details.status, "value", details.status))


def job_details(client, submission_id: str):
    """The job's details, or None when the cluster has no job with that id."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as error:
        if "status code 404" in str(error):  # the SDK reports a missing job only in the message
            return None
        raise


# -- submission -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    submission_id: str
    action: str  # "submitted", "attached" or "already succeeded"
    status: str
    previous: tuple[str, ...] = ()  # earlier attempts that failed or were stopped
    earlier_input: bool = False  # attached to a job of the same output and options on an earlier state of the input


def submit(client, request: JobRequest) -> Submission:
    """Submit ``request`` unless the same job runs or succeeded already (see the module docstring)."""
    failed: list[str] = []
    for attempt in count(1):
        submission_id = request.attempt_id(attempt)
        details = job_details(client, submission_id)
        if details is None:
            running = running_on_earlier_input(client, request)
            if running is not None:  # one writer per output: this state's job would be refused by its lease
                return Submission(running.submission_id, "attached", status_name(running), tuple(failed), earlier_input=True)
            details = _submit_attempt(client, request, submission_id)
            if details is None:
                return Submission(submission_id, "submitted", "PENDING", tuple(failed))
        status = status_name(details)
        if status in ACTIVE_STATUSES:
            return Submission(submission_id, "attached", status, tuple(failed))
        if status == "SUCCEEDED":
            return Submission(submission_id, "already succeeded", status, tuple(failed))
        failed.append(f"{submission_id} {status}")
    raise AssertionError("unreachable")


def running_on_earlier_input(client, request: JobRequest):
    """A job of the same configuration (same output) still pending or running, on another state of the input."""
    for job in client.list_jobs():
        same_configuration = (job.metadata or {}).get("latentray_configuration") == request.configuration
        if same_configuration and status_name(job) in ACTIVE_STATUSES:
            return job
    return None


def _submit_attempt(client, request: JobRequest, submission_id: str):
    """Submit one attempt; if another submitter took this id first, that job's details."""
    with working_dir() as directory:
        try:
            client.submit_job(
                entrypoint=request.entrypoint, submission_id=submission_id,
                runtime_env={"working_dir": directory, "excludes": WORKING_DIR_EXCLUDES},
                metadata={"latentray_kind": request.kind, "latentray_output": request.output,
                          "latentray_configuration": request.configuration, "latentray_input_state": request.input_state},
            )
            return None
        except RuntimeError as error:
            if "already exists" not in str(error):
                raise
    return job_details(client, submission_id)


@contextlib.contextmanager
def working_dir() -> Iterator[str]:
    """The project directory; for an installed (non-editable) latentray, a copy of its packages."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        yield str(root)
        return
    with tempfile.TemporaryDirectory(prefix="latentray-job-") as staging:
        for package in PACKAGES:
            shutil.copytree(root / package, Path(staging) / package, ignore=shutil.ignore_patterns("__pycache__"))
        yield staging


def job_status(client, submission_id: str) -> tuple[str, str]:
    details = job_details(client, submission_id)
    if details is None:
        return "MISSING", f"the cluster has no job {submission_id} (was it restarted?)"
    return status_name(details), details.message or ""


def wait_for_job(client, submission_id: str, poll_seconds: float = 2.0, follow_logs: bool = True) -> tuple[str, str]:
    """Stream the job's logs to stdout until it ends; return its final status and message."""
    if follow_logs:
        asyncio.run(_print_logs(client, submission_id))
    while True:  # the log stream can close a moment before the status changes
        status, message = job_status(client, submission_id)
        if status in TERMINAL_STATUSES or status == "MISSING":
            return status, message
        time.sleep(poll_seconds)


async def _print_logs(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


# -- the `latentray submit` verb ------------------------------------------------------------------


def say(message: str) -> None:
    print(f"latentray: {message}", file=sys.stderr, flush=True)


def describe(submission: Submission, request: JobRequest, address: str) -> str:
    earlier = f" (earlier attempts: {', '.join(submission.previous)}; this one resumes from what they committed)" if submission.previous else ""
    if submission.action == "submitted":
        return f"submitted job {submission.submission_id} to {address}{earlier}: {request.entrypoint}"
    if submission.action == "attached" and submission.earlier_input:
        return (f"job {submission.submission_id} (same kind, output and options, an earlier state of the input) is still "
                f"{submission.status} on {address}: following it; submit again once it ends to pick up the new input")
    if submission.action == "attached":
        return (f"job {submission.submission_id} (same kind, input, output and options) is already {submission.status} "
                f"on {address}: following it instead of submitting again")
    return (f"job {submission.submission_id} already SUCCEEDED for this output, configuration and input; nothing to do "
            f"(`ray job logs {submission.submission_id}` shows its logs)")


def run_submit(args: argparse.Namespace) -> int:
    """``latentray submit KIND ...``: 0 when the job succeeded (or was left running with --no-wait)."""
    request = job_request(args.kind, args)
    client = connect_jobs_api(args.address)
    address = cluster_address(args.address)
    submission = submit(client, request)
    say(describe(submission, request, address))
    if submission.action == "already succeeded":
        return 0
    if args.no_wait:
        say(f"not waiting: `ray job logs -f {submission.submission_id}` follows it, `ray job stop {submission.submission_id}` stops it")
        return 0
    try:
        status, message = wait_for_job(client, submission.submission_id)
    except KeyboardInterrupt:
        say(f"stopped following job {submission.submission_id}; it keeps running (`ray job stop {submission.submission_id}` stops it)")
        return 130
    say(f"job {submission.submission_id} {status}" + (f": {message}" if status != "SUCCEEDED" and message else ""))
    return 0 if status == "SUCCEEDED" else 1


def add_submit_parsers(verbs) -> argparse.ArgumentParser:
    """``latentray submit generate|encode [the verb's options] --address URL [--no-wait]``."""
    submit_parser = verbs.add_parser(
        "submit", help="run generate or encode as a Ray job on a cluster (idempotent)",
        description="Submit a latentray job to a Ray cluster through Ray's Jobs API, with this project as the "
                    "job's working directory. The same job submitted again attaches to it while it runs, resumes "
                    "after it failed, and does nothing after it succeeded unless files were added to or changed in "
                    "its input (then a new job does only the new rows).",
    )
    kinds = submit_parser.add_subparsers(dest="kind", required=True)
    for kind in KINDS.values():
        parser = kind.parser()
        kind_parser = kinds.add_parser(kind.name, parents=[parser], add_help=False, conflict_handler="resolve",
                                       help=f"submit `latentray {kind.name}`", description=parser.description)
        kind_parser.add_argument("--address", help="Ray dashboard address of the cluster, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
        kind_parser.add_argument("--no-wait", action="store_true", help="return once the job is submitted instead of following its logs")
    return submit_parser
