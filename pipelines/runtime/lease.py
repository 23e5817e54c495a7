"""One writer per output: a run holds a lease in its output, an object it renews while alive.

``<output>/lease.json`` names the holder (host, pid, the pid's start time, since when)
and when the lease expires. A run takes it before it reads or writes anything else in
the output (``RunOutput.prepare``), a thread of the driver renews it every third of its
expiry, and the run gives it back at its end (``pipelines.runtime.job.run_job``).

A second run into the same output is refused (``LeaseHeld``, exit 2) naming the live
one. A lease is free again when it expired (its holder stopped renewing it: a killed
driver, a lost machine), or at once when its holder ran on this host and that process
is gone (a SIGKILLed run on this machine, the common case, waits for nothing).
Expiry: ``LATENTRAY_LEASE_SECONDS`` (default 30 s); hosts' clocks must agree to well
within it.

Taking, renewing and giving back are compare-and-swap writes, each as exact as the store:

- local folders: read, compare and write (temporary file renamed into place) under an
  exclusive ``flock`` of ``<output>/.lease.lock``: exact among the processes of one
  machine (over NFS, as exact as the mount's locks);
- S3 (``s3://``): a PUT with ``If-None-Match: *`` creates the lease, a PUT or DELETE with
  ``If-Match: <ETag read>`` takes over, renews or gives back: the store decides, exact
  between any number of machines (two runs that find the lease free cannot both win);
- other fsspec stores: write, then read back: a run that reads back another's lease
  is refused, which leaves a race only between one run's read and its write
  (milliseconds, not exact).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from pipelines.runtime import io
from pipelines.runtime.run_record import utc_now

logger = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
LOCK_NAME = ".lease.lock"
DEFAULT_LEASE_SECONDS = 30.0


def lease_seconds() -> float:
    return float(os.environ.get("LATENTRAY_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


class LeaseHeld(ValueError):
    """Another live run writes this output (a whole-job problem: exit 2)."""

    def __init__(self, uri: str, holder: dict):
        super().__init__(
            f"output {uri!r} is being written by another run: host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {holder.get('since')} (its lease, renewed at {holder.get('renewed_at')}, expires in "
            f"{max(0.0, holder.get('expires_at', 0) - time.time()):.0f} s unless renewed); one run writes an output at a "
            "time: wait for it to end, stop it, or choose another --output (a killed run's lease is taken over once it expires)"
        )


class LeaseLost(io.StorageError):
    """Another run took this run's lease: it was not renewed in time (exit 3: rerun)."""

    def __init__(self, action: str, uri: str, reason: str):
        super().__init__(action, uri, reason)


# -- the stores: compare-and-swap on one object ---------------------------------------------------


class _Store(Protocol):
    def read(self) -> tuple[dict | None, str | None]: ...  # the lease and its version (None, None: no lease)
    def swap(self, lease: dict, expected: str | None) -> str | None: ...  # write if still ``expected``; the new version or None
    def remove(self, expected: str) -> None: ...  # remove if still ``expected``


@dataclass
class _LocalStore:
    uri: str

    @contextmanager
    def _locked(self) -> Iterator[None]:
        folder = io.filesystem(self.uri)[1]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, LOCK_NAME), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield

    def read(self) -> tuple[dict | None, str | None]:
        lease = io.read_json(io.join(self.uri, LEASE_NAME))
        return lease, lease["token"] if lease else None

    def swap(self, lease: dict, expected: str | None) -> str | None:
        with self._locked():
            if self.read()[1] != expected:
                return None
            io.write_json(io.join(self.uri, LEASE_NAME), lease)
            return lease["token"]

    def remove(self, expected: str) -> None:
        with self._locked():
            if self.read()[1] == expected:
                io.remove_tree(io.join(self.uri, LEASE_NAME))


@dataclass
class _S3Store:
    uri: str

    def _path(self) -> tuple[object, str, str]:
        fs, path = io.filesystem(io.join(self.uri, LEASE_NAME))
        bucket, key, _ = fs.split_path(path)
        return fs, bucket, key

    def read(self) -> tuple[dict | None, str | None]:
        # the ETag first: if the object changes before it is read, a swap on this ETag fails (refused, never wrong)
        fs, bucket, key = self._path()
        with io.storage_errors("read", io.join(self.uri, LEASE_NAME)):
            try:
                etag = fs.info(f"{bucket}/{key}")["ETag"]
            except FileNotFoundError:
                return None, None
        lease = io.read_json(io.join(self.uri, LEASE_NAME))
        return (lease, etag) if lease else (None, None)

    def swap(self, lease: dict, expected: str | None) -> str | None:
        fs, bucket, key = self._path()
        condition = {"mode": "create"} if expected is None else {"IfMatch": expected}
        data = io.json_bytes(lease)
        try:
            with io.storage_errors("write", io.join(self.uri, LEASE_NAME)):
                return fs.pipe_file(f"{bucket}/{key}", data, **condition)["ETag"]
        except io.StorageError as error:
            if not _refused(error):
                raise
        # refused (created, changed or removed since it was read); but a write that went through on a connection
        # cut before its answer is retried by the client and refused by itself: the lease is then ours, as written
        current, etag = self.read()
        return etag if current == lease else None

    def remove(self, expected: str) -> None:
        fs, bucket, key = self._path()
        try:
            with io.storage_errors("remove", io.join(self.uri, LEASE_NAME)):
                try:
                    fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expected)
                except FileNotFoundError:  # gone already (a retried delete whose first try went through)
                    pass
        except io.StorageError as error:
            if not _refused(error):
                raise


