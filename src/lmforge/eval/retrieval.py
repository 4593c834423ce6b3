"""Retrieval metrics (MRR, nDCG, MAP, recall, precision) and chunked cosine top-k.

Conventions (those of trec_eval / BEIR):

- A document is relevant when its judged grade is > 0; unjudged documents have grade 0.
- Queries with no relevant document are left out of every average (their nDCG and
  recall are undefined); the report says how many were scored and skipped.
- Ties in a score matrix are broken by document index (lower index ranks first).
- Metrics are per-query values averaged over the scored queries, in [0, 1].
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from lmforge.errors import LmforgeError

__all__ = ["rank_topk", "retrieval_report"]

Judgements = Iterable[Hashable] | Mapping[Hashable, float]


def _grades(judged: Judgements) -> dict[Hashable, float]:
    """``{doc: grade}`` for the relevant (grade > 0) documents of one query."""
    if isinstance(judged, Mapping):
        return {d: float(g) for d, g in judged.items() if float(g) > 0}
    return {d: 1.0 for d in judged}


def _align_judgements(relevant: Any, qids: list[Hashable]) -> list[dict[Hashable, float]]:
    """Per query (in ``qids`` order), its relevant documents with their grades."""
    if isinstance(relevant, Mapping):
        if relevant and not any(q in relevant for q in qids):
            raise LmforgeError(
                "relevant's keys match no query (keys must be row indices, or pass the "
                "rankings as a mapping qid -> ranked ids)"
            )
        return [_grades(relevant.get(q, ())) for q in qids]
    relevant = list(relevant)
    if len(relevant) != len(qids):
        raise LmforgeError(
            f"relevant has {len(relevant)} queries but the ranking has {len(qids)}"
        )
    return [_grades(r) for r in relevant]


def _ranks_from_scores(scores: np.ndarray, grades: list[dict]) -> list[np.ndarray]:
    """1-based rank of each judged relevant doc per query, from a (Q, N) score matrix."""
    q, n = scores.shape
    if np.isnan(scores).any():
        raise LmforgeError("scores contain NaN")
    order = np.argsort(-scores, axis=1, kind="stable")  # (Q, N) best first, ties by index
    pos = np.empty_like(order)  # (Q, N) pos[q, d] = 0-based rank of doc d
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(n), (q, n)), axis=1)
    out = []
    for qi, g in enumerate(grades):
        docs = list(g)
        for d in docs:
            if not (isinstance(d, (int, np.integer)) and 0 <= d < n):
                raise LmforgeError(
                    f"query {qi}: judged doc {d!r} is not a column index in [0, {n})"
                )
        out.append((pos[qi, docs] + 1).astype(np.float64) if docs else np.zeros(0))
    return out


def _ranks_from_lists(rankings: list[Sequence[Hashable]], grades: list[dict]) -> list[np.ndarray]:
    """1-based rank of each judged relevant doc per query (inf if not retrieved)."""
    out = []
    for qi, (ranked, g) in enumerate(zip(rankings, grades)):
        if isinstance(ranked, np.ndarray):
            ranked = ranked.tolist()
        elif isinstance(ranked, (str, bytes)) or not isinstance(ranked, Iterable):
            raise LmforgeError(
                f"query {qi}: expected a list of ranked doc ids, got {type(ranked).__name__}"
            )
        ranked = list(ranked)
        where = {d: i + 1 for i, d in enumerate(ranked)}
        if len(where) != len(ranked):
            raise LmforgeError(f"query {qi}: the ranked list contains a document twice")
        out.append(np.array([where.get(d, np.inf) for d in g], dtype=np.float64))
    return out


def retrieval_report(
    scores_or_rankings: Any,
    relevant: Sequence[Judgements] | Mapping[Hashable, Judgements],
    ks: Sequence[int] = (1, 3, 5, 10, 100),
    *,
    kind: Literal["auto", "scores", "rankings"] = "auto",
) -> dict:
    """MRR@k, nDCG@k, recall@k, precision@k and MAP for a set of queries.

    With ``r_j`` the 1-based rank of relevant doc ``j``, ``g_j`` its grade, ``R`` the
    relevant set of the query and ``[.]`` the indicator:

    - ``mrr@k = 1 / min_j r_j`` if that rank is <= k, else 0.
    - ``ndcg@k = DCG@k / IDCG@k`` with ``DCG@k = sum_{r_j <= k} g_j / log2(r_j + 1)``
      (linear gain, as trec_eval and scikit-learn) and ``IDCG@k`` the DCG of the
      judgements sorted by grade, i.e. computed from the qrels, not from the ranking.
    - ``recall@k = |{j: r_j <= k}| / |R|``; ``precision@k = |{j: r_j <= k}| / k``.
    - ``map`` is MAP over the whole ranking given (not truncated at any k):
      ``AP = (1/|R|) sum_{j retrieved} |{i: r_i <= r_j}| / r_j``; relevant docs
      never retrieved add 0. Pass only the top-k lists (e.g. from ``rank_topk``)
      and it becomes MAP@k with the ``|R|`` denominator.

    Args:
        scores_or_rankings: either a (Q, N) float score matrix (higher = better;
            columns are document ids ``0..N-1``; ties ranked by column index), or
            ranked document ids per query, best first: a sequence of sequences, an
            integer (Q, L) array, or a mapping ``qid -> ranked ids``.
        relevant: per query, a set/list of relevant doc ids (grade 1) or a mapping
            ``doc_id -> grade``; either a sequence aligned with the queries or a
            mapping ``qid -> judgements`` (keys are row indices unless
            ``scores_or_rankings`` is itself a mapping). Missing queries have no
            judgements and are skipped.
        ks: cut-offs for the @k metrics.
        kind: "auto" treats a floating-point array (or tensor) as scores and
            anything else as rankings; force it for integer score matrices.

    Returns:
        A flat dict of floats: ``"mrr@k"``, ``"ndcg@k"``, ``"recall@k"``,
        ``"precision@k"`` for every k and ``"map"``; plus ints ``"n_queries"``
        (scored) and ``"n_skipped"`` (queries without a relevant doc).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise LmforgeError(f"ks must be positive integers, got {ks}")
    if hasattr(scores_or_rankings, "detach"):  # torch tensor
        scores_or_rankings = scores_or_rankings.detach().cpu()
        if scores_or_rankings.is_floating_point():
            scores_or_rankings = scores_or_rankings.float()
        scores_or_rankings = scores_or_rankings.numpy()
    if kind == "auto":
        is_scores = isinstance(scores_or_rankings, np.ndarray) and np.issubdtype(
            scores_or_rankings.dtype, np.floating
        )
    elif kind in ("scores", "rankings"):
        is_scores = kind == "scores"
    else:
        raise LmforgeError(f"kind must be 'auto', 'scores' or 'rankings', got {kind!r}")

    if isinstance(scores_or_rankings, Mapping):
        if is_scores:
            raise LmforgeError("scores must be a (Q, N) array, not a mapping")
        qids = list(scores_or_rankings)
        rankings = [scores_or_rankings[q] for q in qids]
    elif is_scores:
        scores = np.asarray(scores_or_rankings)
        if not np.issubdtype(scores.dtype, np.floating):
            scores = scores.astype(np.float64)
        if scores.ndim != 2:
            raise LmforgeError(f"scores must be a (Q, N) matrix, got shape {scores.shape}")
        qids = list(range(scores.shape[0]))
    else:
        rankings = list(scores_or_rankings)
        qids = list(range(len(rankings)))
    grades = _align_judgements(relevant, qids)
    ranks = _ranks_from_scores(scores, grades) if is_scores else _ranks_from_lists(rankings, grades)

    keep = [i for i, g in enumerate(grades) if g]
    if not keep:
        raise LmforgeError("no query has a relevant document: nothing to evaluate")
    q, m = len(keep), max(len(grades[i]) for i in keep)
    rank = np.full((q, m), np.inf)  # (Q, M) rank of each relevant doc, inf = not retrieved
    gain = np.zeros((q, m))  # (Q, M) its grade, 0 for padding
    for row, i in enumerate(keep):
        rank[row, : len(ranks[i])] = ranks[i]
        gain[row, : len(ranks[i])] = list(grades[i].values())
    n_rel = (gain > 0).sum(axis=1)  # (Q,)

    with np.errstate(divide="ignore"):
        disc = np.where(np.isfinite(rank), 1.0 / np.log2(rank + 1.0), 0.0)  # (Q, M)
    ideal = -np.sort(-gain, axis=1)  # (Q, M) grades, best first
    ideal_disc = 1.0 / np.log2(np.arange(2, m + 2))  # (M,) discount at ranks 1..M
    first = rank.min(axis=1)  # (Q,) rank of the first relevant doc

    out: dict[str, float | int] = {}
    for k in ks:
        hit = rank <= k  # (Q, M)
        n_hit = hit.sum(axis=1)  # (Q,)
        dcg = (gain * disc * hit).sum(axis=1)  # (Q,)
        idcg = (ideal[:, :k] * ideal_disc[:k]).sum(axis=1)  # (Q,) > 0: every kept q has a judgement
        out[f"mrr@{k}"] = float(np.mean(np.where(first <= k, 1.0 / first, 0.0)))
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg))
        out[f"recall@{k}"] = float(np.mean(n_hit / n_rel))
        out[f"precision@{k}"] = float(np.mean(n_hit / k))

    sorted_rank = np.sort(rank, axis=1)  # (Q, M) ascending, inf last
    prec_at_hit = np.arange(1, m + 1) / sorted_rank  # (Q, M) precision at each hit, 0 if inf
    out["map"] = float(np.mean(prec_at_hit.sum(axis=1) / n_rel))
    out["n_queries"] = q
    out["n_skipped"] = len(qids) - q
    return out


