"""A cached top-k teacher, and the k+1 bucket distributions the divergences compare against it.

A :class:`SparseTeacher` stores, per token, the teacher's ``k`` largest raw logits (T = 1), their
vocabulary ids, ``lse``, the logsumexp of the teacher's *full* row at T = 1, and optionally
``tail_lse``, the logsumexp of ``l_j / T`` over the columns *not* in the top-k at each temperature
of ``temperatures``. From these the teacher's tempered distribution is known exactly on the top-k
columns and as one lumped *tail bucket* (everything else). The student's full row is collapsed onto the
same k columns plus its own tail bucket, and every divergence is evaluated on the two ``k + 1``-bucket
distributions.

Teacher buckets at temperature T, with ``top_T = logsumexp(l_topk / T)`` and the top-k mass
``P_T = 1 / (1 + exp(tail_lse_T − top_T))``:

* top-k bucket i: ``P_T · softmax_i(l_topk / T)``;  tail bucket: ``1 − P_T``.

This is the exact tempered teacher lumped onto k + 1 buckets at every stored temperature. At T = 1 a
teacher without ``tail_lse`` uses ``P_1 = Σ_topk exp(l_i − lse)``, also exact; any other temperature
needs its ``tail_lse`` column (the tail's share grows with T and cannot be recovered from T = 1
numbers), and asking for one that is not stored is a ValueError.

The tail mass is floored at ``TAIL_FLOOR`` (2^-24, the float32 resolution of a probability near 1):
below it the tail is float32 rounding noise next to the top-k, and a zero teacher tail would make the
reverse-type divergences infinite wherever the student has tail mass.

When the top-k covers the whole vocabulary (``k == V``) there is no tail bucket on either side, and
the result equals the dense divergence at every temperature.

Student buckets at T: ``q_i = softmax(s / T)_i`` for the k ids and ``q_tail = Σ_{j ∉ topk} softmax(s/T)_j``,
computed as a logsumexp over the non-top-k columns (exact, differentiable, no ``1 − Σ`` cancellation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pocl_core.losses.support import NEG_INF, compute_dtype, excluded_logsumexp, safe_logsumexp

TAIL_FLOOR = 2.0**-24
TEMPERATURE_RTOL = 1e-6  # a requested temperature matches a stored one within this relative tolerance


@dataclass(frozen=True)
class SparseTeacher:
    """Top-k teacher logits for ``[...]`` token positions (e.g. ``[B, S]`` or ``[N]``).

    Attributes:
        topk_ids: ``[..., k]`` integer vocabulary ids of the teacher's top-k logits (distinct per row).
        topk_logits: ``[..., k]`` float raw teacher logits at those ids (T = 1 units).
        lse: ``[...]`` float logsumexp of the teacher's full logit row at T = 1.
        tail_lse: ``[..., len(temperatures)]`` float logsumexp of ``l_j / T`` over the non-top-k
            columns, one column per entry of ``temperatures`` (``-inf`` where nothing is left), or None.
        temperatures: the temperatures of ``tail_lse``'s columns (T > 0), empty without it.
    """

    topk_ids: Tensor
    topk_logits: Tensor
    lse: Tensor
    tail_lse: Tensor | None = None
    temperatures: tuple[float, ...] = ()

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
        temps = tuple(float(t) for t in self.temperatures)
        if any(not math.isfinite(t) or t <= 0 for t in temps):
            raise ValueError(f"SparseTeacher.temperatures must all be finite and > 0, got {temps}")
        object.__setattr__(self, "temperatures", temps)
        if self.tail_lse is None:
            if temps:
                raise ValueError("SparseTeacher.temperatures given without tail_lse")
            return
        expected = (*self.lse.shape, len(temps))
        if not self.tail_lse.dtype.is_floating_point or tuple(self.tail_lse.shape) != expected or not temps:
            raise ValueError(
                f"SparseTeacher.tail_lse must be a float tensor of shape {expected} (token dims, one column "
                f"per temperature in {temps}), got {tuple(self.tail_lse.shape)} {self.tail_lse.dtype}"
            )

    @property
    def k(self) -> int:
        """Number of stored columns per token."""
        return int(self.topk_ids.shape[-1])

    @property
    def token_shape(self) -> torch.Size:
        """The leading (token) dimensions, e.g. ``[B, S]``."""
        return self.lse.shape

    def covers(self, temperature: float) -> bool:
        """Whether the teacher's top-k mass at ``temperature`` is known exactly (T = 1 always is)."""
        return temperature_covered(self.temperatures, temperature)

    def log_top_mass(self, temperature: float) -> Tensor:
        """``[...]`` log of the teacher's probability mass on its top-k columns at temperature T.

        From ``tail_lse`` where T is stored, else from ``lse`` at T = 1; ValueError for any other T.
        Rows whose logits are all ``-inf`` give NaN (callers treat them as empty).
        """
        column = temperature_column(self.temperatures, temperature)
        tl = self.topk_logits.detach().to(compute_dtype(self.topk_logits.dtype))
        if column is not None:
            top = torch.logsumexp(tl / temperature, dim=-1)
            tail = self.tail_lse[..., column].detach().to(top.dtype)
            # log(e^top / (e^top + e^tail)) = -softplus(tail - top); tail = -inf gives 0
            return -torch.nn.functional.softplus(tail - top)
        if temperature == 1.0:
            return torch.logsumexp(tl, dim=-1) - self.lse.detach().to(tl.dtype)
        stored = ", ".join(f"{t:g}" for t in self.temperatures) or "none"
        raise ValueError(
            f"SparseTeacher: the teacher's tail mass at temperature {temperature:g} is not stored (tail_lse "
            f"temperatures: {stored}); build the cache with this temperature (the scoring pass stores every "
            "temperature of the configured schedule) or use the live teacher"
        )

    @classmethod
    def from_logits(cls, teacher_logits: Tensor, k: int, temperatures: Sequence[float] = ()) -> "SparseTeacher":
        """Build the cache entry from full teacher logits ``[..., V]`` (raw, T = 1).

        ``lse`` and ``tail_lse`` (at each of ``temperatures``, when given) are computed in float32
        (float64 for float64 logits); ids are int64.
        """
        vocab = teacher_logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"SparseTeacher.from_logits: k must be in [1, {vocab}], got {k}")
        logits = teacher_logits.detach()
        values, ids = torch.topk(logits, k, dim=-1)
        wide = logits.to(compute_dtype(logits.dtype))
        lse = safe_logsumexp(wide, dim=-1)
        if not temperatures:
            return cls(topk_ids=ids, topk_logits=values, lse=lse)
        tail = tail_logsumexp(wide.reshape(-1, vocab), ids.reshape(-1, k), temperatures)
        return cls(topk_ids=ids, topk_logits=values, lse=lse, tail_lse=tail.reshape(*lse.shape, len(temperatures)),
                   temperatures=tuple(temperatures))

    def flatten(self) -> "SparseTeacher":
        """The same cache with token dims flattened: ``[N, k]``, ``[N, k]``, ``[N]``, ``[N, n_T]``."""
        tail = None if self.tail_lse is None else self.tail_lse.reshape(-1, len(self.temperatures))
        return SparseTeacher(
            self.topk_ids.reshape(-1, self.k), self.topk_logits.reshape(-1, self.k), self.lse.reshape(-1),
            tail, self.temperatures,
        )


