"""c-TF-IDF against a hand-computed matrix (and BERTopic's transformer), top words, MMR on a hand
example, KeyBERT-inspired re-ranking, representative documents."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from lmforge.topics.ctfidf import c_tf_idf, class_counts, ctfidf_idf, top_words
from lmforge.topics.represent import clean_label, keybert_rerank, mmr, representative_docs


def test_class_counts_sums_rows_per_topic():
    doc_term = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 0], [0, 0, 2], [0, 1, 1]]))
    counts = class_counts(doc_term, [0, 0, -1, 1], [-1, 0, 1]).toarray()
    np.testing.assert_array_equal(counts, [[0, 0, 2], [2, 1, 0], [0, 1, 1]])


def test_ctfidf_hand_computed():
    counts = sp.csr_matrix(np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]))
    # class totals 3 and 4 -> A = int(3.5) = 3; word frequencies f = (2, 2, 3)
    l25, l2 = math.log(3 / 2 + 1), math.log(3 / 3 + 1)
    want = np.array([[2 / 3 * l25, 1 / 3 * l25, 0.0],
                     [0.0, 1 / 4 * l25, 3 / 4 * l2]])
    w, idf = c_tf_idf(counts)
    np.testing.assert_allclose(idf, [l25, l25, l2])
    np.testing.assert_allclose(w.toarray(), want, rtol=1e-12)
    # reusing a given idf (topics over time) leaves it unchanged
    w2, idf2 = c_tf_idf(counts[:1], idf)
    np.testing.assert_allclose(w2.toarray(), want[:1])
    assert ctfidf_idf(sp.csr_matrix((1, 2))).tolist() == [math.log(1.0), math.log(1.0)]


def test_ctfidf_parity_with_bertopic():
    ctfidf_mod = pytest.importorskip("bertopic.vectorizers")
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(1.0, size=(6, 40)).astype(float))
    theirs = ctfidf_mod.ClassTfidfTransformer().fit_transform(counts.copy())
    ours, _ = c_tf_idf(counts)
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), rtol=1e-12)


def test_top_words_order_and_ties():
    w = sp.csr_matrix(np.array([[0.1, 0.3, 0.3, 0.0], [0.0, 0.0, 0.0, 0.5]]))
    out = top_words(w, ["a", "b", "c", "d"], 3)
    assert [x for x, _ in out[0]] == ["b", "c", "a"]  # tie b/c broken by vocabulary order
    assert out[1] == [("d", 0.5)]


def test_mmr_hand_example():
    t = np.array([1.0, 0.0])
    c = np.array([[1.0, 0.1], [1.0, 0.2], [1.0, -0.6]])
    # rel = (0.99504, 0.98058, 0.85749); cos(a, b) = 0.99523, cos(a, c) = 0.80204
    # lambda = 0.5, after a: b -> 0.5*0.98058 - 0.5*0.99523 = -0.0073; c -> 0.5*0.85749 - 0.5*0.80204 = 0.0277
    assert mmr(t, c, 3, 0.5) == [0, 2, 1]
    assert mmr(t, c, 3, 0.0) == [0, 1, 2]  # pure relevance
    assert mmr(t, c, 2, 0.5) == [0, 2]
    assert mmr(t, c[:0], 3, 0.5) == []
    with pytest.raises(ValueError):
        mmr(t, c, 2, 1.5)


def test_keybert_rerank_and_representatives():
    words = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 1.0]])
    assert keybert_rerank(np.array([1.0, 0.0]), words, 2) == [1, 2]
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    rep = representative_docs(emb, np.array([0, 0, 1, 0]), np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 1], 2)
    assert rep == {0: [0, 1], 1: [2]}


def test_clean_label():
    assert clean_label('Label: "Climate policy"\nmore', "x") == "Climate policy"
    assert clean_label("  \n", "fallback") == "fallback"
