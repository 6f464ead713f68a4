/* Paged attention for one query token per (token, KV head), reading K/V straight from the pages.
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

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = ((uint32_t)h) << 16;
    return v.f;
}

static inline uint16_t float_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* NaN stays NaN */
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}

static inline void load_row(const void *base, int dtype, int64_t offset, int64_t dim, float *dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + offset, (size_t)dim * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) dst[d] = bf16_to_float(src[d]);
    }
}

#define MAX_DIM 256

/* One task per token: all KV heads of a position are one contiguous row, read once, front to back. */
int pd_paged_attention(int dtype, const void *q, const void *kv, void *out, const int32_t *block_table,
                       int64_t table_stride, const int32_t *row_of_token, const int32_t *kv_len, int64_t num_tokens,
                       int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t page_size, float scale,
                       int num_threads) {
    const int64_t group = num_q_heads / num_kv_heads;
    if (group < 1 || head_dim > MAX_DIM || num_q_heads % num_kv_heads) return 1;
    const int64_t row_stride = num_kv_heads * head_dim;   /* one position of one page, all heads */
    const int64_t half_stride = page_size * row_stride;   /* K (or V) of one page */
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t len = kv_len[t];
        const int32_t *pages = block_table + (int64_t)row_of_token[t] * table_stride;
        float *qf = (float *)malloc(sizeof(float) * (size_t)(num_q_heads * head_dim));
        float *acc = (float *)calloc((size_t)(num_q_heads * head_dim), sizeof(float));
        float *row = (float *)malloc(sizeof(float) * (size_t)row_stride);
        float *scores = (float *)malloc(sizeof(float) * (size_t)(num_q_heads * (len > 0 ? len : 1)));
        if (qf == NULL || acc == NULL || row == NULL || scores == NULL) {
            failed = 1;
            free(qf), free(acc), free(row), free(scores);
            continue;
        }
        load_row(q, dtype, t * num_q_heads * head_dim, num_q_heads * head_dim, qf);
        for (int64_t i = 0; i < num_q_heads * head_dim; i++) qf[i] *= scale;
        for (int64_t j = 0; j < len; j++) {
            const int64_t base = (int64_t)pages[j / page_size] * 2 * half_stride + (j % page_size) * row_stride;
            const float *k;
            if (dtype == 0) {
                k = (const float *)kv + base;
            } else {
                load_row(kv, dtype, base, row_stride, row);
                k = row;
            }
            for (int64_t hq = 0; hq < num_q_heads; hq++) {
                const float *kh = k + (hq / group) * head_dim, *qh = qf + hq * head_dim;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < head_dim; d++) s += qh[d] * kh[d];
                scores[hq * len + j] = s;
            }
        }
        for (int64_t hq = 0; hq < num_q_heads; hq++) {
            float *sg = scores + hq * len;
            float mx = -INFINITY;
            for (int64_t j = 0; j < len; j++) mx = sg[j] > mx ? sg[j] : mx;
            float sum = 0.f;
            for (int64_t j = 0; j < len; j++) {
                sg[j] = expf(sg[j] - mx);
                sum += sg[j];
            }
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            for (int64_t j = 0; j < len; j++) sg[j] *= inv;
        }
        for (int64_t j = 0; j < len; j++) {
            const int64_t base =
                (int64_t)pages[j / page_size] * 2 * half_stride + half_stride + (j % page_size) * row_stride;
            const float *v;
            if (dtype == 0) {
                v = (const float *)kv + base;
            } else {
                load_row(kv, dtype, base, row_stride, row);
                v = row;
            }
            for (int64_t hq = 0; hq < num_q_heads; hq++) {
                const float w = scores[hq * len + j], *vh = v + (hq / group) * head_dim;
                float *a = acc + hq * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) a[d] += w * vh[d];
            }
        }
        const int64_t o = t * num_q_heads * head_dim;
        if (dtype == 0) {
            memcpy((float *)out + o, acc, sizeof(float) * (size_t)(num_q_heads * head_dim));
        } else {
            uint16_t *dst = (uint16_t *)out + o;
            for (int64_t i = 0; i < num_q_heads * head_dim; i++) dst[i] = float_to_bf16(acc[i]);
        }
        free(qf), free(acc), free(row), free(scores);
    }
    return failed ? 2 : 0;
}
