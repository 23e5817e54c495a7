"""Latent datasets: a Parquet table of images -> latents (and caption embeddings) for training.

    the ledger (tasks): what the output holds per id -> read row groups with their lookups
    -> blocks sized from their work -> prepare (CPU task per block: source bytes, cache
    key, skip what is done, decode, resize, crop)
    -> caption encoder and VAE encoder (actors: one pool each with ``split``, one actor
    with ``fused``) -> commit latents parts (CPU task)
    -> the ledger (tasks): superseded copies out, counts -> latent_stats.json, run.json

The same bones as generation (``pipelines.runtime.job``): model description and loading,
stages and placement, the run record, the output protocol (``RunOutput``) and exact
statistics from the parts' footers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.data

from pipelines.encoding.encode_rows import CAPTION_COLUMNS, PREPARED_COLUMNS, RowSettings, SourceColumns, prepare_images
from pipelines.encoding.image_decode import Preprocessing, aspect_buckets
from pipelines.runtime import io
from pipelines.runtime.config import EncodeConfig, EncodingOptions, parse_bucket_list
from pipelines.encoding.ledger import Lookup, look_up, read_rows_with_lookup, settle
from pipelines.encoding.latent_output import LatentLayout, commit_latents
from pipelines.runtime.model_source import ModelDescription, component_fingerprint, describe_model
from pipelines.runtime.outputs import Listing, OutputSummary, RunOutput
from pipelines.runtime.job import RunTotals, run_job
from pipelines.runtime.placement import TASK_CPUS, ClusterShape, StageShare, stage_options, vae_micro_batch
from pipelines.runtime.precision import carry_precision, resolve_stages, settle_precision, stage_precision
from pipelines.runtime.schemas import check_image_schema
from pipelines.runtime.stages import Stage, cut_into_blocks
from workers.encoding.caption_encoder import CaptionEncoderWorker
from workers.encoding.fused import FusedEncodingWorker
from workers.encoding.vae_encoder import VaeEncoderWorker
from workers.runtime.devices import check_dtype

# Share of the cluster per stage. Without caption embeddings the VAE encoder is the only
# model: fused and split are the same single stage. The VAE encoder is the heavy one.
VAE_ONLY = {"vae_encoder": StageShare(cpu=1.0, gpu=1.0, heavy=True)}
SHARES = {
    "fused": {"fused": StageShare(cpu=1.0, gpu=1.0, heavy=True)},
    "split": {"text_encoder": StageShare(cpu=0.25, gpu=0.2, heavy=False), "vae_encoder": StageShare(cpu=0.75, gpu=0.8, heavy=True)},
}
# what latent_stats.json covers
LATENT_STATS_OVER = "the latent column (flipped latents excluded)"
WORKERS = {"vae_encoder": VaeEncoderWorker, "text_encoder": CaptionEncoderWorker, "fused": FusedEncodingWorker}
# the model roles each stage runs: a run's precision is recorded per role, whatever the placement
ROLES = {"vae_encoder": ("vae_encoder",), "text_encoder": ("text_encoder",), "fused": ("text_encoder", "vae_encoder")}


# -- stages ---------------------------------------------------------------------------------------


def resolve_placement(placement: str, text_embeddings: bool) -> str:
    """``auto``: fused, as generation (one actor holds both encoders; nothing crosses the object store)."""
    if not text_embeddings:
        return "vae_only"
    return "fused" if placement == "auto" else placement


def build_model_stages(config: EncodingOptions, model: ModelDescription, placement: str, cluster: ClusterShape) -> list[Stage]:
    shares = VAE_ONLY if placement == "vae_only" else SHARES[placement]
    overrides, vae_batch = vae_micro_batch(config.stages, "vae_encoder", shares)
    options = stage_options(shares, cluster, config.batch_size, overrides, placement)
    stages = []
    for name in shares:
        kwargs: dict[str, Any] = {"model": model.location, "dtype": config.dtype}
        if name != "text_encoder":
            kwargs.update(sample=config.sample, flip=config.flip, vae_batch_size=vae_batch)
        if name != "vae_encoder":
            kwargs.update(max_sequence_length=config.max_sequence_length)
        stages.append(Stage(name=name, worker=WORKERS[name], options=options[name], family=model.family, constructor_kwargs=kwargs))
    resolve_stages(stages, model.family, config.dtype)
    return stages


# -- the plan -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EncodingPlan:
    """Everything checked and known before Ray starts: a bad input fails here, fast (``PlannedJob``)."""

    label = "encode"
    log_stats_warnings = True
    finished = False  # rows are skipped by cache key, in the prepare tasks
    listing = None  # the ledger's tasks look the output up (``before_run``)
    config: EncodeConfig
    model: ModelDescription
    output: RunOutput
    identity: dict
    previous_run: int  # the last run's number in the output's run.json (0 for none)
    fragments: list[io.ParquetFragment]
    id_column: str | None
    settings: RowSettings
    layout: LatentLayout
    lookup: Lookup | None = None  # what the output holds, per row group (``before_run``)

    @property
    def input_rows(self) -> int:
        return sum(fragment.num_rows for fragment in self.fragments)

    @property
    def run(self) -> int:
        """This run's number in the output (1 for the first)."""
        return self.settings.run

    @property
    def rows_done_before(self) -> int:
        return self.lookup.rows_done if self.lookup else 0

    @property
    def rows_to_read(self) -> int:
        """Every input row: each is read and its cache key checked; the rows the output holds
        leave in the prepare tasks (blocks sized from the rows left alone would be tiny on a rerun)."""
        return self.input_rows

    def before_run(self) -> None:
        """Look up, by tasks, what the output holds for each input row (superseded copies removed)."""
        self.lookup = look_up(self.output, self.fragments, self.id_column)
        self.settings = replace(self.settings, run=1 + max(self.previous_run, self.lookup.last_run))

    def placement(self, cluster: ClusterShape) -> str:
        return resolve_placement(self.config.placement, self.config.text_embeddings)

    def model_stages(self, placement: str, cluster: ClusterShape) -> list[Stage]:
        stages = build_model_stages(self.config, self.model, placement, cluster)
        # the encoders' dtypes join the identity, and so every row's cache key
        settle_precision(self.identity, stage_precision(stages, ROLES), self.output.uri)
        self.settings = replace(self.settings, encoding_key=encoding_key(self.identity))
        return stages

    def stage_input_columns(self) -> set[str]:
        return set(PREPARED_COLUMNS) | (set(CAPTION_COLUMNS) if self.layout.caption else set())

    def row_work(self) -> tuple[int, int]:
        """The largest target size, one VAE pass per row."""
        return max(height * width for height, width in self.settings.preprocessing.targets), 1

    def dataset(self, stages: list[Stage], block_rows: int) -> ray.data.Dataset:
        return _build_dataset(self, stages, block_rows)

    def record_fields(self) -> dict:
        return {"run": self.run}

    def final_fields(self) -> dict:
        return {}

    def final_counts(self, totals: RunTotals | None, listing: Listing | None) -> tuple[dict, Listing]:
        # one copy per row: rows this run wrote again supersede their older copies (removed: listed after)
        return settle(self.output, self.fragments, self.id_column, self.run), self.output.listing()

    def error_reasons(self, summary: OutputSummary) -> dict[str, int]:
        return summary.error_reasons("code")

    def latent_stats_text(self) -> tuple[str, str]:
        return LATENT_STATS_OVER, "the corpus suggests"


