"""Atomic checkpoints: round trip of weights, optimizer, scheduler and RNG; half-written saves; pruning."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.train import checkpoint as ckpt
from lmforge.train.optim import build_optimizer, lr_lambda


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    model[1].weight.requires_grad_(False)        # frozen tensors are not checkpointed
    opt = build_optimizer(model, lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10))
    return model, opt, sched


def _steps(model, opt, sched, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 4, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _setup()
    _steps(model, opt, sched, 3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"epoch": 1, "batch": 2, "best": 0.5,
                                                                  "best_step": 2}, keep=2)
    assert path.name == "step-00000003"
    assert set(ckpt.trainable_state(model)) == {"0.weight", "0.bias", "1.bias", "2.weight", "2.bias"}
    expected_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    _steps(model, opt, sched, 2)                 # continue the original ...
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fopt, fsched = _setup(seed=99)        # ... and a fresh process restored from the checkpoint
    fresh[1].weight.data.copy_(model[1].weight)  # frozen tensors come from the base model
    loop = ckpt.load_checkpoint(path, fresh, fopt, fsched)
    assert loop == {"epoch": 1, "batch": 2, "best": 0.5, "best_step": 2, "step": 3}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_rng
    assert fsched.last_epoch == 3
    _steps(fresh, fopt, fsched, 2)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    model, opt, sched = _setup()
    _steps(model, opt, sched, 1)
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep=3)
    saved = {k: v.clone() for k, v in ckpt.trainable_state(model).items()}
    _steps(model, opt, sched, 1)

    class Killed:
        def state_dict(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, Killed(), sched, {}, keep=3)
    assert (tmp_path / ".tmp-step-00000002" / "trainable.safetensors").is_file()
    assert ckpt.list_checkpoints(tmp_path) == [good]
    fresh, fopt, fsched = _setup(seed=5)
    assert ckpt.load_checkpoint(good, fresh, fopt, fsched)["step"] == 1
    for k, v in ckpt.trainable_state(fresh).items():
        assert torch.equal(v, saved[k])
    ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]


def test_prune_keeps_last_n_and_the_protected_one(tmp_path):
    model, opt, sched = _setup()
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep=2, protect=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000005"]
    (tmp_path / "step-00000009").mkdir()         # no state.json: not a checkpoint
    assert ckpt.list_checkpoints(tmp_path)[-1].name == "step-00000005"
    assert ckpt.list_checkpoints(tmp_path / "missing") == []


def test_loading_into_a_different_model_is_a_user_error(tmp_path):
    model, opt, sched = _setup()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep=1)
    other = nn.Sequential(nn.Linear(4, 2))
    oopt = build_optimizer(other, 0.1, 0.0)
    with pytest.raises(LmforgeError, match="does not match the model"):
        ckpt.load_checkpoint(path, other, oopt, torch.optim.lr_scheduler.LambdaLR(oopt, lambda s: 1.0))


def test_shared_tensors_are_saved_once():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    state = ckpt.trainable_state(nn.ModuleDict({"emb": emb, "head": head}))
    assert list(state) == ["emb.weight"]
