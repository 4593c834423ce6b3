"""Small C kernels for the CPU hot spots torch leaves slow here: the encoders' attention softmax,
the dropout keep masks of training, int8 quantise/dequantise (:mod:`lmforge.fast_encode`,
:mod:`lmforge.int8_frozen`), bf16-weight products and the fp32 decode step's RMSNorm, rotary +
attention and SiLU gate (:mod:`lmforge.bf16_weights`, :mod:`lmforge.kv_cache`). Each has a torch
path, so the kernels only ever change speed (and rounding).

The C source (``cpu_kernels.c`` beside this module) is compiled once per machine with the system C
compiler (``cc -O3 -march=native -ffast-math``, with ``-fopenmp`` when it builds; ~0.5 s), into
``<cache>/kernels/<hash>.so`` (the hash covers the source, the flags and the CPU's feature flags),
written aside and renamed; later processes load it with ctypes in ~1 ms and no extra memory to speak
of (numba, tried first, cost 130 MB and 1.2 s per process to load the same two kernels from its
cache). ctypes releases the GIL during a call, so inference worker threads run them in parallel. No
compiler, a failed build or ``LMFORGE_C_KERNELS=0``: torch everywhere.

**Row softmax, in place** (:func:`softmax_`), rows of a bf16 ``(R, C)`` tensor:

    w_ij <- exp(w_ij - max_j w_ij) / sum_j exp(w_ij - max_j w_ij)

torch's bf16 softmax here costs 0.73 ns per element at 256 columns and 1.2-1.5 at 32 (1 thread,
rows in L2); in a 256-token MiniLM layer that is more than the score and value GEMMs together.
The kernel reads a row twice and writes it once, in fp32 registers: the max (on sortable 16-bit integer keys of the
bf16 bits: an integer max vectorises, a float one with NaN semantics does not); ``exp(x - max) =
2^t``, ``t = (x - max) log2(e) = n + f``, ``n = round(t)``, ``2^f`` by a degree-5 least-squares
polynomial on [-0.5, 0.5] (relative error 2.3e-7) and ``2^n`` added to the exponent bits,
``t < -126`` -> 0 (a key masked with the dtype's minimum weighs exactly 0), summed in fp32; then
times ``1 / sum``, rounded to nearest-even bf16. It equals torch's bf16 softmax (fp32 inside) on
99.99% of elements, the rest one bf16 step apart (the fp32 sums run in another order).

**Dropout keep masks** (:func:`keep_mask`): ``8 / itemsize`` integer lanes per 64-bit word ``i``,
all ones (keep) or 0 (drop); lane ``l`` is kept iff
``(splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> (8 * itemsize * l)) & 0x7FFF >= k``:
SplitMix64 on a counter (a counter-based generator, every word independent, so the loop
vectorises; SplitMix64 passes BigCrush), ``P(drop) = k / 2^15`` exactly as the torch path of
:func:`lmforge.fast_dropout.keep_bits`. One 64-bit seed is drawn from torch's default generator
per mask, so seeded runs (and resumed ones, which restore that generator) repeat exactly.

Measured figures: ``tests/speed/test_cpu_kernels.py`` (parity) and the docstrings of
``bench/encode.py`` and ``bench/classify_lora.py`` (speed).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = (Path(__file__).resolve().parent / "cpu_kernels.c").read_text(encoding="utf-8")  # the C source
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-shared", "-fPIC"]
_LIB: list = []  # [the loaded library or None], filled on first use
_BUILD_LOCK = threading.Lock()


def _cpu_id() -> str:
    """The CPU's feature flags (``-march=native`` code runs only where they match)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _compile() -> ctypes.CDLL | None:
    """The kernels' shared library: loaded from the cache, else compiled into it; None when
    switched off or when no C compiler builds it."""
    if os.environ.get("LMFORGE_C_KERNELS") == "0":
        return None
    from .models.packaged import cache_dir

    cc = os.environ.get("CC", "cc")
    dll = None
    for flags in ([*FLAGS, "-fopenmp"], FLAGS):  # OpenMP splits linear_bf16w's columns; without it, one thread
        key = hashlib.sha256("\0".join([SOURCE, cc, *flags, _cpu_id()]).encode()).hexdigest()[:20]
        lib = cache_dir() / "kernels" / f"cpu_kernels_{key}.so"
        if not lib.exists():
            try:
                lib.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                    src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                    src.write_text(SOURCE)
                    subprocess.run([cc, *flags, str(src), "-o", str(out)], check=True, capture_output=True,
                                   timeout=120)
                    os.replace(out, lib)  # atomic: a reader sees no library or the whole one
            except (OSError, subprocess.SubprocessError):
                continue
        try:
            dll = ctypes.CDLL(str(lib))
            break
        except OSError:
            continue
    if dll is None:
        return None
    i64, u64, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    dll.softmax_bf16.argtypes = [ptr, i64, i64, ptr]
    for width in (16, 32, 64):
        getattr(dll, f"keep_words{width}").argtypes = [ptr, i64, u64, u64]
    dll.quant_rows_f32.argtypes = [ptr, i64, i64, ptr, ptr, i64]
    dll.dequant_rows_.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64]
    dll.softmax_f32.argtypes = [ptr, i64, i64]
    dll.softmax_keys_f32.argtypes = [ptr, i64, i64, i64, ptr]
    dll.dequant_quant_rows_.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr]
    dll.linear_bf16w.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64]
    dll.rms_norm_f32.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
    dll.silu_mul_f32.argtypes = [ptr, i64, i64, ptr]
    dll.decode_attend_f32.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_float, ptr,
                                      ptr]
    return dll


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on the first call, once even when inference worker threads
    ask together), None when unavailable."""
    if not _LIB:
        with _BUILD_LOCK:
            if not _LIB:
                _LIB.append(_compile())
    return _LIB[0]


def softmax_(w: Tensor) -> Tensor:
    """Softmax over the last dim of ``w`` in place; returns ``w``. The C kernels for a contiguous
    bf16 or fp32 CPU tensor outside autograd, ``torch.softmax(w, -1, out=w)`` otherwise."""
    if (w.dtype not in (torch.bfloat16, torch.float32) or w.device.type != "cpu" or not w.is_contiguous()
            or w.requires_grad or w.numel() == 0 or library() is None):
        return torch.softmax(w, -1, out=w)
    cols = w.shape[-1]
    if w.dtype == torch.float32:
        _LIB[0].softmax_f32(w.data_ptr(), w.numel() // cols, cols)
        return w
    buf = torch.empty(cols, dtype=torch.float32)
    _LIB[0].softmax_bf16(w.data_ptr(), w.numel() // cols, cols, buf.data_ptr())
    return w


def softmax_keys_(w: Tensor, lens: Tensor) -> bool:
    """Softmax in place of a contiguous fp32 ``(G, m, mk)`` group of attention scores, matrix ``i``
    over its first ``lens[i]`` (int32) key columns, the rest set to 0: the key-padding mask
    without a bias pass. False (``w`` untouched) where the C kernel does not apply."""
    if (w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or w.requires_grad
            or lens.dtype != torch.int32 or not lens.is_contiguous() or library() is None):
        return False
    _LIB[0].softmax_keys_f32(w.data_ptr(), w.shape[0], w.shape[1], w.shape[2], lens.data_ptr())
    return True


def keep_mask(numel: int, itemsize: int, k: int, device: torch.device | str = "cpu") -> Tensor | None:
    """``(numel,)`` integer mask of ``itemsize`` bytes per element: all ones where kept, 0 where
    dropped, ``P(0) = k / 2^15``; None when the kernel does not apply (not CPU, no library)."""
    if torch.device(device).type != "cpu" or itemsize not in (2, 4, 8) or library() is None:
        return None
    words = torch.empty(-(-numel * itemsize // 8), dtype=torch.int64)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # [0, 2^63): one draw of the default generator
    getattr(_LIB[0], f"keep_words{8 * itemsize}")(words.data_ptr(), words.numel(), seed, k)
    return words.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize])[:numel]


def _c_ok(*ts: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in ts) \
        and library() is not None


def quant_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 of a ``(R, C)`` fp32 tensor: ``(q (R, C) int8, s (R,) fp32)`` with
    ``s_r = max_j |x_rj| (1 / 127)`` and ``q_rj = round(x_rj * (127 / max_j |x_rj|))`` (half to even;
    an all-zero row: ``s_r = 0``, ``q_r = 0``), so ``x ≈ s q``. The C kernel reads a row twice
    and writes it once; the torch fallback makes the same numbers with ~6 passes."""
    rows, cols = x.shape
    if _c_ok(x) and x.dtype == torch.float32 and x.numel():
        q, s = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows, dtype=torch.float32)
        _LIB[0].quant_rows_f32(x.data_ptr(), rows, cols, q.data_ptr(), s.data_ptr(), torch.get_num_threads())
        return q, s
    m = x.abs().amax(1) if cols else x.new_zeros(rows)  # (R,)
    inv = torch.where(m > 0, m.new_full(m.shape, 127.0) / m, 0.0)  # a true division (`127.0 / m` is 127 * (1 / m))
    return torch.round(x * inv[:, None]).to(torch.int8), m * (1.0 / 127)


