"""`lmforge eval RUN --data FILE` on preference pairs reports bootstrap 95% intervals (issue 23)."""
from __future__ import annotations

import json

import numpy as np

from conftest import train_and_save, write_jsonl
from lmforge.config import build_config
from lmforge.eval.bootstrap import preference_intervals
from lmforge.tasks.preference import PreferenceTask
from lmforge.tasks.reward import RewardTask

from .test_preference import make_cfg, pref_rows


def _check_intervals(m: dict) -> None:
    for point, key in (("accuracy", "accuracy_ci95"), ("mean_margin", "margin_ci95")):
        lo, hi = m[key]
        assert isinstance(lo, float) and isinstance(hi, float)
        assert lo <= m[point] + 1e-9 and m[point] - 1e-9 <= hi, (key, m)
    assert 0.0 <= m["accuracy_ci95"][0] <= m["accuracy_ci95"][1] <= 1.0


def test_eval_command_reports_accuracy_and_margin_intervals(tmp_path, tiny_llama_dir, capsys):
    from lmforge.cli import main

    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(24), train={"epochs": 1})
    task = PreferenceTask(cfg)
    final = train_and_save(task, cfg)
    _check_intervals(final)  # the engine's final eval report (eval.json) carries them too
    data = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(30, seed=1))
    capsys.readouterr()
    assert main(["eval", str(cfg.run_dir), "--data", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((cfg.run_dir / "eval_pairs.json").read_text())
    assert printed["n"] == 30 and saved["accuracy_ci95"] == printed["accuracy_ci95"]
    _check_intervals(printed)
    lo, hi = printed["margin_ci95"]
    assert hi > lo  # trained: the margins differ between pairs, so the interval has width
    # the existing keys are kept
    assert {"accuracy", "mean_margin", "loss", "logp_accuracy", "n"} <= set(printed)


def test_reward_task_reports_the_same_intervals_over_its_scores(tmp_path, tiny_llama_dir):
    path = write_jsonl(tmp_path / "r.jsonl", pref_rows(20))
    cfg = build_config({
        "task": "reward", "name": "r", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(path), "eval_fraction": 0.5, "max_length": 64}, "lora": {"r": 8, "alpha": 16},
        "train": {"epochs": 1, "batch_size": 8, "progress": False},
    })
    task = RewardTask(cfg)
    m = task.evaluate()
    _check_intervals(m)
    items = task.eval_items
    scores = task._score_sequences([it["prompt_ids"] + it["chosen_ids"] for it in items]
                                   + [it["prompt_ids"] + it["rejected_ids"] for it in items])
    n = len(items)
    want = preference_intervals(scores[:n], scores[n:])
    assert np.allclose(m["accuracy_ci95"], want["accuracy_ci95"]) and np.allclose(m["margin_ci95"], want["margin_ci95"])
