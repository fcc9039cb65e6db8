"""FSDP on two CPU processes (gloo): rank 0 alone reads the weights, rank 1 builds the model on the
meta device and receives its shard; the sharded model then computes what the unsharded one does, and
an optimizer state round-trips through rank 0. Also with the embeddings truly tied to the head and
frozen (train.freeze_embeddings): they stay tied and unchanged through a sharded optimizer step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from devtools.processes import free_port
from pocl_core.models import causal_lm_skeleton, load_causal_lm
from pocl_core.parallel import (full_state, load_optimizer_state, materialize_from_rank0, same_structure_as_rank0,
                                shard_fsdp, transformer_blocks)


def _save_tiny_llama(folder: Path, untied_under_a_tying_config: bool = False, tied: bool = False) -> None:
    """A 2-layer Llama; optionally saved with separate embedding and head weights while its config.json
    says to tie them (loading keeps them apart; a build from the config ties them), or truly tied."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0, tie_word_embeddings=tied, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    GenerationConfig(eos_token_id=[2, 7], bos_token_id=1).save_pretrained(folder)  # differs from config.json's
    if untied_under_a_tying_config:
        saved = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**saved, "tie_word_embeddings": True}))


def _worker(rank: int, port: int, folder: str, out: str, freeze: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        device = torch.device("cpu")
        reference = load_causal_lm(folder)  # what every rank should end up computing
        if rank == 0:
            model = load_causal_lm(folder)
        else:
            model = causal_lm_skeleton(folder)
            assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
            assert model.generation_config.eos_token_id == [2, 7]
        same = same_structure_as_rank0(model)
        if not same:  # what the distill loop does then: this rank reads the whole model too
            model = load_causal_lm(folder)
        Path(f"{out}.rank{rank}.same").write_text(str(same))
        if freeze:  # as the distill loop does with train.freeze_embeddings, before sharding
            model.get_input_embeddings().weight.requires_grad_(False)
        weights = {k: v.detach() for k, v in model.state_dict().items()} if rank == 0 else None
        shard_fsdp(model, transformer_blocks(model), device)
        materialize_from_rank0(model, weights, device)

        for (name, buffer), (_, expected) in zip(model.named_buffers(), reference.named_buffers()):
            assert torch.equal(buffer, expected), name  # rotary frequencies are not in any state dict
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
        full, _ = full_state(model, None, rank)
        if rank == 0:
            for name, value in reference.state_dict().items():
                assert torch.equal(full[name], value), name

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        stepped, state = full_state(model, optimizer, rank)
        if rank == 0:
            start = reference.state_dict()
            moved = {name for name, value in stepped.items() if not torch.equal(value, start[name])}
            Path(f"{out}.moved").write_text(json.dumps(sorted(moved)))
            Path(f"{out}.tied").write_text(str(torch.equal(stepped["lm_head.weight"], stepped["model.embed_tokens.weight"])))
        fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        load_optimizer_state(model, fresh, state if rank == 0 else {})
        _, again = full_state(model, fresh, rank)
        if rank == 0:
            torch.save({"before": state, "after": again}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("untied_under_a_tying_config", [False, True])
def test_rank_zero_alone_reads_weights_and_every_rank_computes_the_same(tmp_path, untied_under_a_tying_config):
    """With a model whose loaded and config-built forms differ, rank 1 notices and reads it too."""
    folder = tmp_path / "tiny"
    _save_tiny_llama(folder, untied_under_a_tying_config)
    out = tmp_path / "optimizer.pt"
    mp.spawn(_worker, args=(free_port(), str(folder), str(out)), nprocs=2, join=True)

    assert (tmp_path / "optimizer.pt.rank0.same").read_text() == "True"
    assert (tmp_path / "optimizer.pt.rank1.same").read_text() == str(not untied_under_a_tying_config)
    saved = torch.load(out, weights_only=True)
    before, after = saved["before"]["state"], saved["after"]["state"]
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(before[name][key]), torch.as_tensor(after[name][key])), (name, key)
    moved = json.loads((tmp_path / "optimizer.pt.moved").read_text())
    assert "model.embed_tokens.weight" in moved and "lm_head.weight" in moved  # both trained (untied)
    assert (tmp_path / "optimizer.pt.tied").read_text() == "False"


@pytest.mark.parametrize("freeze", [False, True])
def test_tied_embeddings_stay_tied_and_frozen_ones_stay_put_under_fsdp(tmp_path, freeze):
    folder = tmp_path / "tiny"
    _save_tiny_llama(folder, tied=True)
    out = tmp_path / "optimizer.pt"
    mp.spawn(_worker, args=(free_port(), str(folder), str(out), freeze), nprocs=2, join=True)

    assert (tmp_path / "optimizer.pt.rank1.same").read_text() == "True"  # the config ties them too
    assert (tmp_path / "optimizer.pt.tied").read_text() == "True"
    moved = set(json.loads((tmp_path / "optimizer.pt.moved").read_text()))
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"} & moved
    assert embeddings == (set() if freeze else {"model.embed_tokens.weight", "lm_head.weight"})
    assert {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"} <= moved  # the rest trains
    state = torch.load(out, weights_only=True)["after"]["state"]
    assert ("model.embed_tokens.weight" in state) is not freeze  # no optimizer state for a frozen one
