/* Shared AVX512 helpers for the native kernels. */
#ifndef LLMISVC_VECTOR_MATH_H
#define LLMISVC_VECTOR_MATH_H

#include <immintrin.h>
#include <stdint.h>

/* 16 bfloat16 values to float32: bfloat16 is the upper half of a float32's bits. */
static inline __m512 bf16x16_to_f32(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* e^x for x <= 88 by a degree-6 Taylor polynomial on |r| <= ln(2) / 2, after x = n ln(2) + r.
   The native kernel tests check a relative error below 1e-6 on [-87, 0] against float64.
   Inputs below -87 return about 1e-38, not 0. */
static inline __m512 exp_f32x16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln(2) split in two so n * ln(2) is subtracted without rounding error. */
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Round 16 float32 values to bfloat16 (nearest even) and store the first `count`. */
static inline void store_bf16x16(uint16_t *dst, __m512 values, __mmask16 keep) {
    _mm256_mask_storeu_epi16(dst, keep, (__m256i)_mm512_cvtneps_pbh(values));
}

static inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}

#endif
