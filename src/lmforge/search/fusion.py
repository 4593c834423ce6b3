"""Rank fusion and hit grouping, as pure functions."""
from __future__ import annotations

from typing import Hashable, Sequence


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], weights: Sequence[float] | None = None,
                           k: int = 60) -> list[tuple[Hashable, float]]:
    """Weighted reciprocal rank fusion (Cormack, Clarke & Buettcher 2009).

    ``RRF(d) = sum_i w_i / (k + r_i(d))`` over the rankings ``i`` that contain ``d``, with
    ``r_i(d)`` its 1-based rank in ranking ``i``; documents missing from a ranking get nothing
    from it.

    Args:
        rankings: ranked ids per retriever, best first.
        weights: one weight per ranking (default all 1).
        k: the smoothing constant (60 in the paper).

    Returns:
        ``(id, fused score)`` best first; ties by first appearance (ranking order, then rank).
    """
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    fused: dict[Hashable, float] = {}
    for ranking, w in zip(rankings, weights):
        for r, d in enumerate(ranking, start=1):
            fused[d] = fused.get(d, 0.0) + float(w) / (k + r)
    order = {d: i for i, d in enumerate(fused)}
    return sorted(fused.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def first_per_group(ids: Sequence[int], scores: Sequence[float], group_of: Sequence[Hashable],
                    k: int) -> list[tuple[Hashable, float]]:
    """Collapse a ranked chunk list into ranked groups (documents): each group scored by its best
    chunk (max pooling), in the order of first appearance; the first ``k`` groups."""
    out: list[tuple[Hashable, float]] = []
    seen: set = set()
    for i, s in zip(ids, scores):
        g = group_of[int(i)]
        if g not in seen:
            seen.add(g)
            out.append((g, float(s)))
            if len(out) == k:
                break
    return out
