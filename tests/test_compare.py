"""The comparison runner: recipe merging, split checks, the table, and a small run on tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.compare import (deep_merge, markdown_table, method_configs, read_compare, run_compare)
from lmforge.errors import LmforgeError

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, model_dir, methods, **extra):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96, seed=1))
    write_jsonl(tmp_path / "test.jsonl", sentiment_rows(40, seed=2))
    return write_yaml(tmp_path / "compare.yaml", {
        "name": "cmp", "output_dir": str(tmp_path / "runs"),
        "base": {"task": "classify", "seed": 5, "model": {"name": str(model_dir), "precision": "fp32"},
                 "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "test.jsonl"),
                          "max_length": 32},
                 "train": {"batch_size": 16, "progress": False}},
        "methods": methods} | extra)


def test_deep_merge_expands_dotted_keys_and_keeps_the_base():
    base = {"train": {"lr": 1.0, "epochs": 2}, "classify": {"method": "finetune"}}
    merged = deep_merge(base, {"train.lr": 0.5, "classify": {"mode": "full"}, "seed": 3})
    assert merged == {"train": {"lr": 0.5, "epochs": 2}, "classify": {"method": "finetune", "mode": "full"},
                      "seed": 3}
    assert base == {"train": {"lr": 1.0, "epochs": 2}, "classify": {"method": "finetune"}}


def test_method_configs_share_the_split(tmp_path, tiny_bert_dir):
    path = _recipe(tmp_path, tiny_bert_dir, {
        "frozen": {"classify": {"mode": "frozen"}, "train.max_steps": 3},
        "zs": {"classify.method": "zero_shot"}})
    cfgs = method_configs(read_compare(path), str(path))
    assert list(cfgs) == ["frozen", "zs"]
    assert cfgs["frozen"].classify.mode == "frozen" and cfgs["frozen"].train.max_steps == 3
    assert cfgs["zs"].classify.method == "zero_shot" and cfgs["zs"].train.max_steps is None
    assert cfgs["zs"].run_dir == tmp_path / "runs" / "cmp" / "zs"

    bad = _recipe(tmp_path, tiny_bert_dir, {"a": {"data.eval": str(tmp_path / "train.jsonl")}})
    with pytest.raises(LmforgeError, match="methods.a changes data.eval: every method must use the same"):
        method_configs(read_compare(bad), "r")
    typo = _recipe(tmp_path, tiny_bert_dir, {"a": {"classify.methd": "zero_shot"}})
    with pytest.raises(LmforgeError, match="methods.a: unknown key 'classify.methd'"):
        method_configs(read_compare(typo), "r")
    with pytest.raises(LmforgeError, match="methods"):
        read_compare(write_yaml(tmp_path / "e.yaml", {"base": {}, "methods": {}}))


def test_the_seed_may_change_only_when_it_does_not_draw_the_test_split(tmp_path, tiny_bert_dir):
    path = _recipe(tmp_path, tiny_bert_dir, {"a": {"seed": 6}})
    assert method_configs(read_compare(path), "r")["a"].seed == 6  # a fixed eval file: the seed is free
    for over in (["base.data.max_eval_samples=10"], ["base.data.eval=null", "base.data.eval_fraction=0.2"]):
        with pytest.raises(LmforgeError, match="methods.a changes seed"):  # the seed draws the test sample
            method_configs(read_compare(path, over), "r")


def test_the_sst2_recipe_runs_every_method_on_one_split():
    from lmforge.compare import describe

    cfgs = method_configs(read_compare(ROOT / "recipes" / "compare_sst2.yaml"), "compare_sst2")
    kinds = {describe(c) for c in cfgs.values()}
    assert {"finetune/full", "finetune/frozen", "finetune/lora", "setfit/logistic", "embedding_lr", "zero_shot",
            "prompt"} <= kinds
    assert {c.data.train for c in cfgs.values()} == {"../shared/data/sst2/train.jsonl"}
    assert len({c.data.eval for c in cfgs.values()}) == 1
    setfit = [c for c in cfgs.values() if c.classify.method == "setfit"]
    assert [c.classify.setfit.per_class for c in setfit] == [16]
    assert {c.model.name for c in cfgs.values() if c.classify.method == "prompt"} == {"smollm2"}


def test_markdown_table_formats_every_column():
    rows = [{"method": "full", "kind": "finetune/full", "accuracy": 0.91234, "macro_f1": 0.9, "train_seconds": 12.345,
             "samples_per_s": 250.04, "trainable_params": 22_713_602, "total_params": 22_713_602,
             "train_examples": 6920, "recall": {"neg": 0.9, "pos": 0.925}},
            {"method": "zs", "kind": "zero_shot", "accuracy": 0.7, "macro_f1": 0.65, "train_seconds": 0.2,
             "samples_per_s": 300.0, "trainable_params": 0, "total_params": 22_713_216, "train_examples": 0,
             "recall": {"neg": 0.0, "pos": 1.0}, "never_predicted": ["neg"]}]
    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("| method | kind | accuracy | macro-F1 | per-class recall | train time (s) "
                               "| inference (samples/s)")
    assert lines[2] == ("| full | finetune/full | 0.9123 | 0.9000 | neg:0.90 pos:0.93 | 12.3 | 250.0 "
                        "| 22.7M (100%) | 6,920 |")
    assert lines[3] == ("| zs | zero_shot | 0.7000 | 0.6500 | neg:0.00 pos:1.00 (never predicted: neg) | 0.2 "
                        "| 300.0 | 0 (0%) | 0 |")


def test_run_compare_trains_every_method_on_one_split(tmp_path, tiny_bert_dir):
    path = _recipe(tmp_path, tiny_bert_dir, {
        "frozen": {"classify": {"mode": "frozen"}, "train.max_steps": 4, "train.lr": 1e-2},
        "lr": {"classify": {"method": "embedding_lr"}},
        "zs": {"classify": {"method": "zero_shot", "zero_shot": {"label_words": {"pos": "good", "neg": "bad"}}}}})
    rows, md, js = run_compare(read_compare(path), source=str(path))
    assert [r["method"] for r in rows] == ["frozen", "lr", "zs"]
    assert [r["kind"] for r in rows] == ["finetune/frozen", "embedding_lr", "zero_shot"]
    for r in rows:
        run_dir = tmp_path / "runs" / "cmp" / r["method"]
        saved = json.loads((run_dir / "eval.json").read_text())
        assert r["n_test"] == saved["n"] == 40 and r["accuracy"] == saved["accuracy"]
        assert r["train_seconds"] > 0 and r["samples_per_s"] > 0
        assert (run_dir / "labels.json").is_file()
    assert rows[0]["train_examples"] == 64 and rows[1]["train_examples"] == 96 and rows[2]["train_examples"] == 0
    assert rows[1]["trainable_params"] == 33 and rows[2]["trainable_params"] == 0
    assert 0 < rows[0]["trainable_params"] < rows[0]["total_params"]
    assert json.loads(js.read_text())["results"] == rows
    assert md.read_text() == markdown_table(rows)

    again, _, _ = run_compare(read_compare(path), source=str(path), only=["zs", "lr"], reuse=True)
    assert again == rows[1:]  # unchanged configs: earlier results, nothing retrained
    # a saved config written before an option existed (the option at its default) still counts as unchanged
    saved_cfg = tmp_path / "runs" / "cmp" / "lr" / "config.yaml"
    old = yaml.safe_load(saved_cfg.read_text())
    del old["classify"]["embedding_lr"]["per_class"]
    saved_cfg.write_text(yaml.safe_dump(old))
    assert run_compare(read_compare(path), source=str(path), only=["lr"], reuse=True)[0] == rows[1:2]
    with pytest.raises(LmforgeError, match="run directory exists"):
        run_compare(read_compare(path), source=str(path), only=["zs"])
    with pytest.raises(LmforgeError, match="unknown method"):
        run_compare(read_compare(path), source=str(path), only=["nope"])
