"""Unpadded (variable-length) encoder batches: no compute spent on padding tokens.

A right-padded batch ``(B, T)`` with ``N = sum_b len_b`` real tokens is concatenated into one row
``(1, N)`` (per-sequence ``position_ids`` restart at 0), so embeddings, every linear layer, layer
norms and activations run on ``N`` tokens instead of ``B * T``. Attention stays per sequence:
with ``cu = [0, len_0, len_0 + len_1, ...]`` (cumulative lengths, ``B + 1``) the query/key/value
rows of sequence ``b`` are ``cu[b] .. cu[b+1]-1``; they are gathered into ``(B, H, L, d)`` with
``L = max_b len_b`` and a key-padding mask, so sequence ``b`` attends to itself only

    out_i = softmax(q_i K_b^T * scale + mask_b) V_b,      i in [cu[b], cu[b+1])

(the block-diagonal attention of the concatenated row, without its ``N^2`` cost), then scattered
back to ``(1, N, H, d)``. The backbone's ``last_hidden_state`` is re-padded to ``(B, T, D)``
(zeros at padding) so heads, pooling and losses see the usual shapes; BERT's pooler is recomputed
on the re-padded states.

Only non-causal encoders (BERT family) are unpadded, and only batches that are right-padded, have
at least ``MIN_PADDING`` padding, give no ``position_ids`` and ask for no attentions/hidden states;
every other call takes the plain path unchanged. ``inputs_embeds`` ``(B, T, D)`` (instead of
``input_ids``) are unpadded the same way, rows ``(1, N, D)``: prompt tuning's hook prepends its N
virtual tokens as embeddings with N ones in the mask, so they are real tokens of each row and
the batch stays right-padded. Works on any device (index ops only).

An unpadded model also runs its dropout (``nn.Dropout`` modules and the attention weights' dropout
of the eager kernel) with :mod:`lmforge.fast_dropout` (16 random bits per element instead of a
Bernoulli draw: about a quarter of a MiniLM training step on CPU was dropout's mask). The eager
kernel of a packed row is head-major (:func:`varlen_eager`). And a sequence classifier whose head
reads token 0 only (BERT's pooler) runs its last layer on each sequence's first row only
(:func:`first_rows_layer`): same logits and gradients, ~1/6 less compute on a 6-layer MiniLM.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import Tensor, nn

from lmforge.fast_dropout import disable_fast_dropout, enable_fast_dropout
from lmforge.fast_dropout import dropout as fast_dropout
from lmforge.fast_dropout import dropout_unscaled

_PREFIX = "lmforge_unpad_"
# Batches with less padding than this share of B*T take the plain path: gathering per-sequence
# attention costs about 5% of a MiniLM step, more than length-sorted batches (encode, grouped
# training: a few % padding) waste on padding; random batches (30-75% padding) gain 1.3-1.7x.
MIN_PADDING = 0.10
_INNER = ("eager", "sdpa")


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
    if inner is _eager():
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


def _eager():
    return eager_attention


def _inner_fn(name: str):
    if name == "eager":
        return _eager()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _make_attention(inner_name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        cu = kwargs.pop("cu_seq_lens_q", None)
        max_len = kwargs.pop("max_length_q", None)
        kwargs.pop("cu_seq_lens_k", None), kwargs.pop("max_length_k", None)
        inner = _inner_fn(inner_name)
        if cu is None or attention_mask is not None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        return varlen_attention(inner, module, query, key, value, cu, int(max_len), **kwargs), None
    return attention


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for inner, mask_fn in (("eager", eager_mask), ("sdpa", sdpa_mask)):
        AttentionInterface.register(_PREFIX + inner, _make_attention(inner))
        AttentionMaskInterface.register(_PREFIX + inner, mask_fn)  # the plain path builds its usual mask
    _REGISTERED = True


def _is_causal(model: nn.Module) -> bool:
    cfg = model.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "is_encoder_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def can_unpad(model: nn.Module) -> bool:
    """Whether :func:`enable_unpadding` applies: a non-causal transformers encoder whose attention
    is eager or SDPA (or already unpadded) and goes through transformers' attention interface
    (``_supports_attention_backend``: MPNet's own attention would attend across the packed
    sequences)."""
    base = getattr(model, "base_model", model)
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    return (impl is not None and (impl in _INNER or impl.startswith(_PREFIX)) and not _is_causal(base)
            and bool(getattr(type(base), "_supports_attention_backend", False)))


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


def _unpad_call(module, args, kwargs):
    """The packed call's keyword arguments and the layout to re-pad with, or None (plain path)."""
    impl = module.config._attn_implementation
    if impl in _INNER:  # switched back with set_attn_implementation (e.g. eager for training): re-wrap
        _register()
        module.config._attn_implementation = _PREFIX + impl
    ids, mask = _arg(args, kwargs, 0, "input_ids"), _arg(args, kwargs, 1, "attention_mask")
    embeds = kwargs.get("inputs_embeds")  # (B, T, D), e.g. from prompt tuning's hook
    plain = ((ids is None) == (embeds is None) or mask is None or mask.dim() != 2 or len(args) > 3
             or not str(module.config._attn_implementation).startswith(_PREFIX)
             or any(kwargs.get(k) is not None for k in ("position_ids", "encoder_hidden_states"))
             or any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states", "use_cache"))
             or kwargs.get("return_dict") is False or kwargs.get("cache") is not None
             or (float(mask.sum()) > (1 - MIN_PADDING) * mask.numel()  # (almost) no padding, unless the
                 and not module.__dict__.get("_lmforge_first_only"))  # first-rows last layer pays for the gathers
             or bool((mask[:, 1:] > mask[:, :-1]).any()))  # not right-padded
    if plain:
        return None
    flat_idx, pos, cu, max_len = unpad_layout(mask)
    tt = _arg(args, kwargs, 2, "token_type_ids")
    tt = tt.reshape(-1)[flat_idx] if tt is not None else torch.zeros_like(flat_idx)
    new = {k: v for k, v in kwargs.items()
           if k not in ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids")}
    if ids is not None:
        new["input_ids"] = ids.reshape(-1)[flat_idx].unsqueeze(0)  # (1, N)
    else:
        new["inputs_embeds"] = embeds.reshape(-1, embeds.shape[-1]).index_select(0, flat_idx).unsqueeze(0)
    emb = getattr(module, "embeddings", None)
    if hasattr(emb, "create_position_ids_from_input_ids") and getattr(emb, "padding_idx", None) is not None:
        pos = pos + emb.padding_idx + 1  # RoBERTa family: positions start after the padding index
    new.update(attention_mask=None, token_type_ids=tt.unsqueeze(0), position_ids=pos.unsqueeze(0),
               cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return new, (flat_idx, *mask.shape)


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


_FIRST_TOKEN_HEADS = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                      "XLMRobertaForSequenceClassification")


def _reads_first_token_only(model: nn.Module) -> bool:
    """transformers' own sequence-classification heads that read the backbone at token 0 only,
    on a backbone whose last layer :func:`first_rows_layer` can run."""
    cls = type(model)
    if cls.__name__ not in _FIRST_TOKEN_HEADS or not cls.__module__.startswith("transformers.models."):
        return False
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    last = layers[-1] if layers else None
    sa = getattr(getattr(last, "attention", None), "self", None)
    return (sa is not None and callable(getattr(last, "feed_forward_chunk", None))
            and all(isinstance(getattr(sa, k, None), nn.Module) for k in ("query", "key", "value"))
            and not getattr(last, "is_decoder", False) and not getattr(last, "chunk_size_feed_forward", 0))


def _first_token_forward(self, *args, **kwargs):
    """The head's forward with its backbone told that only token 0 of the output is read."""
    base = self.base_model
    base.__dict__["_lmforge_first_only"] = True
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        base.__dict__["_lmforge_first_only"] = False


def _unpadded_forward(self, *args, **kwargs):
    """The backbone's forward on the packed row, its states re-padded to ``(B, T, D)``; inside a
    first-token head's call (:func:`_first_token_forward`) the last layer computes first rows only."""
    call = _unpad_call(self, args, kwargs)
    if call is None:
        return type(self).forward(self, *args, **kwargs)
    new, (flat_idx, b, t) = call
    last = self.encoder.layer[-1] if self.__dict__.get("_lmforge_first_only") else None
    if last is not None and self.config._attn_implementation == _PREFIX + "eager":
        last.forward = functools.partial(first_rows_layer, last, cu=new["cu_seq_lens_q"],
                                         max_len=new["max_length_q"])
        try:
            output = type(self).forward(self, **new)
        finally:
            del last.forward
    else:
        output = type(self).forward(self, **new)
    hidden = output.last_hidden_state[0]  # (N, D)
    full = hidden.new_zeros(b * t, hidden.shape[-1]).index_copy(0, flat_idx, hidden).view(b, t, -1)  # (B, T, D)
    output["last_hidden_state"] = full
    pooler = getattr(self, "pooler", None)
    if getattr(output, "pooler_output", None) is not None and pooler is not None:
        output["pooler_output"] = pooler(full)
    return output


def enable_unpadding(model: nn.Module) -> bool:
    """Run ``model``'s encoder on unpadded batches from now on (idempotent; the backbone's
    ``forward`` is wrapped on the instance, no hooks, state dict unchanged), its dropout (modules
    and attention) with :mod:`lmforge.fast_dropout`'s cheaper mask. Returns False (and changes
    nothing) when the model cannot be unpadded (:func:`can_unpad`)."""
    if not can_unpad(model):
        return False
    base = getattr(model, "base_model", model)
    if is_unpadded(base):
        return True
    _register()
    impl = base.config._attn_implementation
    base.config._attn_implementation = impl if impl.startswith(_PREFIX) else _PREFIX + impl
    base.forward = types.MethodType(_wrapper_for(type(base)), base)
    if model is not base and _reads_first_token_only(model):
        model.forward = types.MethodType(_wrapper_for(type(model), _first_token_forward), model)
    enable_fast_dropout(model)
    return True


_WRAPPERS: dict[tuple, object] = {}


def _wrapper_for(cls: type, fn=None):
    """``fn`` (default :func:`_unpadded_forward`) carrying ``cls.forward``'s signature
    (``inspect.signature`` of the bound method reads the original parameters: hooks that bind
    arguments keep working)."""
    fn = fn or _unpadded_forward
    if (cls, fn) not in _WRAPPERS:
        @functools.wraps(cls.forward)
        def forward(self, *args, **kwargs):
            return fn(self, *args, **kwargs)
        forward._lmforge_unpadded = True
        _WRAPPERS[cls, fn] = forward
    return _WRAPPERS[cls, fn]


def disable_unpadding(model: nn.Module) -> None:
    """Undo :func:`enable_unpadding` (plain padded batches again). While enabled, a kernel switch
    with ``set_attn_implementation("eager" | "sdpa")`` keeps the batches unpadded (that kernel runs
    each sequence's attention)."""
    base = getattr(model, "base_model", model)
    if not is_unpadded(base):
        return
    del base.forward
    head = model.__dict__.get("forward")
    if model is not base and getattr(getattr(head, "__func__", None), "_lmforge_unpadded", False):
        del model.forward
    disable_fast_dropout(model)
    base.config._attn_implementation = base.config._attn_implementation.removeprefix(_PREFIX)


def is_unpadded(model: nn.Module) -> bool:
    fwd = getattr(getattr(model, "base_model", model), "__dict__", {}).get("forward")
    return getattr(getattr(fwd, "__func__", None), "_lmforge_unpadded", False)
