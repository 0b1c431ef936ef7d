/* Causal prefill attention of one sequence segment, bfloat16, for x86-64 CPUs with AVX512-BF16.
 *
 * out[t, h] = softmax_j(q[t, h] . k[h / group, j]) v[h / group, j] over keys j = 0 ..
 * start_pos + t, where q is already scaled by 1/sqrt(head_dim). It is computed
 * flash-attention style: keys in blocks of KEY_BLOCK, with a running max and sum per query
 * (online softmax in float32), so scores never exist for more than one block at a time.
 *
 * A task is one KV head and TOKEN_BLOCK consecutive query tokens of every query head that
 * shares it, so each K/V block read serves group * TOKEN_BLOCK query rows. Query rows are
 * the vector lanes: a "row vector" is 16 tokens of one query head. The softmax then runs
 * lane by lane across keys (max, exp and sum need no horizontal reductions). QK^T
 * broadcasts a (d, d + 1) pair of each key straight from the cache, so keys are never
 * repacked:
 *   scores[key][row]  += dot2(q_pairs[d / 2][row], broadcast k[key][d, d + 1])
 *   out_t[d][row]     += dot2(p_pairs[key / 2][row], broadcast (v[key][d], v[key + 1][d]))
 * where dot2 is VDPBF16PS. V is repacked per block into those key pairs, and P is rounded
 * to bfloat16 for the second product, as PyTorch's bfloat16 SDPA does. The output is
 * accumulated transposed ([d][row], float32) and transposed once when the task ends.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

#define KEY_BLOCK 64
#define TOKEN_BLOCK 16 /* query tokens per task, one per vector lane */
#define MAX_HEAD_DIM 256

#define ATTENTION_OK 0
#define ATTENTION_UNSUPPORTED_HEAD_DIM -1
#define ATTENTION_INVALID_SHAPE -2
#define ATTENTION_OUT_OF_MEMORY -3

/* exp_f32x16 over an array, exported for the tests, which check the softmax's exp accuracy. */
void llmisvc_exp_f32(const float *x, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, exp_f32x16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 keep = first_lanes(n - i);
        _mm512_mask_storeu_ps(out + i, keep, exp_f32x16(_mm512_maskz_loadu_ps(keep, x + i)));
    }
}

/* Per-thread buffers of one task. `rows` is the number of row vectors (query heads per KV head). */
typedef struct {
    int64_t rows;
    uint32_t *q_pairs; /* [head_dim / 2][rows][16] */
    float *scores;     /* [KEY_BLOCK][rows][16] */
    uint32_t *p_pairs; /* [KEY_BLOCK / 2][rows][16] */
    uint32_t *v_pairs; /* [KEY_BLOCK / 2][head_dim] */
    float *out_t;      /* [head_dim][rows][16] */
    float *max;        /* [rows][16] running max of the scores */
    float *sum;        /* [rows][16] running sum of exp(score - max) */
    float *rescale;    /* [rows][16] exp(old max - new max) of the current block */
    void *memory;
} Scratch;

static int scratch_init(Scratch *s, int64_t rows, int64_t dim) {
    size_t vector = 64;
    size_t sizes[8] = {
        dim / 2 * rows * vector, KEY_BLOCK * rows * vector, KEY_BLOCK / 2 * rows * vector,
        KEY_BLOCK / 2 * dim * 4, dim * rows * vector,       rows * vector,
        rows * vector,           rows * vector,
    };
    size_t total = 0;
    for (int i = 0; i < 8; i++)
        total += sizes[i];
    char *memory = aligned_alloc(64, total);
    if (!memory)
        return 0;
    s->rows = rows;
    s->memory = memory;
    void **parts[8] = {(void **)&s->q_pairs, (void **)&s->scores, (void **)&s->p_pairs, (void **)&s->v_pairs,
                       (void **)&s->out_t,   (void **)&s->max,    (void **)&s->sum,     (void **)&s->rescale};
    for (int i = 0; i < 8; i++) {
        *parts[i] = memory;
        memory += sizes[i];
    }
    return 1;
}

/* scores[key][row] for `r` row vectors (from the first one `q_pairs` points at) and `nk`
 * consecutive keys. `r` and `nk` are literals at every call, so the accumulators stay in
 * registers (at most 24 of the 32). */
