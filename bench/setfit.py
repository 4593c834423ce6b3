"""SetFit few-shot classification: lmforge vs the ``setfit`` library, side by side.

Same packaged MiniLM (all-MiniLM-L6-v2), the same 16-per-class sample of SST-2 train (a different
seeded sample per repetition, shared by both), the same pair count (``--iterations`` x 32 pairs
of each kind: setfit's ``num_iterations`` draws that many, lmforge draws that many distinct pairs),
1 epoch, batch 16, learning rate 2e-5, warm-up 10 %, weight decay 0.01, cosine-similarity loss,
then scikit-learn's logistic regression head on the fine-tuned embeddings. Both are scored on all
of SST-2 dev. Training time is the whole ``train`` call (pair building, contrastive stage, head);
model loading and evaluation are not in it. Each trial runs in a fresh process; trials alternate.

Trials (pairs/s = contrastive pairs / training seconds; quality = SST-2 dev accuracy):
- ``setfit_default``: the library's defaults (fp32; its ``use_amp`` is fp16, not a CPU setting);
- ``setfit_bf16``: its best setting here: ``trainer.train()`` under ``torch.autocast("cpu", bfloat16)``
  (the library has no bf16 switch; autocast around its call is what a user can do);
- ``lmforge_default``: ``precision: auto`` (bf16 autocast), unpadded batches;
- ``lmforge_padded``: the same on plain padded batches (``attn_implementation: eager``).
``ratio_default``/``ratio_best`` compare pairs/s (setfit time / lmforge time on the same pairs).

    .venv/bin/python bench/setfit.py [--reps 3] [--per-class 16] [--iterations 7] [--threads 1] [--profile]

Prints one JSON line: median training seconds and pairs/s, mean accuracy over the repetitions,
inference samples/s, peak RSS and the ratios.

Measured (session 11, AVX-512 without BF16, QUIET, 2 threads; ``runs/lead11/setfit2t.log``): ``--reps 2 --per-class 16
--iterations 5 --eval-limit 200 --threads 2 --only lmforge_default,setfit_default``: lmforge 67.0 pairs/s (4.8 s)
vs setfit fp32 26.2 (12.4 s): **ratio_best 2.56x**, RSS 0.66x; accuracy 0.65 (0.59, 0.71) / 0.67 (0.625, 0.715);
inference 379.5 vs 266.2 samples/s.

Measured (session 4, 1 thread, load 7-9 on the 2 cores; wall only: the training time is the task's):
- equal work, ``--reps 2 --per-class 16 --iterations 5 --eval-limit 200 --threads 1 --only lmforge_default,setfit_bf16``
  (320 pairs each side): lmforge 13.24 pairs/s (24.2 s) vs setfit bf16 5.74 (56.0 s): **ratio_best 2.31x**,
  peak RSS 0.74x; accuracy 0.655 (0.595, 0.715) / 0.670 (0.62, 0.72); inference 86.8 vs 28.9 samples/s.
- ``--reps 2 --per-class 4 --iterations 5 --eval-limit 200 --threads 1 --only setfit_default,lmforge_default,setfit_bf16``:
  ratio_best 0.73x per pair, ratio_default 1.84x, but unequal work: lmforge draws 28 distinct pairs
  (2 steps), setfit 80 (5 steps), so fixed costs dominate lmforge's 6.95 s (setfit bf16 14.46 s for
  80); accuracy 0.608 / 0.618 (bf16) / 0.620 (fp32); inference 87.4 vs 35.8 samples/s.

Two threads (session 5, load 7-10; both sides with ``OMP_WAIT_POLICY=PASSIVE`` exported for the whole
bench: libgomp's default spin-wait costs both sides 3-7x CPU per step at 2 threads on this loaded
machine, see bench/adapters.py):
- ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/setfit.py --reps 2 --per-class 16 --iterations 5 --eval-limit 200 --threads 2 --only lmforge_default,setfit_bf16``
  (320 pairs each side): lmforge 18.45 pairs/s (17.3 s) vs setfit bf16 7.19 (44.7 s): **ratio_best 2.57x wall**,
  peak RSS 0.76x; accuracy 0.658 (0.595, 0.72) / 0.670 (0.62, 0.72); inference 91.7 vs 32.0 samples/s.
  (lmforge's two train_s were 17.3442 and 17.3443 s on different samples: suspiciously equal, not checked.)
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
from _common import alternate, emit, figures, ratios, set_threads, timed_call  # noqa: E402

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


def run_lmforge(train: str, data: str, iterations: int, seed: int, limit: int | None, threads, profile: bool,
                attn: str = "auto") -> dict:
    set_threads(threads)
    import numpy as np

    from lmforge.api import config, train_config

    out = Path(tempfile.mkdtemp())
    cfg = config({
        "task": "classify", "name": "bench", "output_dir": str(out), "seed": seed,
        "model": {"name": "minilm", "precision": "auto", "attn_implementation": attn},
        "data": {"train": train, "eval_fraction": 0.0, "labels": ["0", "1"], "max_length": 256},
        "classify": {"method": "setfit", "setfit": {"per_class": 10**6, "num_iterations": iterations}},
        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "warmup_ratio": WARMUP, "weight_decay": DECAY,
                  "schedule": "linear", "max_grad_norm": 1.0, "progress": False, "log_every": 10_000},
    })
    run, timing = timed_call(lambda: train_config(cfg), profile)  # includes model loading (CPU time too)
    task, train_s = run.task, run.train_seconds  # training only, as before (no model loading)
    texts, gold = dev_rows(data, limit)
    t0 = time.perf_counter()
    pred = np.asarray(task.predict_texts(texts)).argmax(-1)
    infer_s = time.perf_counter() - t0
    res = {"train_s": train_s, "accuracy": float((pred == np.array(gold)).mean()),
           "infer_samples_per_s": len(texts) / infer_s, "pairs": task.pair_count,
           "pairs_per_s": task.pair_count / train_s}
    if "profile" in timing:
        res["profile"] = timing["profile"]
    return res


def _setfit_library():
    """The installed ``setfit`` package (this file's own name shadows it on ``sys.path``)."""
    here = Path(__file__).resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here.parent]
    mod = sys.modules.get("setfit")
    if mod is not None and Path(getattr(mod, "__file__", "") or ".").resolve() == here:
        del sys.modules["setfit"]
    import setfit

    return setfit


