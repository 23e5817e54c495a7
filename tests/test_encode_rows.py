"""The CPU tasks of `latentray encode` called directly (no model): prepare, commit, supersede, the ledger's tasks."""

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from image_helpers import picture, png
from pipelines.encoding.encode_rows import RowSettings, SourceColumns, prepare_images
from pipelines.encoding.image_decode import Preprocessing
from pipelines.encoding.latent_output import LatentLayout, commit_latents, latents_of, remove_rows, tensor_values, upgrade_part
from pipelines.encoding import ledger
from pipelines.encoding.ledger import DONE_KEY_COLUMN, REPEAT_OF_COLUMN, look_up, settle
from pipelines.runtime import io
from pipelines.runtime.outputs import RunOutput
from pipelines.runtime.schemas import ENCODE_ERRORS_SCHEMA, SHAPE_RUNS_METADATA_KEY

PREPROCESSING = Preprocessing(targets=((64, 64),), crop="center", max_pixels=10**7, min_size=None, background=(255, 255, 255))


def row_settings(columns: SourceColumns, file_uri: str, run: int = 1) -> RowSettings:
    return RowSettings(columns=columns, preprocessing=PREPROCESSING, seed=0, encoding_key="k", run=run, file_starts=((0, file_uri),))


def with_lookups(table: pa.Table, done: dict[int, str] | None = None, repeat_of: dict[int, int] | None = None) -> pa.Table:
    """``table`` with the lookup columns the ledger's read task adds (by input position)."""
    rows = table.column("row").to_pylist()
    return (table.append_column(DONE_KEY_COLUMN, pa.array([(done or {}).get(row) for row in rows], pa.string()))
            .append_column(REPEAT_OF_COLUMN, pa.array([(repeat_of or {}).get(row, -1) for row in rows], pa.int64())))


def errors_of(output) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(output, "errors")).set_index("id")


def test_prepare_reads_hf_struct_bytes_and_relative_paths_and_skips_what_is_done(tmp_path):
    image = png(picture(0, 80, 64))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(image)
    table_uri = str(tmp_path / "table.parquet")
    paths = pa.table({"id": ["a", "b", "c", None, "a"], "file": ["images/a.png", "images/nope.png", None, "images/a.png", "images/a.png"],
                      "row": pa.array([0, 1, 2, 3, 4], pa.int64())})
    settings = row_settings(SourceColumns(image=None, path="file", caption=None, id="id"), "file://" + table_uri)
    batch = prepare_images(with_lookups(paths, repeat_of={4: 0}), settings=settings, errors_uri=str(tmp_path / "out" / "errors"))
    assert batch["id"].tolist() == ["a"] and batch["pixels"].shape == (1, 64, 64, 3)
    assert batch["source"][0] == "file://" + str(tmp_path / "images" / "a.png")
    errors = errors_of(tmp_path / "out")
    assert errors["code"].to_dict() == {"b": "unreadable_path", "c": "missing_source", "000000003": "null_id", "a": "duplicate_id"}
    assert pd.isna(errors.loc["b", "cache_key"]) and (errors["run"] == 1).all()
    assert (errors["cause"] == "permanent").all()  # a path that is not there is the row's own fault: a rerun leaves it

    # the same bytes inline, as HF datasets stores images: same content hash, and a done row is skipped
    struct = pa.table({"image": [{"bytes": image, "path": "a.png"}], "row": pa.array([0], pa.int64())})
    inline = row_settings(SourceColumns(image="image", path=None, caption=None, id=None), "s3://bucket/t.parquet")
    again = prepare_images(with_lookups(struct), settings=inline, errors_uri=str(tmp_path / "x"))
    assert again["content_hash"][0] == batch["content_hash"][0] and again["source"][0] == "s3://bucket/t.parquet#row=0"
    assert prepare_images(with_lookups(struct, done={0: again["cache_key"][0]}), settings=inline, errors_uri=str(tmp_path / "x")) == {}


def encoded_batch(ids: list[str], latents: np.ndarray) -> dict[str, np.ndarray]:
    rows = len(ids)
    return {
        "id": np.array(ids, dtype=object), "row": np.arange(rows), "source": np.array(["s"] * rows, dtype=object),
        "content_hash": np.array(["h"] * rows, dtype=object), "cache_key": np.array([f"key-{i}" for i in ids], dtype=object),
        "seed": np.arange(rows), "original_size": np.full((rows, 2), 64), "crop_top_left": np.zeros((rows, 2)),
        "target_size": np.full((rows, 2), 64), "latent": latents, "busy_seconds_vae_encoder": np.full(rows, 0.5),
    }


