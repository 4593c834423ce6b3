"""Merging, reduce to N, outlier reduction to a target, hierarchy, timestamps and topics over
time; the TopicModel's save/load round trip and prediction."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from lmforge.errors import LmforgeError
from lmforge.topics.edit import (hierarchy, merge_topics, parse_timestamps, reduce_outliers, reduce_to_n,
                                 topics_over_time)
from lmforge.topics.model import TopicModel
from lmforge.topics.pipeline import describe


def test_merge_topics_renumbers_by_size():
    a = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
    np.testing.assert_array_equal(merge_topics(a, [[0, 1]]), [0, 0, 0, 0, 0, 1, 1, 1, 1, -1])
    for bad in ([[0, 7]], [[0, 1], [1, 2]], [[-1, 0]], [[2]]):
        with pytest.raises(LmforgeError):
            merge_topics(a, bad)


def test_reduce_to_n_merges_most_similar_first_and_hierarchy():
    # topics 0 and 2 share their words; 1 is apart
    ct = sp.csr_matrix(np.array([[0.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.1]]))
    ids = [-1, 0, 1, 2]
    a = np.array([0, 0, 0, 1, 1, 2, 2, -1])
    h = hierarchy(ct, ids)
    assert h[0]["left"] + h[0]["right"] == [0, 2] and h[0]["distance"] < h[1]["distance"]
    np.testing.assert_array_equal(reduce_to_n(a, ct, ids, 2), [0, 0, 0, 1, 1, 0, 0, -1])
    np.testing.assert_array_equal(reduce_to_n(a, ct, ids, 5), a)
    assert len(set(reduce_to_n(a, ct, ids, 1).tolist()) - {-1}) == 1


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2])
def test_outlier_reduction_reaches_target(target):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(100, 8))
    a = np.where(rng.random(100) < 0.4, -1, rng.integers(0, 3, 100))
    temb = np.stack([emb[a == t].mean(0) for t in (-1, 0, 1, 2)])
    new = reduce_outliers(a, emb, temb, [-1, 0, 1, 2], target)
    assert (new == -1).sum() == min((a == -1).sum(), int(np.floor(target * 100)))
    np.testing.assert_array_equal(new[a != -1], a[a != -1])  # members never move
    moved = np.flatnonzero((a == -1) & (new != -1))
    kept = np.flatnonzero(new == -1)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    tu = temb[1:] / np.linalg.norm(temb[1:], axis=1, keepdims=True)
    best = (unit @ tu.T).max(1)
    if len(kept) and len(moved):
        assert best[moved].min() >= best[kept].max()  # the most confident move first
    np.testing.assert_array_equal(new[moved], (unit[moved] @ tu.T).argmax(1))
    with pytest.raises(LmforgeError):
        reduce_outliers(a, emb, temb, [-1, 0, 1, 2], 1.0)


def test_timestamps_and_over_time():
    ts = parse_timestamps(["2024-01-01", "2024/2/7", 1700000000, "2024-03-01T10:00:00Z"], ["r1", "r2", "r3", "r4"])
    assert str(ts[1]) == "2024-02-07T00:00:00" and str(ts[2]).startswith("2023-11-14")
    with pytest.raises(LmforgeError, match="r2: timestamp 'yesterday-ish'"):
        parse_timestamps(["2024-01-01", "yesterday-ish"], ["r1", "r2"])
    doc_term = sp.csr_matrix(np.array([[1, 0], [1, 0], [0, 1], [0, 1]]))
    stamps = parse_timestamps(["2024-01-01", "2024-06-01", "2024-01-02", "2024-06-02"], ["a"] * 4)
    rows = topics_over_time(np.array([0, 0, 1, 1]), stamps, doc_term, np.ones(2), ["x", "y"], bins=2)
    assert [(r["topic"], r["count"], r["words"]) for r in rows] == [(0, 1, ["x"]), (1, 1, ["y"])] * 2


def _model():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 6)) * 4
    emb = np.concatenate([c + rng.normal(size=(10, 6)) for c in centres]).astype(np.float32)
    a = np.repeat([0, 1, 2], 10)
    a[[0, 15]] = -1
    doc_term = sp.csr_matrix(rng.poisson(1.0, size=(30, 12)))
    settings = {"top_n_words": 4, "representative_docs": 2, "vectorizer": {}}
    return describe(a, doc_term, [f"v{i}" for i in range(12)], emb, settings,
                    arrays={"doc_embeddings": emb}), emb


def test_save_load_predict_round_trip(tmp_path):
    m, emb = _model()
    m.labels = {0: "first"}
    m.save(tmp_path / "topics", documents=[{"text": f"d{i}"} for i in range(30)])
    assert not list(tmp_path.glob(".tmp-*"))
    back = TopicModel.load(tmp_path / "topics")
    assert back.topic_ids == m.topic_ids and back.vocab == m.vocab and back.labels == {0: "first"}
    assert back.words == {t: [list(x) for x in ws] for t, ws in m.words.items()}
    np.testing.assert_array_equal(back.ctfidf.toarray(), m.ctfidf.toarray())
    np.testing.assert_array_equal(back.assignments, m.assignments)
    np.testing.assert_array_equal(back.arrays["doc_embeddings"], emb)
    ids, sims, probs = back.predict(emb)
    np.testing.assert_array_equal(ids, m.predict(emb)[0])
    members = (m.assignments != -1) & (sims >= back.threshold)
    np.testing.assert_array_equal(ids[members], m.assignments[members])
    assert members.mean() > 0.85 and ((probs > 0) & (probs <= 1)).all()
    assert back.find(back.topic_embeddings[1], 1)[0][0] == back.topic_ids[1]
    with pytest.raises(LmforgeError, match="dimension 5 does not match"):
        back.predict(np.zeros((2, 5)))
    with pytest.raises(LmforgeError, match="not a topic model"):
        TopicModel.load(tmp_path)
