#include "engine/backend/cpu/cpu_kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#define CK_HAVE_X86 1
#endif

/* ---- weight elements in their stored dtype ----
 * Weights are F32, IEEE binary16 or bfloat16 (enum mdl_dtype). Widening a
 * half-precision element to F32 is exact, so a product computed on widened
 * elements gives the same bits as one on weights widened at load. */

static float ck__f_from_h(uint16_t h);

static inline float ck__w1(const void *W, size_t i, enum mdl_dtype wt)
{
    if (wt == MDL_DTYPE_F32) return ((const float *)W)[i];
    uint16_t h = ((const uint16_t *)W)[i];
    if (wt == MDL_DTYPE_F16) return ck__f_from_h(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Generic version: the same association as the AVX2 one (lane l of
 * accumulator a sums elements 16*i + 8*a + l), without FMA. w: element offset
 * woff of W. */
static inline float ck__dotw_generic(const float *a, const void *W, size_t woff, enum mdl_dtype wt,
                                     int n)
{
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++)
            acc[l] += a[i + l] * ck__w1(W, woff + (size_t)(i + l), wt);
    float s8[8];
    for (int l = 0; l < 8; l++)
        s8[l] = acc[l] + acc[8 + l];
    float s = ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]));
    for (; i < n; i++)
        s += a[i] * ck__w1(W, woff + (size_t)i, wt);
    return s;
}

static float ck__dot_generic(const float *a, const float *b, int n)
{
    return ck__dotw_generic(a, b, 0, MDL_DTYPE_F32, n);
}

static void ck__matmul_generic(float *out, int ldo, const float *x, const void *W,
                               enum mdl_dtype wt, const float *bias, int T, int K, int j0, int j1)
{
    for (int j = j0; j < j1; j++) {
        float bj = bias ? bias[j] : 0.0f;
        for (int t = 0; t < T; t++)
            out[(size_t)t * ldo + j] =
                ck__dotw_generic(x + (size_t)t * K, W, (size_t)j * K, wt, K) + bj;
    }
}

#ifdef CK_HAVE_X86
#define CK_AVX2   __attribute__((target("avx2,fma,f16c")))
#define CK_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

CK_AVX2 static inline float ck__hsum(__m256 a, __m256 b)
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

/* Eight weights from element offset off, widened to F32. */
CK_AVX2 static inline __m256 ck__ld8(const void *W, size_t off, enum mdl_dtype wt)
{
    if (wt == MDL_DTYPE_F32) return _mm256_loadu_ps((const float *)W + off);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)W + off));
    if (wt == MDL_DTYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* dot(a, W[woff .. woff + n)) in ck_dot's order. */
CK_AVX2 static inline float ck__dotw_avx2(const float *a, const void *W, size_t woff,
                                          enum mdl_dtype wt, int n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), ck__ld8(W, woff + (size_t)i, wt), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), ck__ld8(W, woff + (size_t)i + 8, wt), a1);
    }
    float s = ck__hsum(a0, a1);
    for (; i < n; i++)
        s += a[i] * ck__w1(W, woff + (size_t)i, wt);
    return s;
}

CK_AVX2 static float ck__dot_avx2(const float *a, const float *b, int n)
{
    return ck__dotw_avx2(a, b, 0, MDL_DTYPE_F32, n);
}

/* ---- AVX2: register-blocked ----
 * ck__dotw_avx2 gives each output element two accumulators (lane l of a0
 * sums elements 16i + l, lane l of a1 elements 16i + 8 + l, by FMA in order
 * of i), then ck__hsum(a0, a1), the scalar tail and the bias (or +0.0f). A
 * block of rj W rows by rt x rows gives each of its elements exactly those
 * operations, so every element has the bits of the one-row version whatever
 * the block shape.
 *
 * 16 ymm registers. The two accumulators of an element never meet before
 * the horizontal sum, so a large block runs two passes over K, a0's lanes
 * then a1's, and keeps the first pass's accumulators in memory: CK2_RJ x
 * CK2_RT = 4 x 3 elements are 12 accumulators plus 3 x vectors and 1 W
 * vector, and per 8-element step 7 loads feed 12 FMAs (one x row against 4
 * W rows, as before: 10 loads for 8 FMAs, every W row reloaded for each row
 * of x). One call runs a W block against all of a tile's x rows
 * (ck__col256), each block prefetching the next block's x rows into L1.
 * With 1-3 rows of x the product streams W from memory: blocks of
 * CK2_RJ W rows, one x row at a time in a single pass (8 accumulators),
 * prefetching W CK2_PFD bytes ahead: four chains per block instead of one
 * dependent chain per row. */
#define CK2_RJ  4
#define CK2_RT  3
#define CK2_PFD 8192
/* Bytes of the next W block prefetched per 16-element step of a two-pass
 * block (one prefetch instruction per step, a new line every fourth): the
 * next 4 W rows are spread over the first blocks of a column, both passes
 * of each. Measured against 32 and 64 (and against the earlier scheme,
 * 1/8 of the rows per block in the first pass only, with a run-time step
 * count per step): 16 gave the kernel alone at 32 rows 70-71% of the FMA
 * peak against 67-68% (F32) and 69% against 67% (BF16). */
#define CK2_PFSTEP 16

/* The horizontal sums of four elements from their accumulator sums
 * s = a0 + a1, each with exactly ck__hsum's additions after its first:
 * q = s[0..3] + s[4..7], p = (q0 + q2, q1 + q3), r = p0 + p1. Returns
 * (r_a, r_b, r_c, r_d). */
