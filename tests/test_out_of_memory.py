"""Out-of-memory recovery, worker-level (no Ray): a ``torch.cuda.OutOfMemoryError`` injected in the
model call, as CUDA raises it, halves the batch; rows that succeed are unchanged (byte-equal to
an uninjected run in the same batches); a row that never fits fails alone, with its stage and reason."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.generation.images import write_generated_images
from pipelines.runtime.job import RunTotals, oom_splits_per_stage, part_summary
from workers.generation.denoiser import DenoiserWorker
from workers.generation.text_encoder import TextEncoderWorker
from workers.generation.vae_decoder import VaeDecoderWorker
from workers.runtime import memory
from workers.runtime.columns import FAILED_CODE_COLUMN, FAILED_REASON_COLUMN, FAILED_STAGE_COLUMN, pop_counts
from workers.runtime.memory import run_in_halves

STEPS = 2


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def prompt_batch(sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    rows = len(sizes)
    return {
        "id": np.array([f"r{index}" for index in range(rows)], dtype=object),
        "prompt": np.array([f"shape number {index}" for index in range(rows)], dtype=object),
        "negative_prompt": np.array([""] * rows, dtype=object), "seed": np.arange(10, 10 + rows),
        "num_inference_steps": np.full(rows, STEPS), "guidance_scale": np.full(rows, 5.0),
        "height": np.array([height for height, _ in sizes]), "width": np.array([width for _, width in sizes]),
    }


def splits(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Batch halvings per stage that halved at least once."""
    return oom_splits_per_stage(pop_counts(dict(batch)))


