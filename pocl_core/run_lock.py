"""An advisory lock on a run folder, so that two live runs never write the same folder.

A run takes ``<run folder>/run.lock`` (``contracts.RUN_LOCK_FIELDS``: a random token, host, pid, the
Prefect flow run, when it was taken and last renewed) before its first step, renews it every quarter of
its lease from a daemon thread, and removes it when it ends, failed or not. Another start on that
folder is refused with a ``RunFolderBusy`` error naming the holder while the holder is live. A lock
is stale, and taken over with a warning, when

- it is held by the same Prefect flow run (a Retry: Prefect runs one attempt of a flow run at a time),
- its holder ran on this host and its process is gone (a ``pocl run`` killed with SIGKILL), or
- it was not renewed for its lease (a run killed on another host; the hosts' clocks must agree to
  within a lease), or it is not a lock record at all (a file cut short or written by hand).

On a local disk a new lock appears atomically (hard link of a finished file), so of two starts at the
same moment one is refused. An object store has no create-if-absent: the lock is written whole and
read back, and two starts within the same moment may both pass. Deleting ``run.lock`` by hand lets a
new run start at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pocl_core.config import ConfigError
from pocl_core.contracts import RunPaths, decode_run_lock, encode_run_lock
from pocl_core.storage import Location, write_bytes_atomic

LEASE_S = 120.0  # a lock not renewed for this long is stale

log = logging.getLogger("pocl")
_HELD: set[str] = set()  # tokens of the locks this process holds now


class RunFolderBusy(ConfigError):
    """Another live run holds the run folder's lock."""


