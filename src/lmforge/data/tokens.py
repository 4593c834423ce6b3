"""Word-level BIO tags <-> sub-word tokens, and entity spans from word tags.

Training aligns each word's tag to its sub-tokens: the first sub-token carries the word's tag;
the following ones are ignored (``-100``) or, with ``label_all``, carry the ``I-`` tag of the
word's entity (``O`` stays ``O``). Special tokens are ignored. Prediction reads the tag of a
word at its first sub-token and merges words into entity spans with character offsets in the
original text.
"""
from __future__ import annotations

import re
from typing import Sequence

from ..errors import LmforgeError

IGNORE = -100
# CoNLL-style words: acronyms (U.S.), numbers (1,000.5), words with inner hyphens/apostrophes, and every
# other non-space character on its own (so "Paris." -> "Paris", ".").
_WORD = re.compile(r"(?:[A-Za-z]\.){2,}|\d+(?:[.,]\d+)*|\w+(?:[-'\u2019&]\w+)*|[^\w\s]")

__all__ = ["IGNORE", "align_labels", "bio_label_list", "check_tag", "inside_of", "merge_spans", "split_words",
           "word_first_tokens", "words_with_offsets"]


def check_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER" -> ("B", "PER")``, ``"O" -> ("O", None)``; anything else is an error."""
    if tag == "O":
        return "O", None
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
        return tag[0], tag[2:]
    raise ValueError(f"tag {tag!r} is not BIO (O, B-TYPE or I-TYPE)")


def bio_label_list(tag_sequences: Sequence[Sequence[str]]) -> list[str]:
    """The label list of the data in a stable order: ``O``, then ``B-T``, ``I-T`` for each type sorted.

    Every type seen in any tag gets both its ``B-`` and ``I-`` label (so the model can emit
    either even when the training data only shows one).
    """
    types: set[str] = set()
    for seq in tag_sequences:
        for tag in seq:
            _, t = check_tag(tag)
            if t is not None:
                types.add(t)
    return ["O"] + [f"{p}-{t}" for t in sorted(types) for p in ("B", "I")]


def inside_of(labels: Sequence[str]) -> list[int]:
    """For each label index, the index of its ``I-`` form (``O`` and ``I-X`` map to themselves)."""
    index = {l: i for i, l in enumerate(labels)}
    out = []
    for i, l in enumerate(labels):
        p, t = check_tag(l)
        out.append(index.get(f"I-{t}", i) if p == "B" else i)
    return out


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], *,
                 label_all: bool = False, inside: Sequence[int] | None = None) -> list[int]:
    """Token labels for one tokenised sentence.

    ``out[t] = word_labels[w]`` at the first token of word ``w``; at later tokens of ``w``,
    ``IGNORE`` (or ``inside[word_labels[w]]`` with ``label_all``); ``IGNORE`` at special tokens
    (``word_ids[t] is None``).

    Args:
        word_ids: (T,) word index of each token (a fast tokenizer's ``word_ids()``), None for specials.
        word_labels: (W,) label index of each word.
        label_all: give the non-first sub-tokens the ``I-`` label instead of ignoring them.
        inside: label index -> index of its ``I-`` form (:func:`inside_of`); needed with ``label_all``.

    Returns:
        (T,) label indices with ``IGNORE`` where not scored.
    """
    if label_all and inside is None:
        raise ValueError("label_all needs the inside map (inside_of(labels))")
    out, prev = [], None
    for w in word_ids:
        if w is None:
            out.append(IGNORE)
        elif w != prev:
            out.append(word_labels[w])
        else:
            out.append(inside[word_labels[w]] if label_all else IGNORE)
        prev = w
    return out


def word_first_tokens(word_ids: Sequence[int | None], n_words: int) -> list[int]:
    """Index of the first token of each word, or -1 for words with no token (truncated or empty)."""
    first = [-1] * n_words
    for t, w in enumerate(word_ids):
        if w is not None and w < n_words and first[w] < 0:
            first[w] = t
    return first


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Words of ``text`` (split on whitespace and punctuation, CoNLL-style) with ``[start, end)`` offsets."""
    words, offsets = [], []
    for m in _WORD.finditer(text):
        words.append(m.group())
        offsets.append((m.start(), m.end()))
    return words, offsets


def words_with_offsets(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join pre-split words with single spaces; returns the text and each word's offsets."""
    offsets, pos = [], 0
    for w in words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise LmforgeError(f"token {w!r} is not a non-empty word without whitespace")
        offsets.append((pos, pos + len(w)))
        pos += len(w) + 1
    return " ".join(words), offsets


def merge_spans(text: str, offsets: Sequence[tuple[int, int]], tags: Sequence[str],
                scores: Sequence[float]) -> list[dict]:
    """Merge word tags into entity spans (conlleval rules, as seqeval's default mode).

    An entity starts at ``B-T``, or at ``I-T`` after ``O`` or after another type, and extends over
    the following ``I-T`` words. Its character span runs from its first word's start to its last
    word's end in ``text``; its score is the mean of its words' scores.

    Args:
        text: the original text.
        offsets: (W,) ``[start, end)`` character offsets of the words.
        tags: (W,) predicted BIO tag of each word.
        scores: (W,) probability of each word's predicted tag.

    Returns:
        ``[{"text", "type", "start", "end", "score"}]`` in text order.
    """
    spans: list[dict] = []
    cur: list | None = None  # [type, first word, last word]

    def close():
        if cur is not None:
            t, a, b = cur
            start, end = offsets[a][0], offsets[b][1]
            s = sum(scores[a:b + 1]) / (b - a + 1)
            spans.append({"text": text[start:end], "type": t, "start": start, "end": end, "score": float(s)})

    for i, tag in enumerate(tags):
        p, t = check_tag(tag)
        if p == "I" and cur is not None and cur[0] == t:
            cur[2] = i
            continue
        close()
        cur = [t, i, i] if p != "O" else None
    close()
    return spans