def subset(batch: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    return {column: values[rows] for column, values in batch.items()}


def test_halves_run_in_row_order_down_to_the_row_that_never_fits():
    calls = []

    def compute(rows):
        calls.append(rows)
        if len(rows) > 2 or rows == [5]:
            raise oom()
        return [row * 10 for row in rows]

    run = run_in_halves(list(range(6)), compute)
    assert calls == [[0, 1, 2, 3, 4, 5], [0, 1, 2], [0, 1], [2], [3, 4, 5], [3, 4], [5]]
    assert run.outputs == {0: 0, 1: 10, 2: 20, 3: 30, 4: 40} and run.failed == [5] and run.splits == 3
    with pytest.raises(ValueError):  # anything but out-of-memory is not ours to hide
        run_in_halves([0, 1], lambda rows: (_ for _ in ()).throw(ValueError("bad input")))


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    return (TextEncoderWorker(tiny_model_dir, threads=2), DenoiserWorker(tiny_model_dir, threads=2),
            VaeDecoderWorker(tiny_model_dir, threads=2))


@pytest.fixture
def inject_denoiser_oom(workers, monkeypatch):
    """The pipeline's own ``__call__`` raises as CUDA does: above ``limit`` rows, and always at 48 px high."""
    pipeline_class = type(workers[1].pipe)
    original = pipeline_class.__call__
    limit = {"rows": None}

    def call(self, *args, **kwargs):
        if limit["rows"] is not None and (len(kwargs["generator"]) > limit["rows"] or kwargs["height"] == 48):
            raise oom()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", call)
    return limit


def test_denoiser_halves_its_batch_and_sends_the_row_that_never_fits_to_errors(workers, inject_denoiser_oom, tmp_path):
    text_encoder, denoiser, decoder = workers
    sizes = [(32, 32)] * 4 + [(48, 32)]
    embedded = text_encoder(prompt_batch(sizes))

    # 1. uninjected, in the batches the injected run will end up using: rows 0-1, rows 2-3
    reference = [denoiser(subset(embedded, rows))["latents"] for rows in ([0, 1], [2, 3])]

    # 2. injected: 4 rows of one size do not fit, 2 do; the 48 px row never fits
    inject_denoiser_oom["rows"] = 2
    out = denoiser({column: values.copy() for column, values in embedded.items()})
    np.testing.assert_array_equal(np.stack(list(out["latents"][:4])), np.concatenate(reference))
    assert out[FAILED_REASON_COLUMN].tolist() == ["", "", "", "", "out of GPU memory at 32x48"]
    assert out[FAILED_STAGE_COLUMN].tolist()[4] == "denoiser" and out[FAILED_CODE_COLUMN].tolist()[4] == "out_of_memory"
    assert splits(out) == {"denoiser": 1.0}

    # 3. the decoder skips the failed row; the commit writes the others' images, the failed one to errors
    decoded = decoder(out)
    assert decoded["image"][4].size == 0 and decoded["image"][0].shape == (32, 32, 3)
    committed = write_generated_images(dict(decoded), str(tmp_path), "png", 95, keep_latents=False)
    assert committed["image_path"].tolist() == [f"images/r{index}.png" for index in range(4)] + [""]
    assert committed["error_stage"].tolist()[4] == "denoiser"
    assert committed["error_reason"].tolist()[4] == "out of GPU memory at 32x48"
    assert not (tmp_path / "images" / "r4.png").exists()


@pytest.fixture
def latents_batch(workers):
    text_encoder, denoiser, _ = workers
    return denoiser(text_encoder(prompt_batch([(32, 32)] * 4)))


def inject_vae_oom(vae, monkeypatch, limit: int, calls: list[int] | None = None) -> None:
    original = vae.decode

    def decode(latents, *args, **kwargs):
        if calls is not None:
            calls.append(len(latents))
        if len(latents) > limit:
            raise oom()
        return original(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)


def test_vae_decoder_halves_and_micro_batches_leave_images_byte_equal(tiny_model_dir, latents_batch, monkeypatch):
    # 1. uninjected, one row per VAE call
    one_by_one = VaeDecoderWorker(tiny_model_dir, vae_batch_size=1, threads=2)(dict(latents_batch))["image"]
    # 2. micro-batches of 2 rows: the VAE never sees more
    calls: list[int] = []
    paired = VaeDecoderWorker(tiny_model_dir, vae_batch_size=2, threads=2)
    inject_vae_oom(paired.vae, monkeypatch, limit=4, calls=calls)
    paired(dict(latents_batch))
    assert calls == [2, 2]
    # 3. the whole batch at once does not fit: halved down to single rows, images unchanged
    halved = VaeDecoderWorker(tiny_model_dir, threads=2)
    inject_vae_oom(halved.vae, monkeypatch, limit=1)
    out = halved(dict(latents_batch))
    np.testing.assert_array_equal(out["image"], one_by_one)
    assert splits(out) == {"vae_decoder": 3.0}
    assert out[FAILED_REASON_COLUMN].tolist() == [""] * 4


def test_vae_decoder_row_that_never_fits_and_non_finite_image_go_to_errors(tiny_model_dir, latents_batch, monkeypatch, tmp_path):
    decoder = VaeDecoderWorker(tiny_model_dir, vae_batch_size=1, threads=2)
    original = decoder.vae.decode
    latents = latents_batch["latents"]

    def decode(values, *args, **kwargs):
        if torch.equal(values[0], torch.from_numpy(latents[1]) / decoder.vae.config.scaling_factor):
            raise oom()
        decoded = original(values, *args, **kwargs)
        if torch.equal(values[0], torch.from_numpy(latents[2]) / decoder.vae.config.scaling_factor):
            decoded[0][0, 0, 0, 0] = float("nan")  # as an fp16 overflow would leave it
        return decoded

    monkeypatch.setattr(decoder.vae, "decode", decode)
    out = decoder(dict(latents_batch))
    assert out[FAILED_STAGE_COLUMN].tolist() == ["", "vae_decoder", "vae_decoder", ""]
    assert out[FAILED_CODE_COLUMN].tolist() == ["", "out_of_memory", "non_finite_image", ""]
    assert out[FAILED_REASON_COLUMN].tolist()[1:3] == ["out of GPU memory at 32x32", "the decoded image has non-finite values (NaN or infinity)"]
    committed = write_generated_images(dict(out), str(tmp_path), "png", 95, keep_latents=False)
    assert committed["image_path"].tolist() == ["images/r0.png", "", "", "images/r3.png"]
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == ["r0.png", "r3.png"]  # never a black image


def test_text_encoder_row_whose_text_never_fits_fails_and_the_others_are_unchanged(workers, monkeypatch):
    text_encoder = TextEncoderWorker(workers[0].model, threads=2)
    batch = prompt_batch([(32, 32)] * 3)
    batch["prompt"][1] = "a huge prompt"
    expected = {text: text_encoder._encode([text])[0]["prompt_embeds"] for text in batch["prompt"] if text != "a huge prompt"}
    tokenizer, model = text_encoder.pipe.tokenizer, text_encoder.pipe.text_encoder
    huge = tokenizer("a huge prompt", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    original = model.forward

    def forward(input_ids, *args, **kwargs):
        if len(input_ids) > 1 or torch.equal(input_ids.cpu(), huge):
            raise oom()
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    out = text_encoder(batch)
    assert out[FAILED_REASON_COLUMN].tolist() == ["", "out of GPU memory encoding a text of 13 characters", ""]
    assert out[FAILED_STAGE_COLUMN].tolist() == ["", "text_encoder", ""]
    for row in (0, 2):
        np.testing.assert_array_equal(out["prompt_embeds"][row], expected[batch["prompt"][row]])
    assert splits(out) == {"text_encoder": 2.0}  # [0, 1, 2] -> [0, 1] + [2] -> [0] + [1]


def test_vae_encoder_halves_and_a_crop_that_never_fits_goes_to_errors(tiny_model_dir, monkeypatch, tmp_path):
    from pipelines.encoding.latent_output import LatentLayout, commit_latents
    from pipelines.runtime.outputs import RunOutput
    from workers.encoding.vae_encoder import VaeEncoderWorker

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)] + [rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)]

    def batch():
        pixels = np.empty(len(crops), dtype=object)
        pixels[:] = crops
        rows = len(crops)
        return {"id": np.array([f"i{n}" for n in range(rows)], dtype=object), "row": np.arange(rows), "seed": np.arange(rows),
                "pixels": pixels, "source": np.array(["s"] * rows, dtype=object), "content_hash": np.array(["h"] * rows, dtype=object),
                "cache_key": np.array([f"k{n}" for n in range(rows)], dtype=object), "original_size": np.full((rows, 2), 48),
                "crop_top_left": np.zeros((rows, 2), np.int64), "target_size": np.array([crop.shape[:2] for crop in crops])}

    reference = VaeEncoderWorker(tiny_model_dir, sample="sample", flip=True, vae_batch_size=1, threads=2)(batch())
    encoder = VaeEncoderWorker(tiny_model_dir, sample="sample", flip=True, threads=2)
    original = encoder.vae.encode

    def encode(images, *args, **kwargs):
        if len(images) > 1 or images.shape[-2] == 48:
            raise oom()
        return original(images, *args, **kwargs)

    monkeypatch.setattr(encoder.vae, "encode", encode)
    out = encoder(batch())
    for column in ("latent", "latent_flipped"):  # sampled with each row's own generator: equal after retries
        for row in range(4):
            np.testing.assert_array_equal(out[column][row], reference[column][row])
    assert out[FAILED_REASON_COLUMN].tolist() == ["", "", "", "", "out of GPU memory at 32x48"]

    # the commit: four rows to latents/, the fifth to errors/ with its code, no cache key (a rerun retries it)
    layout = LatentLayout(dtype="float32", fixed_shape=False, flip=True, caption=False)
    summary = commit_latents(out, output=RunOutput(str(tmp_path), "latents"), layout=layout, run=1)
    assert (summary["ok_rows"][0], summary["error_rows"][0]) == (4, 1)
    assert oom_splits_per_stage(json.loads(summary["counts"][0])) == {"vae_encoder": 3}
    errors = pd.read_parquet(tmp_path / "errors")
    assert errors[["id", "stage", "code", "reason"]].values.tolist() == [["i4", "vae_encoder", "out_of_memory", "out of GPU memory at 32x48"]]
    assert errors["cache_key"].isna().all()


