"""The top-k teacher cache: exact with k = V, documented tail handling with k < V, validation."""

from __future__ import annotations

import math

import pytest
import torch

from pocl_core.losses import LOSS_NAMES, TAIL_FLOOR, SparseTeacher, kd_divergence, kd_objective
from pocl_core.losses.sparse import teacher_bucket_log_probs


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_full_vocab_topk_equals_dense(name, temperature):
    s, t = rand(2, 4, 9, seed=1), rand(2, 4, 9, seed=2)
    s[..., -1] = t[..., -1] = float("-inf")  # padded column, cached as a -inf top-k entry
    t[0, 0, 3] = float("-inf")
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]])
    dense_x, sparse_x = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    dense = kd_divergence(name, dense_x, t, mask, temperature)
    sparse = kd_divergence(name, sparse_x, SparseTeacher.from_logits(t, 9), mask, temperature)
    dense.backward()
    sparse.backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse_x.grad, dense_x.grad, rtol=1e-9, atol=1e-12)


def test_teacher_buckets_are_exact_at_t1_and_keep_t1_tail_mass_at_other_t():
    t = rand(3, 10, seed=3)
    sparse = SparseTeacher.from_logits(t, 4)
    exact = torch.log_softmax(t, -1).gather(-1, sparse.topk_ids)
    at1 = teacher_bucket_log_probs(sparse.topk_logits, sparse.lse, 1.0, has_tail=True)
    torch.testing.assert_close(at1[:, :4], exact, rtol=0, atol=1e-12)
    tail1 = 1 - exact.exp().sum(-1)
    torch.testing.assert_close(at1[:, 4].exp(), tail1)
    at2 = teacher_bucket_log_probs(sparse.topk_logits, sparse.lse, 2.0, has_tail=True)
    torch.testing.assert_close(at2[:, 4].exp(), tail1)  # tail mass stays at its T = 1 value
    torch.testing.assert_close(at2.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    shape = torch.softmax(sparse.topk_logits / 2.0, -1)
    torch.testing.assert_close(at2[:, :4].exp() / (1 - tail1).unsqueeze(-1), shape)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_negligible_teacher_tail_is_floored_not_infinite(name):
    t = torch.full((2, 8), -200.0)
    t[:, :3] = torch.tensor([3.0, 2.0, 1.0])  # the tail mass underflows: 1 - P1 rounds to 0
    s = rand(2, 8, seed=4, dtype=torch.float32).requires_grad_(True)
    sparse = SparseTeacher.from_logits(t.float(), 3)
    value = kd_divergence(name, s, sparse, torch.ones(2), 1.5)
    value.backward()
    assert torch.isfinite(value) and not torch.isnan(s.grad).any()
    buckets = teacher_bucket_log_probs(sparse.topk_logits, sparse.lse, 1.0, has_tail=True)
    assert buckets[:, -1].exp().min().item() == pytest.approx(TAIL_FLOOR, rel=1e-3)


def test_sparse_kd_objective_and_three_d_cache():
    s, t = rand(2, 3, 12, seed=5), rand(2, 3, 12, seed=6)
    targets = torch.randint(0, 12, (2, 3), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    full = SparseTeacher.from_logits(t, 12)
    assert full.token_shape == (2, 3) and full.k == 12
    dense = kd_objective(s, t, targets, mask, kd_weight=0.6, temperature=1.5, loss_name="akl")
    sparse = kd_objective(s, full, targets, mask, kd_weight=0.6, temperature=1.5, loss_name="akl")
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sparse_row_with_empty_cache_is_zero():
    sparse = SparseTeacher(
        topk_ids=torch.tensor([[0, 1], [2, 3]]),
        topk_logits=torch.tensor([[1.0, 0.5], [-math.inf, -math.inf]]),
        lse=torch.tensor([1.5, -math.inf]),
    )
    s = rand(2, 6, seed=7, dtype=torch.float32).requires_grad_(True)
    only_second = kd_divergence("rkl", s, sparse, torch.tensor([0, 1]))
    only_second.backward()
    assert only_second.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_sparse_teacher_validation():
    ids, logits, lse = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="integer tensor"):
        SparseTeacher(ids.float(), logits, lse)
    with pytest.raises(ValueError, match="same shape"):
        SparseTeacher(ids, torch.zeros(2, 4), lse)
    with pytest.raises(ValueError, match="lse must have shape"):
        SparseTeacher(ids, logits, torch.zeros(3))
    with pytest.raises(ValueError, match="k must be in"):
        SparseTeacher.from_logits(torch.zeros(2, 3), 4)
    bad = SparseTeacher(torch.tensor([[0, 7]]), torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 5\)"):
        kd_divergence("fkl", torch.zeros(1, 5), bad, torch.ones(1))
    with pytest.raises(ValueError, match=r"SparseTeacher token shape \(2,\) must equal the student's \(3,\)"):
        kd_divergence("fkl", torch.zeros(3, 5), SparseTeacher(ids, logits, lse), torch.ones(3))
