#include "engine/backend/cpu/cpu_kernels.h"

#include <math.h>
#include <pthread.h>

#if defined(__x86_64__)
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
    for (; j + 4 <= j1; j += 4) {
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
#endif

/* The scalar tails above are plain a*b+s; with -ffp-contract=off (ISO C mode)
 * they are never fused, in both the 4-row and the 1-row path, so both give the
 * same bits. */

static float (*ck__dot_impl)(const float *, const float *, int) = ck__dot_generic;
static void (*ck__matmul_impl)(float *, int, const float *, const float *, const float *, int, int,
                               int, int) = ck__matmul_generic;
static const char *ck__name = "generic";

static void ck__select(void)
{
#ifdef CK_HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        ck__dot_impl = ck__dot_avx2;
        ck__matmul_impl = ck__matmul_avx2;
        ck__name = "avx2";
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

void ck_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    float ss = ck_dot(x, x, n);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * inv);
}
