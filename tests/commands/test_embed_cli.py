"""`lmforge embed`, `lmforge train` with every embedding loss (and augsbert), `lmforge eval --task`,
and bad input as one line on stderr with exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_jsonl, write_yaml
from embeddings._helpers import scored_rows, sentences, triplet_rows
from lmforge.cli import main
from lmforge.embeddings import SentenceEncoder

FP32 = ["--precision", "fp32", "--no-progress"]
NLI = ["entailment", "neutral", "contradiction"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("embed_data")
    texts = sentences(24, seed=1)
    (d / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    write_jsonl(d / "sts.jsonl", scored_rows(24, seed=2))
    write_jsonl(d / "triplets.jsonl", triplet_rows(24, seed=3))
    write_jsonl(d / "nli.jsonl", [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": NLI[i % 3]}
                                  for i, r in enumerate(scored_rows(24, seed=4))])
    return d


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: ")
    return err[0]


def test_embed_npy_and_parquet(tiny_bert_dir, data, tmp_path, capsys):
    import pyarrow.parquet as pq

    assert main(["embed", str(tiny_bert_dir), "--input", str(data / "texts.txt"), "--out",
                 str(tmp_path / "v.npy"), "--batch-size", "5", *FP32]) == 0
    info = json.loads(capsys.readouterr().out)
    vecs = np.load(tmp_path / "v.npy")
    texts = (data / "texts.txt").read_text().splitlines()
    assert vecs.shape == (24, 32) and info["texts"] == 24 and info["precision"] == "fp32"
    want = SentenceEncoder.from_pretrained(tiny_bert_dir).encode(texts, precision="fp32")
    assert np.abs(vecs - want).max() < 1e-5
    write_jsonl(tmp_path / "t.jsonl", [{"sentence": t} for t in texts[:3]])
    assert main(["embed", str(tiny_bert_dir), "--input", str(tmp_path / "t.jsonl"), "--column", "sentence",
                 "--out", str(tmp_path / "v.parquet"), "--normalize", *FP32]) == 0
    table = pq.read_table(tmp_path / "v.parquet").to_pylist()
    assert [r["text"] for r in table] == texts[:3]
    emb = np.array([r["embedding"] for r in table])
    assert np.allclose(emb, want[:3] / np.linalg.norm(want[:3], axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("fast_bf16", ["1", "0"])
def test_embed_picks_precision_automatically_and_shows_progress(tiny_bert_dir, data, tmp_path, capsys, monkeypatch,
                                                                 fast_bf16):
    from lmforge.device import cpu_has_fast_bf16

    monkeypatch.setenv("LMFORGE_CPU_BF16", fast_bf16)  # what the CPU detection would say
    cpu_has_fast_bf16.cache_clear()
    try:
        assert main(["embed", str(tiny_bert_dir), "--input", str(data / "texts.txt"), "--out",
                     str(tmp_path / "v.npy"), "--batch-size", "5"]) == 0
    finally:
        cpu_has_fast_bf16.cache_clear()
    cap = capsys.readouterr()
    assert json.loads(cap.out)["precision"] == ("bf16" if fast_bf16 == "1" else "fp32")
    assert "encode" in cap.err and "24/24" in cap.err  # the progress bar
    texts = (data / "texts.txt").read_text().splitlines()
    want = SentenceEncoder.from_pretrained(tiny_bert_dir).encode(texts, precision="fp32")
    got = np.load(tmp_path / "v.npy")
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99
    assert (np.abs(got - want).max() < 1e-5) == (fast_bf16 == "0")


@pytest.mark.parametrize("content,out_name,match", [
    ("good movie\n\nbad plot\n", "v.npy", "line 2: empty line"),
    ("good movie\n", "v.csv", "must end in .npy or .parquet"),
    ("", "v.npy", "no texts"),
])
def test_embed_bad_input(tiny_bert_dir, tmp_path, capsys, content, out_name, match):
    (tmp_path / "in.txt").write_text(content)
    out = tmp_path / out_name
    assert main(["embed", str(tiny_bert_dir), "--input", str(tmp_path / "in.txt"), "--out", str(out), *FP32]) == 2
    assert match in _err(capsys)
    assert not out.exists()


RECIPES = {  # loss -> (data file, data columns, extra embed settings)
    "simcse_unsup": ("texts.txt", {}, {"dropout": 0.1}),
    "tsdae": ("texts.txt", {}, {}),
    "simcse_sup": ("triplets.jsonl", {}, {"dropout": 0.1}),
    "mnr": ("triplets.jsonl", {}, {"symmetric": True, "mini_batch": 2}),
    "cosine": ("sts.jsonl", {}, {}),
    "cosent": ("sts.jsonl", {}, {}),
    "softmax_nli": ("nli.jsonl", {"sentence1": "premise", "sentence2": "hypothesis"}, {}),
}


def _recipe(tmp_path, model_dir, data, loss, task="embed", embed=None, **top):
    file, columns, extra = RECIPES.get(loss, ("sts.jsonl", {}, {}))
    return write_yaml(tmp_path / f"{task}_{loss}.yaml", {
        "task": task, "name": f"{task}-{loss}", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data / file), "eval_fraction": 0.25, "columns": columns, "max_length": 24},
        "embed": {"loss": loss, "sts_eval": str(data / "sts.jsonl")} | extra | (embed or {}),
        "train": {"batch_size": 4, "max_steps": 2, "progress": False, "lr": 1e-3, "eval_every": 1,
                  "best_metric": "sts_spearman"}} | top)


@pytest.mark.parametrize("loss", list(RECIPES))
def test_train_every_loss(tiny_bert_dir, data, tmp_path, capsys, loss):
    assert main(["train", str(_recipe(tmp_path, tiny_bert_dir, data, loss))]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "runs" / f"embed-{loss}"
    ev = json.loads((run / "eval.json").read_text())
    au = ("sts_alignment", "sts_uniformity")
    assert ev["step"] == 2 and "sts_spearman" in ev and all(k in ev and k in ev["before"] for k in au)
    assert summary["sts_alignment"] == ev["sts_alignment"]
    assert (run / "model" / "modules.json").is_file() and (run / "best" / "model" / "modules.json").is_file()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["split"] == "eval"]
    assert len(evals) >= 2 and all({"sts_spearman", *au} <= set(m) for m in evals)  # logged while training


def test_augsbert_runs_end_to_end(tiny_bert_dir, data, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir, data, "cosine", task="augsbert",
                     augsbert={"top_k": 2, "cross_epochs": 1, "cross_batch_size": 8})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "augsbert-cosine"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["silver_pairs"] > 0 and "cross_spearman" in ev["cross_encoder"]
    assert (run / "cross_encoder" / "model" / "config.json").is_file()
    assert len((run / "silver.jsonl").read_text().splitlines()) == ev["silver_pairs"]
    assert not (tmp_path / "runs" / ".augsbert-cosine-cross-encoder").exists()
    from lmforge.embeddings.cross_encoder import CrossEncoder

    ce = CrossEncoder.from_pretrained(run / "cross_encoder" / "model")
    assert len(ce.rerank("good movie", ["great film", "bad plot"])) == 2


def test_eval_tasks_on_runs_and_models(tiny_bert_dir, data, tmp_path, capsys):
    assert main(["train", str(_recipe(tmp_path, tiny_bert_dir, data, "cosine"))]) == 0
    run = tmp_path / "runs" / "embed-cosine"
    capsys.readouterr()
    assert main(["eval", str(run), "--task", "sts", "--data", str(data / "sts.jsonl")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["primary_metric"] == "sts_spearman" and rep["sts_n"] == 24
    assert json.loads((run / "eval_sts_sts.json").read_text())["sts_spearman"] == rep["sts_spearman"]
    assert main(["eval", str(tiny_bert_dir), "--task", "retrieval", "--data", str(data / "triplets.jsonl"),
                 "--out", str(tmp_path / "ir.json")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ir_n_queries"] == 24 and 0 <= rep["ir_ndcg@10"] <= 1
    # without --task: the run's own evaluation of a file in its format
    assert main(["eval", str(run), "--data", str(data / "sts.jsonl")]) == 0
    assert "sts_spearman" in json.loads(capsys.readouterr().out)
    # predict with a run writes its vectors, like `lmforge embed RUN`
    assert main(["predict", str(run), "--input", str(data / "texts.txt"), "--out", str(tmp_path / "p.npy")]) == 0
    assert np.load(tmp_path / "p.npy").shape == (24, 32)
    assert main(["embed", str(run), "--input", str(data / "texts.txt"), "--out", str(tmp_path / "e.npy"), *FP32]) == 0
    assert np.abs(np.load(tmp_path / "e.npy") - np.load(tmp_path / "p.npy")).max() < 1e-5


def test_bad_pair_files_exit_2(tiny_bert_dir, data, tmp_path, capsys):
    rows = scored_rows(6, seed=9)
    write_jsonl(tmp_path / "missing.jsonl", rows[:3] + [{"sentence1": "a", "sentence2": "b"}] + rows[3:])
    write_jsonl(tmp_path / "range.jsonl", rows[:2] + [rows[2] | {"score": 9.5}])
    write_jsonl(tmp_path / "empty.jsonl", rows[:1] + [rows[1] | {"sentence2": "  "}])
    for name, match in (("missing", "line 4: missing column 'score'"), ("range", "line 3: score 9.5 is outside"),
                        ("empty", "line 2: 'sentence2' is empty")):
        recipe = _recipe(tmp_path, tiny_bert_dir, data, "cosine", name=f"bad-{name}")
        assert main(["train", str(recipe), f"data.train={tmp_path / (name + '.jsonl')}"]) == 2
        assert match in _err(capsys)
    assert main(["eval", str(tiny_bert_dir), "--task", "sts", "--data", str(tmp_path / "range.jsonl")]) == 2
    assert "outside the declared range [0, 5]" in _err(capsys)
