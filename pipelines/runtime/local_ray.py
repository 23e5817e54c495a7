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
    ray.init(
        address="local", num_cpus=num_cpus or embedded_cpus(), include_dashboard=False, _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING, configure_logging=True,
    )
