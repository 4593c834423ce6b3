"""bf16-stored linear weights applied in fp32: CPU decoding on a CPU without native bf16.

Decoding a causal LM at batch 1-8 reads every weight once per token: on a CPU it is bound by
memory bandwidth, not arithmetic (SmolLM2-135M in fp32: 540 MB per token). Where bf16 matmul is
native (AVX512-BF16, AMX) ``precision: auto`` stores inference weights in bf16 and computes in
bf16 (:meth:`lmforge.device.Placement.for_inference`). Without it bf16 matmul is emulated (5.7x
slower than fp32, measured) and ``auto`` computes in fp32; then :func:`store_bf16_weights` keeps
the linear layers' weights in bf16 (half the bytes) and :class:`Bf16Linear` applies them to fp32
inputs in fp32:

    y = x W^T + b,   W = widen(W_bf16) exactly (a 16-bit shift),   x, y, sums in fp32

- rows ``M <= ROWS_KERNEL`` (decode steps, short prompts): :func:`lmforge.cpu_kernels.linear_bf16w`
  reads each weight row once as bf16 (measured, 1 thread, SmolLM2's 211 projections per token: 13.2 ms
  vs 22.5 ms in fp32 at M = 1 with the weights in cache, ~24 vs ~35-45 ms streamed from memory;
  a 40-token prefill 253 vs 302 ms through the chunked path below, equal at 80 tokens);
- wider inputs (long prefills): the weight widened in chunks into a reused fp32 scratch, each
  chunk an fp32 GEMM (+14-30 % over fp32 weights at M = 32-320, for half the resident bytes).

Numerics: the exact product of fp32 activations with bf16-rounded weights (relative weight error
<= 2^-9; the checkpoints of most current LMs are bf16 to begin with, e.g. SmolLM2's). The
embedding stays fp32; a tied LM head gets its own bf16 copy (the embedding's rows are read one per
token, the head's all of them). Inference only: the layers stay frozen, an input that needs a
gradient goes through ``F.linear`` with the widened weight.
"""
from __future__ import annotations

import ctypes
import functools
import sys
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels

ROWS_KERNEL = 64  # the C kernel up to this many input rows; chunked fp32 GEMMs above
SCRATCH_ELEMS = 1 << 21  # fp32 scratch (8 MB) per thread for the widened weight chunks
_SCRATCH = threading.local()


def _scratch(n: int) -> Tensor:
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(max(n, SCRATCH_ELEMS if buf is None else buf.numel()))
    return buf[:n]


