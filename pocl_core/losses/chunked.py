"""Evaluating a per-token objective over selected rows: all at once, or in memory-bounded chunks.

Both paths compute, for a per-token function ``fn`` returning ``[n, m]`` values and constant weights
``w [m]``::

    total = Σ_rows Σ_j w_j · fn(rows)[:, j]        (differentiable w.r.t. the student logits)
    sums  = Σ_rows fn(rows)                          ([m], reported values, no gradient)

The dense path runs ``fn`` on all selected rows under ordinary autograd; every ``[N, V]`` intermediate
(log-softmaxes, probabilities, products) lives until backward. The chunked path is a custom
``torch.autograd.Function`` that, in its forward, runs ``fn`` *and its backward* on ``chunk_rows``
rows at a time and writes that chunk's gradient into one ``[N, V]`` buffer in the student's dtype.
At most one chunk of full-vocabulary intermediates exists at any time, in forward or backward; the
only ``[N, V]`` tensor it keeps is the gradient itself, which backward hands on (scaled by the
incoming gradient when that is not exactly 1). Gradients flow to the student logits only; every
auxiliary tensor (teacher logits, top-k cache, targets) is a constant.

Limitations of the chunked path: no double backward (``once_differentiable``), and the gradient is
computed during forward whenever grad mode is on and the student requires grad.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pocl_core.losses.support import compute_dtype

# fn(student_rows [n, V] in the compute dtype, aux_rows...) -> [n, m] per-token values.
TokenFn = Callable[..., Tensor]


def _select(t: Tensor, rows: Tensor, all_rows: bool) -> Tensor:
    return t if all_rows else t.index_select(0, rows)


def dense_rows_objective(
    student_flat: Tensor, rows: Tensor, aux: Sequence[Tensor], fn: TokenFn, weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Reference (unchunked) evaluation. Returns ``(total [], sums [m])`` in the compute dtype.

    Args:
        student_flat: ``[N, V]`` student logits. rows: ``[M]`` int64 indices of counted rows.
        aux: tensors with leading dim ``N`` passed (row-selected) to ``fn``. weights: ``m`` floats.
    """
    all_rows = rows.numel() == student_flat.shape[0]  # rows come from nonzero(): sorted, so identity
    student = _select(student_flat, rows, all_rows).to(compute_dtype(student_flat.dtype))
    out = fn(student, *(_select(a, rows, all_rows) for a in aux))
    w = torch.tensor(list(weights), dtype=out.dtype, device=out.device)
    return (out * w).sum(), out.detach().sum(0)


class _ChunkedRowsObjective(torch.autograd.Function):
    """Chunked evaluation with the gradient computed chunk by chunk during forward."""

    @staticmethod
    def forward(ctx, student_flat, rows, weights, fn, chunk_rows, needs_grad, *aux):  # type: ignore[override]
        dtype = compute_dtype(student_flat.dtype)
        grad_buf = torch.zeros_like(student_flat) if needs_grad else None
        sums = torch.zeros(weights.numel(), dtype=dtype, device=student_flat.device)
        w = weights.to(device=student_flat.device, dtype=dtype)
        ctx.num_aux = len(aux)
        for start in range(0, rows.numel(), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            student = student_flat.index_select(0, chunk).to(dtype).detach()
            aux_chunk = [a.index_select(0, chunk) for a in aux]
            if needs_grad:
                student.requires_grad_(True)
                with torch.enable_grad():
                    out = fn(student, *aux_chunk)
                    (grad,) = torch.autograd.grad((out * w).sum(), student)
                grad_buf.index_copy_(0, chunk, grad.to(grad_buf.dtype))
            else:
                out = fn(student, *aux_chunk)
            sums += out.detach().sum(0)
            del out, student, aux_chunk
        total = (sums * w).sum()
        # Saved (not a ctx attribute) so autograd frees it after backward, even while the caller
        # still holds the returned loss (e.g. during the next step's forward).
        ctx.has_grad = grad_buf is not None
        ctx.save_for_backward(*([grad_buf] if ctx.has_grad else []))
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_sums):  # type: ignore[override]
        grad_buf = ctx.saved_tensors[0] if ctx.has_grad else None
        if grad_buf is None:
            grad = None
        elif bool(grad_total == 1):
            # The usual case (loss.backward() on this value): hand the buffer on without a copy (a
            # second [N, V] buffer at the memory peak otherwise). Autograd may adopt it as a leaf's
            # .grad and add to it in place later; its version counter then makes a retained graph's
            # next backward fail loudly ("modified by an inplace operation"), never silently wrong.
            grad = grad_buf
        else:
            grad = grad_buf * grad_total.to(grad_buf.dtype)
        return (grad, None, None, None, None, None) + (None,) * ctx.num_aux


def chunked_rows_objective(
    student_flat: Tensor,
    rows: Tensor,
    aux: Sequence[Tensor],
    fn: TokenFn,
    weights: Sequence[float],
    chunk_rows: int,
) -> tuple[Tensor, Tensor]:
    """Chunked evaluation, equal to :func:`dense_rows_objective` in value and gradient.

    ``chunk_rows`` (>= 1) counted rows are processed at a time. Returns ``(total [], sums [m])``.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    needs_grad = torch.is_grad_enabled() and student_flat.requires_grad
    w = torch.tensor(list(weights), dtype=torch.float64)
    return _ChunkedRowsObjective.apply(student_flat, rows, w, fn, chunk_rows, needs_grad, *aux)
