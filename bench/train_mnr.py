"""MNR training: lmforge vs the sentence-transformers trainer, side by side.

Same packaged MiniLM, the same (anchor, positive) pairs (default: SNLI-triplet sentence pairs
from ``../shared/data/snli_triplets/dev.jsonl``), multiple-negatives ranking loss with scale 20,
the same batch size, steps, learning rate, linear schedule and gradient clipping. Each trial runs
in a fresh process; peers alternate; medians over ``--reps``. Warm-up steps are not timed.
Figures: both in fp32, and each at its best setting (bf16 autocast on this CPU: the
sentence-transformers trainer with ``bf16=True``, lmforge with automatic precision). Prints one
JSON line with pairs/s (per wall-clock and per CPU second; the latter is steadier on a shared
machine, run with OMP_NUM_THREADS=1 there), peak RSS and the ratios.

    .venv/bin/python bench/train_mnr.py [--steps 30] [--warmup 3] [--batch 32] [--reps 3] [--data FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, emit, median  # noqa: E402

TRIPLETS = "../shared/data/snli_triplets/dev.jsonl"
LR = 2e-5


def write_pairs(src: str, n: int, out: Path) -> Path:
    """The first ``n`` (anchor, positive) pairs of a triplet/pair file, as anchor/positive JSONL."""
    rows = []
    with open(src, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            a, p = r.get("anchor", r.get("sent0")), r.get("positive", r.get("sent1"))
            rows.append({"anchor": a, "positive": p})
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{src}: only {len(rows)} pairs (asked for {n})")
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return out


def run_lmforge(data: str, steps: int, warmup: int, batch: int, precision: str) -> dict:
    from lmforge.api import config, train_config

    out = tempfile.mkdtemp()
    cfg = config({
        "task": "embed", "name": "bench", "output_dir": out, "seed": 0,
        "model": {"name": "minilm", "precision": precision},
        "data": {"train": data, "eval_fraction": 0.0, "max_length": 256},
        "embed": {"loss": "mnr", "scale": 20.0, "eval_before": False},
        "train": {"max_steps": steps + warmup, "batch_size": batch, "lr": LR, "progress": False,
                  "log_every": 10_000, "max_grad_norm": 1.0, "warmup_ratio": 0.0, "schedule": "linear"},
    })
    marks = {}

    def on_step(step, rec):
        if step == warmup:
            marks["t0"], marks["c0"] = time.perf_counter(), time.process_time()
        marks["t1"], marks["c1"] = time.perf_counter(), time.process_time()

    train_config(cfg, on_step=on_step)
    return _rates(marks, steps * batch)


def run_st(data: str, steps: int, warmup: int, batch: int, bf16: bool) -> dict:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    from lmforge.models import resolve_model

    hf_logging.set_verbosity_error()
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    ds = Dataset.from_dict({"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]})
    model = SentenceTransformer(str(resolve_model("minilm")), device="cpu")
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                marks["t0"], marks["c0"] = time.perf_counter(), time.process_time()
            marks["t1"], marks["c1"] = time.perf_counter(), time.process_time()

    args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + warmup,
        learning_rate=LR, weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=bf16,
        dataloader_num_workers=0, seed=0)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                               loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[Clock()]).train()
    return _rates(marks, steps * batch)


def _rates(marks: dict, pairs: int) -> dict:
    return {"pairs_per_s": pairs / (marks["t1"] - marks["t0"]), "pairs_per_cpu_s": pairs / (marks["c1"] - marks["c0"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=TRIPLETS)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = str(write_pairs(args.data, (args.steps + args.warmup) * args.batch,
                           Path(tempfile.mkdtemp(prefix="bench-mnr-")) / "pairs.jsonl"))
    common = {"data": data, "steps": args.steps, "warmup": args.warmup, "batch": args.batch}
    res = alternate({
        "st_fp32": (run_st, common | {"bf16": False}),
        "lmforge_fp32": (run_lmforge, common | {"precision": "fp32"}),
        "st_bf16": (run_st, common | {"bf16": True}),
        "lmforge_auto": (run_lmforge, common | {"precision": "auto"}),
    }, reps=args.reps)
    fig = {k: {"pairs_per_s": round(median(v, "pairs_per_s"), 2),
               "pairs_per_cpu_s": round(median(v, "pairs_per_cpu_s"), 2),
               "peak_rss_mb": round(median(v, "peak_rss_mb"), 1)} for k, v in res.items()}
    st_best = max(("st_fp32", "st_bf16"), key=lambda k: fig[k]["pairs_per_s"])
    emit({
        "bench": "train_mnr", "model": "minilm (all-MiniLM-L6-v2)", "data": Path(args.data).name,
        "batch": args.batch, "steps": args.steps, "reps": args.reps, "figures": fig,
        "ratio_default": round(fig["lmforge_auto"]["pairs_per_s"] / fig["st_fp32"]["pairs_per_s"], 3),
        "ratio_fp32": round(fig["lmforge_fp32"]["pairs_per_s"] / fig["st_fp32"]["pairs_per_s"], 3),
        "ratio_best": round(fig["lmforge_auto"]["pairs_per_s"] / fig[st_best]["pairs_per_s"], 3),
        "ratio_default_cpu_time": round(fig["lmforge_auto"]["pairs_per_cpu_s"] / fig["st_fp32"]["pairs_per_cpu_s"], 3),
        "ratio_best_cpu_time": round(fig["lmforge_auto"]["pairs_per_cpu_s"] / fig[st_best]["pairs_per_cpu_s"], 3),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count(),
        "rss_ratio_default": round(fig["lmforge_auto"]["peak_rss_mb"] / fig["st_fp32"]["peak_rss_mb"], 3),
        "rss_ratio_best": round(fig["lmforge_auto"]["peak_rss_mb"] / fig[st_best]["peak_rss_mb"], 3),
    })


if __name__ == "__main__":
    main()
