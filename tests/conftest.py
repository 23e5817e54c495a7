"""Shared fixtures: one real local Ray per session, a real S3-compatible server, tiny models.

The S3 server (moto in server mode, a real HTTP endpoint on 127.0.0.1) starts before
Ray so that Ray's worker processes inherit the standard AWS variables pointing at it.
"""

from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A fresh model cache for the session (presets are built into it once)."""
    cache = tmp_path_factory.mktemp("latentray-cache")
    os.environ["LATENTRAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, model_cache):
    """One local Ray for the whole session, bound to loopback, 2 CPUs."""
    import ray

    from jobs.ray_runtime import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> str:
    from workers.runtime.presets import materialize_preset

    return materialize_preset("tiny")
