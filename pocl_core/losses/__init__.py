"""POCL's knowledge-distillation divergences (no orchestration imports). See docs/losses.md.

Public API::

    kd_divergence(name, student_logits, teacher_logits | SparseTeacher, mask, temperature=1.0,
                  *, temperature_scaling="t_squared", chunk_size=None, **params) -> scalar
    kd_objective(student_logits, teacher_logits | SparseTeacher, targets, mask, *, kd_weight,
                 temperature, loss_name="fkl", loss_params=None, temperature_scaling="t_squared",
                 chunk_size=None) -> (total, kd, ce)
    SparseTeacher(topk_ids, topk_logits, lse)      # cached top-k teacher
    LOSS_NAMES                                      # ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "gjsd")

Modules: ``support`` (softmax on the common support, the −inf rules), ``divergences`` (per-token
formulas), ``registry`` (names, parameters, validation), ``sparse`` (top-k teacher buckets),
``chunked`` (memory-bounded evaluation), ``api`` (the entry points above).
"""

from pocl_core.losses.api import (
    AUTO_CHUNK_MIN_ELEMENTS,
    CHUNK_ELEMENTS,
    TEMPERATURE_SCALINGS,
    kd_divergence,
    kd_objective,
    temperature_factor,
)
from pocl_core.losses.registry import LOSS_NAMES, LOSSES, resolve_loss
from pocl_core.losses.sparse import TAIL_FLOOR, SparseTeacher

__all__ = [
    "AUTO_CHUNK_MIN_ELEMENTS",
    "CHUNK_ELEMENTS",
    "LOSS_NAMES",
    "LOSSES",
    "SparseTeacher",
    "TAIL_FLOOR",
    "TEMPERATURE_SCALINGS",
    "kd_divergence",
    "kd_objective",
    "resolve_loss",
    "temperature_factor",
]
