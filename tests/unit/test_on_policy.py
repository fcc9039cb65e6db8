"""GKD on-policy mixing: step decisions, generated batch layout, replay buffer, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from pocl_core.config import ConfigError, load_config
from pocl_core.data import load_samples
from pocl_core.encoding import EncodedSample, collate, encode_sample
from pocl_core.models import load_causal_lm, load_tokenizer
from pocl_core.on_policy import (
    OnPolicyMixer,
    ReplayBuffer,
    generate_on_policy,
    generation_seed,
    on_policy_step,
    sample_responses,
)
from pocl_core.train_step import ResponseLogitsLM, distillation_losses
from tests.conftest import TINY_CONFIG, TINY_DATA

TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@pytest.fixture(scope="module")
def student(tiny_models):
    return load_causal_lm(str(tiny_models.student), "float32", False)


@pytest.fixture(scope="module")
def encoded(tiny_models) -> list[EncodedSample]:
    tokenizer = load_tokenizer(str(tiny_models.student))
    samples, _ = load_samples(TINY_DATA)
    return [encode_sample(tokenizer, s, TEMPLATE, 64, 96) for s in samples[:4]]


def _mixer(lm, fraction: float, rank: int = 0, buffer: int = 0) -> OnPolicyMixer:
    return OnPolicyMixer(lm, fraction=fraction, max_new_tokens=6, temperature=1.0, replay_buffer_size=buffer,
                         seed=10, rank=rank, max_length=96, eos_id=2, pad_id=0)


def test_step_decisions_depend_only_on_seed_and_step():
    steps = range(2000)
    first = [on_policy_step(10, s, 0.3) for s in steps]
    assert first == [on_policy_step(10, s, 0.3) for s in steps]  # a resumed run repeats them
    assert abs(sum(first) / len(first) - 0.3) < 0.04
    assert first != [on_policy_step(11, s, 0.3) for s in steps]
    assert not any(on_policy_step(10, s, 0.0) for s in steps)
    assert all(on_policy_step(10, s, 1.0) for s in steps)
    # every DDP rank takes the same branch; each samples with its own generator
    assert [_mixer(None, 0.3, rank=0).is_on_policy(s) for s in steps] == \
        [_mixer(None, 0.3, rank=3).is_on_policy(s) for s in steps]
    seeds = {generation_seed(10, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200


def test_generated_batch_layout_masks_exactly_the_generated_tokens(student, encoded):
    prompts = [e.input_ids[:e.n_prompt] for e in encoded]
    greedy = sample_responses(student, prompts, [12] * len(prompts), temperature=0.0, eos_id=None, pad_id=0,
                              generator=torch.Generator())
    assert all(len(r) == 12 for r in greedy)
    stop = greedy[0][3]  # make the token row 0 greedily emits 4th the EOS: row 0 must stop there
    cut = greedy[0].index(stop) + 1
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    max_length = len(prompts[longest]) + 5  # caps that row's response at 5 tokens, below max_new_tokens
    out = generate_on_policy(student, encoded, max_new_tokens=12, max_length=max_length, temperature=0.0,
                             eos_id=stop, pad_id=0, generator=torch.Generator())
    assert out[0].input_ids[out[0].n_prompt:] == greedy[0][:cut]
    for e, g, o in zip(encoded, greedy, out):
        assert o.sample_id == e.sample_id and o.input_ids[:o.n_prompt] == e.input_ids[:e.n_prompt]
        expected = g[:min(12, max_length - o.n_prompt)]
        if stop in expected:
            expected = expected[:expected.index(stop) + 1]
        assert o.input_ids[o.n_prompt:] == expected and len(o.input_ids) <= max_length
    assert len(out[longest].input_ids) - out[longest].n_prompt <= 5
    # several stop tokens (the tokenizer's and the model's own): a row ends at the first it emits
    first_two = sample_responses(student, prompts[:1], [12], temperature=0.0, eos_id=[greedy[0][5], stop], pad_id=0,
                                 generator=torch.Generator())
    assert first_two[0] == greedy[0][:min(greedy[0].index(greedy[0][5]), cut - 1) + 1]
    batch = collate(out, pad_id=0)
    for i, o in enumerate(out):
        n = len(o.input_ids)
        assert batch["target_mask"][i].nonzero().flatten().tolist() == list(range(o.n_prompt, n))
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["input_ids"][i, n:] == 0).all()


def test_sampling_follows_the_generator_and_leaves_the_global_rng_alone(student, encoded):
    state = torch.get_rng_state()

    def run(seed: int) -> list[EncodedSample]:
        return generate_on_policy(student, encoded, max_new_tokens=8, max_length=96, temperature=1.0, eos_id=2,
                                  pad_id=0, generator=torch.Generator().manual_seed(seed))

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert torch.equal(torch.get_rng_state(), state)


def test_fraction_zero_hands_back_the_dataset_samples(student, encoded):
    mixer = _mixer(student, 0.0)
    for step in range(20):
        samples, on_policy = mixer.samples_for_step(step, encoded)
        assert samples is encoded and on_policy is False


def test_fraction_one_trains_on_student_generations(tiny_models, student, encoded):
    teacher = ResponseLogitsLM(load_causal_lm(str(tiny_models.teacher), "float32", False)).eval().requires_grad_(False)
    model = ResponseLogitsLM(student).train()
    samples, on_policy = _mixer(student, 1.0).samples_for_step(0, encoded)
    assert on_policy and model.training and student.training  # generation ran in eval, then back to train
    assert [s.input_ids[:s.n_prompt] for s in samples] == [e.input_ids[:e.n_prompt] for e in encoded]
    assert [s.input_ids for s in samples] != [e.input_ids for e in encoded]
    batch = collate(samples, pad_id=0)
    assert int(batch["target_mask"].sum()) == sum(s.n_response for s in samples)
    model.zero_grad()
    losses = distillation_losses(model, teacher, batch, temperature=1.0, kd_weight=1.0, loss_name="gjsd",
                                 loss_params={"beta": 0.9})
    assert math.isfinite(losses.total.item()) and losses.total.item() > 0
    losses.total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_replay_buffer_evicts_oldest_first():
    items = [EncodedSample(str(i), [1, 5 + i], 1) for i in range(5)]
    buf = ReplayBuffer(3)
    buf.add(items[:2])
    assert buf.items() == items[:2]
    buf.add(items[2:])
    assert len(buf) == 3 and buf.items() == items[2:]
    drawn = buf.draw(2, torch.Generator().manual_seed(0))
    assert len({d.sample_id for d in drawn}) == 2 and {d.sample_id for d in drawn} <= {"2", "3", "4"}
    assert drawn == buf.draw(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="asked for 4 of 3"):
        buf.draw(4, torch.Generator())


def test_mixer_draws_on_policy_batches_from_recent_generations(student, encoded):
    mixer = _mixer(student, 1.0, buffer=2 * len(encoded))
    first, _ = mixer.samples_for_step(0, encoded)
    fresh0 = mixer.buffer.items()
    assert sorted(first, key=id) == sorted(fresh0, key=id)  # only this step's generations so far
    mixer.samples_for_step(1, encoded)
    after1 = mixer.buffer.items()
    third, _ = mixer.samples_for_step(2, encoded)
    after2 = mixer.buffer.items()
    assert len(after2) == 2 * len(encoded)
    assert after2[:len(encoded)] == after1[len(encoded):]  # step 0's generations were evicted
    assert len(third) == len(encoded) and all(any(t is a for a in after2) for t in third)


def _config(*overrides: str):
    return load_config(TINY_CONFIG, list(overrides))


def test_config_defaults_off_and_rejects_bad_on_policy_settings():
    assert _config().loss.on_policy_fraction == 0.0 and _config().loss.replay_buffer_size == 0
    ok = _config("loss.on_policy_fraction=0.5", "loss.replay_buffer_size=8")
    assert ok.loss.on_policy_temperature == 1.0
    with pytest.raises(ConfigError, match=r"loss\.on_policy_fraction.*train\.use_teacher_cache"):
        _config("loss.on_policy_fraction=0.5", "train.use_teacher_cache=true", "scoring.teacher_cache_topk=8")
    with pytest.raises(ConfigError, match=r"loss\.replay_buffer_size \(8\).*loss\.on_policy_fraction"):
        _config("loss.replay_buffer_size=8")
    with pytest.raises(ConfigError, match=r"loss\.replay_buffer_size \(4\) must hold .* = 8"):
        _config("loss.on_policy_fraction=1", "loss.replay_buffer_size=4")  # 16 samples over 2 workers
    with pytest.raises(ConfigError, match="loss.on_policy_fraction"):
        _config("loss.on_policy_fraction=1.5")
    with pytest.raises(ConfigError, match="loss.on_policy_max_new_tokens"):
        _config("loss.on_policy_fraction=1", "loss.on_policy_max_new_tokens=0")


def test_temperature_scaling_reaches_the_step_loss(tiny_models, student, encoded):
    """loss.temperature_scaling's two rules give KD terms that differ by exactly T² (CE untouched)."""
    teacher = ResponseLogitsLM(load_causal_lm(str(tiny_models.teacher), "float32", False)).eval().requires_grad_(False)
    model = ResponseLogitsLM(student).eval()
    batch = collate(encoded, pad_id=0)
    with torch.no_grad():
        scaled, bare = (distillation_losses(model, teacher, batch, temperature=1.7, kd_weight=0.6, loss_name="fkl",
                                            loss_params={}, temperature_scaling=rule) for rule in ("t_squared", "none"))
    assert scaled.kd.item() > 0
    assert scaled.kd.item() == pytest.approx(1.7 ** 2 * bare.kd.item(), rel=1e-6)
    assert scaled.ce.item() == pytest.approx(bare.ce.item(), rel=1e-7)
    assert scaled.total.item() == pytest.approx(0.4 * bare.ce.item() + 0.6 * 1.7 ** 2 * bare.kd.item(), rel=1e-6)


def test_the_teacher_runs_at_its_own_dtype_under_the_students_autocast(tiny_models, student, encoded):
    """Under train.autocast_dtype the student's forward is bfloat16, the float32 teacher's stays float32:
    the KD term equals the one computed from the teacher's float32 logits outside autocast."""
    teacher = ResponseLogitsLM(load_causal_lm(str(tiny_models.teacher), "float32", False)).eval().requires_grad_(False)
    model = ResponseLogitsLM(student).eval()
    batch = collate(encoded, pad_id=0)
    seen = []
    hook = teacher.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    args = (batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s_logits = model(*args)
            live = distillation_losses(model, teacher, batch, temperature=1.0, kd_weight=1.0, loss_name="fkl",
                                       loss_params={})
        hook.remove()
        float32_teacher = teacher(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            given = distillation_losses(model, None, batch, temperature=1.0, kd_weight=1.0, loss_name="fkl",
                                        loss_params={}, teacher_logits=float32_teacher)
    assert s_logits.dtype == torch.bfloat16 and seen == [torch.float32]
    assert live.kd.item() == given.kd.item()
