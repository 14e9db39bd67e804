/* Unit tests for router/admission (adm): every policy on hand-built state
 * sequences, the cost-model file, determinism, allocation failures. Run with
 * --bench for what one decision costs the router's loop, per policy.
 *
 * The burst scenarios run a small fluid model of the cluster in the test (one
 * prefill worker that works through its queued tokens at the cost model's
 * rate, a FIFO hold queue rechecked oldest first), so that what the policy
 * predicts is what happens. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/err.h"
#include "router/admission/adm.h"
#include "tests/unit/fail_alloc.h"

#define MS 1000000LL
#define S  1000000000LL

/* A cost model with round figures: 100 us per prompt token and no fixed
 * prefill cost (so the fluid model below drains exactly as predicted), decode
 * steps of 2 ms + 0.5 ms per sequence. */
static adm_cost test_cost(void)
{
    return (adm_cost){.prefill_us_fixed = 0,
                      .prefill_us_per_token = 100,
                      .decode_step_us_fixed = 2000,
                      .decode_step_us_per_seq = 500,
                      .decode_step_us_per_ctx_token = 0,
                      .transfer_us_per_block = 0};
}

/* Doubles equal within eps (cmocka's float assertion is single precision). */
#define assert_near(a, b, eps) assert_true(fabs((double)(a) - (double)(b)) <= (eps))

static adm_params test_params(void)
{
    adm_params p;
    adm_params_defaults(&p);
    p.cost = test_cost();
    p.slo_ttft_ms = 100;
    p.slo_tpot_ms = 20;
    p.hold_max_ms = 1000;
    p.hold_max = 64;
    p.slo_margin = 1; /* the hand-worked figures below predict up to the SLOs themselves */
    return p;
}

/* One ready worker of each role, an idle cluster, a 100-token prompt. */
static adm_input idle_input(int64_t now)
{
    return (adm_input){.now_ns = now,
                       .prompt_tokens = 100,
                       .max_tokens = 20,
                       .running_seqs = 2,
                       .free_kv_blocks = 1000,
                       .total_kv_blocks = 1000,
                       .block_size = 16,
                       .ready_prefill = 1,
                       .ready_decode = 1};
}

static void *make(const char *name, const adm_params *p)
{
    const adm_ops *ops = adm_find(name);
    assert_non_null(ops);
    void *ctx = NULL;
    assert_int_equal(ops->create(p, &ctx), 0);
    return ctx;
}

static uint64_t rng_state;

static double rng_uniform(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;
}

/* ---- the fluid cluster ---- */

#define SIM_MAX_HELD 256
#define SIM_MAX_LOG  100000

typedef struct sim_log {
    uint8_t verdict;
    uint8_t recheck;
    uint32_t retry;
    int64_t until;
} sim_log;

typedef struct sim {
    const adm_ops *ops;
    void *ctx;
    adm_cost cost;
    int64_t t;             /* the fluid model's time (never goes back) */
    int64_t now;           /* the clock passed to the policy (may go back) */
    double queued;         /* prompt tokens not yet prefilled */
    uint32_t running_seqs; /* fixed decode load */
    int64_t held_until[SIM_MAX_HELD];
    int64_t held_since[SIM_MAX_HELD];
    uint32_t n_held;
    uint32_t admitted, held, rejected, admitted_after_hold, rejected_after_hold, max_held;
    uint32_t max_retry, min_retry;
    int64_t max_hold_ns;
    double max_ttft_pred_ms; /* of admitted requests: queue ahead + own prefill, ms */
    sim_log *log;
    uint32_t n_log;
} sim;

/* --bench: the time of every decide and recheck call, ns (NULL: not timed). */
static int64_t *g_call_ns;
static size_t g_n_calls, g_cap_calls;

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * S + ts.tv_nsec;
}

static void timed_call(void (*fn)(void *, const adm_input *, adm_decision *), void *ctx,
                       const adm_input *in, adm_decision *d)
{
    if (!g_call_ns) {
        fn(ctx, in, d);
        return;
    }
    int64_t t0 = mono_ns();
    fn(ctx, in, d);
    int64_t t1 = mono_ns();
    if (g_n_calls < g_cap_calls) g_call_ns[g_n_calls++] = t1 - t0;
}

static void sim_init(sim *s, const char *name, const adm_params *p)
{
    memset(s, 0, sizeof(*s));
    s->ops = adm_find(name);
    assert_non_null(s->ops);
    assert_int_equal(s->ops->create(p, &s->ctx), 0);
    s->cost = p->cost;
    s->running_seqs = 2;
    s->min_retry = UINT32_MAX;
    s->log = calloc(SIM_MAX_LOG, sizeof(*s->log));
    assert_non_null(s->log);
}

static void sim_free(sim *s)
{
    s->ops->destroy(s->ctx);
    free(s->log);
}

static adm_input sim_input(const sim *s, uint32_t held)
{
    adm_input in = idle_input(s->now);
    in.held = held;
    in.running_seqs = s->running_seqs;
    in.queued_prefill_tokens = (uint64_t)ceil(s->queued);
    in.inflight_prefill_tokens = in.queued_prefill_tokens;
    return in;
}

static void sim_record(sim *s, const adm_decision *d, bool recheck)
{
    if (d->verdict == ADM_REJECT) {
        assert_true(d->retry_after_s >= 1 && d->retry_after_s <= ADM_RETRY_MAX_S);
        if (d->retry_after_s > s->max_retry) s->max_retry = d->retry_after_s;
        if (d->retry_after_s < s->min_retry) s->min_retry = d->retry_after_s;
    }
    assert_non_null(d->reason);
    if (s->n_log < SIM_MAX_LOG)
        s->log[s->n_log++] = (sim_log){(uint8_t)d->verdict, recheck, d->retry_after_s,
                                       d->verdict == ADM_HOLD ? d->hold_until_ns : 0};
}

static void sim_admit(sim *s, uint32_t prompt)
{
    double ttft_ms = (s->queued + prompt) * s->cost.prefill_us_per_token / 1e3;
    if (ttft_ms > s->max_ttft_pred_ms) s->max_ttft_pred_ms = ttft_ms;
    s->queued += prompt;
    s->admitted++;
}

/* Moves time to t: the prefill worker works through its queue, then the
 * hold queue is rechecked oldest first until one stays held. */
static void sim_advance(sim *s, int64_t t)
{
    s->now = t;
    if (t > s->t) {
        s->queued -= (double)(t - s->t) / 1e3 / s->cost.prefill_us_per_token;
        if (s->queued < 0) s->queued = 0;
        s->t = t;
    }
    while (s->n_held > 0) {
        adm_input in = sim_input(s, s->n_held - 1);
        in.hold_until_ns = s->held_until[0];
        adm_decision d;
        if (s->ops->recheck)
            timed_call(s->ops->recheck, s->ctx, &in, &d);
        else
            d = (adm_decision){.verdict = ADM_ADMIT, .reason = "no recheck"};
        sim_record(s, &d, true);
        if (d.verdict == ADM_HOLD) {
            assert_int_equal(d.hold_until_ns, s->held_until[0]);
            break;
        }
        int64_t waited = s->t - s->held_since[0];
        if (waited > s->max_hold_ns) s->max_hold_ns = waited;
        if (d.verdict == ADM_ADMIT) {
            sim_admit(s, 100);
            s->admitted_after_hold++;
        } else {
            s->rejected++;
            s->rejected_after_hold++;
        }
        memmove(s->held_until, s->held_until + 1, (s->n_held - 1) * sizeof(int64_t));
        memmove(s->held_since, s->held_since + 1, (s->n_held - 1) * sizeof(int64_t));
        s->n_held--;
    }
}

