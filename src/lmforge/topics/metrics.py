"""Topic-model measurements: NPMI coherence, diversity, stability, outlier rate, silhouette."""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import scipy.sparse as sp

EPSILON = 1e-12  # gensim's, so that a pair that never co-occurs scores about -1


def _windows(tokens: Sequence[int], size: int | None) -> list[np.ndarray]:
    """Boolean windows (gensim's ``iter_windows`` with ``ignore_below_size=False``): a document
    shorter than ``size`` (or ``size=None``) is one window; else every run of ``size`` tokens."""
    t = np.asarray(tokens, dtype=np.int64)
    if size is None or len(t) <= size:
        return [t]
    return [t[s:s + size] for s in range(len(t) - size + 1)]


def npmi_coherence(topics: Sequence[Sequence[str]], documents: Sequence[Sequence[str]],
                   window_size: int | None = None) -> list[float]:
    """Normalised PMI per topic (Bouma 2009; gensim's ``c_npmi``), from the corpus's own tokens.

    Each window (a whole document when ``window_size`` is None, else every ``window_size``-token
    span, gensim's boolean sliding window) is one observation; with ``N`` windows,
    ``P(w) = #windows with w / N`` and ``P(w, v) = #windows with both / N``::

        npmi(w, v) = log((P(w, v) + eps) / (P(w) P(v))) / -log(P(w, v) + eps)

    A topic's coherence is the mean over its unordered word pairs (gensim averages ordered pairs,
    the same number since npmi is symmetric). Pairs with a word absent from the corpus are skipped.
    Windows are counted exactly; gensim's incremental window clears a word leaving the window even
    when it occurs again inside it, so the two agree on windows only when no word repeats within one.

    Args:
        topics: the top words of each topic.
        documents: tokenised documents (tokens in order; order matters only for windows).
        window_size: sliding-window length, or None for document co-occurrence.

    Returns:
        ``(T,)`` coherences (nan for a topic with no countable pair).
    """
    words = sorted({w for t in topics for w in t})
    col = {w: i for i, w in enumerate(words)}
    occ = np.zeros(len(words))  # (R,)
    co = np.zeros((len(words), len(words)))  # (R, R)
    n_windows = 0
    for doc in documents:
        ids = [col.get(w, -1) for w in doc]
        for win in _windows(ids, window_size):
            n_windows += 1
            present = np.unique(win[win >= 0])
            if len(present):
                occ[present] += 1
                co[np.ix_(present, present)] += 1
    return _npmi_from_counts(topics, col, occ, co, n_windows)


def npmi_from_doc_term(topics: Sequence[Sequence[str]], doc_term: sp.spmatrix, vocab: Sequence[str]) -> list[float]:
    """:func:`npmi_coherence` with document windows, from a ``(N, V)`` doc-term count matrix (fast path)."""
    index = {w: i for i, w in enumerate(vocab)}
    words = sorted({w for t in topics for w in t if w in index})
    col = {w: i for i, w in enumerate(words)}
    x = sp.csc_matrix(doc_term)[:, [index[w] for w in words]]  # (N, R)
    x = (x > 0).astype(np.float64)
    occ = np.asarray(x.sum(axis=0)).ravel()
    co = (x.T @ x).toarray()
    return _npmi_from_counts(topics, col, occ, co, doc_term.shape[0])


def _npmi_from_counts(topics, col, occ, co, n) -> list[float]:
    out = []
    for t in topics:
        vals = []
        for a, b in combinations([w for w in dict.fromkeys(t)], 2):
            i, j = col.get(a), col.get(b)
            if i is None or j is None or occ[i] == 0 or occ[j] == 0:
                continue
            p_ij = co[i, j] / n
            pmi = np.log((p_ij + EPSILON) / ((occ[i] / n) * (occ[j] / n)))
            vals.append(pmi / -np.log(p_ij + EPSILON))
        out.append(float(np.mean(vals)) if vals else float("nan"))
    return out


def topic_diversity(topics: Sequence[Sequence[str]], top_n: int = 25) -> float:
    """Share of unique words among the top ``top_n`` words of all topics (Dieng et al. 2020), in [0, 1]."""
    tops = [list(t)[:top_n] for t in topics]
    total = sum(len(t) for t in tops)
    return len({w for t in tops for w in t}) / total if total else float("nan")


def outlier_rate(assignments: Sequence[int]) -> float:
    """Fraction of documents in topic -1."""
    a = np.asarray(assignments)
    return float((a == -1).mean()) if len(a) else float("nan")


def stability(runs: Sequence[Sequence[int]]) -> dict[str, float]:
    """Agreement between the assignments of several seeds: mean (and min) adjusted Rand index and
    normalised mutual information over all pairs of runs (outliers count as one label)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    pairs = list(combinations(range(len(runs)), 2))
    if not pairs:
        return {}
    ari = [adjusted_rand_score(runs[i], runs[j]) for i, j in pairs]
    nmi = [normalized_mutual_info_score(runs[i], runs[j]) for i, j in pairs]
    return {"seeds": len(runs), "ari_mean": float(np.mean(ari)), "ari_min": float(np.min(ari)),
            "nmi_mean": float(np.mean(nmi)), "nmi_min": float(np.min(nmi))}


def silhouette(reduced: np.ndarray, assignments: Sequence[int], max_points: int = 10000, seed: int = 0) -> float:
    """Silhouette of the clustered (non-outlier) points in the reduced space (seeded sample above
    ``max_points``); nan with fewer than two clusters."""
    from sklearn.metrics import silhouette_score

    a = np.asarray(assignments)
    keep = np.flatnonzero(a != -1)
    if len(np.unique(a[keep])) < 2 or len(keep) < 3:
        return float("nan")
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
    return float(silhouette_score(reduced[keep], a[keep]))
