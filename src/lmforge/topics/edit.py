"""What users do to a fitted topic model: merge topics, reduce to N, reduce outliers to a target
rate, the topic hierarchy and topics over time. Pure functions on assignments and matrices; the
caller re-describes the topics afterwards (:func:`lmforge.topics.pipeline.describe`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import LmforgeError
from .cluster import renumber
from .represent import _unit


def merge_topics(assignments: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Merge each group of topic ids into one topic, then renumber by size (largest = 0).

    Raises :class:`LmforgeError` for unknown ids, -1, or an id in two groups.
    """
    a = np.asarray(assignments, dtype=np.int64).copy()
    have = set(np.unique(a).tolist())
    seen: set[int] = set()
    for g in groups:
        g = [int(x) for x in g]
        bad = [x for x in g if x not in have or x == -1]
        if bad:
            raise LmforgeError(f"merge: unknown topic id(s) {bad} (topics: {sorted(have - {-1})})")
        if seen & set(g):
            raise LmforgeError(f"merge: topic(s) {sorted(seen & set(g))} listed in two groups")
        seen |= set(g)
        if len(g) < 2:
            raise LmforgeError(f"merge: a group needs at least two topics, got {g}")
        a[np.isin(a, g)] = min(g)
    return renumber(a)


def topic_linkage(ctfidf: sp.spmatrix, topic_ids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Average-linkage clustering of the real topics on cosine distance of their c-TF-IDF rows.

    Returns:
        ``(Z, ids)``: scipy's ``(K-1, 4)`` linkage matrix and the topic ids of its leaves.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    rows = [r for r, t in enumerate(topic_ids) if t != -1]
    ids = [int(topic_ids[r]) for r in rows]
    if len(rows) < 2:
        return np.zeros((0, 4)), ids
    x = _unit(sp.csr_matrix(ctfidf)[rows].toarray())
    d = np.clip(pdist(x, metric="cosine"), 0.0, 2.0)
    return linkage(d, method="average"), ids


def hierarchy(ctfidf: sp.spmatrix, topic_ids: Sequence[int]) -> list[dict]:
    """Which topics merge first: one entry per merge of :func:`topic_linkage`, closest first, with
    the topic ids on each side and the cosine distance."""
    z, ids = topic_linkage(ctfidf, topic_ids)
    members: dict[int, list[int]] = {i: [t] for i, t in enumerate(ids)}
    out = []
    for k, (i, j, dist, _) in enumerate(z):
        left, right = members[int(i)], members[int(j)]
        members[len(ids) + k] = left + right
        out.append({"merge": k, "left": sorted(left), "right": sorted(right), "distance": float(dist)})
    return out


def reduce_to_n(assignments: np.ndarray, ctfidf: sp.spmatrix, topic_ids: Sequence[int], n: int) -> np.ndarray:
    """Merge the most similar topics (the hierarchy's first ``K - n`` merges) until ``n`` remain."""
    if n < 1:
        raise LmforgeError(f"reduce: the number of topics must be >= 1, got {n}")
    z, ids = topic_linkage(ctfidf, topic_ids)
    if n >= len(ids):
        return renumber(assignments)
    members: dict[int, list[int]] = {i: [t] for i, t in enumerate(ids)}
    for k in range(len(ids) - n):
        members[len(ids) + k] = members.pop(int(z[k, 0])) + members.pop(int(z[k, 1]))
    return merge_topics(assignments, [g for g in members.values() if len(g) > 1])


def reduce_outliers(assignments: np.ndarray, embeddings: np.ndarray, topic_embeddings: np.ndarray,
                    topic_ids: Sequence[int], target_rate: float) -> np.ndarray:
    """Reassign outliers to their nearest topic (cosine to the topic embedding), most confident
    first, until at most ``floor(target_rate * N)`` outliers remain.

    Args:
        assignments: ``(N,)``; embeddings: ``(N, D)``; topic_embeddings: ``(T, D)`` in ``topic_ids`` order.
        target_rate: wanted outlier rate in [0, 1).

    Returns:
        new ``(N,)`` assignments (topic ids unchanged; the caller re-describes and may renumber).
    """
    if not 0.0 <= target_rate < 1.0:
        raise LmforgeError(f"outlier target rate must be in [0, 1), got {target_rate}")
    a = np.asarray(assignments, dtype=np.int64).copy()
    out = np.flatnonzero(a == -1)
    keep = int(np.floor(target_rate * len(a)))
    move = len(out) - keep
    rows = [r for r, t in enumerate(topic_ids) if t != -1]
    if move <= 0 or not rows:
        return a
    sims = _unit(embeddings[out]) @ _unit(np.asarray(topic_embeddings)[rows]).T  # (|out|, K)
    best = sims.argmax(axis=1)
    conf = sims[np.arange(len(out)), best]
    order = np.lexsort((out, -conf))[:move]
    a[out[order]] = np.asarray([topic_ids[r] for r in rows], dtype=np.int64)[best[order]]
    return a


def parse_timestamps(values: Sequence, where: Sequence[str]) -> np.ndarray:
    """Timestamps (ISO strings, dates, or epoch seconds) -> ``datetime64[s]``; the first value that
    does not parse is one error naming its record."""
    import pandas as pd

    out = np.empty(len(values), dtype="datetime64[s]")
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool) or v is None or (isinstance(v, str) and not v.strip()):
                raise ValueError
            ts = pd.to_datetime(v, unit="s") if isinstance(v, (int, float)) else pd.to_datetime(v)
            if pd.isna(ts):
                raise ValueError
            out[i] = np.datetime64(ts.tz_localize(None) if ts.tzinfo else ts, "s")
        except (ValueError, TypeError, OverflowError, pd.errors.OutOfBoundsDatetime):
            raise LmforgeError(f"{where[i]}: timestamp {v!r:.40} does not parse as a date") from None
    return out


def topics_over_time(assignments: np.ndarray, timestamps: np.ndarray, doc_term: sp.spmatrix, idf: np.ndarray,
                     vocab: Sequence[str], bins: int = 10, top_n: int = 5) -> list[dict]:
    """Per equal-width time bin and topic: document count and top words by c-TF-IDF of that bin's
    documents with the global idf (BERTopic's topics over time).

    Returns:
        rows ``{"start", "end", "topic", "count", "words"}`` (ISO dates), bins in time order.
    """
    from .ctfidf import c_tf_idf, class_counts, top_words

    ts = np.asarray(timestamps, dtype="datetime64[s]").astype(np.int64)
    lo, hi = int(ts.min()), int(ts.max())
    bins = max(1, min(bins, len(np.unique(ts))))
    edges = np.linspace(lo, hi + 1, bins + 1)
    which = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, bins - 1)
    a = np.asarray(assignments)
    rows = []
    for b in range(bins):
        idx = np.flatnonzero(which == b)
        if len(idx) == 0:
            continue
        ids = sorted(set(a[idx].tolist()))
        w, _ = c_tf_idf(class_counts(doc_term[idx], a[idx], ids), idf)
        words = top_words(w, vocab, top_n)
        start, end = (np.datetime64(int(edges[b]), "s"), np.datetime64(int(edges[b + 1]), "s"))
        for t, ws in zip(ids, words):
            rows.append({"start": str(start), "end": str(end), "topic": int(t),
                         "count": int((a[idx] == t).sum()), "words": [x for x, _ in ws]})
    return rows