DEQUANT_ACTS = {"none": 0, "gelu": 1, "relu": 2}  # activations dequant_rows applies itself


def dequant_rows(acc: Tensor, sx: Tensor, sw: Tensor, bias: Tensor, act: str = "none") -> Tensor:
    """``y_rm = act(acc_rm (s_r w_m) + b_m)`` for an ``(R, M)`` int32 product of int8 codes, fp32
    ``sx`` (R,), ``sw`` (M,), ``bias`` (M,), ``act`` one of :data:`DEQUANT_ACTS`, written over
    ``acc``'s bytes (``acc`` is consumed; the C kernel needs no new buffer) and returned as that
    fp32 view. The C loop may fuse the multiply-add and computes GELU's erf by Abramowitz-Stegun
    7.1.26 (|error| <= 1.5e-7): it matches the torch fallback to ~1e-6 relative."""
    if _c_ok(acc, sx, sw, bias) and acc.dtype == torch.int32 and acc.numel():
        _LIB[0].dequant_rows_(acc.data_ptr(), acc.shape[0], acc.shape[1], sx.data_ptr(), sw.data_ptr(),
                              bias.data_ptr(), DEQUANT_ACTS[act], torch.get_num_threads())
        return acc.view(torch.float32)
    y = torch.addcmul(bias, acc.float(), sx[:, None] * sw)
    y = torch.nn.functional.gelu(y) if act == "gelu" else y.relu_() if act == "relu" else y
    return acc.view(torch.float32).copy_(y)


