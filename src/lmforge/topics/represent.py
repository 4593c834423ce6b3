"""Representations on top of c-TF-IDF: KeyBERT-inspired re-ranking, MMR, representative
documents and the prompt for a generated label."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, D) x (m, D) -> (n, m)`` cosine similarities (zero vectors give 0)."""
    return _unit(a) @ _unit(b).T


def mmr(target: np.ndarray, candidates: np.ndarray, top_n: int, diversity: float) -> list[int]:
    """Maximal marginal relevance (Carbonell & Goldstein 1998), as KeyBERT/BERTopic use it.

    The first pick is the candidate most similar to the target; then repeatedly::

        j* = argmax_{j not picked} (1 - lambda) * cos(c_j, t) - lambda * max_{k picked} cos(c_j, c_k)

    Args:
        target: ``(D,)`` topic embedding.
        candidates: ``(M, D)`` candidate word embeddings.
        top_n: how many to pick (at most ``M``).
        diversity: ``lambda`` in [0, 1]; 0 = pure relevance ranking.

    Returns:
        indices into ``candidates`` in pick order.
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    m = len(candidates)
    if m == 0 or top_n <= 0:
        return []
    rel = cosine_matrix(candidates, target[None, :])[:, 0]  # (M,)
    sim = cosine_matrix(candidates, candidates)  # (M, M)
    picked = [int(np.argmax(rel))]
    left = [j for j in range(m) if j != picked[0]]
    while left and len(picked) < top_n:
        red = sim[np.ix_(left, picked)].max(axis=1)  # (|left|,)
        score = (1.0 - diversity) * rel[left] - diversity * red
        j = left[int(np.argmax(score))]
        picked.append(j)
        left.remove(j)
    return picked


def keybert_rerank(topic_embedding: np.ndarray, word_embeddings: np.ndarray, top_n: int) -> list[int]:
    """KeyBERT-inspired keywords: candidate words re-ranked by ``cos(word, topic)``, descending
    (stable, so equal similarities keep the c-TF-IDF order).

    Args:
        topic_embedding: ``(D,)``; word_embeddings: ``(M, D)`` of the candidates in c-TF-IDF order.

    Returns:
        the ``top_n`` candidate indices.
    """
    rel = cosine_matrix(word_embeddings, topic_embedding[None, :])[:, 0]  # (M,)
    return [int(i) for i in np.argsort(-rel, kind="stable")[:top_n]]


def representative_docs(embeddings: np.ndarray, assignments: np.ndarray, topic_embeddings: np.ndarray,
                        topic_ids: Sequence[int], n: int) -> dict[int, list[int]]:
    """Per topic, the ``n`` member documents closest (cosine) to the topic embedding.

    Args:
        embeddings: ``(N, D)``; assignments: ``(N,)``; topic_embeddings: ``(T, D)`` in ``topic_ids`` order.

    Returns:
        topic id -> document indices, most representative first (ties by index).
    """
    out: dict[int, list[int]] = {}
    emb = _unit(embeddings)
    for r, t in enumerate(topic_ids):
        members = np.flatnonzero(assignments == t)
        if t == -1 or len(members) == 0:
            continue
        s = emb[members] @ _unit(topic_embeddings[r])  # (|members|,)
        out[int(t)] = [int(members[k]) for k in np.lexsort((members, -s))[:n]]
    return out


def label_prompt(keywords: Sequence[str], documents: Sequence[str], max_words: int = 60) -> str:
    """The instruction asking a chat model for a short topic label."""
    docs = "\n".join(f"- {' '.join(d.split()[:max_words])}" for d in documents)
    return ("I have a topic described by these keywords: " + ", ".join(keywords) + ".\n"
            "Some documents of the topic:\n" + docs + "\n"
            "Give a short label (at most five words) for this topic. Answer with the label only.")


def clean_label(text: str, fallback: str) -> str:
    """The first non-empty line of a generation, without quotes or a 'Label:' prefix, else ``fallback``."""
    for line in text.splitlines():
        line = line.strip().strip('"\'*').strip()
        if line.lower().startswith(("label:", "topic:")):
            line = line.split(":", 1)[1].strip().strip('"\'*').strip()
        if line:
            return " ".join(line.split()[:8])
    return fallback
