"""Constrained BIO decoding (ner.decoding: bio): transitions, Viterbi by hand and by brute force,
and the task's word tags with cut-off words."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from lmforge.tasks.ner import NerConfig, NerTask, bio_transitions, bio_viterbi

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def _valid(seq, start, allowed):
    return bool(start[seq[0]]) and all(bool(allowed[a, b]) for a, b in zip(seq, seq[1:]))


def test_bio_transitions_by_hand():
    start, allowed = bio_transitions(LABELS)
    assert start.tolist() == [True, True, False, True, False]
    assert allowed.tolist() == [
        # to: O     B-LOC  I-LOC  B-PER  I-PER
        [True, True, False, True, False],   # from O
        [True, True, True, True, False],    # from B-LOC
        [True, True, True, True, False],    # from I-LOC
        [True, True, False, True, True],    # from B-PER
        [True, True, False, True, True],    # from I-PER
    ]


def test_viterbi_hand_example():
    start, allowed = bio_transitions(LABELS)
    # word 0: O 0.5, I-PER 0.4 (argmax O); word 1: I-PER 0.6, O 0.3 (argmax I-PER: invalid after O)
    p = torch.full((2, 5), 0.025)
    p[0, 0], p[0, 4], p[0, 3] = 0.5, 0.4, 0.05
    p[1, 4], p[1, 0] = 0.6, 0.3
    logp = p.log()
    assert logp.argmax(-1).tolist() == [0, 4]  # O I-PER: an I- without its B-
    # valid candidates: O O = .5*.3 = .15; B-PER I-PER = .05*.6 = .03; O B-PER = .5*.025 ...
    assert bio_viterbi(logp, start, allowed) == [0, 0]
    p[0, 3] = 0.3  # now B-PER I-PER = .3*.6 = .18 > O O = .15
    assert bio_viterbi(p.log(), start, allowed) == [3, 4]
    assert bio_viterbi(torch.zeros(0, 5), start, allowed) == []


def test_viterbi_is_the_best_valid_sequence_by_brute_force():
    start, allowed = bio_transitions(LABELS)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logp = torch.log_softmax(3 * torch.randn(4, 5, generator=g, dtype=torch.float64), -1)
        got = bio_viterbi(logp, start, allowed)
        assert _valid(got, start, allowed)
        best = max((s for s in itertools.product(range(5), repeat=4) if _valid(s, start, allowed)),
                   key=lambda s: sum(float(logp[t, y]) for t, y in enumerate(s)))
        assert math.isclose(sum(float(logp[t, y]) for t, y in enumerate(got)),
                            sum(float(logp[t, y]) for t, y in enumerate(best)), rel_tol=1e-12)


def _task(decoding):
    task = object.__new__(NerTask)  # only the decoding state: labels and the ner: section
    task.cfg, task.labels = SimpleNamespace(ner=NerConfig(decoding=decoding)), LABELS
    return task


def test_task_word_tags_argmax_vs_bio_and_cut_off_words():
    probs = torch.full((5, 5), 0.025)  # (T tokens, C): CLS, w0, w0 piece, w1, SEP
    probs[1, 0], probs[1, 4] = 0.5, 0.4
    probs[3, 4], probs[3, 0] = 0.6, 0.3
    first = [1, 3, -1]  # the third word was cut off by max_length
    tags, ps = _task("argmax")._word_tags(probs, first)
    assert tags == ["O", "I-PER", "O"] and ps == [0.5, pytest.approx(0.6), 0.0]
    tags, ps = _task("bio")._word_tags(probs, first)
    assert tags == ["O", "O", "O"] and ps == [0.5, pytest.approx(0.3), 0.0]
