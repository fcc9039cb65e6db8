"""Orchestration overhead: the tiny flow end to end vs the same work called as plain functions.

Run: ``make bench-orchestration`` (= ``.venv/bin/python -m benchmarks.bench_orchestration``; about
3 minutes per repeat on a quiet 2-core machine, twice that on a busy one). Options: ``--repeats``,
``--threads``, ``--json``. Goal: the flow spends at most 30 s beyond the tasks' own compute.

Setup. The tiny teacher/student pair (``pocl_core.tiny.build_tiny_models``, as the tests build
it) on ``data/tiny``, and ``configs/tiny.yaml`` unchanged apart from the model paths, runs_root
and run_name (4 stages, 2 Ray Train workers, 24 held-out samples). Every process gets
``OMP_NUM_THREADS=--threads`` (default 1: what each Ray Train worker gets anyway, and the only
setting that gives repeatable times on a shared 2-core machine; 0 keeps torch's default).

Each measurement is a fresh subprocess, in this order per repeat:

* ``flow``: ``python -m flows.pipeline --config configs/tiny.yaml ...``, the real entry point:
  it starts Prefect's temporary server and a fresh local Ray (``RAY_ADDRESS=local``), trains
  with 2 Ray Train workers and exits. Its wall time runs from process start to exit. Its
  Prefect database is read afterwards for the flow run's and each task run's start and end.
  The benchmark's ``PREFECT_HOME`` is created once up front (its first use creates and migrates
  the database, 15–20 s here, which a user pays once per machine, not per run).
* ``direct``: the same task functions called as plain functions (``.fn``: no Prefect) in a new
  run folder, each timed: load, score, partition, distill, evaluate, report. Distill runs with
  ``ray.num_workers=0``: the same training loop in-process (Ray Train's local mode: no Ray, no
  worker processes). Interpreter start and imports are not counted.
* ``imports``: ``python -c "import flows.pipeline"``: interpreter start and imports alone.
* ``ray``: ``ensure_ray`` (the flow's ``ray.init``) and a first 2-worker ``TorchTrainer.fit()``
  of an empty loop, each timed: Ray's and Ray Train's fixed costs without our work; then a
  second fit whose workers time their import of ``tasks.distill_loop`` (transformers, ours).
* ``flow without Ray``: the ``flow`` command again with ``ray.num_workers=0`` (training in the
  flow's own process), whose own compute is exactly the ``direct`` run's.
* ``flow on running services``: the ``flow`` command again with ``PREFECT_API_URL`` pointing at a
  ``prefect server start`` and ``RAY_ADDRESS`` at a ``ray start --head`` (2 CPUs), both started on
  127.0.0.1 once before the first repeat and stopped by PID at the end: how a run triggered from the
  Prefect UI or a schedule runs, with no temporary server and no Ray of its own to start and stop.

Own compute = Σ direct task times, except that distill's training steps count with the flow's own
step time (``seconds`` in ``train/metrics.jsonl``, measured inside rank 0 of the 2 DDP workers)
instead of the in-process one: the parallel speed-up is the flow's, not a saving of orchestration.
Overhead = flow wall − own compute. Breakdown: process start → flow run created (imports, config
check, Prefect server start), flow run duration − Σ task runs (Prefect between tasks), flow run
end → exit (Ray and server shutdown), and per task its task run − its own compute (for distill:
Ray start, Ray Train start-up, the workers' imports and model loads).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled",
                     "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                     "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tiny" / "instructions.jsonl"
CONFIG = REPO / "configs" / "tiny.yaml"
TASKS = ("load-dataset", "score-difficulty", "partition", "distill", "evaluate", "report")
GOAL_S = 30.0


def overrides(root: Path, run_name: str, *extra: str) -> list[str]:
    models = root / "models"
    return [f"models.teacher={models / 'teacher'}", f"models.student={models / 'student'}", f"data.train_path={DATA}",
            f"runs_root={root / 'runs'}", f"run_name={run_name}", *extra]


def loop_seconds(run_dir: Path) -> float:
    """The training loop's own step time: the ``seconds`` column of ``train/metrics.jsonl``."""
    rows = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(r)["seconds"] for r in rows)


