"""Index folder: round trip, incremental add, refusals, reranking; tiny encoders built here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_bert
from lmforge.errors import LmforgeError
from lmforge.search import IndexSettings, SearchIndex, SearchOptions, build_index, search, search_rows
from lmforge.search.query import rerank_rows

from ._helpers import corpus

DOCS = corpus(30)


@pytest.fixture(scope="module")
def built(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ix") / "index"
    build_index(DOCS, str(tiny_bert_dir), out, IndexSettings(chunking="sentences", size=1, binary=True))
    return out


def test_round_trip(built, tiny_bert_dir):
    ix = SearchIndex.load(built)
    m = json.loads((built / "manifest.json").read_text())
    assert m["model"] == str(tiny_bert_dir) and m["n_docs"] == 30 and m["n_chunks"] == len(ix.chunks)
    texts = dict(DOCS)
    for c in ix.chunks:
        assert texts[c["doc_id"]][c["start"]:c["end"]] == c["text"]
    assert isinstance(ix.stored, np.memmap)  # memory-mapped, not read into memory
    # the stored vectors are the encoder's normalised vectors of the chunk texts
    from lmforge.search.index import embed_texts, load_encoder

    enc, place = load_encoder(str(tiny_bert_dir))
    ref = embed_texts(enc, place, [c["text"] for c in ix.chunks])
    np.testing.assert_allclose(np.asarray(ix.stored), ref, atol=2e-2)
    hit = search(ix, [ix.chunks[5]["text"]], SearchOptions(mode="dense", k=3))[0][0]
    assert hit["chunk"] == 5 or ix.chunks[hit["chunk"]]["text"] == ix.chunks[5]["text"]
    assert set(hit) == {"rank", "score", "doc_id", "start", "end", "chunk", "text"}


def test_incremental_add_equals_a_full_build(tiny_bert_dir, tmp_path):
    part, full = tmp_path / "part", tmp_path / "full"
    s = IndexSettings(chunking="sentences", size=2, overlap=1, dtype="int8")
    build_index(DOCS[:20], str(tiny_bert_dir), part, s)
    before = np.asarray(SearchIndex.load(part).stored).copy()
    summary = SearchIndex.load(part).add(DOCS[20:])
    assert summary["added_documents"] == 10 and summary["documents"] == 30
    build_index(DOCS, str(tiny_bert_dir), full, IndexSettings(chunking="sentences", size=2, overlap=1))
    a, b = SearchIndex.load(part), SearchIndex.load(full)
    assert a.chunks == b.chunks and [d["id"] for d in a.docs] == [d for d, _ in DOCS]
    np.testing.assert_array_equal(np.asarray(a.stored)[:len(before)], before)  # old rows untouched
    for mode in ("bm25", "dense"):  # int8 vs float32: dense top-5 rows mostly agree
        ra = search_rows(a, ["good movie plot", "awful boring film"], SearchOptions(mode=mode, k=5))
        rb = search_rows(b, ["good movie plot", "awful boring film"], SearchOptions(mode=mode, k=5))
        if mode == "bm25":  # BM25 statistics re-indexed over the whole corpus: identical
            assert ra == rb
        else:
            assert np.mean([len({i for i, _ in x} & {i for i, _ in y}) / 5 for x, y in zip(ra, rb)]) >= 0.8
    with pytest.raises(LmforgeError, match="appears twice"):
        a.add(DOCS[:1])


def test_binary_and_faiss_search_agree_with_exact(built, tiny_bert_dir, tmp_path):
    ix = SearchIndex.load(built)
    qs = [c["text"] for c in ix.chunks[:20:3]]
    exact = search_rows(ix, qs, SearchOptions(k=5))
    binary = search_rows(ix, qs, SearchOptions(k=5, binary=True, rescore=8))
    assert np.mean([len({i for i, _ in x} & {i for i, _ in y}) / 5 for x, y in zip(exact, binary)]) >= 0.8
    pytest.importorskip("faiss")
    build_index(DOCS, str(tiny_bert_dir), tmp_path / "fa", IndexSettings(chunking="sentences", size=1, faiss=True))
    fa = SearchIndex.load(tmp_path / "fa")
    approx = search_rows(fa, qs, SearchOptions(k=5))
    assert np.mean([len({i for i, _ in x} & {i for i, _ in y}) / 5 for x, y in zip(exact, approx)]) >= 0.9
    assert search_rows(fa, qs, SearchOptions(k=5, exact=True)) == exact


def test_another_model_is_refused(built, tmp_path):
    other = make_tiny_bert(tmp_path / "other", seed=1)
    ix = SearchIndex.load(built)
    with pytest.raises(LmforgeError, match="embeds differently"):
        ix.encoder(str(other))


def test_corrupted_and_half_written_indexes_are_refused(built, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    with open(bad / "vectors.npy", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(LmforgeError, match="truncated"):
        SearchIndex.load(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(LmforgeError, match="no manifest.json"):
        SearchIndex.load(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="corrupted manifest"):
        SearchIndex.load(bad)


def test_a_manifest_with_an_unknown_setting_is_refused_by_name(built, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["settings"]["exec_hook"] = "x"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmforgeError, match=r"manifest.json: unknown index setting 'exec_hook'"):
        SearchIndex.load(bad)
    manifest["settings"] = ["not", "an", "object"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmforgeError, match="'settings' is not an object"):
        SearchIndex.load(bad)


def test_a_failed_build_writes_nothing(tiny_bert_dir, tmp_path):
    with pytest.raises(LmforgeError, match="empty"):
        build_index([], str(tiny_bert_dir), tmp_path / "x")
    with pytest.raises(LmforgeError, match="no text"):
        build_index([("a", "fine."), ("b", "  ")], str(tiny_bert_dir), tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-*"))


def test_hybrid_weights_reach_the_ranking(built):
    ix = SearchIndex.load(built)
    q = ["superb story actor"]
    d = [i for i, _ in search_rows(ix, q, SearchOptions(mode="dense", k=5))[0]]
    b = [i for i, _ in search_rows(ix, q, SearchOptions(mode="bm25", k=5))[0]]
    to_dense = search_rows(ix, q, SearchOptions(mode="hybrid", k=5, weights=(1.0, 0.0)))[0]
    to_bm25 = search_rows(ix, q, SearchOptions(mode="hybrid", k=5, weights=(0.0, 1.0)))[0]
    assert [i for i, _ in to_dense] == d and [i for i, _ in to_bm25][:len(b)] == b
    assert to_dense[0][1] == pytest.approx(1 / 61)


def test_rerank_orders_by_cross_encoder_score(built, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import build_word_tokenizer
    from lmforge.embeddings.cross_encoder import CrossEncoder

    tok, vocab = build_word_tokenizer("bert")
    torch.manual_seed(3)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64, num_labels=1)
                                  ).save_pretrained(tmp_path / "ce")
    tok.save_pretrained(tmp_path / "ce")
    ix = SearchIndex.load(built)
    q = "good plot"
    rows = search_rows(ix, [q], SearchOptions(mode="bm25", k=8))[0]
    got = rerank_rows(ix, q, rows, str(tmp_path / "ce"), top=5)
    ce = CrossEncoder.from_pretrained(tmp_path / "ce")
    scores = ce.predict([(q, ix.chunks[i]["text"]) for i, _ in rows[:5]])
    assert [i for i, _ in got[:5]] == [rows[j][0] for j in np.argsort(-scores, kind="stable")]
    assert got[5:] == rows[5:]  # beyond rerank_top the order is kept
    np.testing.assert_allclose([s for _, s in got[:5]], np.sort(scores)[::-1], rtol=1e-5)
    via_opts = search_rows(ix, [q], SearchOptions(mode="bm25", k=8, rerank=str(tmp_path / "ce"), rerank_top=5))[0]
    assert [i for i, _ in via_opts] == [i for i, _ in got]
