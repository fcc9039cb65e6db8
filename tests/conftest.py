"""Shared fixtures: tiny models and data built locally (no download), isolated Prefect and Ray."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Isolate Prefect state and silence telemetry before anything imports prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="pocl-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402

from pocl_core.config import PoclConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "data" / "tiny" / "instructions.jsonl"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_data_path() -> Path:
    return TINY_DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """A tiny teacher (4 layers, briefly pre-trained on the data) and student sharing one tokenizer."""
    from pocl_core.data import load_samples
    from pocl_core.tiny import build_tiny_models

    samples, _ = load_samples(TINY_DATA)
    texts = [f"### Instruction:\n{s.prompt}\n\n### Response:\n{s.response}" for s in samples]
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), texts, teacher_warmup_steps=60)


@pytest.fixture
def make_config(tiny_models, tmp_path: Path):
    """Factory: the tiny config pointed at the fixture models and a temporary runs_root, plus overrides."""

    def make(*overrides: str) -> PoclConfig:
        base = [f"models.teacher={tiny_models.teacher}", f"models.student={tiny_models.student}",
                f"data.train_path={TINY_DATA}", f"runs_root={tmp_path / 'runs'}"]
        return load_config(TINY_CONFIG, base + list(overrides))

    return make


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (flows, tasks and artifacts)."""
    from prefect.testing.utilities import prefect_test_harness

    # Its own 30 s start-up limit is too short on a busy 2-core machine; allow what `make` allows.
    with prefect_test_harness(server_startup_timeout=int(os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))):
        yield


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session (2 CPUs), shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) on 127.0.0.1 and a free port; yields its endpoint URL.

    Stopped by PID at the end of the session.
    """
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {proc.returncode} before answering")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on 127.0.0.1:{port} within 60 s") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the local S3 server, with dummy credentials in the environment; yields its name."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    name = f"pocl-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def listening_address():
    """``127.0.0.1:<port>`` of a socket that accepts connections (a stand-in Ray address that answers)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"
