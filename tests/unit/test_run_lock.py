"""The run folder's advisory lock: one live run at a time, stale locks taken over, S3 too."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocl_core.contracts import RUN_LOCK_FIELDS, RunPaths, decode_run_lock, encode_run_lock
from pocl_core.run_lock import RunFolderBusy, RunLock, machine_identity, run_folder_lock, stale_reason

HOST = socket.gethostname()
MACHINE = machine_identity()


def _record(**changes) -> dict:
    now = time.time()
    record = {"token": "other", "host": HOST, "machine": MACHINE, "pid": 1, "flow_run_id": None,
              "acquired": now - 5, "renewed": now - 5, "lease_s": 120.0}
    record.update(changes)
    return record


def _write(paths: RunPaths, record: dict) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.lock.write_bytes(encode_run_lock(record))


def _ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_holds_every_field_while_held_and_is_gone_after(tmp_path):
    paths = RunPaths(tmp_path / "run")
    with run_folder_lock(paths, flow_run_id="fr-1") as lock:
        record = json.loads(paths.lock.read_text())
        assert set(record) == set(RUN_LOCK_FIELDS)
        assert record["token"] == lock.token and record["flow_run_id"] == "fr-1" and record["host"] == HOST
        assert record["acquired"] == record["renewed"] and record["lease_s"] == 120.0
    assert not paths.lock.exists() and paths.root.is_dir()


def test_a_second_start_is_refused_while_the_first_runs_and_passes_after(tmp_path):
    paths = RunPaths(tmp_path / "run")
    with run_folder_lock(paths, flow_run_id="fr-1"):
        with pytest.raises(RunFolderBusy) as err:
            RunLock(paths, flow_run_id="fr-2").acquire()
        msg = str(err.value)
        assert str(paths.root) in msg and "flow run fr-1" in msg and f"host {HOST}" in msg
        assert "another run_name" in msg and str(paths.lock) in msg
        assert json.loads(paths.lock.read_text())["flow_run_id"] == "fr-1"  # the holder's lock is untouched
    with run_folder_lock(paths, flow_run_id="fr-2"):
        assert json.loads(paths.lock.read_text())["flow_run_id"] == "fr-2"


def test_a_live_process_of_this_host_holds_the_folder(tmp_path):
    paths = RunPaths(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write(paths, _record(pid=holder.pid))
        with pytest.raises(RunFolderBusy, match=f"process {holder.pid} on host"):
            RunLock(paths).acquire()
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(paths):  # its process is gone now
        pass


@pytest.mark.parametrize("case", ["ended process", "same flow run", "lease over", "not a record", "left by us"])
def test_stale_locks_are_taken_over_with_a_warning(tmp_path, caplog, case):
    import os

    paths = RunPaths(tmp_path / "run")
    now = time.time()
    if case == "not a record":
        paths.root.mkdir(parents=True)
        paths.lock.write_text('{"token": "cut sh')
    else:
        record = {"ended process": _record(pid=_ended_pid()),
                  "same flow run": _record(host="elsewhere", flow_run_id="fr-1"),
                  "lease over": _record(host="elsewhere", renewed=now - 121, lease_s=120.0),
                  "left by us": _record(pid=os.getpid())}[case]
        _write(paths, record)
    with caplog.at_level(logging.WARNING, logger="pocl"), run_folder_lock(paths, flow_run_id="fr-1") as lock:
        assert json.loads(paths.lock.read_text())["token"] == lock.token
    assert "taking over the lock" in caplog.text and str(paths.lock) in caplog.text


def test_another_host_within_its_lease_holds_the_folder(tmp_path):
    paths = RunPaths(tmp_path / "run")
    _write(paths, _record(host="worker-7", pid=4242, renewed=time.time() - 100, lease_s=120.0))
    with pytest.raises(RunFolderBusy, match="process 4242 on host worker-7"):
        RunLock(paths, flow_run_id="fr-9").acquire()


def test_stale_reason_rules():
    now = 1000.0
    fresh = {"token": "t", "host": "h", "machine": "m", "pid": 5, "flow_run_id": "a", "acquired": 900.0,
             "renewed": 990.0, "lease_s": 20.0}
    elsewhere = dict(host="other-host", machine="m2")
    assert stale_reason(fresh, now, "b", **elsewhere) is None
    assert stale_reason(fresh, now, None, **elsewhere) is None  # no flow run: never "the same one"
    assert "retried" in stale_reason(fresh, now, "a", **elsewhere)
    assert "lease" in stale_reason({**fresh, "renewed": 979.0}, now, "b", **elsewhere)
    assert stale_reason(fresh, now, "b", "h", "m", alive=lambda pid: True) is None
    assert "has ended" in stale_reason(fresh, now, "b", "h", "m", alive=lambda pid: False)
    # a live process of this machine holds it even for its own flow run (one marked Crashed may still run)
    assert stale_reason(fresh, now, "a", "h", "m", alive=lambda pid: True) is None
    assert "beyond its lease" in stale_reason({**fresh, "renewed": 979.0}, now, "b", "h", "m", alive=lambda pid: True)
    # the same host name in another pid namespace (a container on the host network): no pid rule
    assert stale_reason(fresh, now, "b", "h", "m-other", alive=lambda pid: False) is None
    assert stale_reason(fresh, now, "b", "h", "", alive=lambda pid: False) is None  # no /proc: lease only
    assert "not a lock record" in stale_reason(None, now, "b", "h", "m")


def test_lock_records_are_checked_field_by_field():
    good = _record()
    assert decode_run_lock(encode_run_lock(good)) == good
    assert decode_run_lock(b"\xff") is None and decode_run_lock(b"[]") is None
    assert decode_run_lock(json.dumps({**good, "extra": 1}).encode()) is None
    assert decode_run_lock(json.dumps({**good, "pid": "12"}).encode()) is None
    assert decode_run_lock(json.dumps({**good, "renewed": True}).encode()) is None
    with pytest.raises(ValueError, match="fields"):
        encode_run_lock({"token": "t"})


def test_the_holder_renews_and_a_taken_over_lock_is_left_to_its_new_holder(tmp_path, caplog):
    paths = RunPaths(tmp_path / "run")
    with run_folder_lock(paths, lease_s=0.2) as lock:
        first = json.loads(paths.lock.read_text())["renewed"]
        deadline = time.time() + 10
        while json.loads(paths.lock.read_text())["renewed"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads(paths.lock.read_text())["renewed"] > first
        _write(paths, _record(token="newcomer"))
        with caplog.at_level(logging.WARNING, logger="pocl"):
            assert lock.renew() is False
        assert "taken over by another run" in caplog.text
    assert json.loads(paths.lock.read_text())["token"] == "newcomer"  # release leaves the new holder's lock


def test_renewal_does_not_bring_back_a_removed_run_folder(tmp_path):
    import shutil

    paths = RunPaths(tmp_path / "run")
    lock = RunLock(paths)
    lock.acquire()
    shutil.rmtree(paths.root)  # a failed start removes its new folder while holding the lock
    assert lock.renew() is True and not paths.root.exists()
    lock.release()
    assert not paths.root.exists()
    paths.root.mkdir()
    lock2 = RunLock(paths)
    lock2.acquire()
    paths.lock.unlink()  # deleted by hand while the run goes on: the next renewal puts it back
    assert lock2.renew() and json.loads(paths.lock.read_text())["token"] == lock2.token
    lock2.release()


def test_lock_on_an_s3_run_folder(s3_bucket, s3_server):
    from pocl_core.config_sections import StorageConfig

    storage = StorageConfig(endpoint_url=s3_server)
    paths = RunPaths.of(f"s3://{s3_bucket}/runs/r1", storage)
    with run_folder_lock(paths, flow_run_id="fr-1") as lock:
        assert decode_run_lock(paths.lock.read_bytes())["token"] == lock.token
        with pytest.raises(RunFolderBusy, match="flow run fr-1"):
            RunLock(RunPaths.of(f"s3://{s3_bucket}/runs/r1", storage), flow_run_id="fr-2").acquire()
        assert lock.renew()
    assert not paths.lock.exists()


def test_a_busy_run_folder_stops_the_flow_before_any_step(tmp_path):
    """The flow refuses a folder another live run holds, as one clear ConfigError; nothing is written."""
    from flows.pipeline import pocl_distill

    repo = Path(__file__).resolve().parents[2]
    for name in ("teacher", "student"):
        (tmp_path / "models" / name).mkdir(parents=True)
    paths = RunPaths(tmp_path / "runs" / "busy")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write(paths, _record(pid=holder.pid, flow_run_id="fr-holder"))
        with pytest.raises(RunFolderBusy, match="is in use by another run"):
            pocl_distill.fn(str(repo / "configs" / "tiny.yaml"),
                            [f"runs_root={tmp_path / 'runs'}", f"models.teacher={tmp_path / 'models' / 'teacher'}",
                             f"models.student={tmp_path / 'models' / 'student'}"], run_name="busy")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in paths.root.iterdir()) == ["run.lock"]


def test_a_filesystem_without_hard_links_still_creates_the_lock_exclusively(tmp_path, monkeypatch):
    import os

    def no_links(src, dst):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "link", no_links)
    paths = RunPaths(tmp_path / "run")
    with run_folder_lock(paths, flow_run_id="fr-1") as lock:
        assert json.loads(paths.lock.read_text())["token"] == lock.token
        with pytest.raises(RunFolderBusy):
            RunLock(paths, flow_run_id="fr-2").acquire()
    assert sorted(p.name for p in paths.root.iterdir()) == []  # no temporary file left behind


@pytest.mark.parametrize("command", ["run", "compare"])
def test_pocl_run_and_compare_refuse_a_busy_folder_before_any_engine(tmp_path, monkeypatch, capsys, command):
    """The CLI's pre-check names the holder before Prefect's temporary server or Ray would start."""
    import flows.compare
    import flows.pipeline
    from flows.cli import main

    def no_flow(**kwargs):
        raise AssertionError("the flow started on a busy folder")

    monkeypatch.setattr(flows.pipeline, "pocl_distill", no_flow)
    monkeypatch.setattr(flows.compare, "pocl_compare", no_flow)
    repo = Path(__file__).resolve().parents[2]
    for name in ("teacher", "student"):
        (tmp_path / "models" / name).mkdir(parents=True)
    busy = RunPaths(tmp_path / "runs" / "busy")
    _write(busy, _record(host="worker-3", pid=77, flow_run_id="fr-holder"))
    argv = [command, "--config", str(repo / "configs" / "tiny.yaml"), f"runs_root={tmp_path / 'runs'}",
            f"models.teacher={tmp_path / 'models' / 'teacher'}", f"models.student={tmp_path / 'models' / 'student'}"]
    argv += ["--run-name", "busy"] if command == "run" else ["--name", "busy"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"run folder {busy.root} is in use by another run: process 77 on host worker-3, flow run fr-holder" in err


def test_a_live_lock_of_the_same_host_name_in_another_namespace_is_not_taken(tmp_path):
    paths = RunPaths(tmp_path / "run")
    _write(paths, _record(pid=_ended_pid(), machine="another-boot/pid:[4026531836]"))
    with pytest.raises(RunFolderBusy, match="is in use by another run"):
        RunLock(paths).acquire()


def test_the_same_flow_run_still_running_here_is_not_taken_over(tmp_path):
    paths = RunPaths(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write(paths, _record(pid=holder.pid, flow_run_id="fr-1"))
        with pytest.raises(RunFolderBusy, match="flow run fr-1"):
            RunLock(paths, flow_run_id="fr-1").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_of_two_starts_taking_over_one_stale_lock_only_one_holds_it(tmp_path, monkeypatch):
    """B judged the lock stale before A replaced it: B's rename moves A's lock, which B puts back."""
    paths = RunPaths(tmp_path / "run")
    stale = _record(pid=_ended_pid())
    _write(paths, stale)
    a, b = RunLock(paths, flow_run_id="fr-a"), RunLock(paths, flow_run_id="fr-b")
    monkeypatch.setattr(b, "_judge", lambda now: (stale, "its process has ended"))  # what B read earlier
    a.acquire()
    with pytest.raises(RunFolderBusy, match="at the same moment"):
        b.acquire()
    assert json.loads(paths.lock.read_text())["token"] == a.token
    assert sorted(p.name for p in paths.root.iterdir()) == ["run.lock"]
    a.release()
    assert not paths.lock.exists()


def test_an_unreadable_lock_is_read_again_before_it_counts_as_stale(tmp_path):
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir(parents=True)
    paths.lock.write_text("")  # a record being written (exclusive create without hard links)

    def writer_finishes(seconds):
        _write(paths, _record(host="worker-2", flow_run_id="fr-writer"))

    with pytest.raises(RunFolderBusy, match="flow run fr-writer"):
        RunLock(paths, sleep=writer_finishes).acquire()


def test_a_failed_fresh_start_stops_renewing_before_its_folder_is_removed(tmp_path):
    from flows.pipeline import removed_on_failure

    paths = RunPaths(tmp_path / "run")
    events = []
    with run_folder_lock(paths, lease_s=0.05) as lock:
        with pytest.raises(RuntimeError), removed_on_failure(
                paths.root, new=True, before_removal=lambda: (lock.stop_renewing(), events.append("stopped"))):
            raise RuntimeError("the data failed to load")
        events.append("removed" if not paths.root.exists() else "kept")
        time.sleep(0.2)  # four lease quarters: a renewal thread still running would write the folder back
        assert not paths.root.exists()
    assert events == ["stopped", "removed"] and not paths.root.exists()
