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

/* Selects the kernel variant (idempotent, thread-safe to call before use). */
void ck_init(void);
/* "avx2" or "generic" */
const char *ck_variant(void);

/* sum_i a[i] * b[i] */
float ck_dot(const float *a, const float *b, int n);

/* out[t][j] = dot(x[t], W[j]) (+ bias[j]) for t < T and j in [j0, j1).
 * x: [T][K] (row stride K), W: [N][K], out: [T][ldo], bias: [N] or NULL. */
void ck_matmul(float *out, int ldo, const float *x, const float *W, const float *bias, int T, int K,
               int j0, int j1);

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], i < n */
void ck_rmsnorm(float *out, const float *x, const float *w, int n, float eps);

#endif
