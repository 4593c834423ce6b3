"""Augmented SBERT: silver-pair sampling by hand; the cross-encoder labels the silver pairs and the
bi-encoder trains on gold + silver."""
from __future__ import annotations

import numpy as np

from conftest import write_jsonl
from embeddings._helpers import scored_rows
from lmforge.config import build_config
from lmforge.device import Placement
from lmforge.embeddings.cross_encoder import CrossEncoder
from lmforge.tasks.augsbert import AugsbertTask, sample_silver_pairs


def test_sample_silver_pairs_by_hand():
    # cosines: a-b 0.99, c-d 0.99, b-d 0.22, a-d 0.11, b-c 0.11, a-c 0
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    names = ["a", "b", "c", "d"]
    gold = {("d", "c")}  # skipped in either order
    assert sample_silver_pairs(emb, names, gold, 1) == [("a", "b")]
    # top 2: a -> b, d; b -> (a seen), d; c -> (d gold), b; d -> (c gold), (b seen)
    assert sample_silver_pairs(emb, names, gold, 2) == [("a", "b"), ("a", "d"), ("b", "d"), ("c", "b")]


def test_cross_encoder_labels_silver_pairs_for_the_bi_encoder(tmp_path, tiny_bert_dir):
    gold = scored_rows(10, seed=5)
    cfg = build_config({
        "task": "augsbert", "name": "aug", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(write_jsonl(tmp_path / "gold.jsonl", gold)), "eval_fraction": 0.0, "max_length": 24},
        "embed": {"eval_before": False},
        "augsbert": {"top_k": 2, "cross_epochs": 1, "cross_batch_size": 8},
        "train": {"batch_size": 4, "max_steps": 1, "progress": False}})
    task = AugsbertTask(cfg)
    assert task.loss_name == "cosine" and task.silver
    pairs = [(r["sentence1"], r["sentence2"]) for r in task.silver]
    gold_pairs = {tuple(sorted((r["sentence1"], r["sentence2"]))) for r in gold}
    assert not gold_pairs & {tuple(sorted(p)) for p in pairs}
    # silver scores are the trained cross-encoder's predictions, mapped to the score range [0, 5]
    ce = CrossEncoder.from_pretrained(task.cross_dir / "model")
    want = ce.predict(pairs, placement=Placement.resolve("cpu", "fp32"))
    assert np.abs(np.array([r["score"] for r in task.silver]) - 5 * want).max() < 1e-5
    # the bi-encoder trains on gold + silver, silver scores normalised back to [0, 1]
    assert len(task.train_items) == len(gold) + len(pairs)
    got = np.array([it["score"] for it in task.train_items[len(gold):]])
    assert np.abs(got - want).max() < 1e-5
