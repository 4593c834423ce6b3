"""``lmforge report RUN [RUN ...] [--out FILE.html]``: the self-contained HTML run report."""
from __future__ import annotations

import json


def cmd_report(args) -> int:
    from ..report import write_report

    out = write_report(list(args.runs), args.out)
    print(json.dumps({"report": str(out), "runs": list(args.runs)}))
    return 0


def register(sub) -> None:
    from .helptext import input_help

    p = sub.add_parser("report", help="write an HTML report of one run, or compare several")
    p.add_argument("runs", nargs="+", help="run directories (several: overlaid curves, differing config keys)")
    p.add_argument("--out", default=None,
                   help="the HTML file (default: RUN/report.html, or FIRST_RUN/report_compare.html)")
    input_help(p, "one or more run folders (config.yaml, metrics.jsonl, eval.json)",
                  "lmforge report runs/a runs/b --out compare.html")
    p.set_defaults(func=cmd_report)
