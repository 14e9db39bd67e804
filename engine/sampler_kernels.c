#include "engine/sampler_kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define SMPK_HAVE_X86 1
#define SMPK_AVX2     __attribute__((target("avx2,fma")))
#endif

/* ---- e^x, x <= 0 ----
 * x = n ln2 + r with n = rint(x / ln2) and |r| <= ln2 / 2 (ln2 split in two
 * so that n ln2_hi is exact), e^r by its Taylor polynomial of degree 7 (the
 * first term left out, r^8 / 8!, is under 6e-9 relative: a tenth of an ulp),
 * times 2^n built in the exponent bits. Below SMPK_EXP_LO, 2^n would leave
 * the normal range: the result is 0 there (a probability under 1e-38 of the
 * largest one, which a float draw cannot pick anyway). */
#define SMPK_EXP_LO (-87.33654f) /* ln(2^-126) */
#define SMPK_LOG2E  1.44269504f
#define SMPK_LN2_HI 0.693359375f /* 355/512: n * SMPK_LN2_HI is exact for |n| < 2^15 */
#define SMPK_LN2_LO (-2.12194440e-4f)
#define SMPK_C7     (1.0f / 5040.0f)
#define SMPK_C6     (1.0f / 720.0f)
#define SMPK_C5     (1.0f / 120.0f)
#define SMPK_C4     (1.0f / 24.0f)
#define SMPK_C3     (1.0f / 6.0f)
#define SMPK_C2     0.5f

float smpk_exp(float x)
{
    if (!(x >= SMPK_EXP_LO)) return 0.0f; /* also -inf and NaN */
    if (x > 0.0f) x = 0.0f;
    float n = rintf(x * SMPK_LOG2E);
    float r = fmaf(n, -SMPK_LN2_HI, x);
    r = fmaf(n, -SMPK_LN2_LO, r);
    float p = SMPK_C7;
    p = fmaf(p, r, SMPK_C6);
    p = fmaf(p, r, SMPK_C5);
    p = fmaf(p, r, SMPK_C4);
    p = fmaf(p, r, SMPK_C3);
    p = fmaf(p, r, SMPK_C2);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

float smpk_fold8(const float a[8])
{
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

float smpk_exp_sum_generic(float *out, const float *x, int n, float mx, float t)
{
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            out[i + l] = smpk_exp((x[i + l] - mx) / t);
            acc[l] += out[i + l];
        }
    float s = smpk_fold8(acc);
    for (; i < n; i++) {
        out[i] = smpk_exp((x[i] - mx) / t);
        s += out[i];
    }
    return s;
}

void smpk_silu_mul_generic(float *g, const float *u, int n)
{
    for (int i = 0; i < n; i++) {
        float x = g[i];
        float e = smpk_exp(-fabsf(x));
        float s = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
        g[i] = x * s * u[i];
    }
}

float smpk_max_generic(const float *x, int n)
{
    float mx = x[0];
    if (isnan(mx)) return NAN;
    for (int i = 1; i < n; i++) {
        if (isnan(x[i])) return NAN;
        if (x[i] > mx) mx = x[i];
    }
    return mx;
}

/* The first element equal to the maximum (-0 == +0, as x[i] > x[best]
 * would have it): the AVX2 version's two passes, one element at a time. */
int smpk_argmax_generic(const float *x, int n)
{
    float mx = smpk_max_generic(x, n);
    if (isnan(mx)) return -1;
    for (int i = 0; i < n; i++)
        if (x[i] == mx) return i;
    return 0; /* not reached: mx is one of the elements */
}

#ifdef SMPK_HAVE_X86
/* smpk_exp on 8 lanes: the same operations, in the same order. */
SMPK_AVX2 static inline __m256 smpk__exp8(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(SMPK_EXP_LO);
    __m256 ok = _mm256_cmp_ps(x, lo, _CMP_GE_OQ); /* false for NaN */
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_setzero_ps()), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(SMPK_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(SMPK_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(SMPK_LN2_LO), r);
    __m256 p = _mm256_set1_ps(SMPK_C7);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SMPK_C6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SMPK_C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SMPK_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SMPK_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(SMPK_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), ok);
}

/* x - mx, divided by t unless t is 1 (x / 1 is x, bit for bit, NaN and
 * infinities included): a softmax at t = 1, the attention's, spends no
 * division per element. */
SMPK_AVX2 static inline __m256 smpk__scaled8(__m256 x, __m256 vmx, __m256 vt, int divide)
{
    x = _mm256_sub_ps(x, vmx);
    return divide ? _mm256_div_ps(x, vt) : x;
}

