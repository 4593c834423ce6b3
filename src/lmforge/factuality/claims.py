"""Claims of an answer without an LLM: sentences, then simple clause splitting.

1. Sentences end at ``.``, ``!`` or ``?`` followed by whitespace and an upper-case letter, a
   digit or a quote -- except after common abbreviations (``Dr.``, ``e.g.``, ``U.S.`` ...) and
   single-letter initials. A line break also ends a sentence; list bullets are removed.
2. A sentence splits into clauses at ``;`` and at a comma followed by a coordinating or
   contrasting conjunction (``, and`` / ``, but`` / ``, while`` / ``, whereas`` / ``, although``
   / ``, though`` / ``, yet`` / ``, so``), and at `` but `` without a comma. A piece with fewer
   than ``min_words`` words is joined back onto the piece before it (or after, when first).
"""
from __future__ import annotations

import re
import string

ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "u.s", "u.k",
                 "approx", "fig", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
                 "sep", "sept", "oct", "nov", "dec", "a.m", "p.m", "mt", "ft"}
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_CLAUSE = re.compile(r"\s*;\s*|,\s+(?=(?:and|but|while|whereas|although|though|yet|so)\s)|\s+(?=but\s)")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*")


def _ends_with_abbreviation(text: str) -> bool:
    """True when ``text`` (up to a sentence-ending period) ends in an abbreviation or an initial."""
    m = re.search(r"(\S+)\.$", text)
    if not m:
        return False
    word = m.group(1).lstrip("\"'([").lower()
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` in order (stripped, non-empty)."""
    out: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip()
        if not line:
            continue
        start = 0
        for m in _BOUNDARY.finditer(line):
            piece = line[start:m.end()].strip()
            if _ends_with_abbreviation(line[start:m.end()].rstrip()):
                continue
            out.append(piece)
            start = m.end()
        tail = line[start:].strip()
        if tail:
            out.append(tail)
    return out


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def split_clauses(sentence: str, min_words: int = 3) -> list[str]:
    """Clauses of one sentence (see the module docstring); pieces shorter than ``min_words`` words
    are joined to a neighbour, so a sentence always yields at least one clause."""
    pieces = [p.strip() for p in _CLAUSE.split(sentence) if p and p.strip()]
    merged: list[str] = []
    for p in pieces:
        if merged and word_count(p) < min_words:
            merged[-1] = f"{merged[-1]}, {p}"
        elif merged and word_count(merged[-1]) < min_words:
            merged[-1] = f"{merged[-1]}, {p}"
        else:
            merged.append(p)
    return [_tidy(c) for c in merged if word_count(c) > 0]


def _tidy(clause: str) -> str:
    clause = clause.strip().strip(",;: ")
    clause = re.sub(r"^(?:and|but|while|whereas|although|though|yet|so)\s+", "", clause, flags=re.I)
    return clause[:1].upper() + clause[1:] if clause else clause


def split_claims(answer: str, min_words: int = 3) -> list[str]:
    """The claims of an answer: its sentences split into clauses. An empty answer has none."""
    return [c for s in split_sentences(answer) for c in split_clauses(s, min_words)]


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style answer normalisation)."""
    t = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", t).split())
