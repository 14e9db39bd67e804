/* cpu_kernels: the CPU backend's numeric kernels (prefix ck_).
 *
 * Determinism: ck_dot fixes its reduction order for a given length n (16 lanes
 * in two 8-wide accumulators, then a fixed horizontal sum, then the tail), and
 * ck_matmul computes every output element with ck_dot's order, so a row's
 * result never depends on how many rows are computed together or on which
 * thread computes it. An AVX2+FMA version is chosen at run time when the CPU
 * has it; results are then fixed for that machine. */
#ifndef TANDEM_ENGINE_BACKEND_CPU_KERNELS_H
#define TANDEM_ENGINE_BACKEND_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"

/* Selects the kernel variant (idempotent, thread-safe to call before use). */
void ck_init(void);
/* "avx512" (the matmul and f32 attention; other kernels AVX2), "avx512
 * (split FMA: ...)" where a start-up probe (about 2 ms in ck_init) finds
 * the 512-bit FMAs under 1.5x the 256-bit rate (there F32 weights against
 * 1-3 rows of x are read a row at a time, and the AVX2 matmul is faster for
 * 16-bit weights against 1-3 rows and F32 weights against 16-23), "avx2" or
 * "generic". From 24 rows of x both AVX-512 variants pack W in blocks of 8
 * rows whose outputs share accumulators. The same bits every way.
 * TANDEM_CPU_NO_AVX512=1 in the environment keeps AVX2, TANDEM_CPU_AVX512=1
 * runs AVX-512 for every shape without the probe. */
const char *ck_variant(void);
/* The probe's 512-bit over 256-bit FMA rate; 0 when it did not run. */
double ck_fma512_ratio(void);

/* GFLOP/s of one run of `iters` steps of 12 independent FMA chains with
 * `bits`-wide vectors (256 or 512) on this thread, by its CPU time; 0 where
 * the CPU lacks them. *sink takes the chains' sum (keep it live). */
double ck_fma_gflops(int bits, long iters, float *sink);

/* sum_i a[i] * b[i] */
float ck_dot(const float *a, const float *b, int n);

/* out[t][j] = dot(x[t], W[j]) (+ bias[j]) for t < T and j in [j0, j1).
 * x: [T][K] F32 (row stride K), W: [N][K] elements of dtype wt (F32, F16 or
 * BF16, widened to F32 in registers: the result is the same as with W
 * widened beforehand), out: [T][ldo], bias: [N] or NULL. Every element is
 * reduced in ck_dot's order whatever T, j0, j1 and the blocking. */
void ck_matmul(float *out, int ldo, const float *x, const void *W, enum mdl_dtype wt,
               const float *bias, int T, int K, int j0, int j1);

/* dst[0..K) = row `row` of W ([rows][K] elements of dtype wt), as F32. */
void ck_row_to_f32(float *dst, const void *W, enum mdl_dtype wt, size_t row, int K);

/* Attention over n key/value rows of hd elements, row j at element j * stride
 * of rows, elements of type rt (MDL_DTYPE_F32, or MDL_DTYPE_F16 for a
 * binary16 KV pool; MDL_DTYPE_BF16 works too, on the generic kernels):
 * ck_attn_scores: out[j] = dot(q, k_j) * scale, each dot in ck_dot's order;
 * ck_attn_accum:  acc[i] += w[j] * v_j[i] for j = 0..n-1 in order.
 * One call per KV block instead of one per position. F16 elements are
 * widened in registers: the result has the bits of the same call on the rows
 * converted by ck_f16_to_f32, without the conversion's stores and reloads. */
void ck_attn_scores(float *out, const float *q, const void *rows, enum mdl_dtype rt, size_t stride,
                    int n, int hd, float scale);
void ck_attn_accum(float *acc, const float *w, const void *rows, enum mdl_dtype rt, size_t stride,
                   int n, int hd);

/* The same for nq (1..CK_ATTN_Q) queries over the same rows, query k over
 * the first n[k] of them: out[k][j] = dot(q[k], k_j) * scale, and
 * acc[k][i] += w[k][j] * v_j[i], with the bits ck_attn_scores and
 * ck_attn_accum give query k alone. The rows are read once for all the
 * queries (a prefill's tokens of one sequence over one block). */
#define CK_ATTN_Q 4
void ck_attn_scores_q(float *const *out, const float *const *q, int nq, const void *rows,
                      enum mdl_dtype rt, size_t stride, const int *n, int hd, float scale);
void ck_attn_accum_q(float *const *acc, const float *const *w, int nq, const void *rows,
                     enum mdl_dtype rt, size_t stride, const int *n, int hd);

/* IEEE binary16 rows: dst[i] = round-to-nearest-even(src[i]) and back. The
 * F16C and scalar versions give the same bits. */
void ck_f32_to_f16(uint16_t *dst, const float *src, int n);
void ck_f16_to_f32(float *dst, const uint16_t *src, int n);

/* RoPE: rotates `heads` head vectors of hd elements, one after another
 * from v, by the angles of one position, cs[hd / 2][2] = (cos, sin) of
 * each frequency; pairs (2i, 2i + 1) (MDL_ROPE_ADJACENT) or (i, i + hd / 2)
 * (MDL_ROPE_HALF). The generic version (tests) gives the same bits. */
void ck_rope(float *v, int heads, const float *cs, int hd, enum mdl_rope_layout layout);
void ck_rope_generic(float *v, int heads, const float *cs, int hd, enum mdl_rope_layout layout);

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], i < n */
void ck_rmsnorm(float *out, const float *x, const float *w, int n, float eps);

#endif
