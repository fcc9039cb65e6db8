"""Per-sample difficulty measures computed by one scoring model.

Each measure maps a batch of encoded samples to one float per sample. ``nll`` is the mean per-token
cross-entropy (nats) of the reference response given the prompt, prompt tokens masked. Measures are
looked up by name in ``MEASURES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from pocl_core.data import EncodedSample, collate


@dataclass(frozen=True)
class ScoringContext:
    """What a measure gets besides the batch: the model, its tokenizer, pad id and device."""

    model: torch.nn.Module
    tokenizer: Any
    pad_id: int
    device: torch.device


def response_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of response tokens.

    Returns (nll [B, L-1] float32 nats, mask [B, L-1] float32), position t scoring token t+1.
    The lm_head is evaluated on every position here; masked positions are zeroed.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["target_mask"][:, 1:].to(torch.float32)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return nll * mask, mask


@torch.no_grad()
def measure_nll(ctx: ScoringContext, batch: Sequence[EncodedSample]) -> list[float]:
    """Mean response NLL per sample (nats/token)."""
    tensors = {k: v.to(ctx.device) for k, v in collate(batch, ctx.pad_id).items()}
    nll, mask = response_token_nll(ctx.model, tensors)
    per_sample = nll.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return per_sample.double().cpu().tolist()


Measure = Callable[[ScoringContext, Sequence[EncodedSample]], list[float]]

MEASURES: dict[str, Measure] = {"nll": measure_nll}

# For each measure: True if a higher value means a harder sample.
HIGHER_IS_HARDER: dict[str, bool] = {"nll": True}


def get_measure(name: str) -> Measure:
    if name not in MEASURES:
        raise ValueError(f"unknown difficulty measure '{name}'; available: {sorted(MEASURES)}")
    return MEASURES[name]


def length_sorted_batches(encoded: Sequence[EncodedSample], batch_size: int) -> Iterator[list[EncodedSample]]:
    """Batches of similar length (longest first) to minimise padding; order within is by length."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), encoded[i].sample_id))
    for start in range(0, len(order), batch_size):
        yield [encoded[i] for i in order[start:start + batch_size]]