def plan_encoding(config: EncodeConfig) -> EncodingPlan:
    # 1. the input table and the model, before any model loads
    schema, fragments = io.parquet_fragments(config.images)
    check_image_schema(schema, config.images, image_column=config.image_column, path_column=config.path_column,
                       caption_column=config.caption_column, id_column=config.id_column)
    id_column = config.id_column or ("id" if "id" in schema.names else None)
    model = describe_model(config.model)
    family = model.family
    resolution, preprocessing = checked_preprocessing(config, model)

    # 2. the output: its identity is the model's encoders and everything that shapes a row (defaults resolved)
    components = (family.vae_component, *family.text_components) if config.text_embeddings else (family.vae_component,)
    identity = {
        **config.output_identity(), "resolution": resolution, "id_column": id_column,
        "targets": [list(target) for target in preprocessing.targets],
        "model": model.location.uri, "model_fingerprint": component_fingerprint(config.model, components),
    }
    output = RunOutput(config.output, "latents")
    carry_precision(identity, output.uri, config.overwrite)
    previous = output.prepare(identity, config.overwrite)
    previous_run = (previous or {}).get("run", 0)

    # 3. what earlier runs left is looked up by tasks once Ray is connected (``before_run``)
    columns = SourceColumns(image=None if config.path_column else config.image_column, path=config.path_column,
                            caption=config.caption_column, id=id_column)
    return EncodingPlan(
        config=config, model=model, output=output, identity=identity, previous_run=previous_run, fragments=fragments,
        id_column=id_column,
        settings=RowSettings(
            columns=columns, preprocessing=preprocessing, seed=config.seed, run=previous_run + 1,
            encoding_key=encoding_key(identity),
            file_starts=tuple(sorted((start, uri) for uri, start in io.file_starts(fragments).items())),
        ),
        layout=LatentLayout(dtype=config.latent_dtype, fixed_shape=config.buckets is None, flip=config.flip,
                            caption=config.caption_column is not None,
                            text_embeddings=family.embedding_columns if config.text_embeddings else (),
                            fixed_length_embeddings=family.fixed_length_embeddings),
    )


