"""Starting or joining Ray for a job, without ever waiting silently.

Ray's own ``ray.init()`` without an address joins whatever cluster the last ``ray
start`` on this machine recorded in ``/tmp/ray/ray_current_cluster`` (the file stays
after that head stops), and when nothing answers there it waits forever. So:

- no address (and no ``RAY_ADDRESS``): always a new local Ray (``address="local"``);
- ``auto``: the cluster ``ray start`` recorded, explicitly asked for;
- any address: probed first, and joined within ``timeout`` seconds, else a
  ``RayConnectionError`` naming the address.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import ray

from jobs import reaper
from pipelines.runtime.local_ray import embedded_cpus, start_local_ray  # noqa: F401 (embedded_cpus: the jobs' name for it)

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_SECONDS = 60.0
EMBEDDED = "an embedded local Ray instance"  # what ``connect`` returns when it started one


class RayConnectionError(ValueError):
    """The Ray cluster a job was told to use does not answer.

    ``init_still_running``: a ``ray.init`` thread is still waiting; the process should
    exit rather than return to an interpreter shutdown that would wait for it.
    """

    init_still_running = False


def connect(address: str | None = None, num_cpus: int | None = None, timeout: float = DEFAULT_CONNECT_SECONDS) -> str:
    """Join the cluster at ``address`` (or RAY_ADDRESS); without one, start a new local Ray.

    Embedded Ray binds to the loopback interface and runs without the dashboard:
    a laptop run needs neither a network-visible node nor ~500 MB of dashboard; and
    it ends with this process, however this process ends (``jobs.reaper``).
    Returns a description of where the job runs.
    """
    # 1. a process that already joined keeps its Ray (tests, notebooks)
    if ray.is_initialized():
        return "the Ray instance already running in this process"
    # 2. no address anywhere: a new local instance, whatever files earlier clusters left behind
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        reaper.start()  # the local Ray goes with this driver, even if it is SIGKILLed
        start_local_ray(num_cpus)
        return EMBEDDED
    # 3. an existing cluster: find it, check that it answers, then join it within the timeout
    target = resolve_address(address)
    probe(target, address, timeout)
    _init_within(target, address, timeout)
    return f"the Ray cluster at {target}" + (f" (from {address!r})" if target != address else "")


def resolve_address(address: str) -> str:
    """``auto`` -> the address the last ``ray start`` on this machine recorded; others unchanged."""
    if address != "auto":
        return address
    from ray._private.utils import get_ray_address_file, read_ray_address

    recorded = read_ray_address()
    if not recorded:
        raise RayConnectionError(
            f"address: --address auto found no cluster started by `ray start` on this machine "
            f"({get_ray_address_file(None)} does not exist); start one, or give its address"
        )
    return recorded


def host_and_port(address: str) -> tuple[str, int]:
    """``ray://host:port``, ``host:port`` -> (host, port)."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, separator, port = rest.rpartition(":")
    if not separator or not port.isdigit():
        raise RayConnectionError(f"address: {address!r} is not host:port, ray://host:port, auto or local")
    return host.strip("[]"), int(port)


def probe(target: str, given: str, timeout: float) -> None:
    """Fail fast when nothing listens at the address (a stale cluster file, a stopped head, a typo)."""
    host, port = host_and_port(target)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        source = " (the address the last `ray start` here recorded; that cluster is gone)" if given == "auto" else ""
        raise RayConnectionError(
            f"address: no Ray cluster answers at {target}{source}: {error.strerror or error}; "
            "start it, or omit --address (and RAY_ADDRESS) to run on a new local Ray"
        ) from None


def _init_within(target: str, given: str, timeout: float) -> None:
    """``ray.init`` that gives up after ``timeout`` seconds: something listens but is not (yet) a Ray it can join."""
    outcome: dict[str, BaseException | None] = {}

    def join() -> None:
        try:
            ray.init(address=target, logging_level=logging.WARNING, log_to_driver=True)
            outcome["error"] = None
        except BaseException as error:  # reported to the caller's thread below
            outcome["error"] = error

    # a daemon thread: if Ray never answers, the process can still exit (the CLI exits at once)
    thread = threading.Thread(target=join, name="latentray-ray-init", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        error = RayConnectionError(
            f"address: the Ray cluster at {target} did not accept this driver within {time.monotonic() - started:.0f} s "
            "(is it a Ray GCS address, and does the token match? see --connect-timeout)"
        )
        error.init_still_running = True
        raise error
    if outcome["error"] is not None:
        error = outcome["error"]
        raise RayConnectionError(f"address: cannot join the Ray cluster at {target}: {type(error).__name__}: {error}") from None
