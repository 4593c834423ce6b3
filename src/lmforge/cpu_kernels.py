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
#include <limits.h>
#include <math.h>

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* 2^t for t <= 0 (0 below -126): t = n + f, 2^f by a degree-5 polynomial, 2^n added to the exponent bits */
static inline float exp2_neg(float t) {
    int keep = t >= -126.0f;
    t = t > -126.0f ? t : -126.0f;
    float n = __builtin_floorf(t + 0.5f);
    float f = t - n;
    float p = 1.0f + f * (0.6931472f + f * (0.24022211f + f * (0.055503406f
              + f * (0.009670768f + f * 0.0013395286f))));
    float e = bits_f32(f32_bits(p) + ((uint32_t)((int32_t)n + 127) << 23) - (127u << 23));
    return keep ? e : 0.0f;
}

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
            float e = exp2_neg((bits_f32((uint32_t)row[j] << 16) - m) * log2e);
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

/* per-row symmetric int8 of one row: s = max_j |x_j| * (1 / 127), q_j = rint(x_j * (127 / max_j |x_j|)) */
static inline void quant_row(const float *row, int64_t cols, int8_t *out, float *scale) {
    uint32_t mb = 0;  /* max |x| on the bits: non-negative floats order as their integer bits (vectorises) */
    for (int64_t j = 0; j < cols; j++) {
        uint32_t b = f32_bits(row[j]) & 0x7FFFFFFFu;
        mb = b > mb ? b : mb;
    }
    float m = bits_f32(mb);
    /* one IEEE division per row, kept whole (volatile: fast-math may neither approximate it nor
       fold it into the loop's products), so the codes equal the torch fallback's */
    volatile float inv_row = m > 0.0f ? 127.0f / m : 0.0f;
    const float inv = inv_row;
    *scale = m * (1.0f / 127.0f);
    for (int64_t j = 0; j < cols; j++)
        out[j] = (int8_t)__builtin_rintf(row[j] * inv);
}

void quant_rows_f32(const float *x, int64_t rows, int64_t cols, int8_t *q, float *scale) {
    for (int64_t r = 0; r < rows; r++)
        quant_row(x + r * cols, cols, q + r * cols, scale + r);
}

/* GELU(y) = y (1 + erf(y / sqrt 2)) / 2, erf by Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7) */
static inline float gelu_erf(float y) {
    float z = y * 0.70710678f, a = __builtin_fabsf(z);
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    float erf_a = 1.0f - poly * exp2_neg(-a * a * 1.4426950408889634f);
    float erf_z = z < 0.0f ? -erf_a : erf_a;
    return 0.5f * y * (1.0f + erf_z);
}

/* one row of act(acc_m * (a * w_m) + b_m) (act 0: none, 1: GELU (erf), 2: ReLU); ``out`` may be ``in``'s
   bytes; one simple loop per activation, each vectorises */
static inline void dequant_row(const int32_t *in, float *out, int64_t cols, float a, const float *sw, const float *b,
                               int64_t act) {
    if (act == 1)
        for (int64_t m = 0; m < cols; m++) out[m] = gelu_erf((float)in[m] * (a * sw[m]) + b[m]);
    else if (act == 2)
        for (int64_t m = 0; m < cols; m++) { float v = (float)in[m] * (a * sw[m]) + b[m]; out[m] = v > 0.0f ? v : 0.0f; }
    else
        for (int64_t m = 0; m < cols; m++) out[m] = (float)in[m] * (a * sw[m]) + b[m];
}

/* y_rm = act(acc_rm * (s_r * w_m) + b_m), in place over the int32 accumulator (fp32 out, same bytes) */
void dequant_rows_(int32_t *acc, int64_t rows, int64_t cols, const float *sx, const float *sw, const float *b,
                   int64_t act) {
    for (int64_t r = 0; r < rows; r++)
        dequant_row(acc + r * cols, (float *)acc + r * cols, cols, sx[r], sw, b, act);
}

/* q_r = int8 codes of act(acc_r * (s_r * w) + b) (per-row symmetric, as quant_rows_f32), written
   over the accumulator's first R * M bytes (row r's codes end before row r's int32 data begins for
   r >= 1; row 0 goes through buf), scale[r] its scale: the FFN's up projection's output becomes the
   down projection's input without an fp32 (R, M) round trip */
void dequant_quant_rows_(int32_t *acc, int64_t rows, int64_t cols, const float *sx, const float *sw, const float *b,
                         int64_t act, float *scale, float *buf) {
    for (int64_t r = 0; r < rows; r++) {
        dequant_row(acc + r * cols, buf, cols, sx[r], sw, b, act);
        quant_row(buf, cols, (int8_t *)acc + r * cols, scale + r);
    }
}

/* fp32 row softmax in place (rows ``stride`` apart): max on sortable integer keys of the bits,
   exp(x - max) = 2^t as exp2_neg, summed in fp32, times 1 / sum */
