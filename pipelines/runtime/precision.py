"""The device and dtype each model stage runs in, resolved by the driver, and kept in the run's identity.

The driver imports no torch: it knows a stage runs on CUDA from its resources (Ray gives an
actor with ``num_gpus=0`` no visible GPU), and resolves ``--dtype`` for the family and that
device (``workers.runtime.devices.resolve_dtype``). Workers receive both as plain strings
and load in exactly those, so float32 and bfloat16 images or latents never mix in one
output: the resolved dtypes are part of the output's identity (and of encode's cache key),
known only once the cluster is, so they are settled when the stages are built.
"""

from __future__ import annotations

from pipelines.runtime import io
from pipelines.runtime.stages import Stage
from workers.families import ModelFamily
from workers.runtime.devices import resolve_dtype

IDENTITY_KEY = "precision"


def stage_device(stage: Stage) -> str:
    """Where a stage's actors compute: an actor with a GPU share sees a GPU, one without sees none."""
    return "cuda" if (stage.options.num_gpus or 0) > 0 else "cpu"


def resolve_stages(stages: list[Stage], family: ModelFamily, dtype: str) -> None:
    """Give each stage's workers their device, resolved dtype (plain strings) and share of a GPU
    (``workers.runtime.memory.cap_gpu_memory``: below 1, the actor caps its memory to it)."""
    for stage in stages:
        device = stage_device(stage)
        share = stage.options.num_gpus if device == "cuda" else None
        stage.constructor_kwargs.update(device=device, dtype=resolve_dtype(family, dtype, device), gpu_share=share)


def stage_precision(stages: list[Stage], roles: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The dtype of each model role (text_encoder, denoiser, ...), whatever placement runs it.

    ``roles``: stage name -> the roles it runs (a fused stage runs them all), so that a
    rerun in another placement with the same precision keeps the same identity.
    """
    return {role: stage.constructor_kwargs["dtype"] for stage in stages for role in roles[stage.name]}


def carry_precision(identity: dict, output_uri: str, overwrite: bool) -> None:
    """Put the precision the output's previous run recorded in ``identity`` (nothing when there is
    none, or the output is being replaced).

    Planning happens before the cluster is known: the identity carries the previous
    precision (so the output's identity check passes on it) until ``settle_precision``
    checks it against this run's.
    """
    if overwrite:
        return
    previous = io.read_json(io.join(output_uri, "run.json")) or {}
    precision = (previous.get("identity") or {}).get(IDENTITY_KEY)
    if precision is not None:
        identity[IDENTITY_KEY] = precision


def settle_precision(identity: dict, precision: dict[str, str], output_uri: str) -> None:
    """Put this run's precision in ``identity``; refuse an output whose rows ran in another one."""
    before = identity.get(IDENTITY_KEY)
    if before is not None and before != precision:
        changes = "; ".join(f"{role} was {before.get(role)}, now {precision.get(role)}"
                            for role in sorted(set(before) | set(precision)) if before.get(role) != precision.get(role))
        raise ValueError(
            f"output {output_uri!r} holds rows computed in another precision ({changes}); float32 and bfloat16 rows "
            "must not mix: rerun with the same --dtype on the same kind of device, --overwrite, or another --output"
        )
    identity[IDENTITY_KEY] = precision
