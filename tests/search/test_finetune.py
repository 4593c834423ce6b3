"""The retriever recipe: mined hard negatives exclude gold, training runs on the engine, the index is
rebuilt, and eval.json holds the index metrics before and after."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import write_jsonl, write_yaml
from lmforge.cli import main
from lmforge.tasks.retriever import mine_negatives

from ._helpers import corpus


def test_mine_negatives_skips_gold_and_the_top():
    ranked = [["g", "a", "b", "c"], ["x", "y"], ["g2", "g"]]
    assert mine_negatives(ranked, [{"g"}, {"z"}, {"g", "g2"}], 2) == [["a", "b"], ["x", "y"], []]
    assert mine_negatives(ranked, [{"g"}, {"z"}, {"g"}], 1, skip_top=1) == [["b"], ["y"], []]


def test_recipe_end_to_end(tiny_bert_dir, tmp_path, capsys):
    docs = corpus(30, seed=11)
    write_jsonl(tmp_path / "passages.jsonl", [{"id": i, "text": t} for i, t in docs])
    write_jsonl(tmp_path / "pairs.jsonl", [{"query": " ".join(t.split()[:5]), "doc_id": i} for i, t in docs])
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "retriever", "name": "ret", "output_dir": str(tmp_path / "runs"), "seed": 1,
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "eval_fraction": 0.3, "max_length": 32},
        "embed": {"loss": "mnr"},
        "retriever": {"corpus": str(tmp_path / "passages.jsonl"), "negatives": "bm25", "modes": ["dense", "bm25"],
                      "ks": [1, 5, 10]},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1},
    })
    assert main(["train", str(recipe)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = Path(out["run_dir"])
    ev = json.loads((run / "eval.json").read_text())
    before, after = ev["retrieval_before"], ev["retrieval_after"]
    assert before["n_queries"] == after["n_queries"] == 9
    assert set(before["dense"]) >= {"mrr@10", "ndcg@10", "map@10", "recall@5"}
    assert before["bm25"] == after["bm25"]  # keyword search does not depend on the encoder
    assert after["dense"] != before["dense"]
    assert (run / "model" / "modules.json").is_file()
    man = json.loads((run / "index" / "manifest.json").read_text())
    assert man["model"] == str(run / "model") and man["n_docs"] == 30
    assert main(["search", str(run / "index"), docs[0][1][:20], "--k", "2"]) == 0  # the index searches
