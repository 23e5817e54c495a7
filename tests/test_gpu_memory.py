"""GPU memory on the driver's and the workers' side, checked without a GPU: each actor's share and
its cap, weights loaded straight to the device, per-stage device, dtype, share and peak in run.json.
tests/gpu checks the same on CUDA."""

import numpy as np
import pytest
import torch

from helpers import write_prompts
from pipelines.runtime.placement import ClusterShape


def test_an_actor_caps_its_memory_to_its_share_of_a_gpu_and_only_then(monkeypatch):
    from workers.runtime.memory import cap_gpu_memory

    caps = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, *args: caps.append(fraction))
    cap_gpu_memory("cuda", 0.7)
    for device, share in (("cuda", 1.0), ("cuda", None), ("cuda", 2.0), ("cpu", 0.5)):
        cap_gpu_memory(device, share)  # a whole GPU, none, or CPU: no cap
    assert caps == [0.7]


def test_weights_load_straight_to_the_gpu_and_where_they_are_used_on_cpu():
    from workers.runtime.models import device_arguments

    assert device_arguments(torch.device("cuda")) == {"device_map": "cuda"}
    assert device_arguments(torch.device("cpu")) == {}


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-sdxl"])
def test_loading_through_device_map_as_on_cuda_draws_the_same_images(preset, model_cache, monkeypatch):
    """The CUDA load path (``device_map``), taken here to the CPU: same weights, same images, split stages included."""
    from workers.generation.denoiser import DenoiserWorker
    from workers.generation.fused import FusedGenerationWorker
    from workers.runtime import models

    batch = {
        "prompt": np.array(["a red circle"], dtype=object), "negative_prompt": np.array(["blurry"], dtype=object),
        "seed": np.array([1]), "num_inference_steps": np.array([2]), "guidance_scale": np.array([4.0]),
        "height": np.array([32]), "width": np.array([32]),
    }
    expected = FusedGenerationWorker(preset, threads=1)(dict(batch))["image"]
    monkeypatch.setattr(models, "device_arguments", lambda device: {"device_map": "cpu"})
    assert np.array_equal(FusedGenerationWorker(preset, threads=1)(dict(batch))["image"], expected)
    assert DenoiserWorker(preset, threads=1).pipe.text_encoder is None  # a split stage's pipeline loads too


def test_stages_get_their_gpu_share_and_run_json_describes_each_stage(tmp_path, model_cache):
    from pipelines.generation.generate import plan_generation
    from pipelines.runtime.config import GenerateConfig, StageOptions
    from pipelines.runtime.job import stage_record

    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": "a", "prompt": "a cat"}])
    config = GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny-flux", placement="split",
                            stages={"vae_decoder": StageOptions(num_gpus=0)})
    stages = plan_generation(config).model_stages("split", ClusterShape(cpus=16, gpus=1))
    records = {stage.name: stage_record(stage) for stage in stages}
    # FLUX's split: T5-XXL takes a quarter of the GPU, the transformer 0.65; the VAE was moved to CPU by the user
    assert {name: (record["device"], record["dtype"], record["gpu_share"]) for name, record in records.items()} == {
        "text_encoder": ("cuda", "bfloat16", 0.25), "denoiser": ("cuda", "bfloat16", 0.65), "vae_decoder": ("cpu", "float32", None),
    }
    assert records["denoiser"]["num_gpus"] == 0.65 and records["denoiser"]["batch_size"] == 8


def test_peaks_are_maxima_across_batches_and_null_where_not_measured():
    from pipelines.runtime.job import RunTotals, part_summary, peak_memory_per_stage
    from workers.runtime.columns import pop_counts

    batch = {"count_peak_gpu_memory_bytes_denoiser": np.array([3 * 2**30, 0]), "count_texts_encoded": np.array([2, 1])}
    assert pop_counts(batch) == {"peak_gpu_memory_bytes_denoiser": 3 * 2**30, "texts_encoded": 3} and batch == {}
    totals = RunTotals()
    for peak in (3 * 2**30, 2**30):
        totals.add(part_summary(ok_rows=1, error_rows=0, busy={"denoiser": 1.0, "text_encoder": 0.5},
                                counts={"peak_gpu_memory_bytes_denoiser": peak, "texts_encoded": 1}))
    assert totals.counts == {"peak_gpu_memory_bytes_denoiser": 3 * 2**30, "texts_encoded": 2}
    assert peak_memory_per_stage(totals.counts, totals.busy_seconds) == {"denoiser": 3.0, "text_encoder": None}


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_a_compiled_job_on_ray_records_its_compiles_stages_and_memory(ray_session, tmp_path, monkeypatch):
    """One small job end to end: --compile and --attention-backend reach the actor; run.json says what ran where."""
    import json

    from jobs.generate import main

    import pipelines.generation.generate as generate

    monkeypatch.setattr(generate, "DEFAULT_COMPILE_BACKEND", "eager")  # inductor on CPU: ~75 s for a tiny model
    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": f"r{row}", "prompt": f"a red circle {row}"} for row in range(2)])
    output = tmp_path / "out"
    assert main(["--prompts", prompts, "--output", str(output), "--model", "tiny-flux", "--steps", "2", "--height", "32", "--width", "32",
                 "--batch-size", "2", "--placement", "fused", "--compile", "--attention-backend", "_native_math"]) == 0
    record = json.loads((output / "run.json").read_text())
    assert record["status"] == "complete" and record["config"]["attention_backend"] == "_native_math"
    assert record["compile"]["graphs_compiled"] > 0 and record["compile"]["recompiles"] == 0 and record["compile"]["warmup_seconds"] > 0
    fused = record["stages"]["fused"]
    assert (fused["device"], fused["dtype"], fused["gpu_share"]) == ("cpu", "float32", None)
    # on CPU no GPU memory is measured: null for every stage, never 0
    assert record["peak_gpu_memory_gib"] == {"text_encoder": None, "denoiser": None, "vae_decoder": None}
