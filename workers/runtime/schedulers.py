"""Scheduler names users type, mapped to diffusers scheduler classes and options.

Which names fit which model is the family's to say (``ModelFamily.schedulers``): a
noise-prediction scheduler cannot run a flow-matching model, nor the reverse.
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers class, config overrides). Overrides turn a class into the
# variant users know by that name (e.g. "dpm++" is DPM-Solver++ multistep).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # flow matching (SD3, FLUX, Z-Image, Qwen-Image): the model's shift and dynamic shifting carry over from its config
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-euler-karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "flow-euler-exponential": ("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
}


def check_scheduler_name(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown {name!r}; choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str | None, model_config: dict[str, Any]):
    """A fresh scheduler (they are stateful) from the model's config.

    ``None`` keeps the model's own scheduler class; a name swaps the class but keeps
    the model's noise schedule (betas, offsets), as diffusers' ``from_config`` does.
    """
    import diffusers  # here, not at import: the driver checks names without loading diffusers (2 s)

    check_scheduler_name(name)
    if name is None:
        return getattr(diffusers, model_config["_class_name"]).from_config(model_config)
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(model_config, **overrides)


def scheduler_label(name: str | None, model_config: dict[str, Any]) -> str:
    """The name recorded in the manifest: the user's name, or the model's class."""
    return name if name is not None else model_config["_class_name"]
