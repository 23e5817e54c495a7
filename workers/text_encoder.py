"""Text encoder worker: prompt and negative prompt -> hidden states for cross attention."""

from __future__ import annotations

import numpy as np
import torch

from workers.base import Batch, ModelWorker


class TextEncoderWorker(ModelWorker):
    STAGE = "text_encoder"
    REQUIRED_COLUMNS = {"prompt": "text to draw", "negative_prompt": "text to steer away from ('' for none)"}
    OUTPUT_COLUMNS = ("prompt_embeds", "negative_prompt_embeds", "prompt_truncated")

    def __init__(self, model, **options):
        super().__init__(model, **options)
        family = self.model.family
        self.tokenizer = self.model.load(family.tokenizer_component)
        self.text_encoder = self.model.load(family.text_encoder_component, self.device, self.dtype)
        self.max_tokens = self.tokenizer.model_max_length
        # most rows have no negative prompt: its embedding is computed once per actor
        self._cache: dict[str, np.ndarray] = {"": self._encode([""])[0]}

    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            prompts = [str(text) for text in batch["prompt"]]
            negatives = [str(text) for text in batch["negative_prompt"]]

            # 1. encode each distinct text of the batch once, gathered per row
            embeddings = self.embed(prompts + negatives)
            batch["prompt_embeds"] = np.stack(embeddings[:len(prompts)])
            batch["negative_prompt_embeds"] = np.stack(embeddings[len(prompts):])

            # 2. which prompts lost tokens to the model's limit
            batch["prompt_truncated"] = np.array([self._is_truncated(text) for text in prompts])
        return batch

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        """Hidden states per text; each distinct text not seen recently is encoded once."""
        new_texts = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new_texts:
            self._cache.update(zip(new_texts, self._encode(new_texts)))
        embeddings = [self._cache[text] for text in texts]
        # keep the cache to the empty prompt and recent texts: prompts rarely repeat across batches
        if len(self._cache) > 4096:
            self._cache = {"": self._cache[""]}
        return embeddings

    def _is_truncated(self, text: str) -> bool:
        return len(self.tokenizer(text, truncation=False, verbose=False).input_ids) > self.max_tokens

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        # as diffusers' encode_prompt: pad to the model maximum, truncate, last hidden state
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=attention_mask)[0]
        # float32 between stages keeps the object store format independent of the GPU dtype
        return list(hidden.float().cpu().numpy())


class CaptionEncoderWorker(TextEncoderWorker):
    """Captions of a latent dataset -> the hidden states a denoiser is trained on.

    The text encoder of generation without negative prompts: a null caption encodes as
    "" (the unconditional embedding). Families with a pooled text output (none yet)
    would add it here.
    """

    REQUIRED_COLUMNS = {"caption": "the image's caption (null: the empty caption)"}
    OUTPUT_COLUMNS = ("prompt_embeds", "caption_truncated")

    def __call__(self, batch: Batch) -> Batch:
        with self.busy(batch):
            captions = ["" if text is None else str(text) for text in batch["caption"]]
            # 1. encode each distinct caption once
            batch["prompt_embeds"] = np.stack(self.embed(captions)) if captions else np.empty((0,))
            # 2. which captions lost tokens to the model's limit
            batch["caption_truncated"] = np.array([self._is_truncated(text) for text in captions], dtype=bool)
        return batch
