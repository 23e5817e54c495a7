"""The adherence analyser: reads corpus images, refuses noise, scores a generation output."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.demo.adherence import analyse_image, score_generation, score_rows, summarize
from pipelines.demo.procedural import PALETTE, SHAPES, Scene, ShapesCorpusConfig, draw_scene, sample_scene


def corpus_scenes(count: int, seed: int) -> list[Scene]:
    config = ShapesCorpusConfig(count=count, seed=seed, split="all")
    combinations = config.combinations()
    return [sample_scene(config, index, combinations) for index in range(count)]


def scene(color: str, shape: str, background: str, size: int = 30) -> np.ndarray:
    corner = (64 - size) // 2
    return draw_scene(Scene(color=color, shape=shape, background=background, left=corner, top=corner, size=size,
                            color_rgb=PALETTE[color], background_rgb=PALETTE[background]), 64)


def test_reads_every_corpus_image():
    for drawn in corpus_scenes(400, seed=11):
        reading = analyse_image(draw_scene(drawn, 64))
        assert (reading.color, reading.shape, reading.background) == (drawn.color, drawn.shape, drawn.background), drawn


def test_smallest_and_largest_shapes():
    for shape in SHAPES:
        for size in (16, 44, 58):
            assert analyse_image(scene("yellow", shape, "purple", size)).shape == shape


def test_noise_reads_as_nothing():
    rng = np.random.default_rng(0)
    readings = [analyse_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(50)]
    # smooth noise: what a random-weight VAE decoder draws looks more like this
    readings += [analyse_image(np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)))
                 for _ in range(50)]
    assert sum(reading.color is not None for reading in readings) <= 5
    assert sum(reading.shape is not None for reading in readings) <= 5


def test_plain_image_has_background_but_no_shape():
    reading = analyse_image(np.full((64, 64, 3), PALETTE["green"], np.uint8))
    assert reading.background == "green" and reading.color is None and reading.shape is None
    assert reading.reason == "no foreground shape"


def test_two_shapes_or_a_split_background_are_not_one_shape():
    halves = np.full((64, 64, 3), PALETTE["blue"], np.uint8)
    halves[:, 32:] = PALETTE["yellow"]
    assert analyse_image(halves).shape is None
    two = scene("red", "square", "white", 16)
    two[48:60, 48:60] = PALETTE["red"]
    assert analyse_image(two).shape is None


def test_scores_seen_and_held_out_separately():
    rows = [
        {"id": "a", "prompt": "a red circle on a blue background", "pixels": scene("red", "circle", "blue")},
        {"id": "b", "prompt": "a red square on a blue background", "pixels": scene("red", "circle", "blue")},  # wrong shape
        {"id": "c", "prompt": "a green circle on a black background", "pixels": scene("green", "circle", "black")},  # held out
        {"id": "d", "prompt": "a blue triangle on a white background", "pixels": np.zeros((64, 64, 3), np.uint8)},  # held out, nothing
        {"id": "e", "prompt": "a cat", "pixels": scene("red", "circle", "blue")},  # not a corpus caption: not scored
    ]
    summary = summarize(score_rows(rows))
    assert summary["all"]["images"] == 4
    assert summary["seen"] == {"images": 2, "color_match": 1.0, "shape_match": 0.5, "color_and_shape_match": 0.5, "background_match": 1.0}
    assert summary["held_out"] == {"images": 2, "color_match": 0.5, "shape_match": 0.5, "color_and_shape_match": 0.5, "background_match": 0.5}


def test_scores_a_generation_output_from_its_manifest(tmp_path):
    prompts = ["a white square on a red background", "a black triangle on an orange background"]
    pictures = [scene("white", "square", "red"), scene("black", "circle", "orange")]
    (tmp_path / "images").mkdir()
    for index, pixels in enumerate(pictures):
        Image.fromarray(pixels).save(tmp_path / "images" / f"{index}.png")
    (tmp_path / "manifest").mkdir()
    pq.write_table(pa.table({"id": ["0", "1"], "prompt": prompts, "image_path": ["images/0.png", "images/1.png"]}),
                   tmp_path / "manifest" / "part-0.parquet")
    summary, per_image = score_generation(str(tmp_path))
    assert summary["seen"]["color_match"] == 1.0 and summary["seen"]["shape_match"] == 0.5
    assert per_image.column("found_shape").to_pylist() == ["square", "circle"]