def run_setfit(train: str, data: str, iterations: int, seed: int, limit: int | None, threads, profile: bool,
               bf16: bool = False) -> dict:
    set_threads(threads)
    import contextlib

    import numpy as np
    import torch
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
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def fit():
        with cast:
            trainer.train()

    _, timing = timed_call(fit, profile)
    train_s = timing["seconds"]
    texts, gold = dev_rows(data, limit)
    t0 = time.perf_counter()
    pred = np.asarray(model.predict(texts, batch_size=64, show_progress_bar=False))
    infer_s = time.perf_counter() - t0
    pairs = 2 * iterations * len(rows)
    res = {"train_s": train_s, "accuracy": float((pred == np.array(gold)).mean()),
           "infer_samples_per_s": len(texts) / infer_s, "pairs": pairs, "pairs_per_s": pairs / train_s}
    if "profile" in timing:
        res["profile"] = timing["profile"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=SST2, help="folder with train.jsonl and dev.jsonl (sentence, label)")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=7, help="pairs of each kind per example (<= 7 keeps "
                    "lmforge's distinct pairs equal to setfit's count at 16 per class)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-limit", type=int, default=400, help="score only the first N dev sentences")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per trial")
    ap.add_argument("--only", default=None, help="comma-separated trial names to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="profile each trial's training call")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-setfit-"))
    res: dict[str, list[dict]] = {}
    for rep in range(args.reps):  # a new sample per repetition, shared by all trials
        train = str(sample(args.data, args.per_class, rep, tmp / f"train{rep}.jsonl"))
        common = {"train": train, "data": args.data, "iterations": args.iterations, "seed": rep,
                  "limit": args.eval_limit, "threads": args.threads, "profile": args.profile}
        trials = {"setfit_default": (run_setfit, common), "lmforge_default": (run_lmforge, common),
                  "setfit_bf16": (run_setfit, common | {"bf16": True}),
                  "lmforge_padded": (run_lmforge, common | {"attn": "eager"})}
        if args.only:
            trials = {k: v for k, v in trials.items() if k in args.only.split(",")}
        if rep % 2:
            trials = dict(reversed(list(trials.items())))
        for name, runs in alternate(trials, reps=1).items():
            res.setdefault(name, []).extend(runs)
    fig = figures(res, "pairs_per_s")
    for k, v in res.items():
        fig[k].update(train_s=round(statistics.median(r["train_s"] for r in v), 2),
                      accuracy=round(statistics.mean(r["accuracy"] for r in v), 4),
                      accuracies=[round(r["accuracy"], 4) for r in v], pairs=v[0]["pairs"],
                      infer_samples_per_s=round(statistics.median(r["infer_samples_per_s"] for r in v), 1))
        if args.profile and fig[k].get("profile"):
            print(f"profile {k}: {fig[k]['profile']}", file=sys.stderr, flush=True)
    emit({
        "bench": "setfit", "model": "minilm (all-MiniLM-L6-v2)", "data": "sst2", "per_class": args.per_class,
        "iterations": args.iterations, "epochs": 1, "batch": BATCH, "reps": args.reps, "threads": args.threads,
        "quality": f"SST-2 dev accuracy (first {args.eval_limit}), mean over reps", "figures": fig,
        **ratios(fig, "pairs_per_s", "lmforge", "setfit", "lmforge_default", "setfit_default"),
    })


if __name__ == "__main__":
    main()
