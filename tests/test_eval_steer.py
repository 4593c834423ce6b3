"""Evaluation a user can steer: ``eval --task sts`` with its own columns and score range, the run's
``data.where`` filter and column mapping reported at eval time (``--no-filter`` scores every row),
and ``eval`` saying where it wrote its report."""
from __future__ import annotations

import json
import logging
import random

import pytest

from conftest import WORDS, write_jsonl
from embeddings._helpers import sentences
from lmforge.cli import main

STS_KEYS = ("sts_spearman", "sts_pearson", "sts_alignment", "sts_uniformity", "sts_n")


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def sts_files(tmp_path_factory):
    """The same 30 pairs scored on a 1-5 scale (own column names) and rescaled to 0-5 (STS-B's)."""
    d = tmp_path_factory.mktemp("sts")
    rng = random.Random(5)
    a, b = sentences(30, seed=11), sentences(30, seed=12)
    # 4.1 and 4.2 of 1-5 are below SimCSE's "positive" cut (0.8 of the range) but above it when
    # wrongly read as 0-5: alignment then averages other pairs
    scores = [round(rng.uniform(1, 5), 2) for _ in a[:-4]] + [4.1, 4.2, 4.15, 4.9]
    write_jsonl(d / "one_to_five.jsonl", [{"left": x, "right": y, "gold": s} for x, y, s in zip(a, b, scores)])
    write_jsonl(d / "zero_to_five.jsonl", [{"sentence1": x, "sentence2": y, "score": (s - 1) * 5 / 4}
                                           for x, y, s in zip(a, b, scores)])
    return d


def _eval(args, capsys) -> tuple[dict, str]:
    assert main(["eval", *args]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out.strip().splitlines()[-1]), cap.err


def test_sts_columns_and_score_range(tiny_bert_dir, sts_files, tmp_path, capsys):
    model = str(tiny_bert_dir)
    own, err = _eval([model, "--task", "sts", "--data", str(sts_files / "one_to_five.jsonl"),
                      "--columns", "left,right,gold", "--score-range", "1", "5", "--out", str(tmp_path / "a.json")],
                     capsys)
    std, std_err = _eval([model, "--task", "sts", "--data", str(sts_files / "zero_to_five.jsonl")], capsys)
    for k in STS_KEYS:  # the same pairs on either scale: the same report
        assert own[k] == pytest.approx(std[k], abs=1e-9), k
    assert own["columns"] == ["left", "right", "gold"] and own["score_range"] == [1.0, 5.0]
    assert std["columns"] == ["sentence1", "sentence2", "score"] and std["score_range"] == [0.0, 5.0]
    # eval says where it wrote its file; a bare model without --out writes none and says so
    assert f"lmforge: eval report written to {tmp_path / 'a.json'}" in err
    assert json.loads((tmp_path / "a.json").read_text())["sts_spearman"] == own["sts_spearman"]
    assert "eval report not written to a file (give --out FILE.json)" in std_err
    # the declared range matters: 1-5 scores read as 0-5 pick other "positive" pairs for alignment
    wrong, _ = _eval([model, "--task", "sts", "--data", str(sts_files / "one_to_five.jsonl"),
                      "--columns", "left,right,gold"], capsys)
    assert wrong["sts_spearman"] == pytest.approx(std["sts_spearman"])
    assert wrong["sts_alignment"] != pytest.approx(std["sts_alignment"])


@pytest.mark.parametrize("extra, needle", [
    (["--columns", "left,rite,gold"], "missing column 'rite'"),
    (["--columns", "left,right"], "--columns: give the two text columns and the score column"),
    (["--columns", "left,right,gold", "--score-range", "0", "1"], "outside the declared range [0, 1]"),
    (["--columns", "left,right,gold", "--score-range", "5", "1"], "score range [5.0, 1.0] is empty"),
])
def test_sts_bad_columns_or_range_fail_in_one_line(tiny_bert_dir, sts_files, tmp_path, capsys, extra, needle):
    out = tmp_path / "x.json"
    code = main(["eval", str(tiny_bert_dir), "--task", "sts", "--data", str(sts_files / "one_to_five.jsonl"),
                 "--out", str(out), *extra])
    assert code == 2 and needle in _err_line(capsys) and not out.exists()


def test_sts_flags_only_for_sts(tiny_bert_dir, sts_files, capsys):
    code = main(["eval", str(tiny_bert_dir), "--task", "retrieval", "--data", str(sts_files / "zero_to_five.jsonl"),
                 "--score-range", "1", "5"])
    assert code == 2 and "--columns/--score-range are for --task sts" in _err_line(capsys)


