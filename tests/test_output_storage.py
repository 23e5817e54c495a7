"""A listing or read of the output that fails is never an empty output (issue 21, item 3).

Against the local S3 server through a proxy that answers 503 to chosen requests every
time (``test_faults.FaultyS3Proxy``), with the client's retries cut to one attempt so the
file system gives up fast; no Ray.
"""

from __future__ import annotations

import os

import boto3
import pyarrow as pa
import pytest
import s3fs

from pipelines.runtime import io
from pipelines.runtime.outputs import RunOutput
from test_faults import FaultyS3Proxy


@pytest.fixture
def refused_listings(s3_endpoint, monkeypatch):
    """The S3 endpoint behind a proxy refusing (503) every listing under ``out/manifest``."""
    boto3.client("s3").create_bucket(Bucket="storage-bucket")
    io.write_parquet_part(pa.table({"id": ["a"], "row": pa.array([0], pa.int64())}), "s3://storage-bucket/out/manifest")
    proxy = FaultyS3Proxy(s3_endpoint, refuse=lambda method, path: "list-type" in path and "prefix=out/manifest" in path.replace("%2F", "/"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps a client per configuration: make a new one, at the proxy
    yield proxy
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_folder_not_there_lists_no_parts(tmp_path, s3_endpoint):
    assert io.list_parts(str(tmp_path / "missing")) == []
    assert io.read_json(str(tmp_path / "missing.json")) is None
    boto3.client("s3").create_bucket(Bucket="empty-bucket")
    assert io.list_parts("s3://empty-bucket/out/manifest") == []
    assert io.read_parquet_folder("s3://empty-bucket/out/errors") is None


def test_a_refused_listing_raises_naming_the_location(refused_listings):
    output = RunOutput("s3://storage-bucket/out", "manifest")
    for call in (output.spans, output.counts, output.latent_stats, lambda: io.read_parquet_folder(output.results_uri)):
        with pytest.raises(io.StorageError) as raised:
            call()
        assert "s3://storage-bucket/out/manifest" in str(raised.value) and "list" in str(raised.value)
    assert refused_listings.counts["refused"] > 0
    assert not isinstance(raised.value, ValueError)  # never read as "no parts yet"


def test_a_local_folder_that_cannot_be_read_raises(tmp_path):
    folder = tmp_path / "manifest"
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"x")
    folder.chmod(0)
    try:
        if os.access(folder, os.R_OK):
            pytest.skip("running as a user who reads any folder (root)")
        with pytest.raises(io.StorageError, match="manifest"):
            io.list_parts(str(folder))
    finally:
        folder.chmod(0o755)


def test_a_storage_error_is_found_behind_the_errors_ray_raises():
    from jobs.running import storage_error_in

    error = io.StorageError("list", "s3://b/out/manifest", "OSError: [Errno 16] Please reduce your request rate.")
    try:
        raise RuntimeError("a task failed") from error
    except RuntimeError as wrapped:
        assert storage_error_in(wrapped) is error
    # Ray Data hands the driver a UDF's error as text only (tried with Ray 2.60: RayTaskError(UserCodeException))
    text = f"ray::MapBatches(commit)()\n  File ...\npipelines.runtime.io.StorageError: {error}\n\nThe above exception ..."
    found = storage_error_in(RuntimeError(text))
    assert (found.action, found.uri, found.reason) == (error.action, error.uri, error.reason)
    assert storage_error_in(ValueError("bad input")) is None


def test_a_folder_of_many_pages_on_s3_is_listed_whole_in_parallel(s3_endpoint, monkeypatch):
    """A large folder is listed by prefixes of its parts' first positions, at once: the same names and
    versions as one plain listing, odd names included (pages of 10 names stand for S3's 1,000)."""
    import numpy as np

    monkeypatch.setattr(io, "S3_PAGE_KEYS", 10)
    client = boto3.client("s3")
    client.create_bucket(Bucket="many-parts")
    rng = np.random.default_rng(0)
    firsts = sorted(rng.choice(10**7, 120, replace=False).tolist()) + [5] * 12  # 12 parts at one position: a page and more
    names = [io.part_name(np.array([first, first + 31]), [f"id-{first}-{copy}", "x"]) for copy, first in enumerate(firsts)]
    names += ["transient-" + name for name in names[:15]]
    odd = ["part-0.parquet", "part-.parquet", "part-x.parquet", "part-0000001:9.parquet", "notes.parquet", "sub/part-000000000007-z.parquet",
           "_parts_index.parquet", ".hidden.parquet", "part-000000000009-readme.txt"]
    for name in names + odd:
        client.put_object(Bucket="many-parts", Key=f"out/manifest/{name}", Body=name.encode())
    client.put_object(Bucket="many-parts", Key="out/manifest-other/part-000000000001-1-1-ab.parquet", Body=b"beside")

    folder = "s3://many-parts/out/manifest"
    fs = s3fs.S3FileSystem()
    plain = {fs.unstrip_protocol(path): info["ETag"].strip('"') for path, info in fs.find(folder, detail=True).items()
             if path.endswith(".parquet") and not os.path.basename(path).startswith(("_", "."))}
    listed = io.list_part_versions(folder)
    assert listed == plain
    assert len(listed) == len(names) + 6  # every part and the 6 odd Parquet names; not the index, hidden or text files
    assert io.list_parts(folder) == sorted(plain)
