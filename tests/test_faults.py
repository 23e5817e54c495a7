"""Faults with real processes and real signals: the model actor SIGKILLed mid-run, twice; the driver
SIGKILLed mid-run, then the job rerun (``generate`` and ``encode``); an object store that throttles, cuts connections, refuses some
rows' image writes or source reads (image-to-image, ``encode``: transient errors, retried by the rerun) or refuses listings; and one writer per
output (a second run refused, a dead run's lease taken over).

The job runs as a user runs it (``python -m jobs.cli generate``, embedded Ray, in its own
process group); the test finds the model actor among the job's processes by the title
Ray gives it, kills it with SIGKILL once some images are written, kills its replacement
the same way, and checks what the run committed against a clean run of the same input.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from io import BytesIO
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import read_image, write_prompts

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTOR_TITLE = "ray::MapWorker(MapBatches(FusedGenerationWorker))"
ROWS = 32
STEPS = 8

pytestmark = pytest.mark.slow  # real processes killed and rerun: ~30-60 s each


def job_command(prompts: str, output: str, *options: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "generate", "--model", "tiny", "--prompts", prompts, "--output", output,
            "--steps", str(steps), "--batch-size", "4", "--height", "64", "--width", "64", *options]


def start_job(command: list[str], **environment: str) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **environment})


def run_clean(command: list[str]) -> float:
    """Run the job to its end, as a reference for the faulted run; its wall seconds."""
    started = time.monotonic()
    clean = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    return time.monotonic() - started


def run_through(proxy: "FaultyS3Proxy", command: list[str], label: str, **environment: str) -> subprocess.CompletedProcess:
    """Run the job to its end with its S3 requests through ``proxy`` (closed after); print its time and the proxy's counts."""
    started = time.monotonic()
    try:
        return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, **environment})
    finally:
        proxy.close()
        print(f"{label} {time.monotonic() - started:.1f} s, proxy {proxy.counts}")


def process_titles() -> dict[int, str]:
    titles = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    titles[int(entry)] = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
            except OSError:
                continue
    return titles


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def model_actor(job: subprocess.Popen, not_pid: int | None = None) -> int | None:
    """The job's live model actor (Ray's workers stay in the driver's session)."""
    for pid, title in process_titles().items():
        if title.startswith(ACTOR_TITLE) and pid != not_pid and session_of(pid) == job.pid:
            return pid
    return None


def images_written(output: str) -> int:
    folder = os.path.join(output, "images")
    return len([name for name in os.listdir(folder) if not name.startswith(".")]) if os.path.isdir(folder) else 0


