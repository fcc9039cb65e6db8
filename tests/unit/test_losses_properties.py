"""Properties of every KD loss: zero/positivity/symmetry, temperature rule, masks, dtypes, gradcheck."""

from __future__ import annotations

import pytest
import torch

from pocl_core.losses import LOSS_NAMES, kd_divergence, kd_objective

SMOOTH = [name for name in LOSS_NAMES if name != "akl"]  # akl's weights are detached by design


def rand(*shape, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_value_and_gradient_on_identical_inputs(name):
    t = rand(3, 4, 10)
    t[..., 7:] = float("-inf")
    s = t.clone().requires_grad_(True)
    value = kd_divergence(name, s, t, torch.ones(3, 4), 1.5)
    value.backward()
    assert abs(value.item()) < 1e-12
    assert s.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_per_token_values_are_non_negative(name):
    s, t = rand(40, 9, seed=1, scale=3.0), rand(40, 9, seed=2, scale=3.0)
    for row in range(40):
        one = torch.zeros(40, dtype=torch.bool)
        one[row] = True
        assert kd_divergence(name, s, t, one, 1.3).item() >= -1e-12


@pytest.mark.parametrize("name,params", [("tvd", {}), ("jsd", {"beta": 0.5}), ("gjsd", {"beta": 0.5})])
def test_symmetric_divergences(name, params):
    s, t, mask = rand(2, 5, 8, seed=3), rand(2, 5, 8, seed=4), torch.ones(2, 5)
    forward = kd_divergence(name, s, t, mask, 1.7, **params)
    backward = kd_divergence(name, t, s, mask, 1.7, **params)
    torch.testing.assert_close(forward, backward, rtol=1e-12, atol=1e-14)


def test_jsd_is_not_symmetric_for_other_beta():
    s, t, mask = rand(2, 5, 8, seed=3), rand(2, 5, 8, seed=4), torch.ones(2, 5)
    assert kd_divergence("jsd", s, t, mask).item() != pytest.approx(kd_divergence("jsd", t, s, mask).item())


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_t_squared_is_the_bare_divergence_times_t_squared(name, temperature):
    s, t, mask = rand(2, 3, 7, seed=5), rand(2, 3, 7, seed=6), torch.ones(2, 3)
    bare = kd_divergence(name, s, t, mask, temperature, temperature_scaling="none")
    scaled = kd_divergence(name, s, t, mask, temperature, temperature_scaling="t_squared")
    torch.testing.assert_close(scaled, bare * temperature**2)
    assert kd_divergence(name, s, t, mask, temperature).item() == pytest.approx(scaled.item())


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("chunk_size", [0, 2])
def test_empty_mask_gives_zero_and_zero_gradient(name, chunk_size):
    s = rand(2, 3, 6, seed=7).requires_grad_(True)
    t = rand(2, 3, 6, seed=8)
    with torch.no_grad():
        s[0, 0] = float("-inf")
    value = kd_divergence(name, s, t, torch.zeros(2, 3, dtype=torch.bool), 2.0, chunk_size=chunk_size)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_kd_objective_with_empty_mask_is_zero_without_nan():
    s = rand(2, 3, 6, seed=7).requires_grad_(True)
    total, kd, ce = kd_objective(
        s, rand(2, 3, 6, seed=8), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3),
        kd_weight=0.5, temperature=2.0,
    )
    total.backward()
    assert total.item() == kd.item() == ce.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_tokens_and_padded_columns_contribute_nothing(name):
    s, t = rand(2, 4, 6, seed=9), rand(2, 4, 6, seed=10)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    base = kd_divergence(name, s, t, mask, 1.4)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = rand(4, 6, seed=11)  # change only masked-out tokens
    pad = torch.full((2, 4, 3), float("-inf"), dtype=torch.float64)
    s2, t2 = torch.cat([s2, pad], -1), torch.cat([t2, pad], -1)  # and add padded vocab columns
    torch.testing.assert_close(kd_divergence(name, s2, t2, mask, 1.4), base)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_mismatched_inf_columns_never_give_nan(name, chunk_size):
    s = rand(4, 6, seed=12).requires_grad_(True)
    t = rand(4, 6, seed=13)
    with torch.no_grad():
        s[0, 1] = float("-inf")  # student-only
    t[1, 2] = float("-inf")  # teacher-only
    t[2, :] = float("-inf")  # teacher row fully padded
    value = kd_divergence(name, s, t, torch.ones(4), 1.5, chunk_size=chunk_size)
    value.backward()
    assert torch.isfinite(value)
    assert not torch.isnan(s.grad).any()
    assert s.grad[0, 1] == 0 and torch.all(s.grad[2] == 0)


