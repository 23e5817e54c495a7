"""The latentray command: help, clear errors before any model loads, model export."""

import subprocess
import sys

import pytest

from helpers import write_prompts
from jobs.cli import main


@pytest.mark.parametrize("verb", [[], ["demo"], ["generate"], ["model", "export"]])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: latentray" in capsys.readouterr().out


def run_cli(args, capsys) -> tuple[int, str]:
    status = main(args)
    return status, capsys.readouterr().err


def test_missing_prompt_column_is_named(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", {"text": ["a cat"]})
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path / "out")], capsys)
    assert status == 2 and "no 'prompt' column (columns are: text)" in err
    assert not (tmp_path / "out" / "run.json").exists()


def test_unreadable_input_is_named(tmp_path, capsys):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    status, err = run_cli(["generate", "--prompts", str(tmp_path / "broken.parquet"), "--output", str(tmp_path / "out")], capsys)
    assert status == 2 and "cannot read Parquet file" in err and "broken.parquet" in err
    status, err = run_cli(["generate", "--prompts", str(tmp_path / "missing"), "--output", str(tmp_path / "out")], capsys)
    assert status == 2 and "missing" in err


def test_unknown_model_is_named(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path / "out"), "--model", str(tmp_path / "nowhere")], capsys)
    assert status == 2 and "has no model_index.json (not a diffusers model directory)" in err


def test_unwritable_output_is_named(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    (tmp_path / "a-file").write_text("x")
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path / "a-file" / "out")], capsys)
    assert status == 2 and "cannot write to" in err and "a-file" in err


def test_bad_flag_values_name_the_field(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path), "--height", "100"], capsys)
    assert status == 2 and "height: sd models need a multiple of 8, got 100" in err
    status, err = run_cli(["generate", "--prompts", prompts, "--output", str(tmp_path), "--stage", "denoiser.batch_size=0"], capsys)
    assert status == 2 and "batch_size: must be a whole number >= 1" in err


def test_exported_preset_loads_in_diffusers(tmp_path, model_cache):
    from diffusers import StableDiffusionPipeline

    assert main(["model", "export", "tiny", str(tmp_path / "tiny")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "tiny"), local_files_only=True)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.scaling_factor > 0
    assert not list((tmp_path / "tiny").rglob("*.bin"))  # safetensors only


def test_python_module_entry_point_has_help():
    result = subprocess.run([sys.executable, "-m", "jobs.generate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--prompts" in result.stdout and "--placement" in result.stdout


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_submission_is_named_by_its_input_state(storage, tmp_path, request):
    """Submit and the Airflow DAG name a job by its input's files, sizes and versions: new input, new job."""
    import pyarrow as pa

    from jobs.submit import job_request_from_arguments
    from pipelines.runtime import io

    if storage == "s3":
        import boto3

        request.getfixturevalue("s3_endpoint")
        boto3.client("s3").create_bucket(Bucket="scheduled-bucket")
        folder = "s3://scheduled-bucket/prompts"
    else:
        folder = str(tmp_path / "prompts")
    arguments = ["--prompts", folder, "--output", "/data/out", "--model", "tiny", "--steps", "2"]
    io.write_parquet(pa.table({"prompt": ["a cat", "a dog"]}), io.join(folder, "day-1.parquet"))
    first = job_request_from_arguments("generate", arguments)
    assert job_request_from_arguments("generate", arguments).attempt_id(1) == first.attempt_id(1)  # nothing new

    io.write_parquet(pa.table({"prompt": ["a cow"]}), io.join(folder, "day-2.parquet"))
    added = job_request_from_arguments("generate", arguments)
    assert added.configuration == first.configuration and added.fingerprint != first.fingerprint
    io.write_parquet(pa.table({"prompt": ["a pig"]}), io.join(folder, "day-2.parquet"))  # rewritten, same size
    rewritten = job_request_from_arguments("generate", arguments)
    assert rewritten.fingerprint not in (first.fingerprint, added.fingerprint)

    # the DAG names the same job, from the state its check_input task listed
    pytest.importorskip("airflow")
    from jobs.airflow_ray import request_from_params

    params = {"kind": "generate", "input": folder, "output": "/data/out", "model": "tiny", "options": {"steps": 2}}
    assert request_from_params(params).attempt_id(1) == rewritten.attempt_id(1)
    assert request_from_params(params, first.input_state).attempt_id(1) == first.attempt_id(1)
