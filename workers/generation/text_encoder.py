"""Text stage: prompts -> the embeddings the family's denoiser takes, by the pipeline's own ``encode_prompt``.

Columns are named as the pipeline's ``__call__`` arguments (``prompt_embeds``,
``pooled_prompt_embeds``, and ``negative_...`` of each), so the denoiser stage hands
them to diffusers unchanged.
"""

from __future__ import annotations

import numpy as np

from workers.runtime.base import Batch, ModelWorker, embedding_columns
from workers.runtime.columns import mark_failed, stack_column, with_placeholders
from workers.families import ModelFamily
from workers.runtime.devices import inference_mode, on_compute_thread
from workers.runtime.memory import OUT_OF_MEMORY, run_in_halves

# embeddings kept per actor for repeated texts; T5 embeddings are megabytes each, so the
# cache is bounded by bytes, not entries
CACHE_BYTES = 256 * 2**20


class TextEncoderWorker(ModelWorker):
    STAGE = "text_encoder"
    REQUIRED_COLUMNS = {"prompt": "text to draw", "negative_prompt": "text to steer away from ('' for none)"}

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return (*embedding_columns(family), "prompt_truncated")

    @on_compute_thread
    def __init__(self, model, *, max_sequence_length: int | None = None, true_cfg_scale: float | None = None, **options):
        super().__init__(model, **options)
        self.max_sequence_length = max_sequence_length
        # FLUX and Qwen-Image read negative embeddings only with true CFG: 8 MB of T5 states per row are not sent for nothing
        self.sends_negative = self.family.reads_negative(self.family.true_cfg_scale(true_cfg_scale))
        self.pipe = self.load_pipeline(self.family.text_components, config_only=self.family.text_stage_configs)
        # most rows have no negative prompt: the empty text is encoded once per actor
        self._cache: dict[str, dict[str, np.ndarray]] = {}
        self._cache_bytes = 0
        self._empty = self._encode([""])[0]
        self._no_negative = self.family.empty_negative(self.pipe, self._empty)

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            prompts = [str(text) for text in batch["prompt"]]
            negatives = [str(text) if self.sends_negative else "" for text in batch["negative_prompt"]]

            # 1. encode each distinct text of the batch once; a row whose texts do not fit in GPU memory fails
            embedded = self.embed(prompts + [text for text in negatives if text])
            by_text = dict(zip(prompts + [text for text in negatives if text], embedded))
            by_text[""] = self._empty  # the negative of every row without one (or when negatives are not sent)
            failed = [by_text[prompt] is None or by_text[negative] is None for prompt, negative in zip(prompts, negatives)]
            mark_failed(batch, {row: (OUT_OF_MEMORY, text_out_of_memory(prompts[row])) for row in range(len(prompts)) if failed[row]}, self.STAGE)

            # 2. one column per embedding; no negative prompt encodes as the family says (SDXL: zeros)
            for name in self.family.embedding_columns:
                batch[name] = stack_column(with_placeholders(
                    [None if failed[row] else by_text[text][name] for row, text in enumerate(prompts)]))
                batch[f"negative_{name}"] = stack_column(with_placeholders(
                    [None if failed[row] else by_text[text][name] if text else self._no_negative[name] for row, text in enumerate(negatives)]
                )) if self.sends_negative else np.zeros((len(prompts), 0), np.float32)

            # 3. which prompts lost tokens to a tokenizer's limit (diffusers truncates silently)
            batch["prompt_truncated"] = np.array([self.is_truncated(text) for text in prompts], dtype=bool)
        return batch

    def embed(self, texts: list[str]) -> list[dict[str, np.ndarray] | None]:
        """Embeddings per text; each distinct text not seen recently is encoded once.

        Texts are encoded in halves after an out-of-memory error; one that does not fit
        alone gets None.
        """
        new_texts = list(dict.fromkeys(text for text in texts if text != "" and text not in self._cache))
        if new_texts:
            run = run_in_halves(list(range(len(new_texts))), lambda part: self._encode([new_texts[index] for index in part]))
            self._oom_splits += run.splits
            for index, embedding in run.outputs.items():
                self._cache[new_texts[index]] = embedding
                self._cache_bytes += sum(array.nbytes for array in embedding.values())
        embeddings = [self._empty if text == "" else self._cache.get(text) for text in texts]
        if self._cache_bytes > CACHE_BYTES:  # prompts rarely repeat across batches
            self._cache, self._cache_bytes = {}, 0
        return embeddings

    def is_truncated(self, text: str) -> bool:
        return self.family.is_truncated(self.pipe, text, self.max_sequence_length)

    @inference_mode
    def _encode(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        columns = self.family.encode_texts(self.pipe, texts, self.device, self.max_sequence_length)
        return [{name: columns[name][index] for name in columns} for index in range(len(texts))]


def text_out_of_memory(text: str) -> str:
    return f"out of GPU memory encoding a text of {len(text)} characters"
