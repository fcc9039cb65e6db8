"""The two entry points the training step calls: :func:`kd_divergence` and :func:`kd_objective`.

Shapes: student logits ``[B, S, V]`` with mask ``[B, S]``, or already-gathered ``[N, V]`` with ``[N]``.
The teacher is either dense logits of the student's exact shape or a :class:`SparseTeacher` whose
token dims match the mask. Values are means over counted tokens (mask != 0), in nats, returned in
float32 (float64 when the student logits are float64).

Temperature rule (one for every divergence): ``D_T`` is computed on ``softmax(logits / T)`` and, with
``temperature_scaling="t_squared"`` (default), multiplied by T² so that gradient magnitudes stay
comparable as T rises (Hinton et al. 2015); ``"none"`` returns the bare divergence.

Chunking: ``chunk_size=None`` chooses automatically — chunked when (counted tokens × V) exceeds
``AUTO_CHUNK_MIN_ELEMENTS``, with ``max(1, CHUNK_ELEMENTS // V)`` tokens per chunk; ``chunk_size=0``
forces the unchunked reference path; ``chunk_size=k > 0`` forces chunks of k tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from pocl_core.losses.chunked import chunked_rows_objective, dense_rows_objective
from pocl_core.losses.registry import LossSpec, apply_divergence, resolve_loss
from pocl_core.losses.sparse import SparseTeacher, student_bucket_logits, teacher_bucket_log_probs
from pocl_core.losses.support import common_support_log_probs, safe_logsumexp

TEMPERATURE_SCALINGS = ("t_squared", "none")
# 2^24 elements = 64 MiB per float32 [N, V] tensor; below that the dense path's intermediates are small.
AUTO_CHUNK_MIN_ELEMENTS = 2**24
# ~8 MiB per float32 chunk tensor: small enough to stay cache-friendly, big enough to amortise the loop.
CHUNK_ELEMENTS = 2**21

TokenFn = Callable[..., Tensor]


def temperature_factor(temperature: float, temperature_scaling: str) -> float:
    """The factor applied to every divergence: T² for ``"t_squared"``, 1 for ``"none"``."""
    if temperature_scaling not in TEMPERATURE_SCALINGS:
        raise ValueError(
            f"temperature_scaling must be one of {', '.join(TEMPERATURE_SCALINGS)}, got {temperature_scaling!r}"
        )
    return float(temperature) ** 2 if temperature_scaling == "t_squared" else 1.0


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def _prepare(
    student_logits: Tensor, teacher: Tensor | SparseTeacher, mask: Tensor, temperature: float
) -> tuple[Tensor, tuple[Tensor, ...], Tensor, bool]:
    """Flatten to rows and validate shapes. Returns (student [N, V], teacher aux, rows [M], sparse).

    A sparse teacher's aux is (ids [N, k], top-k logits [N, k], log top-k mass at T [N]).
    """
    if student_logits.dim() not in (2, 3) or not student_logits.dtype.is_floating_point:
        raise ValueError(
            "student_logits must be a float tensor [B, S, V] or [N, V], got "
            f"{tuple(student_logits.shape)} {student_logits.dtype}"
        )
    token_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(
            f"mask must have the student's token shape {tuple(token_shape)}, got {tuple(mask.shape)}"
        )
    student_flat = student_logits.reshape(-1, vocab)
    rows = (mask.reshape(-1) != 0).nonzero().squeeze(-1).to(student_logits.device)
    if isinstance(teacher, SparseTeacher):
        if tuple(teacher.token_shape) != tuple(token_shape):
            raise ValueError(
                f"SparseTeacher token shape {tuple(teacher.token_shape)} must equal the student's "
                f"{tuple(token_shape)}"
            )
        if teacher.k > vocab:
            raise ValueError(f"SparseTeacher has k={teacher.k} columns but the student vocabulary is {vocab}")
        flat = teacher.flatten()
        ids = flat.topk_ids.to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"SparseTeacher.topk_ids must lie in [0, {vocab}) (the student vocabulary)")
        if ids.shape[-1] > 1 and ids.numel():
            ordered = ids.sort(dim=-1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1).nonzero()
            if repeated.numel():
                raise ValueError(f"SparseTeacher.topk_ids repeat an id within a row (first: token row "
                                 f"{int(repeated[0])}); each row's ids must be distinct")
        # with k == V there is no tail bucket and the top-k mass is unused
        log_top = flat.log_top_mass(temperature) if flat.k < vocab else torch.zeros_like(flat.lse)
        return student_flat, (ids, flat.topk_logits, log_top), rows, True
    if not isinstance(teacher, Tensor) or tuple(teacher.shape) != tuple(student_logits.shape):
        got = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
        raise ValueError(
            f"teacher logits must have the student's shape {tuple(student_logits.shape)}, got {got}; "
            "slice both to the shared vocabulary width first (pocl_core.vocab.slice_to_common_vocab)"
        )
    return student_flat, (teacher.detach().reshape(-1, vocab),), rows, False


def _divergence_fn(
    spec: LossSpec, params: Mapping[str, float], temperature: float, sparse: bool, vocab: int
) -> TokenFn:
    """Per-token divergence ``fn(student_rows, *teacher_rows) -> [n]`` (no temperature factor)."""
    if not sparse:
        def dense(student: Tensor, teacher: Tensor) -> Tensor:
            return apply_divergence(spec, params, common_support_log_probs(student, teacher, temperature))
        return dense

    def bucketed(student: Tensor, ids: Tensor, topk_logits: Tensor, log_top: Tensor) -> Tensor:
        has_tail = ids.shape[-1] < vocab
        s_buckets = student_bucket_logits(student, ids, temperature, has_tail)
        t_buckets = teacher_bucket_log_probs(topk_logits, log_top, temperature, has_tail)
        return apply_divergence(spec, params, common_support_log_probs(s_buckets, t_buckets, 1.0))
    return bucketed


def _evaluate(
    student_flat: Tensor, rows: Tensor, aux: tuple[Tensor, ...], fn: TokenFn,
    weights: list[float], chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    vocab = student_flat.shape[-1]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // vocab) if rows.numel() * vocab > AUTO_CHUNK_MIN_ELEMENTS else 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be None, 0 (unchunked) or a positive int, got {chunk_size!r}")
    # Autocast (bf16 training) must not lower the loss's precision: the float32 softmax is the point.
    with torch.autocast(device_type=student_flat.device.type, enabled=False):
        if chunk_size == 0:
            return dense_rows_objective(student_flat, rows, aux, fn, weights)
        return chunked_rows_objective(student_flat, rows, aux, fn, weights, chunk_size)


def kd_divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor | SparseTeacher,
    mask: Tensor,
    temperature: float = 1.0,
    *,
    temperature_scaling: str = "t_squared",
    chunk_size: int | None = None,
    **params: Any,
) -> Tensor:
    """Mean per-token divergence ``factor(T) · D(p_T ‖ q_T)`` over counted tokens. Scalar.

    Args:
        name: one of :data:`~pocl_core.losses.LOSS_NAMES`. params: that loss's parameters
            (``beta`` for jsd/gjsd, ``alpha`` for skl/srkl, ``mu`` for akl).
        student_logits: ``[B, S, V]`` or ``[N, V]`` raw logits (any float dtype; gradients flow here).
        teacher_logits: raw logits of the same shape (constant), or a :class:`SparseTeacher`.
        mask: ``[B, S]`` or ``[N]``, bool or int; nonzero = counted. No counted token -> 0.0.
        temperature: T > 0. temperature_scaling: ``"t_squared"`` or ``"none"``.
        chunk_size: None (automatic), 0 (unchunked), or tokens per chunk.
    """
    spec, resolved = resolve_loss(name, params)
    temperature = _check_temperature(temperature)
    factor = temperature_factor(temperature, temperature_scaling)
    student_flat, aux, rows, sparse = _prepare(student_logits, teacher_logits, mask, temperature)
    base = _divergence_fn(spec, resolved, temperature, sparse, student_flat.shape[-1])
    count = max(rows.numel(), 1)
    total, _ = _evaluate(
        student_flat, rows, aux, lambda s, *a: base(s, *a).unsqueeze(-1), [factor / count], chunk_size
    )
    return total


def kd_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | SparseTeacher,
    targets: Tensor,
    mask: Tensor,
    *,
    kd_weight: float,
    temperature: float,
    loss_name: str = "fkl",
    loss_params: Mapping[str, Any] | None = None,
    temperature_scaling: str = "t_squared",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """POCL's step loss ``total = (1 − λ)·CE + λ·factor(T)·D_T``, each a mean over counted tokens.

    Args:
        targets: ``[B, S]`` or ``[N]`` int64 reference token ids (only counted positions are read).
        kd_weight: λ in [0, 1]. CE is the student's cross-entropy at T = 1 over its full row.
        Other arguments as in :func:`kd_divergence`.

    Returns:
        ``(total, kd, ce)`` scalars; only ``total`` carries a gradient (``kd`` and ``ce`` are detached
        values for logging, ``kd`` already including the temperature factor).
    """
    spec, resolved = resolve_loss(loss_name, loss_params)
    temperature = _check_temperature(temperature)
    factor = temperature_factor(temperature, temperature_scaling)
    if isinstance(kd_weight, bool) or not isinstance(kd_weight, (int, float)) or not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be a number in [0, 1], got {kd_weight!r}")
    student_flat, aux, rows, sparse = _prepare(student_logits, teacher_logits, mask, temperature)
    if tuple(targets.shape) != tuple(mask.shape) or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be integer ids of shape {tuple(mask.shape)}, got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    vocab = student_flat.shape[-1]
    flat_targets = targets.reshape(-1).to(torch.int64)
    counted = flat_targets.index_select(0, rows)
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
        raise ValueError(f"targets at counted positions must lie in [0, {vocab}); mask out ignored positions")
    base = _divergence_fn(spec, resolved, temperature, sparse, vocab)

    def kd_and_ce(student: Tensor, target: Tensor, *teacher: Tensor) -> Tensor:
        ce = safe_logsumexp(student, dim=-1) - student.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return torch.stack([base(student, *teacher), ce], dim=-1)

    count = max(rows.numel(), 1)
    weights = [kd_weight * factor / count, (1.0 - kd_weight) / count]
    total, sums = _evaluate(student_flat, rows, (flat_targets, *aux), kd_and_ce, weights, chunk_size)
    return total, (sums[0] * factor / count).detach(), (sums[1] / count).detach()
