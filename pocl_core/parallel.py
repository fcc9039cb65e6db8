"""Sharded data parallelism for the student (FSDP2 ``fully_shard``), and what training needs around it.

DDP comes from the training engine (Ray Train's ``prepare_model``); FSDP is for students whose
weights, gradients and optimizer state do not fit one device: every transformer block is a shard
unit, and the root (embeddings, final norm, LM head) is one more. Only rank 0 reads the weights (into
host memory); the other ranks build the model on the meta device, and after sharding each rank
receives its shard from rank 0 (``materialize_from_rank0``), so the full student is never on a
device and is in host memory once per job. It runs on CUDA (NCCL) and on CPU (gloo). Helpers here
treat both wrappers (and an unwrapped module, for one worker) alike:

* ``grad_sync(model, enabled)``: skip the gradient all-reduce / reduce-scatter on accumulation
  micro-batches;
* ``full_state(model, optimizer)``: the full (unsharded) student weights and optimizer state, on
  rank 0 (None elsewhere); a collective under FSDP, so every rank must call it;
* ``load_optimizer_state(model, optimizer, state)``: the inverse for the optimizer (under FSDP
  rank 0's full state is sent to the others, which pass an empty dict);
* ``decided_by_rank0(decide)``: one answer for every rank (e.g. which checkpoint to resume), computed
  on rank 0 alone;
* ``all_ranks_succeed(work)``: work every rank does (e.g. reading its part of that checkpoint), and
  an error on any rank raised on every rank.
Under FSDP the optimizer state is keyed by parameter name (``torch.distributed.checkpoint``'s
format); under DDP it is ``optimizer.state_dict()``. A checkpoint is only resumed with the strategy
that wrote it (the strategy is part of the training key).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")
T = TypeVar("T")


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its (picklable) result returned on every rank.

    When it raises, rank 0 re-raises and every other rank raises RuntimeError with rank 0's message, so
    no rank is left waiting in a later collective. Without an initialised process group of two or more
    ranks it is just ``decide()``. Collective: every rank calls it.
    """
    if not _several_ranks():
        return decide()
    if dist.get_rank() == 0:
        try:
            value = decide()
        except BaseException as exc:  # KeyboardInterrupt, SystemExit too: no rank is left waiting
            dist.broadcast_object_list([("error", f"{type(exc).__name__}: {exc}")], src=0)
            raise
        dist.broadcast_object_list([("ok", value)], src=0)
        return value
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed, so rank {dist.get_rank()} stops too: {value}")
    return value


def all_ranks_succeed(work: Callable[[], T]) -> T:
    """``work()`` run on every rank, its result returned once every rank's call has returned.

    When it raises on any rank, every rank raises: the failing one its own exception, the others a
    RuntimeError naming the first failing rank and its message; so no rank goes on into a collective
    the failed one never reaches (e.g. rank 0 failing to read the weights the others wait for). Without
    an initialised process group of two or more ranks it is just ``work()``. Collective: every rank
    calls it, and ``work`` itself must not run collectives that a failure could leave unmatched.
    """
    if not _several_ranks():
        return work()
    value, failure, message = None, None, None
    try:
        value = work()
    except BaseException as exc:  # KeyboardInterrupt, SystemExit too: no rank is left waiting
        failure, message = exc, f"{type(exc).__name__}: {exc}"
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    if failure is not None:
        raise failure
    failed = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if failed is not None:
        raise RuntimeError(f"rank {failed[0]} failed, so rank {dist.get_rank()} stops too: {failed[1]}")
    return value  # type: ignore[return-value]


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

    Needs an initialised process group (Ray Train sets it up). ``model`` may be on the CPU (each
    unit's parameters move to ``device`` as it is sharded, one unit at a time) or on the meta device
    (then ``materialize_from_rank0`` fills it).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def same_structure_as_rank0(model: torch.nn.Module) -> bool:
    """True when ``model`` has rank 0's parameters and buffers: names, shapes and dtypes, a tied parameter
    once (a model loaded with untied weights has one parameter more than one built from a config
    that ties them). Collective: every rank calls it; rank 0's answer is True."""
    mine = [(name, tuple(t.shape), str(t.dtype))
            for name, t in itertools.chain(model.named_parameters(), model.named_buffers())]
    box: list[Any] = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0] == mine


def materialize_from_rank0(model: torch.nn.Module, full_weights: dict[str, torch.Tensor] | None,
                           device: torch.device) -> None:
    """Give every rank of a ``shard_fsdp`` model its shard of rank 0's weights, and rank 0's buffers.

    Rank 0 passes its full weights (the model's ``state_dict`` names, taken before sharding, on any
    device); the other ranks built their model on the meta device and pass None. Buffers (not all of
    them in a state dict: rotary frequencies are non-persistent) are broadcast as they are on rank 0.
    Collective: every rank calls it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    if rank != 0:
        model.to_empty(device=device)
    elif full_weights is None:
        raise ValueError("materialize_from_rank0: rank 0 must pass the full weights")
    set_model_state_dict(model, full_weights if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for _, buffer in model.named_buffers():
            dist.broadcast(buffer, src=0)


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
    """Load an optimizer state written by ``full_state`` under the same strategy.

    DDP: every rank passes the full state. FSDP: rank 0 passes the full state and the other ranks an
    empty dict; each receives its shard from rank 0 (collective).
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # torch creates the empty local state to receive into only when no parameter holds a gradient
        optimizer.zero_grad(set_to_none=True)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(state)
