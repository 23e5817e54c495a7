"""Shared fixtures: one real local Ray per session, a real S3-compatible server, tiny models;
and a time limit on every test.

The S3 server (moto in server mode, a real HTTP endpoint on 127.0.0.1) starts before
Ray so that Ray's worker processes inherit the standard AWS variables pointing at it.

No test may hang: each phase of a test (setup, call, teardown) fails after
``DEFAULT_TIME_LIMIT`` seconds (``@pytest.mark.time_limit(seconds)`` to change it), and
its failure holds the Python stacks of pytest's threads and of every Python process
under it (py-spy), so a hang leaves its evidence.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import traceback
from contextlib import contextmanager

import pytest

DEFAULT_TIME_LIMIT = 300.0  # seconds per phase; the slowest test takes ~60 s alone
NATIVE_GRACE = 30.0  # seconds the alarm may wait for a main thread stuck in native code


class TimeLimitExceeded(Exception):
    """A test phase outlived its time limit (the message holds the stacks)."""


def pytest_collection_finish(session):
    """The fresh-install check waits on the package index: start it now, in the background."""
    if any(item.path.name == "test_install.py" for item in session.items):
        from test_install import start_resolve

        directory = session.config._tmp_path_factory.mktemp("fresh-install")
        session.config.fresh_install_resolve = start_resolve(str(directory))


def pytest_unconfigure(config):
    resolve = getattr(config, "fresh_install_resolve", None)
    if resolve is not None and resolve.process.poll() is None:  # the session ended before the test collected it
        resolve.process.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _time_limit(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _time_limit(item, "call"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    with _time_limit(item, "teardown"):
        yield


@contextmanager
def _time_limit(item, phase: str):
    marker = item.get_closest_marker("time_limit")
    seconds = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT

    raised = []

    def on_alarm(signum, frame):
        # raised in the main thread, inside the test: pytest reports it as this test's failure (once)
        if not raised:
            raised.append(True)
            raise TimeLimitExceeded(f"{item.nodeid}: {phase} ran over its time limit of {seconds:g} s\n{process_tree_stacks()}")

    def on_interrupt(signum, frame):
        # the watchdog's SIGINT: the same failure; a user's Ctrl-C stays a KeyboardInterrupt
        if watchdog.finished.is_set() and not watchdog.cancelled:
            on_alarm(signum, frame)
        else:
            signal.default_int_handler(signum, frame)

    # A main thread blocked in native code (ray.get waiting on the core worker) runs no Python
    # signal handler; a SIGINT makes Ray return to Python, where the time limit then raises
    watchdog = Watchdog(seconds + NATIVE_GRACE, item.nodeid)
    previous = signal.signal(signal.SIGALRM, on_alarm), signal.signal(signal.SIGINT, on_interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


class Watchdog(threading.Thread):
    """Interrupts the main thread when it is still in a test phase ``NATIVE_GRACE`` s after its limit."""

    def __init__(self, seconds: float, nodeid: str):
        super().__init__(daemon=True)
        self.seconds, self.nodeid = seconds, nodeid
        self.finished, self.cancelled = threading.Event(), False

    def cancel(self) -> None:
        self.cancelled = True
        self.finished.set()

    def run(self) -> None:
        if self.finished.wait(self.seconds) or self.cancelled:
            return
        self.finished.set()
        sys.__stderr__.write(f"\n{self.nodeid}: still inside native code {NATIVE_GRACE:g} s after its time limit: interrupting it\n")
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def process_tree_stacks() -> str:
    """The Python stacks of this process's threads and of its descendants (py-spy, where installed)."""
    frames = sys._current_frames()
    parts = [f"--- pytest (pid {os.getpid()}), thread {ident}:\n" + "".join(traceback.format_stack(frame)) for ident, frame in frames.items()]
    if not sys.platform.startswith("linux"):
        return "\n".join(parts)
    from jobs.reaper import descendants

    for pid in descendants(os.getpid()):
        if not shutil.which("py-spy"):
            parts.append("(py-spy is not installed: no stacks of child processes)")
            break
        try:
            dump = subprocess.run(["py-spy", "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=20)
            parts.append(f"--- pid {pid}:\n{dump.stdout or dump.stderr}")
        except subprocess.TimeoutExpired:
            parts.append(f"--- pid {pid}: py-spy did not answer in 20 s")
    return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A fresh model cache for the session (presets are built into it once)."""
    cache = tmp_path_factory.mktemp("latentray-cache")
    os.environ["LATENTRAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, model_cache):
    """One local Ray for the whole session, bound to loopback, 2 CPUs."""
    import ray

    from jobs.ray_runtime import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> str:
    from workers.runtime.presets import materialize_preset

    return materialize_preset("tiny")
