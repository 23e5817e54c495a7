"""Latent datasets written by latentray's own commit task (real Parquet parts, no model, no Ray)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.encoding.latent_output import LatentLayout, commit_latents, latents_of
from pipelines.runtime.outputs import RunOutput

BUCKET_SHAPES = ((4, 8, 8), (4, 6, 10), (4, 10, 6))


def row_value(row_id: str) -> int:
    """The number every latent value of row ``r-<n>`` holds: a batch tells which rows it carries."""
    return int(row_id.split("-")[1])


def token_count(row_id: str, tokens: int) -> int:
    """Tokens of row ``r-<n>``'s caption embedding when captions have lengths of their own: 1 to ``tokens``."""
    return 1 + row_value(row_id) % tokens


def encoded_rows(first: int, shapes: list[tuple[int, ...]], tokens: int = 5, width: int = 3, ragged: bool = False) -> dict[str, np.ndarray]:
    """What the encoders hand the commit task for rows ``r-<first>``..., each latent filled with its number.

    ``ragged``: as Z-Image's encoder, each row's ``prompt_embeds`` has its own tokens (``token_count``),
    filled with the row's number; otherwise [tokens, width] ones."""
    rows = len(shapes)
    ids = [f"r-{first + index}" for index in range(rows)]
    latents = np.empty(rows, dtype=object)
    for index, shape in enumerate(shapes):
        latents[index] = np.full(shape, row_value(ids[index]), np.float32)
    return {
        "id": np.array(ids, dtype=object), "row": np.arange(first, first + rows), "seed": np.arange(rows),
        "source": np.array(["s"] * rows, dtype=object), "content_hash": np.array(["h"] * rows, dtype=object),
        "cache_key": np.array([f"key-{row_id}" for row_id in ids], dtype=object),
        "original_size": np.full((rows, 2), 96), "crop_top_left": np.zeros((rows, 2)),
        "target_size": np.array([[shape[1] * 8, shape[2] * 8] for shape in shapes]), "latent": latents,
        "caption": np.array([None if index % 7 == 3 else f"caption {row_id}" for index, row_id in enumerate(ids)], dtype=object),
        "prompt_embeds": ragged_embeddings(ids, tokens, width) if ragged else np.ones((rows, tokens, width), np.float32),
        "pooled_prompt_embeds": np.ones((rows, width), np.float32),
        "caption_truncated": np.zeros(rows, bool),
    }


def ragged_embeddings(ids: list[str], tokens: int, width: int) -> np.ndarray:
    """Per-row [tokens of the row, width] embeddings filled with the row's number, as an object array."""
    column = np.empty(len(ids), dtype=object)
    for index, row_id in enumerate(ids):
        column[index] = np.full((token_count(row_id, tokens), width), row_value(row_id), np.float32)
    return column


def write_latent_dataset(uri: str, part_rows: list[int], *, buckets: bool, seed: int = 0, tokens: int = 5, width: int = 3,
                         ragged: bool = False) -> list[str]:
    """A latents/ output of parts of ``part_rows`` rows (bucket shapes drawn at random); returns every id.
    ``ragged``: caption embeddings of each row's own length (``encoded_rows``)."""
    output = RunOutput(uri, "latents")
    layout = LatentLayout(dtype="float16", fixed_shape=not buckets, flip=False, caption=True, text_embeddings=("prompt_embeds", "pooled_prompt_embeds"),
                          fixed_length_embeddings=not ragged)
    generator = np.random.default_rng(seed)
    first = 0
    for rows in part_rows:
        shapes = [BUCKET_SHAPES[generator.integers(len(BUCKET_SHAPES))] if buckets else BUCKET_SHAPES[0] for _ in range(rows)]
        commit_latents(encoded_rows(first, shapes, tokens, width, ragged), output=output, layout=layout, run=1)
        first += rows
    return [f"r-{index}" for index in range(first)]


# -- what an encode job wrote -------------------------------------------------------------------


def latents_frame(output) -> pd.DataFrame:
    table = pq.read_table(os.path.join(output, "latents"))
    frame = table.drop_columns([c for c in ("latent", "latent_flipped", "prompt_embeds") if c in table.column_names]).to_pandas()
    frame["latent"] = latents_of(table)
    return frame.set_index("id").sort_index()


def assert_stats_equal_numpy(output) -> None:
    stats = json.load(open(os.path.join(output, "latent_stats.json")))
    values = np.concatenate([latent.astype(np.float64).reshape(4, -1) for latent in latents_frame(output)["latent"]], axis=1)
    np.testing.assert_allclose(stats["mean"], values.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], values.std(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats["min"], values.min(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats["max"], values.max(axis=1), rtol=1e-5)
    assert stats["count"] == [values.shape[1]] * 4
    assert stats["suggested"]["scaling_factor"] == pytest.approx(stats["scaling_factor"] / values.std(), rel=1e-5)
    assert stats["suggested"]["shift_factor"] == pytest.approx(stats["shift_factor"] + values.mean() / stats["scaling_factor"], rel=1e-5)
