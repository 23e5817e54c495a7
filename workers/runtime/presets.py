"""Built-in model presets, built deterministically in code (no hub, no download).

One ``tiny`` and one ``small`` preset per model family (``tiny``/``small`` are Stable
Diffusion; ``tiny-sdxl``, ``small-flux``, ...). ``tiny`` builds in about a second and
exists for tests; ``small`` is sized so compute rather than overhead dominates a
128x128 image (for benchmarks). All have random weights: they draw noise, but exercise
every code path of the real family (builders in ``workers/families/<family>.py``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile

# Bump when a preset's architecture or initialisation changes: cached copies are keyed by it.
PRESET_VERSION = 2

# name -> (family module in workers/families, size in preset_parts.PRESET_SIZES); "module:function" names
# a builder other than the module's build_preset (a second family in one module: FLUX.2 [dev])
PRESETS: dict[str, tuple[str, str]] = {
    "tiny": ("sd", "tiny"),
    "small": ("sd", "small"),
    "tiny-sdxl": ("sdxl", "tiny"),
    "small-sdxl": ("sdxl", "small"),
    "tiny-sd3": ("sd3", "tiny"),
    "small-sd3": ("sd3", "small"),
    "tiny-flux": ("flux", "tiny"),
    "small-flux": ("flux", "small"),
    "tiny-zimage": ("zimage", "tiny"),
    "small-zimage": ("zimage", "small"),
    "tiny-qwenimage": ("qwenimage", "tiny"),
    "small-qwenimage": ("qwenimage", "small"),
    "tiny-flux2": ("flux2", "tiny"),  # FLUX.2 [klein] base; distilled: is_distilled in model_index.json
    "small-flux2": ("flux2", "small"),
    "tiny-flux2-dev": ("flux2:build_dev_preset", "tiny"),  # FLUX.2 [dev]
    "small-flux2-dev": ("flux2:build_dev_preset", "small"),
}


def build_preset_pipeline(name: str):
    """The diffusers pipeline of a preset: its family's architecture at the preset's size, seeded random weights."""
    from workers.families.preset_parts import PRESET_SIZES

    if name not in PRESETS:
        raise ValueError(f"model: unknown preset {name!r}; presets are {', '.join(sorted(PRESETS))}")
    builder, size = PRESETS[name]
    family_module, _, function = builder.partition(":")
    module = importlib.import_module(f"workers.families.{family_module}")
    return getattr(module, function or "build_preset")(PRESET_SIZES[size])


def preset_image_size(name: str) -> int | None:
    """A code-built preset's default height and width (the family's default is sized for real models)."""
    from workers.families.preset_parts import PRESET_SIZES

    return PRESET_SIZES[PRESETS[name][1]].image_size if name in PRESETS else None


# Models shipped as package data (trained, so not buildable in code): name -> folder in this package.
# `demo` is trained by `python -m jobs.train_demo` (see README).
SHIPPED_MODELS = {"demo": "demo/model"}
BUILT_IN_MODELS = (*PRESETS, *SHIPPED_MODELS)

# Guidance when a run does not set one: the model family's default (Stable Diffusion's 7.5,
# FLUX's 3.5, ...), except where a built-in model was measured to follow prompts better with
# another. The demo model's colour adherence on seen combinations: 89.9% at 7.5, 92.3% at 5
# (91.1% at 4, 82.1% at 10).
RECOMMENDED_GUIDANCE = {"demo": 5.0}


def recommended_guidance(model: str, family_default: float) -> float:
    """The guidance scale a run of ``model`` uses unless told otherwise."""
    return RECOMMENDED_GUIDANCE.get(model, family_default)


def shipped_model_dir(name: str) -> str:
    workers_package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    directory = os.path.join(workers_package, SHIPPED_MODELS[name])
    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ValueError(f"model: the built-in {name!r} model is not installed at {directory} (reinstall latentray)")
    return directory


def export_preset(name: str, directory: str) -> str:
    """Write a built-in model as a standard diffusers directory (safetensors weights)."""
    if name in SHIPPED_MODELS:
        shutil.copytree(shipped_model_dir(name), directory, dirs_exist_ok=True)
    else:
        build_preset_pipeline(name).save_pretrained(directory, safe_serialization=True)
    return directory


def cache_root() -> str:
    return os.environ.get("LATENTRAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "latentray"))


def materialize_preset(name: str) -> str:
    """A built-in model as a local diffusers directory: a shipped one where it is installed,
    a code-built preset in the local cache, built once per node.

    Built into a temporary directory and renamed into place, so actors that start
    together on one node never see a half-written model.
    """
    if name in SHIPPED_MODELS:
        return shipped_model_dir(name)  # already a directory: nothing to build
    target = os.path.join(cache_root(), "presets", f"{name}-v{PRESET_VERSION}")
    if os.path.isfile(os.path.join(target, "model_index.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
    try:
        export_preset(name, staging)
        os.rename(staging, target)
    except OSError:
        if not os.path.isfile(os.path.join(target, "model_index.json")):
            raise
        # another process on this node finished first; its copy is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
