/* Sampler: fixed logits, fixed seeds.
 * --bench: the time of one draw over a 32,000-token vocabulary, per mode. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
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

/* Top-p over a large vocabulary, where the nucleus is found by bucketing
 * the probabilities rather than sorting them: the set drawn from must be
 * the sorted walk's. NUC_V ids, each in one of four levels by a scrambled
 * id (so no level is a run of ids); draws on fresh copies of the logits
 * until every id of the expected nucleus has come up, and none outside. */
#define NUC_V 32000

static void nuc_draws(const smp_params *p, const float *lg0, int draws, int *seen)
{
    smp_sampler *s = NULL;
    assert_int_equal(smp_create(p, NUC_V, &s), 0);
    float *lg = malloc(sizeof(float) * NUC_V);
    assert_non_null(lg);
    memset(seen, 0, sizeof(int) * NUC_V);
    for (int i = 0; i < draws; i++) {
        memcpy(lg, lg0, sizeof(float) * NUC_V);
        int32_t t = -1;
        assert_int_equal(smp_sample(s, lg, &t), 0);
        assert_true(t >= 0 && t < NUC_V);
        seen[t]++;
        (void)smp_accept(s, t);
    }
    free(lg);
    smp_free(s);
}

/* The levels of the large-vocabulary cases (T = 1): id 12345 at logit 5
 * (level 0, mass e^5 = 148.4); n1 ids at 3 (level 1: every 157th id from 3,
 * about 20.1 each) plus a step of 2e-6 times rank[k] for the k-th of them
 * (rank NULL: k), all different and within a bucket or two of the first
 * select level's 1.6% wide ones; 1 in 16 of the rest at 1 (level 2), the
 * others at 0 (level 3). Returns level 1's mass. */
static double nuc_levels(float *lg, int *level, int n1, const int *rank)
{
    static const float base[4] = {5.0f, 3.0f, 1.0f, 0.0f};
    int k1 = 0;
    double mass1 = 0.0;
    for (int i = 0; i < NUC_V; i++) {
        uint32_t h = (uint32_t)i * 2654435761u;
        level[i] = i == 12345 ? 0 : i % 157 == 3 && k1 < n1 ? 1 : (h >> 8) % 16 == 1 ? 2 : 3;
        lg[i] = base[level[i]];
        if (level[i] == 1) {
            lg[i] += 2e-6f * (float)(rank ? rank[k1] : k1);
            mass1 += exp((double)lg[i]);
            k1++;
        }
    }
    assert_int_equal(k1, n1);
    return mass1;
}

/* The draws came from the id at level 0 and the n_in level-1 ids of highest
 * rank (rank[k], or k), every one of them, and from no other id. */
static void nuc_expect(const int *level, const int *seen, int n1, const int *rank, int n_in)
{
    int n_seen = 0;
    for (int i = 0, k = 0; i < NUC_V; i++) {
        bool in = level[i] == 0;
        if (level[i] == 1) in = (rank ? rank[k] : k) >= n1 - n_in, k++;
        if (in) assert_true(seen[i] > 0);
        if (!in) assert_int_equal(seen[i], 0);
        n_seen += seen[i] > 0;
    }
    assert_int_equal(n_seen, 1 + n_in);
}

/* How many ids of each level came up, into at[4]; returns the rank by id
 * among level lv (from 1) of the last of its ids that came up (0: none). */
static int nuc_tally(const int *level, const int *seen, int lv, int at[4])
{
    int j = 0, last = 0;
    memset(at, 0, 4 * sizeof(int));
    for (int i = 0; i < NUC_V; i++) {
        j += level[i] == lv;
        if (!seen[i]) continue;
        at[level[i]]++;
        if (level[i] == lv) last = j;
    }
    return last;
}

