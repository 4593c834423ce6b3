"""The on-policy phase resumes exactly: a run killed mid-rollout and resumed equals an
uninterrupted one (weights incl. the value head, logged metrics, the adaptive KL coefficient,
the sampled generations)."""
from __future__ import annotations

import json

import pytest

from lmforge.api import train_config
from lmforge.tasks import TASKS
from lmforge.tasks.rl import RlTask
from lmforge.train import checkpoint as ckpt

from .rl_helpers import make_rl_llama, rl_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_rl_llama(tmp_path_factory.mktemp("rl_llama"))


class CrashAt10(RlTask):
    """Raises on the 10th loss call (inside the third rollout phase)."""

    def loss(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 10:
            raise RuntimeError("simulated crash")
        return super().loss(batch)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(task):
    return {k: v.clone() for k, v in ckpt.trainable_state(task.model).items()}


# ppo: 8 prompts x 1 per rollout, minibatches of 4, 2 epochs -> 4 steps a phase; save_every 3 is
# honoured at the phase ends (steps 4 and 8); adaptive KL makes the coefficient part of the state
PPO = dict(rl={"algorithm": "ppo", "ppo_epochs": 2, "kl_target": 0.5, "kl_horizon": 100, "kl_coef": 0.05},
           train={"max_steps": 12, "batch_size": 4, "save_every": 3, "lr": 1e-2, "warmup_ratio": 0.2,
                  "schedule": "cosine", "eval_every": 6})
# grpo with accumulation: 2 prompts x 4 per rollout, micro-batches of 2 x 2 -> 2 steps a phase
GRPO = dict(rl={"algorithm": "grpo", "generations": 4, "rollout_prompts": 2},
            train={"max_steps": 12, "batch_size": 2, "grad_accum": 2, "save_every": 4, "lr": 2e-2})


@pytest.mark.parametrize("setting", ["ppo", "grpo"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, model_dir, monkeypatch, setting):
    kw = PPO if setting == "ppo" else GRPO
    ref = train_config(rl_config(tmp_path, model_dir, name="ref", **kw))
    cfg = rl_config(tmp_path, model_dir, name="cut", **kw)
    monkeypatch.setitem(TASKS, "rl", CrashAt10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_config(cfg)
    monkeypatch.setitem(TASKS, "rl", RlTask)
    root = cfg.run_dir / "checkpoints"
    steps = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(root)]
    assert steps == ([4, 8] if setting == "ppo" else [4])  # phase boundaries only (grpo: 2 loss calls a step)
    state = json.loads((root / f"step-{steps[-1]:08d}" / "state.json").read_text())
    assert state["loop"]["batch"] == 0 and "task" in state["loop"]
    resumed = train_config(cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})}))

    a, b = _weights(ref.task), _weights(resumed.task)
    assert a.keys() == b.keys() and any("value_head" in k for k in a) == (setting == "ppo")
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    rows_a, rows_b = _rows(ref.run_dir), _rows(resumed.run_dir)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "reward_mean", "kl", "kl_coef", "lr", "clip_fraction"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
    if setting == "ppo":
        coefs = [r["kl_coef"] for r in rows_a if r["split"] == "train"]
        assert len(set(coefs)) > 1  # the adaptive coefficient moved, and the resumed run has the same values
    for f in sorted((ref.run_dir / "samples").glob("*.jsonl")):
        assert f.read_text() == (resumed.run_dir / "samples" / f.name).read_text()
    assert json.loads((ref.run_dir / "eval.json").read_text())["reward_mean"] == pytest.approx(
        json.loads((resumed.run_dir / "eval.json").read_text())["reward_mean"], abs=1e-9)
