"""Scores of sampled answers: reference-based support and reference-free consistency.

Reference-based (Tian et al. 2023, FactScore-style): an answer with claims ``c_1..c_K`` and
references ``r_1..r_M`` has ``p_k = max_m P(r_m supports c_k)`` from a checker; claim ``k`` is
supported when ``p_k >= threshold``. The score is the supported fraction ``S / K`` (the
supported count ``S`` and unsupported count ``U = K - S`` are reported too), so a longer answer
does not win by saying more. With the questions given, ``q_k = P(question supports c_k)`` marks
an *echo* (a claim the question alone entails, e.g. "The best thing for cats to drink is to
drink."): ``E`` echoed claims, ``I`` informative supported ones (``p_k >= t`` and ``q_k < t``);
``discount_question`` makes the score ``I / K``, so restating the question earns nothing.

Reference-free: the N answers to one prompt are grouped into equivalence classes (union-find
over a pairwise relation: normalised-text rules, or the checker in both directions); answer
``i`` in class ``C`` scores ``|C| / N`` (its class's share), and the prompt's entropy is
``H = -sum_C (|C|/N) log(|C|/N)`` (nats; 0 when all agree, ``log N`` when all differ).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import LmforgeError
from .claims import normalise, split_claims

RULES = ("exact", "first_claim", "jaccard")
_STOP = frozenset("a an the is are was were be been it its of to in on and or for with that this as by at from "
                  "do does did not no you your they their he she his her we i".split())


@dataclass(frozen=True)
class Support:
    """One answer's reference-based score: ``claims`` K, ``supported`` S, ``unsupported`` U = K - S,
    ``score`` S / K (0 when K = 0) and the per-claim probabilities."""

    claims: list[str]
    probs: list[float]
    supported: int
    unsupported: int
    score: float
    echoed: int = 0  # claims the question alone entails (0 when no question was given)
    informative: int = 0  # supported claims the question alone does not entail (= supported without a question)


def support_from_probs(claims: Sequence[str], probs: np.ndarray, threshold: float,
                       question_probs: np.ndarray | None = None, discount_question: bool = False) -> Support:
    """Combine per-claim-per-reference probabilities ``probs`` (K, M) into a :class:`Support`:
    ``p_k = max_m probs[k, m]``, supported when ``p_k >= threshold``. ``question_probs`` (K,):
    ``q_k``; echoed when ``q_k >= threshold``, informative when supported and not echoed; with
    ``discount_question`` only informative claims count as supported."""
    k = len(claims)
    if k == 0:
        return Support([], [], 0, 0, 0.0)
    best = np.asarray(probs, dtype=np.float64).reshape(k, -1).max(axis=1)  # (K, M) -> (K,)
    sup = best >= threshold  # (K,)
    echo = (np.asarray(question_probs, dtype=np.float64).reshape(k) >= threshold if question_probs is not None
            else np.zeros(k, dtype=bool))  # (K,)
    inf = int((sup & ~echo).sum())
    s = inf if discount_question else int(sup.sum())
    return Support(list(claims), [round(float(p), 4) for p in best], s, k - s, s / k, int(echo.sum()), inf)


def support_scores(answers: Sequence[str], references: Sequence[Sequence[str]], checker,
                   *, min_words: int = 3, allow_empty: bool = False, questions: Sequence[str] | None = None,
                   discount_question: bool = False) -> list[Support]:
    """Reference-based scores of ``answers[i]`` against ``references[i]`` with one batched
    checker call over every (reference, claim) pair (and one over every (question, claim) pair
    when ``questions`` is given: echoed / informative counts, ``discount_question``).

    Raises LmforgeError for an answer without claims (unless ``allow_empty``: it scores 0 with
    K = 0) or a prompt without references.
    """
    claim_lists = []
    for i, (a, refs) in enumerate(zip(answers, references)):
        if not refs or not any(r.strip() for r in refs):
            raise LmforgeError(f"answer {i + 1}: no references to check against (reference-based scoring needs them)")
        claims = split_claims(a, min_words)
        if not claims and not allow_empty:
            raise LmforgeError(f"answer {i + 1}: empty answer (no claims to score)")
        claim_lists.append(claims)
    pairs = [(r, c) for claims, refs in zip(claim_lists, references) for c in claims for r in refs]
    probs = checker.support(pairs) if pairs else np.zeros(0)
    if discount_question and questions is None:
        raise LmforgeError("discount_question needs the questions")
    qpairs = [(q, c) for claims, q in zip(claim_lists, questions) for c in claims] if questions is not None else []
    qprobs = checker.support(qpairs) if qpairs else np.zeros(0)
    out, at, qat = [], 0, 0
    for claims, refs in zip(claim_lists, references):
        n = len(claims) * len(refs)
        q = qprobs[qat:qat + len(claims)] if questions is not None else None
        out.append(support_from_probs(claims, probs[at:at + n], checker.threshold, q, discount_question))
        at, qat = at + n, qat + len(claims)
    return out


# ---- reference-free ---------------------------------------------------------------------------------
def content_words(text: str) -> set[str]:
    """Normalised words of ``text`` minus stop words."""
    return {w for w in normalise(text).split() if w not in _STOP}


def jaccard(a: str, b: str) -> float:
    """``|A & B| / |A | B|`` over the content words (normalised, stop words removed); 1 when both are empty."""
    x, y = content_words(a), content_words(b)
    return len(x & y) / len(x | y) if (x or y) else 1.0


def rule_equivalent(rule: str, jaccard_min: float = 0.5) -> Callable[[str, str], bool]:
    """The pairwise relation of a normalised-text rule: ``exact`` (equal normalised texts),
    ``first_claim`` (equal normalised first claims), ``jaccard`` (content-word Jaccard >= jaccard_min)."""
    if rule == "exact":
        return lambda a, b: normalise(a) == normalise(b)
    if rule == "first_claim":
        def first(t: str) -> str:
            c = split_claims(t)
            return normalise(c[0]) if c else ""
        return lambda a, b: first(a) == first(b)
    if rule == "jaccard":
        return lambda a, b: jaccard(a, b) >= jaccard_min
    raise LmforgeError(f"unknown grouping rule '{rule}' (choose from {', '.join(RULES)})")


def group_answers(answers: Sequence[str], same: Callable[[str, str], bool]) -> list[int]:
    """Class id of each answer: the connected components (union-find) of the relation ``same``
    over all pairs; ids count from 0 in order of first appearance."""
    n = len(answers)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if find(i) != find(j) and same(answers[i], answers[j]):
                parent[find(j)] = find(i)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(n)]


def group_with_checker(answers: Sequence[str], checker) -> list[int]:
    """Classes under bidirectional entailment: ``a ~ b`` when the checker supports both
    ``(a, b)`` and ``(b, a)`` (one batched call over all ordered pairs)."""
    n = len(answers)
    pairs = [(answers[i], answers[j]) for i in range(n) for j in range(n) if i != j]
    probs = checker.support(pairs) if pairs else np.zeros(0)
    ok = {}
    for (i, j), p in zip(((i, j) for i in range(n) for j in range(n) if i != j), probs):
        ok[i, j] = p >= checker.threshold
    return group_answers(list(range(n)), lambda i, j: bool(ok[i, j] and ok[j, i]))  # on positions


def class_shares(classes: Sequence[int]) -> tuple[list[float], float]:
    """``(score of each answer = its class's share |C|/N, entropy H in nats)``."""
    n = len(classes)
    if n < 2:
        raise LmforgeError(f"reference-free scoring needs at least 2 answers per prompt, got {n}")
    counts: dict[int, int] = {}
    for c in classes:
        counts[c] = counts.get(c, 0) + 1
    h = -sum((k / n) * math.log(k / n) for k in counts.values())
    return [counts[c] / n for c in classes], abs(h)
