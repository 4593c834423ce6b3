"""Every kind through the tasks: the adapter: section trains, saves and reloads each kind (classify,
sft, ner, mlm, embed), the DPO reference (adapters disabled) is the base model for every kind,
and bad adapter input is one line naming the key."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import WORDS, sentiment_rows, write_jsonl
from lmforge import api
from lmforge.config import build_config
from lmforge.errors import LmforgeError

KINDS = {"lora": {"r": 4}, "dora": {"r": 4}, "ia3": {}, "prompt": {"num_virtual_tokens": 4},
         "bottleneck": {"reduction_factor": 4, "placement": "houlsby"}}
TRAIN = {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 1}


def _cfg(tmp_path, task: str, model_dir, rows, kind: str, section: dict, name="run", **extra):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return build_config({"task": task, "name": name, "output_dir": str(tmp_path / "runs"),
                         "model": {"name": str(model_dir), "precision": "fp32"},
                         "data": {"train": str(path), "eval_fraction": 0.25, "max_length": 32},
                         "adapter": {"kind": kind, **KINDS[kind]}, task: section, "train": TRAIN} | extra)


@pytest.mark.parametrize("kind", list(KINDS))
def test_classify_trains_saves_and_reloads_each_kind(tmp_path, tiny_bert_dir, kind):
    cfg = _cfg(tmp_path, "classify", tiny_bert_dir, sentiment_rows(32), kind, {"mode": "adapter"})
    run = api.train_config(cfg)
    assert (run.run_dir / "adapter" / "adapter_config.json").is_file()
    probs = run.task.predict_items(run.task.eval_items)
    again = api.load(run.run_dir).task
    torch.testing.assert_close(again.predict_items(run.task.eval_items), probs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sft_each_kind_and_the_dpo_reference_is_the_base(tmp_path, tiny_llama_dir, kind):
    from transformers import AutoModelForCausalLM

    from lmforge.tasks.preference import PreferenceTask

    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.sample(WORDS, 3)), "chosen": " ".join(rng.sample(WORDS[:6], 2)),
             "rejected": " ".join(rng.sample(WORDS[6:12], 2))} for _ in range(16)]
    cfg = _cfg(tmp_path, "preference", tiny_llama_dir, rows, kind, {"mode": "adapter"})
    task = PreferenceTask(cfg)
    with torch.no_grad():
        for p in task.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    batch = task.collate(task.train_items[:2])
    ref, _ = task.reference_logps(batch)
    pol, _ = task.sequence_logps(batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    task.model = base  # the same computation on the plain base model
    expect, _ = task.sequence_logps(batch)
    torch.testing.assert_close(ref, expect, atol=1e-4, rtol=0)
    assert (pol - ref).abs().max() > 1e-3

    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    run = api.train_config(_cfg(tmp_path, "sft", tiny_llama_dir, sft_rows, kind, {"mode": "adapter"}, name="sft"))
    assert api.load(run.run_dir).task.model is not None


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_embed_and_mlm_save_merged_models(tmp_path, tiny_bert_dir, kind):
    rows = [{"text": " ".join(random.Random(i).sample(WORDS, 6))} for i in range(24)]
    mlm = api.train_config(_cfg(tmp_path, "mlm", tiny_bert_dir, rows, kind, {"mode": "adapter"}, name="mlm"))
    assert (mlm.run_dir / "model" / "config.json").is_file() and not (mlm.run_dir / "adapter").exists()
    assert api.load(mlm.run_dir).task.evaluate(mlm.task.eval_items)["accuracy"] >= 0
    emb = api.train_config(_cfg(tmp_path, "embed", tiny_bert_dir, rows, kind,
                                {"mode": "adapter", "loss": "simcse_unsup", "dropout": 0.1}, name="emb"))
    assert (emb.run_dir / "model" / "modules.json").is_file()


def test_ner_with_prompt_tuning(tmp_path, tiny_bert_dir):
    rng = random.Random(0)
    rows = [{"tokens": rng.sample(WORDS, 4), "ner_tags": ["B-PER", "O", "B-LOC", "O"]} for _ in range(24)]
    run = api.train_config(_cfg(tmp_path, "ner", tiny_bert_dir, rows, "prompt", {"mode": "adapter"}))
    items = run.task.eval_items
    assert api.load(run.run_dir).task.predict_items(items) == run.task.predict_items(items)


@pytest.mark.parametrize("adapter,task,match", [
    ({"kind": "qlora"}, "classify", "adapter: kind: unknown adapter kind 'qlora'"),
    ({"kind": "lora", "num_virtual_tokens": 3}, "classify", "num_virtual_tokens: an option of prompt, not of lora"),
    ({"kind": "ia3", "r": 4}, "sft", "r: an option of lora and dora, not of ia3"),
    ({"kind": "dora", "rank": 4}, "sft", "rank: unknown option"),
    ({"kind": "prompt", "num_virtual_tokens": "many"}, "sft", "num_virtual_tokens: Input should be a valid integer"),
    ({"kind": "bottleneck", "placement": "middle"}, "sft", "placement must be houlsby or pfeiffer"),
    ({"kind": "prompt"}, "embed", "prompt cannot be used by task embed .* tasks that can: classify, ner, sft"),
    ({"kind": "bottleneck"}, "mlm", "bottleneck cannot be used by task mlm"),
])
def test_bad_adapter_sections_are_one_line(adapter, task, match):
    with pytest.raises(LmforgeError, match=match) as err:
        build_config({"task": task, "model": {"name": "x"}, "adapter": adapter}, source="r.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("r.yaml: ")


def test_old_lora_section_is_read_with_one_note(caplog):
    import lmforge.config as c

    c._LORA_NOTE.clear()
    cfg = build_config({"task": "classify", "model": {"name": "x"}, "lora": {"r": 4, "alpha": 8}}, source="r.yaml")
    build_config({"task": "classify", "model": {"name": "x"}, "lora": {"r": 2}}, source="r.yaml")
    assert cfg.adapter.kind == "lora" and cfg.adapter.options == {"r": 4, "alpha": 8.0}
    notes = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0].getMessage()


def test_run_refuses_an_adapter_folder_of_another_kind(tmp_path, tiny_bert_dir):
    import yaml

    cfg = _cfg(tmp_path, "classify", tiny_bert_dir, sentiment_rows(16), "ia3", {"mode": "adapter"})
    run = api.train_config(cfg)
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    saved["adapter"] = {"kind": "lora"}
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(LmforgeError, match="is a ia3 adapter, not lora"):
        api.load(run.run_dir).task.predict_items(run.task.eval_items)


def test_compare_accepts_adapter_kinds(tmp_path, tiny_bert_dir):
    from lmforge.compare import read_compare, run_compare
    from conftest import write_yaml

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    path = write_yaml(tmp_path / "c.yaml", {
        "name": "kinds", "output_dir": str(tmp_path / "runs"),
        "base": {"task": "classify", "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
                 "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 32},
                 "classify": {"mode": "adapter"}, "train": TRAIN},
        "methods": {"ia3": {"adapter": {"kind": "ia3"}}, "prompt": {"adapter": {"kind": "prompt", "num_virtual_tokens": 2}},
                    "lora_r2": {"adapter": {"kind": "lora", "r": 2}}}})
    rows, md, _ = run_compare(read_compare(path), source=str(path))
    assert [r["kind"] for r in rows] == ["finetune/ia3", "finetune/prompt", "finetune/lora"]
    assert all(r["peak_rss_mb"] > 0 and 0 < r["saved_mb"] < 1 for r in rows)
    assert rows[1]["trainable_params"] < rows[2]["trainable_params"]
    assert "peak RSS (MB) | saved (MB)" in md.read_text()