def _process_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (one of another user counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def stale_reason(record: Optional[dict[str, Any]], now: float, flow_run_id: Optional[str],
                 host: str, alive: Callable[[int], bool] = _process_alive) -> Optional[str]:
    """Why a lock ``record`` read at time ``now`` (Unix s) no longer stands for a live run; None when it does.

    ``flow_run_id`` and ``host`` are the starting run's; ``alive`` tells whether a pid of this host
    still runs."""
    if record is None:
        return "it is not a lock record"
    if flow_run_id is not None and record["flow_run_id"] == flow_run_id:
        return f"it is held by this flow run ({flow_run_id}), retried"
    age = now - record["renewed"]
    if age > record["lease_s"]:
        return f"it was last renewed {age:.0f} s ago, beyond its {record['lease_s']:.0f} s lease"
    if record["host"] == host:
        if record["pid"] == os.getpid() and record["token"] not in _HELD:
            return "this process left it behind"
        if record["pid"] != os.getpid() and not alive(int(record["pid"])):
            return f"its process {record['pid']} on this host has ended"
    return None


def describe(record: dict[str, Any], now: float) -> str:
    """The holder of a lock, for a message: process, host, flow run, since when, last renewal."""
    since = datetime.fromtimestamp(record["acquired"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    run = f", flow run {record['flow_run_id']}" if record["flow_run_id"] else ""
    return (f"process {record['pid']} on host {record['host']}{run}, since {since} "
            f"(renewed {max(now - record['renewed'], 0):.0f} s ago)")


def _read(path: Location) -> tuple[bool, Optional[dict[str, Any]]]:
    """(the lock file exists, its record or None when unreadable as one)."""
    try:
        return True, decode_run_lock(path.read_bytes())
    except FileNotFoundError:
        return False, None
    except OSError:
        if not path.exists():
            return False, None
        raise


def _create_local(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist (atomic); False when it does.

    A hard link of a finished file, so no reader sees it half-written; on a filesystem without hard
    links, an exclusive create (a reader in the moment of the write may see a cut record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network or FUSE filesystems)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """The lock of one run folder held by this process (``acquire`` … ``release``)."""

    def __init__(self, paths: RunPaths, flow_run_id: Optional[str] = None, lease_s: float = LEASE_S,
                 clock: Callable[[], float] = time.time) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, not {lease_s}")
        self.path = paths.lock
        self.root = paths.root
        self.flow_run_id = flow_run_id
        self.lease_s = float(lease_s)
        self.clock = clock
        self.host = socket.gethostname()
        self.token = secrets.token_hex(16)
        self.acquired: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self, now: float) -> dict[str, Any]:
        return {"token": self.token, "host": self.host, "pid": os.getpid(), "flow_run_id": self.flow_run_id,
                "acquired": self.acquired if self.acquired is not None else now, "renewed": now,
                "lease_s": self.lease_s}

    def check(self, now: Optional[float] = None) -> Optional[str]:
        """RunFolderBusy while another live run holds the lock; else why the lock there is stale (None:
        there is none). Takes nothing: a start checks this before its engines start, then acquires."""
        now = self.clock() if now is None else now
        exists, record = _read(self.path)
        if not exists:
            return None
        reason = stale_reason(record, now, self.flow_run_id, self.host)
        if reason is None:
            raise RunFolderBusy(
                f"run folder {self.root} is in use by another run: {describe(record, now)}. Wait for it to "
                f"finish, or start this run with another run_name; if no run uses the folder any more, delete "
                f"{self.path}")
        return reason

    def acquire(self) -> None:
        """Take the lock; RunFolderBusy (a ConfigError) while another live run holds it."""
        now = self.clock()
        data = encode_run_lock(self._record(now))
        if isinstance(self.path, Path) and _create_local(self.path, data):
            self._held(now)
            return
        reason = self.check(now)
        if reason is not None:
            log.warning("taking over the lock %s of an earlier run, as %s", self.path, reason)
        write_bytes_atomic(self.path, data)
        _, mine = _read(self.path)
        if mine is None or mine["token"] != self.token:  # another start wrote after this one
            raise RunFolderBusy(f"run folder {self.root}: another run took its lock {self.path} at the same "
                                "moment; start this run again once that one finished, or with another run_name")
        self._held(now)

    def _held(self, now: float) -> None:
        self.acquired = now
        _HELD.add(self.token)

    def renew(self) -> bool:
        """Write a fresh ``renewed`` time; False (with a warning) once another run holds the lock. A lock
        file that is gone is written again only while the run folder exists (a failed start that removed
        its new folder is not brought back)."""
        exists, record = _read(self.path)
        if exists and (record is None or record["token"] != self.token):
            log.warning("the lock %s was taken over by another run (%s); this run no longer renews it and both "
                        "now write the folder", self.path,
                        describe(record, self.clock()) if record else "unreadable record")
            return False
        data = encode_run_lock(self._record(self.clock()))
        if exists:
            write_bytes_atomic(self.path, data)
        elif self.root.exists():  # deleted by hand: put back (locally only if no other run took it meanwhile)
            if isinstance(self.path, Path):
                _create_local(self.path, data)
            else:
                write_bytes_atomic(self.path, data)
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a store that does not answer for a moment: try again next time
                log.warning("could not renew the lock %s: %s", self.path, exc)

    def start_renewing(self) -> None:
        """Renew the lock from a daemon thread every quarter lease until ``release``."""
        self._thread = threading.Thread(target=self._renew_loop, name="pocl-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lock file when it is still this run's; a failing removal is a
        warning (the lock then goes stale within its lease)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.discard(self.token)
        try:
            exists, record = _read(self.path)
            if exists and record is not None and record["token"] == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the lock %s: %s", self.path, exc)


@contextmanager
def run_folder_lock(paths: RunPaths, flow_run_id: Optional[str] = None,
                    lease_s: float = LEASE_S) -> Iterator[RunLock]:
    """Hold the lock of the run folder ``paths.root`` for the block (see the module docstring)."""
    lock = RunLock(paths, flow_run_id, lease_s)
    lock.acquire()
    lock.start_renewing()
    try:
        yield lock
    finally:
        lock.release()
