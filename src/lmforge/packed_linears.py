"""oneDNN-prepacked bf16 weights for groups of a model's linear layers (the decode step's GEMMs).

A plain ``nn.Linear`` with bf16 weights on the CPU runs through
``torch.ops.mkldnn._linear_pointwise`` with its weight reordered once into oneDNN's blocked layout
(``_reorder_linear_weight``; output bit-identical to ``F.linear``, ~1.6x faster at batch 1-8 on
SmolLM2's shapes). Layers reading one input (q/k/v, gate/up) are packed as one weight ``[W_1; W_2;
...]`` (one GEMM). An active LoRA layer enters its group merged, ``W + scale B A`` (rounded once to
bf16, as :func:`lmforge.rl.fast.merged_adapters` folds it). When a source tensor changes (an
optimizer step on the LoRA weights) the group is written again into the same buffer by one strided
copy (:func:`blocked_layout`: the blocking is read off packs of probe weights once per shape),
without a reorder call or fresh pages. :class:`PackedLinears` holds a model's packs
(:func:`packed_linears`, :func:`drop_packed`); :mod:`lmforge.kv_cache` uses them.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .device import onednn_linear

_PACKS: "weakref.WeakKeyDictionary[nn.Module, PackedLinears]" = weakref.WeakKeyDictionary()


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


# ---- projections: the model's modules, plain bf16 linears through one prepacked oneDNN weight --------
def _plain(m: nn.Module) -> tuple[nn.Linear | None, nn.Module | None]:
    """``(linear, lora)``: the ``nn.Linear`` that computes ``m(x)`` (``m`` itself, or the base of
    a LoRA layer that is merged or disabled) and no LoRA; or the base of an active LoRA layer and
    the layer (``m(x) = base(x) + scale B A x``; eval mode: no dropout); ``(None, None)`` else."""
    if _hooked(m):
        return None, None
    if type(m) is nn.Linear:
        return m, None
    from .adapters.lora import LoraLinear

    if isinstance(m, LoraLinear) and type(m).forward is LoraLinear.forward and type(m.base) is nn.Linear \
            and not m.training and not _hooked(m.base):
        return m.base, (None if (m.merged or m.disabled) else m)
    return None, None


def _merged_into(out: Tensor, lin: nn.Linear, lora: nn.Module | None) -> None:
    """``out`` (o, in) <- the weight ``lin`` computes with: ``W`` or, for an active LoRA layer,
    ``W + scale B A`` in W's dtype (one GEMM; as ``rl.fast.merged_adapters`` folds it)."""
    w = lin.weight.detach()
    if lora is None:
        out.copy_(w)
    else:
        torch.addmm(w, lora.lora_B.weight.detach().to(w.dtype), lora.lora_A.weight.detach().to(w.dtype),
                    alpha=lora.scale, out=out)


# ---- writing into a packed weight in place ----------------------------------------------------------
_LAYOUTS: dict[tuple[int, int, int], tuple | None] = {}


def _buffer(packed: Tensor) -> Tensor:
    """A 1-D bf16 tensor over an mkldnn tensor's own buffer (the caller keeps ``packed`` alive)."""
    import ctypes

    n = torch.ops.mkldnn._nbytes(packed)
    raw = (ctypes.c_uint8 * n).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(raw, dtype=torch.bfloat16)


