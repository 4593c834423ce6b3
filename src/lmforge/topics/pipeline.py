"""The topic pipeline: vectorise, reduce, cluster, describe (c-TF-IDF, keywords, labels), measure.

``settings`` is a plain dict (the task's validated ``topics`` section dumped to JSON)::

    reduction:  {method: umap|pca|svd|none, n_neighbors, n_components, min_dist, metric, deterministic}
    clustering: {method: hdbscan|kmeans, min_cluster_size, min_samples, n_clusters}
    vectorizer: {ngram_range: [1, 1], stop_words, min_df, max_df, max_features}
    top_n_words, keywords: {candidates, top_n, diversity}, representative_docs, predict_threshold
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import LmforgeError
from .cluster import cluster, reduce, renumber
from .ctfidf import c_tf_idf, class_counts, top_words
from .metrics import npmi_from_doc_term, outlier_rate, silhouette, topic_diversity
from .model import TopicModel
from .represent import (_unit, clean_label, keybert_rerank, label_prompt, labels_identify_topics, mmr,
                        representative_docs)

WordEmbedder = Callable[[list[str]], np.ndarray]      # words -> (M, D)
Labeller = Callable[[list[str]], list[str]]            # prompts -> generated texts


def make_vectorizer(vec: dict, vocabulary: Sequence[str] | None = None):
    """scikit-learn's CountVectorizer from the recipe's vectorizer settings (lower-cased words)."""
    from sklearn.feature_extraction.text import CountVectorizer

    kw = dict(ngram_range=tuple(vec.get("ngram_range", (1, 1))), stop_words=vec.get("stop_words"),
              lowercase=True)
    if vocabulary is not None:
        return CountVectorizer(vocabulary=list(vocabulary), **kw)
    return CountVectorizer(min_df=vec.get("min_df", 1), max_df=vec.get("max_df", 1.0),
                           max_features=vec.get("max_features"), **kw)


def vectorize(texts: Sequence[str], vec: dict) -> tuple[sp.csr_matrix, list[str]]:
    """``(N, V)`` word counts and the vocabulary; a vectorizer that leaves no words is one error."""
    v = make_vectorizer(vec)
    try:
        x = v.fit_transform(texts)
    except ValueError as exc:  # "empty vocabulary", "After pruning, no terms remain", min_df > max_df
        raise LmforgeError(f"topics.vectorizer: {str(exc).splitlines()[0]} (stop_words={vec.get('stop_words')!r}, "
                           f"min_df={vec.get('min_df')}, max_df={vec.get('max_df')})") from None
    return sp.csr_matrix(x), [str(w) for w in v.get_feature_names_out()]


def doc_term_of(texts: Sequence[str], vocab: Sequence[str], vec: dict) -> sp.csr_matrix:
    """Counts of new texts over a fitted vocabulary (same analyzer)."""
    return sp.csr_matrix(make_vectorizer(vec, vocab).transform(texts))


def analyze(texts: Sequence[str], vec: dict) -> list[list[str]]:
    """The corpus's own tokenisation: the vectorizer's analyzer output per document."""
    an = make_vectorizer(vec).build_analyzer()
    return [an(t) for t in texts]


def topic_embeddings_of(embeddings: np.ndarray, assignments: np.ndarray, topic_ids: Sequence[int]) -> np.ndarray:
    """``(T, D)``: mean of the unit-normalised member embeddings of each topic."""
    unit = _unit(embeddings)
    return np.stack([unit[assignments == t].mean(axis=0) for t in topic_ids]).astype(np.float32)


def describe(assignments: np.ndarray, doc_term: sp.spmatrix, vocab: list[str], embeddings: np.ndarray,
             settings: dict, *, texts: Sequence[str] | None = None, word_embed: WordEmbedder | None = None,
             labeller: Labeller | None = None, arrays: dict | None = None) -> TopicModel:
    """Describe given assignments: c-TF-IDF, top words, topic embeddings, keywords, representative
    documents, labels and the prediction threshold. Topics are renumbered by size first."""
    a = renumber(assignments)
    topic_ids = sorted(set(a.tolist()))
    counts = class_counts(doc_term, a, topic_ids)
    w, idf = c_tf_idf(counts)
    top_n = int(settings.get("top_n_words", 10))
    words = {t: [[x, s] for x, s in ws] for t, ws in zip(topic_ids, top_words(w, vocab, max(top_n, 25)))}
    temb = topic_embeddings_of(embeddings, a, topic_ids)
    model = TopicModel(assignments=a, topic_ids=topic_ids, vocab=list(vocab), ctfidf=w, idf=idf,
                       topic_embeddings=temb, words=words, settings=dict(settings), arrays=dict(arrays or {}))
    model.representative = representative_docs(embeddings, a, temb, topic_ids, int(settings.get("representative_docs", 3)))
    kw = settings.get("keywords") or {}
    if word_embed is not None and kw.get("candidates", 0):
        model.keywords = keywords(model, word_embed, candidates=int(kw["candidates"]),
                                  top_n=int(kw.get("top_n", top_n)), diversity=kw.get("diversity"))
    if labeller is not None and texts is not None and model.real_topics:
        prompts = [label_prompt(model.keywords.get(t) or [x for x, _ in words[t][:top_n]],
                                [texts[i] for i in model.representative.get(t, [])]) for t in model.real_topics]
        real = list(model.real_topics)
        got = {t: clean_label(out, fallback="") for t, out in zip(real, labeller(prompts))}
        keep = {t for t in real if got[t]}
        if word_embed is not None and keep:  # a label must name its own topic, not a neighbour's
            order = [t for t in real if t in keep]
            ok = labels_identify_topics(word_embed([got[t] for t in order]), temb[[topic_ids.index(t) for t in real]],
                                        [real.index(t) for t in order])
            keep = {t for t, good in zip(order, ok) if good}
        model.labels.update({t: got[t] for t in real if t in keep})
    model.threshold = prediction_threshold(embeddings, a, model, settings.get("predict_threshold"))
    return model


def keywords(model: TopicModel, word_embed: WordEmbedder, *, candidates: int = 30, top_n: int = 10,
             diversity: float | None = 0.3) -> dict[int, list[str]]:
    """KeyBERT-inspired keywords: each topic's top ``candidates`` c-TF-IDF words re-ranked by
    similarity to the topic embedding, with MMR when ``diversity`` is set (> 0)."""
    cand = {t: [x for x, _ in model.words[t][:candidates]] for t in model.real_topics}
    uniq = sorted({x for ws in cand.values() for x in ws})
    if not uniq:
        return {}
    vecs = dict(zip(uniq, np.asarray(word_embed(uniq))))
    out = {}
    for r, t in enumerate(model.topic_ids):
        if t == -1 or not cand[t]:
            continue
        m = np.stack([vecs[x] for x in cand[t]])
        target = model.topic_embeddings[r]
        pick = mmr(target, m, top_n, diversity) if diversity else keybert_rerank(target, m, top_n)
        out[t] = [cand[t][i] for i in pick]
    return out


def prediction_threshold(embeddings: np.ndarray, assignments: np.ndarray, model: TopicModel,
                         given: float | None) -> float:
    """The cosine below which predict answers -1: ``given``, else the 5th percentile of the
    fitted members' similarity to their own topic (0 when there are no members)."""
    if given is not None:
        return float(given)
    unit = _unit(embeddings)
    row = {t: r for r, t in enumerate(model.topic_ids)}
    members = np.flatnonzero(assignments != -1)
    if not len(members):
        return 0.0
    te = _unit(model.topic_embeddings)
    s = np.einsum("nd,nd->n", unit[members], te[[row[int(t)] for t in assignments[members]]])
    return float(np.percentile(s, 5))


