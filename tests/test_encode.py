"""`latentray encode` end to end on a real local Ray, tiny preset, real images made here with Pillow."""

import io as bytes_io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from image_helpers import (
    alpha_png, cmyk_jpeg, decompression_bomb_png, encoded, exif_rotated_jpeg, gray16_png, jpeg,
    palette_png_with_transparency, picture, png, truncated, upright_of_exif_jpeg, write_table,
)
from latent_helpers import assert_stats_equal_numpy, latents_frame
from pipelines.encoding.encode import plan_encoding, run_encoding
from pipelines.encoding.image_decode import aspect_buckets, nearest_target
from pipelines.runtime.config import EncodeConfig

RESOLUTION = 64


def odd_and_plain_images() -> dict[str, bytes | None]:
    """id -> file bytes (None: no file) of every image the main corpus points to."""
    exif = exif_rotated_jpeg(picture(20, 64, 64))
    images = {
        "plain-0": png(picture(0, 64, 64)), "plain-1": jpeg(picture(1, 96, 64)), "plain-2": png(picture(2, 64, 128)),
        "plain-3": jpeg(picture(3, 200, 80)), "plain-4": png(picture(4, 150, 100)), "plain-5": png(picture(5, 80, 80)),
        "alpha": alpha_png(picture(6, 96, 64)), "palette": palette_png_with_transparency(80, 64), "gray16": gray16_png(128, 64),
        "cmyk": cmyk_jpeg(picture(7, 96, 96)), "one-bit": encoded(Image.fromarray(picture(8, 64, 64)[..., 0] > 128), "PNG"),
        "exif": exif, "exif-upright": upright_of_exif_jpeg(exif),
        "exif-ignored": png(np.asarray(Image.open(bytes_io.BytesIO(exif)).convert("RGB"))),  # EXIF not applied
    }
    bad = {
        "truncated": truncated(jpeg(picture(9, 96, 64))), "bomb": decompression_bomb_png(), "zero-bytes": b"",
        "not-an-image": b"<html>this is not an image</html>" * 4, "small": png(picture(10, 32, 32)), "missing": None,
    }
    return {**images, **bad}


EXPECTED_ERRORS = {
    "truncated": "truncated", "bomb": "too_large", "zero-bytes": "undecodable", "not-an-image": "undecodable",
    "small": "too_small", "missing": "unreadable_path", "plain-0@20": "duplicate_id",
}


def write_corpus(folder, images: dict[str, bytes | None]) -> str:
    """Image files beside a table that points to them with relative paths, plus a repeated id."""
    os.makedirs(folder / "images", exist_ok=True)
    rows = []
    for index, (row_id, data) in enumerate(images.items()):
        if data is not None:
            (folder / "images" / f"{row_id}.img").write_bytes(data)
        rows.append({"id": row_id, "file": f"images/{row_id}.img", "caption": None if index % 5 == 4 else f"picture {row_id}"})
    rows.append({"id": "plain-0", "file": "images/plain-1.img", "caption": "a repeated id"})
    return write_table(folder / "table.parquet", rows)


def config(images: str, output, **changes) -> EncodeConfig:
    options = dict(images=images, output=str(output), model="tiny", resolution=RESOLUTION, crop="random", flip=True,
                   path_column="file", caption_column="caption", text_embeddings=True, batch_size=4, rows_per_part=8)
    return EncodeConfig(**{**options, **changes})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), odd_and_plain_images())


