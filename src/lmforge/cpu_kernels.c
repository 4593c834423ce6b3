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

void quant_rows_f32(const float *x, int64_t rows, int64_t cols, int8_t *q, float *scale, int64_t nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * cols >= 65536)
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
                   int64_t act, int64_t nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * cols >= 65536)
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
/* rows m0..m0+MM-1 (MM <= 4, a constant at each call: the 4 x MM accumulators stay in registers) times 4 weight
   rows (cols of them real; the others repeat row n), written with the bias */
static inline __attribute__((always_inline)) void bf16w_tile(const float *x, int64_t m0, int64_t K,
        const uint16_t *w0, const uint16_t *w1, const uint16_t *w2, const uint16_t *w3, int64_t n, int64_t cols,
        const float *b, float *y, int64_t ldy, const int MM) {
    __m512 acc[4][4];
    for (int i = 0; i < MM; i++) for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
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
        for (int i = 0; i < MM; i++) {
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
        for (int i = 0; i < MM; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(km, x + (m0 + i) * K + k);
            acc[i][0] = _mm512_fmadd_ps(a0, xv, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a1, xv, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(a2, xv, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(a3, xv, acc[i][3]);
        }
    }
    for (int i = 0; i < MM; i++)
        for (int64_t j = 0; j < cols; j++)
            y[(m0 + i) * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]) + (b ? b[n + j] : 0.0f);
}
static void bf16w_cols(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t n, int64_t cols,
                       const float *b, float *y, int64_t ldy) {
    const uint16_t *w0 = w + n * K, *w1 = w0 + (cols > 1) * K, *w2 = w0 + (cols > 2) * 2 * K, *w3 = w0 + (cols > 3) * 3 * K;
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) bf16w_tile(x, m0, K, w0, w1, w2, w3, n, cols, b, y, ldy, 4);
    switch (M - m0) {
        case 3: bf16w_tile(x, m0, K, w0, w1, w2, w3, n, cols, b, y, ldy, 3); break;
        case 2: bf16w_tile(x, m0, K, w0, w1, w2, w3, n, cols, b, y, ldy, 2); break;
        case 1: bf16w_tile(x, m0, K, w0, w1, w2, w3, n, cols, b, y, ldy, 1); break;
        default: break;
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
