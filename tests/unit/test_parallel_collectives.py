"""decided_by_rank0 and all_ranks_succeed across two CPU processes (gloo): one answer for every rank,
and a failure on any rank (an Exception, or a SystemExit / KeyboardInterrupt) raised on every rank
instead of leaving the others waiting in a collective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from devtools.processes import free_port


def _fail(kind: str) -> None:
    raise {"value": ValueError("bad value"), "exit": SystemExit(3), "interrupt": KeyboardInterrupt()}[kind]


def _worker(rank: int, port: int, case: str, out: str) -> None:
    from pocl_core.parallel import all_ranks_succeed, decided_by_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    record: dict = {}
    try:
        what, failing_rank, kind = case.split(":")
        if what == "decide":
            record["value"] = decided_by_rank0(lambda: _fail(kind) if kind else {"rank": dist.get_rank()})
        else:
            record["value"] = all_ranks_succeed(
                lambda: _fail(kind) if kind and rank == int(failing_rank) else rank * 10)
        record["after"] = dist.get_rank()  # the group still works afterwards: a matched collective
        dist.barrier()
    except BaseException as exc:  # noqa: B036 - the test checks what each rank raised
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()
    Path(f"{out}.rank{rank}").write_text(json.dumps(record))


def _run(tmp_path: Path, case: str) -> list[dict]:
    out = tmp_path / "record"
    ctx = mp.start_processes(_worker, args=(free_port(), case, str(out)), nprocs=2, join=False, start_method="spawn")
    for _ in range(6):  # a rank left waiting would hang here; gloo's own timeout is far longer
        if ctx.join(timeout=20):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"{case}: a rank was left waiting")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]


def test_rank_zeros_decision_reaches_every_rank(tmp_path):
    rank0, rank1 = _run(tmp_path, "decide:0:")
    assert rank0["value"] == rank1["value"] == {"rank": 0}


@pytest.mark.parametrize("kind, message", [("value", "ValueError: bad value"), ("exit", "SystemExit: 3"),
                                           ("interrupt", "KeyboardInterrupt: ")])
def test_rank_zero_failing_to_decide_stops_every_rank(tmp_path, kind, message):
    rank0, rank1 = _run(tmp_path, f"decide:0:{kind}")
    assert rank0["error"] == message
    assert rank1["error"] == f"RuntimeError: rank 0 failed, so rank 1 stops too: {message}"


def test_work_that_succeeds_everywhere_returns_each_ranks_result(tmp_path):
    rank0, rank1 = _run(tmp_path, "work:0:")
    assert (rank0["value"], rank1["value"]) == (0, 10) and (rank0["after"], rank1["after"]) == (0, 1)


@pytest.mark.parametrize("failing", [0, 1])
@pytest.mark.parametrize("kind, message", [("value", "ValueError: bad value"), ("exit", "SystemExit: 3")])
def test_work_failing_on_one_rank_stops_every_rank(tmp_path, failing, kind, message):
    records = _run(tmp_path, f"work:{failing}:{kind}")
    assert records[failing]["error"] == message
    other = 1 - failing
    assert records[other]["error"] == f"RuntimeError: rank {failing} failed, so rank {other} stops too: {message}"
