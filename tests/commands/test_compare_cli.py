"""`lmforge compare` end to end on a tiny model."""
from __future__ import annotations

import json

from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.cli import main


def test_compare_prints_and_writes_the_table(tmp_path, capsys, tiny_bert_dir, tiny_llama_dir):
    write_jsonl(tmp_path / "train.jsonl", [{"s": r["text"], "y": r["label"]} for r in sentiment_rows(64, 1)])
    write_jsonl(tmp_path / "dev.jsonl", [{"s": r["text"], "y": r["label"]} for r in sentiment_rows(24, 2)])
    recipe = write_yaml(tmp_path / "c.yaml", {
        "name": "cmp", "output_dir": str(tmp_path / "runs"),
        "base": {"task": "classify", "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
                 "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "dev.jsonl"),
                          "columns": {"text": "s", "label": "y"}, "max_length": 32},
                 "train": {"batch_size": 8, "max_steps": 2, "progress": False}},
        "methods": {"lora": {"classify.mode": "lora"},
                    "setfit": {"classify": {"method": "setfit", "setfit": {"per_class": 4, "num_iterations": 1}}},
                    "prompt": {"model.name": str(tiny_llama_dir), "classify.method": "prompt"}}})
    assert main(["compare", str(recipe), "base.train.lr=1e-3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    paths = json.loads(out[-1])
    table = out[:-1]
    assert table[0].startswith("| method | kind | accuracy | macro-F1 |") and len(table) == 2 + 3
    assert [line.split("|")[1].strip() for line in table[2:]] == ["lora", "setfit", "prompt"]
    assert open(paths["table"]).read().splitlines() == table
    results = json.loads(open(paths["json"]).read())["results"]
    assert [r["train_examples"] for r in results] == [16, 8, 0]
    assert all(r["n_test"] == 24 for r in results)

    run_dir = tmp_path / "runs" / "cmp" / "setfit"  # every method's run works with eval
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "dev.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results[1]["accuracy"]

    assert main(["compare", str(recipe), "--only", "lora"]) == 2  # would clobber the earlier run
    assert "run directory exists" in capsys.readouterr().err
