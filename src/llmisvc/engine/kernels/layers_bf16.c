/* Fused element-wise layers of a Llama block in bfloat16, computed in float32 and rounded
 * once. Rows are independent and split among threads. */
#include "vector_math.h"

#include <math.h>

/* If `delta` is not NULL, hidden += delta first, rounded to bfloat16 as PyTorch's add is.
 * Then normed = hidden / sqrt(mean(hidden^2) + eps) * weight. All arrays are [m, n]
 * contiguous except `weight` [n]. */
void llmisvc_add_rms_norm_bf16(uint16_t *hidden, const uint16_t *delta, const uint16_t *weight, uint16_t *normed,
                               int64_t m, int64_t n, float eps, int threads) {
#pragma omp parallel for schedule(static) if (threads > 1 && m > 1) num_threads(threads)
    for (int64_t i = 0; i < m; i++) {
        uint16_t *row = hidden + i * n;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 keep = first_lanes(n - j);
            __m512 x = bf16x16_to_f32(_mm256_maskz_loadu_epi16(keep, row + j));
            if (delta) {
                x = _mm512_add_ps(x, bf16x16_to_f32(_mm256_maskz_loadu_epi16(keep, delta + i * n + j)));
                store_bf16x16(row + j, x, keep);
                x = bf16x16_to_f32(_mm256_maskz_loadu_epi16(keep, row + j));
            }
            squares = _mm512_fmadd_ps(x, x, squares);
        }
        __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 keep = first_lanes(n - j);
            __m512 x = bf16x16_to_f32(_mm256_maskz_loadu_epi16(keep, row + j));
            __m512 w = bf16x16_to_f32(_mm256_maskz_loadu_epi16(keep, weight + j));
            store_bf16x16(normed + i * n + j, _mm512_mul_ps(_mm512_mul_ps(x, scale), w), keep);
        }
    }
}

/* out[i, j] = silu(gate_up[i, j]) * gate_up[i, n + j], with silu(g) = g / (1 + e^-g).
 * gate_up is [m, 2n] and out [m, n], both contiguous. */
void llmisvc_silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t m, int64_t n, int threads) {
#pragma omp parallel for schedule(static) if (threads > 1 && m > 1) num_threads(threads)
    for (int64_t i = 0; i < m; i++) {
        const uint16_t *gate = gate_up + i * 2 * n;
        const uint16_t *up = gate + n;
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 keep = first_lanes(n - j);
            __m512 g = bf16x16_to_f32(_mm256_maskz_loadu_epi16(keep, gate + j));
            __m512 u = bf16x16_to_f32(_mm256_maskz_loadu_epi16(keep, up + j));
            __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_f32x16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
            store_bf16x16(out + i * n + j, _mm512_mul_ps(_mm512_div_ps(g, denominator), u), keep);
        }
    }
}
