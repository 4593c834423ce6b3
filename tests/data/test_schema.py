"""Schema checks: bad input is one line and a non-zero exit before training; splits and labels are stable."""
from __future__ import annotations

import json
import random

import pytest
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.readers import Table
from lmforge.data.schema import (apply_where, field_column, label_ids, label_names, load_splits, require_columns,
                                 text_values)
from lmforge.errors import LmforgeError


def _table(records, source="t.jsonl") -> Table:
    return Table(source, records, [f"line {i + 1}" for i in range(len(records))])


# ---------------------------------------------------------------- through the CLI
def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _good(n=20, seed=0):
    return [json.dumps(r) for r in sentiment_rows(n, seed)]


BAD_DATA = [  # (id, train lines, eval lines or None, overrides, fragments of the one line)
    ("missing-file", None, None, [], ["train.jsonl: data file not found"]),
    ("malformed-line", _good(5) + ['{"text": "good", "label": "pos"'] + _good(5, 1), None, [],
     ["train.jsonl line 6: malformed JSON"]),
    ("missing-column", _good(4) + [json.dumps({"review": "good film", "label": "pos"})], None, [],
     ["train.jsonl line 5: missing column 'text'"]),
    ("mapped-column-missing", _good(6), None, ["data.columns.text=review"],
     ["train.jsonl line 1: missing column 'review'"]),
    ("empty-train", [], None, [], ["train.jsonl: no training examples (empty split)"]),
    ("empty-eval", _good(10), [], [], ["eval.jsonl: no evaluation examples (empty split)"]),
    ("empty-after-where", _good(10), None, ["data.where.label=[meh]"], ["empty split after data.where"]),
    ("unseen-eval-label", _good(10), _good(3, 2) + [json.dumps({"text": "ok film", "label": "meh"})], [],
     ["eval.jsonl line 4: unknown label 'meh' (unseen in train", "labels: neg, pos"]),
    ("label-not-in-list", _good(10), None, ["data.labels=[neg, positive]"],
     ["unknown label 'pos' (not in data.labels"]),
    ("number-as-text", _good(3) + [json.dumps({"text": 42, "label": "pos"})], None, [],
     ["train.jsonl line 4: 'text' must be text, got int"]),
    ("null-text", _good(3) + [json.dumps({"text": None, "label": "neg"})], None, [],
     ["line 4: 'text' must be text, got NoneType"]),
    ("blank-text", _good(3) + [json.dumps({"text": "   ", "label": "neg"})], None, [], ["line 4: 'text' is empty"]),
    ("missing-label", _good(3) + [json.dumps({"text": "good", "label": None})], None, [],
     ["line 4: 'label' is missing a label"]),
    ("too-few-to-split", _good(1), None, ["data.eval_fraction=0.5"], ["too few examples (1)"]),
]


@pytest.mark.parametrize("case", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_one_line_and_no_run_dir(tmp_path, capsys, tiny_bert_dir, case):
    _, train_lines, eval_lines, overrides, fragments = case
    if train_lines is not None:
        _write_lines(tmp_path / "train.jsonl", train_lines)
    data = {"train": str(tmp_path / "train.jsonl")}
    if eval_lines is not None:
        data["eval"] = str(_write_lines(tmp_path / "eval.jsonl", eval_lines))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_bert_dir)},
        "data": data, "classify": {"mode": "full"}, "train": {"max_steps": 1, "progress": False}})
    rc = main(["train", str(recipe), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- unit checks
def test_require_columns_names_the_first_bad_record():
    t = _table([{"text": "a", "label": 1}, {"text": "b"}])
    require_columns(t, ["text"])
    with pytest.raises(LmforgeError, match=r"^t.jsonl line 2: missing column 'label' \(columns: text\)$"):
        require_columns(t, ["text", "label"])
    with pytest.raises(LmforgeError, match="empty split"):
        require_columns(_table([]), ["text"])


def test_text_values():
    assert text_values(_table([{"t": "a"}, {"t": " b "}]), "t") == ["a", " b "]
    assert text_values(_table([{"t": ""}]), "t", allow_empty=True) == [""]
    for bad, kind in ((3.5, "float"), (["a"], "list"), ({"a": 1}, "dict")):
        with pytest.raises(LmforgeError, match=f"t.jsonl line 2: 't' must be text, got {kind}"):
            text_values(_table([{"t": "ok"}, {"t": bad}]), "t")


def test_field_column_mapping():
    dc = DataConfig(columns={"text": "sentence"})
    assert field_column(dc, "text") == "sentence" and field_column(dc, "label") == "label"


def _write(tmp_path, n):
    return str(write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(n)]))


