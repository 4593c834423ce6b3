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
    from ..api import eval_report_path

    if getattr(args, "qrels", None) or getattr(args, "queries", None):  # a search index (commands/search.py)
        from .search import cmd_eval_index

        code = cmd_eval_index(args)
        _say_written(args.out)
        return code
    task = getattr(args, "task", None)
    paired = getattr(args, "paired_with", None)
    ensemble = getattr(args, "ensemble", None) or []
    if getattr(args, "ensemble_scale", "raw") != "raw" and not ensemble:
        raise LmforgeError("--ensemble-scale: scales the members of an --ensemble (give --ensemble REPORT.json ...)")
    if paired or ensemble:  # other runs' preference reports on the same file: checked before any model loads
        from ..eval.preference_pairs import compare_reports, ensemble_report, read_pairs

        flag = "--paired-with" if paired else "--ensemble"
        if task:
            raise LmforgeError(f"{flag}: combines preference runs' own evaluations, not --task {task}")
        other = read_pairs(paired) if paired else None
        members = [read_pairs(m) for m in ensemble]
        _out_file(args.out)
        if str(args.run_dir).endswith(".json"):  # reports only, no model: lmforge eval A.json --ensemble B.json
            if ensemble:
                report = ensemble_report([read_pairs(args.run_dir)] + members, [args.run_dir] + ensemble,
                                         scale=args.ensemble_scale)
                return _finish_preference(report, args, other, paired)
            print(json.dumps(compare_reports(args.run_dir, other, names=(args.run_dir, paired))))
            return 0
    ensemble_out = None
    if ensemble:  # RUN's own report goes to its usual file, the ensemble's to --out
        if not args.out:
            raise LmforgeError("--ensemble: give --out FILE.json for the ensemble's report (RUN's own evaluation "
                               "goes to its usual eval_<file>.json)")
        ensemble_out, args.out = args.out, None
    if task != "mc" and not args.data and not getattr(args, "split", None):
        raise LmforgeError("eval needs --data FILE, --split test (or --queries and --qrels for a search index)")
    _out_file(args.out)
    if args.out is None:  # the default report file, named here so the command can say where it went
        data = "test" if getattr(args, "split", None) and not args.data else args.data
        args.out = eval_report_path(args.run_dir, data, task, suite=getattr(args, "suite", None))
        args.out = str(args.out) if args.out else None
    if getattr(args, "no_filter", False) and task not in (None, "generation"):
        raise LmforgeError(f"--no-filter: --task {task} reads the file as it is (no run's data.where applies)")
    if task == "mc":  # multiple-choice log-likelihood (commands/mc.py)
        from .mc import run_mc

        code = run_mc(args)
    elif task in ("perplexity", "generation"):  # causal LM evaluation
        from .generate import run_eval_task

        code = run_eval_task(args)
    elif task:  # embedding evaluation of a run or any model
        from .embed import cmd_eval_embedding

        code = cmd_eval_embedding(args)
    else:
        from ..api import load

        report = load(args.run_dir, args.checkpoint).evaluate(args.data, args.out, split=args.split,
                                                              no_filter=args.no_filter)
        if paired or ensemble:
            if "pairs" not in report:
                raise LmforgeError(f"{flag}: {args.run_dir} is not a preference run (no per-pair outcomes)")
            if ensemble:  # this run first among the ensemble's members
                _say_written(args.out)
                report = ensemble_report([report["pairs"]] + members, [args.out or args.run_dir] + ensemble,
                                         scale=args.ensemble_scale)
                args.out = ensemble_out
            return _finish_preference(report, args, other, paired)
        print(json.dumps(_summary(report)))
        code = 0
    _say_written(args.out)
    return code


def _summary(report: dict) -> dict:
    """What the terminal shows of a report: per-item lists (``pairs``, ``*_scatter``) stay in the file."""
    return {k: v for k, v in report.items() if not k.endswith("_scatter") and k != "pairs"}


def _finish_preference(report: dict, args, other: dict | None, paired: str | None) -> int:
    """Add the paired accuracy difference against ``other`` (this - other), write ``--out``, print."""
    from ..eval.preference_pairs import compare_reports
    from ..rundir import write_json

    if other is not None:
        report["paired"] = compare_reports(report["pairs"], other, names=(args.out or args.run_dir, paired))
    if args.out:
        write_json(Path(args.out), report)
    print(json.dumps(_summary(report)))
    _say_written(args.out)
    return 0


def _say_written(out: str | None) -> None:
    """Tell (on stderr) where the evaluation report went."""
    if out and Path(out).is_file():
        print(f"lmforge: eval report written to {out}", file=sys.stderr)
    else:
        print("lmforge: eval report not written to a file (give --out FILE.json)", file=sys.stderr)


