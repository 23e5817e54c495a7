"""Safe decoding, RGB conversion, resize and crop (Pillow only: no Ray, no torch)."""


import numpy as np
import pytest
from PIL import Image, ImageCms

from image_helpers import (
    BACKGROUND, alpha_png, cmyk_jpeg, decompression_bomb_png, encoded, exif_rotated_jpeg, gray16_png, jpeg,
    palette_png_with_transparency, picture, png, truncated, upright_of_exif_jpeg,
)
from pipelines.encoding.image_decode import ImageRejected, Preprocessing, aspect_buckets, decode_image, fit_to_target, nearest_target, to_rgb

LIMIT = 10_000_000


def decode(data: bytes, max_pixels: int = LIMIT, background=BACKGROUND) -> np.ndarray:
    image = decode_image(data, max_pixels, background)
    assert image.mode == "RGB"
    return np.asarray(image)


def rejected(data: bytes, max_pixels: int = LIMIT) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels, BACKGROUND)
    return caught.value


@pytest.mark.parametrize("data, code, words", [
    (b"", "undecodable", "zero bytes"),
    (b"definitely not an image, just text" * 10, "undecodable", "not a recognised image format"),
    (truncated(jpeg(picture(0, 96, 64))), "truncated", "truncated"),
    (decompression_bomb_png(), "too_large", "refused before decoding"),
])
def test_bad_files_get_a_reason_code(data, code, words):
    error = rejected(data)
    assert error.code == code and words in error.message


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    data = png(picture(1, 128, 96))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image above the limit"))
    error = rejected(data, max_pixels=128 * 96 - 1)
    assert error.code == "too_large" and "128x96 = 12288 pixels" in error.message


def test_exif_orientation_is_applied():
    data = exif_rotated_jpeg(picture(2, 96, 64))
    upright = decode(data)
    assert upright.shape == (96, 64, 3)  # stored 96 wide, displayed 64 wide
    np.testing.assert_array_equal(upright, decode(upright_of_exif_jpeg(data)))


def test_alpha_is_composited_on_the_background():
    pixels = picture(3, 48, 16)
    on_white = decode(alpha_png(pixels)).astype(int)
    on_black = decode(alpha_png(pixels), background=(0, 0, 0)).astype(int)
    assert (on_white[:, :16] == 255).all() and (on_black[:, :16] == 0).all()  # transparent: the background
    np.testing.assert_array_equal(on_white[:, 32:], pixels[:, 32:])  # opaque: the picture
    expected = (pixels[:, 16:32].astype(int) * 128 + 255 * 127) / 255  # half transparent: blended
    assert np.abs(on_white[:, 16:32] - expected).max() <= 1


def test_palette_transparency_shows_the_background():
    rgb = decode(palette_png_with_transparency(16, 8), background=(10, 20, 30))
    assert (rgb[:, :8] == (10, 20, 30)).all()
    assert (rgb[4:, 8:] == (255, 0, 0)).all() and (rgb[:4, 8:] == (0, 0, 255)).all()


def test_16_bit_grayscale_is_scaled_not_clipped():
    rgb = decode(gray16_png(256, 4))
    ramp = np.linspace(0, 65535, 256)
    np.testing.assert_array_equal(rgb[0, :, 0], np.round(np.round(ramp) / 257).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.max() == 255 and rgb.min() == 0


def test_float_images_hold_intensities_from_0_to_1():
    values = np.linspace(0.0, 1.0, 32, dtype=np.float32).reshape(4, 8)
    rgb = decode(encoded(Image.fromarray(values, "F"), "TIFF"))
    np.testing.assert_array_equal(rgb[..., 1], np.round(values * 255).astype(np.uint8))


def test_cmyk_lab_one_bit_and_grayscale_alpha_convert_to_rgb():
    pixels = picture(4, 64, 48)
    assert np.abs(decode(cmyk_jpeg(pixels)).astype(int) - pixels).mean() < 4
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = decode(encoded(ImageCms.applyTransform(Image.fromarray(pixels), to_lab), "TIFF"))
    assert np.abs(lab.astype(int) - pixels).mean() < 2  # 8-bit LAB quantises a little
    bits = np.zeros((8, 8), bool)
    bits[:, 4:] = True
    np.testing.assert_array_equal(decode(encoded(Image.fromarray(bits), "PNG"))[..., 0], bits * 255)
    gray_alpha = Image.fromarray(np.dstack([np.full((4, 4), 100, np.uint8), np.zeros((4, 4), np.uint8)]), "LA")
    assert (decode(encoded(gray_alpha, "PNG")) == 255).all()


def test_a_mode_without_rgb_conversion_is_refused():
    class OddImage:
        mode = "XYZ;5"
        has_transparency_data = False

    with pytest.raises(ImageRejected) as caught:
        to_rgb(OddImage(), BACKGROUND)
    assert caught.value.code == "unsupported_mode"


def settings(targets, crop="center", min_size=None) -> Preprocessing:
    return Preprocessing(targets=tuple(targets), crop=crop, max_pixels=LIMIT, min_size=min_size, background=BACKGROUND)


def test_square_crop_covers_the_target_and_records_sizes():
    image = Image.fromarray(picture(5, 160, 100))
    fitted = fit_to_target(image, settings([(64, 64)]), seed=0)
    assert fitted.pixels.shape == (64, 64, 3) and fitted.pixels.dtype == np.uint8
    assert fitted.original_size == (100, 160) and fitted.target_size == (64, 64)
    assert fitted.crop_top_left == (0, (102 - 64) // 2)  # resized to 102x64, centred


def test_random_crop_is_seeded_per_row():
    image = Image.fromarray(picture(6, 200, 64))
    crops = {seed: fit_to_target(image, settings([(64, 64)], crop="random"), seed).crop_top_left for seed in range(8)}
    assert crops == {seed: fit_to_target(image, settings([(64, 64)], crop="random"), seed).crop_top_left for seed in range(8)}
    assert len(set(crops.values())) > 1


def test_small_images_are_refused_unless_a_minimum_allows_upscaling():
    image = Image.fromarray(picture(7, 48, 80))
    with pytest.raises(ImageRejected) as caught:
        fit_to_target(image, settings([(64, 64)]), seed=0)
    assert caught.value.code == "too_small" and "48x80 is smaller than its target 64x64" in caught.value.message
    assert fit_to_target(image, settings([(64, 64)], min_size=32), seed=0).pixels.shape == (64, 64, 3)
    with pytest.raises(ImageRejected, match="below the minimum 64"):
        fit_to_target(image, settings([(64, 64)], min_size=64), seed=0)


def test_buckets_follow_sdxl_and_each_image_goes_to_the_nearest_ratio():
    sdxl = aspect_buckets(1024, 64)
    for size in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344), (640, 1536), (512, 2048)]:
        assert size in sdxl
    assert all(h * w <= 1024 * 1024 and h % 64 == 0 and w % 64 == 0 for h, w in sdxl)
    buckets = tuple(aspect_buckets(64, 16))
    assert nearest_target(300, 100, buckets) == (32, 96) and nearest_target(100, 100, buckets) == (64, 64)
    fitted = fit_to_target(Image.fromarray(picture(8, 90, 150)), settings(buckets), seed=0)
    assert fitted.target_size == (80, 48) and fitted.pixels.shape == (80, 48, 3)