def _refused(error: BaseException | None) -> bool:
    """A 412 answer (the object is not the one the write was conditioned on), anywhere in the chain; s3fs
    translates it to FileExistsError for a create, to an OSError with S3's text for If-Match."""
    while error is not None:
        if isinstance(error, (FileExistsError, FileNotFoundError)):
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        if "pre-conditions you specified did not hold" in str(error):  # s3fs's translation keeps only the text
            return True
        error = error.__cause__ or error.__context__
    return False


@dataclass
class _ReadBackStore:
    uri: str

    def read(self) -> tuple[dict | None, str | None]:
        lease = io.read_json(io.join(self.uri, LEASE_NAME))
        return lease, lease["token"] if lease else None

    def swap(self, lease: dict, expected: str | None) -> str | None:
        if self.read()[1] != expected:
            return None
        io.write_json(io.join(self.uri, LEASE_NAME), lease)
        return lease["token"] if self.read()[1] == lease["token"] else None

    def remove(self, expected: str) -> None:
        if self.read()[1] == expected:
            io.remove_tree(io.join(self.uri, LEASE_NAME))


def _store(uri: str) -> _Store:
    if io.is_local(uri):
        return _LocalStore(uri)
    protocols = io.filesystem(uri)[0].protocol
    return _S3Store(uri) if set(protocols if isinstance(protocols, (tuple, list)) else (protocols,)) & {"s3", "s3a"} else _ReadBackStore(uri)


# -- who holds it ---------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), or None when it is gone (or not on Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return boot.read().strip()
    except OSError:
        return None


def _this_process() -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(), "pid_started": _process_start(os.getpid())}


def why_free(holder: dict, now: float) -> str | None:
    """Why the lease ``holder`` wrote may be taken now (None: its run is alive)."""
    if holder.get("expires_at", 0) <= now:
        return "it expired"
    here = _this_process()
    if holder.get("host") != here["host"] or holder.get("boot_id") != here["boot_id"] or not here["boot_id"]:
        return None  # another machine (or no /proc to ask): only expiry tells
    if holder.get("pid") == here["pid"] and holder.get("pid_started") == here["pid_started"]:
        return "this process holds it (an earlier plan that did not run)"
    if _process_start(holder.get("pid", -1)) != holder.get("pid_started"):
        return "its process on this host is gone"
    return None


# -- the lease ------------------------------------------------------------------------------------


@dataclass
class OutputLease:
    uri: str
    seconds: float
    store: _Store
    lease: dict
    version: str
    lost: str | None = None  # why another run has it now
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def renew(self) -> None:
        with self.lock:
            if self.lost or self.stop.is_set():
                return
            lease = {**self.lease, "renewed_at": utc_now(), "expires_at": time.time() + self.seconds}
            version = self.store.swap(lease, self.version)
            if version is None:
                holder = self.store.read()[0] or {}
                self.lost = f"host {holder.get('host')}, pid {holder.get('pid')} took it over" if holder else "it was removed"
                logger.error("output %r: this run's lease was lost: %s", self.uri, self.lost)
                return
            self.lease, self.version = lease, version

    def _keep_renewing(self) -> None:
        # renewals that fail (storage) are tried again at the next tick: the lease lasts three ticks
        while not self.stop.wait(self.seconds / 3):
            try:
                self.renew()
            except Exception as error:
                logger.warning("output %r: renewing the lease failed (tried again in %.0f s): %s", self.uri, self.seconds / 3, error)

    def release(self) -> None:
        with self.lock:
            self.stop.set()
            if self.lost:
                return
            try:
                self.store.remove(self.version)
            except Exception as error:  # at the end of a run: its outcome stands, the lease expires by itself
                logger.warning("output %r: giving back the lease failed (it expires in %.0f s): %s", self.uri, self.seconds, error)


_held: dict[str, OutputLease] = {}  # output URI -> this process's lease on it


def take(uri: str, seconds: float | None = None) -> OutputLease:
    """Take the output's lease (``LeaseHeld`` when a live run has it) and keep renewing it until ``release``."""
    seconds = lease_seconds() if seconds is None else seconds
    # 1. a lease this process still holds on the output (a plan that did not run) is given back first
    if uri in _held:
        release(uri)
    # 2. the current lease, and whether its run is alive
    store = _store(uri)
    holder, version = store.read()
    reason = why_free(holder, time.time()) if holder else None
    if holder and reason is None:
        raise LeaseHeld(uri, holder)
    # 3. ours, by a compare-and-swap on what was read: of two runs that found it free, one wins
    now = utc_now()
    lease = {"token": uuid.uuid4().hex, **_this_process(), "since": now, "renewed_at": now, "expires_at": time.time() + seconds}
    new_version = store.swap(lease, version)
    if new_version is None:
        raise LeaseHeld(uri, store.read()[0] or {})
    if holder:
        logger.warning("output %r: took over the lease of host %s, pid %s (%s)", uri, holder.get("host"), holder.get("pid"), reason)
    held = _held[uri] = OutputLease(uri=uri, seconds=seconds, store=store, lease=lease, version=new_version)
    threading.Thread(target=held._keep_renewing, name=f"lease {uri}", daemon=True).start()
    return held


def check(uri: str) -> None:
    """Raise ``LeaseLost`` when another run took this process's lease on the output."""
    held = _held.get(uri)
    if held is not None and held.lost:
        raise LeaseLost("hold the lease of", uri, f"{held.lost} after this run stopped renewing it for {held.seconds:.0f} s; "
                        "rows this run committed stay")


def release(uri: str) -> None:
    """Give back this process's lease on the output (nothing when it holds none)."""
    held = _held.pop(uri, None)
    if held is not None:
        held.release()


def release_all() -> None:
    for uri in list(_held):
        release(uri)
