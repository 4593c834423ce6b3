"""Text of generated rows as they grow: stop strings and the streamed, printable prefix.

:func:`lmforge.generation.generate` decodes each row after every token; a row ends at the first
stop string, and row 0's text is streamed without ever printing what may turn out to be the
start of a stop string (or half of a multi-byte character).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may begin a stop string (not yet safe to print)."""
    n = len(text) - len(text.rstrip("\ufffd"))  # an incomplete multi-byte character
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


class TextTracker:
    """Decodes rows as they grow: finds stop strings and streams the safe prefix of row 0."""

    def __init__(self, tokenizer, eos_ids: Sequence[int], stops: Sequence[str], stream: Callable[[str], None] | None):
        self.tokenizer, self.eos, self.stops, self.stream = tokenizer, set(eos_ids), list(stops), stream
        self.printed = 0

    def text(self, ids: list[int]) -> str:
        if ids and ids[-1] in self.eos:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def on_token(self, row: int, ids: list[int]) -> bool:
        text, hit = cut_at_stop(self.text(ids), self.stops)
        if self.stream is not None and row == 0:
            safe = len(text) if hit else len(text) - held_back(text, self.stops)
            self._emit(text[:safe])
        return hit

    def _emit(self, safe: str) -> None:
        if len(safe) > self.printed:
            self.stream(safe[self.printed:])
            self.printed = len(safe)

    def final(self, row: int, ids: list[int]) -> str:
        text = cut_at_stop(self.text(ids), self.stops)[0]
        if self.stream is not None and row == 0:
            self._emit(text)
        return text
