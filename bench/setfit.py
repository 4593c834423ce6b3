"""SetFit few-shot classification: lmforge vs the ``setfit`` library, side by side.

Same packaged MiniLM (all-MiniLM-L6-v2), the same 16-per-class sample of SST-2 train (a different
seeded sample per repetition, shared by both), the same pair count (``--iterations`` x 32 pairs
of each kind: setfit's ``num_iterations`` draws that many, lmforge draws that many distinct pairs),
1 epoch, batch 16, learning rate 2e-5, warm-up 10 %, weight decay 0.01, cosine-similarity loss,
then scikit-learn's logistic regression head on the fine-tuned embeddings. Both are scored on all
of SST-2 dev. Training time is the whole ``train`` call (pair building, contrastive stage, head);
model loading and evaluation are not in it. Each trial runs in a fresh process; peers alternate.
setfit runs at its default (fp32; its ``use_amp`` is fp16, not a CPU setting); lmforge at its
default (bf16 autocast on CPUs with native bf16) and, for reference, in fp32.

    .venv/bin/python bench/setfit.py [--reps 3] [--per-class 16] [--iterations 7] [--data ../shared/data/sst2]

Prints one JSON line: median training seconds, mean accuracy over the repetitions, inference
samples/s, peak RSS, the speed-up (setfit time / lmforge time) and the accuracy difference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, emit  # noqa: E402

SST2 = "../shared/data/sst2"
LR, BATCH, WARMUP, DECAY = 2e-5, 16, 0.1, 0.01


def sample(data: str, per_class: int, seed: int, out: Path) -> Path:
    """The seeded per-class sample of ``train.jsonl``, written as text/label JSONL."""
    from lmforge.tasks.classify_heads import sample_per_class

    rows = [json.loads(line) for line in open(Path(data) / "train.jsonl", encoding="utf-8")]
    idx = sample_per_class([r["label"] for r in rows], per_class, seed)
    with open(out, "w", encoding="utf-8") as fh:
        for i in idx:
            fh.write(json.dumps({"text": rows[i]["sentence"], "label": rows[i]["label"]}) + "\n")
    return out


def dev_rows(data: str, limit: int | None) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in open(Path(data) / "dev.jsonl", encoding="utf-8")][:limit]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def run_lmforge(train: str, data: str, iterations: int, precision: str, seed: int, limit: int | None) -> dict:
    import numpy as np

    from lmforge.api import config, train_config

    out = Path(tempfile.mkdtemp())
    cfg = config({
        "task": "classify", "name": "bench", "output_dir": str(out), "seed": seed,
        "model": {"name": "minilm", "precision": precision},
        "data": {"train": train, "eval_fraction": 0.0, "labels": ["0", "1"], "max_length": 256},
        "classify": {"method": "setfit", "setfit": {"per_class": 10**6, "num_iterations": iterations}},
        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "warmup_ratio": WARMUP, "weight_decay": DECAY,
                  "schedule": "linear", "max_grad_norm": 1.0, "progress": False, "log_every": 10_000},
    })
    run = train_config(cfg)
    task, train_s = run.task, run.train_seconds  # training only, as before (no model loading)
    texts, gold = dev_rows(data, limit)
    t0 = time.perf_counter()
    pred = np.asarray(task.predict_texts(texts)).argmax(-1)
    infer_s = time.perf_counter() - t0
    return {"train_s": train_s, "accuracy": float((pred == np.array(gold)).mean()),
            "infer_samples_per_s": len(texts) / infer_s, "pairs": task.pair_count}


def _setfit_library():
    """The installed ``setfit`` package (this file's own name shadows it on ``sys.path``)."""
    here = Path(__file__).resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here.parent]
    mod = sys.modules.get("setfit")
    if mod is not None and Path(getattr(mod, "__file__", "") or ".").resolve() == here:
        del sys.modules["setfit"]
    import setfit

    return setfit


def run_setfit(train: str, data: str, iterations: int, seed: int, limit: int | None) -> dict:
    import numpy as np
    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    from lmforge.models import resolve_model

    hf_logging.set_verbosity_error()
    lib = _setfit_library()
    SetFitModel, Trainer, TrainingArguments = lib.SetFitModel, lib.Trainer, lib.TrainingArguments
    rows = [json.loads(line) for line in open(train, encoding="utf-8")]
    ds = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
    model = SetFitModel.from_pretrained(str(resolve_model("minilm")), device="cpu")
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), batch_size=BATCH, num_epochs=1,
                             num_iterations=iterations, body_learning_rate=LR, warmup_proportion=WARMUP,
                             l2_weight=DECAY, seed=seed, report_to="none", show_progress_bar=False,
                             logging_strategy="no", save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    texts, gold = dev_rows(data, limit)
    t0 = time.perf_counter()
    pred = np.asarray(model.predict(texts, batch_size=64, show_progress_bar=False))
    infer_s = time.perf_counter() - t0
    return {"train_s": train_s, "accuracy": float((pred == np.array(gold)).mean()),
            "infer_samples_per_s": len(texts) / infer_s, "pairs": 2 * iterations * len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=SST2, help="folder with train.jsonl and dev.jsonl (sentence, label)")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=7, help="pairs of each kind per example (<= 7 keeps "
                    "lmforge's distinct pairs equal to setfit's count at 16 per class)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-limit", type=int, default=None, help="score only the first N dev sentences")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-setfit-"))
    res: dict[str, list[dict]] = {}
    for rep in range(args.reps):  # a new sample per repetition, shared by the peers
        train = str(sample(args.data, args.per_class, rep, tmp / f"train{rep}.jsonl"))
        common = {"train": train, "data": args.data, "iterations": args.iterations, "seed": rep,
                  "limit": args.eval_limit}
        trials = {"setfit": (run_setfit, common), "lmforge_auto": (run_lmforge, common | {"precision": "auto"}),
                  "lmforge_fp32": (run_lmforge, common | {"precision": "fp32"})}
        if rep % 2:
            trials = dict(reversed(list(trials.items())))
        for name, runs in alternate(trials, reps=1).items():
            res.setdefault(name, []).extend(runs)
    fig = {k: {"train_s": round(statistics.median(r["train_s"] for r in v), 2),
               "accuracy": round(statistics.mean(r["accuracy"] for r in v), 4),
               "accuracies": [round(r["accuracy"], 4) for r in v],
               "infer_samples_per_s": round(statistics.median(r["infer_samples_per_s"] for r in v), 1),
               "pairs": v[0]["pairs"], "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in v), 1)}
           for k, v in res.items()}
    emit({
        "bench": "setfit", "model": "minilm (all-MiniLM-L6-v2)", "data": "sst2", "per_class": args.per_class,
        "iterations": args.iterations, "epochs": 1, "batch": BATCH, "reps": args.reps,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"), "figures": fig,
        "speedup_default": round(fig["setfit"]["train_s"] / fig["lmforge_auto"]["train_s"], 3),
        "speedup_fp32": round(fig["setfit"]["train_s"] / fig["lmforge_fp32"]["train_s"], 3),
        "accuracy_diff_points": round(100 * (fig["lmforge_auto"]["accuracy"] - fig["setfit"]["accuracy"]), 2),
    })


if __name__ == "__main__":
    main()
