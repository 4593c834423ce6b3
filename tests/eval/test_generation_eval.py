"""Perplexity equals exp of the naive mean cross-entropy; ROUGE/BLEU of generations; the
`eval --task perplexity|generation` path."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from lmforge.commands.generate import run_eval_task
from lmforge.errors import LmforgeError
from lmforge.eval.generation import generation_scores, perplexity_of_texts, read_generation_pairs
from lmforge.models import load_tokenizer

TEXTS = ["the movie was good and the actor was great", "a dull plot", "it is not bad",
         "this film is a very lovely story of an actor in the scene but the plot was quite boring"]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, load_tokenizer(tiny_llama_dir)


@torch.no_grad()
def naive_nll(model, tok, texts, max_length=None):
    """Sum of -log p(x_t | x_<t) one text (window) at a time with full logits, and the token count."""
    total, count = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        step = max_length or len(ids)
        for s in range(0, len(ids), step):
            w = torch.tensor([ids[s:s + step]])
            if w.shape[1] < 2:
                continue
            logits = model(input_ids=w).logits[0, :-1]  # (T-1, V)
            total += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    return total, count


@pytest.mark.parametrize("batch_size, max_length", [(1, None), (3, None), (2, 5)])
def test_perplexity_equals_exp_of_naive_mean_ce(lm, batch_size, max_length):
    model, tok = lm
    total, count = naive_nll(model, tok, TEXTS, max_length)
    report = perplexity_of_texts(model, tok, TEXTS, batch_size=batch_size, max_length=max_length)
    assert report["tokens"] == count
    assert report["nll"] == pytest.approx(total / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_rejects_nothing_to_score(lm):
    model, tok = lm
    with pytest.raises(LmforgeError, match="nothing to score"):
        perplexity_of_texts(model, tok, ["good"])


def test_generation_scores():
    perfect = generation_scores(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert perfect["rouge1"] == pytest.approx(1.0) and perfect["bleu"] == pytest.approx(100.0)
    half = generation_scores(["the cat"], [["a dog", "the cat sat"]])
    assert half["rouge1"] == pytest.approx(0.8)  # best reference: P = 1, R = 2/3 -> F = 0.8


def test_read_generation_pairs_errors(tmp_path):
    good = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "reference": "b"},
                                              {"messages": [{"role": "user", "content": "c"}], "summaries": ["x"],
                                               "summary": "d"}])
    prompts, refs = read_generation_pairs(str(good))
    assert prompts[0] == "a" and refs == ["b", "d"]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "reference": "b"}, {"prompt": "c"}])
    with pytest.raises(LmforgeError, match="line 2: missing a reference"):
        read_generation_pairs(str(bad))


def _args(model, task, data, out=None):
    return argparse.Namespace(run_dir=str(model), task=task, data=str(data), out=str(out) if out else None,
                              precision="fp32")


def test_eval_task_perplexity_and_generation(lm, tiny_llama_dir, tmp_path, capsys):
    model, tok = lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    assert run_eval_task(_args(tmp_path / "m", "perplexity", txt, tmp_path / "ppl.json")) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    total, count = naive_nll(model, tok, TEXTS)
    assert printed["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert json.loads((tmp_path / "ppl.json").read_text())["tokens"] == count

    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "the movie", "reference": "good film"},
                                                {"prompt": "a plot", "references": ["dull story", "bad plot"]}])
    assert run_eval_task(_args(tmp_path / "m", "generation", data)) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(report) and report["n"] == 2
    with pytest.raises(LmforgeError, match="--task must be one of"):
        run_eval_task(_args(tmp_path / "m", "accuracy", data))


def test_lmforge_eval_cli_on_a_run_with_an_adapter(lm, tmp_path, capsys):
    from conftest import write_yaml
    from lmforge.adapters import LoraSpec, apply_lora, load_adapter, save_adapter
    from lmforge.cli import main

    model, tok = lm
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    adapted = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    apply_lora(adapted, LoraSpec(r=4, alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)  # A and B seeded: the result must not depend on test order
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 1.0, generator=g)
    run = tmp_path / "run"
    save_adapter(adapted, run / "adapter", base_model_name_or_path=str(base), task_type="CAUSAL_LM")
    write_yaml(run / "config.yaml", {"task": "sft", "model": {"name": str(base)}})
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    load_adapter(fresh, run / "adapter")
    total, count = naive_nll(fresh, tok, TEXTS)
    assert main(["eval", str(run), "--task", "perplexity", "--data", str(txt)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the CLI runs in the auto precision (bf16 autocast on CPUs with bf16 units): 2% tolerance
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=2e-2)  # the adapter is on
    assert json.loads((run / "eval_perplexity_texts.json").read_text())["tokens"] == count
    assert main(["eval", str(base), "--task", "perplexity", "--data", str(txt)]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    base_total, _ = naive_nll(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), tok, TEXTS)
    assert plain["perplexity"] == pytest.approx(math.exp(base_total / count), rel=2e-2)  # no adapter
    assert abs(base_total - total) / count > 0.1  # the adapter moves the per-token NLL well past the tolerance
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "the movie", "reference": "good film"}])
    assert main(["eval", str(run), "--task", "generation", "--data", str(data)]) == 0
    assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(json.loads((run / "eval_generation_gen.json").read_text()))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "the movie"}])
    assert main(["eval", str(run), "--task", "generation", "--data", str(bad)]) == 2
    assert "missing a reference" in capsys.readouterr().err
