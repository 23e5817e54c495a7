"""No test hangs: a test over its time limit fails, and its failure holds the Python stacks of
pytest and of the processes it started (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not shutil.which("py-spy"), reason="py-spy is part of the test extra")
def test_a_hung_test_fails_at_its_limit_with_the_stacks_of_its_child_processes(tmp_path):
    (tmp_path / "conftest.py").write_text(open(os.path.join(TESTS, "conftest.py")).read())
    (tmp_path / "test_hangs.py").write_text(textwrap.dedent("""
        import subprocess, sys
        import pytest

        @pytest.mark.time_limit(3)
        def test_waits_on_a_child_that_never_ends():
            child = "import time\\ndef waiting_for_ever():\\n    time.sleep(3600)\\nwaiting_for_ever()"
            subprocess.run([sys.executable, "-c", child])
    """))
    # the plugin reads descendants with the project's own reaper
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_hangs.py"],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=120,
    )
    assert done.returncode == 1, done.stdout[-3000:]
    assert "test_waits_on_a_child_that_never_ends: call ran over its time limit of 3 s" in done.stdout
    assert "test_waits_on_a_child_that_never_ends" in done.stdout and "waiting_for_ever" in done.stdout  # the child's stack
