"""Where a job's Ray comes from: a new local Ray by default, `ray start`'s cluster with auto, exit 2 for a dead address.

Every case runs the real command in its own process, with Ray's temp folder moved by
RAY_TMPDIR (which Ray honours) so that the stale cluster file is this test's own, never
the machine's /tmp/ray/ray_current_cluster that other Ray users rely on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest

from helpers import write_prompts
from ray_head import free_port, start_head

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ray_temp():
    """A short RAY_TMPDIR (Ray's unix socket paths are limited to ~107 bytes) with a stale cluster file in it."""
    directory = tempfile.mkdtemp(prefix="lr-tmp-", dir="/tmp")
    os.makedirs(os.path.join(directory, "ray"))
    stale = f"127.0.0.1:{free_port()}"  # nothing listens there: the head that wrote it is gone
    with open(os.path.join(directory, "ray", "ray_current_cluster"), "w") as handle:
        handle.write(stale)
    yield directory, stale
    shutil.rmtree(directory, ignore_errors=True)


def environment(ray_tmpdir: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmpdir, PYTHONPATH=PROJECT + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def latentray(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    # a hang would show here as TimeoutExpired: the command must end by itself
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def prompts(tmp_path) -> str:
    return write_prompts(tmp_path / "prompts.parquet", {"id": ["cat", "dog"], "prompt": ["a cat", "a dog"]})


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_no_address_starts_a_new_local_ray_despite_a_stale_cluster_file(ray_temp, prompts, tmp_path, model_cache):
    directory, stale = ray_temp
    result = latentray(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", "tiny", "--steps", "2"],
                       environment(directory, LATENTRAY_CACHE=str(model_cache)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on an embedded local Ray instance" in result.stderr
    assert sorted(pd.read_parquet(tmp_path / "out" / "manifest")["id"]) == ["cat", "dog"]
    with open(os.path.join(directory, "ray", "ray_current_cluster")) as handle:
        assert handle.read() == stale  # the local Ray did not take over the recorded address either


@pytest.mark.parametrize("case", ["auto-stale", "dead", "not-ray"])
def test_an_address_that_does_not_answer_exits_2_naming_it(case, ray_temp, prompts, tmp_path, model_cache):
    directory, stale = ray_temp
    listener = None
    if case == "auto-stale":
        address, named = "auto", stale
    elif case == "dead":
        address = named = f"127.0.0.1:{free_port()}"
    else:  # something accepts connections but never speaks Ray's protocol
        listener = socket.create_server(("127.0.0.1", 0))
        address = named = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        result = latentray(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", "tiny",
                            "--address", address, "--connect-timeout", "10"], environment(directory, LATENTRAY_CACHE=str(model_cache)))
    finally:
        if listener is not None:
            listener.close()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "latentray: error: address: " in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest").exists()


def wait_for_recorded_address(path: str, stale: str, timeout: float = 60) -> str:
    """`ray start` records its address once its node is up, which can be after the job server answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as handle:
            recorded = handle.read().strip()
        if recorded != stale:
            return recorded
        time.sleep(0.5)
    raise TimeoutError(f"ray start did not record its address in {path} within {timeout:g} s")


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_auto_joins_the_cluster_that_ray_start_made(ray_temp, model_cache):
    directory, stale = ray_temp
    head = start_head(directory=os.path.join(directory, "ray"))  # `ray start` records its address where auto looks
    try:
        recorded = wait_for_recorded_address(os.path.join(directory, "ray", "ray_current_cluster"), stale)
        script = ("from jobs.ray_runtime import connect; import ray; print(connect('auto')); "
                  "print(ray.get_runtime_context().gcs_address)")
        env = environment(directory, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=head.token_path)
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    finally:
        head.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    where, gcs_address = result.stdout.strip().splitlines()[-2:]
    assert where == f"the Ray cluster at {recorded} (from 'auto')"
    assert gcs_address.rsplit(":", 1)[1] == recorded.rsplit(":", 1)[1]


def test_a_one_core_machine_gets_an_embedded_ray_its_stages_fit_in(monkeypatch):
    """Ray's CPUs are scheduling slots: one core still runs the model actor beside the light tasks."""
    from jobs.ray_runtime import embedded_cpus
    from pipelines.generation.generate import SHARES
    from pipelines.runtime.placement import ClusterShape, stage_options

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert embedded_cpus() == 2
    for placement in ("fused", "split"):
        options = stage_options(SHARES[placement], ClusterShape(cpus=embedded_cpus(), gpus=0), 8, {}, placement)
        assert sum(option.num_cpus * option.concurrency for option in options.values()) <= 1.0
