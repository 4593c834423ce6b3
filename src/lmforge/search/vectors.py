"""Dense vector stores and exact top-k search over them, as pure functions.

Stored corpus vectors are L2-normalised, so the inner product is the cosine similarity. Three
storage types:

- ``float32`` / ``float16``: the vectors (fp16 halves the disk and memory, scores in fp32);
- ``int8``: per-dimension scalar quantisation. With ``lo_d``/``hi_d`` the corpus minimum and
  maximum of dimension ``d`` and ``s_d = (hi_d - lo_d) / 255``,
  ``c_d = round((x_d - lo_d) / s_d) - 128`` in [-128, 127] and ``x_d ≈ lo_d + (c_d + 128) s_d``.
  The query stays in float (asymmetric search): ``q . x ≈ q . lo + (q * s) . (c + 128)``, one
  matmul over the codes;
- ``binary`` (optional, next to one of the above): one sign bit per dimension packed 8 per byte;
  candidates by Hamming distance ``popcount(b_q XOR b_x)``, then rescored with the dense vectors
  (``rescore`` times ``k`` candidates).

Search walks the corpus in blocks of rows, keeping a running top-k per query, so memory is
O(queries x (block + k)), never a full (Q, N) score matrix.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import LmforgeError

DTYPES = ("float32", "float16", "int8")


ROW_BLOCK = 8192  # rows per block of the row-wise passes below: temporaries O(block x D), not O(N x D)


def normalize_rows(x: np.ndarray, *, inplace: bool = False, block: int = ROW_BLOCK) -> np.ndarray:
    """``x / |x|`` row-wise in float32; zero rows stay zero. (N, D) -> (N, D).

    In row blocks (``np.linalg.norm`` squares a whole block first), so the extra memory is one
    block, not a second (N, D) array; ``inplace`` writes into ``x`` itself (float32, writeable:
    an array the caller owns, e.g. fresh from ``encode``). The same bits either way."""
    x = np.asarray(x, dtype=np.float32)
    out = x if inplace and x.flags.writeable else np.empty_like(x)
    for a in range(0, len(x), block):
        rows = x[a:a + block]
        np.divide(rows, np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12), out=out[a:a + block])
    return out


def int8_ranges(x: np.ndarray) -> np.ndarray:
    """Per-dimension ``[lo; hi]`` of float vectors: (N, D) -> (2, D) float32 (hi > lo enforced)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    hi = np.where(hi > lo, hi, lo + 1e-6)
    return np.stack([lo, hi]).astype(np.float32)


def quantize_int8(x: np.ndarray, ranges: np.ndarray, block: int = ROW_BLOCK) -> np.ndarray:
    """``c = round((x - lo) / s) - 128`` clipped to [-128, 127]; (N, D) -> (N, D) int8 (in row
    blocks: float temporaries of one block, not four (N, D) float arrays)."""
    lo, hi = ranges
    step = (hi - lo) / 255.0
    out = np.empty(np.shape(x), dtype=np.int8)
    for a in range(0, len(x), block):
        out[a:a + block] = np.clip(np.rint((x[a:a + block] - lo) / step), 0, 255) - 128
    return out


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """``x ≈ lo + (c + 128) s``; (N, D) int8 -> (N, D) float32."""
    lo, hi = ranges
    return lo + (codes.astype(np.float32) + 128.0) * ((hi - lo) / 255.0)


