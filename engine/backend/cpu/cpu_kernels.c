#include "engine/backend/cpu/cpu_kernels.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#define CK_HAVE_X86 1
#endif

/* Generic version: the same association as the AVX2 one (lane l of
 * accumulator a sums elements 16*i + 8*a + l), without FMA. */
static float ck__dot_generic(const float *a, const float *b, int n)
{
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++)
            acc[l] += a[i + l] * b[i + l];
    float s8[8];
    for (int l = 0; l < 8; l++)
        s8[l] = acc[l] + acc[8 + l];
    float s = ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void ck__matmul_generic(float *out, int ldo, const float *x, const float *W,
                               const float *bias, int T, int K, int j0, int j1)
{
    for (int j = j0; j < j1; j++) {
        const float *w = W + (size_t)j * K;
        float bj = bias ? bias[j] : 0.0f;
        for (int t = 0; t < T; t++)
            out[(size_t)t * ldo + j] = ck__dot_generic(x + (size_t)t * K, w, K) + bj;
    }
}

#ifdef CK_HAVE_X86
__attribute__((target("avx2,fma"))) static inline float ck__hsum(__m256 a, __m256 b)
{
    __m256 s = _mm256_add_ps(a, b);          /* s8[l] */
    __m128 lo = _mm256_castps256_ps128(s);   /* l 0..3 */
    __m128 hi = _mm256_extractf128_ps(s, 1); /* l 4..7 */
    __m128 q = _mm_add_ps(lo, hi);           /* (0+4) (1+5) (2+6) (3+7) */
    __m128 sh = _mm_movehl_ps(q, q);         /* (2+6) (3+7) */
    __m128 p = _mm_add_ps(q, sh);            /* (0+4)+(2+6), (1+5)+(3+7) */
    __m128 p1 = _mm_shuffle_ps(p, p, 1);
    return _mm_cvtss_f32(_mm_add_ss(p, p1));
}

__attribute__((target("avx2,fma"))) static float ck__dot_avx2(const float *a, const float *b, int n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    float s = ck__hsum(a0, a1);
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Four rows of W against one x row: the same per-row operations as
 * ck__dot_avx2, interleaved so each x load feeds four FMA chains pairs. */
__attribute__((target("avx2,fma"))) static void ck__dot4_avx2(const float *x, const float *w0,
                                                              int K, float *r)
{
    const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps();
    __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
    __m256 a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps();
    __m256 a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= K; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a00 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + i), a00);
        a01 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w0 + i + 8), a01);
        a10 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w1 + i), a10);
        a11 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + i + 8), a11);
        a20 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w2 + i), a20);
        a21 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w2 + i + 8), a21);
        a30 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w3 + i), a30);
        a31 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w3 + i + 8), a31);
    }
    float s0 = ck__hsum(a00, a01), s1 = ck__hsum(a10, a11);
    float s2 = ck__hsum(a20, a21), s3 = ck__hsum(a30, a31);
    for (; i < K; i++) {
        s0 += x[i] * w0[i];
        s1 += x[i] * w1[i];
        s2 += x[i] * w2[i];
        s3 += x[i] * w3[i];
    }
    r[0] = s0;
    r[1] = s1;
    r[2] = s2;
    r[3] = s3;
}

__attribute__((target("avx2,fma"))) static void ck__matmul_avx2(float *out, int ldo, const float *x,
                                                                const float *W, const float *bias,
                                                                int T, int K, int j0, int j1)
{
    int j = j0;
    /* With few rows of x the product streams W from memory: one W row at a
     * time keeps a single sequential stream, which the prefetchers follow
     * best (measured ~25% faster than four interleaved rows at T = 1). With
     * more rows, four W rows share each load of x. Both paths compute every
     * element with ck__dot_avx2's exact operation order. */
    int j4 = T < 4 ? j0 : j1; /* end of the four-row part */
    for (; j + 4 <= j4; j += 4) {
        const float *w = W + (size_t)j * K;
        for (int t = 0; t < T; t++) {
            float r[4];
            ck__dot4_avx2(x + (size_t)t * K, w, K, r);
            float *o = out + (size_t)t * ldo + j;
            for (int u = 0; u < 4; u++)
                o[u] = r[u] + (bias ? bias[j + u] : 0.0f);
        }
    }
    for (; j < j1; j++) {
        const float *w = W + (size_t)j * K;
        for (int t = 0; t < T; t++)
            out[(size_t)t * ldo + j] =
                ck__dot_avx2(x + (size_t)t * K, w, K) + (bias ? bias[j] : 0.0f);
    }
}

__attribute__((target("avx2,fma"))) static void ck__scores_avx2(float *out, const float *q,
                                                                const float *rows, size_t stride,
                                                                int n, int hd, float scale)
{
    for (int j = 0; j < n; j++)
        out[j] = ck__dot_avx2(q, rows + (size_t)j * stride, hd) * scale;
}

