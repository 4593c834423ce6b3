"""Sentence-embedding losses and embedding-quality measures.

Contrastive (InfoNCE / multiple-negatives ranking, as in SimCSE and sentence-transformers),
regression on cosine similarity, CoSENT, the SBERT NLI softmax classifier, and Wang &
Isola's alignment / uniformity. All functions take embeddings and return tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "alignment",
    "cosent_loss",
    "cosine_similarity_loss",
    "info_nce",
    "multiple_negatives_ranking_loss",
    "softmax_nli_logits",
    "softmax_nli_loss",
    "uniformity",
]


def _candidates(positives: Tensor, negatives: Tensor | None) -> tuple[Tensor, int]:
    """Stack positives and hard negatives as candidate rows; returns ``(B + B*K, D)`` and K.

    Order: all positives, then the first negative of every anchor, then the second, ...
    """
    if negatives is None:
        return positives, 0
    if negatives.dim() == 2:
        negatives = negatives[:, None]  # (B, 1, D)
    if negatives.shape[0] != positives.shape[0] or negatives.shape[-1] != positives.shape[-1]:
        raise ValueError(f"negatives {tuple(negatives.shape)} do not match positives {tuple(positives.shape)}")
    k = negatives.shape[1]
    flat = negatives.transpose(0, 1).reshape(-1, positives.shape[-1])  # (K*B, D)
    return torch.cat([positives, flat], dim=0), k  # (B + K*B, D)


def _false_negative_mask(anchor_ids: Tensor, candidate_ids: Tensor, batch: int, k: int) -> Tensor:
    """``(B, B + K*B)`` bool: candidate j has anchor i's key but is not its target i.

    ``candidate_ids`` is ``(B,)`` (positives only; hard negatives are then never masked)
    or ``(B, 1+K)``, flattened into the candidate order of ``_candidates``.
    """
    n_cand = batch * (1 + k)
    has_id = torch.ones(n_cand, dtype=torch.bool, device=anchor_ids.device)  # (B + K*B,)
    if candidate_ids.dim() == 1:
        if candidate_ids.shape[0] != batch:
            raise ValueError(f"candidate_ids of shape {tuple(candidate_ids.shape)}, expected ({batch},)")
        flat = torch.cat([candidate_ids, candidate_ids.new_zeros(k * batch)])  # (B + K*B,)
        has_id[batch:] = False
    elif candidate_ids.shape == (batch, 1 + k):
        flat = candidate_ids.T.reshape(-1)  # (B + K*B,)
    else:
        raise ValueError(f"candidate_ids of shape {tuple(candidate_ids.shape)}, expected ({batch}, {1 + k})")
    mask = (anchor_ids.view(-1, 1) == flat.view(1, -1)) & has_id  # (B, B + K*B)
    diag = torch.arange(batch, device=mask.device)
    mask[diag, diag] = False
    return mask


def multiple_negatives_ranking_loss(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    *,
    scale: float = 20.0,
    symmetric: bool = False,
    anchor_ids: Tensor | None = None,
    candidate_ids: Tensor | None = None,
) -> Tensor:
    """Multiple-negatives ranking loss (Henderson et al. 2017; sentence-transformers' MNRL).

    With cosine similarities ``s(a, c)`` and candidates ``C`` = all positives of the
    batch plus all hard negatives (every anchor's negatives are negatives for every
    anchor):

        L_fwd = -(1/B) sum_i log [ exp(scale s(a_i, p_i)) / sum_{c in C} exp(scale s(a_i, c)) ]

    ``symmetric=True`` averages it with the backward direction, where each positive
    ranks the anchors (``MultipleNegativesSymmetricRankingLoss``):
    ``L = (L_fwd + L_bwd) / 2`` with
    ``L_bwd = -(1/B) sum_i log [ exp(scale s(p_i, a_i)) / sum_k exp(scale s(p_i, a_k)) ]``.

    False-negative masking: ids are match keys. Candidate ``j`` is excluded (logit
    ``-inf``) for anchor ``i`` when ``candidate_ids[j] == anchor_ids[i]`` and ``j`` is not
    the target ``p_i``. Typical use: text hashes, where ``anchor_ids`` defaults to the ids
    of the positives, so duplicates of an anchor's positive elsewhere in the batch are not
    treated as negatives. The backward direction uses the transposed positive block.

    Args:
        anchors: ``(B, D)`` anchor embeddings (SimCSE-unsup: first dropout view).
        positives: ``(B, D)`` positive embeddings (second view / entailment).
        negatives: ``None``, ``(B, D)`` or ``(B, K, D)`` hard negatives (e.g. contradictions).
        scale: multiplier of the cosine similarities (``1 / temperature``).
        symmetric: add the positive -> anchor direction.
        anchor_ids: ``(B,)`` integer match key of each anchor (default: its positive's id).
        candidate_ids: ``(B,)`` ids of the positives (default: ``anchor_ids``), or
            ``(B, 1+K)`` ids of ``[positive, negative_1, ..., negative_K]`` per row.

    Returns:
        0-dim loss (mean over anchors).
    """
    batch = anchors.shape[0]
    cands, k = _candidates(positives, negatives)  # (B + K*B, D)
    a = F.normalize(anchors, p=2, dim=-1)  # (B, D)
    c = F.normalize(cands, p=2, dim=-1)  # (B + K*B, D)
    scores = scale * (a @ c.T)  # (B, B + K*B)
    mask = None
    if anchor_ids is not None or candidate_ids is not None:
        if candidate_ids is None:
            candidate_ids = anchor_ids  # positives carry their pair's key; negatives none
        if anchor_ids is None:
            anchor_ids = candidate_ids if candidate_ids.dim() == 1 else candidate_ids[:, 0]
        mask = _false_negative_mask(anchor_ids, candidate_ids, batch, k)  # (B, B + K*B)
        scores = scores.masked_fill(mask, float("-inf"))
    target = torch.arange(batch, device=scores.device)
    loss = F.cross_entropy(scores, target)
    if not symmetric:
        return loss
    back = scale * (c[:batch] @ a.T)  # (B, B): positive i vs anchor k
    if mask is not None:
        back = back.masked_fill(mask[:, :batch].T, float("-inf"))
    return 0.5 * (loss + F.cross_entropy(back, target))


def info_nce(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    anchor_ids: Tensor | None = None,
    candidate_ids: Tensor | None = None,
) -> Tensor:
    """InfoNCE with in-batch negatives (van den Oord et al. 2018; SimCSE, Gao et al. 2021, Eq. 1/5).

    ``L = -(1/B) sum_i log [ e^{s(a_i, p_i)/tau} / sum_{c} e^{s(a_i, c)/tau} ]`` with cosine
    ``s``. Unsupervised SimCSE: ``anchors`` and ``positives`` are two dropout views of the
    same sentences. Supervised SimCSE: entailment positives and contradiction
    ``negatives``. Identical to :func:`multiple_negatives_ranking_loss` with
    ``scale = 1 / temperature``; see it for the shapes, ``symmetric`` and the id masking.

    Returns:
        0-dim loss.
    """
    return multiple_negatives_ranking_loss(
        anchors,
        positives,
        negatives,
        scale=1.0 / temperature,
        symmetric=symmetric,
        anchor_ids=anchor_ids,
        candidate_ids=candidate_ids,
    )


def cosine_similarity_loss(u: Tensor, v: Tensor, scores: Tensor) -> Tensor:
    """Regress cosine similarity onto gold scores (SBERT, Reimers & Gurevych 2019, Sec. 3).

    ``L = (1/B) sum_i (cos(u_i, v_i) - y_i)^2``.

    Args:
        u: ``(B, D)`` first embeddings.
        v: ``(B, D)`` second embeddings.
        scores: ``(B,)`` targets, already normalised by the caller (to [0, 1] or [-1, 1]).

    Returns:
        0-dim loss.
    """
    cos = F.cosine_similarity(u, v, dim=-1)  # (B,)
    return F.mse_loss(cos, scores.to(cos.dtype).view(-1))


def cosent_loss(u: Tensor, v: Tensor, scores: Tensor, *, scale: float = 20.0) -> Tensor:
    """CoSENT (Su 2022; Huang et al. 2024), a ranking loss on pair cosines.

    For every two pairs ``i, j`` of the batch whose gold scores satisfy ``y_i > y_j``, the
    cosine of ``i`` should exceed that of ``j``:

        L = log(1 + sum_{(i, j): y_i > y_j} exp(scale * (cos_j - cos_i)))

    Args:
        u: ``(B, D)`` first embeddings.
        v: ``(B, D)`` second embeddings.
        scores: ``(B,)`` gold similarities (only their order matters).
        scale: inverse temperature (sentence-transformers default 20).

    Returns:
        0-dim loss.
    """
    acc = torch.promote_types(u.dtype, torch.float32)  # fp16/bf16 -> fp32
    s = scale * F.cosine_similarity(u.to(acc), v.to(acc), dim=-1)  # (B,)
    y = scores.view(-1)
    diff = s[None, :] - s[:, None]  # (B, B): [i, j] = s_j - s_i
    higher = y[:, None] > y[None, :]  # (B, B): y_i > y_j
    terms = diff.masked_fill(~higher, float("-inf")).reshape(-1)  # (B*B,)
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def softmax_nli_logits(u: Tensor, v: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """SBERT NLI classifier logits (Reimers & Gurevych 2019, Eq. 1): ``W [u; v; |u - v|] + b``.

    Args:
        u: ``(B, D)`` premise embeddings.
        v: ``(B, D)`` hypothesis embeddings.
        weight: ``(C, 3D)`` classifier weight.
        bias: ``(C,)`` classifier bias or ``None``.

    Returns:
        ``(B, C)`` logits.
    """
    features = torch.cat([u, v, (u - v).abs()], dim=-1)  # (B, 3D)
    return F.linear(features.to(weight.dtype), weight, bias)  # (B, C)


def softmax_nli_loss(u: Tensor, v: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Cross-entropy of :func:`softmax_nli_logits` against class ``labels`` ``(B,)``; 0-dim mean."""
    return F.cross_entropy(softmax_nli_logits(u, v, weight, bias), labels.view(-1))


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment of positive pairs (Wang & Isola 2020, Eq. 4): ``E ||f(x) - f(y)||_2^alpha``.

    Inputs are L2-normalised here. Lower is better.

    Args:
        x: ``(B, D)`` embeddings; ``y``: ``(B, D)`` embeddings of their positives.
        alpha: exponent (paper default 2).

    Returns:
        0-dim tensor, fp32 (fp64 for fp64 inputs).
    """
    xn = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)  # (B, D)
    yn = F.normalize(y.to(xn.dtype), dim=-1)  # (B, D)
    return (xn - yn).norm(p=2, dim=-1).pow(alpha).mean()


def uniformity(x: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity on the hypersphere (Wang & Isola 2020, Eq. 5).

    ``log E_{i<j} exp(-t ||f(x_i) - f(x_j)||_2^2)`` over distinct pairs, computed as a
    log-sum-exp. Inputs are L2-normalised here. Lower (more negative) is better.

    Args:
        x: ``(N, D)`` embeddings, ``N >= 2``.
        t: kernel parameter (paper default 2).

    Returns:
        0-dim tensor, fp32 (fp64 for fp64 inputs).
    """
    if x.shape[0] < 2:
        raise ValueError("uniformity needs at least two embeddings")
    xn = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)  # (N, D)
    sq = torch.pdist(xn, p=2).pow(2)  # (N*(N-1)/2,)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())
