"""Opt-in speed: --compile (regional torch.compile of the denoiser's blocks) and --attention-backend.

Unit tests build workers without Ray. Compiling with inductor on CPU takes ~75 s for a tiny
model, so these compile with torch's ``eager`` backend (the same tracing, regions,
warm-ups and counting); tests/gpu compiles with inductor.
"""

import numpy as np
import pytest

from helpers import assert_images_match, write_prompts

COMPILE_BACKEND = "eager"


@pytest.fixture
def restore_attention_backend():
    """diffusers keeps the last backend set as the process's active one: give the next tests the default back."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    yield
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def batch_of(rows: int, height: int = 32) -> dict:
    return {
        "prompt": np.array([f"a red circle {row}" for row in range(rows)], dtype=object),
        "negative_prompt": np.array([""] * rows, dtype=object), "seed": np.arange(rows) + 1,
        "num_inference_steps": np.array([2] * rows), "guidance_scale": np.array([3.5] * rows),
        "height": np.array([height] * rows), "width": np.array([32] * rows),
    }


def counts(batch: dict) -> dict:
    from workers.runtime.columns import pop_counts

    return {name: value for name, value in pop_counts(batch).items() if name.startswith("compile_")}


def test_compiled_blocks_with_an_attention_backend_draw_the_same_images_and_count_their_compiles(model_cache, restore_attention_backend):
    import torch

    from workers.generation.fused import FusedGenerationWorker

    plain = FusedGenerationWorker("tiny-flux", threads=1)
    fast = FusedGenerationWorker("tiny-flux", threads=1, compile_backend=COMPILE_BACKEND, attention_backend="_native_math")
    transformer = fast.denoiser.pipe.transformer
    # 1. every repeated block compiled (diffusers' regions), its attention on the backend asked for
    blocks = [module for module in transformer.modules() if type(module).__name__ in transformer._repeated_blocks]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert {block.attn.processor._attention_backend for block in blocks} == {"_native_math"}
    assert plain.denoiser.pipe.transformer is not transformer and plain.denoiser.speed.pop_counts(2) == {}

    # 2. the same images, within diffusers' own tolerance; the first call of a shape is a warm-up, not a recompile
    expected, first = plain(batch_of(2))["image"], fast(batch_of(2))
    for actual, wanted in zip(first["image"], expected):
        assert_images_match(actual, wanted)
    warmed = counts(first)
    assert warmed["compile_graphs"] > 0 and warmed["compile_recompiles"] == 0 and warmed["compile_warmup_microseconds"] > 0
    # 3. the same shape again: nothing compiles; a new shape (rows, size) is warmed once, again no recompile
    assert counts(fast(batch_of(2))) == {"compile_graphs": 0, "compile_recompiles": 0, "compile_warmup_microseconds": 0}
    other = counts(fast(batch_of(1, height=48)))
    assert other["compile_warmup_microseconds"] > 0 and other["compile_recompiles"] == 0
    assert torch.get_num_threads() >= 1


def test_blocks_are_found_where_the_model_declares_none(model_cache):
    """SD3's transformer declares no _repeated_blocks: the blocks repeated in its ModuleLists, outermost only."""
    from workers.runtime.models import ModelDirectory
    from workers.runtime.speed import repeated_blocks

    sd3 = ModelDirectory("tiny-sd3").component_class("transformer")
    config = sd3.load_config(ModelDirectory("tiny-sd3").path + "/transformer")
    transformer = sd3.from_config(config)
    assert not getattr(transformer, "_repeated_blocks", None)
    blocks = repeated_blocks(transformer)
    assert {type(block).__name__ for block in blocks} == {"JointTransformerBlock"}
    assert len(blocks) == len(transformer.transformer_blocks)


@pytest.mark.parametrize(("model", "backend", "message"), [
    ("tiny-flux", "flash_hub", "attention_backend: 'flash_hub' downloads its kernels from the Hugging Face Hub"),
    ("tiny-flux", "flash", "attention_backend: 'flash' is not installed"),
    ("tiny-flux", "fastest", "attention_backend: unknown backend 'fastest'"),
    ("tiny", "native", "attention_backend: sd models' attention does not go through diffusers' attention dispatcher"),
])
def test_an_attention_backend_the_job_cannot_use_exits_2_before_any_model_loads(tmp_path, model_cache, capsys, monkeypatch,
                                                                                 model, backend, message):
    from jobs.generate import main
    from workers.runtime.models import ModelDirectory

    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": "a", "prompt": "a cat"}])
    monkeypatch.setattr(ModelDirectory, "pipeline", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    assert main(["--prompts", prompts, "--output", str(tmp_path / "out"), "--model", model, "--attention-backend", backend]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_gpu_only_backend_on_a_cpu_denoiser_is_refused_and_the_flags_reach_the_denoiser(tmp_path, model_cache):
    from pipelines.generation.generate import plan_generation
    from pipelines.runtime.config import GenerateConfig, StageOptions
    from pipelines.runtime.placement import ClusterShape

    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": "a", "prompt": "a cat"}])

    def plan(**options):
        return plan_generation(GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny-flux", **options))

    with pytest.raises(ValueError, match="attention_backend: '_native_cudnn' needs a GPU; the denoiser runs on CPU"):
        plan(attention_backend="_native_cudnn").model_stages("fused", ClusterShape(cpus=8, gpus=0))
    split = plan(attention_backend="_native_cudnn", compile=True, placement="split", stages={"text_encoder": StageOptions(num_gpus=0)})
    stages = {stage.name: stage.constructor_kwargs for stage in split.model_stages("split", ClusterShape(cpus=16, gpus=1))}
    assert (stages["denoiser"]["compile_backend"], stages["denoiser"]["attention_backend"]) == ("inductor", "_native_cudnn")
    assert "compile_backend" not in stages["text_encoder"] and "attention_backend" not in stages["vae_decoder"]
    with pytest.raises(ValueError, match="compile: must be true or false"):
        GenerateConfig(prompts=prompts, output="out", compile="yes")
