"""`latentray submit` and the Airflow DAG against a real Ray head (`ray start --head` on 127.0.0.1).

The head exists only while this module runs and is stopped by its process group.
It enforces Ray's token authentication with its own token file, which the tests hand
to the client through RAY_AUTH_TOKEN_PATH, the way Ray itself reads it.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

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


# One Airflow process for several DAG runs (Airflow's import costs seconds), so that a test can
# change the input between runs: each line read, "DAG_ID [CONF_JSON]", is one dag.test() of that
# DAG as Airflow finds it in the dags folder; the outcome follows the run's log as a RESULT line.
AIRFLOW_RUNS = textwrap.dedent("""
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.dag import DagModel

    bag = DagBag(dag_folder=sys.argv[1])
    if bag.import_errors:
        sys.exit(f"DAG files that do not load: {bag.import_errors}")
    for line in sys.stdin:
        dag_id, _, conf = line.strip().partition(" ")
        run = bag.get_dag(dag_id).test(run_conf=json.loads(conf) if conf else None)
        states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
        next_run = DagModel.get_current(dag_id).next_dagrun_create_after  # when a scheduler would start the next run
        print("RESULT " + json.dumps({"state": str(run.state), "tasks": states, "next_run": str(next_run)}), flush=True)
""")
# what the DAG's submit_job task prints: the Ray job of the run and what it did with it
SUBMISSION = re.compile(r"^Ray job (latentray-\S+): (submitted|attached|already succeeded) \(status", re.MULTILINE)


@dataclass
class DagRun:
    state: str
    tasks: dict[str, str]
    next_run: str
    log: str

    @property
    def submission(self) -> tuple[str, str]:
        """(submission id, "submitted" / "attached" / "already succeeded") of the run's submit_job task."""
        found = SUBMISSION.findall(self.log)
        assert len(found) == 1, self.log[-5000:]
        return found[0]


class AirflowRuns:
    """Runs DAGs of a dags folder on request in one Airflow process (``AIRFLOW_RUNS``)."""

    def __init__(self, env: dict[str, str], dags, log_path):
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-c", AIRFLOW_RUNS, str(dags)], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, dag_id: str, conf: dict | None = None) -> DagRun:
        self.process.stdin.write(f"{dag_id} {json.dumps(conf) if conf else ''}\n")
        self.process.stdin.flush()
        lines = []
        for line in self.process.stdout:  # read as it comes: the run's log never fills the pipe
            self.log.write(line)
            if line.startswith("RESULT "):
                return DagRun(**json.loads(line.removeprefix("RESULT ")), log="".join(lines))
            lines.append(line)
        raise AssertionError(f"the Airflow process ended (exit {self.process.wait()}): {''.join(lines)[-5000:]}")

    def close(self) -> None:
        self.process.stdin.close()  # the end of its input ends it, between runs
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # stopped inside a run (a failed test): its Ray job is the head's to end
            self.process.kill()
            self.process.wait()
        self.log.close()


def airflow_environment(home) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    return env


def readme_daily_dag(**values) -> str:
    """The README's scheduled DAG file, its keyword arguments set to ``values`` (what a user edits: the locations).

    Read from the README itself, so that the DAG it shows is the one this test runs.
    """
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    _, found, section = readme.partition("**A scheduled, incremental DAG.**")
    assert found, "README.md: no scheduled DAG example under its heading; this test runs that example"
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(snippet)
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "latentray_dag")
    keywords = {keyword.arg: keyword for keyword in call.keywords}
    assert ast.literal_eval(keywords["schedule"].value) == "@daily" and ast.literal_eval(keywords["input"].value).endswith("/")
    for name, value in values.items():
        expression = ast.parse(repr(value), mode="eval").body
        if name in keywords:
            keywords[name].value = expression
        else:
            call.keywords.append(ast.keyword(arg=name, value=expression))
    return ast.unparse(tree)


