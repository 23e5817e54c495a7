"""Where a row's LoRA files come from (any fsspec URI, copied once per node into the model cache), and
what an output records of them (``run.json`` ``loras``, from the manifest's LoRA columns).

Workers receive a ``LoraFiles``: called on the actor's node with a URI, it yields the local
copy and the sha256 of its bytes (what names the adapter and what the manifest records), as
``ModelLocation`` yields a model directory. Workers never import ``pipelines.runtime.io``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines.runtime import io
from pipelines.runtime.outputs import RunOutput
from workers.runtime.loras import LoraFile
from workers.runtime.presets import cache_root


@dataclass(frozen=True)
class LoraFiles:
    def __call__(self, uri: str) -> LoraFile:
        # 1. the node's copy (a local file is its own); 2. its digest, kept by path, size and mtime
        path = io.localize_file(uri, cache_root())
        digest = io.file_sha256(path, cache_root())
        # 3. under a *.safetensors name: diffusers reads other names with pickle (workers.runtime.loras)
        if not path.endswith(".safetensors"):
            path = io.link_file(path, os.path.join(cache_root(), "files", "by-sha256", f"{digest}.safetensors"))
        return LoraFile(path=path, sha256=digest)


def check_loras_unchanged(used: list[dict], output_uri: str) -> None:
    """A rerun into an output whose rows used a LoRA file that has changed since is refused (exit 2).

    A row's LoRA is its file's content (the manifest's ``lora_sha256``), not its URI: rows from the
    old bytes would stand beside rows from the new ones, under one URI. ``used``: the files the
    output's rows were made with (run.json's ``loras``), hashed again here; one that is gone now is
    left to its rows, which fail alone.
    """
    files = LoraFiles()
    for entry in used:
        try:
            current = files(entry["uri"]).sha256
        except Exception:
            continue
        if current != entry["sha256"]:
            raise ValueError(
                f"lora: {entry['uri']!r} changed since {entry['rows']} rows of {output_uri!r} were generated with it "
                f"(sha256 {entry['sha256'][:12]}... then, {current[:12]}... now); rerun with --overwrite to regenerate "
                "every row, or give the new file its own URI and another --output"
            )


def previous_loras(output: RunOutput) -> list[dict]:
    """The LoRA files earlier runs used: run.json's list, or the manifest's when a killed run left none."""
    previous = io.read_json(io.join(output.uri, "run.json"))
    if previous is None:
        return []
    return previous["loras"] if previous.get("loras") is not None else loras_used(output)


def loras_used(output: RunOutput) -> list[dict]:
    """The LoRA files the output's rows were generated with (earlier runs' included): each URI and
    content once, with its rows and the weights they used, from the manifest's LoRA columns."""
    used: dict[tuple[str, str], dict] = {}
    for part in io.list_parts(output.results_uri):
        if "lora_sha256" not in io.parquet_schema(part).names:  # a part of a run without LoRA
            continue
        table = io.read_parquet_file(part, ["lora", "lora_sha256", "lora_scale"])
        for uris, digests, scales in zip(*(table.column(name).to_pylist() for name in table.column_names)):
            for uri, digest, scale in zip(uris, digests, scales):
                entry = used.setdefault((uri, digest), {"uri": uri, "sha256": digest, "rows": 0, "scales": set()})
                entry["rows"] += 1
                entry["scales"].add(scale)
    return [{**entry, "scales": sorted(entry["scales"])} for _, entry in sorted(used.items())]
