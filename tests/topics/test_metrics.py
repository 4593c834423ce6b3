"""NPMI by hand and against gensim's c_npmi, diversity, stability, outlier rate."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import scipy.sparse as sp

from lmforge.topics.metrics import (npmi_coherence, npmi_from_doc_term, outlier_rate, stability,
                                    topic_diversity)


def test_npmi_hand_computed():
    docs = [["x", "y"], ["x"], ["y"], ["z"]]
    # P(x) = P(y) = 1/2, P(x, y) = 1/4 -> pmi = log(1) = 0; x, z never together -> about -1
    xz = (math.log(1e-12 / (0.5 * 0.25))) / -math.log(1e-12)
    out = npmi_coherence([["x", "y"], ["x", "z"], ["x", "y", "z"]], docs)
    assert out[0] == pytest.approx(0.0, abs=1e-9)
    assert out[1] == pytest.approx(xz)
    assert out[2] == pytest.approx((0.0 + xz + xz) / 3)
    assert math.isnan(npmi_coherence([["x", "absent"]], docs)[0])


def _corpus(seed=0, n=60, distinct=False):
    """Documents mixing two word groups; ``distinct``: no word twice in a document (gensim's
    incremental sliding window clears a word leaving the window even when it occurs again inside
    it, so windowed counts agree with the exact ones only without repeats)."""
    rng = random.Random(seed)
    groups = [["apple", "pear", "plum", "fig"], ["car", "bus", "train", "bike"], ["red", "blue", "green"]]
    docs = []
    for _ in range(n):
        g = rng.sample(groups, 2)
        if distinct:
            d = rng.sample(g[0], rng.randint(1, len(g[0]))) + rng.sample(g[1], rng.randint(1, len(g[1])))
            docs.append(rng.sample(d, len(d)))
        else:
            docs.append([rng.choice(g[0]) for _ in range(rng.randint(2, 9))] + [rng.choice(g[1]) for _ in range(rng.randint(1, 4))])
    topics = [["apple", "pear", "plum", "fig"], ["car", "bus", "red", "apple"], ["green", "blue", "train"]]
    return docs, topics


@pytest.mark.parametrize("window", [None, 3, 5])
def test_npmi_parity_with_gensim(window):
    pytest.importorskip("gensim")
    from gensim.corpora import Dictionary
    from gensim.models.coherencemodel import CoherenceModel

    docs, topics = _corpus(distinct=window is not None)
    size = window if window is not None else max(len(d) for d in docs)  # one window per document
    cm = CoherenceModel(topics=topics, texts=docs, dictionary=Dictionary(docs), coherence="c_npmi",
                        window_size=size, processes=1)
    np.testing.assert_allclose(npmi_coherence(topics, docs, window), cm.get_coherence_per_topic(), rtol=1e-9)


def test_npmi_doc_term_fast_path_matches():
    docs, topics = _corpus(seed=1)
    vocab = sorted({w for d in docs for w in d})
    idx = {w: i for i, w in enumerate(vocab)}
    rows = [[idx[w] for w in d] for d in docs]
    x = sp.csr_matrix((np.ones(sum(map(len, rows))), (np.repeat(np.arange(len(rows)), [len(r) for r in rows]),
                                                      np.concatenate(rows))), shape=(len(docs), len(vocab)))
    np.testing.assert_allclose(npmi_from_doc_term(topics, x, vocab), npmi_coherence(topics, docs), rtol=1e-12)


def test_diversity_outliers_stability():
    assert topic_diversity([["a", "b"], ["b", "c"]]) == pytest.approx(3 / 4)
    assert topic_diversity([["a", "b", "c"], ["a"]], top_n=1) == pytest.approx(1 / 2)
    assert outlier_rate([-1, 0, 0, -1]) == 0.5
    s = stability([[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]])
    # pairs: (1, 1) ARI 1; (1, 3) and (2, 3) ARI -0.5 -> mean 0; NMI (1, 0, 0) -> mean 1/3
    assert s["seeds"] == 3 and s["ari_min"] == pytest.approx(-0.5) and s["ari_mean"] == pytest.approx(0.0)
    assert s["nmi_mean"] == pytest.approx(1 / 3)
    assert stability([[0, 0, 1], [1, 1, 0]])["nmi_mean"] == pytest.approx(1.0)
