"""`latentray submit` and the Airflow DAG against a real Ray head (`ray start --head` on 127.0.0.1).

The head exists only while this module runs and is stopped by its process group.
It enforces Ray's token authentication with its own token file, which the tests hand
to the client through RAY_AUTH_TOKEN_PATH, the way Ray itself reads it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_prompts
from ray_head import start_head

from jobs.cli import main
from jobs.submit import connect_jobs_api, job_request_from_arguments, wait_for_job

pytestmark = pytest.mark.slow  # a Ray head started with `ray start`, and jobs submitted to it: ~30 s each

PROMPTS = [{"id": f"p{i}", "prompt": text} for i, text in enumerate(["a red cube", "a blue ball", "a green cone", "a grey owl"])]
NEW_PROMPTS = [{"id": "p4", "prompt": "a pink star"}, {"id": "p5", "prompt": "a tall tree"}]
# a secret in the submitting process must reach neither the job's runtime_env nor its logs
FAKE_SECRET = "fake-secret-never-shown-1234"


@pytest.fixture(scope="module")
def head(model_cache):
    # LATENTRAY_CACHE: the job builds the tiny preset into the session's cache, not ~/.cache
    head = start_head({"LATENTRAY_CACHE": str(model_cache), "LATENTRAY_PROGRESS_SECONDS": "0.5"})
    yield head
    head.stop()


@pytest.fixture
def head_token(head, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", head.token_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    return head


def generate_arguments(prompts, output) -> list[str]:
    return ["--prompts", str(prompts), "--output", str(output), "--model", "tiny", "--steps", "2",
            "--height", "32", "--width", "32", "--stage", "fused.num_cpus=0.5"]


def write_images(path) -> str:
    """A tiny image table for `encode`: PNG bytes in an `image` column, one row that is not an image."""
    from image_helpers import picture, png

    rows = [{"id": f"img{i}", "image": png(picture(i, 40, 40)), "caption": f"picture {i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows + [{"id": "broken", "image": b"nope", "caption": "not an image"}]), path)
    return str(path)


def encode_arguments(images, output) -> list[str]:
    return ["--images", str(images), "--output", str(output), "--model", "tiny", "--resolution", "32",
            "--caption-column", "caption", "--stage", "vae_encoder.num_cpus=0.5"]


def latentray_jobs(head) -> list:
    return [job for job in connect_jobs_api(head.address).list_jobs() if (job.submission_id or "").startswith("latentray-")]


def test_submit_attaches_resumes_never_runs_a_job_twice_and_picks_up_new_input(head_token, tmp_path, capsys):
    head = head_token
    prompts = tmp_path / "prompts"  # a folder, where a schedule's new files land
    write_prompts(prompts / "day-1.parquet", PROMPTS)
    output = tmp_path / "out"
    submit = ["submit", "generate", *generate_arguments(prompts, output), "--address", head.address]
    request = job_request_from_arguments("generate", generate_arguments(prompts, output))
    client = connect_jobs_api(head.address)

    # 0. an encode job runs beside the generate job (each actor reserves half a CPU of the head's 2)
    images, latents = write_images(tmp_path / "images.parquet"), tmp_path / "latents"
    encode = job_request_from_arguments("encode", encode_arguments(images, latents))
    assert main(["submit", "encode", *encode_arguments(images, latents), "--address", head.address, "--no-wait"]) == 0

    # 1. submitted without waiting; the same submission while it runs attaches
    assert main([*submit, "--no-wait"]) == 0
    assert main([*submit, "--no-wait"]) == 0
    err = capsys.readouterr().err
    assert f"submitted job {request.attempt_id(1)}" in err and "following it instead of submitting again" in err
    assert sorted(job.submission_id for job in latentray_jobs(head)) == sorted([encode.attempt_id(1), request.attempt_id(1)])

    # 2. stopped: the next submission is a new attempt, which runs to the end
    client.stop_job(request.attempt_id(1))
    assert wait_for_job(client, request.attempt_id(1), poll_seconds=0.2, follow_logs=False)[0] == "STOPPED"
    assert main(submit) == 0
    captured = capsys.readouterr()
    assert f"submitted job {request.attempt_id(2)}" in captured.err and f"{request.attempt_id(1)} STOPPED" in captured.err
    assert f"job {request.attempt_id(2)} SUCCEEDED" in captured.err
    assert '"status": "complete"' in captured.out  # the job's own logs, streamed
    assert "latentray generate: 4/4 rows (100.0%)" in captured.out  # its progress lines

    # 3. after success: nothing is submitted
    assert main(submit) == 0
    assert "already SUCCEEDED" in capsys.readouterr().err
    assert sorted(job.submission_id for job in latentray_jobs(head)) == sorted([encode.attempt_id(1), request.attempt_id(1), request.attempt_id(2)])

    record = json.loads((output / "run.json").read_text())
    assert record["status"] == "complete" and record["counts"]["ok_rows"] == len(PROMPTS)
    manifest = pd.read_parquet(output / "manifest")
    assert sorted(manifest["id"]) == [row["id"] for row in PROMPTS]
    assert all((output / path).is_file() for path in manifest["image_path"])

    # 4. the encode job: one job, its outputs complete, and submitting it again runs nothing
    assert wait_for_job(client, encode.attempt_id(1), poll_seconds=0.5, follow_logs=False)[0] == "SUCCEEDED"
    encoded = json.loads((latents / "run.json").read_text())
    assert encoded["status"] == "complete" and (encoded["counts"]["ok_rows"], encoded["counts"]["error_rows"]) == (3, 1)
    assert sorted(pd.read_parquet(latents / "latents", columns=["id"])["id"]) == ["img0", "img1", "img2"]
    assert main(["submit", "encode", *encode_arguments(images, latents), "--address", head.address]) == 0
    assert "already SUCCEEDED" in capsys.readouterr().err

    # 5. nothing secret travelled with the job
    details = client.get_job_info(request.attempt_id(2))
    assert not (details.runtime_env or {}).get("env_vars")
    assert FAKE_SECRET not in json.dumps(details.model_dump(), default=str)
    assert FAKE_SECRET not in client.get_job_logs(request.attempt_id(2))

    # 6. a new file in the prompt folder (what a daily schedule finds): a new job, which resumes into
    # the same output and generates only the new rows. Another file while it runs: the next
    # submission follows it (one writer per output), and the one after it ends picks up the rest.
    images_before = {path.name: path.stat().st_mtime_ns for path in (output / "images").iterdir()}
    write_prompts(prompts / "day-2.parquet", NEW_PROMPTS[:1])
    later = job_request_from_arguments("generate", generate_arguments(prompts, output))
    assert later.configuration == request.configuration and later.fingerprint != request.fingerprint
    assert main([*submit, "--no-wait"]) == 0
    write_prompts(prompts / "day-3.parquet", NEW_PROMPTS[1:])
    latest = job_request_from_arguments("generate", generate_arguments(prompts, output))
    assert main([*submit, "--no-wait"]) == 0
    err = capsys.readouterr().err
    assert f"submitted job {later.attempt_id(1)}" in err and f"job {later.attempt_id(1)} (same kind, output and options, an earlier state" in err
    assert wait_for_job(client, later.attempt_id(1), poll_seconds=0.5, follow_logs=False)[0] == "SUCCEEDED"
    assert main(submit) == 0
    assert f"job {latest.attempt_id(1)} SUCCEEDED" in capsys.readouterr().err
    assert main(submit) == 0
    assert f"job {latest.attempt_id(1)} already SUCCEEDED" in capsys.readouterr().err

    counts = json.loads((output / "run.json").read_text())["counts"]
    assert (counts["input_rows"], counts["ok_rows"]) == (6, 6)
    assert sorted(pd.read_parquet(output / "manifest")["id"]) == [row["id"] for row in PROMPTS + NEW_PROMPTS]  # each once
    # the two jobs generated the two new rows between them (the first may have seen both files), nothing else
    generated = [int(re.findall(r'"generated_this_run": (\d+)', client.get_job_logs(job.attempt_id(1)))[-1]) for job in (later, latest)]
    assert sum(generated) == len(NEW_PROMPTS)
    assert all((output / "images" / name).stat().st_mtime_ns == mtime for name, mtime in images_before.items())


def test_a_missing_or_wrong_token_says_how_to_provide_it(head, tmp_path, monkeypatch, capsys):
    prompts = write_prompts(tmp_path / "prompts.parquet", PROMPTS)
    submit = ["submit", "generate", *generate_arguments(prompts, tmp_path / "out"), "--address", head.address]
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(submit) == 2
    err = capsys.readouterr().err
    assert "rejected the token from RAY_AUTH_TOKEN" in err and "RAY_AUTH_TOKEN_PATH" in err and "not-the-token" not in err

    # without any token, in a fresh process (this one may have Ray's own token cached)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *submit], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs an authentication token" in result.stderr and "ray get-auth-token" in result.stderr


AIRFLOW_RUN = textwrap.dedent("""
    import json, sys
    from jobs.airflow_dag import dag

    run = dag.test(run_conf=json.loads(sys.argv[1]))
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print("RESULT " + json.dumps({"state": str(run.state), "tasks": states}))
""")


def airflow_environment(home) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    return env


def test_airflow_dag_runs_a_generate_job_on_the_head(head_token, tmp_path):
    head = head_token
    home = tmp_path / "airflow"
    (home / "dags").mkdir(parents=True)
    # what a user does: drop the DAG file into Airflow's dags folder
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "jobs", "airflow_dag.py"), home / "dags" / "latentray_dag.py")
    env = airflow_environment(home)
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    prompts = write_prompts(tmp_path / "prompts.parquet", PROMPTS + [{"id": "blank", "prompt": " "}])
    output = tmp_path / "out"
    conf = {"kind": "generate", "input": prompts, "output": str(output), "model": "tiny",
            "options": {"steps": 2, "height": 32, "width": 32, "stage": ["fused.num_cpus=0.5"]},
            "ray_address": head.address, "max_error_rate": 0.25, "poll_seconds": 1}
    result = subprocess.run([sys.executable, "-c", AIRFLOW_RUN, json.dumps(conf)], env=env, capture_output=True, text=True, timeout=300)
    (tmp_path / "dag-test.log").write_text(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (result.stdout[-3000:], result.stderr[-5000:])
    outcome = json.loads(lines[-1].removeprefix("RESULT "))
    assert outcome["state"] == "success", (outcome, result.stderr[-5000:])
    assert set(outcome["tasks"].values()) == {"success"} and len(outcome["tasks"]) == 5
    assert "running trigger in line" in result.stdout + result.stderr  # the wait was deferred to the trigger

    record = json.loads((output / "run.json").read_text())
    assert record["counts"]["input_rows"] == 5 and record["counts"]["ok_rows"] == 4 and record["counts"]["error_rows"] == 1
    assert sorted(pd.read_parquet(output / "manifest")["id"]) == [row["id"] for row in PROMPTS]
    # one Ray job for this output, submitted by the DAG's submit task; the wait task attached to it
    request = job_request_from_arguments("generate", ["--prompts", prompts, "--output", str(output), "--model", "tiny",
                                                      "--steps", "2", "--height", "32", "--width", "32", "--stage", "fused.num_cpus=0.5"])
    assert [job.submission_id for job in latentray_jobs(head) if job.submission_id.startswith(request.id_prefix)] == [request.attempt_id(1)]
    assert f"input state {request.input_state};" in result.stdout + result.stderr  # the wait named the job by check_input's listing
