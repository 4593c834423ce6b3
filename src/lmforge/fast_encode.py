"""Inference fast path for BERT-family sentence encoders (``SentenceEncoder.encode``).

The same function as transformers' ``BertModel`` forward in eval mode (no dropout, no grad), run
on frozen weights prepared once (:class:`FastBert`), on the packed ``(N, D)`` rows of the real
tokens (``N = sum_b len_b``; no compute on padding, no re-padding between layers):

    x = LN(E_word[ids] + E_pos[t] + E_type[tt])                                (N, D)
    per layer:  [q k v] = x W_qkv^T + b_qkv        one GEMM, W_qkv = [W_q; W_k; W_v]  (3D, D)
                a_b = softmax(q_b k_b^T / sqrt(d)) v_b     per sequence b, per head  (len_b, d)
                x = LN(x + a W_o^T + b_o)
                x = LN(x + act(x W_1^T + b_1) W_2^T + b_2)

Levers against transformers' path (measured in ``bench/encode.py``'s docstring): the fused QKV
projection (one GEMM of N = 3D instead of three of D); on CPU, oneDNN-prepacked bf16 weights
(``torch.ops.mkldnn._linear_pointwise``) with GELU fused into the first FFN GEMM; attention per
group of sequences of similar length, eager bf16 on CPU at 1 thread (the CPU flash kernel is slower
at head size 32; :class:`_Eager`: q, k, v gathered head-major, keys padded to a multiple of 32
columns with an additive mask, scores/softmax/outputs in buffers reused by every group and layer,
the softmax by :func:`lmforge.cpu_kernels.softmax_`: 1.4x torch's at 256 columns),
one batched SDPA call with 2+ threads and on other devices (head split and merge as views).
Every other device (CUDA) runs the same function with ``F.linear`` and SDPA. Only non-causal ``BertModel``-like encoders with absolute
positions are handled (:func:`supported`); anything else keeps the plain path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpu_kernels import DEQUANT_ACTS, dequant_quant_rows, dequant_rows, quant_rows
from .device import onednn_linear
from .fast_encode_attention import GROUP_SCORES, _Eager, _groups

# after attention a layer is row-wise (output projection, LayerNorms, FFN): batches of more rows run
# it in chunks of this many, so the FFN's (rows, 4D) intermediate stays small. Measured (2 worker
# threads, 400 news articles in batches of 32 x ~240 tokens): peak RSS 800 -> 737 MB, speed equal
# (1 thread, chunks of 1024 / 2048 / 4096 / none: 3.18 / 3.08 / 3.04 / 3.09 CPU-s per 96 articles)
ROW_CHUNK = 2048
# bump when the fast path's numerics change (caches of its vectors key on it: topics embeddings)
VERSION = 6  # 6: the fp32 C softmax (fp32 vectors differ from 5 by ~1e-7); int8 linears (precision int8)
# 5: the C softmax (cpu_kernels; bf16 vectors differ from 4 by cosine >= 0.99997)
# 4: eager groups with padded keys (bf16 vectors differ from 3 by cosine >= 0.99993)
# 3: mean pooling summed on the packed rows (vectors differ from 2 by ~1e-7)
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def supported(backbone: nn.Module) -> bool:
    """Whether :class:`FastBert` computes ``backbone``'s forward exactly: a transformers
    ``BertModel`` (model type ``bert``, absolute positions, not a decoder, a known activation)
    whose modules are the stock ones (plain ``nn.Linear`` / ``nn.LayerNorm``: no adapter wrapped
    in, e.g. LoRA) and carry no forward hooks (prompt tuning, residual dropout, lenses ...)."""
    cfg = getattr(backbone, "config", None)
    if not (cfg is not None and getattr(cfg, "model_type", None) == "bert"
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
            and not getattr(cfg, "is_decoder", False) and not getattr(cfg, "add_cross_attention", False)
            and cfg.hidden_act in _ACTS and type(backbone).__name__ == "BertModel"):
        return False
    allowed = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.ModuleList, nn.Tanh)
    for name, m in backbone.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)) and type(m) not in allowed:
            return False  # a subclass (adapter) computes something else
        if type(m).__module__.split(".")[:3] != ["transformers", "models", "bert"] and type(m) not in allowed \
                and not (type(m).__module__.startswith("transformers.activations")) \
                and not type(m).__module__.startswith("lmforge.fast_dropout"):
            return False  # a module someone put into the tree (adapter, bottleneck ...)
    return True


def _mkldnn_ok(w: Tensor) -> bool:
    """oneDNN prepacked linear: CPU, bf16 weights, oneDNN able to run them here."""
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and onednn_linear(w.dtype)


def int8_product(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor, act: str = "none") -> Tensor:
    """``act(x W^T + b) ≈ act((s_x q_x)(diag(s_w) q_W)^T + b)`` for fp32 ``x (N, in)``, int8 ``codes``
    (out, in) with per-row scales ``scale`` (``W ≈ diag(scale) codes``, :func:`quant_rows`) and fp32
    ``bias`` (out,): ``x`` quantised per row (:func:`lmforge.cpu_kernels.quant_rows`), an int8 x int8
    -> int32 GEMM (``torch._int_mm``: oneDNN's VNNI kernels, ~3.8x the fp32 GEMM rate here), then
    ``y_nm = act(acc_nm s_x,n s_w,m + b_m)`` in place (``act`` one of ``DEQUANT_ACTS``). Rows in
    chunks of ``ROW_CHUNK`` (the int32 product of 8,000 x 1,536 halves the GEMM's rate: out of
    cache), each chunk's product written into its rows of one buffer and turned into fp32 there."""
    x = x.contiguous()
    acc = torch.empty(x.shape[0], codes.shape[0], dtype=torch.int32, device=x.device)  # (N, out)
    for r0 in range(0, x.shape[0], ROW_CHUNK):
        q, sx = quant_rows(x[r0:r0 + ROW_CHUNK])
        dequant_rows(torch._int_mm(q, codes.t(), out=acc[r0:r0 + ROW_CHUNK]), sx, scale, bias, act)
    return acc.view(torch.float32)


@dataclass
class _Linear:
    """``y = act(x W^T + b)``: ``W`` (out, in) prepacked for oneDNN on CPU/bf16, plain otherwise;
    with ``scale`` (int8): ``W`` holds per-output-row int8 codes, ``W ≈ diag(scale) W_q``, and
    ``x`` is quantised per row on the fly (see :meth:`_int8`)."""

    weight: Tensor
    bias: Tensor
    act: str = "none"  # none | gelu | gelu_tanh | relu (fused into the GEMM when packed)
    packed: bool = False
    scale: Tensor | None = None  # (out,) fp32 weight scales: int8 codes in ``weight``

    @classmethod
    def make(cls, weight: Tensor, bias: Tensor, act: str = "none", pack: bool = True, rows: int = 8192,
             int8: bool = False) -> "_Linear":
        if int8:
            codes, scale = quant_rows(weight.float().contiguous())
            return cls(codes, bias.float().contiguous(), act, False, scale)
        if pack and _mkldnn_ok(weight):
            return cls(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows), bias.contiguous(), act, True)
        return cls(weight.contiguous(), bias.contiguous(), act, False)

    def _int8(self, x: Tensor) -> Tensor:
        act = self.act if self.act in DEQUANT_ACTS else "none"
        return int8_product(x, self.weight, self.scale, self.bias, act)

    def __call__(self, x: Tensor) -> Tensor:  # (N, in) -> (N, out)
        if self.scale is not None:
            y = self._int8(x)
            if self.act in DEQUANT_ACTS:  # applied by the dequantisation
                return y
        elif self.packed:
            if self.act == "none":
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            if self.act in ("gelu", "gelu_tanh"):
                alg = "none" if self.act == "gelu" else "tanh"
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], alg)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.act, [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.act == "gelu":
            return F.gelu(y)
        if self.act == "gelu_tanh":
            return F.gelu(y, approximate="tanh")
        return F.relu(y) if self.act == "relu" else y


def _ffn_int8(up: _Linear, down: _Linear, t: Tensor) -> Tensor:
    """``down(up(t))`` for int8 linears: the up projection's activations reach the down projection
    as int8 codes (:func:`lmforge.cpu_kernels.dequant_quant_rows`: dequantise, GELU, quantise per
    row in one pass), never as an fp32 ``(n, 4D)`` tensor; the same numbers as ``down(up(t))``."""
    t = t.contiguous()
    out = torch.empty(t.shape[0], down.weight.shape[0], dtype=torch.int32, device=t.device)  # (n, D)
    for r0 in range(0, t.shape[0], ROW_CHUNK):
        q, sx = quant_rows(t[r0:r0 + ROW_CHUNK])
        q, sx = dequant_quant_rows(torch._int_mm(q, up.weight.t()), sx, up.scale, up.bias, up.act)
        dequant_rows(torch._int_mm(q, down.weight.t(), out=out[r0:r0 + ROW_CHUNK]), sx, down.scale, down.bias, down.act)
    return out.view(torch.float32)


@dataclass
class _Layer:
    qkv: _Linear
    out: _Linear
    ln1: tuple[Tensor, Tensor, float]
    up: _Linear
    down: _Linear
    ln2: tuple[Tensor, Tensor, float]


def _ln(mod: nn.LayerNorm, dtype) -> tuple[Tensor, Tensor, float]:
    return mod.weight.detach().to(dtype), mod.bias.detach().to(dtype), float(mod.eps)


class FastBert:
    """Frozen-weight inference forward of a ``BertModel`` (see the module docstring).

    Args:
        backbone: the transformers ``BertModel`` (any dtype; weights are copied/cast once).
        dtype: compute dtype (bf16 on CPUs with native bf16, the placement's dtype).
        pack: use oneDNN prepacked weights where possible (CPU, bf16).
        attention: ``auto`` (eager on CPU, SDPA elsewhere), ``eager`` or ``sdpa``.
        int8: the six linear layers of every block in int8 (``precision: int8``; fp32 ``dtype``
            only): per-output-row weight codes, activations quantised per row on the fly, int32
            products (:meth:`_Linear._int8`); embeddings, LayerNorms, attention and GELU stay fp32.
    """

    def __init__(self, backbone: nn.Module, dtype: torch.dtype, *, pack: bool = True, attention: str = "auto",
                 int8: bool = False):
        if int8 and dtype != torch.float32:
            raise ValueError(f"int8 linears compute around fp32 activations, not {dtype}")
        cfg = backbone.config
        self.heads = int(cfg.num_attention_heads)
        self.dim = int(cfg.hidden_size)
        self.head_dim = self.dim // self.heads
        self.dtype = dtype
        emb = backbone.embeddings
        self.device = emb.word_embeddings.weight.device
        act = _ACTS[cfg.hidden_act]
        with torch.no_grad():
            self.word = emb.word_embeddings.weight.detach().to(dtype)
            self.pos = emb.position_embeddings.weight.detach().to(dtype)
            self.type = emb.token_type_embeddings.weight.detach().to(dtype)
            self.emb_ln = _ln(emb.LayerNorm, dtype)
            self.layers = []
            for layer in backbone.encoder.layer:
                att, so = layer.attention.self, layer.attention.output
                w = torch.cat([att.query.weight, att.key.weight, att.value.weight]).to(dtype)  # (3D, D)
                b = torch.cat([att.query.bias, att.key.bias, att.value.bias]).to(dtype)  # (3D,)
                lin = dict(pack=pack, int8=int8)
                self.layers.append(_Layer(
                    _Linear.make(w, b, **lin),
                    _Linear.make(so.dense.weight.to(dtype), so.dense.bias.to(dtype), **lin),
                    _ln(so.LayerNorm, dtype),
                    _Linear.make(layer.intermediate.dense.weight.to(dtype), layer.intermediate.dense.bias.to(dtype),
                                 act, **lin),
                    _Linear.make(layer.output.dense.weight.to(dtype), layer.output.dense.bias.to(dtype), **lin),
                    _ln(layer.output.LayerNorm, dtype)))
        self.attention_choice = attention
        self.int8 = int8

    @property
    def attention(self) -> str:
        """``eager`` per sequence on CPU at 1 thread; SDPA otherwise. With 2+ threads the per-
        sequence loop's many small parallel regions cost more than they save (measured at 2
        threads on a loaded 2-core machine: 2.0x slower than transformers' path, while one
        batched SDPA call was 1.25x faster)."""
        if self.attention_choice != "auto":
            return self.attention_choice
        return "eager" if self.device.type == "cpu" and torch.get_num_threads() == 1 else "sdpa"

    # ---- the forward ------------------------------------------------------------------------
    def hidden(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``(B, T)`` right-padded batch -> ``(B, T, D)`` last hidden states (compute dtype; zeros
        at padding). Same as ``BertModel(...).last_hidden_state`` at the real tokens."""
        b, t = input_ids.shape
        x, cu, flat = self.packed(input_ids, attention_mask, token_type_ids)
        if flat is None:
            return x.view(b, t, self.dim)
        return x.new_zeros(b * t, self.dim).index_copy_(0, flat, x).view(b, t, self.dim)

    def mean_pooled(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``(B, D)`` fp32 mean of each sequence's last hidden states, summed on the packed rows
        ``e_b = sum_{r in b} x_r / len_b`` (no padded ``(B, T, D)`` states, no fp32 copy of them:
        ~50 MB less per 64 x 256 batch than padding and :func:`lmforge.embeddings.encoder.pool`)."""
        x, cu, _ = self.packed(input_ids, attention_mask, token_type_ids)  # (N, D)
        lens = torch.tensor([cu[i + 1] - cu[i] for i in range(len(cu) - 1)], device=x.device)  # (B,)
        seg = torch.repeat_interleave(torch.arange(len(lens), device=x.device), lens)  # (N,)
        out = torch.zeros(len(lens), self.dim, dtype=torch.float32, device=x.device)
        return out.index_add_(0, seg, x.float()) / lens.clamp_min(1).unsqueeze(1).float()

    def packed(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None):
        """The forward on the packed rows: ``(N, D)`` last hidden states of the real tokens in
        order, the cumulative lengths ``cu`` (B + 1,) and the rows' flat ``(B * T)`` indices
        (None when nothing is padding)."""
        b, t = input_ids.shape
        lens = attention_mask.sum(-1)  # (B,)
        cu = [0]
        for n in lens.tolist():
            cu.append(cu[-1] + int(n))
        full = cu[-1] == b * t
        if full:
            ids = input_ids.reshape(-1)  # (N,)
            pos = torch.arange(t, device=ids.device).repeat(b)
            tt = token_type_ids.reshape(-1) if token_type_ids is not None else None
            flat = None
        else:
            keep = attention_mask.bool()
            flat = keep.reshape(-1).nonzero().squeeze(1)  # (N,)
            ids = input_ids.reshape(-1).index_select(0, flat)
            pos = (keep.long().cumsum(-1) - 1).reshape(-1).index_select(0, flat)
            tt = token_type_ids.reshape(-1).index_select(0, flat) if token_type_ids is not None else None
        x = self.word.index_select(0, ids) + self.pos.index_select(0, pos)  # (N, D)
        x = x + (self.type.index_select(0, tt) if tt is not None else self.type[0])
        x = F.layer_norm(x, (self.dim,), *self.emb_ln)
        groups = self._layout(cu, x.device)
        rows = ROW_CHUNK or x.shape[0]
        for layer in self.layers:
            a = self._attention(layer.qkv(x), groups)  # (N, D)
            if x.shape[0] <= rows:
                x = self._row_tail(layer, a, x)
                continue
            y = torch.empty_like(x)
            for r0 in range(0, x.shape[0], rows):  # row-wise from here: chunks keep the FFN's (rows, 4D) small
                y[r0:r0 + rows] = self._row_tail(layer, a[r0:r0 + rows], x[r0:r0 + rows])
            x = y
        return x, cu, flat

    def _row_tail(self, layer: _Layer, a: Tensor, x: Tensor) -> Tensor:
        """The row-wise rest of a layer: ``(n, D)`` attention output and residual -> ``(n, D)``."""
        t = F.layer_norm(layer.out(a).add_(x), (self.dim,), *layer.ln1)
        if layer.up.scale is not None and layer.up.act in DEQUANT_ACTS:
            return F.layer_norm(_ffn_int8(layer.up, layer.down, t).add_(t), (self.dim,), *layer.ln2)
        return F.layer_norm(layer.down(layer.up(t)).add_(t), (self.dim,), *layer.ln2)

    def _layout(self, cu: list[int], device) -> list:
        """Per attention group (:func:`_groups`). Eager: an :class:`_Eager` (gather/scatter indices,
        key bias, sizes). SDPA: ``(start, end)`` rows for a single sequence, or ``(start, end, dest,
        keep)`` for several: ``dest`` (n_g,) their rows' slots in the padded ``(c * m)`` layout,
        ``keep`` (c, 1, 1, m) the key-padding mask."""
        eager = self.attention == "eager"
        out = []
        for g0, g1 in _groups(cu, self.heads, GROUP_SCORES if eager else None):
            if eager:
                out.append(_Eager.make(cu[g0:g1 + 1], self.heads, self.dtype, device))
                continue
            if g1 - g0 == 1:
                out.append((cu[g0], cu[g1]))
                continue
            lens = torch.tensor([cu[i + 1] - cu[i] for i in range(g0, g1)], device=device)  # (c,)
            m = int(lens.max())
            slot = torch.arange(m, device=device)  # (m,)
            valid = slot < lens[:, None]  # (c, m)
            dest = (torch.arange(g1 - g0, device=device)[:, None] * m + slot).reshape(-1)[valid.reshape(-1)]  # (n_g,)
            out.append((cu[g0], cu[g1], dest, valid[:, None, None, :]))
        return out

    def _attention(self, qkv: Tensor, groups: list) -> Tensor:
        """``(N, 3D)`` packed projections -> ``(N, D)`` attention output, per group of sequences."""
        h, d = self.heads, self.head_dim
        out = qkv.new_empty(qkv.shape[0], self.dim)
        scale = d ** -0.5
        if groups and isinstance(groups[0], _Eager):
            bufs = _Eager.buffers(groups, h, d, qkv)
            for g in groups:
                g.run(qkv, out, bufs, h, d, scale)
            return out
        for g in groups:
            s, e = g[0], g[1]
            if len(g) == 2:  # one sequence: views of its rows, no mask
                blk = qkv[s:e].view(e - s, 3, h, d)
                q, k, v = (blk[:, i].transpose(0, 1) for i in range(3))  # (H, L, d) views
                o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (H, L, d)
                out[s:e].view(e - s, h, d).copy_(o.transpose(0, 1))
                continue
            dest, keep = g[2], g[3]
            c, m = keep.shape[0], keep.shape[-1]
            if e - s == c * m:  # equal lengths: views, no mask
                q, k, v = (qkv[s:e].view(c, m, 3, h, d)[:, :, i].transpose(1, 2) for i in range(3))
                out[s:e].view(c, m, h, d).copy_(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2))
                continue
            pad = qkv.new_zeros(c * m, 3 * self.dim).index_copy_(0, dest, qkv[s:e]).view(c, m, 3, h, d)
            q, k, v = (pad[:, :, i].transpose(1, 2) for i in range(3))  # (c, H, m, d) views
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)  # (c, H, m, d)
            out[s:e] = o.transpose(1, 2).reshape(c * m, self.dim).index_select(0, dest)
        return out
