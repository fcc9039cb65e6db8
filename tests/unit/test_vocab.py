"""Vocabulary compatibility checks, with tiny BPE tokenizers built in the test (no downloads)."""

from __future__ import annotations

import pytest
import torch

from pocl_core.losses import kd_divergence
from pocl_core.vocab import (
    check_vocab_compatible,
    mask_padded_vocab,
    padded_vocab_mask,
    slice_to_common_vocab,
)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CORPUS = ["the cat sat on the mat", "a dog ate the bone", "the bird sang a song"] * 5


def _tokenizer(corpus: list[str], vocab_size: int, specials: list[str] | None = None):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials or ["[UNK]", "[PAD]"]
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def shared():
    return _tokenizer(CORPUS, 60)


def test_same_tokenizer_returns_tokenizer_size_despite_padded_rows(shared):
    twin = _tokenizer(CORPUS, 60)  # trained identically: same token -> id map
    n = len(shared)
    assert check_vocab_compatible(shared, twin, n + 28, n + 20) == n


def test_different_size_is_rejected_before_compute(shared):
    other = _tokenizer(CORPUS, 30)
    assert len(other) != len(shared)
    with pytest.raises(ValueError, match="differ in size"):
        check_vocab_compatible(shared, other, 128, 128)


def test_same_size_different_ids_is_rejected_with_examples(shared):
    swapped = _tokenizer(CORPUS, 60, specials=["[PAD]", "[UNK]"])  # same tokens, two ids swapped
    assert len(swapped) == len(shared)
    with pytest.raises(ValueError, match=r"different token -> id maps.*\[(PAD|UNK)\]"):
        check_vocab_compatible(shared, swapped, 128, 128)


def test_model_narrower_than_tokenizer_is_rejected(shared):
    with pytest.raises(ValueError, match="student model has 10 logit columns"):
        check_vocab_compatible(shared, shared, 128, 10)


def test_slice_and_mask_padded_columns_give_the_same_divergence(shared):
    width = check_vocab_compatible(shared, shared, 128, 120)
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 128)
    student = torch.randn(2, 3, 120)
    mask = torch.ones(2, 3, dtype=torch.bool)
    sliced = kd_divergence(
        "rkl", slice_to_common_vocab(student, width), slice_to_common_vocab(teacher, width), mask
    )
    # Masking the padded columns to -inf (after slicing both to one width) changes nothing.
    s_masked = mask_padded_vocab(slice_to_common_vocab(student, 120), width)
    t_masked = mask_padded_vocab(slice_to_common_vocab(teacher, 120), width)
    masked = kd_divergence("rkl", s_masked, t_masked, mask)
    torch.testing.assert_close(sliced, masked)
    assert padded_vocab_mask(120, width).sum().item() == width


def test_slice_rejects_too_narrow_logits():
    with pytest.raises(ValueError, match="fewer than the common width"):
        slice_to_common_vocab(torch.zeros(2, 5), 6)
