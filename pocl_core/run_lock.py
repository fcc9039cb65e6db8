"""An advisory lock on a run folder, so that two live runs never write the same folder.

A run takes ``<run folder>/run.lock`` (``contracts.RUN_LOCK_FIELDS``: a random token, host and machine
identity, pid, the Prefect flow run, when it was taken and last renewed) before its first step,
renews it every quarter of its lease from a daemon thread, and removes it when it ends, failed or
not. Another start on that folder is refused with a ``RunFolderBusy`` error naming the holder while
the holder is live. A lock is stale, and taken over with a warning, when

- its holder ran on this machine (same host name, boot and process namespace) and its process is
  gone (a ``pocl run`` killed with SIGKILL), or lives but stopped renewing for a lease (a reused pid);
- its holder ran elsewhere and is the same Prefect flow run (a Retry: Prefect runs one attempt of a
  flow run at a time), or did not renew it for its lease (a run killed on another host; the hosts'
  clocks must agree to within the lease less a renewal interval, 90 s by default); or
- it is not a lock record at all (a file cut short or written by hand), read twice half a second apart.

On a local disk the lock is created atomically (a hard link of a finished file, else an exclusive
create) and a stale one is moved aside by a rename before the new one is created, so of two starts
at the same moment one is refused. An object store has no create-if-absent: the lock is written whole
and read back, and two starts within the same moment may both pass. Deleting ``run.lock`` by hand
lets a new run start at once.
"""

from __future__ import annotations

import contextvars
import logging
import os
import secrets
import socket
import tempfile
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
UNREADABLE_RECHECK_S = 0.5  # an unreadable lock is read again after this long before it counts as stale

_HELD: set[str] = set()  # tokens of the locks this process holds now

Logger = logging.Logger | logging.LoggerAdapter


class RunFolderBusy(ConfigError):
    """Another live run holds the run folder's lock."""


