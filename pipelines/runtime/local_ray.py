"""A new local Ray for this process: what ``latentray`` starts without ``--address``, and what
``generate_images`` starts when its caller has no Ray (``jobs.ray_runtime`` adds the reaper)."""

from __future__ import annotations

import logging
import os

import ray


def embedded_cpus() -> int:
    """CPUs an embedded Ray advertises: the machine's cores, and at least 2.

    Ray's CPUs are scheduling slots, not cores (torch threads follow the real cores):
    with fewer than 2, a model actor and the CPU that the read, write and block-cutting
    tasks need could not both fit, and a 1-core laptop would be refused.
    """
    return max(os.cpu_count() or 1, 2)


def start_local_ray(num_cpus: int | None = None) -> None:
    """A new local instance, whatever files earlier clusters left behind (``address="local"``): bound to
    the loopback interface and without the dashboard (a laptop run needs neither, and it saves ~500 MB)."""
    _use_loopback()
    ray.init(
        address="local", num_cpus=num_cpus or embedded_cpus(), include_dashboard=False, _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING, configure_logging=True, _system_config=SYSTEM_CONFIG,
    )


# Ray allows as many worker-lease requests in flight per kind of task as the cluster has nodes: one, on an
# embedded Ray. A request its raylet never answers (seen in CI: the driver's request in flight, the raylet's
# queues empty, every worker idle) then blocks every later task of that kind, and the ledger's ``ray.get``
# waited forever. Ray's earlier default of 10 lets the other requests go on.
SYSTEM_CONFIG = {"max_pending_lease_requests_per_scheduling_category": 10}


# Ray's switch for a single-machine Ray (its default on macOS and Windows): the node's address is the loopback one
SINGLE_MACHINE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _use_loopback() -> None:
    """Ray replaces ``_node_ip_address="127.0.0.1"`` with the machine's network address, so that other
    machines could join; an embedded Ray has none to wait for. On its network address the driver's
    connections to its own raylet and workers leave loopback: exposed to the network, and in sandboxes
    whose network drops a connection silently, a request that waits ~15 minutes for TCP to give up (a
    ``ray.get`` that hung for 924 s on such a machine). Ray's single-machine switch keeps every address on
    loopback: read by this process's Ray at call time, and by the processes it starts from the environment."""
    from ray._private import ray_constants

    os.environ[SINGLE_MACHINE_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
