"""Retrieval metrics of an index against pytrec_eval on the same runs; qrels/queries readers."""
from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.search import IndexSettings, SearchIndex, build_index
from lmforge.search.evaluate import evaluate_index, read_qrels, read_queries

from ._helpers import corpus

DOCS = corpus(40, seed=4)


@pytest.fixture(scope="module")
def index(tiny_bert_dir, tmp_path_factory) -> SearchIndex:
    out = tmp_path_factory.mktemp("ev") / "index"
    build_index(DOCS, str(tiny_bert_dir), out, IndexSettings(chunking="sentences", size=1))
    return SearchIndex.load(out)


def _fixture():
    """Queries are pieces of documents; graded judgements, several relevant documents for some."""
    texts = dict(DOCS)
    queries, qrels = {}, {}
    for n, (d, t) in enumerate(DOCS[:15]):
        queries[f"q{n}"] = " ".join(t.split()[1:5])
        qrels[f"q{n}"] = {d: 2.0}
        if n % 3 == 0:
            qrels[f"q{n}"][DOCS[n + 20][0]] = 1.0
        if n % 4 == 0:
            qrels[f"q{n}"][DOCS[n + 21][0]] = 0.0  # judged non-relevant
    queries["unjudged"] = "good movie"
    assert all(d in texts for j in qrels.values() for d in j)
    return queries, qrels


def test_metrics_match_pytrec_eval(index):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    queries, qrels = _fixture()
    rep = evaluate_index(index, queries, qrels, modes=("dense", "bm25", "hybrid"), ks=(1, 3, 5, 10, 100),
                         return_runs=True)
    assert rep["n_queries"] == 15
    trec_qrels = {q: {d: int(g) for d, g in j.items()} for q, j in qrels.items()}
    measures = {"recip_rank", "ndcg_cut_10", "map_cut_100", "recall_5", "recall_10", "recall_100", "P_5"}
    for mode in ("dense", "bm25", "hybrid"):
        run = rep["runs"][mode]
        # distinct, rank-ordered scores (trec_eval breaks score ties by doc id, not by rank)
        trec_run = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in run.items()}
        top10 = {q: {d: s for d, s in r.items() if s > len(r) - 10} for q, r in trec_run.items()}
        ev = pytrec_eval.RelevanceEvaluator(trec_qrels, measures).evaluate(trec_run)
        mrr = pytrec_eval.RelevanceEvaluator(trec_qrels, {"recip_rank"}).evaluate(top10)
        mean = lambda m, e=ev: sum(v[m] for v in e.values()) / len(e)  # noqa: E731
        ours = rep[mode]
        assert ours["mrr@10"] == pytest.approx(mean("recip_rank", mrr), abs=1e-6)
        assert ours["ndcg@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-6)
        assert ours["map@100"] == pytest.approx(mean("map_cut_100"), abs=1e-6)
        for k in (5, 10, 100):
            assert ours[f"recall@{k}"] == pytest.approx(mean(f"recall_{k}"), abs=1e-6)
        assert ours["precision@5"] == pytest.approx(mean("P_5"), abs=1e-6)
    assert rep["bm25"]["mrr@10"] > 0.5  # the queries are document words: keyword search finds them


def test_unknown_ids_are_refused(index):
    queries, qrels = _fixture()
    with pytest.raises(LmforgeError, match="not in the index"):
        evaluate_index(index, queries, {"q0": {"nope": 1}}, src="q.tsv")
    with pytest.raises(LmforgeError, match="unknown query id 'zz'"):
        evaluate_index(index, queries, {"zz": {"d0": 1}}, src="q.tsv")


def test_readers(tmp_path: Path):
    from conftest import write_jsonl

    (tmp_path / "q.qrels").write_text("q1 0 d1 1\nq1 0 d2 0\n\nq2 0 d3 2\n")
    assert read_qrels(str(tmp_path / "q.qrels")) == {"q1": {"d1": 1.0, "d2": 0.0}, "q2": {"d3": 2.0}}
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert read_qrels(str(tmp_path / "qrels.tsv")) == {"q1": {"d1": 1.0}}
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"_id": 2, "text": "b"}])
    assert read_queries(str(tmp_path / "queries.jsonl")) == {"q1": "a", "2": "b"}
    (tmp_path / "bad.qrels").write_text("q1 d1 1\n")
    with pytest.raises(LmforgeError, match="line 1"):
        read_qrels(str(tmp_path / "bad.qrels"))
    write_jsonl(tmp_path / "empty_q.jsonl", [{"_id": "q1", "text": " "}])
    with pytest.raises(LmforgeError, match="non-empty text"):
        read_queries(str(tmp_path / "empty_q.jsonl"))
