"""Pieces of the demo model's training that run in seconds: tokenizer, configs, loss curves. No training here."""

import io as bytes_io
import json

import pytest
from PIL import Image

from jobs.train_demo import TrainDemoConfig
from pipelines.loss_curves import render_loss_curves
from pipelines.procedural import all_combinations, caption_for, caption_words
from workers.demo_architecture import DemoArchitecture, caption_tokenizer, learn_word_merges, write_vocab_and_merges


@pytest.fixture(scope="module")
def tokenizer():
    return caption_tokenizer(caption_words(), max_tokens=32)


def test_every_caption_word_is_one_token(tokenizer):
    for color, shape, background in all_combinations():
        caption = caption_for(color, shape, background)
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
        assert tokens[1:-1] == [word + "</w>" for word in caption.split()]


def test_other_text_tokenizes_byte_by_byte_without_unknowns(tokenizer):
    for text in ("a zebra!", "ünïcode 😀", "RED"):
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids[1:-1], text


def test_merges_do_not_depend_on_word_order():
    words = caption_words()
    assert learn_word_merges(words) == learn_word_merges(list(reversed(words)))


def test_vocab_and_merges_files_rebuild_the_tokenizer(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    write_vocab_and_merges(tokenizer, str(tmp_path))
    vocabulary = json.loads((tmp_path / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().splitlines()[1:]]
    rebuilt = CLIPTokenizer(vocab=vocabulary, merges=merges, model_max_length=32)
    text = "an orange square on a purple background, and a zebra"
    assert rebuilt(text).input_ids == tokenizer(text).input_ids


def test_configs_name_the_bad_field(tmp_path):
    with pytest.raises(ValueError, match=r"^vae_norm_groups"):
        DemoArchitecture(vae_channels=(12, 32, 64, 64))
    with pytest.raises(ValueError, match=r"^scale"):
        TrainDemoConfig(output=str(tmp_path), scale="huge")
    with pytest.raises(ValueError, match=r"^output: must be a local folder"):
        TrainDemoConfig(output="s3://bucket/demo")
    with pytest.raises(ValueError, match=r"^unet_steps"):
        TrainDemoConfig(output=str(tmp_path), unet_steps=0)
    assert TrainDemoConfig(output=str(tmp_path), scale="smoke", unet_steps=9).sizes.unet_steps == 9


def test_loss_curves_png_has_one_panel_per_curve():
    png = render_loss_curves({"vae": [(1, 0.9), (2, 0.3), (3, 0.05)], "unet": [(10, 1.0)], "empty": []})
    image = Image.open(bytes_io.BytesIO(png))
    assert image.format == "PNG" and image.size == (640, 3 * 240)
