"""Helpers for tests: prompt tables, diffusers references, image comparison."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_prompts(path, rows: list[dict] | dict) -> str:
    """Write a prompt table (list of row dicts, or a dict of columns) to ``path``."""
    table = pa.Table.from_pylist(rows) if isinstance(rows, list) else pa.table(rows)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(table, str(path))
    return str(path)


def export_variant(preset: str, directory, **pipeline_config) -> str:
    """A built-in model written to ``directory`` with pipeline settings of its ``model_index.json`` changed
    (FLUX.2 [klein]'s ``is_distilled``: the variants differ in nothing else a tiny model has)."""
    from workers.runtime.presets import export_preset

    export_preset(preset, str(directory))
    index_path = os.path.join(str(directory), "model_index.json")
    with open(index_path) as index_file:
        index = json.load(index_file)
    with open(index_path, "w") as index_file:
        json.dump({**index, **pipeline_config}, index_file)
    return str(directory)


def diffusers_reference(
    model_dir: str, rows: list[dict], scheduler: str | None = None, load_options: dict | None = None,
    loras: list[tuple[str, float]] | None = None, **call_options,
) -> list[np.ndarray]:
    """What the model family's own diffusers pipeline draws for each row, one row at a time.

    ``loras``: (file, weight) pairs applied to every row, as diffusers' ``load_lora_weights`` and ``set_adapters``.
    A row's "" negative prompt is diffusers' ``negative_prompt=None``; ``call_options``
    (and SDXL's per-row micro-conditioning) go to the pipeline's ``__call__`` as they are
    (Qwen-Image: its own default true_cfg_scale of 4 unless they say otherwise).
    FLUX.2 [klein] takes no negative text: a row's negative prompt goes in as
    ``negative_prompt_embeds`` from the pipeline's own ``encode_prompt``; FLUX.2 [dev]
    takes no negative at all (no CFG): the row's is left out, as latentray ignores it.
    """
    import torch
    from diffusers import DiffusionPipeline

    from workers.runtime.schedulers import make_scheduler

    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True, **(load_options or {}))
    pipe.set_progress_bar_config(disable=True)
    for index, (path, _) in enumerate(loras or []):  # LoRA files: load_lora_weights, then set_adapters with their weights
        pipe.load_lora_weights(path, adapter_name=f"lora{index}")
    if loras:
        pipe.set_adapters([f"lora{index}" for index in range(len(loras))], adapter_weights=[scale for _, scale in loras])
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    # Qwen-Image reads guidance_scale only with a guidance embedding (its CFG is true_cfg_scale)
    reads_guidance = type(pipe).__name__ != "QwenImagePipeline" or pipe.transformer.config.guidance_embeds
    images = []
    for row in rows:
        conditioning = {name: tuple(row[column]) for column, name in (
            ("original_size", "original_size"), ("crop_top_left", "crops_coords_top_left"), ("target_size", "target_size"),
        ) if row.get(column) is not None}
        result = pipe(
            **text_arguments(pipe, row["prompt"], row.get("negative_prompt") or None),
            num_inference_steps=row["num_inference_steps"], guidance_scale=row["guidance_scale"] if reads_guidance else None,
            height=row["height"], width=row["width"], generator=torch.Generator("cpu").manual_seed(row["seed"]),
            output_type="np", **conditioning, **call_options,
        ).images[0]
        images.append((result * 255).round().astype(np.uint8))
    return images


def text_arguments(pipe, prompt: str, negative_prompt: str | None) -> dict:
    """The prompt and negative prompt as the pipeline's ``__call__`` takes them (by name: FLUX.2's first argument is ``image``)."""
    if type(pipe).__name__ not in ("Flux2KleinPipeline", "Flux2Pipeline"):
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    if negative_prompt is None or type(pipe).__name__ == "Flux2Pipeline":  # [klein] encodes "" itself; [dev] has no negative
        return {"prompt": prompt}
    return {"prompt": prompt, "negative_prompt_embeds": pipe.encode_prompt(negative_prompt)[0]}


def assert_images_match(actual: np.ndarray, expected: np.ndarray) -> None:
    """diffusers' own tolerance between batch sizes on CPU: at most 1 level of 255, >= 99.9% identical."""
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1, f"max difference {difference.max()}"
    assert (difference == 0).mean() >= 0.999, f"only {(difference == 0).mean():.5f} of pixels identical"


def read_image(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def recording_actor(worker: type, seconds_per_batch: float = 0.0) -> type:
    """``worker`` that also records, per row, the process id of the actor that ran the row.

    ``seconds_per_batch`` stands for the model work a real batch costs (seconds on a GPU):
    a tiny model's batch takes milliseconds, so one actor could finish a small job before
    a second one has started, and the test would measure actor start-up, not the blocks.
    Defined in a function, the class travels to the actors by value: tests/ need not be
    importable there.
    """

    class Recording(worker):
        def __call__(self, batch):
            import time

            time.sleep(seconds_per_batch)
            batch = super().__call__(batch)
            batch["actor_pid"] = np.full(len(batch["id"]), os.getpid())
            return batch

    Recording.__name__ = Recording.__qualname__ = f"Recording{worker.__name__}"
    return Recording
