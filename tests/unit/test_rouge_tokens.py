"""ROUGE-L's tokens: rouge-score's default for ASCII text, and tokens at all for other scripts."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer, tokenizers

from pocl_core.evaluate import UnicodeRougeTokenizer, rouge_l_f1


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _f1(pred: list[str], ref: list[str]) -> float:
    common = _lcs(pred, ref)
    if not pred or not ref or not common:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def test_ascii_text_gets_exactly_rouge_scores_default_tokens_and_scores():
    rng = random.Random(0)
    words = ["running", "runs", "Ran", "the", "THE", "cats'", "cat", "3.14", "x_y", "well-known", "e-mail", "", "a",
             "generously", "42nd", "(parenthesis)", "quoted\"word", "tab\tsep", "new\nline", "CamelCase", "don't"]
    default = tokenizers.DefaultTokenizer(use_stemmer=True)
    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ours = UnicodeRougeTokenizer()
    for _ in range(500):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        assert ours.tokenize(a) == default.tokenize(a)
        assert rouge_l_f1(a, b) == pytest.approx(reference.score(b, a)["rougeL"].fmeasure, abs=1e-12)


@pytest.mark.parametrize("prediction, reference, tokens_pred, tokens_ref", [
    ("Привет мир", "Привет, мир!", ["привет", "мир"], ["привет", "мир"]),
    ("привет друг", "привет мир", ["привет", "друг"], ["привет", "мир"]),
    ("日本語です", "日本語のテキストです", list("日本語です"), list("日本語のテキストです")),
    ("café crème", "cafe creme", ["café", "crème"], ["cafe", "creme"]),
    ("abc日本 running", "日本 runs", ["abc", "日", "本", "run"], ["日", "本", "run"]),
    ("한국어 문장", "한국어", ["한국어", "문장"], ["한국어"]),
])
def test_other_scripts_have_tokens_and_score_by_their_lcs(prediction, reference, tokens_pred, tokens_ref):
    tok = UnicodeRougeTokenizer()
    assert tok.tokenize(prediction) == tokens_pred and tok.tokenize(reference) == tokens_ref
    assert rouge_l_f1(prediction, reference) == pytest.approx(_f1(tokens_pred, tokens_ref))
    assert rouge_l_f1(reference, reference) == 1.0  # rouge-score's own tokenizer gives 0 for all but the ASCII rows


def test_text_without_letters_or_digits_scores_zero():
    assert rouge_l_f1("...", "!!!") == 0.0 and rouge_l_f1("", "a") == 0.0 and rouge_l_f1("a", "") == 0.0
