"""The kernels of unpadded (variable-length) encoder batches: pure tensor functions.

A right-padded batch ``(B, T)`` with ``N = sum_b len_b`` real tokens is one row ``(1, N)``
(:func:`unpad_layout`); with ``cu = [0, len_0, len_0 + len_1, ...]`` (cumulative lengths,
``B + 1``) the query/key/value rows of sequence ``b`` are ``cu[b] .. cu[b+1]-1``. Attention stays
per sequence: the rows are gathered into ``(B, H, L, d)`` (``L = max_b len_b``) with a key-padding
mask, so sequence ``b`` attends to itself only

    out_i = softmax(q_i K_b^T * scale + mask_b) V_b,      i in [cu[b], cu[b+1])

(the block-diagonal attention of the concatenated row, without its ``N^2`` cost), then scattered
back to ``(1, N, H, d)`` (:func:`varlen_attention`; the eager kernel head-major:
:func:`varlen_eager`). :func:`eager_attention` is transformers' BERT eager attention with its
weights kept in the scores' dtype and :mod:`lmforge.fast_dropout`'s dropout;
:func:`first_rows_layer` runs a BERT layer on each sequence's first row only.

:mod:`lmforge.unpad` wires these into a model (transformers' attention interface, the packed
forward, re-padding). Works on any device (index ops only).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.fast_dropout import dropout as fast_dropout
from lmforge.fast_dropout import dropout_unscaled


def unpad_layout(attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Where the real tokens of a right-padded ``(B, T)`` mask sit in the concatenated row.

    Returns:
        ``flat_idx`` (N,) positions of real tokens in the flattened ``(B*T)`` batch;
        ``position_ids`` (N,) index of each token inside its sequence;
        ``cu_seq_lens`` (B+1,) int32 cumulative lengths; ``max_len`` (the longest sequence).
    """
    mask = attention_mask.bool()
    lens = mask.sum(-1)  # (B,)
    flat_idx = mask.reshape(-1).nonzero().squeeze(1)  # (N,)
    pos = (mask.long().cumsum(-1) - 1).reshape(-1)[flat_idx]  # (N,)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = lens.cumsum(0)
    return flat_idx, pos, cu, int(lens.max()) if lens.numel() else 0