CK_AVX2 static inline __m128 ck__hsum8x4(__m256 sa, __m256 sb, __m256 sc, __m256 sd)
{
    /* [qa | qb], [qc | qd] */
    __m256 qab =
        _mm256_add_ps(_mm256_permute2f128_ps(sa, sb, 0x20), _mm256_permute2f128_ps(sa, sb, 0x31));
    __m256 qcd =
        _mm256_add_ps(_mm256_permute2f128_ps(sc, sd, 0x20), _mm256_permute2f128_ps(sc, sd, 0x31));
    /* [pa0 pa1 pc0 pc1 | pb0 pb1 pd0 pd1] */
    __m256 p = _mm256_add_ps(_mm256_shuffle_ps(qab, qcd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(qab, qcd, _MM_SHUFFLE(3, 2, 3, 2)));
    /* [ra rc ra rc | rb rd rb rd] */
    __m256 r = _mm256_add_ps(_mm256_shuffle_ps(p, p, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm256_shuffle_ps(p, p, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm_unpacklo_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
}

/* One pass of a block over K for accumulator half h (h < 0: both halves,
 * acc[a][b][0] and [1]; else acc[a][b][h] only). pf as in ck__blk256. */
/* BF16 weights against packed x (ck__pack_x): the 16 weights from element
 * offset off as two vectors without a shift, g = 0 elements 0-3 and 8-11,
 * g = 1 elements 4-7 and 12-15, each a zero word under each weight. */
CK_AVX2 static inline __m256 ck__ld8_bf16_packed(const void *W, size_t off, int g)
{
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W + off));
    __m256i z = _mm256_setzero_si256();
    return _mm256_castsi256_ps(g ? _mm256_unpackhi_epi16(z, h) : _mm256_unpacklo_epi16(z, h));
}

/* x rows for ck__ld8_bf16_packed: each whole group of 16 elements reordered
 * to 0-3 8-11 4-7 12-15 (the lanes the unpacks give the weights), the tail
 * after the last whole group left in place. */
CK_AVX2 static void ck__pack_x(float *xp, const float *x, int rows, int K)
{
    for (int r = 0; r < rows; r++) {
        const float *src = x + (size_t)r * K;
        float *dst = xp + (size_t)r * K;
        int i = 0;
        for (; i + 16 <= K; i += 16) {
            __m256 a = _mm256_loadu_ps(src + i), b = _mm256_loadu_ps(src + i + 8);
            _mm256_storeu_ps(dst + i, _mm256_permute2f128_ps(a, b, 0x20));
            _mm256_storeu_ps(dst + i + 8, _mm256_permute2f128_ps(a, b, 0x31));
        }
        for (; i < K; i++)
            dst[i] = src[i];
    }
}

CK_AVX2 static inline __attribute__((always_inline)) void
ck__pass256(__m256 acc[CK2_RJ][CK2_RT][2], const float *xt, const void *W, size_t wo,
            enum mdl_dtype wt, int K, const char *pf, const int pstep, const char *px, const int rj,
            const int rt, const int h, const int packed)
{
    /* pf: pstep bytes per step from pf on (a constant at every call site,
     * so the prefetch loop unrolls; pointers stepped, not recomputed) */
    /* px: the next rt rows of x, half of them per pass */
    const size_t xstep = (size_t)rt * 8 * sizeof(float);
    if (px && h == 1) px += (size_t)rt * K / 2 * sizeof(float);
#pragma GCC unroll 8
    for (int a = 0; a < rj; a++)
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++)
#pragma GCC unroll 2
            for (int g = 0; g < 2; g++)
                if (h < 0 || g == h) acc[a][b][g] = _mm256_setzero_ps();
    for (int i = 0; i + 16 <= K; i += 16) {
        if (pf) {
#pragma GCC unroll 8
            for (int u = 0; u < pstep; u += 64)
                _mm_prefetch(pf + u, _MM_HINT_T0);
            pf += pstep;
        }
        if (px) {
#pragma GCC unroll 8
            for (size_t u = 0; u < xstep; u += 64)
                _mm_prefetch(px + u, _MM_HINT_T0);
            px += xstep;
        }
#pragma GCC unroll 2
        for (int g = 0; g < 2; g++) {
            if (h >= 0 && g != h) continue;
            __m256 xv[CK2_RT];
#pragma GCC unroll 8
            for (int b = 0; b < rt; b++)
                xv[b] = _mm256_loadu_ps(xt + (size_t)b * K + i + 8 * g);
#pragma GCC unroll 8
            for (int a = 0; a < rj; a++) {
                __m256 w = packed ? ck__ld8_bf16_packed(W, wo + (size_t)a * K + (size_t)i, g)
                                  : ck__ld8(W, wo + (size_t)a * K + (size_t)(i + 8 * g), wt);
                /* one load per W vector: without this the compiler folds
                 * the load into every FMA, rt loads instead of one */
                if (rt > 1) __asm__("" : "+x"(w));
#pragma GCC unroll 8
                for (int b = 0; b < rt; b++)
                    acc[a][b][g] = _mm256_fmadd_ps(xv[b], w, acc[a][b][g]);
            }
        }
    }
}

/* out[t + b][j + a] for a < rj, b < rt (constants at every call site). pf:
 * W bytes to prefetch while the block runs, or NULL: a one-pass block
 * prefetches the rj * K elements from pf (as many bytes per step as the
 * step reads), a two-pass block CK2_PFSTEP bytes per step of each pass,
 * K / 16 * 2 * CK2_PFSTEP bytes in all. */
CK_AVX2 static inline __attribute__((always_inline)) void
ck__blk256(float *out, int ldo, const float *x, const void *W, enum mdl_dtype wt, const float *bias,
           int K, int j, int t, const char *pf, const char *px, const int rj, const int rt,
           const int packed)
{
    __m256 acc[CK2_RJ][CK2_RT][2];
    const float *xt = x + (size_t)t * K;
    size_t wo = (size_t)j * K;
    if (rj * rt * 2 > 12) {
        /* two passes: a0's lanes, kept, then a1's (packed: the low unpack's
         * elements, then the high one's) */
        __m256 keep[CK2_RJ][CK2_RT];
        ck__pass256(acc, xt, W, wo, wt, K, pf, CK2_PFSTEP, px, rj, rt, 0, packed);
#pragma GCC unroll 8
        for (int a = 0; a < rj; a++)
#pragma GCC unroll 8
            for (int b = 0; b < rt; b++)
                keep[a][b] = acc[a][b][0];
        ck__pass256(acc, xt, W, wo, wt, K, pf ? pf + (size_t)K / 16 * CK2_PFSTEP : NULL, CK2_PFSTEP,
                    px, rj, rt, 1, packed);
#pragma GCC unroll 8
        for (int a = 0; a < rj; a++)
#pragma GCC unroll 8
            for (int b = 0; b < rt; b++)
                acc[a][b][0] = keep[a][b];
    } else {
        ck__pass256(acc, xt, W, wo, wt, K, pf,
                    rj * 16 * (wt == MDL_DTYPE_F32 ? (int)sizeof(float) : (int)sizeof(uint16_t)),
                    NULL, rj, rt, -1, packed);
    }
    if (packed) {
        /* The packed lanes back to ck__dotw_avx2's: a0 = lanes 0-3 of both
         * accumulators, a1 = lanes 4-7. */
#pragma GCC unroll 8
        for (int a = 0; a < rj; a++)
#pragma GCC unroll 8
            for (int b = 0; b < rt; b++) {
                __m256 lo = acc[a][b][0], hi = acc[a][b][1];
                acc[a][b][0] = _mm256_permute2f128_ps(lo, hi, 0x20);
                acc[a][b][1] = _mm256_permute2f128_ps(lo, hi, 0x31);
            }
    }
    if (rj == 4 && K % 16 == 0) {
        /* No scalar tail: a row's four sums at once, the bias (or +0.0f,
         * as below) added as a vector: the same additions. */
        __m128 bv = bias ? _mm_loadu_ps(bias + j) : _mm_setzero_ps();
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++) {
            __m128 r = ck__hsum8x4(_mm256_add_ps(acc[0][b][0], acc[0][b][1]),
                                   _mm256_add_ps(acc[1][b][0], acc[1][b][1]),
                                   _mm256_add_ps(acc[2][b][0], acc[2][b][1]),
                                   _mm256_add_ps(acc[3][b][0], acc[3][b][1]));
            _mm_storeu_ps(out + (size_t)(t + b) * ldo + j, _mm_add_ps(r, bv));
        }
        return;
    }
    int i0 = K / 16 * 16;
#pragma GCC unroll 8
    for (int a = 0; a < rj; a++) {
        float bj = bias ? bias[j + a] : 0.0f;
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++) {
            float s = ck__hsum(acc[a][b][0], acc[a][b][1]);
            const float *xr = xt + (size_t)b * K;
            for (int k = i0; k < K; k++)
                s += xr[k] * ck__w1(W, wo + (size_t)a * K + (size_t)k, wt);
            out[(size_t)(t + b) * ldo + j + a] = s + bj;
        }
    }
}

/* last argument: bytes of W to prefetch while the block runs, or NULL */
typedef void (*ck__blk_fn)(float *, int, const float *, const void *, const float *, int, int, int,
                           const char *);

/* One non-inlined function per block shape and dtype: only the block's own
 * pointers are live inside, so none is spilled from the inner loop. */
#define CK__BLK2_FN(RJ, RT, WT, SUF, PK)                                                           \
    CK_AVX2 static __attribute__((noinline)) void ck__blk256_##RJ##x##RT##SUF(                     \
        float *out, int ldo, const float *x, const void *W, const float *bias, int K, int j,       \
        int t, const char *pf)                                                                     \
    {                                                                                              \
        ck__blk256(out, ldo, x, W, WT, bias, K, j, t, pf, NULL, RJ, RT, PK);                       \
    }
#define CK__BLK2_FNS(WT, SUF)                                                                      \
    CK__BLK2_FN(1, 1, WT, SUF, 0)                                                                  \
    CK__BLK2_FN(1, 2, WT, SUF, 0)                                                                  \
    CK__BLK2_FN(1, 3, WT, SUF, 0)                                                                  \
    CK__BLK2_FN(4, 1, WT, SUF, 0)                                                                  \
    CK__BLK2_FN(4, 2, WT, SUF, 0)                                                                  \
    CK__BLK2_FN(4, 3, WT, SUF, 0)
CK__BLK2_FNS(MDL_DTYPE_F32, _f32)
CK__BLK2_FNS(MDL_DTYPE_F16, _f16)
CK__BLK2_FNS(MDL_DTYPE_BF16, _bf16)
/* BF16 against packed x: the last rows of a column of blocks */
CK__BLK2_FN(4, 1, MDL_DTYPE_BF16, _bf16p, 1)
CK__BLK2_FN(4, 2, MDL_DTYPE_BF16, _bf16p, 1)
#undef CK__BLK2_FNS
#undef CK__BLK2_FN

/* [dtype][rj == CK2_RJ][rt - 1] */
#define CK__BLK2_ROW(SUF)                                                                          \
    {                                                                                              \
        {ck__blk256_1x1##SUF, ck__blk256_1x2##SUF, ck__blk256_1x3##SUF},                           \
        {                                                                                          \
            ck__blk256_4x1##SUF, ck__blk256_4x2##SUF, ck__blk256_4x3##SUF                          \
        }                                                                                          \
    }
static const ck__blk_fn ck__blk256_fns[3][2][CK2_RT] = {
    CK__BLK2_ROW(_f32),
    CK__BLK2_ROW(_f16),
    CK__BLK2_ROW(_bf16),
};
#undef CK__BLK2_ROW
static const ck__blk_fn ck__blk256_bf16p_fns[2] = {ck__blk256_4x1_bf16p, ck__blk256_4x2_bf16p};

/* W rows j .. j + CK2_RJ - 1 against x rows [t0, t1) in one call: blocks of
 * CK2_RT rows, each prefetching the next block's x rows (or the first
 * block's, for the next W rows) into L1, half of them in each pass, so the
 * first pass does not wait for L2. The next W rows (pf) are prefetched by
 * the first blocks, CK2_PFSTEP bytes per step (8 blocks for F32 rows, 4 for
 * 16-bit ones; with fewer blocks, the rest at the start): all in the first
 * block put 72 lines (F32, K = 288) in flight at once, measured slower at
 * 32 rows of x. The remaining 1-2 rows go through the table's blocks. */
#define CK__COL2_FN(WT, SUF, PK)                                                                   \
    CK_AVX2 static __attribute__((noinline)) void ck__col256##SUF(                                 \
        float *out, int ldo, const float *x, const void *W, const float *bias, int K, int j,       \
        int t0, int t1, const char *pf)                                                            \
    {                                                                                              \
        int t = t0;                                                                                \
        size_t wb = (size_t)CK2_RJ * K * (WT == MDL_DTYPE_F32 ? 4 : 2);                            \
        size_t sl = (size_t)K / 16 * 2 * CK2_PFSTEP, cover = (size_t)((t1 - t0) / CK2_RT) * sl;    \
        /* too few blocks to spread it over: the rest of the next W rows now */                    \
        for (size_t o = cover; pf && o < wb; o += 64)                                              \
            _mm_prefetch(pf + o, _MM_HINT_T0);                                                     \
        for (size_t k = 0; t + CK2_RT <= t1; t += CK2_RT, k++) {                                   \
            int tn = t + 2 * CK2_RT <= t1 ? t + CK2_RT : t0;                                       \
            ck__blk256(out, ldo, x, W, WT, bias, K, j, t, pf &&k *sl < wb ? pf + k * sl : NULL,    \
                       (const char *)(x + (size_t)tn * K), CK2_RJ, CK2_RT, PK);                    \
        }                                                                                          \
        if (t < t1)                                                                                \
            (PK ? ck__blk256_bf16p_fns : ck__blk256_fns[WT][1])[t1 - t - 1](                       \
                out, ldo, x, W, bias, K, j, t, t == t0 ? pf : NULL);                               \
    }
