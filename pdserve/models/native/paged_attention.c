/* Paged attention for decode tokens and causal prefill chunks, reading K/V straight from the pages.
 *
 * KV layer layout: [num_pages, 2, page_size, num_kv_heads, head_dim] (K then V of a page back to
 * back). Token t attends to the first kv_len[t] positions of block-table row row_of_token[t].
 * The query heads sharing one KV head are processed together so each K/V row is read once.
 * dtype: 0 = float32, 1 = bfloat16 (q, kv and out share it); accumulation is in float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PD_X86 1
#endif

static inline void load_row(const void *base, int dtype, int64_t offset, int64_t dim, float *dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + offset, (size_t)dim * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) dst[d] = bf16_to_float(src[d]);
    }
}

/* Pages are scattered, so the hardware prefetcher loses the stream at every page boundary: rows this
 * many positions ahead are requested explicitly (about one page at the usual page size) */
#define PREFETCH_AHEAD 16

static inline void prefetch_row(const void *kv, int dtype, int64_t offset, int64_t numel) {
    const char *p = (const char *)kv + offset * (dtype == 0 ? 4 : 2);
    const int64_t bytes = numel * (dtype == 0 ? 4 : 2);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

#define MAX_DIM 256
#define MAX_GROUP 64  /* query heads per KV head */

#define QUERY_TILE 16
#ifndef BF16_QUERY_TILE
#define BF16_QUERY_TILE 32 /* the bf16 path's: more queries per K transposition */
#endif
#define KBLOCK 16  /* positions whose scores two vectors hold */
#define VBLOCK 32  /* positions accumulated per pass over V */

/* w[0, n) = exp(w[0, n) - max) in place; returns 1 / their sum, which the caller applies to the
 * weighted sum of values instead of to every weight. w has room for a multiple of 8 floats. */
static float softmax_unnormalised(float *w, int64_t n) {
    if (n <= 0) return 0.f;
    const int64_t full = n / 8 * 8, rest = n - full;
    float tail[8];
    v8 vmax = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int64_t j = 0; j < full; j += 8) {
        const v8 v = load8(w + j);
        vmax = select8(v > vmax, v, vmax);
    }
    float mx = hmax8(vmax);
    for (int64_t j = full; j < n; j++) mx = w[j] > mx ? w[j] : mx;
    v8 vsum = {0};
    for (int64_t j = 0; j < full; j += 8) {
        const v8 e = exp8(load8(w + j) - mx);
        store8(w + j, e);
        vsum += e;
    }
    float sum = hsum8(vsum);
    if (rest) {
        for (int64_t j = 0; j < 8; j++) tail[j] = j < rest ? w[full + j] - mx : -INFINITY;
        store8(tail, exp8(load8(tail)));
        for (int64_t j = 0; j < rest; j++) {
            w[full + j] = tail[j];
            sum += tail[j];
        }
    }
    return sum > 0.f ? 1.f / sum : 0.f;
}

static inline float kv_at(const void *kv, int dtype, int64_t offset) {
    return dtype == 0 ? ((const float *)kv)[offset] : bf16_to_float(((const uint16_t *)kv)[offset]);
}

/* a[0, 8 * chunks) += sum over positions jj < end of w[jj] * vrow[jj][off + ...]; inlined with a
 * constant chunk count the accumulators stay in registers */
static inline __attribute__((always_inline)) void accumulate_values(float *a, const float *w, const float *const *vrow,
                                                                    int64_t off, int64_t end, int64_t chunks) {
    v8 sum[8];
    for (int64_t c = 0; c < chunks; c++) sum[c] = load8(a + 8 * c);
    for (int64_t jj = 0; jj < end; jj++) {
        const float wj = w[jj], *vh = vrow[jj] + off;
        for (int64_t c = 0; c < chunks; c++) sum[c] += wj * load8(vh + 8 * c);
    }
    for (int64_t c = 0; c < chunks; c++) store8(a + 8 * c, sum[c]);
}