def test_airflow_dags_run_jobs_and_the_readme_daily_dag_generates_each_new_file_once(head_token, tmp_path):
    head = head_token
    home, prompts, output = tmp_path / "airflow", tmp_path / "prompts", tmp_path / "out"
    dags = home / "dags"
    dags.mkdir(parents=True)
    day_1 = PROMPTS + [{"id": "blank", "prompt": " "}]  # a row that ends in errors/: counted once, never retried
    write_prompts(prompts / "day-1.parquet", day_1)
    params = {"input": f"{prompts}/", "output": str(output), "model": "tiny",
              "options": {"steps": 1, "height": 16, "width": 16, "stage": ["fused.num_cpus=0.5"]},
              "ray_address": head.address, "max_error_rate": 0.25, "poll_seconds": 1}
    # what a user does: copy the DAG file into Airflow's dags folder; write the README's daily DAG there
    shutil.copy(Path(__file__).parents[1] / "jobs" / "airflow_dag.py", dags / "latentray_dag.py")
    (dags / "daily_images.py").write_text(readme_daily_dag(**params))
    env = airflow_environment(home)
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=180)
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    airflow = AirflowRuns(env, dags, tmp_path / "airflow.log")
    try:
        # day 1: the folder's rows; day 2: a new file, only its rows; day 3: no new file, nothing
        first = airflow.run("daily_images")
        first_record = json.loads((output / "run.json").read_text())
        images_before = {path.name: path.stat().st_mtime_ns for path in (output / "images").iterdir()}
        write_prompts(prompts / "day-2.parquet", NEW_PROMPTS)
        second = airflow.run("daily_images")
        second_record = (output / "run.json").read_text()
        third = airflow.run("daily_images")
        # the DAG triggered by hand with the same params names the same job
        by_hand = airflow.run("latentray", {"kind": "generate", **params})
    finally:
        airflow.close()

    for run in (first, second, third, by_hand):
        assert run.state == "success" and set(run.tasks.values()) == {"success"} and len(run.tasks) == 5, run.log[-5000:]
    assert first.next_run != "None" and by_hand.next_run == "None"  # a scheduler runs the daily DAG by itself
    assert "running trigger in line" in first.log  # the wait was deferred to the trigger

    # one Ray job per state of the folder, each named by the state its run listed
    request = job_request_from_arguments("generate", [
        "--prompts", params["input"], "--output", str(output), "--model", "tiny", "--steps", "1", "--height", "16",
        "--width", "16", "--stage", "fused.num_cpus=0.5"])
    assert first.submission[1] == "submitted" and second.submission == (request.attempt_id(1), "submitted")
    assert first.submission[0] != second.submission[0]
    assert third.submission == by_hand.submission == (second.submission[0], "already succeeded")
    jobs = [job.submission_id for job in latentray_jobs(head) if (job.metadata or {}).get("latentray_output") == str(output)]
    assert sorted(jobs) == sorted([first.submission[0], second.submission[0]])
    assert f"input state {request.input_state};" in second.log  # the wait named the job by check_input's listing

    # every row once: day 1's by the first job, day 2's by the second, nothing again
    counts = first_record["counts"]
    assert (counts["input_rows"], counts["ok_rows"], counts["error_rows"], counts["generated_this_run"]) == (5, 4, 1, 4)
    counts = json.loads(second_record)["counts"]
    assert (counts["input_rows"], counts["ok_rows"], counts["error_rows"], counts["generated_this_run"]) == (7, 6, 1, len(NEW_PROMPTS))
    assert (output / "run.json").read_text() == second_record  # the third run and the hand-triggered one ran nothing
    assert sorted(pd.read_parquet(output / "manifest")["id"]) == [row["id"] for row in PROMPTS + NEW_PROMPTS]
    assert all((output / "images" / name).stat().st_mtime_ns == mtime for name, mtime in images_before.items())