CK__COL2_FN(MDL_DTYPE_F32, _f32, 0)
CK__COL2_FN(MDL_DTYPE_F16, _f16, 0)
CK__COL2_FN(MDL_DTYPE_BF16, _bf16, 0)
CK__COL2_FN(MDL_DTYPE_BF16, _bf16p, 1)
#undef CK__COL2_FN
typedef void (*ck__col_fn)(float *, int, const float *, const void *, const float *, int, int, int,
                           int, const char *);
static const ck__col_fn ck__col256_fns[3] = {ck__col256_f32, ck__col256_f16, ck__col256_bf16};

CK_AVX2 static void ck__matmul_avx2(float *out, int ldo, const float *x, const void *W,
                                    enum mdl_dtype wt, const float *bias, int T, int K, int j0,
                                    int j1)
{
    const ck__blk_fn *one = ck__blk256_fns[wt][0], *four = ck__blk256_fns[wt][1];
    size_t es = wt == MDL_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    size_t row = (size_t)K * es; /* bytes of one W row */
    int j = j0;
    if (T < 4) {
        /* Streaming W: each block's rows are read once, one x row after
         * the other (the block's W bytes are in L1 for the next). The
         * prefetch runs CK2_PFD bytes ahead, inside [j0, j1). */
        for (; j + CK2_RJ <= j1; j += CK2_RJ) {
            const char *pf = (size_t)(j1 - j - CK2_RJ) * row >= CK2_PFD
                                 ? (const char *)W + (size_t)j * row + CK2_PFD
                                 : NULL;
            for (int t = 0; t < T; t++)
                four[0](out, ldo, x, W, bias, K, j, t, t == 0 ? pf : NULL);
        }
        for (; j < j1; j++)
            for (int t = 0; t < T; t++)
                one[0](out, ldo, x, W, bias, K, j, t, NULL);
        return;
    }
    /* x in tiles of ~256 KiB (L2); each block of CK2_RJ W rows (L1) meets
     * every row of the tile, the tile's first block prefetching the next
     * CK2_RJ rows, so W streams from memory once per tile. */
    int tile = (int)((256 * 1024) / ((size_t)K * sizeof(float)));
    tile = tile / CK2_RT * CK2_RT;
    if (tile < CK2_RT) tile = CK2_RT;
    /* BF16: widening by a shift costs the FMA ports two instructions per W
     * vector; unpacked against a zero vector it costs one, in an order x
     * must follow: each tile of x is packed (ck__pack_x) into a buffer of
     * one tile (at most about 256 KiB) the call owns; without the buffer,
     * the shifting blocks run. */
    float *xp = NULL;
    if (wt == MDL_DTYPE_BF16 && K >= 16) {
        int rows = T < tile ? T : tile;
        xp = aligned_alloc(64, ((size_t)rows * K * sizeof(float) + 63) / 64 * 64);
    }
    for (int t0 = 0; t0 < T; t0 += tile) {
        int t1 = T - t0 < tile ? T : t0 + tile;
        if (xp) ck__pack_x(xp, x + (size_t)t0 * K, t1 - t0, K);
        for (j = j0; j + CK2_RJ <= j1; j += CK2_RJ) {
            const char *pf =
                j + 2 * CK2_RJ <= j1 ? (const char *)W + (size_t)(j + CK2_RJ) * row : NULL;
            if (xp)
                ck__col256_bf16p(out + (size_t)t0 * ldo, ldo, xp, W, bias, K, j, 0, t1 - t0, pf);
            else
                ck__col256_fns[wt](out, ldo, x, W, bias, K, j, t0, t1, pf);
        }
        for (; j < j1; j++)
            for (int t = t0; t < t1;) {
                int rt = t1 - t < CK2_RT ? t1 - t : CK2_RT;
                one[rt - 1](out, ldo, x, W, bias, K, j, t, NULL);
                t += rt;
            }
    }
    free(xp);
}

/* ---- AVX-512: register-blocked, cache-tiled ----
 * One zmm accumulator per output element: lane l sums elements 16*i + l with
 * FMA, exactly what the AVX2 version's pair of ymm accumulators holds (lanes
 * 0..7 and 8..15), then the same horizontal sum and scalar tail. So every
 * output element has the same operations in the same order as ck_dot, for
 * any block shape: blocking changes which products are computed together,
 * never how one element is reduced.
 *
 * The block is CK_RJ rows of W by up to CK_RT rows of x: CK_RJ * CK_RT
 * accumulators plus CK_RT x vectors plus one W vector fit the 32 zmm
 * registers, and each 16-element step issues CK_RJ + CK_RT loads for
 * CK_RJ * CK_RT FMAs. Rows of x are taken in tiles that fit L1 next to the
 * CK_RJ W rows, so W streams from L2/memory once per tile. */
#define CK_RJ 4
#define CK_RT 6

CK_AVX512 static inline __m512 ck__ld16(const void *W, size_t off, enum mdl_dtype wt)
{
    if (wt == MDL_DTYPE_F32) return _mm512_loadu_ps((const float *)W + off);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W + off));
    if (wt == MDL_DTYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

CK_AVX512 static inline float ck__hsum16(__m512 a)
{
    __m256 lo = _mm512_castps512_ps256(a);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    return ck__hsum(lo, hi);
}

/* The horizontal sums of four accumulators at once, each element with
 * exactly ck__hsum's additions: s = lo + hi (8 lanes), q = s[0..3] + s[4..7],
 * p = (q0 + q2, q1 + q3), r = p0 + p1 (float addition is commutative, so
 * the operand order inside one addition does not matter). Returns
 * (r_a, r_b, r_c, r_d). */
CK_AVX512 static inline __m128 ck__hsum16x4(__m512 a, __m512 b, __m512 c, __m512 d)
{
#define CK__LOHI(v)                                                                                \
    _mm256_add_ps(_mm512_castps512_ps256(v),                                                       \
                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    __m256 sa = CK__LOHI(a), sb = CK__LOHI(b), sc = CK__LOHI(c), sd = CK__LOHI(d);
#undef CK__LOHI
    return ck__hsum8x4(sa, sb, sc, sd); /* the rest of the additions, as the AVX2 path */
}

/* out[t + b][j + a] for a < rj, b < rt (compile-time constants at every
 * call site, so the accumulators live in registers). */
CK_AVX512 static inline __attribute__((always_inline)) void
ck__blk512(float *out, int ldo, const float *x, const void *W, enum mdl_dtype wt, const float *bias,
           int K, int j, int t, const char *pf, const int rj, const int rt)
{
    __m512 acc[CK_RJ][CK_RT];
#pragma GCC unroll 8
    for (int a = 0; a < rj; a++)
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++)
            acc[a][b] = _mm512_setzero_ps();
    const float *xt = x + (size_t)t * K;
    size_t wo = (size_t)j * K;
    int i = 0;
    for (; i + 16 <= K; i += 16) {
        __m512 xv[CK_RT];
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++)
            xv[b] = _mm512_loadu_ps(xt + (size_t)b * K + i);
        if (pf) {
            /* the next W rows, one line of each per step: in cache by the
             * time the next block starts */
            size_t es = wt == MDL_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
#pragma GCC unroll 8
            for (int a = 0; a < rj; a++)
                _mm_prefetch(pf + ((size_t)a * K + (size_t)i) * es, _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int a = 0; a < rj; a++) {
            __m512 w = ck__ld16(W, wo + (size_t)a * K + (size_t)i, wt);
#pragma GCC unroll 8
            for (int b = 0; b < rt; b++)
                acc[a][b] = _mm512_fmadd_ps(xv[b], w, acc[a][b]);
        }
    }
    if (rj == 4 && i == K) {
        /* No scalar tail: four outputs of a row of out per reduction, the
         * bias (or +0.0f, as below) added as a vector: the same additions. */
        __m128 bv = bias ? _mm_loadu_ps(bias + j) : _mm_setzero_ps();
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++) {
            __m128 r = ck__hsum16x4(acc[0][b], acc[1][b], acc[2][b], acc[3][b]);
            _mm_storeu_ps(out + (size_t)(t + b) * ldo + j, _mm_add_ps(r, bv));
        }
        return;
    }
#pragma GCC unroll 8
    for (int a = 0; a < rj; a++) {
        float bj = bias ? bias[j + a] : 0.0f;
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++) {
            float s = ck__hsum16(acc[a][b]);
            const float *xr = xt + (size_t)b * K;
            for (int k = i; k < K; k++)
                s += xr[k] * ck__w1(W, wo + (size_t)a * K + (size_t)k, wt);
            out[(size_t)(t + b) * ldo + j + a] = s + bj;
        }
    }
}

/* The block kernels as separate functions, one per shape and dtype: inside
 * one, only the block's own pointers are live, so none is spilled from the
 * inner loop. */
#define CK__BLK_FN(RJ, RT, WT, SUF)                                                                \
    CK_AVX512 static __attribute__((noinline)) void ck__blk512_##RJ##x##RT##SUF(                   \
        float *out, int ldo, const float *x, const void *W, const float *bias, int K, int j,       \
        int t, const char *pf)                                                                     \
    {                                                                                              \
        ck__blk512(out, ldo, x, W, WT, bias, K, j, t, pf, RJ, RT);                                 \
    }
#define CK__BLK_FNS(RJ, WT, SUF)                                                                   \
    CK__BLK_FN(RJ, 1, WT, SUF)                                                                     \
    CK__BLK_FN(RJ, 2, WT, SUF)                                                                     \
    CK__BLK_FN(RJ, 3, WT, SUF)                                                                     \
    CK__BLK_FN(RJ, 4, WT, SUF)                                                                     \
    CK__BLK_FN(RJ, 5, WT, SUF)                                                                     \
    CK__BLK_FN(RJ, 6, WT, SUF)
