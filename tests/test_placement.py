"""Stage resources: defaults per cluster shape, user overrides, and refusing settings that would stall."""

import pytest

from pipelines.config import StageOptions
from pipelines.generate import SHARES
from pipelines.placement import TASK_CPUS, ClusterShape, stage_options


def reserved_cpus(options) -> float:
    return sum(option.num_cpus * option.concurrency for option in options.values())


@pytest.mark.parametrize("placement", ["fused", "split"])
@pytest.mark.parametrize("cpus", [2, 4, 16])
def test_cpu_actors_always_leave_a_cpu_share_for_read_and_write_tasks(placement, cpus):
    options = stage_options(SHARES[placement], ClusterShape(cpus, 0), 8, {}, placement)
    assert reserved_cpus(options) <= cpus - TASK_CPUS
    assert all(option.num_gpus == 0 and option.concurrency == 1 for option in options.values())


def test_user_concurrency_shrinks_each_actors_cpu_reservation():
    options = stage_options(SHARES["fused"], ClusterShape(2, 0), 8, {"fused": StageOptions(concurrency=2)}, "fused")
    assert options["fused"].concurrency == 2 and reserved_cpus(options) <= 2 - TASK_CPUS


def test_gpus_get_one_set_of_actors_each_sharing_the_gpu():
    options = stage_options(SHARES["split"], ClusterShape(32, 4), 16, {}, "split")
    assert {name: option.num_gpus for name, option in options.items()} == {"text_encoder": 0.1, "denoiser": 0.7, "vae_decoder": 0.2}
    assert all(option.concurrency == 4 and option.batch_size == 16 and option.threads is None for option in options.values())


def test_reserving_every_cpu_is_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"stages reserve 2 of the cluster's 2 CPUs; read and write tasks need 0.25 free"):
        stage_options(SHARES["fused"], ClusterShape(2, 0), 8, {"fused": StageOptions(num_cpus=1.0, concurrency=2)}, "fused")


def test_unknown_stage_names_are_refused():
    with pytest.raises(ValueError, match=r"stages: denoiser not in the fused placement \(stages: fused\)"):
        stage_options(SHARES["fused"], ClusterShape(2, 0), 8, {"denoiser": StageOptions(batch_size=2)}, "fused")