def rank_topk(
    query_emb: Any, corpus_emb: Any, k: int, batch: int = 1024, *, corpus_batch: int = 8192
) -> tuple:
    """Top-k corpus documents per query by cosine similarity, without a full Q x N matrix.

    ``cos(q, d) = q . d / (|q| |d|)``. Queries are processed in blocks of ``batch``
    rows and the corpus in blocks of ``corpus_batch`` rows; each query block keeps a
    running top-k while it scans the corpus, so memory is
    O(batch * (corpus_batch + k)) rather than O(Q * N). Ties are
    broken by document index (lower first), matching ``retrieval_report``. Runs on
    the device the query tensor is on (numpy input runs on CPU), in fp32.

    Args:
        query_emb: (Q, D) numpy array or torch tensor.
        corpus_emb: (N, D) numpy array or torch tensor.
        k: documents to keep per query (clipped to N).
        batch: queries per block.
        corpus_batch: corpus rows per block (larger blocks amortise the per-block
            top-k merge; 8192 x 1024 fp32 similarities are 32 MiB).

    Returns:
        ``(scores, indices)``: (Q, k') float32 cosine similarities, best first, and
        (Q, k') int64 corpus row indices, as numpy arrays, with ``k' = min(k, N)``.
    """
    import torch
    import torch.nn.functional as F

    qe, ce = (
        x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        for x in (query_emb, corpus_emb)
    )
    if qe.ndim != 2 or ce.ndim != 2 or qe.shape[1] != ce.shape[1]:
        raise LmforgeError(
            f"expected (Q, D) queries and (N, D) corpus, "
            f"got {tuple(qe.shape)} and {tuple(ce.shape)}"
        )
    if k < 1 or batch < 1 or corpus_batch < 1:
        raise LmforgeError(
            f"k, batch and corpus_batch must be >= 1, got {k}, {batch}, {corpus_batch}"
        )
    n = ce.shape[0]
    k = min(int(k), n)
    device = qe.device
    all_scores, all_idx = [], []
    with torch.no_grad():
        for qs in range(0, qe.shape[0], batch):
            qb = F.normalize(qe[qs : qs + batch].float(), dim=1)  # (Bq, D)
            best_s = qb.new_empty((qb.shape[0], 0))  # (Bq, <=k) running top-k scores
            best_i = torch.empty((qb.shape[0], 0), dtype=torch.long, device=device)
            for cs in range(0, n, corpus_batch):
                cb = F.normalize(ce[cs : cs + corpus_batch].to(device).float(), dim=1)  # (Bc, D)
                sims = qb @ cb.T  # (Bq, Bc)
                s, i = _block_topk(sims, k)  # (Bq, kk), kk = min(k, Bc)
                cat_s = torch.cat([best_s, s], dim=1)  # (Bq, <=k + kk)
                cat_i = torch.cat([best_i, i + cs], dim=1)
                best_s, best_i = _order_by_score_then_index(cat_s, cat_i, k)
            all_scores.append(best_s.cpu())
            all_idx.append(best_i.cpu())
    if not all_scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(all_scores).numpy(), torch.cat(all_idx).numpy()