static inline __attribute__((always_inline)) void score_tile(const uint32_t *q_pairs, const uint32_t *keys,
                                                             int64_t pairs, int64_t rows, int r, int nk,
                                                             float *scores) {
    __m512 acc[4][8];
    for (int i = 0; i < r; i++)
        for (int j = 0; j < nk; j++)
            acc[i][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < pairs; d++) {
        __m512bh q[4];
        for (int i = 0; i < r; i++)
            q[i] = (__m512bh)_mm512_loadu_si512(q_pairs + (d * rows + i) * 16);
        for (int j = 0; j < nk; j++) {
            __m512bh k = (__m512bh)_mm512_set1_epi32(keys[j * pairs + d]);
            for (int i = 0; i < r; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], q[i], k);
        }
    }
    for (int j = 0; j < nk; j++)
        for (int i = 0; i < r; i++)
            _mm512_storeu_ps(scores + (j * rows + i) * 16, acc[i][j]);
}

/* out_t[d][row] = out_t[d][row] * rescale[row] + P V for `r` row vectors and `nd`
 * consecutive dims, over `key_pairs` pairs of keys. Literal `r` and `nd`, as in score_tile. */
static inline __attribute__((always_inline)) void value_tile(const uint32_t *p_pairs, const uint32_t *v_pairs,
                                                             const float *rescale, int64_t key_pairs, int64_t dim,
                                                             int64_t rows, int r, int nd, float *out_t) {
    __m512 acc[4][8];
    for (int i = 0; i < r; i++) {
        __m512 factor = _mm512_loadu_ps(rescale + i * 16);
        for (int j = 0; j < nd; j++)
            acc[i][j] = _mm512_mul_ps(_mm512_loadu_ps(out_t + (j * rows + i) * 16), factor);
    }
    for (int64_t pair = 0; pair < key_pairs; pair++) {
        __m512bh p[4];
        for (int i = 0; i < r; i++)
            p[i] = (__m512bh)_mm512_loadu_si512(p_pairs + (pair * rows + i) * 16);
        for (int j = 0; j < nd; j++) {
            __m512bh v = (__m512bh)_mm512_set1_epi32(v_pairs[pair * dim + j]);
            for (int i = 0; i < r; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], p[i], v);
        }
    }
    for (int j = 0; j < nd; j++)
        for (int i = 0; i < r; i++)
            _mm512_storeu_ps(out_t + (j * rows + i) * 16, acc[i][j]);
}

/* Scores of `count` keys from `first` (a key index in the head) into s->scores. */
static void block_scores(const Scratch *s, const uint16_t *key_head, int64_t first, int64_t count, int64_t dim) {
    int64_t pairs = dim / 2, rows = s->rows;
    for (int64_t i = 0; i < rows; i += 4) {
        int r = rows - i < 4 ? (int)(rows - i) : 4;
        const uint32_t *q = s->q_pairs + i * 16;
        float *out = s->scores + i * 16;
        int64_t j = 0;
        /* Eight keys per tile for up to three row vectors (24 accumulators), four for four. */
        switch (r) {
        case 1:
            for (; j + 8 <= count; j += 8)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 1, 8, out + j * rows * 16);
            for (; j < count; j++)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 1, 1, out + j * rows * 16);
            break;
        case 2:
            for (; j + 8 <= count; j += 8)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 2, 8, out + j * rows * 16);
            for (; j < count; j++)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 2, 1, out + j * rows * 16);
            break;
        case 3:
            for (; j + 8 <= count; j += 8)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 3, 8, out + j * rows * 16);
            for (; j < count; j++)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 3, 1, out + j * rows * 16);
            break;
        default:
            for (; j + 4 <= count; j += 4)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 4, 4, out + j * rows * 16);
            for (; j < count; j++)
                score_tile(q, (const uint32_t *)(key_head + (first + j) * dim), pairs, rows, 4, 1, out + j * rows * 16);
            break;
        }
    }
}

/* Online-softmax step for one block of `count` keys from `first`: update the running max
 * and sum, store the rescale factor of the previous output and the block's probabilities
 * as bfloat16 key pairs. `masked` is nonzero when some key lies after some query's position. */
