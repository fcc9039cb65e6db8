"""Teacher/student vocabulary checks, run before any distillation compute.

Token-level KD compares the two models' logits column by column, so both must index the *same*
tokenizer. Models often have more embedding rows (logit columns) than the tokenizer has tokens
(padded to a multiple of 64/128 for speed); those extra columns are not tokens and are dropped, so
only the first ``len(tokenizer)`` columns are compared.

    width = check_vocab_compatible(t_tok, s_tok, t_model.config.vocab_size, s_model.config.vocab_size)
    student_logits = slice_to_common_vocab(student_logits, width)
    teacher_logits = slice_to_common_vocab(teacher_logits, width)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_SHOW = 5  # how many differing tokens an error message lists


def _vocab_differences(teacher_vocab: dict[str, int], student_vocab: dict[str, int]) -> list[str]:
    """Up to ``_SHOW`` human-readable differences between two token -> id maps."""
    diffs: list[str] = []
    for token in sorted(set(teacher_vocab) | set(student_vocab)):
        t_id, s_id = teacher_vocab.get(token), student_vocab.get(token)
        if t_id != s_id:
            diffs.append(f"{token!r}: teacher id {t_id}, student id {s_id}")
            if len(diffs) == _SHOW:
                break
    return diffs


def check_vocab_compatible(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    teacher_vocab_size: int,
    student_vocab_size: int,
) -> int:
    """Check that teacher and student share one tokenizer; return the number of logit columns to compare.

    Args:
        teacher_tokenizer / student_tokenizer: Hugging Face tokenizers (``len()`` and ``get_vocab()``).
        teacher_vocab_size / student_vocab_size: each model's logit width (embedding rows), which may
            exceed ``len(tokenizer)`` through padding.

    Returns:
        ``len(tokenizer)``: compare logits ``[..., :width]`` of both models.

    Raises:
        ValueError: the tokenizers differ (size or token -> id map, with examples), or a model has
            fewer logit columns than the tokenizer has tokens.
    """
    n_teacher, n_student = len(teacher_tokenizer), len(student_tokenizer)
    if n_teacher != n_student:
        raise ValueError(
            f"teacher and student tokenizers differ in size ({n_teacher} vs {n_student} tokens); "
            "token-level distillation needs one shared tokenizer: pick models of the same family"
        )
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        examples = "; ".join(_vocab_differences(teacher_vocab, student_vocab))
        raise ValueError(
            f"teacher and student tokenizers have the same size ({n_teacher}) but different "
            f"token -> id maps (e.g. {examples}); token-level distillation needs one shared tokenizer"
        )
    for role, size in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
        if int(size) < n_teacher:
            raise ValueError(
                f"the {role} model has {size} logit columns but its tokenizer has {n_teacher} tokens; "
                "the model cannot score every token (wrong tokenizer for this checkpoint?)"
            )
    return n_teacher


def slice_to_common_vocab(logits: Tensor, width: int) -> Tensor:
    """``logits[..., :width]`` (a view): drop padded embedding columns past the tokenizer's size."""
    if logits.shape[-1] < width:
        raise ValueError(f"logits have {logits.shape[-1]} columns, fewer than the common width {width}")
    return logits[..., :width]


def mask_padded_vocab(logits: Tensor, width: int) -> Tensor:
    """Copy of ``logits`` with columns ``>= width`` set to ``-inf`` (keeps the shape).

    For code that needs the model's full width: ``-inf`` columns contribute nothing to any KD loss.
    """
    if logits.shape[-1] < width:
        raise ValueError(f"logits have {logits.shape[-1]} columns, fewer than the common width {width}")
    out = logits.clone()
    out[..., width:] = float("-inf")
    return out


def padded_vocab_mask(vocab_size: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Bool ``[vocab_size]``: True for real token columns (``< width``), False for padding."""
    return torch.arange(vocab_size, device=device) < width
