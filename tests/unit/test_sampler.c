/* Sampler: fixed logits, fixed seeds.
 * --bench: the time of one draw over a 32,000-token vocabulary, per mode. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "common/err.h"
#include "engine/sampler.h"
#include "engine/sampler_kernels.h"

#define V 8
static const float base_logits[V] = {1.0f, 3.0f, 2.5f, 3.0f, -1.0f, 0.5f, 2.9f, 0.0f};

static smp_sampler *make(const smp_params *p)
{
    smp_sampler *s = NULL;
    assert_int_equal(smp_create(p, V, &s), 0);
    return s;
}

static int32_t sample(smp_sampler *s)
{
    float lg[V];
    memcpy(lg, base_logits, sizeof(lg));
    int32_t t = -1;
    assert_int_equal(smp_sample(s, lg, &t), 0);
    return t;
}

/* One generation step: draw, then accept (the random stream is keyed by the
 * number of tokens accepted so far). */
static int32_t draw(smp_sampler *s)
{
    int32_t t = sample(s);
    (void)smp_accept(s, t);
    return t;
}

static void test_greedy_ties_lowest(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    smp_sampler *s = make(&p);
    assert_int_equal(sample(s), 1); /* 1 and 3 tie at 3.0 */
    smp_free(s);
}

static void test_seed_reproducible(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    p.seed = 42;
    int32_t a[64], b[64], c[64];
    smp_sampler *s1 = make(&p), *s2 = make(&p);
    p.seed = 43;
    smp_sampler *s3 = make(&p);
    int differ = 0;
    for (int i = 0; i < 64; i++) {
        a[i] = draw(s1);
        b[i] = draw(s2);
        c[i] = draw(s3);
        differ |= a[i] != c[i];
    }
    assert_memory_equal(a, b, sizeof(a));
    assert_true(differ);
    smp_free(s1);
    smp_free(s2);
    smp_free(s3);
}

/* Frequencies at temperature 1 follow the softmax. */
static void test_distribution(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    p.seed = 7;
    smp_sampler *s = make(&p);
    int count[V] = {0};
    const int N = 20000;
    for (int i = 0; i < N; i++)
        count[draw(s)]++;
    double z = 0;
    for (int i = 0; i < V; i++)
        z += exp(base_logits[i]);
    for (int i = 0; i < V; i++) {
        double want = exp(base_logits[i]) / z;
        assert_true(fabs((double)count[i] / N - want) < 0.015);
    }
    smp_free(s);
}

static void test_top_k(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 5.0f; /* flat enough that everything would appear */
    p.top_k = 3;
    p.seed = 1;
    smp_sampler *s = make(&p);
    int seen[V] = {0};
    for (int i = 0; i < 2000; i++)
        seen[draw(s)] = 1;
    /* The three best: 1 and 3 (3.0) and 6 (2.9). */
    for (int i = 0; i < V; i++)
        assert_int_equal(seen[i], i == 1 || i == 3 || i == 6);
    smp_free(s);
    p.top_k = 1;
    s = make(&p);
    for (int i = 0; i < 100; i++)
        assert_int_equal(draw(s), 1);
    smp_free(s);
}

static void test_top_p(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    p.top_p = 0.6f;
    p.seed = 3;
    /* probs (T=1): ids 1,3 0.263 each, 6 0.238, 2 0.160: nucleus 0.6 = {1, 3, 6}
     * (0.527 < 0.6 <= 0.765), nucleus 0.5 = {1, 3}. */
    smp_sampler *s = make(&p);
    int seen[V] = {0};
    for (int i = 0; i < 3000; i++)
        seen[draw(s)] = 1;
    for (int i = 0; i < V; i++)
        assert_int_equal(seen[i], i == 1 || i == 3 || i == 6);
    smp_free(s);
    p.top_p = 0.5f;
    s = make(&p);
    memset(seen, 0, sizeof(seen));
    for (int i = 0; i < 3000; i++)
        seen[draw(s)] = 1;
    for (int i = 0; i < V; i++)
        assert_int_equal(seen[i], i == 1 || i == 3);
    smp_free(s);
    p.top_p = 0.2f;
    s = make(&p);
    for (int i = 0; i < 100; i++)
        assert_int_equal(draw(s), 1);
    smp_free(s);
}

static void test_min_tokens_and_stops(void **st)
{
    (void)st;
    int32_t stops[1] = {6};
    smp_params p;
    smp_params_defaults(&p);
    p.eos_id = 1;
    p.stop_ids = stops;
    p.n_stop_ids = 1;
    p.min_tokens = 2;
    p.max_tokens = 5;
    smp_sampler *s = make(&p);
    /* EOS (1) is masked: greedy picks 3. */
    assert_int_equal(sample(s), 3);
    assert_int_equal(smp_accept(s, 3), SMP_CONTINUE);
    assert_int_equal(sample(s), 3);
    assert_int_equal(smp_accept(s, 3), SMP_CONTINUE);
    assert_int_equal(sample(s), 1); /* min_tokens reached */
    assert_int_equal(smp_accept(s, 1), SMP_STOP_EOS);
    assert_int_equal(smp_accept(s, 6), SMP_STOP_TOKEN);
    assert_int_equal(smp_accept(s, 0), SMP_STOP_LENGTH);
    assert_int_equal(smp_generated(s), 5);
    smp_free(s);

    p.ignore_eos = 1;
    p.min_tokens = 0;
    p.max_tokens = 0;
    s = make(&p);
    assert_int_equal(smp_accept(s, 1), SMP_CONTINUE);
    smp_free(s);
}

