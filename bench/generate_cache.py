"""KV cache vs no cache: greedy decoding of SmolLM2-135M-Instruct, side by side in one process.

Same model, same chat prompt, 100 new tokens (EOS ignored so both generate exactly that many),
greedy; the two paths alternate (cache, no cache, no cache, cache, ...) after one warm-up each.
Prints one JSON line with the median tokens/s of both, their ratio (the reference notes show
about 5x for 100 new tokens) and whether both produced the same tokens.

    .venv/bin/python bench/generate_cache.py [--new-tokens 100] [--reps 3] [--precision fp32] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, peak_rss_mb  # noqa: E402

PROMPT = "Write a long, detailed story about a dragon who learns to cook for a small mountain village."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from lmforge.device import Placement
    from lmforge.generation import GenerationConfig, decode, encode_prompts
    from lmforge.merge import Source, load_causal_lm

    placement = Placement.resolve("auto", args.precision)
    model, tok, _ = load_causal_lm(Source(base=args.model), device=placement.device)
    ids = torch.tensor(encode_prompts(tok, [PROMPT], chat=bool(tok.chat_template)), device=placement.device)
    mask = torch.ones_like(ids)

    def run(use_cache: bool, n: int) -> tuple[float, list[int]]:
        cfg = GenerationConfig(max_new_tokens=n, use_cache=use_cache)
        t0 = time.perf_counter()
        with placement.autocast():
            out = decode(model, ids, mask, cfg, eos_ids=())[0]  # no EOS: exactly n tokens
        return len(out) / (time.perf_counter() - t0), out

    for use_cache in (True, False):
        run(use_cache, 5)  # warm-up
    speeds: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {}
    for rep in range(args.reps):
        for use_cache in ((True, False) if rep % 2 == 0 else (False, True)):
            tps, out = run(use_cache, args.new_tokens)
            speeds[use_cache].append(tps)
            tokens[use_cache] = out
            print(f"[rep {rep + 1}/{args.reps}] {'cache' if use_cache else 'no cache'}: {tps:.1f} tokens/s",
                  file=sys.stderr, flush=True)
    cached, fresh = statistics.median(speeds[True]), statistics.median(speeds[False])
    emit({"bench": "generate_cache", "model": args.model, "precision": placement.name,
          "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "reps": args.reps,
          "threads": torch.get_num_threads(),
          "cache_tokens_per_s": round(cached, 2), "no_cache_tokens_per_s": round(fresh, 2),
          "ratio": round(cached / fresh, 2), "same_tokens": tokens[True] == tokens[False],
          "peak_rss_mb": round(peak_rss_mb(), 1)})


if __name__ == "__main__":
    main()
