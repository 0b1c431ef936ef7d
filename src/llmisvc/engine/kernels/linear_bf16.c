/* Small-batch bfloat16 linear layer for x86-64 CPUs with AVX512-BF16.
 *
 * out[i, r] = bias[r] + sum_c x[i, c] * w[r, c], accumulated in float32 and rounded to
 * bfloat16 (round to nearest even) once per output.
 *
 * The weight is pre-packed as [ceil(rows / 16)][cols / 2][16][2]: one 64-byte vector
 * contains columns (c, c + 1) of 16 consecutive rows, which is the operand layout of
 * VDPBF16PS. A block of 16 rows is then one sequential read. On a 2-core AMD EPYC a
 * one-row pass over all SmolLM2-135M weights took 12.2 ms here and 22.1 ms with oneDNN's
 * packed kernel (the `linear kernels` line of the engine's load log). Rows past `rows`
 * in the last block are zero and never stored. `cols` must be even.
 */
#include <immintrin.h>
#include <stdint.h>

#define TILE 8

/* Multiply one 16-row block by `m` (1..TILE) rows of x and store the m x 16 results. */
static inline __attribute__((always_inline)) void tile_block(
    const uint16_t *block, const uint32_t *x_pairs, int64_t pairs, int m, __m512 bias,
    __mmask16 keep, uint16_t *out, int64_t out_stride) {
    /* Two accumulators per row over even and odd column pairs, so even a single row has
       two independent VDPBF16PS dependency chains. */
    __m512 acc[TILE][2];
    for (int i = 0; i < m; i++) {
        acc[i][0] = bias;
        acc[i][1] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 2 <= pairs; k += 2) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(block + k * 32);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(block + (k + 1) * 32);
        for (int i = 0; i < m; i++) {
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, (__m512bh)_mm512_set1_epi32(x_pairs[i * pairs + k]));
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, (__m512bh)_mm512_set1_epi32(x_pairs[i * pairs + k + 1]));
        }
    }
    if (k < pairs) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(block + k * 32);
        for (int i = 0; i < m; i++)
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, (__m512bh)_mm512_set1_epi32(x_pairs[i * pairs + k]));
    }
    for (int i = 0; i < m; i++) {
        __m256bh rounded = _mm512_cvtneps_pbh(_mm512_add_ps(acc[i][0], acc[i][1]));
        _mm256_mask_storeu_epi16(out + i * out_stride, keep, (__m256i)rounded);
    }
}

/* x: [m, cols] and out: [m, rows], both contiguous. bias may be NULL. */
void llmisvc_linear_bf16(const uint16_t *packed, const uint16_t *bias, const uint16_t *x, uint16_t *out,
                         int64_t m, int64_t rows, int64_t cols, int threads) {
    int64_t pairs = cols / 2;
    int64_t blocks = (rows + 15) / 16;
#pragma omp parallel for schedule(static) if (threads > 1) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t *block = packed + b * pairs * 32;
        int64_t valid = rows - b * 16 < 16 ? rows - b * 16 : 16;
        __mmask16 keep = (__mmask16)((1u << valid) - 1);
        __m512 bias_f32 = _mm512_setzero_ps();
        if (bias) {
            /* bfloat16 to float32 is a 16-bit left shift of the bits. */
            __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, bias + b * 16));
            bias_f32 = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
        }
        for (int64_t i = 0; i < m; i += TILE) {
            int count = m - i < TILE ? (int)(m - i) : TILE;
            const uint32_t *x_pairs = (const uint32_t *)(x + i * cols);
            uint16_t *tile_out = out + i * rows + b * 16;
            /* A literal row count lets the compiler unroll the row loops and keep the
               accumulators in registers. */
            switch (count) {
            case 1: tile_block(block, x_pairs, pairs, 1, bias_f32, keep, tile_out, rows); break;
            case 2: tile_block(block, x_pairs, pairs, 2, bias_f32, keep, tile_out, rows); break;
            case 3: tile_block(block, x_pairs, pairs, 3, bias_f32, keep, tile_out, rows); break;
            case 4: tile_block(block, x_pairs, pairs, 4, bias_f32, keep, tile_out, rows); break;
            case 5: tile_block(block, x_pairs, pairs, 5, bias_f32, keep, tile_out, rows); break;
            case 6: tile_block(block, x_pairs, pairs, 6, bias_f32, keep, tile_out, rows); break;
            case 7: tile_block(block, x_pairs, pairs, 7, bias_f32, keep, tile_out, rows); break;
            default: tile_block(block, x_pairs, pairs, 8, bias_f32, keep, tile_out, rows); break;
            }
        }
    }
}