static void test_bad_input(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    smp_sampler *s = NULL;
    assert_int_equal(smp_create(&p, 0, &s), TD_EINVAL);
    p.n_stop_ids = 2;
    assert_int_equal(smp_create(&p, V, &s), TD_EINVAL);
    assert_null(s);
    smp_params_defaults(&p);
    s = make(&p);
    float nan_logits[V];
    for (int i = 0; i < V; i++)
        nan_logits[i] = NAN;
    int32_t t = -5;
    assert_int_equal(smp_sample(s, nan_logits, &t), TD_ERANGE);
    assert_int_equal(smp_logits_find_nan(nan_logits, V), 0);
    /* one NaN among finite logits fails too (greedy and sampled), and
     * leaves the sampler usable for the next step */
    float one_nan[V];
    for (int i = 0; i < V; i++)
        one_nan[i] = (float)i;
    one_nan[3] = NAN;
    assert_int_equal(smp_logits_find_nan(one_nan, V), 3);
    assert_int_equal(smp_sample(s, one_nan, &t), TD_ERANGE);
    assert_int_equal(t, -5);
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    smp_sampler *s2 = make(&p);
    assert_int_equal(smp_sample(s2, one_nan, &t), TD_ERANGE);
    one_nan[3] = 3.0f;
    assert_int_equal(smp_logits_find_nan(one_nan, V), -1);
    assert_int_equal(smp_sample(s2, one_nan, &t), 0);
    assert_true(t >= 0 && t < V);
    smp_free(s2);
    smp_free(s);
    smp_free(NULL);
}

/* The draw for token g depends on (seed, g) alone: a sampler that only
 * accepted the first g tokens (a decode worker continuing what a prefill
 * worker drew) draws what the one that drew all of them draws next. */
static void test_split_stream(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    p.top_p = 0.9f;
    p.seed = 1234;
    smp_sampler *whole = make(&p);
    int32_t ref[40];
    for (int i = 0; i < 40; i++)
        ref[i] = draw(whole);
    for (int split = 1; split < 40; split += 7) {
        smp_sampler *rest = make(&p);
        for (int i = 0; i < split; i++)
            (void)smp_accept(rest, ref[i]);
        for (int i = split; i < 40; i++)
            assert_int_equal(draw(rest), ref[i]);
        smp_free(rest);
    }
    smp_free(whole);
}

/* ---- the vocabulary passes (engine/sampler_kernels.c) ---- */

static uint64_t rng_next(uint64_t *x)
{
    *x ^= *x << 13, *x ^= *x >> 7, *x ^= *x << 17;
    return *x;
}

/* Logits with what breaks vector code: ties for the maximum in different
 * lanes, -0 and +0, -inf (masked ids), very small values. */
static void fill_awkward(float *x, int n, uint64_t *r)
{
    for (int i = 0; i < n; i++) {
        uint64_t v = rng_next(r);
        switch (v % 11) {
        case 0:
            x[i] = -INFINITY;
            break;
        case 1:
            x[i] = 0.0f;
            break;
        case 2:
            x[i] = -0.0f;
            break;
        case 3:
            x[i] = 5.0f;
            break; /* the tied maximum, most lengths */
        case 4:
            x[i] = -1e30f;
            break;
        default:
            x[i] = (float)(v >> 40) / 16777216.0f * 8.0f - 4.0f;
        }
    }
}

/* The AVX2 passes give the generic ones' bits, whatever the length (lane
 * tails) and contents; the argmax is the scalar definition's. */
static void test_kernels_same_bits(void **st)
{
    (void)st;
    enum { MAXN = 32000 };
    static float x[MAXN], a[MAXN], b[MAXN];
    uint64_t r = 99;
    int lens[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 1000, MAXN};
    for (size_t k = 0; k < sizeof(lens) / sizeof(lens[0]); k++) {
        for (int rep = 0; rep < 20; rep++) {
            int n = lens[k];
            fill_awkward(x, n, &r);
            int ref = 0;
            for (int i = 1; i < n; i++)
                if (x[i] > x[ref]) ref = i;
            assert_int_equal(smpk_argmax(x, n), ref);
            assert_int_equal(smpk_argmax_generic(x, n), ref);
            if (x[ref] == -INFINITY) continue;
            float t = rep % 3 == 0 ? 1.0f : 0.37f * (float)(rep + 1);
            float sa = smpk_exp_sum(a, x, n, x[ref], t);
            float sb = smpk_exp_sum_generic(b, x, n, x[ref], t);
            assert_memory_equal(&sa, &sb, sizeof(float));
            assert_memory_equal(a, b, sizeof(float) * (size_t)n);
            assert_true(a[ref] == 1.0f);
            assert_true(sa >= 1.0f);
        }
    }
    /* A NaN anywhere (first lane, a middle block, the tail) is reported. */
    for (int n = 1; n < 70; n++)
        for (int at = 0; at < n; at += 5) {
            fill_awkward(x, n, &r);
            x[at] = NAN;
            assert_int_equal(smpk_argmax(x, n), -1);
            assert_int_equal(smpk_argmax_generic(x, n), -1);
        }
    print_message("sampler kernels: %s\n", smpk_variant());
}

