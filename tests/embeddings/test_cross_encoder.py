"""Cross-encoder: the loss by hand, scores equal sentence-transformers' CrossEncoder, reranking."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmforge.embeddings.cross_encoder import CrossEncoder, cross_encoder_loss

from ._helpers import sentences


def test_cross_encoder_loss_by_hand():
    z, y = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.25])
    s = 1 / (1 + math.exp(-2.0))
    want = (-math.log(0.5) - (0.25 * math.log(s) + 0.75 * math.log(1 - s))) / 2
    assert cross_encoder_loss(z, y).item() == pytest.approx(want, abs=1e-6)


@pytest.fixture(scope="module")
def saved(tiny_bert_dir, tmp_path_factory):
    torch.manual_seed(0)
    ce = CrossEncoder.from_pretrained(tiny_bert_dir)
    with torch.no_grad():  # a visible head, so the scores spread
        ce.model.classifier.weight.normal_(0, 1.0)
    return ce, ce.save(tmp_path_factory.mktemp("ce") / "model")


def test_scores_match_sentence_transformers(saved):
    st = pytest.importorskip("sentence_transformers")
    ce, folder = saved
    pairs = list(zip(sentences(7, 1), sentences(7, 2)))
    ours = ce.predict(pairs, batch_size=3, placement=_fp32())
    theirs = st.CrossEncoder(str(folder), device="cpu").predict(pairs, batch_size=3)
    assert np.abs(ours - np.asarray(theirs)).max() < 1e-5
    back = CrossEncoder.from_pretrained(folder)
    assert np.abs(back.predict(pairs, placement=_fp32()) - ours).max() < 1e-6


def test_rerank_orders_by_score(saved):
    ce, _ = saved
    docs = sentences(6, 5)
    scores = ce.predict([("good movie", d) for d in docs], placement=_fp32())
    ranked = ce.rerank("good movie", docs, top_k=3, placement=_fp32())
    assert [i for i, _ in ranked] == list(np.argsort(-scores, kind="stable")[:3])


def _fp32():
    from lmforge.device import Placement

    return Placement.resolve("cpu", "fp32")


def test_train_cross_encoder_with_the_engine(tiny_bert_dir, tmp_path):
    from lmforge.config import build_config
    from lmforge.tasks.cross_encoder import train_cross_encoder

    cfg = build_config({"task": "embed", "name": "ce", "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
                        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False}})
    pairs = list(zip(sentences(8, 1), sentences(8, 2)))
    scores = [i / 7 for i in range(8)]
    ce = CrossEncoder.from_pretrained(tiny_bert_dir)
    before = [p.detach().clone() for p in ce.parameters()]
    metrics = train_cross_encoder(ce, pairs, scores, cfg, tmp_path / "ce", eval_pairs=pairs, eval_scores=scores)
    assert set(metrics) >= {"cross_spearman", "cross_pearson"}
    assert any(not torch.equal(a, b) for a, b in zip(before, ce.parameters()))
    again = CrossEncoder.from_pretrained(tmp_path / "ce" / "model")
    assert np.abs(again.predict(pairs, placement=_fp32()) - ce.predict(pairs, placement=_fp32())).max() < 1e-6
