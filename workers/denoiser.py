"""Denoiser worker: U-Net + scheduler loop with classifier-free guidance -> final latents.

Each row's result equals what diffusers' ``StableDiffusionPipeline`` computes for that
row alone with ``generator=torch.Generator("cpu").manual_seed(seed)``: the initial
noise and every stochastic scheduler step draw from the row's own CPU generator,
so a row's image does not depend on which rows share its batch.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from workers.base import Batch, ModelWorker, group_rows, stack_column
from workers.schedulers import make_scheduler


class DenoiserWorker(ModelWorker):
    STAGE = "denoiser"
    REQUIRED_COLUMNS = {
        "prompt_embeds": "text encoder hidden states of the prompt",
        "negative_prompt_embeds": "text encoder hidden states of the negative prompt",
        "seed": "the row's random seed",
        "num_inference_steps": "denoising steps",
        "guidance_scale": "classifier-free guidance scale (<= 1 turns guidance off)",
        "height": "image height in pixels",
        "width": "image width in pixels",
    }
    OUTPUT_COLUMNS = ("latents",)
    DROPPED_COLUMNS = ("prompt_embeds", "negative_prompt_embeds")

    def __init__(self, model, *, scheduler: str | None = None, **options):
        super().__init__(model, **options)
        self.unet = self.model.load(self.model.family.denoiser_component, self.device, self.dtype)
        self.scheduler_name = scheduler
        self.scheduler_config = self.model.scheduler_config()
        self.vae_scale_factor = self.model.vae_scale_factor

    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            # 1. rows share a denoising loop only with rows of the same size, steps and guidance mode
            keys = [
                (int(h), int(w), int(steps), bool(g > 1.0))
                for h, w, steps, g in zip(batch["height"], batch["width"], batch["num_inference_steps"], batch["guidance_scale"])
            ]
            latents: list[np.ndarray | None] = [None] * len(keys)

            # 2. denoise each group
            for (height, width, steps, guided), rows in group_rows(keys).items():
                result = self._denoise(batch, rows, height, width, steps, guided)
                for row, latent in zip(rows, result):
                    latents[row] = latent

            # 3. embeddings are large and no later stage needs them
            for column in self.DROPPED_COLUMNS:
                batch.pop(column)
            batch["latents"] = stack_column(latents)
        return batch

    @torch.inference_mode()
    def _denoise(self, batch: Batch, rows: list[int], height: int, width: int, steps: int, guided: bool) -> np.ndarray:
        # 1. embeddings, negative first as diffusers concatenates them
        prompt_embeds = torch.from_numpy(np.stack([batch["prompt_embeds"][r] for r in rows]))
        if guided:
            negative = torch.from_numpy(np.stack([batch["negative_prompt_embeds"][r] for r in rows]))
            prompt_embeds = torch.cat([negative, prompt_embeds])
        prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        guidance = torch.tensor([float(batch["guidance_scale"][r]) for r in rows], device=self.device, dtype=self.dtype)
        guidance = guidance.view(-1, 1, 1, 1)

        # 2. timesteps (a fresh scheduler: they keep state across steps)
        scheduler = make_scheduler(self.scheduler_name, self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)

        # 3. initial noise, one CPU generator per row
        generators = [torch.Generator("cpu").manual_seed(int(batch["seed"][r])) for r in rows]
        shape = (len(rows), self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        latents = latents * scheduler.init_noise_sigma

        # 4. denoising loop
        step_kwargs = self._step_kwargs(scheduler, generators)
        for timestep in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            noise = self.unet(model_input, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if guided:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance * (noise_text - noise_uncond)
            latents = scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
        return latents.float().cpu().numpy()

    @staticmethod
    def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
        # as diffusers' prepare_extra_step_kwargs: only schedulers that draw noise take a generator
        parameters = inspect.signature(scheduler.step).parameters
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = 0.0
        if "generator" in parameters:
            kwargs["generator"] = generators
        return kwargs
