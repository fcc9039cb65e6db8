"""Evaluation passes: sampled per seed plus one greedy pass, and their separate summaries; the
reference responses' NLL."""

from __future__ import annotations

import math

import pytest
import torch

from pocl_core.config import DataConfig, EvalConfig
from pocl_core.data import load_samples
from pocl_core.evaluate import (Generation, evaluate_generations, generate_responses, mean_response_nll,
                                summarize_rouge)
from pocl_core.models import load_causal_lm, load_tokenizer
from tests.conftest import TINY_DATA


def _rows(decoding: str, seed: int, scores: list[float]) -> list[Generation]:
    return [Generation(decoding, seed, f"s{i}", "g", "r", v) for i, v in enumerate(scores)]


def test_summarize_rouge_separates_decodings_and_averages_per_seed_first():
    rows = _rows("sampled", 1, [0.2, 0.4]) + _rows("sampled", 2, [0.6, 0.8]) + _rows("greedy", 0, [0.5, 0.0])
    mean, std = summarize_rouge(rows, "sampled")
    # per-seed means 30 and 70 (×100): mean 50, sample std sqrt(((30-50)^2 + (70-50)^2) / 1)
    assert mean == pytest.approx(50.0) and std == pytest.approx(math.sqrt(800.0))
    assert summarize_rouge(rows, "greedy") == (pytest.approx(25.0), 0.0)
    missing = summarize_rouge(_rows("sampled", 1, [0.1]), "greedy")
    assert math.isnan(missing[0]) and math.isnan(missing[1])


@pytest.fixture(scope="module")
def tiny_student(tiny_models):
    model = load_causal_lm(str(tiny_models.student)).eval()
    return model, load_tokenizer(str(tiny_models.student))


def test_greedy_pass_is_added_once_and_is_seed_independent(tiny_student):
    model, tokenizer = tiny_student
    samples, _ = load_samples(TINY_DATA)
    samples = samples[:6]
    cfg = EvalConfig(seeds=[1, 2], max_new_tokens=6, batch_size=4)
    common = dict(template=DataConfig.model_fields["prompt_template"].default, max_prompt_length=48,
                  device=torch.device("cpu"))
    rows = evaluate_generations(model, tokenizer, samples, cfg=cfg, **common)
    assert [(r.decoding, r.seed) for r in rows[::6]] == [("sampled", 1), ("sampled", 2), ("greedy", 0)]
    greedy = [r.generation for r in rows if r.decoding == "greedy"]
    by_seed = {seed: [r.generation for r in rows if (r.decoding, r.seed) == ("sampled", seed)] for seed in (1, 2)}
    # an untrained student sampled at temperature 1: each seed draws its own texts, unlike the greedy ones
    assert sum(a != b for a, b in zip(by_seed[1], by_seed[2])) >= len(greedy) // 2
    assert sum(a != g and b != g for a, b, g in zip(by_seed[1], by_seed[2], greedy)) >= len(greedy) // 2
    # greedy decoding ignores the seed: another seed gives the same texts
    assert greedy == generate_responses(model, tokenizer, samples, cfg=cfg, seed=99, sample=False, **common)
    assert all(r.rouge_l == pytest.approx(_f1(r)) for r in rows)

    no_sampling = evaluate_generations(model, tokenizer, samples, cfg=cfg.model_copy(update={"do_sample": False}),
                                       **common)
    # with sampling off the seed passes are already greedy: no extra pass, every row labelled greedy
    assert [(r.decoding, r.seed) for r in no_sampling[::6]] == [("greedy", 1), ("greedy", 2)]
    assert [r.generation for r in no_sampling[:6]] == greedy

    # each sample's sampled text is its own: the same with another batch size, alone, and the global RNG untouched
    state = torch.get_rng_state()
    sampled = [r.generation for r in rows if (r.decoding, r.seed) == ("sampled", 1)]
    assert sampled == generate_responses(model, tokenizer, samples, cfg=cfg.model_copy(update={"batch_size": 1}),
                                         seed=1, **common)
    assert sampled[3:4] == generate_responses(model, tokenizer, samples[3:4], cfg=cfg, seed=1, **common)
    assert torch.equal(torch.get_rng_state(), state)

    without = evaluate_generations(model, tokenizer, samples, cfg=cfg.model_copy(update={"greedy": False}), **common)
    assert {r.decoding for r in without} == {"sampled"} and len(without) == 12


