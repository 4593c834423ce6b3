"""Claim splitting, grouping rules, support and confidence scores, pairs: all by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.factuality.checkers import LexicalChecker
from lmforge.factuality.claims import normalise, split_claims, split_clauses, split_sentences
from lmforge.factuality.evaluate import paired_bootstrap
from lmforge.factuality.pairs import best_answers, build_pairs
from lmforge.factuality.scoring import (class_shares, group_answers, group_with_checker, jaccard, rule_equivalent,
                                        support_from_probs, support_scores)


def test_sentences_keep_abbreviations_and_decimals():
    text = "Dr. Smith moved to the U.S. in 1990. It is 3.5 m long! Why? Because.\n- A bullet line"
    assert split_sentences(text) == ["Dr. Smith moved to the U.S. in 1990.", "It is 3.5 m long!", "Why?",
                                     "Because.", "A bullet line"]


def test_sentence_after_initial_is_not_split():
    assert split_sentences("J. K. Rowling wrote it. She lives in Edinburgh.") == [
        "J. K. Rowling wrote it.", "She lives in Edinburgh."]


def test_clauses_split_at_semicolons_and_conjunctions():
    s = "He was born in Paris in 1950, but he moved to Rome in 1980; he liked the city"
    assert split_clauses(s) == ["He was born in Paris in 1950", "He moved to Rome in 1980", "He liked the city"]


def test_short_clause_joins_its_neighbour():
    # "Nothing happens" has 2 words < 3: the next clause is joined back onto it (the sentence as written)
    assert split_clauses("Nothing happens, and the seeds pass through you.") == [
        "Nothing happens, and the seeds pass through you."]
    assert split_clauses("Yes, and no") == ["Yes, and no"]
    assert split_clauses("The rain falls, and the river floods the town") == ["The rain falls", "The river floods the town"]


def test_claims_of_answer_and_empty_answer():
    ans = "Fortune cookies came from California, and they were made in San Francisco. They are not Chinese."
    assert split_claims(ans) == ["Fortune cookies came from California", "They were made in San Francisco.",
                                 "They are not Chinese."]
    assert split_claims("") == [] and split_claims("  \n ") == []


def test_normalise():
    assert normalise("The  Cat, an animal!") == "cat animal"


def test_support_from_probs_by_hand():
    # 3 claims x 2 references; p_k = max over references; threshold 0.5
    probs = np.array([[0.2, 0.7], [0.1, 0.4], [0.5, 0.0]])
    s = support_from_probs(["a", "b", "c"], probs, 0.5)
    assert (s.supported, s.unsupported) == (2, 1)
    assert s.score == pytest.approx(2 / 3)
    assert s.probs == [0.7, 0.4, 0.5]


def test_support_scores_lexical_checker_by_hand():
    chk = LexicalChecker(threshold=0.6)
    refs = ["Watermelon seeds pass through the digestive system"]
    # claim 1: content words {watermelon, seeds, pass, through, digestive, system}: all in ref -> 1.0
    # claim 2: {seeds, grow, stomach}: 1/3 -> unsupported
    ans = "Watermelon seeds pass through the digestive system. The seeds grow in your stomach."
    [s] = support_scores([ans], [refs], chk)
    assert s.probs == [1.0, pytest.approx(0.3333, abs=1e-4)]
    assert (s.supported, s.unsupported, s.score) == (1, 1, 0.5)
    # saying more supported-looking text does not raise the score above the fraction
    longer = ans + " Seeds are eaten. Stomachs grow seeds."
    [t] = support_scores([longer], [refs], chk)
    assert t.score < s.score + 1e-9 and t.unsupported >= s.unsupported


def test_support_scores_refuse_missing_references_and_empty_answers():
    chk = LexicalChecker()
    with pytest.raises(LmforgeError, match="no references"):
        support_scores(["An answer here."], [[]], chk)
    with pytest.raises(LmforgeError, match="empty answer"):
        support_scores([" "], [["ref"]], chk)
    [s] = support_scores([" "], [["ref"]], chk, allow_empty=True)
    assert (s.score, len(s.claims)) == (0.0, 0)


def test_grouping_rules():
    answers = ["The cat sat.", "the cat  sat", "A dog barked loudly today.", "The cat sat. Then it slept."]
    assert group_answers(answers, rule_equivalent("exact")) == [0, 0, 1, 2]
    assert group_answers(answers, rule_equivalent("first_claim")) == [0, 0, 1, 0]
    # jaccard over content words: {cat, sat} vs {cat, sat, then, slept} = 2/4 = 0.5
    assert jaccard("The cat sat.", "The cat sat. Then it slept.") == 0.5
    assert group_answers(answers, rule_equivalent("jaccard", 0.5)) == [0, 0, 1, 0]
    assert group_answers(answers, rule_equivalent("jaccard", 0.6)) == [0, 0, 1, 2]
    with pytest.raises(LmforgeError, match="unknown grouping rule"):
        rule_equivalent("fuzzy")


def test_grouping_is_transitive_single_link():
    # a~b and b~c but not a~c: one class (connected components)
    same = {("a", "b"), ("b", "c")}
    assert group_answers(["a", "b", "c", "d"], lambda x, y: (x, y) in same or (y, x) in same) == [0, 0, 0, 1]


def test_group_with_checker_needs_both_directions():
    chk = LexicalChecker(threshold=1.0)
    # "Paris France capital" covers "Paris capital" but not the reverse -> different classes
    answers = ["Paris capital", "Paris France capital", "Paris capital"]
    assert group_with_checker(answers, chk) == [0, 1, 0]


def test_class_shares_and_entropy_by_hand():
    scores, h = class_shares([0, 0, 1, 0])
    assert scores == [0.75, 0.75, 0.25, 0.75]
    assert h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert class_shares([0, 0])[1] == 0.0
    assert class_shares([0, 1, 2])[1] == pytest.approx(math.log(3))
    with pytest.raises(LmforgeError, match="at least 2 answers"):
        class_shares([0])


def _rows(scores, answers=None, pid="q1"):
    answers = answers or [f"answer number {i}" for i in range(len(scores))]
    return [{"id": pid, "prompt": f"prompt {pid}", "answer": a, "score": s, "logprob": -float(i)}
            for i, (a, s) in enumerate(zip(answers, scores))]


def test_pairs_margin_and_ties():
    rows = _rows([1.0, 0.5, 0.5, 0.0])
    pairs = build_pairs(rows, margin=0.0)
    # 6 pairs minus the tie (1, 2): 5, clearest gap first
    assert len(pairs) == 5
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("answer number 0", "answer number 3")
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert {(p["chosen"][-1], p["rejected"][-1]) for p in pairs} == {("0", "3"), ("0", "1"), ("0", "2"),
                                                                    ("1", "3"), ("2", "3")}
    # margin 0.5: gaps must exceed 0.5 -> only (0, 3)
    assert [(p["chosen"][-1], p["rejected"][-1]) for p in build_pairs(rows, margin=0.5)] == [("0", "3")]
    assert len(build_pairs(rows, margin=0.0, max_pairs_per_prompt=2)) == 2
    with pytest.raises(LmforgeError):
        build_pairs(rows, margin=-1)


def test_pairs_skip_same_text_and_stay_within_prompt():
    rows = _rows([1.0, 0.0], ["Same text.", "same text"]) + _rows([0.9, 0.1], pid="q2")
    pairs = build_pairs(rows)
    assert len(pairs) == 1 and pairs[0]["id"] == "q2" and pairs[0]["prompt"] == "prompt q2"


def test_best_answer_ties_break_on_logprob():
    rows = _rows([0.5, 1.0, 1.0])  # logprobs 0, -1, -2: answer 1 wins the tie
    assert best_answers(rows) == [{"id": "q1", "prompt": "prompt q1", "completion": "answer number 1", "score": 1.0}]


def test_paired_bootstrap_interval():
    before = [0.0] * 50
    after = [1.0] * 25 + [0.0] * 25
    r = paired_bootstrap(before, after, n_boot=1000, seed=0)
    assert r["change"] == 0.5 and r["low"] > 0.3 and r["high"] < 0.7
    same = paired_bootstrap(before, before)
    assert same["low"] == same["high"] == 0.0


def test_recipe_checks():
    from lmforge.factuality.experiment import load_recipe

    base = {"experiment": "truthfulqa", "name": "x", "score": {"checker": "lexical"}}
    cfg = load_recipe(base)
    assert cfg["sample"]["n"] == 4 and cfg["variants"] == ["reference", "free"] and cfg["score"]["rule"] == "jaccard"
    with pytest.raises(LmforgeError, match="unknown key"):
        load_recipe(base | {"sampel": {}})
    with pytest.raises(LmforgeError, match="score.checker is required"):
        load_recipe({"experiment": "truthfulqa", "name": "x"})
    with pytest.raises(LmforgeError, match="variants"):
        load_recipe(base | {"variants": ["oracle"]})
    with pytest.raises(LmforgeError, match="experiment must be"):
        load_recipe({"name": "x"})
    # reference-free with text rules needs no checker
    assert load_recipe({"experiment": "truthfulqa", "name": "x", "variants": ["free"],
                        "score": {"free_group": "rules"}})["score"]["checker"] is None


def test_question_echo_is_not_informative_support_by_hand():
    """Lexical coverage: reference 'cats should drink water' covers both claims (p = 1, 1); the question
    'what should cats drink?' covers claim 2 fully (q = 1) and 3 of claim 1's 4 content words (q = 0.75).
    Threshold 0.8: claim 2 is an echo, so S = 2, E = 1, I = 1; discounting the question scores 1/2."""
    from lmforge.factuality.evaluate import answer_metrics
    from lmforge.factuality.pipeline import score_rows

    chk = LexicalChecker(threshold=0.8)
    ans, refs, q = "Cats should drink water; cats should drink.", ["cats should drink water"], "what should cats drink?"
    [plain] = support_scores([ans], [refs], chk, questions=[q])
    assert (plain.supported, plain.echoed, plain.informative, plain.score) == (2, 1, 1, 1.0)
    [disc] = support_scores([ans], [refs], chk, questions=[q], discount_question=True)
    assert (disc.supported, disc.unsupported, disc.score) == (1, 1, 0.5)
    [none] = support_scores([ans], [refs], chk)
    assert (none.supported, none.echoed, none.informative) == (2, 0, 2)
    m = answer_metrics([ans], [refs], chk, questions=[q])
    assert m["supported_fraction"] == [1.0] and m["informative_fraction"] == [0.5] and m["echo_fraction"] == [0.5]
    [row] = score_rows([{"id": "1", "prompt": q, "answer": ans, "references": refs}], "reference", chk, questions=[q])
    assert (row["score"], row["supported"], row["echoed"]) == (0.5, 1, 1)
    with pytest.raises(LmforgeError, match="questions"):
        support_scores([ans], [refs], chk, discount_question=True)
