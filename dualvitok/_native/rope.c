/* 2D rotary position embedding of the Qwen2-VL vision tower on bf16 queries and keys, in one pass.

   Follows RoFormer (Su et al., 2021) as Qwen2-VL's vision tower applies it (Wang et al., 2024, arXiv 2409.12191;
   apply_rotary_pos_emb_vision in transformers' modeling_qwen2_vl.py): each head of size d is split in halves
   x1 = x[:d/2], x2 = x[d/2:] and rotated as [x1 c1 - x2 s1, x2 c2 + x1 s2] in float32, with (c, s) the cosines
   and sines of the token's angles tiled to d. What differs from PyTorch's operators (dualvitok/blocks/rope.py's
   apply_rotary): one pass that reads the bf16 heads straight from the fused qkv projection's output and writes the
   rotated bf16 queries and keys, instead of a float32 copy, three products, a subtraction, an addition and a copy
   back. The arithmetic is the same: each product is rounded to float32, then the sum or difference, then the result
   to bf16 (round to nearest even, subnormals kept), so finite values are PyTorch's bit for bit; a NaN stays a NaN
   (0x7FC0 here, where PyTorch's vectorised conversion writes 0xFFFF). No fused multiply-add: the library is built
   with -std=c11 (GCC contracts nothing there) and the pragma below asks the same of other compilers; and without
   -ffinite-math-only and -fno-signed-zeros (dualvitok/_native/__init__.py's VALUE_EXACT), so the compiler keeps
   signed zeros and non-finite values as IEEE arithmetic gives them. Subnormals are kept whatever
   torch.set_flush_denormal says (the pool's threads have their own floating-point state): with flushing on, values
   within 2^-126 of zero can differ from PyTorch's.

   Layout: a row is one token of one image; qkv holds, per row, 3 * heads * d bf16 values ([3, heads, d]: queries,
   keys, values) at a stride of in_stride elements; out holds per row the rotated [2, heads, d] (queries, keys) at
   a stride of out_stride. Row r is token r % tokens of its image, whose angles are the rows of cos and sin
   ([tokens, d] float32). Compiled on first use by dualvitok/_native/__init__.py and called through ctypes, one call
   per thread and row range, so the caller splits the rows over its threads. */

#include <stdint.h>
#include <string.h>

#pragma STDC FP_CONTRACT OFF

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as c10::BFloat16 (NaN: 0x7FC0) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) /* NaN (an integer test) */
        return 0x7FC0u;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DVT_AVX512 1

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    __m256i v = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline void store_bf16(uint16_t *p, __m512 f, __mmask16 m) { /* f32_to_bf16 on 16 lanes */
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                            _mm512_set1_epi32(0x7F800000));
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
#endif

/* Rotate the queries and keys of rows [row_begin, row_end). d must be even. */
void dvt_rope_bf16(const uint16_t *qkv, uint16_t *out, const float *cos, const float *sin, int64_t row_begin,
                   int64_t row_end, int64_t tokens, int64_t in_stride, int64_t out_stride, int64_t heads, int64_t d) {
    int64_t half = d / 2;
    for (int64_t r = row_begin; r < row_end; ++r) {
        const float *c = cos + (r % tokens) * d, *s = sin + (r % tokens) * d;
        const uint16_t *src = qkv + r * in_stride; /* queries, then keys: the first 2 * heads heads of the row */
        uint16_t *dst = out + r * out_stride;
#ifdef DVT_AVX512
        for (int64_t i = 0; i < half; i += 16) { /* 16 lanes of every head, with this row's angles loaded once */
            __mmask16 m = half - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - i)) - 1u);
            __m512 c1 = _mm512_maskz_loadu_ps(m, c + i), s1 = _mm512_maskz_loadu_ps(m, s + i);
            __m512 c2 = _mm512_maskz_loadu_ps(m, c + half + i), s2 = _mm512_maskz_loadu_ps(m, s + half + i);
            for (int64_t h = 0; h < 2 * heads; ++h) {
                __m512 x1 = load_bf16(src + h * d + i, m), x2 = load_bf16(src + h * d + half + i, m);
                store_bf16(dst + h * d + i, _mm512_sub_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s1)), m);
                store_bf16(dst + h * d + half + i, _mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2)), m);
            }
        }
#else
        for (int64_t h = 0; h < 2 * heads; ++h) { /* the portable loop, vectorised by the compiler */
            const uint16_t *x = src + h * d;
            uint16_t *y = dst + h * d;
            for (int64_t i = 0; i < half; ++i) {
                float x1 = bf16_to_f32(x[i]), x2 = bf16_to_f32(x[i + half]);
                float a = x1 * c[i], b = x2 * s[i];
                float e = x2 * c[i + half], g = x1 * s[i + half];
                y[i] = f32_to_bf16(a - b);
                y[i + half] = f32_to_bf16(e + g);
            }
        }
#endif
    }
}
