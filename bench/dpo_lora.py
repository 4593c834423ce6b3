"""LoRA DPO of a causal LM: lmforge ``preference`` vs TRL DPOTrainer + peft, side by side.

Same packaged SmolLM2-135M-Instruct, same Anthropic HH-RLHF helpful-base pairs
(``../shared/data/hh_rlhf/helpful-base.jsonl``: prompt/chosen/rejected as plain text), batch 4
pairs, max length 512, LoRA r=16 alpha=32 dropout=0 on q/k/v/o/gate/up/down, sigmoid DPO loss
with beta 0.1, AdamW, same learning rate and schedule, same number of optimizer steps. Pairs are
pre-filtered to those whose prompt (<= 256 tokens) and prompt + completion (<= max length) fit,
and with non-empty, different chosen/rejected, so neither side truncates or drops anything and
both train on identical sequences: in file order (TRL's sequential sampler; the bench gives
lmforge's engine the same sequential batches instead of its length-grouped shuffle), so every
step of both sides sees the same pairs.

Reference log-probs: by default both sides compute them on the fly every step (the adapters
switched off on the same weights: TRL's and lmforge's defaults); ``--precompute`` runs both with
reference log-probs precomputed before training (TRL ``precompute_ref_log_probs``, lmforge
``preference.precompute_ref``; the precomputation is outside the timed window on both sides).

Figures (medians over ``--reps``): ``pairs_per_s``, ``tokens_per_s`` (real tokens of chosen +
rejected sequences), ``peak_rss_mb`` and ``mfu`` against the measured bf16 matmul peak. Model
FLOPs per step: the policy pass as in ``bench/sft_lora.py`` (``4 N s + 12 L d_attn s^2`` per
sequence) plus, without precomputation, the reference forward (``2 N s + 4 L d_attn s^2``).

Trials (quality = mean DPO loss over the timed steps: both sides train the same pairs in the same
order, so the losses are comparable step for step):
- ``trl_default``: TRL defaults (fp32, SDPA) except gradient checkpointing off (its default is on,
  which is slower);
- ``trl_bf16`` / ``trl_bf16w_eager``: TRL at its best here: bf16 autocast with SDPA, or the frozen
  base in bf16 (LoRA fp32) with eager attention (padding-free needs flash attention in TRL's DPO);
- ``lmforge_default``: lmforge's defaults (chosen and rejected in one packed forward, chunked
  log-probs over completion tokens, ``auto`` precision = bf16 autocast, frozen weights in bf16);
- ``lmforge_plain``: the same with ``lmforge.packed_train`` off (blocked attention, packed bases).
``ratio_default`` = lmforge_default / trl_default, ``ratio_best`` = fastest lmforge / fastest TRL
trial, in pairs/s.

    .venv/bin/python bench/dpo_lora.py [--steps 10] [--warmup 2] [--reps 3] [--threads 1] [--profile]

Measured (session 11, the same kind of CPU, QUIET, 2 threads; ``runs/lead11/dpo2t.log``): ``--only
trl_eager,trl_default,lmforge_default --steps 4 --warmup 1 --reps 2 --threads 2``: lmforge 0.753 pairs/s vs TRL fp32
SDPA 0.391 (eager 0.390): **ratio_best 1.93x**, RSS 0.55x (4.2 vs 7.7 GB), MFU 0.48 vs 0.25; train loss 0.6934 both.

Measured (session 10, an Intel Xeon with AVX-512 but NO BF16: ``auto`` = fp32, the peer's best is fp32 too; a
reward-model training on the other core; ``runs/lead10/dpo1t.log``): ``--only trl_default,trl_eager,lmforge_default
--steps 4 --warmup 1 --reps 2 --threads 1``: lmforge 0.343 pairs/s vs TRL fp32 eager 0.173 (SDPA 0.151):
**1.99x** (default 2.28x), MFU 0.52 vs 0.26, peak RSS 4.2 vs 9.1 GB (0.46x), train loss 0.6934 both.

Measured (s5, 2026-11-30, load ~7-8, medians of 2 reps; raw /tmp/ts/out/dpo_t1.json):
``bench/dpo_lora.py --max-length 256 --batch 2 --steps 2 --warmup 1 --reps 2 --threads 1
--only trl_bf16,trl_bf16w_eager,lmforge_default,lmforge_plain``: tokens per CPU-s lmforge_default
107.9 (113.7 / 102.0), lmforge_plain 109.8 (112.4 / 107.2: packed_train brings nothing at these
rows of 25-245 tokens), trl_bf16w_eager 43.6, trl_bf16 40.9: 2.47x per CPU-s, ratio_best 2.43x
(pairs/s wall); peak RSS 1667 vs 3607 MB (0.46x); MFU per CPU-s 46 % vs 19 %; mean DPO loss of
the timed steps 0.6719 / plain 0.6908 / TRL 0.6731 (bf16w) / 0.6883 (bf16): step-to-step noise of
2 steps (at B = 0 both lmforge paths give exactly log 2; with B != 0 pair losses agree to 5e-3).
QUIET machine, 2 threads (s5, load ~1; ``runs/lead5/dpo2t.json``):
``python bench/dpo_lora.py --max-length 256 --batch 2 --steps 2 --warmup 1 --reps 2 --threads 2 --only trl_bf16,trl_bf16w_eager,lmforge_default``:
lmforge 0.899 pairs/s [217.7 tokens/s] vs TRL bf16w eager 0.339 [82.0]: **ratio_best 2.66x wall** (MFU per
CPU-s 45.8 % vs 17.6 %: 2.60x per CPU-s); train loss over the timed steps 0.691 / 0.673 (TRL bf16 0.688);
peak RSS 1995 vs 3600 MB (0.55x).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Window, add_common_args, batch_seq_lengths, emit, figures, llama_matmul_params,  # noqa: E402
                     matmul_peak, ratios, run_trials, set_threads)
from sft_lora import LORA, TARGETS, add_mfu  # noqa: E402

HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh_rlhf" / "helpful-base.jsonl"
BETA = 0.1


def run_lmforge(pairs: str, steps: int, warmup: int, precompute: bool, batch: int, max_len: int, lr: float,
                threads, profile: bool, precision: str = "auto", fast: bool = True) -> dict:
    set_threads(threads)
    from lmforge import packed_train
    from lmforge.api import config, train_config

    packed_train.ENABLED = fast  # lmforge.packed_train (the default: on)

    out = tempfile.mkdtemp()
    cfg = config({
        "task": "preference", "name": "bench", "output_dir": out, "seed": 0,
        "model": {"name": "smollm2", "precision": precision},
        "data": {"train": pairs, "eval_fraction": 0.0, "max_length": max_len},
        "preference": {"mode": "lora", "template": "raw", "loss": "sigmoid", "beta": BETA,
                       "precompute_ref": precompute},
        "lora": LORA | {"target_modules": TARGETS},
        "train": {"max_steps": steps + warmup, "batch_size": batch, "lr": lr, "progress": False,
                  "log_every": 10_000, "max_grad_norm": 1.0},
    })
    from lmforge.train import engine

    win = Window(warmup, steps, profile, count=batch_seq_lengths)
    losses = []

    def prepare(task):
        n = len(task.train_items)  # the pairs in file order, as TRL's sequential sampler gives them
        sequential = [list(range(i, i + batch)) for i in range(0, n - batch + 1, batch)]
        engine.epoch_batches = lambda task, cfg, epoch, world: sequential
        task.collate = win.wrap(task.collate)

    def on_step(step, rec):
        win.step(step)
        if warmup < step <= warmup + steps:
            losses.append(float(rec["loss"]))

    train_config(cfg, prepare=prepare, on_step=on_step)
    return _result(win, losses)


def _result(win, losses: list[float]) -> dict:
    out = win.result(unit="tokens")
    out["pairs_per_s"] = out["sequences"] / 2 / out["seconds"]
    out["train_loss"] = sum(losses) / len(losses) if losses else None
    return out


def run_trl(pairs: str, steps: int, warmup: int, precompute: bool, batch: int, max_len: int, lr: float, threads,
            profile: bool, bf16: bool = False, bf16_weights: bool = False, attn: str = "sdpa") -> dict:
    set_threads(threads)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from lmforge.models import resolve_model

    hf_logging.set_verbosity_error()
    folder = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16_weights else torch.float32,
                                                 attn_implementation=attn)
    ds = Dataset.from_list([json.loads(line) for line in open(pairs, encoding="utf-8")])
    win = Window(warmup, steps, profile, count=batch_seq_lengths)
    losses = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            win.step(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and warmup < state.global_step <= warmup + steps:
                losses.append(float(logs["loss"]))

    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + warmup,
                     learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, logging_strategy="steps", logging_steps=1, save_strategy="no", report_to=[],
                     disable_tqdm=True, use_cpu=True, bf16=bf16 or bf16_weights, gradient_checkpointing=False,
                     dataloader_num_workers=0, seed=0, max_length=max_len, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                     train_sampling_strategy="sequential")
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainer.data_collator = win.wrap(trainer.data_collator)
    trainer.train()
    return _result(win, losses)


def write_pairs(path: Path, max_len: int, seed: int = 0) -> int:
    """HH pairs that fit without truncation on both sides, shuffled with a fixed seed."""
    from lmforge.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2"))
    n_tok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = []
    for line in open(HH, encoding="utf-8"):
        r = json.loads(line)
        p, c, j = r.get("prompt"), r.get("chosen"), r.get("rejected")
        if not all(isinstance(x, str) for x in (p, c, j)) or not c.strip() or not j.strip() or c.strip() == j.strip():
            continue
        lp = n_tok(p)
        if lp <= max_len // 2 and lp + max(n_tok(c), n_tok(j)) + 2 <= max_len:
            rows.append({"prompt": p, "chosen": c, "rejected": j})
    random.Random(seed).shuffle(rows)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, steps=10, warmup=2, reps=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--precompute", action="store_true", help="precompute reference log-probs on both sides")
    ap.add_argument("--peak-gflops", type=float, default=None, help="bf16 matmul peak; measured when not given")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lmforge.models import resolve_model

    pairs = Path(tempfile.mkdtemp()) / "hh.jsonl"
    n_pairs = write_pairs(pairs, args.max_length)
    flops = llama_matmul_params(Path(resolve_model("smollm2")) / "config.json")
    peak = {"gflops": args.peak_gflops} if args.peak_gflops else matmul_peak(args.threads)
    common = {"pairs": str(pairs), "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
              "max_len": args.max_length, "lr": args.lr, "precompute": args.precompute}
    res = run_trials({
        "trl_default": (run_trl, common),
        "lmforge_default": (run_lmforge, common),
        "trl_bf16": (run_trl, common | {"bf16": True}),
        "trl_bf16w_eager": (run_trl, common | {"bf16_weights": True, "attn": "eager"}),
        "trl_eager": (run_trl, common | {"attn": "eager"}),  # fp32 eager: a best on CPUs without native bf16
        "lmforge_plain": (run_lmforge, common | {"fast": False}),
    }, args)
    fig = figures(res, "pairs_per_s", ("train_loss",))
    n, L, d = flops["n"], flops["layers"], flops["attn_dim"]
    policy = (lambda s: 4.0 * n * s + 12.0 * L * d * s * s) if args.precompute else \
        (lambda s: 6.0 * n * s + 16.0 * L * d * s * s)  # + the reference forward
    add_mfu(fig, res, flops, peak, per_seq=lambda lens: sum(policy(s) for s in lens))
    for k, runs in res.items():
        fig[k]["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in runs), 1)
    emit({"bench": "dpo_lora", "model": "SmolLM2-135M-Instruct", "data": "hh_rlhf helpful-base", "pairs": n_pairs,
          "batch": args.batch, "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
          "reps": args.reps, "threads": args.threads,
          "reference": "precomputed before training (both)" if args.precompute else "computed every step (both)",
          "peak_bf16": peak, "quality": "mean DPO loss over the timed steps (same pairs, same order)",
          "figures": fig, **ratios(fig, "pairs_per_s", "lmforge", "trl", "lmforge_default", "trl_default")})


if __name__ == "__main__":
    main()