static void softmax_rows_f32(float *a, int64_t rows, int64_t cols, int64_t stride) {
    const float log2e = 1.4426950408889634f;
    for (int64_t r = 0; r < rows; r++) {
        float *row = a + r * stride;
        int32_t key = INT32_MIN;
        for (int64_t j = 0; j < cols; j++) {
            int32_t b = (int32_t)f32_bits(row[j]);
            int32_t kb = b ^ ((b >> 31) & 0x7FFFFFFF);
            key = kb > key ? kb : key;
        }
        float m = bits_f32((uint32_t)(key ^ ((key >> 31) & 0x7FFFFFFF)));
        float s = 0.0f;
        for (int64_t j = 0; j < cols; j++) {
            float e = exp2_neg((row[j] - m) * log2e);
            row[j] = e;
            s += e;
        }
        float inv = 1.0f / s;
        for (int64_t j = 0; j < cols; j++) row[j] *= inv;
    }
}

void softmax_f32(float *a, int64_t rows, int64_t cols) { softmax_rows_f32(a, rows, cols, cols); }

/* y (M, N; rows ldy apart) = x (M, K) W^T + b for bf16 weights W (N, K) and fp32 x, y: the weights are
   read once per 4 output columns (as bf16: half the bytes of fp32), widened to fp32 exactly (a 16-bit
   shift) and multiplied in fp32 with fp32 sums. Output columns split over ``nt`` OpenMP threads. */
#ifdef __AVX512F__
#include <immintrin.h>
static inline __m512 bf16_widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 bf16_widen_tail(const uint16_t *p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
/* 4 columns n..n+3 (cols of them real; the others repeat column n) for rows m0..m0+mm-1 (mm <= 4) */
static inline void bf16w_tile(const float *x, int64_t m0, int64_t mm, int64_t K, const uint16_t *w0,
                              const uint16_t *w1, const uint16_t *w2, const uint16_t *w3, __m512 acc[4][4]) {
    for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        if (m0 == 0 && (k & 31) == 0) {  /* the first pass over these rows streams them from memory: 512 bytes
                                            ahead in each of the 4 row streams (22.4 vs 26.8 ms per SmolLM2 token) */
            _mm_prefetch((const char *)(w0 + k) + 512, _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + k) + 512, _MM_HINT_T0);
            _mm_prefetch((const char *)(w2 + k) + 512, _MM_HINT_T0);
            _mm_prefetch((const char *)(w3 + k) + 512, _MM_HINT_T0);
        }
        __m512 a0 = bf16_widen(w0 + k), a1 = bf16_widen(w1 + k), a2 = bf16_widen(w2 + k), a3 = bf16_widen(w3 + k);
        for (int64_t i = 0; i < mm; i++) {
            __m512 xv = _mm512_loadu_ps(x + (m0 + i) * K + k);
            acc[i][0] = _mm512_fmadd_ps(a0, xv, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a1, xv, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(a2, xv, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(a3, xv, acc[i][3]);
        }
    }
    if (k < K) {
        __mmask16 km = (__mmask16)((1u << (K - k)) - 1u);
        __m512 a0 = bf16_widen_tail(w0 + k, km), a1 = bf16_widen_tail(w1 + k, km);
        __m512 a2 = bf16_widen_tail(w2 + k, km), a3 = bf16_widen_tail(w3 + k, km);
        for (int64_t i = 0; i < mm; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(km, x + (m0 + i) * K + k);
            acc[i][0] = _mm512_fmadd_ps(a0, xv, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a1, xv, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(a2, xv, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(a3, xv, acc[i][3]);
        }
    }
}
static void bf16w_cols(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t n, int64_t cols,
                       const float *b, float *y, int64_t ldy) {
    const uint16_t *w0 = w + n * K, *w1 = w0 + (cols > 1) * K, *w2 = w0 + (cols > 2) * 2 * K, *w3 = w0 + (cols > 3) * 3 * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int64_t mm = M - m0 < 4 ? M - m0 : 4;
        __m512 acc[4][4];
        bf16w_tile(x, m0, mm, K, w0, w1, w2, w3, acc);
        for (int64_t i = 0; i < mm; i++)
            for (int64_t j = 0; j < cols; j++)
                y[(m0 + i) * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]) + (b ? b[n + j] : 0.0f);
    }
}
#else
static void bf16w_cols(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t n, int64_t cols,
                       const float *b, float *y, int64_t ldy) {
    for (int64_t j = 0; j < cols; j++) {
        const uint16_t *wr = w + (n + j) * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += bits_f32((uint32_t)wr[k] << 16) * xr[k];
            y[m * ldy + n + j] = s + (b ? b[n + j] : 0.0f);
        }
    }
}
#endif

/* y_r = w * (x_r / sqrt(mean_j x_rj^2 + eps)) for fp32 rows (LlamaRMSNorm in fp32: one pass for the sum
   of squares, one for the product) */
void rms_norm_f32(const float *x, int64_t rows, int64_t cols, const float *w, float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        float ss = 0.0f;
        for (int64_t j = 0; j < cols; j++) ss += xr[j] * xr[j];
        float inv = 1.0f / sqrtf(ss / (float)cols + eps);
        for (int64_t j = 0; j < cols; j++) yr[j] = w[j] * (xr[j] * inv);
    }
}