static void block_softmax(const Scratch *s, __m512i position, int64_t first, int64_t count, int masked) {
    /* Interleaves the low (even key) and high (odd key) halves of cvtne2ps_pbh's result. */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    int64_t rows = s->rows;
    for (int64_t i = 0; i < rows; i++) {
        __m512 old_max = _mm512_loadu_ps(s->max + i * 16);
        __m512 block_max = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < count; j++) {
            __m512 score = _mm512_loadu_ps(s->scores + (j * rows + i) * 16);
            __mmask16 valid = masked ? _mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(first + j)), position) : 0xFFFF;
            block_max = _mm512_mask_max_ps(block_max, valid, block_max, score);
        }
        /* Key 0 is valid for every query and lies in the first block, so the new max is
           finite. In the first block the old max is -inf, so the rescale factor is about
           1e-38 and multiplies a zero output and sum. */
        __m512 new_max = _mm512_max_ps(old_max, block_max);
        __m512 rescale = exp_f32x16(_mm512_sub_ps(old_max, new_max));

        __m512 block_sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < count; j += 2) {
            __m512 even = _mm512_loadu_ps(s->scores + (j * rows + i) * 16);
            __mmask16 even_valid = masked ? _mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(first + j)), position) : 0xFFFF;
            __m512 p_even = _mm512_maskz_mov_ps(even_valid, exp_f32x16(_mm512_sub_ps(even, new_max)));
            __m512 p_odd = _mm512_setzero_ps();
            if (j + 1 < count) {
                __m512 odd = _mm512_loadu_ps(s->scores + ((j + 1) * rows + i) * 16);
                __mmask16 odd_valid = masked ? _mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(first + j + 1)), position) : 0xFFFF;
                p_odd = _mm512_maskz_mov_ps(odd_valid, exp_f32x16(_mm512_sub_ps(odd, new_max)));
            }
            block_sum = _mm512_add_ps(block_sum, _mm512_add_ps(p_even, p_odd));
            __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(p_odd, p_even);
            _mm512_storeu_si512(s->p_pairs + (j / 2 * rows + i) * 16, _mm512_permutexvar_epi16(interleave, halves));
        }

        __m512 old_sum = _mm512_loadu_ps(s->sum + i * 16);
        _mm512_storeu_ps(s->sum + i * 16, _mm512_fmadd_ps(old_sum, rescale, block_sum));
        _mm512_storeu_ps(s->max + i * 16, new_max);
        _mm512_storeu_ps(s->rescale + i * 16, rescale);
    }
}

/* Pack V rows first .. first + count - 1 as key pairs: v_pairs[j][d] = (v[2j][d], v[2j + 1][d]).
 * An odd last key is paired with zeros, never with the (possibly unwritten) next row. */
static void pack_values(const Scratch *s, const uint16_t *value_head, int64_t first, int64_t count, int64_t dim) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                          22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    for (int64_t j = 0; j < count; j += 2) {
        const uint16_t *even = value_head + (first + j) * dim;
        uint32_t *packed = s->v_pairs + j / 2 * dim;
        for (int64_t d = 0; d < dim; d += 32) {
            __m512i a = _mm512_loadu_si512(even + d);
            __m512i b = j + 1 < count ? _mm512_loadu_si512(even + dim + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(packed + d, _mm512_permutex2var_epi16(a, low, b));
            _mm512_storeu_si512(packed + d + 16, _mm512_permutex2var_epi16(a, high, b));
        }
    }
}

/* out_t = out_t * rescale + P V for one block of `count` keys. */
static void block_values(const Scratch *s, int64_t count, int64_t dim) {
    int64_t rows = s->rows, key_pairs = (count + 1) / 2;
    for (int64_t i = 0; i < rows; i += 4) {
        int r = rows - i < 4 ? (int)(rows - i) : 4;
        const uint32_t *p = s->p_pairs + i * 16;
        const float *rescale = s->rescale + i * 16;
        /* head_dim is a multiple of 32, so eight or four dims per tile never leave a tail. */
        for (int64_t d = 0; d < dim; d += r < 4 ? 8 : 4) {
            const uint32_t *v = s->v_pairs + d;
            float *out = s->out_t + (d * rows + i) * 16;
            switch (r) {
            case 1: value_tile(p, v, rescale, key_pairs, dim, rows, 1, 8, out); break;
            case 2: value_tile(p, v, rescale, key_pairs, dim, rows, 2, 8, out); break;
            case 3: value_tile(p, v, rescale, key_pairs, dim, rows, 3, 8, out); break;
            default: value_tile(p, v, rescale, key_pairs, dim, rows, 4, 4, out); break;
            }
        }
    }
}

/* Attention of query tokens first_token .. first_token + TOKEN_BLOCK - 1 (clipped to `tokens`)
 * of every query head served by KV head `kv_head`. */
