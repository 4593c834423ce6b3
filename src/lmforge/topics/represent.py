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


# Worked examples of the label prompt: (keywords, documents, label). Small models answer a
# few-shot completion far better than an instruction (SmolLM2-135M, asked in a chat turn, echoed
# the instruction for 21 of 69 news topics); a label equal to an example's is the model copying
# it, and falls back to the keywords (:func:`clean_label`).
LABEL_SHOTS = (
    ("goal, match, league, coach, season", "Late goal lifts United; Coach praises defence after derby",
     "Football league results"),
    ("flour, oven, bake, sugar, dough", "Five breads to bake this weekend; Why your dough will not rise",
     "Home baking tips"),
    ("phone, battery, screen, camera, launch", "New phone lasts two days on a charge; Camera tested at night",
     "Smartphone launches and reviews"),
)


def label_prompt(keywords: Sequence[str], documents: Sequence[str], max_words: int = 12) -> str:
    """A few-shot completion prompt (no chat template) for a short topic label: the worked
    examples of :data:`LABEL_SHOTS`, then this topic's keywords (8 at most) and the first
    ``max_words`` words of two representative documents, ending in ``"Topic:"``."""
    docs = "; ".join(" ".join(d.split()[:max_words]) for d in documents[:2])
    shots = "".join(f"Keywords: {k}\nDocuments: {d}\nTopic: {a}\n\n" for k, d, a in LABEL_SHOTS)
    return shots + f"Keywords: {', '.join(keywords[:8])}\nDocuments: {docs}\nTopic:"


def labels_identify_topics(label_embeddings: np.ndarray, topic_embeddings: np.ndarray,
                           own: Sequence[int]) -> np.ndarray:
    """Which generated labels point back at their own topic: label ``r`` passes when its nearest
    topic embedding by cosine is its own, ``argmax_j cos(l_r, c_j) == own_r`` (ties: lowest j).
    A small model's label that names another topic's subject (or a worked example's) fails, and
    that topic keeps its keywords.

    Args:
        label_embeddings: ``(L, D)``.
        topic_embeddings: ``(T, D)``, every topic a label could be mistaken for.
        own: ``(L,)`` row of ``topic_embeddings`` that label ``r`` describes.

    Returns:
        ``(L,)`` bool.
    """
    sim = _unit(label_embeddings) @ _unit(topic_embeddings).T  # (L, T)
    return sim.argmax(axis=1) == np.asarray(own)


_LABEL_PREFIXES = ("label:", "topic label:", "name of the topic:", "topic name:", "topic:", "name:", "answer:",
                   "the topic is about", "the topic is:", "the topic is", "the topic:", "this topic is about",
                   "this topic is", "the label is", "keywords:")
_FILLER = {"the", "topic", "is", "this", "about", "a", "an", "of", "label", "name", "it", "and", "to"}


def clean_label(text: str, fallback: str, max_words: int = 6) -> str:
    """A short label from a generation, else ``fallback``.

    Takes the first non-empty line; drops quotes and lead-ins ("Label:", "The topic is", "This
    topic is about" ..., repeatedly); cuts at the first repeated word pair (small models loop:
    "the topic is the topic is"); keeps ``max_words`` words. A label left with filler words only
    (the, topic, is ...), or equal to a worked example's label (copied), is replaced by ``fallback``.
    """
    for line in text.splitlines():
        line = line.strip().strip('"\'*').strip()
        changed = True
        while changed and line:
            changed = False
            for pre in _LABEL_PREFIXES:
                if line.lower().startswith(pre):
                    line = line[len(pre):].strip().strip('"\'*:,-').strip()
                    changed = True
                    break
        words = line.split()
        seen, cut = set(), len(words)
        for i in range(len(words) - 1):
            pair = (words[i].lower().strip(".,;:!?"), words[i + 1].lower().strip(".,;:!?"))
            if pair in seen:
                cut = i
                break
            seen.add(pair)
        words = words[:min(cut, max_words)]
        label = " ".join(words).strip(" .,;:-'\"")
        copied = label.lower() in {a.lower() for _, _, a in LABEL_SHOTS}
        if label and not copied and any(w.lower().strip(".,;:!?") not in _FILLER for w in label.split()):
            return label
        if line:
            return fallback
    return fallback
