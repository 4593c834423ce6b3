"""The held-out test split: carved before the eval split, scored once with the selected weights,
re-derived by ``lmforge eval RUN --split test``, and ``--checkpoint best|final`` chooses the weights."""
from __future__ import annotations

import json

from conftest import sentiment_rows, write_jsonl

import lmforge
from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.schema import load_splits, load_test_split


def test_test_split_is_disjoint_and_seeded(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(100)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    dc = DataConfig(train=str(tmp_path / "d.jsonl"), eval_fraction=0.2, test_fraction=0.25)
    train, ev = load_splits(dc, 7)
    test = load_test_split(dc, 7)
    texts = [{r["text"] for r in t.records} for t in (train, ev, test)]
    assert [len(t) for t in texts] == [60, 15, 25]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2]) and not (texts[0] & texts[1])
    assert {r["text"] for r in load_test_split(dc, 7).records} == texts[2]       # same seed, same rows
    assert {r["text"] for r in load_test_split(dc, 8).records} != texts[2]
    assert load_test_split(DataConfig(train=str(tmp_path / "d.jsonl")), 7) is None


def test_train_scores_the_test_split_with_the_best_weights(tmp_path, tiny_bert_dir, capsys):
    write_jsonl(tmp_path / "d.jsonl", sentiment_rows(120, seed=3))
    run = lmforge.train({
        "task": "classify", "name": "ts", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "d.jsonl"), "eval_fraction": 0.2, "test_fraction": 0.25, "max_length": 32},
        "classify": {"mode": "full"},
        "train": {"max_steps": 8, "batch_size": 16, "eval_every": 2, "best_metric": "accuracy", "lr": 1e-3,
                  "progress": False}})
    final = json.loads((run.run_dir / "eval.json").read_text())
    assert final["test"]["n"] == 30 and final["test"]["checkpoint"] == "best"
    # the CLI re-derives the same split and, with the best weights, the same figures
    assert main(["eval", str(run.run_dir), "--split", "test", "--checkpoint", "best"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["accuracy"] == final["test"]["accuracy"] and again["n"] == 30
    assert (run.run_dir / "eval_test.json").is_file()
    assert main(["eval", str(run.run_dir), "--split", "test"]) == 0            # final weights
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"] == "final"
    assert main(["eval", str(run.run_dir), "--split", "test", "--checkpoint", "step-99"]) == 2
    assert "no complete checkpoint step-99" in capsys.readouterr().err


def test_predict_takes_the_checkpoint_eval_takes(tmp_path, tiny_bert_dir, capsys):
    """``predict --checkpoint step-N|best|final`` predicts with those weights, as ``eval`` scores them."""
    write_jsonl(tmp_path / "d.jsonl", sentiment_rows(60, seed=3))
    run = lmforge.train({
        "task": "classify", "name": "pc", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "d.jsonl"), "max_length": 32},
        "classify": {"mode": "full"},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "save_every": 2, "keep_last": 3, "progress": False}})
    write_jsonl(tmp_path / "in.jsonl", [{"text": r["text"]} for r in sentiment_rows(6, seed=9)])

    def predict(*extra):
        out = tmp_path / f"p{'-'.join(extra) or 'default'}.jsonl"
        assert main(["predict", str(run.run_dir), "--input", str(tmp_path / "in.jsonl"), "--out", str(out), *extra]) == 0
        said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return said["checkpoint"], [json.loads(line) for line in out.read_text().splitlines()]

    name, final = predict()
    assert name == "final" and predict("--checkpoint", "final")[1] == final
    name, step2 = predict("--checkpoint", "step-2")
    assert name == "step-2" and step2 != final                      # other weights, other probabilities
    assert step2 == [json.loads(json.dumps(p)) for p in lmforge.load(run.run_dir, "step-2").predict([r["text"] for r in
                                                                   sentiment_rows(6, seed=9)])]
    assert main(["predict", str(run.run_dir), "--input", str(tmp_path / "in.jsonl"), "--out",
                 str(tmp_path / "x.jsonl"), "--checkpoint", "step-99"]) == 2
    assert "no complete checkpoint step-99" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
