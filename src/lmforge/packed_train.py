"""A fast CPU training path for adapter-wrapped Llama decoders with frozen bf16 bases.

Both levers apply only where they can (CPU, bf16 operands, modules in training mode); every other
case (CUDA, fp32 runs, hooks, caches, sliding windows, padding masks) keeps the plain path, and
``ENABLED = False`` turns both off. Lever 2 is on by default; lever 1 is opt-in (``PACK_BASE``):
at these GEMM sizes ``F.linear`` already runs near oneDNN's packed speed, and the packs cost memory.

1. **Frozen base GEMMs on oneDNN-prepacked weights** (:func:`frozen_linear`). A LoRA layer's base
   ``W`` (out, in) never changes while the adapter trains, so it is reordered once into oneDNN's
   blocked layout, twice::

       forward   y  = x W^T + b        x (N, in) -> y (N, out)      pack of W
       backward  dx = dy W             dy (N, out) -> dx (N, in)    pack of W^T (in, out)

   with no weight gradient (the base is frozen); the LoRA matrices keep ordinary autograd around
   it. Packs are cached per module and valid while the weight holds the storage it was packed
   from at the same version counter: an in-place update (a merge, an optimizer step on an
   unfrozen base) or ``weight.data = other`` repacks. (Same rule as ``kv_cache.PackedLinears``,
   written again here: that module sits a layer above the adapters that call this one.)

2. **Causal attention per packed sequence, in query blocks** (:func:`causal_attention`). A packed
   row holds several samples whose position ids restart at 0; transformers then gives SDPA a
   (L, L) block mask, and SDPA's CPU kernel computes every query against every key of the row.
   Here, per sequence ``[s0, s1)`` and per block of at most ``BLOCK`` queries ``[b0, b1)``
   (offsets inside the sequence; ``g = H_q / H_kv`` query heads share a key head)::

       S = scale * Q[b0:b1] K[:b1]^T + M        (H_kv, g * (b1 - b0), b1)   M = -inf above the diagonal
       O[b0:b1] = softmax(S) V[:b1]             (H_kv, g * (b1 - b0), d)

   so keys after a block (the upper triangle) and keys of other samples are never touched, no
   ``repeat_kv`` copy is made, and the scores of one block stay in cache. Autograd differentiates
   it (baddbmm, softmax, bmm). Installed per attention module by :func:`enable` (an instance
   ``forward``; state dict and class unchanged), used when the module trains without a KV cache
   and its mask is exactly the causal (packed-sequence) mask of its position ids.
"""
from __future__ import annotations

import types
import weakref

import torch
from torch import Tensor, nn

from .device import onednn_linear

ENABLED = True  # the one switch: False keeps every layer on the plain path
# Lever 1 is opt-in: SmolLM2 SFT at 512 tokens, 1 thread, measured in-process interleaved 1 % faster
# steps (bench trials: -0.5 % to +12 %, load noise) for +425 MB peak RSS (two packs of every base).
PACK_BASE = False
BLOCK = 128  # queries per attention block (measured 512-token rows: 128/256 best, 64 slower)
# Lever 2 runs at most at this many intra-op threads: its many small parallel regions lost at 2
# threads on a loaded 2-core machine (SFT step 14.6 vs 9.1 CPU-s in-process; at 1 thread 2.6 vs 3.3)
MAX_THREADS = 1