def pack_binary(x: np.ndarray) -> np.ndarray:
    """Sign bits ``x > 0`` packed 8 per byte: (N, D) -> (N, ceil(D / 8)) uint8."""
    return np.packbits(np.asarray(x) > 0, axis=1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances ``popcount(a_i XOR b_j)`` of packed codes: (Q, B), (N, B) -> (Q, N) int32."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])  # (Q, N, B)
    return np.bitwise_count(x).sum(axis=2, dtype=np.int32)


def store_vectors(x: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Normalised float vectors -> the stored array of ``dtype`` (int8 needs ``ranges``)."""
    if dtype == "float32":
        return np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return np.asarray(x, dtype=np.float16)
    if dtype == "int8":
        return quantize_int8(x, ranges)
    raise LmforgeError(f"vector dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")


def block_scorer(stored: np.ndarray, ranges: np.ndarray | None) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """``score(q, a, b)``: inner products of float queries (Q, D) with stored rows ``a:b`` -> (Q, b - a)."""
    if stored.dtype == np.int8:
        lo = torch.from_numpy(np.ascontiguousarray(ranges[0]))
        step = torch.from_numpy(np.ascontiguousarray((ranges[1] - ranges[0]) / 255.0))

        def score(q: torch.Tensor, a: int, b: int) -> torch.Tensor:
            codes = torch.from_numpy(np.asarray(stored[a:b], dtype=np.float32)) + 128.0  # (b-a, D)
            return (q @ lo)[:, None] + (q * step) @ codes.T  # (Q, b-a)
        return score

    def score(q: torch.Tensor, a: int, b: int) -> torch.Tensor:  # numpy reads the (read-only) memmap directly
        return torch.from_numpy(q.numpy() @ np.asarray(stored[a:b], dtype=np.float32).T)  # (Q, b-a)
    return score


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int):
    """Keep the k best of the running and the new candidates, ordered by (score desc, index asc)."""
    cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    order = torch.argsort(cat_i, dim=1)  # index ascending ...
    cat_s, cat_i = cat_s.gather(1, order), cat_i.gather(1, order)
    order = torch.argsort(-cat_s, dim=1, stable=True)[:, :k]  # ... then score descending
    return cat_s.gather(1, order), cat_i.gather(1, order)


def exact_topk(queries: np.ndarray, stored: np.ndarray, k: int, *, ranges: np.ndarray | None = None,
               block: int = 16384, rows: np.ndarray | None = None,
               query_block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of queries with stored vectors, in corpus blocks.

    Args:
        queries: (Q, D) float queries (normalised for cosine).
        stored: (N, D) float32 / float16 / int8 corpus (may be a read-only memmap).
        k: results per query (clipped to N).
        ranges: (2, D) int8 ranges when ``stored`` is int8.
        block: corpus rows scored at once (memory O(Q x (block + k))).
        rows: optional (Q, C) candidate row ids per query: score only those (rescoring).
        query_block: queries scored at once.

    Returns:
        ``(scores (Q, k'), ids (Q, k'))`` float32 / int64, best first, ties by lower row id.
    """
    if k < 1:
        raise LmforgeError(f"k must be >= 1, got {k}")
    if len(queries) > query_block:  # bound memory by query blocks too
        parts = [exact_topk(queries[s:s + query_block], stored, k, ranges=ranges, block=block,
                            rows=None if rows is None else rows[s:s + query_block], query_block=query_block)
                 for s in range(0, len(queries), query_block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (Q, D)
    score = block_scorer(stored, ranges)
    if rows is not None:
        return _rescore(q, stored, ranges, rows, k)
    n = stored.shape[0]
    k = min(k, n)
    best_s = torch.empty((q.shape[0], 0))
    best_i = torch.empty((q.shape[0], 0), dtype=torch.long)
    with torch.no_grad():
        for a in range(0, n, block):
            b = min(n, a + block)
            sims = score(q, a, b)  # (Q, b-a)
            s, i = torch.topk(sims, min(k, b - a), dim=1)
            best_s, best_i = _merge(best_s, best_i, s, i + a, k)
    return best_s.numpy(), best_i.numpy()


def _rescore(q: torch.Tensor, stored: np.ndarray, ranges, rows: np.ndarray, k: int):
    """Exact scores of each query's candidate rows; the k best."""
    flat = np.unique(rows)
    sub = np.asarray(stored[flat])  # (U, D)
    vecs = dequantize_int8(sub, ranges) if sub.dtype == np.int8 else sub.astype(np.float32)
    where = {int(r): j for j, r in enumerate(flat)}
    cols = torch.as_tensor(np.vectorize(where.get)(rows), dtype=torch.long)  # (Q, C)
    sims = torch.einsum("qd,qcd->qc", q, torch.from_numpy(vecs)[cols])  # (Q, C)
    ids = torch.as_tensor(rows, dtype=torch.long)
    k = min(k, rows.shape[1])
    s, i = _merge(torch.empty((q.shape[0], 0)), torch.empty((q.shape[0], 0), dtype=torch.long), sims, ids, k)
    return s.numpy(), i.numpy()


def binary_candidates(queries: np.ndarray, packed: np.ndarray, n_candidates: int,
                      block: int = 8192) -> np.ndarray:
    """Row ids of the ``n_candidates`` smallest Hamming distances per query: (Q, C) int64."""
    qb = pack_binary(queries)  # (Q, B)
    n = packed.shape[0]
    block = max(64, min(block, (32 << 20) // max(1, qb.shape[0] * qb.shape[1])))  # XOR temp <= 32 MiB
    c = min(n_candidates, n)
    best_d = np.empty((len(qb), 0), dtype=np.int32)
    best_i = np.empty((len(qb), 0), dtype=np.int64)
    for a in range(0, n, block):
        d = hamming(qb, np.asarray(packed[a:a + block]))  # (Q, b)
        ids = np.broadcast_to(np.arange(a, a + d.shape[1]), d.shape)
        cat_d, cat_i = np.concatenate([best_d, d], 1), np.concatenate([best_i, ids], 1)
        part = np.argsort(cat_d, axis=1, kind="stable")[:, :c]
        best_d, best_i = np.take_along_axis(cat_d, part, 1), np.take_along_axis(cat_i, part, 1)
    return best_i
