"""A fresh install resolves at once: pip, resolving the README's test install from nothing,
finds one consistent set without backtracking.

A machine set up step by step never shows a backtracking resolver (what is installed
already pins it), so this check resolves as an empty environment would:
``--ignore-installed`` (every requirement from the index) and ``--dry-run`` (nothing
installed). It needs the package index, as CI's install does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pip prints this when a candidate's requirements conflict and it tries older releases
BACKTRACKING = "is looking at multiple versions of"
INSTALL_LIMIT = 300  # seconds: a newcomer's first install must not take longer


@pytest.mark.slow
@pytest.mark.time_limit(INSTALL_LIMIT + 60)
def test_a_fresh_test_install_resolves_without_backtracking(tmp_path):
    report = tmp_path / "report.json"
    started = time.monotonic()
    # 1. the README's test install, resolved from scratch (torch pinned to the CPU build, as the README does)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report),
         "--disable-pip-version-check", "torch==2.13.0", "-e", f"{REPOSITORY}[test]"],
        capture_output=True, text=True, timeout=INSTALL_LIMIT,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]

    # 2. no release was tried and given up: pip found one consistent set at once
    backtracked = [line for line in (done.stdout + done.stderr).splitlines() if BACKTRACKING in line]
    assert not backtracked, f"a fresh install backtracks ({seconds:.0f} s):\n" + "\n".join(backtracked[:20])

    # 3. the set agrees where it must: boto3 on the botocore release that s3fs's aiobotocore pins
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert chosen["boto3"].split(".")[:2] == chosen["botocore"].split(".")[:2], (chosen["boto3"], chosen["botocore"])
    assert chosen["torch"].startswith("2.13.0")
    print(f"resolved {len(chosen)} packages in {seconds:.0f} s")
