"""``lmforge compare RECIPE``: several classification methods on one split, one table."""
from __future__ import annotations

import json
import sys


def cmd_compare(args) -> int:
    from ..compare import read_compare, run_compare

    recipe = read_compare(args.recipe, args.overrides)
    only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only else None
    _, md, js = run_compare(recipe, source=args.recipe, only=only, reuse=args.reuse)
    sys.stdout.write(md.read_text(encoding="utf-8"))
    print(json.dumps({"table": str(md), "json": str(js)}))
    return 0


def register(sub) -> None:
    from .helptext import input_help

    c = sub.add_parser("compare", help="run several classification methods on one split and tabulate them")
    c.add_argument("recipe", help="compare recipe: a base config and the methods as overrides of it")
    c.add_argument("overrides", nargs="*", help="dotted key=value into the recipe (base.train.lr=1e-4); "
                   "put them before --only/--reuse")
    c.add_argument("--only", default=None, help="comma-separated method names to run")
    c.add_argument("--reuse", action="store_true",
                   help="keep a method's earlier result when its run config is unchanged")
    input_help(c, "a compare recipe YAML: a base config and the methods as overrides of it (see "
                  "recipes/compare_sst2.yaml)",
                  "lmforge compare recipes/compare_sst2.yaml --only lora,setfit")
    c.set_defaults(func=cmd_compare)