static void test_top_p_large_vocab(void **st)
{
    (void)st;
    float *lg = malloc(sizeof(float) * NUC_V);
    int *seen = malloc(sizeof(int) * NUC_V), *level = malloc(sizeof(int) * NUC_V);
    assert_true(lg && seen && level);
    /* 200 ids at level 1: the select has to go down a level there. The sum
     * of the numerators, as the sampler forms them, is within a few units
     * of this one; the cut is put half a level-1 id past the 40th of them,
     * so that no rounding moves it. Expected: the id at 5 and the 41
     * likeliest at level 1, each drawn with a chance of 2% or more. */
    (void)nuc_levels(lg, level, 200, NULL);
    double sum = 0.0, top = exp(5.0), each = exp(3.0);
    for (int i = 0; i < NUC_V; i++)
        sum += exp((double)lg[i] - 5.0) * top;
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    p.seed = 17;
    p.top_p = (float)((top + 40.5 * each) / sum);
    nuc_draws(&p, lg, 3000, seen);
    nuc_expect(level, seen, 200, NULL, 41);

    /* Deep in the flat tail: the three upper levels whole and about the
     * 10,001 lowest ids at 0 (ties go to the lower id), none far past them
     * (the sampler's own sum of the numerators, from its exp, puts the cut
     * 20-odd ids from this test's). Few draws for 12,000 ids: the levels
     * show by how many of theirs come up (expected: 197 of the 200 at level
     * 1, 1,000 of 2,000 at level 2, 2,300 of the 10,001). */
    p.top_p = (float)((top + 200 * each + 2000 * exp(1.0) + 10000.5) / sum);
    nuc_draws(&p, lg, 5000, seen);
    int at[4], last3 = nuc_tally(level, seen, 3, at);
    assert_int_equal(at[0], 1);
    assert_true(at[1] >= 185);
    assert_true(at[2] >= 900);
    assert_true(at[3] >= 2000);
    assert_true(last3 >= 10001 - 100 && last3 <= 10001 + 100);

    /* The crossing bucket small enough to sort at once, its order by
     * probability unlike its order by id: 50 ids at level 1, their steps
     * a scramble of their order (the 2,000 at level 2 make enough
     * candidates for the buckets to be used). Expected: the id at 5 and
     * the 21 level-1 ids of highest step. */
    int rank[50];
    for (int k = 0; k < 50; k++)
        rank[k] = (k * 17) % 50;
    double mass1 = nuc_levels(lg, level, 50, rank);
    p.top_p = (float)((top + 20.5 * mass1 / 50) / (top + mass1 + 2000 * exp(1.0) + (NUC_V - 2051)));
    nuc_draws(&p, lg, 3000, seen);
    nuc_expect(level, seen, 50, rank, 21);

    /* All ids equal: the nucleus at 0.5 is the lower half of the ids, up to
     * the last of them. */
    for (int i = 0; i < NUC_V; i++)
        lg[i] = 0.25f;
    p.top_p = 0.5f;
    nuc_draws(&p, lg, 3000, seen);
    int hi_seen = -1;
    for (int i = 0; i < NUC_V; i++)
        if (seen[i]) hi_seen = i;
    assert_true(hi_seen < NUC_V / 2 && hi_seen >= NUC_V / 2 - 100);
    free(lg);
    free(seen);
    free(level);
}

/* Top-k with a k too large for the heap (it selects by bucketing, by count),
 * alone and then with top-p over what it kept, on the levels above with 200
 * ids at level 1. */
static void test_top_k_large(void **st)
{
    (void)st;
    float *lg = malloc(sizeof(float) * NUC_V);
    int *seen = malloc(sizeof(int) * NUC_V), *level = malloc(sizeof(int) * NUC_V);
    assert_true(lg && seen && level);
    double mass1 = nuc_levels(lg, level, 200, NULL);
    smp_params p;
    smp_params_defaults(&p);
    p.temperature = 1.0f;
    p.seed = 23;
    /* k = 2,000 (above the heap's bound): the upper two levels and the
     * 1,799 lowest ids at 1 (ties to the lower id). */
    p.top_k = 2000;
    nuc_draws(&p, lg, 4000, seen);
    int at[4], last2 = nuc_tally(level, seen, 2, at);
    assert_int_equal(at[0], 1);
    assert_true(at[1] >= 195);
    assert_int_equal(at[3], 0);
    assert_true(last2 > 1700 && last2 <= 1799);
    /* And top-p over those: a cut half an id past the 150th likeliest of
     * level 1 (the last 150 by id, whole, each drawn with a chance near
     * 0.6%). */
    double kept = exp(5.0) + mass1 + 1799 * exp(1.0), each = mass1 / 200;
    p.top_p = (float)((exp(5.0) + 150.5 * each) / kept);
    nuc_draws(&p, lg, 5000, seen);
    nuc_expect(level, seen, 200, NULL, 151);
    free(lg);
    free(seen);
    free(level);
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
 * tails), contents and temperature (1, which divides by nothing, or not);
 * the argmax is the scalar definition's, the maximum its element. */
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
            assert_true(smpk_max(x, n) == x[ref]);
            assert_true(smpk_max_generic(x, n) == x[ref]);
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
            assert_true(isnan(smpk_max(x, n)));
            assert_true(isnan(smpk_max_generic(x, n)));
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

/* SwiGLU's gate: the dispatched and the generic version give the same bits
 * (every length around the 8-lane blocks; zeros of both signs, large
 * magnitudes, infinities), each finite element within 4 ulp plus 1e-30 of
 * silu(g) * u in double, and a NaN gate gives NaN. */
