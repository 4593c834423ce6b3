"""`lmforge train/eval` of an mlm recipe and `lmforge fill-mask` end to end on a tiny BERT; the fills
match transformers' fill-mask pipeline."""
from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import EXTRA, write_jsonl, write_yaml

from lmforge.cli import main


def _rows(n, seed):
    rng = random.Random(seed)
    return [{"text": " ".join(EXTRA[s:s + rng.randint(6, 12)])} for s in (rng.randint(0, 40) for _ in range(n))]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("mlm_cli")
    write_jsonl(tmp / "train.jsonl", _rows(300, 1))
    write_jsonl(tmp / "held.jsonl", _rows(60, 2))
    recipe = write_yaml(tmp / "r.yaml", {
        "task": "mlm", "name": "adapted", "output_dir": str(tmp / "runs"),
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp / "train.jsonl"), "eval_fraction": 0.1, "max_length": 32},
        "mlm": {"probability": 0.3}, "train": {"epochs": 8, "lr": 1e-2, "batch_size": 16, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    return tmp, tmp / "runs" / "adapted"


def test_train_and_eval(mlm_run, capsys):
    tmp, run_dir = mlm_run
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["perplexity_after"] < report["perplexity_before"] / 3
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model" / "tokenizer.json").is_file()

    assert main(["eval", str(run_dir), "--data", str(tmp / "held.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((run_dir / "eval_held.json").read_text())
    assert {"perplexity", "nll", "tokens", "accuracy"} <= set(printed)
    assert printed["perplexity"] < report["perplexity_before"] / 3

    assert main(["predict", str(run_dir), "--input", str(tmp / "held.jsonl"), "--out", str(tmp / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fill-mask" in err[0]


def test_fill_mask_prints_the_pipeline_top_k(mlm_run, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    _, run_dir = mlm_run
    text = "w10 w11 [MASK] w13 w14"
    assert main(["fill-mask", str(run_dir), text, "--top-k", "3", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    rows = [line.split("\t") for line in lines]
    scores = [float(r[0]) for r in rows]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6

    folder = run_dir / "model"
    pipe = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(folder),
                    tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
    ref = pipe(text, top_k=3)
    assert [r[1] for r in rows] == [r["token_str"].strip() for r in ref]
    assert scores == pytest.approx([r["score"] for r in ref], abs=1e-4)
    assert [r[2] for r in rows] == [r["sequence"] for r in ref]

    assert main(["fill-mask", str(run_dir), "[MASK] w3 [MASK]", "--json", "--top-k", "2", "--precision", "fp32"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert len(two) == 2 and all(len(m) == 2 and {"token", "score", "sequence"} == set(m[0]) for m in two)


def test_fill_mask_accepts_the_tokenizers_own_mask_token(mlm_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    _, run_dir = mlm_run
    folder = tmp_path / "renamed"
    shutil.copytree(run_dir / "model", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.mask_token = "w59"  # an existing token plays the mask (as '<mask>' does for RoBERTa)
    tok.save_pretrained(folder)
    outs = []
    for text in ("w10 w11 w59 w13", "w10 w11 [MASK] w13"):
        assert main(["fill-mask", str(folder), text, "--json", "--precision", "fp32"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and len(outs[0]) == 5


def test_fill_mask_errors_and_headless_models(tiny_bert_dir, tmp_path, capsys, caplog):
    assert main(["fill-mask", str(tiny_bert_dir), "no mask here", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no mask in the text" in err[0]
    assert main(["fill-mask", str(tiny_bert_dir), "the [MASK] movie", "--top-k", "2", "--precision", "fp32"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert "no trained masked-LM head" in caplog.text
    assert main(["fill-mask", str(tmp_path / "missing"), "a [MASK]"]) == 2
    assert "not found" in capsys.readouterr().err