# --- the subprocess roles


def run_direct(root: Path, run_name: str) -> dict:
    """The flow's task functions as plain calls (no Prefect), training in-process (no Ray)."""
    from pocl_core.config import load_config
    from tasks.distill import distill
    from tasks.evaluate import evaluate
    from tasks.load_data import load_dataset
    from tasks.partition import partition
    from tasks.report import report
    from tasks.score import score_difficulty

    cfg = load_config(CONFIG, overrides(root, run_name, "ray.num_workers=0")).with_absolute_paths()
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[name] = time.perf_counter() - t0
        return out

    data = timed("load-dataset", load_dataset.fn, cfg)
    scores = timed("score-difficulty", score_difficulty.fn, cfg, data)
    part = timed("partition", partition.fn, cfg, scores)
    student = timed("distill", distill.fn, cfg, data, part, scores.teacher_cache_dir)
    metrics = timed("evaluate", evaluate.fn, cfg, data, student)
    timed("report", report.fn, cfg, metrics, part)
    return {"tasks": seconds, "loop_s": loop_seconds(Path(cfg.run_dir))}


def _empty_loop() -> None:
    """A Ray Train worker function that does nothing: what is left is Ray Train's own cost."""


def _import_loop(config: dict) -> None:
    """A Ray Train worker function that times the import of the training loop's modules (transformers, ours)."""
    import ray.train

    t0 = time.perf_counter()
    importlib.import_module("tasks.distill_loop")
    seconds = time.perf_counter() - t0
    Path(config["out"], f"import-{ray.train.get_context().get_world_rank()}.txt").write_text(str(seconds))


def run_ray_fixed(root: Path) -> dict:
    """ensure_ray (a local Ray, as the flow starts it), then 2-worker fit()s of an empty loop and of
    one that only imports the training loop's modules, each timed."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.distill import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(None)
    out = {"ray_init_s": time.perf_counter() - t0}
    storage = Path(tempfile.mkdtemp(prefix="ray-fixed-", dir=root))  # fresh: Ray Train resumes a reused name
    for name, loop, config in (("empty_fit_s", _empty_loop, None), ("import_fit_s", _import_loop, {"out": str(storage)})):
        trainer = TorchTrainer(loop, train_loop_config=config, run_config=RunConfig(name=name, storage_path=str(storage)),
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=False))
        t0 = time.perf_counter()
        trainer.fit()
        out[name] = time.perf_counter() - t0
    out["worker_import_s"] = max(float(p.read_text()) for p in storage.glob("import-*.txt"))
    t0 = time.perf_counter()
    ray.shutdown()
    return {**out, "ray_shutdown_s": time.perf_counter() - t0}


def read_flow_run(prefect_home: Path) -> dict:
    """The newest flow run's and its task runs' start/end times (epoch seconds) from the Prefect database."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    tasks = {}
    for tr in task_runs:
        name = next((t for t in TASKS if tr.name.startswith(t + "-")), tr.name)
        tasks[name] = {"start": tr.start_time.timestamp(), "end": tr.end_time.timestamp()}
    return {"state": flow_run.state.type.value, "created": flow_run.created.timestamp(),
            "start": flow_run.start_time.timestamp(), "end": flow_run.end_time.timestamp(), "tasks": tasks}


