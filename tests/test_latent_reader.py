"""Latent datasets that trainers consume as they are (issue 12).

Part 1: a real `latentray encode` output (fixed size and --buckets, tiny model, session Ray) read
through pyarrow, pandas, DuckDB, Ray Data, Hugging Face datasets and LatentDataset.
Part 2: LatentDataset's batching, equal counts, determinism and resume on datasets written by the
real commit task (no model), with 2 ranks and 2 DataLoader workers, locally and on S3 (moto).
"""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from image_helpers import picture, png, write_table
from latent_helpers import BUCKET_SHAPES, row_value, token_count, write_latent_dataset
from pipelines import LatentDataset
from pipelines.encoding.encode import run_encoding
from pipelines.encoding.latent_dataset import collate_nested_arrays, plan_epoch
from pipelines.encoding.latent_output import latents_of
from pipelines.runtime.config import EncodeConfig

# -- part 1: every reader on real encode outputs --------------------------------------------------


@pytest.fixture(scope="module")
def encoded(ray_session, tmp_path_factory):
    """{"fixed": folder, "buckets": folder}: latents/ of two encode runs, with flips and caption embeddings."""
    root = tmp_path_factory.mktemp("reader")
    sizes = [(64, 64), (96, 64), (64, 96), (80, 80), (150, 50), (50, 150), (96, 64), (64, 112), (64, 64)]
    rows = [{"id": f"img-{index}", "image": png(picture(index, width, height)), "caption": None if index == 4 else f"picture {index}"}
            for index, (width, height) in enumerate(sizes)]
    images = write_table(root / "images" / "part-0.parquet", rows)
    outputs = {}
    # the two thin images are too small for a 64x64 crop (refused, not upscaled) but fit buckets
    for name, options, encoded_rows in (("fixed", {}, 7), ("buckets", {"buckets": "auto", "bucket_step": 16}, 9)):
        output = root / name
        record = run_encoding(EncodeConfig(images=images, output=str(output), resolution=64, caption_column="caption", flip=True,
                                           text_embeddings=True, batch_size=4, rows_per_part=4, **options))
        assert record["counts"]["ok_rows"] == encoded_rows
        outputs[name] = str(output / "latents")
    return outputs


def stored(folder: str) -> dict[str, np.ndarray]:
    """id -> latent, through latentray's own decoding of the column."""
    table = pq.read_table(folder)
    return dict(zip(table.column("id").to_pylist(), latents_of(table)))


@pytest.mark.parametrize("kind", ["fixed", "buckets"])
def test_pyarrow_pandas_and_duckdb_see_latents_shaped(encoded, kind):
    import duckdb

    folder = encoded[kind]
    latents = stored(folder)
    table = pq.read_table(folder)
    for row_id, latent, shape in zip(table.column("id").to_pylist(), table.column("latent").to_pylist(), table.column("latent_shape").to_pylist()):
        assert np.asarray(latent, np.float16).shape == tuple(shape) == latents[row_id].shape
        np.testing.assert_array_equal(np.asarray(latent, np.float16), latents[row_id])
    if kind == "fixed":  # the type itself says [4][8][8]
        assert table.schema.field("latent").type == pa.list_(pa.list_(pa.list_(pa.float16(), 8), 8), 4)
        assert table.schema.field("prompt_embeds").type == pa.list_(pa.list_(pa.float16(), 32), 77)
    assert len({tuple(shape) for shape in table.column("latent_shape").to_pylist()}) == (1 if kind == "fixed" else 5)

    frame = pd.read_parquet(folder)
    for row_id, value, shape in zip(frame["id"], frame["latent"], frame["latent_shape"]):
        np.testing.assert_array_equal(np.stack([np.stack(channel) for channel in value]), latents[row_id])
        assert np.stack([np.stack(channel) for channel in value]).shape == tuple(shape)

    found = duckdb.sql(f"select id, len(latent), len(latent[1]), len(latent[1][1]), latent_shape from '{folder}/*.parquet'").fetchall()
    assert {row_id: (channels, height, width) for row_id, channels, height, width, _ in found} == {k: v.shape for k, v in latents.items()}


