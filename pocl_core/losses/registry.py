"""The table of loss names, their parameters and defaults, and parameter validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from pocl_core.losses import divergences as dv
from pocl_core.losses.support import SupportLogProbs


@dataclass(frozen=True)
class LossSpec:
    """One divergence: its per-token function, its parameters' defaults and their allowed ranges.

    ``ranges`` maps a parameter to ``(low, high, low_inclusive, high_inclusive)``.
    """

    fn: Callable[..., Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float, bool, bool]] = field(default_factory=dict)
    summary: str = ""


_OPEN_UNIT = (0.0, 1.0, False, False)

LOSSES: dict[str, LossSpec] = {
    "fkl": LossSpec(dv.forward_kl, summary="KL(p||q)"),
    "rkl": LossSpec(dv.reverse_kl, summary="KL(q||p)"),
    "jsd": LossSpec(dv.js_divergence, {"beta": 0.9}, {"beta": _OPEN_UNIT},
                    "b*KL(q||m)+(1-b)*KL(p||m), m=(1-b)p+bq"),
    "tvd": LossSpec(dv.total_variation, summary="0.5*sum|p-q|"),
    "skl": LossSpec(dv.skew_forward_kl, {"alpha": 0.1}, {"alpha": _OPEN_UNIT},
                    "KL(p||a*p+(1-a)q)"),
    "srkl": LossSpec(dv.skew_reverse_kl, {"alpha": 0.1}, {"alpha": _OPEN_UNIT},
                     "KL(q||(1-a)p+a*q)"),
    "akl": LossSpec(dv.adaptive_kl, {"mu": 0.5}, {"mu": (0.0, 1.0, False, True)},
                    "w_head*FKL + w_tail*RKL"),
    "gjsd": LossSpec(dv.generalized_jsd, {"beta": 0.9}, {"beta": (0.0, 1.0, True, True)},
                     "JSD(b) with b=0 -> RKL, b=1 -> FKL"),
}

LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def resolve_loss(name: str, params: Mapping[str, Any] | None) -> tuple[LossSpec, dict[str, float]]:
    """Look up ``name`` and merge ``params`` over its defaults, validating names and ranges.

    Raises:
        ValueError: unknown loss name (listing the valid ones), unknown parameter (naming it and the
            accepted ones), or a parameter outside its range.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    spec = LOSSES[name]
    given = dict(params or {})
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(spec.defaults) or "none"
        raise ValueError(
            f"KD loss {name!r} got unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {accepted}"
        )
    resolved = {**spec.defaults, **given}
    for key, value in resolved.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"KD loss {name!r}: parameter {key!r} must be a number, got {value!r}")
        low, high, low_inc, high_inc = spec.ranges[key]
        ok_low = value >= low if low_inc else value > low
        ok_high = value <= high if high_inc else value < high
        if not (ok_low and ok_high):
            interval = f"{'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"
            raise ValueError(f"KD loss {name!r}: parameter {key!r}={value} must lie in {interval}")
        resolved[key] = float(value)
    return spec, resolved


def apply_divergence(spec: LossSpec, params: Mapping[str, float], d: SupportLogProbs) -> Tensor:
    """Evaluate ``spec`` on prepared log-probabilities: ``[n]`` per-token values."""
    return spec.fn(d, **params)
