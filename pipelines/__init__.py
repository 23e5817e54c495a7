"""latentray's pipelines: generation, latent-dataset encoding, and the latent-dataset reader.

``LatentDataset`` (the torch training reader) loads torch on first use, so importing a
pipeline module never pays for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LatentDataset"]


def __getattr__(name: str) -> Any:
    if name == "LatentDataset":
        from pipelines.latent_dataset import LatentDataset

        return LatentDataset
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