def test_ray_data_batches_fixed_shards_as_tensors(encoded, ray_session):
    import ray.data

    folder = encoded["fixed"]
    latents = stored(folder)
    dataset = ray.data.read_parquet(folder, columns=["id", "latent", "prompt_embeds", "target_size"])
    seen = {}
    for batch in dataset.iter_torch_batches(batch_size=4, collate_fn=collate_nested_arrays):
        assert batch["latent"].shape[1:] == (4, 8, 8) and batch["latent"].dtype == torch.float16
        assert batch["prompt_embeds"].shape[1:] == (77, 32) and batch["target_size"].shape[1:] == (2,)
        seen.update(zip(batch["id"], batch["latent"].numpy()))
    assert seen.keys() == latents.keys()
    for row_id, latent in seen.items():
        np.testing.assert_array_equal(latent, latents[row_id])
    # the one-dimensional columns need no collate function at all
    sizes = next(iter(ray.data.read_parquet(folder, columns=["target_size"]).iter_torch_batches(batch_size=4)))
    assert sizes["target_size"].tolist() == [[64, 64]] * 4


@pytest.mark.parametrize("kind", ["fixed", "buckets"])
def test_hugging_face_datasets_loads_shards_with_torch_tensors_shaped(encoded, kind, tmp_path):
    import datasets

    folder = encoded[kind]
    latents = stored(folder)
    hub = datasets.load_dataset("parquet", data_files=f"{folder}/*.parquet", split="train", cache_dir=str(tmp_path)).with_format("torch")
    assert len(hub) == len(latents)
    for row in hub:
        assert tuple(row["latent"].shape) == tuple(row["latent_shape"].tolist()) == latents[row["id"]].shape
        np.testing.assert_array_equal(row["latent"].numpy(), latents[row["id"]].astype(np.float32))  # torch format: float32
        assert tuple(row["latent_flipped"].shape) == latents[row["id"]].shape and tuple(row["prompt_embeds"].shape) == (77, 32)
    if kind == "fixed":
        assert tuple(hub[:5]["latent"].shape) == (5, 4, 8, 8)


@pytest.mark.parametrize("kind", ["fixed", "buckets"])
def test_latent_dataset_batches_one_shape_each_over_an_encode_output(encoded, kind):
    latents = stored(encoded[kind])
    dataset = LatentDataset(os.path.dirname(encoded[kind]), batch_size=2, shuffle=True, seed=3)
    assert set(dataset.columns) == {"latent", "latent_flipped", "prompt_embeds", "original_size", "crop_top_left", "target_size", "id", "caption"}
    seen = []
    for batch in dataset:
        assert batch["latent"].shape == batch["latent_flipped"].shape and batch["prompt_embeds"].shape[1:] == (77, 32)
        for row_id, latent in zip(batch["id"], batch["latent"]):
            np.testing.assert_array_equal(latent.numpy(), latents[row_id])
        assert batch["target_size"].tolist() == [[8 * size for size in batch["latent"].shape[2:]]] * len(batch["id"])
        seen += batch["id"]
    assert set(seen) == set(latents) and len(seen) == len(dataset) * 2  # drop_last=False: every row, padded


# -- part 2: batching, equal counts, determinism, resume ------------------------------------------


PART_ROWS = [37, 20, 45, 8, 30, 41]  # 181 rows in parts of different sizes


@pytest.fixture(scope="module")
def buckets(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("bucket-dataset"))
    return uri, write_latent_dataset(uri, PART_ROWS, buckets=True)


def ids_of(batches) -> list[list[str]]:
    return [batch["id"] for batch in batches]


def check_batch(batch: dict, size: int) -> None:
    """One latent shape, every row's values its own, strings as lists."""
    assert batch["latent"].shape[0] == size and tuple(batch["latent"].shape[1:]) in BUCKET_SHAPES
    assert [int(latent.flatten()[0]) for latent in batch["latent"]] == [row_value(row_id) for row_id in batch["id"]]
    assert isinstance(batch["caption"], list) and all(isinstance(caption, str) for caption in batch["caption"])
    assert batch["pooled_prompt_embeds"].shape == (size, 3) and batch["prompt_embeds"].shape == (size, 5, 3)