def wait_for(condition, job: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if job.poll() is not None:
            pytest.fail(f"the job ended (exit {job.returncode}) while waiting for {what}:\n{job.stderr.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def manifest_ids(output: str) -> list[str]:
    return pq.read_table(os.path.join(output, "manifest"), columns=["id"]).column("id").to_pylist()


def images_by_id(output: str) -> dict[str, np.ndarray]:
    rows = pq.read_table(os.path.join(output, "manifest"), columns=["id", "image_path"]).to_pylist()
    return {row["id"]: read_image(os.path.join(output, row["image_path"])) for row in rows}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, model_cache) -> str:
    folder = tmp_path_factory.mktemp("fault-prompts")
    return write_prompts(folder / "prompts.parquet", {
        "id": [f"row-{index:03d}" for index in range(ROWS)],
        "prompt": [f"a red circle number {index}" for index in range(ROWS)],
        "seed": list(range(ROWS)),
    })


def test_model_actor_killed_twice_the_run_completes_each_row_once_images_equal(prompts, tmp_path):
    """Also one writer per output: a second run into the live run's output is refused, and a stale
    lease (its process gone, expired) is taken over by the rerun of the finished output."""
    import socket

    from pipelines.runtime import io, lease

    # 1. a clean run of the same input
    clean_output = str(tmp_path / "clean")
    clean_seconds = run_clean(job_command(prompts, clean_output))

    # 2. the same run, holding the output's lease: a second run into that output is refused with exit 2, naming it
    output = str(tmp_path / "killed")
    lease_uri = io.join(output, lease.LEASE_NAME)
    command = job_command(prompts, output)
    started = time.monotonic()
    job = start_job(command)
    try:
        holder = wait_for(lambda: io.read_json(lease_uri), job, 300, "the run's lease")
        assert holder["pid"] == job.pid and holder["host"] == socket.gethostname()
        second = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"host {holder['host']}, pid {job.pid}, since {holder['since']}" in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr

        # 3. its model actor SIGKILLed once some images exist, then its replacement too
        killed = []
        for images_before_kill in (4, 12):
            wait_for(lambda: images_written(output) >= images_before_kill, job, 300, f"{images_before_kill} images")
            actor = wait_for(lambda: model_actor(job, not_pid=killed[-1] if killed else None), job, 120, "a model actor")
            os.kill(actor, signal.SIGKILL)
            killed.append(actor)
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    killed_seconds = time.monotonic() - started
    print(f"clean run {clean_seconds:.1f} s; with two actor kills {killed_seconds:.1f} s "
          f"({killed_seconds / clean_seconds:.2f}x)")

    # 4. it finished by itself, every row exactly once, the same images as the clean run, and gave the lease back
    assert job.returncode == 0, stderr[-3000:]
    assert len(killed) == 2 and killed[0] != killed[1]
    ids = manifest_ids(output)
    assert sorted(ids) == sorted(manifest_ids(clean_output)) and len(ids) == len(set(ids)) == ROWS
    clean_images = images_by_id(clean_output)
    for row_id, image in images_by_id(output).items():
        assert np.array_equal(image, clean_images[row_id]), row_id
    assert io.read_json(lease_uri) is None

    # 5. a stale lease (its process no longer runs, it expired) is taken over: the finished rerun exits 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"token": "stale", "host": socket.gethostname(), "pid": int(gone.stdout), "since": "2026-12-01T00:00:00+00:00",
             "renewed_at": "2026-12-01T00:00:00+00:00", "expires_at": time.time() - 1}
    io.write_json(lease_uri, stale)
    rerun = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the lease of host {stale['host']}, pid {stale['pid']}" in rerun.stderr
    assert json.loads(rerun.stdout)["counts"]["generated_this_run"] == 0 and io.read_json(lease_uri) is None


# -- the driver killed, then the job rerun ---------------------------------------------------------

DRIVER_KILL_ROWS = 96  # one-batch blocks: the 2 blocks in flight at the kill are a small share of the rows
DRIVER_KILL_STEPS = 40  # ~8 s of model work per run: the kill follows progress, so start-up may dominate
TWO_ACTORS = ("--stage", "fused.concurrency=2")


def committed(output: str) -> dict[str, list[str]]:
    """Ids in manifest/ and errors/ (each folder may be absent or empty)."""
    found = {}
    for folder in ("manifest", "errors"):
        path = os.path.join(output, folder)
        parts = [name for name in os.listdir(path) if name.endswith(".parquet")] if os.path.isdir(path) else []
        found[folder] = pq.read_table(path, columns=["id"]).column("id").to_pylist() if parts else []
    return found


def processes_of_session(session: int) -> dict[int, str]:
    return {pid: title for pid, title in process_titles().items() if session_of(pid) == session}


def temporary_files(output: str) -> list[str]:
    return [os.path.join(folder, name) for folder, _, names in os.walk(output) for name in names if name.startswith(".tmp-")]


