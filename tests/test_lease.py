"""One writer per output (issue 21, item 4): the output's lease, on local folders and on the
local S3 server, with real processes holding it; no Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import boto3
import pytest

from pipelines.runtime import io, lease

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = "import sys, time; from pipelines.runtime import lease; lease.take(sys.argv[1]); print('held', flush=True); time.sleep(120)"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_endpoint")
    bucket = f"lease-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/out"


def hold_in_another_process(uri: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, uri], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def write_lease(uri: str, **fields) -> None:
    io.write_json(io.join(uri, lease.LEASE_NAME), {"token": "elsewhere", "host": "elsewhere", "pid": 4242, "since": "then",
                                                    "renewed_at": "then", **fields})


def test_a_live_run_holds_the_output_a_killed_one_does_not(output):
    # 1. another process holds the lease: refused, naming it
    holder = hold_in_another_process(output)
    try:
        with pytest.raises(lease.LeaseHeld) as refused:
            lease.take(output)
        assert f"pid {holder.pid}" in str(refused.value) and socket.gethostname() in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # 2. it was killed: its lease on this host is taken at once, and given back at the end
    taken = lease.take(output)
    assert io.read_json(io.join(output, lease.LEASE_NAME))["pid"] == os.getpid() == taken.lease["pid"]
    lease.release(output)
    assert io.read_json(io.join(output, lease.LEASE_NAME)) is None


def test_another_hosts_lease_is_taken_over_only_once_expired(output):
    write_lease(output, expires_at=time.time() + 60)
    with pytest.raises(lease.LeaseHeld, match="host elsewhere, pid 4242"):
        lease.take(output)
    write_lease(output, expires_at=time.time() - 1)
    lease.take(output)
    assert io.read_json(io.join(output, lease.LEASE_NAME))["host"] == socket.gethostname()
    lease.release(output)


def test_of_two_runs_that_find_the_lease_free_one_wins(output):
    write_lease(output, expires_at=time.time() - 1)
    store = lease._store(output)
    _, version = store.read()
    first = store.swap({"token": "first"}, version)
    assert first is not None and store.swap({"token": "second"}, version) is None
    assert store.read()[0]["token"] == "first"
    io.remove_tree(io.join(output, lease.LEASE_NAME))
    assert store.swap({"token": "a"}, None) is not None and store.swap({"token": "b"}, None) is None


def test_the_lease_is_renewed_and_a_run_whose_lease_was_taken_knows(output):
    held = lease.take(output, seconds=0.9)
    first_expiry = held.lease["expires_at"]
    time.sleep(0.7)
    assert io.read_json(io.join(output, lease.LEASE_NAME))["expires_at"] > first_expiry  # renewed by its thread
    # another run takes it over (this one stopped renewing in time): the next renewal finds out, the run stops with exit 3
    held.stop.set()
    write_lease(output, expires_at=time.time() - 1)
    held.stop.clear()
    held.renew()
    with pytest.raises(lease.LeaseLost, match="took it over"):
        lease.check(output)
    lease.release(output)
    assert json.loads(io.read_bytes(io.join(output, lease.LEASE_NAME)))["host"] == "elsewhere"  # not removed: not ours


def test_a_conditional_write_retried_after_it_went_through_is_ours(s3_endpoint):
    # a connection cut after the store acted: the client sends the same PUT again and the store refuses it (412)
    boto3.client("s3").create_bucket(Bucket="lease-retried")
    store = lease._store("s3://lease-retried/out")
    written = {"token": "mine", "expires_at": 1.5}
    first = store.swap(written, None)
    assert store.swap(written, None) == first  # the retried create: refused by itself, the lease is ours
    assert store.swap({"token": "other"}, None) is None  # another run's create is refused
    renewed = {"token": "mine", "expires_at": 2.5}
    second = store.swap(renewed, first)
    assert second is not None and store.swap(renewed, first) == second  # the same for a retried renewal


def test_both_jobs_take_the_lease_in_their_plan(tmp_path, model_cache):
    from helpers import write_prompts
    from image_helpers import png, picture, write_table
    from pipelines.encoding.encode import plan_encoding
    from pipelines.generation.generate import plan_generation
    from pipelines.runtime.config import EncodeConfig, GenerateConfig

    prompts = write_prompts(tmp_path / "prompts.parquet", {"id": ["a"], "prompt": ["a red circle"]})
    images = write_table(tmp_path / "images.parquet", [{"id": "a", "image": png(picture(0, 64, 64))}])
    plans = {
        "generate": lambda output: plan_generation(GenerateConfig(prompts=prompts, output=output, model="tiny")),
        "encode": lambda output: plan_encoding(EncodeConfig(images=images, output=output, model="tiny", resolution=64)),
    }
    for name, plan in plans.items():
        output = str(tmp_path / name)
        holder = hold_in_another_process(output)
        try:
            with pytest.raises(lease.LeaseHeld, match=f"pid {holder.pid}"):
                plan(output)
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        planned = plan(output)  # the holder is gone: the plan takes the lease, a run would give it back
        assert io.read_json(io.join(output, lease.LEASE_NAME))["pid"] == os.getpid()
        lease.release(planned.output.uri)
        assert io.read_json(io.join(output, lease.LEASE_NAME)) is None
