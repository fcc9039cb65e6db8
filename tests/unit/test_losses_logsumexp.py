"""The row logsumexps under the KD losses: values and hand-written gradients against references.

``safe_logsumexp`` (CE and the teacher's row normaliser) and ``excluded_logsumexp`` (the student's
tail bucket in the top-k cache) write their gradients out instead of tracing them; here both are
checked against float64 references built from plain sums, and with ``gradcheck``.
"""

from __future__ import annotations

import math

import pytest
import torch

from pocl_core.losses.support import excluded_logsumexp, safe_logsumexp

NEG_INF = float("-inf")


def _reference_lse(rows: list[list[float]]) -> list[float]:
    """log Σ exp over the finite entries of each row (−inf for a row with none), in Python floats."""
    out = []
    for row in rows:
        finite = [v for v in row if v != NEG_INF]
        if not finite:
            out.append(NEG_INF)
            continue
        top = max(finite)
        out.append(top + math.log(sum(math.exp(v - top) for v in finite)))
    return out


def _logits() -> torch.Tensor:
    x = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    x[1, [0, 4, 8]] = NEG_INF  # masked columns
    x[3] = NEG_INF  # an empty row
    return x


def test_safe_logsumexp_values_and_gradient_match_the_softmax():
    x = _logits().requires_grad_(True)
    out = safe_logsumexp(x)
    assert out.tolist() == pytest.approx(_reference_lse(x.detach().tolist()), rel=1e-12)
    assert out[3].item() == NEG_INF
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    (out[torch.isfinite(out)] * weights[torch.isfinite(out)]).sum().backward()
    expected = torch.softmax(x.detach(), dim=-1) * weights.unsqueeze(-1)  # d lse / dx = softmax
    expected[3] = 0.0
    torch.testing.assert_close(x.grad, expected)
    assert torch.all(x.grad[1, [0, 4, 8]] == 0) and torch.all(x.grad[3] == 0)


def test_safe_logsumexp_over_another_dim_and_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(safe_logsumexp(x, dim=0), torch.logsumexp(x, dim=0))
    assert torch.autograd.gradcheck(lambda t: safe_logsumexp(t, dim=0), (x,))
    assert torch.autograd.gradcheck(safe_logsumexp, (x,))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_excluded_logsumexp_leaves_out_the_ids_at_any_temperature(temperature):
    x = _logits()
    ids = torch.tensor([[0, 2], [1, 4], [3, 5], [0, 1], [7, 8]])
    kept = []
    for row, drop in zip((x / temperature).tolist(), ids.tolist()):
        kept.append([v for j, v in enumerate(row) if j not in drop])
    got = excluded_logsumexp(x, ids, temperature)
    assert got.tolist() == pytest.approx(_reference_lse(kept), rel=1e-12)
    assert got[3].item() == NEG_INF
    x.requires_grad_(True)
    masked = (x / temperature).scatter(-1, ids, NEG_INF)  # the traced formula the function replaces
    finite = torch.isfinite(got)
    reference = torch.autograd.grad((torch.logsumexp(masked[finite], -1)).sum(), x)[0]
    mine = torch.autograd.grad(excluded_logsumexp(x, ids, temperature)[finite].sum(), x)[0]
    torch.testing.assert_close(mine, reference)
    assert torch.all(mine.gather(-1, ids) == 0)


def test_excluded_logsumexp_with_nothing_left_is_minus_inf_with_zero_gradient():
    x = torch.tensor([[1.0, 2.0, NEG_INF], [0.5, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 1], [0, 2]])
    out = excluded_logsumexp(x, ids, 1.5)
    assert out[0].item() == NEG_INF and out[1].item() == pytest.approx(-1.0 / 1.5)
    out[1].backward()
    assert x.grad[0].tolist() == [0.0, 0.0, 0.0]
    assert x.grad[1].tolist() == pytest.approx([0.0, 1.0 / 1.5, 0.0])


def test_excluded_logsumexp_gradcheck_and_float32_input_untouched():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 6], [2, 3], [1, 5]])
    assert torch.autograd.gradcheck(lambda t: excluded_logsumexp(t, ids, 1.8), (x,))
    y = torch.randn(3, 7)
    before = y.clone()
    excluded_logsumexp(y, ids, 1.0)
    assert torch.equal(y, before)  # works on its own copy, also at T = 1
