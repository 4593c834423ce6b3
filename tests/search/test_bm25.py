"""BM25 through bm25s: scores by hand, and bm25s imported without numba (same scores either way)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

DOCS = ["the cat sat on the mat", "a dog and a cat", "dogs chase cats all day long", "mat mat mat"]
QUERY = "cat mat"

_SCORES = """
import json, sys
{pre}
from lmforge.search.bm25 import bm25_topk, build_bm25
r = build_bm25({docs!r})
s, i = bm25_topk(r, [{query!r}], 4)
print(json.dumps({{"numba": "numba" in sys.modules, "bm25s_numba": sys.modules["bm25s"].NUMBA_AVAILABLE,
                   "scores": [float(x) for x in s[0]], "ids": [int(x) for x in i[0]]}}))
{post}
"""


def _run(pre: str = "", post: str = "") -> dict:
    code = _SCORES.format(pre=pre, post=post, docs=DOCS, query=QUERY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[0])


def _by_hand() -> list[float]:
    """The module docstring's Lucene BM25 (k1 = 1.5, b = 0.75; Lucene >= 8 drops the constant
    ``(k1 + 1)`` factor) over the stop-word-filtered tokens."""
    from lmforge.search.bm25 import tokenize

    docs, q = tokenize(DOCS), tokenize([QUERY])[0]
    n, avgdl, k1, b = len(docs), sum(map(len, docs)) / len(docs), 1.5, 0.75
    out = []
    for d in docs:
        s = 0.0
        for t in q:
            df = sum(t in x for x in docs)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return out


def test_scores_by_hand_and_bm25s_loads_without_numba():
    pytest.importorskip("bm25s")
    plain = _run(post="import numba")  # numba still importable after bm25s was loaded without it
    assert plain["numba"] is False and plain["bm25s_numba"] is False
    hand = np.asarray(_by_hand(), dtype=np.float32)
    order = sorted((i for i in range(len(DOCS)) if hand[i] > 0), key=lambda i: (-hand[i], i))
    assert plain["ids"] == order
    np.testing.assert_allclose(plain["scores"], hand[order], rtol=1e-6)
    # numba loaded first: bm25s takes it (numba available), and the scores are the same bits
    with_numba = _run(pre="import numba")
    assert with_numba["bm25s_numba"] is True
    assert with_numba["scores"] == plain["scores"] and with_numba["ids"] == plain["ids"]
