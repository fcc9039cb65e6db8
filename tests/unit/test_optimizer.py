"""build_optimizer: decoupled-weight-decay Adam checked against the update rule written out by hand;
build_lr_scheduler: warm-up and cosine decay checked against the closed form."""

from __future__ import annotations

import math

import pytest
import torch

from pocl_core.config import OptimConfig
from pocl_core.train_step import build_lr_scheduler, build_optimizer


def _adamw_reference(p: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """Loshchilov & Hutter's AdamW in float64: p ← p·(1−lr·wd) − lr·m̂/(√v̂+ε)."""
    p = p.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_optimizer_follows_adamw_with_decay_only_on_matrices():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)  # frozen: no state, never moves
    cfg = OptimConfig(lr=0.05, weight_decay=0.3)
    optimizer = build_optimizer(model, cfg)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for _ in range(4):
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
                grads[n].append(p.grad.clone())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    params = dict(model.named_parameters())
    torch.testing.assert_close(params["0.weight"].double(), _adamw_reference(start["0.weight"], grads["0.weight"], 0.05, 0.3),
                               rtol=1e-5, atol=1e-6)
    for name in ("0.bias", "1.bias"):  # 1-D: no weight decay
        torch.testing.assert_close(params[name].double(), _adamw_reference(start[name], grads[name], 0.05, 0.0),
                                   rtol=1e-5, atol=1e-6)
    assert torch.equal(params["1.weight"], start["1.weight"])
    assert not any(params["1.weight"] is p for g in optimizer.param_groups for p in g["params"])
    # decay really mattered: without it the matrix would be elsewhere
    assert not torch.allclose(params["0.weight"].double(), _adamw_reference(start["0.weight"], grads["0.weight"], 0.05, 0.0),
                              rtol=1e-5, atol=1e-6)


def test_fused_kernel_on_cpu_and_the_same_steps_as_the_per_tensor_loop():
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 8)
    twin = torch.nn.Linear(8, 8)
    twin.load_state_dict(model.state_dict())
    initial = model.weight.detach().clone()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    ours = build_optimizer(model, cfg)
    assert all(g["fused"] for g in ours.param_groups)
    loop = torch.optim.AdamW([{"params": [twin.weight], "weight_decay": 0.1}, {"params": [twin.bias], "weight_decay": 0.0}],
                             lr=1e-2, foreach=False)
    for _ in range(5):
        x = torch.randn(3, 8)
        for net, opt in ((model, ours), (twin, loop)):
            net(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.weight, initial, atol=1e-3)  # the steps moved the weights


def test_parameters_off_cpu_and_cuda_get_the_default_kernel():
    optimizer = build_optimizer(torch.nn.Linear(2, 2, device="meta"), OptimConfig())
    assert not any(g["fused"] for g in optimizer.param_groups)


def _lrs(cfg: OptimConfig, total_steps: int, steps: int) -> list[float]:
    """The learning rate of optimizer steps 0..steps-1 under build_lr_scheduler."""
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_lr_warms_up_linearly_then_follows_a_cosine_down_to_min_lr():
    # warm-up steps s < W run at lr·(s+1)/W; then lr(s) = min_lr + (lr − min_lr)·(1 + cos(π·(s−W)/(T−W)))/2,
    # held at min_lr from T on. lr 1e-3, min_lr 1e-4, W = 4, T = 16: the cosine spans steps 4..16.
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4)
    lrs = _lrs(cfg, total_steps=16, steps=22)
    assert lrs[0] == pytest.approx(2.5e-4)  # lr / 4
    assert lrs[1] == pytest.approx(5e-4)
    assert lrs[3] == pytest.approx(1e-3)  # last warm-up step reaches lr
    assert lrs[4] == pytest.approx(1e-3)  # the cosine starts at lr
    assert lrs[7] == pytest.approx(1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2)  # a quarter of the way: cos(π/4)
    assert lrs[10] == pytest.approx(5.5e-4)  # halfway: (lr + min_lr) / 2
    assert lrs[16] == pytest.approx(1e-4)  # end of the horizon
    assert lrs[17:] == pytest.approx([1e-4] * 5)  # beyond it: stays at the floor
    assert all(a > b for a, b in zip(lrs[4:16], lrs[5:17]))  # strictly decreasing through the decay


def test_lr_without_warm_up_starts_at_lr():
    cfg = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=0)
    lrs = _lrs(cfg, total_steps=10, steps=13)
    assert lrs[0] == pytest.approx(2e-3)
    assert lrs[1] == pytest.approx(2e-4 + 1.8e-3 * (1 + math.cos(math.pi / 10)) / 2)
    assert lrs[5] == pytest.approx(1.1e-3)  # halfway: (lr + min_lr) / 2
    assert lrs[10:] == pytest.approx([2e-4] * 3)
