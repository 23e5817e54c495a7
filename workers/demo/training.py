"""Training loops of the demo model: an AutoencoderKL on images, a U-Net on latents.

Plain single-process PyTorch, seeded, so the same inputs and config give the same weights
on the same machine and thread count. The VAE trains on images in memory; the U-Net reads
its batches through latentray's latent-dataset reader (shuffled, resumable) and can
checkpoint and resume mid-epoch. Each loop returns its loss history and step timings;
``pipelines.demo.train`` (run by ``python -m jobs.train_demo``) owns the data, the stages and the files.
"""

from __future__ import annotations

import copy
import io as bytes_io
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from workers.families.sd import StableDiffusion

logger = logging.getLogger(__name__)
WARMUP_STEPS_UNTIMED = 2  # the first steps of a process run 2-10x slower (kernel selection, allocation)


@dataclass
class TrainingLog:
    """Mean loss per logging window, and step wall times (for estimates)."""

    name: str
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the window ending there)
    step_seconds: list[float] = field(default_factory=list)

    def seconds_per_step(self) -> float | None:
        """Median over the steps after warm-up (all steps when there are too few)."""
        timed = self.step_seconds[WARMUP_STEPS_UNTIMED:] or self.step_seconds
        return statistics.median(timed) if timed else None

    def to_dict(self) -> dict:
        per_step = self.seconds_per_step()
        return {"losses": self.losses, "steps": len(self.step_seconds), "seconds_per_step": None if per_step is None else round(per_step, 4),
                "seconds": round(sum(self.step_seconds), 2)}


def _check_positive(config, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name}: must be > 0, got {getattr(config, name)}")


def warmup_then_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to ``floor`` of the peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _run_steps(
    name: str, steps: int, log_every: int, step: Callable[[int], float], log: TrainingLog, *, first_step: int = 0,
    window: list[float] | None = None, after_step: Callable[[int, list[float]], bool] | None = None,
) -> None:
    """Steps ``first_step``..``steps - 1``; ``after_step`` (index, the open logging window) returning True stops early."""
    window = list(window or [])
    for index in range(first_step, steps):
        started = time.perf_counter()
        window.append(step(index))
        log.step_seconds.append(time.perf_counter() - started)
        if (index + 1) % log_every == 0 or index + 1 == steps:
            log.losses.append((index + 1, float(np.mean(window))))
            logger.info("%s step %d/%d loss %.5f (%.3f s/step)", name, index + 1, steps, log.losses[-1][1], log.step_seconds[-1])
            window = []
        if after_step is not None and after_step(index, window):
            return


# -- VAE ------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class VaeTrainingConfig:
    steps: int
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    # SD's VAE weighs its KL term at 1e-6 of a per-pixel loss: enough to keep the latents
    # bounded and smooth for the diffusion model, too little to blur reconstructions
    kl_weight: float = 1e-6
    # Most steps train on crops of this side: the networks are convolutional, so a crop
    # teaches edges and colours as well as a whole image at a fraction of the cost (measured
    # at 32 of 64 pixels: 4x the steps per second, and a higher PSNR for the same time).
    # None trains on whole images throughout.
    crop_size: int | None = 32
    # The last steps see whole images, so the mid-block attention learns the full latent grid.
    whole_image_share: float = 0.05
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        _check_positive(self, ("steps", "batch_size", "learning_rate", "warmup_steps", "log_every"))
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight: must be >= 0, got {self.kl_weight}")
        if self.crop_size is not None and self.crop_size < 8:
            raise ValueError(f"crop_size: must be >= 8 or None, got {self.crop_size}")
        if not 0 <= self.whole_image_share <= 1:
            raise ValueError(f"whole_image_share: must be between 0 and 1, got {self.whole_image_share}")

    @property
    def crop_steps(self) -> int:
        """Steps trained on crops, the first ones; the rest see whole images."""
        return 0 if self.crop_size is None else self.steps - math.ceil(self.steps * self.whole_image_share)