def test_three_d_equals_flattened_two_d_rows():
    s, t = rand(2, 5, 7, seed=14), rand(2, 5, 7, seed=15)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]])
    keep = mask.reshape(-1).bool()
    flat = kd_divergence("skl", s.reshape(-1, 7)[keep], t.reshape(-1, 7)[keep], torch.ones(6), 2.0)
    torch.testing.assert_close(kd_divergence("skl", s, t, mask, 2.0), flat)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_inputs_compute_in_float32(name):
    s32, t32, mask = rand(3, 4, 50, seed=16, dtype=torch.float32), rand(3, 4, 50, seed=17, dtype=torch.float32), torch.ones(3, 4)
    s16 = s32.to(torch.bfloat16).requires_grad_(True)
    t16 = t32.to(torch.bfloat16)
    value = kd_divergence(name, s16, t16, mask, 2.0)
    value.backward()
    assert value.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    # Same rounded inputs in float32: only the gradient's final bf16 rounding differs.
    rounded = kd_divergence(name, s16.detach().float(), t16.float(), mask, 2.0)
    torch.testing.assert_close(value, rounded, rtol=1e-6, atol=1e-7)
    # And close to the unrounded float32 inputs (bf16 keeps ~3 significant digits of each logit).
    exact = kd_divergence(name, s32, t32, mask, 2.0)
    torch.testing.assert_close(value, exact, rtol=3e-2, atol=1e-3)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("chunk_size", [0, 2])
def test_gradcheck(name, chunk_size):
    t = rand(2, 3, 5, seed=18)
    t[..., -1] = float("-inf")
    s = rand(2, 3, 5, seed=19)
    s[..., -1] = float("-inf")
    s.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    params = {"gjsd": {"beta": 0.4}}.get(name, {})

    def f(x):
        return kd_divergence(name, x, t, mask, 1.6, chunk_size=chunk_size, **params)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_akl_gradient_equals_gradcheck_verified_frozen_weight_surrogate(chunk_size):
    """AKL's gradient is w_head·∇FKL + w_tail·∇RKL with the weights held at the current point."""
    from pocl_core.losses.divergences import adaptive_kl_weights
    from pocl_core.losses.support import common_support_log_probs

    s0, t = rand(4, 6, seed=20), rand(4, 6, seed=21)
    w_head, w_tail = adaptive_kl_weights(*common_support_log_probs(s0, t, 1.5)[2:4], mu=0.5)

    def surrogate(x):  # per-token weighted FKL + RKL, each token on its own
        total = x.new_zeros(())
        for r in range(4):
            one = torch.zeros(4)
            one[r] = 1
            fkl = kd_divergence("fkl", x, t, one, 1.5, chunk_size=chunk_size)
            rkl = kd_divergence("rkl", x, t, one, 1.5, chunk_size=chunk_size)
            total = total + (w_head[r] * fkl + w_tail[r] * rkl) / 4
        return total

    x = s0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(surrogate, (x,), eps=1e-6, atol=1e-7, fast_mode=True)
    (expected,) = torch.autograd.grad(surrogate(x), x)
    kd_divergence("akl", x, t, torch.ones(4), 1.5, chunk_size=chunk_size).backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-12)


def test_teacher_receives_no_gradient():
    s = rand(3, 5, seed=22).requires_grad_(True)
    t = rand(3, 5, seed=23).requires_grad_(True)
    kd_divergence("jsd", s, t, torch.ones(3)).backward()
    assert t.grad is None and s.grad is not None


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown KD loss 'kl'.*fkl, rkl, jsd, tvd, skl, srkl, akl, gjsd"):
        kd_divergence("kl", rand(2, 3), rand(2, 3), torch.ones(2))


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("fkl", {"beta": 0.5}, r"'fkl' got unknown parameter\(s\) 'beta'; it accepts: none"),
        ("skl", {"apha": 0.2}, r"unknown parameter\(s\) 'apha'; it accepts: alpha"),
        ("jsd", {"beta": 1.0}, r"'beta'=1.0 must lie in \(0.0, 1.0\)"),
        ("akl", {"mu": 0.0}, r"'mu'=0.0 must lie in \(0.0, 1.0\]"),
        ("srkl", {"alpha": "x"}, "must be a number"),
    ],
)
def test_parameter_errors_name_the_parameter(name, params, match):
    with pytest.raises(ValueError, match=match):
        kd_divergence(name, rand(2, 3), rand(2, 3), torch.ones(2), **params)


def test_kd_objective_rejects_unknown_loss_params():
    with pytest.raises(ValueError, match="unknown parameter"):
        kd_objective(rand(2, 3), rand(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2),
                     kd_weight=0.5, temperature=1.0, loss_name="tvd", loss_params={"alpha": 0.1})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature_scaling": "t"}, "temperature_scaling must be one of t_squared, none"),
        ({"chunk_size": -1}, "chunk_size must be"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kd_divergence("fkl", rand(2, 3), rand(2, 3), torch.ones(2), **kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match="mask must have the student's token shape"):
        kd_divergence("fkl", rand(2, 3, 4), rand(2, 3, 4), torch.ones(6))
    with pytest.raises(ValueError, match="teacher logits must have the student's shape"):
        kd_divergence("fkl", rand(2, 3, 4), rand(2, 3, 5), torch.ones(2, 3))
    with pytest.raises(ValueError, match="student_logits must be"):
        kd_divergence("fkl", rand(4), rand(4), torch.ones(()))
    with pytest.raises(ValueError, match="targets at counted positions"):
        kd_objective(rand(2, 3), rand(2, 3), torch.tensor([0, 3]), torch.ones(2), kd_weight=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="kd_weight"):
        kd_objective(rand(2, 3), rand(2, 3), torch.tensor([0, 1]), torch.ones(2), kd_weight=1.5, temperature=1.0)
