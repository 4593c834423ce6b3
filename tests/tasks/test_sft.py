"""The sft task: target masking, drops, packing, training in every mode, evaluation."""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from conftest import WORDS, write_jsonl
from lmforge.config import build_config, dump_config
from lmforge.data.chat import IGNORE
from lmforge.errors import LmforgeError
from lmforge.tasks.sft import SftTask
from lmforge.train import fit


def copy_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable pairs: the completion repeats the prompt's first two words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.sample(WORDS[:16], 4)
        rows.append({"prompt": " ".join(a), "completion": " ".join(a[:2])})
    return rows


def make_cfg(tmp_path, model_dir, rows, sft=None, train=None, data=None, name="run", lora=None):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return build_config({
        "task": "sft", "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(path), "eval_fraction": 0.2, "max_length": 64} | (data or {}),
        "sft": sft or {}, "lora": {"r": 8, "alpha": 16} | (lora or {}),
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 1} | (train or {}),
    })


def train(cfg):
    task = SftTask(cfg)
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    before = task.evaluate()
    after = fit(task, cfg, run)
    task.save(run)
    return task, before, after


def test_targets_are_completion_tokens_and_units_count_them(tmp_path, tiny_llama_dir):
    task = SftTask(make_cfg(tmp_path, tiny_llama_dir, [{"prompt": "good movie", "completion": "great plot"}] * 5))
    it = task.train_items[0]
    tok = task.tokenizer
    trained = tok.convert_ids_to_tokens([t for t in it["targets"] if t != IGNORE])
    assert trained[:2] == ["great", "plot"] and trained[-1] == "</s>"
    assert tok.convert_ids_to_tokens(it["input_ids"][-len(trained):])[:2] == ["great", "plot"]
    batch = task.collate(task.train_items[:3])
    assert task.batch_units(batch) == 3 * len(trained)
    every = SftTask(make_cfg(tmp_path, tiny_llama_dir, [{"prompt": "good movie", "completion": "great plot"}] * 5,
                             sft={"train_on": "all"}))
    assert sum(t != IGNORE for t in every.train_items[0]["targets"]) == len(it["input_ids"]) - 1


def test_samples_without_targets_after_truncation_are_counted_and_dropped(tmp_path, tiny_llama_dir, caplog):
    rows = copy_rows(20)
    rows[3] = {"prompt": " ".join(["good"] * 80), "completion": "bad"}  # the prompt fills max_length
    rows[7] = {"prompt": "good", "completion": "  "}
    cfg = make_cfg(tmp_path, tiny_llama_dir, rows, data={"eval_fraction": 0.0})
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        task = SftTask(cfg)
    assert len(task.train_items) == 18
    text = caplog.text
    assert "dropped 1 of 20 samples: no trainable token after truncation to max_length=64 (first: " in text
    assert "run.jsonl line 4)" in text
    assert "dropped 1 of 20 samples: empty completion (first: " in text and "line 8)" in text
    rep = task.reports[0].as_dict()
    assert rep["truncated"] == 1 and rep["total"] == 20


def test_prompt_left_truncation_keeps_a_long_prompts_reply(tmp_path, tiny_llama_dir):
    rows = copy_rows(20)
    rows[3] = {"prompt": "bad " + " ".join(["good"] * 80), "completion": "bad"}  # right truncation drops it
    cfg = make_cfg(tmp_path, tiny_llama_dir, rows, data={"eval_fraction": 0.0}, sft={"truncation": "prompt_left"})
    task = SftTask(cfg)
    assert len(task.train_items) == 20 and task.reports[0].as_dict()["truncated"] == 1
    long = max(task.train_items, key=lambda it: len(it["input_ids"]))
    tok = task.tokenizer
    assert len(long["input_ids"]) == 64
    assert tok.convert_ids_to_tokens([t for t in long["targets"] if t != IGNORE])[0] == "bad"   # the reply stays
    assert tok.convert_ids_to_tokens(long["input_ids"]).count("bad") == 1       # the prompt's first word went


def test_all_dropped_and_bad_columns_are_one_line_errors(tmp_path, tiny_llama_dir):
    long = [{"prompt": " ".join(["good"] * 80), "completion": "bad"}] * 4
    with pytest.raises(LmforgeError, match="no train samples left"):
        SftTask(make_cfg(tmp_path, tiny_llama_dir, long, data={"eval_fraction": 0.0}))
    with pytest.raises(LmforgeError, match=r"line 1: missing column 'completion'"):
        SftTask(make_cfg(tmp_path, tiny_llama_dir, [{"prompt": "a"}] * 4, data={"eval_fraction": 0.0}))
    with pytest.raises(LmforgeError, match="cannot tell the format"):
        SftTask(make_cfg(tmp_path, tiny_llama_dir, [{"foo": "a"}] * 4, data={"eval_fraction": 0.0}))
    with pytest.raises(LmforgeError, match="eval_base needs mode lora"):
        SftTask(make_cfg(tmp_path, tiny_llama_dir, copy_rows(5), sft={"mode": "full", "eval_base": True}))


