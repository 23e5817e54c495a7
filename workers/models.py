"""Loading model components from a local diffusers directory, safetensors only.

Workers receive a ``ModelSource``: a preset name, a local directory, or a zero-argument
callable returning one. The callable form lets the pipeline hand over "copy this
object-store model to the node's cache" without workers knowing about object stores;
it runs on the actor's own node, where the files are needed.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Callable, Union

import torch

from workers.family import ModelFamily, family_of, vae_scale_factor
from workers.presets import BUILT_IN_MODELS, materialize_preset

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
    """One diffusers model directory: its family and component loaders."""

    def __init__(self, model: ModelSource):
        self.path = resolve_model_dir(model)
        self.family: ModelFamily = family_of(self.path)
        with open(os.path.join(self.path, "model_index.json")) as index_file:
            self._index = json.load(index_file)

    def component_class(self, component: str) -> type:
        entry = self._index.get(component)
        if not entry or entry[0] is None:
            raise ValueError(f"model: {self.path!r} has no {component!r} component")
        library, class_name = entry
        return getattr(importlib.import_module(library), class_name)

    def load(self, component: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        """Load one component; torch modules go to ``device``/``dtype`` in eval mode."""
        component_class = self.component_class(component)
        folder = os.path.join(self.path, component)
        if issubclass(component_class, torch.nn.Module):
            # use_safetensors=True refuses pickled .bin weights: loading them can run code
            # diffusers names the precision argument torch_dtype, transformers 5 dtype
            precision = {"torch_dtype" if component_class.__module__.startswith("diffusers") else "dtype": dtype}
            module = component_class.from_pretrained(folder, use_safetensors=True, local_files_only=True, **precision)
            return module.to(device).eval().requires_grad_(False)
        return component_class.from_pretrained(folder, local_files_only=True)

    def config(self, component: str) -> dict:
        """A component's config file (``config.json``, or ``scheduler_config.json`` for schedulers)."""
        folder = os.path.join(self.path, component)
        name = "scheduler_config.json" if component == self.family.scheduler_component else "config.json"
        with open(os.path.join(folder, name)) as config_file:
            return json.load(config_file)

    def scheduler_config(self) -> dict:
        return self.config(self.family.scheduler_component)

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.config(self.family.vae_component))