def _padded_slots(cu: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Where each of the ``N`` packed rows goes in the padded ``(B, L)`` layout, and validity.

    Returns:
        ``dest`` (N,): ``b * L + (i - cu[b])`` for row ``i`` of sequence ``b``;
        ``valid`` (B, L): ``t < len_b``.
    """
    lens = (cu[1:] - cu[:-1]).long()  # (B,)
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens)  # (N,)
    dest = seq * max_len + torch.arange(seq.numel(), device=cu.device) - cu[:-1].long()[seq]  # (N,)
    valid = torch.arange(max_len, device=cu.device).unsqueeze(0) < lens.unsqueeze(1)  # (B, L)
    return dest, valid


def varlen_attention(inner, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, cu: Tensor,
                     max_len: int, **kwargs) -> Tensor:
    """Attention of a packed row, sequence by sequence.

    Args:
        inner: transformers' attention function (eager or SDPA) run on the gathered batch.
        query, key, value: ``(1, H, N, d)`` (``key``/``value`` may have fewer heads: GQA).
        cu: ``(B+1,)`` cumulative sequence lengths; ``max_len``: the longest sequence.

    Returns:
        ``(1, N, H, d)`` attention output (the layout transformers' attention functions return).

    Rows move with ``index_copy`` into zeros and ``index_select`` back (their gradients are
    ``index_select`` / ``index_add``, not the sorting ``index_put`` of advanced indexing).
    """
    if inner is eager_attention:
        return varlen_eager(module, query, key, value, cu, max_len, **kwargs)
    dest, valid = _padded_slots(cu, max_len)
    b = valid.shape[0]

    def scatter(x: Tensor) -> Tensor:  # (1, H, N, d) -> (B, H, L, d), zeros at padding
        h, d = x.shape[1], x.shape[-1]
        out = x.new_zeros(h, b * max_len, d).index_copy(1, dest, x[0])  # (H, B*L, d)
        return out.view(h, b, max_len, d).transpose(0, 1)

    q, k, v = scatter(query), scatter(key), scatter(value)
    mask = valid[:, None, None, :]  # (B, 1, 1, L) keys of the same sequence
    out, _ = inner(module, q, k, v, mask, **kwargs)  # (B, L, H, d)
    return out.reshape(b * max_len, *out.shape[2:]).index_select(0, dest).unsqueeze(0)  # (1, N, H, d)


# Keys per sequence are padded (masked) to a multiple of this. torch's bf16 softmax on CPU costs
# ~2.3 ns per element at rows of 77, 1.6 at 80, 0.95 at 64/96 (1 thread), and the kernel alone
# (32 x 12 heads x 77 rows, forward + backward) gains from 16 (28.9 -> 25.5 ms); but whole prompt-
# tuning steps lose (interleaved, CPU ms: none 537-541, 16: 556-566, 32: 584): the larger matmuls,
# masks and backward cost more than the softmax saves. So none.
KEY_ALIGN = 1


def varlen_eager(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, cu: Tensor, max_len: int,
                 scaling: float | None = None, dropout: float = 0.0, q_cu: Tensor | None = None,
                 q_len: int | None = None, **kwargs) -> Tensor:
    """:func:`eager_attention` of a packed row, sequence by sequence, laid out head-major.

    ``(1, H, N, d)`` in (``key``/``value`` may have fewer heads: GQA, repeated), ``(1, N, H, d)``
    out. With ``L = max_len`` and ``Lk = L`` rounded up to :data:`KEY_ALIGN`, rows move (``index_copy``
    into zeros) to ``(H*B, L, d)`` queries and ``(H*B, Lk, d)`` keys/values: head-major, so every
    batched matmul reads contiguous blocks (no copy of transposed operands), and per block ``b``

        s = scaling * q k^T + m_b          (L, Lk), m_b = 0 on the sequence's keys, dtype min elsewhere
        out = (keep * softmax(s)) v / (1 - p')

    ``s`` is one ``baddbmm`` (scale and mask inside the matmul), the softmax stays in the scores'
    dtype (as :func:`eager_attention`), the dropout mask (:mod:`lmforge.fast_dropout`) is applied
    without its scale, which multiplies the ``(L, d)`` output instead of the ``(L, Lk)`` weights.

    ``q_cu`` / ``q_len``: queries of a different layout than the keys (``query`` ``(1, H, Nq, d)``,
    sequence ``b``'s queries ``q_cu[b] .. q_cu[b+1]-1``, at most ``q_len``; default ``cu`` /
    ``max_len``), e.g. one query per sequence (:func:`first_rows_layer`); out ``(1, Nq, H, d)``."""
    h, d = query.shape[1], query.shape[-1]
    if key.shape[1] != h:  # grouped-query attention: repeat the shared heads
        key, value = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (key, value))
    if scaling is None:
        scaling = d ** -0.5
    b = cu.numel() - 1
    lk = -(-max_len // KEY_ALIGN) * KEY_ALIGN
    lens = (cu[1:] - cu[:-1]).long()  # (B,)

    def slots(c: Tensor, width: int) -> Tensor:  # row i of sequence b -> b * width + (i - c[b])
        counts = (c[1:] - c[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(b, device=c.device), counts)  # (N,)
        return seq * width + torch.arange(seq.numel(), device=c.device) - c[:-1].long()[seq]

    lq = max_len if q_cu is None else q_len
    dest_q, dest_k = slots(cu if q_cu is None else q_cu, lq), slots(cu, lk)

    def gather(x: Tensor, dest: Tensor, rows: int) -> Tensor:  # (1, H, N, d) -> (H*B, rows, d)
        return x.new_zeros(h, b * rows, d).index_copy(1, dest, x[0]).view(h * b, rows, d)

    q, k, v = gather(query, dest_q, lq), gather(key, dest_k, lk), gather(value, dest_k, lk)
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    other = torch.arange(lk, device=cu.device)[None, :] >= lens[:, None]  # (B, Lk) not this sequence's key
    mask = torch.zeros(b, 1, lk, dtype=dtype, device=q.device).masked_fill_(other[:, None], torch.finfo(dtype).min)
    mask = mask.expand(h, b, 1, lk).reshape(h * b, 1, lk)  # (H*B, 1, Lk), a small copy
    scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scaling)  # (H*B, L, Lk)
    with torch.autocast(dev, enabled=False):
        weights, scale = dropout_unscaled(torch.softmax(scores, dim=-1), dropout, module.training)
        out = torch.bmm(weights, v.to(weights.dtype))  # (H*B, L, d)
    if scale != 1.0:
        out = out.mul_(scale)
    out = out.view(h, b * lq, d).index_select(1, dest_q)  # (H, N, d)
    return out.transpose(0, 1).unsqueeze(0)  # (1, N, H, d)


def eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' BERT eager attention, ``dropout(softmax(q k^T * scaling + mask)) @ v``:
    ``(B, H, L, d)`` in, ``(B, L, H, d)`` out (and the weights), with two changes of where the
    ``(B, H, L, L)`` weights live: they stay in the scores' dtype (under bf16 autocast: bf16, the
    softmax accumulating in fp32 inside the kernel, as a bf16 model's eager attention does) instead
    of autocast's fp32 softmax and the casts back to bf16 for ``@ v`` (forward and backward); and
    the dropout is :mod:`lmforge.fast_dropout`'s. Measured (32 x 12 heads x 71^2, bf16 autocast,
    forward + backward, 1 thread): 48 -> 31 ms per layer."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3))  # (B, H, L, L)
    with torch.autocast(query.device.type, enabled=False):
        weights = weights.mul_(scaling)
        if attention_mask is not None:
            weights = weights + attention_mask.to(weights.dtype)
        weights = fast_dropout(torch.softmax(weights, dim=-1), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def first_rows_layer(layer: nn.Module, hidden_states: Tensor, *args, cu: Tensor, max_len: int, **kwargs) -> Tensor:
    """A BERT-family layer on the packed row ``(1, N, D)`` computing only each sequence's first row
    (``cu[:-1]``): keys and values from all ``N`` rows, queries, attention output, feed-forward
    and layer norms on ``B`` rows. Returns ``(1, N, D)``: those rows, zeros elsewhere.

    The last layer of a sequence classifier whose head reads the first token only (BERT's
    pooler, RoBERTa's head): the other rows' outputs are never read, so the logits and every
    gradient equal the full layer's, for ``2/12`` of its linear FLOPs (K and V projections) and
    ``1/L`` of its attention instead of all of it."""
    sa = layer.attention.self
    n, b = hidden_states.shape[1], cu.numel() - 1
    h, d = sa.num_attention_heads, sa.attention_head_size
    rows = cu[:-1].long()  # (B,)
    first = hidden_states.index_select(1, rows)  # (1, B, D)
    q = sa.query(first).view(1, b, h, d).transpose(1, 2)  # (1, H, B, d)
    k, v = (proj(hidden_states).view(1, n, -1, d).transpose(1, 2) for proj in (sa.key, sa.value))
    ctx = varlen_eager(sa, q, k, v, cu, max_len, scaling=getattr(sa, "scaling", None),
                       dropout=sa.dropout.p if sa.training else 0.0,
                       q_cu=torch.arange(b + 1, device=cu.device), q_len=1)  # (1, B, H, d)
    out = layer.feed_forward_chunk(layer.attention.output(ctx.reshape(1, b, h * d), first))  # (1, B, D)
    return out.new_zeros(1, n, out.shape[-1]).index_copy(1, rows, out)