def _block_topk(x: Any, k: int) -> tuple:
    """Top-k candidates of each row of ``x`` (B, M), ties at the k-th place kept by index.

    ``torch.topk`` picks arbitrarily among equal values; it is asked for k + 1 values
    so that a tie across the cut (k-th == (k+1)-th) is detected, and only those rare
    rows are redone with a full stable sort (lowest column indices win). The order
    inside the returned k is not guaranteed; ``_order_by_score_then_index`` fixes it.
    """
    import torch

    m = x.shape[1]
    kk = min(k, m)
    vals, idx = torch.topk(x, min(kk + 1, m), dim=1)  # (B, kk [+1]) sorted descending
    if kk < m:
        straddle = vals[:, kk - 1] == vals[:, kk]  # (B,)
        vals, idx = vals[:, :kk], idx[:, :kk]
        if straddle.any():
            rows = straddle.nonzero().squeeze(1)
            v, i = torch.sort(x[rows], dim=1, descending=True, stable=True)
            vals[rows], idx[rows] = v[:, :kk], i[:, :kk]
    return vals, idx


def _order_by_score_then_index(vals: Any, idx: Any, k: int) -> tuple:
    """First k of each row of (B, L) candidates ordered by (score desc, index asc).

    A plain sort is enough unless a row has equal scores among its first k + 1
    entries; those rows are re-sorted by index and then stably by score.
    """
    import torch

    vals, order = torch.sort(vals, dim=1, descending=True)  # (B, L)
    idx = idx.gather(1, order)
    head = vals[:, : k + 1]  # (B, <=k+1)
    tied = (head[:, 1:] == head[:, :-1]).any(dim=1)  # (B,)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        i, perm = idx[rows].sort(dim=1)  # index ascending ...
        v, perm2 = vals[rows].gather(1, perm).sort(dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = v, i.gather(1, perm2)  # ... then score descending
    return vals[:, :k], idx[:, :k]
