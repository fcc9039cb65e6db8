"""The response-position LM head equals the model's own logits, post-processing included."""

from __future__ import annotations

import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                          GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)

from pocl_core.lm_head import check_head
from pocl_core.models import load_causal_lm
from pocl_core.train_step import ResponseLogitsLM

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


class Doubled(LlamaForCausalLM):
    """A causal LM that post-processes its logits in a way the project does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        # a cap small enough that tanh bends the logits (random-init logits reach ~0.2)
        "gemma2 softcap": Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.05,
                                                         attn_implementation="eager")),
        "cohere logit_scale": CohereForCausalLM(CohereConfig(**SMALL, logit_scale=3.0)),
        "granite logits_scaling": GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0)),
        "llama plain": LlamaForCausalLM(LlamaConfig(**SMALL)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_response_logits_equal_the_models_own_logits(name):
    lm = _models()[name].eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    target = torch.zeros_like(ids)
    target[0, 4:] = 1
    target[1, 6:] = 1
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=attn).logits
        ours = ResponseLogitsLM(lm)(ids, attn, target)
        plain = lm.get_output_embeddings()(lm.base_model(input_ids=ids, attention_mask=attn).last_hidden_state)
    rows, cols = target[:, 1:].bool().nonzero(as_tuple=True)
    torch.testing.assert_close(ours, full[rows, cols], rtol=1e-5, atol=1e-5)
    if name != "llama plain":  # the post-processing matters: the bare projection is not the model's logits
        assert (plain[rows, cols] - full[rows, cols]).abs().max() > 0.02
    check_head(lm, name)


def test_unknown_post_processing_is_refused_with_the_models_name():
    torch.manual_seed(0)
    lm = Doubled(LlamaConfig(**SMALL)).train()
    with pytest.raises(ValueError, match="models/odd.*not its output embedding"):
        check_head(lm, "models/odd")
    assert lm.training  # the probe restores the module's mode


def test_load_causal_lm_refuses_a_model_whose_head_it_cannot_reproduce(tmp_path, monkeypatch):
    import transformers

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(tmp_path / "m")
    assert load_causal_lm(str(tmp_path / "m")) is not None  # the plain model loads
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: Doubled(LlamaConfig(**SMALL)))
    with pytest.raises(ValueError, match=f"{tmp_path / 'm'}: the model's logits are not"):
        load_causal_lm(str(tmp_path / "m"))


def test_the_probe_names_a_model_without_a_separate_decoder():
    class Flat(LlamaForCausalLM):
        base_model_prefix = "nothing_here"

    with pytest.raises(ValueError, match="flat: Flat has no separate decoder"):
        check_head(Flat(LlamaConfig(**SMALL)), "flat")