def test_vae_tiles_images_above_the_threshold_only(tiny_model_dir, latents_batch, monkeypatch):
    decoder = VaeDecoderWorker(tiny_model_dir, threads=2)
    decoder(dict(latents_batch))
    assert not decoder.vae.use_tiling
    monkeypatch.setattr(memory, "TILE_ABOVE_PIXELS", 16 * 16)
    decoder(dict(latents_batch))
    assert decoder.vae.use_tiling


def test_run_totals_sum_oom_splits_per_stage():
    totals = RunTotals()
    for counts in ({"oom_splits_denoiser": 2}, {"oom_splits_denoiser": 1, "oom_splits_vae_decoder": 3, "texts_encoded": 4}, {}):
        totals.add(part_summary(ok_rows=1, error_rows=0, busy={}, counts=counts))
    assert oom_splits_per_stage(totals.counts) == {"denoiser": 3, "vae_decoder": 3}


def test_vae_batch_size_reaches_the_fused_actor_and_other_options_there_are_refused(tmp_path, model_cache):
    from helpers import write_prompts
    from pipelines.generation.generate import build_model_stages, plan_generation
    from pipelines.runtime.config import GenerateConfig, StageOptions
    from pipelines.runtime.placement import ClusterShape

    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": "a", "prompt": "a cat"}])
    cluster = ClusterShape(cpus=8, gpus=1)

    def stages(placement, **vae):
        config = GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny", steps=2,
                                stages={"vae_decoder": StageOptions(**vae)})
        plan = plan_generation(config)
        return {stage.name: stage for stage in build_model_stages(plan.config, plan.model, placement, cluster)}

    assert stages("fused", batch_size=2)["fused"].constructor_kwargs["vae_batch_size"] == 2
    split = stages("split", batch_size=2)["vae_decoder"]
    assert split.constructor_kwargs["vae_batch_size"] == 2 and split.options.batch_size == 2
    with pytest.raises(ValueError, match="vae_decoder runs inside the fused actor here, where only vae_decoder.batch_size applies"):
        stages("fused", num_gpus=0.5)


