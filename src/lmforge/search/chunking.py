"""Cut documents into chunks that remember where they came from.

Every chunk keeps its document id and the character span ``[start, end)`` of the document it
covers, so ``doc_text[start:end] == chunk.text`` always holds (tested): a search hit can be shown
in context, and a citation points into the source.

Modes:

- ``sentences``: sentences (split after ``.``, ``!``, ``?`` followed by white space, or at a
  line break) grouped ``size`` at a time, consecutive groups sharing ``overlap`` sentences;
- ``tokens``: windows of ``size`` tokens of a tokenizer, consecutive windows sharing ``overlap``
  tokens; spans come from the fast tokenizer's offset mapping;
- ``paragraphs``: blocks separated by blank lines (``size`` paragraphs per chunk);
- ``none``: the whole document is one chunk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import LmforgeError

MODES = ("sentences", "tokens", "paragraphs", "none")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']*\s+|\n+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


@dataclass(frozen=True)
class Chunk:
    """A span of one document: ``text == document[start:end]``."""

    doc_id: str
    start: int
    end: int
    text: str

    def to_json(self) -> dict:
        return {"doc_id": self.doc_id, "start": self.start, "end": self.end, "text": self.text}


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` without leading/trailing white space."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _spans_between(text: str, breaks: re.Pattern) -> list[tuple[int, int]]:
    """Non-empty trimmed spans of ``text`` between matches of ``breaks``."""
    spans, pos = [], 0
    for m in breaks.finditer(text):
        spans.append(_trimmed(text, pos, m.start() if m.group().startswith("\n") else m.end()))
        pos = m.end()
    spans.append(_trimmed(text, pos, len(text)))
    return [(s, e) for s, e in spans if e > s]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (end punctuation and closing quotes kept)."""
    return _spans_between(text, _SENTENCE_END)


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the blank-line separated paragraphs of ``text``."""
    return _spans_between(text, _PARAGRAPH_BREAK)


def _group(spans: Sequence[tuple[int, int]], size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of ``size`` consecutive spans, each starting ``size - overlap`` after the last;
    a window reaching the end stops the walk (no trailing window that only repeats overlap)."""
    out, step = [], size - overlap
    for i in range(0, len(spans), step):
        window = spans[i:i + size]
        out.append((window[0][0], window[-1][1]))
        if i + size >= len(spans):
            break
    return out


def token_spans(text: str, tokenizer, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of windows of ``size`` tokens (``overlap`` shared) of ``tokenizer``."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise LmforgeError("chunking by tokens needs a fast tokenizer (offset mapping)") from None
    offsets = [(s, e) for s, e in enc["offset_mapping"] if e > s]
    return _group(offsets, size, overlap) if offsets else []


def chunk_document(doc_id: str, text: str, *, mode: str = "sentences", size: int = 3, overlap: int = 0,
                   tokenizer=None) -> list[Chunk]:
    """Chunks of one document.

    Args:
        doc_id: the document's id (kept on every chunk).
        text: the document text.
        mode: ``sentences``, ``tokens``, ``paragraphs`` or ``none``.
        size: sentences / tokens / paragraphs per chunk (> 0).
        overlap: units shared by consecutive chunks (0 <= overlap < size).
        tokenizer: a fast Hugging Face tokenizer (``tokens`` mode only).

    Returns:
        Chunks in document order; ``text[c.start:c.end] == c.text``.
    """
    check_chunking(mode, size, overlap)
    if mode == "none":
        spans = [_trimmed(text, 0, len(text))]
    elif mode == "sentences":
        spans = _group(sentence_spans(text), size, overlap) if text.strip() else []
    elif mode == "paragraphs":
        spans = _group(paragraph_spans(text), size, overlap) if text.strip() else []
    else:
        if tokenizer is None:
            raise LmforgeError("chunking by tokens needs the encoder's tokenizer")
        spans = token_spans(text, tokenizer, size, overlap)
    return [Chunk(doc_id, s, e, text[s:e]) for s, e in spans if e > s]


def check_chunking(mode: str, size: int, overlap: int) -> None:
    if mode not in MODES:
        raise LmforgeError(f"chunking must be one of {', '.join(MODES)}, got '{mode}'")
    if size < 1:
        raise LmforgeError(f"chunk size must be >= 1, got {size}")
    if not 0 <= overlap < size:
        raise LmforgeError(f"chunk overlap must be in [0, size), got {overlap} with size {size}")


def chunk_documents(docs: Iterable[tuple[str, str]], **kw) -> list[Chunk]:
    """Chunks of every ``(doc_id, text)`` in order (see :func:`chunk_document`)."""
    out: list[Chunk] = []
    for doc_id, text in docs:
        out.extend(chunk_document(doc_id, text, **kw))
    return out