LAYOUT = LatentLayout(dtype="float16", fixed_shape=True, flip=False, caption=False, text_embeddings=False)


def test_commit_writes_a_tensor_part_with_exact_stats_and_sends_overflow_to_errors(tmp_path):
    output = RunOutput(str(tmp_path), "latents")
    latents = np.random.default_rng(0).normal(size=(3, 4, 8, 8)).astype(np.float32)
    latents[2, 1, 0, 0] = 1e6  # beyond float16
    summary = commit_latents(encoded_batch(["a", "b", "c"], latents), output=output, layout=LAYOUT, run=1)
    assert summary["ok_rows"].tolist() == [2] and summary["error_rows"].tolist() == [1]
    assert json.loads(summary["busy"][0]) == {"vae_encoder": 1.5}
    table = pq.read_table(tmp_path / "latents")
    stored = tensor_values(table.column("latent"))
    assert stored.dtype == np.float16 and stored.shape == (2, 4, 8, 8)
    assert table.schema.field("latent").type == pa.list_(pa.list_(pa.list_(pa.float16(), 8), 8), 4)  # [C][H][W]
    np.testing.assert_array_equal(stored, latents[:2].astype(np.float16))
    values = stored.astype(np.float64).transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(output.latent_stats().std, values.std(axis=1), rtol=1e-12)
    assert errors_of(tmp_path).loc["c", "code"] == "non_finite_latent"
    assert "--latent-dtype float32" in errors_of(tmp_path).loc["c", "reason"]


@pytest.mark.parametrize("in_driver_rows", [0, ledger.LEDGER_IN_DRIVER_ROWS], ids=["tasks", "in-driver"])
def test_the_ledger_removes_superseded_copies_looks_up_done_keys_and_counts(tmp_path, ray_session, monkeypatch, in_driver_rows):
    """``pipelines.encoding.ledger`` on a real local Ray, as tasks and (a small ledger) in the driver, with the same
    results: an interrupted rerun left two copies of "b"."""
    monkeypatch.setattr(ledger, "LEDGER_IN_DRIVER_ROWS", in_driver_rows)
    output = RunOutput(str(tmp_path / "out"), "latents")
    rng = np.random.default_rng(1)
    first = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    commit_latents(encoded_batch(["a", "b", "c"], first), output=output, layout=LAYOUT, run=1)
    newer = rng.normal(5.0, 1.0, size=(1, 4, 8, 8)).astype(np.float32)
    commit_latents(encoded_batch(["b"], newer), output=output, layout=LAYOUT, run=2)  # as an interrupted rerun leaves it
    # the input now: a, b, c, "a" again, a row without id, and a new row d
    pq.write_table(pa.table({"id": ["a", "b", "c", "a", None, "d"]}), tmp_path / "input.parquet")
    fragments = io.parquet_fragments(str(tmp_path / "input.parquet"))[1]

    lookup = look_up(output, fragments, "id")
    assert lookup.superseded_rows_removed == 1 and lookup.rows_done == 3 and lookup.last_run == 2
    items = ray_session.get(lookup.items[0])
    assert items.column("lookup_row").to_pylist() == [[0, 1, 2, 3]]
    assert items.column("lookup_done_key").to_pylist() == [["key-a", "key-b", "key-c", None]]
    assert items.column("lookup_repeat_of").to_pylist() == [[-1, -1, -1, 0]]
    table = pq.read_table(tmp_path / "out" / "latents")
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"] and len(os.listdir(tmp_path / "out" / "latents")) == 2
    held = dict(zip(table.column("id").to_pylist(), latents_of(table)))
    np.testing.assert_array_equal(held["b"], newer[0].astype(np.float16))
    everything = np.stack([held[i] for i in "abc"]).astype(np.float64).transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(output.latent_stats().mean, everything.mean(axis=1), rtol=1e-10)

    # run 3 encodes "a" again and writes the errors of positions 3 and 4; "zz" is held but not in the input
    commit_latents(encoded_batch(["a", "zz"], rng.normal(size=(2, 4, 8, 8)).astype(np.float32)), output=output, layout=LAYOUT, run=3)
    errors = pa.table({"id": ["a", "000000004"], "row": pa.array([3, 4], pa.int64()), "stage": ["prepare"] * 2, "reason": ["r"] * 2,
                       "code": ["duplicate_id", "null_id"], "source": [None, None], "content_hash": [None, None],
                       "cache_key": [None, None], "run": [3, 3], "cause": ["permanent"] * 2}, schema=ENCODE_ERRORS_SCHEMA)
    output.commit(None, errors, None)
    counts = settle(output, fragments, "id", run=3)
    assert counts == {"input_rows": 6, "ok_rows": 3, "error_rows": 2, "encoded_this_run": 2, "errors_this_run": 2,
                      "cached_rows": 2, "rows_not_in_input": 1, "superseded_rows_removed": 1}
    assert sorted(pq.read_table(tmp_path / "out" / "latents").column("id").to_pylist()) == ["a", "b", "c", "zz"]


