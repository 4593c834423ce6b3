"""Two small C kernels for the CPU hot spots torch leaves slow here: the bf16 attention softmax of
the encoders and the dropout keep masks of training. Each has a torch fallback, so the kernels
only ever change speed.

The C source below is compiled once per machine with the system C compiler (``cc -O3
-march=native -ffast-math``, ~0.3 s), into ``<cache>/kernels/<hash>.so`` (the hash covers the
source, the flags and the CPU's feature flags), written aside and renamed; later processes load it
with ctypes in ~1 ms and no extra memory to speak of (numba, tried first, cost 130 MB and 1.2 s per
process to load the same two kernels from its cache). ctypes releases the GIL during a call, so
inference worker threads run them in parallel. No compiler, a failed build or
``LMFORGE_C_KERNELS=0``: torch everywhere.

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

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

void softmax_bf16(uint16_t *a, int64_t rows, int64_t cols, float *buf) {
    const float log2e = 1.4426950408889634f;
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = a + r * cols;
        int32_t key = 0;  /* max on sortable keys of the bits: b | 0x8000 if b >= 0, else ~b & 0xFFFF */
        for (int64_t j = 0; j < cols; j++) {
            int32_t b = row[j], kb = b ^ (((b >> 15) * 0x7FFF) | 0x8000);
            key = kb > key ? kb : key;
        }
        float m = bits_f32((uint32_t)((key & 0x8000) ? key ^ 0x8000 : key ^ 0xFFFF) << 16);
        float s = 0.0f;
        for (int64_t j = 0; j < cols; j++) {
            float t = (bits_f32((uint32_t)row[j] << 16) - m) * log2e;
            int keep = t >= -126.0f;
            t = t > -126.0f ? t : -126.0f;
            float n = __builtin_floorf(t + 0.5f);
            float f = t - n;
            float p = 1.0f + f * (0.6931472f + f * (0.24022211f + f * (0.055503406f
                      + f * (0.009670768f + f * 0.0013395286f))));
            float e = bits_f32(f32_bits(p) + ((uint32_t)((int32_t)n + 127) << 23) - (127u << 23));
            e = keep ? e : 0.0f;
            buf[j] = e;
            s += e;
        }
        float inv = 1.0f / s;
        for (int64_t j = 0; j < cols; j++) {
            uint32_t u = f32_bits(buf[j] * inv);
            row[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        }
    }
}

static inline uint64_t splitmix(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define KEEP_WORDS(NAME, WIDTH)                                                     \
void NAME(uint64_t *out, int64_t words, uint64_t seed, uint64_t k) {                \
    const uint64_t ones = (WIDTH) == 64 ? ~0ull : ((1ull << (WIDTH)) - 1);          \
    for (int64_t i = 0; i < words; i++) {                                           \
        uint64_t z = splitmix(seed, (uint64_t)i), w = 0;                            \
        for (int l = 0; l < 64 / (WIDTH); l++) {                                    \
            uint64_t u = (z >> ((WIDTH) * l)) & 0x7FFFull;                          \
            w |= (u >= k ? ones : 0ull) << ((WIDTH) * l);                           \
        }                                                                           \
        out[i] = w;                                                                 \
    }                                                                               \
}
KEEP_WORDS(keep_words16, 16)
KEEP_WORDS(keep_words32, 32)
KEEP_WORDS(keep_words64, 64)
"""
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
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:20]
    lib = cache_dir() / "kernels" / f"cpu_kernels_{key}.so"
    if not lib.exists():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(SOURCE)
                subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
                os.replace(out, lib)  # atomic: a reader sees no library or the whole one
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError:
        return None
    i64, u64, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    dll.softmax_bf16.argtypes = [ptr, i64, i64, ptr]
    for width in (16, 32, 64):
        getattr(dll, f"keep_words{width}").argtypes = [ptr, i64, u64, u64]
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
    """Softmax over the last dim of ``w`` in place; returns ``w``. The C kernel for a contiguous
    bf16 CPU tensor outside autograd, ``torch.softmax(w, -1, out=w)`` otherwise."""
    if (w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous() or w.requires_grad
            or w.numel() == 0 or library() is None):
        return torch.softmax(w, -1, out=w)
    cols = w.shape[-1]
    buf = torch.empty(cols, dtype=torch.float32)
    _LIB[0].softmax_bf16(w.data_ptr(), w.numel() // cols, cols, buf.data_ptr())
    return w


def keep_mask(numel: int, itemsize: int, k: int, device: torch.device | str = "cpu") -> Tensor | None:
    """``(numel,)`` integer mask of ``itemsize`` bytes per element: all ones where kept, 0 where
    dropped, ``P(0) = k / 2^15``; None when the kernel does not apply (not CPU, no library)."""
    if torch.device(device).type != "cpu" or itemsize not in (2, 4, 8) or library() is None:
        return None
    words = torch.empty(-(-numel * itemsize // 8), dtype=torch.int64)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # [0, 2^63): one draw of the default generator
    getattr(_LIB[0], f"keep_words{8 * itemsize}")(words.data_ptr(), words.numel(), seed, k)
    return words.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize])[:numel]
