/* GroupNorm modulated as in MoVQ's SpatialNorm, followed by SiLU, for channels-last bf16 CPU maps.

   Follows: GroupNorm (Wu & He, "Group Normalization", 2018; torch.nn.GroupNorm: biased variance, eps inside the
   square root, per-channel affine), MoVQ's spatially conditioned norm (Zheng et al., "MoVQ: Modulating Quantized
   Vectors for High-Fidelity Image Generation", 2022: GroupNorm(x) * conv_y(zq) + conv_b(zq), zq resized nearest)
   and SiLU (x * sigmoid(x)). What differs from PyTorch's operators: one pass for normalisation, modulation and
   SiLU, float32 arithmetic with a single rounding to bf16, shifted sums for the statistics, and the exp and the
   reciprocal below.

   The fast path's decoder spends about a fifth of its time in three memory- and exp-bound PyTorch operators per norm
   (native_group_norm, addcmul, silu_). These kernels do the same work in two passes over the map: one reads it for
   per-channel sums, one writes silu(modulated GroupNorm). Compiled on first use by dualvitok/_native/__init__.py
   (-O3 -march=native, no -ffast-math: the library must not change the process's floating-point state) and called
   through ctypes, one call per thread and row range, so the caller splits the work over its threads. With AVX-512
   the two loops are written with 16-lane intrinsics (the compiler's own vectorisation of the exp and the division
   was 1.6x slower); elsewhere the portable C loops are vectorised by the compiler.

   Layout: a map is [rows, C] with rows = H * W in raster order (a channels_last [1, C, H, W] tensor). The modulation
   maps y and b are bf16 [h, w, C] and are upsampled (nearest, integer factors sh = H / h, sw = W / w) on the fly.

   Statistics are sums of (x - k_c) and (x - k_c)^2, with k_c the caller's estimate of channel c's mean (shifted
   sums: no cancellation when a channel's mean is large against its spread), in float over blocks of 256 rows and in
   double across blocks, in block order: the same values for any number of threads.
   SiLU uses its own exp so that the loop vectorises without fast-math: 2^t with t = -v log2(e) split into
   n = floor(t) and f in [0, 1), 2^f by a degree-5 polynomial (relative error below 1.5e-7), t clamped to [-64, 64]
   (for v < -44.4 the result is v * 2^-64, below 3e-18, instead of v * e^v); the division is a reciprocal refined by
   Newton steps. Non-finite inputs give unspecified outputs (PyTorch's operators would give NaN). */

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float exp_neg(float v) { /* e^-v */
    float t = -v * 1.4426950408889634f;
    t = t < -64.0f ? -64.0f : (t > 64.0f ? 64.0f : t);
    float n = floorf(t), f = t - n; /* f in [0, 1), where the polynomial is fitted */
    float p = 1.8775767e-3f;
    p = p * f + 8.9893397e-3f;
    p = p * f + 5.5826318e-2f;
    p = p * f + 2.4015361e-1f;
    p = p * f + 6.9315308e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* 1 / d for 1 <= d <= 2^64 + 1: the integer-subtraction guess of the well-known bit-level reciprocal
   approximation (magic constant 0x7EF311C3, relative error under 12.5%), refined by 3 Newton steps to float32 */
static inline float reciprocal(float d) {
    uint32_t u;
    memcpy(&u, &d, 4);
    u = 0x7EF311C3u - u;
    float r;
    memcpy(&r, &u, 4);
    r = r * (2.0f - d * r);
    r = r * (2.0f - d * r);
    r = r * (2.0f - d * r);
    return r;
}

static inline float silu(float v) { return v * reciprocal(1.0f + exp_neg(v)); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DVT_AVX512 1

/* silu() on 16 lanes: the same exp polynomial, scalef for 2^n, and rcp14 with one Newton step for the reciprocal
   (so the scalar tail channels can differ from these in the last float32 bit) */
static inline __m512 silu16(__m512 v) {
    __m512 t = _mm512_mul_ps(v, _mm512_set1_ps(-1.4426950408889634f));
    t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(64.0f)), _mm512_set1_ps(-64.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.8775767e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9893397e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5826318e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015361e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315308e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f))); /* one Newton step: about 2^-28 */
    return _mm512_mul_ps(v, r);
}