CK__BLK_FNS(1, MDL_DTYPE_F32, _f32)
CK__BLK_FNS(4, MDL_DTYPE_F32, _f32)
CK__BLK_FNS(1, MDL_DTYPE_F16, _f16)
CK__BLK_FNS(4, MDL_DTYPE_F16, _f16)
CK__BLK_FNS(1, MDL_DTYPE_BF16, _bf16)
CK__BLK_FNS(4, MDL_DTYPE_BF16, _bf16)
#undef CK__BLK_FNS
#undef CK__BLK_FN

#define CK__BLK_ROW(RJ, SUF)                                                                       \
    {                                                                                              \
        ck__blk512_##RJ##x1##SUF, ck__blk512_##RJ##x2##SUF, ck__blk512_##RJ##x3##SUF,              \
            ck__blk512_##RJ##x4##SUF, ck__blk512_##RJ##x5##SUF, ck__blk512_##RJ##x6##SUF           \
    }
/* [dtype][rj == CK_RJ][rt - 1] */
static const ck__blk_fn ck__blk512_fns[3][2][CK_RT] = {
    {CK__BLK_ROW(1, _f32), CK__BLK_ROW(4, _f32)},
    {CK__BLK_ROW(1, _f16), CK__BLK_ROW(4, _f16)},
    {CK__BLK_ROW(1, _bf16), CK__BLK_ROW(4, _bf16)},
};
#undef CK__BLK_ROW

/* ---- AVX-512 from 24 rows of x: four outputs per accumulator ----
 * In ck__blk512 every output has a zmm of its own, whose 16 lanes take a
 * horizontal sum at the end: about 7 shuffles and additions per output
 * against K / 16 FMAs (18 at K = 288), a seventh of a 128-row matmul's
 * time. Here accumulator L of an output block holds lanes 4L..4L+3 of
 * ck_dot's 16 for four outputs, one per 128-bit lane m (W row j + m):
 * - ck_dot's first level, s[l] = lane l + lane l+8 (l < 8), is L0 + L2 and
 *   L1 + L3, its second, q[e] = s[e] + s[e+4], the sum of those two, all
 *   vertical additions;
 * - its last two, (q0 + q2, q1 + q3) and p0 + p1, take two shuffles and
 *   one addition per pair of such vectors (ck__pk_p, ck__pk_r), then one
 *   permutation puts each x row's outputs side by side.
 * The same additions in the same order: the bits of ck_dot.
 * W is packed per block of CK_PJ = 8 rows (two groups g of four) into an
 * F32 buffer, wp[i][L][g] = rows j+4g..j+4g+3, elements 16i+4L..16i+4L+3,
 * so each step loads its W vectors whole and x's four elements are
 * broadcast to the four 128-bit lanes. Per 16-element step: 8 W loads, 12
 * broadcasts, 24 FMAs for 8 W rows by CK_PT = 3 x rows (24 accumulators).
 * Measured on the split-FMA host (1 thread; every layer matrix of a BF16
 * 15m model in turn, W from memory, alternating with the ck__blk512 blocks
 * in one process): 1.06-1.09x at 24 rows of x, 1.15x at 32, 1.09-1.14x
 * from 48 to 96, level at 20; below that packing W costs more than it
 * saves (0.85x at 16, 0.6x at 8). So it runs from CK_PK_MIN_T rows, for K
 * a multiple of 16 (no scalar tail) up to CK_PK_MAX_K (a packed block of
 * 64 KiB, the largest measured: level with the ck__blk512 blocks there). */
#define CK_PJ       8
#define CK_PT       3
#define CK_PK_MIN_T 24
#define CK_PK_MAX_K 2048

/* W rows j..j+7, widened to F32, in the order ck__pk_blk loads them: per
 * 16-element step i, for L = 0..3 and g = 0, 1, the vector [rows j+4g..
 * j+4g+3, elements 16i+4L..16i+4L+3 of each] (128 floats a step). Each
 * group's four rows of a step, as 128-bit lanes, are transposed: from rows
 * a, b, c, d, vector L is [a.L b.L c.L d.L]. */
CK_AVX512 static void ck__pk_pack(float *wp, const void *W, enum mdl_dtype wt, int K, int j)
{
    for (int i = 0; i < K / 16; i++)
        for (int g = 0; g < 2; g++) {
            size_t off = (size_t)(j + 4 * g) * K + (size_t)i * 16;
            __m512 a = ck__ld16(W, off, wt), b = ck__ld16(W, off + (size_t)K, wt);
            __m512 c = ck__ld16(W, off + 2 * (size_t)K, wt),
                   d = ck__ld16(W, off + 3 * (size_t)K, wt);
            __m512 ab01 = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0));
            __m512 ab23 = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2));
            __m512 cd01 = _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0));
            __m512 cd23 = _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2));
            float *o = wp + (size_t)i * 128 + g * 16;
            _mm512_store_ps(o, _mm512_shuffle_f32x4(ab01, cd01, _MM_SHUFFLE(2, 0, 2, 0)));
            _mm512_store_ps(o + 32, _mm512_shuffle_f32x4(ab01, cd01, _MM_SHUFFLE(3, 1, 3, 1)));
            _mm512_store_ps(o + 64, _mm512_shuffle_f32x4(ab23, cd23, _MM_SHUFFLE(2, 0, 2, 0)));
            _mm512_store_ps(o + 96, _mm512_shuffle_f32x4(ab23, cd23, _MM_SHUFFLE(3, 1, 3, 1)));
        }
}

/* ck_dot's first two levels: q = (L0 + L2) + (L1 + L3) per lane. */
CK_AVX512 static inline __m512 ck__pk_q(const __m512 acc[4])
{
    return _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
}

/* Its third level for two q vectors: per 128-bit lane [pa0 pa1 pb0 pb1],
 * p0 = q0 + q2, p1 = q1 + q3. */
CK_AVX512 static inline __m512 ck__pk_p(__m512 a, __m512 b)
{
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

/* Its last for two p vectors: per 128-bit lane m [ra rb rc rd], r = p0 + p1,
 * permuted to [a b c d] by outputs, then the bias (or +0.0f) added. */
CK_AVX512 static inline __m512 ck__pk_r(__m512 pab, __m512 pcd, __m512 bias)
{
    const __m512i by_output =
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(pab, pcd, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(pab, pcd, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_permutexvar_ps(by_output, r), bias);
}

/* out[t + b][j .. j + 7] for b < rt (a constant at each call site). */
CK_AVX512 static inline __attribute__((always_inline)) void
ck__pk_blk(float *out, int ldo, const float *x, const float *wp, const float *bias, int K, int j,
           int t, const char *pf, size_t es, const int rt)
{
    __m512 acc[2][CK_PT][4];
#pragma GCC unroll 8
    for (int g = 0; g < 2; g++)
#pragma GCC unroll 8
        for (int b = 0; b < rt; b++)
#pragma GCC unroll 8
            for (int L = 0; L < 4; L++)
                acc[g][b][L] = _mm512_setzero_ps();
    const float *xt = x + (size_t)t * K;
    for (int i = 0; i < K; i += 16) {
        const float *w = wp + (size_t)i * 8;
        if (pf) _mm_prefetch(pf + (size_t)i * es, _MM_HINT_T0);
#pragma GCC unroll 4
        for (int L = 0; L < 4; L++) {
            __m512 w0 = _mm512_load_ps(w + L * 32), w1 = _mm512_load_ps(w + L * 32 + 16);
            /* in registers: as memory operands GCC would load them again
             * for every x row, 24 loads a step instead of 8 */
            __asm__("" : "+v"(w0), "+v"(w1));
#pragma GCC unroll 8
            for (int b = 0; b < rt; b++) {
                __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(xt + (size_t)b * K + i + 4 * L));
                acc[0][b][L] = _mm512_fmadd_ps(xb, w0, acc[0][b][L]);
                acc[1][b][L] = _mm512_fmadd_ps(xb, w1, acc[1][b][L]);
            }
        }
    }
    __m256 b8 = bias ? _mm256_loadu_ps(bias + j) : _mm256_setzero_ps();
    __m512 bv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(b8)));
    __m512 p0 = ck__pk_p(ck__pk_q(acc[0][0]), ck__pk_q(acc[1][0]));
    if (rt == 1) {
        /* x row t alone: the pair's second half repeats it */
        __m512 r = ck__pk_r(p0, p0, bv);
        _mm256_storeu_ps(out + (size_t)t * ldo + j, _mm512_castps512_ps256(r));
        return;
    }
    __m512 p1 = ck__pk_p(ck__pk_q(acc[0][1]), ck__pk_q(acc[1][1]));
    __m512 r = ck__pk_r(p0, p1, bv); /* [row t: j..j+7 | row t+1: j..j+7] */
    _mm256_storeu_ps(out + (size_t)t * ldo + j, _mm512_castps512_ps256(r));
    _mm256_storeu_ps(out + (size_t)(t + 1) * ldo + j,
                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)));
    if (rt == 3) {
        __m512 p2 = ck__pk_p(ck__pk_q(acc[0][2]), ck__pk_q(acc[1][2]));
        r = ck__pk_r(p2, p2, bv);
        _mm256_storeu_ps(out + (size_t)(t + 2) * ldo + j, _mm512_castps512_ps256(r));
    }
}

#define CK__PK_FN(RT)                                                                              \
    CK_AVX512 static __attribute__((noinline)) void ck__pk_blk##RT(                                \
        float *out, int ldo, const float *x, const float *wp, const float *bias, int K, int j,     \
        int t, const char *pf, size_t es)                                                          \
    {                                                                                              \
        ck__pk_blk(out, ldo, x, wp, bias, K, j, t, pf, es, RT);                                    \
    }
