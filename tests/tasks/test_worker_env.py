"""What a run's Ray workers start with: ray.worker_niceness (Ray Train's workers are actors), the job's
set-up hook, CPU pinning as resolved on the driver, the Ray Train settings of a local Ray, and the
training process group's collective time-out."""

from __future__ import annotations

import os

import pytest

from pocl_core.config import RayConfig
from tasks.distill import WORKER_SETUP_HOOK, environment_defaults, torch_config, worker_runtime_env


def _niceness() -> int:
    return os.nice(0)


@pytest.mark.slow
@pytest.mark.parametrize("niceness", [0, None])
def test_workers_start_with_the_configured_niceness(local_ray, niceness):
    env = worker_runtime_env(RayConfig(worker_niceness=niceness))
    actor = local_ray.remote(type("Probe", (), {"nice": staticmethod(_niceness)}))
    expected = 15 if niceness is None else niceness  # None leaves Ray's own default
    probe = actor.options(num_cpus=0, runtime_env=env).remote()
    assert local_ray.get(probe.nice.remote()) == expected
    local_ray.kill(probe)


def _report_collective_timeout(config: dict) -> None:
    import torch
    import torch.distributed as dist

    group = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    with open(config["out"], "w") as f:
        f.write(str(group.options._timeout.total_seconds()))


@pytest.mark.slow
def test_the_training_process_group_gets_the_configured_collective_timeout(local_ray, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "timeout"
    TorchTrainer(_report_collective_timeout, train_loop_config={"out": str(out)},
                 torch_config=torch_config(RayConfig(collective_timeout_s=4321)),
                 scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="probe")).fit()
    assert float(out.read_text()) == 4321.0


def test_the_collective_timeout_defaults_to_ray_trains_and_must_be_positive():
    assert RayConfig().collective_timeout_s == 1800 == torch_config(RayConfig()).timeout_s  # Ray Train's own
    with pytest.raises(ValueError, match="collective_timeout_s"):
        RayConfig(collective_timeout_s=0)


def test_niceness_outside_the_unix_range_is_refused():
    with pytest.raises(ValueError, match="worker_niceness"):
        RayConfig(worker_niceness=20)
    with pytest.raises(ValueError, match="worker_niceness"):
        RayConfig(worker_niceness=-1)


@pytest.mark.parametrize("settings,env,expected", [
    ({}, None, True),                                         # auto, a local Ray of this run's
    ({}, "10.0.0.5:6379", False),                             # auto, RAY_ADDRESS: a cluster
    ({"address": "auto"}, None, False),                       # auto, ray.address: a cluster
    ({"address": "local"}, None, True),                       # auto, ray.address=local: a fresh local Ray
    ({"cpu_affinity": "spread", "address": "auto"}, None, True),
    ({"cpu_affinity": "none"}, None, False),
    ({"use_gpu": True}, None, False),                         # GPU workers are placed by their GPU
    ({"num_workers": 0, "cpu_affinity": "spread"}, None, False),  # local mode: the driver itself
])
def test_cpu_affinity_is_resolved_on_the_driver(monkeypatch, settings, env, expected):
    from pocl_core.config import load_config
    from tasks.distill import pin_cpus
    from tests.conftest import TINY_CONFIG

    import tasks.distill as distill_mod

    monkeypatch.setattr(distill_mod.ray, "is_initialized", lambda: False)  # the config decides (next test)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = load_config(TINY_CONFIG, [f"ray.{k}={str(v).lower() if isinstance(v, bool) else v}"
                                    for k, v in {"num_workers": 2, **settings}.items()])
    assert pin_cpus(cfg) is expected


@pytest.mark.parametrize("head,address,expected", [
    (True, "10.0.0.5:6379", True),   # this process started its Ray (e.g. a notebook's ray.init()): local
    (False, None, False),            # connected to a cluster earlier: not local, whatever the config says
    ("unknown", None, True),         # Ray does not say: the config decides
    ("unknown", "auto", False),
])
def test_once_ray_is_up_the_ray_in_use_decides_whether_it_is_local(monkeypatch, head, address, expected):
    import types

    import tasks.distill as distill_mod

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(distill_mod.ray, "is_initialized", lambda: True)
    node = types.SimpleNamespace() if head == "unknown" else types.SimpleNamespace(head=head)
    monkeypatch.setattr(distill_mod.ray._private.worker, "_global_node", node)
    assert distill_mod.ray_is_local(address) is expected


