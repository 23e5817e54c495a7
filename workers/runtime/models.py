"""Loading a model directory as its family's diffusers pipeline, safetensors only.

Workers receive a ``ModelSource``: a preset name, a local directory, or a zero-argument
callable returning one. The callable form lets the pipeline hand over "copy this
object-store model to the node's cache" without workers knowing about object stores;
it runs on the actor's own node, where the files are needed.

Each stage loads the family's own pipeline class with only the components it uses
(the others ``None``), so the maths stays diffusers'; a fused actor loads them all once.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Union


from workers.families import ModelFamily, family_for_class
from workers.runtime.presets import BUILT_IN_MODELS, materialize_preset

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

ModelSource = Union[str, Callable[[], str]]


def resolve_model_dir(model: ModelSource) -> str:
    """A local diffusers directory for ``model`` (a preset is built into the cache)."""
    location = model() if callable(model) else model
    if location in BUILT_IN_MODELS:
        return materialize_preset(location)
    if not os.path.isdir(location):
        raise ValueError(f"model: {location!r} is neither a built-in model ({', '.join(BUILT_IN_MODELS)}) nor a local directory")
    return location


class ModelDirectory:
    """One diffusers model directory: its family, and its pipeline loaded with some components."""

    def __init__(self, model: ModelSource):
        self.path = resolve_model_dir(model)
        with open(os.path.join(self.path, "model_index.json")) as index_file:
            self._index = json.load(index_file)
        self.family: ModelFamily = family_for_class(self._index.get("_class_name"), self.path)
        self._pipeline: Any = None
        self._loaded: frozenset[str] = frozenset()

    def has(self, component: str) -> bool:
        entry = self._index.get(component)  # a [library, class] pair; [null, null] when left out
        return isinstance(entry, list) and entry[0] is not None and os.path.isdir(os.path.join(self.path, component))

    def component_class(self, component: str) -> type:
        if not self.has(component):
            raise ValueError(f"model: {self.path!r} has no {component!r} component")
        library, class_name = self._index[component]
        return getattr(importlib.import_module(library), class_name)

    def pipeline(self, components: tuple[str, ...], device: torch.device, dtype: torch.dtype, *, config_only: tuple[str, ...] = ()) -> Any:
        """The family's pipeline holding ``components`` (those the directory has), the others ``None``.

        Loaded once per directory: a fused actor loads every component first, and each of
        its stages gets that same pipeline. ``config_only`` components are built on the meta
        device (their config, no weights): what a stage reads of another stage's model.
        """
        import torch

        wanted = {name for name in components if self.has(name)}
        if self._pipeline is not None and wanted <= self._loaded:
            return self._pipeline
        _quiet_libraries()
        pipeline_class = getattr(importlib.import_module("diffusers"), self.family.pipeline_class)
        expected_components, _ = pipeline_class._get_signature_keys(pipeline_class)
        arguments: dict[str, Any] = {name: None for name in expected_components if name not in wanted}
        arguments.update({name: self._config_only(name) for name in config_only if self.has(name) and name not in wanted})
        # use_safetensors=True refuses pickled .bin weights: loading them can run code
        pipe = pipeline_class.from_pretrained(self.path, **arguments, use_safetensors=True, local_files_only=True, dtype=dtype,
                                              **device_arguments(device))
        for name in wanted:
            module = getattr(pipe, name)
            if isinstance(module, torch.nn.Module):
                module.to(device).eval().requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        # a pipeline without its VAE assumes a factor of 8: tell it the real one
        pipe.vae_scale_factor = self.vae_scale_factor
        self._pipeline, self._loaded = pipe, frozenset(wanted)
        return pipe

    def preload(self, components: tuple[str, ...], dtype: str, device: str | None = None, gpu_share: float | None = None) -> None:
        """Load every component a fused actor's stages use, once; each stage then gets this pipeline.
        The actor's memory is capped to its GPU share first (``workers.runtime.memory.cap_gpu_memory``)."""
        from workers.runtime.devices import pick_device
        from workers.runtime.memory import cap_gpu_memory

        device, torch_dtype = pick_device(dtype, device, self.family)
        cap_gpu_memory(device.type, gpu_share)
        self.pipeline(components, device, torch_dtype)

    def _config_only(self, component: str) -> torch.nn.Module:
        from accelerate import init_empty_weights

        component_class = self.component_class(component)
        with init_empty_weights():
            return component_class.from_config(component_class.load_config(os.path.join(self.path, component)))

    def config(self, component: str) -> dict:
        """A component's config file (``config.json``, or ``scheduler_config.json`` for schedulers)."""
        folder = os.path.join(self.path, component)
        name = "scheduler_config.json" if component == self.family.scheduler_component else "config.json"
        with open(os.path.join(folder, name)) as config_file:
            return json.load(config_file)

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor(self.config(self.family.vae_component))


def device_arguments(device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments that load weights straight onto ``device``, in the dtype asked.

    On CUDA, ``device_map`` makes diffusers and transformers create each module empty and copy
    every tensor from the (memory-mapped) safetensors file to the GPU in its dtype: the host never
    holds the whole model, let alone in float32 (FLUX.1's transformer alone is 48 GB in float32).
    On CPU the weights load where they are used, as before.
    """
    return {"device_map": "cuda"} if device.type == "cuda" else {}


def _quiet_libraries() -> None:
    """Errors only from diffusers and transformers: their per-call notices (a prompt truncated,
    a component left out on purpose, progress bars) would repeat for every batch; latentray
    records truncation per row instead."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
