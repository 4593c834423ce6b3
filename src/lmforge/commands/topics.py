"""``lmforge topics show|find|reduce|merge|outliers RUN`` and ``lmforge cluster``.

Topic runs are made by ``lmforge train`` (task ``topics``); ``lmforge predict RUN`` assigns new
documents. Edits (reduce, merge, outliers) re-describe every topic and rewrite the run's
``topics/``, ``eval.json`` and pictures in place, each file atomically.
"""
from __future__ import annotations

import json
import sys

from ..errors import LmforgeError


def _task(run_dir: str, *, documents: bool = False):
    from ..rundir import read_config
    from ..tasks.topics import TopicsTask

    cfg = read_config(run_dir)
    if cfg.task != "topics":
        raise LmforgeError(f"{run_dir}: a '{cfg.task}' run, not a topics run")
    task = TopicsTask.from_run(run_dir)
    if documents:
        task.load_documents()
    return task


def cmd_show(args) -> int:
    task = _task(args.run_dir, documents=args.docs > 0)
    rows = task.model.table()
    if args.json:
        for r in rows:
            if args.docs and r["topic"] in task.model.representative:
                r["documents"] = [task.texts[i] for i in task.model.representative[r["topic"]][:args.docs]]
            print(json.dumps(r, ensure_ascii=False))
        return 0
    out = sys.stdout
    out.write(f"{'topic':>5}  {'size':>6}  {'label':<36}  top words\n")
    for r in rows[: args.top + (1 if rows and rows[0]['topic'] == -1 else 0)]:
        out.write(f"{r['topic']:>5}  {r['size']:>6}  {r['label'][:36]:<36}  {', '.join(r['words'][:8])}\n")
        if args.docs and r["topic"] in task.model.representative:
            for i in task.model.representative[r["topic"]][:args.docs]:
                out.write(f"{'':>15}- {' '.join(task.texts[i].split())[:110]}\n")
    return 0


def cmd_find(args) -> int:
    task = _task(args.run_dir)
    if args.encoder:
        task.cfg = task.cfg.model_copy(update={"model": task.cfg.model.model_copy(update={"name": args.encoder})})
    q = task.embed([args.query], cache=False)
    for t, s in task.model.find(q[0], args.k):
        print(json.dumps({"topic": t, "similarity": round(s, 4), "label": task.model.label(t),
                          "words": [w for w, _ in task.model.words[t][:8]]}, ensure_ascii=False))
    return 0


def _edit(args, assignments_fn, note: dict) -> int:
    task = _task(args.run_dir, documents=True)
    a = assignments_fn(task.model)
    metrics = task.redescribe(a, note)
    print(json.dumps({k: metrics[k] for k in ("n_topics", "outlier_rate", "npmi", "diversity") if k in metrics}))
    return 0


def cmd_reduce(args) -> int:
    from ..topics.edit import reduce_to_n

    return _edit(args, lambda m: reduce_to_n(m.assignments, m.ctfidf, m.topic_ids, args.n),
                 {"reduce": args.n})


def cmd_merge(args) -> int:
    from ..topics.edit import merge_topics

    groups = []
    for g in args.groups:
        try:
            groups.append([int(x) for x in g.split(",")])
        except ValueError:
            raise LmforgeError(f"merge: '{g}' is not a comma-separated list of topic ids") from None
    return _edit(args, lambda m: merge_topics(m.assignments, groups), {"merge": groups})


def cmd_outliers(args) -> int:
    from ..topics.edit import reduce_outliers

    return _edit(args, lambda m: reduce_outliers(m.assignments, m.arrays["doc_embeddings"], m.topic_embeddings,
                                                 m.topic_ids, args.target), {"outliers": args.target})


