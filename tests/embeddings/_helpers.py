"""Tiny data built in code for the embedding tests."""
from __future__ import annotations

import random

from conftest import WORDS


def sentences(n: int, seed: int = 0, lo: int = 2, hi: int = 9) -> list[str]:
    """Distinct word-salad sentences of varied lengths over the tiny tokenizer's vocabulary."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        if s not in out:
            out.append(s)
    return out


def scored_rows(n: int, seed: int = 0, top: float = 5.0) -> list[dict]:
    rng = random.Random(seed)
    a, b = sentences(n, seed), sentences(n, seed + 100)
    return [{"sentence1": x, "sentence2": y, "score": round(rng.uniform(0, top), 2)} for x, y in zip(a, b)]


def triplet_rows(n: int, seed: int = 0) -> list[dict]:
    a, n_ = sentences(n, seed), sentences(n, seed + 200)
    return [{"anchor": x, "positive": x + " very good", "negative": y} for x, y in zip(a, n_)]
