"""Hand-computed checks for lmforge.eval.metrics."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.metrics import (
    classification_report,
    ner_report,
    perplexity,
    perplexity_report,
    preference_report,
    sts_report,
)


def _assert_plain_json(obj) -> None:
    """Only python scalars/containers: json round-trips and no numpy types sneak in."""
    assert json.loads(json.dumps(obj, allow_nan=False)) == obj

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert type(x) in (int, float, str, type(None)), type(x)

    walk(obj)


# ---------------------------------------------------------------- classification


def test_classification_three_classes_by_hand():
    y_true = [0, 0, 0, 1, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 1, 1, 2, 2, 0]
    rep = classification_report(y_true, y_pred, ["a", "b", "c"])
    # rows = true, cols = pred:
    # true a -> a, a, b       true b -> b, b, c       true c -> c, a
    assert rep["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert rep["accuracy"] == pytest.approx(5 / 8)  # diagonal 2 + 2 + 1 of 8
    # a: TP 2, FP 1 (column a, row c), FN 1 -> P = R = F = 2/3
    # b: TP 2, FP 1, FN 1 -> 2/3;  c: TP 1, FP 1, FN 1 -> 1/2
    assert rep["per_class"]["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert rep["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert rep["per_class"]["c"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)  # 11/18
    assert rep["weighted_f1"] == pytest.approx((3 * 2 / 3 + 3 * 2 / 3 + 2 * 1 / 2) / 8)
    assert rep["n"] == 8
    _assert_plain_json(rep)


def test_classification_class_never_predicted_is_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = classification_report(
            np.array([0, 1, 2, 2]), np.array([0, 1, 1, 1]), ["a", "b", "c"]
        )
    c = rep["per_class"]["c"]
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)
    # b: TP 1, FP 2 -> P = 1/3, R = 1, F = 2 * (1/3) / (4/3) = 1/2
    assert rep["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert rep["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert rep["macro_f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert rep["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 2, 0]]


def test_classification_macro_ignores_class_absent_from_both():
    rep = classification_report([0, 1, 1], [0, 1, 1], ["a", "b", "c", "d"])
    assert rep["macro_f1"] == 1.0  # c, d occur nowhere: not averaged in
    assert rep["per_class"]["d"]["support"] == 0
    assert rep["confusion_matrix"][3] == [0, 0, 0, 0]


def test_classification_accepts_tensors():
    rep = classification_report(torch.tensor([0, 1]), torch.tensor([1, 1]), ["x", "y"])
    assert rep["accuracy"] == 0.5
    assert rep["confusion_matrix"] == [[0, 1], [0, 1]]


@pytest.mark.parametrize(
    "y_true, y_pred, names",
    [
        ([0, 3], [0, 1], ["a", "b"]),  # id outside label range
        ([0, 1], [0], ["a", "b"]),  # length mismatch
        ([], [], ["a"]),  # empty
        ([0, 1], [0, 1], ["a", "a"]),  # duplicate names
        ([0.5, 1.0], [0, 1], ["a", "b"]),  # not class ids
    ],
)
def test_classification_bad_input(y_true, y_pred, names):
    with pytest.raises(LmforgeError):
        classification_report(y_true, y_pred, names)


# ---------------------------------------------------------------- NER


def test_ner_entity_split_across_tags():
    true = [["B-PER", "I-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "B-PER", "O", "B-LOC"]]
    rep = ner_report(true, pred)
    # gold: PER[0:3], LOC[4]; predicted: PER[0:2], PER[2], LOC[4]; only LOC matches.
    assert rep["precision"] == pytest.approx(1 / 3)
    assert rep["recall"] == pytest.approx(1 / 2)
    assert rep["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert rep["accuracy"] == pytest.approx(4 / 5)  # token 2 wrong
    assert rep["per_type"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rep["per_type"]["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert rep["n_sentences"] == 1
    _assert_plain_json(rep)


def test_ner_conlleval_vs_strict_iob2():
    true = [["B-PER", "I-PER", "O"], ["B-ORG", "O", "O"]]
    pred = [["I-PER", "I-PER", "O"], ["B-ORG", "O", "O"]]
    lenient = ner_report(true, pred)
    # conlleval: a chunk may start with I-PER, so PER[0:2] is found -> all correct.
    assert lenient["f1"] == 1.0
    strict = ner_report(true, pred, strict=True, scheme="IOB2")
    # IOB2: I-PER without B-PER is no entity -> 1 correct of 1 predicted, 2 gold.
    assert strict["precision"] == 1.0
    assert strict["recall"] == pytest.approx(1 / 2)
    assert strict["per_type"]["PER"]["recall"] == 0.0
    assert strict["accuracy"] == pytest.approx(5 / 6)  # tags compared token by token


def test_ner_bad_input():
    with pytest.raises(LmforgeError):
        ner_report([["O", "B-PER"]], [["O"]])
    with pytest.raises(LmforgeError):
        ner_report([["O"]], [["O"]], strict=True, scheme="XYZ")
    with pytest.raises(LmforgeError):
        ner_report([], [])


# ---------------------------------------------------------------- STS


def test_sts_known_values():
    rep = sts_report([1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0])
    assert rep["spearman"] == pytest.approx(1.0)  # monotone, not linear
    assert rep["pearson"] < 0.99
    # x = [1, 2, 3], y = [1, 2, 6]: dx = [-1, 0, 1], dy = [-2, -1, 3]
    # r = (2 + 0 + 3) / sqrt(2 * 14) = 5 / sqrt(28)
    rep = sts_report(np.array([1, 2, 3]), np.array([1, 2, 6]))
    assert rep["pearson"] == pytest.approx(5 / math.sqrt(28))
    assert rep["spearman"] == pytest.approx(1.0)
    assert rep["n"] == 3


def test_sts_spearman_with_tied_ranks():
    # gold [5, 6, 7, 8, 7] has ranks [1, 2, 3.5, 5, 3.5]; pred ranks [1..5].
    # dx = [-2, -1, 0, 1, 2], dy = [-2, -1, .5, 2, .5]: cov 8, sxx 10, syy 9.5
    rep = sts_report([0.1, 0.2, 0.3, 0.4, 0.5], [5, 6, 7, 8, 7])
    assert rep["spearman"] == pytest.approx(8 / math.sqrt(10 * 9.5))
    rev = sts_report([0.5, 0.4, 0.3, 0.2, 0.1], [5, 6, 7, 8, 7])
    assert rev["spearman"] == pytest.approx(-8 / math.sqrt(10 * 9.5))


def test_sts_constant_is_none_and_errors():
    rep = sts_report([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert rep == {"spearman": None, "pearson": None, "n": 3}
    _assert_plain_json(rep)
    with pytest.raises(LmforgeError):
        sts_report([1.0], [1.0])
    with pytest.raises(LmforgeError):
        sts_report([1.0, float("nan")], [1.0, 2.0])


# ---------------------------------------------------------------- preference


def test_preference_ties_count_zero():
    # margins = [1, 0, -1, 1]: two strict wins of four; the tie is a miss.
    rep = preference_report([1.0, 0.5, 2.0, 0.0], [0.0, 0.5, 3.0, -1.0])
    assert rep == {"accuracy": 0.5, "mean_margin": pytest.approx(0.25), "n": 4}
    _assert_plain_json(rep)


def test_preference_tensor_input_and_mismatch():
    chosen = torch.tensor([2.0, 3.0], dtype=torch.bfloat16)
    rep = preference_report(chosen, torch.tensor([1.0, 4.0]))
    assert rep["accuracy"] == 0.5
    assert rep["mean_margin"] == pytest.approx(0.0)
    with pytest.raises(LmforgeError):
        preference_report([1.0, 2.0], [1.0])


# ---------------------------------------------------------------- perplexity


def test_perplexity_by_hand():
    # two tokens each with p = 1/4: NLL sum = 2 * ln 4 -> mean ln 4 -> ppl 4
    assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    rep = perplexity_report(torch.tensor(3 * math.log(2)), 3)
    assert rep == {"nll": pytest.approx(math.log(2)), "perplexity": pytest.approx(2.0), "tokens": 3}
    assert type(rep["nll"]) is float and type(rep["tokens"]) is int


def test_perplexity_edge_cases():
    assert perplexity(1e6, 1) == math.inf
    assert perplexity(0.0, 5) == 1.0
    with pytest.raises(LmforgeError):
        perplexity(1.0, 0)
    with pytest.raises(LmforgeError):
        perplexity_report(float("nan"), 3)
