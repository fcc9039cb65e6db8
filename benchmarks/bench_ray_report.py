"""How long a Ray Train worker's ``ray.train.report()`` takes at several controller poll intervals.

The distill loop reports a checkpoint at every stage boundary (and every ``checkpoint_every_steps``);
each report after a job's first waits for the controller's next poll of the workers, so its cost is
about ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s; the distill task sets 0.1 s, see
docs/operations.md). One local Ray, one 1-worker TorchTrainer fit per interval, each reporting a
5 MB checkpoint folder ``--reports`` times and then metrics alone as often; the fit's wall time is
printed too.

Run: ``make bench-ray-report`` (or ``python -m benchmarks.bench_ray_report [--intervals 2,0.5,0.1]``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

INTERVAL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _reporting_loop(config: dict) -> None:
    """Report ``n`` 5 MB checkpoints, then ``n`` metrics-only results; rank 0 writes the timings."""
    import json
    import shutil

    import ray.train

    with_checkpoint, metrics_only = [], []
    for i in range(config["n"]):
        folder = tempfile.mkdtemp(prefix="bench-report-")
        Path(folder, "weights.bin").write_bytes(os.urandom(5_000_000))
        t0 = time.perf_counter()
        ray.train.report({"i": i}, checkpoint=ray.train.Checkpoint.from_directory(folder))
        with_checkpoint.append(time.perf_counter() - t0)
        shutil.rmtree(folder)
    for i in range(config["n"]):
        t0 = time.perf_counter()
        ray.train.report({"i": i})
        metrics_only.append(time.perf_counter() - t0)
    Path(config["out"]).write_text(json.dumps({"checkpoint": with_checkpoint, "metrics": metrics_only}))


def measure(interval: float, reports: int, root: Path) -> dict:
    """One fit at ``interval``; medians of the reports after the first of each kind, fit wall time."""
    import json

    os.environ[INTERVAL_VAR] = str(interval)
    out = root / f"times-{interval}.json"
    t0 = time.perf_counter()
    TorchTrainer(_reporting_loop, train_loop_config={"n": reports, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name=f"report-{interval}", storage_path=str(root / "storage"))).fit()
    wall = time.perf_counter() - t0
    times = json.loads(out.read_text())
    return {"interval_s": interval, "checkpoint_report_s": statistics.median(times["checkpoint"][1:]),
            "metrics_report_s": statistics.median(times["metrics"][1:]), "fit_wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", default="2,0.5,0.1", help="poll intervals in seconds, comma-separated")
    parser.add_argument("--reports", type=int, default=8, help="reports of each kind per fit (default 8)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pocl-bench-report-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure(float(i), args.reports, root) for i in args.intervals.split(",")]
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'poll interval s':>16} {'report + 5 MB checkpoint s':>27} {'report, metrics only s':>23} {'fit wall s':>11}")
    for r in rows:
        print(f"{r['interval_s']:>16.2f} {r['checkpoint_report_s']:>27.3f} {r['metrics_report_s']:>23.3f} "
              f"{r['fit_wall_s']:>11.1f}")


if __name__ == "__main__":
    main()
