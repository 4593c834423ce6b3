"""The CLI end to end on a tiny T5: train (LoRA sft) -> generate -> merge -> eval --task generation,
and the one-line refusals of causal-only paths."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl, write_yaml
from lmforge.cli import main

from .test_recipe import dialogue_rows

FP32 = ["--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(tiny_t5_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_t5")
    train = write_jsonl(tmp / "train.jsonl", dialogue_rows(32, seed=1))
    dev = write_jsonl(tmp / "dev.jsonl", dialogue_rows(6, seed=2))
    recipe = write_yaml(tmp / "r.yaml", {
        "task": "sft", "name": "t5-sft", "output_dir": str(tmp / "runs"),
        "model": {"name": str(tiny_t5_dir), "precision": "fp32"},
        "data": {"train": str(train), "eval": str(dev), "columns": {"completion": "summary"}, "max_length": 32},
        "sft": {"prompt_template": "story: {dialogue}", "rouge_samples": 6, "max_new_tokens": 5},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 8, "batch_size": 8, "lr": 3e-2, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    return tmp, tmp / "runs" / "t5-sft", dev


def test_generate_merge_eval(trained, tiny_t5_dir, capsys):
    tmp, run, dev = trained
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "story: good fine movie", "--max-new-tokens", "5", *FP32]) == 0
    from_run = capsys.readouterr().out.strip()
    prompts = write_jsonl(tmp / "p.jsonl", [{"prompt": "story: good fine movie"}, {"prompt": "story: bad plot"}])
    assert main(["generate", str(tiny_t5_dir), "--adapter", str(run / "adapter"), "--input", str(prompts),
                 "--out", str(tmp / "g.jsonl"), "--max-new-tokens", "5", *FP32]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp / "g.jsonl").read_text().splitlines()]
    assert rows[0]["generation"].strip() == from_run

    assert main(["merge", str(run), "--out", str(tmp / "merged")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] < 1e-4
    assert json.loads((tmp / "merged" / "config.json").read_text())["is_encoder_decoder"]
    assert main(["generate", str(tmp / "merged"), "--prompt", "story: good fine movie", "--max-new-tokens", "5",
                 *FP32]) == 0
    assert capsys.readouterr().out.strip() == from_run

    # eval on the run: the run's template and column mapping on raw dialogue/summary records, its
    # decoding defaults: the same ROUGE as training reported on the same file
    out = tmp / "ev.json"
    assert main(["eval", str(run), "--task", "generation", "--data", str(dev), "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    trained_metrics = json.loads((run / "eval.json").read_text())
    assert ev["n"] == 6 and ev["prompt_template"] == "story: {dialogue}" and ev["decoding"]["max_new_tokens"] == 5
    assert abs(ev["rougeL"] - trained_metrics["rougeL"]) < 1e-9 and ev["rougeL"] > 0  # not a trivial 0 == 0
    # plain eval of the run (its task: loss, perplexity and ROUGE of rouge_samples generations)
    assert main(["eval", str(run), "--data", str(dev), "--out", str(tmp / "plain.json")]) == 0
    plain = json.loads((tmp / "plain.json").read_text())
    assert plain["rougeL"] == pytest.approx(ev["rougeL"], abs=1e-9) and plain["loss"] == pytest.approx(
        trained_metrics["loss"], abs=1e-5)
    # decoding options change what is generated
    assert main(["eval", str(run), "--task", "generation", "--data", str(dev), "--out", str(tmp / "ev2.json"),
                 "--max-new-tokens", "2", "--temperature", "1.5", "--top-k", "5", "--seed", "3"]) == 0
    ev2 = json.loads((tmp / "ev2.json").read_text())
    assert ev2["decoding"]["max_new_tokens"] == 2 and ev2["decoding"]["temperature"] == 1.5
    assert all(len(e["prediction"].split()) <= 2 for e in ev2["examples"])
    # the base model with --adapter RUN: the same as the run
    assert main(["eval", str(tiny_t5_dir), "--adapter", str(run), "--task", "generation", "--data", str(dev),
                 "--out", str(tmp / "ev3.json")]) == 0
    assert json.loads((tmp / "ev3.json").read_text())["rougeL"] == ev["rougeL"]
    # a bare (merged) model with an explicit template and reference column
    assert main(["eval", str(tmp / "merged"), "--task", "generation", "--data", str(dev), "--out",
                 str(tmp / "ev4.json"), "--prompt-template", "story: {dialogue}", "--reference", "summary",
                 "--max-new-tokens", "5", *FP32]) == 0
    assert abs(json.loads((tmp / "ev4.json").read_text())["rougeL"] - ev["rougeL"]) < 1e-9


def test_causal_only_paths_refuse_a_seq2seq_model_in_one_line(trained, tiny_t5_dir, tmp_path, capsys):
    tmp, run, dev = trained
    capsys.readouterr()
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "good movie"}])
    assert main(["eval", str(tiny_t5_dir), "--task", "perplexity", "--data", str(texts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "T5ForConditionalGeneration is an encoder-decoder (seq2seq) model; eval --task perplexity needs a causal" \
        in err[0] and len(err) == 1
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "good", "chosen": "fine", "rejected": "bad"}] * 4)
    for task in ("preference", "reward"):
        recipe = write_yaml(tmp_path / f"{task}.yaml", {
            "task": task, "name": task, "output_dir": str(tmp_path / "runs"),
            "model": {"name": str(tiny_t5_dir)}, "data": {"train": str(pairs)}})
        assert main(["train", str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is an encoder-decoder (seq2seq) model; task {task} needs a causal" in err[0]
        assert str(tiny_t5_dir) in err[0]
        assert not (tmp_path / "runs" / task).exists()
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(tiny_t5_dir)], input="hi\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "; chat needs a causal (decoder-only) LM" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
