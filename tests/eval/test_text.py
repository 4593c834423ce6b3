"""Hand-counted checks for lmforge.eval.text (ROUGE, BLEU)."""
from __future__ import annotations

import json
import math

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.text import bleu, rouge

KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def test_rouge_identical_is_one():
    rep = rouge(["the quick brown fox", "a b c"], ["the quick brown fox", "a b c"])
    assert {k: rep[k] for k in KEYS} == {k: 1.0 for k in KEYS}
    assert rep["n"] == 2
    assert json.loads(json.dumps(rep)) == rep


def test_rouge_hand_counted_overlap():
    # pred tokens [the, cat, sat]; ref tokens [the, cat, ran, away]
    # rouge1: overlap 2 -> P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    # rouge2: bigrams {the cat, cat sat} vs {the cat, cat ran, ran away}: overlap 1
    #         -> P = 1/2, R = 1/3, F = 2/5
    # rougeL: LCS "the cat" = 2 -> same as rouge1
    rep = rouge(["The cat sat."], ["the cat ran away"])
    assert rep["rouge1"] == pytest.approx(4 / 7)
    assert rep["rouge2"] == pytest.approx(2 / 5)
    assert rep["rougeL"] == pytest.approx(4 / 7)
    assert rep["rougeLsum"] == pytest.approx(4 / 7)


def test_rouge_stemming():
    # Porter: cats -> cat, running -> run
    assert rouge(["cats running"], ["cat run"])["rouge1"] == pytest.approx(1.0)
    assert rouge(["cats running"], ["cat run"], use_stemmer=False)["rouge1"] == 0.0


def test_rouge_multi_reference_takes_max_then_means():
    rep = rouge(
        ["the cat sat", "x y"],
        # sample 1: the best reference is exact; sample 2: no overlap
        [["a dog barked", "the cat sat"], ["p q"]],
    )
    assert rep["rouge1"] == pytest.approx((1.0 + 0.0) / 2)
    # a plain string is the same as a one-element list
    assert rouge(["the cat sat"], ["the cat"]) == rouge(["the cat sat"], [["the cat"]])


def test_rouge_lsum_uses_newline_sentences():
    # LCS over the joined text is "a b" (2 of 4); per sentence each line matches fully.
    pred, ref = "c d\na b", "a b\nc d"
    rep = rouge([pred], [ref])
    assert rep["rougeL"] == pytest.approx(2 / 4)
    assert rep["rougeLsum"] == pytest.approx(1.0)


def test_bleu_identical_is_100():
    rep = bleu(["the cat sat on the mat", "hello there my friend"],
               ["the cat sat on the mat", "hello there my friend"])
    assert rep["bleu"] == pytest.approx(100.0)
    assert rep["bp"] == pytest.approx(1.0)
    assert rep["precisions"] == pytest.approx([100.0] * 4)
    assert json.loads(json.dumps(rep)) == rep


def test_bleu_brevity_penalty_by_hand():
    # every n-gram of the 6-token hypothesis is in the 7-token reference -> p_n = 1,
    # BLEU = BP * 100 with BP = exp(1 - r/c) = exp(1 - 7/6)
    rep = bleu(["the cat sat on the mat"], ["the cat sat on the mat today"])
    assert rep["bp"] == pytest.approx(math.exp(1 - 7 / 6))
    assert rep["bleu"] == pytest.approx(100 * math.exp(-1 / 6), abs=1e-3)
    assert (rep["sys_len"], rep["ref_len"]) == (6, 7)


def test_bleu_variable_reference_counts():
    # sample 2 has two references; the closest length (4) is the effective one -> BP 1
    rep = bleu(["a b c d", "e f g h"], [["a b c d"], ["x", "e f g h"]])
    assert rep["bleu"] == pytest.approx(100.0)
    assert rep["ref_len"] == 8
    # the wrong reference only: no matches at all
    assert bleu(["e f g h"], [["x y z w"]])["bleu"] == pytest.approx(0.0)


def test_text_bad_input():
    with pytest.raises(LmforgeError):
        rouge(["a"], ["a", "b"])
    with pytest.raises(LmforgeError):
        bleu([], [])
    with pytest.raises(LmforgeError):
        bleu(["a"], [[]])
    with pytest.raises(LmforgeError):
        rouge("abc", "abc")
    with pytest.raises(LmforgeError):
        bleu(["a"], ["a"], tokenize="no-such-tokenizer")
