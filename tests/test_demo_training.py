"""Pieces of the demo model's training that run in seconds: tokenizer, configs, loss curves. No training here."""

import io as bytes_io
import json

import pytest
from PIL import Image

from pipelines.demo.loss_curves import render_loss_curves
from pipelines.demo.procedural import all_combinations, caption_for, caption_words
from pipelines.demo.train import TrainDemoConfig
from workers.demo.architecture import DemoArchitecture, caption_tokenizer, learn_word_merges, write_vocab_and_merges


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


def test_vae_training_crops_sit_on_the_latent_grid_and_repeat_for_a_seed():
    import torch

    from workers.demo.training import random_aligned_crop

    images = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).reshape(2, 3, 64, 64)

    def corners(seed):
        generator = torch.Generator().manual_seed(seed)
        found = []
        for _ in range(50):
            crop = random_aligned_crop(images, 32, 8, generator)
            assert crop.shape == (2, 3, 32, 32)
            first = int(crop[0, 0, 0, 0])
            found.append((first // 64, first % 64))
        return found

    assert all(top % 8 == 0 and left % 8 == 0 and top <= 32 and left <= 32 for top, left in corners(0))
    assert corners(0) == corners(0) and corners(0) != corners(1)
    assert len(set(corners(0))) > 10  # the crops move about the image
    assert random_aligned_crop(images, 64, 8, torch.Generator()) is images


def test_vae_training_config_names_the_bad_field_and_ends_on_whole_images():
    from workers.demo.training import VaeTrainingConfig

    with pytest.raises(ValueError, match=r"^crop_size"):
        VaeTrainingConfig(steps=10, crop_size=4)
    with pytest.raises(ValueError, match=r"^whole_image_share"):
        VaeTrainingConfig(steps=10, whole_image_share=1.5)
    assert VaeTrainingConfig(steps=100, whole_image_share=0.05).crop_steps == 95
    assert VaeTrainingConfig(steps=6, whole_image_share=0.05).crop_steps == 5  # at least one whole-image step
    assert VaeTrainingConfig(steps=100, crop_size=None).crop_steps == 0


def test_vae_training_is_reproducible_and_leaves_saveable_weights(tmp_path):
    import torch

    from workers.demo import architecture as demo
    from workers.demo.training import VaeTrainingConfig, train_vae

    architecture = DemoArchitecture(vae_channels=(8, 8, 16, 16))
    images = torch.randint(0, 256, (8, 64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    config = VaeTrainingConfig(steps=3, batch_size=2, warmup_steps=1, log_every=1, whole_image_share=0.34)

    def trained():
        vae = demo.build_vae(architecture, seed=0)
        log = train_vae(vae, images, config)
        assert [step for step, _ in log.losses] == [1, 2, 3]
        return vae

    first, second = trained(), trained()
    for (name, weight), other in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(weight, other), name
        assert weight.is_contiguous(), name
    first.save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size > 0
