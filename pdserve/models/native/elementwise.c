/* Fused element-wise steps of a Llama layer: one pass over memory each, instead of the three to five
 * tensor operations (and temporaries) PyTorch runs for them.
 *   pd_silu_mul: out[t, i] = silu(x[t, i]) * x[t, inter + i] for x = [gate | up] rows (float32);
 *   pd_silu_mul_bf16: the same in bfloat16 on a CPU with AVX512-BF16 (returns 1 elsewhere: torch's ops then);
 *   pd_add_rms_norm: optionally x += residual, then out = weight * x / sqrt(mean(x^2) + eps) per row;
 *   pd_rope: rotate-half RoPE of the q and k heads of fused qkv rows into contiguous q and k.
 * dtype: 0 = float32, 1 = bfloat16 (every tensor of a call; arithmetic in float32). In bfloat16 each
 * result is rounded where the PyTorch expression rounds (after the residual add, after the
 * normalisation, after each RoPE product), so the fused step gives what the unfused one gives.
 * Rows are split across OpenMP threads. Every function returns 0. */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* float32 (the generic bf16 version measured slower than torch's ops; pd_silu_mul_bf16 is the AVX-512 one) */
int pd_silu_mul(const float *x, float *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * inter > 32768)
    for (int64_t t = 0; t < rows; t++) {
        const float *gate = x + t * 2 * inter, *up = gate + inter;
        float *o = out + t * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            const v8 g = load8(gate + i);
            store8(o + i, g / (1.0f + exp8(-g)) * load8(up + i));
        }
        for (; i < inter; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
    return 0;
}

#if defined(__x86_64__) || defined(__i386__)
/* 16 bf16 values widened to float32 (mask: the lanes to load) */
PD_AVX512_BF16_TARGET static inline __m512 load16_bf16_masked(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

/* rounded to bf16 (nearest even) and widened back: the value torch keeps after a bf16 op */
PD_AVX512_BF16_TARGET static inline __m512 round16_bf16(__m512 f) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(f)), 16));
}

/* silu(gate) rounded to bf16, times up, rounded: where F.silu(gate) * up rounds */
PD_AVX512_BF16_TARGET static void silu_mul_bf16_avx512(const uint16_t *x, uint16_t *out, int64_t rows, int64_t inter,
                                                       int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * inter > 32768)
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *gate = x + t * 2 * inter, *up = gate + inter;
        uint16_t *o = out + t * inter;
        for (int64_t i = 0; i < inter; i += 16) {
            const __mmask16 mask = inter - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (inter - i)) - 1u);
            const __m512 g = load16_bf16_masked(gate + i, mask);
            const __m512 minus_g = _mm512_sub_ps(_mm512_setzero_ps(), g);
            const __mmask16 overflow = _mm512_cmp_ps_mask(minus_g, _mm512_set1_ps(88.3762626647949f), _CMP_GT_OQ);
            /* exp16 clamps; past its range e^-g is inf for torch, so silu is -0 as there */
            const __m512 e = _mm512_mask_blend_ps(overflow, exp16(minus_g), _mm512_set1_ps(INFINITY));
            const __m512 silu = round16_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            const __m512 prod = _mm512_mul_ps(silu, load16_bf16_masked(up + i, mask));
            _mm256_mask_storeu_epi16(o + i, mask, (__m256i)_mm512_cvtneps_pbh(prod));
        }
    }
}
#endif

int pd_silu_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t inter, int num_threads) {
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx512bf16")) {
        silu_mul_bf16_avx512(x, out, rows, inter, num_threads);
        return 0;
    }
#endif
    (void)x, (void)out, (void)rows, (void)inter, (void)num_threads;
    return 1;
}

static void add_rms_norm_f32(float *x, const float *residual, const float *weight, float *out, int64_t rows,
                             int64_t dim, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim > 32768)
    for (int64_t t = 0; t < rows; t++) {
        float *xr = x + t * dim;
        float *o = out + t * dim;
        if (residual != NULL) {
            const float *r = residual + t * dim;
            for (int64_t d = 0; d < dim; d++) xr[d] += r[d];
        }
        v8 acc = {0};
        int64_t d = 0;
        for (; d + 8 <= dim; d += 8) {
            const v8 v = load8(xr + d);
            acc += v * v;
        }
        float sum = hsum8(acc);
        for (; d < dim; d++) sum += xr[d] * xr[d];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        for (d = 0; d < dim; d++) o[d] = weight[d] * (xr[d] * inv);
    }
}