def run_ranks(uri: str, workers: int, **options) -> list[list[list[str]]]:
    """Each of 2 ranks read through a DataLoader with ``workers`` workers: the ids of every batch, per rank."""
    ranks = []
    for rank in range(2):
        dataset = LatentDataset(uri, rank=rank, world_size=2, **options)
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))
        for batch in batches:
            check_batch(batch, options["batch_size"])
        assert len(batches) == len(dataset)
        ranks.append(ids_of(batches))
    return ranks


def test_two_ranks_two_workers_drop_last_equal_batches_no_row_twice(buckets):
    uri, ids = buckets
    ranks = run_ranks(uri, 2, batch_size=8, shuffle=True, seed=7, drop_last=True, shuffle_buffer=60)
    assert len(ranks[0]) == len(ranks[1]) > 0
    seen = [row_id for rank in ranks for batch in rank for row_id in batch]
    assert len(seen) == len(set(seen))
    # only partial batches (one per shape) and the odd batch out are dropped
    assert len(ids) - len(seen) < len(BUCKET_SHAPES) * 8 + 8


def test_two_ranks_two_workers_keep_every_row_padded_by_repetition(buckets):
    uri, ids = buckets
    ranks = run_ranks(uri, 2, batch_size=8, shuffle=True, seed=7, drop_last=False, shuffle_buffer=60)
    assert len(ranks[0]) == len(ranks[1])
    seen = [row_id for rank in ranks for batch in rank for row_id in batch]
    assert set(seen) == set(ids) and len(seen) == 2 * len(ranks[0]) * 8
    assert len(seen) - len(ids) < len(BUCKET_SHAPES) * 8 + 8  # the padding repeats no more than needed


def test_workers_change_neither_batch_counts_nor_coverage(buckets):
    uri, ids = buckets
    options = dict(batch_size=8, shuffle=True, seed=7, drop_last=False, shuffle_buffer=60)
    with_workers, in_process = run_ranks(uri, 2, **options), run_ranks(uri, 0, **options)
    assert [len(rank) for rank in with_workers] == [len(rank) for rank in in_process]
    for ranks in (with_workers, in_process):
        assert {row_id for rank in ranks for batch in rank for row_id in batch} == set(ids)


@pytest.mark.parametrize("buckets", [False, True])
def test_each_row_group_is_read_by_one_reader(tmp_path, buckets):
    """Readers get whole row groups of a window: two readers share only groups at the boundaries of their shares
    (one per shape; with buckets also groups that hold two shapes), so reading barely repeats."""
    write_latent_dataset(str(tmp_path), [300, 300, 300, 300], buckets=buckets)
    dataset = LatentDataset(str(tmp_path), batch_size=8, shuffle=True, seed=2, drop_last=True)
    ends = [(part.first_row, part.row_group_ends) for part in dataset.parts]
    assert all(len(group_ends) == 3 for _, group_ends in ends)  # 128 + 128 + 44 rows

    def groups_read(batches: np.ndarray) -> set[tuple[int, int]]:
        part_of = np.searchsorted([first for first, _ in ends], batches.ravel(), side="right") - 1
        return {(int(part), int(np.searchsorted(ends[part][1], row - ends[part][0], side="right"))) for part, row in zip(part_of, batches.ravel())}

    plan = dataset.plan(readers=2)
    first, second = groups_read(plan[0::2]), groups_read(plan[1::2])
    assert len(first | second) == 12 and len(first & second) <= (2 * len(BUCKET_SHAPES) if buckets else 1)


def test_same_seed_and_epoch_same_batches_another_epoch_another_order(buckets):
    uri, _ = buckets

    def epoch_ids(epoch: int, seed: int = 1) -> list[list[str]]:
        dataset = LatentDataset(uri, batch_size=8, shuffle=True, seed=seed, drop_last=True)
        dataset.set_epoch(epoch)
        return ids_of(dataset)

    assert epoch_ids(0) == epoch_ids(0)
    assert epoch_ids(1) != epoch_ids(0) and epoch_ids(0, seed=2) != epoch_ids(0)
    assert sorted(sum(epoch_ids(1), [])) != sum(epoch_ids(1), [])  # rows are shuffled, not only parts


