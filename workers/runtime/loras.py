"""Per-row LoRA adapters on one actor's pipeline: each file loaded once, at most N kept, switched per call group.

Rows name LoRA files (URIs) and weights; a stage groups its rows by them and, before each
group's call, makes exactly that set active with diffusers' ``set_adapters`` (or turns
every adapter off with ``disable_lora`` for rows without one). Adapters are never fused
into the base weights, so a row without LoRA computes the base model exactly, whatever
ran before it. An adapter is named from its file's sha256: the same bytes under two URIs
load once, and a changed file is another adapter. The least recently used adapter is
deleted when a new one would exceed the actor's limit.

A file that cannot be read, is not safetensors (pickled weights can run code when loaded)
or whose keys do not fit the model is a ``LoraError``: its rows fail with the reason, the
job goes on, and the actor remembers the reason instead of trying the file again.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

LORA_CODE = "invalid_lora"  # the failure code of rows whose LoRA cannot be applied
# what is active is unknown (an adapter was loaded or deleted since): the next ``activate`` sets it again
STALE = ("stale",)


@dataclass(frozen=True)
class LoraFile:
    path: str  # a local copy, on this node
    sha256: str


LoraFetch = Callable[[str], LoraFile]  # URI -> its local copy (fetched once per node) and digest


class LoraError(Exception):
    """A LoRA file that cannot be applied to this model; the message is the rows' reason."""


@dataclass(frozen=True)
class Adapter:
    name: str
    sha256: str
    components: frozenset[str]  # the pipeline's modules it has layers in (unet, text_encoder, ...)


def check_lora_support(family: Any, placement: str) -> None:
    """A family whose diffusers pipeline cannot load LoRA weights refuses LoRA columns and --lora (exit 2),
    and so does split placement: its actors hold part of the pipeline, and diffusers' loaders need all of it."""
    import diffusers

    if placement == "split":
        raise ValueError("placement: per-row LoRA runs in fused placement (--placement fused or auto); split actors "
                         "each hold part of the pipeline, which diffusers' LoRA loaders do not take")
    pipeline_class = getattr(diffusers, family.pipeline_class)
    if not hasattr(pipeline_class, "load_lora_weights"):
        raise ValueError(f"lora: {family.name} models ({family.pipeline_class}) cannot load LoRA weights in diffusers")


# Between stages a row's files, weights and digests travel as JSON lists in string columns ('lora',
# 'lora_scale', 'lora_sha256'): Ray Data's numpy batches cannot hand lists of strings back to Arrow


def row_loras(batch: dict[str, np.ndarray], row: int) -> tuple[tuple[str, float], ...]:
    """The row's (URI, weight) pairs, in its order; () without LoRA columns or files."""
    if "lora" not in batch:
        return ()
    return tuple((str(uri), float(scale)) for uri, scale in zip(json.loads(batch["lora"][row]), json.loads(batch["lora_scale"][row])))


def json_lists(values) -> list[list]:
    """A LoRA column's JSON lists, as lists (what the manifest and the processor's rows hold)."""
    return [json.loads(value) for value in values]


