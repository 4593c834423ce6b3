"""GradCache gives the plain in-batch loss's value and parameter gradients."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from lmforge.embeddings import SentenceEncoder
from lmforge.embeddings.cached import cached_embedding_loss, split_features
from lmforge.losses.contrastive import info_nce, multiple_negatives_ranking_loss

from ._helpers import sentences


def _encoder(tiny_bert_dir, dropout=0.0, dtype=torch.float64):
    cfg = AutoConfig.from_pretrained(tiny_bert_dir)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(tiny_bert_dir, config=cfg).to(dtype)
    from lmforge.models import load_tokenizer

    return SentenceEncoder(backbone, load_tokenizer(tiny_bert_dir), pooling="mean").train()


def _columns(enc, n=8):
    a, p, neg = sentences(n, 1), sentences(n, 2), sentences(n, 3)
    return [enc.collate(enc.tokenize(t)) for t in (a, p, neg)]


def _mnr(embs):
    return multiple_negatives_ranking_loss(embs[0], embs[1], embs[2], scale=20.0, symmetric=True)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mini", [1, 3, 8])
def test_cached_loss_and_gradients_equal_plain(tiny_bert_dir, mini):
    enc = _encoder(tiny_bert_dir)
    cols = _columns(enc)
    plain = _mnr([enc(**c) for c in cols])
    (0.7 * plain).backward()  # the engine scales by the accumulation weight
    want = _grads(enc)
    enc.zero_grad(set_to_none=True)

    cached = cached_embedding_loss(lambda f: enc(**f), [split_features(c, mini) for c in cols], _mnr)
    assert cached.item() == pytest.approx(plain.item(), abs=1e-10)
    (0.7 * cached).backward()
    got = _grads(enc)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-9, rtol=1e-7), name


def test_cached_replays_dropout_masks(tiny_bert_dir):
    """With dropout on, the re-embedding uses the cached pass's masks: same gradients as plain."""
    enc = _encoder(tiny_bert_dir, dropout=0.3)
    cols = _columns(enc)[:2]
    loss_fn = lambda e: info_nce(e[0], e[1], temperature=0.05)  # noqa: E731
    torch.manual_seed(123)
    plain = loss_fn([enc(**c) for c in cols])
    plain.backward()
    want = _grads(enc)
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    cached = cached_embedding_loss(lambda f: enc(**f), [[c] for c in cols], loss_fn)
    cached.backward()
    assert cached.item() == pytest.approx(plain.item(), abs=1e-10)
    for name, g in _grads(enc).items():
        assert torch.allclose(g, want[name], atol=1e-9), name


def test_split_features_trims_each_mini_batch():
    feats = {"input_ids": torch.tensor([[5, 6, 7], [5, 0, 0], [5, 6, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])}
    parts = split_features(feats, 2)
    assert [p["input_ids"].shape for p in parts] == [(2, 3), (1, 2)]
    assert parts[1]["input_ids"].tolist() == [[5, 6]]