def warm_prefect_home() -> dict:
    """Start the temporary server once on the benchmark's PREFECT_HOME: creates and migrates its database."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {"healthy": client.api_healthcheck() is None}


def child(role: str, root: Path, run_name: str) -> None:
    result = {"direct": lambda: run_direct(root, run_name), "ray": lambda: run_ray_fixed(root),
              "prefect-api": lambda: read_flow_run(Path(os.environ["PREFECT_HOME"])),
              "prefect-warm": warm_prefect_home}[role]()
    print("RESULT " + json.dumps(result))


# --- the parent


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _spawn(cmd: list[str], env: dict[str, str], what: str) -> tuple[float, str, float, float, float]:
    """Run ``cmd`` from the repository root; returns (wall s, stdout, start epoch, end epoch, CPU s).

    CPU s: user + system time of the process and of the descendants it reaped (Ray's and Prefect's
    processes are reaped at shutdown; a descendant that outlives its parent is missed: a lower bound).
    """
    cpu0, start = _cpu_of_children(), time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    end, cpu = time.time(), _cpu_of_children() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return end - start, proc.stdout, start, end, cpu


def _child(role: str, root: Path, env: dict[str, str], run_name: str = "") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_orchestration", "--worker", role, "--root", str(root),
           "--run-name", run_name]
    _, out, _, _, cpu = _spawn(cmd, env, role)
    return {**json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]), "cpu_s": cpu}


def child_env(root: Path, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(root / "prefect-home")  # one for the benchmark, its database made up front
    env["RAY_ADDRESS"] = "local"  # a fresh local Ray, never a cluster that `ray start` left on this machine
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in every process, Ray workers included
    return env


def running_services(root: Path, threads: int):
    """A Prefect server and a one-node Ray (2 CPUs) on 127.0.0.1 (``devtools.services``), as a context
    manager yielding the flow's env for them."""
    from devtools.services import prefect_and_ray

    return prefect_and_ray(root, child_env(root, threads), num_cpus=2)


def one_repeat(root: Path, rep: int, threads: int, services_env: dict[str, str]) -> dict:
    env = child_env(root, threads)
    load_before = os.getloadavg()[0]
    flow_name = f"flow-{rep}"
    wall, _, start, end, flow_cpu = _spawn([sys.executable, "-m", "flows.pipeline", "--config", str(CONFIG),
                                  *overrides(root, flow_name)], env, "the flow")
    load_after_flow = os.getloadavg()[0]
    api = _child("prefect-api", root, env)
    direct = _child("direct", root, env, f"direct-{rep}")
    imports_s, _, _, _, _ = _spawn([sys.executable, "-c", "import flows.pipeline"], env, "imports")
    ray_fixed = _child("ray", root, env)
    # the same flow with ray.num_workers=0: training in the flow's process, no Ray at all
    local_wall, _, _, _, _ = _spawn([sys.executable, "-m", "flows.pipeline", "--config", str(CONFIG),
                                     *overrides(root, f"flow-local-{rep}", "ray.num_workers=0")],
                                    env, "the flow without Ray")
    served_name = f"flow-served-{rep}"
    served_wall, _, served_start, served_end, _ = _spawn(
        [sys.executable, "-m", "flows.pipeline", "--config", str(CONFIG), *overrides(root, served_name)],
        services_env, "the flow on running services")
    served_api = _child("prefect-api", root, services_env)
    served_tasks = {t: v["end"] - v["start"] for t, v in served_api["tasks"].items()}
    served_own = dict(direct["tasks"], distill=direct["tasks"]["distill"] - direct["loop_s"]
                      + loop_seconds(root / "runs" / served_name))
    task_s = {t: v["end"] - v["start"] for t, v in api["tasks"].items()}
    flow_loop = loop_seconds(root / "runs" / flow_name)
    # distill's own compute: the in-process run's setup, model loads, checkpoints and save, with its
    # training steps' time replaced by the flow's own (measured inside rank 0, DDP over 2 workers)
    own = dict(direct["tasks"], distill=direct["tasks"]["distill"] - direct["loop_s"] + flow_loop)
    return {
        "flow_wall_s": wall, "flow_state": api["state"],
        "flow_run_s": api["end"] - api["start"],
        "start_to_created_s": api["created"] - start, "created_to_running_s": api["start"] - api["created"],
        "end_to_exit_s": end - api["end"],
        "flow_tasks_s": task_s, "between_tasks_s": (api["end"] - api["start"]) - sum(task_s.values()),
        "flow_loop_s": flow_loop, "direct_tasks_s": direct["tasks"], "direct_loop_s": direct["loop_s"],
        "own_tasks_s": own, "own_compute_s": sum(own.values()), "direct_total_s": sum(direct["tasks"].values()),
        "threads": threads, "flow_cpu_s": flow_cpu, "direct_cpu_s": direct["cpu_s"],
        "imports_s": imports_s, **ray_fixed, "flow_local_wall_s": local_wall,
        "served": {"wall_s": served_wall, "state": served_api["state"], "own_compute_s": sum(served_own.values()),
                   "start_to_created_s": served_api["created"] - served_start,
                   "end_to_exit_s": served_end - served_api["end"],
                   "between_tasks_s": (served_api["end"] - served_api["start"]) - sum(served_tasks.values()),
                   "distill_minus_own_s": served_tasks["distill"] - served_own["distill"],
                   "other_tasks_minus_own_s": sum(v for t, v in served_tasks.items() if t != "distill")
                   - sum(v for t, v in served_own.items() if t != "distill")},
        "load_avg": [round(load_before, 1), round(load_after_flow, 1), round(os.getloadavg()[0], 1)],
    }


