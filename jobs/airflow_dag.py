"""Airflow DAG ``latentray``: run a latentray job on a Ray cluster and check what it wrote.

To use it, install latentray with its Airflow extra where Airflow runs
(``pip install 'latentray[airflow]'``) and copy this file into Airflow's dags folder.
Trigger it with params, e.g.::

    {"kind": "generate", "input": "s3://bucket/prompts/", "output": "s3://bucket/run1",
     "model": "s3://bucket/models/sd15", "options": {"steps": 30, "save_latents": true},
     "ray_address": "http://head:8265", "max_error_rate": 0.01}

    check_input -> submit_job -> wait_for_job -> verify_run -> done

``wait_for_job`` is deferred to Airflow's triggerer while the job runs (no worker slot
held for hours). Every step that talks to Ray uses ``jobs.submit``: submitting twice
attaches to the running job, and a retry after a failed job starts its next attempt,
which resumes from the rows already committed.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, task

from jobs.airflow_ray import SubmitAndWaitOperator, request_from_params

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

with DAG(
    dag_id="latentray",
    description="A latentray job on a Ray cluster: submit, wait without a worker slot, verify run.json",
    schedule=None,
    catchup=False,
    params=PARAMS,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["latentray", "ray"],
) as dag:

    @task(retries=0)  # a wrong option or a missing input does not fix itself
    def check_input(params=None) -> str:
        from pipelines.runtime import io

        request = request_from_params(params)  # validates every option, like the CLI
        if not io.exists(params["input"]):
            raise ValueError(f"input: nothing at {params['input']!r}")
        return request.entrypoint

    @task
    def submit_job(params=None) -> str:
        from jobs.submit import connect_jobs_api, submit

        submission = submit(connect_jobs_api(params["ray_address"]), request_from_params(params))
        print(f"Ray job {submission.submission_id}: {submission.action} (status {submission.status})")
        return submission.submission_id

    wait_for_job = SubmitAndWaitOperator(task_id="wait_for_job", retries=3, retry_delay=timedelta(minutes=1))

    @task(retries=0)  # the outputs are what they are; a rerun of the DAG resumes the job if needed
    def verify_run(params=None) -> dict:
        from pipelines.report import check_run_record
        from pipelines.runtime import io

        return check_run_record(io.read_json(io.join(params["output"], "run.json")), float(params["max_error_rate"]))

    @task
    def done(summary: dict, params=None) -> None:
        print(f"latentray {params['kind']} into {params['output']}: {summary}")

    checked = verify_run()
    check_input() >> submit_job() >> wait_for_job >> checked
    done(checked)