_PACKS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def applies(base: nn.Module, x: Tensor) -> bool:
    """Whether :func:`frozen_linear` serves ``base(x)``: a plain, unhooked, frozen bf16
    ``nn.Linear`` on the CPU, in training mode, with ``x`` bf16 or under CPU bf16 autocast."""
    if not (ENABLED and PACK_BASE) or type(base) is not nn.Linear or not base.training or base._forward_hooks \
            or base._forward_pre_hooks or x.device.type != "cpu":
        return False
    w = base.weight
    if w.dtype != torch.bfloat16 or w.requires_grad or w.device.type != "cpu":
        return False
    if x.dtype != torch.bfloat16 and not (torch.is_autocast_enabled("cpu")
                                          and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    return onednn_linear(torch.bfloat16)


def packs(base: nn.Linear, rows: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(pack of W, pack of W^T, bias)`` of a frozen bf16 linear, packed again when the weight
    has another storage or version than when it was packed."""
    w = base.weight
    e = _PACKS.get(base)
    if e is None or e[0]() is not w.untyped_storage() or e[1] != (w.data_ptr(), w._version):
        wd = w.detach()
        reorder = torch.ops.mkldnn._reorder_linear_weight
        bias = None if base.bias is None else base.bias.detach().to(torch.bfloat16)
        e = (weakref.ref(w.untyped_storage()), (w.data_ptr(), w._version), reorder(wd, rows),
             reorder(wd.t().contiguous(), rows), bias)
        _PACKS[base] = e
    return e[2], e[3], e[4]


def drop_packs() -> None:
    """Forget every cached pack (memory; the next call packs again)."""
    _PACKS.clear()


class _FrozenLinear(torch.autograd.Function):
    """``y = x W^T + b`` on packed ``W``; backward ``dx = dy W`` on packed ``W^T``; no dW, no db."""

    @staticmethod
    def forward(ctx, x: Tensor, w_packed: Tensor, wt_packed: Tensor, bias: Tensor | None) -> Tensor:
        ctx.wt_packed = wt_packed
        return torch.ops.mkldnn._linear_pointwise.default(x, w_packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, dy: Tensor):
        dx = torch.ops.mkldnn._linear_pointwise.default(dy.contiguous(), ctx.wt_packed, None, "none", [], "")
        return dx, None, None, None


def frozen_linear(base: nn.Linear, x: Tensor) -> Tensor:
    """``base(x)`` for a frozen bf16 linear on packed weights (call when :func:`applies`).

    Args:
        x: (..., in), bf16 or fp32 under bf16 autocast (cast to bf16, as autocast would).
    Returns:
        (..., out) bf16.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    w, wt, bias = packs(base, x2.shape[0])
    with torch.autocast("cpu", enabled=False):
        y = _FrozenLinear.apply(x2.contiguous(), w, wt, bias)
    return y.view(*shape[:-1], y.shape[-1])


# ---- attention ----------------------------------------------------------------------------------
def segments(position_ids: Tensor | None, batch: int, length: int) -> list[list[tuple[int, int]]] | None:
    """Per row, the ``[start, end)`` spans whose position ids run 0, 1, 2, ... (a new span where
    they restart at 0); None when some span does not start at 0 (a continued sequence).

    Args:
        position_ids: (B, L) or (1, L) or None (every row one span ``[0, L)``).
    """
    if position_ids is None:
        return [[(0, length)]] * batch
    pos = position_ids.expand(batch, length)
    step = pos[:, 1:] - pos[:, :-1]  # (B, L-1)
    if bool((pos[:, 0] != 0).any()) or bool(((step != 1) & (pos[:, 1:] != 0)).any()):
        return None
    out = []
    for row in pos.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] + [length]
        out.append(list(zip(starts[:-1], starts[1:])))
    return out


def allowed(spans: list[list[tuple[int, int]]], length: int, device) -> Tensor:
    """(B, 1, L, L) bool: query i may attend key j (same span, j <= i): the mask this path computes."""
    seg = torch.tensor([[k for k, (a, b) in enumerate(row) for _ in range(b - a)] for row in spans], device=device)
    idx = torch.arange(length, device=device)
    return ((seg[:, :, None] == seg[:, None, :]) & (idx[None, :, None] >= idx[None, None, :]))[:, None]


def _mask_is(mask: Tensor, want: Tensor) -> bool:
    """Whether transformers' 4D mask (bool: True = attend; float: 0 = attend) is ``want``."""
    got = mask if mask.dtype == torch.bool else mask == 0
    return got.shape[-2:] == want.shape[-2:] and bool((got == want).all())


_BLOCK_MASKS: dict[tuple, Tensor] = {}


def _block_mask(n: int, b0: int, g: int, dtype: torch.dtype, device) -> Tensor:
    """(1, g*n, b0+n) additive mask of a block of ``n`` queries at offset ``b0``: 0 on keys
    ``<= `` the query, -inf after it; the ``g`` query heads of a key head stacked."""
    key = (n, b0, g, dtype, str(device))
    m = _BLOCK_MASKS.get(key)
    if m is None:
        m = torch.zeros(n, b0 + n, dtype=dtype, device=device)
        m[:, b0:] = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)
        m = m.repeat(g, 1)[None]
        if len(_BLOCK_MASKS) > 256:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = m
    return m


