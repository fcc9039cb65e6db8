"""build_optimizer: decoupled-weight-decay Adam checked against the update rule written out by hand."""

from __future__ import annotations

import torch

from pocl_core.config import OptimConfig
from pocl_core.train_step import build_optimizer


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
