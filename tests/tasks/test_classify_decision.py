"""Decision biases for macro-F1 (classify.decision_bias): the metric against scikit-learn, the fit by
hand, and a tiny run that saves decision.json, reloads it and predicts with it."""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import write_jsonl

from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.rundir import prepare_run
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.classify_decision import apply_bias, fit_decision_bias, macro_f1, read_decision
from lmforge.train import fit


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(0)
    for n_cls in (2, 5):
        y, p = torch.randint(0, n_cls, (50,), generator=g), torch.randint(0, n_cls - 1, (50,), generator=g)
        want = f1_score(y.numpy(), p.numpy(), average="macro", labels=list(range(n_cls)), zero_division=0)
        assert macro_f1(y, p, n_cls) == pytest.approx(want, abs=1e-12)


def test_fit_moves_the_boundary_to_the_minority_class_by_hand():
    # P(class 1) = .45, .40, .30, .20; gold 1, 1, 0, 0. argmax says 0 everywhere: F1_0 = 2*2/(2*2+2) = 2/3,
    # F1_1 = 0, macro 1/3. Any b_1 - b_0 in (log(.6/.4), log(.7/.3)) = (0.405, 0.847) separates them: macro 1.
    p1 = torch.tensor([0.45, 0.40, 0.30, 0.20])
    logp = torch.stack([1 - p1, p1], -1).log()
    y = torch.tensor([1, 1, 0, 0])
    assert macro_f1(y, logp.argmax(-1), 2) == pytest.approx(1 / 3)
    b = fit_decision_bias(logp, y)
    assert b.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert 0.405 < float(b[1] - b[0]) < 0.847
    assert macro_f1(y, (logp + b).argmax(-1), 2) == 1.0
    # already perfect: nothing to gain, the biases stay 0
    assert fit_decision_bias(torch.tensor([[0.0, -1.0], [-1.0, 0.0]]), torch.tensor([0, 1])).tolist() == [0.0, 0.0]


def test_apply_bias_is_the_softmax_of_shifted_log_probs():
    probs = torch.tensor([[0.6, 0.4]])
    got = apply_bias(probs, torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))]))  # odds 0.6 : 1.2
    torch.testing.assert_close(got, torch.tensor([[1 / 3, 2 / 3]]))
    assert apply_bias(probs, None) is probs


def _rows(n, seed, weights):
    words = ["terrible", "poor", "fine", "good", "superb"]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.choices(range(5), weights=weights)[0]
        w = words[y] if rng.random() < 0.6 else rng.choice(words)  # noisy, so the boundaries matter
        rows.append({"text": f"the movie was {w} plot", "label": y})
    return rows


def _cfg(tmp_path, model_dir, **classify):
    write_jsonl(tmp_path / "train.jsonl", _rows(150, 1, [1, 1, 1, 2, 6]))
    write_jsonl(tmp_path / "eval.jsonl", _rows(80, 2, [1, 1, 1, 1, 1]))
    return build_config({
        "task": "classify", "name": "run", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"),
                 "labels": ["0", "1", "2", "3", "4"], "max_length": 16},
        "classify": {"mode": "full"} | classify,
        "train": {"batch_size": 16, "progress": False, "log_every": 50, "lr": 3e-3, "epochs": 4,
                  "eval_every": 20, "best_metric": "macro_f1"}})


def test_run_saves_reloads_and_predicts_with_the_biases(tmp_path, tiny_bert_dir):
    cfg = _cfg(tmp_path, tiny_bert_dir, decision_bias="macro_f1")
    task = ClassifyTask(cfg)
    run_dir = prepare_run(cfg)
    fit(task, cfg, run_dir)
    task.save(run_dir)
    for folder in (run_dir, run_dir / "best"):
        saved = json.loads((folder / "decision.json").read_text())
        assert saved["fitted_on"] == "validation" and saved["macro_f1_after"] >= saved["macro_f1_before"]
        assert len(saved["bias"]) == 5
    raw = task.predict_items(task.eval_items)  # the training task predicts without biases
    loaded = ClassifyTask.from_run(run_dir)
    bias = read_decision(run_dir, 5)
    assert torch.equal(loaded.bias, bias)
    torch.testing.assert_close(loaded.predict_items(task.eval_items), apply_bias(raw, bias), atol=1e-5, rtol=1e-5)
    y = torch.tensor([it["label"] for it in task.eval_items])
    final = json.loads((run_dir / "decision.json").read_text())  # fitted on these (final) weights
    assert macro_f1(y, loaded.predict_items(task.eval_items).argmax(-1), 5) == pytest.approx(final["macro_f1_after"])
    assert final["macro_f1_before"] == pytest.approx(macro_f1(y, raw.argmax(-1), 5))


def test_needs_a_validation_split_and_a_well_formed_file(tmp_path, tiny_bert_dir):
    cfg = _cfg(tmp_path, tiny_bert_dir, decision_bias="macro_f1")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval": None, "eval_fraction": 0.0})})
    with pytest.raises(LmforgeError, match="decision_bias is fitted on the validation split"):
        ClassifyTask(cfg)
    (tmp_path / "decision.json").write_text('{"bias": [1, 2]}')
    with pytest.raises(LmforgeError, match="5 finite numbers"):
        read_decision(tmp_path, 5)
    (tmp_path / "decision.json").write_text('[1, 2]')
    with pytest.raises(LmforgeError, match="malformed"):
        read_decision(tmp_path, 5)
    assert read_decision(tmp_path / "nowhere", 5) is None
