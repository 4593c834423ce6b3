"""Evaluation metrics as pure functions: numpy/array-likes in, JSON-ready dicts out.

Classification (scikit-learn), sequence labelling (seqeval), semantic textual
similarity (scipy), preference pairs and perplexity. Every returned value is a
python ``float``/``int``/``list``/``dict`` (or ``None`` where a statistic is
undefined), so the result can go straight into ``eval.json``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError

__all__ = [
    "classification_report",
    "ner_report",
    "perplexity",
    "perplexity_report",
    "preference_report",
    "sts_report",
]


def _as_1d(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D numpy array (lists, numpy arrays and CPU tensors accepted)."""
    if hasattr(values, "detach"):  # torch tensor (bf16/fp16 have no numpy dtype)
        values = values.detach().cpu()
        values = (values.float() if values.is_floating_point() else values).numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise LmforgeError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise LmforgeError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}")
    if len(a) == 0:
        raise LmforgeError(f"{name_a} and {name_b} are empty: nothing to evaluate")


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], label_names: list[str], *, ordinal: bool = False
) -> dict:
    """Accuracy, macro/weighted F1, per-class scores and the confusion matrix.

    For class c: ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
    ``f1 = 2 P R / (P + R)``; a 0/0 ratio is 0 (sklearn ``zero_division=0``), so
    classes never predicted are fine. ``macro_f1`` is the unweighted mean of F1
    over the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's default;
    a class absent from both does not drag the mean down); ``weighted_f1`` weights
    each class by its support in ``y_true``.

    Args:
        y_true: (N,) gold class ids in ``[0, len(label_names))``.
        y_pred: (N,) predicted class ids, same range.
        label_names: name of class ``i`` at index ``i``.
        ordinal: the class ids are ranks (1-5 stars): also report ``mae`` (mean ``|y - y_hat|``
            in ranks) and ``off_by_one_accuracy`` (share with ``|y - y_hat| <= 1``).

    Returns:
        ``{"accuracy", "macro_f1", "weighted_f1", "n",
        "per_class": {name: {"precision", "recall", "f1", "support"}},
        "confusion_matrix": C}`` with ``C[i][j]`` = number of samples of true class
        ``i`` predicted as ``j`` (rows = true, columns = predicted, in
        ``label_names`` order), plus ``macro_recall``, ``min_recall`` and
        ``never_predicted`` (classes with gold examples that no prediction names) with one
        human-readable line per such class in ``warnings``.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.metrics import precision_recall_fscore_support

    yt = _as_1d(y_true, "y_true")
    yp = _as_1d(y_pred, "y_pred")
    _same_length(yt, yp, "y_true", "y_pred")
    if len(set(label_names)) != len(label_names):
        raise LmforgeError(f"label_names has duplicates: {list(label_names)}")
    n_classes = len(label_names)
    for name, arr in (("y_true", yt), ("y_pred", yp)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise LmforgeError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= n_classes)]
        if bad.size:
            raise LmforgeError(
                f"{name} has class id {int(bad[0])} outside [0, {n_classes}) "
                f"for {n_classes} label names"
            )

    labels = list(range(n_classes))
    prec, rec, f1, support = precision_recall_fscore_support(
        yt, yp, labels=labels, average=None, zero_division=0
    )
    present = sorted(set(yt.tolist()) | set(yp.tolist()))
    macro = f1_score(yt, yp, labels=present, average="macro", zero_division=0)
    weighted = f1_score(yt, yp, labels=labels, average="weighted", zero_division=0)
    cm = confusion_matrix(yt, yp, labels=labels)  # (C, C) rows true, cols pred
    gold = [i for i in labels if support[i] > 0]
    never = [label_names[i] for i in gold if cm[:, i].sum() == 0]
    extra: dict = {
        "macro_recall": float(np.mean([rec[i] for i in gold])) if gold else 0.0,
        "min_recall": float(min(rec[i] for i in gold)) if gold else 0.0,
        "never_predicted": never,
        "warnings": [f"class '{c}' is never predicted ({int(support[label_names.index(c)])} gold examples)"
                     for c in never],
    }
    if ordinal:
        diff = np.abs(yt.astype(np.int64) - yp.astype(np.int64))
        extra |= {"mae": float(diff.mean()) if diff.size else 0.0,
                  "off_by_one_accuracy": float((diff <= 1).mean()) if diff.size else 0.0}
    out = {
        "accuracy": float(accuracy_score(yt, yp)),
        "macro_f1": float(macro),
        "weighted_f1": float(weighted),
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "n": int(len(yt)),
    }
    return out | extra


def ner_report(
    true_tags: list[list[str]],
    pred_tags: list[list[str]],
    *,
    strict: bool = False,
    scheme: str = "IOB2",
) -> dict:
    """Entity-level precision/recall/F1 (seqeval) plus token accuracy.

    An entity counts as correct only if its type and its exact span match.
    ``strict=False`` follows conlleval: a chunk may start with ``I-X`` and a type
    change inside a run of ``I-`` tags starts a new chunk. ``strict=True`` decodes
    chunks with the tagging ``scheme`` ("IOB1", "IOB2", "IOE1", "IOE2", "IOBES",
    "BILOU"), so ill-formed chunks (e.g. ``I-PER`` with no ``B-PER`` in IOB2) are
    not entities. Overall scores are micro-averaged over entities; 0/0 is 0.

    Args:
        true_tags: per sentence, the gold tag of every token.
        pred_tags: per sentence, the predicted tag of every token (same lengths).
        strict: decode entities with ``scheme`` instead of conlleval rules.
        scheme: tagging scheme used when ``strict`` is true.

    Returns:
        ``{"precision", "recall", "f1", "accuracy", "n_sentences",
        "per_type": {type: {"precision", "recall", "f1", "support"}}}`` where
        ``support`` is the number of gold entities of that type and ``accuracy``
        is the fraction of tokens whose tag is exactly right.
    """
    from seqeval import scheme as seqeval_schemes
    from seqeval.metrics import accuracy_score
    from seqeval.metrics import classification_report as seqeval_report

    if len(true_tags) != len(pred_tags):
        raise LmforgeError(
            f"true_tags has {len(true_tags)} sentences but pred_tags has {len(pred_tags)}"
        )
    if len(true_tags) == 0:
        raise LmforgeError("true_tags and pred_tags are empty: nothing to evaluate")
    for i, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise LmforgeError(f"sentence {i}: {len(t)} gold tags but {len(p)} predicted tags")
    true_tags = [list(t) for t in true_tags]
    pred_tags = [list(p) for p in pred_tags]

    kwargs: dict[str, Any] = {}
    if strict:
        scheme_cls = getattr(seqeval_schemes, scheme, None)
        if scheme_cls is None or scheme not in ("IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU"):
            raise LmforgeError(
                f"unknown tagging scheme {scheme!r}; use IOB1, IOB2, IOE1, IOE2, IOBES or BILOU"
            )
        kwargs = {"mode": "strict", "scheme": scheme_cls}
    try:
        rep = seqeval_report(true_tags, pred_tags, output_dict=True, zero_division=0, **kwargs)
    except ValueError as err:  # seqeval rejects tags that do not fit the strict scheme
        raise LmforgeError(f"tags do not fit scheme {scheme}: {err}") from None
    micro = rep.pop("micro avg")
    for key in ("macro avg", "weighted avg"):
        rep.pop(key, None)
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "accuracy": float(accuracy_score(true_tags, pred_tags)),
        "n_sentences": len(true_tags),
        "per_type": {
            etype: {
                "precision": float(s["precision"]),
                "recall": float(s["recall"]),
                "f1": float(s["f1-score"]),
                "support": int(s["support"]),
            }
            for etype, s in sorted(rep.items())
        },
    }


def sts_report(pred_scores: Sequence[float], gold_scores: Sequence[float]) -> dict:
    """Spearman and Pearson correlation between predicted and gold similarities.

    ``pearson = cov(x, y) / (std(x) std(y))``; ``spearman`` is the Pearson
    correlation of the ranks (ties get their average rank). Both lie in [-1, 1]
    (not scaled by 100). A correlation is undefined when either input is
    constant; it is then reported as ``None`` rather than NaN.

    Args:
        pred_scores: (N,) model similarities (e.g. cosine of the two embeddings).
        gold_scores: (N,) gold similarity judgements.

    Returns:
        ``{"spearman", "pearson", "n"}``.
    """
    from scipy.stats import pearsonr, spearmanr

    x = _as_1d(pred_scores, "pred_scores").astype(np.float64)
    y = _as_1d(gold_scores, "gold_scores").astype(np.float64)
    _same_length(x, y, "pred_scores", "gold_scores")
    if len(x) < 2:
        raise LmforgeError("sts_report needs at least 2 pairs to compute a correlation")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise LmforgeError("pred_scores and gold_scores must be finite (found NaN or inf)")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": None, "pearson": None, "n": int(len(x))}
    return {
        "spearman": float(spearmanr(x, y).statistic),
        "pearson": float(pearsonr(x, y).statistic),
        "n": int(len(x)),
    }


def preference_report(
    chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]
) -> dict:
    """Reward accuracy and margin over (chosen, rejected) pairs.

    ``accuracy = mean_i [r_chosen_i > r_rejected_i]`` -- strictly greater: a tie
    counts as a miss (0), not half. ``mean_margin = mean_i (r_chosen_i - r_rejected_i)``.
    For DPO the rewards are ``beta * (log pi(y|x) - log pi_ref(y|x))``.

    Args:
        chosen_rewards: (N,) reward of each preferred response.
        rejected_rewards: (N,) reward of each dispreferred response.

    Returns:
        ``{"accuracy", "mean_margin", "n"}``.
    """
    c = _as_1d(chosen_rewards, "chosen_rewards").astype(np.float64)
    r = _as_1d(rejected_rewards, "rejected_rewards").astype(np.float64)
    _same_length(c, r, "chosen_rewards", "rejected_rewards")
    margin = c - r  # (N,)
    return {
        "accuracy": float(np.mean(margin > 0)),
        "mean_margin": float(np.mean(margin)),
        "n": int(len(c)),
    }


def _mean_nll(total_nll: float, total_tokens: int) -> tuple[float, int]:
    nll = float(total_nll)
    tokens = int(total_tokens)
    if tokens <= 0:
        raise LmforgeError(f"perplexity needs a positive token count, got {tokens}")
    if not math.isfinite(nll):
        raise LmforgeError(f"total NLL is not finite ({nll})")
    return nll / tokens, tokens


def perplexity(total_nll: float, total_tokens: int) -> float:
    """Token-level perplexity ``exp(total_nll / total_tokens)``.

    Args:
        total_nll: sum of ``-log p(token)`` (natural log) over all scored tokens.
        total_tokens: number of scored tokens (padding and prompt tokens excluded).

    Returns:
        The perplexity; ``inf`` if the mean NLL overflows ``exp``.
    """
    mean, _ = _mean_nll(total_nll, total_tokens)
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


def perplexity_report(nll_sum: float, tokens: int) -> dict:
    """``{"nll": nll_sum / tokens, "perplexity": exp(nll), "tokens": tokens}``.

    Args:
        nll_sum: summed natural-log NLL over the scored tokens (float or 0-d tensor).
        tokens: number of scored tokens.
    """
    mean, n = _mean_nll(nll_sum, tokens)
    return {"nll": mean, "perplexity": perplexity(nll_sum, n), "tokens": n}