def test_prompt_template_and_messages_format(tmp_path, tiny_llama_dir):
    rows = [{"dialogue": "good movie", "summary": "great"}] * 5
    cfg = make_cfg(tmp_path, tiny_llama_dir, rows, sft={"prompt_template": "the plot : {dialogue}"},
                   data={"columns": {"completion": "summary"}, "eval_fraction": 0.0})
    task = SftTask(cfg)
    toks = task.tokenizer.convert_ids_to_tokens(task.train_items[0]["input_ids"])
    assert "the" in toks and "plot" in toks and "great" in toks
    msgs = [{"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "bad film"}]}] * 5
    task = SftTask(make_cfg(tmp_path, tiny_llama_dir, msgs, name="msgs", data={"eval_fraction": 0.2}))
    assert task.eval_items[0]["reference"] == "bad film"
    assert task.eval_items[0]["prompt"] == [{"role": "user", "content": "good"}]
    with pytest.raises(LmforgeError, match="prompt_template needs column 'dialog'"):
        SftTask(make_cfg(tmp_path, tiny_llama_dir, rows, sft={"prompt_template": "{dialog}"},
                         data={"columns": {"completion": "summary"}}))


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_training_lowers_the_eval_loss(tmp_path, tiny_llama_dir, mode):
    # the tiny model's tied embeddings are ~0.02 wide: with a frozen head the logits stay near 0
    # unless the final norm may scale them, so the adapter runs also train it (modules_to_save)
    lr = 3e-3 if mode == "full" else 3e-2
    lora = {"modules_to_save": ["norm"]}
    cfg = make_cfg(tmp_path, tiny_llama_dir, copy_rows(80), sft={"mode": mode}, train={"epochs": 10, "lr": lr},
                   lora=lora)
    task, before, after = train(cfg)
    assert after["loss"] < before["loss"] - 0.3
    assert after["perplexity"] < before["perplexity"]
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["split"] == "train"]
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_packing_trains_on_fewer_rows(tmp_path, tiny_llama_dir):
    cfg = make_cfg(tmp_path, tiny_llama_dir, copy_rows(60), sft={"packing": True},
                   data={"max_length": 128}, train={"epochs": 3})
    task, before, after = train(cfg)
    assert len(task.train_items) < 48 and all("position_ids" in r for r in task.train_items)
    assert sum(r["n_samples"] for r in task.train_items) == 48
    assert after["loss"] < before["loss"]


def test_rouge_eval_and_base_metrics(tmp_path, tiny_llama_dir):
    cfg = make_cfg(tmp_path, tiny_llama_dir, copy_rows(40),
                   sft={"rouge_samples": 4, "max_new_tokens": 4, "eval_base": True})
    task = SftTask(cfg)
    with torch.no_grad():
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    m = task.evaluate()
    for k in ("loss", "perplexity", "rouge1", "rouge2", "rougeL", "base_loss", "base_rougeL"):
        assert k in m
    assert m["rouge_n"] == 4 and m["base_loss"] != m["loss"]
    assert len(task.last_generations) == 4
    # the base metrics are the model with adapters off: the same as a fresh LoRA model's
    fresh = SftTask(make_cfg(tmp_path, tiny_llama_dir, copy_rows(40), sft={"rouge_samples": 4, "max_new_tokens": 4}))
    assert abs(fresh.evaluate()["loss"] - m["base_loss"]) < 1e-5


def test_eval_file_on_a_finished_run(tmp_path, tiny_llama_dir):
    cfg = make_cfg(tmp_path, tiny_llama_dir, copy_rows(40), train={"epochs": 1})
    task, _, after = train(cfg)
    back = SftTask.from_run(cfg.run_dir)
    items = back.read_eval_file(str(tmp_path / "run.jsonl"))
    assert len(items) == 40 and "prompt" in items[0]
    m = back.evaluate(items)
    assert m["tokens"] == sum(sum(t != IGNORE for t in it["targets"]) for it in items)
    assert (cfg.run_dir / "adapter" / "adapter_config.json").is_file()
    assert (cfg.run_dir / "data_report.json").is_file()


def test_plain_text_format_trains_on_every_token_with_eos(tmp_path, tiny_llama_dir, caplog):
    rows = [{"text": "the movie was good"}, {"text": "  "}, {"text": "a dull plot"}] * 2
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        task = SftTask(make_cfg(tmp_path, tiny_llama_dir, rows, data={"eval_fraction": 0.0}))
    assert "dropped 2 of 6 samples: empty text (first: " in caplog.text and "line 2)" in caplog.text
    tok = task.tokenizer
    it = task.train_items[0]
    ids = tok("the movie was good")["input_ids"] + [tok.eos_token_id]
    assert it["input_ids"] == ids and it["targets"] == ids[1:] + [IGNORE]
    assert len(task.train_items) == 4
