"""Classification losses for imbalanced and ordered labels: pure tensor functions.

Notation: ``B`` examples, ``C`` classes (ids ``0..C-1``; for ordered labels the id is the rank),
``z`` the model's outputs, ``y`` the gold class ids, ``w_c`` a per-class weight.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F


def class_weights(counts: Sequence[int], mode: Literal["balanced", "sqrt_balanced"] = "balanced") -> torch.Tensor:
    """Per-class weights from the training label counts.

    ``balanced`` (scikit-learn's): ``w_c = N / (C * n_c)``, so every class carries the same total
    weight; ``sqrt_balanced``: ``w_c = sqrt(N / (C * n_c))``, half-way in log space. A class with
    no training example gets weight 0 (it cannot be learnt from).

    Args:
        counts: (C,) training examples per class.
        mode: ``balanced`` or ``sqrt_balanced``.

    Returns:
        (C,) fp32 weights.
    """
    n = torch.tensor([float(c) for c in counts])
    w = torch.where(n > 0, n.sum() / (len(counts) * n.clamp_min(1.0)), torch.zeros_like(n))
    return w.sqrt() if mode == "sqrt_balanced" else w


def weighted_focal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                                 gamma: float = 0.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Class-weighted, focal, label-smoothed cross-entropy (Lin et al. 2017, eq. 5).

    ``l_i = -w_{y_i} (1 - p_{i,y_i})^gamma sum_c q_{i,c} log p_{i,c}`` with ``p = softmax(z)`` and
    ``q`` the smoothed target (``1 - eps + eps/C`` on ``y``, ``eps/C`` elsewhere); the loss is the
    weighted mean ``sum_i l_i / sum_i w_{y_i}`` (``torch.nn.functional.cross_entropy``'s reduction
    with ``weight``). ``gamma = 0``, no weight and no smoothing is plain cross-entropy.

    Args:
        logits: (B, C) raw scores.
        labels: (B,) int64 class ids.
        weight: (C,) per-class weights, or None for all ones.
        gamma: focusing parameter >= 0 (down-weights examples the model already gets right).
        label_smoothing: ``eps`` in [0, 1).

    Returns:
        scalar loss.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, C)
    n_cls = logits.shape[-1]
    q = torch.full_like(logp, label_smoothing / n_cls)
    q.scatter_(1, labels[:, None], 1.0 - label_smoothing + label_smoothing / n_cls)
    per = -(q * logp).sum(-1)  # (B,)
    if gamma:
        p_true = logp.gather(1, labels[:, None]).squeeze(1).exp()
        per = per * (1.0 - p_true).clamp_min(0.0).pow(gamma)
    w = weight.to(logp.device)[labels] if weight is not None else torch.ones_like(per)
    return (w * per).sum() / w.sum().clamp_min(1e-12)


def cumulative_link_loss(logits: torch.Tensor, labels: torch.Tensor,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Ordinal regression with cumulative binary logits (Frank & Hall 2001; CORN-style targets).

    Output ``k`` (``k = 0..C-2``) scores ``P(y > k) = sigmoid(z_k)``; its target is ``[y > k]``.
    ``l_i = w_{y_i} * mean_k BCE(z_{i,k}, [y_i > k])``, reduced as a weighted mean over examples.

    Args:
        logits: (B, C-1) threshold logits.
        labels: (B,) int64 ranks in ``[0, C)``.
        weight: (C,) per-class weights or None.

    Returns:
        scalar loss.
    """
    ks = torch.arange(logits.shape[-1], device=logits.device)
    target = (labels[:, None] > ks[None, :]).float()  # (B, C-1)
    per = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(-1)  # (B,)
    w = weight.to(per.device)[labels] if weight is not None else torch.ones_like(per)
    return (w * per).sum() / w.sum().clamp_min(1e-12)


def cumulative_link_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from cumulative logits.

    ``s_k = min_{j <= k} sigmoid(z_j)`` (made non-increasing), then ``P(y = 0) = 1 - s_0``,
    ``P(y = k) = s_{k-1} - s_k``, ``P(y = C-1) = s_{C-2}``: non-negative and summing to 1.

    Args:
        logits: (B, C-1).

    Returns:
        (B, C) probabilities.
    """
    s = torch.cummin(torch.sigmoid(logits.float()), dim=-1).values  # (B, C-1)
    ones, zeros = torch.ones_like(s[:, :1]), torch.zeros_like(s[:, :1])
    upper = torch.cat([ones, s], dim=-1)  # P(y > k-1), with P(y > -1) = 1
    lower = torch.cat([s, zeros], dim=-1)  # P(y > k)
    return upper - lower


def regression_loss(scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Ordinal labels as a number: ``l_i = w_{y_i} (z_i - y_i)^2``, weighted mean.

    Args:
        scores: (B, 1) or (B,) predicted rank.
        labels: (B,) int64 ranks.
        weight: (C,) per-class weights or None.

    Returns:
        scalar loss.
    """
    per = (scores.float().reshape(-1) - labels.float()) ** 2
    w = weight.to(per.device)[labels] if weight is not None else torch.ones_like(per)
    return (w * per).sum() / w.sum().clamp_min(1e-12)


def regression_probs(scores: torch.Tensor, n_classes: int) -> torch.Tensor:
    """A distribution over ranks peaked at the predicted value: ``softmax_c(-(z - c)^2)``.

    Its argmax is the nearest rank to ``z`` clamped to ``[0, C-1]`` (what ``predict`` returns);
    the spread is a convenience for tables, not a calibrated probability.

    Args:
        scores: (B, 1) or (B,) predicted ranks.
        n_classes: C.

    Returns:
        (B, C) probabilities.
    """
    c = torch.arange(n_classes, device=scores.device, dtype=torch.float32)
    return torch.softmax(-(scores.float().reshape(-1, 1) - c[None, :]) ** 2, dim=-1)
