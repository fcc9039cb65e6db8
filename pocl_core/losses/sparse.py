"""A cached top-k teacher, and the k+1 bucket distributions the divergences compare against it.

A :class:`SparseTeacher` stores, per token, the teacher's ``k`` largest raw logits (T = 1), their
vocabulary ids, and ``lse``, the logsumexp of the teacher's *full* row at T = 1. From these the
teacher's distribution is known exactly on the top-k columns and as one lumped *tail bucket*
(everything else). The student's full row is collapsed onto the same k columns plus its own tail
bucket, and every divergence is evaluated on the two ``k + 1``-bucket distributions.

Teacher buckets at temperature T (``P1 = Σ_topk exp(l_i − lse)`` is the top-k mass at T = 1):

* top-k bucket i: ``(1 − tail) · softmax_i(l_topk / T)``;  tail bucket: ``tail = 1 − P1``.

At T = 1 this is exactly ``exp(l_i − lse)`` and ``1 − P1``. At T ≠ 1 the true tail mass,
``Σ_tail exp(l_j/T) / Σ_all exp(l_j/T)``, needs the tail logits, which were not stored, so it is
*approximated by the T = 1 tail mass*; the top-k shape is still exactly re-tempered. (For T > 1 the
true tail mass is larger, so this under-weights the tail; the error vanishes as k grows.)

The tail mass is floored at ``TAIL_FLOOR`` (2^-24, the float32 resolution of a probability near 1):
below it ``1 − P1`` is rounding noise of the stored ``lse``, and a zero teacher tail would make the
reverse-type divergences infinite wherever the student has tail mass.

When the top-k covers the whole vocabulary (``k == V``) there is no tail bucket on either side, and
the result equals the dense divergence at every temperature.

Student buckets at T: ``q_i = softmax(s / T)_i`` for the k ids and ``q_tail = Σ_{j ∉ topk} softmax(s/T)_j``,
computed as a logsumexp over the non-top-k columns (exact, differentiable, no ``1 − Σ`` cancellation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pocl_core.losses.support import NEG_INF, compute_dtype, excluded_logsumexp, safe_logsumexp

TAIL_FLOOR = 2.0**-24


@dataclass(frozen=True)
class SparseTeacher:
    """Top-k teacher logits for ``[...]`` token positions (e.g. ``[B, S]`` or ``[N]``).

    Attributes:
        topk_ids: ``[..., k]`` integer vocabulary ids of the teacher's top-k logits (distinct per row).
        topk_logits: ``[..., k]`` float raw teacher logits at those ids (T = 1 units).
        lse: ``[...]`` float logsumexp of the teacher's full logit row at T = 1.
    """

    topk_ids: Tensor
    topk_logits: Tensor
    lse: Tensor

    def __post_init__(self) -> None:
        if self.topk_ids.dtype.is_floating_point or self.topk_ids.dtype == torch.bool:
            raise ValueError(f"SparseTeacher.topk_ids must be an integer tensor, got {self.topk_ids.dtype}")
        if not self.topk_logits.dtype.is_floating_point or not self.lse.dtype.is_floating_point:
            raise ValueError("SparseTeacher.topk_logits and SparseTeacher.lse must be float tensors")
        if self.topk_ids.shape != self.topk_logits.shape or self.topk_ids.dim() < 1:
            raise ValueError(
                "SparseTeacher.topk_ids and topk_logits must have the same shape [..., k]; got "
                f"{tuple(self.topk_ids.shape)} and {tuple(self.topk_logits.shape)}"
            )
        if self.lse.shape != self.topk_ids.shape[:-1]:
            raise ValueError(
                f"SparseTeacher.lse must have shape {tuple(self.topk_ids.shape[:-1])} (the leading "
                f"dims of topk_ids), got {tuple(self.lse.shape)}"
            )

    @property
    def k(self) -> int:
        """Number of stored columns per token."""
        return int(self.topk_ids.shape[-1])

    @property
    def token_shape(self) -> torch.Size:
        """The leading (token) dimensions, e.g. ``[B, S]``."""
        return self.lse.shape

    @classmethod
    def from_logits(cls, teacher_logits: Tensor, k: int) -> "SparseTeacher":
        """Build the cache entry from full teacher logits ``[..., V]`` (raw, T = 1).

        ``lse`` is computed in float32 (float64 for float64 logits); ids are int64.
        """
        vocab = teacher_logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"SparseTeacher.from_logits: k must be in [1, {vocab}], got {k}")
        logits = teacher_logits.detach()
        values, ids = torch.topk(logits, k, dim=-1)
        lse = safe_logsumexp(logits.to(compute_dtype(logits.dtype)), dim=-1)
        return cls(topk_ids=ids, topk_logits=values, lse=lse)

    def flatten(self) -> "SparseTeacher":
        """The same cache with token dims flattened: ``[N, k]``, ``[N, k]``, ``[N]``."""
        return SparseTeacher(
            self.topk_ids.reshape(-1, self.k), self.topk_logits.reshape(-1, self.k), self.lse.reshape(-1)
        )


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x <= 0``, accurate at both ends (Mächler's two-branch rule)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_bucket_log_probs(
    topk_logits: Tensor, lse: Tensor, temperature: float, has_tail: bool
) -> Tensor:
    """Teacher bucket log-probabilities ``[n, k + 1]`` at temperature T (last column = tail).

    Args:
        topk_logits: ``[n, k]`` raw teacher logits. lse: ``[n]`` full-row logsumexp at T = 1.
        has_tail: False when the top-k covers the vocabulary; the tail bucket is then ``-inf``.
    """
    dtype = compute_dtype(topk_logits.dtype)
    tl = topk_logits.detach().to(dtype)
    lse = lse.detach().to(dtype).unsqueeze(-1)
    empty = (tl == NEG_INF).all(-1, keepdim=True) | (lse == NEG_INF)
    tl = torch.where(empty, torch.zeros((), dtype=dtype, device=tl.device), tl)
    lse = torch.where(empty, torch.zeros((), dtype=dtype, device=tl.device), lse)
    shape = torch.log_softmax(tl / temperature, dim=-1)
    neg_inf = torch.full_like(lse, NEG_INF)
    if has_tail:
        # log of the top-k mass at T = 1, capped so that the tail keeps at least TAIL_FLOOR.
        log_top = (torch.logsumexp(tl, dim=-1, keepdim=True) - lse).clamp(max=math.log1p(-TAIL_FLOOR))
        top, tail = shape + log_top, _log1mexp(log_top)
    else:
        top, tail = shape, neg_inf
    out = torch.cat([top, tail], dim=-1)
    return torch.where(empty, torch.full((), NEG_INF, dtype=dtype, device=tl.device), out)


def student_bucket_logits(
    student_logits: Tensor, topk_ids: Tensor, temperature: float, has_tail: bool
) -> Tensor:
    """Student bucket logits ``[n, k + 1]`` at temperature T (softmax gives the bucket masses).

    Args:
        student_logits: ``[n, V]`` raw student logits in the compute dtype (keeps the autograd graph).
        topk_ids: ``[n, k]`` int64 teacher top-k ids.
    """
    top = student_logits.gather(-1, topk_ids)
    if temperature != 1.0:
        top = top / temperature
    if has_tail:
        tail = excluded_logsumexp(student_logits, topk_ids, temperature)
    else:
        tail = torch.full_like(top[:, 0], NEG_INF)
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)
