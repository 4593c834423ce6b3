"""``lmforge index build|add``, ``search``, ``eval INDEX``, ``rag`` end to end; bad input one-liners."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_bert, write_jsonl
from lmforge.cli import main

from ._helpers import corpus

DOCS = corpus(24, seed=9)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cli")
    write_jsonl(d / "docs.jsonl", [{"id": i, "text": t} for i, t in DOCS[:18]])
    write_jsonl(d / "more.jsonl", [{"id": i, "text": t} for i, t in DOCS[18:]])
    write_jsonl(d / "queries.jsonl", [{"id": f"q{n}", "query": " ".join(t.split()[:4])}
                                      for n, (_, t) in enumerate(DOCS)])
    (d / "qrels.txt").write_text("".join(f"q{n} 0 {i} 1\n" for n, (i, _) in enumerate(DOCS)))
    (d / "empty.jsonl").write_text("")
    return {k: d / v for k, v in [("docs", "docs.jsonl"), ("more", "more.jsonl"), ("queries", "queries.jsonl"),
                                  ("qrels", "qrels.txt"), ("empty", "empty.jsonl"), ("dir", ".")]}


def test_end_to_end(files, tiny_bert_dir, tiny_llama_dir, capsys, tmp_path):
    ix = tmp_path / "index"
    code, out, _ = run(capsys, "index", "build", "--docs", files["docs"], "--model", tiny_bert_dir, "--out", ix,
                       "--chunking", "sentences", "--chunk-size", "2", "--dtype", "float16", "--binary")
    assert code == 0 and json.loads(out)["documents"] == 18
    code, out, _ = run(capsys, "index", "add", ix, "--docs", files["more"])
    assert code == 0 and json.loads(out)["documents"] == 24

    q = " ".join(DOCS[20][1].split()[:4])
    for mode in ("dense", "bm25", "hybrid"):
        code, out, _ = run(capsys, "search", ix, q, "--mode", mode, "--k", "3")
        hits = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and [h["rank"] for h in hits] == [1, 2, 3][:len(hits)] and hits
        for h in hits:
            assert dict(DOCS)[h["doc_id"]][h["start"]:h["end"]] == h["text"]
    code, out, _ = run(capsys, "search", ix, "--queries", files["queries"], "--k", "2", "--binary",
                       "--out", tmp_path / "res.jsonl")
    assert code == 0 and json.loads(out)["results"] == 48
    rows = [json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines()]
    assert rows[0]["query_id"] == "q0" and rows[-1]["query_id"] == "q23"

    code, out, _ = run(capsys, "eval", ix, "--task", "retrieval", "--queries", files["queries"], "--qrels",
                       files["qrels"], "--out", tmp_path / "eval.json")
    rep = json.loads(out)
    assert code == 0 and rep["n_queries"] == 24 and {"dense", "bm25", "hybrid"} <= set(rep)
    assert {"mrr@10", "ndcg@10", "map@100", "recall@10"} <= set(rep["bm25"])
    assert json.loads((tmp_path / "eval.json").read_text())["bm25"] == rep["bm25"]

    code, out, _ = run(capsys, "rag", ix, "is the film good ?", "--model", tiny_llama_dir, "--max-new-tokens", "4",
                       "--k", "2", "--json")
    ans = json.loads(out)
    assert code == 0 and set(ans) == {"question", "answer", "citations", "sources"}
    code, out, _ = run(capsys, "rag", ix, "is the film good ?", "--model", tiny_llama_dir, "--max-new-tokens", "4")
    assert code == 0 and "Sources" in out
    code, out, _ = run(capsys, "rag", "--closed-book", "is the film good ?", "--model", tiny_llama_dir,
                       "--max-new-tokens", "4", "--json")
    assert code == 0 and json.loads(out)["sources"] == []


def test_bad_inputs_are_one_line_exit_2(files, tiny_bert_dir, capsys, tmp_path):
    ix = tmp_path / "index"
    assert run(capsys, "index", "build", "--docs", files["docs"], "--model", tiny_bert_dir, "--out", ix)[0] == 0
    other = make_tiny_bert(tmp_path / "other", seed=2)
    (tmp_path / "bad.qrels").write_text("q0 0 no-such-doc 1\n")
    half = tmp_path / "half"
    half.mkdir()
    (half / "chunks.jsonl").write_text("")
    cases = [
        (["index", "build", "--docs", files["empty"], "--model", tiny_bert_dir, "--out", tmp_path / "e"], "empty"),
        (["index", "build", "--docs", files["docs"], "--model", tiny_bert_dir, "--out", ix], "not empty"),
        (["index", "build", "--docs", files["docs"], "--model", tiny_bert_dir, "--out", tmp_path / "o",
          "--overlap", "3"], "overlap"),
        (["search", ix, "  "], "query is empty"),
        (["search", ix, "good", "--k", "0"], "k must be >= 1"),
        (["search", ix, "good", "--model", other], "embeds differently"),
        (["search", half, "good"], "no manifest.json"),
        (["search", tmp_path / "nope", "good"], "not found"),
        (["eval", ix, "--task", "retrieval", "--queries", files["queries"], "--qrels", tmp_path / "bad.qrels"],
         "not in the index"),
        (["rag", ix, "", "--model", "x"], "question is empty"),
    ]
    for argv, msg in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert err.count("\n") == 1 and msg in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "e").exists() and not (tmp_path / "o").exists()
    with open(ix / "vectors.npy", "r+b") as fh:  # a corrupted index
        fh.truncate(64)
    code, _, err = run(capsys, "search", ix, "good")
    assert code == 2 and "truncated" in err and err.count("\n") == 1


def test_cli_batch_size_default_is_the_index_settings_default():
    """``index build --batch-size`` is spelled out in the parser (commands import lazily): same value."""
    from lmforge.cli import build_parser
    from lmforge.search import IndexSettings

    args = build_parser().parse_args(["index", "build", "--docs", "d.jsonl", "--model", "m", "--out", "o"])
    assert args.batch_size == IndexSettings().batch_size
