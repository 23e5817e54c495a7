"""Each distinct text encoded once per job: the cache's byte bound, the text stage's use of it
(directly, no Ray), and generation and encoding jobs on a real local Ray."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers import assert_images_match, diffusers_reference, read_image, write_prompts
from pipelines.generation.generate import run_generation
from pipelines.runtime.config import EncodeConfig, GenerateConfig, StageOptions
from workers.generation.text_encoder import CACHE_MICROSECONDS_COLUMN, ENCODED_COLUMN, REUSED_COLUMN, TextEncoderWorker
from workers.runtime.presets import materialize_preset
from workers.runtime.text_cache import ENTRY_OVERHEAD_BYTES, PENDING, LruBytes, TextCacheShard, embedding_bytes


# -- the cache, no Ray ----------------------------------------------------------------------------


def test_lru_keeps_the_most_recently_used_entries_within_its_byte_budget():
    cache: LruBytes[str, str] = LruBytes(budget_bytes=100)
    for key in "abcd":
        assert cache.put(key, key.upper(), 30)
    # 4 x 30 bytes > 100: the least recently used ("a") left
    assert "a" not in cache and len(cache) == 3 and cache.bytes == 90 and cache.evicted == 1
    # reading "b" makes it the most recent: "c" leaves next
    assert cache.get("b") == "B"
    assert cache.put("e", "E", 30)
    assert [key for key in "bcde" if key in cache] == ["b", "d", "e"] and cache.bytes == 90
    # an entry above the whole budget is refused and evicts nothing
    assert not cache.put("huge", "H", 101) and len(cache) == 3
    # a replaced entry counts once, at its new size: the least recent ("d") makes room
    assert cache.put("e", "E2", 50) and cache.bytes == 30 + 50 and "d" not in cache and cache.get("e") == "E2"
    with pytest.raises(ValueError, match="budget_bytes"):
        LruBytes(-1)


def test_a_shard_claims_misses_counts_hits_and_duplicates_and_bounds_its_embeddings_by_bytes():
    embedding = {"prompt_embeds": np.zeros((77, 32), np.float32)}
    size = embedding_bytes(embedding)
    assert size == 77 * 32 * 4 + ENTRY_OVERHEAD_BYTES
    shard = TextCacheShard(budget_bytes=3 * size)
    shard.register([(key, ["ref-" + key], size) for key in ("a", "b")])
    shard.register([("b", ["another ref"], size)])  # "b" encoded twice: counted, the first kept
    # a miss is claimed by the asker; whoever asks next waits for it
    assert shard.lookup(["a", "b", "c"]) == [["ref-a"], ["ref-b"], None]
    assert shard.lookup(["c"]) == [PENDING]
    shard.register([(key, ["ref-" + key], size) for key in ("c", "d")])  # 4 entries > budget: "a" goes
    assert shard.lookup(["a", "d", "c"]) == [None, ["ref-d"], ["ref-c"]]
    # a claim given up (its encoding failed) passes to the next asker
    shard.forget(["a"])
    assert shard.lookup(["a"]) == [None]
    assert shard.stats() == {"entries": 3, "bytes": 3 * size, "budget_bytes": 3 * size, "lookups": 8, "hits": 4, "waits": 1,
                             "registered": 4, "evicted": 1, "duplicates": 1, "too_large": 0}
    # a claim older than claim_seconds passes on too (its actor died, or is that slow)
    stale = TextCacheShard(budget_bytes=size, claim_seconds=0.0)
    assert stale.lookup(["x"]) == [None] and stale.lookup(["x"]) == [None]
    # an actor's claim passes back to that actor asking again (Ray restarted it and resubmitted its batch), never to another
    claimed = TextCacheShard(budget_bytes=size)
    assert claimed.lookup(["y"], "actor-1") == [None]
    assert claimed.lookup(["y"], "actor-2") == [PENDING] and claimed.lookup(["y"]) == [PENDING]
    assert claimed.lookup(["y"], "actor-1") == [None]


class InProcessCache:
    """A job cache without Ray: what two text-stage actors share (``JobTextCache``'s fetch and store)."""

    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.lookups: list[list[str]] = []

    def fetch(self, texts):
        self.lookups.append(list(texts))
        return {text: self.entries[text] for text in texts if text in self.entries}, []

    def forget(self, texts):
        pass

    def store(self, embeddings):
        self.entries.update(embeddings)


def test_text_stage_actors_share_one_job_cache_and_count_what_they_encode(tiny_model_dir, monkeypatch):
    cache = InProcessCache()
    first, second = (TextEncoderWorker(tiny_model_dir, threads=1, text_cache=cache) for _ in range(2))
    encoded: list[list[str]] = []
    for worker in (first, second):
        original = worker._encode
        monkeypatch.setattr(worker, "_encode", lambda texts, original=original: encoded.append(texts) or original(texts))

    def batch(prompts, negatives):
        return {"prompt": np.array(prompts, dtype=object), "negative_prompt": np.array(negatives, dtype=object)}

    # 1. the first actor encodes its batch's distinct texts ("" was encoded at start-up)
    one = first(batch(["cat", "dog", "cat"], ["", "ugly", ""]))
    assert encoded == [["cat", "dog", "ugly"]] and cache.lookups == [["cat", "dog", "ugly"]]
    assert one[ENCODED_COLUMN].tolist() == [3, 0, 0] and one[REUSED_COLUMN].tolist() == [0, 0, 0]
    assert one[CACHE_MICROSECONDS_COLUMN][0] > 0
    # 2. the second actor finds them in the job cache, and encodes only what is new
    two = second(batch(["dog", "owl"], ["ugly", ""]))
    assert encoded[1:] == [["owl"]] and cache.lookups[1:] == [["dog", "owl", "ugly"]]
    assert two[ENCODED_COLUMN].tolist() == [1, 0] and two[REUSED_COLUMN].tolist() == [2, 0]
    np.testing.assert_array_equal(two["prompt_embeds"][0], one["prompt_embeds"][1])
    np.testing.assert_array_equal(two["negative_prompt_embeds"][0], one["negative_prompt_embeds"][1])
    # 3. its own cache answers before the job cache is asked
    three = second(batch(["owl"], [""]))
    assert len(cache.lookups) == 2 and three[REUSED_COLUMN].tolist() == [1]


def test_a_text_another_actor_is_encoding_is_waited_for_not_encoded_again(tiny_model_dir, monkeypatch):
    worker = TextEncoderWorker(tiny_model_dir, threads=1)
    dog = worker._encode(["dog"])[0]
    answers = iter([({}, ["dog"]), ({}, ["dog"]), ({"dog": dog}, [])])  # pending twice, then registered

    class Busy(InProcessCache):
        def fetch(self, texts):
            self.lookups.append(list(texts))
            return next(answers)

    worker.text_cache = cache = Busy()
    encoded: list[list[str]] = []
    original = worker._encode
    monkeypatch.setattr(worker, "_encode", lambda texts: encoded.append(texts) or original(texts))
    out = worker({"prompt": np.array(["dog", "dog"], dtype=object), "negative_prompt": np.array(["", ""], dtype=object)})
    assert encoded == [] and cache.lookups == [["dog"]] * 3
    assert out[ENCODED_COLUMN].tolist() == [0, 0] and out[REUSED_COLUMN].tolist() == [1, 0]
    np.testing.assert_array_equal(out["prompt_embeds"][1], dog["prompt_embeds"])


def test_without_a_job_cache_the_text_stage_encodes_as_before(tiny_model_dir):
    worker = TextEncoderWorker(tiny_model_dir, threads=1)
    assert worker.text_cache is None
    out = worker({"prompt": np.array(["cat", "cat"], dtype=object), "negative_prompt": np.array(["", ""], dtype=object)})
    assert out[ENCODED_COLUMN].tolist() == [1, 0] and out[REUSED_COLUMN].tolist() == [0, 0]


@pytest.mark.parametrize("fields, message", [
    ({"text_cache": "yes"}, "text_cache: must be true or false"),
    ({"text_cache_mib": 0}, "text_cache_mib: must be a whole number of MiB >= 1, got 0"),
])
def test_text_cache_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerateConfig(prompts="p.parquet", output="out", **fields)
    with pytest.raises(ValueError, match=message):
        EncodeConfig(images="i.parquet", output="out", **fields)


def test_text_cache_options_reach_the_configs(tmp_path):
    from jobs.options import add_encode_options, add_generate_options, encode_config, generate_config
    import argparse

    generate = argparse.ArgumentParser()
    add_generate_options(generate)
    config = generate_config(generate.parse_args(["--prompts", "p", "--output", "o", "--text-cache", "off", "--text-cache-mib", "64"]))
    assert config.text_cache is False and config.text_cache_mib == 64
    encode = argparse.ArgumentParser()
    add_encode_options(encode)
    config = encode_config(encode.parse_args(["--images", "i", "--output", "o"]))
    assert config.text_cache is True and config.text_cache_mib is None


# -- jobs on a real local Ray ---------------------------------------------------------------------


PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def cycling_rows(count: int) -> list[dict]:
    """Few distinct prompts, many seeds: rows cycle the prompts; some have a negative prompt, one of them another row's prompt."""
    negatives = {0: "", 1: "blurry", 2: "a red circle"}
    return [{"id": f"row{index:02d}", "prompt": PROMPTS[index % 3], "negative_prompt": negatives[index % 3] if index % 2 else "",
             "seed": 100 + index} for index in range(count)]


@pytest.mark.slow  # a whole Ray job or more: ~20 s and over
def test_a_split_job_encodes_each_distinct_text_once_across_its_text_actors(ray_session, tmp_path):
    # 24 rows in blocks of 2 (batches of 2) over 2 text-encoder actors: every text reaches both actors
    rows = cycling_rows(24)
    distinct = {row["prompt"] for row in rows} | {row["negative_prompt"] for row in rows if row["negative_prompt"]}
    assert len(distinct) == 4  # the negative "a red circle" is a prompt too: one text, one encoding
    prompts = write_prompts(tmp_path / "prompts.parquet", rows)
    output = tmp_path / "out"
    record = run_generation(GenerateConfig(
        prompts=prompts, output=str(output), model="tiny", steps=2, guidance=4.0, height=32, width=32, batch_size=2,
        placement="split", stages={"text_encoder": StageOptions(concurrency=2)},
    ))
    assert record["counts"]["ok_rows"] == 24 and record["rows_per_block"] == 2

    # 1. each distinct text encoded once in the job: an actor that asks for a text the other is
    #    encoding waits for it; every other batch's text was reused
    cache = record["text_cache"]
    assert record["texts_encoded"] == len(distinct) and cache["duplicates"] == 0, record
    assert record["texts_encoded"] + record["texts_reused"] >= 12 * 2  # 12 batches, 2 distinct texts each at least
    assert cache["entries"] == len(distinct) and cache["evicted"] == 0 and cache["shards"] == 1

    # 2. embeddings from the cache leave every image as diffusers draws it
    manifest = pd.read_parquet(output / "manifest").set_index("id")
    expected = diffusers_reference(materialize_preset("tiny"), [
        dict(row, num_inference_steps=2, guidance_scale=4.0, height=32, width=32) for row in rows
    ])
    for row, image in zip(rows, expected):
        assert_images_match(read_image(output / manifest.loc[row["id"], "image_path"]), image)


def test_an_encoding_job_encodes_each_distinct_caption_once_across_its_fused_actors(ray_session, tmp_path, tiny_model_dir):
    from image_helpers import picture, png, write_table
    from pipelines.encoding.encode import run_encoding
    from pipelines.encoding.latent_output import latents_of
    from workers.encoding.caption_encoder import CaptionEncoderWorker

    captions = [PROMPTS[index % 3] if index % 4 else None for index in range(12)]
    images = write_table(tmp_path / "images.parquet", [
        {"id": f"img{index:02d}", "image": png(picture(index, 32, 32)), "caption": caption} for index, caption in enumerate(captions)
    ])
    output = tmp_path / "latents"
    record = run_encoding(EncodeConfig(
        images=images, output=str(output), model="tiny", resolution=32, caption_column="caption", text_embeddings=True,
        latent_dtype="float32", batch_size=2, stages={"fused": StageOptions(concurrency=2)},
    ))
    assert record["counts"]["ok_rows"] == 12
    # a null caption is the empty text, encoded by each actor as it starts: not counted
    distinct = {caption for caption in captions if caption}
    assert record["texts_encoded"] == len(distinct) and record["text_cache"]["duplicates"] == 0, record
    assert record["text_cache"]["entries"] == len(distinct)

    # the stored embeddings are each caption's own, as the caption encoder alone returns them
    table = pq.read_table(output / "latents").sort_by("id")
    alone = CaptionEncoderWorker(tiny_model_dir, threads=1)({"caption": np.array(captions, dtype=object)})
    np.testing.assert_allclose(np.stack(latents_of(table, "prompt_embeds")), alone["prompt_embeds"], atol=1e-5)
