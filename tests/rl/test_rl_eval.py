"""A finished rl run evaluates again through ``lmforge eval RUN --data FILE``: its reward is
rebuilt from the config, but a Python function named in a saved run's config.yaml is imported
only when the command line passes --trust-remote-code (a run folder is data, not code)."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from lmforge.api import train_config
from lmforge.cli import main

from .rl_helpers import make_rl_llama, prompt_rows, rl_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl_eval")
    return train_config(rl_config(tmp, make_rl_llama(tmp / "llama"), train={"max_steps": 2})), tmp


def test_eval_of_a_saved_rl_run(run, capsys):
    r, tmp = run
    data = write_jsonl(tmp / "held.jsonl", prompt_rows(6, seed=9))
    assert main(["eval", str(r.run_dir), "--data", str(data), "--out", str(tmp / "e1.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'toy_rewards.fraction_positive' named by a saved run is not imported" in err[0]
    assert not (tmp / "e1.json").exists()
    assert main(["eval", str(r.run_dir), "--data", str(data), "--out", str(tmp / "e2.json"),
                 "--trust-remote-code"]) == 0
    rep = json.loads((tmp / "e2.json").read_text())
    assert rep["n"] == 6 and {"reward_mean", "kl", "response_length", "distinct_2"} <= rep.keys()
    again = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert again["reward_mean"] == pytest.approx(rep["reward_mean"])


def test_the_best_objective_step_keeps_its_checkpoint(tmp_path):
    """``objective = reward_mean - rl.kl_coef * kl`` is an eval metric; tracked as
    ``train.best_metric`` its step's checkpoint survives ``keep_last: 1`` rotation and ``best/``
    holds that step's adapter. An ``eval_every`` step inside a rollout phase (2 optimizer steps
    here) evaluates at the phase's end, where the checkpoint is written. (``greater_is_better:
    false`` makes the tracked step an early one, so rotation would have removed it.)"""
    cfg = rl_config(tmp_path, make_rl_llama(tmp_path / "llama"), rl={"rollout_prompts": 2, "max_new_tokens": 4},
                    train={"max_steps": 8, "batch_size": 4, "eval_every": 3, "save_every": 3, "keep_last": 1,
                           "best_metric": "objective", "greater_is_better": False})
    r = train_config(cfg)
    rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in rows if x["split"] == "eval"]
    assert [x["step"] for x in evals] == [4, 6, 8]  # 3 -> the end of its phase (4); 6 is a phase end
    for x in evals:
        assert x["objective"] == pytest.approx(x["reward_mean"] - 0.01 * x["kl"])
    best = min(evals, key=lambda x: x["objective"])  # the first of equals: only a strictly lower one replaces
    ev = json.loads((r.run_dir / "eval.json").read_text())
    assert ev["best_step"] == best["step"] < 8
    kept = sorted(p.name for p in (r.run_dir / "checkpoints").iterdir())
    assert kept == [f"step-{best['step']:08d}", "step-00000008"]
    assert (r.run_dir / "best" / "adapter").is_dir()
