"""Alignment commands: ``lmforge score RUN_DIR [--ensemble RUN ...] --input FILE [--out FILE]`` (reward models)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LmforgeError


def _scores(run_dir: str, best: bool, path: str) -> list[dict]:
    """One reward run's scored rows of ``path`` (the model is freed when this returns)."""
    from ..api import load

    run = load(run_dir, "best" if best else "final")
    if run.config.task != "reward":
        raise LmforgeError(f"{run_dir}: 'score' needs a reward-model run (this run's task is '{run.config.task}')")
    return run.task.score_file(path)


def ensemble_scores(members: list[list[dict]], names: list[str]) -> list[dict]:
    """Each row's ``score``: the mean of the M members' scores (``scores``: theirs, in member order).

    The members must have scored the same rows in the same order (one file; a run's data.where
    could drop rows, so the rows are compared)."""
    first = members[0]
    for rows, name in zip(members[1:], names[1:]):
        same = len(rows) == len(first) and all((a["prompt"], a["response"]) == (b["prompt"], b["response"])
                                               for a, b in zip(rows, first))
        if not same:
            raise LmforgeError(f"--ensemble {name}: scores {len(rows)} rows of the file, {names[0]} {len(first)} "
                               "(its data.where keeps other rows); an ensemble needs the same rows")
    out = []
    for i, row in enumerate(first):
        scores = [float(rows[i]["score"]) for rows in members]
        out.append({"prompt": row["prompt"], "response": row["response"], "score": sum(scores) / len(scores),
                    "scores": scores})
    return out


def cmd_score(args) -> int:
    names = [args.run_dir] + list(args.ensemble or [])
    for name in names:  # every run there before the first model loads
        if not (Path(name) / "config.yaml").is_file():
            raise LmforgeError(f"{name}: not a run folder (no config.yaml)")
    members = [_scores(name, args.best, args.input) for name in names]  # one model in memory at a time
    rows = members[0] if len(members) == 1 else ensemble_scores(members, names)
    if args.out:
        from ..rundir import write_jsonl

        write_jsonl(args.out, rows)
        print(json.dumps({"scored": len(rows), "out": args.out}))
    else:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
    return 0


def register(sub) -> None:
    from .helptext import input_help

    s = sub.add_parser("score", help="score prompt/response pairs with a trained reward model")
    s.add_argument("run_dir")
    s.add_argument("--input", required=True, help="JSONL/CSV/... with prompt and response (or completion) columns")
    s.add_argument("--out", default=None, help="write JSONL here instead of printing")
    s.add_argument("--best", action="store_true", help="use the best checkpoint's model")
    s.add_argument("--ensemble", nargs="+", default=None, metavar="RUN",
                   help="more reward runs: each row's score is the mean of every run's score (scores: each run's), "
                        "the mean-reward ensemble; runs of one recipe (seeds) share a scale")
    input_help(s, "a reward run folder; --input JSONL/CSV/... with prompt and response (or completion) columns",
                  '{"prompt": "How do I boil an egg?", "response": "Simmer it for 9 minutes."}')
    s.set_defaults(func=cmd_score)
