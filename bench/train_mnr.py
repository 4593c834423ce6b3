"""MNR training: lmforge vs the sentence-transformers trainer, side by side.

Same packaged MiniLM, the same (anchor, positive) pairs (default: SNLI-triplet sentence pairs
from ``../shared/data/snli_triplets/dev.jsonl``), multiple-negatives ranking loss with scale 20,
the same batch size, steps, learning rate, linear schedule and gradient clipping (full
fine-tuning, fp32 master weights on both sides). Each trial runs in a fresh process; trials
alternate; medians over ``--reps``. Warm-up steps are not timed.

Trials (pairs/s; quality = Spearman of cosine vs gold on 300 STS-B dev pairs after training):
- ``st_default``: the sentence-transformers trainer's defaults (fp32, SDPA);
- ``st_bf16_sdpa`` / ``st_bf16_eager``: its best settings here (bf16 autocast, either kernel; it
  has no length grouping for in-batch-negative losses);
- ``lmforge_default``: ``precision: auto`` (bf16 autocast), length-grouped batches, unpadded batches;
- ``lmforge_ungrouped``: random batches like the peer's (same in-batch negatives distribution),
  unpadded: the like-for-like data comparison;
- ``lmforge_padded``: random batches, plain padded (``attn_implementation: eager``).

    .venv/bin/python bench/train_mnr.py [--steps 20] [--warmup 2] [--batch 32] [--reps 3] [--threads 1] [--profile]

Measured (session 11, AVX-512 without BF16: fp32 both sides, QUIET, 2 threads, default wait policy;
``runs/lead11/mnr2t.log``): ``--reps 2 --threads 2 --only st_default,st_eager,lmforge_default``: lmforge 84.9 pairs/s
vs ST fp32 eager 47.0 (SDPA 46.6): **ratio_best 1.81x** [1.81x CPU], RSS 0.81x; STS-B dev Spearman 0.9326 / 0.9327.

Two threads: both sides' best 2-thread figures are with ``OMP_WAIT_POLICY=PASSIVE`` exported for
the whole bench (why: ``bench/_common.py``). Per CPU second, [wall]:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/train_mnr.py --steps 6 --warmup 2 --reps 2 --threads 2 \
        --only lmforge_default,st_bf16_eager,st_bf16_sdpa

lmforge 50.0 pairs/CPU-s [20.5/s] vs ST bf16 eager 29.8 [13.0] / bf16 SDPA 28.6 [11.0]:
**ratio_best 1.68x [1.58x]**, RSS 0.80x; STS-B dev Spearman 0.9332 / 0.9342.
(1 thread, the lead's figure: 1.83x.)
Default wait policy (spin), same command without the env var, ``--only lmforge_default,st_bf16_eager``:
lmforge 6.2 vs 8.4 pairs/CPU-s, **0.74x [0.76x]** at load 7-9: lmforge's step has more (smaller) parallel
regions, so it spins more. A trial that happened to run at load 1.3 gave lmforge 44.0 pairs/CPU-s
[87.1/s wall] with the default policy, i.e. the spin is a load artifact.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Window, add_common_args, emit, figures, ratios, run_trials, set_threads,  # noqa: E402
                     sts_spearman)

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


def run_lmforge(data: str, steps: int, warmup: int, batch: int, threads, profile: bool, group: bool = True,
                attn: str = "auto") -> dict:
    set_threads(threads)
    from lmforge.api import config, train_config

    cfg = config({
        "task": "embed", "name": "bench", "output_dir": tempfile.mkdtemp(), "seed": 0,
        "model": {"name": "minilm", "precision": "auto", "attn_implementation": attn},
        "data": {"train": data, "eval_fraction": 0.0, "max_length": 256},
        "embed": {"loss": "mnr", "scale": 20.0, "eval_before": False},
        "train": {"max_steps": steps + warmup, "batch_size": batch, "lr": LR, "progress": False, "group_by_length": group,
                  "log_every": 10_000, "max_grad_norm": 1.0, "warmup_ratio": 0.0, "schedule": "linear"},
    })
    win = Window(warmup, steps, profile)

    def prepare(task):
        task.collate = win.wrap(task.collate)

    run = train_config(cfg, prepare=prepare, on_step=lambda step, rec: win.step(step))
    out = win.result(steps * batch, "pairs")
    enc = run.task.encoder
    out["spearman"] = sts_spearman(lambda t: enc.encode(t, batch_size=64))
    return out


def run_st(data: str, steps: int, warmup: int, batch: int, threads, profile: bool, bf16: bool = False,
           attn: str = "sdpa") -> dict:
    set_threads(threads)
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
    model = SentenceTransformer(str(resolve_model("minilm")), device="cpu", model_kwargs={"attn_implementation": attn})
    win = Window(warmup, steps, profile)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            win.step(state.global_step)

    args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + warmup,
        learning_rate=LR, weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=bf16,
        dataloader_num_workers=0, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[Clock()])
    trainer.train()
    out = win.result(steps * batch, "pairs")
    model.eval()
    out["spearman"] = sts_spearman(lambda t: model.encode(t, batch_size=64))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--data", default=TRIPLETS)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = str(write_pairs(args.data, (args.steps + args.warmup) * args.batch,
                           Path(tempfile.mkdtemp(prefix="bench-mnr-")) / "pairs.jsonl"))
    common = {"data": data, "steps": args.steps, "warmup": args.warmup, "batch": args.batch}
    res = run_trials({
        "st_default": (run_st, common),
        "lmforge_default": (run_lmforge, common),
        "st_bf16_sdpa": (run_st, common | {"bf16": True}),
        "lmforge_ungrouped": (run_lmforge, common | {"group": False}),
        "st_bf16_eager": (run_st, common | {"bf16": True, "attn": "eager"}),
        "st_eager": (run_st, common | {"attn": "eager"}),  # fp32 eager: a best on CPUs without native bf16
        "lmforge_padded": (run_lmforge, common | {"group": False, "attn": "eager"}),
    }, args)
    fig = figures(res, "pairs_per_s", ("spearman",))
    rec = {"bench": "train_mnr", "model": "minilm (all-MiniLM-L6-v2)", "data": Path(args.data).name,
           "batch": args.batch, "steps": args.steps, "reps": args.reps, "threads": args.threads,
           "quality": "Spearman (cosine vs gold) on 300 STS-B dev pairs after training", "figures": fig,
           **ratios(fig, "pairs_per_s", "lmforge", "st", "lmforge_default", "st_default")}
    if "lmforge_ungrouped" in fig and "best_peer" in rec:  # same batch composition as the peer
        rec["ratio_best_ungrouped"] = round(fig["lmforge_ungrouped"]["pairs_per_s"]
                                            / fig[rec["best_peer"]]["pairs_per_s"], 3)
    emit(rec)


if __name__ == "__main__":
    main()