static void test_silu_mul(void **st)
{
    (void)st;
    enum { MAXN = 1000 };
    static float g[MAXN], u[MAXN], a[MAXN], b[MAXN];
    const float special[] = {0.0f,   -0.0f, 1.0f,   -1.0f, 20.0f,  -20.0f,   87.0f,
                             -87.0f, 88.5f, -88.5f, 1e30f, -1e30f, INFINITY, -INFINITY};
    const size_t n_special = sizeof(special) / sizeof(special[0]);
    uint64_t r = 7;
    for (int n = 1; n <= MAXN; n += n < 40 ? 1 : 97) {
        for (int i = 0; i < n; i++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            g[i] = i % 11 == 3 ? special[(r >> 33) % n_special]
                               : ((float)(int32_t)(r >> 32) / 2147483648.0f) * 30.0f;
            u[i] = ((float)(int32_t)(uint32_t)(r >> 7) / 2147483648.0f) * 4.0f;
        }
        memcpy(a, g, sizeof(float) * (size_t)n);
        memcpy(b, g, sizeof(float) * (size_t)n);
        smpk_silu_mul(a, u, n);
        smpk_silu_mul_generic(b, u, n);
        assert_memory_equal(a, b, sizeof(float) * (size_t)n);
        for (int i = 0; i < n; i++) {
            if (isinf(g[i])) { /* +inf: inf * u; -inf: -inf * 0, NaN (as 1 / (1 + expf(inf))) */
                if (g[i] > 0 && u[i] != 0)
                    assert_true((double)a[i] == (double)g[i] * u[i]);
                else
                    assert_true(isnan(a[i]));
                continue;
            }
            double x = g[i], want = x / (1.0 + exp(-x)) * u[i];
            float wf = (float)want;
            double ulp = (double)nextafterf(fabsf(wf), INFINITY) - fabs((double)wf);
            if (fabs((double)a[i] - want) > 4 * ulp + 1e-30)
                fail_msg("silu(%g) * %g = %g, want %g", (double)g[i], (double)u[i], (double)a[i],
                         want);
        }
    }
    float gn[9] = {1, 2, 3, NAN, 5, 6, 7, 8, NAN}, un[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    smpk_silu_mul(gn, un, 9);
    assert_true(isnan(gn[3]) && isnan(gn[8]) && !isnan(gn[0]));
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
 * other (a flat tail), a handful far above (peaked: most of the mass on
 * those), or the flat tail alone (a high-entropy position, where most ids
 * pass top-p's cut). Fixed seed. */
static void bench_logits(float *lg, uint64_t seed, bool peaked)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < BENCH_V; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        float u = (float)(x >> 40) / 16777216.0f;
        lg[i] = 4.0f * u - 2.0f + (peaked && i % 997 == 0 ? 12.0f : 0.0f);
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
    float *flat = malloc(sizeof(float) * BENCH_V);
    if (!ref || !lg || !flat) return 1;
    bench_logits(ref, 7, true);
    bench_logits(flat, 7, false);
    struct {
        const char *name;
        float temperature, top_p;
        int top_k;
        bool flat;
    } modes[] = {
        {"greedy", 0.0f, 1.0f, 0, false},
        {"temperature 1 (the API's default)", 1.0f, 1.0f, 0, false},
        {"temperature 0.8, top-p 0.9", 0.8f, 0.9f, 0, false},
        {"temperature 0.8, top-k 40", 0.8f, 1.0f, 40, false},
        {"temperature 1, flat logits", 1.0f, 1.0f, 0, true},
        {"temperature 0.8, top-p 0.9, flat", 0.8f, 0.9f, 0, true},
        {"temperature 0.8, top-k 40, flat", 0.8f, 1.0f, 40, true},
        {"temperature 0.8, top-k 1000, flat", 0.8f, 1.0f, 1000, true},
        {"temperature 0.8, top-k 10000, flat", 0.8f, 1.0f, 10000, true},
        {"temperature 0.8, top-k 10000, top-p 0.9, flat", 0.8f, 0.9f, 10000, true},
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
        double us = bench_mode(&p, modes[m].flat ? flat : ref, lg);
        if (us < 0) return 1;
        printf("  %-44s %8.1f us per draw, %5.2f ns per logit\n", modes[m].name, us,
               us * 1000.0 / BENCH_V);
    }
    free(ref);
    free(lg);
    free(flat);
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
        cmocka_unit_test(test_top_p_large_vocab),
        cmocka_unit_test(test_top_k_large),
        cmocka_unit_test(test_min_tokens_and_stops),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_split_stream),
        cmocka_unit_test(test_kernels_same_bits),
        cmocka_unit_test(test_exp_accuracy),
        cmocka_unit_test(test_silu_mul),
        cmocka_unit_test(test_inf_logit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
