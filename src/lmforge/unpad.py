"""Unpadded (variable-length) encoder batches: no compute spent on padding tokens.

A right-padded batch ``(B, T)`` with ``N = sum_b len_b`` real tokens is concatenated into one row
``(1, N)`` (per-sequence ``position_ids`` restart at 0), so embeddings, every linear layer, layer
norms and activations run on ``N`` tokens instead of ``B * T``. Attention stays per sequence (the
block-diagonal attention of the concatenated row without its ``N^2`` cost; the kernels, pure tensor
functions, are in :mod:`lmforge.unpad_kernels`, re-exported here), registered behind transformers'
attention interface. The backbone's ``last_hidden_state`` is re-padded to ``(B, T, D)`` (zeros at
padding) so heads, pooling and losses see the usual shapes; BERT's pooler is recomputed on the
re-padded states.

Only non-causal encoders (BERT family) are unpadded, and only batches that are right-padded, have
at least ``MIN_PADDING`` padding, give no ``position_ids`` and ask for no attentions/hidden states;
every other call takes the plain path unchanged. ``inputs_embeds`` ``(B, T, D)`` (instead of
``input_ids``) are unpadded the same way, rows ``(1, N, D)``: prompt tuning's hook prepends its N
virtual tokens as embeddings with N ones in the mask, so they are real tokens of each row and
the batch stays right-padded. Works on any device (index ops only).

An unpadded model also runs its dropout (``nn.Dropout`` modules and the attention weights' dropout
of the eager kernel) with :mod:`lmforge.fast_dropout` (15 random bits per element instead of a
Bernoulli draw: about a quarter of a MiniLM training step on CPU was dropout's mask). The eager
kernel of a packed row is head-major (:func:`varlen_eager`). And a sequence classifier whose head
reads token 0 only (BERT's pooler) runs its last layer on each sequence's first row only
(:func:`first_rows_layer`): same logits and gradients, ~1/6 less compute on a 6-layer MiniLM.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn

from lmforge.fast_dropout import disable_fast_dropout, enable_fast_dropout
from lmforge.unpad_kernels import (KEY_ALIGN, eager_attention, first_rows_layer, unpad_layout, varlen_attention,
                                   varlen_eager)

__all__ = ["MIN_PADDING", "KEY_ALIGN", "can_unpad", "enable_unpadding", "disable_unpadding", "is_unpadded",
           "unpad_layout", "varlen_attention", "varlen_eager", "eager_attention", "first_rows_layer"]

_PREFIX = "lmforge_unpad_"
# Batches with less padding than this share of B*T take the plain path: gathering per-sequence
# attention costs about 5% of a MiniLM step, more than length-sorted batches (encode, grouped
# training: a few % padding) waste on padding; random batches (30-75% padding) gain 1.3-1.7x.
MIN_PADDING = 0.10
_INNER = ("eager", "sdpa")


def _inner_fn(name: str):
    if name == "eager":
        return eager_attention
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