def test_bucket_mix_of_an_epoch_follows_the_data(buckets):
    uri, _ = buckets
    shapes = pq.read_table(uri + "/latents", columns=["latent_shape"]).column("latent_shape").to_pylist()
    rows_per_shape = pd.Series([tuple(shape) for shape in shapes]).value_counts()
    dataset = LatentDataset(uri, batch_size=8, shuffle=True, seed=0, drop_last=True, columns=["latent"])
    batch_shapes = [tuple(batch["latent"].shape[1:]) for batch in dataset]
    assert pd.Series(batch_shapes).value_counts().to_dict() == {shape: count // 8 for shape, count in rows_per_shape.items()}
    first_half = batch_shapes[:len(batch_shapes) // 2]
    assert len(set(first_half)) == len(BUCKET_SHAPES)  # shapes interleave through the epoch, not one bucket after another


def test_the_plan_shuffles_rows_within_windows_of_whole_parts(buckets):
    uri, _ = buckets
    dataset = LatentDataset(uri, batch_size=4, shuffle=True, seed=5, drop_last=True, shuffle_buffer=1)
    plan = plan_epoch(dataset.parts, dataset.options, 0)
    part_of = np.searchsorted([part.first_row for part in dataset.parts], plan, side="right") - 1
    # a window is one part here: a batch mixes at most its part's rows and the few left over before it
    for batch_parts in part_of:
        assert len(set(batch_parts)) <= 3


def test_resume_from_state_dict_continues_with_the_same_batches(buckets):
    uri, _ = buckets
    options = dict(batch_size=8, shuffle=True, seed=11, drop_last=False, shuffle_buffer=50)
    whole = LatentDataset(uri, **options)
    whole.set_epoch(2)
    expected = ids_of(whole)

    first = LatentDataset(uri, **options)
    first.set_epoch(2)
    iterator = iter(first)
    taken = [next(iterator)["id"] for _ in range(5)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches_yielded"] == 5

    resumed = LatentDataset(uri, **options)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # as a training loop does at each epoch: the loaded state still applies
    assert taken + ids_of(resumed) == expected
    assert ids_of(resumed) == expected  # the next pass over the epoch starts from its beginning


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_stateful_dataloader(buckets, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    uri, _ = buckets
    options = dict(batch_size=8, shuffle=True, seed=13, drop_last=True, shuffle_buffer=50)
    expected = ids_of(StatefulDataLoader(LatentDataset(uri, **options), batch_size=None, num_workers=workers))
    loader = StatefulDataLoader(LatentDataset(uri, **options), batch_size=None, num_workers=workers)
    taken = []
    for batch in loader:
        taken.append(batch["id"])
        if len(taken) == 5:
            break
    state = loader.state_dict()
    resumed = StatefulDataLoader(LatentDataset(uri, **options), batch_size=None, num_workers=workers)
    resumed.load_state_dict(state)
    assert taken + ids_of(resumed) == expected


def test_a_state_from_another_configuration_is_refused(buckets):
    uri, _ = buckets
    state = LatentDataset(uri, batch_size=8, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"^state: saved with batch_size=8, this dataset has batch_size=4"):
        LatentDataset(uri, batch_size=4, seed=1).load_state_dict(state)
    worker_state = {**state, "batches_yielded": 2, "readers": 2}
    dataset = LatentDataset(uri, batch_size=8, seed=1)
    dataset.load_state_dict(worker_state)
    with pytest.raises(ValueError, match=r"^state: taken with 2 reader process\(es\) per rank, resumed with 1"):
        next(iter(dataset))


def test_options_are_validated_by_name(buckets):
    uri, _ = buckets
    for options, message in (({"batch_size": 0}, "^batch_size"), ({"shuffle_buffer": 0}, "^shuffle_buffer"),
                             ({"rank": 2, "world_size": 2}, r"^rank: must be an integer in \[0, world_size=2\)"),
                             ({"prefetch": -1}, "^prefetch"), ({"columns": ["latent", "nope"]}, "^columns: nope not in")):
        with pytest.raises(ValueError, match=message):
            LatentDataset(uri, **options)
    with pytest.raises(ValueError, match="^epoch"):
        LatentDataset(uri).set_epoch(-1)


def test_rows_without_batch_size_for_a_dataloader_that_batches(tmp_path):
    ids = write_latent_dataset(str(tmp_path), [10, 7], buckets=False)
    dataset = LatentDataset(str(tmp_path), columns=["id", "latent", "target_size"])
    row = next(iter(dataset))
    assert row["latent"].shape == (4, 8, 8) and row["target_size"].tolist() == [64, 64] and isinstance(row["id"], str)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    assert sorted(row_id for batch in loader for row_id in batch["id"]) == sorted(ids)


def test_caption_embeddings_of_their_own_length_read_everywhere_and_batch_padded_with_a_mask(tmp_path):
    """Z-Image and Qwen-Image captions have lengths of their own: stored unpadded (a list of fixed-size lists,
    the length beside), seen at their length by pyarrow, DuckDB and HF datasets; LatentDataset pads each
    batch to its longest row, with prompt_embeds_mask True at real tokens (2 ranks, 2 DataLoader workers)."""
    import datasets
    import duckdb

    ids = write_latent_dataset(str(tmp_path), [13, 9], buckets=True, ragged=True, tokens=6)
    folder = str(tmp_path / "latents")
    table = pq.read_table(folder)
    assert table.schema.field("prompt_embeds").type == pa.list_(pa.list_(pa.float16(), 3))
    assert table.schema.field("pooled_prompt_embeds").type == pa.list_(pa.float16(), 3)  # no tokens: one shape
    for row_id, value, length in zip(table.column("id").to_pylist(), table.column("prompt_embeds").to_pylist(),
                                     table.column("prompt_embeds_length").to_pylist()):
        assert np.asarray(value).shape == (token_count(row_id, 6), 3) == (length, 3)
    found = duckdb.sql(f"select id, len(prompt_embeds), prompt_embeds[1][1] from '{folder}/*.parquet'").fetchall()
    assert {row_id: (tokens, value) for row_id, tokens, value in found} == {row_id: (token_count(row_id, 6), row_value(row_id)) for row_id in ids}
    hub = datasets.load_dataset("parquet", data_files=f"{folder}/*.parquet", split="train", cache_dir=str(tmp_path / "hf")).with_format("torch")
    assert {row["id"]: tuple(row["prompt_embeds"].shape) for row in hub} == {row_id: (token_count(row_id, 6), 3) for row_id in ids}

    seen = []
    for rank in range(2):
        dataset = LatentDataset(str(tmp_path), batch_size=4, shuffle=True, seed=1, rank=rank, world_size=2)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2):
            embeds, mask, lengths = batch["prompt_embeds"], batch["prompt_embeds_mask"], [token_count(row_id, 6) for row_id in batch["id"]]
            assert embeds.shape == (4, max(lengths), 3) and embeds.dtype == torch.float16 and mask.shape == (4, max(lengths))
            assert mask.sum(dim=1).tolist() == lengths and batch["pooled_prompt_embeds"].shape == (4, 3)
            for row_id, row, real in zip(batch["id"], embeds, mask):
                assert bool(real[:token_count(row_id, 6)].all()) and bool((row[real] == row_value(row_id)).all()) and not row[~real].any()
            seen += batch["id"]
    assert set(seen) == set(ids)
    row = next(iter(LatentDataset(str(tmp_path), columns=["id", "prompt_embeds"])))  # a row alone: its own length
    assert tuple(row["prompt_embeds"].shape) == (token_count(row["id"], 6), 3) and bool(row["prompt_embeds_mask"].all())


def test_older_encodings_still_read(tmp_path):
    """Parts written before issue 12: Arrow fixed-shape tensors, and flat lists with latent_shape (buckets)."""
    latents = np.arange(2 * 4 * 8 * 8, dtype=np.float16).reshape(2, 4, 8, 8)
    tensor_type = pa.fixed_shape_tensor(pa.float16(), [4, 8, 8])
    fixed = pa.table({"id": ["a", "b"], "latent": pa.ExtensionArray.from_storage(tensor_type, pa.FixedSizeListArray.from_arrays(pa.array(latents.ravel()), 256)),
                      "latent_shape": pa.array([[4, 8, 8]] * 2, pa.list_(pa.int32(), 3))})
    os.makedirs(tmp_path / "fixed")
    pq.write_table(fixed, tmp_path / "fixed" / "part-0.parquet")
    flat_values = [np.full((4, 4, 12), 1, np.float16), np.full((4, 8, 8), 2, np.float16), np.full((4, 4, 12), 3, np.float16)]
    flat = pa.table({"id": ["c", "d", "e"], "latent": pa.array([value.ravel() for value in flat_values], pa.list_(pa.float16())),
                     "latent_shape": pa.array([list(value.shape) for value in flat_values], pa.list_(pa.int32(), 3))})
    os.makedirs(tmp_path / "flat")
    pq.write_table(flat, tmp_path / "flat" / "part-0.parquet")

    batch = next(iter(LatentDataset(str(tmp_path / "fixed"), batch_size=2)))
    np.testing.assert_array_equal(batch["latent"].numpy(), latents)
    batches = list(LatentDataset(str(tmp_path / "flat"), batch_size=2))
    assert [(batch["id"], tuple(batch["latent"].shape)) for batch in batches] == [(["c", "e"], (2, 4, 4, 12)), (["d", "d"], (2, 4, 8, 8))]
    assert batches[0]["latent"][1].flatten()[0] == 3


def test_reads_from_s3_with_prefetch(s3_endpoint, buckets):
    import boto3

    from pipelines.runtime import io

    boto3.client("s3").create_bucket(Bucket="reader-bucket")
    uri, ids = buckets
    for part in io.list_parquet_files(uri + "/latents"):
        io.write_bytes("s3://reader-bucket/run/latents/" + os.path.basename(part), io.read_bytes(part))
    options = dict(batch_size=8, shuffle=True, seed=3, drop_last=False, shuffle_buffer=60)
    remote = LatentDataset("s3://reader-bucket/run", prefetch=3, **options)
    assert ids_of(remote) == ids_of(LatentDataset(uri, prefetch=0, **options))


# -- part 3: the DDP example ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.time_limit(240)  # ~15 s alone; its ranks time out their collectives after 120 s
def test_ddp_example_fine_tunes_on_buckets_with_two_ranks_and_resumes(encoded, tiny_model_dir, tmp_path):
    """examples/ddp_finetune_unet.py: 2 ranks on CPU (gloo), stopped after 3 steps, then continued to 5."""
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "ddp_finetune_unet.py")
    output = tmp_path / "finetuned"

    def run(steps: int) -> list[dict]:
        command = [sys.executable, script, "--model", tiny_model_dir, "--latents", os.path.dirname(encoded["buckets"]),
                   "--output", str(output), "--world-size", "2", "--steps", str(steps), "--batch-size", "2"]
        # a hang fails the test at its time limit, with the stacks of both ranks (tests/conftest.py)
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.load(open(output / f"rank-{rank}.json"))["batches"] for rank in range(2)]

    first = run(3)
    ranks = run(5)
    for rank, (before, after) in enumerate(zip(first, ranks)):
        assert [batch["step"] for batch in after] == [1, 2, 3, 4, 5] and after[:3] == before
        # exactly the batches the reader plans for this rank, epoch after epoch, across the restart
        planned = []
        for epoch in range(5):
            dataset = LatentDataset(os.path.dirname(encoded["buckets"]), batch_size=2, shuffle=True, seed=0, drop_last=True,
                                    rank=rank, world_size=2, columns=["id", "latent"])
            dataset.set_epoch(epoch)
            planned += [(epoch, batch["id"], list(batch["latent"].shape[1:])) for batch in dataset]
        assert [(batch["epoch"], batch["ids"], batch["shape"]) for batch in after] == planned[:5]
    for step in range(5):  # in a step the ranks train on different rows, possibly of different shapes
        assert not set(ranks[0][step]["ids"]) & set(ranks[1][step]["ids"])
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").exists()
