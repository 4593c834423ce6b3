"""Sentence-embedding losses: hand-computed values and parity with sentence-transformers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.losses.contrastive import (
    alignment,
    cosent_loss,
    cosine_similarity_loss,
    info_nce,
    multiple_negatives_ranking_loss,
    softmax_nli_logits,
    softmax_nli_loss,
    uniformity,
)

R2 = math.sqrt(0.5)


def _emb(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed

def test_info_nce_hand():
    # cos(a1,p1)=1, cos(a1,p2)=1/sqrt2, cos(a2,p1)=0, cos(a2,p2)=1/sqrt2; tau=0.5 -> scale 2
    anchors = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    positives = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    s = 2 * R2
    l1 = -(2.0 - math.log(math.exp(2.0) + math.exp(s)))
    l2 = -(s - math.log(math.exp(0.0) + math.exp(s)))
    got = info_nce(anchors, positives, temperature=0.5)
    assert got.item() == pytest.approx((l1 + l2) / 2, abs=1e-12)
    # one hard negative per anchor: n1 = (0, 1) (cos 0 with a1, 1 with a2), n2 = (-1, 0) (cos -1, 0)
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    l1 = -(2.0 - math.log(math.exp(2.0) + math.exp(s) + math.exp(0.0) + math.exp(-2.0)))
    l2 = -(s - math.log(math.exp(0.0) + math.exp(s) + math.exp(2.0) + math.exp(0.0)))
    got = info_nce(anchors, positives, negatives, temperature=0.5)
    assert got.item() == pytest.approx((l1 + l2) / 2, abs=1e-12)


def test_symmetric_hand():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    positives = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    s = 2 * R2
    fwd = (-(2.0 - math.log(math.exp(2.0) + math.exp(s))) - (s - math.log(1.0 + math.exp(s)))) / 2
    # backward: p1 ranks anchors (cos 1, 0), p2 ranks anchors (cos 1/sqrt2, 1/sqrt2)
    bwd = (-(2.0 - math.log(math.exp(2.0) + 1.0)) - (s - math.log(2 * math.exp(s)))) / 2
    got = info_nce(anchors, positives, temperature=0.5, symmetric=True)
    assert got.item() == pytest.approx((fwd + bwd) / 2, abs=1e-12)


def test_mnrl_is_info_nce_with_inverse_temperature():
    a, p, n = _emb(6, 5, seed=1), _emb(6, 5, seed=2), _emb(6, 3, 5, seed=3)
    for sym in (False, True):
        torch.testing.assert_close(
            multiple_negatives_ranking_loss(a, p, n, scale=20.0, symmetric=sym),
            info_nce(a, p, n, temperature=0.05, symmetric=sym),
        )


def test_hard_negative_shapes_agree():
    a, p, n = _emb(4, 5, seed=1), _emb(4, 5, seed=2), _emb(4, 5, seed=3)
    torch.testing.assert_close(info_nce(a, p, n), info_nce(a, p, n[:, None]))


def test_false_negative_masking_hand():
    # both pairs share the same positive text (id 7): each anchor's other candidate is a
    # duplicate of its own positive and is masked, leaving only the target -> loss 0
    a, p = _emb(2, 4, seed=1), _emb(2, 4, seed=2)
    ids = torch.tensor([7, 7])
    assert info_nce(a, p, candidate_ids=ids).item() == pytest.approx(0.0, abs=1e-12)
    assert info_nce(a, p, candidate_ids=ids, symmetric=True).item() == pytest.approx(0.0, abs=1e-12)
    # distinct ids change nothing
    torch.testing.assert_close(info_nce(a, p, candidate_ids=torch.tensor([1, 2])), info_nce(a, p))


def test_false_negative_masking_hard_negatives():
    a, p, n = _emb(3, 4, seed=1), _emb(3, 4, seed=2), _emb(3, 4, seed=3)
    # anchor 0's hard negative carries anchor 1's positive id (5): masked for anchor 1 only
    ids = torch.tensor([[4, 5], [5, 8], [6, 9]])  # (B, 1 + K): [positive id, negative id]
    got = info_nce(a, p, n, candidate_ids=ids, temperature=0.1)
    scores = 10.0 * F.normalize(a, dim=-1) @ F.normalize(torch.cat([p, n]), dim=-1).T  # (3, 6)
    scores[1, 3] = float("-inf")
    torch.testing.assert_close(got, F.cross_entropy(scores, torch.arange(3)))
    # group ids via anchor_ids: pairs 0 and 2 share a query, so each other's positive is masked
    got = info_nce(a, p, anchor_ids=torch.tensor([0, 1, 0]), temperature=0.1)
    scores = 10.0 * F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T
    scores[0, 2] = scores[2, 0] = float("-inf")
    torch.testing.assert_close(got, F.cross_entropy(scores, torch.arange(3)))


def test_cosine_similarity_loss_hand():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    assert cosine_similarity_loss(u, v, torch.tensor([1.0, 0.5])).item() == pytest.approx(0.125)


def test_cosent_hand():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # cos = (1, 0)
    assert cosent_loss(u, v, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log1p(math.exp(-20.0)), rel=1e-9)
    assert cosent_loss(u, v, torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log1p(math.exp(20.0)))
    assert cosent_loss(u, v, torch.tensor([0.3, 0.3])).item() == 0.0  # ties carry no ranking
    # three pairs, cos (1, 0, 1/sqrt2), labels (2, 0, 1), scale 2: ordered pairs (0>1), (0>2), (2>1)
    u3 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    v3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    want = math.log(1 + math.exp(2 * (0 - 1)) + math.exp(2 * (R2 - 1)) + math.exp(2 * (0 - R2)))
    assert cosent_loss(u3, v3, torch.tensor([2.0, 0.0, 1.0]), scale=2.0).item() == pytest.approx(want, rel=1e-6)


def test_softmax_nli_hand():
    u = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[3.0, 1.0]])  # features (1, 2, 3, 1, 2, 1)
    weight = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0, 1.0], [0, 0, 0, 0, 0, 0]])
    bias = torch.tensor([0.0, 0.0, 1.0])
    logits = softmax_nli_logits(u, v, weight, bias)
    assert logits.tolist() == [[1.0, 3.0, 1.0]]
    got = softmax_nli_loss(u, v, torch.tensor([1]), weight, bias)
    assert got.item() == pytest.approx(math.log(math.exp(1) + math.exp(3) + math.exp(1)) - 3.0, rel=1e-6)


def test_alignment_hand():
    x = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 5.0], [3.0, 3.0]])  # pair 0 orthogonal (|d|^2 = 2), pair 1 identical
    assert alignment(x, y).item() == pytest.approx(1.0, abs=1e-6)
    assert alignment(x, y, alpha=1).item() == pytest.approx(math.sqrt(2) / 2, abs=1e-6)


def test_uniformity_hand():
    x = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])  # antipodal: |d|^2 = 4
    assert uniformity(x).item() == pytest.approx(-8.0, abs=1e-6)
    x3 = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])  # squared distances 4, 2, 2
    want = math.log((math.exp(-8.0) + 2 * math.exp(-4.0)) / 3)
    assert uniformity(x3).item() == pytest.approx(want, abs=1e-6)
    # the expression in Wang & Isola's paper appendix
    z = _emb(10, 6, seed=4).float()
    zn = F.normalize(z, dim=-1)
    assert uniformity(z).item() == pytest.approx(torch.pdist(zn).pow(2).mul(-2).exp().mean().log().item(), abs=1e-5)


# ---------------------------------------------------------------- sentence-transformers parity

@pytest.fixture(scope="module")
def st_model():
    """A tiny SentenceTransformer (static word embeddings) built offline."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat ran on mat fast slow big small red blue".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[PAD]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    return SentenceTransformer(modules=[StaticEmbedding(tok, embedding_dim=8)], device="cpu")