def project(x: Tensor, w: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``x W^T + b`` for fp32 ``x (M, K)`` and bf16 ``w (N, K)`` in fp32 (see the module), into
    ``out`` (an (M, N) fp32 view, rows possibly further apart) when given."""
    if not x.is_contiguous():
        x = x.contiguous()
    m, (n, k) = x.shape[0], w.shape
    if m <= ROWS_KERNEL:
        y = cpu_kernels.linear_bf16w(x, w, bias, out)
        if y is not None:
            return y
    if x.requires_grad or x.device.type != "cpu":
        y = F.linear(x, w.float(), bias)
        return y if out is None else out.copy_(y)
    y = out if out is not None else x.new_empty(m, n)
    rows = max(1, min(n, SCRATCH_ELEMS // max(k, 1)))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s = _scratch((r1 - r0) * k).view(r1 - r0, k)
        s.copy_(w[r0:r1])
        if r0 == 0 and r1 == n and y.is_contiguous():
            torch.mm(x, s.T, out=y)
        else:
            y[:, r0:r1] = x @ s.T
    if bias is not None:
        y += bias
    return y


class Bf16Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in bf16 and applied to fp32 inputs in fp32
    (:func:`project`); other input dtypes get ``F.linear`` in their own dtype. Made in place from
    an ``nn.Linear`` by :func:`store_bf16_weights` (the module object, its hooks and references stay)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype != torch.float32 or w.dtype != torch.bfloat16:
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = project(x.reshape(-1, x.shape[-1]), w, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


def applies(model: nn.Module) -> bool:
    """Whether :func:`store_bf16_weights` is worth it for ``model``: a CPU causal LM (its decode
    steps are bandwidth bound) and the C kernel builds here."""
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and getattr(getattr(model, "config", None), "is_encoder_decoder",
                                                                 True) is False \
        and hasattr(model, "get_output_embeddings") and cpu_kernels.library() is not None


def _release_pages(storage) -> None:
    """Give the pages of a storage nobody else holds back to the OS now. A checkpoint's weights
    are often views into one memory map of its file (safetensors): a dropped fp32 weight then
    frees nothing until every tensor of the file is gone, and its pages, read once by the
    conversion, stay resident: SmolLM2's conversion peaked at 1,181 MB RSS instead of 618.
    ``madvise(MADV_DONTNEED)`` on the whole pages inside the storage (no other tensor's bytes;
    only when this is the last reference to it, so nothing reads them again). Linux; elsewhere
    (or on failure) nothing happens."""
    try:
        if torch._C._storage_Use_Count(storage._cdata) != 1 or storage.device.type != "cpu":
            return
        libc = _libc()
        if libc is None:
            return
        page, start, size = 4096, storage.data_ptr(), storage.nbytes()
        lo, hi = -(-start // page) * page, (start + size) // page * page
        if hi > lo:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
    except (AttributeError, OSError):
        pass


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def store_bf16_weights(model: nn.Module) -> int:
    """Store every plain ``nn.Linear`` weight of ``model`` (an adapter layer's base too, not its
    adapter weights) in bf16 and make those layers :class:`Bf16Linear`; a weight shared with
    another module (a tied LM head) gets its own bf16 copy, the other module keeps the original.
    Frozen afterwards. Returns the number of layers converted."""
    adapter_params = set()
    for m in model.modules():
        if hasattr(m, "lora_A") and hasattr(m, "lora_B"):
            adapter_params.update(id(p) for p in m.lora_A.parameters())
            adapter_params.update(id(p) for p in m.lora_B.parameters())
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if type(m) is not nn.Linear or id(m.weight) in adapter_params or m.weight.dtype != torch.float32:
                continue
            w = m.weight.detach().to(torch.bfloat16).contiguous()
            if owners[id(m.weight)] > 1:  # tied: this module gets its own copy
                m.weight = nn.Parameter(w, requires_grad=False)
            else:
                storage = m.weight.untyped_storage()
                m.weight.data = w
                m.weight.requires_grad_(False)
                _release_pages(storage)
            if m.bias is not None:
                m.bias.requires_grad_(False)
            m.__class__ = Bf16Linear
            n += 1
    return n


def group(mods: tuple[nn.Module, ...]):
    """``x (M, K) -> cat([m(x) for m in mods], -1)`` for :class:`Bf16Linear` layers sharing one
    input (q/k/v, gate/up), each writing its own columns of one output (no concatenation), or
    None when a module is not a plain :class:`Bf16Linear`. Made once per decoding call (the
    weights must not change meanwhile): a decode step's rows go straight to the C kernel, ~2 us
    of Python per projection instead of ~15."""
    if not all(type(m) is Bf16Linear and not (m._forward_hooks or m._forward_pre_hooks)
               and m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous() and m.weight.device.type == "cpu"
               and (m.bias is None or (m.bias.dtype == torch.float32 and m.bias.is_contiguous())) for m in mods):
        return None
    widths = [m.out_features for m in mods]
    total, k = sum(widths), mods[0].in_features
    if any(m.in_features != k for m in mods):
        return None
    lib = cpu_kernels.library()
    calls, c0 = [], 0
    for m, n in zip(mods, widths):
        calls.append((m.weight.data_ptr(), n, None if m.bias is None else m.bias.data_ptr(), 4 * c0))
        c0 += n

    def run(x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            return torch.cat([m(x) for m in mods], dim=-1)
        rows = x.shape[0]
        if lib is None or rows > ROWS_KERNEL or x.requires_grad or x.shape[1] != k:
            out, c = x.new_empty(rows, total), 0
            for m, n in zip(mods, widths):
                project(x, m.weight, m.bias, out[:, c:c + n])
                c += n
            return out
        x = x.contiguous()
        out = x.new_empty(rows, total)
        xp, op, nt = x.data_ptr(), out.data_ptr(), torch.get_num_threads()
        for wp, n, bp, off in calls:
            lib.linear_bf16w(xp, rows, k, wp, n, bp, op + off, total, nt)
        return out

    return run
