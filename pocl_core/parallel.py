"""Sharded data parallelism for the student (FSDP2 ``fully_shard``), and what training needs around it.

DDP comes from the training engine (Ray Train's ``prepare_model``); FSDP is for students whose
gradients and optimizer state do not fit one device beside the weights (each worker still loads the
whole float32 student before ``shard_fsdp``): every transformer block is a shard unit, and the root
(embeddings, final norm, LM head) is one more. It runs on CUDA (NCCL) and on CPU (gloo). Helpers here treat both wrappers (and an unwrapped module, for one worker) alike:

* ``grad_sync(model, enabled)``: skip the gradient all-reduce / reduce-scatter on accumulation
  micro-batches;
* ``full_state(model, optimizer)``: the full (unsharded) student weights and optimizer state, on
  rank 0 (None elsewhere); a collective under FSDP, so every rank must call it;
* ``load_optimizer_state(model, optimizer, state)``: the inverse for the optimizer.
Under FSDP the optimizer state is keyed by parameter name (``torch.distributed.checkpoint``'s
format); under DDP it is ``optimizer.state_dict()``. A checkpoint is only resumed with the strategy
that wrote it (the strategy is part of the training key).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")


def transformer_blocks(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of a Hugging Face causal LM (Llama/Qwen/Mistral/Gemma/GPT-2 layouts)."""
    base = getattr(lm, "base_model", lm)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return list(blocks)
    raise ValueError(f"cannot find the transformer blocks of {type(lm).__name__} (looked for base_model."
                     "layers / .h / .blocks); train.parallel_strategy=fsdp needs one of them")


def shard_fsdp(model: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device) -> torch.nn.Module:
    """Apply FSDP2 to ``model`` in place: each of ``blocks`` a unit, then the root; returns ``model``.

    Needs an initialised process group (Ray Train sets it up). The model must already be on ``device``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place: the model is its own module)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, synchronise gradients across ranks only if ``enabled``."""
    if enabled:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               rank: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(weights, optimizer state) of the whole model on CPU for rank 0; (None, None) on other ranks.

    Weight names are the unwrapped model's ``state_dict`` names. Collective under FSDP.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
        return (weights, optim) if rank == 0 else (None, None)
    if rank != 0:
        return None, None
    weights = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return weights, optimizer.state_dict() if optimizer is not None else None


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer state written by ``full_state`` under the same strategy (every rank, full state)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
