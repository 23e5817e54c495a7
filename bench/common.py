"""What latentray's benchmarks share: peak memory of the driver and Ray workers, Ray start-up, tables, JSON.

Imported by the scripts in this folder as ``common`` (``python bench/NAME.py`` puts
this folder first on ``sys.path``). Nothing here is shipped to Ray workers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from jobs.reaper import descendants

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MEBIBYTE = 1024 * 1024
RAY_AGENT_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# -- memory sampling ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MemoryUsage:
    """Resident memory of a set of processes: before the variant, and the peak during it (bytes)."""

    baseline_resident: int
    peak_resident: int
    peak_anonymous: int  # resident minus file-backed and shared pages: no library counted twice
    peak_processes: int
    method: str
    peak_by_process: dict[str, float] = field(default_factory=dict)  # "pid title" -> MiB, at the peak

    @property
    def above_baseline(self) -> int:
        return self.peak_resident - self.baseline_resident


def read_memory(pid: int) -> tuple[int, int] | None:
    """(resident, anonymous) bytes of one process from /proc/PID/statm; None once it has exited."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            fields = statm.read().split()
    except OSError:
        return None
    resident, shared = int(fields[1]) * PAGE_BYTES, int(fields[2]) * PAGE_BYTES
    return resident, resident - shared


def descendant_pids(root: int) -> list[int]:
    return list(descendants(root))


def command_arguments(pid: int) -> list[str]:
    """A process' arguments; Ray's workers and agents overwrite the first with their title (``ray::...``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return [""]


def is_ray_worker(pid: int) -> bool:
    """Ray titles its worker processes ``ray::...``; until a new worker does, it runs default_worker.py.

    Raylet, GCS and the dashboard head are not workers; Ray's agents are titled
    ``ray::`` too but are per-node services, so they are left out as well.
    """
    arguments = command_arguments(pid)
    if arguments[0].startswith("ray::"):
        return arguments[0] not in RAY_AGENT_TITLES
    return any(argument.endswith("default_worker.py") for argument in arguments)


def wait_for_actors_to_exit(timeout: float) -> None:
    """Ray Data stops a finished run's actors asynchronously; wait so they are not in the next baseline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any("MapWorker" in command_arguments(pid)[0] for pid in descendant_pids(os.getpid())):
            return
        time.sleep(0.5)


def driver_pids() -> list[int]:
    return [os.getpid()]


def driver_and_ray_worker_pids() -> list[int]:
    # embedded Ray starts raylet from this process, and raylet starts the workers: all are descendants
    return [os.getpid(), *[pid for pid in descendant_pids(os.getpid()) if is_ray_worker(pid)]]


def reset_driver_peak() -> bool:
    """Reset this process' high-water mark (VmHWM), so it measures one variant alone."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def driver_peak() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def release_freed_memory() -> None:
    """Hand freed heap back to the OS so the next variant's baseline is not inflated by this one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline stays a little high, the peak is still right


class PeakMemorySampler:
    """Background thread summing the resident memory of ``processes()`` every ``interval`` seconds.

    A sampler misses peaks shorter than its interval; the interval trades that against
    the CPU the sampling itself takes from the benchmark on a small machine.
    """

    def __init__(self, processes: Callable[[], list[int]], interval: float, method: str):
        self.processes, self.interval, self.method = processes, interval, method
        self.baseline_resident = self.peak_resident = self.peak_anonymous = self.peak_processes = 0
        self.peak_by_process: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory-sampler", daemon=True)

    def __enter__(self) -> "PeakMemorySampler":
        self.baseline_resident = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exception) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> int:
        readings = {pid: reading for pid in self.processes() if (reading := read_memory(pid)) is not None}
        resident = sum(reading[0] for reading in readings.values())
        if resident > self.peak_resident:
            self.peak_resident = resident
            # which processes make up the peak: read only at a new peak, titles cost more than sizes
            self.peak_by_process = {
                f"{pid} {' '.join(command_arguments(pid))[:80]}": round(reading[0] / MEBIBYTE, 1)
                for pid, reading in readings.items()
            }
        self.peak_anonymous = max(self.peak_anonymous, sum(reading[1] for reading in readings.values()))
        self.peak_processes = max(self.peak_processes, len(readings))
        return resident

    def usage(self, exact_peak: int = 0) -> MemoryUsage:
        return MemoryUsage(
            baseline_resident=self.baseline_resident, peak_resident=max(self.peak_resident, exact_peak),
            peak_anonymous=self.peak_anonymous, peak_processes=self.peak_processes, method=self.method,
            peak_by_process=self.peak_by_process,
        )


# -- Ray ------------------------------------------------------------------------------------------


def start_ray() -> float:
    """Start embedded Ray once for the latentray variants; return its start-up seconds."""
    import ray.data

    from jobs.ray_runtime import connect

    if os.environ.pop("RAY_ADDRESS", None):
        # memory is sampled from this process' descendants, so the cluster must be local and embedded
        print("note: RAY_ADDRESS ignored; the benchmark starts its own embedded Ray", file=sys.stderr)
    started = time.perf_counter()
    connect()
    # progress bars would interleave with the results table
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - started


# -- report ---------------------------------------------------------------------------------------


def mebibytes(value: int) -> str:
    return f"{value / MEBIBYTE:,.0f}"


def optional(value: float | int | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, figures right-aligned, a rule under the header."""
    rows = [tuple(header)] + [tuple(row) for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    # variant names left-aligned, figures right-aligned
    lines = [
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def variants_dictionary(results: Sequence) -> dict[str, dict]:
    """Variant results (dataclasses with ``key`` and ``memory``) by key, as JSON-ready dictionaries."""
    variants = {}
    for result in results:
        entry = asdict(result)
        entry["memory"]["above_baseline"] = result.memory.above_baseline
        variants[result.key] = entry
    return variants


def machine_dictionary() -> dict:
    import diffusers
    import ray
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "ray": ray.__version__}


def write_json(report: dict, json_path: str | None) -> None:
    """Write the report to ``json_path`` (nothing without one) and say where."""
    if not json_path:
        return
    with open(json_path, "w") as json_file:
        json.dump(report, json_file, indent=2)
    print(f"\nfigures written to {json_path}")


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