def cmd_cluster(args) -> int:
    """Embeddings -> reduction -> clusters; one JSON line per document."""
    import numpy as np

    from ..rundir import write_jsonl
    from ..topics.metrics import outlier_rate
    from ..topics.pipeline import cluster_step, reduce_step

    texts = None
    if args.input.endswith(".npy"):
        try:
            emb = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LmforgeError(f"{args.input}: unreadable .npy ({exc})") from None
        if emb.ndim != 2 or len(emb) == 0:
            raise LmforgeError(f"{args.input}: expected an (N, D) matrix of embeddings, got shape {emb.shape}")
    else:
        from ..device import Placement
        from ..embeddings.files import load_encoder, read_texts

        if not args.model:
            raise LmforgeError("cluster: --model is needed to embed a text file (or give a .npy of embeddings)")
        texts = read_texts(args.input, args.column)
        place = Placement.resolve(args.device, args.precision)
        enc = load_encoder(args.model).to_inference(place)
        emb = enc.encode(texts, batch_size=args.batch_size, placement=place)
    settings = {"reduction": {"method": args.reduction, "n_neighbors": args.n_neighbors,
                              "n_components": args.n_components, "min_dist": args.min_dist, "metric": args.metric,
                              "deterministic": not args.fast},
                "clustering": {"method": args.clustering, "min_cluster_size": args.min_cluster_size,
                               "min_samples": args.min_samples, "n_clusters": args.n_clusters}}
    labels = cluster_step(reduce_step(emb, settings, args.seed), settings, args.seed)
    rows = ({"index": i, "cluster": int(c)} | ({"text": texts[i]} if texts is not None else {})
            for i, c in enumerate(labels))
    write_jsonl(args.out, rows)
    print(json.dumps({"documents": len(labels), "clusters": int(len(set(labels.tolist()) - {-1})),
                      "outlier_rate": outlier_rate(labels), "out": args.out}))
    return 0


def register(sub) -> None:
    from .helptext import input_help

    t = sub.add_parser("topics", help="inspect and edit a topics run (show, find, reduce, merge, outliers)")
    ts = t.add_subparsers(dest="topics_action", required=True)
    s = ts.add_parser("show", help="table of topics: id, size, label, top words")
    s.add_argument("run_dir")
    s.add_argument("--top", type=int, default=30, help="topics to list")
    s.add_argument("--docs", type=int, default=0, help="representative documents per topic")
    s.add_argument("--json", action="store_true", help="one JSON object per topic")
    input_help(s, "a topics run folder",
                  "lmforge topics show runs/topics-news --top 10")
    s.set_defaults(func=cmd_show)
    f = ts.add_parser("find", help="topics most similar to a query")
    f.add_argument("run_dir")
    f.add_argument("query")
    f.add_argument("-k", type=int, default=5)
    f.add_argument("--encoder", default=None, help="embed the query with another encoder (must match the dimension)")
    input_help(f, "a topics run folder and a query text",
                  'lmforge topics find runs/topics-news "football"')
    f.set_defaults(func=cmd_find)
    r = ts.add_parser("reduce", help="merge the most similar topics until N remain")
    r.add_argument("run_dir")
    r.add_argument("--n", type=int, required=True)
    input_help(r, "a topics run folder",
                  "lmforge topics reduce runs/topics-news --n 20")
    r.set_defaults(func=cmd_reduce)
    m = ts.add_parser("merge", help="merge groups of topics, e.g. 1,4 2,7,9")
    m.add_argument("run_dir")
    m.add_argument("groups", nargs="+")
    input_help(m, "a topics run folder and groups of topic ids (comma-separated, space between groups)",
                  "lmforge topics merge runs/topics-news 1,4 2,7,9")
    m.set_defaults(func=cmd_merge)
    o = ts.add_parser("outliers", help="reassign outliers to their nearest topic down to a target rate")
    o.add_argument("run_dir")
    o.add_argument("--target", type=float, required=True, help="wanted outlier rate, e.g. 0.05")
    input_help(o, "a topics run folder",
                  "lmforge topics outliers runs/topics-news --target 0.05")
    o.set_defaults(func=cmd_outliers)

    c = sub.add_parser("cluster", help="embed -> reduce -> cluster; one JSON line per document")
    c.add_argument("--input", required=True, help="texts (.txt or a table file) or FILE.npy of embeddings")
    c.add_argument("--out", required=True, help="FILE.jsonl")
    c.add_argument("--model", default=None, help="encoder: model reference, alias (minilm) or embed run")
    c.add_argument("--column", default="text")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--device", default="auto")
    c.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    c.add_argument("--reduction", default="umap", choices=["umap", "pca", "svd", "none"])
    c.add_argument("--n-neighbors", type=int, default=15)
    c.add_argument("--n-components", type=int, default=5)
    c.add_argument("--min-dist", type=float, default=0.0)
    c.add_argument("--metric", default="cosine")
    c.add_argument("--clustering", default="hdbscan", choices=["hdbscan", "kmeans"])
    c.add_argument("--min-cluster-size", type=int, default=10)
    c.add_argument("--min-samples", type=int, default=None)
    c.add_argument("--n-clusters", type=int, default=20)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--fast", action="store_true",
                   help="umap on every core without a seed (faster, not reproducible); default: seeded, bit for bit")
    input_help(c, "--input .txt (one text a line), JSONL/CSV with a text column (--column), or FILE.npy of "
                  "embeddings (N, D)",
                  '{"text": "Stocks rallied after the rate cut."}')
    c.set_defaults(func=cmd_cluster)