static enum adm_verdict sim_arrive(sim *s, int64_t t)
{
    sim_advance(s, t);
    adm_input in = sim_input(s, s->n_held);
    adm_decision d;
    timed_call(s->ops->decide, s->ctx, &in, &d);
    sim_record(s, &d, false);
    if (d.verdict == ADM_ADMIT) {
        sim_admit(s, 100);
    } else if (d.verdict == ADM_HOLD) {
        assert_true(d.hold_until_ns > s->now);
        assert_true(s->n_held < SIM_MAX_HELD);
        s->held_until[s->n_held] = d.hold_until_ns;
        s->held_since[s->n_held] = s->t;
        s->n_held++;
        s->held++;
        if (s->n_held > s->max_held) s->max_held = s->n_held;
    } else {
        s->rejected++;
    }
    return d.verdict;
}

/* ---- the table ---- */

static void t_names_and_find(void **state)
{
    (void)state;
    assert_string_equal(adm_names(), "none|max_outstanding|token_bucket|queue_threshold|burst");
    const char *names[] = {"none", "max_outstanding", "token_bucket", "queue_threshold", "burst"};
    adm_params p = test_params();
    for (size_t i = 0; i < 5; i++) {
        const adm_ops *ops = adm_find(names[i]);
        assert_non_null(ops);
        assert_string_equal(ops->name, names[i]);
        assert_non_null(ops->create);
        assert_non_null(ops->destroy);
        assert_non_null(ops->decide);
        void *ctx = NULL;
        assert_int_equal(ops->create(&p, &ctx), 0);
        ops->destroy(ctx);
        ops->destroy(NULL);
    }
    assert_null(adm_find("fifo"));
    assert_null(adm_find(NULL));
    assert_non_null(adm_find("burst")->recheck);
}

