"""A stage = a worker class (the work) + how Ray runs it (batch size, actors, resources).

Work and placement stay apart: moving a model from a split pool to the fused actor
changes no model code. ``check_wiring`` fails before the cluster runs anything when
a stage needs a column that no earlier stage provides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray.data

from pipelines.runtime.config import StageOptions
from pipelines.runtime.placement import TASK_CPUS
from workers.families import ModelFamily

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Stage:
    name: str
    worker: type
    options: StageOptions
    family: ModelFamily  # the columns a worker reads and writes depend on the model family
    constructor_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def required_columns(self) -> dict[str, str]:
        return self.worker.required_columns(self.family)

    @property
    def output_columns(self) -> tuple[str, ...]:
        return self.worker.output_columns(self.family)

    def apply(self, dataset: ray.data.Dataset) -> ray.data.Dataset:
        options = self.options
        return dataset.map_batches(
            self.worker,
            batch_size=options.batch_size,
            # One block at a time per actor: a block is at least a model batch (seconds of work)
            # and the next one is fetched in milliseconds, while a second block queued at a busy
            # actor is work an idle or just-started actor could have taken (see rows_per_block)
            compute=ray.data.ActorPoolStrategy(size=options.concurrency, max_tasks_in_flight_per_actor=1),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus or None,
            fn_constructor_kwargs={**self.constructor_kwargs, "threads": options.threads},
        )


def cut_into_blocks(dataset: ray.data.Dataset, rows_per_block: int) -> ray.data.Dataset:
    """``dataset`` cut into blocks of ``rows_per_block`` rows by light tasks (``TASK_CPUS``).

    A Ray Data task's results leave it as one block whatever its function yields, so the
    jobs cut blocks with ``repartition``. Its tasks reserve a whole CPU, and Ray Data's API
    takes no resources for them: on a 2-CPU node beside a model actor holding the other
    CPU, nothing else could run while one was cutting (a rerun of a finished 1M-row
    encoding output took 58 s with them, 31 s with light ones). The reservation is set on
    the operator the plan holds (a private attribute: a later Ray that moves it gets a
    warning, and the whole-CPU default).

    ``strict``: Ray fuses a non-strict repartition into the task before it, and the task after
    it (encode's decoding) into the same task, whose output buffer then joins the cut blocks
    into one again: a row group reached the encoder, and its commit, as a single block.
    """
    dataset = dataset.repartition(target_num_rows_per_block=rows_per_block, strict=True)
    remote_args = getattr(getattr(getattr(dataset, "_logical_plan", None), "dag", None), "ray_remote_args", None)
    if isinstance(remote_args, dict):
        remote_args.setdefault("num_cpus", TASK_CPUS)
    else:
        logger.warning("this Ray's repartition operator has no ray_remote_args: its tasks reserve a whole CPU each")
    return dataset


def check_wiring(stages: list[Stage], input_columns: set[str]) -> None:
    available = set(input_columns)
    for stage in stages:
        missing = [column for column in stage.required_columns if column not in available]
        if missing:
            details = "; ".join(f"{column} ({stage.required_columns[column]})" for column in missing)
            raise ValueError(f"stage {stage.name!r} needs columns no earlier stage provides: {details}")
        available |= set(stage.output_columns)
