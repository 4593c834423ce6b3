"""Greedy generation: lmforge's decoding loop vs transformers' ``generate``, side by side.

Same packaged SmolLM2-135M-Instruct, the same chat prompts (the model's chat template, left-padded
batches), greedy, KV cache on, ``--new-tokens`` new tokens per prompt with EOS ignored on both
sides (so both generate exactly that many), at batch 1 and batch 8. Each trial runs in a fresh
process (model load and one warm-up generation are not timed); trials alternate; medians over
``--reps``.

Trials (generated tokens/s at batch 1 and batch 8; quality = agreement of each trial's tokens with
transformers' fp32 greedy tokens: the mean share of each row's tokens up to the first difference):
- ``hf_default``: ``model.generate`` with transformers' defaults (fp32 weights, SDPA);
- ``hf_bf16w_sdpa`` / ``hf_bf16w_eager``: its best settings here (weights loaded in bf16, SDPA or
  eager attention); ``hf_bf16w_static``: bf16 weights, SDPA, ``cache_implementation="static"``
  (transformers' preallocated cache);
- ``lmforge_default``: ``lmforge.api``'s path (``precision: auto``: parameters stored in bf16 by
  ``Placement.for_inference``, bf16 autocast); its decode steps go through ``kv_cache.py``
  (preallocated KV cache, a lean step, bf16 weights prepacked for oneDNN once per model, a prompt
  prefix all rows of a batch share prefilled once: here the chat template's system prompt, 31 of
  36-42 tokens, at batch 8);
- ``lmforge_bf16w``: lmforge's loop with the whole model cast to bf16 (buffers too), no autocast;
- ``lmforge_plain``: the default path with ``fast_decode=False`` (every step through the model's
  forward and transformers' ``DynamicCache``: the decode step before ``kv_cache.py``);
- ``lmforge_fp32``: ``precision: fp32`` (every weight fp32; on a CPU without native bf16 ``auto``
  stores the linear weights in bf16 and applies them in fp32, :mod:`lmforge.bf16_weights`);
- ``hf_int8``: the peer with PyTorch's dynamic int8 quantisation of every ``nn.Linear`` (per-tensor
  activation scales): fast, but its greedy tokens leave the fp32 model's at once (agreement ~0.04).
``ratio_best`` compares the fastest trials whose tokens keep to the fp32 model's (agreement >= 0.5,
``SAME_WORK``); ``ratio_best_any`` the fastest of any quality.
``warmup_s`` is each trial's untimed first generation (kernel selection; lmforge's weight packing).
``ratio_default`` / ``ratio_best`` are given for batch 8 (and ``*_b1`` for batch 1).

    .venv/bin/python bench/generate.py [--new-tokens 32] [--reps 3] [--threads 1] [--profile]

Measured (session 11, the same kind of CPU as session 10: AVX-512 + VNNI, no BF16; bf16-stored weights applied
in fp32 by a C kernel, the decode step's RMSNorm, rotary + attention and SiLU gate in C): ``--new-tokens 16 --reps 2
--threads 1 --only hf_default,hf_eager,hf_int8,lmforge_default,lmforge_fp32`` with a training run on the other core
(``runs/lead11/gen1t_busy.log``): batch 8 109.3 vs HF fp32 SDPA 55.7 tokens/s: **1.96x**; batch 1 29.8 vs 17.8:
**1.68x**; RSS 821 vs 967 MB (0.85x); agreement with HF fp32 greedy 0.945 (lmforge_fp32: 1.0, 68.6 / 21.5 tokens/s,
1.23x / 1.21x). ``hf_int8`` 144.2 / 34.7 tokens/s at agreement 0.039 / 0.047 (ratio_best_any 0.76x / 0.86x).

QUIET (session 11, after the kernel's register tiles and the short-prompt prefill through it, 9524984;
``runs/lead11/gen{1t_quiet2,2t_b,1t_int8}.log``): 1 thread, ``--new-tokens 16 --reps 3 --threads 1 --only
hf_default,lmforge_default``: batch 8 111.3 vs 51.7 tokens/s: **2.15x**; batch 1 29.6 vs
17.8: **1.66x**, RSS 0.85x; 2 threads (``--reps 2 --threads 2 --only hf_default,hf_int8,lmforge_default``):
batch 8 195.8 vs 95.5: **2.05x**, batch 1 51.6 vs 27.9: **1.85x**, RSS 0.84x; agreement 0.945. Against ``hf_int8``
(agreement 0.04): 2 threads 1.00x / 1.16x, 1 thread 0.83x / 0.87x (``--reps 1 --only hf_int8,lmforge_default``).
Earlier the same day (before 9524984): 1 thread 1.82x / 1.40x (pinned 1.85x / 1.45x), 2 threads 1.82x / 1.68x. The
batch-1 figure moves with the machine's memory bandwidth: a batch-1 step reads 270 MB of bf16 weights (~24 ms of a
25-32 ms step at 11-14 GB/s here).

Measured (session 10, an Intel Xeon with AVX-512 but NO BF16: fp32 both sides, where lmforge's prepacked bf16
decode path does not apply; QUIET, ``runs/lead10/gen1t_quiet.log``): ``--new-tokens 16 --reps 2 --threads 1 --only
hf_default,hf_eager,lmforge_default``: batch 8 49.3 vs HF SDPA 41.1 tokens/s (eager 39.5): **1.20x**; batch 1 14.99
vs 15.03: **1.00x**; agreement 1.0 (with a training run on the other core: 1.05x / 0.92x, ``gen1t.log``). fp32
decoding at batch 1 is weight-bandwidth bound (540 MB of fp32 weights per token; the 113 MB LM head alone 10 ms):
the lean decode loop saves nothing there. int8 weights would be the lever, but torch's ``_weight_int8pack_mm``
with fp32 activations runs 2.4-4.7x SLOWER than the fp32 ``linear`` at batch 1 here (576 x 1536: 676-701 vs 148
us; LM head 24.3 vs 10.2 ms): it needs a kernel of its own, not built.

Measured (``--new-tokens 16 --reps 2 --threads 1``, shared 2-core machine at load 6-8; tokens per CPU
second, wall in brackets): batch 8 lmforge_bf16w 124.6 / lmforge_default 116.1 vs the peer's best
hf_bf16w_eager 65.9 (sdpa 63.8, static cache 65.0, fp32 default 41.2): ratio_best 1.89x [1.89x],
ratio_default 2.82x [3.03x]; batch 1 23.0 / 20.4 vs hf_bf16w_sdpa 13.2: 1.74x [1.73x], default
1.82x [2.03x]. lmforge_plain (the decode step before kv_cache.py) 73.0 / 13.9. Agreement with the fp32
greedy tokens b8 / b1: lmforge 0.84 / 0.61 (bf16w 0.79 / 0.73), HF bf16 0.67-0.74 / 0.61-0.73. Peak
RSS 1181 vs 1184 MB.
QUIET machine, 2 threads (s5, load ~1; ``runs/lead5/gen2t.json``):
``python bench/generate.py --new-tokens 16 --reps 2 --threads 2 --only hf_default,lmforge_default,lmforge_bf16w,hf_bf16w_eager,hf_bf16w_sdpa``:
b8 lmforge_default 107.3 tokens/CPU-s [213.8/s] vs hf_bf16w_sdpa 62.1 [123.5/s]: **ratio_best 1.73x per CPU-s
[1.73x wall]**; b1 18.83 [37.5/s] vs 11.54 [22.9/s]: **1.63x [1.64x]**; ratio_default 3.37x; agreement with HF
fp32 greedy b8 0.84 / 0.67, b1 0.61 / 0.61; peak RSS 1182 vs 1184 MB (1.0x).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, emit, figures, ratios, run_trials, set_threads, timed_call  # noqa: E402

PROMPTS = [
    "Write a short story about a dragon who learns to cook.",
    "Explain how a bicycle stays upright.",
    "What are three tips for learning a new language?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Summarise the plot of a detective novel you invent.",
    "List some good habits for remote work.",
]


SAME_WORK = 0.5  # least agreement with HF's fp32 greedy tokens of a trial counted in ratio_best


def _batches(tok, batch: int):
    """Left-padded (input_ids, attention_mask) batches of the chat-templated prompts."""
    import torch

    from lmforge.generation import encode_prompts

    ids = encode_prompts(tok, PROMPTS, chat=True)
    out = []
    for s in range(0, len(ids), batch):
        rows = ids[s:s + batch]
        width = max(map(len, rows))
        x = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros_like(x)
        for i, r in enumerate(rows):
            x[i, width - len(r):], m[i, width - len(r):] = torch.tensor(r), 1
        out.append((x, m))
    return out


def _run(gen, tok, new_tokens: int, profile: bool, tokens_out: str) -> dict:
    """Time ``gen(ids, mask) -> list of token lists`` at batch 1 (every prompt) and batch 8."""
    import time

    res, tokens = {}, {}
    t0 = time.perf_counter()
    gen(*_batches(tok, 8)[0][:2])  # warm-up (kernel selection; lmforge packs its bf16 weights here)
    res["warmup_s"] = time.perf_counter() - t0
    for b in (1, 8):
        batches = _batches(tok, b)
        outs, t = timed_call(lambda: [row for x, m in batches for row in gen(x, m)], profile,
                             steps=new_tokens * len(batches), unit="tokens", items=new_tokens * len(PROMPTS))
        res[f"tokens_per_s_b{b}"], res[f"seconds_b{b}"] = t["tokens_per_s"], t["seconds"]
        res[f"tokens_per_cpu_s_b{b}"] = t["tokens_per_cpu_s"]
        if "profile" in t:
            res[f"profile_b{b}"] = t["profile"]
        tokens[b] = outs
    Path(tokens_out).write_text(json.dumps(tokens), encoding="utf-8")
    return res


def run_hf(new_tokens: int, tokens_out: str, threads, profile: bool, bf16: bool = False, attn: str = "sdpa",
           cache: str | None = None, int8: bool = False) -> dict:
    set_threads(threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lmforge.models import resolve_model

    hf_logging.set_verbosity_error()
    folder = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation=attn).eval()
    if int8:  # PyTorch's dynamic int8 quantisation of every nn.Linear (per-tensor activation scale, fbgemm)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def gen(x, m):
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=m, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, use_cache=True, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None,
                                 **({"cache_implementation": cache} if cache else {}))
        return out[:, x.shape[1]:].tolist()

    return _run(gen, tok, new_tokens, profile, tokens_out)


def run_lmforge(new_tokens: int, tokens_out: str, threads, profile: bool, bf16_weights: bool = False,
                fast: bool = True, precision: str = "auto") -> dict:
    set_threads(threads)
    import contextlib

    import torch

    from lmforge.causal_lm import load_causal_lm, resolve_source
    from lmforge.device import Placement
    from lmforge.generation import GenerationConfig, decode

    place = Placement.resolve("cpu", precision)
    model, tok, _ = load_causal_lm(resolve_source("smollm2", None), device=place.device)
    if bf16_weights:  # everything in bf16, no autocast
        model.to(torch.bfloat16)
        cast = contextlib.nullcontext()
    else:  # lmforge.api's path: bf16 parameters (Placement.for_inference) under bf16 autocast
        place.for_inference(model)
        cast = place.autocast()
    cfg = GenerationConfig(max_new_tokens=new_tokens, use_cache=True, fast_decode=fast)

    def gen(x, m):
        with torch.inference_mode(), cast:
            return decode(model, x, m, cfg, eos_ids=(), pad_id=tok.pad_token_id)

    return _run(gen, tok, new_tokens, profile, tokens_out)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over rows of the share of tokens before the first difference."""
    def share(x, y):
        n = 0
        for p, q in zip(x, y):
            if p != q:
                break
            n += 1
        return n / max(len(y), 1)
    return sum(share(x, y) for x, y in zip(a, b)) / max(len(b), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, reps=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    trials = {
        "hf_default": (run_hf, {}),
        "lmforge_default": (run_lmforge, {}),
        "hf_bf16w_sdpa": (run_hf, {"bf16": True}),
        "lmforge_bf16w": (run_lmforge, {"bf16_weights": True}),
        "hf_bf16w_eager": (run_hf, {"bf16": True, "attn": "eager"}),
        "hf_eager": (run_hf, {"attn": "eager"}),  # fp32 eager: a best on CPUs without native bf16
        "lmforge_plain": (run_lmforge, {"fast": False}),
        "hf_bf16w_static": (run_hf, {"bf16": True, "cache": "static"}),
        "hf_int8": (run_hf, {"int8": True}),  # the peer's CPU int8 (torch dynamic quantisation)
        "lmforge_fp32": (run_lmforge, {"precision": "fp32"}),  # fp32 weights (auto: bf16-stored without native bf16)
    }
    trials = {k: (fn, kw | {"new_tokens": args.new_tokens, "tokens_out": str(tmp / f"{k}.json")})
              for k, (fn, kw) in trials.items()}
    res = run_trials(trials, args)
    fig = {}
    for b in (1, 8):
        for k, v in figures(res, f"tokens_per_s_b{b}").items():
            f = fig.setdefault(k, {"peak_rss_mb": v["peak_rss_mb"],
                                   "warmup_s": round(statistics.median(r["warmup_s"] for r in res[k]), 3)})
            f[f"tokens_per_s_b{b}"], f[f"tokens_per_cpu_s_b{b}"] = v[f"tokens_per_s_b{b}"], v[f"tokens_per_cpu_s_b{b}"]
    ref = tmp / "hf_default.json"
    if ref.is_file():
        want = json.loads(ref.read_text())
        for k in fig:
            got = json.loads((tmp / f"{k}.json").read_text())
            fig[k]["agreement_b8"] = round(agreement(got["8"], want["8"]), 4)
            fig[k]["agreement_b1"] = round(agreement(got["1"], want["1"]), 4)
    # best against best among trials doing the same work: greedy tokens that keep to the fp32 model's
    # (agreement >= SAME_WORK); the fastest trial of any quality is given as *_any
    same = {k: v for k, v in fig.items() if min(v.get("agreement_b8", 1.0), v.get("agreement_b1", 1.0)) >= SAME_WORK}
    r8 = ratios(same, "tokens_per_s_b8", "lmforge", "hf", "lmforge_default", "hf_default")
    r1 = ratios(same, "tokens_per_s_b1", "lmforge", "hf", "lmforge_default", "hf_default")
    for b, r in ((8, r8), (1, r1)):
        a = ratios(fig, f"tokens_per_s_b{b}", "lmforge", "hf", "lmforge_default", "hf_default")
        if "ratio_best" in a:
            r.update(ratio_best_any=a["ratio_best"], best_peer_any=a["best_peer"], best_lmforge_any=a["best_lmforge"])
    emit({"bench": "generate", "model": "SmolLM2-135M-Instruct", "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
          "greedy": True, "cache": True, "reps": args.reps, "threads": args.threads,
          "quality": "agreement with transformers' fp32 greedy tokens (share of each row before the first difference)",
          "figures": fig, **r8, **{f"{k}_b1": v for k, v in r1.items()}})


if __name__ == "__main__":
    main()
