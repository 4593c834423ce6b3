"""Constrained (JSON schema) vs unconstrained decoding of SmolLM2-135M-Instruct, side by side.

Same model, same batch of chat prompts asking for a JSON record, greedy, KV cache, a fixed
number of decoding steps (the free path ignores EOS; the constrained one allows EOS only once the
JSON is complete), timed per decoding step of the whole batch. The paths alternate (constrained, free, free, constrained
...) after one warm-up each; the automaton is built before timing (it is cached per tokenizer and
schema; its build time is reported separately). Quality: the share of outputs that parse and
validate when decoding stops at EOS as usual (constrained: by construction; free: as the model
writes).

    .venv/bin/python bench/prompting_constrained.py [--new-tokens 48] [--reps 3] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "city": {"type": "string", "maxLength": 40},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4}},
    "required": ["name", "age", "city", "hobbies"]}
PEOPLE = ["a retired teacher from Lyon", "a young chef in Tokyo", "a farmer in Kenya", "a student in Lima",
          "a pilot from Oslo", "a nurse in Cairo", "a painter in Mexico City", "a coder in Berlin"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.generation import GenerationConfig, decode, encode_prompts, generate
    from lmforge.merge import Source, load_causal_lm
    from lmforge.prompting.constrained import Constraint

    model, tok, _ = load_causal_lm(Source(base=args.model))
    prompts = [f"Describe {p} as a JSON object with name, age, city and hobbies." for p in PEOPLE[:args.batch]]
    enc = encode_prompts(tok, prompts, chat=True)
    width = max(map(len, enc))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    eos = tok.eos_token_id
    c = Constraint.json_schema(SCHEMA)
    t0 = time.perf_counter()
    bound = c.bind(model, tok, args.new_tokens)
    build_s = time.perf_counter() - t0
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=args.batch)

    def constrained_no_eos(rows):
        inner = bound(rows)

        def f(out, done):
            a = inner(out, done)
            a[:, eos] = a[:, eos] & a.sum(-1).eq(1)  # EOS only when nothing else is allowed
            return a
        return f

    def run(constrained: bool) -> float:
        t = time.perf_counter()
        out = decode(model, ids, mask, cfg, eos_ids=[eos] if constrained else [], pad_id=0,
                     logits_mask=constrained_no_eos(len(enc)) if constrained else None)
        return (time.perf_counter() - t) / max(len(o) for o in out)  # seconds per decoding step

    times = {"free": [], "constrained": []}
    run(True), run(False)  # warm-up
    for r in range(args.reps):
        for name in (["constrained", "free"] if r % 2 == 0 else ["free", "constrained"]):
            times[name].append(run(name == "constrained"))
            print(f"[rep {r + 1}] {name}: {times[name][-1] * 1000:.2f} ms/step", file=sys.stderr, flush=True)
    free_ms = statistics.median(times["free"]) * 1000
    cons_ms = statistics.median(times["constrained"]) * 1000
    gen = GenerationConfig(max_new_tokens=96, batch_size=args.batch)
    free_out = generate(model, tok, prompts, gen)
    cons_out = generate(model, tok, prompts, gen, constraint=c.bind(model, tok, 96))
    valid = {k: sum(c.validate(o) is None for o in outs) / len(outs) for k, outs in
             [("free", free_out), ("constrained", cons_out)]}
    emit({"bench": "prompting_constrained", "model": args.model, "batch": args.batch, "new_tokens": args.new_tokens,
          "reps": args.reps, "automaton_build_s": round(build_s, 3),
          "free_ms_per_step": round(free_ms, 3), "constrained_ms_per_step": round(cons_ms, 3),
          "overhead_ratio": round(cons_ms / free_ms, 3), "valid_free": valid["free"],
          "valid_constrained": valid["constrained"], "example_constrained": cons_out[0][:200],
          "example_free": free_out[0][:200]})


if __name__ == "__main__":
    main()
