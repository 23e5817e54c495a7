"""Where a row's LoRA files come from: any fsspec URI, copied once per node into the model cache.

Workers receive a ``LoraFiles``: called on the actor's node with a URI, it yields the local
copy and the sha256 of its bytes (what names the adapter and what the manifest records), as
``ModelLocation`` yields a model directory. Workers never import ``pipelines.runtime.io``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.runtime import io
from workers.runtime.loras import LoraFile
from workers.runtime.presets import cache_root


@dataclass(frozen=True)
class LoraFiles:
    def __call__(self, uri: str) -> LoraFile:
        # 1. the node's copy (a local file is its own); 2. its digest, kept by path, size and mtime
        path = io.localize_file(uri, cache_root())
        return LoraFile(path=path, sha256=io.file_sha256(path, cache_root()))
