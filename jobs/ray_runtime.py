"""Starting or joining Ray for a job."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Join the cluster at ``address`` (or RAY_ADDRESS); without one, start Ray embedded.

    Embedded Ray binds to the loopback interface and runs without the dashboard:
    a laptop run needs neither a network-visible node nor ~500 MB of dashboard.
    Returns a description of where the job runs.
    """
    if ray.is_initialized():
        return "the Ray instance already running in this process"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return f"the Ray cluster at {address}"
    ray.init(
        num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING, configure_logging=True,
    )
    return "an embedded local Ray instance"
