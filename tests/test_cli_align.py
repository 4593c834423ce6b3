"""`lmforge train/eval/score` end to end for sft, preference and reward on a tiny Llama."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import WORDS, write_jsonl, write_yaml

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
POS, NEG, FILL = WORDS[:6], WORDS[6:12], WORDS[12:30]


def pref_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(FILL, 3)), "chosen": " ".join(rng.sample(POS, 2)),
             "rejected": " ".join(rng.sample(NEG, 2))} for _ in range(n)]


def sft_rows(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.sample(WORDS[:16], 4)
        out.append({"prompt": " ".join(a), "completion": " ".join(a[:2])})
    return out


def recipe(tmp_path, task, model_dir, data, section, name, **train):
    return write_yaml(tmp_path / f"{name}.yaml", {
        "task": task, "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data), "eval_fraction": 0.2, "max_length": 64},
        task: section, "lora": {"r": 8, "alpha": 16, "modules_to_save": ["norm"]},
        "train": {"epochs": 2, "batch_size": 8, "lr": 2e-2, "progress": False} | train})


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sft_train_eval_merge_and_generate(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(60))
    r = recipe(tmp_path, "sft", tiny_llama_dir, data, {"rouge_samples": 3, "max_new_tokens": 4, "eval_base": True},
               "sft")
    assert main(["train", str(r)]) == 0
    summary = last_json(capsys)
    run = Path(summary["run_dir"])
    assert summary["loss"] < summary["base_loss"]
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert main(["eval", str(run), "--data", str(data)]) == 0
    report = last_json(capsys)
    assert {"loss", "perplexity", "rougeL", "base_loss"} <= set(report)
    assert json.loads((run / "eval_sft.json").read_text()) == report

    # merge -> a plain HF folder; generate from the run (adapter) and from the merged folder
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    assert last_json(capsys)["max_abs_diff"] < 1e-4
    prompts = ["awful bad plot actor", "good fine movie plot", "the movie", "boring dull film"]
    src = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    texts = {}
    for name, model in (("adapter", run), ("merged", merged)):
        out = tmp_path / f"gen_{name}.jsonl"
        assert main(["generate", str(model), "--input", str(src), "--out", str(out), "--raw",
                     "--max-new-tokens", "6", "--precision", "fp32"]) == 0
        texts[name] = [json.loads(x)["generation"] for x in out.read_text().splitlines()]
    assert texts["merged"] == texts["adapter"] and any(texts["adapter"])
    # transformers alone (lmforge never imported) loads the merged folder and generates the same texts
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}, dtype=torch.float32).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        "outs = []\n"
        f"for p in {prompts!r}:\n"
        "    ids = t(p, return_tensors='pt')['input_ids']\n"
        "    out = m.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=t.pad_token_id)\n"
        "    outs.append(t.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n"
        "assert not any(k.split('.')[0] == 'lmforge' for k in sys.modules)\n"
        "print(json.dumps(outs))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == texts["adapter"]


def test_preference_train_eval(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "pref.jsonl", pref_rows(60))
    r = recipe(tmp_path, "preference", tiny_llama_dir, data, {"loss": "sigmoid", "beta": 0.5, "precompute_ref": True},
               "dpo", epochs=3)
    assert main(["train", str(r), "train.log_every=1"]) == 0
    run = Path(last_json(capsys)["run_dir"])
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/margins" in s for s in steps if s["split"] == "train")
    held = write_jsonl(tmp_path / "held.jsonl", pref_rows(30, seed=5))
    assert main(["eval", str(run), "--data", str(held)]) == 0
    report = last_json(capsys)
    assert report["n"] == 30 and report["accuracy"] >= 0.8 and report["mean_margin"] > 0


def test_orpo_qlora_train(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "pref.jsonl", pref_rows(40))
    r = recipe(tmp_path, "preference", tiny_llama_dir, data, {"loss": "orpo", "mode": "qlora"}, "orpo")
    assert main(["train", str(r)]) == 0
    assert {"accuracy", "mean_margin"} <= set(last_json(capsys))


def test_reward_train_and_score(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "pref.jsonl", pref_rows(60))
    r = recipe(tmp_path, "reward", tiny_llama_dir, data, {"mode": "lora"}, "rm", epochs=3, lr=1e-2)
    assert main(["train", str(r)]) == 0
    run = Path(last_json(capsys)["run_dir"])
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "the plot", "response": "good great"},
                                              {"prompt": "the plot", "response": "awful bad"}])
    assert main(["score", str(run), "--input", str(src)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and rows[0]["score"] > rows[1]["score"]


def test_bad_preference_input_is_one_line(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "good"}] * 5)
    r = recipe(tmp_path, "preference", tiny_llama_dir, data, {}, "bad")
    assert main(["train", str(r)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1: missing column 'rejected'" in err[0]
    assert not (tmp_path / "runs" / "bad").exists()  # nothing half-done
    run_sft = tmp_path / "runs" / "x"
    assert main(["score", str(run_sft), "--input", str(data)]) == 2


def test_entry_point_runs_sft(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(20))
    r = recipe(tmp_path, "sft", tiny_llama_dir, data, {"packing": True}, "ep", epochs=1)
    proc = subprocess.run([sys.executable, "-m", "lmforge", "train", str(r)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"].endswith("ep")


@pytest.mark.parametrize("name", ["sft_lora_smollm2_dialogsum", "dpo_lora_smollm2_hh", "orpo_lora_smollm2_hh",
                                  "qlora_sft_smollm2_dialogsum", "reward_smollm2_hh"])
def test_recipes_validate(name):
    from lmforge.config import load_config

    cfg = load_config(ROOT / "recipes" / f"{name}.yaml")
    assert cfg.model.name == "smollm2" and cfg.data.train.startswith("../shared/data/")