CK__PK_FN(1)
CK__PK_FN(2)
CK__PK_FN(3)
#undef CK__PK_FN

/* x tiles of up to 512 KiB: L2 keeps a tile while each packed block of W
 * meets all of its rows (at least 63 rows up to CK_PK_MAX_K). */
static int ck__pk_tile(int K)
{
    return (int)((512 * 1024) / ((size_t)K * sizeof(float))) / CK_PT * CK_PT;
}

static int ck__pk_fits(int T, int K)
{
    return K % 16 == 0 && K <= CK_PK_MAX_K && T >= CK_PK_MIN_T;
}

/* The whole blocks of CK_PJ rows in [j0, j1) against every row of x, where
 * ck__pk_fits(T, K); returns the first row of W not done (j1 less the
 * remainder). The packed block lives on the stack (64 KiB at most): no
 * allocation per call, and nothing to fail. */
CK_AVX512 static int ck__matmul_pk(float *out, int ldo, const float *x, const void *W,
                                   enum mdl_dtype wt, const float *bias, int T, int K, int j0,
                                   int j1)
{
    int jn = j0 + (j1 - j0) / CK_PJ * CK_PJ;
    if (jn == j0) return j0;
    float wp[CK_PJ * CK_PK_MAX_K] __attribute__((aligned(64)));
    size_t es = wt == MDL_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    int tile = ck__pk_tile(K);
    for (int t0 = 0; t0 < T; t0 += tile) {
        int t1 = T - t0 < tile ? T : t0 + tile;
        for (int j = j0; j < jn; j += CK_PJ) {
            ck__pk_pack(wp, W, wt, K, j);
            /* the next block's rows of W, one per block of x rows, so that
             * a few lines at a time are in flight */
            const char *next =
                j + CK_PJ < jn ? (const char *)W + (size_t)(j + CK_PJ) * K * es : NULL;
            int t = t0, b = 0;
            for (; t + CK_PT <= t1; t += CK_PT, b++)
                ck__pk_blk3(out, ldo, x, wp, bias, K, j, t,
                            next && b < CK_PJ ? next + (size_t)b * K * es : NULL, es);
            if (t1 - t == 2)
                ck__pk_blk2(out, ldo, x, wp, bias, K, j, t, NULL, es);
            else if (t1 - t == 1)
                ck__pk_blk1(out, ldo, x, wp, bias, K, j, t, NULL, es);
        }
    }
    return jn;
}

/* W rows [j0, j1) one at a time, each against the T (< CK_RT) rows of x:
 * W is read in one sequential stream, with no software prefetch. */
CK_AVX512 static void ck__rows512(float *out, int ldo, const float *x, const void *W,
                                  enum mdl_dtype wt, const float *bias, int T, int K, int j0,
                                  int j1)
{
    ck__blk_fn one = ck__blk512_fns[wt][0][T - 1];
    for (int j = j0; j < j1; j++)
        one(out, ldo, x, W, bias, K, j, 0, NULL);
}

CK_AVX512 static void ck__matmul_avx512(float *out, int ldo, const float *x, const void *W,
                                        enum mdl_dtype wt, const float *bias, int T, int K, int j0,
                                        int j1)
{
    if (ck__pk_fits(T, K)) {
        j0 = ck__matmul_pk(out, ldo, x, W, wt, bias, T, K, j0, j1);
        if (j0 == j1) return;
    }
    const ck__blk_fn *one = ck__blk512_fns[wt][0], *four = ck__blk512_fns[wt][1];
    size_t es = wt == MDL_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    if (T < 4 && wt != MDL_DTYPE_F32) {
        /* Streaming 16-bit W (decode of a few sequences): one W row at a
         * time, one sequential stream for the prefetchers. Measured on a
         * full-width core at T = 1: 1,030-1,060 tok/s this way vs 800-890
         * with the 4-row blocks below, whose widening and prefetches cost
         * more per byte; for F32 the 4-row blocks won there (600-630 vs
         * 520-535). */
        ck__rows512(out, ldo, x, W, wt, bias, T, K, j0, j1);
        return;
    }
    /* x tile: as many rows as fit in ~256 KiB of L2, a multiple of CK_RT:
     * the CK_RJ W rows of a block stay in L1 while the tile's rows stream
     * past them from L2 (CK_RT x loads per CK_RJ * CK_RT FMAs is within L2's
     * bandwidth), and W is read from memory once per tile. */
    int tile = (int)((256 * 1024) / ((size_t)K * sizeof(float)));
    tile = tile / CK_RT * CK_RT;
    if (tile < CK_RT) tile = CK_RT;
    for (int t0 = 0; t0 < T; t0 += tile) {
        int t1 = T - t0 < tile ? T : t0 + tile;
        int j = j0;
        for (; j + CK_RJ <= j1; j += CK_RJ)
            for (int t = t0; t < t1;) {
                /* rows spread evenly over the fewest blocks (32 rows: 6, 6,
                 * 5, 5, 5, 5, not five 6s and a 2) */
                int left = t1 - t, nb = (left + CK_RT - 1) / CK_RT;
                int rt = (left + nb - 1) / nb;
                /* the tile's first block over these W rows fetches the
                 * next CK_RJ rows (when inside [j0, j1)) */
                const char *pf = t == t0 && j + 2 * CK_RJ <= j1
                                     ? (const char *)W + (size_t)(j + CK_RJ) * K * es
                                     : NULL;
                four[rt - 1](out, ldo, x, W, bias, K, j, t, pf);
                t += rt;
            }
        for (; j < j1; j++)
            for (int t = t0; t < t1; t += CK_RT) {
                int rt = t1 - t < CK_RT ? t1 - t : CK_RT;
                one[rt - 1](out, ldo, x, W, bias, K, j, t, NULL);
            }
    }
}

/* On a core that splits a 512-bit FMA into two 256-bit halves (the same
 * peak either way) ck_matmul runs three kinds of call differently from the
 * AVX-512 matmul (docs/cpu-throughput.md, "Seventh round" and "Eighth
 * round"):
 * - F32 weights below 4 rows of x (decode of 1-3 sequences: memory-bound)
 *   stream W one row at a time (ck__rows512): one sequential stream reads
 *   at 22-26 GB/s where the 4-row blocks, four interleaved streams, read
 *   at 11-15 (the AVX-512 ones, prefetching the next block) or 16-21 (the
 *   AVX2 ones, prefetching 8 KiB ahead): batch-1 decode 1.02-1.34x the
 *   AVX2 blocks;
 * - 16-bit weights below 4 rows go to the AVX2 4-row blocks: a row at a
 *   time, one accumulator chain per row with half the bytes per FMA is
 *   latency-bound (batch-1 decode of a BF16 model 0.6-0.7x);
 * - F32 weights at 16-23 rows (batched decode), where the AVX2 two-pass
 *   blocks reached 76-79% of the peak against 62-65% for the AVX-512
 *   blocks at 32 rows (batch-32 decode 1.2x), 1.2-1.3x their rate at 20-24
 *   rows, level (layer matrices) or 1.1x (the classifier) at 16. At 4-14
 *   rows the AVX-512 blocks are ahead (1.3x at 8), and for 16-bit weights
 *   level or ahead from 4 rows on (end to end on a BF16 model they served
 *   more within the SLOs): those stay. From 24 rows every dtype takes the
 *   packed blocks (ck__matmul_pk, through ck__matmul_avx512), 1.05-1.12x
 *   the AVX2 ones for F32 there (the layer matrices of an F32 15m model, W
 *   from memory).
 * On a core with full-width 512-bit FMAs (twice the 256-bit peak) every
 * shape stays on AVX-512, as measured there (92-99% of the bandwidth at one
 * row). A probe at start-up (best of 3 runs of each width, about 2 ms)
 * tells the two apart: full width from 1.5x the 256-bit rate. Same bits
 * either way. TANDEM_CPU_AVX512=1 runs the AVX-512 kernels for every shape,
 * without the probe (tests, comparisons). */
static void ck__matmul_split512(float *out, int ldo, const float *x, const void *W,
                                enum mdl_dtype wt, const float *bias, int T, int K, int j0, int j1)
{
    if (T < 4 && wt == MDL_DTYPE_F32)
        ck__rows512(out, ldo, x, W, wt, bias, T, K, j0, j1);
    else if (T < 4 || (wt == MDL_DTYPE_F32 && T >= 16 && !ck__pk_fits(T, K)))
        ck__matmul_avx2(out, ldo, x, W, wt, bias, T, K, j0, j1);
    else
        ck__matmul_avx512(out, ldo, x, W, wt, bias, T, K, j0, j1);
}

/* Attention scores, four positions at a time: each score is ck__dotw_avx2's
 * two accumulators (q loaded once for the four rows), ck__hsum's additions
 * (ck__hsum8x4), times scale, so the bits are those of one ck_dot per
 * position. A decode step's attention is mostly these short dot products
 * (head_dim 48 or 64: 3 or 4 FMA steps each), where the one-at-a-time
 * version spent most of its time in the horizontal sum's dependency chain.
 * rt is the rows' element type, a constant in each caller below: F16 rows
 * (a KV pool of binary16) are widened in registers by ck__ld8, exactly, so
 * they give the bits of the same rows converted to F32 first. */
