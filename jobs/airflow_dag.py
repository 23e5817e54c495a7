"""Airflow DAG ``latentray``: run a latentray job on a Ray cluster and check what it wrote.

To use it, install latentray with its Airflow extra where Airflow runs
(``pip install 'latentray[airflow]'``) and copy this file into Airflow's dags folder.
Trigger it with params, e.g.::

    {"kind": "generate", "input": "s3://bucket/prompts/", "output": "s3://bucket/run1",
     "model": "s3://bucket/models/sd15", "options": {"steps": 30, "save_latents": true},
     "ray_address": "http://head:8265", "max_error_rate": 0.01}

    check_input -> submit_job -> wait_for_job -> verify_run -> done

``check_input`` lists the input once (its files, sizes and versions) and every later task
names the Ray job by that state. ``wait_for_job`` is deferred to Airflow's triggerer while
the job runs (no worker slot held for hours). Every step that talks to Ray uses
``jobs.submit``: submitting twice attaches to the running job, a retry after a failed job
starts its next attempt, which resumes from the rows already committed, and a run after
files were added to the input submits a new job that does only the new rows.

For a scheduled DAG (e.g. daily, incremental) call ``latentray_dag`` with ``schedule`` and
the params' defaults in a DAG file of your own (see the README).
"""

from __future__ import annotations

from jobs.airflow_ray import latentray_dag

dag = latentray_dag("latentray")
