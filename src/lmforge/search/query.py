"""Querying an index: dense, BM25 or hybrid (weighted RRF), optional cross-encoder reranking.

Every mode returns, per query, chunk rows with scores, best first. Dense search is exact by
default (blocked matmul top-k over the stored vectors, :func:`lmforge.search.vectors.exact_topk`),
or a Hamming first pass over binary codes rescored exactly, or the FAISS HNSW index when the
index has one and exact search is not asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import LmforgeError
from . import vectors as V
from .bm25 import bm25_topk
from .fusion import reciprocal_rank_fusion
from .index import SearchIndex

MODES = ("dense", "bm25", "hybrid")


@dataclass
class SearchOptions:
    """Attributes:
        mode: ``dense``, ``bm25`` or ``hybrid``.
        k: results per query (> 0).
        weights: hybrid RRF weights (dense, bm25).
        rrf_k: RRF smoothing constant.
        candidates: per-retriever depth fused by hybrid (and reranked): max(k, candidates).
        exact: ignore a FAISS index.
        binary: Hamming first pass over the binary codes (the index must have them), rescored.
        rescore: binary candidates per result (``rescore * k`` rows are rescored).
        rerank: a cross-encoder reference (folder, alias, training run's model) or None.
        rerank_top: how many of the first results the cross-encoder re-scores.
    """

    mode: str = "dense"
    k: int = 10
    weights: tuple[float, float] = (1.0, 1.0)
    rrf_k: int = 60
    candidates: int = 100
    exact: bool = False
    binary: bool = False
    rescore: int = 4
    rerank: str | None = None
    rerank_top: int = 50

    def check(self) -> None:
        if self.mode not in MODES:
            raise LmforgeError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.k < 1:
            raise LmforgeError(f"k must be >= 1, got {self.k}")
        if self.rrf_k < 1 or self.candidates < 1 or self.rescore < 1 or self.rerank_top < 1:
            raise LmforgeError("rrf-k, candidates, rescore and rerank-top must be >= 1")
        if len(self.weights) != 2 or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise LmforgeError(f"hybrid weights must be two non-negative numbers, not both 0, got {self.weights}")


def check_queries(queries: Sequence[str]) -> None:
    if not queries:
        raise LmforgeError("no queries")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise LmforgeError(f"query {i + 1} is empty")


def dense_rows(index: SearchIndex, qvecs: np.ndarray, k: int, opts: SearchOptions) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k') scores and chunk rows by dense similarity."""
    n = index.stored.shape[0]
    if opts.binary:
        if index.binary is None:
            raise LmforgeError(f"{index.folder}: built without binary vectors (index build --binary)")
        cand = V.binary_candidates(qvecs, index.binary, min(n, opts.rescore * k))
        return V.exact_topk(qvecs, index.stored, k, ranges=index.ranges, rows=cand)
    if index.settings.faiss and not opts.exact:
        fa = index.faiss_index
        fa.hnsw.efSearch = max(64, 2 * k)
        scores, rows = fa.search(np.ascontiguousarray(qvecs, dtype=np.float32), min(k, n))
        return scores, rows.astype(np.int64)
    return V.exact_topk(qvecs, index.stored, k, ranges=index.ranges)


def search_rows(index: SearchIndex, queries: Sequence[str], opts: SearchOptions,
                depth: int | None = None) -> list[list[tuple[int, float]]]:
    """Per query, ``(chunk row, score)`` best first, ``depth`` (default ``opts.k``) at most.

    ``hybrid`` fuses the dense and BM25 lists (each ``max(depth, candidates)`` deep) with
    weighted reciprocal rank fusion; the score is then the fused RRF value. With ``rerank``, the
    first ``rerank_top`` results are re-scored by the cross-encoder (sigmoid scores) and reordered;
    the rest follow in their original order.
    """
    opts.check()
    check_queries(queries)
    depth = depth or opts.k
    if depth < 1:
        raise LmforgeError(f"k must be >= 1, got {depth}")
    want = max(depth, opts.rerank_top) if opts.rerank else depth
    deep = max(want, opts.candidates) if opts.mode == "hybrid" else want
    dense = bm = None
    if opts.mode in ("dense", "hybrid"):
        s, r = dense_rows(index, index.embed_queries(queries), deep, opts)
        dense = [[(int(i), float(x)) for i, x in zip(ri, si) if i >= 0] for si, ri in zip(s, r)]
    if opts.mode in ("bm25", "hybrid"):
        s, r = bm25_topk(index.bm25, queries, deep)
        bm = [[(int(i), float(x)) for i, x in zip(ri, si)] for si, ri in zip(s, r)]
    if opts.mode == "dense":
        out = dense
    elif opts.mode == "bm25":
        out = bm
    else:
        out = [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in b]], opts.weights, opts.rrf_k)[:want]
               for d, b in zip(dense, bm)]
    out = [r[:want] for r in out]
    if opts.rerank:
        out = [rerank_rows(index, q, rows, opts.rerank, opts.rerank_top) for q, rows in zip(queries, out)]
    return [r[:depth] for r in out]


_CROSS: dict[str, object] = {}


def cross_encoder(ref: str):
    """A loaded :class:`CrossEncoder` (cached per reference for batch queries)."""
    if ref not in _CROSS:
        from ..embeddings.cross_encoder import CrossEncoder
        from .index import model_folder

        _CROSS.clear()
        _CROSS[ref] = CrossEncoder.from_pretrained(model_folder(ref))
    return _CROSS[ref]


def rerank_rows(index: SearchIndex, query: str, rows: list[tuple[int, float]], ref: str,
                top: int) -> list[tuple[int, float]]:
    """Re-score the first ``top`` rows with the cross-encoder ``ref``; best first (ties by order)."""
    head, tail = rows[:top], rows[top:]
    if not head:
        return rows
    ce = cross_encoder(ref)
    scores = ce.predict([(query, index.chunks[i]["text"]) for i, _ in head], placement=index.placement)
    order = sorted(range(len(head)), key=lambda j: (-scores[j], j))
    return [(head[j][0], float(scores[j])) for j in order] + tail


def hits(index: SearchIndex, rows: list[tuple[int, float]]) -> list[dict]:
    """JSON-ready results: rank, score, document id, offsets, chunk row and text."""
    out = []
    for rank, (i, s) in enumerate(rows, start=1):
        c = index.chunks[i]
        out.append({"rank": rank, "score": round(float(s), 6), "doc_id": c["doc_id"], "start": c["start"],
                    "end": c["end"], "chunk": int(i), "text": c["text"]})
    return out


def search(index: SearchIndex, queries: Sequence[str], opts: SearchOptions) -> list[list[dict]]:
    """Per query, its hits (see :func:`hits`)."""
    return [hits(index, rows) for rows in search_rows(index, queries, opts)]
