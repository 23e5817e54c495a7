"""Where a run's model comes from: a preset or a diffusers directory at any fsspec URI.

The driver describes the model (checks it, fingerprints it, reads its default size)
without loading weights. Workers receive a ``ModelLocation``: called on the actor's
node, it yields a local directory, copying a remote model once into the node's cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipelines import io
from workers.family import vae_scale_factor
from workers.presets import BUILT_IN_MODELS, cache_root, materialize_preset

# model_index.json entries that are torch modules and must come as safetensors
_WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "transformer", "text_encoder_2")


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
    default_height: int
    default_width: int
    size_multiple: int  # the VAE's downsampling factor
    latent_channels: int
    scheduler_class: str
    # how latents are scaled for the denoiser: (latent - shift_factor) * scaling_factor
    vae_scaling_factor: float = 0.18215
    vae_shift_factor: float = 0.0

    def identity(self) -> dict:
        return {"uri": self.location.uri, "fingerprint": self.location.fingerprint}


def describe_model(model: str) -> ModelDescription:
    """Check a model exists and holds safetensors weights; read its shape. Loads no weights."""
    uri = materialize_preset(model) if model in BUILT_IN_MODELS else model
    index = _read_config(uri, "model_index.json", model)
    for component in _WEIGHTED_COMPONENTS:
        if component in index and index[component][0] is not None:
            fs, path = io.filesystem(io.join(uri, component))
            if not any(name.endswith(".safetensors") for name in fs.ls(path, detail=False)):
                raise ValueError(
                    f"model: component {component!r} of {model!r} has no .safetensors weights "
                    "(latentray loads safetensors only: pickled weights can run code)"
                )
    unet = _read_config(uri, "unet/config.json", model)
    vae = _read_config(uri, "vae/config.json", model)
    scheduler = _read_config(uri, "scheduler/scheduler_config.json", model)
    size_multiple = vae_scale_factor(vae)
    sample_size = unet["sample_size"]
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return ModelDescription(
        location=ModelLocation(model if model in BUILT_IN_MODELS else uri, io.fingerprint_tree(uri)),
        default_height=height * size_multiple,
        default_width=width * size_multiple,
        size_multiple=size_multiple,
        latent_channels=unet["in_channels"],
        scheduler_class=scheduler["_class_name"],
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        vae_shift_factor=float(vae.get("shift_factor") or 0.0),
    )


def component_fingerprint(model: str, components: tuple[str, ...]) -> str:
    """A content fingerprint of some components of a model (no weights loaded).

    What a latent dataset depends on is the VAE (and the text encoder), not the whole
    model: a fine-tuned U-Net beside the same VAE leaves cached latents valid.
    """
    uri = materialize_preset(model) if model in BUILT_IN_MODELS else model
    digest = hashlib.sha256()
    for component in components:
        digest.update(f"{component}\0{io.fingerprint_tree(io.join(uri, component))}\0".encode())
    return digest.hexdigest()


def _read_config(uri: str, name: str, model: str) -> dict:
    try:
        config = io.read_json(io.join(uri, name))
    except Exception as error:
        raise ValueError(f"model: cannot read {name} of {model!r}: {type(error).__name__}: {error}") from error
    if config is None:
        hint = " (not a diffusers model directory)" if name == "model_index.json" else ""
        raise ValueError(f"model: {model!r} has no {name}{hint}; built-in models are {', '.join(BUILT_IN_MODELS)}")
    return config