#ifdef PD_X86
/* The AVX512-BF16 decode path: compiled for that instruction set whatever -march says, and chosen at
 * run time (pd_bf16_variant) only on a CPU that has it, so the same build runs on an AVX2 machine. */
#define BF16_TARGET PD_AVX512_BF16_TARGET
#ifndef SCORE_ROWS
#define SCORE_ROWS 8 /* query rows scored per pass over a transposed K block */
#endif

/* softmax_unnormalised in 16 lanes: w[0, n) = exp(w[0, n) - max), returns 1 / their sum; w has room for a
 * multiple of 16 floats (the tail is masked) */
BF16_TARGET static float softmax_unnormalised16(float *w, int64_t n) {
    if (n <= 0) return 0.f;
    const int64_t full = n / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (n - full)) - 1u);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < full; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(w + j));
    if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, w + full));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < full; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(w + j), mx));
        _mm512_storeu_ps(w + j, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (tail) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, w + full), mx));
        _mm512_mask_storeu_ps(w + full, tail, e);
        vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    return sum > 0.f ? 1.f / sum : 0.f;
}

/* r[i] = the sum of v[i]'s 16 lanes, i < 16, in one vector: a transposing tree (15 adds and 30 shuffles
 * for 16 sums, where 16 horizontal reductions take 16 x 4 of each) */
BF16_TARGET static inline __attribute__((always_inline)) __m512 sum16x16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int k = 0; k < 8; k++) /* per 128-bit lane: v[2k] in even, v[2k+1] in odd places */
        w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) { /* per 128-bit lane: v[4k .. 4k + 3] */
        const __m512d c = _mm512_castps_pd(w[2 * k]), d = _mm512_castps_pd(w[2 * k + 1]);
        x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
    }
    const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xdd));
    const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xdd));
}

/* scores[0, 16) of one query head against the K rows krow[0, 16): per position the dpbf16 partial sums of
 * 32 dimensions at a time, then one transposing reduction (all loops constant: the accumulators stay in
 * registers) */
BF16_TARGET static inline __attribute__((always_inline)) void score_block16(const uint16_t *qh, const uint16_t *const *krow,
                                                                            int chunks, __m512 scale, float *dst) {
    __m512 a[16];
#pragma GCC unroll 16
    for (int jj = 0; jj < 16; jj++) a[jj] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; c++) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
#pragma GCC unroll 16
        for (int jj = 0; jj < 16; jj++)
            a[jj] = _mm512_dpbf16_ps(a[jj], qv, (__m512bh)_mm512_loadu_si512(krow[jj] + 32 * c));
    }
    _mm512_storeu_ps(dst, _mm512_mul_ps(sum16x16(a), scale));
}

/* acc[i] += sum over positions j < kb of w[i][j] * V row j (at kv + kbase[j] + off) for `heads` query heads
 * of one KV head. acc[i]: float32 [2 * chunks][16], even dimensions then odd ones of each 32: each 32 bf16
 * values are widened by two bit operations (even ones shifted up, odd ones masked), no shuffles; the
 * 2 * heads * chunks <= 16 accumulators stay in registers over the block. */
BF16_TARGET static inline __attribute__((always_inline)) void values_block(const uint16_t *kv, const int64_t *kbase,
                                                                           int64_t off, int64_t kb,
                                                                           const float *const *w, float *const *acc,
                                                                           int heads, int chunks) {
    __m512 ev[8], od[8];
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int i = 0; i < heads; i++)
        for (int c = 0; c < chunks; c++) {
            ev[i * chunks + c] = _mm512_loadu_ps(acc[i] + 32 * c);
            od[i * chunks + c] = _mm512_loadu_ps(acc[i] + 32 * c + 16);
        }
    for (int64_t j = 0; j < kb; j++) {
        const uint16_t *v = kv + kbase[j] + off;
        __m512 wb[8];
        for (int i = 0; i < heads; i++) wb[i] = _mm512_set1_ps(w[i][j]);
        for (int c = 0; c < chunks; c++) {
            const __m512i x = _mm512_loadu_si512(v + 32 * c);
            const __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
            const __m512 o = _mm512_castsi512_ps(_mm512_and_si512(x, high));
            for (int i = 0; i < heads; i++) {
                ev[i * chunks + c] = _mm512_fmadd_ps(wb[i], e, ev[i * chunks + c]);
                od[i * chunks + c] = _mm512_fmadd_ps(wb[i], o, od[i * chunks + c]);
            }
        }
    }
    for (int i = 0; i < heads; i++)
        for (int c = 0; c < chunks; c++) {
            _mm512_storeu_ps(acc[i] + 32 * c, ev[i * chunks + c]);
            _mm512_storeu_ps(acc[i] + 32 * c + 16, od[i * chunks + c]);
        }
}

