"""The top-k teacher cache: exact with k = V, the exact lumped teacher with k < V at stored temperatures, validation."""

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


def lumped(logits, ids, temperature):
    """Reference: softmax(logits / T) on the ids' columns plus the summed rest, [n, k + 1] probabilities."""
    p = torch.softmax(logits / temperature, -1)
    top = p.gather(-1, ids)
    rest = p.masked_fill(torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True), 0.0).sum(-1, keepdim=True)
    return torch.cat([top, rest], -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 4 / 3, 2.0])
def test_teacher_buckets_are_the_lumped_tempered_teacher(temperature):
    t = rand(3, 10, seed=3)
    sparse = SparseTeacher.from_logits(t, 4, temperatures=(0.7, 4 / 3, 2.0))
    buckets = teacher_bucket_log_probs(sparse.topk_logits, sparse.log_top_mass(temperature), temperature, True)
    torch.testing.assert_close(buckets.exp(), lumped(t, sparse.topk_ids, temperature), rtol=1e-12, atol=1e-14)


def test_without_tail_lse_only_t1_is_known():
    t = rand(3, 10, seed=3)
    sparse = SparseTeacher.from_logits(t, 4)
    at1 = teacher_bucket_log_probs(sparse.topk_logits, sparse.log_top_mass(1.0), 1.0, has_tail=True)
    torch.testing.assert_close(at1.exp(), lumped(t, sparse.topk_ids, 1.0), rtol=1e-12, atol=1e-14)
    assert sparse.covers(1.0) and not sparse.covers(2.0)
    with pytest.raises(ValueError, match=r"tail mass at temperature 2 is not stored \(tail_lse temperatures: none\)"):
        kd_divergence("fkl", rand(3, 10, seed=4), sparse, torch.ones(3), 2.0)
    partial = SparseTeacher.from_logits(t, 4, temperatures=(1.5, 2.0))
    assert partial.covers(2.0 * (1 + 1e-9)) and not partial.covers(1.75)
    with pytest.raises(ValueError, match=r"temperature 1.75 is not stored \(tail_lse temperatures: 1.5, 2\)"):
        kd_divergence("fkl", rand(3, 10, seed=4), partial, torch.ones(3), 1.75)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_sparse_equals_the_dense_loss_on_lumped_rows(name, temperature):
    """k < V: the divergence of the k + 1 bucket distributions, built independently from full rows."""
    s, t = rand(2, 5, 16, seed=8), rand(2, 5, 16, seed=9) * 1.5
    t[1, 2, 7] = float("-inf")  # a teacher column with no mass, in the tail
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    sparse = SparseTeacher.from_logits(t, 5, temperatures=(temperature,))
    x = s.clone().requires_grad_(True)
    got = kd_divergence(name, x, sparse, mask, temperature, temperature_scaling="none")
    ids = sparse.topk_ids
    ref_x = s.clone().requires_grad_(True)
    q = lumped(ref_x, ids, temperature).log()
    p = lumped(t, ids, temperature).log()
    want = kd_divergence(name, q, p, mask, 1.0, temperature_scaling="none")
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_lumping_never_increases_an_f_divergence(name):
    """Data processing: the k + 1 bucket divergence is at most the full-row one, at every T."""
    g = torch.Generator().manual_seed(11)
    t = torch.randn(64, 400, generator=g, dtype=torch.float64) * 3
    s = t + torch.randn(64, 400, generator=g, dtype=torch.float64)
    for temperature in (1.0, 1.5, 2.0):
        sparse = SparseTeacher.from_logits(t, 20, temperatures=(1.5, 2.0))
        mask = torch.ones(64)
        dense = kd_divergence(name, s, t, mask, temperature)
        bucketed = kd_divergence(name, s, sparse, mask, temperature)
        assert bucketed.item() <= dense.item() + 1e-12, (temperature, bucketed.item(), dense.item())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_negligible_teacher_tail_is_floored_not_infinite(name):
    t = torch.full((2, 8), -200.0)
    t[:, :3] = torch.tensor([3.0, 2.0, 1.0])  # the tail mass underflows: 1 - P1 rounds to 0
    s = rand(2, 8, seed=4, dtype=torch.float32).requires_grad_(True)
    sparse = SparseTeacher.from_logits(t.float(), 3, temperatures=(1.5,))
    value = kd_divergence(name, s, sparse, torch.ones(2), 1.5)
    value.backward()
    assert torch.isfinite(value) and not torch.isnan(s.grad).any()
    buckets = teacher_bucket_log_probs(sparse.topk_logits, sparse.log_top_mass(1.0), 1.0, has_tail=True)
    assert buckets[:, -1].exp().min().item() == pytest.approx(TAIL_FLOOR, rel=1e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_teacher_with_fewer_finite_logits_than_k_has_no_tail_and_matches_dense(name, temperature):
    """A −inf among the cached logits means nothing finite outside the top-k: the dense path drops
    those columns from both sides, so the tail bucket must go too (it was floored, RKL 16.5 vs 3.1)."""
    t = torch.full((3, 9), float("-inf"), dtype=torch.float64)
    t[0, [1, 4]] = torch.tensor([2.0, -1.0], dtype=torch.float64)
    t[1, 6] = 0.5
    t[2, [0, 2, 8]] = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)  # k of them, so its top-k holds no −inf: left out
    rows = torch.tensor([1, 1, 0])
    s = rand(3, 9, seed=12)
    sparse = SparseTeacher.from_logits(t, 3, temperatures=(temperature,))
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = kd_divergence(name, x, sparse, rows, temperature)
    want = kd_divergence(name, y, t, rows, temperature)
    got.backward()
    want.backward()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
    buckets = teacher_bucket_log_probs(sparse.topk_logits, sparse.log_top_mass(temperature), temperature, True)
    assert buckets[:2, -1].tolist() == [float("-inf")] * 2 and torch.isfinite(buckets[2, -1])


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
    twice = SparseTeacher(torch.tensor([[0, 1], [3, 3]]), torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"topk_ids repeat an id within a row \(first: token row 1\)"):
        kd_divergence("fkl", torch.zeros(2, 5), twice, torch.ones(2))
    with pytest.raises(ValueError, match=r"SparseTeacher token shape \(2,\) must equal the student's \(3,\)"):
        kd_divergence("fkl", torch.zeros(3, 5), SparseTeacher(ids, logits, lse), torch.ones(3))


def test_sparse_teacher_tail_validation():
    ids, logits, lse = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match=r"tail_lse must be a float tensor of shape \(2, 2\)"):
        SparseTeacher(ids, logits, lse, torch.zeros(2, 3), (1.5, 2.0))
    with pytest.raises(ValueError, match="temperatures given without tail_lse"):
        SparseTeacher(ids, logits, lse, None, (2.0,))
    with pytest.raises(ValueError, match="temperatures must all be finite and > 0"):
        SparseTeacher(ids, logits, lse, torch.zeros(2, 1), (0.0,))
    flat = SparseTeacher(ids.reshape(1, 2, 3), logits.reshape(1, 2, 3), lse.reshape(1, 2),
                         torch.zeros(1, 2, 2), (1.5, 2.0)).flatten()
    assert flat.tail_lse.shape == (2, 2) and flat.temperatures == (1.5, 2.0)
