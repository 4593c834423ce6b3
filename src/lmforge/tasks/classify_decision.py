"""Per-class decision biases for macro-F1 (``classify.decision_bias: macro_f1``).

A classifier trained on imbalanced classes ranks well but its argmax favours the large classes.
Adding a bias ``b_c`` to each class's log-probability before the argmax moves the decision
boundaries without retraining: ``yhat = argmax_c (log p_c + b_c)``. The biases are fitted on the
validation split (never the test split) by coordinate ascent on macro-F1 over a grid, and saved
beside the weights as ``decision.json``; prediction then reports ``softmax(log p + b)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import LmforgeError

DECISION = "decision.json"
GRID = tuple(round(-2.0 + 0.1 * k, 1) for k in range(41))  # -2.0 .. 2.0


def macro_f1(labels: torch.Tensor, pred: torch.Tensor, n_classes: int) -> float:
    """Macro-averaged F1 over ``n_classes`` (a class absent from both gold and predictions counts 0,
    as scikit-learn's ``f1_score(average="macro", labels=range(C))``).

    Args:
        labels: (N,) int64 gold ids.
        pred: (N,) int64 predicted ids.
        n_classes: C.
    """
    conf = torch.bincount(labels * n_classes + pred, minlength=n_classes * n_classes).view(n_classes, n_classes)
    tp = conf.diag().double()
    denom = conf.sum(0).double() + conf.sum(1).double()  # predicted + gold = 2 tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return float(f1.mean())


def fit_decision_bias(logp: torch.Tensor, labels: torch.Tensor, grid: Sequence[float] = GRID,
                      rounds: int = 3) -> torch.Tensor:
    """Biases ``b`` (C,) maximising ``macro_f1(labels, argmax(logp + b))`` by coordinate ascent.

    Each round visits the classes in order and sets ``b_c`` to the grid value with the highest
    macro-F1, the others fixed (ties keep the current value, so ``b = 0`` stays unless a change
    helps). ``b`` is then shifted to mean 0 (adding a constant changes no argmax).

    Args:
        logp: (N, C) log-probabilities on the validation split.
        labels: (N,) int64 gold ids.
        grid: candidate values of each ``b_c``.
        rounds: passes over the classes.

    Returns:
        (C,) fp32 biases.
    """
    n_cls = logp.shape[1]
    b = torch.zeros(n_cls, dtype=logp.dtype)
    best = macro_f1(labels, logp.argmax(-1), n_cls)
    for _ in range(rounds):
        changed = False
        for c in range(n_cls):
            for g in grid:
                trial = b.clone()
                trial[c] = g
                f = macro_f1(labels, (logp + trial).argmax(-1), n_cls)
                if f > best + 1e-12:
                    best, b, changed = f, trial, True
        if not changed:
            break
    return (b - b.mean()).float()


def apply_bias(probs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``softmax(log p + b)``: (N, C) probabilities with the decision biases applied (None: unchanged)."""
    if bias is None:
        return probs
    return torch.softmax(probs.clamp_min(1e-12).log() + bias.to(probs.dtype), dim=-1)


def write_decision(folder: Path, bias: torch.Tensor, *, n: int, before: float, after: float) -> None:
    from ..rundir import write_json

    write_json(Path(folder) / DECISION, {"bias": [round(float(v), 4) for v in bias], "metric": "macro_f1",
                                         "fitted_on": "validation", "n": n,
                                         "macro_f1_before": before, "macro_f1_after": after})


def read_decision(folder: Path, n_classes: int) -> torch.Tensor | None:
    """The saved biases of a run's artefact folder, or None when it has no ``decision.json``."""
    f = Path(folder) / DECISION
    if not f.is_file():
        return None
    try:
        bias = json.loads(f.read_text(encoding="utf-8"))["bias"]
        out = torch.tensor([float(v) for v in bias])
    except (ValueError, KeyError, TypeError):
        raise LmforgeError(f"{f}: malformed (expected {{\"bias\": [one number per class]}})") from None
    if out.shape != (n_classes,) or not torch.isfinite(out).all():
        raise LmforgeError(f"{f}: 'bias' must hold {n_classes} finite numbers (one per label)")
    return out
