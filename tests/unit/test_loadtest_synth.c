/* Unit tests for loadtest/lt_synth: samplers, the generator and the fits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "loadtest/lt_synth.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void test_rng_deterministic(void **state)
{
    (void)state;
    lt_rng a, b;
    lt_rng_seed(&a, 42);
    lt_rng_seed(&b, 42);
    for (int i = 0; i < 100; i++)
        assert_true(lt_rng_next(&a) == lt_rng_next(&b));
    lt_rng_seed(&b, 43);
    assert_true(lt_rng_next(&a) != lt_rng_next(&b));
    double sum = 0;
    for (int i = 0; i < 100000; i++) {
        double u = lt_rng_uniform(&a);
        assert_true(u > 0 && u < 1);
        sum += u;
    }
    assert_true(fabs(sum / 100000 - 0.5) < 0.005);
}

/* Mean k*theta and CV 1/sqrt(k) of Gamma samples, for shapes below and above 1. */
static void check_gamma(double shape, double scale)
{
    lt_rng r;
    lt_rng_seed(&r, 7);
    const int n = 200000;
    double sum = 0, sumsq = 0;
    for (int i = 0; i < n; i++) {
        double x = lt_rng_gamma(&r, shape, scale);
        assert_true(x >= 0);
        sum += x;
        sumsq += x * x;
    }
    double mean = sum / n, var = sumsq / n - mean * mean, cv = sqrt(var) / mean;
    double want_mean = shape * scale, want_cv = 1 / sqrt(shape);
    print_message("gamma(%g,%g): mean %.4f (want %.4f) cv %.4f (want %.4f)\n", shape, scale, mean,
                  want_mean, cv, want_cv);
    assert_true(fabs(mean - want_mean) / want_mean < 0.02);
    assert_true(fabs(cv - want_cv) / want_cv < 0.03);
}

static void test_gamma_moments(void **state)
{
    (void)state;
    check_gamma(0.5, 2.0); /* BurstGPT's default */
    check_gamma(0.25, 0.1);
    check_gamma(3.0, 0.5);
}

static void test_zipf(void **state)
{
    (void)state;
    lt_zipf z;
    assert_int_equal(lt_zipf_init(&z, 1.1, 0), TD_EINVAL);
    assert_int_equal(lt_zipf_init(&z, -1, 10), TD_EINVAL);
    assert_int_equal(lt_zipf_init(&z, 1.1, 100), 0);
    lt_rng r;
    lt_rng_seed(&r, 3);
    int counts[101] = {0};
    const int n = 100000;
    for (int i = 0; i < n; i++) {
        int32_t v = lt_zipf_sample(&z, &r);
        assert_true(v >= 1 && v <= 100);
        counts[v]++;
    }
    /* P(1) / P(2) = 2^1.1 */
    double ratio = (double)counts[1] / counts[2];
    assert_true(fabs(ratio - pow(2, 1.1)) < 0.1);
    lt_zipf_free(&z);
    lt_zipf_free(NULL);
}

static void test_generate_and_fit(void **state)
{
    (void)state;
    lt_synth_params p;
    lt_synth_defaults(&p);
    assert_true(p.gamma_shape == 0.5 && p.gamma_scale_s == 2.0 && p.req_zipf_s == 1.1);
    p.n = 20000;
    p.seed = 11;
    lt_trace tr;
    lt_trace_init(&tr);
    assert_int_equal(lt_synth_generate(&p, &tr), 0);
    assert_int_equal(tr.n, 20000);
    assert_int_equal(tr.reqs[0].t_ns, 0);
    double *gaps = malloc((tr.n - 1) * sizeof(double));
    int32_t *in = malloc(tr.n * sizeof(int32_t)), *out = malloc(tr.n * sizeof(int32_t));
    assert_non_null(gaps);
    assert_non_null(in);
    assert_non_null(out);
    for (size_t i = 0; i < tr.n; i++) {
        if (i) gaps[i - 1] = td_ns_to_s(tr.reqs[i].t_ns - tr.reqs[i - 1].t_ns);
        in[i] = tr.reqs[i].input_tokens;
        out[i] = tr.reqs[i].output_tokens;
        assert_true(in[i] >= 1 && in[i] <= p.req_max);
        assert_true(out[i] >= 1 && out[i] <= p.resp_max);
    }
    lt_gamma_fit f;
    assert_int_equal(lt_gamma_fit_samples(gaps, tr.n - 1, &f), 0);
    print_message("fit: mom k=%.3f theta=%.3f mle k=%.3f theta=%.3f\n", f.mom_shape, f.mom_scale,
                  f.mle_shape, f.mle_scale);
    assert_true(fabs(f.mom_shape - 0.5) < 0.05);
    assert_true(fabs(f.mom_scale - 2.0) < 0.2);
    assert_true(fabs(f.mle_shape - 0.5) < 0.02);
    assert_true(fabs(f.mle_scale - 2.0) < 0.1);
    double s;
    assert_int_equal(lt_zipf_fit(in, tr.n, p.req_max, &s), 0);
    print_message("fit: request zipf s=%.4f\n", s);
    assert_true(fabs(s - 1.1) < 0.02);
    assert_int_equal(lt_zipf_fit(out, tr.n, p.resp_max, &s), 0);
    assert_true(fabs(s - 1.1) < 0.02);

    /* Same seed, same workload. */
    lt_trace again;
    lt_trace_init(&again);
    assert_int_equal(lt_synth_generate(&p, &again), 0);
    assert_true(again.reqs[19999].t_ns == tr.reqs[19999].t_ns);
    assert_int_equal(again.reqs[777].input_tokens, tr.reqs[777].input_tokens);
    lt_trace_free(&again);

    /* The report runs and includes windows. */
    char buf[1 << 16];
    FILE *fp = fmemopen(buf, sizeof(buf), "w");
    lt_trace small = tr;
    small.n = 500;
    assert_int_equal(lt_synth_fit_report(&small, 100, fp), 0);
    fclose(fp);
    assert_non_null(strstr(buf, "\"windows\""));
    assert_non_null(strstr(buf, "mom_shape"));

    free(gaps);
    free(in);
    free(out);
    lt_trace_free(&tr);
}

static void test_fit_errors(void **state)
{
    (void)state;
    lt_gamma_fit f;
    double one[1] = {1};
    assert_int_equal(lt_gamma_fit_samples(one, 1, &f), TD_EINVAL);
    double same[3] = {2, 2, 2};
    assert_int_equal(lt_gamma_fit_samples(same, 3, &f), TD_EINVAL);
    int32_t zeros[2] = {0, 0};
    double s;
    assert_int_equal(lt_zipf_fit(zeros, 2, 10, &s), TD_EINVAL);
    /* digamma(1) = -Euler-Mascheroni */
    assert_true(fabs(lt_digamma(1.0) + 0.5772156649) < 1e-8);
    assert_true(fabs(lt_digamma(0.5) + 1.9635100260) < 1e-8);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng_deterministic),
        cmocka_unit_test(test_gamma_moments),
        cmocka_unit_test(test_zipf),
        cmocka_unit_test(test_generate_and_fit),
        cmocka_unit_test(test_fit_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