def machine_identity() -> str:
    """This machine and process namespace: the kernel's boot id and the pid namespace ("" where Linux's
    /proc does not tell). Two containers sharing a host name (``network_mode: host``) differ here, so a
    pid is only compared within one namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _process_alive(pid: int) -> bool:
    """True when a process ``pid`` exists in this pid namespace (one of another user counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def stale_reason(record: Optional[dict[str, Any]], now: float, flow_run_id: Optional[str], host: str,
                 machine: str, alive: Callable[[int], bool] = _process_alive) -> Optional[str]:
    """Why a lock ``record`` read at time ``now`` (Unix s) no longer stands for a live run; None when it does.

    ``flow_run_id``, ``host`` and ``machine`` (``machine_identity``) are the starting run's; ``alive``
    tells whether a pid of this machine still runs. A live process of this machine holds the lock
    whatever its flow run (a flow run marked Crashed can still be running)."""
    if record is None:
        return "it is not a lock record"
    age = now - record["renewed"]
    expired = age > record["lease_s"]
    if record["host"] == host and machine and record["machine"] == machine:
        pid = int(record["pid"])
        if pid == os.getpid():
            return None if record["token"] in _HELD else "this process left it behind"
        if not alive(pid):
            return f"its process {pid} on this host has ended"
        if expired:
            return f"its process {pid} was last seen renewing it {age:.0f} s ago, beyond its lease"
        return None
    if flow_run_id is not None and record["flow_run_id"] == flow_run_id:
        return f"it is held by this flow run ({flow_run_id}) on another machine, retried"
    if expired:
        return f"it was last renewed {age:.0f} s ago, beyond its {record['lease_s']:.0f} s lease"
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


def _create_local(path: Path, data: bytes, make_parents: bool = True) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist (atomic); False when it does.

    A hard link of a finished file, so no reader sees it half-written; on a filesystem without hard
    links, an exclusive create (a reader in the moment of the write may see a cut record, which
    ``RunLock.check`` reads again before it counts as stale). ``make_parents`` False: FileNotFoundError
    when the folder is gone."""
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network or FUSE filesystems)
            try:
                out = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(out, "wb") as fh:
                fh.write(data)
            return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _replace_local(path: Path, data: bytes) -> bool:
    """Replace ``path`` with ``data`` atomically without creating its folder; False when the folder is gone."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return True
    except FileNotFoundError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


class RunLock:
    """The lock of one run folder held by this process (``acquire`` … ``release``).

    ``logger``: where its warnings go (the flow run's logger puts them in the Prefect UI; default the
    ``pocl`` logger); ``clock`` and ``sleep`` are for tests."""

    def __init__(self, paths: RunPaths, flow_run_id: Optional[str] = None, lease_s: float = LEASE_S,
                 logger: Optional[Logger] = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, not {lease_s}")
        self.path = paths.lock
        self.root = paths.root
        self.flow_run_id = flow_run_id
        self.lease_s = float(lease_s)
        self.log = logger if logger is not None else logging.getLogger("pocl")
        self.clock = clock
        self.sleep = sleep
        self.host = socket.gethostname()
        self.machine = machine_identity()
        self.token = secrets.token_hex(16)
        self.acquired: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self, now: float) -> dict[str, Any]:
        return {"token": self.token, "host": self.host, "machine": self.machine, "pid": os.getpid(),
                "flow_run_id": self.flow_run_id, "acquired": self.acquired if self.acquired is not None else now,
                "renewed": now, "lease_s": self.lease_s}

    def _judge(self, now: float) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """(the lock's record, why it is stale) with (None, None) when there is no lock; RunFolderBusy
        while a live run holds it. An unreadable record is read once more after a pause (it may be
        one being written) before it counts as stale."""
        exists, record = _read(self.path)
        if exists and record is None:
            self.sleep(UNREADABLE_RECHECK_S)
            exists, record = _read(self.path)
        if not exists:
            return None, None
        reason = stale_reason(record, now, self.flow_run_id, self.host, self.machine)
        if reason is None:
            raise RunFolderBusy(
                f"run folder {self.root} is in use by another run: {describe(record, now)}. Wait for it to "
                f"finish, or start this run with another run_name; if no run uses the folder any more, delete "
                f"{self.path}")
        return record, reason

    def check(self) -> Optional[str]:
        """RunFolderBusy while another live run holds the lock; else why the lock there is stale (None:
        there is none). Takes nothing: a start checks this before its engines start, then acquires."""
        return self._judge(self.clock())[1]

    def acquire(self) -> None:
        """Take the lock; RunFolderBusy (a ConfigError) while another live run holds it."""
        now = self.clock()
        data = encode_run_lock(self._record(now))
        if isinstance(self.path, Path):
            self._acquire_local(now, data)
        else:
            self._acquire_remote(now, data)
        self.acquired = now
        _HELD.add(self.token)

    def _busy_at_once(self) -> RunFolderBusy:
        return RunFolderBusy(f"run folder {self.root}: another run took its lock {self.path} at the same moment; "
                             "start this run again once that one finished, or with another run_name")

    def _acquire_local(self, now: float, data: bytes) -> None:
        for _ in range(5):
            if _create_local(self.path, data):
                return
            stale, reason = self._judge(now)
            if stale is None and reason is None:
                continue  # gone since: try to create it again
            aside = self.path.with_name(f".{self.path.name}.stale-{self.token}")
            try:
                os.rename(self.path, aside)  # of two starts taking it over, one rename finds the file
            except FileNotFoundError:
                continue
            _, moved = _read(aside)
            if (moved and moved["token"]) != (stale and stale["token"]):
                try:  # moved a lock another start took meanwhile: put it back
                    os.link(aside, self.path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                raise self._busy_at_once()
            aside.unlink(missing_ok=True)
            self.log.warning("taking over the lock %s of an earlier run, as %s", self.path, reason)
        raise self._busy_at_once()

    def _acquire_remote(self, now: float, data: bytes) -> None:
        _, reason = self._judge(now)
        if reason is not None:
            self.log.warning("taking over the lock %s of an earlier run, as %s", self.path, reason)
        write_bytes_atomic(self.path, data)
        _, mine = _read(self.path)
        if mine is None or mine["token"] != self.token:  # another start wrote after this one
            raise self._busy_at_once()

    def renew(self) -> bool:
        """Write a fresh ``renewed`` time; False (with a warning) once another run holds the lock. A lock
        file that is gone is written again only while the run folder exists, and a local renewal never
        creates the folder (a failed start that removed its new folder is not brought back)."""
        exists, record = _read(self.path)
        if exists and (record is None or record["token"] != self.token):
            self.log.warning("the lock %s was taken over by another run (%s); this run no longer renews it and "
                             "both now write the folder", self.path,
                             describe(record, self.clock()) if record else "unreadable record")
            return False
        data = encode_run_lock(self._record(self.clock()))
        if isinstance(self.path, Path):
            if exists:
                _replace_local(self.path, data)
            else:  # deleted by hand: put back, unless the folder went or another run took the lock meanwhile
                try:
                    _create_local(self.path, data, make_parents=False)
                except FileNotFoundError:
                    pass
        elif exists or self.root.exists():
            write_bytes_atomic(self.path, data)
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a store that does not answer for a moment: try again next time
                self.log.warning("could not renew the lock %s: %s", self.path, exc)

    def start_renewing(self) -> None:
        """Renew the lock from a daemon thread every quarter lease until ``stop_renewing``; the thread
        runs in a copy of this context (a Prefect flow run's logger still knows its run there)."""
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._renew_loop,), name="pocl-run-lock",
                                        daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        """Stop the renewal thread and wait for it (before the run folder is removed, say)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Stop renewing and remove the lock file when it is still this run's (locally: moved aside and
        checked, so a lock another run took meanwhile stays); a failing removal is a warning (the lock
        then goes stale within its lease)."""
        self.stop_renewing()
        _HELD.discard(self.token)
        try:
            if isinstance(self.path, Path):
                aside = self.path.with_name(f".{self.path.name}.release-{self.token}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    return
                _, record = _read(aside)
                if record is None or record["token"] != self.token:
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        pass
                aside.unlink(missing_ok=True)
                return
            exists, record = _read(self.path)
            if exists and record is not None and record["token"] == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            self.log.warning("could not remove the lock %s: %s", self.path, exc)


@contextmanager
def run_folder_lock(paths: RunPaths, flow_run_id: Optional[str] = None, lease_s: float = LEASE_S,
                    logger: Optional[Logger] = None) -> Iterator[RunLock]:
    """Hold the lock of the run folder ``paths.root`` for the block (see the module docstring)."""
    lock = RunLock(paths, flow_run_id, lease_s, logger)
    lock.acquire()
    lock.start_renewing()
    try:
        yield lock
    finally:
        lock.release()
