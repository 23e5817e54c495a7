"""All file and object-store access of latentray, through fsspec.

Every path a user gives is an fsspec URI (a local path, ``file://``, ``s3://``, ...).
Objects are written whole: on object stores a PUT is atomic; on local disks files
are written under a temporary name and renamed, so a reader never sees half a file.

"Nothing there" and "could not look" are never the same answer: a folder or object that
does not exist is an empty folder or ``None``; a listing, read or write that the backend
refused after the file system's own retries raises ``StorageError`` naming the location,
which stops a run with exit 3 (never read as "no parts yet").
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import fsspec
import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs


# what "nothing there" looks like: no such file, or a path below a file (a local output under a
# regular file is refused by ``check_writable`` as a whole-job problem, exit 2, not a failed read)
ABSENT = (FileNotFoundError, NotADirectoryError)


class StorageError(Exception):
    """A listing, read or write that failed after the file system's own retries (exit 3).

    Not a ValueError (bad input, exit 2), and never caught as "nothing there": the caller
    stops, and a rerun finds everything committed so far.
    """

    def __init__(self, action: str, uri: str, reason: str):
        super().__init__(f"cannot {action} {uri!r}: {reason}")
        self.action, self.uri, self.reason = action, uri, reason

    def __reduce__(self):  # raised in Ray tasks: it reaches the driver whole
        return type(self), (self.action, self.uri, self.reason)

    @classmethod
    def in_text(cls, text: str) -> "StorageError | None":
        """The StorageError a traceback's text shows: Ray Data hands the driver only the text of a UDF's error."""
        found = re.search(r"pipelines\.runtime\.io\.StorageError: cannot (.+?) '([^']*)': (.*)", text)
        return cls(*found.groups()) if found else None


def is_transient(error: BaseException) -> bool:
    """Whether a read that raised ``error`` may succeed when tried again: the store refused or did not
    answer (after its own retries), as opposed to an object that is not there, is a folder, or a URI
    that is not valid, which no retry changes."""
    cause = error.__cause__ if isinstance(error, StorageError) and error.__cause__ is not None else error
    return not isinstance(cause, (*ABSENT, IsADirectoryError, ValueError))


@contextmanager
def storage_errors(action: str, uri: str) -> Iterator[None]:
    """Any backend error inside (OSError, botocore's, ...) becomes a ``StorageError`` naming ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        raise StorageError(action, uri, f"{type(error).__name__}: {error}") from error


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path inside it.

    Listing caches are dropped: other processes (Ray workers) write the same
    folders, and a stale listing would hide their parts.
    """
    fs, path = url_to_fs(uri)
    fs.invalidate_cache()
    return fs, path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts)


def is_local(uri: str) -> bool:
    protocol = filesystem(uri)[0].protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


# -- whole objects --------------------------------------------------------------------------------


TEMPORARY_PREFIX = ".tmp-"  # local files being written; renamed into place when whole


def write_bytes(uri: str, data: bytes) -> None:
    with storage_errors("write", uri):
        _write_bytes(uri, data)


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if is_local(uri):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=directory)
        try:
            with os.fdopen(handle, "wb") as staged:
                staged.write(data)
            os.replace(staging, path)
        except BaseException:
            # a failed write leaves nothing behind: no orphan temporary files
            _remove_quietly(staging)
            raise
    else:
        fs.pipe_file(path, data)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def read_bytes(uri: str) -> bytes:
    with storage_errors("read", uri):
        fs, path = filesystem(uri)
        return fs.cat_file(path)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, json_bytes(value))


def read_json(uri: str) -> Any | None:
    """The JSON object at ``uri``, or None when there is none (a failed read raises ``StorageError``)."""
    data = read_bytes_if_any(uri)
    return None if data is None else json.loads(data)


def read_bytes_if_any(uri: str) -> bytes | None:
    """The object at ``uri``, or None when there is none (a failed read raises ``StorageError``)."""
    with storage_errors("read", uri):
        fs, path = filesystem(uri)
        try:
            return fs.cat_file(path)
        except ABSENT:
            return None


def exists(uri: str) -> bool:
    with storage_errors("look up", uri):
        fs, path = filesystem(uri)
        return fs.exists(path)


def remove_tree(uri: str) -> None:
    with storage_errors("remove", uri):
        fs, path = filesystem(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def resolve_reference(base_uri: str, reference: str) -> str:
    """A path or URI found in a file, resolved as a relative link against the file's folder.

    ``images/a.jpg`` in ``s3://bucket/corpus/part-0.parquet`` -> ``s3://bucket/corpus/images/a.jpg``;
    URIs with a scheme and absolute paths stay as they are.
    """
    if "://" in reference or reference.startswith("/"):
        return reference
    protocol, separator, path = base_uri.rpartition("://")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), reference))
    return f"{protocol}{separator}{resolved}"


def check_writable(uri: str) -> None:
    """Fail early, with the URI in the message, when the output cannot be written."""
    probe = join(uri, ".latentray-write-check")
    try:
        write_bytes(probe, b"ok")
        remove_tree(probe)
    except Exception as error:  # any backend error means the same thing to the user
        raise ValueError(f"output: cannot write to {uri!r}: {type(error).__name__}: {error}") from error


# -- Parquet --------------------------------------------------------------------------------------


def list_parquet_files(uri: str) -> list[str]:
    """The Parquet files of a file or folder URI, sorted, as URIs of the same filesystem.

    None there: ValueError (bad input); a listing that failed: ``StorageError``.
    """
    return [file["uri"] for file in parquet_file_versions(uri)]


def parquet_file_versions(uri: str) -> list[dict]:
    """``list_parquet_files`` with each file's size and version, from the one listing: no file is read.

    What a scheduled submission compares to tell new input from the input an earlier job ran on.
    """
    with storage_errors("list", uri):
        fs, path = filesystem(uri)
        info = _info(fs, path)
        found = {path: info} if info and info["type"] == "file" else _find_parquet(fs, path)
    if not found:
        raise ValueError(f"no Parquet files at {uri!r}")
    return [_file_version(fs.unstrip_protocol(p), info) for p, info in found.items()]


def list_parts(folder_uri: str) -> list[str]:
    """The Parquet parts of an output folder, sorted; none when the folder does not exist.

    A listing that failed raises ``StorageError``: an output that could not be listed is
    never taken for an empty one (resume would redo it, statistics would leave parts out).
    """
    with storage_errors("list", folder_uri):
        fs, path = filesystem(folder_uri)
        return [fs.unstrip_protocol(p) for p in _find_parts(fs, path)]


def list_part_versions(folder_uri: str) -> dict[str, str]:
    """``list_parts`` with each part's version (its ETag, else inode, modification time and size): what
    tells a part rewritten under the same name from the one an index summarised."""
    with storage_errors("list", folder_uri):
        fs, path = filesystem(folder_uri)
        return {fs.unstrip_protocol(p): _part_version(info) for p, info in _find_parts(fs, path).items()}


def _find_parts(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """``_find_parquet`` for an output folder; on S3, a folder of more than a page of names is listed
    in parallel (``_s3_find``): one listing is a request per 1,000 names, one after the other."""
    if "s3" in _protocols(fs) and hasattr(fs, "_call_s3"):
        try:
            found = fsspec.asyn.sync(fs.loop, _s3_find, fs, path)
        except ABSENT:
            return {}
        return {p: found[p] for p in sorted(found) if _is_part(p)}
    return _find_parquet(fs, path)


# -- listings of large folders on S3 ----------------------------------------------------------------
#
# S3 answers a listing 1,000 names per request, each request after the previous one: 300,000 parts
# are 300 requests in a row (and S3-compatible servers that sort the whole folder per request, as
# moto does, take minutes). A part's name starts with its first input position, 12 digits
# (``part_name``), so a folder splits into prefixes by those digits, listed at once, each as deep as
# one page of names needs. Nothing is left out: names without "part-" come from one rolled-up
# listing, and at each split the names with no digit next are listed by range (few: not parts).

S3_PAGE_KEYS = 1000  # S3's most names per listing request
S3_LISTINGS_AT_ONCE = 32
POSITION_DIGITS = 12  # ``part_name``: the first position, zero-padded to 12 digits
PART_MARK = "part-"


async def _s3_find(fs: Any, path: str) -> dict[str, dict]:
    """Every object under folder ``path`` of S3 file system ``fs``, with its ETag and size."""
    bucket, key, _ = fs.split_path(path)
    folder = key.rstrip("/") + "/" if key else ""
    at_once = asyncio.Semaphore(S3_LISTINGS_AT_ONCE)
    # 1. a folder of one page is listed by that page, whatever its names
    found, _, more = await _s3_page(fs, bucket, folder, at_once)
    if more is None:
        return found
    # 2. more: the names without "part-" whole, the others rolled up, one prefix per kind of part
    found, kinds = await _s3_range(fs, bucket, folder, at_once, delimiter=PART_MARK)

    # 3. each kind split by its parts' first positions, digit by digit, until what is left fits a page
    async def walk(prefix: str, digits: int, start_after: str | None = None) -> None:
        page, _, more = await _s3_page(fs, bucket, prefix, at_once, start_after=start_after)
        found.update(page)
        if more is None:
            return
        last = max(page)[len(bucket) + 1:]  # the page holds every name of the prefix up to this one
        if digits == POSITION_DIGITS:  # one position holds a few parts: the rest listed whole
            found.update((await _s3_range(fs, bucket, prefix, at_once, start_after=last))[0])
            return
        # the rest: names with no digit next (few: not parts) sort before prefix + "0" or after
        # prefix + "9..." (":" follows "9"); the others by their next digit, from the page's last name on
        listings = [_s3_range(fs, bucket, prefix, at_once, start_after=max(last, prefix + ":"))]
        if last < prefix + "0":
            listings.append(_s3_range(fs, bucket, prefix, at_once, start_after=last, stop=prefix + "0"))
        for digit in "0123456789":
            child = prefix + digit
            if last.startswith(child):
                listings.append(walk(child, digits + 1, start_after=last))
            elif child > last:
                listings.append(walk(child, digits + 1))
        for result in await asyncio.gather(*listings):
            if result is not None:
                found.update(result[0])

    await asyncio.gather(*(walk(kind, 0) for kind in kinds))
    return found


async def _s3_range(fs: Any, bucket: str, prefix: str, at_once: asyncio.Semaphore, *, delimiter: str | None = None,
                    start_after: str | None = None, stop: str | None = None) -> tuple[dict[str, dict], list[str]]:
    """The pages of one listing, from ``start_after`` to the first name at or after ``stop``:
    (objects, rolled-up prefixes)."""
    found, rolled_up, token = {}, [], None
    while True:
        page, prefixes, token = await _s3_page(fs, bucket, prefix, at_once, delimiter, start_after, token)
        kept = {name: info for name, info in page.items() if stop is None or name < f"{bucket}/{stop}"}
        found.update(kept)
        rolled_up += prefixes
        if token is None or len(kept) < len(page):
            return found, rolled_up


async def _s3_page(fs: Any, bucket: str, prefix: str, at_once: asyncio.Semaphore, delimiter: str | None = None,
                   start_after: str | None = None, token: str | None = None) -> tuple[dict[str, dict], list[str], str | None]:
    """One listing request: (objects, rolled-up prefixes, the next page's token or None)."""
    arguments = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_KEYS, **fs.req_kw}
    for name, value in (("Delimiter", delimiter), ("StartAfter", start_after), ("ContinuationToken", token)):
        if value:
            arguments[name] = value
    async with at_once:
        answer = await fs._call_s3("list_objects_v2", **arguments)  # s3fs's own retries apply
    found = {f"{bucket}/{item['Key']}": {"name": f"{bucket}/{item['Key']}", "type": "file", "size": item["Size"],
                                          "ETag": item.get("ETag")} for item in answer.get("Contents", [])}
    prefixes = [item["Prefix"] for item in answer.get("CommonPrefixes", [])]
    return found, prefixes, answer.get("NextContinuationToken") if answer.get("IsTruncated") else None


def _part_version(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    return str(etag).strip('"') if etag else f"{info.get('ino')}:{info.get('mtime')}:{info.get('size')}"


def _info(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    # fs.isfile answers False for any error (a refused HEAD too): ask info, where only "not found" is None
    try:
        return fs.info(path)
    except ABSENT:
        return None


def _find_parquet(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """The Parquet files under ``path``, sorted, with the listing's details (size, ETag or mtime)."""
    # fsspec's walk skips folders it fails to list unless told to raise; a folder that is not there lists nothing
    try:
        found = fs.find(path, detail=True, on_error="raise") if "file" in _protocols(fs) else fs.find(path, detail=True)
    except ABSENT:
        return {}
    return {p: found[p] for p in sorted(found) if _is_part(p)}


def _is_part(path: str) -> bool:
    # "_" and "." name what readers of the table skip: the parts index, temporary files
    return path.endswith(".parquet") and not posixpath.basename(path).startswith((".", "_"))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


@dataclass(frozen=True)
class ParquetFragment:
    """One row group of one file, and where its rows stand in the whole input."""

    uri: str
    row_group: int
    first_row: int
    num_rows: int


def parquet_fragments(uri: str) -> tuple[pa.Schema, list[ParquetFragment]]:
    """The schema and row groups of a Parquet file or folder (footers only, no data read)."""
    fragments: list[ParquetFragment] = []
    schema = None
    position = 0
    for file_uri in list_parquet_files(uri):
        fs, path = filesystem(file_uri)
        try:
            with fs.open(path, "rb") as handle:
                metadata = pq.ParquetFile(handle).metadata
                file_schema = metadata.schema.to_arrow_schema()
        except Exception as error:
            raise ValueError(f"cannot read Parquet file {file_uri!r}: {type(error).__name__}: {error}") from error
        if schema is None:
            schema = file_schema
        elif set(file_schema.names) != set(schema.names):
            raise ValueError(f"{file_uri!r} has columns {file_schema.names}, other files have {schema.names}")
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            fragments.append(ParquetFragment(file_uri, group, position, rows))
            position += rows
    return schema, fragments


def read_fragment(fragment: ParquetFragment, columns: list[str] | None, rows_per_block: int) -> Iterator[pa.Table]:
    """A row group in tables of at most ``rows_per_block`` rows, with each row's input position in ``row``."""
    fs, path = filesystem(fragment.uri)
    with fs.open(path, "rb") as handle:
        position = fragment.first_row
        for record_batch in pq.ParquetFile(handle).iter_batches(rows_per_block, row_groups=[fragment.row_group], columns=columns):
            table = pa.Table.from_batches([record_batch])
            yield table.append_column("row", pa.array(range(position, position + len(table)), pa.int64()))
            position += len(table)


def file_starts(fragments: list[ParquetFragment]) -> dict[str, int]:
    """Each input file's first input position."""
    starts: dict[str, int] = {}
    for fragment in fragments:
        starts.setdefault(fragment.uri, fragment.first_row)
    return starts


def read_parquet_columns(uri: str, columns: list[str] | None) -> pa.Table:
    """Some columns of a Parquet file or folder, read in this process (ids, small columns)."""
    tables = []
    for file_uri in list_parquet_files(uri):
        fs, path = filesystem(file_uri)
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive")


def read_parquet_file(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (a part), with its schema metadata."""
    with storage_errors("read", uri):
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)


def iter_parquet_batches(uri: str, columns: list[str] | None, rows_per_batch: int) -> Iterator[pa.RecordBatch]:
    """A Parquet file in record batches, streamed (a reader never holds a whole part)."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        yield from pq.ParquetFile(handle).iter_batches(rows_per_batch, columns=columns)


def read_parquet_folder(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parts of an output table folder, or None when it has none yet (a failed listing raises ``StorageError``)."""
    parts = list_parts(uri)
    if not parts:
        return None
    return pa.concat_tables([read_parquet_file(part, columns) for part in parts], promote_options="permissive")


FOOTER_READ_THREADS = 32  # footers read at once (``parquet_metadata_of_many``)


def parquet_schema(uri: str) -> pa.Schema:
    """The Arrow schema of a Parquet file (read from the footer)."""
    with storage_errors("read", uri):
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow


def parquet_metadata(uri: str) -> dict[bytes, bytes]:
    """The key-value metadata of a Parquet file's schema (read from the footer)."""
    with storage_errors("read", uri):
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow.metadata or {}


def parquet_metadata_of_many(uris: Sequence[str], threads: int = FOOTER_READ_THREADS) -> Iterator[dict[bytes, bytes]]:
    """``parquet_metadata`` of each file, in order, read by ``threads`` at once: on an object store a
    footer costs a round trip or two, and thousands read one by one cost minutes."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from pool.map(parquet_metadata, uris)


def parquet_footer(uri: str) -> pq.FileMetaData:
    """The footer of a Parquet file: row groups, their row counts, schema and key-value metadata (no data read)."""
    with storage_errors("read", uri):
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata


def read_parquet_row_groups(uri: str, row_groups: list[int], columns: list[str] | None, use_threads: bool = True) -> pa.Table:
    """Some row groups of a Parquet file, some columns: the only bytes a reader that needs part of a file fetches.

    ``use_threads=False`` where processes already run in parallel (DataLoader workers).
    """
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).read_row_groups(row_groups, columns=columns, use_threads=use_threads)


def read_parquet_rows(
    uri: str, rows: np.ndarray, columns: list[str] | None, row_group_ends: Sequence[int] | None = None, use_threads: bool = True,
) -> tuple[pa.Table, np.ndarray]:
    """Some rows of a Parquet file (positions in the file), fetching only the row groups that hold them.

    ``row_group_ends``: the file's cumulative row-group sizes when the caller has them (else read
    from the footer). Returns the rows of the groups read, in file order, and the index of each
    asked row in that table (the caller takes them, or converts columns first and then takes).
    """
    rows = np.asarray(rows, np.int64)
    if row_group_ends is None:
        footer = parquet_footer(uri)
        row_group_ends = np.cumsum([footer.row_group(group).num_rows for group in range(footer.num_row_groups)])
    ends = np.asarray(row_group_ends, np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    group_of = np.searchsorted(ends, rows, side="right")
    groups = np.unique(group_of)
    table = read_parquet_row_groups(uri, groups.tolist(), columns, use_threads=use_threads)
    # the groups read sit one after another in ``table``: a row's index is its group's offset there plus its place in the group
    offsets = np.concatenate([[0], np.cumsum(ends[groups] - starts[groups])])
    return table, offsets[np.searchsorted(groups, group_of)] + (rows - starts[group_of])


PARQUET_ROW_GROUP_ROWS = 128


def _is_float_list(data_type: pa.DataType) -> bool:
    while pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type):
        data_type = data_type.value_type
    return pa.types.is_floating(data_type)


def part_name(rows: np.ndarray, ids: Sequence[str]) -> str:
    """The name of an output part holding rows at input positions ``rows`` with ``ids``.

    ``part-<first position>-<last position>-<rows>-<digest of ids and positions>.parquet``:
    from the rows only, never the run, so writing the same rows again replaces the same
    object; and a listing alone tells which input positions a part may hold and how many
    rows it has (``outputs.PartSpan``), which resume and counts read without opening it.
    """
    rows = np.asarray(rows, np.int64)
    digest = hashlib.sha1("\n".join(f"{row_id}@{row}" for row_id, row in zip(ids, rows.tolist())).encode()).hexdigest()[:16]
    return f"part-{int(rows.min()):012d}-{int(rows.max()):012d}-{len(rows)}-{digest}.parquet"


def write_parquet_part(table: pa.Table, folder_uri: str, prefix: str = "") -> str:
    """Write one part of an output table (which has ``id`` and ``row`` columns), named from its rows
    (after ``prefix``: a kind of part a listing alone tells apart)."""
    uri = join(folder_uri, prefix + part_name(table.column("row").to_numpy(), table.column("id").to_pylist()))
    write_parquet(table, uri)
    return uri


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write a Parquet file whole, in latentray's layout."""
    sink = pa.BufferOutputStream()
    # Small row groups: a reader that needs some rows of a part fetches only their groups. No
    # dictionary for float lists (latents, embeddings): it never pays there and decodes ~3x slower.
    dictionary = [field.name for field in table.schema if not _is_float_list(field.type)]
    pq.write_table(table, sink, row_group_size=PARQUET_ROW_GROUP_ROWS, use_dictionary=dictionary)
    write_bytes(uri, sink.getvalue().to_pybytes())


def remove_temporary_files(uri: str) -> int:
    """Remove the temporary files that writes killed mid-way left under a local folder; return how many.

    Object stores have none (a PUT is whole or absent).
    """
    if not is_local(uri):
        return 0
    removed = 0
    for directory, _, names in os.walk(filesystem(uri)[1]):
        for name in names:
            if name.startswith(TEMPORARY_PREFIX):
                _remove_quietly(os.path.join(directory, name))
                removed += 1
    return removed


def file_versions(uris: Sequence[str]) -> list[dict]:
    """Size and version of each file: what tells a changed file from an unchanged one."""
    versions = []
    for uri in uris:
        fs, path = filesystem(uri)
        versions.append(_file_version(uri, fs.info(path)))
    return versions


def _file_version(uri: str, info: dict) -> dict:
    """A file's size and version (ETag, else modification time), from its info or a listing's entry."""
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"uri": uri, "size": int(info.get("size") or 0), "version": str(version)}


# -- model directories ----------------------------------------------------------------------------


def fingerprint_tree(uri: str, cache_dir: str | None = None) -> str:
    """A content fingerprint of a directory: sha256 over every file's relative path and content digest.

    Remote files are never downloaded for it: the object store's ETag (or checksum) and size
    stand for the bytes. Local files are hashed once: with ``cache_dir``, each file's digest is
    kept keyed by its path, size and modification time, so an unchanged 30 GB model is not
    read again on the next run (a changed file changes its size or mtime and is rehashed).
    """
    fs, root = filesystem(uri)
    known = _read_digest_cache(cache_dir, root) if is_local(uri) and cache_dir else {}
    seen: dict[str, list] = {}
    digest = hashlib.sha256()
    for path in sorted(fs.find(root)):
        relative = posixpath.relpath(path, root)
        digest.update(relative.encode() + b"\0")
        if is_local(uri):
            status = os.stat(path)
            cached = known.get(relative)
            if cached and cached[:2] == [status.st_size, status.st_mtime_ns]:
                file_digest = cached[2]
            else:
                file_digest = _file_digest(path)
            seen[relative] = [status.st_size, status.st_mtime_ns, file_digest]
            digest.update(file_digest.encode())
        else:
            info = fs.info(path)
            digest.update(str(info.get("ETag") or info.get("etag") or fs.checksum(path)).encode())
            digest.update(str(info.get("size")).encode())
    if is_local(uri) and cache_dir and seen != known:
        _write_digest_cache(cache_dir, root, seen)
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_cache_path(cache_dir: str, root: str) -> str:
    return os.path.join(cache_dir, "fingerprints", hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:32] + ".json")


def _read_digest_cache(cache_dir: str, root: str) -> dict[str, list]:
    try:
        with open(_digest_cache_path(cache_dir, root)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hash again


def _write_digest_cache(cache_dir: str, root: str, digests: dict[str, list]) -> None:
    # temporary name then rename: runs sharing the cache never read half a file
    target = _digest_cache_path(cache_dir, root)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = f"{target}.{os.getpid()}.tmp"
    with open(staging, "w") as handle:
        json.dump(digests, handle)
    os.replace(staging, target)


def localize_tree(uri: str, fingerprint: str, cache_root: str) -> str:
    """A local copy of a remote directory, made once per node, keyed by URI and content.

    Every actor of a node asks for the same model at start-up; a file lock lets the first
    one download it (fsspec's ``get`` fetches the files concurrently) while the others
    wait, then find it complete. Without the lock each of 8 actors on an 8-GPU node would
    fetch a 33 GB FLUX directory itself.
    """
    if is_local(uri):
        return filesystem(uri)[1]
    key = hashlib.sha256(f"{uri}\0{fingerprint}".encode()).hexdigest()[:24]
    target = os.path.join(cache_root, "models", key)
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not os.path.isfile(os.path.join(target, ".complete")):
            _download_tree(uri, target)
    return target


def _download_tree(uri: str, target: str) -> None:
    # into a staging folder renamed into place: a reader never sees half a model
    staging = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(target))
    try:
        fs, root = filesystem(uri)
        fs.get(root.rstrip("/") + "/", staging + "/", recursive=True)
        open(os.path.join(staging, ".complete"), "w").close()
        shutil.rmtree(target, ignore_errors=True)  # an incomplete copy a killed download left
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- single files (LoRA weights) -------------------------------------------------------------------


def localize_file(uri: str, cache_root: str) -> str:
    """A local copy of a file, made once per node and keyed by URI and version (size, ETag or mtime), as
    ``localize_tree`` does for directories: actors of a node wait on one download. A local file is itself."""
    fs, path = filesystem(uri)
    if is_local(uri):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        return path
    with storage_errors("read", uri):
        version = _file_version(uri, fs.info(path))
    key = hashlib.sha256(json.dumps(version, sort_keys=True).encode()).hexdigest()[:24]
    target = os.path.join(cache_root, "files", key, posixpath.basename(path))
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(f"{os.path.dirname(target)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(target):
            staging = f"{target}.{os.getpid()}.download"
            try:
                with storage_errors("read", uri):
                    fs.get(path, staging)
                os.replace(staging, target)  # renamed into place: a reader never sees half a file
            finally:
                _remove_quietly(staging)
    return target


def file_sha256(path: str, cache_dir: str | None = None) -> str:
    """sha256 of a local file's bytes; with ``cache_dir``, kept by path, size and mtime (a file is read once)."""
    status = os.stat(path)
    known = _read_digest_cache(cache_dir, path) if cache_dir else {}
    if known.get("file", [None, None])[:2] == [status.st_size, status.st_mtime_ns]:
        return known["file"][2]
    digest = _file_digest(path)
    if cache_dir:
        _write_digest_cache(cache_dir, path, {"file": [status.st_size, status.st_mtime_ns, digest]})
    return digest


def link_file(path: str, link: str) -> str:
    """``link``, a symbolic link to the local file ``path`` (made once; replaced atomically when it points elsewhere)."""
    if os.path.islink(link) and os.readlink(link) == os.path.abspath(path):
        return link
    os.makedirs(os.path.dirname(link), exist_ok=True)
    staging = f"{link}.{os.getpid()}.link"
    _remove_quietly(staging)
    os.symlink(os.path.abspath(path), staging)
    os.replace(staging, link)
    return link
