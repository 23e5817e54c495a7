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
from pipelines.config import GenerateConfig
from pipelines.generate import run_generation
from pipelines.progress import ProgressReporter
from pipelines.report import CELL, check_run_record, contact_sheet_size, thumbnail

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

    from pipelines.config import EncodeConfig
    from pipelines.encode import run_encoding

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
