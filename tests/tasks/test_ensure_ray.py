"""Which Ray a run uses: the given address, else RAY_ADDRESS, else a fresh local Ray (never an
unrelated cluster that ``ray start`` left running, which Ray's own default would join)."""

from __future__ import annotations

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