/* out[d] = bf16(norm * acc[d]) with acc in values_block's even / odd order, interleaved back */
BF16_TARGET static void store_even_odd_bf16(uint16_t *out, const float *acc, float norm, int chunks) {
    const __m512 n = _mm512_set1_ps(norm);
    for (int c = 0; c < chunks; c++) {
        const __m512i e = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + 32 * c), n)));
        const __m512i o =
            _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + 32 * c + 16), n)));
        _mm512_storeu_si512(out + 32 * c, _mm512_or_si512(e, _mm512_slli_epi32(o, 16)));
    }
}

#define VALUES_CASE(C, H) \
    case C * 100 + H: values_block(kv, kbase, off, kb, w, acc, H, C); break;

/* values_block with constant heads and chunks (so its accumulators stay in registers): heads <= 8 / chunks */
BF16_TARGET static void values_heads(const uint16_t *kv, const int64_t *kbase, int64_t off, int64_t kb,
                                     const float *const *w, float *const *acc, int heads, int chunks) {
    switch (chunks * 100 + heads) {
    VALUES_CASE(1, 1) VALUES_CASE(1, 2) VALUES_CASE(1, 3) VALUES_CASE(1, 4)
    VALUES_CASE(1, 5) VALUES_CASE(1, 6) VALUES_CASE(1, 7) VALUES_CASE(1, 8)
    VALUES_CASE(2, 1) VALUES_CASE(2, 2) VALUES_CASE(2, 3) VALUES_CASE(2, 4)
    VALUES_CASE(3, 1) VALUES_CASE(3, 2) VALUES_CASE(4, 1) VALUES_CASE(4, 2)
    VALUES_CASE(5, 1) VALUES_CASE(6, 1) VALUES_CASE(7, 1) VALUES_CASE(8, 1)
    default: /* not reached: decode_token_bf16 passes heads <= 8 / chunks */
        for (int i = 0; i < heads; i++) values_heads(kv, kbase, off, kb, w + i, acc + i, 1, chunks);
    }
}

#ifndef DECODE_AHEAD
#define DECODE_AHEAD 32 /* positions the decode path prefetches ahead (16-64 measured alike) */
#endif

/* One decode token over its row, 16 positions (KBLOCK) at a time, the next block's rows prefetched (pages
 * are scattered): scores of every query head against the block's K rows (read from L1 by all query heads
 * of their KV head; one transposing reduction per 16 scores), float32 softmax, then the V rows of each
 * block for every query head. out: bf16 [num_q_heads * head_dim]; acc: float32 [num_q_heads * head_dim].
 * Requires head_dim % 32 == 0, head_dim <= 256. */
