"""Train the built-in demo model: ``python -m jobs.train_demo --output DIR``.

The model is trained with latentray's own latent-dataset job, in stages, each writing
under DIR (a local folder) and recording its figures and wall time in DIR/training.json:

    1. corpus    procedural shapes -> DIR/corpus/train/ and DIR/corpus/validation/ (Parquet image tables)
    2. vae       AutoencoderKL on the training images, PSNR on the validation images; saved with a
                 frozen text encoder as the diffusers directory DIR/vae/ that `latentray encode` reads
    3. encode    `latentray encode` (pipelines.encoding.encode on an embedded Ray) -> DIR/latents/
                 (latents and caption embeddings)
    4. unet      UNet2DConditionModel on DIR/latents/, read in shuffled batches with pipelines.LatentDataset,
                 captions dropped for classifier-free guidance -> DIR/unet/ (averaged weights); checkpoints
                 to DIR/unet-checkpoint.pt, from which a restarted stage resumes mid-epoch
    5. export    DIR/model/: a standard StableDiffusionPipeline directory; DIR/loss_curves.png
    6. evaluate  `latentray generate` on prompts of every colour and shape -> DIR/evaluation/,
                 prompt adherence (seen and held-out combinations) -> DIR/evaluation/adherence.json

Every seed is fixed. ``--scale smoke`` runs every stage in about a minute at toy size
(the same architecture and batch sizes, few images and steps) and writes, beside its
own figures, the wall time the full scale should take from the step times it measured.
``--from-stage`` reruns from a stage, reusing what earlier stages left in DIR.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace

from pipelines.demo.procedural import DEFAULT_HELD_OUT, ShapesCorpusConfig
from pipelines.runtime import io
from workers.demo.architecture import DemoArchitecture
from workers.runtime.presets import RECOMMENDED_GUIDANCE

logger = logging.getLogger("latentray.train_demo")

STAGES = ("corpus", "vae", "encode", "unet", "export", "evaluate")
LOSS_POINTS = 100  # per loss curve: each the mean loss over a window of steps


@dataclass(frozen=True, kw_only=True)
class TrainingScale:
    """How much data and how many steps; the architecture and batch sizes never change with it."""

    train_images: int
    validation_images: int
    vae_steps: int
    unet_steps: int
    evaluation_prompts_per_combination: int


SCALES = {
    "smoke": TrainingScale(train_images=64, validation_images=16, vae_steps=6, unet_steps=6, evaluation_prompts_per_combination=1),
    # From step times measured on 2 free cores (VAE ~0.2 s/step on 32x32 crops of a batch of 32,
    # 0.6 s on whole images; U-Net 0.35-0.5 s/step at batch 64): about 20 + 25 minutes of training.
    "full": TrainingScale(train_images=20000, validation_images=512, vae_steps=6000, unet_steps=3500, evaluation_prompts_per_combination=8),
}


@dataclass(kw_only=True)
class TrainDemoConfig:
    output: str  # local folder
    scale: str = "full"
    seed: int = 0
    threads: int = 2  # torch threads for training
    from_stage: str = "corpus"
    held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT
    architecture: DemoArchitecture = field(default_factory=DemoArchitecture)
    # None: the scale's figure
    train_images: int | None = None
    vae_steps: int | None = None
    unet_steps: int | None = None
    guidance: float = RECOMMENDED_GUIDANCE["demo"]  # of the evaluation: what `latentray demo` uses
    evaluation_steps: int = 20
    address: str | None = None  # Ray cluster for encode and evaluate; None: embedded

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output.strip():
            raise ValueError("output: must be a non-empty path")
        if not io.is_local(self.output):
            raise ValueError(f"output: must be a local folder (diffusers saves models locally), got {self.output!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale: must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.from_stage not in STAGES:
            raise ValueError(f"from_stage: must be one of {', '.join(STAGES)}, got {self.from_stage!r}")
        for name in ("threads", "evaluation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.guidance < 0:
            raise ValueError(f"guidance: must be >= 0, got {self.guidance}")
        for name in ("train_images", "vae_steps", "unet_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed: must be between 0 and 2**31-1, got {self.seed}")
        self.output = io.filesystem(self.output)[1]  # a plain local path: diffusers and torch open it

    @property
    def sizes(self) -> TrainingScale:
        base = SCALES[self.scale]
        overrides = {name: getattr(self, name) for name in ("train_images", "vae_steps", "unet_steps") if getattr(self, name)}
        return replace(base, **overrides)

    def path(self, *parts: str) -> str:
        return os.path.join(self.output, *parts)

    def corpus(self, split: str) -> ShapesCorpusConfig:
        """Training images avoid the held-out combinations; validation images draw from every combination."""
        if split == "train":
            return ShapesCorpusConfig(count=self.sizes.train_images, seed=self.seed, split="train", held_out=self.held_out)
        return ShapesCorpusConfig(count=self.sizes.validation_images, seed=self.seed + 1, split="all", held_out=self.held_out)


# -- the record -----------------------------------------------------------------------------------


class TrainingRecord:
    """DIR/training.json: each stage's figures and wall time, rewritten after every stage."""

    def __init__(self, config: TrainDemoConfig):
        self.uri = config.path("training.json")
        previous = io.read_json(self.uri) or {}
        # stages before --from-stage keep what their own run recorded
        kept = {name: value for name, value in previous.get("stages", {}).items() if STAGES.index(name) < STAGES.index(config.from_stage)}
        self.data = {"config": _jsonable(asdict(config)), "sizes": asdict(config.sizes), "stages": kept}

    def stage(self, name: str, seconds: float, figures: dict) -> None:
        self.data["stages"][name] = {"wall_seconds": round(seconds, 2), **figures}
        io.write_json(self.uri, self.data)

    def add(self, key: str, value) -> None:
        self.data[key] = value
        io.write_json(self.uri, self.data)


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


