"""cluster.yaml: valid for Ray's cluster launcher, and shaped the way latentray's stages need.

Validation runs the same offline steps as ``ray up`` (``ray.autoscaler._private.commands.
_bootstrap_config``): ``prepare_config`` (merge with Ray's AWS defaults, fill per-type worker
bounds) then ``validate_config`` (ray-schema.json plus the launcher's own consistency checks).
The AWS-specific steps that follow in ``ray up`` (resource auto-detection, IAM, subnets, AMI)
call AWS and are not run here; a fixture makes any network use fail the test.
"""

from __future__ import annotations

import copy
import socket
from functools import partial
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"

# vCPUs and GPUs of the instance types cluster.yaml uses or suggests. A node type's `resources`
# override what Ray would auto-detect, so they must match the hardware: a p4d.24xlarge left at
# GPU 1 would get one actor instead of eight. Add a type here when you switch to it.
INSTANCE_TYPES = {
    "m6i.2xlarge": (8, 0),
    "c6i.4xlarge": (16, 0),
    "g5.xlarge": (4, 1),
    "g5.12xlarge": (48, 4),
    "g6.xlarge": (4, 1),
    "g6.12xlarge": (48, 4),
    "g6e.2xlarge": (8, 1),
    "g6e.12xlarge": (48, 4),
    "p5.4xlarge": (16, 1),
    "p4d.24xlarge": (96, 8),
}

# Resource requests of latentray's model actors, as pipelines.generation.generate.default_stage_options
# builds them on a GPU cluster (copied: importing that module loads torch and diffusers, ~10 s).
FUSED_GPU_ACTOR = {"CPU": 1, "GPU": 1}
SPLIT_GPU_ACTORS = [{"CPU": 0.5, "GPU": 0.1}, {"CPU": 0.5, "GPU": 0.7}, {"CPU": 0.5, "GPU": 0.2}]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config checks must work offline (no AWS calls)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())  # as `ray up` reads it


def launcher_check(config: dict) -> dict:
    """The offline part of ``ray up``'s config handling; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def gpu_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in worker_types(config).items() if t["resources"].get("GPU", 0) >= 1}


def cpu_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in worker_types(config).items() if not t["resources"].get("GPU", 0)}


def check_latentray_layout(config: dict) -> None:
    """What latentray relies on beyond Ray's schema; ``config`` is a prepared config."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not offer GPUs: model actors belong on GPU workers"
    assert head["resources"].get("CPU") == 0, "the head offers CPU 0 so no task or actor competes with the driver"
    assert head["max_workers"] == 0

    assert gpu_types(config), "no worker type offers a GPU: latentray's model actors request num_gpus"
    assert cpu_types(config), "no CPU-only worker type for reads, validation and image writes"
    for name, node_type in worker_types(config).items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{name}: {instance} not in INSTANCE_TYPES; add its vCPUs and GPUs"
        cpus, gpus = INSTANCE_TYPES[instance]
        stated = node_type["resources"]
        assert (stated.get("CPU"), stated.get("GPU", 0)) == (cpus, gpus), (
            f"{name}: resources say CPU {stated.get('CPU')} / GPU {stated.get('GPU', 0)}, "
            f"a {instance} has {cpus} vCPUs / {gpus} GPUs"
        )
    for name in gpu_types(config):
        assert "latentray_gpu_node" in types[name]["resources"], f"{name}: missing the latentray_gpu_node marker"
    for name in cpu_types(config):
        assert "latentray_cpu_node" in types[name]["resources"], f"{name}: missing the latentray_cpu_node marker"

    for name, node_type in types.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], f"{name}: min_workers > max_workers"
    total_max = sum(t["max_workers"] for t in worker_types(config).values())
    assert total_max <= config["max_workers"], (
        f"per-type max_workers add up to {total_max} > global max_workers {config['max_workers']}: "
        "the global cap would silently cut the per-type ones"
    )
    # latentray sizes its default stage options from the GPUs present when a job starts
    # (ClusterShape.current()); with no GPU node up, the models would run on CPU.
    assert sum(t["min_workers"] for t in gpu_types(config).values()) >= 1, "keep at least one GPU node up"


# -- the real file --------------------------------------------------------------------------------