def fit(texts: Sequence[str], embeddings: np.ndarray, settings: dict, seed: int, *,
        word_embed: WordEmbedder | None = None, labeller: Labeller | None = None,
        vectorized: tuple[sp.csr_matrix, list[str]] | None = None) -> tuple[TopicModel, sp.csr_matrix]:
    """Embeddings -> reduction -> clusters -> :func:`describe`. Returns the model (its ``arrays``
    hold ``reduced``) and the ``(N, V)`` doc-term matrix (``vectorized``: :func:`vectorize`'s result, if done)."""
    doc_term, vocab = vectorized or vectorize(texts, settings["vectorizer"])
    reduced = reduce_step(embeddings, settings, seed)
    a = cluster_step(reduced, settings, seed)
    model = describe(a, doc_term, vocab, embeddings, settings, texts=texts, word_embed=word_embed,
                     labeller=labeller, arrays={"reduced": reduced})
    return model, doc_term


def reduce_step(embeddings: np.ndarray, settings: dict, seed: int) -> np.ndarray:
    r = settings["reduction"]
    return reduce(embeddings, r["method"], n_components=r["n_components"], n_neighbors=r["n_neighbors"],
                  min_dist=r["min_dist"], metric=r["metric"], seed=seed, deterministic=r.get("deterministic", True))


def cluster_step(reduced: np.ndarray, settings: dict, seed: int) -> np.ndarray:
    c = settings["clustering"]
    return cluster(reduced, c["method"], min_cluster_size=c["min_cluster_size"], min_samples=c.get("min_samples"),
                   n_clusters=c["n_clusters"], seed=seed)


def measure(model: TopicModel, doc_term: sp.spmatrix, *, top_n: int = 10, seed: int = 0) -> dict:
    """NPMI (document co-occurrence on the vectorizer's tokens), diversity (top 25), outlier rate,
    silhouette on the reduced space, and the topic count; c-TF-IDF words and, when present, keywords."""
    real = model.real_topics
    words = [[x for x, _ in model.words[t][:top_n]] for t in real]
    npmi = npmi_from_doc_term(words, doc_term, model.vocab) if real else []
    out = {"n_topics": len(real), "outlier_rate": outlier_rate(model.assignments),
           "npmi": _nanmean(npmi), "diversity": topic_diversity([[x for x, _ in model.words[t]] for t in real], 25)}
    if model.keywords:
        kw = [model.keywords[t] for t in real if t in model.keywords]
        out["npmi_keywords"] = _nanmean(npmi_from_doc_term(kw, doc_term, model.vocab))
        out["diversity_keywords"] = topic_diversity(kw, 25)
    if "reduced" in model.arrays:
        out["silhouette"] = silhouette(model.arrays["reduced"], model.assignments, seed=seed)
    return out


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if len(x) and not np.isnan(x).all() else float("nan")
