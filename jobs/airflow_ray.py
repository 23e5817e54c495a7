"""Airflow pieces for latentray jobs on Ray: an operator that submits and waits without a worker slot.

``SubmitAndWaitOperator`` submits through the same idempotent code as ``latentray submit``
(``jobs.submit``) and then defers to ``RayJobTrigger``, which polls the job from
Airflow's triggerer: the hours a large job runs hold no worker slot. If the job fails,
the task fails; its retry submits again, which starts the next attempt of the same
job and resumes from the rows the failed one committed. A job still running is
attached to, a job that succeeded is not run again.

This module lives in the installed ``jobs`` package (not in the DAG file) because the
triggerer re-creates the trigger from its import path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from jobs.submit import (
    TERMINAL_STATUSES,
    JobRequest,
    connect_jobs_api,
    job_kind,
    job_request_from_arguments,
    job_status,
    submit,
)

LOG_TAIL_LINES = 40


def option_arguments(options: dict[str, Any]) -> list[str]:
    """``{"steps": 30, "save_latents": True, "stage": ["denoiser.num_gpus=1"]}`` -> command-line options."""
    arguments: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                arguments += [flag, str(item)]
        elif value is not None and value is not False:
            arguments += [flag, str(value)]
    return arguments


def request_from_params(params: dict[str, Any]) -> JobRequest:
    """The DAG's params (kind, input, output, model, options) as a validated job request."""
    kind = job_kind(params["kind"])
    arguments = [f"--{kind.input_option}", params["input"], "--output", params["output"], "--model", params["model"],
                 *option_arguments(dict(params.get("options") or {}))]
    return job_request_from_arguments(kind.name, arguments)


class RayJobTrigger(BaseTrigger):
    """Fires once the Ray job ``submission_id`` has ended (or vanished with its cluster)."""

    def __init__(self, address: str, submission_id: str, poll_seconds: float = 30.0):
        super().__init__()
        self.address, self.submission_id, self.poll_seconds = address, submission_id, poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"address": self.address, "submission_id": self.submission_id, "poll_seconds": self.poll_seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        client = await asyncio.to_thread(connect_jobs_api, self.address)
        while True:
            try:
                # the SDK is synchronous: a thread keeps the triggerer's event loop free
                status, message = await asyncio.to_thread(job_status, client, self.submission_id)
            except ConnectionError as error:  # a restarting head: keep waiting, the task's timeout bounds it
                self.log.warning("Ray job server at %s unreachable (%s); retrying", self.address, error)
                status, message = "UNREACHABLE", str(error)
            if status in TERMINAL_STATUSES or status == "MISSING":
                yield TriggerEvent({"submission_id": self.submission_id, "status": status, "message": message})
                return
            await asyncio.sleep(self.poll_seconds)


class SubmitAndWaitOperator(BaseOperator):
    """Submit the DAG run's latentray job to Ray (idempotently), defer until it ends, fail unless it SUCCEEDED.

    The job comes from the DAG's params (see ``request_from_params``), so a retry derives
    the same submission id and resumes instead of starting over.
    """

    def execute(self, context) -> str:
        params = context["params"]
        submission = submit(connect_jobs_api(params["ray_address"]), request_from_params(params))
        self.log.info("Ray job %s: %s (earlier attempts: %s)", submission.submission_id, submission.action,
                      ", ".join(submission.previous) or "none")
        if submission.action == "already succeeded":
            return submission.submission_id
        trigger = RayJobTrigger(params["ray_address"], submission.submission_id, float(params["poll_seconds"]))
        self.defer(trigger=trigger, method_name="execute_complete")

    def execute_complete(self, context, event: dict[str, Any]) -> str:
        submission_id, status = event["submission_id"], event["status"]
        self._log_job_tail(context["params"]["ray_address"], submission_id)
        if status != "SUCCEEDED":
            raise RuntimeError(f"Ray job {submission_id} ended {status}: {event.get('message')}; a retry resumes it")
        return submission_id

    def _log_job_tail(self, address: str, submission_id: str) -> None:
        """The end of the job's own log in the task log: where a failure's traceback is."""
        try:
            logs = connect_jobs_api(address).get_job_logs(submission_id)
        except Exception as error:  # the log is a courtesy; the job's status decides the task
            self.log.warning("could not read the logs of Ray job %s: %s", submission_id, error)
            return
        self.log.info("last lines of Ray job %s:\n%s", submission_id, "\n".join(logs.splitlines()[-LOG_TAIL_LINES:]))
