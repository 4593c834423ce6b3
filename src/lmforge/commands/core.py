"""Core commands: train, config show, eval, predict."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import logging

from ..errors import LmforgeError



log = logging.getLogger("lmforge")


def cmd_config(args) -> int:
    from ..config import dump_config, load_config

    if args.action != "show":
        raise LmforgeError(f"unknown config action '{args.action}' (use: show)")
    cfg = load_config(args.recipe, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def check_run_dir(cfg) -> str:
    """What training will do with the run directory (see :func:`lmforge.rundir.check_run`)."""
    from ..rundir import check_run

    return check_run(cfg)


def prepare_run_dir(cfg) -> Path:
    """Create the run directory and save the resolved config in it (:func:`lmforge.rundir.prepare_run`)."""
    from ..rundir import prepare_run

    return prepare_run(cfg)


def cmd_train(args) -> int:
    from ..api import train_config
    from ..config import load_config

    run = train_config(load_config(args.recipe, args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in run.metrics.items() if isinstance(v, (int, float))}
        print(json.dumps({"run_dir": str(run.run_dir)} | summary))
    return 0


def cmd_eval(args) -> int:
    if getattr(args, "qrels", None) or getattr(args, "queries", None):  # a search index (commands/search.py)
        from .search import cmd_eval_index

        return cmd_eval_index(args)
    if getattr(args, "task", None) == "mc":  # multiple-choice log-likelihood (commands/mc.py)
        from .mc import run_mc

        return run_mc(args)
    if not args.data and not getattr(args, "split", None):
        raise LmforgeError("eval needs --data FILE, --split test (or --queries and --qrels for a search index)")
    if getattr(args, "task", None) in ("perplexity", "generation"):  # causal LM evaluation
        from .generate import run_eval_task

        return run_eval_task(args)
    if getattr(args, "task", None):  # embedding evaluation of a run or any model
        from .embed import cmd_eval_embedding

        return cmd_eval_embedding(args)
    from ..api import load

    _out_file(args.out)
    report = load(args.run_dir, args.checkpoint).evaluate(args.data, args.out, split=args.split)
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_scatter")}))  # points: in the file
    return 0


def _out_file(out: str | None, flag: str = "--out") -> None:
    """An output path must name a file (checked before the model loads)."""
    if out and Path(out).is_dir():
        raise LmforgeError(f"{flag} {out}: is a folder, give a file name")


def cmd_predict(args) -> int:
    from ..api import load

    _out_file(args.out)
    n = load(args.run_dir).predict_file(args.input, args.out)
    print(json.dumps({"predictions": n, "out": args.out}))
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key=value (dotted keys for nested values)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="config tools")
    c.add_argument("action", choices=["show"])
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("eval", help="evaluate a run on a data file")
    e.add_argument("run_dir")
    e.add_argument("--data", default=None)
    e.add_argument("--queries", default=None, help="search index: queries file (id, query)")
    e.add_argument("--qrels", default=None, help="search index: judgements (TREC qrels or query_id/doc_id/score)")
    e.add_argument("--modes", default=None, help="search index: modes to evaluate (default dense,bm25,hybrid)")
    e.add_argument("--out", default=None)
    e.add_argument("--checkpoint", default="final", help="a run's weights: final, best or step-N (a kept checkpoint)")
    e.add_argument("--split", default=None, choices=["test"],
                   help="score the run's own held-out test split (data.test / data.test_fraction) instead of --data")
    e.add_argument("--task", default=None, choices=["sts", "retrieval", "perplexity", "generation", "mc"],
                   help="sts|retrieval (embeddings) or perplexity|generation|mc (causal LMs); run_dir may then "
                        "also be a model folder or alias")
    from .mc import MC_HELP, add_mc_args

    add_mc_args(e)
    e.epilog = MC_HELP
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="predict a file with a run")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True)
    pr.add_argument("--out", required=True)
    pr.set_defaults(func=cmd_predict)
