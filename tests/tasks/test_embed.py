"""The embed task: false-negative keys by hand, masking and GradCache wired into the loss,
LoRA mode, reading finished runs, and bad input as one clear line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from lmforge.commands.core import prepare_run_dir
from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.tasks.embed import EmbedTask
from lmforge.train import fit

from embeddings._helpers import scored_rows, sentences, triplet_rows


def _cfg(tmp_path, model_dir, loss, rows, name="run", embed=None, data=None, **train):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return build_config({
        "task": "embed", "name": name, "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(path), "eval_fraction": 0.0, "max_length": 32} | (data or {}),
        "embed": {"loss": loss} | (embed or {}),
        "train": {"batch_size": 4, "max_steps": 2, "progress": False, "lr": 1e-3} | train})


def test_mnr_masks_identical_texts_in_a_batch(tmp_path, tiny_bert_dir):
    rows = [{"anchor": "good movie", "positive": "great film"}, {"anchor": "good movie", "positive": "great film"},
            {"anchor": "bad plot", "positive": "awful story"}, {"anchor": "dull actor", "positive": "boring scene"}]
    task = EmbedTask(_cfg(tmp_path, tiny_bert_dir, "mnr", rows, embed={"eval_before": False}))
    batch = task.collate(task.train_items[:3])
    loss, _ = task.loss(batch)
    enc = task.encoder
    a = F.normalize(enc(**batch["columns"][0]), dim=-1)
    p = F.normalize(enc(**batch["columns"][1]), dim=-1)
    s = 20.0 * a @ p.T  # (3, 3)
    # rows 0 and 1 are the same pair: each other's positive is masked out, row 2 sees all three
    want = [-(s[0, 0] - torch.logsumexp(s[0, [0, 2]], 0)), -(s[1, 1] - torch.logsumexp(s[1, [1, 2]], 0)),
            -(s[2, 2] - torch.logsumexp(s[2], 0))]
    assert loss.item() == pytest.approx(torch.stack(want).mean().item(), abs=1e-5)


@pytest.mark.parametrize("loss_name,rows", [("mnr", triplet_rows(8)),
                                            ("simcse_unsup", [{"text": t} for t in sentences(8)])])
def test_gradcache_in_the_task_equals_plain(tmp_path, tiny_bert_dir, loss_name, rows):
    grads, losses = [], []
    for mini in (None, 3):
        task = EmbedTask(_cfg(tmp_path, tiny_bert_dir, loss_name, rows, name=f"g{mini}",
                              embed={"mini_batch": mini, "symmetric": True, "eval_before": False}, batch_size=8))
        torch.manual_seed(0)
        loss, _ = task.loss(task.collate(task.train_items))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in task.model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_lora_mode_saves_a_merged_model_and_runs_reload(tmp_path, tiny_bert_dir):
    st = pytest.importorskip("sentence_transformers")
    cfg = _cfg(tmp_path, tiny_bert_dir, "cosine", scored_rows(12), embed={"mode": "lora"},
               data={"eval_fraction": 0.25}, lr=5e-2)
    task = EmbedTask(cfg)
    prepare_run_dir(cfg)
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    metrics = fit(task, cfg, cfg.run_dir)
    task.save(cfg.run_dir)
    assert "dev_spearman" in metrics and "dev_spearman" in metrics["before"]
    folder = cfg.run_dir / "model"
    texts = sentences(5, 40)
    ours = task.trained_encoder().encode(texts, precision="fp32")
    assert np.abs(st.SentenceTransformer(str(folder), device="cpu").encode(texts) - ours).max() < 1e-5
    again = EmbedTask.from_run(cfg.run_dir)
    assert np.abs(again.encoder.encode(texts, precision="fp32") - ours).max() < 1e-5
    report = again.evaluate(again.read_eval_file(str(tmp_path / "run.jsonl")))
    assert report["primary_metric"] == "sts_spearman" and "before" not in report


@pytest.mark.parametrize("loss_name,rows,match", [
    ("cosine", [{"sentence1": "a b", "sentence2": "b", "score": 1.0}, {"sentence1": "a", "sentence2": "b", "score": 6}],
     r"line 2: score 6 is outside the declared range \[0, 5\]"),
    ("cosent", [{"sentence1": "a b", "sentence2": "b", "score": 1.0}, {"sentence1": "a", "sentence2": "b"}],
     "line 2: missing column 'score'"),
    ("mnr", [{"anchor": "a", "positive": " "}], "line 1: 'positive' is empty"),
    ("simcse_sup", [{"anchor": "a", "positive": "b"}], "missing column 'negative'"),
])
def test_bad_input_is_one_clear_line(tmp_path, tiny_bert_dir, loss_name, rows, match):
    with pytest.raises(LmforgeError, match=match):
        EmbedTask(_cfg(tmp_path, tiny_bert_dir, loss_name, rows))


def test_custom_score_range_and_columns(tmp_path, tiny_bert_dir):
    rows = [{"q": "good movie", "d": "great film", "sim": -1.0}, {"q": "bad", "d": "good", "sim": 1.0}]
    task = EmbedTask(_cfg(tmp_path, tiny_bert_dir, "cosine", rows, embed={"score_range": [-1, 1]},
                          data={"columns": {"sentence1": "q", "sentence2": "d", "score": "sim"}}))
    assert [it["score"] for it in task.train_items] == [0.0, 1.0]
    assert math.isfinite(task.loss(task.collate(task.train_items))[0].item())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_unsupervised_simcse_contrasts_two_dropout_views(tmp_path, tiny_bert_dir, dropout):
    """Both views come from one forward over the batch twice: dropout makes them differ."""
    rows = [{"text": t} for t in sentences(6, seed=21)]
    task = EmbedTask(_cfg(tmp_path, tiny_bert_dir, "simcse_unsup", rows, batch_size=6,
                          embed={"dropout": dropout, "temperature": 0.1, "eval_before": False}))
    task.model.train()
    batch = task.collate(task.train_items)
    torch.manual_seed(3)
    loss, _ = task.loss(batch)
    torch.manual_seed(3)
    a, p = task.encoder(**{k: torch.cat([v, v]) for k, v in batch["columns"][0].items()}).chunk(2)  # (B, D) each
    assert torch.equal(a, p) == (dropout == 0.0)
    s = 10.0 * F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T  # (B, B), 1 / temperature
    assert loss.item() == pytest.approx(F.cross_entropy(s, torch.arange(6)).item(), abs=1e-5)


def test_supervised_simcse_uses_the_contradiction_as_hard_negative(tmp_path, tiny_bert_dir):
    task = EmbedTask(_cfg(tmp_path, tiny_bert_dir, "simcse_sup", triplet_rows(5, seed=4), batch_size=5,
                          embed={"eval_before": False}))
    batch = task.collate(task.train_items)
    loss, _ = task.loss(batch)
    a, p, n = (F.normalize(task.encoder(**c), dim=-1) for c in batch["columns"])  # (B, D) each
    s = 20.0 * a @ torch.cat([p, n]).T  # (B, 2B): in-batch positives, then every row's negative
    assert loss.item() == pytest.approx(F.cross_entropy(s, torch.arange(5)).item(), abs=1e-5)


def test_tsdae_deletes_sixty_percent_of_words_by_default(tmp_path, tiny_bert_dir):
    texts = sentences(60, seed=22, lo=15, hi=20)
    task = EmbedTask(_cfg(tmp_path, tiny_bert_dir, "tsdae", [{"text": t} for t in texts],
                          embed={"eval_before": False}))
    batch = task.collate(task.train_items)
    clean_ids = task.encoder.collate(task.encoder.tokenize(texts))["input_ids"]  # the decoder's target
    assert torch.equal(batch["target"]["input_ids"], clean_ids)
    noisy = batch["columns"][0]["attention_mask"].sum() - 2 * len(texts)  # words, without [CLS] [SEP]
    clean = batch["target"]["attention_mask"].sum() - 2 * len(texts)
    assert 0.33 < (noisy / clean).item() < 0.47  # keep probability 1 - 0.6
