"""bench/rag_boolq.py's report statistics: per-question citation scores and bootstrap intervals."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "rag_boolq", Path(__file__).resolve().parents[2] / "bench" / "rag_boolq.py")
rag_boolq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rag_boolq)


def test_per_question_scores_by_hand():
    rs = [{"i": 7, "pred": True, "gold": True, "citations": [1, 2], "gold_at": [2]},   # right, P 1/2, R 1
          {"i": 8, "pred": None, "gold": False, "citations": [], "gold_at": [1, 3]},   # wrong, P -, R 0
          {"i": 9, "pred": False, "gold": True, "citations": [3], "gold_at": []}]      # wrong, P 0, R -
    assert rag_boolq._per_question(rs) == {7: (1.0, 0.5, 1.0), 8: (0.0, None, 0.0), 9: (0.0, 0.0, None)}


def test_bootstrap_constant_undefined_and_paired_columns():
    rows = [[1.0, None, 1.0, 0.0], [0.0, None, 0.0, 1.0], [1.0, None, 1.0, 1.0], [0.0, None, 0.0, 1.0]]
    ci = rag_boolq.bootstrap([r + [1.0] for r in rows], reps=500, seed=3)
    assert ci[1] is None                      # never defined
    assert ci[0] == ci[2]                     # the same rows resampled for every column (paired)
    assert ci[4] == [1.0, 1.0]                # a constant has a zero-width interval
    lo, hi = ci[0]
    assert 0.0 <= lo < 0.5 < hi <= 1.0        # mean 0.5 inside, and the interval has width
    assert rag_boolq.bootstrap([r + [1.0] for r in rows], reps=500, seed=3) == ci  # seeded


def test_bootstrap_mean_over_defined_entries_only():
    # precision-like column: undefined rows are skipped, not counted as 0
    ci = rag_boolq.bootstrap([[1.0], [None], [1.0], [None]], reps=200)
    assert ci == [[1.0, 1.0]]
    with pytest.raises(Exception):
        rag_boolq.bootstrap([[1.0, 2.0], [1.0]])  # ragged rows are a bug, not data
