"""The flow against a real 2-node Ray cluster: Ray Train places one worker on each node.

Both nodes are started on this machine with ``ray start`` (1 CPU each, see ``local_ray_cluster``),
so the 2 Ray Train workers (1 CPU each) cannot share a node. The flow runs in a subprocess as the
cluster's driver (``pocl_distill(..., ray_address=...)``, with its own temporary Prefect server),
which keeps this process free of Ray whether or not another test initialised one here; that
subprocess also reads from the cluster where the train workers ran. Both nodes are stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devtools.local_ray_cluster import LocalRayCluster
from pocl_core.models import load_causal_lm

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# Runs in the driver subprocess: the flow, then the cluster's record of the train workers. The public
# state API (ray.util.state) needs the dashboard, i.e. ray[default], which is not installed; the GCS
# actor table behind it is read directly instead (it keeps finished actors with their node).
DRIVER = """
import json, sys
import ray
from ray._private import state as ray_state
from flows.pipeline import pocl_distill

args = json.loads(sys.argv[1])
summary = pocl_distill(config_path=args["config"], overrides=args["overrides"], run_name="two-nodes",
                       ray_address=args["address"])
actors = ray_state.actors().values()
print("RESULT " + json.dumps({
    "student": summary.student,
    "metrics": summary.metrics,
    "nodes": {n["NodeID"]: n["Resources"].get("CPU") for n in ray.nodes() if n["Alive"]},
    "train_workers": [a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == "RayTrainWorker"],
}))
"""


@pytest.fixture
def two_node_cluster():
    cluster = LocalRayCluster(num_cpus_per_node=1)
    try:
        yield cluster.start(num_nodes=2)
    finally:
        cluster.stop()
        assert cluster.leftovers() == [], "processes of the test's Ray cluster outlived stop()"


def test_flow_trains_with_one_worker_on_each_of_two_ray_nodes(two_node_cluster, make_config, tmp_path):
    base = make_config()
    overrides = [f"models.teacher={base.models.teacher}", f"models.student={base.models.student}",
                 f"data.train_path={base.data.train_path}", f"runs_root={tmp_path / 'runs'}",
                 "ray.num_workers=2", "curriculum.num_stages=2", "data.max_train_samples=64",
                 "data.max_eval_samples=8", "eval.max_new_tokens=4"]
    # no PREFECT_API_URL: the flow starts its own temporary Prefect server under this session's PREFECT_HOME
    env = {k: v for k, v in two_node_cluster.env().items() if k != "PREFECT_API_URL"}
    args = {"config": str(REPO / "configs" / "tiny.yaml"), "overrides": overrides, "address": two_node_cluster.address}
    run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"the flow failed on the cluster:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    # the job's set-up hook (tasks/ray_worker_setup.py) quiets Ray Train's placement-group cleaner, which
    # without the dashboard's State API would warn once a second for the whole fit
    assert "State API may be temporarily unavailable" not in run.stdout + run.stderr
    assert "pinned to CPU core" not in run.stdout + run.stderr  # ray.cpu_affinity=auto: not on a cluster
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])

    # two 1-CPU nodes, and the two train workers (1 CPU each) ran one on each of them
    assert sorted(result["nodes"].values()) == [1.0, 1.0]
    assert sorted(result["train_workers"]) == sorted(result["nodes"]), result

    # the trained student reads back and differs from the initial one
    student = load_causal_lm(result["student"])
    initial = load_causal_lm(str(base.models.student))
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), initial.state_dict().values()))
    assert Path(result["metrics"]).is_file()