def to_model_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as diffusers' image processor."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded as diffusers' postprocessing."""
    return ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def random_aligned_crop(batch: torch.Tensor, size: int, alignment: int, generator: torch.Generator) -> torch.Tensor:
    """One crop of side ``size`` at the same place in every image, its corner on the latent grid (a multiple of ``alignment``)."""
    height, width = batch.shape[-2:]
    if size >= min(height, width):
        return batch
    top, left = (alignment * int(torch.randint((extent - size) // alignment + 1, (1,), generator=generator))
                 for extent in (height, width))
    return batch[..., top:top + size, left:left + size]


def train_vae(vae, images: torch.Tensor, config: VaeTrainingConfig) -> TrainingLog:
    """Train ``vae`` in place on uint8 (N, H, W, 3) images: L1 + MSE reconstruction of a posterior sample, plus KL."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(config.warmup_steps, config.steps))
    factor = StableDiffusion().vae_scale_factor(vae.config)  # crops start on the latent grid
    # channels-last convolutions train ~15% faster on CPU (oneDNN); weights go back to the default layout after
    vae.to(memory_format=torch.channels_last).train()

    def step(index: int) -> float:
        batch = to_model_pixels(images[torch.randint(len(images), (config.batch_size,), generator=generator)])
        if index < config.crop_steps:
            batch = random_aligned_crop(batch, config.crop_size, factor, generator)
        batch = batch.contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    log = TrainingLog("vae")
    _run_steps("vae", config.steps, config.log_every, step, log)
    vae.to(memory_format=torch.contiguous_format).eval()  # safetensors saves contiguous tensors only
    return log


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 64) -> dict:
    """PSNR (dB) of images through encode (posterior mean) -> decode -> uint8, as a pipeline would store them.

    ``mean_image_psnr`` averages per-image PSNRs; ``corpus_psnr`` is the PSNR of the mean
    squared error over every pixel, the stricter of the two.
    """
    squared_errors = []
    for start in range(0, len(images), batch_size):
        original = images[start: start + batch_size]
        decoded = to_uint8(vae.decode(vae.encode(to_model_pixels(original)).latent_dist.mode()).sample)
        squared_errors.append(((decoded.float() - original.float()) ** 2).flatten(1).mean(1))
    per_image = torch.cat(squared_errors).clamp_min(1e-10)
    psnr = 10 * torch.log10(255.0**2 / per_image)
    return {"images": len(images), "mean_image_psnr": round(float(psnr.mean()), 3),
            "corpus_psnr": round(float(10 * torch.log10(255.0**2 / per_image.mean())), 3)}


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the latents (posterior means) of ``images``: SD's rule for the VAE's scaling_factor."""
    latents = [vae.encode(to_model_pixels(images[start: start + batch_size])).latent_dist.mode()
               for start in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(latents).std())


# -- U-Net ----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class UnetTrainingConfig:
    steps: int
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    # share of rows trained with the empty caption: the unconditional model that
    # classifier-free guidance contrasts against (10-20% in SD-style training)
    caption_dropout: float = 0.1
    # weights are averaged over roughly the last 1/(1-decay) steps: a short run's
    # final weights are noisy, their average samples much cleaner
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250  # steps between checkpoints (with a checkpoint path)

    def __post_init__(self) -> None:
        _check_positive(self, ("steps", "learning_rate", "warmup_steps", "log_every", "checkpoint_every"))
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


class ResumableBatches(Protocol):
    """What the U-Net loop reads: ``pipelines.LatentDataset`` with a ``batch_size`` (``latent``, ``prompt_embeds``)."""

    epoch: int

    def __iter__(self) -> Iterator[dict]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def epochs_of(batches: ResumableBatches) -> Iterator[dict]:
    """Batches epoch after epoch, from where the reader stands (a loaded state resumes mid-epoch)."""
    if len(batches) == 0:
        raise ValueError("batches: the latent dataset yields no batch in an epoch (fewer rows than batch_size with drop_last?)")
    epoch = batches.epoch
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


class ExponentialMovingAverage:
    """A copy of a model whose weights follow the trained ones slowly (decay warms up from 0)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        # early on the average would be mostly the random initialisation: follow faster
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.model.parameters(), model.parameters()):
            averaged.lerp_(current, 1 - decay)