def test_driver_killed_mid_run_then_rerun_generates_exactly_the_missing_rows(tmp_path, model_cache):
    """Also: the killed driver's lease, still valid, is taken over at once by the rerun on the same host."""
    from pipelines.runtime import io, lease

    prompts = write_prompts(tmp_path / "prompts.parquet", {
        "id": [f"row-{index:03d}" for index in range(DRIVER_KILL_ROWS)],
        "prompt": [f"a blue square number {index}" for index in range(DRIVER_KILL_ROWS)],
        "seed": list(range(DRIVER_KILL_ROWS)),
    })
    # 1. a clean run, for its wall time and its images
    clean_output = str(tmp_path / "clean")
    clean_seconds = run_clean(job_command(prompts, clean_output, *TWO_ACTORS, steps=DRIVER_KILL_STEPS))

    # 2. the same run, its driver SIGKILLed once a quarter of the rows are committed (its lease long, so still valid
    # after): the kill follows progress, not the clock, so that a loaded machine cannot move it past the end of the run
    output = str(tmp_path / "killed")
    command = job_command(prompts, output, *TWO_ACTORS, steps=DRIVER_KILL_STEPS)
    started = time.monotonic()
    job = start_job(command, LATENTRAY_LEASE_SECONDS="600")
    try:
        wait_for(lambda: sum(map(len, committed(output).values())) >= DRIVER_KILL_ROWS // 4, job, 300, "a quarter of the rows")
        quarter_seconds = time.monotonic() - started
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        # every process of the killed run's Ray goes with its driver (Ray's agents would linger for a minute)
        deadline = time.monotonic() + 20
        while processes_of_session(job.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_of_session(job.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert not left, f"processes of the killed run still running 20 s after the kill: {left}"
    at_kill = committed(output)
    rows_at_kill = len(at_kill["manifest"]) + len(at_kill["errors"])
    print(f"clean run {clean_seconds:.1f} s; a quarter of the rows committed at {quarter_seconds:.1f} s "
          f"({quarter_seconds / clean_seconds:.0%} of the clean run); killed with {rows_at_kill} of {DRIVER_KILL_ROWS} rows committed")
    assert DRIVER_KILL_ROWS // 4 <= rows_at_kill < DRIVER_KILL_ROWS, "the run had finished: the kill came too late to test anything"
    left = io.read_json(io.join(output, lease.LEASE_NAME))
    assert left["pid"] == job.pid and left["expires_at"] > time.time()

    # 3. the rerun, at once: the killed driver's lease is unexpired, but its process on this host is gone, so
    # the rerun takes it over; it generates exactly the rows the killed run had not committed, and leaves no temporary file
    rerun = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the lease of host {left['host']}, pid {job.pid} (its process on this host is gone)" in rerun.stderr
    counts = json.loads(open(os.path.join(output, "run.json")).read())["counts"]
    assert counts["accounted_before_this_run"] == rows_at_kill
    assert counts["generated_this_run"] + counts["accounted_before_this_run"] == counts["input_rows"] == DRIVER_KILL_ROWS
    ids = manifest_ids(output)
    assert len(ids) == len(set(ids)) == DRIVER_KILL_ROWS and not committed(output)["errors"]
    assert not temporary_files(output)
    clean_images = images_by_id(clean_output)
    for row_id, image in images_by_id(output).items():
        assert np.array_equal(image, clean_images[row_id]), row_id


def test_a_run_stopped_by_sigterm_gives_its_lease_back_at_once_and_leaves_no_process(prompts, tmp_path):
    """``ray job stop``, an Airflow timeout or ``kill`` send SIGTERM: the run ends with exit 143 and gives its
    output's lease back, so the next run need not wait for it to expire; its local Ray goes with it."""
    from pipelines.runtime import io, lease

    output = str(tmp_path / "stopped")
    job = start_job(job_command(prompts, output), LATENTRAY_LEASE_SECONDS="600")
    try:
        wait_for(lambda: images_written(output) > 0, job, timeout=120, what="a first image")
        os.kill(job.pid, signal.SIGTERM)
        _, err = job.communicate(timeout=60)
        deadline = time.monotonic() + 20
        while processes_of_session(job.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_of_session(job.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 143, err[-3000:]
    assert "latentray: stopped (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    assert io.read_json(io.join(output, lease.LEASE_NAME)) is None  # given back, not left to expire in 600 s
    assert not left, f"processes of the stopped run still running 20 s after it ended: {left}"


# -- encode: the driver killed, then the rerun with its model actor killed ----------------------------

ENCODE_ROWS = 400  # ~15 s of encoding at 256 px: enough parts that a quarter commits mid-run
ENCODE_ACTOR_TITLE = "ray::MapWorker(MapBatches(FusedEncodingWorker))"


def encode_command(images: str, output: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "encode", "--model", "tiny", "--images", images, "--output", output,
            "--resolution", "256", "--caption-column", "caption", "--text-embeddings"]


def encoded_ids(output: str) -> dict[str, list[str]]:
    """Ids in latents/ and errors/ (each folder may be absent or empty)."""
    found = {}
    for folder in ("latents", "errors"):
        path = os.path.join(output, folder)
        parts = [name for name in os.listdir(path) if name.endswith(".parquet")] if os.path.isdir(path) else []
        found[folder] = pq.read_table(path, columns=["id"]).column("id").to_pylist() if parts else []
    return found


@pytest.mark.time_limit(600)  # three whole encodes: ~2 min on a quiet machine
def test_encode_driver_killed_then_rerun_with_its_actor_killed_encodes_exactly_the_missing_rows(tmp_path, model_cache):
    """encode commits block by block, so what it committed survives its driver's SIGKILL (the test prints
    when a quarter of the rows were committed, as a share of a clean run's time); the rerun encodes only the rest, completes by itself through a SIGKILL of
    its model actor, and the output equals a clean run's (latents, embeddings, exact statistics)."""
    from image_helpers import picture, png, write_table
    from latent_helpers import assert_stats_equal_numpy, latents_frame

    images = write_table(tmp_path / "images.parquet", [
        {"id": f"img-{index:04d}", "image": png(picture(index, 256, 256)), "caption": f"a picture number {index % 50}"}
        for index in range(ENCODE_ROWS)])
    # 1. a clean run, for its wall time and its latents
    clean_output = str(tmp_path / "clean")
    clean_seconds = run_clean(encode_command(images, clean_output))

    # 2. the same run, its driver SIGKILLed (with its Ray) once a quarter of the rows are committed: the kill
    # follows progress, not the clock, so that a loaded machine cannot move it past the end of the run
    output = str(tmp_path / "killed")
    started = time.monotonic()
    job = start_job(encode_command(images, output))
    try:
        wait_for(lambda: len(encoded_ids(output)["latents"]) >= ENCODE_ROWS // 4, job, 300, "a quarter of the rows")
        quarter_seconds = time.monotonic() - started
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    at_kill = encoded_ids(output)
    rows_at_kill = len(at_kill["latents"]) + len(at_kill["errors"])
    print(f"clean run {clean_seconds:.1f} s; a quarter of the rows committed at {quarter_seconds:.1f} s "
          f"({quarter_seconds / clean_seconds:.0%} of the clean run); killed with {rows_at_kill} of {ENCODE_ROWS} rows committed")
    assert ENCODE_ROWS // 4 <= rows_at_kill < ENCODE_ROWS, rows_at_kill

    # 3. the rerun, its model actor SIGKILLed once it has committed rows of its own
    rerun = start_job(encode_command(images, output))
    try:
        wait_for(lambda: len(encoded_ids(output)["latents"]) > rows_at_kill, rerun, 300, "the rerun's first part")
        actor = wait_for(lambda: next((pid for pid, title in process_titles().items()
                                       if title.startswith(ENCODE_ACTOR_TITLE) and session_of(pid) == rerun.pid), None),
                         rerun, 120, "the rerun's model actor")
        os.kill(actor, signal.SIGKILL)
        stdout, stderr = rerun.communicate(timeout=600)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
    assert rerun.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr

    # 4. only the missing rows encoded; every row once; the clean run's latents, embeddings and exact statistics
    counts = json.loads(stdout)["counts"]
    assert counts["encoded_this_run"] == ENCODE_ROWS - rows_at_kill, counts
    assert counts["ok_rows"] == counts["input_rows"] == ENCODE_ROWS and counts["error_rows"] == 0
    ids = encoded_ids(output)["latents"]
    assert len(ids) == len(set(ids)) == ENCODE_ROWS and not encoded_ids(output)["errors"]
    assert not temporary_files(output)
    written, expected = latents_frame(output), latents_frame(clean_output)
    assert list(written.index) == list(expected.index)
    for row_id in written.index:
        assert np.array_equal(written.at[row_id, "latent"], expected.at[row_id, "latent"]), row_id
    written_embeddings = pq.read_table(os.path.join(output, "latents"), columns=["id", "prompt_embeds"]).to_pydict()
    expected_embeddings = pq.read_table(os.path.join(clean_output, "latents"), columns=["id", "prompt_embeds"]).to_pydict()
    by_id = dict(zip(expected_embeddings["id"], expected_embeddings["prompt_embeds"]))
    assert all(embedding == by_id[row_id] for row_id, embedding in zip(written_embeddings["id"], written_embeddings["prompt_embeds"]))
    assert_stats_equal_numpy(output)


# -- an object store that throttles and drops connections -------------------------------------------

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
ACCESS_DENIED = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
REFUSALS = {503: SLOW_DOWN, 403: ACCESS_DENIED}


class FaultyS3Proxy:
    """A small HTTP proxy in front of the S3 server: answers one request in ``slow_down_every`` with
    503 SlowDown and cuts one connection in ``cut_every`` mid-response (after the server acted).
    Counted, not drawn: every run injects the same share of faults (``0``: none). ``refuse(method, path)``:
    requests answered ``refuse_status`` every time: 503 SlowDown (a listing that keeps failing through the
    client's retries) or 403 AccessDenied (a write the store refuses, which no client retries)."""

    def __init__(self, upstream: str, slow_down_every: int = 0, cut_every: int = 0, refuse: Callable[[str, str], bool] | None = None,
                 refuse_status: int = 503):
        import http.server
        import threading
        import urllib.parse

        upstream_host, upstream_port = urllib.parse.urlsplit(upstream).hostname, urllib.parse.urlsplit(upstream).port
        lock = threading.Lock()
        self.counts = {"requests": 0, "slow_down": 0, "cut": 0, "refused": 0}
        counts = self.counts

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def forward(self) -> None:
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with lock:
                    counts["requests"] += 1
                    number = counts["requests"]
                refused = refuse is not None and refuse(self.command, self.path)
                if refused or (slow_down_every and number % slow_down_every == 3):
                    with lock:
                        counts["refused" if refused else "slow_down"] += 1
                    status = refuse_status if refused else 503
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(REFUSALS[status])))
                    self.end_headers()
                    self.wfile.write(REFUSALS[status])
                    return
                connection = http.client.HTTPConnection(upstream_host, upstream_port, timeout=60)
                headers = {key: value for key, value in self.headers.items() if key.lower() not in ("expect", "connection")}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                connection.close()
                if cut_every and number % cut_every == 7:  # the server acted; the client sees half an answer
                    with lock:
                        counts["cut"] += 1
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in ("connection", "transfer-encoding"):
                            self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    # a HEAD answer keeps the object's length; others get the length of what is sent
                    if key.lower() not in ("connection", "transfer-encoding") and (self.command == "HEAD" or key.lower() != "content-length"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_object_store_throttling_cut_connections_and_refused_writes_lose_and_repeat_nothing(s3_endpoint, model_cache, tmp_path):
    """Also transient errors: the image writes of two rows refused (403) through every attempt end the first run
    incomplete with exit 3; the rerun retries exactly those rows and removes their error rows."""
    import boto3

    from helpers import assert_images_match
    from pipelines.runtime import io
    from pipelines.runtime.stats import ChannelStats

    rows = 24
    table = {"id": [f"s3-row-{index:02d}" for index in range(rows)], "prompt": [f"a green triangle {index}" for index in range(rows)],
             "seed": list(range(rows))}
    # the refused rows draw what rows 0 and 1 draw (same prompt and seed): their retried images must match those
    twins = {"s3-row-05": "s3-row-00", "s3-row-17": "s3-row-01"}
    for row_id, twin in twins.items():
        for column in ("prompt", "seed"):
            table[column][table["id"].index(row_id)] = table[column][table["id"].index(twin)]
    local_prompts = write_prompts(tmp_path / "prompts.parquet", table)
    boto3.client("s3").create_bucket(Bucket="fault-bucket")
    io.write_bytes("s3://fault-bucket/prompts/part-0.parquet", open(local_prompts, "rb").read())
    command = job_command("s3://fault-bucket/prompts/", "s3://fault-bucket/out", "--save-latents")

    # 1. the job from and to the object store, through a proxy that throttles 10%, cuts 2% and refuses two rows' image writes
    refused = lambda method, path: method == "PUT" and any(f"/out/images/{row_id}.png" in path for row_id in twins)
    proxy = FaultyS3Proxy(s3_endpoint, slow_down_every=10, cut_every=50, refuse=refused, refuse_status=403)
    faulty = run_through(proxy, command, "first run")
    assert proxy.counts["slow_down"] > 0 and proxy.counts["cut"] > 0 and proxy.counts["refused"] >= 2 * 3, proxy.counts

    # 2. those rows are transient errors: the run is incomplete, exit 3, with a line that says so
    assert faulty.returncode == 3, faulty.stderr[-3000:]
    assert "Traceback" not in faulty.stderr and f"2 of {rows} rows failed for a cause outside them" in faulty.stderr, faulty.stderr[-3000:]
    record = io.read_json("s3://fault-bucket/out/run.json")
    assert record["status"] == "incomplete" and record["error_causes"] == {"permanent": 0, "transient": 2}
    assert record["counts"]["ok_rows"] == rows - 2 and record["counts"]["error_rows"] == 2
    errors = io.read_parquet_folder("s3://fault-bucket/out/errors").to_pylist()
    assert sorted((row["id"], row["stage"], row["cause"]) for row in errors) == [(row_id, "write", "transient") for row_id in sorted(twins)]

    # 3. the rerun, through a proxy that still throttles and cuts but refuses nothing: exactly those rows, their error rows gone
    proxy = FaultyS3Proxy(s3_endpoint, slow_down_every=10, cut_every=50)
    rerun = run_through(proxy, command, "rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = io.read_json("s3://fault-bucket/out/run.json")
    assert record["status"] == "complete" and record["transient_errors_retried"] == 2 and record["counts"]["generated_this_run"] == 2
    assert record["error_causes"] == {"permanent": 0, "transient": 0}

    # 4. every row once, each image whole, latent_stats.json exact over the latents the manifest holds
    frame = io.read_parquet_columns("s3://fault-bucket/out/manifest", ["id", "image_path", "latent", "latent_shape"]).to_pylist()
    assert sorted(row["id"] for row in frame) == sorted(table["id"]) and len(frame) == rows
    assert io.read_parquet_folder("s3://fault-bucket/out/errors") is None
    images = {row["id"]: read_image(BytesIO(io.read_bytes(io.join("s3://fault-bucket/out", row["image_path"])))) for row in frame}
    assert {image.shape for image in images.values()} == {(64, 64, 3)}
    for row_id, twin in twins.items():
        assert_images_match(images[row_id], images[twin])
    latents = np.stack([np.asarray(row["latent"], np.float64).reshape(row["latent_shape"]) for row in frame])
    expected = ChannelStats.of(latents)
    stats = io.read_json("s3://fault-bucket/out/latent_stats.json")
    assert stats["count"] == expected.count.tolist()
    np.testing.assert_allclose(stats["mean"], expected.mean, rtol=1e-9)
    np.testing.assert_allclose(stats["std"], expected.std, rtol=1e-9)
    assert stats["min"] == expected.minimum.tolist() and stats["max"] == expected.maximum.tolist()


# -- a listing of the output that keeps failing -----------------------------------------------------


def object_versions(bucket: str, prefix: str) -> dict[str, str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])}


def test_refused_listings_on_a_finished_rerun_exit_3_naming_the_location_and_change_nothing(s3_endpoint, model_cache, tmp_path):
    import boto3

    rows = 6
    prompts = write_prompts(tmp_path / "prompts.parquet", {
        "id": [f"listed-{index}" for index in range(rows)], "prompt": [f"a red square {index}" for index in range(rows)],
        "seed": list(range(rows)),
    })
    boto3.client("s3").create_bucket(Bucket="listing-bucket")
    output = "s3://listing-bucket/out"
    command = job_command(prompts, output, steps=4)

    # 1. a finished output
    started = time.monotonic()
    first = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    print(f"first run {time.monotonic() - started:.1f} s")
    before = object_versions("listing-bucket", "out/")

    # 2. its rerun, with every listing of out/manifest/ answered 503 (through one client attempt, then s3fs's retries)
    proxy = FaultyS3Proxy(s3_endpoint, refuse=lambda method, path: "list-type" in path and "prefix=out/manifest" in path.replace("%2F", "/"))
    rerun = run_through(proxy, command, "refused rerun", AWS_MAX_ATTEMPTS="2")
    assert proxy.counts["refused"] > 0, proxy.counts
    assert rerun.returncode == 3, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
    assert f"cannot list '{output}/manifest'" in rerun.stderr and "rerun" in rerun.stderr, rerun.stderr[-3000:]

    # 3. nothing regenerated, nothing written: every object as the first run left it
    assert object_versions("listing-bucket", "out/") == before

    # 4. once the listings answer, the rerun finds the output finished: nothing generated, every row once
    again = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    counts = json.loads(again.stdout)["counts"]
    assert counts["generated_this_run"] == 0 and counts["ok_rows"] == rows
    from pipelines.runtime import io

    ids = io.read_parquet_folder(f"{output}/manifest", ["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"listed-{index}" for index in range(rows))



# -- source reads the store refuses: image-to-image and encode ---------------------------------------


def put_objects(bucket: str, objects: dict[str, bytes]) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


def test_refused_source_image_reads_are_transient_errors_the_rerun_draws_those_rows(s3_endpoint, model_cache, tmp_path):
    """Image-to-image from sources on S3, the GETs of two refused (403) during the first run: exit 3, those rows
    transient errors (a missing source stays the row's own); the rerun draws exactly them, as their twins are drawn."""
    from helpers import assert_images_match
    from image_helpers import picture, png
    from pipelines.runtime import io

    # rows "a" and "b" read their sources; their twins read the same bytes under keys the proxy refuses
    sources = {"a": png(picture(1, 64, 64)), "b": png(picture(2, 64, 64))}
    put_objects("img2img-bucket", {**{f"sources/{name}.png": data for name, data in sources.items()},
                                   **{f"sources/refused-{name}.png": data for name, data in sources.items()}})
    twins = {"a-twin": "a", "b-twin": "b"}
    rows = [{"id": name, "prompt": f"a drawing of {name}", "seed": index, "init_image": f"s3://img2img-bucket/sources/{name}.png"}
            for index, name in enumerate(sources)]
    rows += [{**rows[index], "id": twin, "init_image": f"s3://img2img-bucket/sources/refused-{name}.png"}
             for index, (twin, name) in enumerate(twins.items())]
    rows.append({"id": "missing", "prompt": "x", "seed": 9, "init_image": "s3://img2img-bucket/sources/missing.png"})
    output = tmp_path / "out"
    command = job_command(write_prompts(tmp_path / "prompts.parquet", rows), str(output), "--strength", "0.6", steps=4)

    # 1. the first run, through a proxy that refuses the twins' source reads
    proxy = FaultyS3Proxy(s3_endpoint, refuse=lambda method, path: method == "GET" and "/sources/refused-" in path, refuse_status=403)
    first = run_through(proxy, command, "first run")
    assert proxy.counts["refused"] >= 2, proxy.counts

    # 2. incomplete, exit 3; the refused rows are transient errors of the validate stage, the missing one permanent
    assert first.returncode == 3, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and f"2 of {len(rows)} rows failed for a cause outside them" in first.stderr, first.stderr[-3000:]
    record = io.read_json(str(output / "run.json"))
    assert record["status"] == "incomplete" and record["error_causes"] == {"permanent": 1, "transient": 2}
    errors = {row["id"]: row for row in pq.read_table(output / "errors").to_pylist()}
    assert {row_id: (row["stage"], row["cause"]) for row_id, row in errors.items()} == {
        "a-twin": ("validate", "transient"), "b-twin": ("validate", "transient"), "missing": ("validate", "permanent")}
    for twin, name in twins.items():
        assert f"init_image: cannot read 's3://img2img-bucket/sources/refused-{name}.png'" in errors[twin]["reason"], errors[twin]
    assert sorted(manifest_ids(str(output))) == ["a", "b"]

    # 3. the rerun, reads allowed: exactly the refused rows, their error rows gone, the missing one left as it was
    started = time.monotonic()
    rerun = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    print(f"rerun {time.monotonic() - started:.1f} s")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = io.read_json(str(output / "run.json"))
    assert record["status"] == "complete" and record["error_causes"] == {"permanent": 1, "transient": 0}
    assert record["transient_errors_retried"] == 2 and record["counts"]["generated_this_run"] == 2
    assert [(row["id"], row["cause"]) for row in pq.read_table(output / "errors").to_pylist()] == [("missing", "permanent")]
    images = images_by_id(str(output))
    assert sorted(images) == ["a", "a-twin", "b", "b-twin"]
    for twin, name in twins.items():
        assert_images_match(images[twin], images[name])


def test_encode_source_reads_refused_end_incomplete_and_the_rerun_encodes_exactly_those_rows(s3_endpoint, model_cache, tmp_path):
    """Image paths on S3, the GETs of two answered 503 SlowDown through every retry: exit 3, incomplete; the rerun
    encodes exactly those two rows and ends complete."""
    from image_helpers import picture, png, write_table
    from pipelines.runtime import io

    rows = 6
    refused = {"img-1", "img-4"}
    put_objects("encode-source-bucket", {f"images/img-{index}.png": png(picture(index, 64, 64)) for index in range(rows)})
    table = write_table(tmp_path / "table.parquet", [
        {"id": f"img-{index}", "file": f"s3://encode-source-bucket/images/img-{index}.png"} for index in range(rows)])
    output = tmp_path / "latents"
    command = [sys.executable, "-m", "jobs.cli", "encode", "--model", "tiny", "--images", table, "--output", str(output),
               "--path-column", "file", "--resolution", "64"]

    # 1. the first run, through a proxy that answers those rows' reads 503 (one client attempt, then s3fs's retries)
    proxy = FaultyS3Proxy(s3_endpoint, refuse=lambda method, path: method == "GET" and any(f"/images/{row_id}.png" in path for row_id in refused))
    first = run_through(proxy, command, "first run", AWS_MAX_ATTEMPTS="1")
    assert proxy.counts["refused"] >= 2, proxy.counts
    assert first.returncode == 3, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and f"2 of {rows} rows failed for a cause outside them" in first.stderr, first.stderr[-3000:]
    record = io.read_json(str(output / "run.json"))
    assert record["status"] == "incomplete" and record["error_causes"] == {"permanent": 0, "transient": 2}
    errors = pq.read_table(output / "errors").to_pylist()
    assert sorted((row["id"], row["code"], row["cause"]) for row in errors) == [(row_id, "unreadable_path", "transient") for row_id in sorted(refused)]

    # 2. the rerun, reads allowed: those two rows encoded, no error left
    started = time.monotonic()
    rerun = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    print(f"rerun {time.monotonic() - started:.1f} s")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = io.read_json(str(output / "run.json"))
    assert record["status"] == "complete" and record["error_causes"] == {"permanent": 0, "transient": 0}
    assert record["counts"]["encoded_this_run"] == len(refused) and record["counts"]["ok_rows"] == rows
    assert sorted(encoded_ids(str(output))["latents"]) == sorted(f"img-{index}" for index in range(rows))
    assert encoded_ids(str(output))["errors"] == []
