"""Gradient accumulation over a whole epoch: batch 4 x 2 accumulated trains exactly like batch 8."""
from __future__ import annotations

import torch
from conftest import sentiment_rows, write_jsonl

from lmforge.config import build_config
from lmforge.rundir import prepare_run
from lmforge.tasks.classify import ClassifyTask
from lmforge.train import fit


def _cfg(tmp_path, model_dir, name, batch_size, grad_accum, group_by_length):
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", sentiment_rows(44, seed=11))  # 44 = 5 steps of 8 + a short one
    return build_config({
        "task": "classify", "name": name, "output_dir": str(tmp_path / "runs"), "seed": 3,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.0},
        "classify": {"mode": "full"},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum, "epochs": 2, "lr": 5e-3,
                  "group_by_length": group_by_length, "progress": False, "log_every": 1}})


def _train(cfg):
    task = ClassifyTask(cfg)
    seen: list[int] = []
    fit(task, cfg, prepare_run(cfg), on_step=lambda step, rec: seen.append(rec["samples"]))
    return {n: p.detach().clone() for n, p in task.model.named_parameters()}, seen


def test_accumulated_steps_equal_big_batch_steps_over_whole_epochs(tmp_path, tiny_bert_dir):
    for grouped in (True, False):
        big, big_seen = _train(_cfg(tmp_path, tiny_bert_dir, f"b8-{grouped}", 8, 1, grouped))
        acc, acc_seen = _train(_cfg(tmp_path, tiny_bert_dir, f"b4x2-{grouped}", 4, 2, grouped))
        assert big_seen == acc_seen == [8, 8, 8, 8, 8, 4] * 2         # two whole epochs, same step sizes
        worst = max(float((big[k] - acc[k]).abs().max()) for k in big)
        assert worst < 2e-5, worst                                     # the same samples in every step


def test_the_bar_can_fail_when_steps_differ(tmp_path, tiny_bert_dir):
    """Batch 4 without accumulation takes other steps: the comparison above would see it."""
    big, _ = _train(_cfg(tmp_path, tiny_bert_dir, "b8", 8, 1, True))
    small, _ = _train(_cfg(tmp_path, tiny_bert_dir, "b4", 4, 1, True))
    assert max(float((big[k] - small[k]).abs().max()) for k in big) > 1e-3
