"""Hand-computed and reference checks for lmforge.eval.retrieval."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, ndcg_score

from lmforge.errors import LmforgeError
from lmforge.eval.retrieval import rank_topk, retrieval_report

L3 = math.log2(3)  # discount of rank 2 is 1 / log2(2 + 1)
L6 = math.log2(6)  # discount of rank 5 is 1 / log2(5 + 1)

SCORES = np.array(
    [
        # ranking d1, d3 (tie with d1, higher index -> 2nd), d4, d2, d0
        [0.1, 0.9, 0.3, 0.9, 0.5],
        # ranking d0, d4, d3, d2, d1
        [0.8, 0.1, 0.2, 0.3, 0.4],
        # no relevant doc: skipped
        [0.5, 0.4, 0.3, 0.2, 0.1],
    ]
)
RELEVANT = [
    {3, 0},  # binary: ranks 2 and 5
    {0: 1, 4: 3, 2: 0},  # graded: d0 (g=1) rank 1, d4 (g=3) rank 2; grade 0 = not relevant
    set(),
]


def test_score_matrix_by_hand():
    rep = retrieval_report(SCORES, RELEVANT, ks=(1, 3, 5))
    assert rep["n_queries"] == 2 and rep["n_skipped"] == 1
    # MRR: q0 first hit at rank 2, q1 at rank 1
    assert rep["mrr@1"] == pytest.approx((0 + 1) / 2)
    assert rep["mrr@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert rep["mrr@5"] == pytest.approx((1 / 2 + 1) / 2)
    # recall: q0 hits {2, 5} of 2 relevant, q1 hits {1, 2} of 2
    assert rep["recall@1"] == pytest.approx((0 + 1 / 2) / 2)
    assert rep["recall@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert rep["recall@5"] == pytest.approx((1 + 1) / 2)
    assert rep["precision@1"] == pytest.approx((0 + 1) / 2)
    assert rep["precision@3"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert rep["precision@5"] == pytest.approx((2 / 5 + 2 / 5) / 2)
    # nDCG, linear gain, ideal from the judgements:
    # q0: DCG@3 = 1/log2(3), IDCG@3 = 1 + 1/log2(3); DCG@5 adds 1/log2(6)
    # q1: DCG@1 = 1, IDCG@1 = 3; DCG@3 = 1 + 3/log2(3), IDCG@3 = 3 + 1/log2(3)
    q0_3 = (1 / L3) / (1 + 1 / L3)
    q0_5 = (1 / L3 + 1 / L6) / (1 + 1 / L3)
    q1_3 = (1 + 3 / L3) / (3 + 1 / L3)
    assert rep["ndcg@1"] == pytest.approx((0 + 1 / 3) / 2)
    assert rep["ndcg@3"] == pytest.approx((q0_3 + q1_3) / 2)
    assert rep["ndcg@5"] == pytest.approx((q0_5 + q1_3) / 2)
    # AP over the full ranking: q0 (1/2 + 2/5) / 2 = 0.45, q1 (1/1 + 2/2) / 2 = 1
    assert rep["map"] == pytest.approx((0.45 + 1.0) / 2)
    assert json.loads(json.dumps(rep)) == rep


def test_ranked_lists_with_string_ids_by_hand():
    rankings = {"q1": ["d3", "d1", "d7"], "q2": ["d2", "d9"]}
    relevant = {
        "q1": {"d1": 1, "d5": 1},  # d5 never retrieved: still counts in |R|
        "q2": {"d2": 2},
        "q3": {"d1": 1},  # not ranked: ignored
    }
    rep = retrieval_report(rankings, relevant, ks=(1, 3))
    assert rep["mrr@1"] == pytest.approx((0 + 1) / 2)
    assert rep["mrr@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert rep["recall@1"] == pytest.approx((0 + 1) / 2)
    assert rep["recall@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert rep["precision@3"] == pytest.approx((1 / 3 + 1 / 3) / 2)  # divided by k, not list length
    assert rep["ndcg@3"] == pytest.approx(((1 / L3) / (1 + 1 / L3) + 1.0) / 2)
    assert rep["map"] == pytest.approx(((1 / 2) / 2 + 1.0) / 2)
    assert rep["n_queries"] == 2 and rep["n_skipped"] == 0


def test_rankings_match_scores():
    # the same ranking given as an integer array of doc ids gives the same report
    order = np.argsort(-SCORES, axis=1, kind="stable")
    assert order[0].tolist() == [1, 3, 4, 2, 0]
    by_scores = retrieval_report(SCORES, RELEVANT, ks=(1, 2, 5))
    assert retrieval_report(order, RELEVANT, ks=(1, 2, 5)) == by_scores
    assert retrieval_report(order.tolist(), RELEVANT, ks=(1, 2, 5)) == by_scores
    # a relevant mapping keyed by row index is the same as the list
    keyed = {0: RELEVANT[0], 1: RELEVANT[1]}
    assert retrieval_report(torch.tensor(SCORES), keyed, ks=(1, 2, 5)) == by_scores


def test_parity_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    q, n = 6, 40
    scores = rng.normal(size=(q, n))  # continuous: no ties
    grades = rng.integers(0, 4, size=(q, n)) * (rng.random((q, n)) < 0.2)
    grades[:, 0] = np.maximum(grades[:, 0], 1)  # every query has a relevant doc
    relevant = [{d: int(g) for d, g in enumerate(row) if g > 0} for row in grades]
    rep = retrieval_report(scores, relevant, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert rep[f"ndcg@{k}"] == pytest.approx(ndcg_score(grades, scores, k=k))
    ap = [average_precision_score(grades[i] > 0, scores[i]) for i in range(q)]
    assert rep["map"] == pytest.approx(float(np.mean(ap)))


def test_ideal_dcg_counts_unretrieved_judgements():
    # one doc retrieved at rank 1 (grade 1) but a grade-2 doc exists unranked:
    # nDCG@2 = 1 / (2 + 1/log2(3))
    rep = retrieval_report([["a", "x"]], [{"a": 1, "b": 2}], ks=(2,))
    assert rep["ndcg@2"] == pytest.approx(1 / (2 + 1 / L3))


def test_bad_input():
    with pytest.raises(LmforgeError):
        retrieval_report([[1, 2, 1]], [{1}])  # duplicate doc
    with pytest.raises(LmforgeError):
        retrieval_report([1, 2, 3], [{1}, {2}, {3}])  # one flat list, not lists per query
    with pytest.raises(LmforgeError):
        retrieval_report(SCORES, [{7}, {0}, set()])  # doc 7 is not a column
    with pytest.raises(LmforgeError):
        retrieval_report(SCORES, [set(), set(), set()])  # nothing relevant
    with pytest.raises(LmforgeError):
        retrieval_report(SCORES, [{0}])  # wrong number of queries
    with pytest.raises(LmforgeError):
        retrieval_report(SCORES, {"q0": {0}})  # keys are not row indices
    with pytest.raises(LmforgeError):
        retrieval_report(SCORES, RELEVANT, ks=(0,))
    with pytest.raises(LmforgeError):
        retrieval_report(np.array([[np.nan, 1.0]]), [{0}])


# ---------------------------------------------------------------- rank_topk


def _brute_force(q: np.ndarray, c: np.ndarray, k: int):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    sims = qn @ cn.T  # (Q, N)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def test_rank_topk_matches_full_matrix():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(20, 16)).astype(np.float32)
    c = rng.normal(size=(53, 16)).astype(np.float32)
    # several query and corpus blocks, ragged tails
    scores, idx = rank_topk(q, c, k=5, batch=7, corpus_batch=11)
    ref_s, ref_i = _brute_force(q.astype(np.float64), c.astype(np.float64), 5)
    assert scores.shape == (20, 5) and idx.shape == (20, 5)
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # torch input, one big block: same answer
    s2, i2 = rank_topk(torch.from_numpy(q), torch.from_numpy(c), k=5)
    np.testing.assert_array_equal(i2, idx)


def test_rank_topk_ties_by_index_across_blocks():
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    corpus = np.array([e1, e0, e1, [3.0, 0.0], e1, [0.5, 0.0], e0], dtype=np.float32)
    scores, idx = rank_topk(np.array([e0]), corpus, k=3, corpus_batch=2)
    assert idx.tolist() == [[1, 3, 5]]  # all cos = 1; lowest indices first
    np.testing.assert_allclose(scores, [[1.0, 1.0, 1.0]], atol=1e-6)
    # ties straddling the k-th place inside one block: full stable sort path
    same = np.ones((6, 3), dtype=np.float32)
    _, idx = rank_topk(np.ones((2, 3)), same, k=2, corpus_batch=4)
    assert idx.tolist() == [[0, 1], [0, 1]]


def test_rank_topk_many_ties_in_one_block():
    # torch.topk / torch.sort return equal values in scrambled order at this size
    corpus = np.zeros((3000, 2), dtype=np.float32)
    corpus[:, 1] = 1.0  # cos 0 with the query
    corpus[::140] = [2.0, 0.0]  # 22 rows (0, 140, ..., 2940) with cos 1
    _, idx = rank_topk(np.array([[1.0, 0.0]]), corpus, k=22)
    assert idx.tolist() == [list(range(0, 3000, 140))]  # all ties selected: index order
    corpus[::7] = [1.0, 0.0]  # 429 rows with cos 1: more ties than k, across blocks
    _, idx = rank_topk(np.array([[1.0, 0.0]]), corpus, k=21, corpus_batch=1000)
    assert idx.tolist() == [list(range(0, 147, 7))]


def test_rank_topk_feeds_retrieval_report_and_clips_k():
    rng = np.random.default_rng(2)
    q, c = rng.normal(size=(4, 8)), rng.normal(size=(30, 8))
    relevant = [{0, 5}, {7}, {29}, {1, 2, 3}]
    _, idx = rank_topk(q, c, k=10, batch=3, corpus_batch=8)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        c / np.linalg.norm(c, axis=1, keepdims=True)
    ).T  # (Q, N) full cosine matrix
    top = retrieval_report(idx, relevant, ks=(1, 5, 10))
    whole = retrieval_report(sims, relevant, ks=(1, 5, 10))
    for key in top:
        if key != "map":  # top-k lists give MAP@10, the full matrix MAP over all 30
            assert top[key] == pytest.approx(whole[key]), key
    _, idx = rank_topk(q, c, k=100)
    assert idx.shape == (4, 30)


def test_rank_topk_bad_shapes():
    with pytest.raises(LmforgeError):
        rank_topk(np.ones((2, 3)), np.ones((4, 5)), k=1)
    with pytest.raises(LmforgeError):
        rank_topk(np.ones((2, 3)), np.ones((4, 3)), k=0)
    with pytest.raises(LmforgeError):
        rank_topk(np.ones((2, 3)), np.ones((4, 3)), k=1, corpus_batch=0)
