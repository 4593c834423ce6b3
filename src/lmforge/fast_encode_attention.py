"""Eager attention groups of :mod:`lmforge.fast_encode` on CPU: which sequences attend together
(:func:`_groups`), how many key columns they are padded to (:func:`_key_cols`), and one group's
gather -> scores -> softmax -> values -> scatter (:class:`_Eager`, softmax by
:func:`lmforge.cpu_kernels.softmax_`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cpu_kernels import softmax_, softmax_keys_

# a group of sequences attends together while its (c, H, L, L) scores stay under this many
# elements (1.5 MB in bf16: one 256-token MiniLM sequence). Smaller chunks (heads in chunks that
# stay in the 1 MB L2 of this EPYC) measured slower once allocations are steady (1 thread, bf16, 32
# x 256 x 12 heads x 32, per layer: all 12 heads 41.7 ms, chunks of 6 44.2, 4 46.3, 2 52.6; the
# 61 ms -> 44 ms seen with chunks came from page faults of fresh 1.5 MB score tensors, which the
# reused buffers of _Eager avoid at any chunking)
GROUP_SCORES = 12 * 256 * 256
# eager attention: key columns padded to a multiple of this. torch's bf16 softmax runs rows in
# 32-wide vectors and the rest element by element (1 thread, ns per element: 20 columns 4.7, 31
# 6.3, 32 1.45, 48 2.7, 63 3.5, 64 0.98, 256 0.84); the padded keys get weight exactly 0. Whole
# group (32 sequences of ~m tokens, 12 heads, bf16, 1 thread, us; m: unpadded / padded): 9: 654 /
# 572, 12: 975 / 757, 20: 1540 / 852, 40: 3327 / 2645, 52: 3572 / 2433, 70: 2594 / 2411; but a
# remainder of <= KEY_TAIL columns past a block loses (33: 2060 / 2817; 36, 100, 130, 230 equal)
KEY_BLOCK = 32
KEY_TAIL = 4


def _groups(cu: list[int], heads: int, budget: int | None) -> list[tuple[int, int]]:
    """Consecutive sequences ``[g0, g1)`` attending together: while ``count * H * max_len^2``
    stays within ``budget`` (one group of everything when ``budget`` is None)."""
    n = len(cu) - 1
    if budget is None:
        return [(0, n)] if n else []
    out, g0, top = [], 0, 0
    for i in range(n):
        top_i = max(top, cu[i + 1] - cu[i])
        if i > g0 and (i - g0 + 1) * heads * top_i * top_i > budget:
            out.append((g0, i))
            g0, top_i = i, cu[i + 1] - cu[i]
        top = top_i
    if n:
        out.append((g0, n))
    return out


def _key_cols(m: int) -> int:
    """Key columns of a group whose longest sequence has ``m`` tokens: ``m`` rounded up to a
    multiple of :data:`KEY_BLOCK` (the padded keys are masked by the bias), except past one block
    with a remainder of at most :data:`KEY_TAIL` (a few scalar softmax columns cost less than the
    larger score GEMMs)."""
    tail = m % KEY_BLOCK
    if tail == 0 or (m > KEY_BLOCK and tail <= KEY_TAIL):
        return m
    return m + KEY_BLOCK - tail


@dataclass
class _Eager:
    """One eager attention group of ``c`` consecutive sequences (rows ``[s, e)`` of the packed
    layout, ``n_g = e - s``), the longest ``m`` tokens, keys padded to ``mk = _key_cols(m)``:

        [q | k | v] = qkv[s:e].view(n_g * 3 * H, d)[gather]     (c*H*m + 2*c*H*mk, d), head-major
        w = softmax(q k^T * scale + bias)                         (c*H, m, mk), bias 0 | dtype min
                                                                  (fp32 on CPU: the softmax over each
                                                                  sequence's real keys, the rest 0)
        o = w v                                                    (c*H, m, d)
        out[s:e].view(n_g * H, d) = o.view(c*H*m, d)[scatter]     the real rows back, heads merged

    A padded query slot repeats its sequence's last row (its output is never scattered back); a
    padded key slot does too, and its bias (dtype min) gives it weight exactly 0. One sequence
    with ``m = mk`` (``gather`` None) is a permute copy instead of a gather.
    """

    s: int
    e: int
    c: int
    m: int
    mk: int
    gather: Tensor | None
    bias: Tensor | None
    scatter: Tensor | None
    keys: Tensor | None = None  # (c*H,) int32 real keys per score matrix (fp32: the mask in the softmax)

    @classmethod
    def make(cls, cu: list[int], heads: int, dtype, device) -> "_Eager":
        s, e, c = cu[0], cu[-1], len(cu) - 1
        lens = [cu[i + 1] - cu[i] for i in range(c)]
        m = max(lens)
        mk = _key_cols(m)
        if c == 1 and mk == m:
            return cls(s, e, 1, m, m, None, None, None)
        lt = torch.tensor(lens, device=device)  # (c,)
        start = torch.tensor(cu[:-1], device=device)[:, None] - s  # (c, 1)
        hh = torch.arange(heads, device=device)[None, :, None]  # (1, H, 1)

        def rows(width: int, j: int) -> Tensor:  # (c, H, width) rows of the (n_g * 3 * H, d) view
            t = torch.minimum(torch.arange(width, device=device)[None, :], lt[:, None] - 1) + start  # (c, width)
            return ((t[:, None, :] * 3 + j) * heads + hh).reshape(-1)

        gather = torch.cat([rows(m, 0), rows(mk, 1), rows(mk, 2)])
        valid = torch.arange(mk, device=device)[None, :] < lt[:, None]  # (c, mk)
        bias = keys = None
        if not bool(valid.all()):
            bias = torch.zeros(c, heads, 1, mk, dtype=dtype, device=device)
            bias.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
            bias = bias.view(c * heads, 1, mk)
            if dtype == torch.float32 and torch.device(device).type == "cpu":
                keys = lt.to(torch.int32).repeat_interleave(heads)  # (c*H,)
        b = torch.repeat_interleave(torch.arange(c, device=device), lt)  # (n_g,) sequence of each row
        t = torch.arange(e - s, device=device) - start[:, 0].repeat_interleave(lt)  # (n_g,) its position
        scatter = ((b[:, None] * heads + hh[0, :, 0]) * m + t[:, None]).reshape(-1)  # (n_g * H,)
        return cls(s, e, c, m, mk, gather, bias, scatter, keys)

    @staticmethod
    def buffers(groups: list["_Eager"], heads: int, d: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One flat buffer each for the gathered q|k|v, the scores and the outputs, sized for the
        largest group, reused by every group and layer of one forward."""
        qkv = max(g.c * heads * (g.m + 2 * g.mk) * d for g in groups)
        scores = max(g.c * heads * g.m * g.mk for g in groups)
        outs = max(g.c * heads * g.m * d for g in groups)
        return like.new_empty(qkv), like.new_empty(scores), like.new_empty(outs)

    def run(self, qkv: Tensor, out: Tensor, bufs: tuple[Tensor, Tensor, Tensor], h: int, d: int, scale: float):
        """Attention of this group: ``qkv`` (N, 3D) -> its rows of ``out`` (N, D)."""
        n, m, mk = self.c * h, self.m, self.mk
        rows = qkv[self.s:self.e]
        if self.gather is None:  # one sequence of mk tokens: (3, H, L, d) by one permute copy
            t = bufs[0][:3 * n * m * d].view(3, n, m, d)
            t.copy_(rows.view(m, 3, h, d).permute(1, 2, 0, 3))
            q, k, v = t[0], t[1], t[2]
        else:
            t = bufs[0][:self.gather.numel() * d].view(-1, d)
            torch.index_select(rows.reshape(-1, d), 0, self.gather, out=t)
            q = t[:n * m].view(n, m, d)
            k, v = t[n * m:].view(2, n, mk, d)
        w = bufs[1][:n * m * mk].view(n, m, mk)
        if self.bias is None or self.keys is not None:
            torch.baddbmm(w, q, k.transpose(1, 2), beta=0, alpha=scale, out=w)
        else:
            torch.baddbmm(self.bias, q, k.transpose(1, 2), alpha=scale, out=w)
        if self.keys is None or not softmax_keys_(w, self.keys):
            if self.keys is not None:  # no C kernel: the bias after all
                w.add_(self.bias)
            softmax_(w)
        o = bufs[2][:n * m * d].view(n, m, d)
        torch.bmm(w, v, out=o)
        if self.gather is None:
            out[self.s:self.e].view(m, h, d).copy_(o.transpose(0, 1))
        else:
            torch.index_select(o.view(-1, d), 0, self.scatter, out=out[self.s:self.e].view(-1, d))