def test_cpu_affinity_accepts_only_its_three_settings():
    with pytest.raises(ValueError, match="cpu_affinity"):
        RayConfig(cpu_affinity="pin")


def test_ensure_ray_gives_the_job_the_setup_hook(monkeypatch):
    import tasks.distill as distill_mod

    calls = []
    monkeypatch.setattr(distill_mod.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(distill_mod.ray, "init", lambda **kw: calls.append(kw))
    distill_mod.ensure_ray(None)
    # a job-level setting only (Ray ignores it in an actor's runtime_env); its effect on a real job is
    # checked in tests/ops/test_ray_cluster.py
    assert calls[0]["runtime_env"]["worker_process_setup_hook"] == WORKER_SETUP_HOOK
    assert calls[0]["runtime_env"]["env_vars"] == distill_mod.WORKER_ENV


def test_the_workers_environment_turns_off_transformers_progress_bars():
    import subprocess
    import sys

    import tasks.distill as distill_mod

    probe = "from transformers.utils import logging; print(logging.is_progress_bar_enabled())"
    env = {k: v for k, v in os.environ.items() if k not in distill_mod.WORKER_ENV}
    shown = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    hidden = subprocess.run([sys.executable, "-c", probe], env={**env, **distill_mod.WORKER_ENV}, capture_output=True,
                            text=True, check=True)
    assert (shown.stdout.strip(), hidden.stdout.strip()) == ("True", "False")


def test_environment_defaults_fill_only_unset_variables_and_only_for_the_block(monkeypatch):
    monkeypatch.delenv("POCL_TEST_UNSET", raising=False)
    monkeypatch.setenv("POCL_TEST_SET", "mine")
    with environment_defaults({"POCL_TEST_UNSET": "0", "POCL_TEST_SET": "0"}):
        assert os.environ["POCL_TEST_UNSET"] == "0" and os.environ["POCL_TEST_SET"] == "mine"
    assert "POCL_TEST_UNSET" not in os.environ and os.environ["POCL_TEST_SET"] == "mine"
    with pytest.raises(RuntimeError), environment_defaults({"POCL_TEST_UNSET": "0"}):
        raise RuntimeError("the block failed")
    assert "POCL_TEST_UNSET" not in os.environ


def test_ray_trains_run_config_carries_the_runs_settings(make_config):
    from pocl_core.contracts import RunPaths
    from tasks.distill import train_run_config

    cfg = make_config("train.keep_checkpoints=2", "ray.max_failures=3", "ray.worker_niceness=5").with_absolute_paths()
    run_config = train_run_config(cfg, RunPaths.of(cfg.run_dir))
    assert run_config.logging_config.log_level == "WARNING"  # Ray Train's per-report INFO lines stay in its files
    assert run_config.checkpoint_config.num_to_keep == 2 and run_config.failure_config.max_failures == 3
    assert run_config.worker_runtime_env == {"env_vars": {"RAY_worker_niceness": "5"}}
    assert run_config.storage_path == str(RunPaths.of(cfg.run_dir).train_storage)
    verbose = make_config("ray.train_log_level=INFO").with_absolute_paths()
    assert train_run_config(verbose, RunPaths.of(verbose.run_dir)).logging_config.log_level == "INFO"


def test_ray_trains_report_lines_follow_the_train_log_level():
    """Its per-report line comes from a logger named after the source file (outside ``ray.train``)."""
    import logging

    from ray.train.v2._internal.execution import context

    from tasks.distill_loop import quiet_report_lines

    report_logger = logging.getLogger(context.__file__)
    assert report_logger is context.logger  # the logger Ray Train's report line goes through
    before = report_logger.level
    try:
        quiet_report_lines("WARNING")
        assert not report_logger.isEnabledFor(logging.INFO) and report_logger.isEnabledFor(logging.WARNING)
        quiet_report_lines("INFO")
        assert report_logger.isEnabledFor(logging.INFO)
    finally:
        report_logger.setLevel(before)