def test_the_ledger_counts_an_input_without_rows(tmp_path, ray_session):
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    fragments = io.parquet_fragments(str(tmp_path / "empty.parquet"))[1]
    output = RunOutput(str(tmp_path / "out"), "latents")
    lookup = look_up(output, fragments, "id")
    assert lookup.rows_done == 0 and ray_session.get(lookup.items[0]).column("lookup_row").to_pylist() == [[]]
    assert settle(output, fragments, "id", run=1)["input_rows"] == 0


def test_bucketed_latents_are_nested_lists_sorted_by_shape_with_runs_in_the_footer(tmp_path):
    output = RunOutput(str(tmp_path), "latents")
    latents = np.empty(3, dtype=object)
    latents[0], latents[1], latents[2] = np.ones((4, 8, 8), np.float32), np.full((4, 4, 12), 2.0, np.float32), np.zeros((4, 8, 8), np.float32)
    layout = LatentLayout(dtype="float32", fixed_shape=False, flip=False, caption=False, text_embeddings=False)
    commit_latents(encoded_batch(["a", "b", "c"], latents), output=output, layout=layout, run=1)
    frame = pd.read_parquet(tmp_path / "latents")
    assert frame["id"].tolist() == ["b", "a", "c"]  # grouped by shape, stable
    assert [np.stack([np.stack(channel) for channel in value]).shape for value in frame["latent"]] == [(4, 4, 12), (4, 8, 8), (4, 8, 8)]
    assert frame["latent_shape"].map(list).tolist() == [[4, 4, 12], [4, 8, 8], [4, 8, 8]]
    table = pq.read_table(tmp_path / "latents")
    assert [latent.shape for latent in latents_of(table)] == [(4, 4, 12), (4, 8, 8), (4, 8, 8)]
    assert json.loads(table.schema.metadata[SHAPE_RUNS_METADATA_KEY]) == [[[4, 4, 12], 0, 1], [[4, 8, 8], 1, 2]]
    assert output.latent_stats().count.tolist() == [64 + 48 + 64] * 4


@pytest.mark.parametrize("base, reference, expected", [
    ("s3://bucket/corpus/part-0.parquet", "images/a.jpg", "s3://bucket/corpus/images/a.jpg"),
    ("file:///data/corpus/t.parquet", "../other/b.png", "file:///data/other/b.png"),
    ("/data/t.parquet", "c.png", "/data/c.png"),
    ("s3://bucket/t.parquet", "gs://elsewhere/d.png", "gs://elsewhere/d.png"),
])
def test_relative_references_resolve_against_the_table_file(base, reference, expected):
    from pipelines.runtime.io import resolve_reference

    assert resolve_reference(base, reference) == expected


def test_cpu_tasks_import_no_model_code():
    """Decode and commit tasks run in plain Ray workers: importing torch there would cost seconds per worker."""
    import subprocess
    import sys

    code = "import sys, pipelines.encoding.encode_rows, pipelines.encoding.latent_output; print(sorted(m for m in ('torch', 'diffusers', 'workers.runtime.base') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_a_rerun_rewrites_parts_of_the_older_encoding(tmp_path):
    """Outputs written before issue 12 (Arrow fixed-shape tensors; flat lists for buckets) are converted, so new parts join them as one table."""
    output = RunOutput(str(tmp_path), "latents")
    os.makedirs(tmp_path / "latents")
    values = [np.full((4, 4, 12), 1, np.float16), np.full((4, 8, 8), 2, np.float16), np.full((4, 4, 12), 3, np.float16)]
    embeddings = np.ones((3, 5, 3), np.float16)
    old = pa.table({
        "id": ["c", "d", "e"], "latent": pa.array([value.ravel() for value in values], pa.list_(pa.float16())),
        "latent_shape": pa.array([list(value.shape) for value in values], pa.list_(pa.int32(), 3)),
        "prompt_embeds": pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [5, 3]),
                                                         pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), 15)),
        "row": pa.array([0, 1, 2], pa.int64()), "run": pa.array([1, 1, 1], pa.int32()), "cache_key": ["k"] * 3,
    })
    pq.write_table(old, tmp_path / "latents" / "part-old.parquet")
    new = upgrade_part(output, str(tmp_path / "latents" / "part-old.parquet"))  # a rerun converts before anything else
    assert os.listdir(tmp_path / "latents") == [os.path.basename(new)] != ["part-old.parquet"]
    table = pq.read_table(tmp_path / "latents")
    assert table.column("id").to_pylist() == ["c", "e", "d"]
    assert table.schema.field("latent").type == pa.list_(pa.list_(pa.list_(pa.float16())))
    assert table.schema.field("prompt_embeds").type == pa.list_(pa.list_(pa.float16(), 3), 5)
    assert [latent.flatten()[0] for latent in latents_of(table)] == [1, 3, 2]
    assert output.latent_stats().count.tolist() == [48 + 48 + 64] * 4
    assert upgrade_part(output, new) == new  # converted once


