"""A preallocated KV cache and a lean one-token decode step for Llama-architecture causal LMs.

transformers' ``DynamicCache`` concatenates every step (O(T^2) copies over a generation) and the
model's forward pays, per step, a causal-mask build, cache bookkeeping and output capturing around
30 layers of small ops; at batch 1-8 on a CPU that overhead is as large as the matmuls. After the
prompt's prefill (the model's own forward), :class:`LlamaDecoder` feeds one token per row through
the model's own modules with the keys/values written into buffers allocated once:

    h = E[x_t]                                                          (B, 1, H)
    for each layer l:
        a = RMSNorm(h);  q, k, v = W_q a, W_k a, W_v a;  q, k = rope(q, k; p_t)
        K_l[:, :, t] = k;  V_l[:, :, t] = v                              (B, H_kv, T_max, d)
        o = softmax(q K_l[:, :, :t+1]^T / sqrt(d) + M[:, :t+1]) V_l[:, :, :t+1]
        h = h + W_o o;  h = h + W_down(silu(W_gate RMSNorm(h)) * W_up RMSNorm(h))
    logits = W_head RMSNorm(h)                                          (B, V)

with the query heads grouped by their key/value head, q (B, H_kv, g, d), g = H_q / H_kv (no
``repeat_kv`` copies), and M (B, 1, 1, T_max) = 0 on real and generated columns, -inf on the left
padding. ``t`` is the same column for every row (left-padded batches grow together); the rotary
position ``p_t`` is each row's own count of real tokens.

Each projection is called as the model's module (LoRA and other adapter layers keep working); a
plain ``nn.Linear`` with bf16 weights on the CPU runs through oneDNN with its weight reordered once
into oneDNN's blocked layout (:class:`PackedLinears`; bit-identical output, ~1.6x faster at
batch 1-8, kept across calls while the weight tensor is unchanged).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import cpu_kernels
from .device import onednn_linear
from .packed_linears import PackedLinears, _hooked, _Unpacked, blocked_layout, drop_packed, packed_linears

__all__ = ["supports", "folds_adapters", "LlamaDecoder", "prefill", "shared_prefix", "rms_norm", "rope",
           "PackedLinears", "packed_linears", "drop_packed", "blocked_layout"]


def supports(model: nn.Module) -> bool:
    """True when ``model`` is a transformers ``LlamaForCausalLM`` whose blocks are the stock
    modules (adapters may wrap the projections, nothing may replace or hook a block, attention,
    MLP or norm) in eval mode: the modules :class:`LlamaDecoder` steps through instead of their
    ``forward``."""
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError:  # pragma: no cover
        return False
    if type(model) is not ml.LlamaForCausalLM or model.training:
        return False
    inner = model.model
    if type(inner) is not ml.LlamaModel or type(inner.norm) is not ml.LlamaRMSNorm or _hooked(model) or _hooked(inner):
        return False
    if len(inner.layers) != model.config.num_hidden_layers or _hooked(inner.embed_tokens) or _hooked(inner.norm):
        return False
    for layer in inner.layers:
        parts = (layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)
        kinds = (ml.LlamaDecoderLayer, ml.LlamaAttention, ml.LlamaMLP, ml.LlamaRMSNorm, ml.LlamaRMSNorm)
        if any(type(p) is not k or _hooked(p) for p, k in zip(parts, kinds)):
            return False
    return True


def folds_adapters(model: nn.Module) -> bool:
    """Whether decoding ``model`` (fast path) runs its active LoRA layers merged into prepacked bf16
    weights (:class:`PackedLinears`): a :func:`supports`-ed model with bf16 embeddings on a CPU
    with oneDNN. Folding the adapters into copies of the weights first then gains nothing."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return emb is not None and emb.weight.dtype == torch.bfloat16 and emb.weight.device.type == "cpu" \
        and onednn_linear(torch.bfloat16) and supports(model)


