"""latentray's pipelines, one subpackage per role:

- ``pipelines.runtime``: what generation and encoding share: fsspec I/O (``io``), Parquet schemas
  (``schemas``), configuration, the output and commit protocol (``outputs``), stages and placement,
  statistics, progress, the run record and the model source.
- ``pipelines.generation``: prompts -> images, manifest, errors (``generate``, ``prompt_rows``, ``images``).
- ``pipelines.encoding``: images -> latent shards (``encode``, ``encode_rows``, ``image_decode``,
  ``latent_output``) and the training reader (``latent_dataset``).
- ``pipelines.report``: report.html and the contact sheet of either kind of output.
- ``pipelines.demo``: the demo model only (shapes corpus, adherence scoring, loss curves, training
  orchestration), apart from the product.

``LatentDataset`` (the torch training reader) and ``collate_nested_arrays`` load torch on first
use, so importing a pipeline module never pays for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LatentDataset", "collate_nested_arrays"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipelines.encoding import latent_dataset

        return getattr(latent_dataset, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