def test_response_nll_is_weighted_by_tokens_not_by_samples(tiny_models):
    """Sum of the response tokens' NLL (EOS included) over their count, from a plain full forward of
    each unpadded sample."""
    model = load_causal_lm(str(tiny_models.teacher)).eval()
    tokenizer = load_tokenizer(str(tiny_models.teacher))
    samples, _ = load_samples(TINY_DATA)
    samples = samples[:6]
    template = DataConfig.model_fields["prompt_template"].default
    total, count, per_sample = 0.0, 0, []
    with torch.no_grad():
        for s in samples:
            prompt = tokenizer(template.format(prompt=s.prompt))["input_ids"]
            response = tokenizer(s.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + response])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :, :len(tokenizer)].double(), dim=-1)
            nll = [-logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])]
            total, count = total + sum(nll), count + len(nll)
            per_sample.append(sum(nll) / len(nll))
    assert len({len(s.response) for s in samples}) > 3  # responses of unequal length
    expected = total / count
    got = mean_response_nll(model, tokenizer, samples, template=template, max_prompt_length=256, max_length=512,
                            batch_size=4, device=torch.device("cpu"))
    assert got == pytest.approx(expected, rel=1e-4)
    assert abs(sum(per_sample) / len(per_sample) - expected) > 0.01  # the per-sample mean is another number


def _f1(row: Generation) -> float:
    from pocl_core.evaluate import rouge_l_f1

    return rouge_l_f1(row.generation, row.reference)


def test_generate_kwargs_sample_or_greedy():
    from pocl_core.sampling import PerSampleSampling, decoding_kwargs

    cfg = EvalConfig(temperature=0.7, top_k=5, top_p=0.9, no_repeat_ngram_size=0, max_new_tokens=12)
    sampled = decoding_kwargs(cfg, pad_id=1, eos_ids=2, seeds=[3, 4])
    (sampler,) = sampled.pop("logits_processor")
    assert sampled == {"max_new_tokens": 12, "pad_token_id": 1, "eos_token_id": 2, "no_repeat_ngram_size": None,
                       "do_sample": False}  # generate picks the token the sampler drew
    assert isinstance(sampler, PerSampleSampling) and sampler.seeds == [3, 4]
    assert (sampler.temperature, sampler.top_k, sampler.top_p) == (0.7, 5, 0.9)
    greedy = decoding_kwargs(cfg, pad_id=1, eos_ids=2, seeds=[3, 4], sample=False)  # sampling settings dropped
    assert greedy == {"max_new_tokens": 12, "pad_token_id": 1, "eos_token_id": 2, "no_repeat_ngram_size": None,
                      "do_sample": False}


def test_a_models_generation_config_does_not_bend_the_decoding(tiny_models, tmp_path):
    """A repetition_penalty in generation_config.json changes generate()'s output unless the model is
    set to decode only as configured (what scoring and evaluation do)."""
    import json
    import shutil

    from pocl_core.models import decode_only_as_configured

    leaky = shutil.copytree(tiny_models.student, tmp_path / "leaky")
    gen_file = leaky / "generation_config.json"
    settings = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    gen_file.write_text(json.dumps({**settings, "repetition_penalty": 1.8}))
    samples, _ = load_samples(TINY_DATA)
    tokenizer = load_tokenizer(str(tiny_models.student))
    common = dict(cfg=EvalConfig(max_new_tokens=12, batch_size=8), seed=0, sample=False,
                  template=DataConfig.model_fields["prompt_template"].default, max_prompt_length=48,
                  device=torch.device("cpu"))

    def answers(path, neutral: bool) -> list[str]:
        model = load_causal_lm(str(path)).eval()
        return generate_responses(decode_only_as_configured(model) if neutral else model, tokenizer,
                                  samples[:8], **common)

    clean = answers(tiny_models.student, neutral=False)
    assert answers(leaky, neutral=False) != clean  # the shipped setting leaks into plain generate()
    assert answers(leaky, neutral=True) == clean