def test_seeded_split_is_deterministic_disjoint_and_sized(tmp_path):
    dc = DataConfig(train=_write(tmp_path, 50), eval_fraction=0.2)
    train, ev = load_splits(dc, seed=3)
    train2, ev2 = load_splits(dc, seed=3)
    assert ev.records == ev2.records and train.records == train2.records
    assert len(ev) == 10 and len(train) == 40
    texts = [r["text"] for r in train.records + ev.records]
    assert sorted(texts) == sorted(f"t{i}" for i in range(50))           # disjoint and complete
    assert ev.locs == sorted(ev.locs, key=lambda s: int(s.split()[1]))   # file order kept
    _, other = load_splits(dc, seed=4)
    assert other.records != ev.records


def test_no_eval_split_and_sample_caps(tmp_path):
    path = _write(tmp_path, 30)
    train, ev = load_splits(DataConfig(train=path, eval_fraction=0.0), seed=0)
    assert ev is None and len(train) == 30
    dc = DataConfig(train=path, eval=path, max_train_samples=7, max_eval_samples=5)
    train, ev = load_splits(dc, seed=0)
    assert len(train) == 7 and len(ev) == 5
    assert load_splits(dc, seed=0)[0].records == train.records
    with pytest.raises(LmforgeError, match="missing required value 'data.train'"):
        load_splits(DataConfig(), seed=0)


def test_where_filter():
    t = _table([{"c": "x", "v": 1}, {"c": "y", "v": 2}, {"c": "z", "v": 3}])
    kept = apply_where(t, {"c": ["x", "z"]})
    assert [r["v"] for r in kept.records] == [1, 3] and kept.locs == ["line 1", "line 3"]
    assert apply_where(t, {}) is t


def test_labels_discovered_in_a_stable_order():
    recs = [{"y": v} for v in ["pos", "neg", "neutral", "neg"]]
    assert label_names(_table(recs), "y", None) == ["neg", "neutral", "pos"]
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    assert label_names(_table(shuffled), "y", None) == ["neg", "neutral", "pos"]
    ints = _table([{"y": v} for v in [10, 2, 1, 2]])
    assert label_names(ints, "y", None) == ["1", "2", "10"]              # numerically, not as text
    assert label_names(_table([{"y": v} for v in ["10", "9", "-1"]]), "y", None) == ["-1", "9", "10"]
    assert label_names(_table([{"y": v} for v in [1.0, 0.0]]), "y", None) == ["0", "1"]
    bools = _table([{"y": True}, {"y": False}])                           # booleans are names, not 0/1
    assert label_names(bools, "y", None) == ["False", "True"]
    assert label_ids(bools, "y", ["False", "True"], split="train") == [1, 0]
    assert label_names(ints, "y", ["b", "a"]) == ["b", "a"]               # given order wins
    with pytest.raises(LmforgeError, match="duplicate"):
        label_names(ints, "y", ["a", "a"])


def test_label_ids():
    t = _table([{"y": "b"}, {"y": "a"}])
    assert label_ids(t, "y", ["a", "b"], split="train") == [1, 0]
    nums = _table([{"y": 2}, {"y": 10.0}, {"y": "1"}])
    assert label_ids(nums, "y", ["1", "2", "10"], split="train") == [1, 2, 0]
    as_index = _table([{"y": 1}, {"y": 0}])                               # ints with names: indices
    assert label_ids(as_index, "y", ["neg", "pos"], split="train") == [1, 0]
    with pytest.raises(LmforgeError, match=r"line 2: unknown label 'c' \(unseen in train; labels: a, b\)"):
        label_ids(_table([{"y": "a"}, {"y": "c"}]), "y", ["a", "b"], split="eval")
