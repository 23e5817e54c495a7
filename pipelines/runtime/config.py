"""Typed run configuration, validated on construction with errors that name the field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

PLACEMENTS = ("auto", "fused", "split")
IMAGE_FORMATS = ("png", "jpeg", "webp")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_MAX_LORAS = 8  # LoRA adapters an actor keeps loaded (the least recently used goes first)
DEFAULT_STRENGTH = 0.8  # image-to-image strength, diffusers' Img2Img pipelines' default


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


def options_from(kind: type, config: object | None, options: dict) -> object:
    """The Python API's options: ``config`` (a ``kind``, or a subclass such as a job's config), or
    ``kind(**options)``; an unknown name is a ValueError naming it, as a bad value is."""
    if config is not None:
        if options:
            raise ValueError(f"{', '.join(sorted(options))}: give options or a config object, not both")
        if not isinstance(config, kind):
            raise ValueError(f"config: must be a {kind.__name__}, got {type(config).__name__}")
        return config
    names = [f.name for f in fields(kind)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option (options are {', '.join(names)})")
    return kind(**options)


def check_text_cache_fields(text_cache: bool, text_cache_mib: int | None) -> None:
    """The job text cache's fields of a run config (generation and encoding)."""
    if not isinstance(text_cache, bool):
        raise ValueError(f"text_cache: must be true or false, got {text_cache!r}")
    if text_cache_mib is not None and (not isinstance(text_cache_mib, int) or isinstance(text_cache_mib, bool) or text_cache_mib < 1):
        raise ValueError(f"text_cache_mib: must be a whole number of MiB >= 1, got {text_cache_mib!r}")


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
class GenerationOptions:
    """What a generated row depends on and how the models run: ``latentray generate``'s flags less the job's
    (input, output, overwrite, the job text cache). The generation processor takes these alone."""

    model: str = "demo"  # built-in model (demo, tiny, tiny-sdxl, ...), or diffusers directory (local path or any fsspec URI)
    steps: int | None = None  # None: the model family's default (workers/families)
    guidance: float | None = None  # None: the model's recommended scale (its family's default; demo: 5)
    height: int | None = None  # None: the model's default size
    width: int | None = None
    negative_prompt: str = ""
    scheduler: str | None = None  # None: the model's own scheduler
    # FLUX, Qwen-Image: > 1 with a negative prompt runs true classifier-free guidance; None: the family's default
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None  # T5/Qwen token budget (SD3, FLUX, Z-Image, Qwen-Image); None: the family's default
    seed: int = 0
    batch_size: int = 8
    image_format: str = "png"
    image_quality: int = 95  # jpeg / webp
    save_latents: bool = False
    placement: str = "auto"
    max_image_size: int = 2048  # rows asking for more pixels per side go to errors
    dtype: str = "auto"
    stages: dict[str, StageOptions] = field(default_factory=dict)
    # opt-in speed for the denoiser (``workers.runtime.speed``); like batch sizes, not part of the output's identity
    compile: bool = False  # regional torch.compile of its repeated blocks
    attention_backend: str | None = None  # diffusers' attention backend (flash, sage, _native_cudnn, ...); None: diffusers' default
    # per-row LoRA: the files (URIs) and weights of rows whose 'lora' is null; each actor keeps at
    # most max_loras_per_actor adapters loaded (like batch sizes, not part of the output's identity)
    lora: list[str] = field(default_factory=list)
    lora_scale: list[float] = field(default_factory=list)  # empty: 1 per file; else one per file
    max_loras_per_actor: int = DEFAULT_MAX_LORAS
    # image-to-image: the strength of rows with an 'init_image' and a null 'strength' (diffusers' default); part of
    # the output's identity where the input has an 'init_image' column (``plan_generation``)
    strength: float = DEFAULT_STRENGTH

    def __post_init__(self) -> None:
        from workers.runtime.schedulers import check_scheduler_name

        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model: must be a non-empty path or URI")
        for name in ("steps", "batch_size", "max_image_size", "max_sequence_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("guidance", "true_cfg_scale"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        # the model's size multiple is checked against its family when the run is planned
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value > self.max_image_size):
                raise ValueError(f"{name}: must be between 8 and {self.max_image_size}, got {value}")
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
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: must be true or false, got {self.compile!r}")
        if self.attention_backend is not None and (not isinstance(self.attention_backend, str) or not self.attention_backend.strip()):
            raise ValueError(f"attention_backend: must be a backend name, got {self.attention_backend!r}")
        self.stages = stage_options_of(self.stages)
        self.lora, self.lora_scale = check_lora_fields(self.lora, self.lora_scale, self.max_loras_per_actor)
        if not isinstance(self.strength, (int, float)) or not 0 <= self.strength <= 1:  # NaN fails both comparisons
            raise ValueError(f"strength: must be between 0 and 1, got {self.strength!r}")

    @property
    def uses_loras(self) -> bool:
        return bool(self.lora)

    def with_model_defaults(self, model) -> "GenerationOptions":
        """These options with what they leave to the model filled in, and the family's checks passed.

        ``model`` is a ``ModelDescription``: its family says which schedulers and options fit,
        and what steps, guidance and size multiple it uses.
        """
        from dataclasses import replace

        from workers.runtime.presets import recommended_guidance

        from workers.runtime.devices import check_dtype
        from workers.runtime.speed import check_attention_backend

        model.family.check_options(scheduler=self.scheduler, max_sequence_length=self.max_sequence_length, true_cfg_scale=self.true_cfg_scale)
        check_dtype(model.family, self.dtype)
        check_attention_backend(model.family, self.attention_backend)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % model.shape.size_multiple:
                raise ValueError(f"{name}: {model.family.name} models need a multiple of {model.shape.size_multiple}, got {value}")
        return replace(
            self, steps=self.steps or model.shape.default_steps, true_cfg_scale=model.family.true_cfg_scale(self.true_cfg_scale),
            guidance=self.guidance if self.guidance is not None else recommended_guidance(self.model, model.shape.default_guidance),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class GenerateConfig(GenerationOptions):
    """One bulk generation run: the generation options, plus what only a job has."""

    prompts: str  # Parquet file or folder URI
    output: str  # output folder URI
    overwrite: bool = False
    # one cache of text embeddings for the whole job: each distinct prompt and negative prompt
    # is encoded once per job (while the cache holds it), not once per batch or actor
    text_cache: bool = True
    text_cache_mib: int | None = None  # its budget; None: a quarter of the cluster's object store (TEXT_CACHE_SHARE)

    def __post_init__(self) -> None:
        for name in ("prompts", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty path or URI")
        super().__post_init__()
        check_text_cache_fields(self.text_cache, self.text_cache_mib)

    # fields that change what a run writes: a rerun into the same output must agree on them
    OUTPUT_FIELDS = (
        "prompts", "steps", "guidance", "height", "width", "negative_prompt", "scheduler",
        "seed", "image_format", "image_quality", "save_latents", "max_image_size", "true_cfg_scale", "max_sequence_length",
    )

    def output_identity(self) -> dict:
        identity = {name: getattr(self, name) for name in self.OUTPUT_FIELDS}
        if self.lora:  # only then: outputs of runs without LoRA keep the identity they had
            identity.update(lora=self.lora, lora_scale=self.lora_scale)
        return identity


def check_lora_fields(lora, lora_scale, max_loras: int) -> tuple[list[str], list[float]]:
    """``lora`` and ``lora_scale`` as lists (a single value is accepted), or a ValueError naming the field."""
    import math

    lora = [lora] if isinstance(lora, str) else list(lora or [])
    lora_scale = [lora_scale] if isinstance(lora_scale, (int, float)) else list(lora_scale or [])
    if not isinstance(max_loras, int) or max_loras < 1:
        raise ValueError(f"max_loras_per_actor: must be >= 1, got {max_loras!r}")
    for uri in lora:
        if not isinstance(uri, str) or not uri.strip():
            raise ValueError(f"lora: each must be a non-empty path or URI, got {uri!r}")
    if len(set(lora)) != len(lora):
        raise ValueError(f"lora: a file is named twice: {lora}")
    if len(lora) > max_loras:
        raise ValueError(f"lora: {len(lora)} files, above max_loras_per_actor {max_loras}")
    if lora_scale and not lora:
        raise ValueError("lora_scale: given without lora (--lora-scale needs --lora)")
    if lora_scale and len(lora_scale) != len(lora):
        raise ValueError(f"lora_scale: {len(lora_scale)} values for {len(lora)} lora files; give one per file")
    for scale in lora_scale:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"lora_scale: must be finite numbers, got {scale!r}")
    return lora, [float(scale) for scale in lora_scale]


def stage_options_of(stages: dict) -> dict[str, StageOptions]:
    """``stages`` as ``StageOptions`` per stage name; a plain dict per stage is accepted (the Python API's form)."""
    if not isinstance(stages, dict):
        raise ValueError(f"stages: must map stage names to options, got {stages!r}")
    resolved = {}
    for name, options in stages.items():
        if isinstance(options, dict):
            unknown = set(options) - {f.name for f in fields(StageOptions)}
            if unknown:
                raise ValueError(f"stages: {name}: unknown option(s) {', '.join(sorted(unknown))}; options are "
                                 f"{', '.join(f.name for f in fields(StageOptions))}")
            options = StageOptions(**options)
        elif not isinstance(options, StageOptions):
            raise ValueError(f"stages: {name}: expected a dict of options, got {options!r}")
        resolved[name] = options
    return resolved


CROPS = ("center", "random")
SAMPLE_MODES = ("mean", "sample")
LATENT_DTYPES = ("float16", "float32")  # Arrow and Parquet have no bfloat16
# Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): 89.5 million pixels
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def parse_bucket_list(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,1152x896"`` (WIDTHxHEIGHT) -> [(height, width), ...]."""
    sizes = []
    for item in text.split(","):
        try:
            width, height = (int(part) for part in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"buckets: {item.strip()!r} is not WIDTHxHEIGHT (e.g. 1152x896)") from None
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise ValueError(f"buckets: {item.strip()!r}: width and height must be multiples of 8, at least 8")
        sizes.append((height, width))
    return list(dict.fromkeys(sizes))


@dataclass(kw_only=True)
class EncodingOptions:
    """What an encoded row depends on and how the encoders run: ``latentray encode``'s flags less the job's
    (input, output, overwrite, rows per part, the job text cache). The encoding processor takes these alone."""

    model: str = "tiny"  # built-in model (demo, tiny, tiny-sdxl, ...), or diffusers directory (local path or any fsspec URI)
    resolution: int | None = None  # square side, or the pixel budget's side with buckets; None: the model's size
    crop: str = "center"
    buckets: str | None = None  # "auto": SDXL-style sizes of about resolution**2 pixels; or "WxH,WxH,..."
    bucket_step: int = 64  # sides of "auto" buckets are multiples of this
    flip: bool = False  # also store the latent of the mirrored crop
    image_column: str = "image"
    path_column: str | None = None  # a column of paths/URIs instead of image bytes
    caption_column: str | None = None
    id_column: str | None = None  # None: "id" when the table has it, else ids from row positions
    text_embeddings: bool = False
    max_sequence_length: int | None = None  # T5/Qwen tokens kept in prompt_embeds (SD3, FLUX, Z-Image, Qwen-Image); None: the family's default
    sample: str = "mean"  # latent from the posterior: its mean, or a sample with the row's seed
    latent_dtype: str = "float16"
    seed: int = 0  # rows derive their seed (random crop, sampling) from it and their id
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    min_image_size: int | None = None  # shortest side accepted; None: an image must cover its target (no upscaling)
    background: str = "white"  # what transparent pixels are composited on
    batch_size: int = 8
    placement: str = "auto"
    dtype: str = "auto"
    stages: dict[str, StageOptions] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("model", "image_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty string")
        for name in ("path_column", "caption_column", "id_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: must be a column name, got {value!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution: must be a multiple of 8, at least 8, got {self.resolution}")
        for name, allowed in (("crop", CROPS), ("sample", SAMPLE_MODES), ("latent_dtype", LATENT_DTYPES),
                              ("placement", PLACEMENTS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.buckets is not None and self.buckets != "auto":
            parse_bucket_list(self.buckets)
        if self.bucket_step < 8 or self.bucket_step % 8:
            raise ValueError(f"bucket_step: must be a multiple of 8, at least 8, got {self.bucket_step}")
        if self.text_embeddings and self.caption_column is None:
            raise ValueError("text_embeddings: needs a caption column (--caption-column)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be between 0 and 2**63-1, got {self.seed}")
        for name in ("max_image_pixels", "batch_size", "max_sequence_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_image_size is not None and self.min_image_size < 1:
            raise ValueError(f"min_image_size: must be >= 1, got {self.min_image_size}")
        self.background_rgb()  # fails here, naming the field, rather than in a task
        self.stages = stage_options_of(self.stages)

    def background_rgb(self) -> tuple[int, int, int]:
        from PIL import ImageColor

        try:
            return ImageColor.getrgb(self.background)[:3]
        except ValueError:
            raise ValueError(f"background: {self.background!r} is not a colour (e.g. white, #808080, rgb(0,0,0))") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class EncodeConfig(EncodingOptions):
    """One latent-dataset run: the encoding options, plus what only a job has."""

    images: str  # Parquet file or folder URI
    output: str  # output folder URI
    overwrite: bool = False
    # None: one latents/ part per block, committed as soon as its block is encoded (as generate does);
    # a number gathers that many rows per part: fewer, larger files, but nothing commits until a part is full
    rows_per_part: int | None = None
    # with --text-embeddings: each distinct caption encoded once per job (see GenerateConfig)
    text_cache: bool = True
    text_cache_mib: int | None = None

    def __post_init__(self) -> None:
        for name in ("images", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty string")
        super().__post_init__()
        if self.rows_per_part is not None and self.rows_per_part < 1:
            raise ValueError(f"rows_per_part: must be >= 1, got {self.rows_per_part}")
        check_text_cache_fields(self.text_cache, self.text_cache_mib)

    # fields that change what a run writes: a rerun into the same output must agree on them
    # (the input URI is not one: rows are cached by content, so a moved or grown corpus reuses them)
    OUTPUT_FIELDS = (
        "resolution", "crop", "buckets", "bucket_step", "flip", "image_column", "path_column", "caption_column",
        "id_column", "text_embeddings", "sample", "latent_dtype", "seed", "max_image_pixels", "min_image_size",
        "background", "max_sequence_length",
    )  # the dtype each encoder ran in is added once the cluster is known (``pipelines.runtime.precision``)

    def output_identity(self) -> dict:
        return {name: getattr(self, name) for name in self.OUTPUT_FIELDS}
