"""bench/gpu_benchmark.py --smoke: every section (the models at tiny shapes, the whole job against
diffusers) runs on CPU and writes its JSON and Markdown table. Its figures mean nothing on CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # two whole processes for the job section: ~60 s
@pytest.mark.time_limit(300)
def test_the_gpu_benchmark_runs_every_section_on_cpu_in_smoke_mode(tmp_path, model_cache):
    figures, table = tmp_path / "gpu.json", tmp_path / "gpu.md"
    environment = {**os.environ, "PYTHONPATH": ROOT, "LATENTRAY_CACHE": str(model_cache)}
    finished = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_benchmark.py"), "--smoke", "--json", str(figures), "--markdown", str(table)],
        env=environment, capture_output=True, text=True, timeout=280,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert {name: section["status"] for name, section in report["sections"].items()} == dict.fromkeys(
        ("flux", "sdxl", "vae", "zimage", "qwenimage", "job"), "done")
    rows = report["rows"]
    assert {row["section"] for row in rows} == {"flux", "sdxl", "vae", "zimage", "qwenimage"}
    assert all(row["ms_per_call"] > 0 and row["gflops_per_call"] > 0 for row in rows)
    # CPU: no GPU memory and no bf16 peak to compare with: null, never 0
    assert all(row["peak_memory_gib"] is None and row["fraction_of_bf16_peak"] is None for row in rows)
    variants = {row["variant"] for row in rows if row["section"] == "flux"}
    assert {"float32 eager", "attention native", "float32 compiled (eager)"} <= variants
    assert report["sections"]["flux"]["compile_seconds"] > 0
    assert set(report["sections"]["job"]["process_seconds"]) == {"diffusers", "latentray"}
    assert "| flux | FLUX.1-dev transformer | float32 eager | 1 |" in table.read_text()
