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

The Python API (``__all__``): ``build_generation_processor``, ``build_encoding_processor`` and
``generate_images`` (Ray Data processors, ``pipelines.generation.processor`` and
``pipelines.encoding.processor``), ``LatentDataset`` (the torch training reader) and
``collate_nested_arrays``. Each is imported on first use, so ``import pipelines`` loads
neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any

# public name -> the module that defines it (imported on first use)
_EXPORTS = {
    "LatentDataset": "pipelines.encoding.latent_dataset",
    "collate_nested_arrays": "pipelines.encoding.latent_dataset",
    "build_generation_processor": "pipelines.generation.processor",
    "generate_images": "pipelines.generation.processor",
    "build_encoding_processor": "pipelines.encoding.processor",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