CK_AVX2 static inline __attribute__((always_inline)) void
ck__scores_t_avx2(float *out, const float *q, const void *rows, enum mdl_dtype rt, size_t stride,
                  int n, int hd, float scale)
{
    int j = 0;
    if (hd % 16 == 0) {
        const __m128 sc = _mm_set1_ps(scale);
        for (; j + 4 <= n; j += 4) {
            size_t r0 = (size_t)j * stride, r1 = r0 + stride, r2 = r1 + stride, r3 = r2 + stride;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
            __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            for (int i = 0; i < hd; i += 16) {
                __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
                a00 = _mm256_fmadd_ps(q0, ck__ld8(rows, r0 + i, rt), a00);
                a01 = _mm256_fmadd_ps(q1, ck__ld8(rows, r0 + i + 8, rt), a01);
                a10 = _mm256_fmadd_ps(q0, ck__ld8(rows, r1 + i, rt), a10);
                a11 = _mm256_fmadd_ps(q1, ck__ld8(rows, r1 + i + 8, rt), a11);
                a20 = _mm256_fmadd_ps(q0, ck__ld8(rows, r2 + i, rt), a20);
                a21 = _mm256_fmadd_ps(q1, ck__ld8(rows, r2 + i + 8, rt), a21);
                a30 = _mm256_fmadd_ps(q0, ck__ld8(rows, r3 + i, rt), a30);
                a31 = _mm256_fmadd_ps(q1, ck__ld8(rows, r3 + i + 8, rt), a31);
            }
            __m128 r = ck__hsum8x4(_mm256_add_ps(a00, a01), _mm256_add_ps(a10, a11),
                                   _mm256_add_ps(a20, a21), _mm256_add_ps(a30, a31));
            _mm_storeu_ps(out + j, _mm_mul_ps(r, sc));
        }
    }
    for (; j < n; j++)
        out[j] = ck__dotw_avx2(q, rows, (size_t)j * stride, rt, hd) * scale;
}

CK_AVX2 static void ck__scores_avx2(float *out, const float *q, const void *rows, size_t stride,
                                    int n, int hd, float scale)
{
    ck__scores_t_avx2(out, q, rows, MDL_DTYPE_F32, stride, n, hd, scale);
}

CK_AVX2 static void ck__scores16_avx2(float *out, const float *q, const void *rows, size_t stride,
                                      int n, int hd, float scale)
{
    ck__scores_t_avx2(out, q, rows, MDL_DTYPE_F16, stride, n, hd, scale);
}

/* acc[0 .. 8 nv) += w[j] * v_j[off ...] for every j, nv (<= 8) accumulators
 * in registers for the whole pass over j. */
CK_AVX2 static inline __attribute__((always_inline)) void
ck__accum_blk_avx2(float *acc, const float *w, const void *rows, size_t off, enum mdl_dtype rt,
                   size_t stride, int n, int nv)
{
    __m256 a[8];
    for (int v = 0; v < nv; v++)
        a[v] = _mm256_loadu_ps(acc + 8 * v);
    for (int j = 0; j < n; j++) {
        size_t r = off + (size_t)j * stride;
        __m256 wj = _mm256_set1_ps(w[j]);
        for (int v = 0; v < nv; v++)
            a[v] = _mm256_add_ps(a[v], _mm256_mul_ps(wj, ck__ld8(rows, r + 8 * (size_t)v, rt)));
    }
    for (int v = 0; v < nv; v++)
        _mm256_storeu_ps(acc + 8 * v, a[v]);
}

CK_AVX2 static inline __attribute__((always_inline)) void
ck__accum_t_avx2(float *acc, const float *w, const void *rows, enum mdl_dtype rt, size_t stride,
                 int n, int hd)
{
    /* acc[i] + w[j] * v_j[i], unfused and in order of j for every element, as
     * the generic version. Up to 64 elements of acc stay in registers across
     * j: a head of 48 or 64 is one pass over the rows, not one per 32 or 8
     * elements (each pass a chain of n dependent adds). */
    int i = 0;
    for (; i + 64 <= hd; i += 64)
        ck__accum_blk_avx2(acc + i, w, rows, (size_t)i, rt, stride, n, 8);
    int nv = (hd - i) / 8;
    if (nv > 0) ck__accum_blk_avx2(acc + i, w, rows, (size_t)i, rt, stride, n, nv);
    i += nv * 8;
    for (; i < hd; i++)
        for (int j = 0; j < n; j++)
            acc[i] += w[j] * ck__w1(rows, (size_t)j * stride + (size_t)i, rt);
}

CK_AVX2 static void ck__accum_avx2(float *acc, const float *w, const void *rows, size_t stride,
                                   int n, int hd)
{
    ck__accum_t_avx2(acc, w, rows, MDL_DTYPE_F32, stride, n, hd);
}

CK_AVX2 static void ck__accum16_avx2(float *acc, const float *w, const void *rows, size_t stride,
                                     int n, int hd)
{
    ck__accum_t_avx2(acc, w, rows, MDL_DTYPE_F16, stride, n, hd);
}

/* Attention scores, four positions at a time: each score is ck_dot's
 * reduction (one zmm accumulator, as in ck__blk512) times scale, so the bits
 * are those of ck__scores_avx2. */
CK_AVX512 static void ck__scores_avx512(float *out, const float *q, const void *rows_v,
                                        size_t stride, int n, int hd, float scale)
{
    const float *rows = rows_v;
    int j = 0;
    if (hd % 16 == 0) {
        __m128 sc = _mm_set1_ps(scale);
        for (; j + 4 <= n; j += 4) {
            const float *r0 = rows + (size_t)j * stride, *r1 = r0 + stride;
            const float *r2 = r1 + stride, *r3 = r2 + stride;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int i = 0; i < hd; i += 16) {
                __m512 qv = _mm512_loadu_ps(q + i);
                a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r0 + i), a0);
                a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r1 + i), a1);
                a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r2 + i), a2);
                a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r3 + i), a3);
            }
            _mm_storeu_ps(out + j, _mm_mul_ps(ck__hsum16x4(a0, a1, a2, a3), sc));
        }
    }
    for (; j < n; j++)
        out[j] = ck__dotw_avx2(q, rows + (size_t)j * stride, 0, MDL_DTYPE_F32, hd) * scale;
}

/* acc[i] + w[j] * v_j[i], unfused and in order of j, as ck__accum_avx2, 16
 * lanes wide. */
CK_AVX512 static void ck__accum_avx512(float *acc, const float *w, const void *rows_v,
                                       size_t stride, int n, int hd)
{
    const float *rows = rows_v;
    int i = 0;
    for (; i + 48 <= hd; i += 48) {
        __m512 a0 = _mm512_loadu_ps(acc + i), a1 = _mm512_loadu_ps(acc + i + 16);
        __m512 a2 = _mm512_loadu_ps(acc + i + 32);
        for (int j = 0; j < n; j++) {
            const float *v = rows + (size_t)j * stride + i;
            __m512 wj = _mm512_set1_ps(w[j]);
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(wj, _mm512_loadu_ps(v)));
            a1 = _mm512_add_ps(a1, _mm512_mul_ps(wj, _mm512_loadu_ps(v + 16)));
            a2 = _mm512_add_ps(a2, _mm512_mul_ps(wj, _mm512_loadu_ps(v + 32)));
        }
        _mm512_storeu_ps(acc + i, a0);
        _mm512_storeu_ps(acc + i + 16, a1);
        _mm512_storeu_ps(acc + i + 32, a2);
    }
    for (; i + 16 <= hd; i += 16) {
        __m512 a0 = _mm512_loadu_ps(acc + i);
        for (int j = 0; j < n; j++) {
            __m512 v = _mm512_loadu_ps(rows + (size_t)j * stride + i);
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(_mm512_set1_ps(w[j]), v));
        }
        _mm512_storeu_ps(acc + i, a0);
    }
    if (i < hd) ck__accum_avx2(acc + i, w, rows + i, stride, n, hd - i);
}

/* ---- several queries over the same rows (a prefill's tokens) ----
 * Each score and each accumulated element has exactly the operations of the
 * one-query kernels above, in the same order; only which of them are
 * computed together changes. A query alone spends most of its score on the
 * horizontal sum (3 FMAs per 48-element row, then 8 additions and their
 * shuffles) and its accumulation on one chain of adds per vector; here each
 * row is loaded once for all queries, the sums of 16 scores share their
 * shuffles, and the queries' chains run side by side. */

/* The horizontal sums of 16 accumulators, a[4 r + i] the one of query i and
 * row r, each with ck__hsum's additions: s = lo8 + hi8, q = s[0..3] +
 * s[4..7], p = (q0 + q2, q1 + q3), r = p0 + p1. Returns query i's four sums
 * (rows 0..3) in 128-bit lane i. */
CK_AVX512 static inline __m512 ck__hsum16x16(const __m512 a[16])
{
    __m512 v[8], u[4], w[2];
    for (int k = 0; k < 8; k++) /* [s_2k | s_2k+1]: lanes 0+2, 1+3 of each */
        v[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xee));
    for (int k = 0; k < 4; k++) /* [q_4k | q_4k+1 | q_4k+2 | q_4k+3] */
        u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xdd));
    for (int k = 0; k < 2; k++) /* lane i: p_(8k+i), p_(8k+4+i) */
        w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* lane i: r_i, r_4+i, r_8+i, r_12+i: query i's rows 0..3 */
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of nq (2..4) queries over rows [0, n), n a multiple of 4, hd a
 * multiple of 16. */