def _st_losses():
    from sentence_transformers.sentence_transformer import losses

    return losses


@pytest.mark.parametrize("n_neg", [0, 1, 3])
@pytest.mark.parametrize("scale", [20.0, 7.5])
def test_mnrl_matches_sentence_transformers(st_model, n_neg, scale):
    a, p = _emb(8, 16, seed=1).float(), _emb(8, 16, seed=2).float()
    negs = [_emb(8, 16, seed=10 + k).float() for k in range(n_neg)]
    st = _st_losses().MultipleNegativesRankingLoss(st_model, scale=scale)
    want = st.compute_loss_from_embeddings([a, p, *negs], None)
    neg = torch.stack(negs, dim=1) if negs else None  # (B, K, D)
    got = multiple_negatives_ranking_loss(a, p, neg, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info_nce(a, p, neg, temperature=1.0 / scale), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_neg", [0, 2])
def test_symmetric_mnrl_matches_sentence_transformers(st_model, n_neg):
    """ST's symmetric InfoNCE (what MultipleNegativesSymmetricRankingLoss, now deprecated, configures)."""
    a, p = _emb(8, 16, seed=1).float(), _emb(8, 16, seed=2).float()
    negs = [_emb(8, 16, seed=10 + k).float() for k in range(n_neg)]
    st = _st_losses().MultipleNegativesRankingLoss(
        st_model, scale=20.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
    )
    want = st.compute_loss_from_embeddings([a, p, *negs], None)
    neg = torch.stack(negs, dim=1) if negs else None
    got = multiple_negatives_ranking_loss(a, p, neg, scale=20.0, symmetric=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mnrl_gradients_match_sentence_transformers(st_model):
    a, p, n = (_emb(6, 16, seed=s).float().requires_grad_() for s in (1, 2, 3))
    st = _st_losses().MultipleNegativesRankingLoss(st_model, scale=20.0)
    want = torch.autograd.grad(st.compute_loss_from_embeddings([a, p, n], None), (a, p, n))
    got = torch.autograd.grad(multiple_negatives_ranking_loss(a, p, n, scale=20.0), (a, p, n))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [20.0, 5.0])
def test_cosent_matches_sentence_transformers(st_model, scale):
    u, v = _emb(12, 16, seed=1).float(), _emb(12, 16, seed=2).float()
    labels = torch.tensor([0.0, 0.2, 1.0, 0.4, 0.4, 0.8, 0.0, 0.6, 1.0, 0.2, 0.5, 0.9])  # with ties
    want = _st_losses().CoSENTLoss(st_model, scale=scale).compute_loss_from_embeddings([u, v], labels)
    torch.testing.assert_close(cosent_loss(u, v, labels, scale=scale), want, rtol=1e-5, atol=1e-5)


def test_cosine_similarity_loss_matches_sentence_transformers(st_model):
    u, v = _emb(12, 16, seed=1).float(), _emb(12, 16, seed=2).float()
    labels = torch.rand(12, generator=torch.Generator().manual_seed(5))
    want = _st_losses().CosineSimilarityLoss(st_model).compute_loss_from_embeddings([u, v], labels)
    torch.testing.assert_close(cosine_similarity_loss(u, v, labels), want, rtol=1e-5, atol=1e-5)


def test_softmax_nli_matches_sentence_transformers(st_model):
    premises = ["the cat sat on the mat", "a dog ran fast", "the big red dog", "a small blue cat"]
    hypotheses = ["a cat sat", "the dog sat", "a red dog ran", "the mat"]
    labels = torch.tensor([0, 2, 1, 2])
    st = _st_losses().SoftmaxLoss(st_model, st_model.get_embedding_dimension(), 3)
    want = st([st_model.preprocess(premises), st_model.preprocess(hypotheses)], labels)
    u = st_model(st_model.preprocess(premises))["sentence_embedding"]
    v = st_model(st_model.preprocess(hypotheses))["sentence_embedding"]
    got = softmax_nli_loss(u, v, labels, st.classifier.weight, st.classifier.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
