"""`lmforge eval --task generation` on a causal sft run (tiny Llama): raw records go through the run's
prompt template and column mapping, decoding starts from the run's settings (the same ROUGE as training
reported), and every option (--max-new-tokens, --temperature/--top-k/--seed, --stop, --batch-size,
--no-cache, --adapter) takes effect."""
from __future__ import annotations

import json

import pytest

from conftest import WORDS, write_jsonl, write_yaml
from lmforge.cli import main


def rows(n, seed):
    import random

    rng = random.Random(seed)
    return [{"dialogue": " ".join(a), "summary": " ".join(a[:2])} for a in (rng.sample(WORDS[:16], 4) for _ in range(n))]


@pytest.fixture(scope="module")
def causal_run(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("causal_gen")
    dev = write_jsonl(tmp / "dev.jsonl", rows(5, 2))
    recipe = write_yaml(tmp / "r.yaml", {
        "task": "sft", "name": "llama-sft", "output_dir": str(tmp / "runs"),
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(write_jsonl(tmp / "train.jsonl", rows(24, 1))), "eval": str(dev),
                 "columns": {"completion": "summary"}, "max_length": 48},
        "sft": {"template": "raw", "prompt_template": "story : {dialogue} :", "rouge_samples": 5, "max_new_tokens": 6},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-2, "progress": False, "eval_every": 2,
                  "best_metric": "loss", "greater_is_better": False}})
    assert main(["train", str(recipe)]) == 0
    return tmp, tmp / "runs" / "llama-sft", dev


def _eval(args, out):
    assert main(["eval", *args, "--task", "generation", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_run_defaults_match_training_and_options_apply(causal_run, tiny_llama_dir):
    tmp, run, dev = causal_run
    trained = json.loads((run / "eval.json").read_text())
    ev = _eval([str(run), "--data", str(dev)], tmp / "a.json")
    assert ev["n"] == 5 and ev["decoding"]["max_new_tokens"] == 6 and ev["decoding"]["temperature"] == 0.0
    assert ev["prompt_template"] == "story : {dialogue} :"
    for k in ("rouge1", "rouge2", "rougeL"):
        assert ev[k] == pytest.approx(trained[k], abs=1e-9)
    same = _eval([str(tiny_llama_dir), "--adapter", str(run / "adapter"), "--data", str(dev), "--batch-size", "2",
                  "--no-cache"], tmp / "b.json")
    assert same["rougeL"] == pytest.approx(ev["rougeL"], abs=1e-9) and same["decoding"]["batch_size"] == 2
    assert same["decoding"]["use_cache"] is False
    short = _eval([str(run), "--data", str(dev), "--max-new-tokens", "1"], tmp / "c.json")
    assert all(len(e["prediction"].split()) <= 1 for e in short["examples"])
    sampled = [_eval([str(run), "--data", str(dev), "--temperature", "2", "--top-k", "20", "--seed", str(s)],
                     tmp / f"s{s}.json")["examples"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded sampling
    first = ev["examples"][0]["prediction"].split()
    if first:
        stopped = _eval([str(run), "--data", str(dev), "--stop", first[0]], tmp / "d.json")
        assert first[0] not in stopped["examples"][0]["prediction"]


def test_checkpoint_best_generates_with_the_best_weights(causal_run):
    tmp, run, dev = causal_run
    assert (run / "best").is_dir()
    best = _eval([str(run), "--data", str(dev), "--checkpoint", "best"], tmp / "best_gen.json")
    assert best["checkpoint"] == "best"
    assert main(["eval", str(run), "--data", str(dev), "--checkpoint", "best", "--out", str(tmp / "best.json")]) == 0
    assert json.loads((tmp / "best.json").read_text())["rougeL"] == pytest.approx(best["rougeL"], abs=1e-9)


def test_bad_generation_options_are_one_line(causal_run, capsys):
    tmp, run, dev = causal_run
    capsys.readouterr()
    for extra in (["--max-new-tokens", "0"], ["--top-p", "1.5"], ["--temperature", "-1"]):
        assert main(["eval", str(run), "--task", "generation", "--data", str(dev), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmforge: error:")
    assert main(["eval", str(run), "--task", "perplexity", "--data", str(dev), "--temperature", "1"]) == 2
    assert "go with --task generation" in capsys.readouterr().err


def test_a_dpo_run_prompts_as_it_trained(tiny_llama_dir, tmp_path):
    """A preference run: raw records go through its prompt template and chat formatting; the same
    as the base model with its adapter and the template given explicitly."""
    import random

    rng = random.Random(0)
    pairs = []
    for _ in range(24):
        a = rng.sample(WORDS[:16], 3)
        pairs.append({"topic": " ".join(a), "chosen": " ".join(a[:2]), "rejected": " ".join(a[1:])})
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = write_yaml(tmp_path / "dpo.yaml", {
        "task": "preference", "name": "dpo", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 48},
        "preference": {"prompt_template": "story : {topic}"},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "dpo"
    ev = _eval([str(run), "--data", str(data), "--max-new-tokens", "4"], tmp_path / "a.json")
    assert ev["n"] == 24 and ev["prompt_template"] == "story : {topic}" and ev["run"] == str(run)
    same = _eval([str(tiny_llama_dir), "--adapter", str(run / "adapter"), "--data", str(data), "--max-new-tokens",
                  "4", "--prompt-template", "story : {topic}", "--reference", "chosen", "--precision", "fp32"],
                 tmp_path / "b.json")
    assert [e["prediction"] for e in same["examples"]] == [e["prediction"] for e in ev["examples"]]
    assert same["rougeL"] == pytest.approx(ev["rougeL"], abs=1e-9)