def _review_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pos, neg = WORDS[:6], WORDS[6:12]
    rows = []
    for i in range(n):
        y = i % 2
        words = [rng.choice(pos if y else neg) for _ in range(4)] + [rng.choice(WORDS) for _ in range(2)]
        rows.append({"review": " ".join(words), "y": y, "domain": "movies" if i % 5 < 3 else "books"})
    return rows


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory, tiny_bert_dir):
    import lmforge

    d = tmp_path_factory.mktemp("where")
    write_jsonl(d / "train.jsonl", _review_rows(60, seed=1))
    write_jsonl(d / "ev.jsonl", _review_rows(20, seed=2))  # 12 movies, 8 books
    run = lmforge.train({
        "task": "classify", "name": "where", "output_dir": str(d / "runs"), "seed": 0,
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(d / "train.jsonl"), "eval_fraction": 0.2, "test_fraction": 0.2, "max_length": 16,
                 "where": {"domain": ["movies"]}, "columns": {"text": "review", "label": "y"}},
        "classify": {"mode": "full"},
        "train": {"max_steps": 2, "batch_size": 8, "progress": False}})
    return run.run_dir, d


def test_eval_reports_the_runs_filter_and_mapping(filtered_run, capsys, caplog):
    run, d = filtered_run
    caplog.set_level(logging.INFO, logger="lmforge")
    rep, err = _eval([str(run), "--data", str(d / "ev.jsonl")], capsys)
    assert rep["n"] == 12
    assert rep["data_filter"] == {"where": {"domain": ["movies"]}, "applied": True, "source": str(d / "ev.jsonl"),
                                  "rows": 20, "kept": 12, "dropped": 8}
    assert rep["columns"] == {"text": "review", "label": "y"}
    where = "{'domain': ['movies']}"
    assert f"data.where {where} applied to {d / 'ev.jsonl'}: 12 of 20 rows kept, 8 dropped" in caplog.text
    assert "column mapping applied: text <- column 'review', label <- column 'y'" in caplog.text
    assert f"lmforge: eval report written to {run / 'eval_ev.json'}" in err
    assert json.loads((run / "eval_ev.json").read_text()) == rep

    every, err = _eval([str(run), "--data", str(d / "ev.jsonl"), "--no-filter", "--out", str(d / "all.json")], capsys)
    assert every["n"] == 20 and every["data_filter"]["applied"] is False and every["data_filter"]["dropped"] == 0
    assert "not applied (--no-filter): all 20 rows of" in caplog.text
    assert f"written to {d / 'all.json'}" in err and json.loads((d / "all.json").read_text())["n"] == 20
    # training's held-out test split was carved from the filtered train file
    final = json.loads((run / "eval.json").read_text())
    assert final["test"]["data_filter"] | {"source": None} == {"where": {"domain": ["movies"]}, "applied": True,
                                                               "source": None, "rows": 60, "kept": 36, "dropped": 24}


def test_filter_that_keeps_nothing_and_no_filter_on_a_carved_split(filtered_run, tmp_path, capsys):
    run, _ = filtered_run
    write_jsonl(tmp_path / "books.jsonl", [r for r in _review_rows(20, seed=3) if r["domain"] == "books"])
    assert main(["eval", str(run), "--data", str(tmp_path / "books.jsonl")]) == 2
    assert "data.where {'domain': ['movies']} keeps none of its 8 rows (--no-filter" in _err_line(capsys)
    assert main(["eval", str(run), "--data", str(tmp_path / "books.jsonl"), "--no-filter"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 8
    assert main(["eval", str(run), "--split", "test", "--no-filter"]) == 2
    assert "carved from the filtered training file" in _err_line(capsys)


def test_eval_reports_rows_cut_or_dropped_by_max_length(tmp_path, tiny_llama_dir, capsys):
    import lmforge

    rng = random.Random(2)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " ".join(rng.choices(WORDS, k=n))}
            for n in [3] * 16 + [200] * 4]  # the long ones lose part of their completion
    write_jsonl(tmp_path / "train.jsonl", rows[:16])
    write_jsonl(tmp_path / "ev.jsonl", rows)
    run = lmforge.train({
        "task": "sft", "name": "cut", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.25, "max_length": 64},
        "sft": {"mode": "full", "report_samples": 0}, "train": {"max_steps": 1, "batch_size": 4, "progress": False}})
    rep, _ = _eval([str(run.run_dir), "--data", str(tmp_path / "ev.jsonl")], capsys)
    assert rep["data_report"] == {"eval": {"total": 20, "truncated": 4, "dropped": {}}}
