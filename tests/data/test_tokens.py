"""BIO tags and sub-word tokens: label lists, hand-checked alignment, span merging (parity with seqeval)."""
from __future__ import annotations

import random

import pytest

from lmforge.data.tokens import (IGNORE, align_labels, bio_label_list, check_tag, inside_of, merge_spans, split_words,
                                 word_first_tokens, words_with_offsets)
from lmforge.errors import LmforgeError

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer over a hand-made vocabulary (words split into pieces)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "jo", "##hn", "##son", "play", "##s", "in", "yo", "##rk",
             "city", "."]
    ids = {t: i for i, t in enumerate(vocab)}
    tk = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", continuing_subword_prefix="##"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return tk


def test_label_list_is_stable_with_b_i_pairs():
    data = [["B-PER", "O", "I-PER"], ["I-LOC"], ["O", "B-MISC", "I-MISC"]]
    assert bio_label_list(data) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-PER", "I-PER"]
    assert bio_label_list(list(reversed(data))) == bio_label_list(data)
    assert bio_label_list([["O"]]) == ["O"]
    with pytest.raises(ValueError, match="not BIO"):
        bio_label_list([["PER"]])
    assert check_tag("B-WORK_OF_ART") == ("B", "WORK_OF_ART") and check_tag("O") == ("O", None)
    assert inside_of(LABELS) == [0, 2, 2, 4, 4]


def test_alignment_of_words_split_into_sub_tokens_hand_checked():
    words = ["Johnson", "plays", "in", "York", "city."]
    enc = wordpiece_tokenizer().encode(words, is_pretokenized=True)
    assert enc.tokens == ["[CLS]", "jo", "##hn", "##son", "play", "##s", "in", "yo", "##rk", "city", ".", "[SEP]"]
    assert enc.word_ids == [None, 0, 0, 0, 1, 1, 2, 3, 3, 4, 4, None]
    tags = [LABELS.index(t) for t in ["B-PER", "O", "O", "B-LOC", "I-LOC"]]
    B_PER, I_PER, B_LOC, I_LOC, O, X = 3, 4, 1, 2, 0, IGNORE
    assert align_labels(enc.word_ids, tags) == [X, B_PER, X, X, O, X, O, B_LOC, X, I_LOC, X, X]
    assert align_labels(enc.word_ids, tags, label_all=True, inside=inside_of(LABELS)) == \
        [X, B_PER, I_PER, I_PER, O, O, O, B_LOC, I_LOC, I_LOC, I_LOC, X]
    assert word_first_tokens(enc.word_ids, 5) == [1, 4, 6, 7, 9]
    assert word_first_tokens([None, 0, 0, 1, None], 4) == [1, 3, -1, -1]  # words 2, 3 truncated away
    with pytest.raises(ValueError, match="inside"):
        align_labels(enc.word_ids, tags, label_all=True)


def test_split_words_keeps_character_offsets():
    text = "  Angela   Merkel visited\tParis ."
    words, offs = split_words(text)
    assert words == ["Angela", "Merkel", "visited", "Paris", "."]
    assert [text[a:b] for a, b in offs] == words and offs[0] == (2, 8)
    joined, offs = words_with_offsets(["EU", "rejects", "German"])
    assert joined == "EU rejects German" and offs == [(0, 2), (3, 10), (11, 17)]
    with pytest.raises(LmforgeError):
        words_with_offsets(["two words"])
    text = "Airbus, the U.S. firm's rival, paid $1,000.50 in Paris."
    words, offs = split_words(text)
    assert words == ["Airbus", ",", "the", "U.S.", "firm's", "rival", ",", "paid", "$", "1,000.50", "in", "Paris", "."]
    assert [text[a:b] for a, b in offs] == words


def test_merge_spans_hand_checked():
    text = "  Angela   Merkel visited\tNew York City ."
    _, offs = split_words(text)
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O"]
    scores = [0.9, 0.7, 0.99, 0.6, 0.8, 1.0, 0.9]
    spans = merge_spans(text, offs, tags, scores)
    assert spans == [
        {"text": "Angela   Merkel", "type": "PER", "start": 2, "end": 17, "score": pytest.approx(0.8)},
        {"text": "New York City", "type": "LOC", "start": 26, "end": 39, "score": pytest.approx(0.8)},
    ]
    # I- after O starts an entity; B- after B- splits; a type change splits
    _, offs = split_words("a b c d e f")
    got = merge_spans("a b c d e f", offs, ["I-ORG", "B-PER", "B-PER", "I-PER", "I-LOC", "O"], [1.0] * 6)
    assert [(s["text"], s["type"]) for s in got] == [("a", "ORG"), ("b", "PER"), ("c d", "PER"), ("e", "LOC")]


def test_merge_spans_matches_seqeval_entities():
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    tags_pool = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(300):
        n = rng.randint(1, 12)
        words = [f"w{i}" for i in range(n)]
        text, offs = words_with_offsets(words)
        tags = [rng.choice(tags_pool) for _ in range(n)]
        ours = [(s["type"], s["start"], s["end"]) for s in merge_spans(text, offs, tags, [1.0] * n)]
        theirs = [(t, offs[a][0], offs[b][1]) for t, a, b in get_entities(tags)]
        assert sorted(ours, key=lambda x: x[1]) == sorted(theirs, key=lambda x: x[1]), tags