class LoraAdapters:
    """The adapters loaded into one pipeline (shared by the stages of a fused actor)."""

    def __init__(self, pipe: Any, fetch: LoraFetch | None, max_loaded: int):
        self.pipe, self.fetch, self.max_loaded = pipe, fetch, max_loaded
        self._files: dict[str, LoraFile] = {}  # URI -> its copy and digest, for the actor's life
        self._failed: dict[str, str] = {}  # URI -> why it cannot be applied
        self._loaded: OrderedDict[str, Adapter] = OrderedDict()  # sha256 -> adapter, least recently used first
        self._active: tuple | None = None  # (names, weights) set last; None: every adapter off (or none loaded yet)

    def adapters(self, uris: list[str]) -> list[Adapter]:
        """The adapters of ``uris``, loaded (evicting the least recently used beyond the limit), or a LoraError."""
        wanted = []
        for uri in uris:
            if uri in self._failed:
                raise LoraError(self._failed[uri])
            try:
                wanted.append(self._adapter(uri, keep=wanted))
            except LoraError as error:
                self._failed[uri] = str(error)
                raise
        return wanted

    def activate(self, adapters: list[Adapter], scales: list[float]) -> None:
        """Make exactly ``adapters`` active with ``scales`` (none: every adapter off, the base model)."""
        key = (tuple(adapter.name for adapter in adapters), tuple(scales)) if adapters else None
        if key == self._active:
            return
        if key is None:
            self.pipe.disable_lora()
        else:  # after disable_lora, set_adapters alone leaves the layers off
            self.pipe.enable_lora()
            self.pipe.set_adapters(list(key[0]), adapter_weights=list(key[1]))
        self._active = key

    def _adapter(self, uri: str, keep: list[Adapter]) -> Adapter:
        # 1. the file on this node, and its digest: the adapter's name
        if uri not in self._files:
            try:
                self._files[uri] = self.fetch(uri)
            except Exception as error:
                raise LoraError(f"lora {uri!r}: cannot read it: {type(error).__name__}: {error}") from error
        file = self._files[uri]
        if file.sha256 in self._loaded:
            self._loaded.move_to_end(file.sha256)
            return self._loaded[file.sha256]
        # 2. room for it, then its weights
        while len(self._loaded) >= self.max_loaded:
            self._evict(keep)
        adapter = self._load(uri, file)
        self._loaded[file.sha256] = adapter
        return adapter

    def _evict(self, keep: list[Adapter]) -> None:
        name = next(sha for sha, adapter in self._loaded.items() if adapter not in keep)
        self.pipe.delete_adapters([self._loaded.pop(name).name])
        self._active = STALE  # whatever was active may have lost an adapter

    def _load(self, uri: str, file: LoraFile) -> Adapter:
        import os

        from safetensors import safe_open

        # a split actor holds part of the pipeline, and diffusers' loaders need every module a file may touch
        missing = [name for name in getattr(self.pipe, "_lora_loadable_modules", ()) if getattr(self.pipe, name, None) is None]
        if missing:
            raise LoraError(f"lora {uri!r}: per-row LoRA runs in fused placement (this actor has no {', '.join(missing)})")
        # 1. safetensors only: its header is read here, and diffusers reads a *.safetensors name with
        # pickle refused, so a pickled file is never unpickled
        try:
            if not file.path.endswith(".safetensors"):
                raise ValueError(f"the local copy {file.path!r} is not named *.safetensors")
            with safe_open(file.path, "pt") as handle:
                weights = sum(1 for key in handle.keys() if key.endswith(".weight"))
        except Exception as error:
            raise LoraError(f"lora {uri!r}: not a safetensors file ({type(error).__name__}: {first_line(error)}); "
                            "pickled weights are refused: loading them can run code") from error
        # 2. into the pipeline's modules, under a name from its content; from the file, not a state dict,
        # so that diffusers reads the adapter's metadata (lora_alpha) from its header as it does for a user
        name = f"lora_{file.sha256[:16]}"
        try:
            self.pipe.load_lora_weights(os.path.dirname(file.path), weight_name=os.path.basename(file.path), adapter_name=name,
                                        use_safetensors=True, local_files_only=True)
        except Exception as error:
            self._forget(name)
            raise LoraError(f"lora {uri!r}: its keys do not fit the model: {type(error).__name__}: {first_line(error)}") from error
        # 3. every weight must have found its layer: diffusers skips keys it cannot place (a
        # LoRA for another model) with no more than a log line
        components = {component: count for component, count in self._layer_counts(name).items() if count}
        if sum(components.values()) < weights:
            self._forget(name)
            raise LoraError(f"lora {uri!r}: its keys do not fit the model: {sum(components.values())} of its {weights} "
                            f"weights found a layer of this {type(self.pipe).__name__}")
        self._active = STALE  # loading may leave the new adapter active
        return Adapter(name=name, sha256=file.sha256, components=frozenset(components))

    def _layer_counts(self, name: str) -> dict[str, int]:
        counts = {}
        for component in getattr(self.pipe, "_lora_loadable_modules", ()):
            module = getattr(self.pipe, component, None)
            if module is not None:
                counts[component] = sum(1 for key, _ in module.named_parameters() if f".{name}." in key)
        return counts

    def _forget(self, name: str) -> None:
        present = {adapter for adapters in self.pipe.get_list_adapters().values() for adapter in adapters}
        if name in present:
            self.pipe.delete_adapters([name])
        self._active = STALE


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""
