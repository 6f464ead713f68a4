/* Fused float32 element-wise steps of a Llama layer: one pass over memory each, instead of the three
 * to five tensor operations (and temporaries) PyTorch runs for them.
 *   pd_silu_mul: out[t, i] = silu(x[t, i]) * x[t, inter + i] for x = [gate | up] rows;
 *   pd_add_rms_norm: optionally x += residual, then out = weight * x / sqrt(mean(x^2) + eps) per row;
 *   pd_rope: rotate-half RoPE of the q and k heads of fused qkv rows into contiguous q and k.
 * Rows are split across OpenMP threads. Every function returns 0. */
#include <math.h>
#include <stdint.h>

#include "simd.h"

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

int pd_add_rms_norm(float *x, const float *residual, const float *weight, float *out, int64_t rows, int64_t dim,
                    float eps, int num_threads) {
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
    return 0;
}

/* qkv rows: [q heads | k heads | ...] of head_dim each, row stride qkv_stride floats; cos/sin rows
 * [head_dim] per token. q_out [rows, q_heads, head_dim], k_out [rows, k_heads, head_dim]. */
int pd_rope(const float *qkv, int64_t qkv_stride, const float *cos, const float *sin, float *q_out, float *k_out,
            int64_t rows, int64_t q_heads, int64_t k_heads, int64_t head_dim, int num_threads) {
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
    return 0;
}