def test_a_rerun_rewrites_fixed_shape_tensor_parts_in_place(tmp_path):
    output = RunOutput(str(tmp_path), "latents")
    latents = np.random.default_rng(2).normal(size=(2, 4, 8, 8)).astype(np.float32)
    commit_latents(encoded_batch(["a", "b"], latents), output=output, layout=LAYOUT, run=1)
    part = os.listdir(tmp_path / "latents")[0]
    current = pq.read_table(tmp_path / "latents" / part)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(latents.astype(np.float16).ravel()), 256)
    old = current.set_column(1, pa.field("latent", pa.fixed_shape_tensor(pa.float16(), [4, 8, 8])),
                             pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [4, 8, 8]), storage))
    pq.write_table(old.replace_schema_metadata({}), tmp_path / "latents" / part)
    uri = str(tmp_path / "latents" / part)
    assert upgrade_part(output, uri) == uri and os.listdir(tmp_path / "latents") == [part]  # same rows, same order: same part
    table = pq.read_table(tmp_path / "latents")
    assert table.schema.field("latent").type == pa.list_(pa.list_(pa.list_(pa.float16(), 8), 8), 4)
    np.testing.assert_array_equal(tensor_values(table.column("latent")), latents.astype(np.float16))


def test_caption_embeddings_of_their_own_length_survive_conversion_and_removal(tmp_path):
    """Z-Image, Qwen-Image: a part converted to today's encoding (its footer without shape runs) or rewritten
    without a superseded copy keeps each caption's tokens, unpadded, and their lengths."""
    output = RunOutput(str(tmp_path), "latents")
    shapes, tokens = {"a": (4, 8, 8), "b": (4, 4, 12), "c": (4, 8, 8)}, {"a": 2, "b": 4, "c": 1}
    latents, embeds = np.empty(3, object), np.empty(3, object)
    for index, row_id in enumerate(shapes):
        latents[index], embeds[index] = np.ones(shapes[row_id], np.float32), np.full((tokens[row_id], 3), index, np.float32)
    batch = {**encoded_batch(list(shapes), latents), "prompt_embeds": embeds, "caption_truncated": np.zeros(3, bool)}
    layout = LatentLayout(dtype="float32", fixed_shape=False, flip=False, caption=False, text_embeddings=("prompt_embeds",),
                          fixed_length_embeddings=False)
    commit_latents(batch, output=output, layout=layout, run=1)

    def check(ids: list[str]) -> None:
        table = pq.read_table(tmp_path / "latents")
        assert table.column("id").to_pylist() == ids and table.schema.field("prompt_embeds").type == pa.list_(pa.list_(pa.float32(), 3))
        assert table.column("prompt_embeds_length").to_pylist() == [tokens[row_id] for row_id in ids]
        for row_id, embedding in zip(ids, latents_of(table, "prompt_embeds")):
            np.testing.assert_array_equal(embedding, np.full((tokens[row_id], 3), "abc".index(row_id), np.float32))

    check(["b", "a", "c"])  # grouped by latent shape
    [part] = os.listdir(tmp_path / "latents")
    older = pq.read_table(tmp_path / "latents" / part).take([1, 0, 2]).replace_schema_metadata({})  # no shape runs, not grouped
    pq.write_table(older, tmp_path / "latents" / part)
    uri = upgrade_part(output, str(tmp_path / "latents" / part))
    check(["b", "a", "c"])
    remove_rows(output, uri, np.array([1]), is_results=True)
    check(["b", "c"])
