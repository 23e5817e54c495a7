"""The model-family registry: ``model_index.json``'s ``_class_name`` -> the family that runs it.

Adding a family is one module in this folder (a ``ModelFamily`` subclass) and one line below.
"""

from __future__ import annotations

from workers.families.base import ModelFamily, ModelShape
from workers.families.flux import Flux
from workers.families.flux2 import Flux2Dev, Flux2Klein
from workers.families.qwenimage import QwenImage
from workers.families.sd import StableDiffusion
from workers.families.sd3 import StableDiffusion3
from workers.families.sdxl import StableDiffusionXL
from workers.families.zimage import ZImage

FAMILIES: dict[str, ModelFamily] = {
    family.pipeline_class: family
    for family in (
        StableDiffusion(),
        StableDiffusionXL(),
        StableDiffusion3(),
        Flux(),
        ZImage(),
        QwenImage(),
        Flux2Klein(),
        Flux2Dev(),
    )
}


def family_for_class(class_name: str | None, model: str) -> ModelFamily:
    """The family of a pipeline class; an unknown class is refused, naming the supported ones."""
    if class_name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"model: {model!r} is a {class_name!r} pipeline; latentray runs {known}")
    return FAMILIES[class_name]


__all__ = ["FAMILIES", "ModelFamily", "ModelShape", "family_for_class"]
