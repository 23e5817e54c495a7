"""The demo U-Net loop reads shuffled batches through LatentDataset and resumes mid-epoch from its checkpoint."""

import pytest
import torch

from latent_helpers import write_latent_dataset
from pipelines import LatentDataset
from workers.demo.training import UnetTrainingConfig, train_unet

STEPS = 7  # 5 batches per epoch: the run crosses an epoch boundary


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4,
    )


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("unet-latents"))
    write_latent_dataset(uri, [17, 23], buckets=False, tokens=5, width=8)
    return uri


def train(latents: str, checkpoint: str | None, stop_after: int | None = None):
    batches = LatentDataset(latents, columns=["latent", "prompt_embeds"], batch_size=8, shuffle=True, seed=1, drop_last=True)
    config = UnetTrainingConfig(steps=STEPS, warmup_steps=2, log_every=2, checkpoint_every=2, seed=3)
    alphas = torch.linspace(0.99, 0.01, 50)
    averaged, log = train_unet(tiny_unet(), batches, torch.zeros(5, 8), alphas, config, checkpoint=checkpoint, stop_after=stop_after)
    return averaged, log


def test_training_killed_mid_epoch_resumes_to_the_same_weights(latents, tmp_path):
    torch.set_num_threads(1)
    uninterrupted, whole_log = train(latents, None)
    checkpoint = str(tmp_path / "unet-checkpoint.pt")
    _, first_log = train(latents, checkpoint, stop_after=3)  # "killed" after step 3 of 5 in the first epoch
    assert [step for step, _ in first_log.losses] == [2]
    resumed, log = train(latents, checkpoint)
    assert [step for step, _ in log.losses] == [step for step, _ in whole_log.losses] == [2, 4, 6, 7]
    assert [loss for _, loss in log.losses] == pytest.approx([loss for _, loss in whole_log.losses], rel=1e-6)
    for (name, weight), other in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(weight, other, rtol=1e-6, atol=1e-7, msg=name)


def test_no_batch_in_an_epoch_is_refused(latents):
    batches = LatentDataset(latents, columns=["latent", "prompt_embeds"], batch_size=64, drop_last=True)
    with pytest.raises(ValueError, match="^batches: the latent dataset yields no batch"):
        train_unet(tiny_unet(), batches, torch.zeros(5, 8), torch.linspace(0.99, 0.01, 50), UnetTrainingConfig(steps=2))
