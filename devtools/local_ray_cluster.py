"""A throwaway multi-node Ray cluster on this machine: ``ray start --block`` per node, stopped by PID.

Each node is one ``ray start --block`` process in its own session (process group) with its own
``--temp-dir`` and explicitly chosen free ports, so it shares nothing with other Ray instances on
the machine, and stopping it (SIGTERM to that process, then SIGKILL to its group and every process
it started) touches nothing else. ``ray stop`` is never used: it stops every Ray on the machine.

Ray turns ``--node-ip-address=127.0.0.1`` into the machine's reachable address (on Linux it refuses
a loopback node address) and its gRPC servers listen on all interfaces, as for any local Ray. No
dashboard is started (it needs ``ray[default]``, which is not installed).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from devtools.processes import free_port, stop_tree

RAY_CLI = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 180.0


def processes_using(path: str) -> list[int]:
    """PIDs whose command line mentions ``path`` (a node's temp dir): what is left of that node."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with suppress(OSError):
                if path.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@dataclass
class RayNode:
    """One ``ray start --block`` process, its temp dir and its log."""

    proc: subprocess.Popen
    temp_dir: str
    log: Path

    def describe(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return f"ray node (pid {self.proc.pid}, exit code {self.proc.poll()}), log {self.log}:\n{text[-4000:]}"


@dataclass
class LocalRayCluster:
    """A head node and worker nodes started on this machine; ``address`` is the head's GCS address."""

    num_cpus_per_node: int = 1
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pocl-ray-", dir="/tmp")))
    port: int = field(default_factory=free_port)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment for the nodes and their drivers: no RAY_ADDRESS inherited from elsewhere."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        return env

    def start(self, num_nodes: int) -> "LocalRayCluster":
        """Start the head, then ``num_nodes - 1`` worker nodes; returns once all of them are alive."""
        self._start_node(["--head", f"--port={self.port}", "--include-dashboard=false"])
        self._wait(f"the head's GCS on port {self.port}", self._gcs_answers)
        for _ in range(num_nodes - 1):
            self._start_node([f"--address={self.address}"])
        self._wait(f"{num_nodes} alive Ray nodes", lambda: self.alive_nodes(wait_for=num_nodes) >= num_nodes)
        return self

    def _start_node(self, role: list[str]) -> None:
        index = len(self.nodes)
        temp_dir = str(self.root / f"n{index}")  # short: Ray's socket paths must stay under 107 bytes
        ports = [f"--{name}={free_port()}" for name in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
        cmd = [str(RAY_CLI), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus_per_node}",
               "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *ports, *role]
        log = self.root / f"n{index}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.nodes.append(RayNode(proc, temp_dir, log))

    def _gcs_answers(self) -> bool:
        with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def alive_nodes(self, wait_for: int = 0, timeout_s: float = 60.0) -> int:
        """Alive nodes as the GCS sees them, polled until there are ``wait_for`` or ``timeout_s`` passes.

        Asked from a subprocess (a Ray driver), so the calling process stays free of Ray.
        """
        code = ("import ray, sys, time\n"
                f"ray.init(address={self.address!r}, log_to_driver=False)\n"
                f"deadline = time.monotonic() + {timeout_s}\n"
                "while True:\n"
                "    alive = sum(n['Alive'] for n in ray.nodes())\n"
                f"    if alive >= {wait_for} or time.monotonic() > deadline:\n"
                "        break\n"
                "    time.sleep(0.5)\n"
                "print('ALIVE', alive)\n")
        out = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True,
                             timeout=timeout_s + 120)
        lines = [line for line in out.stdout.splitlines() if line.startswith("ALIVE ")]
        return int(lines[-1].split()[1]) if out.returncode == 0 and lines else -1

    def _wait(self, what: str, ready) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                reason = "a node exited" if dead else f"not within {START_TIMEOUT_S:.0f} s"
                raise RuntimeError(f"waiting for {what}: {reason}\n" + "\n".join(n.describe() for n in self.nodes))
            time.sleep(1.0)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop worker nodes first, then the head: SIGTERM to ``ray start``, then SIGKILL what is left.

        An idle node exits on SIGTERM within 1–2 s; one that still hosts an actor (Ray Train's
        detached state actor, say) drains for up to 30 s first, which a throwaway cluster need not wait for.
        """
        for node in reversed(self.nodes):
            stop_tree(node.proc, grace_s, term_group=False, also=lambda node=node: processes_using(node.temp_dir))
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Processes still running from any node of this cluster (empty after ``stop``)."""
        return [pid for node in self.nodes for pid in processes_using(node.temp_dir)]