def temperature_column(temperatures: Sequence[float], temperature: float) -> int | None:
    """Index of ``temperature`` in ``temperatures`` (within ``TEMPERATURE_RTOL``), or None."""
    for i, t in enumerate(temperatures):
        if math.isclose(t, temperature, rel_tol=TEMPERATURE_RTOL):
            return i
    return None


def temperature_covered(temperatures: Sequence[float], temperature: float) -> bool:
    """Whether a teacher with tails at ``temperatures`` is exact at ``temperature`` (T = 1 needs none)."""
    return temperature == 1.0 or temperature_column(temperatures, temperature) is not None


def tail_logsumexp(logits: Tensor, ids: Tensor, temperatures: Sequence[float]) -> Tensor:
    """``[N, len(temperatures)]``: logsumexp of ``logits / T`` over the columns not in ``ids``, per T.

    Args:
        logits: ``[N, V]`` raw logits (treated as constants). ids: ``[N, k]`` distinct column ids per row.
    Exact (no ``log(Σ_all − Σ_top)`` cancellation); ``-inf`` for a row with nothing left.
    """
    with torch.no_grad():
        x = logits.detach().to(compute_dtype(logits.dtype))
        columns = [excluded_logsumexp(x, ids, float(t)) for t in temperatures]
    return torch.stack(columns, dim=-1) if columns else x.new_zeros((x.shape[0], 0))


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x <= 0``, accurate at both ends (Mächler's two-branch rule)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_bucket_log_probs(
    topk_logits: Tensor, log_top: Tensor, temperature: float, has_tail: bool
) -> Tensor:
    """Teacher bucket log-probabilities ``[n, k + 1]`` at temperature T (last column = tail).

    Args:
        topk_logits: ``[n, k]`` raw teacher logits. log_top: ``[n]`` log of the teacher's top-k mass at
            T (:meth:`SparseTeacher.log_top_mass`). has_tail: False when the top-k covers the
            vocabulary; the tail bucket is then ``-inf``.
    Rows whose top-k logits are all ``-inf`` come out all ``-inf`` (no teacher distribution). A row
    with some ``-inf`` among its top-k logits has no finite logit outside them (the top-k holds the
    largest): its tail bucket is ``-inf`` too, not floored, so the −inf rule drops it from both sides
    as the dense path drops those columns.
    """
    dtype = compute_dtype(topk_logits.dtype)
    tl = topk_logits.detach().to(dtype)
    log_top = log_top.detach().to(dtype).unsqueeze(-1)
    empty = (tl == NEG_INF).all(-1, keepdim=True) | torch.isnan(log_top)
    zero = torch.zeros((), dtype=dtype, device=tl.device)
    tl = torch.where(empty, zero, tl)
    log_top = torch.where(empty, zero, log_top)
    shape = torch.log_softmax(tl / temperature, dim=-1)
    if has_tail:
        # capped so that the tail keeps at least TAIL_FLOOR, unless the teacher has no tail at all
        no_tail = (tl == NEG_INF).any(-1, keepdim=True)
        log_top = torch.where(no_tail, zero, log_top.clamp(max=math.log1p(-TAIL_FLOOR)))
        top = shape + log_top
        tail = torch.where(no_tail, torch.full((), NEG_INF, dtype=dtype, device=tl.device), _log1mexp(log_top))
    else:
        top, tail = shape, torch.full_like(log_top, NEG_INF)
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