# ---- the decoder ------------------------------------------------------------------------------------
def rms_norm(norm: nn.Module, h: Tensor) -> Tensor:
    """``LlamaRMSNorm``: ``w * (h / sqrt(mean(h^2) + eps))``, the normalisation in float32 and
    rounded to h's dtype before the weight (transformers' order). torch's fused ``rms_norm``
    accumulates a bf16 input in float32 and rounds once: the same values (tested)."""
    if h.dtype == torch.float32 and h.device.type == "cpu" and not torch.is_grad_enabled():
        y = cpu_kernels.rms_norm(h, norm.weight.detach(), norm.variance_epsilon)  # one C call (fp32 decoding)
        if y is not None:
            return y
    return norm.weight * torch.nn.functional.rms_norm(h, (h.shape[-1],), eps=norm.variance_epsilon)


def rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotary embedding ``x cos + rotate_half(x) sin`` written as ``x cos + swap(x) sin'`` with
    ``swap(x) = [x_2, x_1]`` and ``sin' = [-sin_1, sin_2]`` (bit-identical: negation is exact).
    x (..., d), cos/sin' broadcastable to it."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * sin_signed


class LlamaDecoder:
    """One-token decode steps of a :func:`supports`-ed model over a preallocated KV cache.

    Args:
        model: the causal LM.
        prefill: the ``DynamicCache`` filled by the model's forward over the (B, T) prompts.
        mask: (B, T) attention mask of the prompts (0 on the left padding).
        max_new: tokens still to be fed after the prefill (the buffers hold T + max_new columns).
        pack: run plain bf16 linears through prepacked oneDNN weights (CPU), kept on the model.

    Attention is computed as the model's own setting says: ``sdpa`` through
    ``scaled_dot_product_attention``, otherwise transformers' eager order (scores times the
    scale, plus M, float32 softmax cast back, times V).
    """

    def __init__(self, model: nn.Module, prefill, mask: Tensor, max_new: int, pack: bool = True):
        self.model, self.inner = model, model.model
        cfg = model.config
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.scale = self.inner.layers[0].self_attn.scaling
        self.sdpa = getattr(cfg, "_attn_implementation", None) == "sdpa"
        b, t = mask.shape
        self.t, self.tmax = t, t + max_new
        self.k, self.v, self.bias = [], [], None
        if prefill is None:  # empty: the prompts come through feed() (the buffers are made then)
            self.t = 0
        else:
            for i in range(len(self.inner.layers)):
                k0, v0 = _layer_kv(prefill, i)  # (B, H_kv, T, d)
                k = k0.new_empty(b, self.hkv, self.tmax, self.d)
                v = v0.new_empty(b, self.hkv, self.tmax, self.d)
                k[:, :, :t].copy_(k0)
                v[:, :, :t].copy_(v0)
                self.k.append(k)
                self.v.append(v)
            self.bias = torch.zeros(b, 1, 1, self.tmax, dtype=self.k[0].dtype, device=mask.device)  # M
            self.bias[:, 0, 0, :t].masked_fill_(mask == 0, float("-inf"))
        # the hidden state's dtype (the embedding's) is what reaches the projections
        act = self.inner.embed_tokens.weight.dtype
        packs = packed_linears(model) if pack else _Unpacked()

        def proj(*mods):
            return packs.projection(mods, b, act, mask.device)

        self.projs = [(layer, proj(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                       proj(layer.self_attn.o_proj), proj(layer.mlp.gate_proj, layer.mlp.up_proj),
                       proj(layer.mlp.down_proj), layer.mlp.act_fn) for layer in self.inner.layers]
        self.head = proj(model.lm_head)
        self.inter = cfg.intermediate_size
        self._bind()

    def _bind(self) -> None:
        self.layers = [p + (k, v) for p, k, v in zip(self.projs, self.k, self.v)]

    # the cache interface kv_cache.prefill uses: rows of the buffers selected or repeated
    def batch_select_indices(self, index: Tensor) -> None:
        self.k, self.v = [k[index] for k in self.k], [v[index] for v in self.v]
        self.bias = self.bias[index]
        self._bind()

    def batch_repeat_interleave(self, n: int) -> None:
        self.batch_select_indices(torch.arange(self.bias.shape[0], device=self.bias.device).repeat_interleave(n))

    def feed(self, tokens: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """Prefill: run (B, n) tokens (``mask`` (B, t+n), the attention mask of every column so far
        as a model's forward takes it, 0 on padding; rotary ``positions`` (B, n)) into columns
        ``t .. t+n-1`` of the cache through the same modules as :meth:`step`;
        returns the last column's logits (B, V) float32. Query column ``t+i`` attends to the real
        columns ``<= t+i`` (and to itself, so padding rows stay finite: they are never read)."""
        b, n = tokens.shape
        t, g, d, hq, hkv = self.t, self.hq // self.hkv, self.d, self.hq, self.hkv
        if t + n > self.tmax:
            raise RuntimeError("the KV cache is full")
        if mask.shape != (b, t + n):
            raise ValueError(f"feed: mask {tuple(mask.shape)} does not cover the {t} + {n} columns")
        nqk, inter, dev = (hq + hkv) * d, self.inter, tokens.device
        h = self.inner.embed_tokens(tokens).view(b * n, -1)  # (B n, H)
        cos, sin = self.inner.rotary_emb(h, position_ids=positions)  # (B, n, d)
        sin = torch.cat((-sin[..., :d // 2], sin[..., d // 2:]), dim=-1)[:, :, None]
        cos = cos[:, :, None]  # (B, n, 1, d)
        seen = torch.arange(t + n, device=dev)[None] <= torch.arange(t, t + n, device=dev)[:, None]  # (n, t+n)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        att = None
        for i, (layer, qkv, o_proj, gate_up, down, act) in enumerate(self.projs):
            y = qkv(rms_norm(layer.input_layernorm, h))  # (B n, (H_q + 2 H_kv) d)
            qk = rope(y[:, :nqk].view(b, n, hq + hkv, d), cos, sin)  # (B, n, H_q + H_kv, d)
            if att is None:
                if self.bias is None:  # the first feed: buffers in the keys' dtype
                    shape = (b, hkv, self.tmax, d)
                    self.k = [qk.new_empty(shape) for _ in self.projs]
                    self.v = [qk.new_empty(shape) for _ in self.projs]
                    self.bias = torch.zeros(b, 1, 1, self.tmax, dtype=qk.dtype, device=dev)
                    self._bind()
                self.bias[:, 0, 0, t:t + n].masked_fill_(mask[:, t:] == 0, float("-inf"))
                att = self.bias[:, :, 0, :t + n][:, :, None].expand(b, 1, n, t + n).masked_fill(~seen, float("-inf"))
                att[:, :, torch.arange(n, device=dev), torch.arange(t, t + n, device=dev)] = 0
                att = att.repeat(1, 1, g, 1)  # (B, 1, g n, t+n): rows (head in group, query)
            kc, vc = self.k[i], self.v[i]
            kc[:, :, t:t + n] = qk[:, :, hq:].transpose(1, 2)
            vc[:, :, t:t + n] = y[:, nqk:].view(b, n, hkv, d).transpose(1, 2)
            q = qk[:, :, :hq].reshape(b, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)
            keys, values = kc[:, :, :t + n], vc[:, :, :t + n]  # (B, H_kv, t+n, d)
            if self.sdpa:
                o = sdpa(q, keys, values, attn_mask=att, scale=self.scale)  # (B, H_kv, g n, d)
            else:
                s = torch.matmul(q, keys.transpose(2, 3)) * self.scale + att
                o = torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), values)
            o = o.view(b, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b * n, hq * d)
            h = h + o_proj(o)
            y = gate_up(rms_norm(layer.post_attention_layernorm, h))  # (B n, 2 I)
            h = h + down(act(y[:, :inter]) * y[:, inter:])
        self.t += n
        return self.head(rms_norm(self.inner.norm, h.view(b, n, -1)[:, -1])).float()  # (B, V)

    def step(self, token: Tensor, position: Tensor) -> Tensor:
        """Logits (B, V) float32 of the next token after feeding ``token`` (B, 1) at rotary
        ``position`` (B, 1); the token's keys/values go to column ``t`` (then ``t += 1``)."""
        if self.t >= self.tmax:
            raise RuntimeError("the KV cache is full")
        b, t, g, d, hq, hkv = token.shape[0], self.t, self.hq // self.hkv, self.d, self.hq, self.hkv
        nqk, inter = (hq + hkv) * d, self.inter
        h = self.inner.embed_tokens(token).view(b, -1)  # (B, H)
        cos, sin = self.inner.rotary_emb(h, position_ids=position)  # (B, 1, d)
        if self._c_step(h):
            return self._step_c(h, cos.reshape(b, d).contiguous(), sin.reshape(b, d).contiguous())
        sin = torch.cat((-sin[..., :d // 2], sin[..., d // 2:]), dim=-1)
        bias = self.bias[..., :t + 1]  # (B, 1, 1, t + 1)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for layer, qkv, o_proj, gate_up, down, act, kc, vc in self.layers:
            y = qkv(rms_norm(layer.input_layernorm, h))  # (B, (H_q + 2 H_kv) d)
            qk = rope(y[:, :nqk].view(b, hq + hkv, d), cos, sin)  # (B, H_q + H_kv, d)
            kc[:, :, t] = qk[:, hq:]
            vc[:, :, t] = y[:, nqk:].view(b, hkv, d)
            q = qk[:, :hq].view(b, hkv, g, d)  # query heads j*g .. j*g+g-1 read key/value head j
            keys, values = kc[:, :, :t + 1], vc[:, :, :t + 1]  # (B, H_kv, t + 1, d)
            if self.sdpa:
                o = sdpa(q, keys, values, attn_mask=bias, scale=self.scale)  # (B, H_kv, g, d)
            else:
                s = torch.matmul(q, keys.transpose(2, 3)) * self.scale + bias  # (B, H_kv, g, t + 1)
                o = torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), values)
            h = h + o_proj(o.reshape(b, hq * d))
            y = gate_up(rms_norm(layer.post_attention_layernorm, h))  # (B, 2 I)
            h = h + down(act(y[:, :inter]) * y[:, inter:])
        self.t += 1
        return self.head(rms_norm(self.inner.norm, h)).float()  # (B, V)

    def _c_step(self, h: Tensor) -> bool:
        """Whether :meth:`step` runs as :meth:`_step_c`: fp32 on a CPU with the C kernels, no
        autocast, SiLU MLPs, contiguous caches (checked once per cache layout)."""
        if h.dtype != torch.float32 or h.device.type != "cpu" or cpu_kernels.library() is None or self.d % 2 \
                or torch.is_autocast_enabled("cpu"):
            return False
        key = (id(self.k[0]), self.bias.data_ptr())
        if getattr(self, "_c_key", None) != key:
            self._c_key = key
            self._c_ok = getattr(self.model.config, "hidden_act", None) == "silu" and self.bias.is_contiguous() \
                and all(x.is_contiguous() and x.dtype == torch.float32 for x in self.k + self.v)
            self._buf = torch.empty(self.tmax)
        return self._c_ok

    def _step_c(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """:meth:`step` with each layer's rotary embedding, cache write and attention in one C call
        (:func:`lmforge.cpu_kernels.decode_attend`) and the MLP's ``silu(gate) * up`` in another:
        the same arithmetic to fp32 rounding, ~25 fewer torch calls a layer (a SmolLM2 step at
        batch 1 spent ~1.4 ms in SDPA's CPU kernel alone)."""
        t, hq, hkv, inter = self.t, self.hq, self.hkv, self.inter
        bias, buf = self.bias.view(h.shape[0], self.tmax), self._buf
        for layer, qkv, o_proj, gate_up, down, act, kc, vc in self.layers:
            y = qkv(rms_norm(layer.input_layernorm, h)).contiguous()  # (B, (H_q + 2 H_kv) d)
            o = cpu_kernels.decode_attend(y, cos, sin, kc, vc, t, bias, self.scale, hq, hkv, buf)
            h = h + o_proj(o)
            y = gate_up(rms_norm(layer.post_attention_layernorm, h)).contiguous()  # (B, 2 I)
            h = h + down(cpu_kernels.silu_mul(y, inter))
        self.t += 1
        return self.head(rms_norm(self.inner.norm, h)).float()  # (B, V)


# ---- the prefill: a prefix every row shares runs once ----------------------------------------------
MIN_SHARED = 8  # shared prefix tokens worth a separate forward


def shared_prefix(ids: Tensor, mask: Tensor) -> int:
    """Tokens every row's prompt starts with (left padding skipped), at most one short of the
    shortest prompt (each row keeps a last token of its own, whose logits start the decoding)."""
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    n, first, p = min(map(len, rows)) - 1, rows[0], 0
    while p < n and all(r[p] == first[p] for r in rows):
        p += 1
    return p


def prefill(forward, ids: Tensor, mask: Tensor, pos: Tensor, cache) -> tuple[Tensor, object, Tensor]:
    """Run the (B, T) left-padded prompts into ``cache``; returns the last position's logits (B, V),
    the cache and its attention mask.

    Rows with the same prompt (k samples per prompt in a rollout) run once each: the distinct
    prompts are prefilled and their keys/values, logits and mask rows repeated to the copies. When
    the rows share a prefix of P >= ``MIN_SHARED`` tokens (a chat template's system prompt,
    a few-shot preamble) and B > 1, the prefix runs once (batch 1) and its keys/values are
    repeated to every row; then each row's rest, left-padded to S columns, runs against them at
    positions P, P + 1, ... The cache then holds [prefix (P) | padded rests (S)] per row, the mask
    (B, P + S) has its padding in the middle, and every real token sees exactly the keys/values it
    would see in the plain layout (same rotary positions), so the logits agree to rounding.
    ``forward(ids, mask, pos, cache)`` is the model's forward returning last-position logits.
    """
    b = ids.shape[0]
    rows = [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)]
    first = {}
    inverse = [first.setdefault(r, len(first)) for r in rows]
    if len(first) < b:  # repeated prompts (k samples of each in a rollout): each distinct one runs once
        keep = [rows.index(r) for r in first]  # the first row of each distinct prompt
        logits, cache, full = prefill(forward, ids[keep], mask[keep], pos[keep], cache)
        inv = torch.tensor(inverse, device=ids.device)
        cache.batch_select_indices(inv)  # (B, H_kv, T', d)
        return logits[inv], cache, full[inv]
    p = shared_prefix(ids, mask) if b > 1 else 0
    if p < MIN_SHARED:
        return forward(ids, mask, pos, cache), cache, mask
    lengths = mask.sum(1).tolist()
    start = ids.shape[1] - lengths[0]  # row 0's first real column
    prefix = ids[:1, start:start + p]  # (1, P)
    forward(prefix, torch.ones_like(prefix), torch.arange(p, device=ids.device)[None], cache)
    cache.batch_repeat_interleave(b)  # (B, H_kv, P, d)
    width = max(lengths) - p
    rest = ids.new_zeros(b, width)
    rest_mask = torch.zeros_like(rest)
    for r, n in enumerate(lengths):
        rest[r, width - (n - p):] = ids[r, ids.shape[1] - (n - p):]
        rest_mask[r, width - (n - p):] = 1
    rest_pos = p + (rest_mask.cumsum(-1) - 1).clamp_min(0)  # (B, S)
    full = torch.cat([mask.new_ones(b, p), rest_mask.to(mask.dtype)], dim=1)  # (B, P + S)
    return forward(rest, full, rest_pos, cache), cache, full


def _layer_kv(cache, i: int) -> tuple[Tensor, Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]  # older transformers
