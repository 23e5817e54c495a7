"""The procedural shapes corpus: deterministic, held-out combinations kept out, captions true to the pixels."""

import pyarrow.parquet as pq
import pytest

from pipelines.demo.adherence import analyse_png
from pipelines.demo.procedural import (
    DEFAULT_HELD_OUT, PALETTE, SHAPES, ShapesCorpusConfig, all_combinations, caption_for, corpus_rows,
    evaluation_prompts, parse_caption, write_corpus,
)
from pipelines.runtime.schemas import SHAPES_CORPUS_SCHEMA, check_image_schema


def test_same_seed_same_bytes_other_seed_other_images():
    first = corpus_rows(ShapesCorpusConfig(count=12, seed=5), 0, 12)
    again = corpus_rows(ShapesCorpusConfig(count=12, seed=5), 0, 12)
    other = corpus_rows(ShapesCorpusConfig(count=12, seed=6), 0, 12)
    assert first.equals(again)
    assert first.column("image").to_pylist() != other.column("image").to_pylist()


def test_an_image_does_not_depend_on_how_the_corpus_is_split():
    config = ShapesCorpusConfig(count=20, seed=1)
    assert corpus_rows(config, 0, 20).slice(8, 12).equals(corpus_rows(config, 8, 20))


def test_captions_say_what_the_analyser_sees():
    rows = corpus_rows(ShapesCorpusConfig(count=150, seed=2, split="all"), 0, 150).to_pylist()
    for row in rows:
        reading = analyse_png(row["image"])
        assert (reading.color, reading.shape, reading.background) == parse_caption(row["caption"]), row["caption"]
        assert (row["color"], row["shape"], row["background"]) == parse_caption(row["caption"])


def test_held_out_combinations_stay_out_of_training():
    train = corpus_rows(ShapesCorpusConfig(count=300, seed=3), 0, 300).to_pylist()
    assert not {(row["color"], row["shape"]) for row in train} & set(DEFAULT_HELD_OUT)
    assert len({(row["color"], row["shape"]) for row in train}) == len(PALETTE) * len(SHAPES) - len(DEFAULT_HELD_OUT)
    held_out = corpus_rows(ShapesCorpusConfig(count=30, seed=3, split="held_out"), 0, 30).to_pylist()
    assert {(row["color"], row["shape"]) for row in held_out} == set(DEFAULT_HELD_OUT)


def test_every_drawn_pair_contrasts():
    for color, _, background in all_combinations():
        assert color != background
    assert ("red", "circle", "orange") not in all_combinations()  # too close to tell apart
    assert ("red", "circle", "blue") in all_combinations()


def test_written_corpus_is_an_encode_input_table(tmp_path):
    config = ShapesCorpusConfig(count=25, seed=0, rows_per_part=10)
    parts = write_corpus(config, str(tmp_path / "corpus"))
    assert len(parts) == 3
    table = pq.read_table(str(tmp_path / "corpus"))
    assert table.num_rows == 25 and table.schema.equals(SHAPES_CORPUS_SCHEMA)
    check_image_schema(table.schema, "corpus", image_column="image", path_column=None, caption_column="caption", id_column=None)
    assert write_corpus(config, str(tmp_path / "corpus")) == parts  # part names come from the rows: a rewrite replaces them


def test_captions_parse_back():
    for color, shape, background in all_combinations():
        assert parse_caption(caption_for(color, shape, background)) == (color, shape, background)
    assert caption_for("orange", "circle", "blue") == "an orange circle on a blue background"
    assert parse_caption("A Red Circle on an ORANGE background") == ("red", "circle", "orange")
    for text in ("a cat", "", "a red hexagon on a blue background", "a pink circle on a blue background"):
        assert parse_caption(text) is None


def test_evaluation_prompts_ask_for_every_colour_and_shape():
    table = evaluation_prompts(per_combination=3).to_pylist()
    assert len(table) == len(PALETTE) * len(SHAPES) * 3
    assert len({row["id"] for row in table}) == len(table)
    for row in table:
        assert parse_caption(row["prompt"]) == (row["color"], row["shape"], row["background"])
        assert row["held_out"] == ((row["color"], row["shape"]) in DEFAULT_HELD_OUT)


@pytest.mark.parametrize("settings, field", [
    ({"count": 0}, "count"),
    ({"split": "test"}, "split"),
    ({"held_out": [("pink", "circle")]}, "held_out"),
    ({"split": "held_out", "held_out": []}, "held_out"),
    ({"image_size": 60}, "image_size"),
    ({"min_size": 50}, "min_size"),
    ({"color_jitter": 99}, "color_jitter"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ShapesCorpusConfig(**{"count": 4, **settings})
