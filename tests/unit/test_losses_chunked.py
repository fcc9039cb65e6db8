"""The chunked path equals the unchunked one (values and gradients) and is selected as documented."""

from __future__ import annotations

import pytest
import torch

import pocl_core.losses.api as api
from pocl_core.losses import LOSS_NAMES, SparseTeacher, kd_divergence, kd_objective


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)


def value_and_grad(name, s, teacher, mask, chunk_size, scale=1.0, **kwargs):
    x = s.clone().requires_grad_(True)
    value = kd_divergence(name, x, teacher, mask, 1.7, chunk_size=chunk_size, **kwargs)
    (value * scale).backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
def test_chunked_equals_unchunked(name, chunk_size):
    s, t = rand(3, 5, 33, seed=1), rand(3, 5, 33, seed=2)
    t[..., 30:] = s[..., 30:] = float("-inf")
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 1]])  # 9 rows: 3 doesn't divide
    ref_value, ref_grad = value_and_grad(name, s, t, mask, 0)
    value, grad = value_and_grad(name, s, t, mask, chunk_size)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    assert torch.all(grad.reshape(-1, 33)[~mask.reshape(-1).bool()] == 0)


@pytest.mark.parametrize("name", ["fkl", "akl", "tvd"])
def test_chunked_sparse_equals_unchunked_sparse(name):
    s, t, mask = rand(4, 6, 20, seed=3), rand(4, 6, 20, seed=4), torch.ones(4, 6)
    sparse = SparseTeacher.from_logits(t, 5, temperatures=(1.7,))
    ref_value, ref_grad = value_and_grad(name, s, sparse, mask, 0)
    value, grad = value_and_grad(name, s, sparse, mask, 5)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_backward_scaled_by_incoming_gradient_and_retained_graph():
    s, t, mask = rand(6, 11, seed=5), rand(6, 11, seed=6), torch.ones(6)
    _, ref = value_and_grad("rkl", s, t, mask, 0, scale=0.25)
    _, got = value_and_grad("rkl", s, t, mask, 2, scale=0.25)
    torch.testing.assert_close(got, ref)
    # Running backward twice on a retained graph accumulates two identical gradients.
    x = s.clone().requires_grad_(True)
    value = kd_divergence("rkl", x, t, mask, 1.7, chunk_size=2)
    value.backward(retain_graph=True)
    first = x.grad.clone()
    value.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_bf16_student_chunked_matches_unchunked():
    s = rand(8, 40, seed=7, dtype=torch.bfloat16)
    t = rand(8, 40, seed=8, dtype=torch.bfloat16)
    ref_value, ref_grad = value_and_grad("skl", s, t, torch.ones(8), 0)
    value, grad = value_and_grad("skl", s, t, torch.ones(8), 3)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("kd_weight", [0.0, 0.8])
def test_kd_objective_chunked_equals_unchunked(kd_weight):
    s, t = rand(2, 7, 25, seed=9), rand(2, 7, 25, seed=10)
    targets = torch.randint(0, 25, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    results = []
    for chunk_size in (0, 4):
        x = s.clone().requires_grad_(True)
        total, kd, ce = kd_objective(x, t, targets, mask, kd_weight=kd_weight, temperature=1.33,
                                     loss_name="gjsd", chunk_size=chunk_size)
        total.backward()
        results.append((total.detach(), kd, ce, x.grad))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "gjsd"])
def test_gradcheck_chunked_sparse(name):
    s = rand(5, 7, seed=11, dtype=torch.float64).requires_grad_(True)
    sparse = SparseTeacher.from_logits(rand(5, 7, seed=12, dtype=torch.float64), 3, temperatures=(1.8,))

    def f(x):
        return kd_divergence(name, x, sparse, torch.tensor([1, 1, 0, 1, 1]), 1.8, chunk_size=2)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, fast_mode=True)


def test_automatic_selection_uses_threshold(monkeypatch):
    s = rand(4, 16, seed=13).requires_grad_(True)
    t, mask = rand(4, 16, seed=14), torch.ones(4)
    assert "Chunked" not in type(kd_divergence("fkl", s, t, mask).grad_fn).__name__
    monkeypatch.setattr(api, "AUTO_CHUNK_MIN_ELEMENTS", 4 * 16 - 1)
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 32)  # -> 2 rows per chunk
    auto = kd_divergence("fkl", s, t, mask)
    assert "Chunked" in type(auto.grad_fn).__name__
    # Counted tokens (not all positions) decide: half the rows masked stays unchunked.
    half = kd_divergence("fkl", s, t, torch.tensor([1, 1, 0, 0]))
    assert "Chunked" not in type(half.grad_fn).__name__
    # chunk_size=0 forces the unchunked path whatever the size.
    forced = kd_divergence("fkl", s, t, mask, chunk_size=0)
    assert "Chunked" not in type(forced.grad_fn).__name__
    torch.testing.assert_close(auto, forced)


def test_no_grad_evaluation_skips_gradient():
    s = rand(4, 9, seed=15).requires_grad_(True)
    with torch.no_grad():
        value = kd_divergence("tvd", s, rand(4, 9, seed=16), torch.ones(4), chunk_size=2)
    assert not value.requires_grad


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_autocast_does_not_change_the_result(chunk_size):
    s, t = rand(6, 30, seed=17), rand(6, 30, seed=18)
    ref_value, ref_grad = value_and_grad("jsd", s, t, torch.ones(6), chunk_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grad = value_and_grad("jsd", s, t, torch.ones(6), chunk_size)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)


def test_gradient_buffer_is_released_after_backward():
    s = rand(6, 20, seed=19).requires_grad_(True)
    value = kd_divergence("fkl", s, rand(6, 20, seed=20), torch.ones(6), chunk_size=2)
    assert value.grad_fn.saved_tensors[0].shape == (6, 20)
    value.backward()
    with pytest.raises(RuntimeError):  # freed: the [N, V] buffer does not outlive backward
        value.grad_fn.saved_tensors