BF16_TARGET static void decode_token_bf16(const uint16_t *q, const uint16_t *kv, uint16_t *out, const int64_t *kbase,
                                          int64_t len, int64_t len8, int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t head_dim, int64_t half_stride, int64_t row_stride, float scale,
                                          float *scores, float *acc, float *norm) {
    const int64_t group = num_q_heads / num_kv_heads;
    const int chunks = (int)(head_dim / 32);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < len; j0 += KBLOCK) {
        const int64_t kb = len - j0 < KBLOCK ? len - j0 : KBLOCK;
        /* K and V rows DECODE_AHEAD positions ahead into L2 (V for the values pass: a row's K and V fit in
         * L2 at the usual lengths). Into L2, not L1: on scattered pages that keeps more lines in flight
         * (6 KB chunks in random order read at 8 GB/s, 12 with an L2 prefetch of the next, 8 with an L1
         * one, on the AMD EPYC of docs/benchmarks.md result 13b) */
        for (int64_t jj = 0; jj < KBLOCK && j0 + DECODE_AHEAD + jj < len; jj++) {
            const char *next = (const char *)(kv + kbase[j0 + DECODE_AHEAD + jj]);
            for (int64_t b = 0; b < row_stride * 2; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
            for (int64_t b = 0; b < row_stride * 2; b += 64) _mm_prefetch(next + 2 * half_stride + b, _MM_HINT_T1);
        }
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const uint16_t *krow[KBLOCK]; /* past the row's end: its first row again (scores beyond len unused) */
            for (int64_t jj = 0; jj < KBLOCK; jj++) krow[jj] = kv + kbase[j0 + (jj < kb ? jj : 0)] + h * head_dim;
            for (int64_t g = 0; g < group; g++) {
                const int64_t hq = h * group + g;
                score_block16(q + hq * head_dim, krow, chunks, sc, scores + hq * len8 + j0);
            }
        }
    }
    for (int64_t hq = 0; hq < num_q_heads; hq++) norm[hq] = softmax_unnormalised16(scores + hq * len8, len);
    memset(acc, 0, sizeof(float) * (size_t)(num_q_heads * head_dim));
    const int per_pass = 8 / chunks; /* query heads whose 2 * chunks accumulators fit in 16 registers */
    for (int64_t j0 = 0; j0 < len; j0 += KBLOCK) {
        const int64_t kb = len - j0 < KBLOCK ? len - j0 : KBLOCK;
        for (int64_t jj = 0; jj < KBLOCK && j0 + KBLOCK + jj < len; jj++)
            prefetch_row(kv, 1, kbase[j0 + KBLOCK + jj] + half_stride, row_stride);
        for (int64_t h = 0; h < num_kv_heads; h++) {
            for (int64_t g0 = 0; g0 < group; g0 += per_pass) {
                const int heads = (int)(group - g0 < per_pass ? group - g0 : per_pass);
                const float *w[8];
                float *a[8];
                for (int i = 0; i < heads; i++) {
                    const int64_t hq = h * group + g0 + i;
                    w[i] = scores + hq * len8 + j0;
                    a[i] = acc + hq * head_dim;
                }
                values_heads(kv, kbase + j0, half_stride + h * head_dim, kb, w, a, heads, chunks);
            }
        }
    }
    for (int64_t hq = 0; hq < num_q_heads; hq++)
        store_even_odd_bf16(out + hq * head_dim, acc + hq * head_dim, norm[hq], chunks);
}

/* A prefill tile of n <= BF16_QUERY_TILE tokens of one row (token i attends kv_len[i] positions). Scores:
 * KBLOCK positions of one KV head are transposed into dimension pairs [head_dim / 2][KBLOCK] (two bf16
 * each), so one dpbf16 per pair gives a query KBLOCK partial scores, four query rows per pass sharing
 * each K load. Values: VBLOCK rows converted to float32 once, accumulated in 16-lane registers. */
