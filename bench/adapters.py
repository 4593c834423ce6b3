"""Every adapter kind: lmforge vs the same kind in peft + transformers Trainer, side by side.

Same packaged MiniLM, same SST-2 sentences, same batch, max length, steps, learning rate and
targets; length grouping on neither side (random order on both). Each trial runs in a fresh
process; trials alternate. Per kind it prints one JSON line: samples/s and peak RSS of

- ``lmforge_default``: lmforge's defaults (``precision: auto`` = bf16 autocast with bf16 frozen
  weights here, unpadded encoder batches; length grouping off for this bench);
- ``peer_default``: peft + Trainer defaults (fp32, SDPA);
- ``peer_bf16`` / ``peer_bf16w_eager``: the peer at its best here: bf16 autocast (SDPA), or the
  frozen base loaded in bf16 (adapter weights fp32) with eager attention;

``ratio_default`` (lmforge_default / peer_default) and ``ratio_best`` (fastest lmforge / fastest
peer trial), and a quality figure for every trial (accuracy on 256 SST-2 dev sentences after the
timed steps). Bottleneck adapters have no peft peer (lmforge only). A last line gives DoRA's
step time against LoRA's in lmforge (same runs). ``--padded`` adds ``lmforge_padded`` (plain
padded batches: the unpadding lever's share).

    .venv/bin/python bench/adapters.py [--kinds lora,dora,ia3,prompt,bottleneck] [--steps 20] [--reps 3] [--threads 1] [--profile]
    .venv/bin/python bench/adapters.py --interleaved --steps 12     # one process, models stepping in turn

Two threads: both sides' best 2-thread figures are with ``OMP_WAIT_POLICY=PASSIVE`` exported for
the whole bench (why: ``bench/_common.py``). Per CPU second, [wall]:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/adapters.py --kinds prompt,lora,dora --steps 8 --warmup 2 \
        --reps 2 --threads 2 --dev 128 --only lmforge_default,peer_bf16w_eager,peer_bf16

- prompt: lmforge 60.4 samples/CPU-s [23.8/s] vs peer bf16w eager 36.7 [11.7] / bf16 31.3 [12.3]:
  **ratio_best 1.645x [1.93x]**, RSS 0.70x; accuracy (128 dev, 8 steps) 0.555 / 0.547.
- LoRA: 90.5 [37.1] vs bf16w eager 50.2 [21.2]: **1.80x [1.75x]**, RSS 0.75x; 0.555 / 0.594.
- DoRA: 86.8 [33.7] vs bf16w eager 41.7 [15.2]: **2.08x [2.21x]**, RSS 0.70x; 0.555 / 0.578.
  DoRA/LoRA CPU step time 1.04.
(1 thread, same code, the lead's figures: prompt 1.565x, LoRA 2.20x, DoRA 2.27x.)
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
from _common import Window, add_common_args, emit, figures, ratios, run_trials, set_threads  # noqa: E402

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2"
IA3_TARGETS = r".*\.(key|value)|.*layer\.\d+\.output\.dense"
IA3_FF = r".*layer\.\d+\.output\.dense"
# kind -> (lmforge adapter section, learning rate)
KINDS = {
    "lora": ({"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "key", "value"]}, 5e-4),
    "dora": ({"kind": "dora", "r": 8, "alpha": 16, "target_modules": ["query", "key", "value"]}, 5e-4),
    "ia3": ({"kind": "ia3", "target_modules": IA3_TARGETS, "feedforward_modules": IA3_FF}, 3e-3),
    "prompt": ({"kind": "prompt", "num_virtual_tokens": 20, "init": "vocab"}, 3e-2),
    "bottleneck": ({"kind": "bottleneck", "placement": "pfeiffer", "reduction_factor": 16}, 1e-3),
}


def _rows(path: Path, n: int, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def run_lmforge(kind: str, train: str, dev: str, steps: int, warmup: int, batch: int, max_len: int,
                threads: int | None = None, profile: bool = False, attn: str = "auto") -> dict:
    set_threads(threads)
    from lmforge.api import config, train_config

    section, lr = KINDS[kind]
    out = tempfile.mkdtemp()
    cfg = config({
        "task": "classify", "name": "bench", "output_dir": out, "seed": 0,
        "model": {"name": "minilm", "precision": "auto", "attn_implementation": attn},
        "data": {"train": train, "eval": dev, "columns": {"text": "sentence"}, "labels": ["0", "1"],
                 "max_length": max_len},
        "classify": {"mode": "adapter"}, "adapter": section,
        "train": {"max_steps": steps + warmup, "batch_size": batch, "lr": lr, "progress": False,
                  "log_every": 10_000, "max_grad_norm": 1.0, "group_by_length": False},
    })
    win = Window(warmup, steps, profile)

    def prepare(task):
        task.collate = win.wrap(task.collate)

    task = train_config(cfg, eval_during_training=False, prepare=prepare,
                        on_step=lambda step, rec: win.step(step)).task  # dev stays out of training
    dev_items = task.eval_items
    probs = task.predict_items(dev_items)
    acc = float((probs.argmax(-1) == __import__("torch").tensor([it["label"] for it in dev_items])).float().mean())
    out = win.result(steps * batch)
    return out | {"step_ms": 1000 * out["seconds"] / steps, "accuracy": acc}


def _peft_config(kind: str):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    section = KINDS[kind][0]
    if kind in ("lora", "dora"):
        return LoraConfig(task_type=TaskType.SEQ_CLS, r=section["r"], lora_alpha=section["alpha"], lora_dropout=0.0,
                          target_modules=section["target_modules"], use_dora=kind == "dora")
    if kind == "ia3":
        return IA3Config(task_type=TaskType.SEQ_CLS, target_modules=IA3_TARGETS, feedforward_modules=IA3_FF)
    return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=section["num_virtual_tokens"],
                              prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)


def run_peer(kind: str, train: str, dev: str, steps: int, warmup: int, batch: int, max_len: int,
             bf16: bool = False, threads: int | None = None, profile: bool = False, bf16_weights: bool = False,
             attn: str = "sdpa") -> dict:
    import torch

    set_threads(threads)
    from peft import get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from lmforge.models import resolve_model

    hf_logging.set_verbosity_error()
    folder = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(folder)

    def encode(path):
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        enc = tok([r["sentence"] for r in rows], truncation=True, max_length=max_len)
        return [{"input_ids": i, "attention_mask": m, "labels": int(r["label"])}
                for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]

    ds, dev_ds = encode(train), encode(dev)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, dtype=torch.bfloat16 if bf16_weights else torch.float32, attn_implementation=attn)
    model = get_peft_model(model, _peft_config(kind))
    if bf16_weights:  # trainable parameters (adapter, head) stay fp32 master weights
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    win = Window(warmup, steps, profile)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            win.step(state.global_step)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                             per_device_eval_batch_size=64, max_steps=steps + warmup, learning_rate=KINDS[kind][1],
                             weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0,
                             logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                             bf16=bf16 or bf16_weights, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                      callbacks=[Clock()])
    trainer.data_collator = win.wrap(trainer.data_collator)
    trainer.train()
    pred = trainer.predict(dev_ds)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    acc = float((logits.argmax(-1) == pred.label_ids).mean())
    out = win.result(steps * batch)
    return out | {"step_ms": 1000 * out["seconds"] / steps, "accuracy": acc}


def _interleaved(kinds: list[str], data: str, steps: int, batch: int, max_len: int, threads: int | None) -> dict:
    """One process, every model stepping in turn (round robin per step): the same load for all.

    lmforge: its adapter kind, bf16 autocast, eager attention, frozen weights stored in bf16 (what
    ``precision: auto`` picks here); peft: the same kind, fp32 (default) and bf16 autocast, SDPA.
    Each step is forward + backward + fused AdamW. Returns median step ms per model.
    """
    import statistics

    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.adapters import apply_adapter, get_kind
    from lmforge.models import resolve_model
    from lmforge.tasks.causal import store_frozen

    set_threads(threads)
    folder = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(folder)
    rows = _rows(Path(data) / "train.jsonl", steps * batch + batch)
    batches = []
    for i in range(0, steps * batch, batch):
        chunk = rows[i:i + batch]
        enc = tok([r["sentence"] for r in chunk], truncation=True, max_length=max_len, padding=True,
                  return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"], torch.tensor([int(r["label"]) for r in chunk])))
    models = {}
    for kind in kinds:
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation="eager")
        section = dict(KINDS[kind][0])
        spec = get_kind(section.pop("kind")).make_spec(section, modules_to_save=["classifier"], model=m)
        apply_adapter(m, spec)
        store_frozen(m, torch.bfloat16)
        models[f"lmforge_{kind}"] = (m, True)
        if kind == "bottleneck":
            continue
        for bf16 in (False, True):
            torch.manual_seed(0)
            p = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation="sdpa")
            models[f"peft_{kind}_{'bf16' if bf16 else 'fp32'}"] = (get_peft_model(p, _peft_config(kind)), bf16)
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4, fused=True)
            for k, (m, _) in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for step, (ids, mask, y) in enumerate(batches):
        order = list(models) if step % 2 == 0 else list(reversed(models))
        for k in order:
            m, bf16 = models[k]
            m.train()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = m(input_ids=ids, attention_mask=mask).logits.float()
            F.cross_entropy(logits, y).backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if step > 0:  # the first step warms up
                times[k].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap, steps=20, warmup=3, reps=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--dev", type=int, default=256, help="dev sentences for the quality figure")
    ap.add_argument("--data", default=str(SST2), help="folder with SST-2 train.jsonl and dev.jsonl")
    ap.add_argument("--padded", action="store_true", help="also lmforge on plain padded batches")
    ap.add_argument("--interleaved", action="store_true",
                    help="also one process stepping every model in turn (same load for all; no engine)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.interleaved:
        kinds = args.kinds.split(",")
        ms = _interleaved(kinds, args.data, args.steps, args.batch, args.max_length, args.threads)
        rec = {"bench": "adapters_interleaved", "batch": args.batch, "max_length": args.max_length,
               "steps": args.steps, "threads": args.threads, "step_ms": {k: round(v, 1) for k, v in ms.items()}}
        for kind in kinds:
            if f"peft_{kind}_fp32" in ms:
                ours = ms[f"lmforge_{kind}"]
                rec[f"{kind}_speedup_default"] = round(ms[f"peft_{kind}_fp32"] / ours, 3)
                rec[f"{kind}_speedup_best"] = round(min(ms[f"peft_{kind}_fp32"], ms[f"peft_{kind}_bf16"]) / ours, 3)
        if "lmforge_dora" in ms and "lmforge_lora" in ms:
            rec["dora_vs_lora_step_time"] = round(ms["lmforge_dora"] / ms["lmforge_lora"], 3)
        if "peft_dora_fp32" in ms and "peft_lora_fp32" in ms:
            rec["peft_dora_vs_lora_step_time"] = round(ms["peft_dora_fp32"] / ms["peft_lora_fp32"], 3)
        emit(rec)
        return
    tmp = Path(tempfile.mkdtemp())
    for split, n in (("train", (args.steps + args.warmup) * args.batch), ("dev", args.dev)):
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in _rows(Path(args.data) / f"{split}.jsonl", n):
                fh.write(json.dumps(r) + "\n")
    common = {"train": str(tmp / "train.jsonl"), "dev": str(tmp / "dev.jsonl"), "steps": args.steps,
              "warmup": args.warmup, "batch": args.batch, "max_len": args.max_length}
    step_ms, cpu_rate = {}, {}
    for kind in args.kinds.split(","):
        trials = {"lmforge_default": (run_lmforge, common | {"kind": kind})}
        if kind != "bottleneck":
            trials |= {"peer_default": (run_peer, common | {"kind": kind}),
                       "peer_bf16": (run_peer, common | {"kind": kind, "bf16": True}),
                       "peer_bf16w_eager": (run_peer, common | {"kind": kind, "bf16_weights": True, "attn": "eager"})}
        if args.padded:
            trials["lmforge_padded"] = (run_lmforge, common | {"kind": kind, "attn": "eager"})
        res = run_trials(trials, args)
        fig = figures(res, "samples_per_s", ("accuracy", "step_ms"))
        step_ms[kind] = fig.get("lmforge_default", {}).get("step_ms")
        cpu_rate[kind] = fig.get("lmforge_default", {}).get("samples_per_cpu_s")
        emit({"bench": "adapters", "kind": kind, "model": "all-MiniLM-L6-v2", "data": "sst2", "batch": args.batch,
              "max_length": args.max_length, "steps": args.steps, "reps": args.reps, "group_by_length": False,
              "threads": args.threads, "quality": f"accuracy on {args.dev} SST-2 dev sentences", "figures": fig,
              **ratios(fig, "samples_per_s", "lmforge", "peer", "lmforge_default", "peer_default")})
    if step_ms.get("lora") and step_ms.get("dora"):
        rec = {"bench": "adapters", "dora_vs_lora_step_time": round(step_ms["dora"] / step_ms["lora"], 3),
               "lora_step_ms": step_ms["lora"], "dora_step_ms": step_ms["dora"]}
        if cpu_rate.get("lora") and cpu_rate.get("dora"):  # CPU time per step: steady on a shared machine
            rec["dora_vs_lora_cpu_step_time"] = round(cpu_rate["lora"] / cpu_rate["dora"], 3)
        emit(rec)


if __name__ == "__main__":
    main()