static void t_bad_params(void **state)
{
    (void)state;
    adm_params p;
    void *ctx = NULL;
    /* max_outstanding */
    p = test_params(), p.max_outstanding = 0;
    assert_int_equal(adm_find("max_outstanding")->create(&p, &ctx), TD_EINVAL);
    /* token_bucket */
    p = test_params(), p.bucket_rate = 0;
    assert_int_equal(adm_find("token_bucket")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.bucket_rate = NAN;
    assert_int_equal(adm_find("token_bucket")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.bucket_burst = 0.5;
    assert_int_equal(adm_find("token_bucket")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.bucket_burst = INFINITY;
    assert_int_equal(adm_find("token_bucket")->create(&p, &ctx), TD_EINVAL);
    /* queue_threshold */
    /* burst: speed_step */
    p = test_params(), p.speed_step = -0.1;
    assert_int_equal(adm_find("burst")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.speed_step = 1.5;
    assert_int_equal(adm_find("burst")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.speed_step = NAN;
    assert_int_equal(adm_find("burst")->create(&p, &ctx), TD_EINVAL);
    /* burst: speed_track */
    p = test_params(), p.speed_track = -0.1;
    assert_int_equal(adm_find("burst")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.speed_track = 1.5;
    assert_int_equal(adm_find("burst")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.speed_track = NAN;
    assert_int_equal(adm_find("burst")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.queue_max_ms = -1;
    assert_int_equal(adm_find("queue_threshold")->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.cost.prefill_us_per_token = -1;
    assert_int_equal(adm_find("queue_threshold")->create(&p, &ctx), TD_EINVAL);
    /* burst */
    const adm_ops *b = adm_find("burst");
    p = test_params(), p.slo_ttft_ms = 0;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.slo_tpot_ms = NAN;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.short_window_s = 30, p.long_window_s = 30;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.short_window_s = 0;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.hold_max_ms = -5;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.burst_rate_ratio = 0.9;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.slo_margin = 0;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.slo_margin = 1.01;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.burst_cv = -1;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    p = test_params(), p.cost.transfer_us_per_block = INFINITY;
    assert_int_equal(b->create(&p, &ctx), TD_EINVAL);
    assert_null(ctx);
}

/* ---- none, max_outstanding ---- */

static void t_none_and_max_outstanding(void **state)
{
    (void)state;
    adm_params p = test_params();
    p.max_outstanding = 3;
    const adm_ops *none = adm_find("none"), *cap = adm_find("max_outstanding");
    void *nc = make("none", &p), *cc = make("max_outstanding", &p);
    adm_decision d;
    for (uint32_t out = 0; out < 10; out++) {
        adm_input in = idle_input(out * MS);
        in.outstanding = out;
        none->decide(nc, &in, &d);
        assert_int_equal(d.verdict, ADM_ADMIT);
        cap->decide(cc, &in, &d);
        if (out < 3) {
            assert_int_equal(d.verdict, ADM_ADMIT);
        } else {
            assert_int_equal(d.verdict, ADM_REJECT);
            assert_int_equal(d.retry_after_s, 1);
        }
    }
    /* Neither looks at the cluster: an empty one is the router's business. */
    adm_input empty = {.now_ns = 0, .prompt_tokens = 5};
    none->decide(nc, &empty, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    cap->decide(cc, &empty, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    none->destroy(nc);
    cap->destroy(cc);
}

/* ---- token_bucket ---- */

static enum adm_verdict bucket_at(const adm_ops *o, void *ctx, int64_t t, uint32_t *retry)
{
    adm_input in = idle_input(t);
    adm_decision d;
    o->decide(ctx, &in, &d);
    if (retry) *retry = d.retry_after_s;
    return d.verdict;
}

static void t_bucket_refill_exact(void **state)
{
    (void)state;
    adm_params p = test_params();
    p.bucket_rate = 10; /* a token every 100 ms */
    p.bucket_burst = 5;
    const adm_ops *o = adm_find("token_bucket");
    void *ctx = make("token_bucket", &p);
    int64_t t0 = 1000 * S;
    uint32_t retry = 0;
    for (int i = 0; i < 5; i++)
        assert_int_equal(bucket_at(o, ctx, t0, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, t0, &retry), ADM_REJECT);
    assert_int_equal(retry, 1);
    /* One token back at exactly +100 ms, not a nanosecond before. */
    assert_int_equal(bucket_at(o, ctx, t0 + 100 * MS - 1, NULL), ADM_REJECT);
    assert_int_equal(bucket_at(o, ctx, t0 + 100 * MS, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, t0 + 100 * MS, NULL), ADM_REJECT);
    /* 1000 periods later, exactly: never more than the burst. */
    int64_t t1 = t0 + 100 * MS + 1000 * 100 * MS;
    for (int i = 0; i < 5; i++)
        assert_int_equal(bucket_at(o, ctx, t1, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, t1, NULL), ADM_REJECT);
    /* A steady 10/s stream is admitted whole, for 10,000 periods. */
    for (int i = 1; i <= 10000; i++)
        assert_int_equal(bucket_at(o, ctx, t1 + i * 100 * MS, NULL), ADM_ADMIT);
    /* A clock that goes back refills nothing. */
    int64_t t2 = t1 + 10000 * 100 * MS;
    assert_int_equal(bucket_at(o, ctx, t2, NULL), ADM_REJECT);
    assert_int_equal(bucket_at(o, ctx, t2 - 3600 * S, NULL), ADM_REJECT);
    assert_int_equal(bucket_at(o, ctx, t2 + 100 * MS - 1, NULL), ADM_REJECT);
    assert_int_equal(bucket_at(o, ctx, t2 + 100 * MS, NULL), ADM_ADMIT);
    /* An idle hour: the burst again, no more. */
    int64_t t3 = t2 + 3600 * S;
    for (int i = 0; i < 5; i++)
        assert_int_equal(bucket_at(o, ctx, t3, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, t3, NULL), ADM_REJECT);
    o->destroy(ctx);

    /* Retry-After: 0.2/s refills in 5 s. */
    p.bucket_rate = 0.2;
    p.bucket_burst = 1;
    ctx = make("token_bucket", &p);
    assert_int_equal(bucket_at(o, ctx, 0, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, 0, &retry), ADM_REJECT);
    assert_int_equal(retry, 5);
    assert_int_equal(bucket_at(o, ctx, 4 * S, &retry), ADM_REJECT);
    assert_int_equal(retry, 1);
    assert_int_equal(bucket_at(o, ctx, 4 * S + 1, &retry), ADM_REJECT);
    assert_int_equal(retry, 1);
    assert_int_equal(bucket_at(o, ctx, 5 * S, NULL), ADM_ADMIT);
    o->destroy(ctx);

    /* A fractional burst: 2.5 admits 2 at once, the half carries. */
    p.bucket_rate = 1;
    p.bucket_burst = 2.5;
    ctx = make("token_bucket", &p);
    assert_int_equal(bucket_at(o, ctx, 0, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, 0, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, 0, NULL), ADM_REJECT);
    assert_int_equal(bucket_at(o, ctx, 500 * MS, NULL), ADM_ADMIT);
    o->destroy(ctx);
}

/* ---- queue_threshold ---- */

static void t_queue_threshold(void **state)
{
    (void)state;
    adm_params p = test_params();
    p.queue_max_ms = 100;
    const adm_ops *o = adm_find("queue_threshold");
    void *ctx = make("queue_threshold", &p);
    adm_decision d;
    adm_input in = idle_input(0);
    in.ready_prefill = 2;
    /* 2000 tokens over 2 workers at 100 us: exactly 100 ms -> admitted. */
    in.queued_prefill_tokens = 2000;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* Two tokens more: 100.1 ms -> rejected, back under the bound in 0.1 ms. */
    in.queued_prefill_tokens = 2002;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_int_equal(d.retry_after_s, 1);
    /* The router's own count counts the same: the larger of the two. */
    in.queued_prefill_tokens = 0;
    in.inflight_prefill_tokens = 2002;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    in.queued_prefill_tokens = 1000;
    in.inflight_prefill_tokens = 2000;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* 70,000 tokens: 3.5 s of queueing, 3.4 s over -> Retry-After 4. */
    in.inflight_prefill_tokens = 70000;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_int_equal(d.retry_after_s, 4);
    /* Days of queueing: capped. */
    in.inflight_prefill_tokens = 10000000000ULL;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.retry_after_s, ADM_RETRY_MAX_S);
    /* No ready prefill (or decode) worker. */
    in = idle_input(0);
    in.ready_prefill = 0;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_int_equal(d.retry_after_s, 1);
    assert_string_equal(d.reason, "no workers");
    in = idle_input(0);
    in.ready_decode = 0;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_string_equal(d.reason, "no workers");
    o->destroy(ctx);

    /* The same boundary with a fixed batch cost: 1 ms + 1990 x 100 us / 2. */
    p.cost.prefill_us_fixed = 1000;
    ctx = make("queue_threshold", &p);
    in = idle_input(0);
    in.ready_prefill = 2;
    in.queued_prefill_tokens = 1980;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    in.queued_prefill_tokens = 1981;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    o->destroy(ctx);

    /* The attention term: the router's own prompts count their pairs
     * exactly; heartbeat tokens beyond them at the same pairs per token.
     * One 1000-token prompt: 1000 x 10 us + 500,500 pairs x 0.125 us = 72.5625 ms
     * (figures exact in binary, so the boundary is exact). */
    p.cost.prefill_us_fixed = 0;
    p.cost.prefill_us_per_token = 10;
    p.cost.prefill_us_per_token_ctx = 0.125;
    p.queue_max_ms = 72.5625;
    ctx = make("queue_threshold", &p);
    in = idle_input(0);
    in.inflight_prefill_tokens = 1000;
    in.inflight_prefill_pairs = adm_prefill_pairs(1000);
    assert_true(in.inflight_prefill_pairs == 500500);
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    in.inflight_prefill_pairs++;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    /* The same 1000 tokens as two prompts of 500: 250,500 pairs, 41.3125 ms. */
    p.queue_max_ms = 41.3125;
    o->destroy(ctx);
    ctx = make("queue_threshold", &p);
    in.inflight_prefill_pairs = 2 * adm_prefill_pairs(500);
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* Heartbeats report 1500: 500 more at 250.5 pairs per token, 61.97 ms. */
    in.queued_prefill_tokens = 1500;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    o->destroy(ctx);

    /* Co-located workers: while the decode workers have sequences the same
     * work ahead takes (1 + prefill_extra_when_decoding) as long. One
     * 1000-token prompt, 72.5625 ms alone, 145.125 ms at factor 1. */
    p.cost.prefill_extra_when_decoding = 1;
    p.queue_max_ms = 72.5625;
    ctx = make("queue_threshold", &p);
    in = idle_input(0);
    in.inflight_prefill_tokens = 1000;
    in.inflight_prefill_pairs = adm_prefill_pairs(1000);
    in.running_seqs = 0;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    in.running_seqs = 1;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    o->destroy(ctx);
    p.queue_max_ms = 145.125;
    ctx = make("queue_threshold", &p);
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    o->destroy(ctx);
    p.cost = test_cost();
    in = idle_input(0);

    /* queue_max_ms 0: only an empty queue admits. */
    p.queue_max_ms = 0;
    ctx = make("queue_threshold", &p);
    in.queued_prefill_tokens = 0;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    in.queued_prefill_tokens = 1;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    o->destroy(ctx);
}

/* A zero cost model: queue_threshold and burst cap outstanding requests. */
static void t_unknown_cost(void **state)
{
    (void)state;
    adm_params p = test_params();
    memset(&p.cost, 0, sizeof(p.cost));
    p.max_outstanding = 4;
    const char *names[] = {"queue_threshold", "burst"};
    for (int k = 0; k < 2; k++) {
        const adm_ops *o = adm_find(names[k]);
        void *ctx = make(names[k], &p);
        adm_decision d;
        for (uint32_t out = 0; out < 8; out++) {
            adm_input in = idle_input(out * S);
            in.outstanding = out;
            in.queued_prefill_tokens = 1000000; /* says nothing without a model */
            o->decide(ctx, &in, &d);
            assert_int_equal(d.verdict, out < 4 ? ADM_ADMIT : ADM_REJECT);
            if (d.verdict == ADM_REJECT) assert_int_equal(d.retry_after_s, 1);
        }
        if (o->recheck) {
            adm_input in = idle_input(10 * S);
            in.hold_until_ns = 11 * S;
            in.outstanding = 4;
            o->recheck(ctx, &in, &d);
            assert_int_equal(d.verdict, ADM_HOLD);
            in.outstanding = 3;
            o->recheck(ctx, &in, &d);
            assert_int_equal(d.verdict, ADM_ADMIT);
        }
        o->destroy(ctx);
    }
    /* Prefill figures alone are enough for queue_threshold, not for burst. */
    p.cost.prefill_us_per_token = 100;
    void *q = make("queue_threshold", &p), *b = make("burst", &p);
    adm_input in = idle_input(0);
    in.outstanding = 100;
    adm_decision d;
    adm_find("queue_threshold")->decide(q, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    adm_find("burst")->decide(b, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    adm_find("queue_threshold")->destroy(q);
    adm_find("burst")->destroy(b);
}

/* ---- burst ---- */

/* Poisson arrivals at 30% of the prefill capacity: nothing held or rejected. */
static void t_burst_below_capacity(void **state)
{
    (void)state;
    adm_params p = test_params();
    sim s;
    sim_init(&s, "burst", &p);
    rng_state = 0x9E3779B97F4A7C15ULL;
    int64_t t = 5 * S;
    for (int i = 0; i < 3000; i++) {
        t += (int64_t)(-log(1 - rng_uniform()) / 30.0 * 1e9); /* 30/s, 10 ms each */
        sim_arrive(&s, t);
    }
    assert_int_equal(s.admitted, 3000);
    assert_int_equal(s.held, 0);
    assert_int_equal(s.rejected, 0);
    sim_free(&s);
}

/* A steady 10/s, then 40 at once, all bound by prefill: the 10 that fit the
 * TTFT SLO are admitted and the other 30 rejected at once with Retry-After 1.
 * Holding them would not help: TTFT counts from arrival, and the queue ahead
 * drains no faster than a hold lasts. The stream after the burst is admitted
 * within the SLO. */
static void t_burst_prefill_burst(void **state)
{
    (void)state;
    adm_params p = test_params();
    sim s;
    sim_init(&s, "burst", &p);
    int64_t t = 0;
    for (int i = 0; i < 600; i++)
        sim_arrive(&s, t += 100 * MS);
    assert_int_equal(s.admitted, 600);
    int64_t tb = t + 100 * MS;
    for (int i = 0; i < 40; i++)
        sim_arrive(&s, tb);
    /* 100 ms SLO, 10 ms per request: 10 fit (1000 tokens). */
    assert_int_equal(s.admitted, 610);
    assert_int_equal(s.held, 0);
    assert_int_equal(s.rejected, 30);
    assert_int_equal(s.max_retry, 1);
    for (int i = 1; i <= 100; i++)
        assert_int_equal(sim_arrive(&s, tb + i * 100 * MS), ADM_ADMIT);
    assert_true(s.max_ttft_pred_ms <= 100.0 + 1e-9);
    sim_free(&s);
}

/* The same burst with a 10 ms fixed hand-off per request: each admitted
 * request's TTFT is its wait + 10 ms prefill + 10 ms, so 9 fit, not 10. */
static void t_burst_transfer_fixed(void **state)
{
    (void)state;
    adm_params p = test_params();
    p.cost.transfer_us_fixed = 10000;
    sim s;
    sim_init(&s, "burst", &p);
    int64_t t = 0;
    for (int i = 0; i < 600; i++)
        sim_arrive(&s, t += 100 * MS);
    for (int i = 0; i < 40; i++)
        sim_arrive(&s, t + 100 * MS);
    assert_int_equal(s.admitted, 609);
    assert_int_equal(s.held + s.rejected, 31);
    assert_true(s.max_ttft_pred_ms <= 100.0 + 1e-9);
    sim_free(&s);
}

/* Small prompts (1 ms of prefill each), a decode batch of `running`. */
static adm_input dec_input(int64_t now, uint32_t running, uint32_t held, uint64_t prefill)
{
    adm_input in = idle_input(now);
    in.prompt_tokens = 10;
    in.running_seqs = running;
    in.held = held;
    in.inflight_prefill_tokens = prefill;
    return in;
}

/* A minute of steady arrivals, 10 a second, each of max_tokens with running
 * sequences in the batch: every one admitted. Returns the last arrival's time. */
static int64_t steady_minute(const adm_ops *o, void *ctx, uint32_t running, uint32_t max_tokens)
{
    adm_decision d;
    int64_t t = 0;
    for (int i = 0; i < 600; i++) {
        adm_input in = dec_input(t += 100 * MS, running, 0, 0);
        in.max_tokens = max_tokens;
        o->decide(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_ADMIT);
    }
    return t;
}

typedef struct dec_burst {
    uint32_t running, admitted, n_held, rejected;
    int64_t tb, until[64];
} dec_burst;

/* A minute of 10/s with 10 sequences running, then 40 at once. The batch
 * meets the TPOT SLO up to 36 sequences (2 ms + 0.5 ms x 36 = 20 ms): 26 are
 * admitted. The j-th over it waits for j + 1 sequences to finish, one every
 * 20 tokens x 20.5 ms / 37 = 11 ms, against a TTFT slack of 100 - 27 - j ms:
 * 6 are held, until their slack ends, and the rest rejected at once. */
static void dec_burst_run(const adm_ops *o, void *ctx, dec_burst *b)
{
    adm_decision d;
    memset(b, 0, sizeof(*b));
    b->running = 10;
    b->tb = steady_minute(o, ctx, b->running, 20) + 100 * MS;
    for (int i = 0; i < 40; i++) {
        adm_input in = dec_input(b->tb, b->running, b->n_held, 10ULL * b->admitted);
        o->decide(ctx, &in, &d);
        if (d.verdict == ADM_ADMIT) {
            assert_int_equal(b->n_held + b->rejected, 0);
            b->running++;
            b->admitted++;
        } else if (d.verdict == ADM_HOLD) {
            assert_int_equal(b->rejected, 0);
            /* Held no longer than its TTFT slack: 100 ms - 27 ms - j ms. */
            assert_int_equal(d.hold_until_ns, b->tb + (73 - (int64_t)b->n_held) * MS);
            b->until[b->n_held++] = d.hold_until_ns;
        } else {
            assert_int_equal(d.retry_after_s, 1);
            b->rejected++;
        }
    }
    assert_int_equal(b->admitted, 26);
    assert_int_equal(b->n_held, 6);
    assert_int_equal(b->rejected, 8);
}

/* ... and as one sequence finishes every 10 ms, the oldest held request is
 * admitted: all six, each before its deadline, none rejected. */
static void t_burst_decode_burst_held(void **state)
{
    (void)state;
    adm_params p = test_params();
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    dec_burst b;
    dec_burst_run(o, ctx, &b);
    adm_decision d;
    uint32_t released = 0;
    for (int k = 1; k <= 6; k++) {
        int64_t now = b.tb + k * 10 * MS;
        int64_t done = (now - b.tb) / 100000; /* prefill: 10 tokens a ms */
        uint64_t pf = 260 + 10 * released > done ? 260 + 10 * released - done : 0;
        /* Before the finish: the batch is full, it stays held. */
        adm_input in = dec_input(now - 1, b.running, b.n_held - released - 1, pf);
        in.hold_until_ns = b.until[released];
        o->recheck(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_HOLD);
        assert_int_equal(d.hold_until_ns, b.until[released]);
        b.running--;
        in = dec_input(now, b.running, b.n_held - released - 1, pf);
        in.hold_until_ns = b.until[released];
        o->recheck(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_ADMIT);
        assert_true(now < b.until[released]);
        b.running++;
        released++;
    }
    assert_int_equal(released, b.n_held);
    o->destroy(ctx);
}

/* The hold deadline: when no sequence finishes, each held request is rejected
 * at its deadline, not a nanosecond before, never admitted late; a clock
 * passed in that goes back does not undo it. */
static void t_burst_hold_deadline(void **state)
{
    (void)state;
    adm_params p = test_params();
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    dec_burst b;
    dec_burst_run(o, ctx, &b);
    adm_decision d;
    /* Later ones have less slack, so earlier deadlines: the router keeps a
     * timer per held request, not only the head's. */
    for (uint32_t j = b.n_held; j-- > 0;) {
        assert_true(j == 0 || b.until[j] < b.until[j - 1]);
        adm_input in = dec_input(b.until[j] - 1, b.running, j, 0);
        in.hold_until_ns = b.until[j];
        o->recheck(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_HOLD);
        in.now_ns = b.until[j];
        o->recheck(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_REJECT);
        assert_int_equal(d.retry_after_s, 1);
        assert_string_equal(d.reason, "held past its deadline (burst)");
        in.now_ns = b.tb;
        o->recheck(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_REJECT);
    }
    o->destroy(ctx);

    /* A deadline given back by a caller that never called decide. */
    ctx = make("burst", &p);
    adm_input in = idle_input(S - 1);
    in.queued_prefill_tokens = 100000;
    in.hold_until_ns = S;
    o->recheck(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_HOLD);
    assert_int_equal(d.hold_until_ns, S);
    in.now_ns = S;
    o->recheck(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    /* 10 s of prefill ahead + 10 ms own - 100 ms SLO: 9.91 s. */
    assert_int_equal(d.retry_after_s, 10);
    o->destroy(ctx);
}

/* Twice the capacity, steady: about half rejected at once with a short
 * Retry-After, the admitted ones meet the SLO, the hold queue stays bounded. */
static void t_burst_sustained_overload(void **state)
{
    (void)state;
    adm_params p = test_params();
    sim s;
    sim_init(&s, "burst", &p);
    int64_t t = 0;
    for (int i = 0; i < 24000; i++) /* 120 s at 200/s against 100/s */
        sim_arrive(&s, t += 5 * MS);
    double admitted_rate = s.admitted / 120.0;
    assert_true(admitted_rate > 95 && admitted_rate <= 101);
    assert_true(s.rejected > 11000);
    assert_true(s.max_held <= p.hold_max);
    assert_true(s.max_retry <= 2);
    assert_true(s.min_retry == 1);
    assert_true(s.max_ttft_pred_ms <= 100.0 + 1e-9);
    sim_free(&s);

    /* A backlog of 5 s of prefill work: rejected even in a burst (the drain
     * does not fit hold_max_ms), Retry-After from the drain time. */
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    adm_decision d;
    for (int i = 0; i < 20; i++) {
        adm_input in = idle_input(10 * S); /* 20 at once: a burst */
        in.queued_prefill_tokens = 50000;
        o->decide(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_REJECT);
        /* 5 s ahead + 10 ms own - 100 ms SLO = 4.91 s */
        assert_int_equal(d.retry_after_s, 5);
    }
    o->destroy(ctx);
}

/* n arrivals 10 ms apart from t0 on a cluster decoding `running`
 * sequences; returns how many were admitted. */
static int burst_flood(const adm_ops *o, void *ctx, int64_t t0, uint32_t running, int n)
{
    int admitted = 0;
    for (int i = 0; i < n; i++) {
        adm_input in = idle_input(t0 + i * (S / 100));
        in.running_seqs = running;
        adm_decision d;
        o->decide(ctx, &in, &d);
        admitted += d.verdict == ADM_ADMIT;
    }
    return admitted;
}

/* Decode-side limits: a batch that would exceed the TPOT SLO, no free KV
 * blocks. */
static void t_burst_decode_side(void **state)
{
    (void)state;
    adm_params p = test_params();
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    adm_decision d;
    /* 2 ms + 0.5 ms x (30 + 1) = 17.5 ms <= 20 ms */
    adm_input in = idle_input(1 * S);
    in.running_seqs = 30;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* 61 sequences: 32.5 ms; 25 must finish; not a burst (one arrival a
     * second) -> rejected, Retry-After 1 (about 0.13 s of decoding). */
    in = idle_input(2 * S);
    in.running_seqs = 60;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_int_equal(d.retry_after_s, 1);
    /* Two decode workers share them: 30.5 each -> admitted. */
    in = idle_input(3 * S);
    in.running_seqs = 59;
    in.ready_decode = 2;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* 7 blocks needed, 3 free. */
    in = idle_input(4 * S);
    in.free_kv_blocks = 3;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    in.free_kv_blocks = 7;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* Co-located workers: a step beside a prefill takes 1.25x as long. 30
     * sequences: 17.5 ms alone, 21.875 ms beside prefills all the time. The
     * prefill work ahead of a request is done before it decodes: what runs
     * beside its steps is the prefill of later arrivals, the share of the
     * time the short window's rate keeps the prefill worker busy (10 ms per
     * 100-token prompt). */
    o->destroy(ctx);
    p.cost.decode_extra_when_prefilling = 0.25;
    ctx = make("burst", &p);
    /* one arrival every 10 s: 1% busy, 17.54 ms (the first: no rate yet,
     * 17.5), admitted even with 500 prompt tokens ahead (50 ms) */
    for (int i = 0; i < 4; i++) {
        in = idle_input((10 + 10 * i) * S);
        in.running_seqs = 30;
        in.queued_prefill_tokens = 500;
        o->decide(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_ADMIT);
        assert_near(d.pred.tpot_us, i ? 17500 * (1 + 0.25 * 0.01) : 17500, 1);
    }
    /* 150 arrivals within 1.5 s: 100 a second, the prefill worker always
     * busy: 21.875 ms, over the SLO, with the queue ahead or without it */
    burst_flood(o, ctx, 50 * S, 30, 149);
    in = idle_input(50 * S + 149 * (S / 100));
    in.running_seqs = 30;
    o->decide(ctx, &in, &d);
    assert_int_not_equal(d.verdict, ADM_ADMIT);
    /* after 10 s of quiet it is admitted again */
    in = idle_input(62 * S);
    in.running_seqs = 30;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* the same flood with decode steps unaffected by prefills: admitted */
    o->destroy(ctx);
    p.cost = test_cost();
    ctx = make("burst", &p);
    assert_int_equal(burst_flood(o, ctx, 50 * S, 30, 150), 150);
    /* An idle cluster admits a prompt whose own prefill exceeds the SLO. */
    in = idle_input(70 * S);
    in.prompt_tokens = 5000; /* 500 ms alone */
    in.running_seqs = 0;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    o->destroy(ctx);

    /* Loads brought up to now (adm_fresh_load): the router had 10 on a worker
     * when its heartbeat said 12 (2 another router's); it has 5 now: 7. A
     * report below the router's own count then (requests it sent after the
     * worker took it) adds nothing. */
    assert_int_equal(adm_fresh_load(5, 12, 10), 7);
    assert_int_equal(adm_fresh_load(5, 8, 10), 5);
    assert_int_equal(adm_fresh_load(0, 0, 0), 0);
    assert_int_equal(adm_fresh_load(3, 40, 0), 43);

    /* Summed over workers as the router and the simulator do: a decode
     * worker's sequences brought up to now keep the report's waiting ones
     * (at most all of them), the rest count as running; blocks as reported. */
    adm_input sum = {0};
    adm_input_add_decode(&sum, 5, 10, 9, 3, 100, 200); /* 5 + (12 - 10) = 7: 3 waiting */
    assert_int_equal(sum.running_seqs, 4);
    assert_int_equal(sum.waiting_seqs, 3);
    adm_input_add_decode(&sum, 0, 10, 0, 8, 50, 200); /* 0 + max(0, 8 - 10) = 0 */
    assert_int_equal(sum.running_seqs + sum.waiting_seqs, 7);
    assert_int_equal(sum.ready_decode, 2);
    assert_int_equal(sum.free_kv_blocks, 150);
    assert_int_equal(sum.total_kv_blocks, 400);
    adm_input_add_prefill(&sum, 100, 50, 80); /* 100 + (80 - 50) */
    adm_input_add_prefill(&sum, 0, 0, 7);
    assert_int_equal(sum.queued_prefill_tokens, 137);
    assert_int_equal(sum.ready_prefill, 2);

    /* slo_margin 0.8: the same 17.5 ms step is over 0.8 x 20 ms = 16 ms;
     * 27 others (15.0 ms) are within it. */
    p.slo_margin = 0.8;
    ctx = make("burst", &p);
    in = idle_input(7 * S);
    in.running_seqs = 30;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    in = idle_input(8 * S);
    in.running_seqs = 27;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    o->destroy(ctx);
}

/* The drain of a decode batch over the TPOT SLO, from what the router's own
 * sequences have left when it says so: 40 running, 2 + 0.5 x 41 = 22.5 ms a
 * step against 20 ms, so 5 must leave the batch. A 10-token prompt: TTFT
 * 1 ms, a hold of at most the 99 ms of slack. Mean output 200 tokens: the
 * steady-state guess, 5 x 200 x 22.5 / 41 = 549 ms, rejects. */
static void t_burst_drain_from_remaining(void **state)
{
    (void)state;
    adm_params p = test_params();
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    adm_decision d;
    /* Then ten arrivals at once (a burst from the second or third on):
     * rejected, by the steady-state guess. */
    int64_t t = steady_minute(o, ctx, 10, 200) + 100 * MS;
    uint32_t rem[80];
    adm_input in = dec_input(t, 40, 0, 0);
    in.max_tokens = 200;
    for (int i = 0; i < 10; i++) {
        o->decide(ctx, &in, &d);
        assert_int_equal(d.verdict, ADM_REJECT);
    }
    /* Its own 40 sequences, the fifth-fewest with 4 tokens left: they leave
     * within 4 x 22.5 = 90 ms, inside the slack: held. */
    for (int i = 0; i < 40; i++)
        rem[i] = i < 5 ? (uint32_t)i : 150;
    in.own_remaining = rem;
    in.n_own_remaining = 40;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_HOLD);
    assert_int_equal(d.hold_until_ns, t + 99 * MS);
    /* 5 left on the fifth: 112.5 ms, past it: rejected, Retry-After 1 s. */
    rem[4] = 5;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_int_equal(d.retry_after_s, 1);
    /* ... and 50 (1.1 s): Retry-After 2 s. */
    rem[4] = 50;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_int_equal(d.retry_after_s, 2);
    /* Fewer of its own than must leave: the steady-state guess. */
    rem[4] = 4;
    in.n_own_remaining = 4;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    /* Two decode workers with 40 each: 5 must leave each, the tenth-fewest
     * of the router's 80 (4 tokens: held; 5: rejected). */
    for (int i = 0; i < 80; i++)
        rem[i] = i < 10 ? (uint32_t)i / 2 : 150;
    in.running_seqs = 80;
    in.ready_decode = 2;
    in.own_remaining = rem;
    in.n_own_remaining = 80;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_HOLD);
    rem[9] = 5;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    o->destroy(ctx);
}

/* The SLO feedback (speed_step): admitted requests that miss the TPOT SLO
 * scale the decode times up by (1 + step) each, ones within it back down by
 * (1 - step / 19) each, never below the model as given; the TTFT side the
 * same with first tokens. Arrivals 1 s apart: never a burst, so "not
 * meets" is a reject. */
static void t_burst_slo_feedback(void **state)
{
    (void)state;
    adm_params p = test_params();
    p.speed_step = 0.1;
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    adm_decision d;
    int64_t t = 1 * S;
    /* 2 ms + 0.5 ms x (30 + 1) = 17.5 ms <= 20 ms */
    adm_input in = idle_input(t);
    in.running_seqs = 30;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    /* Three requests at 25 ms per token (11 tokens in 250 ms): x 1.1^3 =
     * 1.331, 17.5 ms -> 23.3 ms. */
    for (int i = 0; i < 3; i++)
        o->on_end(ctx, t, 11, 250 * MS, NULL);
    /* Ends that say nothing: no tokens, or one. */
    o->on_end(ctx, t, 0, 0, NULL);
    o->on_end(ctx, t, 1, 0, NULL);
    in.now_ns = t += S;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    /* Ten within the SLO: 1.331 x (1 - 0.1 / 19)^10 = 1.263, still over
     * 20 / 17.5 = 1.143. */
    for (int i = 0; i < 10; i++)
        o->on_end(ctx, t, 11, 100 * MS, NULL);
    in.now_ns = t += S;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    /* Fifty more: 1.331 x 0.99474^60 = 0.97, held at 1: the model itself.
     * 35 running: 2 + 0.5 x 36 = 20 ms, admitted; 36 running: 20.5 ms, not. */
    for (int i = 0; i < 50; i++)
        o->on_end(ctx, t, 11, 100 * MS, NULL);
    in.now_ns = t += S;
    in.running_seqs = 35;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    in.now_ns = t += S;
    in.running_seqs = 36;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);

    /* TTFT: 850 prompt tokens ahead (85 ms) + its own 100 (10 ms) = 95 ms
     * <= 100 ms; one first token after 150 ms: x 1.1, 104.5 ms. */
    in = idle_input(t += S);
    in.inflight_prefill_tokens = 850;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    o->on_first_token(ctx, t, 150 * MS, t - 150 * MS, NULL);
    in.now_ns = t += S;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    /* The decode side was not touched by it: 35 running still fits. */
    in = idle_input(t += S);
    in.running_seqs = 35;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    o->destroy(ctx);

    /* speed_step 0: the same misses change nothing. */
    p.speed_step = 0;
    ctx = make("burst", &p);
    for (int i = 0; i < 20; i++) {
        o->on_end(ctx, t, 11, 250 * MS, NULL);
        o->on_first_token(ctx, t, 150 * MS, t - 150 * MS, NULL);
    }
    in = idle_input(t += S);
    in.running_seqs = 35;
    in.inflight_prefill_tokens = 850;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    o->destroy(ctx);
}

/* Speed tracking (speed_track): each admission hands back the unscaled
 * model's predictions, and the measured / predicted ratios move the model's
 * factors, below 1 as well as above, each side on its own samples. */
static void t_burst_speed_track(void **state)
{
    (void)state;
    adm_params p = test_params();
    p.speed_track = 0.5;
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    adm_decision d;
    double fp, fd;
    int64_t t = 1 * S;
    /* Idle, 30 running: TTFT 100 tokens x 100 us = 10 ms, step 2 + 0.5 x 31
     * = 17.5 ms; the predictions handed back are exactly those. */
    adm_input in = idle_input(t);
    in.running_seqs = 30;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    assert_near(d.pred.ttft_us, 10000, 1e-9);
    assert_near(d.pred.tpot_us, 17500, 1e-9);
    adm_pred pred = d.pred;
    /* A reject hands back nothing. 70 running: 37.5 ms > 20 ms. */
    in.now_ns = t += S;
    in.running_seqs = 70;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_true(d.pred.ttft_us == 0 && d.pred.tpot_us == 0);

    /* Ends that say nothing move nothing: no prediction, or one token. */
    o->on_end(ctx, t, 11, 50 * MS, NULL);
    o->on_end(ctx, t, 1, 0, &pred);
    o->speed(ctx, &fp, &fd);
    assert_true(fp == 1 && fd == 1);

    /* The cluster decodes twice as fast as profiled: 11 tokens in 87.5 ms,
     * 8.75 ms per token against 17.5 predicted. Ten samples at weight 0.5:
     * ln 0.5 x (1 - 0.5^10), a factor of 0.50034. */
    for (int i = 0; i < 10; i++)
        o->on_end(ctx, t, 11, 87500000, &pred);
    o->speed(ctx, &fp, &fd);
    assert_near(fp, 1, 1e-12);
    assert_near(fd, exp(log(0.5) * (1 - pow(0.5, 10))), 1e-12);
    /* 70 running now predicts 37.5 x 0.50034 = 18.76 ms: admitted, and
     * what it hands back is still the profile's 37.5 ms. */
    in.now_ns = t += S;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    assert_near(d.pred.tpot_us, 37500, 1e-6);

    /* The prefill side slower: first tokens 40 ms after admission against
     * 10 ms predicted. 850 tokens ahead predicted 95 ms (admitted above
     * with the model as profiled); after twenty samples near x 4, over. */
    for (int i = 0; i < 20; i++)
        o->on_first_token(ctx, t, 40 * MS, t - 40 * MS, &pred);
    o->speed(ctx, &fp, &fd);
    assert_near(fp, 4, 1e-4);
    in = idle_input(t += S);
    in.inflight_prefill_tokens = 850;
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    /* The decode side was not touched by them. */
    o->speed(ctx, &fp, &fd);
    assert_near(fd, exp(log(0.5) * (1 - pow(0.5, 10))), 1e-12);
    o->destroy(ctx);

    /* One stray sample moves the estimate by a bounded step: a ratio of
     * 10^6 counts as 16, so at weight 0.1 the factor is 16^0.1. */
    p.speed_track = 0.1;
    ctx = make("burst", &p);
    o->on_first_token(ctx, t, 10 * S, t - 10 * S, &(adm_pred){.ttft_us = 10, .tpot_us = 10});
    o->speed(ctx, &fp, &fd);
    assert_near(fp, pow(16, 0.1), 1e-12);
    assert_true(fd == 1);
    o->destroy(ctx);

    /* speed_track 0: the same samples change nothing. */
    p.speed_track = 0;
    ctx = make("burst", &p);
    for (int i = 0; i < 20; i++) {
        o->on_end(ctx, t, 11, 87500000, &pred);
        o->on_first_token(ctx, t, 40 * MS, t - 40 * MS, &pred);
    }
    o->speed(ctx, &fp, &fd);
    assert_true(fp == 1 && fd == 1);
    o->destroy(ctx);
}

static void t_burst_empty_cluster(void **state)
{
    (void)state;
    adm_params p = test_params();
    const adm_ops *o = adm_find("burst");
    void *ctx = make("burst", &p);
    adm_decision d;
    adm_input in = {.now_ns = S, .prompt_tokens = 10, .max_tokens = 10};
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_int_equal(d.retry_after_s, 1);
    assert_string_equal(d.reason, "no workers");
    in.hold_until_ns = 2 * S;
    o->recheck(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_REJECT);
    assert_string_equal(d.reason, "no workers");
    /* Workers come back: admitted. */
    in = idle_input(2 * S);
    o->decide(ctx, &in, &d);
    assert_int_equal(d.verdict, ADM_ADMIT);
    o->destroy(ctx);
}

/* Idle gaps and clock jumps: an hour of silence, then traffic that reads as
 * what it is; a clock passed in that goes back acts as no time elapsed. */
static void t_burst_idle_and_clock_jumps(void **state)
{
    (void)state;
    adm_params p = test_params();
    sim a, b;
    sim_init(&a, "burst", &p);
    sim_init(&b, "burst", &p);
    int64_t t = 0;
    for (int i = 0; i < 100; i++) {
        t += 100 * MS;
        sim_arrive(&a, t);
        sim_arrive(&b, t);
    }
    /* a sees a clock that jumps back an hour for a while; b sees it stand
     * still. The queue does not drain on a backward step either way. */
    for (int i = 0; i < 30; i++) {
        sim_arrive(&a, t - 3600 * S);
        sim_arrive(&b, t);
    }
    for (int i = 1; i <= 200; i++) {
        sim_arrive(&a, t + i * 10 * MS);
        sim_arrive(&b, t + i * 10 * MS);
    }
    assert_int_equal(a.n_log, b.n_log);
    assert_memory_equal(a.log, b.log, a.n_log * sizeof(sim_log));
    assert_true(a.rejected > 0 && a.admitted > 100);
    /* An idle hour: the next arrivals are admitted, numbers stay finite. */
    t += 3600 * S;
    for (int i = 0; i < 5; i++)
        assert_int_equal(sim_arrive(&a, t + i * S), ADM_ADMIT);
    /* Then a burst after the silence: what fits is admitted, the rest told
     * to come back in a second, and a second later all is admitted again. */
    uint32_t adm0 = a.admitted, rej0 = a.rejected;
    a.max_retry = 0;
    for (int i = 0; i < 30; i++)
        sim_arrive(&a, t + 5 * S);
    assert_int_equal(a.admitted - adm0, 10);
    assert_int_equal(a.rejected - rej0, 20);
    assert_int_equal(a.max_retry, 1);
    for (int i = 0; i < 10; i++)
        assert_int_equal(sim_arrive(&a, t + 6 * S + i * 100 * MS), ADM_ADMIT);
    sim_free(&a);
    sim_free(&b);

    /* token_bucket under the same jump. */
    adm_params q = test_params();
    q.bucket_rate = 1, q.bucket_burst = 1;
    const adm_ops *o = adm_find("token_bucket");
    void *ctx = make("token_bucket", &q);
    assert_int_equal(bucket_at(o, ctx, 100 * S, NULL), ADM_ADMIT);
    assert_int_equal(bucket_at(o, ctx, 50 * S, NULL), ADM_REJECT);
    assert_int_equal(bucket_at(o, ctx, 101 * S, NULL), ADM_ADMIT);
    o->destroy(ctx);
}

/* Same sequence twice, fresh policies: the same decisions, for every policy. */
static void run_mixed(sim *s)
{
    rng_state = 42;
    int64_t t = 0;
    for (int i = 0; i < 6000; i++) {
        double u = rng_uniform();
        /* Gamma-like bursty arrivals: mostly 5-30 ms apart, now and then a
         * clump at the same instant, now and then a pause. */
        if (u < 0.1)
            t += 0;
        else if (u < 0.95)
            t += (int64_t)(5 * MS + rng_uniform() * 25 * MS);
        else
            t += (int64_t)(rng_uniform() * 2 * S);
        if (i % 700 == 0) t -= 50 * MS; /* a clock jump back */
        s->running_seqs = (uint32_t)(rng_uniform() * 40);
        sim_arrive(s, t);
    }
}

static void t_determinism(void **state)
{
    (void)state;
    adm_params p = test_params();
    p.bucket_rate = 60;
    p.bucket_burst = 10;
    p.queue_max_ms = 80;
    p.max_outstanding = 1000000;
    const char *names[] = {"none", "max_outstanding", "token_bucket", "queue_threshold", "burst"};
    for (size_t k = 0; k < 5; k++) {
        sim a, b;
        sim_init(&a, names[k], &p);
        sim_init(&b, names[k], &p);
        run_mixed(&a);
        run_mixed(&b);
        assert_int_equal(a.n_log, b.n_log);
        assert_memory_equal(a.log, b.log, a.n_log * sizeof(sim_log));
        assert_int_equal(a.admitted + a.rejected + a.n_held, 6000);
        if (strcmp(names[k], "burst") == 0) {
            /* The mix has bursts and overload: all three verdicts occur. */
            assert_true(a.held > 0);
            assert_true(a.rejected > 0);
            assert_true(a.admitted_after_hold > 0);
        }
        sim_free(&a);
        sim_free(&b);
    }
}

/* ---- the cost file ---- */

static void tmp_path(char *buf, size_t n, const char *tag)
{
    snprintf(buf, n, "/tmp/test_adm_%d_%s.cost", (int)getpid(), tag);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void t_cost_file(void **state)
{
    (void)state;
    char path[128], err[256];
    tmp_path(path, sizeof(path), "rt");
    adm_cost c, back;
    adm_cost_defaults(&c);
    assert_true(c.prefill_us_per_token > 0 && c.decode_step_us_fixed > 0);
    c.decode_step_us_per_ctx_token = 0.1 + 0.2; /* not exact in decimal */
    c.transfer_us_per_block = 1e-300;
    assert_int_equal(adm_cost_save(path, &c), 0);
    memset(&back, 0xff, sizeof(back));
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), 0);
    assert_memory_equal(&c, &back, sizeof(c));

    /* Comments, blank lines, spaces, missing keys (0). */
    write_file(path, "# fitted\n\n  prefill_us_per_token=  12.5  # per token\n"
                     "decode_step_us_fixed = 3e3\n");
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), 0);
    assert_true(back.prefill_us_per_token == 12.5);
    assert_true(back.decode_step_us_fixed == 3000);
    assert_true(back.prefill_us_fixed == 0 && back.transfer_us_per_block == 0);

    /* Errors name the line and the key; *out stays as it was. */
    adm_cost keep = back;
    write_file(path, "prefill_us_fixed = 1\nprefill_us_per_tokn = 2\n");
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, ":2: unknown key 'prefill_us_per_tokn'"));
    assert_memory_equal(&keep, &back, sizeof(keep));
    const char *bad[] = {"prefill_us_fixed = abc\n",  "prefill_us_fixed = 1.5x\n",
                         "prefill_us_fixed =\n",      "prefill_us_fixed = -1\n",
                         "prefill_us_fixed = nan\n",  "prefill_us_fixed = inf\n",
                         "prefill_us_fixed = 1e999\n"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        write_file(path, bad[i]);
        assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), TD_EFORMAT);
        assert_non_null(strstr(err, "bad value"));
        assert_non_null(strstr(err, "prefill_us_fixed"));
    }
    /* The host keys together: a share of 1 or more, or a factor below 1
     * with a share, is refused; a share without a factor too. */
    const char *bad_host[] = {"host_slow_share = 1\nhost_slow_factor = 2\nhost_slow_mean_us = 9\n",
                              "host_slow_share = 0.5\nhost_slow_factor = 0.5\n"
                              "host_slow_mean_us = 9\n",
                              "host_slow_share = 0.5\nhost_slow_mean_us = 9\n",
                              "host_slow_share = 0.5\nhost_slow_factor = 2\n"};
    for (size_t i = 0; i < sizeof(bad_host) / sizeof(bad_host[0]); i++) {
        write_file(path, bad_host[i]);
        assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), TD_EFORMAT);
        assert_non_null(strstr(err, "host_slow_share must be"));
        assert_memory_equal(&keep, &back, sizeof(keep));
    }
    write_file(path, "host_slow_share = 0.25\nhost_slow_factor = 1.6\nhost_slow_mean_us = 5e5\n");
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), 0);
    assert_true(back.host_slow_share == 0.25 && back.host_slow_mean_us == 5e5);
    back = keep;
    write_file(path, "prefill_us_fixed 1\n");
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "key = value"));
    write_file(path, "prefill_us_fixed = 1\nprefill_us_fixed = 2\n");
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "twice"));
    char longline[1200];
    memset(longline, '1', sizeof(longline));
    memcpy(longline, "prefill_us_fixed = ", 19);
    longline[sizeof(longline) - 2] = '\n';
    longline[sizeof(longline) - 1] = '\0';
    write_file(path, longline);
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), TD_EFORMAT);
    assert_non_null(strstr(err, "too long"));
    assert_int_equal(adm_cost_load(path, &back, NULL, 0), TD_EFORMAT);
    assert_memory_equal(&keep, &back, sizeof(keep));
    unlink(path);

    /* Missing file, missing directory. */
    assert_int_equal(adm_cost_load(path, &back, err, sizeof(err)), TD_ENOENT);
    assert_non_null(strstr(err, path));
    assert_int_equal(adm_cost_load(NULL, &back, err, sizeof(err)), TD_EINVAL);
    assert_true(adm_cost_save("/nonexistent-dir/x.cost", &c) < 0);
    assert_int_equal(adm_cost_save(NULL, &c), TD_EINVAL);
}

