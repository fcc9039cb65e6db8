"""A Prefect server and a Ray cluster on 127.0.0.1 for the length of a ``with`` block."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from devtools.live_prefect import PREFECT_CLI, api_healthy, start_service, stop_service, wait_until
from devtools.local_ray_cluster import LocalRayCluster
from devtools.processes import free_port


@contextmanager
def prefect_and_ray(root: Path, env: dict[str, str], num_cpus: int = 2) -> Iterator[dict[str, str]]:
    """Start ``prefect server`` (its home and log under ``root``) and a one-node Ray with ``num_cpus``;
    yields ``env`` plus PREFECT_API_URL and RAY_ADDRESS pointing at them. Both are stopped by PID on
    the way out."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(root / "prefect-server-home"), "PREFECT_UI_ENABLED": "false"}
    cluster = LocalRayCluster(num_cpus_per_node=num_cpus, root=Path(tempfile.mkdtemp(prefix="ray-", dir=root)))
    server = start_service("prefect server", [str(PREFECT_CLI), "server", "start", "--host", "127.0.0.1",
                                              "--port", str(port)], server_env, root / "prefect-server.log")
    try:
        wait_until("the Prefect server's API", lambda: api_healthy(api_url), 180, (server,))
        cluster.start(1)
        yield {**env, "PREFECT_API_URL": api_url, "RAY_ADDRESS": cluster.address}
    finally:
        cluster.stop()
        stop_service(server)
