"""Per-sample difficulty measures computed by one scoring model, and the batched scoring pass.

A measure maps a batch of encoded samples to one float per sample; measures are looked up by name
in ``MEASURES`` (add one there, with its direction in ``HIGHER_IS_HARDER``, and it can be named in
``scoring.measures``). Built in:

* ``nll`` (higher = harder): mean per-token cross-entropy (nats) of the reference response given
  the prompt, prompt tokens masked.
* ``rouge_l`` (higher = easier): ROUGE-L F1 (``evaluate.rouge_l_f1``, stemmed) of the model's own
  near-greedy answer to the prompt against the reference response (``scoring.generation``).

Measures that are a per-token function of the logits (``TOKEN_MEASURES``, e.g. ``nll``) share one
forward pass in :func:`score_batch`, which evaluates the LM head only at response positions (the
prompt positions are never scored; with a large vocabulary this halves the cost or better) in
memory-bounded chunks, and can return the teacher-cache rows (``teacher_cache.topk_rows``) from the
same forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pocl_core.config import ScoringGenerationConfig
from pocl_core.encoding import EncodedSample, collate, left_pad
from pocl_core.lm_head import head_logits
from pocl_core.sampling import decoding_kwargs, sample_seed, stop_token_ids
from pocl_core.teacher_cache import CacheRows, topk_rows
from pocl_core.train_step import response_positions

# Logit elements per LM-head chunk in score_batch (2**24 float32 = 64 MiB).
CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class ScoringContext:
    """What a measure gets besides the batch.

    model / tokenizer / pad_id / device: the scoring model and how to feed it. generation: decoding
    settings of generative measures. references: ``sample_id -> reference response text`` for
    text-level measures (when absent, the reference is decoded from the response tokens).
    vocab_columns: logit columns the token measures read (the tokenizer's size; None: the LM head's).
    """

    model: torch.nn.Module
    tokenizer: Any
    pad_id: int
    device: torch.device
    generation: ScoringGenerationConfig = field(default_factory=ScoringGenerationConfig)
    references: Mapping[str, str] | None = None
    vocab_columns: int | None = None


def logit_columns(model: torch.nn.Module, tokenizer: Any) -> int:
    """The logit columns that are tokens: the tokenizer's size, capped by the LM head's rows."""
    return min(len(tokenizer), model.get_output_embeddings().weight.shape[0])


def response_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of response tokens from a full forward (LM head on every position).

    Returns (nll [B, L-1] float32 nats, mask [B, L-1] float32), position t scoring token t+1;
    masked positions are zeroed. ``score_batch`` is the faster path used for scoring.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["target_mask"][:, 1:].to(torch.float32)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return nll * mask, mask


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of each row: logits [n, V] (any float dtype), targets [n] -> float32 [n]."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


# Per-token measures: (logits [n, V], targets [n]) -> [n]; the sample value is the mean over its
# response tokens. They share score_batch's forward pass.
TOKEN_MEASURES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"nll": token_nll}


@dataclass
class BatchScores:
    """score_batch's result, in batch order: ``values[measure][i]`` for sample i, and (when asked)
    ``cache[i]`` = (ids int32 [n_i, k], logits float32 [n_i, k], lse float32 [n_i], tail_lse float32
    [n_i, n_T]) numpy arrays."""

    values: dict[str, list[float]]
    cache: list[CacheRows] | None = None


@torch.no_grad()
def score_batch(ctx: ScoringContext, batch: Sequence[EncodedSample], measures: Sequence[str],
                cache_topk: int = 0, vocab_columns: int | None = None,
                cache_temperatures: Sequence[float] = ()) -> BatchScores:
    """All ``measures`` of one batch, plus the teacher-cache rows when ``cache_topk > 0``.

    Token measures and the cache come from one forward of the decoder whose LM head runs only at
    response positions, ``CHUNK_ELEMENTS`` logits at a time. ``vocab_columns`` (default
    ``ctx.vocab_columns``) cuts the logits to the tokenizer's width (rows of a padded embedding are no
    tokens) before the token measures and the cache's top-k / log-sum-exps; ``cache_temperatures``:
    the T's of the cache's tail log-sum-exps.
    """
    token_names = [m for m in measures if m in TOKEN_MEASURES]
    vocab_columns = vocab_columns or ctx.vocab_columns
    values: dict[str, list[float]] = {}
    cache: list[CacheRows] | None = None
    if token_names or cache_topk > 0:
        tensors = {k: v.to(ctx.device) for k, v in collate(batch, ctx.pad_id).items()}
        rows, cols = response_positions(tensors["target_mask"])
        hidden = ctx.model.base_model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                                      use_cache=False, return_dict=True).last_hidden_state[rows, cols]
        targets = tensors["input_ids"][rows, cols + 1]
        width = ctx.model.get_output_embeddings().weight.shape[0]
        step = max(1, CHUNK_ELEMENTS // width)
        sums = {m: torch.zeros(len(batch), dtype=torch.float64, device=ctx.device) for m in token_names}
        parts: list[tuple[torch.Tensor, ...]] = []  # topk_rows per LM-head chunk
        for start in range(0, hidden.shape[0], step):
            logits = head_logits(ctx.model, hidden[start:start + step])
            if vocab_columns:
                logits = logits[:, :vocab_columns]
            owner = rows[start:start + step]
            for m in token_names:
                sums[m].index_add_(0, owner, TOKEN_MEASURES[m](logits, targets[start:start + step]).double())
            if cache_topk > 0:
                parts.append(topk_rows(logits, cache_topk, cache_temperatures))
        counts = tensors["target_mask"][:, 1:].sum(dim=1)
        for m in token_names:
            values[m] = (sums[m] / counts.clamp_min(1)).cpu().tolist()
        if cache_topk > 0:
            cache = _split_cache(parts, counts.cpu().tolist(), cache_topk, len(cache_temperatures))
    for m in measures:
        if m not in TOKEN_MEASURES:
            values[m] = [float(v) for v in get_measure(m)(ctx, batch)]
    return BatchScores({m: values[m] for m in measures}, cache)


def _split_cache(parts: list[tuple[torch.Tensor, ...]], counts: list[int], k: int, n_temps: int) -> list[CacheRows]:
    if parts:
        ids, logits, lse, tail = (torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(4))
    else:
        ids, logits = np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        lse, tail = np.zeros(0, np.float32), np.zeros((0, n_temps), np.float32)
    bounds = np.cumsum([0] + counts)
    return [(ids[a:b], logits[a:b], lse[a:b], tail[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def measure_nll(ctx: ScoringContext, batch: Sequence[EncodedSample]) -> list[float]:
    """Mean response NLL per sample (nats/token)."""
    return score_batch(ctx, batch, ["nll"]).values["nll"]


@torch.no_grad()
def generate_continuations(ctx: ScoringContext, batch: Sequence[EncodedSample]) -> list[str]:
    """The scoring model's answer to each sample's prompt (its first ``n_prompt`` tokens), batch order.

    Prompts are left-padded; decoding follows ``ctx.generation``; each sample draws from its own
    generator seeded by ``generation.seed`` and its id (``pocl_core.sampling``), so its answer does not
    depend on the batch it is in, and the caller's RNG state is left untouched.
    """
    gen = ctx.generation
    ids, attn = left_pad([e.input_ids[:e.n_prompt] for e in batch], ctx.pad_id, ctx.device)
    width = ids.shape[1]
    seeds = [sample_seed(gen.seed, e.sample_id) for e in batch]
    out = ctx.model.generate(input_ids=ids, attention_mask=attn,
                             **decoding_kwargs(gen, ctx.pad_id, stop_token_ids(ctx.model, ctx.tokenizer), seeds))
    return [ctx.tokenizer.decode(out[r, width:], skip_special_tokens=True).strip() for r in range(len(batch))]


def reference_texts(ctx: ScoringContext, batch: Sequence[EncodedSample]) -> list[str]:
    """Reference responses of a batch: from ``ctx.references`` by id, else decoded from the tokens."""
    if ctx.references is not None:
        missing = [e.sample_id for e in batch if e.sample_id not in ctx.references]
        if missing:
            raise KeyError(f"no reference text for sample(s) {missing[:5]} in ScoringContext.references")
        return [ctx.references[e.sample_id] for e in batch]
    return [ctx.tokenizer.decode(e.input_ids[e.n_prompt:], skip_special_tokens=True).strip() for e in batch]


def measure_rouge_l(ctx: ScoringContext, batch: Sequence[EncodedSample]) -> list[float]:
    """ROUGE-L F1 in [0, 1] of the model's near-greedy answer vs the reference, per sample."""
    from pocl_core.evaluate import rouge_l_f1  # evaluate imports this module: import late

    answers = generate_continuations(ctx, batch)
    return [rouge_l_f1(a, r) for a, r in zip(answers, reference_texts(ctx, batch))]


Measure = Callable[[ScoringContext, Sequence[EncodedSample]], list[float]]

MEASURES: dict[str, Measure] = {"nll": measure_nll, "rouge_l": measure_rouge_l}

# For each measure: True if a higher value means a harder sample.
HIGHER_IS_HARDER: dict[str, bool] = {"nll": True, "rouge_l": False}

# Measures whose values depend on ``scoring.generation`` (part of their provenance).
GENERATIVE_MEASURES: frozenset[str] = frozenset({"rouge_l"})


def get_measure(name: str) -> Measure:
    if name not in MEASURES:
        raise ValueError(f"unknown difficulty measure '{name}'; available: {sorted(MEASURES)}")
    return MEASURES[name]


def length_sorted_batches(encoded: Sequence[EncodedSample], batch_size: int) -> Iterator[list[EncodedSample]]:
    """Batches of similar length (longest first) to minimise padding; order within is by length."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), encoded[i].sample_id))
    for start in range(0, len(order), batch_size):
        yield [encoded[i] for i in order[start:start + batch_size]]
