"""`lmforge train` (task topics), `topics show|find|reduce|merge|outliers`, `predict`, `cluster`,
the pictures opened and checked, and bad input as one line with exit code 2."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from conftest import write_jsonl, write_yaml
from lmforge.cli import main
from topics._helpers import corpus, recipe

FAST = {"reduction": {"method": "pca", "n_components": 3}, "stability_seeds": 2}


@pytest.fixture(scope="module")
def run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topics_cli")
    data = write_jsonl(tmp / "docs.jsonl", corpus())
    r = write_yaml(tmp / "r.yaml", recipe(tmp, str(tiny_bert_dir), str(data), **FAST))
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache isolation is not active yet
        mp.setenv("LMFORGE_CACHE", str(tmp / "cache"))
        assert main(["train", str(r)]) == 0
    return tmp / "runs" / "topics_run", tmp


def _err(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("lmforge: error: "), err
    return err[0]


def test_train_writes_a_run(run):
    rd, _ = run
    ev = json.loads((rd / "eval.json").read_text())
    assert ev["documents"] == 120 and ev["n_topics"] >= 2
    for k in ("npmi", "diversity", "outlier_rate", "silhouette", "npmi_keywords"):
        assert np.isfinite(ev[k]), k
    assert ev["stability"]["seeds"] == 2
    assert {"model.safetensors", "topics.json", "documents.jsonl"} <= {p.name for p in (rd / "topics").iterdir()}
    over = json.loads((rd / "topics_over_time.json").read_text())
    assert sum(r["count"] for r in over) == 120
    assert json.loads((rd / "topics_hierarchy.json").read_text())[0]["merge"] == 0


def test_pictures_open(run):
    from PIL import Image

    rd, _ = run
    for name, size in [("topics_map.png", (1000, 800)), ("topic_words.png", None),
                       ("topic_similarity.png", None), ("topics_over_time.png", (1100, 500))]:
        with Image.open(rd / name) as im:
            im.load()
            px = np.asarray(im.convert("RGB"))
            if size:
                assert im.size == size, name
        coloured = (np.abs(px.astype(int) - px.mean(axis=2, keepdims=True)).sum(axis=2) > 30).sum()
        assert coloured > 500, name  # drawn in colour, not a blank canvas
    html = (rd / "topics_map.html").read_text(encoding="utf-8")

    class Scripts(HTMLParser):
        srcs, bodies = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "script":
                self.srcs.append(dict(attrs).get("src"))

        def handle_data(self, data):
            if self.lasttag == "script":
                self.bodies.append(data)

    p = Scripts()
    p.feed(html)
    assert not any(s and re.match(r"https?:", s) for s in p.srcs)  # no CDN
    assert any("plotly.js v" in b or "Plotly" in b and len(b) > 1_000_000 for b in p.bodies)  # inlined library
    call = html[html.index("Plotly.newPlot("):]
    traces, _ = json.JSONDecoder().raw_decode(call[call.index("["):])
    assert sum(len(t["x"]) for t in traces) == 120
    assert sum(len(t["text"]) for t in traces) == 120


def test_show_find_predict(run, capsys, tmp_path):
    rd, tmp = run
    assert main(["topics", "show", str(rd), "--json", "--docs", "1"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sum(r["size"] for r in rows) == 120 and all(len(r.get("documents", [1])) == 1 for r in rows)
    assert main(["topics", "find", str(rd), "bad awful boring", "-k", "2"]) == 0
    found = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(found) == 2 and found[0]["similarity"] >= found[1]["similarity"]
    docs = corpus()[:8]
    write_jsonl(tmp_path / "new.jsonl", docs)
    assert main(["predict", str(rd), "--input", str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 0
    pred = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    model = json.loads((rd / "topics" / "topics.json").read_text())
    assert len(pred) == 8 and all(0 < p["probability"] <= 1 for p in pred)
    # documents above the threshold get the topic they were fitted into
    from safetensors.numpy import load_file

    a = load_file(str(rd / "topics" / "model.safetensors"))["assignments"]
    ok = [p["topic"] == a[i] for i, p in enumerate(pred) if p["similarity"] >= model["threshold"] and a[i] != -1]
    assert ok and all(ok)


def test_edits_outliers_reduce_merge(tiny_bert_dir, tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus())
    labels = {"generate": True, "model": str(tiny_llama_dir), "max_new_tokens": 4}
    rec = recipe(tmp_path, str(tiny_bert_dir), str(data), **FAST | {"stability_seeds": 0, "pictures": False,
                                                                  "clustering": {"min_cluster_size": 8, "min_samples": 20},
                                                                  "labels": labels})
    assert main(["train", str(write_yaml(tmp_path / "r.yaml", rec))]) == 0
    rd = tmp_path / "runs" / "topics_run"
    before = json.loads((rd / "eval.json").read_text())
    assert before["outlier_rate"] > 0.1 and before["n_topics"] >= 3
    capsys.readouterr()
    assert main(["topics", "outliers", str(rd), "--target", "0.05"]) == 0
    assert json.loads(capsys.readouterr().out)["outlier_rate"] == pytest.approx(6 / 120)  # floor(0.05 * 120) left
    assert main(["topics", "reduce", str(rd), "--n", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["n_topics"] == 2
    assert main(["topics", "merge", str(rd), "0,1"]) == 0
    assert json.loads(capsys.readouterr().out)["n_topics"] == 1
    ev = json.loads((rd / "eval.json").read_text())
    assert ev["edits"] == [{"outliers": 0.05}, {"reduce": 2}, {"merge": [[0, 1]]}]
    meta = json.loads((rd / "topics" / "topics.json").read_text())
    # labels refreshed per edit: none of a topic id that no longer exists; a random tiny model's text is
    # kept only when it passes clean_label and names its topic (else the topic shows its keywords)
    assert set(meta["labels"]) <= {"0"} and all(v.strip() for v in meta["labels"].values())
    assert main(["topics", "merge", str(rd), "0,9"]) == 2
    assert "unknown topic id" in _err(capsys)


def test_cluster_command(tiny_bert_dir, tmp_path, capsys):
    texts = [r["text"] for r in corpus()]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "c.jsonl"
    args = ["--reduction", "pca", "--n-components", "3", "--clustering", "kmeans", "--n-clusters", "4"]
    assert main(["cluster", "--model", str(tiny_bert_dir), "--input", str(tmp_path / "t.txt"), "--out", str(out),
                 "--precision", "fp32", *args]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 120 and rows[5]["text"] == texts[5] and {r["cluster"] for r in rows} == {0, 1, 2, 3}
    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    assert main(["cluster", "--input", str(tmp_path / "e.npy"), "--out", str(tmp_path / "c2.jsonl"), *args]) == 0
    assert len((tmp_path / "c2.jsonl").read_text().splitlines()) == 40


def _bad(tiny_bert_dir, tmp_path, rows, capsys, **topics) -> str:
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    rec = recipe(tmp_path, str(tiny_bert_dir), str(data), **FAST | topics)
    assert main(["train", str(write_yaml(tmp_path / "bad.yaml", rec))]) == 2
    assert not (tmp_path / "runs").exists()  # nothing half-written
    return _err(capsys)


def test_bad_input_one_line(tiny_bert_dir, tmp_path, capsys, run):
    rows = corpus()
    umap = {"reduction": {"method": "umap", "n_neighbors": 50}, "clustering": {"min_cluster_size": 5}}
    assert "n_neighbors=50" in _bad(tiny_bert_dir, tmp_path, rows[:30], capsys, **umap)
    assert "every document is empty" in _bad(tiny_bert_dir, tmp_path, [{"text": " ", "date": "2024-01-01"}] * 30, capsys)
    dup = [{"text": "good film", "date": "2024-01-01"}] * 50
    assert "only 1 distinct" in _bad(tiny_bert_dir, tmp_path, dup, capsys)
    msg = _bad(tiny_bert_dir, tmp_path, rows, capsys, vectorizer={"min_df": 1, "stop_words": sorted(
        {w for r in rows for w in r["text"].split()})})
    assert "topics.vectorizer" in msg
    bad_date = [dict(r) for r in rows]
    bad_date[7]["date"] = "not a date"
    assert "line 8: timestamp 'not a date' does not parse" in _bad(tiny_bert_dir, tmp_path, bad_date, capsys)
    rd, _ = run
    np.save(tmp_path / "other.npy", np.zeros((3, 16), np.float32))
    assert main(["predict", str(rd), "--input", str(tmp_path / "other.npy"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "dimension 16 does not match the topic model's 32" in _err(capsys)
    assert not (tmp_path / "o.jsonl").exists()


def test_query_from_another_encoder_is_one_line(run, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from conftest import build_word_tokenizer

    tok, vocab = build_word_tokenizer("bert")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64, pad_token_id=0)).save_pretrained(tmp_path / "b16")
    tok.save_pretrained(tmp_path / "b16")
    rd, _ = run
    assert main(["topics", "find", str(rd), "good film", "--encoder", str(tmp_path / "b16")]) == 2
    assert "query embedding dimension 16 does not match the topic model's 32" in _err(capsys)
