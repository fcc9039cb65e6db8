"""Tokenization and batching of samples: prompt templates, prompt truncation, encoded samples, padding.

Prompt templates: a format string with ``{prompt}``, or ``"chat"`` (``CHAT_TEMPLATE``) for the
tokenizer's own chat template with one user turn and the assistant header appended
(``add_generation_prompt=True``). The response follows, then the tokenizer's EOS (for SmolLM2 that is
``<|im_end|>``, which closes the assistant turn). Prompt tokens are never a training target:
``target_mask`` marks response tokens. Over-long prompts are left-truncated (their end is kept) at
encoding time, or dropped at load time with ``drop_long_prompts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pocl_core.data import CHAT_TEMPLATE, DataError, Sample


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of prompt + response; the first ``n_prompt`` ids are the prompt."""

    sample_id: str
    input_ids: list[int]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def prompt_ids(tokenizer: Any, prompt: str, template: str) -> list[int]:
    """Token ids of the templated prompt, untruncated."""
    if template == CHAT_TEMPLATE:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"data.prompt_template is '{CHAT_TEMPLATE}' but the tokenizer "
                            f"({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no chat_template; "
                            "use a format string with '{prompt}' instead")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        # The rendered template already holds its special tokens (BOS, turn markers): add none.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(template.format(prompt=prompt), add_special_tokens=True)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str, template: str, max_prompt_length: int) -> list[int]:
    """Template + tokenize a prompt, at most ``max_prompt_length`` tokens.

    template: a format string with ``{prompt}`` (special tokens added as the tokenizer does by
    default), or ``"chat"`` for the tokenizer's chat template (one user turn + the assistant header).
    A prompt too long loses the start of its own text, not of the template: the user text is cut from
    the left (by tokens) and rendered again, so BOS, turn markers and the response header stay. Only
    when the template alone leaves no room are the rendered tokens cut, keeping their leading
    special tokens (BOS).
    """
    ids = prompt_ids(tokenizer, prompt, template)
    if len(ids) <= max_prompt_length:
        return ids
    text_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    keep = len(text_ids) - (len(ids) - max_prompt_length)
    for _ in range(8):  # re-rendering can merge tokens at the cut differently: shrink until it fits
        if keep <= 0:
            break
        cut = prompt_ids(tokenizer, tokenizer.decode(text_ids[-keep:]), template)
        if len(cut) <= max_prompt_length:
            return cut
        keep -= len(cut) - max_prompt_length
    special = set(tokenizer.all_special_ids)
    lead = 0
    while lead < len(ids) and ids[lead] in special and lead < max_prompt_length // 2:
        lead += 1
    return ids[:lead] + ids[len(ids) - (max_prompt_length - lead):]


def encode_sample(tokenizer: Any, sample: Sample, template: str, max_prompt_length: int,
                  max_length: int) -> EncodedSample:
    """Prompt (left-truncated) + response + EOS, cut to ``max_length`` tokens."""
    prompt_ids = encode_prompt(tokenizer, sample.prompt, template, max_prompt_length)
    response_ids = tokenizer(sample.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    return EncodedSample(sample.sample_id, ids, len(prompt_ids))


def pad_id_of(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists for generation, so every row's next token goes in the same column.

    Returns input_ids [B, L] (int64, ``pad_id`` on the left) and attention_mask [B, L] (1 = real token).
    """
    if not prompts:
        raise ValueError("left_pad: no prompts")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            attn[i, width - len(p):] = 1
    return ids.to(device), attn.to(device)


def collate(batch: Sequence[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch.

    Returns input_ids [B, L] (int64), attention_mask [B, L] (1 = real token) and target_mask [B, L]
    (1 where the token is a response token, i.e. a prediction target of the previous position).
    """
    if not batch:
        raise ValueError("collate: empty batch")
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), length), dtype=torch.long)
    target = torch.zeros((len(batch), length), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attn[i, :n] = 1
        target[i, e.n_prompt:n] = 1
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target}