BF16_TARGET static void prefill_tile_bf16(const uint16_t *q, const uint16_t *kv, uint16_t *out, const int64_t *kbase,
                                          const int32_t *kv_len, int64_t n, int64_t len, int64_t len8,
                                          int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                          int64_t half_stride, int64_t row_stride, float scale, float *scores,
                                          float *acc, float *norm, float *block) {
    const int64_t group = num_q_heads / num_kv_heads, pairs = head_dim / 2;
    const int vec = (int)(head_dim / 16);
    uint32_t kt[MAX_DIM / 2 * KBLOCK];
    int64_t *ms = (int64_t *)(block + VBLOCK * row_stride); /* [n * group] query rows, after the V block */
    for (int64_t j0 = 0; j0 < len; j0 += KBLOCK) {
        const int64_t kb = len - j0 < KBLOCK ? len - j0 : KBLOCK;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            for (int64_t jj = 0; jj < KBLOCK; jj++) {
                if (jj < kb) {
                    const uint32_t *src = (const uint32_t *)(kv + kbase[j0 + jj] + h * head_dim);
                    for (int64_t p = 0; p < pairs; p++) kt[p * KBLOCK + jj] = src[p];
                } else {
                    for (int64_t p = 0; p < pairs; p++) kt[p * KBLOCK + jj] = 0;
                }
            }
            int64_t count = 0;
            for (int64_t i = 0; i < n; i++)
                if (j0 < kv_len[i])
                    for (int64_t g = 0; g < group; g++) ms[count++] = i * num_q_heads + h * group + g;
            for (int64_t c = 0; c < count; c += SCORE_ROWS) { /* independent accumulators hide dpbf16's latency */
                const int64_t r = count - c < SCORE_ROWS ? count - c : SCORE_ROWS;
                const uint32_t *qp[SCORE_ROWS];
                for (int64_t i = 0; i < SCORE_ROWS; i++) qp[i] = (const uint32_t *)(q + ms[c + (i < r ? i : 0)] * head_dim);
                __m512 res[SCORE_ROWS];
                for (int64_t i = 0; i < SCORE_ROWS; i++) res[i] = _mm512_setzero_ps();
                for (int64_t p = 0; p < pairs; p++) {
                    const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + p * KBLOCK);
                    for (int64_t i = 0; i < SCORE_ROWS; i++)
                        res[i] = _mm512_dpbf16_ps(res[i], (__m512bh)_mm512_set1_epi32((int)qp[i][p]), k);
                }
                const __m512 sc = _mm512_set1_ps(scale);
                for (int64_t i = 0; i < r; i++) _mm512_storeu_ps(scores + ms[c + i] * len8 + j0, _mm512_mul_ps(res[i], sc));
            }
        }
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t hq = 0; hq < num_q_heads; hq++)
            norm[i * num_q_heads + hq] = softmax_unnormalised16(scores + (i * num_q_heads + hq) * len8, kv_len[i]);
    memset(acc, 0, sizeof(float) * (size_t)(n * num_q_heads * head_dim));
    const int chunks = vec / 2, per_pass = 8 / chunks;
    for (int64_t j0 = 0; j0 < len; j0 += VBLOCK) {
        const int64_t vb = len - j0 < VBLOCK ? len - j0 : VBLOCK;
        for (int64_t jj = 0; jj < vb && j0 + VBLOCK + jj < len; jj++)
            prefetch_row(kv, 1, kbase[j0 + VBLOCK + jj] + half_stride, row_stride);
        for (int64_t i = 0; i < n; i++) { /* the block's bf16 V rows stay in L1 for every query of the tile */
            const int64_t li = kv_len[i];
            if (j0 >= li) continue;
            const int64_t end = li - j0 < vb ? li - j0 : vb;
            for (int64_t h = 0; h < num_kv_heads; h++) {
                for (int64_t g0 = 0; g0 < group; g0 += per_pass) {
                    const int heads = (int)(group - g0 < per_pass ? group - g0 : per_pass);
                    float *a[8];
                    const float *w[8];
                    for (int k = 0; k < heads; k++) {
                        const int64_t m = i * num_q_heads + h * group + g0 + k;
                        a[k] = acc + m * head_dim;
                        w[k] = scores + m * len8 + j0;
                    }
                    values_heads(kv, kbase + j0, half_stride + h * head_dim, end, w, a, heads, chunks);
                }
            }
        }
    }
    for (int64_t m = 0; m < n * num_q_heads; m++)
        store_even_odd_bf16(out + m * head_dim, acc + m * head_dim, norm[m], chunks);
}
#endif

static int bf16_variant = -1; /* -1: not chosen yet; 0: the generic code; 1: AVX512-BF16 */

