"""The shipped demo model: loads offline, and draws the colours and shapes it is asked for."""

import json
import os

import pyarrow.parquet as pq
import pytest

from pipelines.runtime.config import GenerateConfig
from workers.runtime.presets import shipped_model_dir


def test_shipped_model_is_a_small_safetensors_diffusers_directory():
    from diffusers import StableDiffusionPipeline

    directory = shipped_model_dir("demo")
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    assert sum(os.path.getsize(path) for path in files) < 30 * 2**20
    assert not [path for path in files if path.endswith((".bin", ".pt", ".pkl"))]
    pipe = StableDiffusionPipeline.from_pretrained(directory, local_files_only=True)
    assert pipe.vae.config.block_out_channels and pipe.unet.config.sample_size * 8 == 64


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_latentray_demo_draws_the_requested_colours_where_random_weights_do_not(ray_session, tmp_path, capsys):
    from jobs.cli import main

    # 1. the demo: 8 images of seen combinations, and how many show what their prompt asks for
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 0
    assert len(os.listdir(tmp_path / "demo" / "images")) == 8
    demo = json.load(open(tmp_path / "demo" / "adherence.json"))["seen"]
    assert "colour matches" in capsys.readouterr().err
    manifest = pq.read_table(tmp_path / "demo" / "manifest")
    assert set(manifest.column("guidance_scale").to_pylist()) == {5.0}  # the demo model's recommended guidance

    # 2. the same prompts through random weights of the same architecture
    assert main(["demo", "--model", "tiny", "--output", str(tmp_path / "tiny")]) == 0
    random_weights = json.load(open(tmp_path / "tiny" / "adherence.json"))["seen"]

    # Chance is 1 in 8 colours. The shipped model draws 6 of the 8 in the right colour and all 8 in
    # the right shape; the thresholds leave room for an image of numeric drift on other CPUs.
    assert demo["images"] == 8 and demo["color_match"] >= 5 / 8 and demo["shape_match"] >= 7 / 8, demo
    assert random_weights["color_match"] <= 0.25, random_weights


def test_guidance_defaults_to_the_models_recommended_scale(model_cache):
    from pipelines.runtime.model_source import describe_model

    def guidance(model: str = "demo", **overrides):
        config = GenerateConfig(prompts="p.parquet", output="out", model=model, **overrides)
        return config.with_model_defaults(describe_model(model)).guidance

    assert guidance() == 5.0  # measured best for the demo model (README)
    assert guidance("tiny") == 7.5 and guidance("tiny-sdxl") == 5.0 and guidance("tiny-flux") == 3.5  # the family's default
    assert guidance("demo", guidance=9.0) == 9.0
    with pytest.raises(ValueError, match=r"^guidance"):
        guidance(guidance=-1.0)


def test_a_plain_install_carries_the_demo_model(tmp_path):
    """The model is package data: a built wheel (what a non-editable install unpacks) holds every file."""
    import subprocess
    import sys
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), root],
                   check=True, timeout=300, cwd=tmp_path)
    (wheel,) = list(tmp_path.glob("latentray-*.whl"))
    shipped = {name.split("workers/demo/model/", 1)[1] for name in zipfile.ZipFile(wheel).namelist() if "workers/demo/model/" in name}
    on_disk = {os.path.relpath(os.path.join(r, n), shipped_model_dir("demo")) for r, _, names in os.walk(shipped_model_dir("demo")) for n in names}
    assert shipped == on_disk and "unet/diffusion_pytorch_model.safetensors" in shipped
