"""Which Ray a run uses: the given address, else RAY_ADDRESS, else a fresh local Ray (never an
unrelated cluster that ``ray start`` left running, which Ray's own default would join)."""

from __future__ import annotations

import logging

import pytest

import tasks.distill as distill_mod


@pytest.fixture
def init_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(distill_mod.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(distill_mod.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_no_address_starts_a_fresh_local_ray(init_calls):
    distill_mod.ensure_ray(None)
    assert init_calls[-1]["address"] == "local"


def test_ray_address_from_the_environment_then_the_config(init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    distill_mod.ensure_ray(None)
    assert init_calls[-1]["address"] == "10.0.0.5:6379"
    distill_mod.ensure_ray("auto")  # the config's address wins; "auto" joins the `ray start` cluster
    assert init_calls[-1]["address"] == "auto"


def test_an_initialised_ray_is_reused(monkeypatch):
    monkeypatch.setattr(distill_mod.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(distill_mod.ray, "init", lambda **kw: pytest.fail("ray.init called again"))
    distill_mod.ensure_ray("10.0.0.5:6379")


def test_use_gpu_without_gpus_fails_on_a_local_ray_and_warns_on_a_cluster(monkeypatch, caplog):
    from pocl_core.config import ConfigError, load_config
    from tests.conftest import TINY_CONFIG

    monkeypatch.setattr(distill_mod.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(distill_mod.ray, "is_initialized", lambda: False)  # the config says which Ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(distill_mod, "task_logger", lambda: logging.getLogger("pocl"))
    two = load_config(TINY_CONFIG, ["ray.use_gpu=true", "ray.num_workers=2"])
    with pytest.raises(ConfigError, match="training needs 2 GPU.*, but the Ray cluster has 1: set ray.use_gpu=false"):
        distill_mod.check_gpus(two, 2, "training")
    distill_mod.check_gpus(two, 1, "scoring")  # enough
    distill_mod.check_gpus(load_config(TINY_CONFIG, ["ray.num_workers=2"]), 2, "training")  # CPU run: not asked
    with caplog.at_level(logging.WARNING, logger="pocl"):
        distill_mod.check_gpus(load_config(TINY_CONFIG, ["ray.use_gpu=true", "ray.num_workers=2",
                                                         "ray.address=10.0.0.5:6379"]), 2, "training")
    assert "waits until the cluster has them" in caplog.text


def test_scoring_on_ray_checks_for_gpus_before_any_task(monkeypatch):
    from pocl_core.config import ConfigError, load_config
    from tasks import score as score_mod
    from tests.conftest import TINY_CONFIG

    monkeypatch.setattr(distill_mod, "ensure_ray", lambda address: None)
    monkeypatch.setattr(distill_mod.ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    submitted = []
    monkeypatch.setattr(score_mod, "_remote_score_shard",
                        lambda: type("R", (), {"options": lambda **kw: submitted.append(kw)}))
    cfg = load_config(TINY_CONFIG, ["ray.use_gpu=true", "scoring.num_workers=2"])
    with pytest.raises(ConfigError, match=r"scoring \(one GPU per shard task\) needs 1 GPU\(s\), but the Ray cluster has 0"):
        score_mod._run_on_ray(cfg, [object()], {}, {}, "/nonexistent")
    assert submitted == []


def test_the_flow_refuses_use_gpu_on_a_local_ray_without_enough_gpus_before_any_work(monkeypatch, tmp_path,
                                                                                     listening_address):
    """Scoring in the flow's process would fall back to the CPU and training be refused only after it."""
    from flows.pipeline import resolve_config
    from pocl_core.config import ConfigError
    from tests.conftest import TINY_CONFIG

    monkeypatch.setattr(distill_mod.ray, "is_initialized", lambda: False)  # the config says which Ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gpus = {"count": 0}
    monkeypatch.setattr(distill_mod.torch.cuda, "device_count", lambda: gpus["count"])
    models = []
    for name in ("teacher", "student"):  # folders that exist: the inputs are checked after the GPUs
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
        models.append(f"models.{name}={tmp_path / 'models' / name}")
    runs = f"runs_root={tmp_path / 'runs'}"
    with pytest.raises(ConfigError, match=r"ray.num_workers=2 needs 2 GPU\(s\) on this machine's local Ray, but CUDA "
                                          r"sees 0: set ray.use_gpu=false"):
        resolve_config(str(TINY_CONFIG), ["ray.use_gpu=true", runs, *models], None)
    gpus["count"] = 1
    with pytest.raises(ConfigError, match=r"needs 2 GPU\(s\) .* CUDA sees 1"):
        resolve_config(str(TINY_CONFIG), ["ray.use_gpu=true", runs, *models], None)
    assert resolve_config(str(TINY_CONFIG), ["ray.use_gpu=true", "ray.num_workers=1", runs, *models], None).ray.use_gpu
    assert resolve_config(str(TINY_CONFIG), ["ray.use_gpu=true", "ray.num_workers=0", runs, *models], None).ray.use_gpu
    gpus["count"] = 0  # a cluster's GPUs are checked when its jobs start
    assert resolve_config(str(TINY_CONFIG), ["ray.use_gpu=true", runs, *models], None,
                          ray_address=listening_address).ray.use_gpu
    assert not (tmp_path / "runs").exists()  # nothing written
