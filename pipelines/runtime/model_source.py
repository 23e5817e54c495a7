"""Where a run's model comes from: a preset or a diffusers directory at any fsspec URI.

The driver describes the model (its family, components, shape, fingerprint) from its
config files, without loading weights: a model that cannot run stops the job here,
before any actor starts. Workers receive a ``ModelLocation``: called on the actor's
node, it yields a local directory, copying a remote model once into the node's cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipelines.runtime import io
from workers.families import ModelFamily, ModelShape, family_for_class
from workers.runtime.presets import BUILT_IN_MODELS, cache_root, materialize_preset, preset_image_size


@dataclass(frozen=True)
class ModelLocation:
    uri: str
    fingerprint: str

    def __call__(self) -> str:
        if self.uri in BUILT_IN_MODELS:
            return materialize_preset(self.uri)
        return io.localize_tree(self.uri, self.fingerprint, cache_root())


@dataclass(frozen=True, kw_only=True)
class ModelDescription:
    location: ModelLocation
    family: ModelFamily
    shape: ModelShape
    scheduler_class: str
    components: tuple[str, ...]  # the components this directory has

    def identity(self) -> dict:
        return {
            "uri": self.location.uri, "fingerprint": self.location.fingerprint, "family": self.family.name,
            "pipeline_class": self.family.pipeline_class, "guidance": self.family.guidance_rule,
        }


def describe_model(model: str) -> ModelDescription:
    """Check a model can run: a known family, every component present, safetensors weights. Loads no weights."""
    uri = materialize_preset(model) if model in BUILT_IN_MODELS else model

    # 1. the family, from model_index.json
    index = _read_config(uri, "model_index.json", model)
    family = family_for_class(index.get("_class_name"), model)

    # 2. every component the family needs, with safetensors weights
    # components are [library, class] pairs; other entries are pipeline settings (force_zeros_for_empty_prompt, ...)
    components = tuple(name for name, entry in index.items() if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None)
    for name in family.required_components:
        if name not in components:
            raise ValueError(f"model: {model!r} ({family.pipeline_class}) has no {name!r} component; it needs {', '.join(family.required_components)}")
    for name in components:
        _check_weights(uri, name, model)

    # 3. its shape, from the configs
    shape = family.describe(lambda name: _read_config(uri, name, model, required=False))
    image_size = preset_image_size(model)
    if image_size is not None:  # a preset's size, not the real model's 1024
        shape = ModelShape(**{**vars(shape), "default_height": image_size, "default_width": image_size})
    scheduler = _read_config(uri, f"{family.scheduler_component}/scheduler_config.json", model)
    return ModelDescription(
        location=ModelLocation(model if model in BUILT_IN_MODELS else uri, io.fingerprint_tree(uri, cache_root())),
        family=family, shape=shape, scheduler_class=scheduler["_class_name"], components=components,
    )


def component_fingerprint(model: str, components: tuple[str, ...]) -> str:
    """A content fingerprint of some components of a model (no weights loaded).

    What a latent dataset depends on is the VAE (and the text encoders), not the whole
    model: a fine-tuned denoiser beside the same VAE leaves cached latents valid.
    """
    uri = materialize_preset(model) if model in BUILT_IN_MODELS else model
    digest = hashlib.sha256()
    for component in components:
        if io.exists(io.join(uri, component)):
            digest.update(f"{component}\0{io.fingerprint_tree(io.join(uri, component), cache_root())}\0".encode())
    return digest.hexdigest()


def _check_weights(uri: str, component: str, model: str) -> None:
    """A component with a ``config.json`` is a torch module: it must come as safetensors."""
    fs, path = io.filesystem(io.join(uri, component))
    try:
        names = [name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)]
    except FileNotFoundError:
        raise ValueError(f"model: {model!r} names a {component!r} component but has no {component}/ folder") from None
    if "config.json" in names and not any(name.endswith(".safetensors") for name in names):
        raise ValueError(
            f"model: component {component!r} of {model!r} has no .safetensors weights "
            "(latentray loads safetensors only: pickled weights can run code when loaded)"
        )


def _read_config(uri: str, name: str, model: str, *, required: bool = True) -> dict | None:
    try:
        config = io.read_json(io.join(uri, name))
    except Exception as error:
        raise ValueError(f"model: cannot read {name} of {model!r}: {type(error).__name__}: {error}") from error
    if config is None and required:
        hint = " (not a diffusers model directory)" if name == "model_index.json" else ""
        raise ValueError(f"model: {model!r} has no {name}{hint}; built-in models are {', '.join(BUILT_IN_MODELS)}")
    return config
