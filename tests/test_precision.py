"""Precision: resolved per family and device by the driver (no torch), used exactly by the workers,
part of a run's identity (no Ray: stages are built for a given cluster shape)."""


import pytest
import torch

from helpers import write_prompts
from pipelines.generation.generate import plan_generation
from pipelines.runtime.config import GenerateConfig, StageOptions
from pipelines.runtime.placement import ClusterShape
from workers.families import FAMILIES
from workers.runtime.devices import resolve_dtype

CPU_CLUSTER = ClusterShape(cpus=8, gpus=0)
GPU_CLUSTER = ClusterShape(cpus=16, gpus=1)
TRANSFORMER_FAMILIES = ("sd3", "flux", "zimage", "qwenimage", "flux2-klein", "flux2-dev")


def family(name: str):
    return next(family for family in FAMILIES.values() if family.name == name)


@pytest.mark.parametrize("name", ["sd", "sdxl", *TRANSFORMER_FAMILIES])
def test_dtype_resolves_per_family_and_device(name):
    assert resolve_dtype(family(name), "auto", "cuda") == "bfloat16"
    assert resolve_dtype(family(name), "auto", "cpu") == "float32"
    assert resolve_dtype(family(name), "float32", "cuda") == "float32"
    with pytest.raises(ValueError, match="'bfloat16' needs a GPU; this stage runs on CPU"):
        resolve_dtype(family(name), "bfloat16", "cpu")


def test_float16_is_refused_for_the_families_that_overflow_in_it():
    assert resolve_dtype(family("sd"), "float16", "cuda") == resolve_dtype(family("sdxl"), "float16", "cuda") == "float16"
    for name in TRANSFORMER_FAMILIES:
        with pytest.raises(ValueError, match=f"dtype: float16 overflows in {name} models \\(NaN or black images\\); use bfloat16"):
            resolve_dtype(family(name), "float16", "cuda")