def causal_attention(q: Tensor, k: Tensor, v: Tensor, spans: list[list[tuple[int, int]]], scale: float,
                     block: int = BLOCK) -> Tensor:
    """Causal attention within each span of each row, queries in blocks (module docstring).

    Args:
        q: (B, H_q, L, d); k, v: (B, H_kv, L, d) with ``H_q = g H_kv`` (query head h reads key
            head h // g, as ``repeat_kv``); spans: :func:`segments`.
    Returns:
        (B, L, H_q, d), the layout transformers' attention functions return.
    """
    bsz, hq, length, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    rows = []
    for b, row in enumerate(spans):
        parts = []
        for s0, s1 in row:
            ks, vs = k[b, :, s0:s1], v[b, :, s0:s1]  # (H_kv, s, d)
            for b0 in range(0, s1 - s0, block):
                b1 = min(s1 - s0, b0 + block)
                n = b1 - b0
                qb = q[b, :, s0 + b0:s0 + b1].reshape(hk, g * n, d)  # (H_kv, g*n, d)
                scores = torch.baddbmm(_block_mask(n, b0, g, q.dtype, q.device), qb, ks[:, :b1].transpose(1, 2),
                                       alpha=scale)  # (H_kv, g*n, b1)
                o = torch.bmm(torch.softmax(scores, -1), vs[:, :b1])  # (H_kv, g*n, d)
                parts.append(o.view(hq, n, d).transpose(0, 1))  # (n, H_q, d)
        rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return torch.stack(rows) if bsz > 1 else rows[0][None]


_SPANS: dict = {}  # the last forward's (position ids, mask) -> spans, shared by its layers


def _spans_for(position_ids: Tensor | None, mask: Tensor | None, batch: int, length: int, device):
    key = (None if position_ids is None else weakref.ref(position_ids),
           None if mask is None else weakref.ref(mask), batch, length)
    hit = _SPANS.get("last")
    if hit is not None and _same(hit[0], key):
        return hit[1]
    spans = segments(position_ids, batch, length)
    if spans is not None and mask is not None and not _mask_is(mask, allowed(spans, length, device)):
        spans = None
    _SPANS["last"] = (key, spans)
    return spans


def _same(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and x() is not None and x() is y())
               for x, y in zip(a[:2], b[:2])) and a[2:] == b[2:]


def _fast_attention(self, *args, **kwargs):
    """The attention module's forward through :func:`causal_attention` when it applies, else the
    class's own forward (called with the same arguments)."""
    plain = type(self).forward
    hidden = args[0] if args else kwargs.get("hidden_states")
    mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
    pe = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
    cache = kwargs.get("cache", kwargs.get("past_key_values", args[3] if len(args) > 3 else None))
    if not (ENABLED and self.training and torch.get_num_threads() <= MAX_THREADS and cache is None
            and pe is not None and hidden is not None and hidden.device.type == "cpu" and not (self.attention_dropout and self.training)
            and getattr(self.config, "sliding_window", None) is None and (mask is None or mask.dim() == 4)):
        return plain(self, *args, **kwargs)
    bf16 = hidden.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                               and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    bsz, length = hidden.shape[:2]
    spans = _spans_for(kwargs.get("position_ids"), mask, bsz, length, hidden.device) if bf16 else None
    if spans is None or (length <= BLOCK and all(len(row) <= 1 for row in spans)):
        # one sequence per row within one block: the block loop would compute SDPA's full causal
        # attention in B calls instead of one (RL's 8 x 22-token loss rows: 1.18 vs 1.07 s)
        return plain(self, *args, **kwargs)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = self.q_proj(hidden).view(bsz, length, -1, self.head_dim).transpose(1, 2).to(torch.bfloat16)  # (B, H_q, L, d)
    k = self.k_proj(hidden).view(bsz, length, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, L, d)
    v = self.v_proj(hidden).view(bsz, length, -1, self.head_dim).transpose(1, 2)
    cos, sin = pe
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    o = causal_attention(q, k.to(q.dtype), v.to(q.dtype), spans, self.scaling)  # (B, L, H_q, d)
    return self.o_proj(o.reshape(bsz, length, -1)), None


def enable(model: nn.Module) -> int:
    """Route the stock Llama attention modules of ``model`` through :func:`causal_attention` in
    training (an instance ``forward``; the plain forward whenever it does not apply). Returns the
    number of modules routed. Idempotent; :func:`disable` undoes it."""
    try:
        from transformers.models.llama.modeling_llama import LlamaAttention
    except ImportError:  # pragma: no cover
        return 0
    n = 0
    for m in model.modules():
        if type(m) is LlamaAttention and not m._forward_hooks and not m._forward_pre_hooks:
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(_fast_attention, m)
            n += 1
    return n


def disable(model: nn.Module) -> None:
    """Remove what :func:`enable` installed."""
    for m in model.modules():
        f = m.__dict__.get("forward")
        if isinstance(f, types.MethodType) and f.__func__ is _fast_attention:
            del m.forward


def routed(model: nn.Module) -> int:
    """How many attention modules of ``model`` :func:`enable` routed."""
    return sum(isinstance(f, types.MethodType) and f.__func__ is _fast_attention
               for f in (m.__dict__.get("forward") for m in model.modules()))


__all__ = ["ENABLED", "BLOCK", "applies", "packs", "drop_packs", "frozen_linear", "segments", "allowed",
           "causal_attention", "enable", "disable", "routed"]
