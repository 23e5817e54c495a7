"""GPU checks: run where CUDA is present, skipped elsewhere (no machine here has a GPU)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_workers_pick_cuda_in_half_precision():
    from workers.runtime.devices import pick_device

    device, dtype = pick_device()
    assert device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def test_half_precision_images_stay_close_to_float32(tiny_model_dir):
    from workers.generation.fused import FusedGenerationWorker

    batch = {
        "prompt": np.array(["a red circle"], dtype=object), "negative_prompt": np.array([""], dtype=object),
        "seed": np.array([1]), "num_inference_steps": np.array([10]), "guidance_scale": np.array([7.5]),
        "height": np.array([64]), "width": np.array([64]),
    }
    half = FusedGenerationWorker(tiny_model_dir)(dict(batch))["image"][0].astype(int)
    full = FusedGenerationWorker(tiny_model_dir, dtype="float32")(dict(batch))["image"][0].astype(int)
    assert np.abs(half - full).mean() < 8  # same seed, same picture up to rounding in fp16


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-zimage", "tiny-qwenimage", "tiny-flux2-dev"])
def test_every_family_runs_in_half_precision_on_cuda(preset, model_cache):
    """Each family's stages on CUDA in fp16/bf16: the same picture as float32, up to half-precision rounding."""
    from workers.generation.fused import FusedGenerationWorker

    batch = {
        "prompt": np.array(["a red circle"], dtype=object), "negative_prompt": np.array(["blurry"], dtype=object),
        "seed": np.array([1]), "num_inference_steps": np.array([6]), "guidance_scale": np.array([4.0]),
        "height": np.array([64]), "width": np.array([64]),
    }
    half = FusedGenerationWorker(preset)(dict(batch))["image"][0].astype(int)
    full = FusedGenerationWorker(preset, dtype="float32")(dict(batch))["image"][0].astype(int)
    assert np.abs(half - full).mean() < 8


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_loaded_module_is_on_cuda_in_the_dtype_the_driver_resolved(tiny_model_dir, dtype):
    from workers.generation.fused import FusedGenerationWorker

    worker = FusedGenerationWorker(tiny_model_dir, device="cuda", dtype=dtype)
    pipe = worker.denoiser.pipe
    upcast = dtype == "float16" and pipe.vae.config.force_upcast
    for name in ("text_encoder", "unet", "vae"):
        expected = torch.float32 if name == "vae" and upcast else getattr(torch, dtype)
        assert {(p.device.type, p.dtype) for p in getattr(pipe, name).parameters()} == {("cuda", expected)}, name


def test_a_real_cuda_out_of_memory_error_is_recognised_and_halved():
    from workers.runtime.memory import run_in_halves

    def compute(rows):
        if len(rows) > 1:
            torch.empty(2**50, dtype=torch.uint8, device="cuda")  # a petabyte: CUDA's own out-of-memory error
        return rows

    run = run_in_halves([0, 1], compute)
    assert run.outputs == {0: 0, 1: 1} and run.splits == 1 and run.failed == []


def test_an_actor_given_a_fraction_of_the_gpu_cannot_take_more(tiny_model_dir):
    """Split placement on one GPU: a worker with gpu_share caps its process, so it gets the
    out-of-memory error rather than starving its neighbours."""
    from workers.generation.vae_decoder import VaeDecoderWorker

    VaeDecoderWorker(tiny_model_dir, device="cuda", dtype="bfloat16", gpu_share=0.02)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(total * 0.05), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_models_load_straight_to_the_gpu_and_batches_record_their_peak(tiny_model_dir):
    from workers.generation.fused import FusedGenerationWorker
    from workers.runtime.columns import pop_counts

    worker = FusedGenerationWorker(tiny_model_dir, device="cuda", dtype="bfloat16")
    modules = (worker.denoiser.pipe.unet, worker.denoiser.pipe.text_encoder, worker.denoiser.pipe.vae)
    assert {(p.device.type, p.dtype) for module in modules for p in module.parameters()} == {("cuda", torch.bfloat16)}
    batch = {
        "prompt": np.array(["a red circle"], dtype=object), "negative_prompt": np.array([""], dtype=object),
        "seed": np.array([1]), "num_inference_steps": np.array([4]), "guidance_scale": np.array([7.5]),
        "height": np.array([64]), "width": np.array([64]),
    }
    counts = pop_counts(worker(batch))
    assert all(counts[f"peak_gpu_memory_bytes_{stage}"] > 0 for stage in ("text_encoder", "denoiser", "vae_decoder"))


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny"])
def test_inductor_compiled_blocks_draw_the_same_images_on_cuda(preset, model_cache):
    """--compile with the real backend (inductor) and a cuDNN attention where the family dispatches attention."""
    from workers.generation.fused import FusedGenerationWorker

    batch = {
        "prompt": np.array(["a red circle", "a blue square"], dtype=object), "negative_prompt": np.array(["", ""], dtype=object),
        "seed": np.array([1, 2]), "num_inference_steps": np.array([4, 4]), "guidance_scale": np.array([4.0, 4.0]),
        "height": np.array([64, 64]), "width": np.array([64, 64]),
    }
    attention = "_native_cudnn" if preset == "tiny-flux" else None
    eager = FusedGenerationWorker(preset, device="cuda", dtype="bfloat16")(dict(batch))["image"].astype(int)
    compiled = FusedGenerationWorker(preset, device="cuda", dtype="bfloat16", compile_backend="inductor", attention_backend=attention)
    first = compiled(dict(batch))
    assert np.abs(first["image"].astype(int) - eager).mean() < 2  # bf16 kernels differ by rounding only
    assert first["count_compile_graphs"].sum() > 0 and first["count_compile_recompiles"].sum() == 0
    again = compiled(dict(batch))
    assert again["count_compile_graphs"].sum() == 0