CK_AVX512 static inline __attribute__((always_inline)) void
ck__scores_q_avx512(float *const *out, const float *const *q, const float *rows, size_t stride,
                    int n, int hd, float scale, const int nq)
{
    __m512 sc = _mm512_set1_ps(scale);
    for (int j = 0; j < n; j += 4) {
        const float *r = rows + (size_t)j * stride;
        __m512 a[16];
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++)
            a[k] = _mm512_setzero_ps();
        for (int i = 0; i < hd; i += 16) {
            __m512 rv[4];
#pragma GCC unroll 4
            for (int b = 0; b < 4; b++)
                rv[b] = _mm512_loadu_ps(r + (size_t)b * stride + i);
#pragma GCC unroll 4
            for (int k = 0; k < nq; k++) {
                __m512 qv = _mm512_loadu_ps(q[k] + i);
#pragma GCC unroll 4
                for (int b = 0; b < 4; b++)
                    a[4 * b + k] = _mm512_fmadd_ps(qv, rv[b], a[4 * b + k]);
            }
        }
        __m512 s = _mm512_mul_ps(ck__hsum16x16(a), sc);
        _mm_storeu_ps(out[0] + j, _mm512_castps512_ps128(s));
        _mm_storeu_ps(out[1] + j, _mm512_extractf32x4_ps(s, 1));
        if (nq > 2) _mm_storeu_ps(out[2] + j, _mm512_extractf32x4_ps(s, 2));
        if (nq > 3) _mm_storeu_ps(out[3] + j, _mm512_extractf32x4_ps(s, 3));
    }
}

/* acc[k][i] + w[k][j] * v_j[i] for nq (2..4) queries, j in [0, n) in order,
 * unfused, nv (1..3) vectors of 16 from element i0: the queries' 4 nv chains
 * in registers for the whole pass over the rows. */
CK_AVX512 static inline __attribute__((always_inline)) void
ck__accum_q_blk512(float *const *acc, const float *const *w, const float *rows, size_t stride,
                   int n, int i0, const int nq, const int nv)
{
    __m512 a[4][3];
#pragma GCC unroll 4
    for (int k = 0; k < nq; k++)
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++)
            a[k][v] = _mm512_loadu_ps(acc[k] + i0 + 16 * v);
    for (int j = 0; j < n; j++) {
        const float *r = rows + (size_t)j * stride + i0;
        __m512 rv[3];
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++)
            rv[v] = _mm512_loadu_ps(r + 16 * v);
#pragma GCC unroll 4
        for (int k = 0; k < nq; k++) {
            __m512 wj = _mm512_set1_ps(w[k][j]);
#pragma GCC unroll 3
            for (int v = 0; v < nv; v++)
                a[k][v] = _mm512_add_ps(a[k][v], _mm512_mul_ps(wj, rv[v]));
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < nq; k++)
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++)
            _mm512_storeu_ps(acc[k] + i0 + 16 * v, a[k][v]);
}

/* hd a multiple of 16 */
CK_AVX512 static inline __attribute__((always_inline)) void
ck__accum_q_avx512(float *const *acc, const float *const *w, const float *rows, size_t stride,
                   int n, int hd, const int nq)
{
    int i = 0;
    for (; i + 48 <= hd; i += 48)
        ck__accum_q_blk512(acc, w, rows, stride, n, i, nq, 3);
    if (hd - i == 32) ck__accum_q_blk512(acc, w, rows, stride, n, i, nq, 2);
    if (hd - i == 16) ck__accum_q_blk512(acc, w, rows, stride, n, i, nq, 1);
}

/* One function per query count, so that each keeps its accumulators in
 * registers. */
#define CK__Q_FNS(NQ)                                                                              \
    CK_AVX512 static __attribute__((noinline)) void ck__scores_q##NQ##_avx512(                     \
        float *const *out, const float *const *q, const float *rows, size_t stride, int n, int hd, \
        float scale)                                                                               \
    {                                                                                              \
        ck__scores_q_avx512(out, q, rows, stride, n, hd, scale, NQ);                               \
    }                                                                                              \
    CK_AVX512 static __attribute__((noinline)) void ck__accum_q##NQ##_avx512(                      \
        float *const *acc, const float *const *w, const float *rows, size_t stride, int n, int hd) \
    {                                                                                              \
        ck__accum_q_avx512(acc, w, rows, stride, n, hd, NQ);                                       \
    }
CK__Q_FNS(2)
CK__Q_FNS(3)
CK__Q_FNS(4)
#undef CK__Q_FNS
#endif

/* rt: F32 or F16 rows (ck_attn_scores). */
static void ck__scores_generic(float *out, const float *q, const void *rows, enum mdl_dtype rt,
                               size_t stride, int n, int hd, float scale)
{
    for (int j = 0; j < n; j++)
        out[j] = ck__dotw_generic(q, rows, (size_t)j * stride, rt, hd) * scale;
}

static void ck__accum_generic(float *acc, const float *w, const void *rows, enum mdl_dtype rt,
                              size_t stride, int n, int hd)
{
    for (int j = 0; j < n; j++)
        for (int i = 0; i < hd; i++)
            acc[i] += w[j] * ck__w1(rows, (size_t)j * stride + (size_t)i, rt);
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

/* ---- RoPE ----
 * Every element is a * co - b * si or a * si + b * co: two products, each
 * rounded, and one rounded addition (never fused: ISO C mode), so the
 * vector version gives the scalar one's bits. GCC fuses a multiply into an
 * add-subtract (vaddsubps) even so, so neither version has one: the vector
 * one blends a subtraction and an addition, and its tail runs in a function
 * built without FMA. */

/* Pairs [from, hd / 2) of one head. */
static __attribute__((noinline)) void ck__rope_pairs(float *v, const float *cs, int hd, int from,
                                                     enum mdl_rope_layout layout)
{
    int half = hd / 2;
    for (int i = from; i < half; i++) {
        float co = cs[2 * i], si = cs[2 * i + 1];
        float *pa = layout == MDL_ROPE_ADJACENT ? v + 2 * i : v + i;
        float *pb = layout == MDL_ROPE_ADJACENT ? pa + 1 : v + i + half;
        float a = *pa, b = *pb;
        *pa = a * co - b * si;
        *pb = a * si + b * co;
    }
}

void ck_rope_generic(float *v, int heads, const float *cs, int hd, enum mdl_rope_layout layout)
{
    for (int h = 0; h < heads; h++)
        ck__rope_pairs(v + (size_t)h * hd, cs, hd, 0, layout);
}

#ifdef CK_HAVE_X86
CK_AVX2 static void ck__rope_avx2(float *v, int heads, const float *cs, int hd,
                                  enum mdl_rope_layout layout)
{
    int half = hd / 2;
    for (int h = 0; h < heads; h++, v += hd) {
        int i = 0;
        if (layout == MDL_ROPE_ADJACENT) {
            /* 4 pairs (a, b) and their (co, si), as stored: a * co - b * si
             * in the even lanes, b * co + a * si in the odd ones */
            for (; i + 8 <= hd; i += 8) {
                __m256 x = _mm256_loadu_ps(v + i), c = _mm256_loadu_ps(cs + i);
                __m256 ab = _mm256_mul_ps(x, _mm256_moveldup_ps(c));
                __m256 ba = _mm256_mul_ps(_mm256_permute_ps(x, 0xb1), _mm256_movehdup_ps(c));
                _mm256_storeu_ps(
                    v + i, _mm256_blend_ps(_mm256_sub_ps(ab, ba), _mm256_add_ps(ab, ba), 0xaa));
            }
            i /= 2;
        } else {
            /* 8 pairs (v[i], v[i + half]); their (co, si) taken apart */
            for (; i + 8 <= half; i += 8) {
                __m256 c0 = _mm256_loadu_ps(cs + 2 * i), c1 = _mm256_loadu_ps(cs + 2 * i + 8);
                __m256 co = _mm256_castpd_ps(_mm256_permute4x64_pd(
                    _mm256_castps_pd(_mm256_shuffle_ps(c0, c1, _MM_SHUFFLE(2, 0, 2, 0))), 0xd8));
                __m256 si = _mm256_castpd_ps(_mm256_permute4x64_pd(
                    _mm256_castps_pd(_mm256_shuffle_ps(c0, c1, _MM_SHUFFLE(3, 1, 3, 1))), 0xd8));
                __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
                _mm256_storeu_ps(v + i, _mm256_sub_ps(_mm256_mul_ps(a, co), _mm256_mul_ps(b, si)));
                _mm256_storeu_ps(v + half + i,
                                 _mm256_add_ps(_mm256_mul_ps(a, si), _mm256_mul_ps(b, co)));
            }
        }
        if (i < half) ck__rope_pairs(v, cs, hd, i, layout);
    }
}
#endif

static void (*ck__rope_impl)(float *, int, const float *, int,
                             enum mdl_rope_layout) = ck_rope_generic;

static float (*ck__dot_impl)(const float *, const float *, int) = ck__dot_generic;
/* The attention kernels for F32 and for F16 rows; NULL (and any other row
 * type): the generic ones, which widen every element type. */
typedef void (*ck__scores_fn)(float *, const float *, const void *, size_t, int, int, float);
typedef void (*ck__accum_fn)(float *, const float *, const void *, size_t, int, int);
static ck__scores_fn ck__scores_impl, ck__scores16_impl;
static ck__accum_fn ck__accum_impl, ck__accum16_impl;
/* Several queries over F32 rows (ck_attn_scores_q), [nq - 2] for 2..4
 * queries; NULL: one query at a time. */
typedef void (*ck__scores_q_fn)(float *const *, const float *const *, const float *, size_t, int,
                                int, float);
typedef void (*ck__accum_q_fn)(float *const *, const float *const *, const float *, size_t, int,
                               int);
static ck__scores_q_fn ck__scores_q_impl[CK_ATTN_Q - 1];
static ck__accum_q_fn ck__accum_q_impl[CK_ATTN_Q - 1];
static void (*ck__matmul_impl)(float *, int, const float *, const void *, enum mdl_dtype,
                               const float *, int, int, int, int) = ck__matmul_generic;
static const char *ck__name = "generic";
static double ck__fma_ratio; /* 512- over 256-bit FMA rate, where probed */

#ifdef CK_HAVE_X86
/* F16C from CPUID leaf 1 (clang before 16 rejects "f16c" in
 * __builtin_cpu_supports). */
static int ck__has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

/* ---- the core's FMA rate ----
 * A tight loop of independent FMAs (12 accumulators: more than latency x
 * throughput on current cores), single precision. Thread CPU time, so a
 * time slice lost to another process counts against nothing. */
#ifdef CK_HAVE_X86
/* The loop for one vector type: declares the accumulators, runs `iters`
 * steps and leaves their sum in s (the caller reduces it to a float). */
#define CK__FMA_LOOP(VEC, SET1, FMA, ADD)                                                          \
    VEC m = SET1(0.999999f), c = SET1(1e-7f);                                                      \
    VEC a0 = SET1(1.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0;   \
    VEC a9 = a0, a10 = a0, a11 = a0;                                                               \
    for (long it = 0; it < iters; it++) {                                                          \
        a0 = FMA(a0, m, c);                                                                        \
        a1 = FMA(a1, m, c);                                                                        \
        a2 = FMA(a2, m, c);                                                                        \
        a3 = FMA(a3, m, c);                                                                        \
        a4 = FMA(a4, m, c);                                                                        \
        a5 = FMA(a5, m, c);                                                                        \
        a6 = FMA(a6, m, c);                                                                        \
        a7 = FMA(a7, m, c);                                                                        \
        a8 = FMA(a8, m, c);                                                                        \
        a9 = FMA(a9, m, c);                                                                        \
        a10 = FMA(a10, m, c);                                                                      \
        a11 = FMA(a11, m, c);                                                                      \
        /* opaque to the compiler: no chain can be merged with another */                          \
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5));         \
        __asm__ volatile("" : "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));       \
    }                                                                                              \
    VEC s = ADD(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7))),                 \
                ADD(ADD(a8, a9), ADD(a10, a11)))

CK_AVX512 static float ck__fma512(long iters)
{
    CK__FMA_LOOP(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps);
    return _mm512_reduce_add_ps(s);
}

CK_AVX2 static float ck__fma256(long iters)
{
    CK__FMA_LOOP(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps);
    return ck__hsum(s, _mm256_setzero_ps());
}
#undef CK__FMA_LOOP
#endif

double ck_fma_gflops(int bits, long iters, float *sink)
{
#ifdef CK_HAVE_X86
    __builtin_cpu_init();
    int w512 = bits == 512;
    if ((bits != 512 && bits != 256) || iters < 1 ||
        (w512 ? !__builtin_cpu_supports("avx512f")
              : !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))))
        return 0;
    int64_t t0 = td_thread_cpu_ns();
    *sink += w512 ? ck__fma512(iters) : ck__fma256(iters);
    int64_t ns = td_thread_cpu_ns() - t0;
    return ns > 0 ? (double)iters * 12 * (bits / 32) * 2 / (double)ns : 0;
#else
    (void)bits;
    (void)iters;
    (void)sink;
    return 0;
#endif
}

