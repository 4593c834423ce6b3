"""Classification methods beyond fine-tuning: embeddings + LR, zero-shot, SetFit, prompting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.cli import main
from lmforge.commands.core import prepare_run_dir
from lmforge.config import build_config
from lmforge.embeddings import SentenceEncoder
from lmforge.errors import LmforgeError
from lmforge.tasks import build_task, load_task, task_class
from lmforge.tasks.classify import ClassifyTask
from lmforge.embeddings.disk_cache import cached_encode, embedding_cache_path
from lmforge.tasks.classify_heads import SklearnHead, linear_probs, sample_per_class, setfit_pairs
from lmforge.tasks.classify_methods import EmbeddingLRTask, SetFitTask, ZeroShotTask
from lmforge.tasks.classify_prompt import PromptTask, answer_ids, choice_logprobs
from lmforge.device import Placement

FP32 = Placement.resolve("cpu", "fp32")


def _cfg(tmp_path, model_dir, method, name="run", n_train=64, classify=None, **train):
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", sentiment_rows(n_train, seed=1))
        write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(48, seed=2))
    return build_config({
        "task": "classify", "name": name, "output_dir": str(tmp_path / "runs"), "seed": 3,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 32},
        "classify": {"method": method} | (classify or {}),
        "train": {"batch_size": 8, "progress": False, "log_every": 5} | train})


# ---- SetFit sampling ------------------------------------------------------------------------------------
def test_setfit_pair_counts_are_bounded_by_the_unique_pairs():
    labels = [0, 0, 0, 1, 1]  # positives: C(3,2) + C(2,2) = 4; negatives: 3 * 2 = 6
    one = setfit_pairs(labels, 1)  # asks 5 of each kind
    assert sum(t == 1.0 for *_, t in one) == 4 and sum(t == 0.0 for *_, t in one) == 5
    two = setfit_pairs(labels, 2)  # asks 10 of each kind: all 4 + 6
    assert len(two) == 10
    assert {(i, j) for i, j, t in two if t == 1.0} == {(0, 1), (0, 2), (1, 2), (3, 4)}
    assert {(i, j) for i, j, t in two if t == 0.0} == {(i, j) for i in range(3) for j in (3, 4)}
    assert len(setfit_pairs(labels, 20, max_pairs=4)) == 4  # 2 + 2
    assert len(setfit_pairs(labels, 20, max_pairs=5)) == 4
    for i, j, t in setfit_pairs(labels, 1, seed=7):
        assert i < j and t == float(labels[i] == labels[j])
    assert setfit_pairs(labels, 1, seed=7) == setfit_pairs(labels, 1, seed=7)
    # 16 per class, as in the SST-2 recipes: 2 * C(16, 2) = 240 positives and 16 * 16 = 256 negatives
    y16 = [0] * 16 + [1] * 16
    assert len(setfit_pairs(y16, 5)) == 160 + 160
    assert len(setfit_pairs(y16, 20)) == 240 + 256


def test_setfit_pairs_are_deduplicated_by_text():
    keys, labels = ["a", "a", "b", "c", "d"], [0, 0, 0, 1, 1]
    pairs = setfit_pairs(labels, 10, keys=keys)
    pos = {frozenset((keys[i], keys[j])) for i, j, t in pairs if t == 1.0}
    neg = [frozenset((keys[i], keys[j])) for i, j, t in pairs if t == 0.0]
    assert pos == {frozenset("ab"), frozenset("cd")}  # (a, a) dropped, {a, b} kept once
    assert sum(t == 1.0 for *_, t in pairs) == 2
    assert len(neg) == 4 and set(neg) == {frozenset(p) for p in ("ac", "ad", "bc", "bd")}


def test_sample_per_class_is_seeded_and_keeps_small_classes_whole():
    labels = [0] * 10 + [1] * 2 + [2] * 5
    idx = sample_per_class(labels, 3, seed=1)
    assert [sum(labels[i] == c for i in idx) for c in range(3)] == [3, 2, 3]
    assert idx == sorted(idx) == sample_per_class(labels, 3, seed=1)
    assert any(sample_per_class(labels, 3, seed=s) != idx for s in range(2, 6))
    assert sample_per_class(labels, None, seed=1) == list(range(17))  # None: every example


# ---- heads ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_probabilities_equal_sklearn_predict_proba(n_classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), np.arange(60) % n_classes
    lr = LogisticRegression(max_iter=500).fit(x, y)
    np.testing.assert_allclose(linear_probs(x, np.atleast_2d(lr.coef_), lr.intercept_), lr.predict_proba(x),
                               atol=1e-12)


def test_heads_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 4)), np.array([0, 2] * 20)  # class 1 never seen
    lin = SklearnHead("sklearn.linear_model.LogisticRegression", {"C": 0.5}, 3).fit(x, y)
    assert lin.n_params == 4 + 1 and lin.probs(x)[:, 1].max() == 0.0
    lin.save(tmp_path / "lin")
    meta = json.loads((tmp_path / "lin" / "head.json").read_text())
    assert meta["classes"] == [0, 2] and meta["kwargs"] == {"C": 0.5}
    np.testing.assert_allclose(SklearnHead.load(tmp_path / "lin", 3).probs(x), lin.probs(x), atol=1e-12)
    pytest.importorskip("skops")
    knn = SklearnHead("sklearn.neighbors.KNeighborsClassifier", {"n_neighbors": 3}, 3).fit(x, y)
    knn.save(tmp_path / "knn")
    assert (tmp_path / "knn" / "classifier.skops").is_file() and knn.n_params == 0
    np.testing.assert_allclose(SklearnHead.load(tmp_path / "knn", 3).probs(x), knn.probs(x))


def test_classifier_names_are_checked():
    for bad in ("os.system", "sklearn.linear_model.Nope", "sklearn.linear_model", "sklearn.linear_model.Ridge"):
        with pytest.raises(LmforgeError, match="classifier"):
            SklearnHead(bad, {}, 2)
    with pytest.raises(LmforgeError, match="bad arguments"):
        SklearnHead("sklearn.linear_model.LogisticRegression", {"nope": 1}, 2)


# ---- embedding cache -------------------------------------------------------------------------------------
def test_embedding_cache_is_keyed_and_reused(tiny_bert_dir):
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir)
    texts = ["good movie", "awful plot", "the film"]
    first = cached_encode(enc, texts, tiny_bert_dir, batch_size=2, placement=FP32)
    np.testing.assert_allclose(first, enc.encode(texts, placement=FP32), atol=1e-6)
    # the key holds the encoder's code path: vectors of the fast path and transformers' differ by ~1e-5
    settings = f"mean|False|{enc.max_length}|{FP32.describe()}|torch.float32|{enc.code_path(FP32)}"
    path = embedding_cache_path(tiny_bert_dir, texts, settings)
    assert path.is_file()
    np.save(path, np.full_like(first, 7.0))  # a second call must read the file, not re-embed
    assert (cached_encode(enc, texts, tiny_bert_dir, batch_size=2, placement=FP32) == 7.0).all()
    assert embedding_cache_path(tiny_bert_dir, texts[:2], settings) != path
    assert embedding_cache_path(tiny_bert_dir, texts, settings.replace("mean", "cls")) != path
    enc.pooling = "cls"
    assert not (cached_encode(enc, texts, tiny_bert_dir, batch_size=2, placement=FP32) == 7.0).any()


def test_embedding_lr_runs_reuse_the_cached_training_embeddings(tmp_path, tiny_bert_dir):
    from lmforge.models import cache_dir

    cache = cache_dir() / "embeddings"
    before = set(cache.glob("*.npy")) if cache.exists() else set()
    a = EmbeddingLRTask(_cfg(tmp_path, tiny_bert_dir, "embedding_lr", name="a"))
    a.train_direct(tmp_path / "a")
    made = set(cache.glob("*.npy")) - before
    assert len(made) == 1
    b = EmbeddingLRTask(_cfg(tmp_path, tiny_bert_dir, "embedding_lr", name="b",
                             classify={"embedding_lr": {"kwargs": {"C": 0.1}}}))
    b.train_direct(tmp_path / "b")
    assert set(cache.glob("*.npy")) - before == made  # same model, texts and pooling: the same file
    np.testing.assert_allclose(np.load(next(iter(made))), b.embed([it["text"] for it in b.train_items]), atol=1e-6)


# ---- methods on tiny models -------------------------------------------------------------------------------
def test_method_dispatch_and_config(tmp_path, tiny_bert_dir):
    assert task_class("classify") is ClassifyTask
    assert task_class("classify", _cfg(tmp_path, tiny_bert_dir, "setfit")) is SetFitTask
    assert type(build_task(_cfg(tmp_path, tiny_bert_dir, "finetune", classify={"mode": "frozen"}))) is ClassifyTask
    assert type(build_task(_cfg(tmp_path, tiny_bert_dir, "zero_shot"))) is ZeroShotTask
    with pytest.raises(LmforgeError, match="classify.method"):
        _cfg(tmp_path, tiny_bert_dir, "knn")
    with pytest.raises(LmforgeError, match="unknown key 'classify.setfit.pairs'"):
        _cfg(tmp_path, tiny_bert_dir, "setfit", classify={"setfit": {"pairs": 3}})
    import yaml

    from lmforge.config import dump_config

    cfg = _cfg(tmp_path, tiny_bert_dir, "setfit", classify={"setfit": {"per_class": 4}})
    shown = yaml.safe_load(dump_config(cfg))["classify"]  # only the chosen method's options
    assert set(shown) == {"method", "encoder", "setfit"} and shown["setfit"]["per_class"] == 4
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg
    finetune = yaml.safe_load(dump_config(_cfg(tmp_path, tiny_bert_dir, "finetune")))["classify"]
    assert finetune == {"mode": "lora", "unfreeze_last": 0, "class_weights": "none", "focal_gamma": 0.0,
                        "label_smoothing": 0.0, "ordinal": "none", "decision_bias": "none"}  # the finetune options only


def test_embedding_lr_learns_and_counts_its_parameters(tmp_path, tiny_bert_dir):
    task = EmbeddingLRTask(_cfg(tmp_path, tiny_bert_dir, "embedding_lr", n_train=200,
                                classify={"embedding_lr": {"kwargs": {"C": 100.0, "max_iter": 2000}}}))
    assert task.trainable["trainable"] == 0 and not any(p.requires_grad for p in task.model.parameters())
    metrics = task.train_direct(tmp_path / "run")
    assert metrics["accuracy"] > 0.8, metrics
    assert metrics["trainable_params"]["trainable"] == 32 + 1  # binary LR: one weight row + bias
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["accuracy"] == metrics["accuracy"]


def test_embedding_lr_per_class_fits_on_the_seeded_few_shot_sample(tmp_path, tiny_bert_dir):
    task = EmbeddingLRTask(_cfg(tmp_path, tiny_bert_dir, "embedding_lr", n_train=200,
                                classify={"embedding_lr": {"per_class": 4, "cache": False}}))
    task.fit_method(tmp_path)
    assert task.sample_size == 8
    idx = sample_per_class([it["label"] for it in task.train_items], 4, task.cfg.seed)  # what SetFit samples too
    x = task.embed([task.train_items[i]["text"] for i in idx])
    ref = SklearnHead(task.cfg.classify.embedding_lr.classifier, task.cfg.classify.embedding_lr.kwargs, 2)
    ref.fit(x, np.array([task.train_items[i]["label"] for i in idx]))
    probe = task.embed([it["text"] for it in task.eval_items])
    np.testing.assert_allclose(task.head.probs(probe), ref.probs(probe), atol=1e-6)
    full = EmbeddingLRTask(_cfg(tmp_path, tiny_bert_dir, "embedding_lr", name="all", classify={"embedding_lr": {"cache": False}}))
    full.fit_method(tmp_path)
    assert full.sample_size == 200 and not np.allclose(full.head.probs(probe), ref.probs(probe), atol=1e-3)


def test_zero_shot_prototypes_are_mean_description_embeddings(tmp_path, tiny_bert_dir):
    zc = {"label_words": {"pos": ["good", "great"], "neg": "bad"}, "templates": ["a {label} movie", "{label}"]}
    task = ZeroShotTask(_cfg(tmp_path, tiny_bert_dir, "zero_shot", classify={"zero_shot": zc}))
    task.fit_method(tmp_path)
    enc = task.encoder
    assert task.labels == ["neg", "pos"]

    def proto(texts):
        e = F.normalize(torch.from_numpy(enc.encode(texts, placement=FP32)), dim=-1)
        return F.normalize(e.mean(0), dim=-1)

    want = torch.stack([proto(["a bad movie", "bad"]),
                        proto(["a good movie", "a great movie", "good", "great"])])
    torch.testing.assert_close(task.prototypes, want, atol=1e-5, rtol=0)
    texts = ["good film", "awful plot w3"]
    e = F.normalize(torch.from_numpy(enc.encode(texts, placement=FP32)), dim=-1)
    probs = task.predict_texts(texts)
    np.testing.assert_allclose(probs, torch.softmax(e @ want.T / 0.05, -1).numpy(), atol=1e-4)

    shots = ZeroShotTask(_cfg(tmp_path, tiny_bert_dir, "zero_shot",
                              classify={"zero_shot": zc | {"use_descriptions": False, "shots": 4}}))
    shots.fit_method(tmp_path)
    idx = sample_per_class([it["label"] for it in shots.train_items], 4, seed=3)
    pos = [shots.train_items[i]["text"] for i in idx if shots.train_items[i]["label"] == 1]
    torch.testing.assert_close(shots.prototypes[1], proto(pos), atol=1e-5, rtol=0)
    both = ZeroShotTask(_cfg(tmp_path, tiny_bert_dir, "zero_shot", classify={"zero_shot": zc | {"shots": 4}}))
    both.fit_method(tmp_path)  # descriptions and examples: the mean of the two unit prototypes, renormalised
    torch.testing.assert_close(both.prototypes, F.normalize(want + shots.prototypes, dim=-1), atol=1e-5, rtol=0)
    with pytest.raises(LmforgeError, match="unknown label"):
        ZeroShotTask(_cfg(tmp_path, tiny_bert_dir, "zero_shot",
                          classify={"zero_shot": {"label_words": {"maybe": "x"}}})).fit_method(tmp_path)


def test_pair_batches_embed_each_sentence_once_with_the_same_gradient(tiny_bert_dir):
    from lmforge.losses.contrastive import cosine_similarity_loss
    from lmforge.tasks.classify_heads import PairTask

    enc = SentenceEncoder.from_pretrained(tiny_bert_dir)  # dropout 0: repeats change nothing
    tokens = enc.tokenize(["good movie", "great film", "awful plot", "dull story", "the end"])
    pairs = [(0, 1, 1.0), (0, 2, 0.0), (2, 3, 1.0), (1, 3, 0.0), (0, 4, 0.0)]
    task = PairTask(enc, tokens, pairs, FP32)
    batch = task.collate(task.train_items)
    assert batch["input_ids"].shape[0] == 5 and task.batch_units(batch) == 5  # 5 sentences, not 10
    loss, _ = task.loss(batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad()
    a, b = (enc(**enc.collate([tokens[p[k]] for p in pairs])) for k in (0, 1))  # each side on its own
    want = cosine_similarity_loss(a, b, torch.tensor([p[2] for p in pairs]))
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=0)
    for n, p in enc.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("head", ["logistic", "linear"])
def test_setfit_trains_the_encoder_on_pairs_then_a_head(tmp_path, tiny_bert_dir, head):
    cfg = _cfg(tmp_path, tiny_bert_dir, "setfit", n_train=120, lr=2e-3, epochs=2,
               classify={"setfit": {"per_class": 8, "num_iterations": 3, "head": head}})
    task = SetFitTask(cfg)
    before = {n: p.detach().clone() for n, p in task.encoder.named_parameters()}
    run_dir = prepare_run_dir(cfg)
    metrics = task.train_direct(run_dir)
    assert task.sample_size == 16 and task.pair_count == 48 + 48  # 16 * 3 of each kind (56 and 64 unique)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert any(not torch.equal(p, before[n]) for n, p in task.encoder.named_parameters())
    assert metrics["accuracy"] > 0.6, metrics
    task.save(run_dir)
    again = SetFitTask.from_run(run_dir)
    texts = ["good great movie", "awful boring plot", "w1 w2 the"]
    np.testing.assert_allclose(again.predict_texts(texts), task.predict_texts(texts), atol=1e-4)


def test_setfit_per_class_none_trains_on_every_example(tmp_path, tiny_bert_dir):
    cfg = _cfg(tmp_path, tiny_bert_dir, "setfit", n_train=40, max_steps=1,
               classify={"setfit": {"per_class": None, "num_iterations": 1}})
    task = SetFitTask(cfg)
    task.fit_method(prepare_run_dir(cfg))
    assert task.sample_size == 40 and task.pair_count == 40 + 40


def test_choice_logprobs_equal_a_hand_computation(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = [[2, 10, 11, 12, 13, 14], [2, 20, 21], [2, 30, 31, 32, 33]]  # different lengths: left padding
    choices = [[40], [41, 42, 43], [41, 44]]  # one single-token answer, two sharing their first token

    def by_hand(p, c):  # sum_t log softmax(logits at the position before c_t)[c_t], one sequence at a time
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)  # (T, V)
        return sum(float(logp[len(p) - 1 + t, c[t]]) for t in range(len(c)))

    got = choice_logprobs(model, prompts, choices, pad_id=0)
    want = torch.tensor([[by_hand(p, c) for c in choices] for p in prompts])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_prompt_method_ranks_labels_by_answer_logprob(tmp_path, tiny_llama_dir):
    pc = {"template": "review : {text} . good or bad ?", "verbalizers": {"pos": "good", "neg": ["bad", "awful"]}}
    task = PromptTask(_cfg(tmp_path, tiny_llama_dir, "prompt", classify={"prompt": pc}))
    tok = task.tokenizer
    assert task.use_chat and task.trainable == dict(trainable=0, total=task.trainable["total"], percent=0.0)
    texts = ["the movie was great", "dull plot", "w1 w2 w3 w4 w5"]
    rendered = [tok.apply_chat_template([{"role": "user", "content": f"review : {t} . good or bad ?"}],
                                        tokenize=False, add_generation_prompt=True) for t in texts]
    assert task.render(texts[0]) == rendered[0]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
    words = {w: tok(w, add_special_tokens=False)["input_ids"] for w in ("good", "bad", "awful")}
    assert answer_ids(tok, rendered[0], "good", chat=True) == words["good"]
    with torch.no_grad():
        last = [torch.log_softmax(task.model(torch.tensor([i])).logits[0, -1].float(), -1) for i in ids]
    neg = torch.tensor([torch.logsumexp(torch.stack([lp[words["bad"][0]], lp[words["awful"][0]]]), 0) for lp in last])
    pos = torch.tensor([lp[words["good"][0]] for lp in last])
    want = torch.softmax(torch.stack([neg, pos], -1), -1)  # labels sorted: neg, pos
    np.testing.assert_allclose(task.predict_texts(texts), want.numpy(), atol=1e-5)
    long = " ".join(["good"] * 40)  # data.max_length is 32 tokens: the text is cut, the question is not
    assert task.clip([long, "bad plot"]) == [" ".join(["good"] * 32), "bad plot"]
    with pytest.raises(LmforgeError, match="no \\{text\\} slot"):
        PromptTask(_cfg(tmp_path, tiny_llama_dir, "prompt", classify={"prompt": {"template": "hi"}}))


# ---- every method through the command line ------------------------------------------------------------------
CLI = {
    "embedding_lr": ("tiny_bert_dir", {"embedding_lr": {"kwargs": {"C": 100.0, "max_iter": 2000}}}, {}),
    "zero_shot": ("tiny_bert_dir", {"zero_shot": {"label_words": {"pos": "good", "neg": "bad"}, "shots": 8}}, {}),
    "setfit": ("tiny_bert_dir", {"setfit": {"per_class": 8, "num_iterations": 2}}, {"lr": 2e-3}),
    "prompt": ("tiny_llama_dir", {"prompt": {"template": "{text} ?", "verbalizers": {"pos": "good", "neg": "bad"}}},
               {}),
}
ARTEFACTS = {"embedding_lr": ["head/head.json"], "zero_shot": ["prototypes.safetensors"],
             "setfit": ["model/modules.json", "head/head.json"], "prompt": []}


@pytest.mark.parametrize("method", CLI)
def test_train_eval_predict_on_the_command_line(request, tmp_path, capsys, method):
    fixture, classify, train = CLI[method]
    write_jsonl(tmp_path / "train.jsonl", [{"review": r["text"], "y": r["label"]} for r in sentiment_rows(120, 1)])
    write_jsonl(tmp_path / "test.jsonl", [{"review": r["text"], "y": r["label"]} for r in sentiment_rows(30, 2)])
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "name": "cli", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(request.getfixturevalue(fixture)), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.2, "columns": {"text": "review", "label": "y"}},
        "classify": {"method": method} | classify, "train": {"batch_size": 8, "progress": False} | train})
    assert main(["train", str(recipe)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = tmp_path / "runs" / "cli"
    assert summary["run_dir"] == str(run_dir) and 0 <= summary["accuracy"] <= 1 and summary["train_seconds"] >= 0
    for name in ARTEFACTS[method] + ["labels.json", "config.yaml", "eval.json"]:
        assert (run_dir / name).is_file(), name

    assert main(["eval", str(run_dir), "--data", str(tmp_path / "test.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((run_dir / "eval_test.json").read_text()) and printed["n"] == 30
    assert {"accuracy", "macro_f1", "samples_per_s", "trainable_params"} <= set(printed)

    texts = ["good great movie", "awful boring plot"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"review": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"predictions": 2, "out": str(out), "checkpoint": "final"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    reloaded = load_task(run_dir)
    want = reloaded.predict_texts(texts)
    for r, p in zip(rows, want):
        assert set(r["probs"]) == {"neg", "pos"} and sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == reloaded.labels[int(np.argmax(p))] and r["score"] == pytest.approx(p.max(), abs=1e-5)
