"""Per-pair preference outcomes in file order and the paired accuracy difference (issue 23)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.bootstrap import paired_bootstrap_ci
from lmforge.eval.preference_pairs import (compare_reports, pair_key, paired_accuracy_difference,
                                           pairs_in_file_order, read_pairs)

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
KEYS = [pair_key(r) for r in ROWS]


def test_pair_key_is_the_row_content_whatever_the_column_order():
    assert pair_key({"a": 1, "b": "x"}) == pair_key({"b": "x", "a": 1})
    assert pair_key({"a": 1, "b": "x"}) != pair_key({"a": 1, "b": "y"})
    assert len(KEYS[0]) == 16 and len(set(KEYS)) == 4


def test_pairs_are_sorted_into_file_order():
    # scored in batch order rows 2, 0, 3, 1 (margins given in that order)
    out = pairs_in_file_order([2, 0, 3, 1], [KEYS[2], KEYS[0], KEYS[3], KEYS[1]], [0.2, -0.5, 1.0, 0.0])
    assert out == {"index": [0, 1, 2, 3], "key": KEYS, "margin": [-0.5, 0.0, 0.2, 1.0]}
    with pytest.raises(LmforgeError, match="must be equal"):
        pairs_in_file_order([0, 1], KEYS[:2], [0.1])


def test_paired_difference_by_hand():
    # A right on pairs 0, 2, 3; B right on pair 2 only (a tie, margin 0, is a miss):
    # acc A = 3/4, acc B = 1/4, diff = (a_only 2 - b_only 0) / 4 = 0.5
    a = {"key": KEYS, "margin": [1.0, -1.0, 2.0, 0.5]}
    b = {"key": KEYS[::-1], "margin": [0.0, 3.0, -1.0, -1.0]}  # B's report lists the pairs in another order
    out = paired_accuracy_difference(a, b)
    assert (out["n"], out["accuracy_a"], out["accuracy_b"], out["accuracy_diff"]) == (4, 0.75, 0.25, 0.5)
    assert (out["a_only"], out["b_only"]) == (2, 0)
    # the interval is the paired bootstrap of the aligned 0/1 vectors (the same draws)
    assert out["accuracy_diff_ci95"] == list(paired_bootstrap_ci([1, 0, 1, 1], [0, 0, 1, 0]))
    lo, hi = out["accuracy_diff_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0  # d = [1, 0, 0, 1]: every resample mean is in [0, 1]


def test_identical_runs_differ_by_zero_and_a_sure_win_by_one():
    a = {"key": KEYS, "margin": [1.0, 2.0, 3.0, 4.0]}
    same = paired_accuracy_difference(a, a)
    assert same["accuracy_diff"] == 0.0 and same["accuracy_diff_ci95"] == [0.0, 0.0]
    worse = {"key": KEYS, "margin": [-1.0, -2.0, -3.0, -4.0]}
    assert paired_accuracy_difference(a, worse)["accuracy_diff_ci95"] == [1.0, 1.0]


def test_pairing_is_narrower_than_the_runs_own_intervals():
    rng = np.random.default_rng(0)
    n = 200
    keys = [f"{i:016x}" for i in range(n)]
    base = rng.normal(0.1, 1.0, n)
    flip = rng.random(n) < 0.05  # B disagrees with A on ~5% of the pairs
    a = {"key": keys, "margin": base.tolist()}
    b = {"key": keys, "margin": np.where(flip, -base, base).tolist()}
    lo, hi = paired_accuracy_difference(a, b)["accuracy_diff_ci95"]
    from lmforge.eval.bootstrap import bootstrap_ci

    alo, ahi = bootstrap_ci((base > 0).astype(float))
    assert hi - lo < 0.5 * (ahi - alo)


def test_different_pairs_are_one_line_errors(tmp_path):
    a = {"key": KEYS, "margin": [1.0] * 4}
    with pytest.raises(LmforgeError, match="3 of them the same pairs"):
        paired_accuracy_difference(a, {"key": KEYS[:3], "margin": [1.0] * 3}, names=("A", "B"))
    with pytest.raises(LmforgeError, match="duplicate"):
        paired_accuracy_difference(a, {"key": KEYS[:3] + KEYS[:1], "margin": [1.0] * 4})
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(LmforgeError, match="no per-pair outcomes"):
        read_pairs(old)
    with pytest.raises(LmforgeError, match="no such report"):
        read_pairs(tmp_path / "missing.json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"pairs": a}))
    assert compare_reports(good, good)["n"] == 4
