"""Process helpers for tests that start servers: free ports, process trees, stopping a tree by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from contextlib import closing, suppress
from pathlib import Path
from typing import Callable


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that this process has not handed
    out before (the kernel may offer a port it just offered again: a Ray node's seven ports chosen in
    a row collided about once in a thousand starts)."""
    while True:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _children_by_parent() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command name may hold spaces
        table.setdefault(ppid, []).append(int(entry.name))
    return table


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` (Linux /proc), children first."""
    table, found, stack = _children_by_parent(), [], [pid]
    while stack:
        for child in table.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop_tree(proc: subprocess.Popen, grace_s: float, *, term_group: bool = True,
              also: Callable[[], list[int]] = list) -> None:
    """SIGTERM ``proc`` (its whole process group when ``term_group``), wait up to ``grace_s``, then
    SIGKILL its process group, every process that was below it before the SIGTERM (children that
    moved to sessions of their own included) and the PIDs ``also()`` names then; reap ``proc``.

    ``proc`` must have been started with ``start_new_session=True`` (its PID is its group's id).
    """
    tree = descendants(proc.pid)
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            if term_group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree + also():
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
