"""Progress lines for logs nobody watches live: Ray job logs, Airflow task logs.

In a terminal Ray Data draws its own progress bars; in a log file those are noise or
nothing, so a long run there prints one line every ``every_seconds`` instead:

    latentray generate: 1200/50000 rows (2.4%), 14.2 rows/s, ETA 57m16s
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

PROGRESS_SECONDS_VARIABLE = "LATENTRAY_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0


def progress_interval() -> float:
    """Seconds between progress lines: ``LATENTRAY_PROGRESS_SECONDS``, else 30."""
    text = os.environ.get(PROGRESS_SECONDS_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_PROGRESS_SECONDS
    except ValueError:
        raise ValueError(f"{PROGRESS_SECONDS_VARIABLE}: must be a number of seconds, got {text!r}") from None
    if seconds <= 0:
        raise ValueError(f"{PROGRESS_SECONDS_VARIABLE}: must be > 0, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressReporter:
    """Counts finished rows and, when the stream is not a terminal, prints a line every few seconds.

    ``done`` is what earlier runs already accounted for: the rate and the ETA count
    only this run's rows, the fraction counts both.
    """

    def __init__(
        self, *, label: str, total: int, done: int = 0, every_seconds: float | None = None,
        stream: TextIO | None = None, interactive: bool | None = None, clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.done_before = label, total, done
        self.stream = stream or sys.stderr
        self.every_seconds = progress_interval() if every_seconds is None else every_seconds
        # a terminal already shows Ray Data's bars; lines would only interleave with them
        self.enabled = not (self.stream.isatty() if interactive is None else interactive)
        self.clock = clock
        self.started = self.last_line = clock()
        self.rows_this_run = 0

    @property
    def rows_done(self) -> int:
        return self.done_before + self.rows_this_run

    def advance(self, rows: int) -> None:
        self.rows_this_run += rows
        if self.enabled and self.clock() - self.last_line >= self.every_seconds:
            self.print_line()

    def finish(self, accounted: int | None = None) -> None:
        """The last line; ``accounted``: every row the output now accounts for, when known.

        Rows the validation task rejects never reach the driver, so only the output's
        own count makes the last line add up to the total.
        """
        if accounted is not None:
            self.rows_this_run = accounted - self.done_before
        if self.enabled:
            self.print_line(final=True)

    def line(self, final: bool = False) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.rows_this_run / elapsed
        share = f" ({100 * self.rows_done / self.total:.1f}%)" if self.total else ""
        text = f"latentray {self.label}: {self.rows_done}/{self.total} rows{share}, {rate:.1f} rows/s"
        if final:
            return f"{text}, finished in {format_duration(elapsed)}"
        remaining = max(self.total - self.rows_done, 0)
        return f"{text}, ETA {format_duration(remaining / rate) if rate > 0 else 'unknown'}"

    def print_line(self, final: bool = False) -> None:
        print(self.line(final), file=self.stream, flush=True)
        self.last_line = self.clock()
