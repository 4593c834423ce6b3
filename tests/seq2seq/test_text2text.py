"""classify method text2text on a tiny T5: scored label words against transformers' own sequence loss,
the generated answer read back as a label, a run through the CLI, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import sentiment_rows, write_jsonl, write_yaml
from lmforge.cli import main
from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.tasks.classify_text2text import Text2TextTask, match_label, normalise_answer


def cfg_for(tmp_path, model_dir, label_by="score", verbalizers=None, rows=None):
    data = write_jsonl(tmp_path / "d.jsonl", rows or sentiment_rows(12))
    return build_config({
        "task": "classify", "name": "t2t", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data), "eval_fraction": 0.5},
        "classify": {"method": "text2text", "prompt": {
            "template": "is this good or bad : {text}", "label_by": label_by,
            "verbalizers": verbalizers or {"pos": "good", "neg": ["bad", "awful film"]}}}})


def test_answer_matching():
    assert normalise_answer("  Good. ") == "good" and normalise_answer("awful\n film!") == "awful film"
    words = [["good"], ["bad", "awful film"]]
    assert match_label("Awful film.", words) == 1 and match_label("good", words) == 0
    assert match_label("goodness", words) is None


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_scores_equal_transformers_sequence_log_likelihood(kind, tmp_path, request):
    task = Text2TextTask(cfg_for(tmp_path, request.getfixturevalue(f"tiny_{kind}_dir")))
    texts = ["good movie and fine plot", "the film was boring"]
    probs = task.predict_texts(texts)
    tok, model = task.tokenizer, task.model
    for i, t in enumerate(texts):
        src = tok([task.render(t)], return_tensors="pt")
        per_label = []
        for words in (["good"], ["bad", "awful film"]):
            lls = []
            for w in words:
                labels = tok(text_target=[w], return_tensors="pt")["input_ids"]  # T5: w </s>; BART: <s> w </s>
                with torch.no_grad():
                    loss = model(**src, labels=labels).loss  # mean over the label tokens
                lls.append(-float(loss) * labels.shape[1])
            per_label.append(torch.tensor(lls).logsumexp(0))
        want = torch.softmax(torch.stack(per_label), 0).numpy()[[1, 0]]  # labels sorted: neg, pos
        np.testing.assert_allclose(probs[i], want, atol=1e-5)


@pytest.fixture(scope="module")
def answering_t5(tiny_t5_dir, tmp_path_factory):
    """The tiny T5 fully fine-tuned (sft) to answer "good" or "bad" (then EOS) to the question."""
    tmp = tmp_path_factory.mktemp("answering")
    rows = [{"prompt": f"is this good or bad : {r['text']}", "completion": "good" if r["label"] == "pos" else "bad"}
            for r in sentiment_rows(64, seed=3)]
    recipe = write_yaml(tmp / "r.yaml", {
        "task": "sft", "name": "answer", "output_dir": str(tmp / "runs"),
        "model": {"name": str(tiny_t5_dir), "precision": "fp32"},
        "data": {"train": str(write_jsonl(tmp / "a.jsonl", rows)), "eval_fraction": 0.0},
        "sft": {"mode": "full"}, "train": {"epochs": 6, "batch_size": 8, "lr": 1e-2, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    return tmp / "runs" / "answer" / "model"


def test_generated_answers_become_labels(tmp_path, answering_t5):
    texts = ["good movie and fine plot", "the film was awful", "a very lovely story", "a bad dull film"]
    verb = {"pos": "Good", "neg": ["bad", "awful film"]}
    task = Text2TextTask(cfg_for(tmp_path, answering_t5, label_by="generate", verbalizers=verb))
    probs = task.predict_texts(texts)
    assert task.unmatched == 0 and [normalise_answer(a) for a in task.answers] == ["good", "bad", "good", "bad"]
    assert probs.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]  # neg, pos
    # an answer that names no label word falls back to the scored probabilities, and is counted
    odd = Text2TextTask(cfg_for(tmp_path, answering_t5, label_by="generate",
                                verbalizers={"pos": "good", "neg": "terrible"}))
    probs = odd.predict_texts(texts)
    scored = Text2TextTask(cfg_for(tmp_path, answering_t5, verbalizers={"pos": "good", "neg": "terrible"}))
    assert odd.unmatched == 2
    np.testing.assert_allclose(probs[[1, 3]], scored.predict_texts(texts)[[1, 3]], atol=1e-6)


def test_a_text2text_run_through_the_cli(tmp_path, tiny_t5_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(16))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "name": "t2t", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_t5_dir), "precision": "fp32"}, "data": {"train": str(data), "eval_fraction": 0.25},
        "classify": {"method": "text2text", "prompt": {"template": "{text} : good or bad ?",
                                                       "verbalizers": {"pos": "good", "neg": "bad"},
                                                       "label_by": "generate"}}})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "t2t"
    metrics = json.loads((run / "eval.json").read_text())
    assert "accuracy" in metrics and "unmatched_generations" in metrics
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "good fine film"}])
    assert main(["predict", str(run), "--input", str(texts), "--out", str(tmp_path / "p.jsonl")]) == 0
    pred = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert pred["label"] in ("pos", "neg") and abs(sum(pred["probs"].values()) - 1) < 1e-4


def test_refusals(tmp_path, tiny_t5_dir, tiny_llama_dir, capsys):
    with pytest.raises(LmforgeError, match="is a causal .*text2text needs an encoder-decoder"):
        Text2TextTask(cfg_for(tmp_path, tiny_llama_dir))
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    recipe = write_yaml(tmp_path / "p.yaml", {
        "task": "classify", "name": "p", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_t5_dir)},
        "data": {"train": str(data)}, "classify": {"method": "prompt"}})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task classify (classify.method prompt; use text2text) needs a causal" in err[0]