static double ck__probe_fma512_ratio(void)
{
    float sink = 0;
    double g512 = 0, g256 = 0;
    for (int rep = 0; rep < 3; rep++) {
        double a = ck_fma_gflops(512, 50000, &sink), b = ck_fma_gflops(256, 50000, &sink);
        if (a > g512) g512 = a;
        if (b > g256) g256 = b;
    }
    return g256 > 0 && sink != 0 ? g512 / g256 : 0; /* sink: keeps the loops */
}

static void ck__select(void)
{
#ifdef CK_HAVE_X86
    __builtin_cpu_init();
    /* The AVX2 kernels widen F16 weights with F16C, which every AVX2 CPU
     * has; the check keeps a machine without it on the generic code. */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && ck__has_f16c()) {
        ck__dot_impl = ck__dot_avx2;
        ck__rope_impl = ck__rope_avx2;
        ck__matmul_impl = ck__matmul_avx2;
        ck__scores_impl = ck__scores_avx2;
        ck__accum_impl = ck__accum_avx2;
        ck__scores16_impl = ck__scores16_avx2;
        ck__accum16_impl = ck__accum16_avx2;
        ck__name = "avx2";
        /* Same bits as the AVX2 kernels (see ck__blk512), wider and with
         * more registers; some shapes see ck__matmul_split512. F16 attention
         * rows keep the AVX2 kernels: their bits are the same, and what
         * bounds them is the bytes read. TANDEM_CPU_NO_AVX512=1 keeps the
         * AVX2 set (comparisons). */
        if (__builtin_cpu_supports("avx512f") && !getenv("TANDEM_CPU_NO_AVX512")) {
            ck__matmul_impl = ck__matmul_avx512;
            ck__scores_impl = ck__scores_avx512;
            ck__accum_impl = ck__accum_avx512;
            ck__scores_q_impl[0] = ck__scores_q2_avx512;
            ck__scores_q_impl[1] = ck__scores_q3_avx512;
            ck__scores_q_impl[2] = ck__scores_q4_avx512;
            ck__accum_q_impl[0] = ck__accum_q2_avx512;
            ck__accum_q_impl[1] = ck__accum_q3_avx512;
            ck__accum_q_impl[2] = ck__accum_q4_avx512;
            ck__name = "avx512";
            const char *all = getenv("TANDEM_CPU_AVX512");
            if (!all || !all[0] || strcmp(all, "0") == 0) {
                ck__fma_ratio = ck__probe_fma512_ratio();
                if (ck__fma_ratio < 1.5) {
                    ck__matmul_impl = ck__matmul_split512;
                    ck__name = "avx512 (split FMA: f32 a row at a time below 4 rows; avx2 for "
                               "16-bit below 4, f32 at 16-23)";
                }
            }
        }
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

double ck_fma512_ratio(void)
{
    return ck__fma_ratio;
}

float ck_dot(const float *a, const float *b, int n)
{
    return ck__dot_impl(a, b, n);
}

void ck_matmul(float *out, int ldo, const float *x, const void *W, enum mdl_dtype wt,
               const float *bias, int T, int K, int j0, int j1)
{
    ck__matmul_impl(out, ldo, x, W, wt, bias, T, K, j0, j1);
}

void ck_row_to_f32(float *dst, const void *W, enum mdl_dtype wt, size_t row, int K)
{
    size_t off = row * (size_t)K;
    if (wt == MDL_DTYPE_F32) {
        memcpy(dst, (const float *)W + off, (size_t)K * sizeof(float));
    } else if (wt == MDL_DTYPE_F16) {
        ck_f16_to_f32(dst, (const uint16_t *)W + off, K);
    } else {
        for (int i = 0; i < K; i++)
            dst[i] = ck__w1(W, off + (size_t)i, MDL_DTYPE_BF16);
    }
}

void ck_attn_scores(float *out, const float *q, const void *rows, enum mdl_dtype rt, size_t stride,
                    int n, int hd, float scale)
{
    ck__scores_fn f = rt == MDL_DTYPE_F32   ? ck__scores_impl
                      : rt == MDL_DTYPE_F16 ? ck__scores16_impl
                                            : NULL;
    if (f)
        f(out, q, rows, stride, n, hd, scale);
    else
        ck__scores_generic(out, q, rows, rt, stride, n, hd, scale);
}

void ck_attn_accum(float *acc, const float *w, const void *rows, enum mdl_dtype rt, size_t stride,
                   int n, int hd)
{
    ck__accum_fn f = rt == MDL_DTYPE_F32   ? ck__accum_impl
                     : rt == MDL_DTYPE_F16 ? ck__accum16_impl
                                           : NULL;
    if (f)
        f(acc, w, rows, stride, n, hd);
    else
        ck__accum_generic(acc, w, rows, rt, stride, n, hd);
}

/* The rows every query reads (the fewest of their n) go to the several-query
 * kernel, in whole groups of 4 for the scores; each query's own rows after
 * those, to the one-query kernels, which carry on in the same order. */
static int ck__several_q(int nq, enum mdl_dtype rt, int hd)
{
    return nq >= 2 && nq <= CK_ATTN_Q && rt == MDL_DTYPE_F32 && hd % 16 == 0;
}

static int ck__fewest_rows(const int *n, int nq)
{
    int m = n[0];
    for (int k = 1; k < nq; k++)
        m = n[k] < m ? n[k] : m;
    return m;
}

void ck_attn_scores_q(float *const *out, const float *const *q, int nq, const void *rows,
                      enum mdl_dtype rt, size_t stride, const int *n, int hd, float scale)
{
    int done = 0;
    if (ck__several_q(nq, rt, hd) && ck__scores_q_impl[nq - 2]) {
        done = ck__fewest_rows(n, nq) / 4 * 4;
        if (done > 0) ck__scores_q_impl[nq - 2](out, q, rows, stride, done, hd, scale);
    }
    size_t es = rt == MDL_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    for (int k = 0; k < nq; k++)
        if (n[k] > done)
            ck_attn_scores(out[k] + done, q[k], (const char *)rows + (size_t)done * stride * es, rt,
                           stride, n[k] - done, hd, scale);
}

void ck_attn_accum_q(float *const *acc, const float *const *w, int nq, const void *rows,
                     enum mdl_dtype rt, size_t stride, const int *n, int hd)
{
    int done = 0;
    if (ck__several_q(nq, rt, hd) && ck__accum_q_impl[nq - 2]) {
        done = ck__fewest_rows(n, nq);
        if (done > 0) ck__accum_q_impl[nq - 2](acc, w, rows, stride, done, hd);
    }
    size_t es = rt == MDL_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    for (int k = 0; k < nq; k++)
        if (n[k] > done)
            ck_attn_accum(acc[k], w[k] + done, (const char *)rows + (size_t)done * stride * es, rt,
                          stride, n[k] - done, hd);
}

void ck_rope(float *v, int heads, const float *cs, int hd, enum mdl_rope_layout layout)
{
    ck__rope_impl(v, heads, cs, hd, layout);
}

void ck_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    float ss = ck_dot(x, x, n);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * inv);
}
