"""Per-sample seeded sampling: the warping matches Hugging Face's own warpers, draws follow the warped
distribution, and a row's draws depend only on its seed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from pocl_core.config_sections import SamplingConfig
from pocl_core.sampling import (PerSampleSampling, decoding_kwargs, sample_seed, stable_seed, stop_token_ids,
                                warp_logits)
from tests.conftest import REPO


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 12, 0.6),
                                                      (2.0, 1, 1.0), (1.0, 0, 0.05)])
def test_warping_keeps_the_tokens_huggingface_keeps(temperature, top_k, top_p):
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3
    scores[0, :10] = float("-inf")  # masked columns (e.g. a banned n-gram) stay masked
    reference = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p < 1.0:
        reference = TopPLogitsWarper(top_p)(None, reference)
    ours = warp_logits(scores, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    kept = torch.isfinite(ours)
    torch.testing.assert_close(ours[kept], reference[kept].float())
    assert bool(kept.any(dim=-1).all())  # at least one token per row


def test_draws_follow_the_warped_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    sampler = PerSampleSampling([sample_seed(10, "a")], temperature=1.5, top_k=3)
    counts = np.zeros(5)
    for _ in range(6000):
        out = sampler(None, logits)
        assert torch.isinf(out).sum() == 4 and out.max() == 0  # one finite score per row: the drawn token
        counts[int(out.argmax())] += 1
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 1.5, dim=0).numpy()
    np.testing.assert_allclose(counts[:3] / 6000, expected, atol=0.025)
    assert counts[3:].sum() == 0  # outside the top 3, and the −inf column, never drawn


def test_a_rows_draws_depend_only_on_its_seed():
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    seeds = [sample_seed(7, s) for s in ("x", "y", "z")]

    def draws(sampler, rows, steps=20):
        return [sampler(None, scores[rows]).argmax(dim=-1).tolist() for _ in range(steps)]

    together = np.array(draws(PerSampleSampling(seeds, 1.0), [0, 1, 2]))
    reordered = np.array(draws(PerSampleSampling([seeds[2], seeds[0]], 1.0), [2, 0]))
    alone = np.array(draws(PerSampleSampling([seeds[1]], 1.0), [1]))
    assert (together[:, 2] == reordered[:, 0]).all() and (together[:, 0] == reordered[:, 1]).all()
    assert (together[:, 1] == alone[:, 0]).all()
    assert not (together[:, 0] == together[:, 1]).all()  # different seeds, different streams
    state = torch.get_rng_state()
    PerSampleSampling(seeds, 1.0)(None, scores)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    with pytest.raises(ValueError, match="2 seeds for a batch of 3 rows"):
        PerSampleSampling(seeds[:2], 1.0)(None, scores)


def _sha256_seed(text: str) -> int:
    """The top 63 of the first 64 bits of SHA-256 of the text (the parts joined by ':')."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def test_seeds_are_sha256_of_the_parts_in_every_process():
    assert sample_seed(10, "a") == 6447615715945536778  # sha256("sample:10:a") = b2f510aa5a51ba14..., >> 1
    assert sample_seed(10, "a") == _sha256_seed("sample:10:a")
    assert stable_seed("x", 3, "ü", 2.5) == _sha256_seed("x:3:ü:2.5")
    assert stable_seed() == _sha256_seed("")
    here = [sample_seed(10, "a"), stable_seed("x", 3, "ü", 2.5)]
    code = ("from pocl_core.sampling import sample_seed, stable_seed; "
            "print(sample_seed(10, 'a'), stable_seed('x', 3, 'ü', 2.5))")
    # str and bytes hashes are salted per process: another PYTHONHASHSEED than this process's
    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONIOENCODING": "utf-8"})
    assert [int(v) for v in out.stdout.split()] == here


def test_seeds_and_stop_tokens():
    assert sample_seed(10, "a") == sample_seed(10, "a") != sample_seed(11, "a") != sample_seed(10, "b")
    assert 0 <= sample_seed(10, "a") < 2**63  # within what torch.Generator.manual_seed takes
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]))
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=2)) == [2, 7]
    assert stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)),
                          SimpleNamespace(eos_token_id=None)) is None
    cfg = SamplingConfig(temperature=0.5, top_k=4)
    sampled = decoding_kwargs(cfg, pad_id=0, eos_ids=[2], seeds=[1, 2])
    assert sampled["do_sample"] is False and "temperature" not in sampled  # generate picks the drawn token
    assert isinstance(sampled["logits_processor"][0], PerSampleSampling)
    greedy = decoding_kwargs(cfg, pad_id=0, eos_ids=[2], seeds=[1, 2], sample=False)
    assert "logits_processor" not in greedy and greedy["eos_token_id"] == [2]
