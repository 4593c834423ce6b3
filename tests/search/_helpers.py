"""Tiny corpora built in code for the search tests."""
from __future__ import annotations

import random

from conftest import WORDS


def corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(doc_id, text)``: documents of two to four word-salad sentences, some with paragraphs."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + rng.choice(".!?")
                 for _ in range(rng.randint(2, 4))]
        sep = "\n\n" if i % 3 == 0 else " "
        docs.append((f"d{i}", sep.join(sents)))
    return docs


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 20, noise: float = 0.6):
    """(n, dim) float32 vectors around random centres, normalised (like real sentence embeddings)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def neighbourhoods(n_base: int, copies: int, dim: int, seed: int = 0, spread: float = 0.8):
    """``(corpus (n_base * copies, dim), queries (n_base, dim))``: random directions, each with
    ``copies`` perturbed neighbours, and a perturbed query per direction (true near neighbours)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noise = spread / np.sqrt(dim)
    x = np.repeat(base, copies, 0) + noise * rng.normal(size=(n_base * copies, dim))
    q = base + noise * rng.normal(size=base.shape)
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(x), norm(q)
