"""Airflow pieces for latentray jobs on Ray: the DAG, and an operator that submits and waits without a worker slot.

``latentray_dag`` builds the DAG: triggered by hand with params (``jobs/airflow_dag.py``)
or on a schedule with the params' defaults given (see the README's scheduled example).
Its ``check_input`` task lists the input once (files, sizes, versions; nothing read):
every later task of the run names the same Ray job by that state, and a run that finds
new files submits a new job, which resumes into the output and does only the new rows.

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
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, BaseOperator, Param, task
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
PARAMS = {
    "kind": Param("generate", enum=["generate", "encode"], description="latentray job: generate or encode"),
    "input": Param(type="string", minLength=1, description="prompts (generate) or images (encode): Parquet file or folder URI"),
    "output": Param(type="string", minLength=1, description="output folder URI"),
    "model": Param("tiny", type="string", description="preset or diffusers directory URI"),
    "options": Param({}, type="object", description='other options of the job, e.g. {"steps": 30, "save_latents": true, "stage": ["fused.concurrency=4"]}'),
    "ray_address": Param("http://127.0.0.1:8265", type="string", description="Ray dashboard (job server) address"),
    "max_error_rate": Param(0.01, type="number", minimum=0, maximum=1, description="largest share of input rows allowed to end in errors/"),
    "poll_seconds": Param(30, type="number", minimum=0.1, description="how often the triggerer asks Ray about the job"),
}


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


def request_from_params(params: dict[str, Any], input_state: str | None = None) -> JobRequest:
    """The DAG's params (kind, input, output, model, options) as a validated job request.

    ``input_state``: the one ``check_input`` listed; None lists the input now.
    """
    kind = job_kind(params["kind"])
    arguments = [f"--{kind.input_option}", params["input"], "--output", params["output"], "--model", params["model"],
                 *option_arguments(dict(params.get("options") or {}))]
    return job_request_from_arguments(kind.name, arguments, input_state)


def dag_params(defaults: dict[str, Any]) -> dict[str, Param]:
    """``PARAMS`` with the given defaults: what a scheduled run, which nobody triggers with params, uses."""
    unknown = sorted(set(defaults) - set(PARAMS))
    if unknown:
        raise ValueError(f"params: unknown {', '.join(unknown)}; known: {', '.join(PARAMS)}")
    return {name: Param(defaults[name], description=param.description, **param.schema) if name in defaults else param
            for name, param in PARAMS.items()}


def latentray_dag(dag_id: str = "latentray", *, schedule: Any = None, **defaults: Any) -> DAG:
    """check_input -> submit_job -> wait_for_job -> verify_run -> done, for a latentray job on Ray.

    ``schedule``: Airflow's (None: triggered by hand with params; ``"@daily"``: every day,
    with the params' ``defaults``, each run doing the rows of the files added since).
    """
    with DAG(
        dag_id=dag_id,
        description="A latentray job on a Ray cluster: submit, wait without a worker slot, verify run.json",
        schedule=schedule,
        catchup=False,
        max_active_runs=1,  # runs of one output follow each other: one writer per output
        params=dag_params(defaults),
        default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
        tags=["latentray", "ray"],
    ) as dag:

        @task(retries=0)  # a wrong option or a missing input does not fix itself
        def check_input(params=None) -> str:
            """Every option valid, like the CLI's; the input's state, which names this run's job."""
            request = request_from_params(params)
            print(f"input {params['input']}: state {request.input_state}; job {request.id_prefix}: {request.entrypoint}")
            return request.input_state

        @task
        def submit_job(input_state: str, params=None) -> str:
            submission = submit(connect_jobs_api(params["ray_address"]), request_from_params(params, input_state))
            print(f"Ray job {submission.submission_id}: {submission.action} (status {submission.status})")
            return submission.submission_id

        wait_for_job = SubmitAndWaitOperator(task_id="wait_for_job", input_state="{{ ti.xcom_pull(task_ids='check_input') }}",
                                             retries=3, retry_delay=timedelta(minutes=1))

        @task(retries=0)  # the outputs are what they are; a rerun of the DAG resumes the job if needed
        def verify_run(params=None) -> dict:
            from pipelines.report import check_run_record
            from pipelines.runtime import io

            return check_run_record(io.read_json(io.join(params["output"], "run.json")), float(params["max_error_rate"]))

        @task
        def done(summary: dict, params=None) -> None:
            print(f"latentray {params['kind']} into {params['output']}: {summary}")

        checked = verify_run()
        submit_job(check_input()) >> wait_for_job >> checked
        done(checked)
    return dag


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

    The job comes from the DAG's params (see ``request_from_params``) and ``input_state``
    (the state ``check_input`` listed; templated), so a retry derives the same submission id
    and resumes instead of starting over.
    """

    template_fields = ("input_state",)

    def __init__(self, *, input_state: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.input_state = input_state

    def execute(self, context) -> str:
        params = context["params"]
        submission = submit(connect_jobs_api(params["ray_address"]), request_from_params(params, self.input_state or None))
        self.log.info("Ray job %s: %s (input state %s; earlier attempts: %s)", submission.submission_id, submission.action,
                      self.input_state or "listed now", ", ".join(submission.previous) or "none")
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