def train_unet(
    unet, batches: ResumableBatches, empty_caption_embedding: torch.Tensor, alphas_cumprod: torch.Tensor, config: UnetTrainingConfig,
    *, checkpoint: str | None = None, stop_after: int | None = None,
) -> tuple[torch.nn.Module, TrainingLog]:
    """Train ``unet`` to predict the noise added to latents; returns the averaged (EMA) model and the log.

    ``batches``: shuffled batches of stored latents and caption embeddings (a LatentDataset).
    ``checkpoint``: a local file written every ``checkpoint_every`` steps with the
    model, optimizer, average, random state and the reader's state; when it exists the run
    continues from it, mid-epoch, with exactly the batches and noise the uninterrupted run
    would have drawn. ``stop_after``: end after that step (a preemption, for tests).
    """
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(config.warmup_steps, config.steps))
    average = ExponentialMovingAverage(unet, config.ema_decay)
    log = TrainingLog("unet")
    progress = {"first_step": 0, "window": []}
    if checkpoint is not None and os.path.exists(checkpoint):
        progress = _load_unet_checkpoint(checkpoint, unet, optimizer, schedule, average, generator, batches, log)
        logger.info("unet: resuming at step %d from %s", progress["first_step"], checkpoint)
    unet.train()
    stream = epochs_of(batches)

    def step(_: int) -> float:
        batch = next(stream)
        latents = batch["latent"].float()
        conditioning = batch["prompt_embeds"].float()
        rows = len(latents)
        dropped = torch.rand(rows, generator=generator) < config.caption_dropout
        conditioning[dropped] = empty_caption_embedding
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(len(alphas_cumprod), (rows,), generator=generator)
        signal = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = signal.sqrt() * latents + (1 - signal).sqrt() * noise  # as DDPMScheduler.add_noise
        loss = F.mse_loss(unet(noisy, timesteps, conditioning).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        average.update(unet)
        return loss.item()

    def after_step(index: int, window: list[float]) -> bool:
        done = index + 1
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == stop_after) and done < config.steps:
            _save_unet_checkpoint(checkpoint, done, window, unet, optimizer, schedule, average, generator, batches, log)
        return done == stop_after

    _run_steps("unet", config.steps, config.log_every, step, log, first_step=progress["first_step"], window=progress["window"],
               after_step=after_step)
    unet.eval()
    return average.model, log


def _save_unet_checkpoint(uri, step, window, unet, optimizer, schedule, average, generator, batches, log) -> None:
    buffer = bytes_io.BytesIO()
    torch.save({
        "step": step, "window": list(window), "unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "average": average.model.state_dict(), "average_updates": average.updates,
        "generator": generator.get_state(), "batches": batches.state_dict(),
        "log": {"losses": log.losses, "step_seconds": log.step_seconds},
    }, buffer)
    # temporary name then rename: an interrupted save leaves the previous checkpoint whole
    with open(f"{uri}.tmp", "wb") as handle:
        handle.write(buffer.getvalue())
    os.replace(f"{uri}.tmp", uri)


def _load_unet_checkpoint(uri, unet, optimizer, schedule, average, generator, batches, log) -> dict:
    with open(uri, "rb") as handle:
        state = torch.load(handle, weights_only=False)
    unet.load_state_dict(state["unet"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    average.model.load_state_dict(state["average"])
    average.updates = state["average_updates"]
    generator.set_state(state["generator"])
    batches.load_state_dict(state["batches"])
    log.losses, log.step_seconds = [tuple(loss) for loss in state["log"]["losses"]], list(state["log"]["step_seconds"])
    return {"first_step": state["step"], "window": state["window"]}