/* request -1: the variant in use (chosen on first call: AVX512-BF16 where the CPU has it); 0 or 1: use
 * that one (1 only where supported, else 0; tests and benchmarks compare them). Returns the variant now
 * in use. */
int pd_bf16_variant(int request) {
#ifdef PD_X86
    const int supported = __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    const int supported = 0;
#endif
    if (request >= 0)
        bf16_variant = supported && request <= 1 ? request : 0;
    else if (bf16_variant < 0)
        bf16_variant = supported;
    return bf16_variant;
}

/* Tasks are tiles of up to QUERY_TILE consecutive tokens of the same block-table row (a prefill chunk
 * is one row; each decode token is its own row, so its tile is one token). A tile reads every K and V
 * position of its row once, front to back, for all its queries (each over its own causal length).
 * Scores: KBLOCK positions of one KV head are transposed into a [head_dim][KBLOCK] block, so every
 * query head of the tile gets KBLOCK scores with head_dim vector FMAs and no horizontal sums (six
 * query heads per pass, so each K vector loaded feeds six FMAs). Softmax weights stay unnormalised; each
 * output row is scaled by 1 / sum once at the end.
 * Values: each query head's output stays in vector registers over VBLOCK positions.
 * Requires head_dim % 8 == 0. */
int pd_paged_attention(int dtype, const void *q, const void *kv, void *out, const int32_t *block_table,
                       int64_t table_stride, const int32_t *row_of_token, const int32_t *kv_len, int64_t num_tokens,
                       int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t page_size, float scale,
                       int num_threads) {
    const int64_t group = num_q_heads / num_kv_heads;
    if (group < 1 || group > MAX_GROUP || head_dim > MAX_DIM || head_dim % 8 || num_q_heads % num_kv_heads) return 1;
    if (num_tokens <= 0) return 0;
    const int64_t row_stride = num_kv_heads * head_dim;   /* one position of one page, all heads */
    const int64_t half_stride = page_size * row_stride;   /* K (or V) of one page */
    const int64_t width = num_q_heads * head_dim;         /* one token's queries */
    int64_t *tile_start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(num_tokens + 1));
    if (tile_start == NULL) return 2;
    int64_t num_tiles = 0;
    /* 0: generic; 1: AVX512-BF16; 2: AVX512-BF16 with the previous (row-wise) decode path */
    const int bf16_fast = dtype == 1 && head_dim % 32 == 0 ? pd_bf16_variant(-1) : 0;
    const int64_t tile_rows = bf16_fast ? BF16_QUERY_TILE : QUERY_TILE;
    for (int64_t t = 0; t < num_tokens; t++) {
        if (num_tiles == 0 || row_of_token[t] != row_of_token[t - 1] || t - tile_start[num_tiles - 1] >= tile_rows)
            tile_start[num_tiles++] = t;
    }
    tile_start[num_tiles] = num_tokens;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t tile = 0; tile < num_tiles; tile++) {
        const int64_t t0 = tile_start[tile], n = tile_start[tile + 1] - t0;
        int64_t len = 0;
        for (int64_t i = 0; i < n; i++) len = kv_len[t0 + i] > len ? kv_len[t0 + i] : len;
        const int64_t len8 = (len + KBLOCK - 1) / KBLOCK * KBLOCK;
        const int32_t *pages = block_table + (int64_t)row_of_token[t0] * table_stride;
        float *qf = (float *)malloc(sizeof(float) * (size_t)(n * width));
        float *acc = (float *)calloc((size_t)(n * width), sizeof(float));
        float *norm = (float *)malloc(sizeof(float) * (size_t)(n * num_q_heads)); /* 1 / softmax sum per query head */
        /* V rows as float32; the bf16 path keeps its query-row list after them */
        float *block = (float *)malloc(sizeof(float) * (size_t)(VBLOCK * row_stride) + sizeof(int64_t) * (size_t)(n * group));
        float *scores = (float *)malloc(sizeof(float) * (size_t)(n * num_q_heads * (len8 > 0 ? len8 : 1)));
        int64_t *kbase = (int64_t *)malloc(sizeof(int64_t) * (size_t)(len > 0 ? len : 1));
        if (qf == NULL || acc == NULL || norm == NULL || block == NULL || scores == NULL || kbase == NULL) {
#pragma omp atomic write
            failed = 1;
            free(qf), free(acc), free(norm), free(block), free(scores), free(kbase);
            continue;
        }
        /* offset of position j's K row (its V row is half_stride further), without a division per use */
        for (int64_t j = 0, page = 0, slot = 0; j < len; j++) {
            kbase[j] = (int64_t)pages[page] * 2 * half_stride + slot * row_stride;
            if (++slot == page_size) slot = 0, page++;
        }
#ifdef PD_X86
        if (n == 1 && bf16_fast) {
            decode_token_bf16((const uint16_t *)q + t0 * width, (const uint16_t *)kv, (uint16_t *)out + t0 * width,
                              kbase, len, len8, num_q_heads, num_kv_heads, head_dim, half_stride, row_stride, scale,
                              scores, acc, norm);
            free(qf), free(acc), free(norm), free(block), free(scores), free(kbase);
            continue;
        }
        if (n > 1 && bf16_fast) {
            prefill_tile_bf16((const uint16_t *)q + t0 * width, (const uint16_t *)kv, (uint16_t *)out + t0 * width,
                              kbase, kv_len + t0, n, len, len8, num_q_heads, num_kv_heads, head_dim, half_stride,
                              row_stride, scale, scores, acc, norm, block);
            free(qf), free(acc), free(norm), free(block), free(scores), free(kbase);
            continue;
        }
#endif
        load_row(q, dtype, t0 * width, n * width, qf);
        for (int64_t i = 0; i < n * width; i++) qf[i] *= scale;
        if (n == 1) { /* a decode token: too few queries to pay for the transposition, dot each K row */
            for (int64_t j = 0; j < len; j++) {
                const int64_t base = kbase[j];
                const float *k;
                if (j + PREFETCH_AHEAD < len) prefetch_row(kv, dtype, kbase[j + PREFETCH_AHEAD], row_stride);
                if (dtype == 0) {
                    k = (const float *)kv + base;
                } else {
                    load_row(kv, dtype, base, row_stride, block);
                    k = block;
                }
                for (int64_t hq = 0; hq < num_q_heads; hq++) {
                    const float *kh = k + (hq / group) * head_dim, *qh = qf + hq * head_dim;
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < head_dim; d++) s += qh[d] * kh[d];
                    scores[hq * len8 + j] = s;
                }
            }
        }
        for (int64_t j0 = 0; n > 1 && j0 < len; j0 += KBLOCK) {
            const int64_t kb = len - j0 < KBLOCK ? len - j0 : KBLOCK;
            for (int64_t h = 0; h < num_kv_heads; h++) {
                float *kt = block; /* [head_dim][KBLOCK] */
                for (int64_t jj = 0; jj < KBLOCK; jj++) {
                    if (jj >= kb) {
                        for (int64_t d = 0; d < head_dim; d++) kt[d * KBLOCK + jj] = 0.f;
                        continue;
                    }
                    const int64_t j = j0 + jj;
                    const int64_t base = kbase[j] + h * head_dim;
                    for (int64_t d = 0; d < head_dim; d++) kt[d * KBLOCK + jj] = kv_at(kv, dtype, base + d);
                }
                /* the query heads of this KV head in the tile's live tokens, six at a time: two K vectors
                 * and six broadcast query values feed twelve accumulators per dimension */
                int64_t ms[QUERY_TILE * MAX_GROUP];
                int64_t count = 0;
                for (int64_t i = 0; i < n; i++)
                    if (j0 < kv_len[t0 + i])
                        for (int64_t g = 0; g < group; g++) ms[count++] = i * num_q_heads + h * group + g;
                for (int64_t c = 0; c < count; c += 6) {
                    const int64_t r = count - c < 6 ? count - c : 6;
                    const float *qr[6];
                    for (int64_t i = 0; i < 6; i++) qr[i] = qf + ms[c + (i < r ? i : 0)] * head_dim;
                    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0};
                    v8 b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}, b4 = {0}, b5 = {0};
                    for (int64_t d = 0; d < head_dim; d++) {
                        const v8 k0 = load8(kt + d * KBLOCK), k1 = load8(kt + d * KBLOCK + 8);
                        float x = qr[0][d];
                        a0 += x * k0, b0 += x * k1, x = qr[1][d];
                        a1 += x * k0, b1 += x * k1, x = qr[2][d];
                        a2 += x * k0, b2 += x * k1, x = qr[3][d];
                        a3 += x * k0, b3 += x * k1, x = qr[4][d];
                        a4 += x * k0, b4 += x * k1, x = qr[5][d];
                        a5 += x * k0, b5 += x * k1;
                    }
                    const v8 lo[6] = {a0, a1, a2, a3, a4, a5}, hi[6] = {b0, b1, b2, b3, b4, b5};
                    for (int64_t i = 0; i < r; i++) {
                        store8(scores + ms[c + i] * len8 + j0, lo[i]);
                        store8(scores + ms[c + i] * len8 + j0 + 8, hi[i]);
                    }
                }
            }
        }
        for (int64_t i = 0; i < n; i++) {
            const int64_t li = kv_len[t0 + i];
            for (int64_t hq = 0; hq < num_q_heads; hq++)
                norm[i * num_q_heads + hq] = softmax_unnormalised(scores + (i * num_q_heads + hq) * len8, li);
        }
        for (int64_t j0 = 0; j0 < len; j0 += VBLOCK) {
            const int64_t vb = len - j0 < VBLOCK ? len - j0 : VBLOCK;
            const float *vrow[VBLOCK];
            for (int64_t jj = 0; jj < vb; jj++) {
                const int64_t j = j0 + jj;
                const int64_t base = kbase[j] + half_stride;
                if (j + VBLOCK < len) prefetch_row(kv, dtype, kbase[j + VBLOCK] + half_stride, row_stride);
                if (dtype == 0) {
                    vrow[jj] = (const float *)kv + base;
                } else {
                    load_row(kv, dtype, base, row_stride, block + jj * row_stride);
                    vrow[jj] = block + jj * row_stride;
                }
            }
            for (int64_t i = 0; i < n; i++) {
                const int64_t li = kv_len[t0 + i];
                if (j0 >= li) continue;
                const int64_t end = li - j0 < vb ? li - j0 : vb;
                for (int64_t hq = 0; hq < num_q_heads; hq++) {
                    const int64_t m = i * num_q_heads + hq, off = (hq / group) * head_dim;
                    const float *w = scores + m * len8 + j0;
                    float *a = acc + m * head_dim;
                    for (int64_t d0 = 0; d0 < head_dim; d0 += 64) { /* up to 8 accumulators in registers */
                        const int64_t chunks = (head_dim - d0 < 64 ? head_dim - d0 : 64) / 8;
                        if (chunks == 8)
                            accumulate_values(a + d0, w, vrow, off + d0, end, 8);
                        else if (chunks == 4)
                            accumulate_values(a + d0, w, vrow, off + d0, end, 4);
                        else
                            accumulate_values(a + d0, w, vrow, off + d0, end, chunks);
                    }
                }
            }
        }
        for (int64_t m = 0; m < n * num_q_heads; m++)
            for (int64_t d = 0; d < head_dim; d++) acc[m * head_dim + d] *= norm[m];
        if (dtype == 0) {
            memcpy((float *)out + t0 * width, acc, sizeof(float) * (size_t)(n * width));
        } else {
            uint16_t *dst = (uint16_t *)out + t0 * width;
            for (int64_t i = 0; i < n * width; i++) dst[i] = float_to_bf16(acc[i]);
        }
        free(qf), free(acc), free(norm), free(block), free(scores), free(kbase);
    }
    free(tile_start);
    return failed ? 2 : 0;
}
