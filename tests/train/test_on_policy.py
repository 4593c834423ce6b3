"""The engine's on-policy phase on a toy task without a language model: rollouts are made with
the weights of the previous phase's last step, every rollout sample is used exactly
``opt_epochs`` times per phase, max_steps rounds up to whole phases, a rollout that is not whole
minibatches is refused, and a task's ``skip`` metric keeps the optimizer still."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.config import RunConfig, build_config
from lmforge.errors import LmforgeError
from lmforge.rundir import prepare_run
from lmforge.tasks.base import TASKS, Task, register_task
from lmforge.train import fit
from lmforge.train.engine import phase_plan, rollout_batches


class OnPolicyToyRun(RunConfig):
    task: str = "onpolicy_toy"


@register_task("onpolicy_toy", config=OnPolicyToyRun)
class OnPolicyToy(Task):
    """Policy: one weight w. A rollout of phase p holds N samples x ~ N(w, 1) (seeded by p); the
    loss pulls w towards 1 through the samples. It records the weight each rollout saw and the
    sample ids each loss call used."""

    on_policy = True
    N, EPOCHS, PER_EPOCH = 8, 2, 3

    def __init__(self, cfg, skip=False):
        from lmforge.device import Placement

        self.cfg, self.placement, self.skip = cfg, Placement.resolve("cpu", "fp32"), skip
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.model.weight)
        self.train_items = [{"input_ids": [0]}] * 3
        self.seen_weights, self.used = [], []

    def rollout_plan(self):
        return self.N, self.PER_EPOCH, self.EPOCHS

    def rollout(self, phase):
        w = float(self.model.weight)
        self.seen_weights.append((phase, w))
        x = w + torch.randn(self.N, generator=torch.Generator().manual_seed(phase))
        return {"items": [{"id": (phase, i), "x": float(v)} for i, v in enumerate(x)],
                "metrics": {"rollout_w": w}, "samples": [{"phase": phase, "w": w}]}

    def collate(self, items):
        return {"x": torch.tensor([[it["x"]] for it in items]), "ids": [it["id"] for it in items]}

    def batch_units(self, batch):
        return len(batch["ids"])

    def batch_tokens(self, batch):
        return len(batch["ids"])

    def loss(self, batch):
        self.used += batch["ids"]
        pred = self.model(torch.ones_like(batch["x"]))
        return ((pred - 1.0) ** 2).mean(), {"skip": 1.0 if self.skip else 0.0}


def _cfg(tmp_path, **train):
    return build_config({"task": "onpolicy_toy", "name": "op", "output_dir": str(tmp_path / "runs"),
                         "model": {"name": "none"},
                         "train": {"batch_size": 2, "grad_accum": 2, "lr": 0.1, "progress": False,
                                   "log_every": 1, "max_grad_norm": None} | train})


@pytest.fixture(autouse=True)
def _registered():
    yield
    TASKS.pop("onpolicy_toy", None)


def test_phases_are_on_policy_and_use_each_sample_opt_epochs_times(tmp_path):
    cfg = _cfg(tmp_path, max_steps=9)  # 8 samples / (2 x 2) x 2 epochs = 4 steps a phase -> 3 phases, 12 steps
    task = OnPolicyToy(cfg)
    assert phase_plan(task, cfg, 1) == (4, 3)
    run_dir = prepare_run(cfg)
    fit(task, cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    # each phase's rollout saw the weight after the previous phase's last step
    assert [p for p, _ in task.seen_weights] == [0, 1, 2]
    ws = [w for _, w in task.seen_weights]
    assert ws[0] == 0.0 and 0.0 < ws[1] < ws[2] < 1.0  # the policy moved between rollouts
    assert [r["rollout_w"] for r in train] == [w for _, w in task.seen_weights for _ in range(4)]
    for phase in range(3):
        used = [i for p, i in task.used if p == phase]
        assert sorted(used) == sorted(list(range(8)) * 2)  # every sample exactly twice
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"rollout-{i:06d}.jsonl" for i in range(3)]


def test_rollout_batches_are_whole_seeded_steps(tmp_path):
    cfg = _cfg(tmp_path)
    a = rollout_batches(cfg, 8, phase=1, opt_epochs=2, world=1)
    assert len(a) == 8 and all(len(m) == 2 for m in a)  # 2 epochs x 4 micro-batches (2 steps of 2)
    assert sorted(sum(a[:4], [])) == list(range(8)) and sorted(sum(a[4:], [])) == list(range(8))
    assert a == rollout_batches(cfg, 8, phase=1, opt_epochs=2, world=1)
    assert a != rollout_batches(cfg, 8, phase=2, opt_epochs=2, world=1)


def test_a_rollout_that_is_not_whole_minibatches_is_refused(tmp_path):
    cfg = _cfg(tmp_path, batch_size=3, grad_accum=1)
    with pytest.raises(LmforgeError, match="a rollout of 8 samples is not a whole number of minibatches"):
        phase_plan(OnPolicyToy(cfg), cfg, 1)


def test_skip_metric_keeps_the_optimizer_still(tmp_path):
    cfg = _cfg(tmp_path, max_steps=4, weight_decay=0.5)
    task = OnPolicyToy(cfg, skip=True)
    fit(task, cfg, prepare_run(cfg))
    assert float(task.model.weight) == 0.0
    ok = OnPolicyToy(_cfg(tmp_path / "b", max_steps=4))
    fit(ok, ok.cfg, prepare_run(ok.cfg))
    assert float(ok.model.weight) > 0.1