/* torch in bfloat16: x + residual rounded; the norm in float32, rounded; times the weight, rounded */
static void add_rms_norm_bf16(uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                              int64_t rows, int64_t dim, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim > 32768)
    for (int64_t t = 0; t < rows; t++) {
        uint16_t *xr = x + t * dim;
        uint16_t *o = out + t * dim;
        v8 acc = {0};
        int64_t d = 0;
        for (; d + 8 <= dim; d += 8) {
            v8 v = load8_bf16(xr + d);
            if (residual != NULL) {
                v = round8_bf16(v + load8_bf16(residual + t * dim + d));
                store8_bf16(xr + d, v);
            }
            acc += v * v;
        }
        float sum = hsum8(acc);
        for (; d < dim; d++) {
            float v = bf16_to_float(xr[d]);
            if (residual != NULL) {
                v = round_bf16(v + bf16_to_float(residual[t * dim + d]));
                xr[d] = float_to_bf16(v);
            }
            sum += v * v;
        }
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        for (d = 0; d + 8 <= dim; d += 8)
            store8_bf16(o + d, load8_bf16(weight + d) * round8_bf16(load8_bf16(xr + d) * inv));
        for (; d < dim; d++) o[d] = float_to_bf16(bf16_to_float(weight[d]) * round_bf16(bf16_to_float(xr[d]) * inv));
    }
}

int pd_add_rms_norm(int dtype, void *x, const void *residual, const void *weight, void *out, int64_t rows,
                    int64_t dim, float eps, int num_threads) {
    if (dtype == 0)
        add_rms_norm_f32((float *)x, (const float *)residual, (const float *)weight, (float *)out, rows, dim, eps,
                         num_threads);
    else
        add_rms_norm_bf16((uint16_t *)x, (const uint16_t *)residual, (const uint16_t *)weight, (uint16_t *)out, rows,
                          dim, eps, num_threads);
    return 0;
}

static void rope_f32(const float *qkv, int64_t qkv_stride, const float *cos, const float *sin, float *q_out,
                     float *k_out, int64_t rows, int64_t q_heads, int64_t k_heads, int64_t head_dim, int num_threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * (q_heads + k_heads) * head_dim > 32768)
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < q_heads + k_heads; h++) {
            const float *x = qkv + t * qkv_stride + h * head_dim;
            float *o = h < q_heads ? q_out + (t * q_heads + h) * head_dim : k_out + (t * k_heads + h - q_heads) * head_dim;
            for (int64_t d = 0; d < half; d++) o[d] = x[d] * c[d] - x[d + half] * s[d];
            for (int64_t d = half; d < head_dim; d++) o[d] = x[d] * c[d] + x[d - half] * s[d];
        }
    }
}

/* torch in bfloat16: x * cos and rotate_half(x) * sin rounded, then their sum rounded */
static void rope_bf16(const uint16_t *qkv, int64_t qkv_stride, const uint16_t *cos, const uint16_t *sin,
                      uint16_t *q_out, uint16_t *k_out, int64_t rows, int64_t q_heads, int64_t k_heads,
                      int64_t head_dim, int num_threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * (q_heads + k_heads) * head_dim > 32768)
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < q_heads + k_heads; h++) {
            const uint16_t *x = qkv + t * qkv_stride + h * head_dim;
            uint16_t *o = h < q_heads ? q_out + (t * q_heads + h) * head_dim
                                      : k_out + (t * k_heads + h - q_heads) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) {
                const float rotated = d < half ? -bf16_to_float(x[d + half]) : bf16_to_float(x[d - half]);
                o[d] = float_to_bf16(round_bf16(bf16_to_float(x[d]) * bf16_to_float(c[d])) +
                                     round_bf16(rotated * bf16_to_float(s[d])));
            }
        }
    }
}

/* qkv rows: [q heads | k heads | ...] of head_dim each, row stride qkv_stride elements; cos/sin rows
 * [head_dim] per token. q_out [rows, q_heads, head_dim], k_out [rows, k_heads, head_dim]. */
int pd_rope(int dtype, const void *qkv, int64_t qkv_stride, const void *cos, const void *sin, void *q_out,
            void *k_out, int64_t rows, int64_t q_heads, int64_t k_heads, int64_t head_dim, int num_threads) {
    if (dtype == 0)
        rope_f32((const float *)qkv, qkv_stride, (const float *)cos, (const float *)sin, (float *)q_out,
                 (float *)k_out, rows, q_heads, k_heads, head_dim, num_threads);
    else
        rope_bf16((const uint16_t *)qkv, qkv_stride, (const uint16_t *)cos, (const uint16_t *)sin,
                  (uint16_t *)q_out, (uint16_t *)k_out, rows, q_heads, k_heads, head_dim, num_threads);
    return 0;
}
