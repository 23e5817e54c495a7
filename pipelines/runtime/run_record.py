"""Facts recorded in run.json beside a run's configuration."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform

RECORDED_LIBRARIES = ("latentray", "ray", "torch", "diffusers", "transformers", "pyarrow", "pandas", "fsspec", "s3fs", "pillow")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
