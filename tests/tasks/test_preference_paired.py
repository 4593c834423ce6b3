"""Preference evaluation writes per-pair margins in file order; `lmforge eval --paired-with` compares two runs."""
from __future__ import annotations

import json

import pytest

from conftest import train_and_save, write_jsonl
from lmforge.eval.preference_pairs import pair_key
from lmforge.tasks.preference import PreferenceTask

from .test_preference import make_cfg, perturb_lora, pref_rows


def test_pairs_are_in_file_order_whatever_the_batches(tmp_path, tiny_llama_dir):
    rows = [r | {"prompt": " ".join([r["prompt"]] * (1 + i % 4))} for i, r in enumerate(pref_rows(12, seed=3))]
    task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(20), train={"eval_batch_size": 4}))
    perturb_lora(task.model)  # nonzero, distinct margins
    path = write_jsonl(tmp_path / "file.jsonl", rows)
    items = task.read_eval_file(str(path))
    lengths = [task.item_length(it) for it in items]
    assert [it["index"] for it in items] == list(range(12)) and len(set(lengths)) > 1  # batches regroup them
    report = task.evaluate(items)
    pairs = report["pairs"]
    assert pairs["index"] == list(range(12))
    assert pairs["key"] == [pair_key(r) for r in rows]
    # margin j is pair j's own margin, evaluated alone
    for j in (0, 5, 11):
        assert abs(pairs["margin"][j] - task.evaluate([items[j]])["mean_margin"]) < 1e-4
    assert report["accuracy"] == sum(m > 0 for m in pairs["margin"]) / 12
    assert task.evaluate(items[::-1])["pairs"] == pairs  # the scoring order does not matter


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("paired")
    cfg = make_cfg(tmp, tiny_llama_dir, pref_rows(24), train={"epochs": 1})
    task = PreferenceTask(cfg)
    train_and_save(task, cfg)
    return tmp, cfg.run_dir


def test_eval_paired_with_another_report(trained, capsys):
    from lmforge.cli import main

    tmp, run = trained
    data = write_jsonl(tmp / "pairs.jsonl", pref_rows(30, seed=1))
    assert main(["eval", str(run), "--data", str(data)]) == 0
    first = run / "eval_pairs.json"
    assert len(json.loads(first.read_text())["pairs"]["margin"]) == 30
    capsys.readouterr()
    again = tmp / "again.json"
    assert main(["eval", str(run), "--data", str(data), "--out", str(again), "--paired-with", str(first)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "pairs" not in printed  # the per-pair lists go to the file, not the terminal
    assert printed["paired"]["n"] == 30 and printed["paired"]["accuracy_diff_ci95"] == [0.0, 0.0]
    assert json.loads(again.read_text())["paired"] == printed["paired"]
    # two reports, no model
    assert main(["eval", str(again), "--paired-with", str(first)]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["accuracy_diff"] == 0.0 and out["a_only"] == out["b_only"] == 0


def test_eval_paired_with_a_report_on_other_pairs_is_one_line_exit_2(trained, capsys):
    from lmforge.cli import main

    tmp, run = trained
    other = write_jsonl(tmp / "other.jsonl", pref_rows(10, seed=7))
    assert main(["eval", str(run), "--data", str(other)]) == 0
    data = write_jsonl(tmp / "pairs2.jsonl", pref_rows(30, seed=1))
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--paired-with", str(run / "eval_other.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a paired comparison needs the same pairs" in err[0], err
    # a report without per-pair outcomes fails before any model loads
    (tmp / "old.json").write_text(json.dumps({"accuracy": 0.5}))
    assert main(["eval", str(run), "--data", str(data), "--paired-with", str(tmp / "old.json")]) == 2
    assert "no per-pair outcomes" in capsys.readouterr().err