def out_of_memory_actor(worker: type) -> type:
    """``worker`` whose pipeline raises CUDA's out-of-memory error above one row, and always at 48 px
    high. Defined in a function, the class travels to the actors by value."""

    class OutOfMemory(worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pipeline_class = type(self.denoiser.pipe)
            original = pipeline_class.__call__

            def call(pipe, *call_args, **call_kwargs):
                if len(call_kwargs["generator"]) > 1 or call_kwargs["height"] == 48:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
                return original(pipe, *call_args, **call_kwargs)

            pipeline_class.__call__ = call  # in the actor's process only

    OutOfMemory.__name__ = OutOfMemory.__qualname__ = f"OutOfMemory{worker.__name__}"
    return OutOfMemory


def test_a_job_on_ray_goes_on_past_a_row_that_never_fits_and_records_the_halvings(ray_session, tmp_path):
    from dataclasses import replace

    from helpers import write_prompts
    from pipelines.generation.generate import plan_generation, run_generation
    from pipelines.runtime.config import GenerateConfig

    rows = [{"id": f"r{index}", "prompt": f"shape {index}", "height": 32} for index in range(3)] + [{"id": "tall", "prompt": "tall", "height": 48}]
    prompts = write_prompts(tmp_path / "prompts.parquet", rows)
    plan = plan_generation(GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny", steps=2, height=32, width=32,
                                          batch_size=4, placement="fused"))
    build = plan.model_stages
    plan.model_stages = lambda placement, cluster: [replace(stage, worker=out_of_memory_actor(stage.worker)) for stage in build(placement, cluster)]
    record = run_generation(plan)

    assert record["status"] == "complete" and record["counts"]["ok_rows"] == 3 and record["counts"]["error_rows"] == 1
    assert record["oom_splits"] == {"denoiser": 2}  # [r0, r1, r2] -> [r0, r1] + [r2] -> [r0] + [r1]
    errors = pd.read_parquet(tmp_path / "out" / "errors")
    assert errors[["id", "stage", "reason"]].values.tolist() == [["tall", "denoiser", "out of GPU memory at 32x48"]]
    assert sorted(path.name for path in (tmp_path / "out" / "images").iterdir()) == ["r0.png", "r1.png", "r2.png"]