# -- stages ---------------------------------------------------------------------------------------


def stage_corpus(config: TrainDemoConfig) -> dict:
    from pipelines.demo.procedural import write_corpus

    figures = {}
    for split in ("train", "validation"):
        folder = config.path("corpus", split)
        io.remove_tree(folder)  # a smaller corpus must not keep a larger one's parts
        started = time.perf_counter()
        parts = write_corpus(config.corpus(split), folder)
        figures[split] = {"images": config.corpus(split).count, "parts": len(parts), "seconds": round(time.perf_counter() - started, 2)}
    total = sum(split["images"] for split in figures.values())
    figures["seconds_per_image"] = round(sum(split["seconds"] for split in figures.values()) / total, 5)
    return figures


def load_corpus_images(uri: str):
    """uint8 (N, H, W, 3) tensor of every image of a corpus folder, in id order."""
    import io as bytes_io

    import numpy as np
    import torch
    from PIL import Image

    table = io.read_parquet_columns(uri, ["id", "image"]).sort_by("id")
    pixels = [np.asarray(Image.open(bytes_io.BytesIO(data)).convert("RGB")) for data in table.column("image").to_pylist()]
    return torch.from_numpy(np.stack(pixels))


def stage_vae(config: TrainDemoConfig) -> dict:
    from pipelines.demo.procedural import caption_words
    from workers.demo import architecture as demo
    from workers.demo.training import VaeTrainingConfig, latent_scaling_factor, reconstruction_psnr, train_vae

    architecture = config.architecture
    train_images = load_corpus_images(config.path("corpus", "train"))
    validation_images = load_corpus_images(config.path("corpus", "validation"))

    # 1. train, then measure on images it never saw
    vae = demo.build_vae(architecture, seed=config.seed)
    steps = config.sizes.vae_steps
    log = train_vae(vae, train_images, VaeTrainingConfig(steps=steps, seed=config.seed, log_every=max(1, steps // LOSS_POINTS)))
    psnr = reconstruction_psnr(vae, validation_images)

    # 2. SD's rule: scale latents to unit variance for the U-Net
    scaling_factor = latent_scaling_factor(vae, train_images[:2048])
    vae.register_to_config(scaling_factor=scaling_factor)

    # 3. the directory `latentray encode` reads: this VAE, the frozen text encoder, an untrained U-Net
    tokenizer = demo.caption_tokenizer(caption_words(), architecture.max_tokens)
    pipeline = demo.assemble_pipeline(
        vae=vae, text_encoder=demo.build_text_encoder(architecture, tokenizer, seed=config.seed + 2),
        tokenizer=tokenizer, unet=demo.build_unet(architecture, seed=config.seed + 3), scheduler=demo.build_scheduler(),
    )
    demo.save_pipeline(pipeline, config.path("vae"))
    return {"psnr": psnr, "scaling_factor": round(scaling_factor, 5), "training": log.to_dict()}


# Ray for one stage (encode, evaluate): the caller's connection, so that this package does not
# import jobs/ (jobs/train_demo.py passes one that joins --address or embeds a Ray it stops afterwards)
RaySession = Callable[[TrainDemoConfig], AbstractContextManager]


def stage_encode(config: TrainDemoConfig, ray_session: RaySession) -> dict:
    from pipelines.encoding.encode import run_encoding
    from pipelines.runtime.config import EncodeConfig

    encode_config = EncodeConfig(
        images=config.path("corpus", "train"), output=config.path("latents"), model=config.path("vae"),
        resolution=config.architecture.image_size, caption_column="caption", text_embeddings=True,
        # float32: the U-Net trains on exactly what the encoders computed
        sample="mean", latent_dtype="float32", overwrite=True,
    )
    with ray_session(config):
        record = run_encoding(encode_config)
    if record["status"] != "complete":
        raise RuntimeError(f"encode: the run did not complete: {record['counts']}")
    # the stored latents should have a standard deviation near 1 (the scaling factor's purpose)
    stats = io.read_json(config.path("latents", "latent_stats.json")) or {}
    return {
        **{key: record.get(key) for key in ("counts", "images_per_second", "stage_busy_seconds", "placement")},
        "encode_wall_seconds": record.get("wall_seconds"),  # the job's own; the stage's also counts starting Ray
        "latent_stats": {key: stats.get(key) for key in ("all_channels", "mean", "std", "warnings")},
    }


UNET_BATCH_SIZE = 64
UNET_CHECKPOINT = "unet-checkpoint.pt"  # in DIR while the U-Net stage runs; a restart resumes from it


def unet_batches(config: TrainDemoConfig):
    """The encode output through latentray's reader: shuffled batches, a new order every epoch, resumable."""
    from pipelines import LatentDataset

    return LatentDataset(config.path("latents"), columns=["latent", "prompt_embeds"], batch_size=UNET_BATCH_SIZE,
                         shuffle=True, seed=config.seed, drop_last=True)


def stage_unet(config: TrainDemoConfig) -> dict:
    """Train the U-Net; killed mid-way, ``--from-stage unet`` continues from the last checkpoint (mid-epoch)."""
    import torch

    from workers.demo import architecture as demo
    from workers.demo.training import UnetTrainingConfig, train_unet
    from workers.generation.text_encoder import TextEncoderWorker

    batches = unet_batches(config)
    # the unconditional embedding exactly as generation computes it for an empty negative prompt
    empty = torch.from_numpy(TextEncoderWorker(config.path("vae"), threads=config.threads).embed([""])[0]).float()
    unet = demo.build_unet(config.architecture, seed=config.seed + 3)
    steps = config.sizes.unet_steps
    checkpoint = config.path(UNET_CHECKPOINT)
    averaged, log = train_unet(unet, batches, empty, demo.build_scheduler().alphas_cumprod,
                               UnetTrainingConfig(steps=steps, seed=config.seed, log_every=max(1, steps // LOSS_POINTS)),
                               checkpoint=checkpoint)
    averaged.save_pretrained(config.path("unet"), safe_serialization=True)
    io.remove_tree(checkpoint)  # done: a later run of the stage trains afresh
    return {"rows": batches.rows, "batches_per_epoch": len(batches), "epochs": round(steps / len(batches), 2), "training": log.to_dict()}


def stage_export(config: TrainDemoConfig, stages: dict) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from workers.demo import architecture as demo
    from workers.runtime.models import ModelDirectory

    frozen = ModelDirectory(config.path("vae")).pipeline(("vae", "text_encoder", "tokenizer"), torch.device("cpu"), torch.float32)
    pipeline = demo.assemble_pipeline(
        vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer,
        unet=UNet2DConditionModel.from_pretrained(config.path("unet"), use_safetensors=True, local_files_only=True),
        scheduler=demo.build_scheduler(),
    )
    target = config.path("model")
    io.remove_tree(target)
    demo.save_pipeline(pipeline, target)
    io.write_bytes(config.path("loss_curves.png"), _loss_curves_png(stages))
    return {"model_bytes": sum(_file_sizes(target).values()), "component_bytes": _component_sizes(target)}


def _loss_curves_png(stages: dict) -> bytes:
    """From the record: a stage skipped by --from-stage kept the losses of the run that trained it."""
    from pipelines.demo.loss_curves import render_loss_curves

    titles = {"vae": "VAE: L1 + MSE + KL (mean per logging window)", "unet": "U-Net: noise-prediction MSE (mean per logging window)"}
    return render_loss_curves({title: stages.get(name, {}).get("training", {}).get("losses", []) for name, title in titles.items()})


def _file_sizes(uri: str) -> dict[str, int]:
    fs, path = io.filesystem(uri)
    return fs.du(path, total=False)


def _component_sizes(model_uri: str) -> dict[str, int]:
    """Bytes per component folder of a diffusers directory."""
    root = io.filesystem(model_uri)[1].rstrip("/") + "/"
    sizes: dict[str, int] = {}
    for path, size in _file_sizes(model_uri).items():
        relative = path.removeprefix(root)
        if "/" in relative:
            component = relative.split("/", 1)[0]
            sizes[component] = sizes.get(component, 0) + size
    return dict(sorted(sizes.items()))


def write_table(table, uri: str) -> None:
    """One Parquet file at ``uri``, written whole through pipelines.runtime.io."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    io.write_bytes(uri, sink.getvalue().to_pybytes())


def stage_evaluate(config: TrainDemoConfig, ray_session: RaySession) -> dict:
    from pipelines.demo.adherence import score_generation
    from pipelines.demo.procedural import evaluation_prompts
    from pipelines.generation.generate import run_generation
    from pipelines.runtime.config import GenerateConfig

    prompts_uri = config.path("evaluation", "prompts.parquet")
    write_table(evaluation_prompts(config.held_out, config.sizes.evaluation_prompts_per_combination), prompts_uri)
    generated = config.path("evaluation", "generated")
    with ray_session(config):
        record = run_generation(GenerateConfig(
            prompts=prompts_uri, output=generated, model=config.path("model"), steps=config.evaluation_steps,
            guidance=config.guidance, seed=config.seed, overwrite=True,
        ))
    summary, per_image = score_generation(generated, config.held_out)
    io.write_json(config.path("evaluation", "adherence.json"), summary)
    write_table(per_image, config.path("evaluation", "adherence.parquet"))
    return {"adherence": summary, "generation_wall_seconds": record["wall_seconds"]}


# -- the run --------------------------------------------------------------------------------------


def estimate_full_scale(record: dict) -> dict:
    """Seconds the full scale should take per stage, from the step and image times this run measured."""
    full, stages = SCALES["full"], record["stages"]
    estimate = {}
    if "corpus" in stages:
        estimate["corpus"] = stages["corpus"]["seconds_per_image"] * (full.train_images + full.validation_images)
    vae_training = stages.get("vae", {}).get("training", {})
    if vae_training.get("steps"):
        # the mean, not the median: crop steps and whole-image steps differ ~3x in cost
        estimate["vae"] = vae_training["seconds"] / vae_training["steps"] * full.vae_steps
    encode = stages.get("encode", {})
    encoded = (encode.get("counts") or {}).get("encoded_this_run")
    if encoded:
        # start-up (Ray, actors, model loading) once, then the encoders' time per row
        busy = sum((encode.get("stage_busy_seconds") or {}).values())
        estimate["encode"] = encode["wall_seconds"] - busy + busy / encoded * full.train_images
    if "unet" in stages and stages["unet"]["training"]["seconds_per_step"]:
        estimate["unet"] = stages["unet"]["training"]["seconds_per_step"] * full.unet_steps
    return {name: round(seconds) for name, seconds in estimate.items()}


def run(config: TrainDemoConfig, ray_session: RaySession) -> dict:
    import torch

    torch.set_num_threads(config.threads)
    record = TrainingRecord(config)
    for name in STAGES[STAGES.index(config.from_stage):]:
        logger.info("stage %s", name)
        started = time.perf_counter()
        figures = run_stage(name, config, record.data["stages"], ray_session)
        record.stage(name, time.perf_counter() - started, figures)
        logger.info("stage %s done in %.1f s", name, time.perf_counter() - started)
    record.add("estimated_full_scale_seconds", estimate_full_scale(record.data))
    return record.data


def run_stage(name: str, config: TrainDemoConfig, stages: dict, ray_session: RaySession) -> dict:
    """One stage's figures; ``stages`` are the figures recorded so far (export draws their loss curves)."""
    if name == "export":
        return stage_export(config, stages)
    if name in ("encode", "evaluate"):
        return STAGE_FUNCTIONS[name](config, ray_session)
    return STAGE_FUNCTIONS[name](config)


STAGE_FUNCTIONS = {"corpus": stage_corpus, "vae": stage_vae, "encode": stage_encode, "unet": stage_unet, "evaluate": stage_evaluate}
