"""Per-sample seeded sampling for Hugging Face ``generate``: a sample's generation does not depend on
the batch it is decoded in.

``generate(do_sample=True)`` draws every row's next token from one random stream, so a sample's text
changes with the batch size, with the other samples in its batch and with their order: scores would
move when ``scoring.batch_size`` or a shard's composition changes. Here each row draws from its own
generator, seeded from the base seed and the row's sample id, and ``generate`` runs greedily over the
result (the chosen token is the only finite score), so batching only changes padding.

The warping follows ``generate``'s own sampling: logits / temperature, then top-k, then top-p (nucleus:
the smallest set of most likely tokens whose probabilities reach ``top_p``, at least one token).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import Tensor
from pocl_core.config_sections import SamplingConfig


def stable_seed(*parts: object) -> int:
    """A 63-bit integer from the parts, identical on every machine and Python process (a seed)."""
    blob = ":".join(str(p) for p in parts).encode()
    return int(hashlib.sha256(blob).hexdigest()[:16], 16) >> 1


def sample_seed(base_seed: int, sample_id: str) -> int:
    """A sampling seed for one sample, from the run's ``base_seed`` and the sample's id."""
    return stable_seed("sample", base_seed, sample_id)


def warp_logits(scores: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """``scores`` [rows, vocab] (float) divided by ``temperature`` with every token outside the top
    ``top_k`` (0: off) and outside the nucleus of mass ``top_p`` (1: off) set to −inf; float32."""
    warped = scores.float() / temperature
    if 0 < top_k < warped.shape[-1]:
        kth = torch.topk(warped, top_k, dim=-1).values[..., -1:]
        warped = warped.masked_fill(warped < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(warped, dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # the most likely token always stays
        warped = warped.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return warped


class PerSampleSampling:
    """A ``generate`` logits processor: draw each row's next token from its own seeded generator; return
    scores that are 0 at the drawn token and −inf elsewhere, for ``generate(do_sample=False)`` to pick. Row r of the batch is the
    sample seeded by ``seeds[r]``. Generators are made on the scores' device at the first step."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
        self.seeds = list(seeds)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self._generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"PerSampleSampling has {len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
        if self._generators is None:
            self._generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(warp_logits(scores, self.temperature, self.top_k, self.top_p), dim=-1)
        tokens = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self._generators)])
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens[:, None], 0.0)


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int] | None:
    """The tokens that end a generation: the tokenizer's end-of-sequence token and the model's own
    (its generation config may list several, e.g. a chat model's end-of-turn); None when neither has one."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids or None


def decoding_kwargs(cfg: SamplingConfig, pad_id: int, eos_ids: int | list[int] | None, seeds: Sequence[int],
                    sample: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of ``generate`` for one batch whose rows are seeded by ``seeds``: greedy when
    ``sample`` (default ``cfg.do_sample``) is off, else per-sample sampling (``PerSampleSampling``)."""
    from transformers import LogitsProcessorList  # here: the config imports this module's users early

    sample = cfg.do_sample if sample is None else sample
    # generate itself always decodes greedily: with sampling, the drawn token is the only finite score
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_ids,
                              "no_repeat_ngram_size": cfg.no_repeat_ngram_size or None, "do_sample": False}
    if sample:
        kwargs["logits_processor"] = LogitsProcessorList(
            [PerSampleSampling(seeds, cfg.temperature, cfg.top_k, cfg.top_p)])
    return kwargs
