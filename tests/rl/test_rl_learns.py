"""Each algorithm raises a simple reward on a toy task within a few dozen steps (tiny random
Llama with LoRA; reward = share of positive adjectives among the response's words)."""
from __future__ import annotations

import json

import pytest
from .rl_helpers import make_rl_llama, rl_config

from lmforge.api import train_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_rl_llama(tmp_path_factory.mktemp("rl_llama"))


SETTINGS = {  # 40 optimizer steps each: grpo/rloo 40 rollouts of 8 x 1 step, ppo 40 rollouts of 8 x 1 epoch
    "grpo": ({"algorithm": "grpo", "generations": 4, "rollout_prompts": 2}, {"lr": 2e-2}),
    "rloo": ({"algorithm": "rloo", "generations": 4, "rollout_prompts": 2}, {"lr": 2e-2}),
    "ppo": ({"algorithm": "ppo", "ppo_epochs": 1, "vf_coef": 0.5}, {"lr": 1e-2}),
}


@pytest.mark.parametrize("algorithm", sorted(SETTINGS))
def test_algorithm_improves_the_reward(tmp_path, model_dir, algorithm):
    rl, train = SETTINGS[algorithm]
    cfg = rl_config(tmp_path, model_dir, name=algorithm, rl=rl, train={"max_steps": 40, "log_every": 5} | train)
    run = train_config(cfg)
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    rewards = [r["reward_mean"] for r in train_rows]
    assert len(rewards) == 8
    first, last = rewards[0], sum(rewards[-2:]) / 2
    assert last > 2 * first and last > 0.1, rewards  # the untrained model: ~6% positive words
    for key in ("reward_std", "kl", "clip_fraction", "entropy", "response_length", "kl_coef", "ratio_mean"):
        assert all(key in r for r in train_rows), key
    if algorithm == "ppo":
        assert all("value_explained_variance" in r and "vf_loss" in r for r in train_rows)
        assert (run.run_dir / "adapter" / "value_head.safetensors").is_file()
    samples = sorted((run.run_dir / "samples").glob("rollout-*.jsonl"))
    assert len(samples) == 40 and json.loads(samples[0].read_text().splitlines()[0]).keys() >= {"prompt", "response",
                                                                                               "reward"}
    assert (run.run_dir / "adapter" / "adapter_config.json").is_file()