static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store16_bf16(uint16_t *p, __m512 v) { /* round to nearest even, as f32_to_bf16 */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#endif

/* Shifted per-channel sums of the row blocks [block0, block1) (a block: DVT_BLOCK_ROWS rows; the last one may be
   shorter) of a map of `rows` rows: out[j][c] = sum (x - k_c), out[j][C + c] = sum (x - k_c)^2 over block j, with
   k_c = shift_k[c]; out is [blocks, 2 * C] floats. Per-block results make the statistics independent of how the
   caller splits the blocks over its threads. */
#define DVT_BLOCK_ROWS 256

#ifdef DVT_AVX512
void dvt_channel_sums_bf16(const uint16_t *x, const float *shift_k, int64_t C, int64_t rows, int64_t block0,
                           int64_t block1, float *out) {
    int64_t vec = C - C % 64;
    for (int64_t j = block0; j < block1; j++) {
        int64_t r = j * DVT_BLOCK_ROWS, end = r + DVT_BLOCK_ROWS < rows ? r + DVT_BLOCK_ROWS : rows;
        float *sum = out + j * 2 * C, *sumsq = sum + C;
        for (int64_t c0 = 0; c0 < vec; c0 += 64) { /* blocks of 64 channels, the accumulators in registers */
            __m512 k[4], s[4], q[4];
            for (int v = 0; v < 4; v++) {
                k[v] = _mm512_loadu_ps(shift_k + c0 + 16 * v);
                s[v] = _mm512_setzero_ps();
                q[v] = _mm512_setzero_ps();
            }
            for (int64_t i = r; i < end; i++) {
                const uint16_t *row = x + i * C + c0;
                for (int v = 0; v < 4; v++) {
                    __m512 d = _mm512_sub_ps(load16_bf16(row + 16 * v), k[v]);
                    s[v] = _mm512_add_ps(s[v], d);
                    q[v] = _mm512_fmadd_ps(d, d, q[v]);
                }
            }
            for (int v = 0; v < 4; v++) {
                _mm512_storeu_ps(sum + c0 + 16 * v, s[v]);
                _mm512_storeu_ps(sumsq + c0 + 16 * v, q[v]);
            }
        }
        for (int64_t c = vec; c < C; c++) { /* the remaining channels, one at a time */
            float k = shift_k[c], s = 0.0f, q = 0.0f;
            for (int64_t i = r; i < end; i++) {
                float d = bf16_to_f32(x[i * C + c]) - k;
                s += d;
                q += d * d;
            }
            sum[c] = s;
            sumsq[c] = q;
        }
    }
}
#else
void dvt_channel_sums_bf16(const uint16_t *x, const float *shift_k, int64_t C, int64_t rows, int64_t block0,
                           int64_t block1, float *out) {
    for (int64_t j = block0; j < block1; j++) {
        int64_t r = j * DVT_BLOCK_ROWS, end = r + DVT_BLOCK_ROWS < rows ? r + DVT_BLOCK_ROWS : rows;
        float *sum = out + j * 2 * C, *sumsq = sum + C;
        for (int64_t c = 0; c < C; c++) { sum[c] = 0.0f; sumsq[c] = 0.0f; }
        for (int64_t i = r; i < end; i++) {
            const uint16_t *row = x + i * C;
            for (int64_t c = 0; c < C; c++) {
                float d = bf16_to_f32(row[c]) - shift_k[c];
                sum[c] += d;
                sumsq[c] += d * d;
            }
        }
    }
}
#endif

/* GroupNorm's per-channel affine from the blocks' sums (added in double, in block order): normalised x is
   x * scale[c] + shift[c]. sums: [blocks, 2 * C] floats from dvt_channel_sums_bf16; k: the same shift_k;
   gamma, beta: float [C]. */
void dvt_group_affine(const float *sums, int64_t blocks, const float *k, int64_t C, int64_t groups, int64_t rows,
                      double eps, const float *gamma, const float *beta, float *scale, float *shift) {
    int64_t per = C / groups;
    double n = (double)rows * (double)per;
    for (int64_t g = 0; g < groups; g++) {
        double total = 0.0;
        for (int64_t c = g * per; c < (g + 1) * per; c++) {
            double s = 0.0;
            for (int64_t j = 0; j < blocks; j++) s += sums[j * 2 * C + c];
            total += s + (double)rows * k[c];
        }
        double mean = total / n, sq = 0.0;
        for (int64_t c = g * per; c < (g + 1) * per; c++) {
            double s = 0.0, q = 0.0, delta = (double)k[c] - mean;
            for (int64_t j = 0; j < blocks; j++) {
                s += sums[j * 2 * C + c];
                q += sums[j * 2 * C + C + c];
            }
            sq += q + 2.0 * delta * s + (double)rows * delta * delta; /* sum over rows of (x - mean)^2 */
        }
        double var = sq / n;
        double rstd = 1.0 / sqrt((var > 0.0 ? var : 0.0) + eps);
        for (int64_t c = g * per; c < (g + 1) * per; c++) {
            scale[c] = (float)(rstd * gamma[c]);
            shift[c] = (float)(beta[c] - mean * rstd * gamma[c]);
        }
    }
}

/* out = silu(n * y + b) with n = x * scale + shift, for map rows hh in [h0, h1) of an H x W map; y, b: bf16
   [h, w, C] (the channels_last outputs of the modulation's 1x1 convolutions), read at cell (hh / sh, ww / sw). */
void dvt_norm_silu_bf16_bf16(const uint16_t *x, uint16_t *out, const float *scale, const float *shift,
                             const uint16_t *y, const uint16_t *b, int64_t C, int64_t W, int64_t h0, int64_t h1,
                             int64_t sh, int64_t sw, int64_t w) {
#ifdef DVT_AVX512
    int64_t vec = C - C % 16; /* 16-lane loop (the compiler's own vectorisation of exp and division was 1.6x slower) */
#else
    int64_t vec = 0; /* the portable loop below, vectorised by the compiler */
#endif
    for (int64_t hh = h0; hh < h1; hh++) {
        for (int64_t ww = 0; ww < W; ww++) {
            const uint16_t *xr = x + (hh * W + ww) * C;
            uint16_t *o = out + (hh * W + ww) * C;
            const uint16_t *yr = y + ((hh / sh) * w + ww / sw) * C, *br = b + ((hh / sh) * w + ww / sw) * C;
#ifdef DVT_AVX512
            for (int64_t c = 0; c < vec; c += 16) {
                __m512 n = _mm512_fmadd_ps(load16_bf16(xr + c), _mm512_loadu_ps(scale + c), _mm512_loadu_ps(shift + c));
                store16_bf16(o + c, silu16(_mm512_fmadd_ps(n, load16_bf16(yr + c), load16_bf16(br + c))));
            }
#endif
            for (int64_t c = vec; c < C; c++)
                o[c] = f32_to_bf16(silu((bf16_to_f32(xr[c]) * scale[c] + shift[c]) * bf16_to_f32(yr[c]) +
                                        bf16_to_f32(br[c])));
        }
    }
}
