"""Evaluator metrics on hand-computed embeddings and rankings; evaluation files and bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import write_jsonl
from lmforge.embeddings.evaluators import (AlignUniformEvaluator, RetrievalEvaluator, STSEvaluator,
                                           alignment_uniformity, cosine_pairs, normalised_scores,
                                           retrieval_from_file, run_evaluators, sts_from_file)
from lmforge.data import read_table
from lmforge.errors import LmforgeError


class FixedVectors:
    """Encoder stand-in with hand-chosen vectors (the evaluators, not encoding, are under test)."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls = 0

    def encode(self, texts, **kw):
        self.calls += 1
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_cosine_pairs_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    assert np.allclose(cosine_pairs(a, b), [1.0, math.sqrt(0.5), -1.0])


def test_alignment_uniformity_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    y = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    out = alignment_uniformity(x, y, x)
    # |x0 - y0|^2 = 0, |x1 - y1|^2 = 2 -> mean 1; one pair at squared distance 2 -> log(exp(-4)) = -4
    assert out["alignment"] == pytest.approx(1.0, abs=1e-6)
    assert out["uniformity"] == pytest.approx(-4.0, abs=1e-6)


def test_sts_evaluator_by_hand():
    vec = {"a": [1, 0], "b": [1, 0], "c": [1, 1], "d": [0, 1], "e": [-1, 0]}
    # cosines: (a,b)=1, (a,c)=0.707, (a,d)=0, (a,e)=-1 ; gold ordered the same way except the middle two swapped
    ev = STSEvaluator(["a", "a", "a", "a"], ["b", "c", "d", "e"], [1.0, 0.3, 0.5, 0.0], name="sts")
    enc = FixedVectors(vec)
    out = run_evaluators([ev, AlignUniformEvaluator(["a"], ["c"], name="pairs")], enc)
    assert enc.calls == 1  # every text embedded once for all evaluators
    assert out["sts_spearman"] == pytest.approx(0.8, abs=1e-9)  # 1 - 6*2/(4*15)
    x = np.array([1.0, math.sqrt(0.5), 0.0, -1.0]) - (math.sqrt(0.5) / 4)  # centred cosines
    y = np.array([1.0, 0.3, 0.5, 0.0]) - 0.45  # centred gold
    assert out["sts_pearson"] == pytest.approx(x @ y / math.sqrt((x @ x) * (y @ y)), abs=1e-6)
    # alignment over pairs scored above 0.8 (only (a, b): distance 0)
    assert out["sts_alignment"] == pytest.approx(0.0, abs=1e-6)
    assert out["pairs_alignment"] == pytest.approx(2 - math.sqrt(2), abs=1e-6)
    assert out["primary"] == out["sts_spearman"] and out["primary_metric"] == "sts_spearman"


def test_retrieval_evaluator_by_hand():
    vec = {"q0": [1, 0], "q1": [0, 1], "d0": [1, 0.1], "d1": [0.2, 1], "d2": [1, -0.5]}
    # q0 ranks d0 (0.995), d2 (0.894), d1 (0.196); q1 ranks d1, d0, d2
    ev = RetrievalEvaluator(["q0", "q1"], ["d0", "d1", "d2"], [{2}, {0, 1}], ks=(1, 2))
    out = ev(FixedVectors(vec))
    assert out["ir_mrr@1"] == pytest.approx(0.5)  # q0 misses at 1, q1 hits
    assert out["ir_mrr@2"] == pytest.approx((0.5 + 1) / 2)
    assert out["ir_recall@2"] == pytest.approx((1 + 1) / 2)
    ndcg_q0 = (1 / math.log2(3)) / 1.0
    assert out["ir_ndcg@2"] == pytest.approx((ndcg_q0 + 1.0) / 2)
    assert out["ir_map@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert ev.primary == "ir_ndcg@2"


def test_sts_file_and_bad_scores(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "score": 5.0}, {"sentence1": "c", "sentence2": "d", "score": "2.5"}]
    ev = sts_from_file(str(write_jsonl(tmp_path / "ok.jsonl", rows)))
    assert ev.scores == [1.0, 0.5]
    with pytest.raises(LmforgeError, match=r"line 2: score 7.0 is outside the declared range \[0, 5\]"):
        sts_from_file(str(write_jsonl(tmp_path / "hi.jsonl", [rows[0], rows[1] | {"score": 7.0}])))
    with pytest.raises(LmforgeError, match="line 2: missing column 'score'"):
        sts_from_file(str(write_jsonl(tmp_path / "miss.jsonl", [rows[0], {"sentence1": "c", "sentence2": "d"}])))
    table = read_table(str(write_jsonl(tmp_path / "nan.jsonl", [rows[0] | {"score": "high"}])))
    with pytest.raises(LmforgeError, match="must be a number"):
        normalised_scores(table, "score", (0, 5))
    table = read_table(str(write_jsonl(tmp_path / "null.jsonl", [rows[0] | {"score": None}])))
    with pytest.raises(LmforgeError, match="missing score"):
        normalised_scores(table, "score", (0, 5))


def test_retrieval_files(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"query": "q1", "positive": "d1", "negative": "d3"},
                                       {"query": "q1", "positive": "d2", "negative": "d4"},
                                       {"query": "q2", "positive": "d2", "negative": "d3"}])
    ev = retrieval_from_file(str(tmp_path / "p.jsonl"))
    assert ev.queries == ["q1", "q2"] and ev.corpus == ["d1", "d2", "d3", "d4"]
    assert ev.relevant == [{0, 1}, {1}]
    (tmp_path / "r.json").write_text(json.dumps(
        {"queries": {"x": "q1"}, "corpus": {"u": "d1", "v": "d2"}, "relevant": {"x": {"v": 2}}}))
    ev = retrieval_from_file(str(tmp_path / "r.json"))
    assert ev.relevant == [{1: 2.0}]
    (tmp_path / "bad.json").write_text(json.dumps({"queries": ["q"], "corpus": ["d"], "relevant": {"0": ["7"]}}))
    with pytest.raises(LmforgeError, match="unknown document '7'"):
        retrieval_from_file(str(tmp_path / "bad.json"))


def test_sts_evaluator_keeps_the_points_behind_the_correlation():
    import numpy as np

    from lmforge.embeddings.evaluators import STSEvaluator

    emb = {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0]), "c": np.array([0.0, 1.0])}
    out = STSEvaluator(["a", "a"], ["b", "c"], [0.9, 0.1]).compute(emb)
    assert out["sts_scatter"]["gold"] == [0.9, 0.1]
    assert out["sts_scatter"]["pred"] == [round(2 ** -0.5, 5), 0.0]  # cos(a, b), cos(a, c)
