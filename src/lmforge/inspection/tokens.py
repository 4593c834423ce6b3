"""How a tokenizer sees a text, and what a corpus costs in tokens under several tokenizers.

:func:`view` encodes one text and reports, per token, its id, its vocabulary piece, what it decodes
to on its own, the characters of the input it covers (offsets), and whether it is a special token
the tokenizer added ([CLS], <s> ...), the unknown token, or a byte-fallback piece (a piece that is
only part of a character's UTF-8 bytes: ``<0xF0>`` in SentencePiece, or a byte-level BPE piece
that decodes to U+FFFD on its own). The round trip checks ``decode(encode(x)) == x`` without the
added specials. :func:`cost` counts tokens per whitespace word and per character over many texts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import LmforgeError

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
REPLACEMENT = "\ufffd"


@dataclass
class Token:
    """One token of an encoded text."""

    id: int
    piece: str              # the vocabulary entry (``##ing``, ``Ġthe``, ``▁the``, ``<0xF0>``)
    text: str               # what the token decodes to on its own
    start: int              # characters of the input it covers: text[start:end] (0, 0 for added specials)
    end: int
    special: bool = False   # added by the tokenizer ([CLS], [SEP], <s>, </s> ...)
    unknown: bool = False   # the unknown token: the input's characters are lost
    byte: bool = False      # byte fallback: part of one character's UTF-8 bytes


@dataclass
class TokenView:
    """One tokenizer's encoding of one text."""

    name: str
    text: str
    tokens: list[Token] = field(default_factory=list)
    decoded: str = ""       # decode(encode(text)) without the added special tokens

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def content(self) -> list[Token]:
        """Tokens of the text itself (added specials excluded)."""
        return [t for t in self.tokens if not t.special]

    @property
    def specials(self) -> list[str]:
        return [t.piece for t in self.tokens if t.special]

    @property
    def unknown(self) -> list[str]:
        """Input characters that became the unknown token."""
        return [self.text[t.start:t.end] or t.piece for t in self.tokens if t.unknown]

    @property
    def byte_pieces(self) -> int:
        return sum(t.byte for t in self.tokens)

    @property
    def chars_per_token(self) -> float:
        return len(self.text) / max(len(self.content), 1)

    @property
    def round_trip(self) -> bool:
        return self.decoded == self.text

    def first_difference(self) -> int | None:
        """Index of the first character where the round trip differs (None when it does not)."""
        if self.round_trip:
            return None
        for i, (a, b) in enumerate(zip(self.text, self.decoded)):
            if a != b:
                return i
        return min(len(self.text), len(self.decoded))

    def summary(self) -> dict:
        return {"tokenizer": self.name, "tokens": len(self.tokens), "content_tokens": len(self.content),
                "ids": self.ids, "pieces": [t.piece for t in self.tokens], "specials_added": self.specials,
                "chars_per_token": round(self.chars_per_token, 3), "unknown": self.unknown,
                "byte_fallback": self.byte_pieces, "round_trip": self.round_trip,
                "decoded": self.decoded}


def view(tokenizer, text: str, name: str = "") -> TokenView:
    """Encode ``text`` with ``tokenizer`` (a fast Hugging Face tokenizer) and describe every token.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` (offsets are needed for the spans).
        text: non-empty input.
        name: label of the tokenizer in tables.
    """
    if not text or not text.strip():
        raise LmforgeError("the text is empty: give some text to tokenize")
    if not getattr(tokenizer, "is_fast", False):
        raise LmforgeError(f"{name or 'tokenizer'}: a fast tokenizer (tokenizer.json) is needed for token spans")
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = list(enc["input_ids"])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    unk = tokenizer.unk_token_id
    out = TokenView(name=name, text=text)
    for tid, piece, (s, e), sp in zip(ids, pieces, enc["offset_mapping"], enc["special_tokens_mask"]):
        alone = tokenizer.decode([tid], clean_up_tokenization_spaces=False)
        byte = bool(BYTE_PIECE.match(piece or "")) or (REPLACEMENT in alone and REPLACEMENT not in text[s:e])
        out.tokens.append(Token(id=tid, piece=piece, text=alone, start=s, end=e, special=bool(sp),
                                unknown=unk is not None and tid == unk and not sp, byte=byte and not sp))
    content = [t.id for t in out.tokens if not t.special]
    out.decoded = tokenizer.decode(content, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return out


def segments(v: TokenView) -> list[tuple[str, int | None]]:
    """The text cut into ``(string, token index or None)`` pieces for colouring.

    Characters no token covers (spaces a WordPiece tokenizer drops) get ``None``; added specials,
    which cover no characters, appear as their piece (``[CLS]``); a token covering characters an
    earlier one already covered (the 2nd-4th byte of an emoji) appears as an empty string, so every
    token has exactly one segment.
    """
    out: list[tuple[str, int | None]] = []
    cursor = 0
    for i, t in enumerate(v.tokens):
        if t.special and t.start == t.end:
            out.append((t.piece, i))
            continue
        if t.start > cursor:
            out.append((v.text[cursor:t.start], None))
        out.append((v.text[max(t.start, cursor):t.end] if t.end > cursor else "", i))
        cursor = max(cursor, t.end)
    if cursor < len(v.text):
        out.append((v.text[cursor:], None))
    return out


@dataclass
class Cost:
    """Tokens a tokenizer needs for a corpus (added special tokens excluded)."""

    name: str
    texts: int
    words: int
    chars: int
    tokens: int
    unknown: int
    round_trip_failures: int

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / max(self.words, 1)

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / max(self.chars, 1)

    def row(self) -> dict:
        return {"tokenizer": self.name, "texts": self.texts, "words": self.words, "chars": self.chars,
                "tokens": self.tokens, "tokens_per_word": round(self.tokens_per_word, 4),
                "tokens_per_char": round(self.tokens_per_char, 4), "unknown": self.unknown,
                "round_trip_failures": self.round_trip_failures}


def cost(tokenizer, texts: Sequence[str], name: str = "", batch_size: int = 512) -> Cost:
    """Token counts of ``texts`` (no added specials): tokens per whitespace word and per character.

    ``round_trip_failures`` counts texts where ``decode(encode(x)) != x`` (lower-casing,
    normalisation, unknown tokens, spaces around punctuation).
    """
    if not texts:
        raise LmforgeError("no texts to count")
    words = sum(len(t.split()) for t in texts)
    chars = sum(len(t) for t in texts)
    tokens = unknown = failures = 0
    unk = tokenizer.unk_token_id
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for text, row, back in zip(chunk, ids, decoded):
            tokens += len(row)
            unknown += sum(1 for t in row if t == unk) if unk is not None else 0
            failures += back != text
    return Cost(name=name, texts=len(texts), words=words, chars=chars, tokens=tokens, unknown=unknown,
                round_trip_failures=failures)
