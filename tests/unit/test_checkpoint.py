import random

import numpy as np
import pytest
import torch

from pocl_core.checkpoint import (CheckpointError, Position, load_checkpoint, read_replay_buffers, save_checkpoint,
                                  verify_checkpoint)
from pocl_core.data import EncodedSample


def _state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_roundtrip_restores_weights_optimizer_scheduler_rng_and_position(tmp_path):
    model, opt, sched = _state(0)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    save_checkpoint(tmp_path, model, opt, sched, Position(2, 3, 17, 136), extra={"train_key": "k"})
    expect = (torch.rand(1), np.random.rand(), random.random())

    model2, opt2, sched2 = _state(1)
    pos = load_checkpoint(tmp_path, model=model2, optimizer=opt2, scheduler=sched2, restore_rng=True)
    assert pos == Position(2, 3, 17, 136)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert (torch.rand(1), np.random.rand(), random.random()) == expect


def test_tampered_or_incomplete_checkpoint_is_refused(tmp_path):
    model, opt, sched = _state(0)
    save_checkpoint(tmp_path, model, opt, sched, Position(0, 0, 0, 0))
    verify_checkpoint(tmp_path)
    with open(tmp_path / "optimizer.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="checksum mismatch for optimizer.pt"):
        load_checkpoint(tmp_path, model=model)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    model, opt, sched = _state(0)
    save_checkpoint(tmp_path, model, opt, sched, Position(0, 0, 0, 0))
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_checkpoint(tmp_path, model=torch.nn.Linear(4, 3))


def test_replay_buffers_roundtrip_by_rank_and_are_checksummed(tmp_path):
    model, opt, sched = _state(0)
    buffers = [[EncodedSample("a", [5, 6, 7, 2], 2), EncodedSample("b", [5, 9], 1)], []]  # rank 1's is empty
    save_checkpoint(tmp_path / "with", model, opt, sched, Position(0, 1, 1, 4), replay_buffers=buffers)
    assert read_replay_buffers(tmp_path / "with") == buffers
    save_checkpoint(tmp_path / "without", model, opt, sched, Position(0, 1, 1, 4))
    assert read_replay_buffers(tmp_path / "without") is None
    assert not (tmp_path / "without" / "replay_buffer.json").exists()
    with open(tmp_path / "with" / "replay_buffer.json", "a") as fh:
        fh.write(" ")
    with pytest.raises(CheckpointError, match="checksum mismatch for replay_buffer.json"):
        read_replay_buffers(tmp_path / "with")
