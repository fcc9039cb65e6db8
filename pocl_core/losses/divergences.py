"""Per-token KD divergences between teacher ``p`` and student ``q`` (see docs/losses.md).

Each function takes the :class:`~pocl_core.losses.support.SupportLogProbs` of ``n`` token rows
(``p = softmax(teacher / T)``, ``q = softmax(student / T)`` on the common support) and returns the
``[n]`` per-token divergence in nats, *without* any temperature factor (that is applied once, in
:mod:`pocl_core.losses.api`). All of them are 0 when ``p == q`` and >= 0 otherwise.

Mixtures ``a·p + b·q`` are formed in log space with ``logaddexp`` so that two tiny probabilities never
underflow to ``log 0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pocl_core.losses.support import SupportLogProbs


def _log_mixture(log_a: Tensor, weight_a: float, log_b: Tensor, weight_b: float) -> Tensor:
    """``log(weight_a·a + weight_b·b)`` for weights in (0, 1), elementwise, ``[n, V]``."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(weight_b))


def forward_kl(d: SupportLogProbs) -> Tensor:
    """FKL = KL(p ‖ q) = Σ p (log p − log q). ``[n]``.

    The teacher-entropy term Σ p log p is kept (the authors drop it: same gradient, but then the value
    is not 0 on identical inputs).
    """
    return (d.p * (d.log_p - d.log_q)).sum(-1)


def reverse_kl(d: SupportLogProbs) -> Tensor:
    """RKL = KL(q ‖ p) = Σ q (log q − log p). ``[n]``."""
    return (d.q * (d.log_q - d.log_p)).sum(-1)


def js_divergence(d: SupportLogProbs, beta: float) -> Tensor:
    """JSD(β): m = (1−β)·p + β·q;  β·KL(q ‖ m) + (1−β)·KL(p ‖ m). ``[n]``, 0 < β < 1.

    β = 0.5 is the symmetric Jensen–Shannon divergence (bounded by log 2).
    """
    log_m = _log_mixture(d.log_p, 1.0 - beta, d.log_q, beta)
    kl_q_m = (d.q * (d.log_q - log_m)).sum(-1)
    kl_p_m = (d.p * (d.log_p - log_m)).sum(-1)
    return beta * kl_q_m + (1.0 - beta) * kl_p_m


def generalized_jsd(d: SupportLogProbs, beta: float) -> Tensor:
    """GKD's JSD(β) on the closed interval 0 <= β <= 1. ``[n]``.

    Inside (0, 1) it equals :func:`js_divergence`. At the ends JSD(β) itself vanishes identically
    (m collapses onto p or q), so, as in GKD, the ends are defined by the normalised limits:
    JSD(β)/β → KL(q ‖ p) = RKL as β → 0 and JSD(β)/(1−β) → KL(p ‖ q) = FKL as β → 1.
    """
    if beta == 0.0:
        return reverse_kl(d)
    if beta == 1.0:
        return forward_kl(d)
    return js_divergence(d, beta)


def total_variation(d: SupportLogProbs) -> Tensor:
    """TVD = ½ Σ |p − q|. ``[n]``, bounded by 1."""
    return 0.5 * (d.p - d.q).abs().sum(-1)


def skew_forward_kl(d: SupportLogProbs, alpha: float) -> Tensor:
    """SKL(α) = KL(p ‖ α·p + (1−α)·q). ``[n]``, 0 < α < 1."""
    log_m = _log_mixture(d.log_p, alpha, d.log_q, 1.0 - alpha)
    return (d.p * (d.log_p - log_m)).sum(-1)


def skew_reverse_kl(d: SupportLogProbs, alpha: float) -> Tensor:
    """SRKL(α) = KL(q ‖ (1−α)·p + α·q). ``[n]``, 0 < α < 1."""
    log_m = _log_mixture(d.log_p, 1.0 - alpha, d.log_q, alpha)
    return (d.q * (d.log_q - log_m)).sum(-1)


def adaptive_kl_weights(p: Tensor, q: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """AKL's per-token head/tail weights (Wu et al. 2024), detached. Returns two ``[n]`` tensors.

    Sort the teacher's probabilities in descending order (stable sort, so ties keep column order)
    and let ``c_i`` be the cumulative teacher mass up to and including rank ``i``, as a share of the
    row's total (rounding leaves that total a little off 1; so ``mu = 1`` is all head). The *head* is
    ``{i : c_i <= mu}`` plus the top-ranked token (so a teacher that puts more than ``mu`` on one token
    still has a one-token head); the *tail* is every other column. With
    ``g_head = Σ_head |p − q|`` and ``g_tail = Σ_tail |p − q|`` the weights are
    ``w_head = g_head / (g_head + g_tail)`` (multiplies FKL) and ``w_tail = g_tail / (g_head + g_tail)``
    (multiplies RKL). When p == q exactly both gaps are 0 and both weights are 0 (AKL is then 0, as
    are FKL and RKL and their gradients).
    """
    with torch.no_grad():
        p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
        gap = (p_sorted - q.gather(-1, order)).abs()
        mass = p_sorted.cumsum(dim=-1)
        # normalised by the row's total, which rounding leaves slightly off 1 (mu = 1 is then all head)
        in_head = mass <= mu * mass[..., -1:]
        in_head[..., 0] = True
        g_head = (gap * in_head).sum(-1)
        g_tail = (gap * ~in_head).sum(-1)
        total = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
        return g_head / total, g_tail / total


def adaptive_kl(d: SupportLogProbs, mu: float) -> Tensor:
    """AKL = w_head·FKL + w_tail·RKL per token, weights from :func:`adaptive_kl_weights`. ``[n]``.

    The weights are detached (treated as constants), so the gradient is
    ``w_head·∇FKL + w_tail·∇RKL``, not the derivative of the value through the weights.
    """
    w_head, w_tail = adaptive_kl_weights(d.p, d.q, mu)
    return w_head * forward_kl(d) + w_tail * reverse_kl(d)
