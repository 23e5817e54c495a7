"""Text stage: prompts -> the embeddings the family's denoiser takes, by the pipeline's own ``encode_prompt``.

Columns are named as the pipeline's ``__call__`` arguments (``prompt_embeds``,
``pooled_prompt_embeds``, and ``negative_...`` of each), so the denoiser stage hands
them to diffusers unchanged.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from workers.runtime.base import Batch, ModelWorker, embedding_columns, group_rows
from workers.runtime.columns import COUNT_COLUMN_PREFIX, failed_rows, mark_failed, stack_column, with_placeholders
from workers.families import ModelFamily
from workers.runtime.devices import inference_mode, on_compute_thread
from workers.runtime.loras import LORA_CODE, LoraAdapters, LoraError, LoraFetch, row_loras
from workers.runtime.memory import OUT_OF_MEMORY, run_in_halves
from workers.runtime.text_cache import Embedding, JobTextCache, LruBytes, embedding_bytes

logger = logging.getLogger(__name__)

# embeddings kept per actor for the texts it saw last, before asking the job cache; T5
# embeddings are megabytes each, so the cache is bounded by bytes, not entries
CACHE_BYTES = 256 * 2**20
# per-row count columns the commit tasks sum into run.json: distinct texts of a batch
# encoded, and served from a cache (this actor's or the job's)
ENCODED_COLUMN = f"{COUNT_COLUMN_PREFIX}texts_encoded"
REUSED_COLUMN = f"{COUNT_COLUMN_PREFIX}texts_reused"
# first pause before asking again for texts another actor is encoding, and the longest
# (doubling): a batch of texts takes a GPU tens of milliseconds, a CPU seconds
WAIT_SECONDS = 0.01
MAX_WAIT_SECONDS = 0.5
# and what the job cache cost the batch (lookups, fetches, puts, registrations), in whole microseconds
CACHE_MICROSECONDS_COLUMN = f"{COUNT_COLUMN_PREFIX}text_cache_microseconds"
WAIT_MICROSECONDS_COLUMN = f"{COUNT_COLUMN_PREFIX}text_cache_wait_microseconds"  # waiting for other actors' encodings


class TextEncoderWorker(ModelWorker):
    STAGE = "text_encoder"
    USES_TEXT_CACHE = True  # takes the job's text cache (``text_cache``); CaptionEncoderWorker inherits it
    REQUIRED_COLUMNS = {"prompt": "text to draw", "negative_prompt": "text to steer away from ('' for none)"}

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return (*embedding_columns(family), "prompt_truncated")

    @on_compute_thread
    def __init__(self, model, *, max_sequence_length: int | None = None, true_cfg_scale: float | None = None,
                 text_cache: JobTextCache | None = None, lora_files: LoraFetch | None = None, max_loras: int = 8,
                 loras: LoraAdapters | None = None, **options):
        super().__init__(model, **options)
        self.max_sequence_length = max_sequence_length
        # FLUX and Qwen-Image read negative embeddings only with true CFG: 8 MB of T5 states per row are not sent for nothing
        self.sends_negative = self.family.reads_negative(self.family.true_cfg_scale(true_cfg_scale))
        self.pipe = self.load_pipeline(self.family.text_components, config_only=self.family.text_stage_configs)
        # per-row LoRA adapters with text-encoder layers; a fused actor's stages share one set (one pipeline)
        self.loras = loras or LoraAdapters(self.pipe, lora_files, max_loras)
        # most rows have no negative prompt: the empty text is encoded once per actor, as it
        # starts (not counted in texts_encoded); other texts go through the caches
        self._cache: LruBytes[str, Embedding] = LruBytes(CACHE_BYTES)
        self.text_cache = text_cache  # None (no Ray, or --text-cache off): this actor's cache only
        self._counts = {ENCODED_COLUMN: 0, REUSED_COLUMN: 0, CACHE_MICROSECONDS_COLUMN: 0, WAIT_MICROSECONDS_COLUMN: 0}
        self._empty = self._encode([""])[0]
        self._no_negative = self.family.empty_negative(self.pipe, self._empty)

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            # rows an earlier step failed (invalid rows) are not encoded: they stand for "" (encoded at start-up)
            skipped = failed_rows(batch)
            prompts = ["" if skip else str(text) for text, skip in zip(batch["prompt"], skipped)]
            negatives = [str(text) if self.sends_negative and not skip else "" for text, skip in zip(batch["negative_prompt"], skipped)]

            # 1. rows whose LoRAs have text-encoder layers are encoded with them active, the others
            # (most rows) with the base model; 2. each group's distinct texts from a cache or encoded
            # (``embed``); a row whose texts do not fit in GPU memory fails
            pairs: dict[int, tuple | None] = {}
            for loras, rows in group_rows([() if skip else row_loras(batch, row) for row, skip in enumerate(skipped)]).items():
                namespace = self._activate_text_loras(batch, rows, loras, prompts, negatives)
                pairs.update(self._embed_rows(rows, prompts, negatives, namespace))
            failed = [pairs[row] is None for row in range(len(prompts))]
            mark_failed(batch, {row: (OUT_OF_MEMORY, text_out_of_memory(prompts[row])) for row in range(len(prompts)) if failed[row]}, self.STAGE)

            # 3. one column per embedding; no negative prompt encodes as the family says (SDXL: zeros)
            for name in self.family.embedding_columns:
                batch[name] = stack_column(with_placeholders([None if failed[row] else pairs[row][0][name] for row in range(len(prompts))]))
                batch[f"negative_{name}"] = stack_column(with_placeholders(
                    [None if failed[row] else pairs[row][1][name] for row in range(len(prompts))]
                )) if self.sends_negative else np.zeros((len(prompts), 0), np.float32)

            # 4. which prompts lost tokens to a tokenizer's limit (diffusers truncates silently)
            batch["prompt_truncated"] = np.array([self.is_truncated(text) for text in prompts], dtype=bool)
        self.take_counts(batch)
        return batch

    def _activate_text_loras(self, batch: Batch, rows: list[int], loras: tuple, prompts: list[str], negatives: list[str]) -> str:
        """Activate the adapters of a group's LoRAs that have text-encoder layers (none: the base text encoders);
        the cache namespace of their embeddings. Rows whose LoRA cannot be applied fail, and stand for ""."""
        try:
            adapters = self.loras.adapters([uri for uri, _ in loras]) if loras else []
        except LoraError as error:
            mark_failed(batch, {row: (LORA_CODE, str(error)) for row in rows}, self.STAGE)
            for row in rows:
                prompts[row] = negatives[row] = ""
            adapters = []
        text = [(adapter, scale) for adapter, (_, scale) in zip(adapters, loras) if adapter.components & set(self.family.text_components)]
        self.loras.activate([adapter for adapter, _ in text], [scale for _, scale in text])
        # embeddings under text-encoder adapters are cached apart from the base model's, per file content and weight
        return "\0lora:" + ",".join(f"{adapter.sha256}*{scale!r}" for adapter, scale in text) + "\0" if text else ""

    def _embed_rows(self, rows: list[int], prompts: list[str], negatives: list[str], namespace: str) -> dict[int, tuple | None]:
        """(prompt embedding, negative embedding) per row of one group, None where they did not fit."""
        texts = [prompts[row] for row in rows] + [negatives[row] for row in rows if negatives[row]]
        by_text = dict(zip(texts, self.embed(texts, namespace)))
        # the empty text (no negative prompt, skipped rows): encoded at start-up for the base model, else under the adapters
        empty = self._empty if not namespace else self.embed([""], namespace)[0]
        by_text[""] = empty
        no_negative = self._no_negative if not namespace else (self.family.empty_negative(self.pipe, empty) if empty is not None else None)
        pairs = {}
        for row in rows:
            prompt, negative = by_text[prompts[row]], (by_text[negatives[row]] if negatives[row] else no_negative)
            pairs[row] = None if prompt is None or negative is None else (prompt, negative)
        return pairs

    def embed(self, texts: list[str], namespace: str = "") -> list[dict[str, np.ndarray] | None]:
        """Embeddings per text; each distinct text is encoded once per job (once per actor without a job cache).

        Texts are encoded in halves after an out-of-memory error; one that does not fit alone gets None.
        ``namespace`` prefixes the caches' keys: texts encoded under text-encoder LoRA adapters.
        """
        # 1. the batch's distinct texts as cache keys ("" was encoded at start-up for the base model); 2. this actor's own cache
        distinct = list(dict.fromkeys(namespace + text for text in texts if namespace or text != ""))
        found = {text: embedding for text in distinct if (embedding := self._cache.get(text)) is not None}
        wanted, encoded, pause = [text for text in distinct if text not in found], {}, WAIT_SECONDS
        while wanted:
            # 3. one lookup in the job cache: hits, texts other actors are encoding now, and ours to encode
            fetched, pending = self._fetch(wanted)
            ours = [text for text in wanted if text not in fetched and text not in pending]
            # 4. encode only those, in one call; 5. put them in the object store and register them
            new = self._encode_claimed(ours, namespace)
            self._store(new)
            found.update(fetched)
            encoded.update(new)
            # 6. then what other actors were encoding, asked again after a pause
            wanted = pending
            if wanted:
                time.sleep(pause)
                self._counts[WAIT_MICROSECONDS_COLUMN] += round(pause * 1e6)
                pause = min(2 * pause, MAX_WAIT_SECONDS)
        by_text = {**found, **encoded}
        for text in distinct:
            if text not in self._cache and text in by_text:
                self._cache.put(text, by_text[text], embedding_bytes(by_text[text]))
        self._counts[ENCODED_COLUMN] += len(encoded)
        self._counts[REUSED_COLUMN] += len(found)
        return [self._empty if text == "" and not namespace else by_text.get(namespace + text) for text in texts]

    def _encode_claimed(self, texts: list[str], namespace: str = "") -> dict[str, Embedding]:
        """Encode the texts of these cache keys (``namespace`` + text); their embeddings by key."""
        if not texts:
            return {}
        try:
            run = run_in_halves(list(range(len(texts))), lambda part: self._encode([texts[index][len(namespace):] for index in part]))
        except BaseException:
            # other actors wait for these texts: let the next one that asks encode them
            self._release(texts)
            raise
        self._oom_splits += run.splits
        encoded = {texts[index]: embedding for index, embedding in run.outputs.items()}
        self._release([text for text in texts if text not in encoded])  # did not fit here: another actor may try
        return encoded

    def _release(self, texts: list[str]) -> None:
        if texts and self.text_cache is not None:
            self.text_cache.forget(texts)

    def take_counts(self, batch: Batch) -> None:
        """The counts since the last batch, on this batch's first row (whole numbers, summed exactly by the commit tasks)."""
        rows = len(next(iter(batch.values())))
        for column, count in self._counts.items():
            batch[column] = np.zeros(rows, np.int64)
            if rows:
                batch[column][0], self._counts[column] = count, 0

    def _fetch(self, texts: list[str]) -> tuple[dict[str, Embedding], list[str]]:
        if not texts or self.text_cache is None:
            return {}, []
        started = time.perf_counter()
        try:
            return self.text_cache.fetch(texts)
        except Exception as error:  # the cache only saves work: without it, this actor encodes on its own
            self._lose_job_cache(error)
            return {}, []
        finally:
            self._counts[CACHE_MICROSECONDS_COLUMN] += round((time.perf_counter() - started) * 1e6)

    def _store(self, encoded: dict[str, Embedding]) -> None:
        if not encoded or self.text_cache is None:
            return
        started = time.perf_counter()
        try:
            self.text_cache.store(encoded)
        except Exception as error:
            self._lose_job_cache(error)
        finally:
            self._counts[CACHE_MICROSECONDS_COLUMN] += round((time.perf_counter() - started) * 1e6)

    def _lose_job_cache(self, error: Exception) -> None:
        logger.warning("text cache: %s: %s; this actor goes on with its own cache", type(error).__name__, error)
        self.text_cache = None

    def is_truncated(self, text: str) -> bool:
        return self.family.is_truncated(self.pipe, text, self.max_sequence_length)

    @inference_mode
    def _encode(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        columns = self.family.encode_texts(self.pipe, texts, self.device, self.max_sequence_length)
        # copies: a row of the batch's array would keep the whole batch alive in the caches
        return [{name: np.array(columns[name][index]) for name in columns} for index in range(len(texts))]


def text_out_of_memory(text: str) -> str:
    return f"out of GPU memory encoding a text of {len(text)} characters"
