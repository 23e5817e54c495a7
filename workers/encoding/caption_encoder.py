"""Caption encoder stage of a latent dataset: captions -> the embeddings a denoiser is trained on."""

from __future__ import annotations

import numpy as np

from workers.families import ModelFamily
from workers.generation.text_encoder import TextEncoderWorker, text_out_of_memory
from workers.runtime.base import Batch, embedding_columns
from workers.runtime.columns import failed_rows, mark_failed, stack_column, with_placeholders
from workers.runtime.devices import on_compute_thread
from workers.runtime.memory import OUT_OF_MEMORY


class CaptionEncoderWorker(TextEncoderWorker):
    """Captions of a latent dataset -> the embeddings a denoiser is trained on.

    The text stage of generation without negative prompts: a null caption encodes as ""
    (the unconditional embedding), named as diffusers' ``encode_prompt`` returns them.
    """

    REQUIRED_COLUMNS = {"caption": "the image's caption (null: the empty caption)"}

    @classmethod
    def output_columns(cls, family: ModelFamily) -> tuple[str, ...]:
        return (*embedding_columns(family, negative=False), "caption_truncated")

    @on_compute_thread
    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            # rows an earlier step failed (undecodable images, in the processor) are not encoded: they stand for ""
            captions = ["" if text is None or skip else str(text) for text, skip in zip(batch["caption"], failed_rows(batch))]
            # 1. encode each distinct caption once; a caption that does not fit in GPU memory fails its row
            embedded = self.embed(captions)
            mark_failed(batch, {row: (OUT_OF_MEMORY, text_out_of_memory(captions[row]))
                                for row, embedding in enumerate(embedded) if embedding is None}, self.STAGE)
            for name in self.family.embedding_columns:
                values = [None if embedding is None else embedding[name] for embedding in embedded]
                batch[name] = stack_column(with_placeholders(values)) if captions else np.empty((0,))
            # 2. which captions lost tokens to a tokenizer's limit
            batch["caption_truncated"] = np.array([self.is_truncated(text) for text in captions], dtype=bool)
        self.take_counts(batch)
        return batch