/* create under allocation failure: TD_ENOMEM, nothing leaked. */
static void t_alloc_failures(void **state)
{
    (void)state;
    adm_params p = test_params();
    const char *names[] = {"max_outstanding", "token_bucket", "queue_threshold", "burst"};
    for (size_t k = 0; k < 4; k++) {
        void *ctx = NULL;
        fail_alloc_arm(0);
        int rc = adm_find(names[k])->create(&p, &ctx);
        assert_int_equal(fail_alloc_disarm(), 1);
        assert_int_equal(rc, TD_ENOMEM);
    }
}

/* The router's own_remaining scratch: grows past its first 64 entries,
 * keeps what it holds when it cannot grow (TD_ENOMEM, nothing appended),
 * and grows again once memory is back; adm_input_set_remaining lends it
 * sorted. */
static void t_remaining_scratch(void **state)
{
    (void)state;
    adm_remaining r = {0};
    for (uint32_t i = 0; i < 64; i++)
        assert_int_equal(adm_remaining_push(&r, 1000 - i), 0);
    assert_int_equal(r.n, 64);
    fail_alloc_arm(0);
    assert_int_equal(adm_remaining_push(&r, 7), TD_ENOMEM);
    assert_int_equal(fail_alloc_disarm(), 1);
    assert_int_equal(r.n, 64);
    for (uint32_t i = 0; i < 64; i++)
        assert_int_equal(r.v[i], 1000 - i);
    for (uint32_t i = 0; i < 100; i++)
        assert_int_equal(adm_remaining_push(&r, i), 0);
    assert_int_equal(r.n, 164);
    adm_input in = {0};
    adm_input_set_remaining(&in, r.v, r.n);
    assert_int_equal(in.n_own_remaining, 164);
    for (uint32_t i = 1; i < 164; i++)
        assert_true(in.own_remaining[i - 1] <= in.own_remaining[i]);
    assert_int_equal(in.own_remaining[0], 0);
    assert_int_equal(in.own_remaining[163], 1000);
    /* Refilled from empty before the next decision: no allocation. */
    r.n = 0;
    fail_alloc_arm(0);
    assert_int_equal(adm_remaining_push(&r, 5), 0);
    assert_int_equal(fail_alloc_disarm(), 0);
    adm_remaining_free(&r);
    assert_null(r.v);
    assert_int_equal(r.cap, 0);
    /* A first push that cannot allocate leaves the list empty. */
    fail_alloc_arm(0);
    assert_int_equal(adm_remaining_push(&r, 5), TD_ENOMEM);
    assert_int_equal(fail_alloc_disarm(), 1);
    assert_int_equal(r.n, 0);
    assert_null(r.v);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Every policy on the mixed sequence of t_determinism (bursts, pauses, clock
 * jumps, a changing decode load), 20 times over: the distribution of the
 * time of one decide or recheck call, the calls the router's loop makes per
 * request (the loop's own work around them, gathering the input, is the same
 * for every policy). Timed one call at a time with CLOCK_MONOTONIC, so each
 * figure includes a clock read (the "timer only" row). */
static int bench(void)
{
    static const char *names[] = {"none", "max_outstanding", "token_bucket", "queue_threshold",
                                  "burst"};
    g_cap_calls = 400000;
    g_call_ns = malloc(g_cap_calls * sizeof(int64_t));
    if (!g_call_ns) return 1;
    g_n_calls = 0;
    for (size_t i = 0; i < 200000 && g_n_calls < g_cap_calls; i++) {
        int64_t t0 = mono_ns();
        g_call_ns[g_n_calls++] = mono_ns() - t0;
    }
    printf("%-16s %9s %9s %9s %9s %9s  (ns per call)\n", "policy", "calls", "p50", "p99", "p99.9",
           "max");
    for (int k = -1; k < (int)(sizeof(names) / sizeof(names[0])); k++) {
        if (k >= 0) {
            adm_params p = test_params();
            g_n_calls = 0;
            for (int rep = 0; rep < 20; rep++) {
                sim s;
                sim_init(&s, names[k], &p);
                run_mixed(&s);
                sim_free(&s);
            }
        }
        qsort(g_call_ns, g_n_calls, sizeof(int64_t), cmp_i64);
        printf("%-16s %9zu %9lld %9lld %9lld %9lld\n", k < 0 ? "(timer only)" : names[k], g_n_calls,
               (long long)g_call_ns[g_n_calls / 2], (long long)g_call_ns[g_n_calls * 99 / 100],
               (long long)g_call_ns[g_n_calls * 999 / 1000], (long long)g_call_ns[g_n_calls - 1]);
    }
    free(g_call_ns);
    g_call_ns = NULL;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_names_and_find),
        cmocka_unit_test(t_bad_params),
        cmocka_unit_test(t_none_and_max_outstanding),
        cmocka_unit_test(t_bucket_refill_exact),
        cmocka_unit_test(t_queue_threshold),
        cmocka_unit_test(t_unknown_cost),
        cmocka_unit_test(t_burst_below_capacity),
        cmocka_unit_test(t_burst_prefill_burst),
        cmocka_unit_test(t_burst_transfer_fixed),
        cmocka_unit_test(t_burst_decode_burst_held),
        cmocka_unit_test(t_burst_sustained_overload),
        cmocka_unit_test(t_burst_hold_deadline),
        cmocka_unit_test(t_burst_decode_side),
        cmocka_unit_test(t_burst_drain_from_remaining),
        cmocka_unit_test(t_burst_slo_feedback),
        cmocka_unit_test(t_burst_speed_track),
        cmocka_unit_test(t_burst_empty_cluster),
        cmocka_unit_test(t_burst_idle_and_clock_jumps),
        cmocka_unit_test(t_determinism),
        cmocka_unit_test(t_cost_file),
        cmocka_unit_test(t_alloc_failures),
        cmocka_unit_test(t_remaining_scratch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
