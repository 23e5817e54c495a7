"""A real Ray head for job-submission tests: ``ray start --head --block`` on loopback, in its own temp dir.

Stopped through the process group of the ``ray start`` it launched, never ``ray stop``
(which stops every Ray on the machine, other people's included). It uses its own auth
token file, so a test proves the client reads the token the way Ray does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RayHead:
    address: str  # the job server (dashboard) URL
    token_path: str
    process: subprocess.Popen
    directory: str
    log_path: str

    def stop(self) -> None:
        """SIGTERM to the process group of our `ray start --block` (it stops what it started), then SIGKILL."""
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # whatever outlived it in the group (workers)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_head(environment: dict[str, str] | None = None, num_cpus: int = 2, timeout: float = 90, directory: str | None = None) -> RayHead:
    # short path: Ray's unix sockets live under the session dir and paths are limited to ~107 bytes
    directory = directory or tempfile.mkdtemp(prefix="lr-head-", dir="/tmp")
    os.makedirs(directory, exist_ok=True)
    token_path = os.path.join(directory, "auth_token")
    with open(token_path, "w") as handle:
        handle.write(secrets.token_hex(32))
    dashboard_port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        # `ray job submit` runs the entrypoint with the first `python` on the head's PATH: this environment's
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, **(environment or {}),
    )
    # Ray's CLI run by this interpreter: works whether or not a `ray` script sits beside it (venvs)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={free_port()}", f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--temp-dir={directory}", "--include-dashboard=true", "--disable-usage-stats",
    ]
    log_path = os.path.join(directory, "ray-start.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", token_path, process, directory, log_path)
    try:
        _wait_for_job_server(head, timeout)
    except Exception:
        head.stop()
        raise
    return head


def _wait_for_job_server(head: RayHead, timeout: float) -> None:
    with open(head.token_path) as handle:
        token = handle.read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            with open(head.log_path) as log:
                raise RuntimeError(f"ray start exited with {head.process.returncode}: {log.read()[-3000:]}")
        request = urllib.request.Request(head.address + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the job server at {head.address} did not answer within {timeout:g} s")