/* smpk_exp against the exact value, over its whole range. */
static void test_exp_accuracy(void **st)
{
    (void)st;
    double worst = 0;
    for (float x = 0.0f; x >= -87.3f; x -= 0.000731f) {
        float e = smpk_exp(x);
        double ref = exp((double)x);
        float rf = (float)ref;
        double ulp = (double)nextafterf(rf, INFINITY) - (double)rf;
        double err = fabs((double)e - ref) / ulp;
        if (err > worst) worst = err;
        assert_true(err <= 2.0);
    }
    print_message("smpk_exp: worst error %.3f ulp\n", worst);
    assert_true(smpk_exp(0.0f) == 1.0f);
    assert_true(smpk_exp(-0.0f) == 1.0f);
    assert_true(smpk_exp(-88.0f) == 0.0f);
    assert_true(smpk_exp(-INFINITY) == 0.0f);
    assert_true(smpk_exp(NAN) == 0.0f);
    assert_true(smpk_exp(-87.33f) > 0.0f);
}

/* A +inf logit takes all the mass: drawn at any temperature. */
static void test_inf_logit(void **st)
{
    (void)st;
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    p.seed = 5;
    smp_sampler *s = make(&p);
    for (int k = 0; k < 10; k++) {
        float lg[V];
        memcpy(lg, base_logits, sizeof(lg));
        lg[6] = INFINITY;
        int32_t t = -1;
        assert_int_equal(smp_sample(s, lg, &t), 0);
        assert_int_equal(t, 6);
        (void)smp_accept(s, t);
    }
    smp_free(s);
}

/* ---- --bench ---- */

#define BENCH_V 32000

static double bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int bench_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Logits shaped like a small model's: mostly within a few units of each
 * other (a flat tail), a handful far above. Fixed seed. */
static void bench_logits(float *lg, uint64_t seed)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < BENCH_V; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        float u = (float)(x >> 40) / 16777216.0f;
        lg[i] = 4.0f * u - 2.0f + (i % 997 == 0 ? 12.0f : 0.0f);
    }
}

/* Median over 5 passes of 1,000 draws, microseconds per draw. The logits
 * are copied back before each draw (smp_sample scales them in place); the
 * copy is timed alone and taken out. */
static double bench_mode(const smp_params *p, const float *ref, float *lg)
{
    smp_sampler *s = NULL;
    if (smp_create(p, BENCH_V, &s) != 0) return -1;
    double pass[5];
    for (int k = 0; k < 5; k++) {
        double t0 = bench_now_ns(), copy = 0;
        for (int i = 0; i < 1000; i++) {
            double c0 = bench_now_ns();
            memcpy(lg, ref, sizeof(float) * BENCH_V);
            copy += bench_now_ns() - c0;
            int32_t tok;
            if (smp_sample(s, lg, &tok) != 0) return -1;
            (void)smp_accept(s, tok);
        }
        pass[k] = (bench_now_ns() - t0 - copy) / 1000.0 / 1000.0;
    }
    smp_free(s);
    qsort(pass, 5, sizeof(double), bench_cmp);
    return pass[2];
}

static int bench(void)
{
    float *ref = malloc(sizeof(float) * BENCH_V), *lg = malloc(sizeof(float) * BENCH_V);
    if (!ref || !lg) return 1;
    bench_logits(ref, 7);
    struct {
        const char *name;
        float temperature, top_p;
        int top_k;
    } modes[] = {
        {"greedy", 0.0f, 1.0f, 0},
        {"temperature 1 (the API's default)", 1.0f, 1.0f, 0},
        {"temperature 0.8, top-p 0.9", 0.8f, 0.9f, 0},
        {"temperature 0.8, top-k 40", 0.8f, 1.0f, 40},
    };
    printf("smp_sample over %d logits (%s kernels), median of 5 passes of 1000 draws\n", BENCH_V,
           smpk_variant());
    for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
        smp_params p;
        smp_params_defaults(&p);
        p.temperature = modes[m].temperature;
        p.top_p = modes[m].top_p;
        p.top_k = modes[m].top_k;
        p.seed = 11;
        double us = bench_mode(&p, ref, lg);
        if (us < 0) return 1;
        printf("  %-36s %8.1f us per draw, %5.2f ns per logit\n", modes[m].name, us,
               us * 1000.0 / BENCH_V);
    }
    free(ref);
    free(lg);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_ties_lowest),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_tokens_and_stops),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_split_stream),
        cmocka_unit_test(test_kernels_same_bits),
        cmocka_unit_test(test_exp_accuracy),
        cmocka_unit_test(test_inf_logit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
