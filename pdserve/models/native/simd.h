/* 8-lane float vectors (GCC vector extensions: AVX2 with -march=native, plain code elsewhere), bfloat16
 * loads and stores (rounded to nearest even, as torch rounds) and the exponential the native kernels share. */
#ifndef PD_SIMD_H
#define PD_SIMD_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

typedef int32_t v8i __attribute__((vector_size(32)));

/* where mask (-1 / 0 per lane): a, else b (C has no vector ?:) */
static inline v8 select8(v8i mask, v8 a, v8 b) { return (v8)(((v8i)a & mask) | ((v8i)b & ~mask)); }

static inline float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline float hmax8(v8 v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* e^x of 8 floats (Cephes expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp for x in
 * [-87, 88], inputs below clamp to ~0): softmax's exponentials in vector registers instead of 8
 * scalar expf calls */
static inline v8 exp8(v8 x) {
    const v8 hi = {88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f,
                   88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f};
    x = select8(x < hi, x, hi);
    x = select8(x > -hi, x, -hi);
    v8 fx = x * 1.44269504088896341f + 0.5f;
    v8 t = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8); /* truncation, then floor: */
    t += __builtin_convertvector(t > fx, v8);                            /* the mask is -1 where t > fx */
    x = x - t * 0.693359375f + t * 2.12194440e-4f;
    v8 y = 1.9875691500e-4f * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    const v8i pow2n = (__builtin_convertvector(t, v8i) + 127) << 23;
    return y * (v8)pow2n;
}

typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

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

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

static inline v8 load8_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    return (v8)(__builtin_convertvector(h, v8u) << 16);
}

/* rounded to nearest even; NaN stays NaN */
static inline v8h to_bf16_8(v8 f) {
    const v8u u = (v8u)f;
    const v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const v8u nan = (v8u)(f != f);
    return __builtin_convertvector((rounded & ~nan) | (((u >> 16) | 0x40u) & nan), v8h);
}

static inline void store8_bf16(uint16_t *p, v8 f) {
    const v8h h = to_bf16_8(f);
    memcpy(p, &h, sizeof h);
}

/* f rounded to bfloat16 and back (the value torch keeps after a bf16 operation) */
static inline v8 round8_bf16(v8 f) { return (v8)(__builtin_convertvector(to_bf16_8(f), v8u) << 16); }

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* code for AVX512-BF16 whatever -march says, called only where __builtin_cpu_supports("avx512bf16") */
#define PD_AVX512_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

/* e^x of 16 floats: exp8's Cephes range reduction and polynomial in 512-bit registers */
PD_AVX512_BF16_TARGET static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    const __m512 hi = _mm512_set1_ps(88.3762626647949f);
    x = _mm512_max_ps(_mm512_min_ps(x, hi), _mm512_sub_ps(_mm512_setzero_ps(), hi));
    const __m512 t = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fmadd_ps(t, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(t, _mm512_set1_ps(0.693359375f), x));
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0f));
    const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(t), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n));
}

#endif

#endif
