"""Stage resources: defaults per cluster shape, user overrides, and refusing settings that would stall."""

import math

import pytest

from pipelines.generation.generate import SHARES
from pipelines.runtime.config import StageOptions
from pipelines.runtime.placement import (
    BLOCKS_PER_ACTOR, MAX_BLOCK_PIXELS, MAX_ROWS_PER_BLOCK, FREE_CPUS, BlockWork, ClusterShape, rows_per_block, stage_options,
)


def reserved_cpus(options) -> float:
    return sum(option.num_cpus * option.concurrency for option in options.values())


@pytest.mark.parametrize("placement", ["fused", "split"])
@pytest.mark.parametrize("cpus", [2, 4, 16])
def test_cpu_actors_always_leave_a_cpu_for_read_write_and_block_cutting_tasks(placement, cpus):
    options = stage_options(SHARES[placement], ClusterShape(cpus, 0), 8, {}, placement)
    assert reserved_cpus(options) <= cpus - FREE_CPUS
    assert all(option.num_gpus == 0 and option.concurrency == 1 for option in options.values())


def test_user_concurrency_shrinks_each_actors_cpu_reservation():
    options = stage_options(SHARES["fused"], ClusterShape(2, 0), 8, {"fused": StageOptions(concurrency=2)}, "fused")
    assert options["fused"].concurrency == 2 and reserved_cpus(options) <= 2 - FREE_CPUS


def test_gpus_get_one_set_of_actors_each_sharing_the_gpu():
    options = stage_options(SHARES["split"], ClusterShape(32, 4), 16, {}, "split")
    assert {name: option.num_gpus for name, option in options.items()} == {"text_encoder": 0.1, "denoiser": 0.7, "vae_decoder": 0.2}
    assert all(option.concurrency == 4 and option.batch_size == 16 and option.threads is None for option in options.values())


def test_reserving_every_cpu_is_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"stages reserve 2 of the cluster's 2 CPUs; read, write and block-cutting tasks need 1 free"):
        stage_options(SHARES["fused"], ClusterShape(2, 0), 8, {"fused": StageOptions(num_cpus=1.0, concurrency=2)}, "fused")


def test_unknown_stage_names_are_refused():
    with pytest.raises(ValueError, match=r"stages: denoiser not in the fused placement \(stages: fused\)"):
        stage_options(SHARES["fused"], ClusterShape(2, 0), 8, {"denoiser": StageOptions(batch_size=2)}, "fused")


# -- rows per block -------------------------------------------------------------------------------

SDXL_PIXELS, SD_PIXELS, TINY_PIXELS = 1024 * 1024, 512 * 512, 64 * 64


def block_rows(rows: int, actors: int, batch_size: int, pixels: int, passes: int) -> int:
    return rows_per_block(BlockWork(rows=rows, actors=actors, batch_size=batch_size, pixels_per_row=pixels, passes_per_row=passes))


def test_a_small_job_is_cut_into_single_batches_so_every_actor_starts_at_once():
    # 48 rows, 4 actors, batches of 8: 6 blocks of one batch, so all 4 actors get one from the start
    assert block_rows(48, actors=4, batch_size=8, pixels=TINY_PIXELS, passes=20) == 8
    # a block is never below one batch, even when there are fewer rows than actors x batches
    assert block_rows(5, actors=4, batch_size=8, pixels=TINY_PIXELS, passes=20) == 8
    assert block_rows(0, actors=1, batch_size=4, pixels=TINY_PIXELS, passes=20) == 4


def test_blocks_give_each_actor_several_blocks_in_whole_batches():
    # 2,000 SDXL rows on 16 GPUs: 16 rows (2 batches) per block, 125 blocks, about 8 per GPU
    rows = block_rows(2000, actors=16, batch_size=8, pixels=SDXL_PIXELS, passes=30)
    assert rows == 16 and math.ceil(2000 / rows) >= 16 * BLOCKS_PER_ACTOR - 3
    # 1,000 tiny rows on one actor: 8 blocks of 120 rows (15 batches) and a last one, never a partial batch
    assert block_rows(1000, actors=1, batch_size=8, pixels=TINY_PIXELS, passes=20) == 120


def test_large_jobs_stop_at_the_first_bound_a_block_reaches():
    # work: 10M SDXL rows at 30 steps -> 2**30 / (1024*1024*30) = 34 rows, in whole batches of 8
    assert block_rows(10_000_000, actors=16, batch_size=8, pixels=SDXL_PIXELS, passes=30) == 32
    # pixels: 1M crops of 512x512 encoded in one pass -> 2**26 / 512**2 = 256 rows (192 MiB of RGB)
    assert block_rows(1_000_000, actors=8, batch_size=8, pixels=SD_PIXELS, passes=1) == MAX_BLOCK_PIXELS // SD_PIXELS == 256
    # rows: 10M cheap rows (64x64, 4 steps) -> MAX_ROWS_PER_BLOCK, 2,442 blocks for the whole job
    assert block_rows(10_000_000, actors=1, batch_size=8, pixels=TINY_PIXELS, passes=4) == MAX_ROWS_PER_BLOCK == 4096


def test_block_work_names_the_bad_field():
    with pytest.raises(ValueError, match=r"actors: must be a whole number >= 1, got 0"):
        BlockWork(rows=10, actors=0, batch_size=8, pixels_per_row=TINY_PIXELS, passes_per_row=4)
    with pytest.raises(ValueError, match=r"rows: must be a whole number >= 0, got -1"):
        BlockWork(rows=-1, actors=1, batch_size=8, pixels_per_row=TINY_PIXELS, passes_per_row=4)


def test_block_work_of_stages_takes_the_largest_pool_and_batch():
    options = stage_options(SHARES["split"], ClusterShape(32, 4), 8, {"denoiser": StageOptions(batch_size=16)}, "split")
    work = BlockWork.of_stages(list(options.values()), rows=100, pixels_per_row=TINY_PIXELS, passes_per_row=4)
    assert (work.actors, work.batch_size) == (4, 16)


def test_blocks_are_cut_by_light_tasks():
    """Ray Data's repartition tasks reserve a whole CPU; beside a model actor on 2 CPUs nothing else ran."""
    import ray.data

    from pipelines.runtime.placement import TASK_CPUS
    from pipelines.runtime.stages import cut_into_blocks

    dataset = cut_into_blocks(ray.data.from_items([{"a": 1}]), rows_per_block=4)
    assert dataset._logical_plan.dag.ray_remote_args["num_cpus"] == TASK_CPUS