/* out = silu(y[:, :I]) * y[:, I:] for fp32 rows of 2I (a Llama MLP's gate/up output), silu(g) = g sigmoid(g),
   sigmoid by exp(-|g|) (exp2_neg: no overflow on either side) */
void silu_mul_f32(const float *y, int64_t rows, int64_t inter, float *out) {
    const float log2e = 1.4426950408889634f;
    for (int64_t r = 0; r < rows; r++) {
        const float *g = y + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
        for (int64_t j = 0; j < inter; j++) {
            float a = g[j], e = exp2_neg(-(a > 0.0f ? a : -a) * log2e);
            float sig = a >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            o[j] = a * sig * u[j];
        }
    }
}

/* One decode step's attention for fp32 rows (kv_cache.LlamaDecoder.step): y (B, (Hq + 2 Hkv) D) holds the
   projected q, k, v heads; q and k get the rotary embedding in place (x cos + rotate_half(x) sin, cos/sin
   (B, D)); k and v go to column t of the caches kc, vc (B, Hkv, tmax, D); query head h = j G + i (G = Hq / Hkv)
   attends over columns 0..t of key/value head j with the additive mask bias (B, tmax) (-inf on padding):
   out (B, Hq D) = softmax(scale q K^T + bias) V, the softmax in fp32 (max, exp2_neg, sum, divide); buf >= t + 1 */
void decode_attend_f32(float *y, int64_t B, int64_t hq, int64_t hkv, int64_t D, const float *cos_, const float *sin_,
                       float *kc, float *vc, int64_t tmax, int64_t t, const float *bias, float scale, float *out,
                       float *buf) {
    const float log2e = 1.4426950408889634f;
    int64_t half = D / 2, width = (hq + 2 * hkv) * D, G = hq / hkv;
    for (int64_t b = 0; b < B; b++) {
        float *yb = y + b * width;
        const float *c = cos_ + b * D, *sn = sin_ + b * D;
        for (int64_t h = 0; h < hq + hkv; h++) {
            float *x = yb + h * D;
            for (int64_t i = 0; i < half; i++) {
                float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] - x2 * sn[i];
                x[i + half] = x2 * c[i + half] + x1 * sn[i + half];
            }
        }
        for (int64_t j = 0; j < hkv; j++) {
            memcpy(kc + ((b * hkv + j) * tmax + t) * D, yb + (hq + j) * D, (size_t)D * sizeof(float));
            memcpy(vc + ((b * hkv + j) * tmax + t) * D, yb + (hq + hkv + j) * D, (size_t)D * sizeof(float));
        }
        const float *bb = bias + b * tmax;
        for (int64_t h = 0; h < hq; h++) {
            int64_t j = h / G;
            const float *q = yb + h * D, *K = kc + (b * hkv + j) * tmax * D, *V = vc + (b * hkv + j) * tmax * D;
            float m = -INFINITY;
            for (int64_t s = 0; s <= t; s++) {
                float acc = 0.0f;
                for (int64_t i = 0; i < D; i++) acc += q[i] * K[s * D + i];
                buf[s] = acc * scale + bb[s];
                m = buf[s] > m ? buf[s] : m;
            }
            float sum = 0.0f;
            for (int64_t s = 0; s <= t; s++) { buf[s] = exp2_neg((buf[s] - m) * log2e); sum += buf[s]; }
            float inv = 1.0f / sum, *o = out + b * hq * D + h * D;
            for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
            for (int64_t s = 0; s <= t; s++) {
                float w = buf[s] * inv;
                for (int64_t i = 0; i < D; i++) o[i] += w * V[s * D + i];
            }
        }
    }
}

void linear_bf16w(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *b, float *y,
                  int64_t ldy, int64_t nt) {
    int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t i = 0; i < blocks; i++) {
        int64_t n = 4 * i;
        bf16w_cols(x, M, K, w, n, N - n < 4 ? N - n : 4, b, y, ldy);
    }
}

/* a key-padded attention group: ``mats`` (m, cols) score matrices, matrix i's rows softmaxed over
   its first len[i] columns (its real keys), the other columns set to 0 */
void softmax_keys_f32(float *a, int64_t mats, int64_t m, int64_t cols, const int32_t *len) {
    for (int64_t i = 0; i < mats; i++) {
        float *w = a + i * m * cols;
        int64_t n = len[i];
        softmax_rows_f32(w, m, n, cols);
        if (n < cols)
            for (int64_t r = 0; r < m; r++) memset(w + r * cols + n, 0, (size_t)(cols - n) * sizeof(float));
    }
}
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
    dll.quant_rows_f32.argtypes = [ptr, i64, i64, ptr, ptr]
    dll.dequant_rows_.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64]
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
        _LIB[0].quant_rows_f32(x.data_ptr(), rows, cols, q.data_ptr(), s.data_ptr())
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
                              bias.data_ptr(), DEQUANT_ACTS[act])
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
