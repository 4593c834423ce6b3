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


def _pairs(margins, keys=None):
    keys = keys or [f"k{i}" for i in range(len(margins))]
    return {"index": list(range(len(margins))), "key": keys, "margin": list(margins)}


def test_ensemble_scores_each_pair_by_the_members_mean_margin():
    from lmforge.eval.preference_pairs import ensemble_report

    a = _pairs([1.0, -0.2, 0.3, -1.0])
    b = _pairs([-0.5, 0.6, -0.1, -1.0])  # same pairs
    b_shuffled = {"index": [3, 0, 2, 1], "key": ["k3", "k0", "k2", "k1"], "margin": [-1.0, -0.5, -0.1, 0.6]}
    rep = ensemble_report([a, b_shuffled], ["a", "b"], n_resamples=200)
    assert rep["pairs"]["key"] == a["key"] and rep["pairs"]["index"] == [0, 1, 2, 3]  # the first member's order
    assert rep["pairs"]["margin"] == pytest.approx([0.25, 0.2, 0.1, -1.0])
    assert rep["accuracy"] == 0.75 and rep["mean_margin"] == pytest.approx(-0.1125)
    assert [m["accuracy"] for m in rep["members"]] == [0.5, 0.25]
    assert rep["members"][1]["margin_std"] == pytest.approx(float(__import__("numpy").std(b["margin"])))
    assert rep["unanimous"] == 0.25  # only the last pair: every member wrong
    assert rep["accuracy_ci95"][0] <= 0.75 <= rep["accuracy_ci95"][1]
    with pytest.raises(Exception, match="an ensemble needs the same pairs"):
        ensemble_report([a, _pairs([1.0, 2.0, 3.0, 4.0], ["k0", "k1", "k2", "x"])], ["a", "c"])
    with pytest.raises(Exception, match=">= 2 members"):
        ensemble_report([a], ["a"])


def test_ensemble_scale_std_weighs_members_of_different_scales_equally():
    """A member 100x larger decides the raw mean alone; divided by each member's margin std, both weigh the same."""
    import numpy as np
    from lmforge.eval.preference_pairs import ensemble_report

    small = _pairs([1.0, 1.0, -1.0, -1.0, 0.5, 0.5])  # std 0.9129
    big = _pairs([-50.0, -50.0, 150.0, 150.0, 60.0, -60.0])  # std 88.63
    raw = ensemble_report([small, big], ["s", "b"], n_resamples=50)
    assert raw["scale"] == "raw" and raw["accuracy"] == pytest.approx(3 / 6)  # the sign of big on every pair
    std = ensemble_report([small, big], ["s", "b"], scale="std", n_resamples=50)
    sd_s, sd_b = np.std(small["margin"]), np.std(big["margin"])
    want = [(a / sd_s + b / sd_b) / 2 for a, b in zip(small["margin"], big["margin"])]
    assert std["scale"] == "std" and std["pairs"]["margin"] == pytest.approx(want)
    assert std["accuracy"] == pytest.approx(np.mean([m > 0 for m in want]))
    assert std["members"][1]["margin_std"] == pytest.approx(sd_b)
    assert std["accuracy"] != raw["accuracy"]
    with pytest.raises(Exception, match="no scale to divide by"):
        ensemble_report([small, _pairs([2.0] * 6)], ["s", "flat"], scale="std")
    with pytest.raises(Exception, match="ensemble scale 'z'"):
        ensemble_report([small, big], ["s", "b"], scale="z")


def test_eval_ensemble_of_a_run_and_reports(trained, capsys):
    from lmforge.cli import main

    tmp, run = trained
    data = write_jsonl(tmp / "ens.jsonl", pref_rows(30, seed=1))
    assert main(["eval", str(run), "--data", str(data)]) == 0
    own = run / "eval_ens.json"
    mine = json.loads(own.read_text())
    flipped = tmp / "flipped.json"  # a member that disagrees on every pair, twice as sure
    flipped.write_text(json.dumps({"pairs": mine["pairs"] | {"margin": [-2 * m for m in mine["pairs"]["margin"]]}}))
    capsys.readouterr()
    out = tmp / "ensemble.json"
    assert main(["eval", str(run), "--data", str(data), "--ensemble", str(flipped), str(own), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert json.loads(own.read_text())["pairs"] == mine["pairs"]  # the run's own report is its own
    # (m - 2m + m) / 3 = 0: every pair ties, and a tie is a miss
    assert rep["accuracy"] == 0.0 and rep["pairs"]["margin"] == pytest.approx([0.0] * 30, abs=1e-6)
    assert [m["accuracy"] for m in rep["members"]] == pytest.approx([mine["accuracy"], 1 - mine["accuracy"],
                                                                      mine["accuracy"]], abs=1 / 30 + 1e-9)
    # reports only, no model, with a paired difference against the run's own
    capsys.readouterr()
    assert main(["eval", str(own), "--ensemble", str(own), "--paired-with", str(own)]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["accuracy"] == mine["accuracy"] and printed["paired"]["accuracy_diff"] == 0.0
    # --ensemble-scale std from the command line; without --ensemble it is an error, not ignored
    capsys.readouterr()
    assert main(["eval", str(own), "--ensemble", str(flipped), "--ensemble-scale", "std"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["scale"] == "std" and printed["accuracy"] == 0.0  # m/s - 2m/(2s) = 0 on every pair
    assert main(["eval", str(own), "--ensemble-scale", "std", "--paired-with", str(own)]) == 2
    assert "--ensemble-scale" in capsys.readouterr().err
    # the run's report file is not the ensemble's: --out is required
    assert main(["eval", str(run), "--data", str(data), "--ensemble", str(own)]) == 2
    assert "give --out" in capsys.readouterr().err
