"""GKD on-policy mixing: train some steps on the student's own generations instead of the dataset's.

GKD (Agarwal et al. 2023, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes") distils on a mix: with probability λ_on (``loss.on_policy_fraction``) an optimizer step's
responses are sampled from the *current* student for the step's prompts, and the teacher's
distributions are computed on those sequences; otherwise the dataset's responses are used. The
divergence is the configured KD loss (``gjsd`` is GKD's generalized JSD).

What this module decides and builds (no Prefect or Ray imports):

* ``on_policy_step(seed, global_step, fraction)``: whether an optimizer step is on-policy. A pure
  function of (seed, step), so every DDP rank takes the same branch and a resumed run repeats the
  decisions of an uninterrupted one.
* ``generation_seed(seed, global_step, rank)``: the seed of a rank's sampling generator for a step.
* ``sample_responses``: ancestral sampling with a KV cache and an explicit ``torch.Generator``
  (never the global RNG, so dropout and the checkpointed RNG state are untouched).
* ``generate_on_policy``: prompt part of encoded samples → new ``EncodedSample``s whose response is
  the student's generation; ``encoding.collate`` turns them into the usual batch (input ids, attention
  mask, target mask covering exactly the generated tokens, up to and including EOS).
* ``ReplayBuffer``: the last N generations of one rank, evicted oldest-first.
* ``OnPolicyMixer``: the per-step glue the training loop calls.

Replay buffer (``loss.replay_buffer_size`` N > 0): on an on-policy step each rank generates fresh
responses for all of its prompts and appends them to its buffer (oldest evicted beyond N); the
step then trains on as many samples as it has prompts, drawn uniformly without replacement from
the whole buffer (fresh and earlier generations alike) with a generator seeded from (seed, step,
rank). It spreads each on-policy step over the student's recent generations; it does not save
generation. Checkpoints hold every worker's buffer, so a resumed run draws what an uninterrupted one
would (``pocl_core.checkpoint``, ``replay_buffer.json``).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

import torch

from pocl_core.encoding import EncodedSample, left_pad
from pocl_core.sampling import stable_seed

_DECISION_TAG = "pocl-gkd-on-policy"
_GENERATION_TAG = "pocl-gkd-generation"
_REPLAY_TAG = "pocl-gkd-replay"


def on_policy_step(seed: int, global_step: int, fraction: float) -> bool:
    """Whether optimizer step ``global_step`` (0-based) trains on student generations.

    A uniform draw from a hash of (seed, step) compared with ``fraction``: the same on every rank
    and after a resume. 0 is never, 1 is always.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return stable_seed(_DECISION_TAG, seed, global_step) / float(1 << 63) < fraction


def generation_seed(seed: int, global_step: int, rank: int) -> int:
    """Seed of rank ``rank``'s sampling generator at step ``global_step`` (differs per rank and step)."""
    return stable_seed(_GENERATION_TAG, seed, global_step, rank)


