"""Imbalanced and ordered labels in the classification task: weights, ordinal heads, warnings."""
from __future__ import annotations

import logging
import random

import pytest
import torch
from conftest import write_jsonl

from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.eval.metrics import classification_report
from lmforge.tasks.classify import ClassifyTask
from lmforge.rundir import prepare_run
from lmforge.train import fit

WORDS = ["terrible", "poor", "fine", "good", "superb"]  # in the tiny vocabulary


def _stars(n, seed, skew=True):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.choices(range(5), weights=[1, 1, 1, 2, 6] if skew else [1] * 5)[0]
        rows.append({"text": f"the movie was {WORDS[y]} {WORDS[y]} plot", "label": y})
    return rows


def _cfg(tmp_path, model_dir, classify, name="run", **train):
    write_jsonl(tmp_path / "train.jsonl", _stars(120, 1))
    write_jsonl(tmp_path / "eval.jsonl", _stars(60, 2, skew=False))
    return build_config({
        "task": "classify", "name": name, "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"),
                 "labels": ["0", "1", "2", "3", "4"], "max_length": 16},
        "classify": {"mode": "full"} | classify,
        "train": {"batch_size": 16, "progress": False, "log_every": 50, "lr": 3e-3} | train})


def test_balanced_weights_come_from_the_training_labels(tmp_path, tiny_bert_dir):
    task = ClassifyTask(_cfg(tmp_path, tiny_bert_dir, {"class_weights": "balanced"}))
    counts = torch.bincount(torch.tensor([it["label"] for it in task.train_items]), minlength=5).float()
    assert torch.allclose(task.weight, counts.sum() / (5 * counts))
    batch = task.collate(task.train_items[:16])
    weighted, _ = task.loss(batch)
    task.weight = None
    plain, _ = task.loss(batch)
    assert abs(float(weighted.detach()) - float(plain.detach())) > 1e-6  # the weights change the loss


def test_given_weights_name_known_labels(tmp_path, tiny_bert_dir):
    task = ClassifyTask(_cfg(tmp_path, tiny_bert_dir, {"class_weights": {"4": 0.5}}))
    assert task.weight.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5]
    with pytest.raises(LmforgeError, match="class_weights: unknown label"):
        ClassifyTask(_cfg(tmp_path, tiny_bert_dir, {"class_weights": {"six": 2.0}}))


@pytest.mark.parametrize("ordinal,width", [("cumulative", 4), ("regression", 1)])
def test_ordinal_heads_train_predict_and_report_mae(tmp_path, tiny_bert_dir, ordinal, width):
    cfg = _cfg(tmp_path, tiny_bert_dir, {"ordinal": ordinal}, name=ordinal, epochs=20, lr=5e-3)
    task = ClassifyTask(cfg)
    assert task.model.config.num_labels == width
    run_dir = prepare_run(cfg)
    fit(task, cfg, run_dir)
    report = task.evaluate()
    assert {"mae", "off_by_one_accuracy"} <= set(report)
    assert report["accuracy"] > 0.5 and report["mae"] < 0.8
    probs = task.predict_items(task.eval_items[:4])
    assert probs.shape == (4, 5) and torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    task.save(run_dir)
    again = ClassifyTask.from_run(run_dir)
    assert torch.allclose(again.predict_items(task.eval_items[:4]), probs, atol=1e-5)


def test_ordinal_metrics_and_never_predicted_by_hand(caplog):
    r = classification_report([0, 1, 2, 4, 4], [0, 2, 2, 2, 4], ["1", "2", "3", "4", "5"], ordinal=True)
    assert r["mae"] == pytest.approx((0 + 1 + 0 + 2 + 0) / 5)
    assert r["off_by_one_accuracy"] == pytest.approx(4 / 5)
    assert r["never_predicted"] == ["2"]  # class "4" has no gold examples: not a warning
    assert r["warnings"] == ["class '2' is never predicted (1 gold examples)"]
    assert r["min_recall"] == 0.0 and r["macro_recall"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)


def test_evaluate_warns_when_a_class_is_never_predicted(tmp_path, tiny_bert_dir, caplog):
    task = ClassifyTask(_cfg(tmp_path, tiny_bert_dir, {}))
    with torch.no_grad():  # a head that always says "4"
        task.model.classifier.weight.zero_()
        task.model.classifier.bias.copy_(torch.tensor([0.0, 0, 0, 0, 5]))
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        report = task.evaluate()
    assert set(report["never_predicted"]) == {"0", "1", "2", "3"}
    assert "class '0' is never predicted" in caplog.text
