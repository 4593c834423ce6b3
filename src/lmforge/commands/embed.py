"""``lmforge embed``: sentence vectors to .npy/.parquet; ``lmforge eval --task sts|retrieval``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LmforgeError


def read_texts(path: str, column: str = "text") -> list[str]:
    """Texts of a file, one per output row: a .txt line each (an empty line is an error, so rows
    stay aligned with lines) or the ``column`` of a table file."""
    from ..data import read_table
    from ..data.readers import resolve_data_path
    from ..data.schema import require_columns, text_values

    p = Path(resolve_data_path(path)).expanduser()
    if p.suffix.lower() in (".txt", ".text") and p.is_file():
        texts = []
        with open(p, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline
        for n, line in enumerate(lines, start=1):
            line = line.rstrip("\r")
            if not line.strip():
                raise LmforgeError(f"{path} line {n}: empty line (one text per line expected)")
            texts.append(line)
        if not texts:
            raise LmforgeError(f"{path}: no texts")
        return texts
    table = read_table(path)
    require_columns(table, [column])
    return text_values(table, column)


def write_vectors(out: str, texts: list[str], vectors) -> None:
    """Write ``(N, D)`` float32 vectors to ``out``: ``.npy`` (the matrix) or ``.parquet``
    (columns ``text`` and ``embedding``). Written to a temp file, then renamed."""
    import numpy as np

    p = Path(out)
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise LmforgeError(f"{out}: output must end in .npy or .parquet")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    vectors = np.asarray(vectors, dtype=np.float32)
    if suffix == ".npy":
        with open(tmp, "wb") as fh:
            np.save(fh, vectors)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = vectors.shape[1]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        pq.write_table(pa.table({"text": texts, "embedding": emb}), tmp)
    os.replace(tmp, p)


def load_encoder(ref: str, *, pooling: str | None = None, normalize: bool | None = None,
                 max_length: int | None = None):
    """A :class:`SentenceEncoder` from an embed run directory (its ``model/``) or any model reference."""
    from ..embeddings import SentenceEncoder

    p = Path(ref)
    if (p / "config.yaml").is_file():
        art = p / "model"
        if not (art / "modules.json").is_file():
            raise LmforgeError(f"{ref}: this run has no sentence-embedding model (no model/modules.json)")
        ref = str(art)
    return SentenceEncoder.from_pretrained(ref, pooling=pooling, normalize=normalize, max_length=max_length)


def cmd_embed(args) -> int:
    import time

    from ..device import Placement

    if Path(args.out).suffix.lower() not in (".npy", ".parquet"):
        raise LmforgeError(f"{args.out}: output must end in .npy or .parquet")
    texts = read_texts(args.input, args.column)
    enc = load_encoder(args.model, pooling=args.pooling, normalize=args.normalize, max_length=args.max_length)
    place = Placement.resolve(args.device, args.precision)
    enc.to_inference(place)
    t0 = time.perf_counter()
    vecs = enc.encode(texts, batch_size=args.batch_size, placement=place, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    write_vectors(args.out, texts, vecs)
    print(json.dumps({"texts": len(texts), "dim": int(vecs.shape[1]), "out": args.out,
                      "precision": place.name, "sentences_per_s": round(len(texts) / max(dt, 1e-9), 1)}))
    return 0


def cmd_eval_embedding(args) -> int:
    """``lmforge eval RUN_DIR_OR_MODEL --task sts|retrieval --data FILE``: one JSON line, and a
    report file (``--out``, or ``eval_<task>_<data>.json`` inside a run directory)."""
    from ..embeddings.evaluators import retrieval_from_file, run_evaluators, sts_from_file
    from ..tasks.common import write_json

    enc = load_encoder(args.run_dir)
    if args.task == "sts":
        evaluator = sts_from_file(args.data, name="sts", score_range=_score_range(args.run_dir))
    elif args.task == "retrieval":
        evaluator = retrieval_from_file(args.data, name="ir")
    else:
        raise LmforgeError(f"unknown evaluation task '{args.task}' (use sts or retrieval)")
    from ..device import Placement

    place = Placement.resolve()
    report = run_evaluators([evaluator], enc.to_inference(place), placement=place)
    report = {"task": args.task, "data": args.data} | report
    out = args.out
    if out is None and (Path(args.run_dir) / "config.yaml").is_file():
        out = str(Path(args.run_dir) / f"eval_{args.task}_{Path(args.data).name.split('.')[0]}.json")
    if out:
        write_json(Path(out), report)
    print(json.dumps(report))
    return 0


def _score_range(ref: str) -> tuple[float, float]:
    """The score range a run declared (``embed.score_range``), else STS's 0-5."""
    if (Path(ref) / "config.yaml").is_file():
        from ..tasks.common import read_run_config

        embed = getattr(read_run_config(ref), "embed", None)
        if embed is not None:
            return tuple(embed.score_range)
    return (0.0, 5.0)


def register(sub) -> None:
    import argparse

    e = sub.add_parser("embed", help="embed texts with a sentence encoder (model or embed run)")
    e.add_argument("model", help="embed run directory, sentence-transformers/HF folder, hub id or alias (minilm)")
    e.add_argument("--input", required=True, help=".txt (one text a line) or a table file with a text column")
    e.add_argument("--out", required=True, help="FILE.npy or FILE.parquet")
    e.add_argument("--column", default="text", help="text column of a table file")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    e.add_argument("--device", default="auto")
    e.add_argument("--pooling", default=None, choices=["mean", "cls", "max", "last"])
    e.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction)
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_embed)
