"""Generation with input, model and output on a real S3-compatible server (moto, 127.0.0.1)."""

import io as bytes_io
import json

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.generation.generate import run_generation
from pipelines.runtime.config import GenerateConfig
from workers.runtime.presets import export_preset


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    client = boto3.client("s3")
    client.create_bucket(Bucket="latentray-test")
    # the tiny model as a diffusers directory in the bucket
    model_dir = tmp_path_factory.mktemp("tiny-export")
    export_preset("tiny", str(model_dir))
    for path in model_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "latentray-test", f"models/tiny/{path.relative_to(model_dir)}")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["a cat", "", "a dog"]}), sink)
    client.put_object(Bucket="latentray-test", Key="prompts/part-0.parquet", Body=sink.getvalue().to_pybytes())
    return client


def test_generation_reads_and_writes_object_storage(ray_session, bucket):
    config = GenerateConfig(
        prompts="s3://latentray-test/prompts/", output="s3://latentray-test/runs/one",
        model="s3://latentray-test/models/tiny", steps=3,
    )
    record = run_generation(config)
    assert record["counts"] == {**record["counts"], "input_rows": 3, "ok_rows": 2, "error_rows": 1}

    keys = {item["Key"] for item in bucket.list_objects_v2(Bucket="latentray-test", Prefix="runs/one/")["Contents"]}
    assert {"runs/one/images/a.png", "runs/one/images/c.png", "runs/one/run.json", "runs/one/latent_stats.json"} <= keys
    image = Image.open(bytes_io.BytesIO(bucket.get_object(Bucket="latentray-test", Key="runs/one/images/a.png")["Body"].read()))
    assert image.size == (64, 64)
    manifest = pd.read_parquet("s3://latentray-test/runs/one/manifest/")
    assert sorted(manifest["id"]) == ["a", "c"]
    errors = pd.read_parquet("s3://latentray-test/runs/one/errors/")
    assert errors[["id", "reason"]].values.tolist() == [["b", "prompt is empty"]]
    run = json.loads(bucket.get_object(Bucket="latentray-test", Key="runs/one/run.json")["Body"].read())
    assert run["model"]["uri"] == "s3://latentray-test/models/tiny" and len(run["model"]["fingerprint"]) == 64

    # the same run again: everything is already there, nothing is redone or duplicated
    again = run_generation(config)
    assert again["counts"]["generated_this_run"] == 0
    assert len(pd.read_parquet("s3://latentray-test/runs/one/manifest/")) == 2


def test_model_copied_from_object_storage_draws_like_the_local_preset(ray_session, bucket, tiny_model_dir):
    from pipelines.runtime.model_source import describe_model

    remote = describe_model("s3://latentray-test/models/tiny")
    local_dir = remote.location()  # copies into the node's cache once
    assert remote.location() == local_dir
    assert json.load(open(f"{local_dir}/model_index.json")) == json.load(open(f"{tiny_model_dir}/model_index.json"))
    for component in ("unet", "vae", "text_encoder"):
        local = sorted((p.name for p in __import__("pathlib").Path(local_dir, component).iterdir()))
        assert any(name.endswith(".safetensors") for name in local)


LOCALIZE_SCRIPT = """
import sys
from pipelines.runtime import io

def record(event):
    with open(sys.argv[3], "a") as log:
        log.write(event + "\\n")

original = io._download_tree
def recorded(uri, target):
    record("download")
    original(uri, target)
io._download_tree = recorded
# fsspec keeps one filesystem instance per settings: wrapping its get counts every transfer
fs = io.filesystem(sys.argv[1])[0]
transfer = fs.get
def counted(*args, **kwargs):
    record("transfer")
    return transfer(*args, **kwargs)
fs.get = counted
print(io.localize_tree(sys.argv[1], "fingerprint", sys.argv[2]))
"""


def test_actors_of_one_node_download_a_remote_model_once(bucket, tmp_path):
    import subprocess
    import sys

    cache, log = tmp_path / "cache", tmp_path / "downloads.log"
    # four processes at once, as four actors starting on one node
    processes = [subprocess.Popen([sys.executable, "-c", LOCALIZE_SCRIPT, "s3://latentray-test/models/tiny", str(cache), str(log)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
    targets = {process.communicate(timeout=120)[0].strip() for process in processes}
    assert all(process.returncode == 0 for process in processes)
    # one download of the model directory, in one transfer
    assert len(targets) == 1 and log.read_text().splitlines() == ["download", "transfer"]
    target = targets.pop()
    assert json.load(open(f"{target}/model_index.json"))["_class_name"] == "StableDiffusionPipeline"
    assert [path.name for path in cache.joinpath("models").iterdir() if path.name.startswith(".download-")] == []