def print_repeat(r: dict) -> None:
    over = r["flow_wall_s"] - r["own_compute_s"]
    print(f"\nflow wall time (process start to exit): {r['flow_wall_s']:7.1f} s   (flow run {r['flow_state']}: "
          f"{r['flow_run_s']:.1f} s)")
    print(f"own compute (same task functions, no Prefect, no Ray; flow's step time): {r['own_compute_s']:7.1f} s"
          f"   (as measured in-process: {r['direct_total_s']:.1f} s)")
    print(f"overhead: {over:7.1f} s   (goal <= {GOAL_S:.0f} s: {'met' if over <= GOAL_S else 'NOT met'})")
    print(f"load average 1 min: {r['load_avg'][0]} before, {r['load_avg'][1]} after the flow, {r['load_avg'][2]} at the end")
    print(f"threads per process: {r['threads'] or 'torch default'}")
    print(f"\n{'task':<18} {'flow task run s':>16} {'direct s':>9} {'own s':>7} {'flow - own s':>13}")
    for t in TASKS:
        f, d, o = r["flow_tasks_s"].get(t, float("nan")), r["direct_tasks_s"][t], r["own_tasks_s"][t]
        print(f"{t:<18} {f:>16.1f} {d:>9.1f} {o:>7.1f} {f - o:>13.1f}")
    print(f"\n{'where the overhead goes':<66} {'s':>7}")
    rows = [
        ("process start -> flow run created (imports, Prefect server)", r["start_to_created_s"]),
        ("  of which: python -c 'import flows.pipeline' (separate run)", r["imports_s"]),
        ("flow run created -> running", r["created_to_running_s"]),
        ("in the flow run, outside the task runs", r["between_tasks_s"]),
        ("task runs minus their own compute", sum(r["flow_tasks_s"].values()) - r["own_compute_s"]),
        ("  of which distill", r["flow_tasks_s"]["distill"] - r["own_tasks_s"]["distill"]),
        ("    ray.init, a local Ray (separate run)", r["ray_init_s"]),
        ("    first TorchTrainer.fit(), empty loop, 2 workers (separate run)", r["empty_fit_s"]),
        ("    in a worker, importing the training loop's modules (separate run)", r["worker_import_s"]),
        ("flow run end -> process exit (Ray, Prefect server shutdown)", r["end_to_exit_s"]),
    ]
    for name, s in rows:
        print(f"{name:<66} {s:>7.1f}")
    local_over = r["flow_local_wall_s"] - r["direct_total_s"]
    print(f"\nthe flow with ray.num_workers=0 (no Ray): wall {r['flow_local_wall_s']:.1f} s, overhead over the "
          f"in-process own compute {local_over:.1f} s (goal <= {GOAL_S:.0f} s: {'met' if local_over <= GOAL_S else 'NOT met'})")
    sv = r["served"]
    sv_over = sv["wall_s"] - sv["own_compute_s"]
    print(f"\nthe flow on a running Prefect server and Ray (flow run {sv['state']}): wall {sv['wall_s']:.1f} s, own "
          f"compute {sv['own_compute_s']:.1f} s, overhead {sv_over:.1f} s (goal <= {GOAL_S:.0f} s: "
          f"{'met' if sv_over <= GOAL_S else 'NOT met'})")
    for name, key in (("process start -> flow run created (imports, config check)", "start_to_created_s"),
                      ("in the flow run, outside the task runs", "between_tasks_s"),
                      ("load, score, partition, evaluate, report: task runs - own compute", "other_tasks_minus_own_s"),
                      ("distill: task run - own compute (Ray Train start-up, worker setup, end)", "distill_minus_own_s"),
                      ("flow run end -> process exit", "end_to_exit_s")):
        print(f"  {name:<76} {sv[key]:>6.1f}")
    print(f"CPU time (user + system, the process and what it reaped): flow {r['flow_cpu_s']:.1f} s, "
          f"direct {r['direct_cpu_s']:.1f} s (both with interpreter start and imports)")
    print(f"training steps' own time (metrics.jsonl): flow, 2 Ray workers {r['flow_loop_s']:.1f} s; "
          f"direct, in-process {r['direct_loop_s']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="flow + direct runs (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for every process (default 1; 0: torch's default)")
    parser.add_argument("--json", help="also write every repeat's numbers to this file")
    parser.add_argument("--keep", action="store_true", help="keep the models and run folders (deleted at the end otherwise)")
    parser.add_argument("--worker", choices=("direct", "ray", "prefect-api", "prefect-warm"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        child(args.worker, Path(args.root), args.run_name)
        return

    root = Path(tempfile.mkdtemp(prefix="pocl-bench-orch-"))
    try:
        results = measure(root, args)
    finally:
        if args.keep:
            print(f"models, run folders and Prefect home kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.repeats > 1:
        for label, overs in (("cold (temporary server, fresh local Ray)", [r["flow_wall_s"] - r["own_compute_s"] for r in results]),
                             ("on running services", [r["served"]["wall_s"] - r["served"]["own_compute_s"] for r in results])):
            print(f"\noverhead over {args.repeats} repeats, {label}: median {statistics.median(overs):.1f} s, "
                  f"min {min(overs):.1f} s, max {max(overs):.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def measure(root: Path, args: argparse.Namespace) -> list[dict]:
    """Build the tiny models under ``root``, then run every repeat; one dict of timings per repeat."""
    from pocl_core.data import load_samples
    from pocl_core.tiny import build_tiny_models

    samples, _ = load_samples(DATA)
    texts = [f"### Instruction:\n{s.prompt}\n\n### Response:\n{s.response}" for s in samples]
    build_tiny_models(root / "models", texts, teacher_warmup_steps=20)
    print(f"tiny models in {root / 'models'}; {args.repeats} repeat(s); {os.cpu_count()} CPUs; "
          f"threads per process: {args.threads or 'torch default'}")
    t0 = time.perf_counter()
    _child("prefect-warm", root, child_env(root, args.threads))
    print(f"first use of a fresh PREFECT_HOME (the temporary server creates and migrates its database; once "
          f"per machine, not counted below): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    results = []
    with running_services(root, args.threads) as services_env:
        print(f"a Prefect server and a one-node Ray started for the 'running services' runs (not counted): "
              f"{time.perf_counter() - t0:.1f} s")
        for rep in range(args.repeats):
            results.append(one_repeat(root, rep, args.threads, services_env))
            print_repeat(results[-1])
    return results


if __name__ == "__main__":
    main()