def encoding_key(identity: dict) -> str:
    """What every row's cache key holds of the run: model, preprocessing and precision."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def checked_preprocessing(config: EncodingOptions, model: ModelDescription) -> tuple[int, Preprocessing]:
    """The options checked against the model's family: the resolution and the preprocessing they ask for."""
    if config.text_embeddings:
        model.family.check_options(scheduler=None, max_sequence_length=config.max_sequence_length, true_cfg_scale=1.0)
    check_dtype(model.family, config.dtype)
    resolution = config.resolution or model.shape.default_height
    return resolution, preprocessing_of(config, model, resolution)


def preprocessing_of(config: EncodingOptions, model: ModelDescription, resolution: int) -> Preprocessing:
    if config.buckets is None:
        targets = [(resolution, resolution)]
    elif config.buckets == "auto":
        targets = aspect_buckets(resolution, config.bucket_step)
    else:
        targets = parse_bucket_list(config.buckets)
    for height, width in targets:
        if height % model.shape.size_multiple or width % model.shape.size_multiple:
            raise ValueError(f"buckets: {width}x{height} is not a multiple of {model.shape.size_multiple}, which {model.family.name} models need")
    if resolution % model.shape.size_multiple:
        raise ValueError(f"resolution: {resolution} is not a multiple of {model.shape.size_multiple}, which {model.family.name} models need")
    return Preprocessing(
        targets=tuple(targets), crop=config.crop, max_pixels=config.max_image_pixels,
        min_size=config.min_image_size, background=config.background_rgb(),
    )


# -- the run --------------------------------------------------------------------------------------


def run_encoding(config: EncodeConfig | EncodingPlan) -> dict:
    """Run one encoding job on the connected Ray cluster; return its run record (run.json)."""
    return run_job(config if isinstance(config, EncodingPlan) else plan_encoding(config))


def _build_dataset(plan: EncodingPlan, stages: list[Stage], block_rows: int) -> ray.data.Dataset:
    # batches form identically on every run: same parts, same names, on a rerun of the same rows
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # 1. every row group is read, with the lookups of its rows: what is done is skipped by cache key in the prepare tasks
    dataset = ray.data.from_arrow_refs(plan.lookup.items)
    dataset = dataset.map_batches(
        read_rows_with_lookup, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
        fn_kwargs={"columns": plan.settings.columns.to_read(), "rows_per_block": block_rows},
    )
    # 2. the wiring the processor shares; 3. one latents/ part per commit task: by default one per
    # block, so that rows commit as their block finishes and a killed run loses only the blocks in flight
    dataset = encoding_rows(dataset, stages, settings=plan.settings, block_rows=block_rows, errors_uri=plan.output.errors_uri)
    return dataset.map_batches(
        commit_latents, batch_size=plan.config.rows_per_part, num_cpus=TASK_CPUS,
        fn_kwargs={"output": plan.output, "layout": plan.layout, "run": plan.run},
    )


def encoding_rows(
    dataset: ray.data.Dataset, stages: list[Stage], *, settings: RowSettings, block_rows: int, errors_uri: str | None,
) -> ray.data.Dataset:
    """Image rows -> encoded rows (``latent``, caption embeddings, failure columns): the one wiring of the
    encoders, shared by the job (``errors_uri``: bad rows are written there) and the encoding processor
    (no ``errors_uri``: every row goes on with its own columns, bad ones marked failed; see ``prepare_images``).
    """
    # 1. A task's results leave it as one block, whatever its UDF yields: cut the rows into
    # blocks sized from their work here, before decoding, so that decoding runs as one
    # task per block and every encoder actor receives blocks from the start
    dataset = cut_into_blocks(dataset, block_rows)
    # 2. source bytes, cache key, decode, resize, crop (CPU task per block)
    dataset = dataset.map_batches(
        prepare_images, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
        fn_kwargs={"settings": settings, "errors_uri": errors_uri},
    )
    # 3. the encoders
    for stage in stages:
        dataset = stage.apply(dataset)
    return dataset
