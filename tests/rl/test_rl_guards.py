"""Guards of the rl task: ratio explosion skips the step (the engine drops its gradients),
negative KL is warned about, a reward collapse stops the run with the last good checkpoint."""
from __future__ import annotations

import logging

import pytest
import torch

from lmforge.api import train_config
from lmforge.cli import main
from lmforge.config import dump_config
from lmforge.errors import TrainingError
from lmforge.tasks import TASKS
from lmforge.tasks.rl import RlTask
from lmforge.train import checkpoint as ckpt

from . import toy_rewards
from .rl_helpers import make_rl_llama, rl_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_rl_llama(tmp_path_factory.mktemp("rl_llama"))


def test_exploding_ratio_skips_the_minibatch(tmp_path, model_dir):
    task = RlTask(rl_config(tmp_path, model_dir, rl={"ratio_threshold": 5.0}))
    task.model.eval()
    with torch.no_grad():
        items = task.rollout(0)["items"]
    task.model.train()
    batch = task.collate(items)
    loss, metrics = task.loss(batch)
    assert metrics["skip"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    batch["old_logps"] = batch["old_logps"] - 2.0  # ratio e^2 = 7.4 on every token: above 5
    loss, metrics = task.loss(batch)
    assert metrics["skip"] == 1.0 and metrics["ratio_mean"] == pytest.approx(float(torch.e ** 2), rel=1e-4)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in task.model.parameters())


class AlwaysSkip(RlTask):
    def loss(self, batch):
        loss, metrics = super().loss(batch)
        return loss, metrics | {"skip": 1.0}


def test_engine_does_not_step_on_a_skipped_minibatch(tmp_path, model_dir, monkeypatch):
    monkeypatch.setitem(TASKS, "rl", AlwaysSkip)
    cfg = rl_config(tmp_path, model_dir, train={"max_steps": 3, "weight_decay": 0.1})
    before = {k: v.clone() for k, v in ckpt.trainable_state(AlwaysSkip(cfg).model).items()}
    run = train_config(cfg)
    after = ckpt.trainable_state(run.task.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update, no decay, no momentum


def test_negative_kl_is_warned_about(tmp_path, model_dir, caplog):
    task = RlTask(rl_config(tmp_path, model_dir))
    with caplog.at_level(logging.WARNING, logger="lmforge.tasks.rl"):
        task._guards(3, {"kl": -0.02, "reward_mean": 0.1, "reward_std": 0.1}, None)
        assert "NEGATIVE KL" not in caplog.text  # k1 noise near 0 is not warned about
        task._guards(4, {"kl": -0.5, "kl_se": 0.3, "reward_mean": 0.1, "reward_std": 0.1}, None)
        assert "NEGATIVE KL" not in caplog.text  # within 2 standard errors of 0: noise of a small rollout
        task._guards(5, {"kl": -0.5, "kl_se": 0.1, "reward_mean": 0.1, "reward_std": 0.1}, None)
    assert "NEGATIVE KL to the reference (-0.5000 per sequence, standard error 0.1000) at rollout 5" in caplog.text


def test_reward_collapse_rule(tmp_path, model_dir):
    task = RlTask(rl_config(tmp_path, model_dir, rl={"collapse_drop": 2.0, "collapse_patience": 2}))
    g = lambda phase, mean: task._guards(phase, {"kl": 0.0, "reward_mean": mean, "reward_std": 0.1}, None)
    g(0, 1.0)
    g(1, 0.85)  # 1.0 - 2 x 0.1 = 0.8: still fine
    g(2, 0.7)   # below: 1 bad rollout
    g(3, 0.9)   # recovered: the count restarts
    g(4, 0.7)
    with pytest.raises(TrainingError, match="reward collapse: the reward mean 0.7000 at rollout 5"):
        g(5, 0.7)
    assert task.loop_state()["collapse"]["bad"] == 2


def test_reward_collapse_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, model_dir, capsys):
    toy_rewards.CALLS["n"] = 0
    cfg = rl_config(tmp_path, model_dir, rl={"reward": "toy_rewards.collapsing", "collapse_patience": 2,
                                                "generations": 2, "rollout_prompts": 4},
                    train={"max_steps": 10, "save_every": 1}, data={"eval_fraction": 0.0})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_config(cfg))
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reward collapse" in err[0] and "rollout 3" in err[0]
    root = cfg.run_dir / "checkpoints"
    assert f"last good checkpoint: {root / 'step-00000003'}" in err[0]
    assert not (cfg.run_dir / "adapter").exists() and not (cfg.run_dir / "eval.json").exists()
    import json

    events = [r for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "event"]
    assert events == [events[0]] and events[0]["reason"] == "reward collapse" and events[0]["step"] == 3


def test_full_fine_tuning_keeps_a_frozen_reference(tmp_path, model_dir):
    run = train_config(rl_config(tmp_path, model_dir, rl={"mode": "full"}, train={"max_steps": 3, "lr": 1e-2}))
    task = run.task
    ref = task._ref
    assert ref is not None and ref is not task.policy and not any(p.requires_grad for p in ref.parameters())
    from lmforge.causal_lm import load_pretrained

    base = load_pretrained(model_dir)
    changed = False
    for (n, p), (_, q) in zip(ref.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n  # the reference never moved
    for (n, p), (_, q) in zip(task.policy.named_parameters(), base.named_parameters()):
        changed |= not torch.equal(p.detach(), q)
    assert changed and (run.run_dir / "model" / "config.json").is_file()
    task.model.eval()
    with torch.no_grad():
        items = task.rollout(5)["items"]
    assert any((it["old_logps"] - it["ref_logps"]).abs().max() > 1e-4 for it in items)
