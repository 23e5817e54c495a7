"""What an encode keeps when its driver dies: the SIGKILL of a whole `latentray encode` at 60% of a clean run.

    python bench/encode_driver_kill.py                  # 1,200 images of 256x256, tiny model, caption embeddings
    python bench/encode_driver_kill.py --images 600 --at 0.6

1. A clean run, its committed rows sampled every 0.25 s (from the parts' names): when each share was committed.
2. The same command into another output, its process group SIGKILLed at ``--at`` of the clean run's wall time:
   the rows committed then.
3. Its rerun: wall time and rows encoded, against the clean run.

Whole processes as a user runs them (interpreter, imports, Ray start, model load included). The fault test
(``tests/test_faults.py``) checks what a killed run leaves is exact; this prints how much of it there is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(BENCH)
sys.path[:0] = [PROJECT, os.path.join(PROJECT, "tests")]

SAMPLE_SECONDS = 0.25


def committed_rows(output: str) -> int:
    """Rows in latents/ and errors/, from the parts' names (no part is opened)."""
    from pipelines.runtime.outputs import PART_NAME

    total = 0
    for folder in ("latents", "errors"):
        path = os.path.join(output, folder)
        names = os.listdir(path) if os.path.isdir(path) else []
        total += sum(int(match[3]) for name in names if (match := PART_NAME.search(name)))
    return total


def command(images: str, output: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "encode", "--model", "tiny", "--images", images, "--output", output,
            "--resolution", "256", "--caption-column", "caption", "--text-embeddings"]


def run_sampled(images: str, output: str, kill_after: float | None = None) -> tuple[float, list[tuple[float, int]]]:
    """Run the encode; (wall seconds, [(seconds, rows committed)]); SIGKILL its process group at ``kill_after``."""
    started = time.monotonic()
    job = subprocess.Popen(command(images, output), cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    samples = []
    while job.poll() is None:
        elapsed = time.monotonic() - started
        samples.append((elapsed, committed_rows(output)))
        if kill_after is not None and elapsed >= kill_after:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            break
        time.sleep(SAMPLE_SECONDS)
    wall = time.monotonic() - started
    samples.append((wall, committed_rows(output)))
    return wall, samples


def first_time_at(samples: list[tuple[float, int]], rows: int) -> float | None:
    return next((seconds for seconds, committed in samples if committed >= rows), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--at", type=float, default=0.6, help="the kill, as a share of the clean run's wall time")
    options = parser.parse_args()
    from image_helpers import picture, png, write_table

    with tempfile.TemporaryDirectory(prefix="latentray-encode-kill-") as work:
        images = write_table(os.path.join(work, "images.parquet"), [
            {"id": f"img-{index:05d}", "image": png(picture(index, 256, 256)), "caption": f"a picture number {index % 50}"}
            for index in range(options.images)])
        clean_wall, samples = run_sampled(images, os.path.join(work, "clean"))
        killed_output = os.path.join(work, "killed")
        _, killed = run_sampled(images, killed_output, kill_after=options.at * clean_wall)
        at_kill = killed[-1][1]
        rerun_wall, _ = run_sampled(images, killed_output)
        record = json.load(open(os.path.join(killed_output, "run.json")))

    shares = {share: first_time_at(samples, int(share * options.images)) for share in (0.01, 0.25, 0.5, 0.75, 1.0)}
    print(f"\nencode, {options.images} images of 256x256, tiny model with caption embeddings, {os.cpu_count()} CPUs\n")
    print(f"clean run: {clean_wall:.1f} s; rows committed by then: "
          + ", ".join(f"{share:.0%} at {seconds:.1f} s ({seconds / clean_wall:.0%})" for share, seconds in shares.items() if seconds))
    print(f"driver SIGKILLed at {options.at:.0%} of the clean run ({options.at * clean_wall:.1f} s): "
          f"{at_kill} of {options.images} rows committed ({at_kill / options.images:.0%})")
    print(f"rerun: {rerun_wall:.1f} s ({rerun_wall / clean_wall:.0%} of the clean run), "
          f"encoded {record['counts']['encoded_this_run']} rows, status {record['status']}")


if __name__ == "__main__":
    main()