@pytest.fixture(scope="module")
def first_run(ray_session, corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("latents")
    return output, run_encoding(config(corpus, output))


def errors_frame(output) -> pd.DataFrame:
    frame = pd.read_parquet(os.path.join(output, "errors"))
    frame.index = [f"{i}@{r}" if code == "duplicate_id" else i for i, r, code in zip(frame["id"], frame["row"], frame["code"])]
    return frame


def test_every_row_ends_in_latents_or_errors_with_its_reason_code(first_run):
    output, record = first_run
    counts = record["counts"]
    assert record["status"] == "complete" and counts["input_rows"] == len(odd_and_plain_images()) + 1
    assert counts["ok_rows"] + counts["error_rows"] == counts["input_rows"]
    assert sorted(latents_frame(output).index) == sorted(set(odd_and_plain_images()) - set(EXPECTED_ERRORS))
    errors = errors_frame(output)
    assert errors["code"].to_dict() == EXPECTED_ERRORS
    assert errors.loc["missing", "source"] == f"file://{os.path.dirname(first_run[1]['config']['images'])}/images/missing.img"
    assert record["error_reasons"] == {code: list(EXPECTED_ERRORS.values()).count(code) for code in set(EXPECTED_ERRORS.values())}
    assert json.load(open(output / "run.json"))["counts"] == counts


def test_latents_record_their_conditioning_and_source(first_run):
    frame = latents_frame(first_run[0])
    assert all(latent.shape == (4, 8, 8) and latent.dtype == np.float16 for latent in frame["latent"])
    assert frame.loc["plain-3", "original_size"].tolist() == [80, 200] and frame.loc["plain-3", "target_size"].tolist() == [64, 64]
    crops = {row_id: tuple(crop) for row_id, crop in frame["crop_top_left"].items()}
    assert crops["plain-3"][0] == 0 and crops["plain-2"][1] == 0  # only along the long side
    assert len(set(crops.values())) > 3  # random offsets, drawn per row
    assert frame.loc["exif", "original_size"].tolist() == [64, 64] and pd.isna(frame.loc["plain-4", "caption"])
    assert frame.loc["plain-0", "caption"] == "picture plain-0" and frame.loc["plain-0", "source"].endswith("/images/plain-0.img")
    assert frame["content_hash"].str.len().eq(64).all() and frame["cache_key"].nunique() == len(frame)


def test_exif_rotated_jpeg_encodes_as_the_same_picture_stored_upright(first_run):
    latents = latents_frame(first_run[0])["latent"]
    exif, upright, ignored = (latents[name].astype(np.float32) for name in ("exif", "exif-upright", "exif-ignored"))
    np.testing.assert_allclose(exif, upright, atol=2e-3)
    assert np.abs(exif - ignored).max() > 50 * np.abs(exif - upright).max()


def test_statistics_equal_numpy_over_the_written_latents(first_run):
    output, _ = first_run
    assert_stats_equal_numpy(output)
    stats = json.load(open(output / "latent_stats.json"))
    assert stats["scaling_factor"] == 0.18215 and stats["shift_factor"] == 0.0
    # the tiny preset's random VAE is nowhere near SD's latent scale: the report says so
    assert any(line.startswith("WARNING: the corpus suggests scaling_factor") for line in stats["warnings"])


def test_shards_load_unchanged_in_pyarrow_pandas_ray_and_duckdb(first_run, ray_session):
    """More readers (Hugging Face datasets, bucket shards) in test_latent_reader.py."""
    import duckdb
    import ray.data

    from pipelines.encoding.latent_dataset import collate_nested_arrays

    folder = str(first_run[0] / "latents")
    rows = first_run[1]["counts"]["ok_rows"]
    assert np.asarray(pq.read_table(folder).column("latent").to_pylist()).shape == (rows, 4, 8, 8)
    frame = pd.read_parquet(folder)
    assert len(frame) == rows and np.stack([np.stack(channel) for channel in frame["latent"].iloc[0]]).shape == (4, 8, 8)
    batch = next(iter(ray.data.read_parquet(folder, columns=["latent", "prompt_embeds"]).iter_torch_batches(
        batch_size=rows, collate_fn=collate_nested_arrays)))
    assert batch["latent"].shape == (rows, 4, 8, 8) and batch["prompt_embeds"].shape == (rows, 77, 32)
    assert duckdb.sql(f"select count(*), min(len(latent)), min(len(latent[1][1])) from '{folder}/*.parquet'").fetchall() == [(rows, 4, 8)]


def test_dataset_reader_yields_tensors_for_training(first_run):
    import torch

    from pipelines.encoding.latent_dataset import LatentDataset

    dataset = LatentDataset(str(first_run[0]))
    row = next(iter(dataset))
    assert row["latent"].shape == (4, 8, 8) and row["latent"].dtype == torch.float16
    assert row["latent_flipped"].shape == (4, 8, 8) and row["prompt_embeds"].shape == (77, 32)
    assert row["original_size"].dtype == torch.int64 and row["target_size"].tolist() == [64, 64]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    ids = []
    for batch in loader:
        assert batch["latent"].shape[1:] == (4, 8, 8) and batch["crop_top_left"].shape[1:] == (2,)
        ids += batch["id"]
    assert sorted(ids) == sorted(latents_frame(first_run[0]).index)  # every row once across workers


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_incremental_rerun_encodes_only_new_changed_and_lost_rows_then_nothing(first_run, corpus, tmp_path):
    # a grown corpus with one changed image, and an output whose last run lost a part
    images = odd_and_plain_images()
    images["plain-2"] = png(picture(99, 64, 128))
    images["new"] = png(picture(100, 64, 64))
    grown = write_corpus(tmp_path / "corpus", images)
    output = tmp_path / "latents"
    shutil.copytree(first_run[0], output)
    lost_part = sorted(os.listdir(output / "latents"))[0]
    lost = set(pq.read_table(output / "latents" / lost_part, columns=["id"]).column("id").to_pylist()) - {"plain-2"}
    os.remove(output / "latents" / lost_part)

    record = run_encoding(config(grown, output))
    frame = latents_frame(output)
    assert record["counts"]["encoded_this_run"] == 2 + len(lost)
    assert set(frame.index[frame["run"] == 2]) == {"plain-2", "new"} | lost
    assert frame.index.is_unique and record["status"] == "complete"
    assert frame.loc["plain-2", "content_hash"] != latents_frame(first_run[0]).loc["plain-2", "content_hash"]
    assert_stats_equal_numpy(output)

    parts = sorted(os.listdir(output / "latents"))
    again = run_encoding(config(grown, output))
    assert again["counts"]["encoded_this_run"] == 0 and again["status"] == "complete"
    assert sorted(os.listdir(output / "latents")) == parts
    assert errors_frame(output).index.is_unique and len(errors_frame(output)) == len(EXPECTED_ERRORS)


def test_another_preprocessing_config_is_refused_unless_overwrite(first_run, corpus, tmp_path):
    output = tmp_path / "changed"
    shutil.copytree(first_run[0], output)
    with pytest.raises(ValueError, match=r"different configuration \(resolution was 64, now 32; .*--overwrite"):
        plan_encoding(config(corpus, output, resolution=32))
    plan = plan_encoding(config(corpus, output, resolution=32, overwrite=True))
    assert plan.lookup is None and plan.run == 1 and not (output / "latents").exists()


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_buckets_read_as_one_table_and_split_placement(ray_session, tmp_path):
    """HF datasets' image structs, no id column, aspect buckets, caption and VAE encoders in separate pools."""
    import ray.data

    from pipelines.encoding.latent_dataset import LatentDataset

    sizes = [(64, 64), (150, 50), (50, 150), (96, 64), (64, 112)]
    # the last row alone in its block, without a caption: a column of nulls crosses two actor stages
    rows = [{"image": {"bytes": png(picture(i, w, h)), "path": f"{i}.png"}, "text": f"picture {i}" if i < 4 else None}
            for i, (w, h) in enumerate(sizes)]
    images = write_table(tmp_path / "hf" / "train.parquet", rows)
    output = tmp_path / "buckets"
    record = run_encoding(EncodeConfig(images=images, output=str(output), resolution=64, buckets="auto", bucket_step=16,
                                       caption_column="text", text_embeddings=True, placement="split", batch_size=2))
    assert record["counts"]["ok_rows"] == len(sizes) and set(record["stages"]) == {"text_encoder", "vae_encoder"}
    frame = latents_frame(output)
    assert list(frame.index) == ["000000000", "000000001", "000000002", "000000003", "000000004"]
    assert frame["caption"].iloc[3] == "picture 3" and pd.isna(frame["caption"].iloc[4])
    buckets = tuple(aspect_buckets(64, 16))
    assert frame["target_size"].map(tuple).tolist() == [nearest_target(w, h, buckets) for w, h in sizes]
    assert frame["target_size"].map(tuple).tolist() == [(64, 64), (32, 96), (96, 32), (48, 80), (80, 48)]
    for latent, target in zip(frame["latent"], frame["target_size"]):
        assert latent.shape == (4, target[0] // 8, target[1] // 8)
    assert_stats_equal_numpy(output)
    assert len(ray.data.read_parquet(str(output / "latents")).take_all()) == len(sizes)
    shapes = {row["id"]: tuple(row["latent"].shape) for row in LatentDataset(str(output))}
    assert shapes == {row_id: latent.shape for row_id, latent in frame["latent"].items()}


def test_s3_round_trip_and_random_crop_identical_on_rerun(first_run, s3_endpoint):
    """The same images as bytes in a table on S3 (moto server), output on S3: same crops, same latents per id."""
    import boto3
    import ray.data

    from pipelines.encoding.latent_dataset import LatentDataset
    from pipelines.runtime import io

    boto3.client("s3").create_bucket(Bucket="corpus-bucket")
    images = {row_id: data for row_id, data in odd_and_plain_images().items() if row_id.startswith(("plain", "exif", "alpha", "bomb"))}
    table = pa.table({"id": list(images), "image": list(images.values()),
                      "caption": [f"picture {row_id}" if i % 5 != 4 else None for i, row_id in enumerate(images)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    io.write_bytes("s3://corpus-bucket/corpus/part-0.parquet", sink.getvalue().to_pybytes())

    record = run_encoding(config("s3://corpus-bucket/corpus/", "s3://corpus-bucket/latents", path_column=None))
    assert record["status"] == "complete" and record["counts"]["ok_rows"] == len(images) - 1
    remote = {row["id"]: row for row in LatentDataset("s3://corpus-bucket/latents")}
    local = latents_frame(first_run[0])
    for row_id, row in remote.items():
        assert row["crop_top_left"].tolist() == local.loc[row_id, "crop_top_left"].tolist()
        np.testing.assert_allclose(row["latent"].float().numpy(), local.loc[row_id, "latent"].astype(np.float32), atol=2e-3)
    assert ray.data.read_parquet("s3://corpus-bucket/latents/latents").count() == len(remote)
    assert io.read_json("s3://corpus-bucket/latents/latent_stats.json")["count"] == [64 * len(remote)] * 4


def test_encode_blocks_are_sized_from_the_largest_target_and_the_encoder_pool(tmp_path, model_cache):
    from pipelines.encoding.encode import build_model_stages
    from pipelines.runtime.job import job_block_rows
    from pipelines.runtime.config import StageOptions
    from pipelines.runtime.placement import MAX_BLOCK_PIXELS, ClusterShape

    table = write_table(tmp_path / "images.parquet", [{"id": f"img{n}", "image": png(picture(n, 48, 48))} for n in range(32)])

    def block_rows(**options) -> int:
        plan = plan_encoding(EncodeConfig(images=table, output=str(tmp_path / "out"), model="tiny", overwrite=True, **options))
        return job_block_rows(plan, build_model_stages(plan.config, plan.model, "vae_only", ClusterShape(cpus=8, gpus=0)))

    # 32 rows, 2 encoder actors: 8 blocks each would be 2 rows, but whole batches of 4 -> 4 rows per block (8 blocks)
    assert block_rows(resolution=32, batch_size=4, stages={"vae_encoder": StageOptions(concurrency=2)}) == 4
    # one actor, batches of 8: 32 / 4 = 8 rows
    assert block_rows(resolution=32, batch_size=8) == 8
    # buckets: the largest target sets the pixels: MAX_BLOCK_PIXELS / 4096**2 = 4 rows (the other bucket would allow 8)
    assert block_rows(resolution=4096, buckets="4096x4096,2048x4096", batch_size=2) == MAX_BLOCK_PIXELS // 4096**2 == 4
