"""Retrieval evaluation of an index: MRR@10, nDCG@10, MAP@100, Recall@k per search mode.

Documents are ranked by their best chunk (max pooling over the chunk ranking). Queries are
searched in blocks and each keeps only its top chunks (:func:`lmforge.search.vectors.exact_topk`
walks the corpus in blocks), so memory is O(block x depth), never a (queries x corpus) matrix.
The metrics are :func:`lmforge.eval.retrieval.retrieval_report`'s (trec_eval conventions; a
parity test checks them against pytrec_eval).
"""
from __future__ import annotations

import math
from typing import Sequence

from ..errors import LmforgeError
from .fusion import first_per_group
from .index import SearchIndex
from .query import SearchOptions, search_rows

QID_COLUMNS = ("qid", "query_id", "query-id", "_id", "id")
QTEXT_COLUMNS = ("query", "text", "question")
DOC_COLUMNS = ("doc_id", "docid", "corpus_id", "corpus-id", "doc")
GRADE_COLUMNS = ("score", "relevance", "grade", "label")


def _pick(cols: Sequence[str], names: Sequence[str], path: str, what: str) -> str:
    c = next((n for n in names if n in cols), None)
    if c is None:
        raise LmforgeError(f"{path}: no {what} column (one of {', '.join(names)}); columns: {', '.join(cols[:8])}")
    return c


def read_queries(path: str) -> dict[str, str]:
    """``{qid: text}`` from a table file with an id column and a query/text column."""
    from ..data import read_table

    table = read_table(path)
    if not table.records:
        raise LmforgeError(f"{path}: no queries (empty file)")
    cols = table.columns()
    qc, tc = _pick(cols, QID_COLUMNS, path, "query id"), _pick(cols, QTEXT_COLUMNS, path, "query text")
    out: dict[str, str] = {}
    for i, rec in enumerate(table.records):
        q, t = rec.get(qc), rec.get(tc)
        if q is None or not isinstance(t, str) or not t.strip():
            raise LmforgeError(f"{table.where(i)}: query id and non-empty text needed")
        if str(q) in out:
            raise LmforgeError(f"{table.where(i)}: query id '{q}' appears twice")
        out[str(q)] = t
    return out


def read_qrels(path: str) -> dict[str, dict[str, float]]:
    """``{qid: {doc_id: grade}}`` from TREC qrels (``qid 0 doc grade`` lines, ``.qrels``/``.trec``/
    ``.txt``), or a table file (query id, doc id and optional grade columns; grade 1 if absent)."""
    from pathlib import Path

    from ..data import read_table
    from ..data.readers import resolve_data_path

    p = Path(resolve_data_path(path))
    out: dict[str, dict[str, float]] = {}
    if p.suffix.lower() in (".qrels", ".trec", ".txt"):
        if not p.is_file():
            raise LmforgeError(f"{path}: qrels file not found")
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                q, _, d, g = parts
                grade = float(g)
            except ValueError:
                raise LmforgeError(f"{path} line {n}: expected 'query_id iteration doc_id grade'") from None
            out.setdefault(q, {})[d] = grade
    else:
        table = read_table(path)
        if not table.records:
            raise LmforgeError(f"{path}: no judgements (empty file)")
        cols = table.columns()
        qc, dc = _pick(cols, QID_COLUMNS, path, "query id"), _pick(cols, DOC_COLUMNS, path, "document id")
        gc = next((c for c in GRADE_COLUMNS if c in cols), None)
        for i, rec in enumerate(table.records):
            try:
                grade = float(rec[gc]) if gc else 1.0
            except (TypeError, ValueError):
                raise LmforgeError(f"{table.where(i)}: grade '{gc}' must be a number") from None
            out.setdefault(str(rec[qc]), {})[str(rec[dc])] = grade
    if not out:
        raise LmforgeError(f"{path}: no judgements")
    return out


def check_ids(queries: dict[str, str], qrels: dict[str, dict[str, float]], doc_ids: set[str], src: str) -> None:
    """Every judged query and document must exist (a typo would silently score 0)."""
    for q, judged in qrels.items():
        if q not in queries:
            raise LmforgeError(f"{src}: judges unknown query id '{q}'")
        for d in judged:
            if d not in doc_ids:
                raise LmforgeError(f"{src}: query '{q}' judges document '{d}', which is not in the index")


def rank_documents(index: SearchIndex, queries: Sequence[str], opts: SearchOptions, k_docs: int,
                   block: int = 256) -> list[list[tuple[str, float]]]:
    """Per query, the top ``k_docs`` documents (best chunk score), in query blocks."""
    per_doc = max(1, math.ceil(len(index.chunks) / max(1, len(index.docs))))
    depth = min(len(index.chunks), k_docs * per_doc * 2)
    out: list[list[tuple[str, float]]] = []
    for s in range(0, len(queries), block):
        for rows in search_rows(index, queries[s:s + block], opts, depth=depth):
            out.append(first_per_group([i for i, _ in rows], [x for _, x in rows], index.doc_of, k_docs))
    return out


def evaluate_index(index: SearchIndex, queries: dict[str, str], qrels: dict[str, dict[str, float]],
                   modes: Sequence[str] = ("dense", "bm25", "hybrid"), ks: Sequence[int] = (1, 3, 5, 10, 100),
                   opts: SearchOptions | None = None, *, src: str = "qrels", return_runs: bool = False) -> dict:
    """Metrics per mode: ``{mode: {"mrr@10", "ndcg@10", "map@100", "recall@k" ...}}``.

    Args:
        queries: ``{qid: text}`` (queries without judgements are searched but not scored).
        qrels: ``{qid: {doc_id: grade}}``; grade > 0 is relevant.
        modes: search modes to evaluate.
        ks: cut-offs for recall/precision/nDCG/MRR; MAP is over the top ``max(ks)`` documents.
        opts: search options (k, weights, rerank ...); the mode is replaced per mode.
        return_runs: also return ``{"runs": {mode: {qid: {doc_id: score}}}}`` (for pytrec_eval).
    """
    from dataclasses import replace

    from ..eval.retrieval import retrieval_report

    check_ids(queries, qrels, {d["id"] for d in index.docs}, src)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise LmforgeError(f"k must be >= 1, got {ks}")
    qids = [q for q in queries if q in qrels]
    if not qids:
        raise LmforgeError(f"{src}: no query has a judgement")
    texts = [queries[q] for q in qids]
    base = opts or SearchOptions()
    report: dict = {"n_queries": len(qids), "n_docs": len(index.docs), "n_chunks": len(index.chunks)}
    runs: dict = {}
    for mode in modes:
        ranked = rank_documents(index, texts, replace(base, mode=mode, k=ks[-1]), ks[-1])
        rep = retrieval_report({q: [d for d, _ in r] for q, r in zip(qids, ranked)},
                               {q: qrels[q] for q in qids}, ks, kind="rankings")
        rep[f"map@{ks[-1]}"] = rep.pop("map")
        report[mode] = {k: v for k, v in rep.items() if k not in ("n_queries", "n_skipped")}
        runs[mode] = {q: {d: s for d, s in r} for q, r in zip(qids, ranked)}
    if return_runs:
        report["runs"] = runs
    return report
