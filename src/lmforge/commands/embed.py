"""``lmforge embed``: sentence vectors to .npy/.parquet; ``lmforge eval --task sts|retrieval``."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LmforgeError


def cmd_embed(args) -> int:
    from ..api import embed_file

    if Path(args.out).suffix.lower() not in (".npy", ".parquet"):
        raise LmforgeError(f"{args.out}: output must end in .npy or .parquet")
    if Path(args.out).is_dir():
        raise LmforgeError(f"--out {args.out}: is a folder, give a file name ending in .npy or .parquet")
    if args.batch_size <= 0:
        raise LmforgeError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_length is not None and args.max_length <= 0:
        raise LmforgeError(f"--max-length must be positive, got {args.max_length}")
    print(json.dumps(embed_file(args.model, args.input, args.out, column=args.column, batch_size=args.batch_size,
                                pooling=args.pooling, normalize=args.normalize, max_length=args.max_length,
                                device=args.device, precision=args.precision, progress=not args.no_progress)))
    return 0


def cmd_eval_embedding(args) -> int:
    """``lmforge eval RUN_DIR_OR_MODEL --task sts|retrieval --data FILE``: one JSON line, and a
    report file (``--out``, or ``eval_<task>_<data>.json`` inside a run directory)."""
    from ..api import evaluate_model

    if args.task not in ("sts", "retrieval"):
        raise LmforgeError(f"unknown evaluation task '{args.task}' (use sts or retrieval)")
    report = evaluate_model(args.run_dir, args.data, args.task, out=args.out, columns=getattr(args, "columns", None),
                            score_range=getattr(args, "score_range", None))
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_scatter")}))  # points: in the file
    return 0


def register(sub) -> None:
    from .helptext import input_help
    import argparse

    e = sub.add_parser("embed", help="embed texts with a sentence encoder (model or embed run)")
    e.add_argument("model", help="embed run directory, sentence-transformers/HF folder, hub id or alias (minilm)")
    e.add_argument("--input", required=True, help=".txt (one text a line) or a table file with a text column")
    e.add_argument("--out", required=True, help="FILE.npy or FILE.parquet")
    e.add_argument("--column", default="text", help="text column of a table file")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    e.add_argument("--device", default="auto")
    e.add_argument("--pooling", default=None, choices=["mean", "cls", "max", "last"])
    e.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction)
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--no-progress", action="store_true")
    input_help(e, "--input .txt (one text a line) or JSONL/CSV/TSV/Parquet with a text column (--column)",
                  '{"text": "A man is playing a guitar."}')
    e.set_defaults(func=cmd_embed)