@torch.no_grad()
def sample_responses(lm: torch.nn.Module, prompts: Sequence[Sequence[int]], budgets: Sequence[int], *,
                     temperature: float, eos_id: int | Sequence[int] | None, pad_id: int,
                     generator: torch.Generator, vocab_columns: int | None = None) -> list[list[int]]:
    """Sample one continuation per prompt from a Hugging Face causal LM.

    Args:
        lm: the (unwrapped) Hugging Face causal LM, called with a KV ``cache`` and ``logits_to_keep=1``
            (transformers 5). The caller sets eval mode.
        prompts: token ids of each prompt (non-empty).
        budgets: the most tokens to generate for each prompt (>= 1).
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        eos_id: a row stops after emitting it, or any of several (the tokenizer's and the model's own end
            tokens; it is kept); None runs every row to its budget.
        pad_id: id used for left padding (masked out, never read).
        generator: the only source of randomness; on the model's device.
        vocab_columns: sample only among the first this many columns (the tokenizer's width; padded
            embedding rows are never sampled).

    Returns:
        The generated ids per prompt: ``budgets[i]`` tokens, or fewer ending with a stop token.
    """
    if len(prompts) != len(budgets) or not prompts:
        raise ValueError(f"sample_responses: {len(prompts)} prompts and {len(budgets)} budgets (need equal, > 0)")
    if any(not p for p in prompts) or any(b < 1 for b in budgets):
        raise ValueError("sample_responses: every prompt needs a token and every budget must be >= 1")
    if temperature < 0:
        raise ValueError(f"sample_responses: temperature must be >= 0, got {temperature}")
    device = next(lm.parameters()).device
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    ids, attn = left_pad(prompts, pad_id, device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    budget = torch.tensor(list(budgets), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    cache = None
    step_ids, step_pos = ids, positions
    for t in range(max(budgets)):
        res = lm(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, cache=cache, use_cache=True,
                 logits_to_keep=1)
        cache = res.cache
        logits = res.logits[:, -1, :vocab_columns].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(-1)
        steps.append(nxt)
        done |= t + 1 >= budget
        if stops:
            done |= torch.isin(nxt, stop_ids)
        if bool(done.all()):
            break
        # Finished rows keep running (batch shape) on padding; their tokens are cut below.
        step_ids = torch.where(done, torch.full_like(nxt, pad_id), nxt).unsqueeze(-1)
        step_pos = positions[:, -1:] + t + 1
        attn = torch.cat([attn, torch.ones_like(step_ids)], dim=-1)
    out = []
    for row, b in zip(torch.stack(steps, dim=1).tolist(), budgets):
        row = row[:b]
        ends = [i for i, token in enumerate(row) if token in stops]
        if ends:
            row = row[:ends[0] + 1]
        out.append(row)
    return out


def generate_on_policy(lm: torch.nn.Module, samples: Sequence[EncodedSample], *, max_new_tokens: int,
                       max_length: int, temperature: float, eos_id: int | Sequence[int] | None, pad_id: int,
                       generator: torch.Generator, vocab_columns: int | None = None) -> list[EncodedSample]:
    """Replace each sample's response with the student's own, sampled from its prompt.

    Each sample keeps its id and prompt (``input_ids[:n_prompt]``); its response becomes at most
    ``min(max_new_tokens, max_length - n_prompt)`` sampled tokens, ending at (and including) EOS
    when the student emits it. Runs in eval mode under no_grad and restores ``lm``'s mode.
    """
    prompts = [s.input_ids[:s.n_prompt] for s in samples]
    budgets = [min(max_new_tokens, max_length - len(p)) for p in prompts]
    was_training = lm.training
    lm.eval()
    try:
        responses = sample_responses(lm, prompts, budgets, temperature=temperature, eos_id=eos_id, pad_id=pad_id,
                                     generator=generator, vocab_columns=vocab_columns)
    finally:
        lm.train(was_training)
    return [EncodedSample(s.sample_id, list(p) + r, len(p)) for s, p, r in zip(samples, prompts, responses)]


class ReplayBuffer:
    """The ``capacity`` most recent student generations of one rank; the oldest is evicted first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[EncodedSample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, samples: Iterable[EncodedSample]) -> None:
        """Append in order; beyond capacity the oldest entries drop out."""
        self._items.extend(samples)

    def items(self) -> list[EncodedSample]:
        """The buffered generations, oldest first."""
        return list(self._items)

    def draw(self, k: int, generator: torch.Generator) -> list[EncodedSample]:
        """``k`` distinct entries, uniformly at random (a CPU generator picks them)."""
        if not 0 < k <= len(self._items):
            raise ValueError(f"ReplayBuffer.draw: asked for {k} of {len(self._items)} buffered generations")
        order = torch.randperm(len(self._items), generator=generator)[:k].tolist()
        return [self._items[i] for i in order]


class OnPolicyMixer:
    """Per-step choice between the dataset's samples and the student's generations (one rank).

    ``samples_for_step(global_step, local)`` returns ``(samples to train on, on_policy)``. Off-policy
    steps return ``local`` itself, untouched. ``lm`` is the unwrapped causal LM (``model.module``
    under DDP): generation needs no gradient synchronisation.
    """

    def __init__(self, lm: torch.nn.Module, *, fraction: float, max_new_tokens: int, temperature: float,
                 replay_buffer_size: int, seed: int, rank: int, max_length: int, eos_id: int | Sequence[int] | None,
                 pad_id: int, vocab_columns: int | None = None) -> None:
        self.lm = lm
        self.fraction = fraction
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.rank = rank
        self.max_length = max_length
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_columns = vocab_columns
        self.buffer = ReplayBuffer(replay_buffer_size) if replay_buffer_size > 0 else None

    def is_on_policy(self, global_step: int) -> bool:
        return on_policy_step(self.seed, global_step, self.fraction)

    def samples_for_step(self, global_step: int,
                         local: Sequence[EncodedSample]) -> tuple[Sequence[EncodedSample], bool]:
        if not self.is_on_policy(global_step):
            return local, False
        device = next(self.lm.parameters()).device
        gen = torch.Generator(device=device).manual_seed(generation_seed(self.seed, global_step, self.rank))
        fresh = generate_on_policy(self.lm, local, max_new_tokens=self.max_new_tokens, max_length=self.max_length,
                                   temperature=self.temperature, eos_id=self.eos_id, pad_id=self.pad_id,
                                   generator=gen, vocab_columns=self.vocab_columns)
        if self.buffer is None:
            return fresh, True
        self.buffer.add(fresh)
        pick = torch.Generator().manual_seed(stable_seed(_REPLAY_TAG, self.seed, global_step, self.rank))
        return self.buffer.draw(len(local), pick), True
