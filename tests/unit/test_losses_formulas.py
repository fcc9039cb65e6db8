"""Every KD loss against an independent float64 numpy implementation of the formula table.

The reference below is written from docs/losses.md, in probability space, one token at a time, and
shares no code with pocl_core.losses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocl_core.losses import LOSS_NAMES, SparseTeacher, kd_divergence, kd_objective

# ---------------------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------------------


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def np_kl(a: np.ndarray, b: np.ndarray) -> float:
    keep = a > 0
    return float(np.sum(a[keep] * np.log(a[keep] / b[keep])))


def np_akl_weights(p: np.ndarray, q: np.ndarray, mu: float) -> tuple[float, float]:
    order = np.argsort(-p, kind="stable")
    head = np.cumsum(p[order]) <= mu
    head[0] = True
    gap = np.abs(p[order] - q[order])
    g_head, g_tail = gap[head].sum(), gap[~head].sum()
    if g_head + g_tail == 0:
        return 0.0, 0.0
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def np_divergence(name: str, p: np.ndarray, q: np.ndarray, **params: float) -> float:
    """One token's divergence between probability vectors p (teacher) and q (student)."""
    if name == "fkl":
        return np_kl(p, q)
    if name == "rkl":
        return np_kl(q, p)
    if name in ("jsd", "gjsd"):
        beta = params.get("beta", 0.9)
        if name == "gjsd" and beta == 0.0:
            return np_kl(q, p)
        if name == "gjsd" and beta == 1.0:
            return np_kl(p, q)
        m = (1 - beta) * p + beta * q
        return beta * np_kl(q, m) + (1 - beta) * np_kl(p, m)
    if name == "tvd":
        return 0.5 * float(np.abs(p - q).sum())
    if name == "skl":
        alpha = params.get("alpha", 0.1)
        return np_kl(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        alpha = params.get("alpha", 0.1)
        return np_kl(q, (1 - alpha) * p + alpha * q)
    if name == "akl":
        w_head, w_tail = np_akl_weights(p, q, params.get("mu", 0.5))
        return w_head * np_kl(p, q) + w_tail * np_kl(q, p)
    raise AssertionError(name)


def np_token_probs(s_row: np.ndarray, t_row: np.ndarray, temperature: float):
    """p, q on the common support (columns finite in both rows); None when the support is empty."""
    keep = np.isfinite(s_row) & np.isfinite(t_row)
    if not keep.any():
        return None
    return np_softmax(t_row[keep] / temperature), np_softmax(s_row[keep] / temperature)


def np_kd(name, s, t, mask, temperature, scaling="t_squared", **params) -> float:
    """Mean over counted tokens of factor(T) * D; s, t: [N, V] float64, mask: [N] bool."""
    values = []
    for r in np.flatnonzero(mask):
        probs = np_token_probs(s[r], t[r], temperature)
        values.append(0.0 if probs is None else np_divergence(name, *probs, **params))
    factor = temperature**2 if scaling == "t_squared" else 1.0
    return factor * float(np.mean(values)) if values else 0.0


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------

PARAMS = {
    "fkl": [{}],
    "rkl": [{}],
    "jsd": [{}, {"beta": 0.5}, {"beta": 0.2}],
    "tvd": [{}],
    "skl": [{}, {"alpha": 0.4}],
    "srkl": [{}, {"alpha": 0.4}],
    "akl": [{}, {"mu": 0.8}],
    "gjsd": [{}, {"beta": 0.0}, {"beta": 1.0}, {"beta": 0.3}],
}
CASES = [(name, params) for name in LOSS_NAMES for params in PARAMS[name]]


def make_inputs(seed: int = 0, batch: int = 3, seq: int = 4, vocab: int = 9):
    """[B, S, V] float64 logits with padded columns and masks exercising every -inf rule."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64) * 2
    t = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64) * 2
    s[..., -1] = t[..., -1] = float("-inf")  # a padded vocabulary column in both models
    t[0, 1, 2] = float("-inf")  # teacher-only -inf column: dropped from both distributions
    s[1, 0, 3] = float("-inf")  # student-only -inf column: likewise
    s[2, 2, :] = float("-inf")  # a counted row with no common support: contributes 0
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, 3] = mask[1, 2] = False
    s[1, 2, :] = float("nan")  # garbage in a masked-out row must not leak into the result
    return s, t, mask


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().reshape(-1, x.shape[-1]).numpy()


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [0, 3])
@pytest.mark.parametrize("name,params", CASES)
def test_dense_matches_numpy_reference(name, params, temperature, chunk_size):
    s, t, mask = make_inputs()
    expected = np_kd(name, _np(s), _np(t), mask.reshape(-1).numpy(), temperature, **params)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-6)):
        got = kd_divergence(name, s.to(dtype), t.to(dtype), mask, temperature, chunk_size=chunk_size, **params)
        assert got.dtype == dtype
        assert got.item() == pytest.approx(expected, rel=tol, abs=tol), dtype


@pytest.mark.parametrize("name,params", CASES)
def test_no_temperature_factor_matches_reference(name, params):
    s, t, mask = make_inputs(seed=1)
    expected = np_kd(name, _np(s), _np(t), mask.reshape(-1).numpy(), 2.0, "none", **params)
    got = kd_divergence(name, s, t, mask, 2.0, temperature_scaling="none", **params)
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def np_sparse_bucket_probs(s_row, t_row, k, temperature):
    """Reference k+1 bucket distributions for a top-k teacher: the tempered teacher, lumped."""
    ids = np.argsort(-t_row, kind="stable")[:k]
    p_full = np_softmax(t_row / temperature)
    p = np.append(p_full[ids], 1.0 - p_full[ids].sum())
    q_full = np_softmax(s_row / temperature)
    q = np.append(q_full[ids], 1.0 - q_full[ids].sum())
    return p, q


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [0, 2])
@pytest.mark.parametrize("name,params", CASES)
def test_sparse_topk_matches_bucketed_reference(name, params, temperature, chunk_size):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 12, generator=g, dtype=torch.float64) * 2
    t = torch.randn(5, 12, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([1, 1, 0, 1, 1])
    k = 4
    sparse = SparseTeacher.from_logits(t, k, temperatures=(temperature,))
    values = [
        np_divergence(name, *np_sparse_bucket_probs(_np(s)[r], _np(t)[r], k, temperature), **params)
        for r in np.flatnonzero(mask.numpy())
    ]
    expected = temperature**2 * float(np.mean(values))
    got = kd_divergence(name, s, sparse, mask, temperature, chunk_size=chunk_size, **params)
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kd_weight", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("chunk_size", [0, 2])
def test_kd_objective_is_weighted_ce_plus_divergence(kd_weight, chunk_size):
    s, t, mask = make_inputs(seed=2)
    s[2, 2, :] = 0.5  # CE needs a finite target logit on every counted row
    g = torch.Generator().manual_seed(9)
    targets = torch.randint(0, 8, mask.shape, generator=g)  # never the padded column 8
    targets[1, 0] = 4  # not the student-only -inf column 3
    temperature = 1.33
    ss, tt, mm = _np(s), _np(t), mask.reshape(-1).numpy()
    tg = targets.reshape(-1).numpy()

    def np_ce(row: np.ndarray, target: int) -> float:
        finite = row[np.isfinite(row)]
        return float(np.log(np.exp(finite - finite.max()).sum()) + finite.max() - row[target])

    ce = float(np.mean([np_ce(ss[r], tg[r]) for r in np.flatnonzero(mm)]))
    kd = np_kd("srkl", ss, tt, mm, temperature, alpha=0.2)
    total, got_kd, got_ce = kd_objective(
        s, t, targets, mask, kd_weight=kd_weight, temperature=temperature, loss_name="srkl",
        loss_params={"alpha": 0.2}, chunk_size=chunk_size,
    )
    assert got_ce.item() == pytest.approx(ce, rel=1e-10)
    assert got_kd.item() == pytest.approx(kd, rel=1e-10)
    assert total.item() == pytest.approx((1 - kd_weight) * ce + kd_weight * kd, rel=1e-10)
    assert not got_kd.requires_grad and not got_ce.requires_grad


def np_numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_akl_gradient_is_weighted_fkl_rkl_gradient_with_frozen_weights(chunk_size):
    s, t, mask = make_inputs(seed=4, vocab=6)
    temperature, mu = 1.5, 0.5
    ss, tt, mm = _np(s), _np(t), mask.reshape(-1).numpy()
    weights = {}
    for r in np.flatnonzero(mm):
        probs = np_token_probs(ss[r], tt[r], temperature)
        weights[r] = (0.0, 0.0) if probs is None else np_akl_weights(*probs, mu)

    def frozen(x: np.ndarray) -> float:
        total = []
        for r in np.flatnonzero(mm):
            probs = np_token_probs(x[r], tt[r], temperature)
            w_head, w_tail = weights[r]
            total.append(0.0 if probs is None else w_head * np_kl(*probs) + w_tail * np_kl(probs[1], probs[0]))
        return temperature**2 * float(np.mean(total))

    expected = np_numeric_grad(frozen, ss)
    student = s.clone().requires_grad_(True)
    kd_divergence("akl", student, t, mask, temperature, chunk_size=chunk_size, mu=mu).backward()
    got = student.grad.reshape(-1, s.shape[-1]).numpy()
    rows = np.flatnonzero(mm)
    np.testing.assert_allclose(got[rows], expected[rows], rtol=1e-6, atol=1e-8)
    assert not np.isnan(got).any()


def test_akl_with_mu_one_is_forward_kl_in_float32():
    """The teacher's cumulative mass ends a rounding error above 1 in float32; the head is a share of
    the row's total, so mu = 1 puts every column in the head (it put the last ranks in the tail)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(64, 2000, generator=g) * 3, torch.randn(64, 2000, generator=g) * 3
    mask = torch.ones(64)
    akl = kd_divergence("akl", s, t, mask, 1.0, mu=1.0)
    torch.testing.assert_close(akl, kd_divergence("fkl", s, t, mask, 1.0), rtol=1e-6, atol=0)
