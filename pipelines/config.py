"""Typed run configuration, validated on construction with errors that name the field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

PLACEMENTS = ("auto", "fused", "split")
IMAGE_FORMATS = ("png", "jpeg", "webp")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(kw_only=True)
class StageOptions:
    """Scheduling of one stage; ``None`` falls back to the run's defaults for that stage."""

    batch_size: int | None = None
    concurrency: int | None = None  # actors in the stage's pool
    num_gpus: float | None = None  # GPUs reserved per actor (fractions share a GPU)
    num_cpus: float | None = None  # CPUs reserved per actor (fractions leave room for read/write tasks)
    threads: int | None = None  # torch threads per actor on CPU

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be a whole number >= 1, got {value!r}")
        for name in ("num_gpus", "num_cpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value!r}")

    def merged_over(self, defaults: "StageOptions") -> "StageOptions":
        """These options, with unset fields taken from ``defaults``."""
        return StageOptions(**{f.name: getattr(defaults, f.name) if getattr(self, f.name) is None else getattr(self, f.name) for f in fields(self)})


def parse_stage_option(text: str) -> tuple[str, str, float | int]:
    """``denoiser.batch_size=16`` -> ("denoiser", "batch_size", 16)."""
    try:
        target, value = text.split("=", 1)
        stage, option = target.split(".", 1)
    except ValueError:
        raise ValueError(f"stage option {text!r}: expected STAGE.OPTION=VALUE, e.g. denoiser.batch_size=16") from None
    if option not in {f.name for f in fields(StageOptions)}:
        raise ValueError(f"stage option {text!r}: unknown option {option!r}; options are {', '.join(f.name for f in fields(StageOptions))}")
    number = float(value) if option in ("num_gpus", "num_cpus") else int(value)
    return stage, option, number


@dataclass(kw_only=True)
class GenerateConfig:
    """One bulk generation run."""

    prompts: str  # Parquet file or folder URI
    output: str  # output folder URI
    model: str = "tiny"  # preset name, or diffusers directory (local path or any fsspec URI)
    steps: int = 30
    guidance: float = 7.5
    height: int | None = None  # None: the model's default size
    width: int | None = None
    negative_prompt: str = ""
    scheduler: str | None = None  # None: the model's own scheduler
    seed: int = 0
    batch_size: int = 8
    image_format: str = "png"
    image_quality: int = 95  # jpeg / webp
    save_latents: bool = False
    placement: str = "auto"
    overwrite: bool = False
    max_image_size: int = 2048  # rows asking for more pixels per side go to errors
    dtype: str = "auto"
    stages: dict[str, StageOptions] = field(default_factory=dict)
    manifest_rows_per_part: int = 5000

    def __post_init__(self) -> None:
        from workers.schedulers import check_scheduler_name

        for name in ("prompts", "output", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty path or URI")
        for name in ("steps", "batch_size", "max_image_size", "manifest_rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.guidance < 0:
            raise ValueError(f"guidance: must be >= 0, got {self.guidance}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8 or value > self.max_image_size):
                raise ValueError(f"{name}: must be a multiple of 8 between 8 and {self.max_image_size}, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be between 0 and 2**63-1, got {self.seed}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format: must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.image_quality <= 100:
            raise ValueError(f"image_quality: must be between 1 and 100, got {self.image_quality}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_scheduler_name(self.scheduler)
        self.stages = {name: options if isinstance(options, StageOptions) else StageOptions(**options) for name, options in self.stages.items()}

    # fields that change what a run writes: a rerun into the same output must agree on them
    OUTPUT_FIELDS = (
        "prompts", "steps", "guidance", "height", "width", "negative_prompt", "scheduler",
        "seed", "image_format", "image_quality", "save_latents", "max_image_size",
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def output_identity(self) -> dict:
        return {name: getattr(self, name) for name in self.OUTPUT_FIELDS}
