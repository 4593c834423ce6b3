"""Alignment commands: ``lmforge score RUN_DIR --input FILE [--out FILE]`` (reward models)."""
from __future__ import annotations

import json
import sys

from ..errors import LmforgeError


def cmd_score(args) -> int:
    from ..api import load

    run = load(args.run_dir, "best" if args.best else "final")
    if run.config.task != "reward":
        raise LmforgeError(f"{args.run_dir}: 'score' needs a reward-model run (this run's task is '{run.config.task}')")
    rows = run.task.score_file(args.input, args.out)
    if args.out:
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
    input_help(s, "a reward run folder; --input JSONL/CSV/... with prompt and response (or completion) columns",
                  '{"prompt": "How do I boil an egg?", "response": "Simmer it for 9 minutes."}')
    s.set_defaults(func=cmd_score)
