"""The embedded Ray goes when its driver goes, even when the driver is SIGKILLed.

Ray ties its GCS and raylet to the driver that started them (they die with it), but
its per-node agents (``DashboardAgent``, ``RuntimeEnvAgent``), on finding the raylet
gone without a clean shutdown, first try to report that to the dead GCS and wait up to
60 s for it. A killed run would leave them behind for a minute, holding ports, memory
and its session folder while the user already reruns.

The reaper is a small process (standard library only, started by the driver beside an
embedded Ray): it notes the driver's descendants twice a second and blocks on a pipe
only the driver holds. The pipe closes when the driver ends, however it ends; the reaper
then SIGKILLs every process it noted that is still alive (matched by start time, never
a reused pid), and every process of the driver's Ray session it did not note: a worker
that the raylet started in the last half second, orphaned before the next scan, still
names the session's folder on its command line. Then it exits.
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import sys
import time

SCAN_SECONDS = 0.5
FINAL_SCANS = 3  # after the driver ends: a process being started at that moment shows up in one of these
# a Ray session's folder as its processes name it on their command line (--session-dir=..., socket paths)
SESSION_FOLDER = re.compile(rb"/session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+")


def start() -> None:
    """Start a reaper for this process (the driver), once; it ends after the driver.

    Linux only (it reads /proc); elsewhere the driver keeps Ray's orderly shutdown.
    """
    if _keep_open or not sys.platform.startswith("linux"):
        return
    read_end, write_end = os.pipe()  # both ends non-inheritable: Ray's processes never hold the write end
    subprocess.Popen(
        [sys.executable, "-m", "jobs.reaper", str(os.getpid()), str(read_end)],
        pass_fds=(read_end,), stdin=subprocess.DEVNULL, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    os.close(read_end)
    _keep_open.append(write_end)


_keep_open: list[int] = []  # the driver's end of the pipe, open until the driver exits


def exit_process(status: int) -> None:
    """End the process now, leaving its embedded Ray to the reaper (returns when there is no reaper)."""
    if not _keep_open:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry)] = (int(fields[1]), fields[19])  # ppid, starttime
    return found


def descendants(root: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """pid -> start time of every process under ``root`` (``table``: a ``processes()`` snapshot)."""
    table = processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found[child] = table[child][1]
            stack.append(child)
    return found


def session_folders(pid: int) -> set[bytes]:
    """The Ray session folders that a process names on its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return set(SESSION_FOLDER.findall(cmdline.read()))
    except OSError:
        return set()


def reap(driver_pid: int, pipe: int) -> None:
    # 1. while the driver lives: note its descendants and the Ray session folders they name
    noted: dict[int, str] = {}
    sessions: set[bytes] = set()
    while True:
        found = descendants(driver_pid)
        found.pop(os.getpid(), None)
        for pid in found.keys() - noted.keys():
            sessions |= session_folders(pid)
        noted.update(found)
        readable, _, _ = select.select([pipe], [], [], SCAN_SECONDS)
        if readable and not os.read(pipe, 1):  # end of file: the driver is gone
            break
    # 2. the driver is gone: kill what was noted, and whatever else belongs to its Ray session
    for _ in range(FINAL_SCANS):
        alive = processes()
        for pid, (parent, started) in alive.items():
            # an unnoted one only if orphaned (its raylet gone): never, say, a user's `tail` of the session's logs
            orphan_of_session = (parent in noted or parent == 1) and sessions & session_folders(pid)
            if pid != os.getpid() and (noted.get(pid) == started or orphan_of_session):
                _kill(pid)
        time.sleep(0.2)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


if __name__ == "__main__":
    reap(int(sys.argv[1]), int(sys.argv[2]))
