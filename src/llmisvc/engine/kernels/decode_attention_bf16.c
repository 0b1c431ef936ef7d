/* One-token decode attention over contiguous per-sequence KV slots, in bfloat16.
 *
 * The new key and value rows of each sequence b are written into its slot at
 * positions[b]. Then every query head attends over keys 0..positions[b] of its KV head.
 * With grouped-query attention, query head h reads KV head h / (heads / kv_heads). Scores,
 * softmax and the weighted sum of values are float32, and the output is rounded to
 * bfloat16 once. Only the valid positions are read, with no padding to the slot capacity.
 *
 * Layouts (strides in elements): q [count, heads, head_dim] with row stride q_stride;
 * new k and v [count, kv_heads, head_dim] with row strides k_stride and v_stride; slot
 * buffers [slots, kv_heads, capacity, head_dim] contiguous; out [count, heads * head_dim].
 * Queries are pre-scaled by 1 / sqrt(head_dim). Returns 0, or -1 when head_dim is not a
 * multiple of 32 up to 256, a KV head serves more than 16 query heads, or a scratch
 * allocation fails. The caller then falls back to its own attention.
 */
#include "vector_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16

int llmisvc_decode_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k, int64_t k_stride,
                                  const uint16_t *v, int64_t v_stride, uint16_t *key_buffer, uint16_t *value_buffer,
                                  int64_t capacity, const int64_t *slots, const int64_t *positions, uint16_t *out,
                                  int64_t count, int64_t heads, int64_t kv_heads, int64_t head_dim, int threads) {
    int64_t group = heads / kv_heads;
    if (head_dim % 32 || head_dim > MAX_HEAD_DIM || group > MAX_GROUP) return -1;
    int64_t head_stride = capacity * head_dim;
    int64_t slot_stride = kv_heads * head_stride;

    for (int64_t b = 0; b < count; b++)
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t row = slots[b] * slot_stride + h * head_stride + positions[b] * head_dim;
            memcpy(key_buffer + row, k + b * k_stride + h * head_dim, head_dim * sizeof(uint16_t));
            memcpy(value_buffer + row, v + b * v_stride + h * head_dim, head_dim * sizeof(uint16_t));
        }

    int failed = 0;
#pragma omp parallel for schedule(dynamic) if (threads > 1 && count * kv_heads > 1) num_threads(threads) reduction(|| : failed)
    for (int64_t task = 0; task < count * kv_heads; task++) {
        int64_t b = task / kv_heads, h = task % kv_heads;
        int64_t length = positions[b] + 1;
        const uint16_t *keys = key_buffer + slots[b] * slot_stride + h * head_stride;
        const uint16_t *values = value_buffer + slots[b] * slot_stride + h * head_stride;
        int64_t chunks = head_dim / 32;
        float *scores = malloc(sizeof(float) * group * length);
        if (!scores) {
            failed = 1;
            continue;
        }

        /* Scores: each key row is loaded once and dotted with the group's query heads. */
        __m512bh query[MAX_GROUP][MAX_HEAD_DIM / 32];
        for (int64_t g = 0; g < group; g++)
            for (int64_t c = 0; c < chunks; c++)
                query[g][c] = (__m512bh)_mm512_loadu_si512(q + b * q_stride + (h * group + g) * head_dim + c * 32);
        for (int64_t t = 0; t < length; t++) {
            __m512bh key[MAX_HEAD_DIM / 32];
            for (int64_t c = 0; c < chunks; c++) key[c] = (__m512bh)_mm512_loadu_si512(keys + t * head_dim + c * 32);
            for (int64_t g = 0; g < group; g++) {
                __m512 dot = _mm512_setzero_ps();
                for (int64_t c = 0; c < chunks; c++) dot = _mm512_dpbf16_ps(dot, query[g][c], key[c]);
                scores[g * length + t] = _mm512_reduce_add_ps(dot);
            }
        }

        for (int64_t g = 0; g < group; g++) {
            float *row = scores + g * length;
            __m512 maximum = _mm512_set1_ps(-INFINITY);
            for (int64_t t = 0; t < length; t += 16)
                maximum = _mm512_mask_max_ps(maximum, first_lanes(length - t), maximum, _mm512_maskz_loadu_ps(first_lanes(length - t), row + t));
            __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(maximum));
            __m512 total = _mm512_setzero_ps();
            for (int64_t t = 0; t < length; t += 16) {
                __mmask16 keep = first_lanes(length - t);
                __m512 e = _mm512_maskz_mov_ps(keep, exp_f32x16(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, row + t), peak)));
                _mm512_mask_storeu_ps(row + t, keep, e);
                total = _mm512_add_ps(total, e);
            }
            __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));

            /* Weighted sum of value rows, 16 features per accumulator. */
            __m512 acc[MAX_HEAD_DIM / 16];
            for (int64_t c = 0; c < head_dim / 16; c++) acc[c] = _mm512_setzero_ps();
            for (int64_t t = 0; t < length; t++) {
                __m512 weight = _mm512_set1_ps(row[t]);
                for (int64_t c = 0; c < head_dim / 16; c++)
                    acc[c] = _mm512_fmadd_ps(weight, bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)(values + t * head_dim + c * 16))), acc[c]);
            }
            uint16_t *target = out + b * heads * head_dim + (h * group + g) * head_dim;
            for (int64_t c = 0; c < head_dim / 16; c++)
                store_bf16x16(target + c * 16, _mm512_mul_ps(acc[c], inverse), 0xFFFF);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
