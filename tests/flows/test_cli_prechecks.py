"""`pocl run` / `pocl compare` refuse what would fail after Prefect or Ray started, in one error line
before any flow starts: an existing run folder with --no-resume, a bad data row, a runs_root where the
run folder cannot be made, a PREFECT_API_URL that nothing answers on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.cli import main


@pytest.fixture
def no_flow(monkeypatch):
    """Any flow started fails the test."""
    import flows.compare
    import flows.pipeline

    monkeypatch.setattr(flows.pipeline, "pocl_distill", lambda **_: pytest.fail("the flow was started"))
    monkeypatch.setattr(flows.compare, "pocl_compare", lambda **_: pytest.fail("the flow was started"))


@pytest.fixture
def model_folders(tmp_path) -> list[str]:
    """Overrides pointing models.teacher / models.student at (empty) folders that exist."""
    models = []
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        models.append(f"models.{name}={tmp_path / name}")
    return models


def test_run_no_resume_refuses_an_existing_run_folder_before_any_engine(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    args = ["run", "--config", "configs/tiny.yaml", "--run-name", "demo", "--no-resume", f"runs_root={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"run folder {tmp_path / 'demo'} already exists and resume is false" in err and "Traceback" not in err


def test_run_refuses_a_bad_data_row_before_any_engine(tmp_path, no_flow, model_folders, capsys):
    """The row is named in one line before Prefect or Ray start (no flow is called, no run folder made)."""
    rows = [json.dumps({"id": f"s{i}", "prompt": f"p{i}", "response": f"r{i}"}) for i in range(40)]
    rows[22] = json.dumps({"id": "s22", "prompt": "p22"})
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    args = ["run", "--config", "configs/tiny.yaml", f"runs_root={tmp_path / 'runs'}", *model_folders,
            f"data.train_path={data}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{data}:23" in err and "response" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_runs_root_where_the_run_folder_cannot_be_made_is_named_before_any_engine(tmp_path, no_flow, model_folders,
                                                                                   capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root may write there anyway: a process folder is closed to it too
            locked = Path(f"/proc/{os.getpid()}")
            if not locked.is_dir() or os.access(locked, os.W_OK):
                pytest.skip("no folder here that this user may not create folders in")
        root = locked / "runs"
        assert main(["run", "--config", "configs/tiny.yaml", f"runs_root={root}", *model_folders]) == 2
    finally:
        (tmp_path / "locked").chmod(0o755)
    err = capsys.readouterr().err
    assert (f"runs_root {root}: cannot create the run folder {root / 'tiny'}, as {locked} is not writable" in err
            and "Traceback" not in err)


def test_a_prefect_api_that_does_not_answer_is_named_before_any_flow(tmp_path, no_flow, model_folders, capsys):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/api"
        with temporary_settings({PREFECT_API_URL: url}):
            for command in ("run", "compare"):
                assert main([command, "--config", "configs/tiny.yaml", f"runs_root={tmp_path}", *model_folders]) == 2
                err = capsys.readouterr().err
                assert f"PREFECT_API_URL {url}: no Prefect API answers there" in err and "Traceback" not in err


def test_a_server_that_is_no_prefect_api_is_named_before_any_flow(tmp_path, no_flow, model_folders, capsys):
    """Something answers on PREFECT_API_URL, but with an HTTP error (a wrong port or path): one error line."""
    import http.server
    import threading

    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 for every GET
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api"
        with temporary_settings({PREFECT_API_URL: url}):
            assert main(["run", "--config", "configs/tiny.yaml", f"runs_root={tmp_path}", *model_folders]) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert f"PREFECT_API_URL {url}: {url}/health answered HTTP 501" in err and "Traceback" not in err


def test_compare_refuses_a_bad_data_row_before_any_engine(tmp_path, no_flow, model_folders, capsys):
    """As `pocl run` does: the row is named before Prefect starts (here an unanswering PREFECT_API_URL
    would be reported otherwise), and no comparison folder is made."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    rows = [json.dumps({"id": f"s{i}", "prompt": f"p{i}", "response": f"r{i}"}) for i in range(40)]
    rows[7] = json.dumps({"id": "s7", "response": "r7"})
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{closed.getsockname()[1]}/api"}):
            assert main(["compare", "--config", "configs/tiny.yaml", f"runs_root={tmp_path / 'runs'}", *model_folders,
                         f"data.train_path={data}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:8" in err and "prompt" in err and "PREFECT_API_URL" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