def _out_file(out: str | None, flag: str = "--out") -> None:
    """An output path must name a file (checked before the model loads)."""
    if out and Path(out).is_dir():
        raise LmforgeError(f"{flag} {out}: is a folder, give a file name")


def cmd_predict(args) -> int:
    from ..api import load

    _out_file(args.out)
    run = load(args.run_dir, args.checkpoint)
    n = run.predict_file(args.input, args.out)
    print(json.dumps({"predictions": n, "out": args.out, "checkpoint": run.checkpoint}))
    return 0


RECIPE_HELP = ("a YAML recipe (task, model, data, train sections; see recipes/) and key=value overrides; the "
               "data files it names are JSONL/JSON/CSV/TSV/Parquet with the task's columns")
EVAL_HELP = ("a run folder (with --task: also a model) and --data FILE with the columns the run trained on (its "
             "data.columns and data.where apply, the output says so; --no-filter: every row) or --split test. "
             "--task sts: two texts and a score (sentence1, sentence2, score; --columns, --score-range); "
             "perplexity: text; generation: prompt + reference; retrieval: query + positive; mc: question, "
             "options, answer")


def register(sub) -> None:
    from .helptext import input_help

    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key=value (dotted keys for nested values)")
    input_help(t, RECIPE_HELP, "lmforge train recipes/classify_lora_sst2.yaml train.max_steps=50")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="config tools")
    c.add_argument("action", choices=["show"])
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    input_help(c, RECIPE_HELP, "lmforge config show recipes/classify_lora_sst2.yaml train.lr=1e-4")
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("eval", help="evaluate a run on a data file")
    e.add_argument("run_dir")
    e.add_argument("--data", default=None, help="data file (JSONL/CSV/TSV/Parquet)")
    e.add_argument("--no-filter", action="store_true",
                   help="score every row of --data (the run's data.where filter is not applied)")
    e.add_argument("--columns", default=None, type=lambda v: [c.strip() for c in v.split(",")],
                   help="sts: the two text columns and the score column, e.g. s1,s2,gold")
    e.add_argument("--score-range", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="sts: the gold scores' scale, e.g. 1 5 (default: an embed run's, else 0 5)")
    e.add_argument("--queries", default=None, help="search index: queries file (id, query)")
    e.add_argument("--qrels", default=None, help="search index: judgements (TREC qrels or query_id/doc_id/score)")
    e.add_argument("--modes", default=None, help="search index: modes to evaluate (default dense,bm25,hybrid)")
    e.add_argument("--out", default=None)
    e.add_argument("--checkpoint", default="final", help="a run's weights: final, best or step-N (a kept checkpoint)")
    e.add_argument("--paired-with", default=None, metavar="REPORT.json",
                   help="preference runs: another run's eval report on the same file; adds the paired accuracy "
                        "difference (this - other) with its bootstrap 95%% interval (RUN may be a report.json too)")
    e.add_argument("--ensemble", nargs="+", default=None, metavar="REPORT.json",
                   help="preference runs: other runs' eval reports on the same file; the report becomes the "
                        "mean-margin ensemble of RUN and them (accuracy, mean margin, 95%% intervals, each member's "
                        "accuracy; RUN may be a report.json too; members' margins should share a scale: seeds of "
                        "one recipe, else --ensemble-scale std)")
    e.add_argument("--ensemble-scale", default="raw", choices=["raw", "std"],
                   help="--ensemble: raw margins (default), or each member's divided by its standard deviation over "
                        "the pairs, so members of different scales (a reward model and DPO) weigh the same")
    e.add_argument("--split", default=None, choices=["test"],
                   help="score the run's own held-out test split (data.test / data.test_fraction) instead of --data")
    e.add_argument("--task", default=None, choices=["sts", "retrieval", "perplexity", "generation", "mc"],
                   help="sts|retrieval (embeddings) or perplexity|generation|mc (causal LMs); run_dir may then "
                        "also be a model folder or alias")
    from .mc import add_mc_args

    add_mc_args(e)
    from .generate import add_generation_eval_args

    add_generation_eval_args(e)
    input_help(e, EVAL_HELP, '{"text": "a gorgeous film", "label": 1}',
               more='sts: {"sentence1": "A man plays.", "sentence2": "A man is playing.", "score": 4.6}\n'
                    'mc:  {"question": "2+2=", "options": ["3", "4"], "answer": 1}')
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="predict a file with a run")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True, help="JSONL/CSV/TSV/Parquet with the run's text column")
    pr.add_argument("--out", required=True, help="JSONL of predictions (embed runs: FILE.npy or FILE.parquet)")
    pr.add_argument("--checkpoint", default="final",
                    help="a run's weights: final, best or step-N (a kept checkpoint), as eval takes")
    input_help(pr, "a classify, ner or embed run folder; --input with the text column the run trained on "
                   "(ner: a text or a tokens list)", '{"text": "a gorgeous film"}')
    pr.set_defaults(func=cmd_predict)
