"""A fresh install resolves at once: pip, resolving the README's test install from nothing,
finds one consistent set without backtracking.

A machine set up step by step never shows a backtracking resolver (what is installed
already pins it), so this check resolves as an empty environment would:
``--ignore-installed`` (every requirement from the index) and ``--dry-run`` (nothing
installed). It needs the package index, as CI's install does.

The resolve waits on the network, not the CPU, so it starts in the background as soon as
the session has collected this test (``tests/conftest.py``) and the test only collects its
result: the suite does not wait for the index twice as long as it must.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pip prints this when a candidate's requirements conflict and it tries older releases
BACKTRACKING = "is looking at multiple versions of"
INSTALL_LIMIT = 300  # seconds: a newcomer's first install must not take longer


def start_resolve(directory: str) -> "ResolveRun":
    """Start resolving the README's test install from scratch (torch pinned to the CPU build, as the README does).
    pip's output goes to a file: a pipe nobody reads until the test would fill up and stop pip."""
    report, log = os.path.join(directory, "report.json"), os.path.join(directory, "pip.log")
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", report,
             "--disable-pip-version-check", "torch==2.13.0", "-e", f"{REPOSITORY}[test]"],
            stdout=output, stderr=subprocess.STDOUT, text=True,
        )
    return ResolveRun(process=process, report=report, log=log, started=time.monotonic())


@dataclass
class ResolveRun:
    process: subprocess.Popen
    report: str
    log: str
    started: float
    ended: float | None = None

    def __post_init__(self) -> None:
        # when pip ended, whenever the test looks: the suite may reach the test long after
        threading.Thread(target=self._note_end, daemon=True).start()

    def _note_end(self) -> None:
        self.process.wait()
        self.ended = time.monotonic()

    def wait(self) -> tuple[int, str, float]:
        """(exit code, pip's output, seconds pip took), or a failure when it took over ``INSTALL_LIMIT`` seconds."""
        try:
            self.process.wait(timeout=max(1.0, INSTALL_LIMIT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"a fresh install took over {INSTALL_LIMIT} s to resolve")
        while self.ended is None:  # the waiting thread notes the end a moment after the process exits
            time.sleep(0.01)
        with open(self.log) as output:
            return self.process.returncode, output.read(), self.ended - self.started


@pytest.mark.slow
@pytest.mark.time_limit(INSTALL_LIMIT + 60)
def test_a_fresh_test_install_resolves_without_backtracking(request, tmp_path):
    # 1. the resolve the session started in the background (or one started now, where it did not)
    resolve = getattr(request.config, "fresh_install_resolve", None) or start_resolve(str(tmp_path))
    returncode, output, seconds = resolve.wait()
    assert returncode == 0, output[-3000:]
    assert seconds <= INSTALL_LIMIT, f"a fresh install took {seconds:.0f} s to resolve"

    # 2. no release was tried and given up: pip found one consistent set at once
    backtracked = [line for line in output.splitlines() if BACKTRACKING in line]
    assert not backtracked, f"a fresh install backtracks ({seconds:.0f} s):\n" + "\n".join(backtracked[:20])

    # 3. the set agrees where it must: boto3 on the botocore release that s3fs's aiobotocore pins
    with open(resolve.report) as report:
        chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(report)["install"]}
    assert chosen["boto3"].split(".")[:2] == chosen["botocore"].split(".")[:2], (chosen["boto3"], chosen["botocore"])
    assert chosen["torch"].startswith("2.13.0")
    print(f"resolved {len(chosen)} packages in {seconds:.0f} s")
