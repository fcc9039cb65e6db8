"""Held-out evaluation: ROUGE-L F1 (×100) of generations against references, and response NLL.

ROUGE-L uses the ``rouge-score`` package with Porter stemming (the method's metric), its tokenizer
extended past ASCII (``UnicodeRougeTokenizer``: the same tokens for ASCII text). Generations
are sampled per seed with the configured settings (temperature 1, top_k 0, top_p 1,
no_repeat_ngram_size 6 by default; greedy when ``do_sample`` is False), plus one greedy pass when
``greedy`` is set (reported separately: it is seed-independent).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pocl_core.config import EvalConfig
from pocl_core.data import Sample
from pocl_core.encoding import encode_prompt, encode_sample, left_pad, pad_id_of
from pocl_core.measures import ScoringContext, length_sorted_batches, logit_columns, measure_nll
from pocl_core.sampling import decoding_kwargs, sample_seed, stop_token_ids


# Scripts written without spaces between words: each character is a token.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W_{_UNSPACED}]+")


class UnicodeRougeTokenizer:
    """rouge-score's default tokenization, extended to every script.

    The default lowercases, keeps maximal runs of ``[a-z0-9]`` and Porter-stems those longer than 3
    characters, so a text in any other script has no tokens and scores 0, even against itself. Here a
    token is a maximal run of Unicode letters and digits (ASCII runs stemmed as before: ASCII text
    gets exactly the default's tokens), and each Han, Hiragana or Katakana character is a token of its
    own (those scripts do not put spaces between words).
    """

    def __init__(self) -> None:
        from nltk.stem import porter  # what rouge-score's default tokenizer stems with

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in _TOKEN.findall(text.lower())]


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeRougeTokenizer())


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] with stemming (``UnicodeRougeTokenizer``); 0 when either text has no tokens."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


@dataclass(frozen=True)
class Generation:
    decoding: str  # "sampled" or "greedy"
    seed: int
    sample_id: str
    generation: str
    reference: str
    rouge_l: float


@torch.no_grad()
def generate_responses(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample], *, template: str,
                       max_prompt_length: int, cfg: EvalConfig, seed: int, device: torch.device,
                       sample: bool | None = None) -> list[str]:
    """One generation per sample (same order as ``samples``), prompts left-padded in batches.

    ``sample`` overrides ``cfg.do_sample`` (False: greedy, the sampling settings are ignored). Each
    sample draws from its own generator seeded by ``seed`` and its id (``pocl_core.sampling``): its
    text does not depend on ``cfg.batch_size`` or on the other samples, and the global RNG is untouched.
    """
    sample = cfg.do_sample if sample is None else sample
    pad = pad_id_of(tokenizer)
    stop = stop_token_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, s.prompt, template, max_prompt_length) for s in samples]
    out: list[str] = [""] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        ids, attn = left_pad([prompts[i] for i in idx], pad, device)
        width = ids.shape[1]
        seeds = [sample_seed(seed, samples[i].sample_id) for i in idx]
        seqs = model.generate(input_ids=ids, attention_mask=attn,
                              **decoding_kwargs(cfg, pad, stop, seeds, sample=sample))
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(seqs[r, width:], skip_special_tokens=True).strip()
    return out


def evaluate_generations(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample], *, template: str,
                         max_prompt_length: int, cfg: EvalConfig, device: torch.device) -> list[Generation]:
    """Generations and their ROUGE-L: one pass per seed in ``cfg.seeds`` (decoding "sampled", or
    "greedy" when ``cfg.do_sample`` is off), then one greedy pass (seed 0) if ``cfg.greedy`` and sampling."""
    passes = [(seed, cfg.do_sample) for seed in cfg.seeds]
    if cfg.greedy and cfg.do_sample:
        passes.append((0, False))
    rows = []
    for seed, sample in passes:
        texts = generate_responses(model, tokenizer, samples, template=template, max_prompt_length=max_prompt_length,
                                   cfg=cfg, seed=seed, device=device, sample=sample)
        rows += [Generation("sampled" if sample else "greedy", seed, s.sample_id, t, s.response, rouge_l_f1(t, s.response))
                 for s, t in zip(samples, texts)]
    return rows


def mean_response_nll(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample], *, template: str,
                      max_prompt_length: int, max_length: int, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean NLL (nats/token) of the reference responses."""
    encoded = [encode_sample(tokenizer, s, template, max_prompt_length, max_length) for s in samples]
    ctx = ScoringContext(model, tokenizer, pad_id_of(tokenizer), device, vocab_columns=logit_columns(model, tokenizer))
    total = tokens = 0.0
    for batch in length_sorted_batches(encoded, batch_size):
        for e, nll in zip(batch, measure_nll(ctx, batch)):
            total += nll * e.n_response
            tokens += e.n_response
    return total / max(tokens, 1.0)


def summarize_rouge(rows: Sequence[Generation], decoding: str | None = None) -> tuple[float, float]:
    """(mean over seeds of the per-seed mean ROUGE-L ×100, std over seeds ×100; 0 with one seed).

    Only the rows of ``decoding`` when given (e.g. "greedy"); NaN, NaN when there are none.
    """
    rows = [r for r in rows if decoding is None or r.decoding == decoding]
    seeds = sorted({r.seed for r in rows})
    if not seeds:
        return float("nan"), float("nan")
    per_seed = [100.0 * float(np.mean([r.rouge_l for r in rows if r.seed == s])) for s in seeds]
    return float(np.mean(per_seed)), float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