def dequant_quant_rows(acc: Tensor, sx: Tensor, sw: Tensor, bias: Tensor, act: str = "none") -> tuple[Tensor, Tensor]:
    """:func:`quant_rows` of :func:`dequant_rows`'s result, without materialising it: ``(q (R, M)
    int8, s (R,))``, the codes written over ``acc``'s bytes (``acc`` is consumed). For a
    linear layer whose only consumer is another int8 linear (the FFN's up projection feeding its
    down projection)."""
    rows, cols = acc.shape
    if _c_ok(acc, sx, sw, bias) and acc.dtype == torch.int32 and acc.numel():
        scale, buf = torch.empty(rows, dtype=torch.float32), torch.empty(cols, dtype=torch.float32)
        _LIB[0].dequant_quant_rows_(acc.data_ptr(), rows, cols, sx.data_ptr(), sw.data_ptr(), bias.data_ptr(),
                                    DEQUANT_ACTS[act], scale.data_ptr(), buf.data_ptr())
        return acc.view(torch.int8).view(-1)[:rows * cols].view(rows, cols), scale
    return quant_rows(dequant_rows(acc, sx, sw, bias, act))


def linear_bf16w(x: Tensor, w: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor | None:
    """``x W^T + b`` for a contiguous fp32 ``x (M, K)`` and bf16 ``w (N, K)`` (``bias`` fp32 (N,)),
    computed in fp32 with the weights widened exactly: ``x @ w.float().T + b`` to fp32 summation
    order. ``out``: an fp32 ``(M, N)`` view whose rows may be further apart (a column slice of a
    wider output). Runs on torch's intra-op thread count. None where the C kernel does not apply
    (the caller computes it another way)."""
    if not (_c_ok(x, w) and x.dtype == torch.float32 and w.dtype == torch.bfloat16 and x.dim() == w.dim() == 2
            and x.shape[1] == w.shape[1]) or (bias is not None and not (_c_ok(bias) and bias.dtype == torch.float32)):
        return None
    m, n = x.shape[0], w.shape[0]
    if out is None:
        out = x.new_empty(m, n)
    elif out.shape != (m, n) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"linear_bf16w: out must be an fp32 ({m}, {n}) view with unit column stride")
    _LIB[0].linear_bf16w(x.data_ptr(), m, x.shape[1], w.data_ptr(), n, None if bias is None else bias.data_ptr(),
                         out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor | None:
    """``w * (x / sqrt(mean(x^2, -1) + eps))`` for a contiguous fp32 ``x (..., C)`` and fp32
    ``w (C,)`` (LlamaRMSNorm in fp32, to summation order) in one C call; None where it does not
    apply (the caller uses torch)."""
    if not (_c_ok(x, w) and x.dtype == w.dtype == torch.float32 and x.numel() and w.shape == x.shape[-1:]):
        return None
    y = torch.empty_like(x)
    cols = x.shape[-1]
    _LIB[0].rms_norm_f32(x.data_ptr(), x.numel() // cols, cols, w.data_ptr(), eps, y.data_ptr())
    return y


def silu_mul(y: Tensor, inter: int) -> Tensor | None:
    """``silu(y[:, :inter]) * y[:, inter:]`` of a contiguous fp32 ``(R, 2 inter)`` tensor in one C
    call (the Llama MLP between its gate/up and down projections); None where it does not apply."""
    if not (_c_ok(y) and y.dtype == torch.float32 and y.dim() == 2 and y.shape[1] == 2 * inter and y.numel()):
        return None
    out = y.new_empty(y.shape[0], inter)
    _LIB[0].silu_mul_f32(y.data_ptr(), y.shape[0], inter, out.data_ptr())
    return out


def decode_attend(y: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, t: int, bias: Tensor, scale: float,
                  hq: int, hkv: int, buf: Tensor) -> Tensor:
    """One decode step's rotary embedding, cache write and attention in one C call (see
    ``decode_attend_f32`` in the source): ``y (B, (hq + 2 hkv) d)`` fp32 (q, k rotated in place),
    ``cos``/``sin`` (B, d), caches ``(B, hkv, tmax, d)``, ``bias (B, tmax)``, ``buf`` >= t + 1
    floats; returns ``(B, hq d)``. The caller checks :func:`library` and the layouts."""
    b, d = y.shape[0], kc.shape[-1]
    if not all(x.dtype == torch.float32 and x.is_contiguous() for x in (y, cos, sin, kc, vc, bias, buf)) \
            or y.shape[1] != (hq + 2 * hkv) * d or buf.numel() <= t or t >= kc.shape[2]:
        raise ValueError("decode_attend: fp32 contiguous tensors of the documented shapes expected")
    out = y.new_empty(b, hq * d)
    _LIB[0].decode_attend_f32(y.data_ptr(), b, hq, hkv, d, cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                              kc.shape[2], t, bias.data_ptr(), scale, out.data_ptr(), buf.data_ptr())
    return out
