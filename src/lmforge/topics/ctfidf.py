"""Class-based TF-IDF (Grootendorst 2022, BERTopic eq. 1) on scipy sparse matrices.

Documents of one topic form one class. With ``tf_{x,c}`` the count of word ``x`` in class ``c``::

    W_{x,c} = tf_{x,c} / sum_x' tf_{x',c}  *  log(1 + A / f_x)

where ``f_x = sum_c tf_{x,c}`` is the word's frequency over all classes and ``A`` the average
number of words per class, truncated to an integer as BERTopic does (``int(mean_c sum_x tf_{x,c})``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp


def class_counts(doc_term: sp.spmatrix, assignments: Sequence[int], topic_ids: Sequence[int]) -> sp.csr_matrix:
    """Sum the document rows of each topic.

    Args:
        doc_term: ``(N, V)`` word counts per document.
        assignments: ``(N,)`` topic id per document (-1 = outlier).
        topic_ids: the ``T`` topic ids, in the order of the output rows.

    Returns:
        ``(T, V)`` float64 CSR: ``counts[t] = sum_{i: a_i = topic_ids[t]} doc_term[i]``.
    """
    a = np.asarray(assignments)
    row_of = {int(t): r for r, t in enumerate(topic_ids)}
    rows = np.array([row_of.get(int(x), -1) for x in a], dtype=np.int64)
    keep = np.flatnonzero(rows >= 0)
    onehot = sp.csr_matrix((np.ones(len(keep)), (rows[keep], keep)), shape=(len(topic_ids), len(a)))  # (T, N)
    return (onehot @ sp.csr_matrix(doc_term, dtype=np.float64)).tocsr()  # (T, V)


def ctfidf_idf(counts: sp.spmatrix) -> np.ndarray:
    """``idf_x = log(1 + A / f_x)`` with ``f_x = sum_c tf_{x,c}``, ``A = int(mean_c sum_x tf_{x,c})``.

    Args:
        counts: ``(T, V)`` class counts.

    Returns:
        ``(V,)`` float64 idf (a word absent from every class gets ``log(1 + A / 1)``, never inf).
    """
    counts = sp.csr_matrix(counts)
    f = np.asarray(counts.sum(axis=0)).ravel()  # (V,)
    avg = int(np.asarray(counts.sum(axis=1)).mean())
    return np.log(avg / np.maximum(f, 1.0) + 1.0)


def c_tf_idf(counts: sp.spmatrix, idf: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Class-based TF-IDF of class counts.

    Args:
        counts: ``(T, V)`` class counts (:func:`class_counts`).
        idf: ``(V,)`` weights to reuse (e.g. the global idf for per-time-bin matrices);
            computed from ``counts`` when None.

    Returns:
        ``(W, idf)``: ``W`` is ``(T, V)`` float64 CSR, each row L1-normalised term frequency
        times idf; ``idf`` is ``(V,)``.
    """
    counts = sp.csr_matrix(counts, dtype=np.float64)
    if idf is None:
        idf = ctfidf_idf(counts)
    totals = np.asarray(counts.sum(axis=1)).ravel()  # (T,)
    tf = sp.diags(1.0 / np.where(totals > 0, totals, 1.0)) @ counts  # (T, V) rows sum to 1
    return sp.csr_matrix(tf @ sp.diags(idf)), np.asarray(idf, dtype=np.float64)


def top_words(weights: sp.spmatrix, vocab: Sequence[str], n: int) -> list[list[tuple[str, float]]]:
    """The ``n`` highest-weighted words of each row (ties broken by vocabulary order), zeros dropped.

    Args:
        weights: ``(T, V)`` c-TF-IDF.
        vocab: ``V`` words.

    Returns:
        per row, ``[(word, weight), ...]`` in decreasing weight.
    """
    weights = sp.csr_matrix(weights)
    out = []
    for r in range(weights.shape[0]):
        lo, hi = weights.indptr[r], weights.indptr[r + 1]
        idx, val = weights.indices[lo:hi], weights.data[lo:hi]
        order = np.lexsort((idx, -val))[:n]  # by weight desc, then vocabulary index
        out.append([(vocab[int(idx[k])], float(val[k])) for k in order if val[k] > 0])
    return out
