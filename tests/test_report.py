"""`latentray report`: a real tiny run, the page rendered by headless Chromium, the contact sheet PNG."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from helpers import write_prompts
from PIL import Image

from jobs.cli import main
from pipelines.generation.generate import run_generation
from pipelines.report import CELL, check_run_record, contact_sheet_size, thumbnail
from pipelines.runtime.config import GenerateConfig
from pipelines.runtime.progress import ProgressReporter

ROWS = [{"id": f"r{i}", "prompt": f"shape number {i}"} for i in range(6)] + [{"id": "bad", "prompt": ""}]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    prompts = write_prompts(root / "prompts.parquet", ROWS)
    config = GenerateConfig(prompts=prompts, output=str(root / "out"), model="tiny", steps=2, height=32, width=48, save_latents=True)
    run_generation(config)
    return root / "out"


def run_chromium(*arguments) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def find_in(screenshot: np.ndarray, picture: np.ndarray) -> bool:
    """Is ``picture`` drawn somewhere in ``screenshot`` (within 2 levels per channel)?"""
    height, width = picture.shape[:2]
    candidates = np.argwhere(np.abs(screenshot.astype(int) - picture[0, 0].astype(int)).max(axis=2) <= 2)
    for top, left in candidates:
        window = screenshot[top:top + height, left:left + width]
        if window.shape == picture.shape and np.abs(window.astype(int) - picture.astype(int)).max() <= 2:
            return True
    return False


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_report_renders_in_chromium_with_its_images(finished_run, tmp_path, capsys):
    assert main(["report", str(finished_run), "--samples", "5"]) == 0
    page = (finished_run / "report.html").read_text()

    # self-contained: five inlined sample images, nothing fetched from elsewhere
    dom = run_chromium("--dump-dom", (finished_run / "report.html").as_uri()).stdout
    assert dom.count('src="data:image/png;base64,') == 5 and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "Errors (1 rows)" in dom and "prompt is empty" in dom
    assert dom.count("<svg") == 4 and "from the saved latents" in dom  # one histogram per latent channel
    assert "denoiser" in dom and "rows per busy second" in dom

    # the images are on screen, pixel for pixel: find the first sample's thumbnail in a screenshot
    shot = tmp_path / "shot.png"
    run_chromium("--window-size=1200,1600", f"--screenshot={shot}", (finished_run / "report.html").as_uri())
    screenshot = np.asarray(Image.open(shot).convert("RGB"))
    sample = np.asarray(thumbnail(Image.open(finished_run / "images" / "r0.png").convert("RGB")))
    assert sample.shape == (CELL * 32 // 48, CELL, 3)
    assert find_in(screenshot, sample)


@pytest.fixture(scope="module")
def encoded_run(ray_session, tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from image_helpers import picture, png

    from pipelines.encoding.encode import run_encoding
    from pipelines.runtime.config import EncodeConfig

    root = tmp_path_factory.mktemp("encoded")
    rows = [{"id": f"img{i}", "image": png(picture(i, 40, 40)), "caption": f"picture {i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), root / "images.parquet")
    run_encoding(EncodeConfig(images=str(root / "images.parquet"), output=str(root / "out"), model="tiny", resolution=32, caption_column="caption"))
    return root / "out"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_encode_report_shows_latents_decoded_by_the_runs_vae(encoded_run, capsys):
    assert main(["report", str(encoded_run)]) == 0
    dom = run_chromium("--dump-dom", (encoded_run / "report.html").as_uri()).stdout
    assert "Decoded sample latents (3)" in dom and dom.count('src="data:image/png;base64,') == 3
    assert "stored latents of 3 rows (latents/)" in dom and "picture 2" in dom
    assert Image.open(encoded_run / "contact_sheet.png").size == contact_sheet_size(3) == (3 * 128, 128 + 18)


def test_contact_sheet_has_a_cell_per_sample(finished_run, capsys):
    assert main(["report", str(finished_run), "--samples", "5"]) == 0
    sheet = Image.open(finished_run / "contact_sheet.png")
    assert sheet.size == contact_sheet_size(5) == (4 * 128, 2 * (128 + 18))
    pixels = np.asarray(sheet.convert("RGB"))
    assert pixels[:CELL, :CELL].std() > 10 and (pixels[CELL + 18:, CELL:] == 255).all()  # 5 drawn, 3 cells blank


def test_report_of_something_else_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_run_record_check_names_the_problem(finished_run):
    record = json.loads((finished_run / "run.json").read_text())
    assert check_run_record(record, 0.2)["error_rate"] == pytest.approx(1 / 7, abs=1e-6)
    with pytest.raises(ValueError, match=r"error rate 14.29% \(1 of 7 rows\) is above the limit 10.00%"):
        check_run_record(record, 0.1)
    broken = {**record, "counts": {**record["counts"], "ok_rows": 2}}
    with pytest.raises(ValueError, match="input_rows 7 != ok_rows 2 \\+ error_rows 1"):
        check_run_record(broken, 1.0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_only_off_a_terminal(tmp_path):
    clock, log = FakeClock(), open(tmp_path / "log", "w+")
    progress = ProgressReporter(label="generate", total=1000, done=100, every_seconds=10, stream=log, interactive=False, clock=clock)
    clock.now = 5
    progress.advance(50)  # not yet 10 s
    clock.now = 20
    progress.advance(150)
    progress.finish(accounted=1000)
    log.seek(0)
    assert log.read().splitlines() == [
        "latentray generate: 300/1000 rows (30.0%), 10.0 rows/s, ETA 1m10s",
        "latentray generate: 1000/1000 rows (100.0%), 45.0 rows/s, finished in 20s",
    ]
    quiet = ProgressReporter(label="generate", total=10, every_seconds=0, stream=log, interactive=True, clock=clock)
    quiet.advance(5)
    quiet.finish()
    assert os.path.getsize(tmp_path / "log") == log.tell()


# -- streaming over row groups ---------------------------------------------------------------------


def write_manifest_parts(output, parts: int, rows_per_part: int, seed: int = 0) -> list[dict]:
    """A --save-latents manifest of several parts of several row groups each, latents of two shapes (buckets)."""
    import pyarrow as pa

    from pipelines.runtime import io
    from pipelines.runtime.schemas import manifest_schema

    generator = np.random.default_rng(seed)
    rows, ids = [], [f"id{index:05d}" for index in generator.permutation(parts * rows_per_part)]
    for part in range(parts):
        chunk = []
        for row_id in ids[part * rows_per_part:(part + 1) * rows_per_part]:
            shape = (4, 4, 4) if int(row_id[2:]) % 3 else (4, 2, 6)
            latent = generator.normal(loc=[[[-1.0]], [[0.0]], [[0.5]], [[2.0]]], scale=1.0 + int(row_id[2:]) % 5, size=shape).astype(np.float32)
            chunk.append({
                "id": row_id, "prompt": f"prompt of {row_id}", "negative_prompt": "", "seed": 1, "num_inference_steps": 2,
                "guidance_scale": 1.0, "height": 8 * shape[1], "width": 8 * shape[2], "scheduler": "ddim", "image_path": "",
                "prompt_truncated": False, "latent_mean": latent.reshape(4, -1).mean(1).tolist(),
                "latent_std": latent.reshape(4, -1).std(1).tolist(), "latent": latent.ravel().tolist(), "latent_shape": list(shape),
            })
        io.write_parquet_part(pa.Table.from_pylist(chunk, schema=manifest_schema(True)), os.path.join(output, "manifest"))
        rows += chunk
    return rows


@pytest.fixture(scope="module")
def large_manifest(tmp_path_factory):
    from pipelines.runtime import io

    output = tmp_path_factory.mktemp("streamed")
    rows = write_manifest_parts(output, parts=3, rows_per_part=300)  # 128-row groups: 3 per part
    assert [io.parquet_footer(uri).num_row_groups for uri in io.list_parquet_files(str(output / "manifest"))] == [3, 3, 3]
    return str(output), rows


def full_table_histograms(values_per_row: list[np.ndarray], low=None, high=None) -> tuple[np.ndarray, np.ndarray]:
    """numpy.histogram over the whole column at once, per channel: what the streamed counts must equal."""
    from pipelines.report import HISTOGRAM_BINS

    values = np.concatenate([np.asarray(v, np.float64).reshape(4, -1) for v in values_per_row], axis=1)
    low = values.min(axis=1) if low is None else low
    high = values.max(axis=1) if high is None else high
    counts = np.stack([np.histogram(values[c], HISTOGRAM_BINS, (low[c], high[c]))[0] for c in range(4)])
    return counts, np.stack([np.histogram_bin_edges(values[c], HISTOGRAM_BINS, (low[c], high[c])) for c in range(4)])


def test_streamed_histograms_equal_numpy_over_the_whole_table(large_manifest):
    from pipelines.report import channel_histograms
    from pipelines.runtime.stats import stats_of_latents

    output, rows = large_manifest
    latents = [np.asarray(row["latent"], np.float32).reshape(row["latent_shape"]) for row in rows]
    expected_counts, expected_edges = full_table_histograms(latents)
    # edges from latent_stats.json (exact min/max of the stored latents), then from a first pass without it
    stats = stats_of_latents(latents).to_dict()
    for given in (stats, {}):
        histograms = channel_histograms(output, "manifest", given)
        np.testing.assert_array_equal(histograms.counts, expected_counts)
        np.testing.assert_array_equal(histograms.edges, expected_edges)
        assert histograms.counts.sum() == sum(latent.size for latent in latents) == 600 * 64 + 300 * 48  # every value, both shapes
        assert "every value of the final latents of 900 rows" in histograms.source


def test_without_saved_latents_the_means_of_every_row_are_counted(large_manifest, tmp_path):
    import pyarrow.parquet as pq

    from pipelines.report import channel_histograms

    output, rows = large_manifest
    for part in os.listdir(os.path.join(output, "manifest")):  # the same manifest without the latent columns
        table = pq.read_table(os.path.join(output, "manifest", part)).drop_columns(["latent", "latent_shape"])
        os.makedirs(tmp_path / "manifest", exist_ok=True)
        pq.write_table(table, tmp_path / "manifest" / part, row_group_size=128)
    histograms = channel_histograms(str(tmp_path), "manifest", {})
    expected_counts, _ = full_table_histograms([np.asarray(row["latent_mean"], np.float32) for row in rows])
    np.testing.assert_array_equal(histograms.counts, expected_counts)
    assert histograms.counts.sum() == 4 * 900 and "of all 900 rows" in histograms.source


def test_samples_are_the_smallest_ids_read_from_their_row_groups(large_manifest):
    from pipelines.report import first_rows

    output, rows = large_manifest
    table = first_rows(os.path.join(output, "manifest"), ["id", "prompt", "latent_shape"], 5)
    smallest = sorted(rows, key=lambda row: row["id"])[:5]
    assert table.column("id").to_pylist() == [row["id"] for row in smallest] == [f"id{index:05d}" for index in range(5)]
    assert table.column("prompt").to_pylist() == [row["prompt"] for row in smallest]
    assert table.column("latent_shape").to_pylist() == [row["latent_shape"] for row in smallest]


def test_histograms_of_a_real_run_count_every_saved_latent_value(finished_run):
    import pandas as pd

    from pipelines.report import channel_histograms

    # edges from the run's own latent_stats.json: its min and max are those of the saved latents, exactly
    stats = json.loads((finished_run / "latent_stats.json").read_text())
    histograms = channel_histograms(str(finished_run), "manifest", stats)
    frame = pd.read_parquet(finished_run / "manifest")
    latents = [np.asarray(flat, np.float32).reshape(shape) for flat, shape in zip(frame["latent"], frame["latent_shape"])]
    expected_counts, expected_edges = full_table_histograms(latents)
    np.testing.assert_array_equal(histograms.counts, expected_counts)
    np.testing.assert_array_equal(histograms.edges, expected_edges)
    assert histograms.counts.sum() == 6 * 4 * 4 * 6  # 6 rows of 4 x (32/8) x (48/8) values