__attribute__((target("avx2,fma"))) static void
ck__accum_avx2(float *acc, const float *w, const float *rows, size_t stride, int n, int hd)
{
    /* acc[i] + w[j] * v_j[i], unfused and in order of j for every element, as
     * the generic version; 32 elements of acc stay in registers across j. */
    int i = 0;
    for (; i + 32 <= hd; i += 32) {
        __m256 a0 = _mm256_loadu_ps(acc + i), a1 = _mm256_loadu_ps(acc + i + 8);
        __m256 a2 = _mm256_loadu_ps(acc + i + 16), a3 = _mm256_loadu_ps(acc + i + 24);
        for (int j = 0; j < n; j++) {
            const float *v = rows + (size_t)j * stride + i;
            __m256 wj = _mm256_set1_ps(w[j]);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(wj, _mm256_loadu_ps(v)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(wj, _mm256_loadu_ps(v + 8)));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(wj, _mm256_loadu_ps(v + 16)));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(wj, _mm256_loadu_ps(v + 24)));
        }
        _mm256_storeu_ps(acc + i, a0);
        _mm256_storeu_ps(acc + i + 8, a1);
        _mm256_storeu_ps(acc + i + 16, a2);
        _mm256_storeu_ps(acc + i + 24, a3);
    }
    for (; i + 8 <= hd; i += 8) {
        __m256 a0 = _mm256_loadu_ps(acc + i);
        for (int j = 0; j < n; j++) {
            __m256 v = _mm256_loadu_ps(rows + (size_t)j * stride + i);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_set1_ps(w[j]), v));
        }
        _mm256_storeu_ps(acc + i, a0);
    }
    for (; i < hd; i++)
        for (int j = 0; j < n; j++)
            acc[i] += w[j] * rows[(size_t)j * stride + i];
}
#endif

static void ck__scores_generic(float *out, const float *q, const float *rows, size_t stride, int n,
                               int hd, float scale)
{
    for (int j = 0; j < n; j++)
        out[j] = ck__dot_generic(q, rows + (size_t)j * stride, hd) * scale;
}

static void ck__accum_generic(float *acc, const float *w, const float *rows, size_t stride, int n,
                              int hd)
{
    for (int j = 0; j < n; j++) {
        const float *v = rows + (size_t)j * stride;
        for (int i = 0; i < hd; i++)
            acc[i] += w[j] * v[i];
    }
}

/* The scalar tails above are plain a*b+s; with -ffp-contract=off (ISO C mode)
 * they are never fused, in both the 4-row and the 1-row path, so both give the
 * same bits. */

/* ---- binary16 ---- */

static uint16_t ck__h_from_f(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xffu, man = x & 0x7fffffu;
    if (exp == 0xff) /* inf; NaN keeps its top payload bits and is made quiet, as F16C does */
        return (uint16_t)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u); /* overflow: inf */
    if (e <= 0) {                                   /* subnormal or zero */
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000u;
        int shift = 14 - e;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* a carry may round up to inf */
    return (uint16_t)(sign | h);
}

static float ck__f_from_h(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) { /* inf, or NaN made quiet as F16C does */
        bits = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void ck__to_f16_generic(uint16_t *dst, const float *src, int n)
{
    for (int i = 0; i < n; i++)
        dst[i] = ck__h_from_f(src[i]);
}

static void ck__from_f16_generic(float *dst, const uint16_t *src, int n)
{
    for (int i = 0; i < n; i++)
        dst[i] = ck__f_from_h(src[i]);
}

#ifdef CK_HAVE_X86
__attribute__((target("avx,f16c"))) static void ck__to_f16_f16c(uint16_t *dst, const float *src,
                                                                int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = ck__h_from_f(src[i]);
}

__attribute__((target("avx,f16c"))) static void ck__from_f16_f16c(float *dst, const uint16_t *src,
                                                                  int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = ck__f_from_h(src[i]);
}
#endif

static void (*ck__to_f16_impl)(uint16_t *, const float *, int) = ck__to_f16_generic;
static void (*ck__from_f16_impl)(float *, const uint16_t *, int) = ck__from_f16_generic;

void ck_f32_to_f16(uint16_t *dst, const float *src, int n)
{
    ck__to_f16_impl(dst, src, n);
}

void ck_f16_to_f32(float *dst, const uint16_t *src, int n)
{
    ck__from_f16_impl(dst, src, n);
}

static float (*ck__dot_impl)(const float *, const float *, int) = ck__dot_generic;
static void (*ck__scores_impl)(float *, const float *, const float *, size_t, int, int,
                               float) = ck__scores_generic;
static void (*ck__accum_impl)(float *, const float *, const float *, size_t, int,
                              int) = ck__accum_generic;
static void (*ck__matmul_impl)(float *, int, const float *, const float *, const float *, int, int,
                               int, int) = ck__matmul_generic;
static const char *ck__name = "generic";

#ifdef CK_HAVE_X86
/* F16C from CPUID leaf 1 (clang before 16 rejects "f16c" in
 * __builtin_cpu_supports). */
static int ck__has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

static void ck__select(void)
{
#ifdef CK_HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        ck__dot_impl = ck__dot_avx2;
        ck__matmul_impl = ck__matmul_avx2;
        ck__scores_impl = ck__scores_avx2;
        ck__accum_impl = ck__accum_avx2;
        ck__name = "avx2";
    }
    if (__builtin_cpu_supports("avx") && ck__has_f16c()) {
        ck__to_f16_impl = ck__to_f16_f16c;
        ck__from_f16_impl = ck__from_f16_f16c;
    }
#endif
}

void ck_init(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, ck__select);
}

const char *ck_variant(void)
{
    return ck__name;
}

float ck_dot(const float *a, const float *b, int n)
{
    return ck__dot_impl(a, b, n);
}

void ck_matmul(float *out, int ldo, const float *x, const float *W, const float *bias, int T, int K,
               int j0, int j1)
{
    ck__matmul_impl(out, ldo, x, W, bias, T, K, j0, j1);
}

void ck_attn_scores(float *out, const float *q, const float *rows, size_t stride, int n, int hd,
                    float scale)
{
    ck__scores_impl(out, q, rows, stride, n, hd, scale);
}

void ck_attn_accum(float *acc, const float *w, const float *rows, size_t stride, int n, int hd)
{
    ck__accum_impl(acc, w, rows, stride, n, hd);
}

void ck_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    float ss = ck_dot(x, x, n);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * inv);
}
