/* Sampler: fixed logits, fixed seeds. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "engine/sampler.h"

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_ties_lowest),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_tokens_and_stops),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_split_stream),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
