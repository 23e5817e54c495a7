"""Image encoding and the write-images task, without Ray."""

import io as bytes_io
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from pipelines.generation.images import encode_image, image_path, write_generated_images


@pytest.mark.parametrize("image_format, pillow_name", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_format_round_trips(image_format, pillow_name):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    data = encode_image(pixels, image_format, quality=90)
    decoded = Image.open(bytes_io.BytesIO(data))
    assert decoded.format == pillow_name and decoded.size == (24, 16)
    if image_format == "png":
        np.testing.assert_array_equal(np.asarray(decoded), pixels)
    assert encode_image(pixels, image_format, quality=90) == data  # no timestamps: same pixels, same bytes


def test_ids_become_short_stable_safe_file_names():
    assert image_path("cat", "png") == "images/cat.png"
    assert image_path("a b/c", "jpeg") == "images/a%20b%2Fc.jpg"
    long_id, unicode_id = "x" * 300, "ü" * 40  # quoting makes the second 240 characters long
    for row_id in (long_id, unicode_id, "..", "../a b/c"):
        name = image_path(row_id, "webp").removeprefix("images/")
        assert len(name.encode()) <= 100 and "/" not in name and not name.startswith(".")
        assert image_path(row_id, "webp") == f"images/{name}"  # stable
    assert image_path(long_id, "png").startswith("images/" + "x" * 64 + "~")
    assert image_path(long_id, "png") != image_path(long_id + "y", "png")
    assert image_path(unicode_id, "png").startswith("images/%C3%BC")
    prefix = image_path(unicode_id, "png").removeprefix("images/").rsplit("~", 1)[0]
    assert unicode_id.startswith(unquote(prefix, errors="strict"))  # whole characters, never half an escape


def test_non_finite_latent_becomes_an_error_and_no_image(tmp_path):
    latents = np.zeros((2, 4, 2, 2), np.float32)
    latents[1, 0, 0, 0] = np.nan
    batch = {"id": np.array(["ok", "bad"], dtype=object), "latents": latents, "image": np.zeros((2, 16, 16, 3), np.uint8)}
    out = write_generated_images(batch, str(tmp_path), "png", 95, keep_latents=False)
    assert out["image_path"].tolist() == ["images/ok.png", ""]
    assert out["error_reason"].tolist() == ["", "the final latent has non-finite values (NaN or infinity)"]
    assert out["error_stage"].tolist() == ["", "denoiser"]
    assert (tmp_path / "images" / "ok.png").exists() and not (tmp_path / "images" / "bad.png").exists()
    assert "latents" not in out and "image" not in out
    assert out["latent_count"].tolist() == [4, 4] and out["latent_mean"].shape == (2, 4)
