"""Difficulty measures on the tiny models: the shared forward pass, the cache rows, and rouge_l."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import pocl_core.measures as measures_mod
from pocl_core.config import ScoringGenerationConfig
from pocl_core.data import load_samples
from pocl_core.encoding import encode_sample, pad_id_of
from pocl_core.evaluate import rouge_l_f1
from pocl_core.losses import SparseTeacher
from pocl_core.measures import (HIGHER_IS_HARDER, MEASURES, ScoringContext, generate_continuations,
                                get_measure, measure_nll, measure_rouge_l, reference_texts, response_token_nll,
                                score_batch)
from pocl_core.models import load_causal_lm, load_tokenizer
from pocl_core.train_step import ResponseLogitsLM

TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@pytest.fixture(scope="module")
def scoring(tiny_models, tiny_data_path):
    """(teacher context, student context, 12 encoded samples, their samples) on CPU."""
    tok = load_tokenizer(str(tiny_models.student))
    samples = load_samples(tiny_data_path)[0][::30][:12]
    encoded = [encode_sample(tok, s, TEMPLATE, 64, 96) for s in samples]
    gen = ScoringGenerationConfig(max_new_tokens=12)
    ctxs = [ScoringContext(load_causal_lm(str(p)).eval(), tok, pad_id_of(tok), torch.device("cpu"), gen,
                           {s.sample_id: s.response for s in samples})
            for p in (tiny_models.teacher, tiny_models.student)]
    return ctxs[0], ctxs[1], encoded, samples


def test_registry_names_and_directions():
    assert set(MEASURES) >= {"nll", "rouge_l"}
    assert HIGHER_IS_HARDER["nll"] is True and HIGHER_IS_HARDER["rouge_l"] is False
    with pytest.raises(ValueError, match="unknown difficulty measure 'bleu'.*'nll', 'rouge_l'"):
        get_measure("bleu")


def test_nll_from_response_only_head_equals_full_forward(scoring):
    ctx, _, encoded, _ = scoring
    from pocl_core.encoding import collate

    batch = collate(encoded, ctx.pad_id)
    with torch.no_grad():
        nll, mask = response_token_nll(ctx.model, batch)
    full = (nll.sum(1) / mask.sum(1)).double().numpy()
    np.testing.assert_allclose(measure_nll(ctx, encoded), full, rtol=1e-5)
    # one sample at a time, unpadded: the same values (padding does not leak into the measure)
    alone = [measure_nll(ctx, [e])[0] for e in encoded[:4]]
    np.testing.assert_allclose(alone, full[:4], rtol=1e-5)


def test_cache_rows_are_the_teachers_topk_in_response_logits_order(scoring, monkeypatch):
    ctx, _, encoded, _ = scoring
    monkeypatch.setattr(measures_mod, "CHUNK_ELEMENTS", 7 * 512)  # force several LM-head chunks
    result = score_batch(ctx, encoded, ["nll"], cache_topk=5, vocab_columns=500)
    assert len(result.cache) == len(encoded)
    from pocl_core.encoding import collate

    batch = collate(encoded, ctx.pad_id)
    with torch.no_grad():
        dense = ResponseLogitsLM(ctx.model)(batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    reference = SparseTeacher.from_logits(dense[:, :500], 5)
    ids = np.concatenate([c[0] for c in result.cache])
    assert [len(c[2]) for c in result.cache] == [e.n_response for e in encoded]
    assert np.array_equal(ids, reference.topk_ids.numpy())
    np.testing.assert_allclose(np.concatenate([c[1] for c in result.cache]), reference.topk_logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.concatenate([c[2] for c in result.cache]), reference.lse.numpy(), atol=1e-5)
    assert ids.max() < 500
    # the nll of the same chunked pass reads the same 500 columns: per sample, the mean cross-entropy
    # of the response tokens under softmax(logits[:, :500])
    targets = batch["input_ids"][:, 1:][batch["target_mask"][:, 1:].bool()]
    ce = torch.nn.functional.cross_entropy(dense[:, :500].double(), targets, reduction="none").numpy()
    bounds = np.cumsum([0] + [e.n_response for e in encoded])
    np.testing.assert_allclose(result.values["nll"], [ce[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])],
                               rtol=1e-5)
    np.testing.assert_allclose(result.values["nll"], measure_nll(replace(ctx, vocab_columns=500), encoded), rtol=1e-6)
    assert not np.allclose(result.values["nll"], measure_nll(ctx, encoded), rtol=1e-6)  # the head is wider


def test_rouge_l_is_one_for_an_exact_copy_and_zero_for_nothing(scoring, monkeypatch):
    ctx, _, encoded, samples = scoring
    refs = [s.response for s in samples]
    monkeypatch.setattr(measures_mod, "generate_continuations", lambda c, b: [c.references[e.sample_id] for e in b])
    assert measure_rouge_l(ctx, encoded) == [1.0] * len(encoded)
    monkeypatch.setattr(measures_mod, "generate_continuations", lambda c, b: [""] * len(b))
    assert measure_rouge_l(ctx, encoded) == [0.0] * len(encoded)
    # half of a multi-word reference: strictly between 0 and 1, and exactly rouge_l_f1's value
    long = [i for i, r in enumerate(refs) if len(r.split()) >= 4]
    assert long
    halves = {encoded[i].sample_id: " ".join(refs[i].split()[: len(refs[i].split()) // 2]) for i in long}
    monkeypatch.setattr(measures_mod, "generate_continuations", lambda c, b: [halves[e.sample_id] for e in b])
    values = measure_rouge_l(ctx, [encoded[i] for i in long])
    assert values == [rouge_l_f1(halves[encoded[i].sample_id], refs[i]) for i in long]
    assert all(0.0 < v < 1.0 for v in values)


def test_rouge_l_of_real_near_greedy_generations(scoring):
    teacher, student, encoded, samples = scoring
    rng_before = torch.get_rng_state()
    answers = generate_continuations(teacher, encoded)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    values = measure_rouge_l(teacher, encoded)  # generates again: seeded, so the same answers
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == [rouge_l_f1(a, s.response) for a, s in zip(answers, samples)]
    # temperature 0.01 is near-greedy for a confident model: mostly the greedy answer
    greedy_ctx = ScoringContext(teacher.model, teacher.tokenizer, teacher.pad_id, teacher.device,
                                teacher.generation.model_copy(update={"do_sample": False}))
    greedy = generate_continuations(greedy_ctx, encoded)
    assert sum(a == g for a, g in zip(answers, greedy)) >= 0.75 * len(encoded)
    # the warmed-up teacher answers better than the random student: the measure discriminates
    assert np.mean(values) > np.mean(measure_rouge_l(student, encoded)) + 0.05


def test_references_default_to_the_decoded_response_and_seed_is_order_free(scoring):
    ctx, _, encoded, samples = scoring
    bare = ScoringContext(ctx.model, ctx.tokenizer, ctx.pad_id, ctx.device)
    assert reference_texts(bare, encoded) == [s.response for s in samples]
    with pytest.raises(KeyError, match="no reference text"):
        reference_texts(ScoringContext(ctx.model, ctx.tokenizer, ctx.pad_id, ctx.device, references={}), encoded)


def test_a_samples_generation_does_not_depend_on_its_batch(scoring):
    """At temperature 1 (every draw matters), each sample's answer is the same alone, in any batch, in
    any order: scores do not move with scoring.batch_size or a shard's other samples."""
    ctx, _, encoded, _ = scoring
    hot = replace(ctx, generation=ctx.generation.model_copy(update={"temperature": 1.0, "top_k": 0}))
    together = dict(zip([e.sample_id for e in encoded], generate_continuations(hot, encoded)))
    alone = {e.sample_id: generate_continuations(hot, [e])[0] for e in encoded[:4]}
    shuffled = encoded[::-1][:7]
    in_another_batch = dict(zip([e.sample_id for e in shuffled], generate_continuations(hot, shuffled)))
    assert all(together[k] == v for k, v in alone.items())
    assert all(together[k] == v for k, v in in_another_batch.items())
    other_seed = replace(hot, generation=hot.generation.model_copy(update={"seed": 11}))
    assert generate_continuations(other_seed, encoded) != list(together.values())  # the seed matters
