/* sampler kernels: the passes over a whole vocabulary that every draw makes
 * (the argmax with its NaN check, the softmax's exponentials and their sum),
 * vectorised where the CPU allows.
 *
 * At a 32,000-token vocabulary these passes cost more per sequence than a
 * small model's batched forward: with glibc's expf and a scalar argmax a
 * draw took about 280 us on the 2-core AVX2 host, a quarter of the decode
 * worker's step per sequence (docs/cpu-throughput.md, "The sampler").
 * The CPU backend's attention softmax runs on the same two kernels
 * (smpk_max, smpk_exp_sum), one row per (token, head), and its SwiGLU on
 * smpk_silu_mul: one exponential for the whole engine.
 *
 * Same bits everywhere: the AVX2 and the generic versions run the same
 * operations in the same order (every product-sum is one fused multiply-add,
 * fmaf in the generic code; the sum is kept in 8 lanes and folded in a fixed
 * order), so a draw does not depend on the CPU it ran on. smpk_exp is this
 * module's own exponential, not libm's: within 2 ulp of the exact value
 * (tests/unit/test_sampler.c checks it against expf over its whole range).
 *
 * Stateless apart from the one-time choice of the version (thread-safe). */
#ifndef TANDEM_ENGINE_SAMPLER_KERNELS_H
#define TANDEM_ENGINE_SAMPLER_KERNELS_H

/* The lowest index of the largest element of x[0..n), or -1 when any element
 * is NaN (n >= 1). -0 and +0 count as equal, as x[i] > x[best] does. */
int smpk_argmax(const float *x, int n);

/* The largest element of x[0..n), or NaN when any element is NaN (n >= 1):
 * x[smpk_argmax(x, n)] without the pass that finds its index. When the
 * largest is a zero its sign is either one's (-0 and +0 count as equal; a
 * softmax's numerators are the same with either). */
float smpk_max(const float *x, int n);

/* out[i] = smpk_exp((x[i] - mx) / t) for i in [0, n), and returns their sum
 * (lane l of 8 sums the elements i = 8k + l of the whole blocks, the lanes
 * folded as ((0+4)+(2+6))+((1+5)+(3+7)), then the tail in order). Meant for
 * x[i] <= mx and t > 0 (a softmax's numerators): any argument below the
 * smallest normal exponent's range, -inf and NaN give 0. */
float smpk_exp_sum(float *out, const float *x, int n, float mx, float t);

/* The fold of 8 lane sums smpk_exp_sum uses (((0+4)+(2+6))+((1+5)+(3+7))),
 * for other sums kept in 8 lanes. */
float smpk_fold8(const float a[8]);

/* e^x for x <= 0, as smpk_exp_sum computes each element. */
float smpk_exp(float x);

/* g[i] = silu(g[i]) * u[i] for i in [0, n): SwiGLU's gate, silu(g) = g *
 * sigmoid(g), with sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e)
 * below, e = smpk_exp(-|g|) (so no argument leaves smpk_exp's range and
 * nothing overflows), then (g * sigmoid(g)) * u. A NaN gate stays NaN. */
void smpk_silu_mul(float *g, const float *u, int n);

/* The portable versions, for tests that compare them with the dispatched
 * ones bit for bit. */
int smpk_argmax_generic(const float *x, int n);
float smpk_max_generic(const float *x, int n);
float smpk_exp_sum_generic(float *out, const float *x, int n, float mx, float t);
void smpk_silu_mul_generic(float *g, const float *u, int n);

/* "avx2" or "generic": the version smpk_argmax and smpk_exp_sum run. */
const char *smpk_variant(void);

#endif