def test_float16_on_a_transformer_family_exits_2_before_any_model_loads(tmp_path, model_cache, capsys, monkeypatch):
    from jobs.generate import main
    from workers.runtime.models import ModelDirectory

    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": "a", "prompt": "a cat"}])
    monkeypatch.setattr(ModelDirectory, "pipeline", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    assert main(["--prompts", prompts, "--output", str(tmp_path / "out"), "--model", "tiny-flux", "--dtype", "float16"]) == 2
    assert "dtype: float16 overflows in flux models (NaN or black images)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.fixture
def tiny_plan(tmp_path, model_cache):
    prompts = write_prompts(tmp_path / "prompts.parquet", [{"id": "a", "prompt": "a cat"}])

    def plan(**options):
        return plan_generation(GenerateConfig(prompts=prompts, output=str(tmp_path / "out"), model="tiny", steps=2, **options))
    return plan


def test_workers_receive_the_device_and_dtype_of_their_stage(tiny_plan):
    # split on a GPU cluster, the text encoder kept on CPU by the user: each stage its own precision
    plan = tiny_plan(placement="split", stages={"text_encoder": StageOptions(num_gpus=0)})
    stages = {stage.name: stage.constructor_kwargs for stage in plan.model_stages("split", GPU_CLUSTER)}
    assert {name: (kwargs["device"], kwargs["dtype"]) for name, kwargs in stages.items()} == {
        "text_encoder": ("cpu", "float32"), "denoiser": ("cuda", "bfloat16"), "vae_decoder": ("cuda", "bfloat16"),
    }
    assert plan.identity["precision"] == {"text_encoder": "float32", "denoiser": "bfloat16", "vae_decoder": "bfloat16"}
    # fused: one stage runs every role
    fused = tiny_plan(dtype="float16")
    (stage,) = fused.model_stages("fused", GPU_CLUSTER)
    assert (stage.constructor_kwargs["device"], stage.constructor_kwargs["dtype"]) == ("cuda", "float16")
    assert fused.identity["precision"] == {"text_encoder": "float16", "denoiser": "float16", "vae_decoder": "float16"}


def test_half_precision_asked_on_a_cpu_cluster_is_refused(tiny_plan):
    with pytest.raises(ValueError, match="'bfloat16' needs a GPU"):
        tiny_plan(dtype="bfloat16").model_stages("fused", CPU_CLUSTER)


def test_a_rerun_in_another_precision_is_refused_and_the_same_one_accepted(tiny_plan, tmp_path):
    # 1. a first run on CPU records float32 in the output's identity
    first = tiny_plan()
    first.model_stages("fused", CPU_CLUSTER)
    first.output.write_json("run.json", {"status": "complete", "identity": first.identity})
    # 2. the same run resumed on a GPU cluster would write bfloat16 rows beside float32 ones
    with pytest.raises(ValueError, match="holds rows computed in another precision \\(denoiser was float32, now bfloat16"):
        tiny_plan().model_stages("fused", GPU_CLUSTER)
    # 3. on CPU again, or in split placement with the same precision: the same identity
    assert tiny_plan().model_stages("split", CPU_CLUSTER)
    # 4. --overwrite starts fresh in any precision
    replaced = tiny_plan(overwrite=True)
    replaced.model_stages("fused", GPU_CLUSTER)
    assert replaced.identity["precision"]["denoiser"] == "bfloat16"


def test_encode_cache_key_holds_the_encoders_dtype(tmp_path, model_cache):
    from image_helpers import picture, png, write_table
    from pipelines.encoding.encode import plan_encoding
    from pipelines.runtime.config import EncodeConfig

    images = write_table(tmp_path / "images.parquet", [{"id": f"img{n}", "image": png(picture(n, 48, 48))} for n in range(2)])
    keys = {}
    for cluster in (CPU_CLUSTER, GPU_CLUSTER):
        plan = plan_encoding(EncodeConfig(images=images, output=str(tmp_path / f"out-{cluster.gpus}"), model="tiny"))
        (stage,) = plan.model_stages("vae_only", cluster)
        keys[cluster.gpus] = plan.settings.encoding_key
        assert plan.identity["precision"] == {"vae_encoder": stage.constructor_kwargs["dtype"]}
    assert keys[0] != keys[1]


def loaded_modules(pipe, components) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in components if isinstance(getattr(pipe, name, None), torch.nn.Module)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_loaded_module_of_every_worker_is_in_the_dtype_it_was_given(tiny_model_dir, dtype):
    """Checked per module and per parameter, not only the device: the VAE alone stays in float32
    under float16 when its config says ``force_upcast`` (as diffusers does)."""
    from workers.encoding.fused import FusedEncodingWorker
    from workers.generation.fused import FusedGenerationWorker

    generation = FusedGenerationWorker(tiny_model_dir, device="cpu", dtype=dtype, threads=1)
    encoding = FusedEncodingWorker(tiny_model_dir, device="cpu", dtype=dtype, threads=1)
    workers = [generation.text_encoder, generation.denoiser, generation.vae_decoder, encoding.caption_encoder, encoding.vae_encoder]
    family = generation.denoiser.family
    for worker in workers:
        assert (worker.device.type, worker.dtype) == ("cpu", getattr(torch, dtype))
    pipe = generation.denoiser.pipe
    modules = loaded_modules(pipe, (*family.text_components, family.denoiser_component, family.vae_component))
    assert set(modules) == {"text_encoder", "unet", "vae"}
    upcast = dtype == "float16" and modules["vae"].config.force_upcast
    for name, module in modules.items():
        expected = torch.float32 if name == "vae" and upcast else getattr(torch, dtype)
        assert {(p.device.type, p.dtype) for p in module.parameters()} == {("cpu", expected)}, name
    assert generation.vae_decoder.vae.dtype == encoding.vae_encoder.vae.dtype == (torch.float32 if upcast else getattr(torch, dtype))