def blocked_layout(out: int, inp: int, batch: int) -> tuple | None:
    """How ``_reorder_linear_weight`` lays out an (out, in) bf16 weight: ``(sizes, strides,
    pairs)`` with ``buffer = W.as_strided(sizes, strides)`` flattened (outermost level first), in
    32-bit pairs of bf16 columns when ``pairs`` (then W is viewed as (out, in / 2) int32); None
    when the buffer is padded or not such a blocking. Found once per shape by packing probe
    weights that hold their own row and column numbers (base 256: exact in bf16) and reading
    the loops off the buffer (e.g. AVX512-BF16: (out / 64, in / 2, 64, 2), strides (64 in, 2, in, 1))."""
    key = (out, inp, batch)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    reorder, n, layout = torch.ops.mkldnn._reorder_linear_weight, out * inp, None
    probes = [reorder(v.to(torch.bfloat16).contiguous(), batch) for v in
              (torch.arange(out)[:, None].expand(out, inp), torch.arange(inp)[None].expand(out, inp))
              for v in (v % 256, v // 256)]
    if all(torch.ops.mkldnn._nbytes(p) == 2 * n for p in probes):
        r, c = [_buffer(probes[i]).long() + 256 * _buffer(probes[i + 1]).long() for i in (0, 2)]
        src = r * inp + c  # buffer position -> element of W
        levels, block = [], 1
        while block < n:  # innermost loop first: a step of `d` elements, `k` times
            d, k = int(src[block] - src[0]), 1
            while block * (k + 1) <= n and int(src[block * k]) == int(src[0]) + k * d:
                k += 1
            while n % (block * k):
                k -= 1
            if k < 2:
                break
            levels.append((k, d))
            block *= k
        sizes, strides = [k for k, _ in reversed(levels)], [d for _, d in reversed(levels)]
        if block == n and torch.equal(torch.arange(n).as_strided(sizes, strides).reshape(-1), src):
            pairs = sizes[-1] == 2 and strides[-1] == 1 and all(d % 2 == 0 for d in strides[:-1])
            layout = (sizes[:-1], [d // 2 for d in strides[:-1]], True) if pairs else (sizes, strides, False)
    _LAYOUTS[key] = layout
    return layout


def _write_packed(buffer: Tensor, w: Tensor, layout: tuple) -> None:
    """Copy the contiguous (out, in) bf16 ``w`` into a packed buffer of the same shape (one
    strided copy, no reorder call and no new allocation)."""
    sizes, strides, pairs = layout
    if pairs:
        buffer, w = buffer.view(torch.int32), w.view(torch.int32)
    buffer.view(sizes).copy_(w.as_strided(sizes, strides))


class _Pack:
    """One packed group: the mkldnn weight, its bias, the batch hint it was packed for, and what
    it was built from (storages by weak reference, version counters, LoRA scales)."""

    __slots__ = ("refs", "versions", "scales", "packed", "bias", "batch", "buffer")

    def __init__(self, sources: list[Tensor], scales: tuple, packed: Tensor, bias: Tensor | None, batch: int):
        self.packed, self.bias, self.batch, self.buffer = packed, bias, batch, None
        self.mark(sources, scales)

    def mark(self, sources: list[Tensor], scales: tuple) -> None:
        self.refs = [weakref.ref(t.untyped_storage()) for t in sources]
        self.versions, self.scales = [t._version for t in sources], scales

    def stale(self, sources: list[Tensor], scales: tuple) -> bool:
        return scales != self.scales or len(sources) != len(self.refs) or any(
            r() is not t.untyped_storage() or v != t._version for r, v, t in zip(self.refs, self.versions, sources))


class PackedLinears:
    """oneDNN-blocked copies of groups of a model's bf16 ``nn.Linear`` weights, reused across calls.

    A group (q/k/v, gate/up, ...) sharing one input is packed as one weight ``[W_1; W_2; ...]``
    (one GEMM instead of several; the packed copy exists anyway). An active LoRA layer enters
    its group merged, ``W_i + scale_i B_i A_i`` (its base and adapter weights stay untouched):
    sampling then costs the plain model's GEMMs. An entry is valid while every source tensor
    (each base weight; LoRA ``A`` and ``B``) still holds the storage it was packed from (a weak
    reference: ``weight.data = other`` or freeing the tensor invalidates it) at the same version
    counter (an in-place update such as an optimizer step bumps it); otherwise the group is
    packed again, written into the same buffer by one strided copy when the layout is known
    (:func:`blocked_layout`: no reorder call, no fresh pages; an RL run re-packs its merged LoRA
    weights after every optimizer step). Checked when a :class:`LlamaDecoder` is built (once per
    :func:`~lmforge.generation.decode` call), not per step.
    """

    def __init__(self):
        self.entries: dict[tuple[int, ...], _Pack] = {}
        self.scratch: Tensor | None = None  # (rows, in) bf16, reused to assemble merged groups

    def _assemble(self, lins, loras) -> Tensor:
        """The group's weight ``[W_1 (+ s_1 B_1 A_1); W_2 ...]`` (sum out, in), contiguous; a
        lone plain weight as it is, else built in the reused scratch buffer."""
        w0 = lins[0].weight
        if len(lins) == 1 and loras[0] is None:
            return w0.detach()
        rows, inp = sum(lin.out_features for lin in lins), w0.shape[1]
        if self.scratch is None or self.scratch.numel() < rows * inp or self.scratch.dtype != w0.dtype:
            self.scratch = w0.new_empty(max(rows * inp, 0 if self.scratch is None else self.scratch.numel()))
        out, r0 = self.scratch[:rows * inp].view(rows, inp), 0
        for lin, lora in zip(lins, loras):
            _merged_into(out[r0:r0 + lin.out_features], lin, lora)
            r0 += lin.out_features
        return out

    def projection(self, mods: tuple[nn.Module, ...], batch: int, dtype: torch.dtype, device: torch.device):
        """A function ``x (N, in) -> (N, sum out)`` equal to ``cat([m(x) for m in mods], -1)``
        (to bf16 rounding): one packed GEMM when every module is a plain bf16 linear or a LoRA
        layer over one and x will be bf16 on the CPU, else the modules' own calls."""
        if dtype == torch.float32 and device.type == "cpu":
            from .bf16_weights import group

            run = group(mods)  # bf16-stored weights applied in fp32 (a CPU without native bf16)
            if run is not None:
                return run
        lins, loras = zip(*[_plain(m) for m in mods])
        if dtype != torch.bfloat16 or device.type != "cpu" or not onednn_linear(torch.bfloat16) \
                or any(lin is None or lin.weight.dtype != torch.bfloat16 for lin in lins):
            return mods[0] if len(mods) == 1 else lambda x: torch.cat([m(x) for m in mods], dim=-1)
        key = tuple(id(lin) for lin in lins)
        sources = [t for lin, lo in zip(lins, loras)
                   for t in ((lin.weight,) if lo is None else (lin.weight, lo.lora_A.weight, lo.lora_B.weight))]
        scales = tuple(None if lo is None else float(lo.scale) for lo in loras)
        e = self.entries.get(key)
        if e is None or e.stale(sources, scales):
            with torch.no_grad():
                e = self._pack(key, lins, loras, sources, scales, batch, e)
        packed, bias, op = e.packed, e.bias, torch.ops.mkldnn._linear_pointwise.default
        return lambda x: op(x, packed, bias, "none", [], "")

    def _pack(self, key, lins, loras, sources, scales, batch, old: _Pack | None) -> _Pack:
        w = self._assemble(lins, loras)  # (sum out, in)
        bias = None
        if any(lin.bias is not None for lin in lins):
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features)
                              for lin in lins])
        if old is not None and old.packed.shape == w.shape and hasattr(torch.ops.mkldnn, "data_ptr"):
            layout = blocked_layout(w.shape[0], w.shape[1], old.batch)
            if layout is not None:  # the same buffer, rewritten
                if old.buffer is None:
                    old.buffer = _buffer(old.packed)
                _write_packed(old.buffer, w, layout)
                old.bias = bias
                old.mark(sources, scales)
                return old
        e = self.entries[key] = _Pack(sources, scales, torch.ops.mkldnn._reorder_linear_weight(w, batch), bias, batch)
        if any(lo is not None for lo in loras) and hasattr(torch.ops.mkldnn, "data_ptr"):
            blocked_layout(w.shape[0], w.shape[1], batch)  # LoRA weights change: found now, once per shape
        return e


class _Unpacked:
    """:class:`PackedLinears`' interface with the modules' own calls (no packing)."""

    @staticmethod
    def projection(mods, batch, dtype, device):
        return mods[0] if len(mods) == 1 else lambda x: torch.cat([m(x) for m in mods], dim=-1)


def packed_linears(model: nn.Module) -> PackedLinears:
    """The model's :class:`PackedLinears` (kept while the model lives; see :func:`drop_packed`)."""
    packs = _PACKS.get(model)
    if packs is None:
        packs = _PACKS[model] = PackedLinears()
    return packs


def drop_packed(model: nn.Module, stale_only: bool = False) -> None:
    """Free the model's packed weights; ``stale_only``: those whose source tensors are gone (e.g.
    after a rollout sampled with merged copies of the weights, before its training steps)."""
    packs = _PACKS.get(model)
    if packs is None:
        return
    if not stale_only:
        del _PACKS[model]
        return
    for key in [k for k, e in packs.entries.items() if any(r() is None for r in e.refs)]:
        del packs.entries[key]