def test_ray_launcher_accepts_cluster_yaml(raw):
    prepared = launcher_check(raw)
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["idle_timeout_minutes"] > 0
    # the repo is mounted and installed on every node
    assert "~/latentray" in prepared["file_mounts"]
    assert any("pip install" in cmd and "~/latentray" in cmd for cmd in prepared["setup_commands"])
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


def test_node_types_fit_latentray(raw):
    check_latentray_layout(launcher_check(raw))


def test_token_auth_is_consistent_on_every_node(raw):
    # RAY_AUTH_MODE must be the same on all nodes, and every node needs the token file:
    # a worker without RAY_AUTH_MODE=token is refused by a token-auth head.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [cmd for cmd in raw[key] if "ray start" in cmd]
        assert start and all("RAY_AUTH_MODE=token" in cmd for cmd in start), key
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize(
    ("demands", "expected"),
    [
        ([FUSED_GPU_ACTOR] * 3, {"gpu_worker": 3}),  # --stage fused.concurrency=3: one GPU node each
        (SPLIT_GPU_ACTORS, {"gpu_worker": 1}),  # a split set shares one GPU
        ([{"CPU": 12}], {"cpu_worker": 1}),  # a CPU stage too big for a g6e.2xlarge's 8 vCPUs
        ([{"CPU": 1, "latentray_cpu_node": 1}], {"cpu_worker": 1}),
        ([{"CPU": 1, "latentray_gpu_node": 1}], {"gpu_worker": 1}),
    ],
    ids=["fused-3-gpus", "split-set", "cpu-stage-12-cpus", "cpu-marker", "gpu-marker"],
)
def test_autoscaler_launches_the_right_node_type(raw, demands, expected):
    """Ray's own bin packing (the autoscaler's get_nodes_for) for latentray's resource requests."""
    prepared = launcher_check(raw)
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_add, unplaced = get_nodes_for(
        prepared["available_node_types"], {prepared["head_node_type"]: 1}, prepared["head_node_type"],
        prepared["max_workers"], demands, scorer,
    )
    assert (dict(to_add), unplaced) == (expected, [])


# -- breaking the file is caught ------------------------------------------------------------------


def _set(path: str, value):
    def mutate(config: dict) -> None:
        *parents, last = path.split(".")
        target = config
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (_set("max_worker", 8), jsonschema.ValidationError, "max_worker"),  # misspelt top-level key
        (_set("available_node_types.gpu_worker.max_workers", "4"), jsonschema.ValidationError, "is not of type 'integer'"),
        (_set("available_node_types.gpu_worker.min_worker", 1), jsonschema.ValidationError, "min_worker"),
        # the launcher's resources are whole numbers: fractions belong in --stage, not here
        (_set("available_node_types.gpu_worker.resources.GPU", 0.5), jsonschema.ValidationError, "is not of type 'integer'"),
        (_set("head_node_type", "ray.head.default"), ValueError, "head_node_type"),
        (_set("max_workers", 0), ValueError, "sum of `min_workers`"),
    ],
    ids=["unknown-top-level-key", "max_workers-string", "unknown-node-type-key", "fractional-gpu", "missing-head-type", "min-over-global-max"],
)
def test_launcher_rejects_broken_config(raw, mutate, error, message):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(error, match=message):
        launcher_check(broken)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("available_node_types.gpu_worker.resources", {"CPU": 4, "latentray_gpu_node": 1000}), "no worker type offers a GPU"),
        (_set("available_node_types.gpu_worker.node_config.InstanceType", "p4d.24xlarge"), "a p4d.24xlarge has 96 vCPUs / 8 GPUs"),
        (_set("available_node_types.gpu_worker.min_workers", 0), "keep at least one GPU node up"),
        (_set("available_node_types.cpu_worker.max_workers", 9), "global cap"),
        (_set("available_node_types.head.resources", {}), "the head offers CPU 0"),
    ],
    ids=["no-gpu-type", "instance-resources-mismatch", "no-gpu-at-start", "per-type-over-global", "head-takes-tasks"],
)
def test_layout_check_rejects_broken_config(raw, mutate, message):
    broken = copy.deepcopy(raw)
    mutate(broken)
    prepared = launcher_check(broken)  # valid for Ray, wrong for latentray
    with pytest.raises(AssertionError, match=message):
        check_latentray_layout(prepared)