SMPK_AVX2 static inline __attribute__((always_inline)) float
smpk__exp_sum_t_avx2(float *out, const float *x, int n, float mx, float t, int divide)
{
    const __m256 vmx = _mm256_set1_ps(mx), vt = _mm256_set1_ps(t);
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = smpk__exp8(smpk__scaled8(_mm256_loadu_ps(x + i), vmx, vt, divide));
        _mm256_storeu_ps(out + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float a[8];
    _mm256_storeu_ps(a, acc);
    float s = smpk_fold8(a);
    if (i < n) {
        /* The tail's exponentials in one vector (the lanes past n load 0 and
         * are dropped), added to the sum one by one, in order. */
        int k = n - i;
        __m256i live =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 e = smpk__exp8(smpk__scaled8(_mm256_maskload_ps(x + i, live), vmx, vt, divide));
        _mm256_storeu_ps(a, e);
        for (int l = 0; l < k; l++) {
            out[i + l] = a[l];
            s += a[l];
        }
    }
    return s;
}

SMPK_AVX2 static float smpk__exp_sum_avx2(float *out, const float *x, int n, float mx, float t)
{
    return t == 1.0f ? smpk__exp_sum_t_avx2(out, x, n, mx, t, 0)
                     : smpk__exp_sum_t_avx2(out, x, n, mx, t, 1);
}

/* smpk_silu_mul_generic on 8 lanes: the same operations, in the same order
 * (-|x| by setting the sign bit, as fabsf then negation gives). */
SMPK_AVX2 static void smpk__silu_mul_avx2(float *g, const float *u, int n)
{
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = smpk__exp8(_mm256_or_ps(x, sign));
        __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ); /* false for NaN */
        __m256 s = _mm256_div_ps(_mm256_blendv_ps(e, one, pos), _mm256_add_ps(one, e));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_loadu_ps(u + i)));
    }
    smpk_silu_mul_generic(g + i, u + i, n - i);
}

/* The maximum, or NaN when any element is NaN: 16 lanes in two vectors. */
SMPK_AVX2 static float smpk__max_avx2(const float *x, int n)
{
    if (n < 16) return smpk_max_generic(x, n);
    __m256 m0 = _mm256_loadu_ps(x), m1 = _mm256_loadu_ps(x + 8);
    __m256 nan =
        _mm256_or_ps(_mm256_cmp_ps(m0, m0, _CMP_UNORD_Q), _mm256_cmp_ps(m1, m1, _CMP_UNORD_Q));
    int i = 16;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q),
                                             _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
        m0 = _mm256_max_ps(m0, a);
        m1 = _mm256_max_ps(m1, b);
    }
    if (_mm256_movemask_ps(nan)) return NAN;
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
    float mx = lanes[0];
    for (int l = 1; l < 8; l++)
        if (lanes[l] > mx) mx = lanes[l];
    for (; i < n; i++) {
        if (isnan(x[i])) return NAN;
        if (x[i] > mx) mx = x[i];
    }
    return mx;
}

/* Two passes: the maximum (smpk__max_avx2), then the first element equal to
 * it. Comparing for equality makes -0 and +0 one value, as the generic
 * scan's x[i] > x[best] does. */
SMPK_AVX2 static int smpk__argmax_avx2(const float *x, int n)
{
    if (n < 16) return smpk_argmax_generic(x, n);
    float mx = smpk__max_avx2(x, n);
    if (isnan(mx)) return -1;
    const __m256 vm = _mm256_set1_ps(mx);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), vm, _CMP_EQ_OQ));
        if (hit) return j + __builtin_ctz((unsigned)hit);
    }
    for (; j < n; j++)
        if (x[j] == mx) return j;
    return 0; /* not reached: mx is one of the elements */
}
#endif

static int (*smpk__argmax_impl)(const float *, int) = smpk_argmax_generic;
static float (*smpk__max_impl)(const float *, int) = smpk_max_generic;
static float (*smpk__exp_sum_impl)(float *, const float *, int, float,
                                   float) = smpk_exp_sum_generic;
static void (*smpk__silu_mul_impl)(float *, const float *, int) = smpk_silu_mul_generic;
static const char *smpk__name = "generic";

static void smpk__select(void)
{
#ifdef SMPK_HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        smpk__argmax_impl = smpk__argmax_avx2;
        smpk__max_impl = smpk__max_avx2;
        smpk__exp_sum_impl = smpk__exp_sum_avx2;
        smpk__silu_mul_impl = smpk__silu_mul_avx2;
        smpk__name = "avx2";
    }
#endif
}

static void smpk__init(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, smpk__select);
}

int smpk_argmax(const float *x, int n)
{
    smpk__init();
    return smpk__argmax_impl(x, n);
}

float smpk_max(const float *x, int n)
{
    smpk__init();
    return smpk__max_impl(x, n);
}

float smpk_exp_sum(float *out, const float *x, int n, float mx, float t)
{
    smpk__init();
    return smpk__exp_sum_impl(out, x, n, mx, t);
}

void smpk_silu_mul(float *g, const float *u, int n)
{
    smpk__init();
    smpk__silu_mul_impl(g, u, n);
}

const char *smpk_variant(void)
{
    smpk__init();
    return smpk__name;
}
