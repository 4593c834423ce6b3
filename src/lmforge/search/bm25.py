"""Keyword search with bm25s: our tokenisation, bm25s' sparse BM25 index, memory-mapped on load.

Tokens: lower-cased word characters (``\\w+``) minus bm25s' English stop words. BM25 (Lucene
variant, bm25s' default: ``k1 = 1.5``, ``b = 0.75``):
``score(q, d) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))``
with ``idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))`` (Lucene >= 8 drops the classic constant
factor ``k1 + 1``, which never changes a ranking; ``tests/search/test_bm25.py`` checks it by hand). bm25s precomputes every
``(t, d)`` term into a sparse matrix, so a query is a sum of a few sparse rows.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LmforgeError

_WORD = re.compile(r"\w+")


def _stopwords() -> frozenset[str]:
    return frozenset(_bm25s().stopwords.STOPWORDS_EN)


def tokenize(texts: Sequence[str], stopwords: frozenset[str] | None = None) -> list[list[str]]:
    """Lower-cased word tokens of each text without stop words."""
    stop = _stopwords() if stopwords is None else stopwords
    return [[t for t in _WORD.findall(s.lower()) if t not in stop] for s in texts]


def _bm25s():
    """bm25s, imported without numba unless numba is loaded already.

    bm25s imports numba at import time for its optional ``backend="numba"``; lmforge uses the
    numpy backend (bm25s' default, what :func:`build_bm25` and saved indexes name), so that import
    is pure cost: ~0.2-0.3 CPU-s, ~190 modules and ~25k objects every later full garbage collection
    walks (with torch + transformers loaded, a full pass is ~0.2 CPU-s), and ~50 MB at the peak of
    an index build. ``None`` in ``sys.modules`` makes bm25s' ``import numba`` fail as if numba were
    absent (bm25s catches that); the entry is removed right after, so a later ``import numba``
    (UMAP, HDBSCAN) works as usual.
    """
    import sys

    if "bm25s" not in sys.modules and "numba" not in sys.modules:
        sys.modules["numba"] = None  # type: ignore[assignment]
        try:
            return _import_bm25s()
        finally:
            if sys.modules.get("numba", 0) is None:
                del sys.modules["numba"]
    return _import_bm25s()


def _import_bm25s():
    try:
        import bm25s
    except ImportError:
        raise LmforgeError("keyword search needs bm25s: pip install 'lmforge[search]'") from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def build_bm25(texts: Sequence[str]):
    """A bm25s index over ``texts`` (row i = text i)."""
    bm25s = _bm25s()
    retriever = bm25s.BM25()
    retriever.index(tokenize(texts), show_progress=False)
    return retriever


def save_bm25(retriever, folder: Path) -> None:
    """Write the index into ``folder`` (a fresh folder inside an atomic index directory)."""
    retriever.save(str(folder), show_progress=False)


def load_bm25(folder: Path, *, mmap: bool = True):
    """Load a saved index, its score arrays memory-mapped (no pickle)."""
    bm25s = _bm25s()
    try:
        return bm25s.BM25.load(str(folder), mmap=mmap, allow_pickle=False, show_progress=False)
    except (OSError, ValueError, KeyError) as exc:
        raise LmforgeError(f"{folder}: unreadable BM25 index ({str(exc).splitlines()[0]})") from None


def bm25_topk(retriever, queries: Sequence[str], k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Top-k rows per query by BM25; rows with score 0 (no query term) are left out.

    Returns:
        per query, ``scores`` (k',) float32 descending and ``ids`` (k',) int64 (ties by row id).
    """
    scores_out, ids_out = [], []
    for toks in tokenize(queries):
        ids = retriever.get_tokens_ids(toks)
        if not ids:
            scores_out.append(np.zeros(0, np.float32))
            ids_out.append(np.zeros(0, np.int64))
            continue
        s = np.asarray(retriever.get_scores_from_ids(ids), dtype=np.float32)  # (N,)
        kk = min(k, len(s))
        part = np.argpartition(-s, kk - 1)[:kk] if kk < len(s) else np.arange(len(s))
        part = part[np.lexsort((part, -s[part]))]  # score desc, row asc
        part = part[s[part] > 0]
        scores_out.append(s[part])
        ids_out.append(part.astype(np.int64))
    return scores_out, ids_out