static void attend_task(const Scratch *s, const uint16_t *q, int64_t q_stride, const uint16_t *k, const uint16_t *v,
                        uint16_t *out, int64_t tokens, int64_t start_pos, int64_t heads, int64_t group, int64_t capacity,
                        int64_t dim, int64_t kv_head, int64_t first_token) {
    int64_t rows = s->rows, pairs = dim / 2;
    int64_t count = tokens - first_token < TOKEN_BLOCK ? tokens - first_token : TOKEN_BLOCK;
    int64_t first_pos = start_pos + first_token, last_pos = first_pos + count - 1;

    /* Padding lanes past the last token repeat its position and have zero queries, so they
       stay finite and read no key past the segment. */
    __m512i positions = _mm512_min_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)first_pos),
                                                     _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)),
                                    _mm512_set1_epi32((int)last_pos));
    for (int64_t i = 0; i < rows; i++) {
        const uint32_t *head = (const uint32_t *)(q + first_token * q_stride + (kv_head * group + i) * dim);
        for (int64_t lane = 0; lane < 16; lane++)
            for (int64_t d = 0; d < pairs; d++)
                s->q_pairs[(d * rows + i) * 16 + lane] = lane < count ? head[lane * (q_stride / 2) + d] : 0;
        _mm512_storeu_ps(s->max + i * 16, _mm512_set1_ps(-INFINITY));
        _mm512_storeu_ps(s->sum + i * 16, _mm512_setzero_ps());
    }
    memset(s->out_t, 0, dim * rows * 16 * sizeof(float));

    const uint16_t *key_head = k + kv_head * capacity * dim;
    const uint16_t *value_head = v + kv_head * capacity * dim;
    for (int64_t first = 0; first <= last_pos; first += KEY_BLOCK) {
        int64_t block = last_pos + 1 - first < KEY_BLOCK ? last_pos + 1 - first : KEY_BLOCK;
        block_scores(s, key_head, first, block, dim);
        block_softmax(s, positions, first, block, first + block - 1 > first_pos);
        pack_values(s, value_head, first, block, dim);
        block_values(s, block, dim);
    }

    /* Normalise and transpose out_t [d][row] into out [token][head * dim + d]. */
    __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32((int)(rows * 16)));
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t lane = 0; lane < count; lane++) {
            float scale = 1.0f / s->sum[i * 16 + lane];
            uint16_t *row = out + (first_token + lane) * heads * dim + (kv_head * group + i) * dim;
            const float *column = s->out_t + i * 16 + lane;
            for (int64_t d = 0; d < dim; d += 16) {
                __m512 values = _mm512_i32gather_ps(stride, column + d * rows * 16, 4);
                store_bf16x16(row + d, _mm512_mul_ps(values, _mm512_set1_ps(scale)), 0xFFFF);
            }
        }
    }
}

/* q: [tokens, heads, dim] with token stride q_stride (elements, even) and heads contiguous;
 * k, v: one slot's [kv_heads, capacity, dim], containing this segment's keys and values at
 * start_pos .. start_pos + tokens - 1 and the cached prefix before them; out: [tokens,
 * heads * dim], contiguous. Returns ATTENTION_OK, or one of the error codes above, in which
 * case `out` is incomplete. */
int llmisvc_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k, const uint16_t *v, uint16_t *out,
                           int64_t tokens, int64_t start_pos, int64_t heads, int64_t kv_heads, int64_t capacity,
                           int64_t dim, int threads) {
    if (dim <= 0 || dim % 32 || dim > MAX_HEAD_DIM)
        return ATTENTION_UNSUPPORTED_HEAD_DIM;
    if (tokens < 1 || start_pos < 0 || kv_heads < 1 || heads % kv_heads || start_pos + tokens > capacity ||
        q_stride % 2 || start_pos + tokens > INT32_MAX)
        return ATTENTION_INVALID_SHAPE;
    int64_t group = heads / kv_heads;
    int64_t token_blocks = (tokens + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
    int64_t tasks = kv_heads * token_blocks;
    int failed = 0;

#pragma omp parallel if (threads > 1) num_threads(threads)
    {
        Scratch scratch;
        int ready = scratch_init(&scratch, group, dim);
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        /* Later token blocks attend more keys, so they are handed out first. The tasks of
           one KV head follow each other, so its K/V stay in cache between them. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!ready)
                continue;
            int64_t token_block = token_blocks - 1 - task % token_blocks;
            attend_task(&scratch, q, q_stride, k, v, out, tokens, start_pos, heads, group, capacity, dim,
                        task / token_blocks, token_block * TOKEN_BLOCK);
        }
        if (ready)
            free(scratch.memory);
    }
    return failed ? ATTENTION_OUT_OF_MEMORY : ATTENTION_OK;
}
