"""Embedding evaluators: pure metric functions plus evaluator objects with a primary metric.

An evaluator names the texts it needs and turns their embeddings into metrics;
:func:`run_evaluators` embeds the union of all texts once per round (so an STS set used for
correlation and for alignment/uniformity is encoded once) and returns one flat dict with a
``primary`` entry (the first evaluator's primary metric), ready for the engine's logs,
best-checkpoint tracking and ``eval.json``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch

from ..errors import LmforgeError

UNIFORMITY_SAMPLE = 5000


# ---- pure functions ---------------------------------------------------------------------------
def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity ``cos(a_i, b_i) = a_i . b_i / (|a_i| |b_i|)``.

    Args:
        a, b: ``(N, D)`` embeddings.

    Returns:
        ``(N,)`` float64 similarities.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)  # (N, D)
    den = np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-12)  # (N,)
    return (a64 * b64).sum(1) / den


def sts_metrics(emb1: np.ndarray, emb2: np.ndarray, gold: Sequence[float]) -> dict:
    """Spearman and Pearson correlation of pair cosines against gold scores.

    Args:
        emb1, emb2: ``(N, D)`` embeddings of the two sides of each pair.
        gold: ``(N,)`` gold similarity scores.

    Returns:
        ``{"spearman", "pearson", "n"}`` (see :func:`lmforge.eval.sts_report`).
    """
    from ..eval.metrics import sts_report

    return sts_report(cosine_pairs(emb1, emb2), list(gold))


def alignment_uniformity(x: np.ndarray | None, y: np.ndarray | None, sample: np.ndarray | None) -> dict:
    """Wang & Isola's alignment ``E ||f(x) - f(y)||^2`` over positive pairs and uniformity
    ``log E exp(-2 ||f(u) - f(v)||^2)`` over all pairs of ``sample`` (both on unit vectors).

    Args:
        x, y: ``(P, D)`` embeddings of positive pairs (or None to skip alignment).
        sample: ``(N, D)`` embeddings for uniformity (or None to skip it).

    Returns:
        ``{"alignment", "uniformity"}`` for the parts computed.
    """
    from ..losses.contrastive import alignment, uniformity

    out = {}
    if x is not None and len(x):
        out["alignment"] = float(alignment(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y))))
    if sample is not None and len(sample) >= 2:
        out["uniformity"] = float(uniformity(torch.from_numpy(np.asarray(sample))))
    return out


# ---- evaluator objects ------------------------------------------------------------------------
class Evaluator:
    """Texts in, metrics out. ``primary`` names the metric that summarises the evaluator."""

    name: str = "eval"
    primary: str = ""
    greater_is_better: bool = True

    def texts(self) -> list[str]:
        raise NotImplementedError

    def compute(self, emb: Mapping[str, np.ndarray]) -> dict:
        """Metrics from ``{text: (D,) embedding}`` (keys prefixed with the evaluator's name)."""
        raise NotImplementedError

    def __call__(self, encoder, **encode_kw) -> dict:
        return run_evaluators([self], encoder, **encode_kw)


def _stack(emb: Mapping[str, np.ndarray], texts: Sequence[str]) -> np.ndarray:
    return np.stack([emb[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)


def _sample(texts: list[str], n: int) -> list[str]:
    return texts if len(texts) <= n else random.Random(0).sample(texts, n)


class STSEvaluator(Evaluator):
    """Spearman/Pearson of cosine vs gold scores; alignment over pairs scored above
    ``positive_above`` (SimCSE: STS-B pairs > 4 of 5) and uniformity over all sentences.

    Scores are given normalised to [0, 1]; ``positive_above`` is on that scale (0.8 = 4 of 5).
    """

    def __init__(self, s1: Sequence[str], s2: Sequence[str], scores: Sequence[float], *, name: str = "sts",
                 positive_above: float = 0.8):
        if not (len(s1) == len(s2) == len(scores)) or len(s1) < 2:
            raise LmforgeError(f"{name}: an STS evaluation needs at least two scored pairs")
        self.s1, self.s2, self.scores = list(s1), list(s2), [float(s) for s in scores]
        self.name, self.primary = name, f"{name}_spearman"
        self.positive_above = positive_above

    def texts(self) -> list[str]:
        return self.s1 + self.s2

    def compute(self, emb) -> dict:
        e1, e2 = _stack(emb, self.s1), _stack(emb, self.s2)  # (N, D)
        rep = sts_metrics(e1, e2, self.scores)
        pos = [i for i, s in enumerate(self.scores) if s > self.positive_above]
        uniq = _sample(sorted(set(self.s1) | set(self.s2)), UNIFORMITY_SAMPLE)
        au = alignment_uniformity(e1[pos] if pos else None, e2[pos] if pos else None, _stack(emb, uniq))
        out = {f"{self.name}_{k}": v for k, v in (rep | au).items()}
        # the points behind the correlation (the run report draws predicted vs gold); not a logged scalar
        out[f"{self.name}_scatter"] = {"pred": [round(float(c), 5) for c in cosine_pairs(e1, e2)],
                                       "gold": [round(s, 5) for s in self.scores]}
        return out


class AlignUniformEvaluator(Evaluator):
    """Alignment of positive pairs and uniformity of their texts (lower is better for both)."""

    greater_is_better = False

    def __init__(self, x: Sequence[str], y: Sequence[str], *, name: str = "dev"):
        self.x, self.y = list(x), list(y)
        self.name, self.primary = name, f"{name}_uniformity"

    def texts(self) -> list[str]:
        return self.x + self.y

    def compute(self, emb) -> dict:
        uniq = _sample(sorted(set(self.x) | set(self.y)), UNIFORMITY_SAMPLE)
        au = alignment_uniformity(_stack(emb, self.x) if self.y else None,
                                  _stack(emb, self.y) if self.y else None, _stack(emb, uniq))
        return {f"{self.name}_{k}": v for k, v in au.items()}


class RetrievalEvaluator(Evaluator):
    """MRR@k, nDCG@k, recall@k, precision@k and MAP@max(k) of cosine ranking.

    Args:
        queries: query texts.
        corpus: document texts (column ids are their positions).
        relevant: per query, relevant document positions (set) or ``{position: grade}``.
    """

    def __init__(self, queries: Sequence[str], corpus: Sequence[str], relevant: Sequence, *,
                 name: str = "ir", ks: Sequence[int] = (1, 3, 10, 100)):
        if not queries or not corpus or len(relevant) != len(queries):
            raise LmforgeError(f"{name}: retrieval needs queries, a corpus and judgements for every query")
        self.queries, self.corpus, self.relevant = list(queries), list(corpus), list(relevant)
        self.ks = sorted({int(k) for k in ks})
        self.name = name
        self.primary = f"{name}_ndcg@{10 if 10 in self.ks else self.ks[-1]}"

    def texts(self) -> list[str]:
        return self.queries + self.corpus

    def compute(self, emb) -> dict:
        from ..eval.retrieval import rank_topk, retrieval_report

        q, c = _stack(emb, self.queries), _stack(emb, self.corpus)  # (Q, D), (N, D)
        _, idx = rank_topk(q, c, self.ks[-1])  # (Q, k)
        rep = retrieval_report(idx.tolist(), self.relevant, self.ks, kind="rankings")
        rep[f"map@{self.ks[-1]}"] = rep.pop("map")
        return {f"{self.name}_{k}": v for k, v in rep.items()}


class NLIAccuracyEvaluator(Evaluator):
    """Accuracy of the softmax-NLI head on (u, v, |u - v|) of the evaluation pairs."""

    def __init__(self, s1: Sequence[str], s2: Sequence[str], labels: Sequence[int], head, name: str = "dev"):
        self.s1, self.s2, self.labels, self.head = list(s1), list(s2), list(labels), head
        self.name, self.primary = name, f"{name}_accuracy"

    def texts(self) -> list[str]:
        return self.s1 + self.s2

    def compute(self, emb) -> dict:
        from ..losses.contrastive import softmax_nli_logits

        u = torch.from_numpy(np.stack([emb[t] for t in self.s1]))  # (N, D)
        v = torch.from_numpy(np.stack([emb[t] for t in self.s2]))  # (N, D)
        w = self.head.weight.detach().float().cpu()
        b = self.head.bias.detach().float().cpu() if self.head.bias is not None else None
        pred = softmax_nli_logits(u, v, w, b).argmax(-1)  # (N,)
        return {f"{self.name}_accuracy": float((pred == torch.as_tensor(self.labels)).float().mean())}


def run_evaluators(evaluators: Sequence[Evaluator], encoder, *, batch_size: int = 64, placement=None,
                   progress: bool = False) -> dict:
    """Embed every evaluator's texts once, run them all, and add ``primary``.

    Returns:
        Flat metrics (floats/ints) plus ``primary`` (the first evaluator's primary value) and
        ``primary_metric`` (its name).
    """
    if not evaluators:
        return {}
    uniq = list(dict.fromkeys(t for ev in evaluators for t in ev.texts()))
    vecs = encoder.encode(uniq, batch_size=batch_size, placement=placement, progress=progress)  # (U, D)
    emb = dict(zip(uniq, vecs))
    out: dict = {}
    for ev in evaluators:
        out |= ev.compute(emb)
    first = evaluators[0]
    out["primary"] = out.get(first.primary)
    out["primary_metric"] = first.primary
    return out


# ---- reading evaluation files -------------------------------------------------------------------
def normalised_scores(table, column: str, score_range: Sequence[float]) -> list[float]:
    """Gold scores mapped from ``score_range`` to [0, 1]; missing, non-numeric or out-of-range
    scores are an error naming the row."""
    lo, hi = float(score_range[0]), float(score_range[1])
    if not hi > lo:
        raise LmforgeError(f"score range [{lo}, {hi}] is empty")
    out = []
    for i, rec in enumerate(table.records):
        v = rec.get(column)
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if v is None:
            raise LmforgeError(f"{table.where(i)}: missing score '{column}'")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise LmforgeError(f"{table.where(i)}: score '{column}' must be a number, got {v!r:.40}")
        if not lo <= v <= hi:
            raise LmforgeError(f"{table.where(i)}: score {v} is outside the declared range [{lo:g}, {hi:g}]")
        out.append((float(v) - lo) / (hi - lo))
    return out


def sts_from_file(path: str, *, name: str = "sts", score_range: Sequence[float] = (0.0, 5.0),
                  columns: Mapping[str, str] | None = None) -> STSEvaluator:
    """An :class:`STSEvaluator` from a file with ``sentence1``, ``sentence2``, ``score`` columns."""
    from ..data import read_table
    from ..data.schema import require_columns, text_values

    cols = {"sentence1": "sentence1", "sentence2": "sentence2", "score": "score"} | dict(columns or {})
    table = read_table(path)
    require_columns(table, [cols["sentence1"], cols["sentence2"], cols["score"]])
    return STSEvaluator(text_values(table, cols["sentence1"]), text_values(table, cols["sentence2"]),
                        normalised_scores(table, cols["score"], score_range), name=name)


def retrieval_from_pairs(queries: Sequence[str], positives: Sequence[str], negatives: Sequence[str] = (),
                         *, name: str = "ir") -> RetrievalEvaluator:
    """Queries rank a corpus of every positive (and distractor) text; a query's positives are relevant."""
    corpus = list(dict.fromkeys(list(positives) + list(negatives)))
    where = {t: i for i, t in enumerate(corpus)}
    rel: dict[str, set] = {}
    for q, p in zip(queries, positives):
        rel.setdefault(q, set()).add(where[p])
    return RetrievalEvaluator(list(rel), corpus, list(rel.values()), name=name)


def retrieval_from_file(path: str, *, name: str = "ir") -> RetrievalEvaluator:
    """Read ``{"queries", "corpus", "relevant"}`` JSON or a pair file (``query``/``anchor`` and
    ``positive`` columns, optional ``negative`` distractors)."""
    from ..data import read_table
    from ..data.schema import text_values

    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{p} line {exc.lineno}: malformed JSON ({exc.msg})") from None
        if isinstance(obj, dict) and {"queries", "corpus", "relevant"} <= set(obj):
            return _retrieval_from_json(obj, p, name)
    table = read_table(path)
    if not table.records:
        raise LmforgeError(f"{path}: no examples")
    cols = table.columns()
    qcol = next((c for c in ("query", "anchor", "sentence1") if c in cols), None)
    pcol = next((c for c in ("positive", "sentence2") if c in cols), None)
    if qcol is None or pcol is None:
        raise LmforgeError(f"{path}: retrieval data needs 'query' and 'positive' columns "
                           f"(or a JSON object with queries, corpus, relevant); columns: {', '.join(cols[:8])}")
    negs = text_values(table, "negative") if "negative" in cols else []
    return retrieval_from_pairs(text_values(table, qcol), text_values(table, pcol), negs, name=name)


def _retrieval_from_json(obj: dict, p: Path, name: str) -> RetrievalEvaluator:
    def as_map(x, what) -> dict:
        if isinstance(x, list):
            return {str(i): t for i, t in enumerate(x)}
        if isinstance(x, dict):
            return {str(k): v for k, v in x.items()}
        raise LmforgeError(f"{p}: '{what}' must be a list or an object")

    queries, corpus = as_map(obj["queries"], "queries"), as_map(obj["corpus"], "corpus")
    for what, m in (("queries", queries), ("corpus", corpus)):
        bad = next((k for k, t in m.items() if not isinstance(t, str) or not t.strip()), None)
        if bad is not None:
            raise LmforgeError(f"{p}: {what} entry '{bad}' is empty or not text")
    col = {d: i for i, d in enumerate(corpus)}
    qids, rel = [], []
    for qid, judged in as_map(obj["relevant"], "relevant").items():
        if qid not in queries:
            raise LmforgeError(f"{p}: relevant names unknown query '{qid}'")
        grades: dict[Hashable, float] = judged if isinstance(judged, dict) else {d: 1.0 for d in judged}
        missing = [d for d in map(str, grades) if d not in col]
        if missing:
            raise LmforgeError(f"{p}: query '{qid}' judges unknown document '{missing[0]}'")
        qids.append(qid)
        rel.append({col[str(d)]: float(g) for d, g in grades.items()})
    return RetrievalEvaluator([queries[q] for q in qids], list(corpus.values()), rel, name=name)
