/* Unit tests for loadtest/sim: event times computed by hand on a tiny trace,
 * admission changing rejections, determinism, the report's fields, block
 * pools empty at the end under pressure, the cost model (one, adm_cost's), the
 * router's hold queue (when held requests are rechecked, what they see). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "engine/sched/sch.h"
#include "loadtest/lt_report.h"
#include "loadtest/lt_synth.h"
#include "loadtest/sim/sim.h"

#define US TD_NS_PER_US

/* Fixed costs that make every event time a round number:
 *   prefill step = 1000 us + 10 us per prompt token
 *   decode step  = 2000 us whatever the batch
 *   transfer     = 100 us per block (16 tokens) */
static void tiny_config(sim_config *c)
{
    sim_config_defaults(c);
    c->heartbeat_ns = 0;
    c->cost = (adm_cost){.prefill_us_fixed = 1000,
                         .prefill_us_per_token = 10,
                         .decode_step_us_fixed = 2000,
                         .decode_step_us_per_seq = 0,
                         .decode_step_us_per_ctx_token = 0,
                         .transfer_us_per_block = 100};
    c->check_kv = 1;
}

/* A at 0: 32 prompt tokens, 3 output tokens. B at 0.5 ms: 16 + 2.
 *   A: prefill step [0, 1320] (1000 + 32 * 10), transfer of 2 blocks until
 *      1520: the decode worker is idle, joins it: first token at 1520.
 *      Decode steps [1520, 3520] (token 2) and [3520, 5520] (token 3, done).
 *   B: arrives at 500 while A's prefill runs; its blocks are allocated at
 *      once, the prefill worker takes it at 1320: step [1320, 2480]
 *      (1000 + 16 * 10), transfer of 1 block until 2580. The decode worker
 *      is busy until 3520, so B joins then: first token at 3520 (TTFT 3020).
 *      Step [3520, 5520] decodes A and B together: B's token 2, done
 *      (e2e 5020). */
static void test_hand_computed_times(void **state)
{
    (void)state;
    sim_config c;
    tiny_config(&c);
    lt_req reqs[2] = {{.t_ns = 0, .input_tokens = 32, .output_tokens = 3},
                      {.t_ns = 500 * US, .input_tokens = 16, .output_tokens = 2}};
    sim_result r;
    char err[256];
    assert_int_equal(sim_run(&c, reqs, 2, &r, err, sizeof(err)), 0);
    const lt_record *a = &r.recs[0], *b = &r.recs[1];
    assert_int_equal(a->outcome, LT_OK);
    assert_int_equal(a->http_status, 200);
    assert_int_equal(a->send_ns, 0);
    assert_int_equal(a->ttft_ns, 1520 * US);
    assert_int_equal(a->n_chunks, 3);
    assert_int_equal(a->output_tokens, 3);
    assert_int_equal(a->chunk_ns[1], 3520 * US);
    assert_int_equal(a->chunk_ns[2], 5520 * US);
    assert_int_equal(a->e2e_ns, 5520 * US);
    assert_int_equal(b->outcome, LT_OK);
    assert_int_equal(b->send_ns, 500 * US);
    assert_int_equal(b->ttft_ns, 3020 * US);
    assert_int_equal(b->e2e_ns, 5020 * US);
    assert_int_equal(b->output_tokens, 2);
    /* prefill steps: A, B; decode steps: A, A + B. */
    assert_int_equal(r.stats.steps_prefill, 2);
    assert_int_equal(r.stats.steps_decode, 2);
    assert_int_equal(r.stats.leaked_blocks, 0);
    assert_true(lt_record_tpot_ms(a) == 2.0);
    sim_result_free(&r);
}

/* The co-location factors: test_hand_computed_times again with a prefill
 * batch 1.5x as long while a decode step runs, and a decode step 1.25x while
 * a prefill runs, each charged by what runs when the step starts. */
static void test_colocated_slowdown(void **state)
{
    (void)state;
    sim_config c;
    tiny_config(&c);
    c.cost.prefill_extra_when_decoding = 0.5;
    c.cost.decode_extra_when_prefilling = 0.25;
    lt_req reqs[2] = {{.t_ns = 0, .input_tokens = 32, .output_tokens = 3},
                      {.t_ns = 500 * US, .input_tokens = 16, .output_tokens = 2}};
    sim_result r;
    char err[256];
    assert_int_equal(sim_run(&c, reqs, 2, &r, err, sizeof(err)), 0);
    const lt_record *a = &r.recs[0], *b = &r.recs[1];
    /* A's prefill 0..1320 (decode idle), transfer to 1520, joins. */
    assert_int_equal(a->ttft_ns, 1520 * US);
    /* B's prefill starts at 1320, before the decode step does: 1160 us. A's
     * first step starts at 1520 during it: 2000 x 1.25 = 2500, to 4020. B
     * landed at 2580 and joins there. */
    assert_int_equal(a->chunk_ns[1], 4020 * US);
    assert_int_equal(b->ttft_ns, (4020 - 500) * US);
    /* A + B from 4020, no prefill running: 2000 us. */
    assert_int_equal(a->e2e_ns, 6020 * US);
    assert_int_equal(b->e2e_ns, (6020 - 500) * US);
    assert_int_equal(r.stats.leaked_blocks, 0);
    sim_result_free(&r);

    /* B arrives at 2000, during A's first step; the decode worker takes it at
     * the step's end (3520, between steps as dc__admit does), so B's prefill
     * starts before the next decode step: 1160 us, to 4680. That step starts
     * with B's prefill running: 2500 us, to 6020, where B (landed at 4780)
     * joins. */
    reqs[1].t_ns = 2000 * US;
    assert_int_equal(sim_run(&c, reqs, 2, &r, err, sizeof(err)), 0);
    assert_int_equal(r.recs[0].chunk_ns[1], 3520 * US);
    assert_int_equal(r.recs[1].ttft_ns, (6020 - 2000) * US);
    sim_result_free(&r);
}

/* An output of one token ends at the join: no decode step. */
static void test_one_token_output(void **state)
{
    (void)state;
    sim_config c;
    tiny_config(&c);
    lt_req q = {.t_ns = 0, .input_tokens = 20, .output_tokens = 1};
    sim_result r;
    assert_int_equal(sim_run(&c, &q, 1, &r, NULL, 0), 0);
    /* 1000 + 200 us prefill, 2 blocks: 200 us transfer. */
    assert_int_equal(r.recs[0].ttft_ns, 1400 * US);
    assert_int_equal(r.recs[0].e2e_ns, 1400 * US);
    assert_int_equal(r.stats.steps_decode, 0);
    assert_int_equal(r.stats.leaked_blocks, 0);
    sim_result_free(&r);

    /* The hand-off's fixed part is paid once per request, on top of the
     * per-block part: 1200 + 250 + 2 x 100. */
    c.cost.transfer_us_fixed = 250;
    assert_int_equal(sim_run(&c, &q, 1, &r, NULL, 0), 0);
    assert_int_equal(r.recs[0].ttft_ns, 1650 * US);
    sim_result_free(&r);
}

/* The host's two speeds (cost.host_slow_*): off, it changes nothing; on,
 * the same seed draws the same stretches, another seed others, and over
 * 400 requests on an idle cluster a factor of 2 for half the time makes the
 * mean TTFT about 1.5x; out-of-range keys are refused. */
static double mean_ttft_ms(const sim_result *r)
{
    double sum = 0;
    for (size_t i = 0; i < r->n; i++)
        sum += (double)r->recs[i].ttft_ns / 1e6;
    return sum / (double)r->n;
}

static void test_host_two_speeds(void **state)
{
    (void)state;
    enum { N = 400 };
    static lt_req q[N];
    for (int i = 0; i < N; i++) /* 25 ms apart: each served alone (1.7 ms + 2 decode steps) */
        q[i] = (lt_req){.t_ns = (int64_t)i * 25000 * US, .input_tokens = 32, .output_tokens = 3};
    sim_config c;
    tiny_config(&c);
    char err[256];
    sim_result base, on, again, other;
    assert_int_equal(sim_run(&c, q, N, &base, err, sizeof(err)), 0);

    /* Keys at 0: the same run, to the nanosecond, whatever the seed. */
    c.seed = 99;
    sim_result off;
    assert_int_equal(sim_run(&c, q, N, &off, err, sizeof(err)), 0);
    for (int i = 0; i < N; i++)
        assert_int_equal(off.recs[i].e2e_ns, base.recs[i].e2e_ns);
    sim_result_free(&off);

    c.cost.host_slow_share = 0.5;
    c.cost.host_slow_factor = 2;
    c.cost.host_slow_mean_us = 50000;
    c.seed = 1;
    assert_int_equal(sim_run(&c, q, N, &on, err, sizeof(err)), 0);
    assert_int_equal(sim_run(&c, q, N, &again, err, sizeof(err)), 0);
    c.seed = 2;
    assert_int_equal(sim_run(&c, q, N, &other, err, sizeof(err)), 0);
    int differ = 0, slowed = 0;
    for (int i = 0; i < N; i++) {
        assert_int_equal(again.recs[i].ttft_ns, on.recs[i].ttft_ns);
        assert_int_equal(again.recs[i].e2e_ns, on.recs[i].e2e_ns);
        differ += other.recs[i].e2e_ns != on.recs[i].e2e_ns;
        /* Every step takes 1x or 2x its time. */
        assert_true(on.recs[i].ttft_ns >= base.recs[i].ttft_ns);
        assert_true(on.recs[i].e2e_ns <= 2 * base.recs[i].e2e_ns);
        slowed += on.recs[i].e2e_ns > base.recs[i].e2e_ns;
    }
    assert_true(differ > 0);
    assert_true(slowed > N / 4 && slowed < 3 * N / 4);
    double ratio = mean_ttft_ms(&on) / mean_ttft_ms(&base);
    assert_true(ratio > 1.3 && ratio < 1.7);
    assert_int_equal(on.stats.leaked_blocks, 0);
    sim_result_free(&base);
    sim_result_free(&on);
    sim_result_free(&again);
    sim_result_free(&other);

    double bad[][3] = {{1, 2, 1000}, {0.5, 0.5, 1000}, {0.5, 2, 0}, {0.5, 0, 1000}};
    for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
        c.cost.host_slow_share = bad[k][0];
        c.cost.host_slow_factor = bad[k][1];
        c.cost.host_slow_mean_us = bad[k][2];
        sim_result r;
        assert_int_equal(sim_run(&c, q, 1, &r, err, sizeof(err)), TD_EINVAL);
        assert_non_null(strstr(err, "host_slow_share"));
    }
}

/* Three requests 0.1 ms apart, each still running when the next arrives:
 * none admits all, max_outstanding 1 only the first (429 for the others). */
static void test_admission_changes_rejections(void **state)
{
    (void)state;
    sim_config c;
    tiny_config(&c);
    lt_req reqs[3] = {{.t_ns = 0, .input_tokens = 8, .output_tokens = 4},
                      {.t_ns = 100 * US, .input_tokens = 8, .output_tokens = 4},
                      {.t_ns = 200 * US, .input_tokens = 8, .output_tokens = 4}};
    sim_result r;
    assert_int_equal(sim_run(&c, reqs, 3, &r, NULL, 0), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(r.recs[i].outcome, LT_OK);
    sim_result_free(&r);

    c.admission = "max_outstanding";
    c.params.max_outstanding = 1;
    assert_int_equal(sim_run(&c, reqs, 3, &r, NULL, 0), 0);
    assert_int_equal(r.recs[0].outcome, LT_OK);
    for (int i = 1; i < 3; i++) {
        assert_int_equal(r.recs[i].outcome, LT_REJECTED);
        assert_int_equal(r.recs[i].http_status, 429);
        assert_non_null(strstr(r.recs[i].error, "max_outstanding"));
        assert_int_equal(r.recs[i].ttft_ns, -1);
    }
    lt_summary s;
    lt_slo slo = {0};
    assert_int_equal(lt_summary_compute(r.recs, r.n, &slo, &s), 0);
    assert_int_equal(s.rejected, 2);
    assert_int_equal(s.ok, 1);
    sim_result_free(&r);

    /* With client retries the two 429s (Retry-After 1) come back 1 s later:
     * the first is served, the second, 0.1 ms behind it, is rejected again
     * and served on its second retry, 2 s after its first send. Times count
     * from the first send; without retries both are rejected. */
    c.retry_429 = 2;
    assert_int_equal(sim_run(&c, reqs, 3, &r, NULL, 0), 0);
    assert_int_equal(r.stats.client_retries, 3);
    assert_int_equal(r.recs[0].attempts, 1);
    assert_int_equal(r.recs[1].attempts, 2);
    assert_int_equal(r.recs[2].attempts, 3);
    for (int i = 1; i < 3; i++) {
        assert_int_equal(r.recs[i].outcome, LT_OK);
        assert_true(r.recs[i].ttft_ns > (int64_t)i * TD_NS_PER_S);
    }
    assert_int_equal(lt_summary_compute(r.recs, r.n, &slo, &s), 0);
    assert_int_equal(s.ok, 3);
    assert_int_equal(s.retried, 2);
    assert_int_equal(s.retries, 3);
    assert_int_equal(s.no_retry.ok, 1);
    assert_int_equal(s.no_retry.rejected, 2);
    sim_result_free(&r);
    /* One retry: the second is rejected for good, its e2e from the first send. */
    c.retry_429 = 1;
    assert_int_equal(sim_run(&c, reqs, 3, &r, NULL, 0), 0);
    assert_int_equal(r.recs[2].outcome, LT_REJECTED);
    assert_int_equal(r.recs[2].attempts, 2);
    assert_true(r.recs[2].e2e_ns >= TD_NS_PER_S);
    sim_result_free(&r);
    c.retry_429 = 0;

    /* An unknown policy or bad parameters fail before anything runs. */
    char err[256];
    c.admission = "no_such_policy";
    assert_int_equal(sim_run(&c, reqs, 3, &r, err, sizeof(err)), TD_EINVAL);
    assert_non_null(strstr(err, "no_such_policy"));
    c.admission = "max_outstanding";
    c.params.max_outstanding = 0;
    assert_int_equal(sim_run(&c, reqs, 3, &r, err, sizeof(err)), TD_EINVAL);
}

/* One request at a time, the others 429 with Retry-After 1; the TTFT the
 * policy is told (on_first_token) counts from the attempt it admitted, as
 * the router's t_arrival does, while the record's counts from the first
 * send. */
static int64_t one_ttft[4];
static int one_n;
static void one_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    (void)ctx;
    *out = in->outstanding == 0
               ? (adm_decision){.verdict = ADM_ADMIT}
               : (adm_decision){.verdict = ADM_REJECT, .retry_after_s = 1, .reason = "one"};
}
static void one_first(void *ctx, int64_t now, int64_t ttft, int64_t admitted, const adm_pred *pred)
{
    (void)ctx;
    (void)now;
    (void)admitted;
    (void)pred;
    if (one_n < 4) one_ttft[one_n++] = ttft;
}
static int one_create(const adm_params *p, void **ctx)
{
    (void)p;
    *ctx = NULL;
    return 0;
}
static void one_destroy(void *ctx)
{
    (void)ctx;
}

static void test_retry_ttft_seen_by_policy(void **state)
{
    (void)state;
    static const adm_ops one = {.name = "one",
                                .create = one_create,
                                .destroy = one_destroy,
                                .decide = one_decide,
                                .on_first_token = one_first};
    sim_config c;
    tiny_config(&c);
    c.policy = &one;
    c.retry_429 = 2;
    lt_req reqs[2] = {{.t_ns = 0, .input_tokens = 8, .output_tokens = 4},
                      {.t_ns = 100 * US, .input_tokens = 8, .output_tokens = 4}};
    sim_result r;
    one_n = 0;
    assert_int_equal(sim_run(&c, reqs, 2, &r, NULL, 0), 0);
    assert_int_equal(r.recs[1].attempts, 2);
    assert_int_equal(r.recs[1].outcome, LT_OK);
    assert_true(r.recs[1].ttft_ns > TD_NS_PER_S);
    assert_int_equal(one_n, 2);
    /* Same prompt, same idle cluster: the same time to first token. */
    assert_int_equal(one_ttft[1], one_ttft[0]);
    assert_int_equal(one_ttft[0], r.recs[0].ttft_ns);
    sim_result_free(&r);
}

static void synth(lt_trace *tr, size_t n, uint64_t seed, double speed)
{
    lt_synth_params p;
    lt_synth_defaults(&p);
    p.n = n;
    p.seed = seed;
    p.req_max = 1500;
    p.resp_max = 400;
    lt_trace_init(tr);
    assert_int_equal(lt_synth_generate(&p, tr), 0);
    assert_int_equal(lt_trace_speedup(tr, speed), 0);
}

/* Tight pools (decode waits for blocks, preempts), two workers of each
 * kind, heartbeats: every block comes back, kvc_check passes after every
 * step, and two runs give the same records to the nanosecond. */
static void test_pressure_determinism_and_no_leaks(void **state)
{
    (void)state;
    lt_trace tr;
    synth(&tr, 400, 11, 40.0);
    sim_config c;
    sim_config_defaults(&c);
    c.n_prefill = 2;
    c.n_decode = 2;
    c.kv_blocks = 140; /* 2,240 tokens: a few long requests fill it */
    c.max_model_len = 2048;
    c.max_num_seqs = 16;
    c.max_batched_tokens = 256;
    c.max_chunk_tokens = 128;
    c.heartbeat_ns = 50 * TD_NS_PER_MS;
    c.check_kv = 1;
    sim_result r1, r2;
    char err[256];
    assert_int_equal(sim_run(&c, tr.reqs, tr.n, &r1, err, sizeof(err)), 0);
    assert_int_equal(sim_run(&c, tr.reqs, tr.n, &r2, err, sizeof(err)), 0);
    assert_int_equal(r1.stats.leaked_blocks, 0);
    assert_true(r1.stats.preemptions > 0);
    size_t ok = 0;
    for (size_t i = 0; i < tr.n; i++) {
        const lt_record *a = &r1.recs[i], *b = &r2.recs[i];
        assert_int_equal(a->outcome, b->outcome);
        assert_int_equal(a->ttft_ns, b->ttft_ns);
        assert_int_equal(a->e2e_ns, b->e2e_ns);
        assert_int_equal(a->n_chunks, b->n_chunks);
        int32_t k = a->n_chunks < a->chunk_cap ? a->n_chunks : a->chunk_cap;
        assert_memory_equal(a->chunk_ns, b->chunk_ns, (size_t)k * sizeof(int64_t));
        if (a->outcome == LT_OK) {
            ok++;
            assert_int_equal(a->output_tokens, tr.reqs[i].output_tokens);
            /* Token times never go backwards. */
            for (int32_t j = 1; j < k; j++)
                assert_true(a->chunk_ns[j] >= a->chunk_ns[j - 1]);
        }
    }
    /* Requests longer than the context are refused (400), the rest served. */
    assert_int_equal(ok + r1.stats.too_long, tr.n);
    assert_memory_equal(&r1.stats, &r2.stats, sizeof(r1.stats));
    sim_result_free(&r1);
    sim_result_free(&r2);
    lt_trace_free(&tr);
}

/* The report of a simulated run has what a real replay's has. */
static void test_summary_fields(void **state)
{
    (void)state;
    lt_trace tr;
    synth(&tr, 50, 3, 10.0);
    assert_int_equal(lt_trace_fit_context(&tr, 1024, NULL), 0);
    sim_config c;
    sim_config_defaults(&c);
    c.max_model_len = 1024;
    sim_result r;
    assert_int_equal(sim_run(&c, tr.reqs, tr.n, &r, NULL, 0), 0);
    lt_slo slo = {.ttft_ms = 500, .tpot_ms = 50};
    lt_summary s;
    assert_int_equal(lt_summary_compute(r.recs, r.n, &slo, &s), 0);
    assert_int_equal(s.ok, 50);
    char dir[] = "/tmp/test_sim_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char err[256];
    assert_int_equal(lt_report_write(dir, r.recs, r.n, &s, NULL, err, sizeof(err)), 0);
    char path[512];
    snprintf(path, sizeof(path), "%s/summary.json", dir);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    static char buf[65536];
    size_t len = fread(buf, 1, sizeof(buf) - 1, fp);
    fclose(fp);
    buf[len] = '\0';
    cJSON *j = cJSON_Parse(buf);
    assert_non_null(j);
    const char *top[] = {"requests",   "ok",         "rejected", "errors",     "pending",
                         "duration_s", "throughput", "slo",      "goodput",    "ttft_ms",
                         "itl_ms",     "tpot_ms",    "e2e_ms",   "lateness_ms"};
    for (size_t i = 0; i < sizeof(top) / sizeof(top[0]); i++)
        assert_non_null(cJSON_GetObjectItem(j, top[i]));
    assert_non_null(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "goodput"), "req_per_s"));
    assert_non_null(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "ttft_ms"), "p90"));
    assert_int_equal(cJSON_GetObjectItem(j, "requests")->valuedouble, 50);
    cJSON_Delete(j);
    const char *files[] = {"summary.json", "requests.csv", "tokens.csv", "timeseries.dat",
                           "cdf.dat"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        assert_int_equal(access(path, R_OK), 0);
        unlink(path);
    }
    rmdir(dir);
    sim_result_free(&r);
    lt_trace_free(&tr);
}

/* The step time is read off the sch_step: prefill tokens and decode items. */
static void test_step_cost(void **state)
{
    (void)state;
    adm_cost c = {.prefill_us_fixed = 100,
                  .prefill_us_per_token = 2,
                  .decode_step_us_fixed = 50,
                  .decode_step_us_per_seq = 10,
                  .decode_step_us_per_ctx_token = 0.5,
                  .transfer_us_per_block = 1};
    sch_item items[3] = {{.start = 9, .n = 1, .sample = true},    /* decode at ctx 10 */
                         {.start = 29, .n = 1, .sample = true},   /* decode at ctx 30 */
                         {.start = 0, .n = 64, .prefill = true}}; /* prompt chunk */
    sch_step st = {
        .items = items, .n_items = 3, .n_tokens = 66, .n_prefill_tokens = 64, .n_decode_tokens = 2};
    /* 100 + 2 * 64 + 50 + 10 * 2 + 0.5 * 40 */
    assert_true(sim_step_us(&c, &st) == 318.0);
    st.n_items = 2;
    st.n_prefill_tokens = 0;
    assert_true(sim_step_us(&c, &st) == 90.0);
    st.items = items + 2;
    st.n_items = 1;
    st.n_prefill_tokens = 64;
    assert_true(sim_step_us(&c, &st) == 228.0);

    /* The attention term: a chunk of n tokens from position s has
     * n s + n (n + 1) / 2 (token, position) pairs. 64 from 0: 2080; then a
     * second chunk of 16 from 64 beside it: 16 x 64 + 136 = 1160. */
    c.prefill_us_per_token_ctx = 0.25;
    assert_true(sim_step_us(&c, &st) == 228.0 + 0.25 * 2080);
    sch_item chunks[2] = {{.start = 0, .n = 64, .prefill = true},
                          {.start = 64, .n = 16, .prefill = true}};
    sch_step two = {.items = chunks, .n_items = 2, .n_tokens = 80, .n_prefill_tokens = 80};
    assert_true(sim_step_us(&c, &two) == 100 + 2 * 80 + 0.25 * (2080 + 1160));
}

/* One cost model: the simulator's defaults are adm_cost_defaults, and a file
 * the router reads (adm_cost_save / adm_cost_load) is what the simulator
 * reads too; the policy is created with that cost. */
static adm_cost seen_cost;

static int spy_create(const adm_params *p, void **ctx)
{
    seen_cost = p->cost;
    *ctx = NULL;
    return 0;
}
static void spy_destroy(void *ctx)
{
    (void)ctx;
}
static void spy_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    (void)ctx;
    (void)in;
    *out = (adm_decision){.verdict = ADM_ADMIT};
}

static void test_one_cost_model(void **state)
{
    (void)state;
    sim_config c;
    sim_config_defaults(&c);
    adm_cost d;
    adm_cost_defaults(&d);
    assert_memory_equal(&c.cost, &d, sizeof(d));
    adm_params pd;
    adm_params_defaults(&pd);
    assert_int_equal(c.params.max_outstanding, pd.max_outstanding);
    assert_true(c.params.hold_max_ms == pd.hold_max_ms);

    char path[] = "/tmp/test_sim_cost_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    adm_cost w = d;
    w.prefill_us_fixed = 7;
    w.decode_step_us_per_seq = 3.5;
    assert_int_equal(adm_cost_save(path, &w), 0);
    char err[256];
    assert_int_equal(adm_cost_load(path, &c.cost, err, sizeof(err)), 0);
    assert_memory_equal(&c.cost, &w, sizeof(w));
    unlink(path);

    /* The policy is created with the simulated cost, whatever params.cost says. */
    static const adm_ops spy = {
        .name = "spy", .create = spy_create, .destroy = spy_destroy, .decide = spy_decide};
    tiny_config(&c);
    c.policy = &spy;
    c.params.cost.prefill_us_fixed = 12345;
    lt_req q = {.t_ns = 0, .input_tokens = 8, .output_tokens = 2};
    sim_result r;
    memset(&seen_cost, 0, sizeof(seen_cost));
    assert_int_equal(sim_run(&c, &q, 1, &r, NULL, 0), 0);
    assert_memory_equal(&seen_cost, &c.cost, sizeof(c.cost));
    int64_t e2e = r.recs[0].e2e_ns;
    sim_result_free(&r);
    /* A router cost model of its own (--router-cost): the policy gets it,
     * the simulated steps keep c.cost (same times as above). */
    c.router_cost = c.cost;
    c.router_cost.decode_step_us_fixed = 777;
    c.router_cost_set = 1;
    memset(&seen_cost, 0, sizeof(seen_cost));
    assert_int_equal(sim_run(&c, &q, 1, &r, NULL, 0), 0);
    assert_memory_equal(&seen_cost, &c.router_cost, sizeof(c.router_cost));
    assert_int_equal(r.recs[0].e2e_ns, e2e);
    sim_result_free(&r);
}

/* The loads a policy sees are brought up to now (adm_fresh_load) between
 * heartbeats. Heartbeats every second, so the one at 0 is all the router
 * hears during this trace: A (32 + 3) at 0, B (16 + 2) at 500 us, C (8 + 2)
 * at 1400 us, D (8 + 2) at 8000 us, as in test_hand_computed_times for A
 * and B. At B, A is in prefill and on its way to the decode batch: 32
 * queued tokens, 1 sequence. At C, B's prefill runs and A's KV is still on
 * the wire (the router counts a prompt until its first token, 1520): 48
 * tokens, 2 sequences. At D (A and B ended at 5520; C, joined then, at
 * 7520): nothing, though the heartbeat at 0 saw none of them. A policy
 * that uses_remaining sees what each admitted request may still generate,
 * ascending (none has a token yet at B or C: 3, then 2 and 3); one that does
 * not gets nothing. */
typedef struct fresh_log {
    int n;
    uint64_t queued[8];
    uint32_t seqs[8];
    int rem_null[8];
    uint32_t n_rem[8], rem[8][2];
} fresh_log;
static fresh_log fl;

static void fresh_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    (void)ctx;
    if (fl.n < 8) {
        fl.queued[fl.n] = in->queued_prefill_tokens;
        fl.seqs[fl.n] = in->running_seqs + in->waiting_seqs;
        fl.rem_null[fl.n] = in->own_remaining == NULL;
        fl.n_rem[fl.n] = in->n_own_remaining;
        for (uint32_t k = 0; k < in->n_own_remaining && k < 2; k++)
            fl.rem[fl.n][k] = in->own_remaining[k];
    }
    fl.n++;
    *out = (adm_decision){.verdict = ADM_ADMIT};
}

static void test_fresh_loads_between_heartbeats(void **state)
{
    (void)state;
    static const adm_ops fresh_ops = {
        .name = "fresh", .create = spy_create, .destroy = spy_destroy, .decide = fresh_decide};
    sim_config c;
    tiny_config(&c);
    c.heartbeat_ns = 1000000000;
    c.policy = &fresh_ops;
    lt_req reqs[4] = {{.t_ns = 0, .input_tokens = 32, .output_tokens = 3},
                      {.t_ns = 500 * US, .input_tokens = 16, .output_tokens = 2},
                      {.t_ns = 1400 * US, .input_tokens = 8, .output_tokens = 2},
                      {.t_ns = 8000 * US, .input_tokens = 8, .output_tokens = 2}};
    memset(&fl, 0, sizeof(fl));
    sim_result r;
    assert_int_equal(sim_run(&c, reqs, 4, &r, NULL, 0), 0);
    assert_int_equal(fl.n, 4);
    assert_int_equal(fl.queued[0], 0);
    assert_int_equal(fl.seqs[0], 0);
    assert_int_equal(fl.queued[1], 32);
    assert_int_equal(fl.seqs[1], 1);
    assert_int_equal(fl.queued[2], 48);
    assert_int_equal(fl.seqs[2], 2);
    assert_int_equal(fl.queued[3], 0);
    assert_int_equal(fl.seqs[3], 0);
    assert_int_equal(r.recs[2].send_ns + r.recs[2].e2e_ns, 7520 * US);
    for (int k = 0; k < 4; k++) {
        assert_true(fl.rem_null[k]);
        assert_int_equal(fl.n_rem[k], 0);
    }
    sim_result_free(&r);

    static const adm_ops rem_ops = {.name = "fresh",
                                    .create = spy_create,
                                    .destroy = spy_destroy,
                                    .decide = fresh_decide,
                                    .uses_remaining = true};
    c.policy = &rem_ops;
    memset(&fl, 0, sizeof(fl));
    assert_int_equal(sim_run(&c, reqs, 4, &r, NULL, 0), 0);
    assert_int_equal(fl.n, 4);
    assert_int_equal(fl.n_rem[0], 0);
    assert_int_equal(fl.n_rem[1], 1);
    assert_int_equal(fl.rem[1][0], 3);
    assert_int_equal(fl.n_rem[2], 2);
    assert_int_equal(fl.rem[2][0], 2);
    assert_int_equal(fl.rem[2][1], 3);
    assert_int_equal(fl.n_rem[3], 0);
    sim_result_free(&r);
}

/* A scripted policy that holds: decide admits when nothing is outstanding or
 * held, else holds for 10 ms (2 ms for a 1-token output); recheck admits once
 * nothing is outstanding. Every call is logged to check when the simulator
 * rechecks and what it passes, against rt__adm_input / rt_admission_pass. */
typedef struct hold_log {
    int n_decide, n_recheck, n_first, n_end;
    int64_t recheck_t[64];
    uint32_t recheck_held[64];
    int64_t recheck_until[64];
    uint64_t decide_inflight_prefill[8];
    uint32_t decide_block_size[8];
    int64_t first_t[8], first_ttft[8], first_admitted[8], end_t[8], end_decode[8];
    double first_pred[8], end_pred[8];
    uint32_t end_tokens[8];
} hold_log;
static hold_log hl;

static void hold_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    (void)ctx;
    hl.decide_inflight_prefill[hl.n_decide] = in->inflight_prefill_tokens;
    hl.decide_block_size[hl.n_decide] = in->block_size;
    hl.n_decide++;
    if (in->outstanding == 0 && in->held == 0) {
        *out = (adm_decision){.verdict = ADM_ADMIT, .pred = {.ttft_us = 1, .tpot_us = 2}};
        return;
    }
    int64_t hold = in->max_tokens == 1 ? 2000 * US : 10000 * US;
    *out = (adm_decision){.verdict = ADM_HOLD, .hold_until_ns = in->now_ns + hold, .reason = "h"};
}
static void hold_recheck(void *ctx, const adm_input *in, adm_decision *out)
{
    (void)ctx;
    if (hl.n_recheck < 64) {
        hl.recheck_t[hl.n_recheck] = in->now_ns;
        hl.recheck_held[hl.n_recheck] = in->held;
        hl.recheck_until[hl.n_recheck] = in->hold_until_ns;
    }
    hl.n_recheck++;
    *out = in->outstanding == 0
               ? (adm_decision){.verdict = ADM_ADMIT, .pred = {.ttft_us = 3, .tpot_us = 4}}
               : (adm_decision){.verdict = ADM_HOLD, .retry_after_s = 3, .reason = "h"};
}
static void hold_first(void *ctx, int64_t now, int64_t ttft, int64_t admitted, const adm_pred *pred)
{
    (void)ctx;
    hl.first_t[hl.n_first] = now;
    hl.first_admitted[hl.n_first] = admitted;
    hl.first_pred[hl.n_first] = pred->ttft_us;
    hl.first_ttft[hl.n_first++] = ttft;
}
static void hold_end(void *ctx, int64_t now, uint32_t n_tokens, int64_t decode_ns,
                     const adm_pred *pred)
{
    (void)ctx;
    hl.end_pred[hl.n_end] = pred->tpot_us;
    hl.end_tokens[hl.n_end] = n_tokens;
    hl.end_decode[hl.n_end] = decode_ns;
    hl.end_t[hl.n_end++] = now;
}
static const adm_ops hold_ops = {.name = "hold",
                                 .create = spy_create,
                                 .destroy = spy_destroy,
                                 .decide = hold_decide,
                                 .recheck = hold_recheck,
                                 .on_first_token = hold_first,
                                 .on_end = hold_end};

/* A (32 + 3) at 0 is admitted and runs as in test_hand_computed_times: first
 * token 1520, end 5520 us. B (16 + 2) at 500 and C (8 + 1) at 600 are held
 * (deadlines 10500 and 2600).
 *   2600: C's deadline: a pass; B stays (outstanding 1), C is past its
 *         deadline: 429 with the policy's Retry-After, e2e 2000.
 *   5520: A ends: a pass admits B. Prefill [5520, 6680], transfer 1 block
 *         until 6780, the idle decode worker joins it: first token at 6780
 *         (TTFT 6280, hold time included), decode step until 8780 (e2e 8280).
 * With no tick: rechecks (2600, B), (2600, C), (5520, B). */
static void test_hold_queue_hand_computed(void **state)
{
    (void)state;
    sim_config c;
    tiny_config(&c);
    c.tick_ns = 0;
    c.policy = &hold_ops;
    lt_req reqs[3] = {{.t_ns = 0, .input_tokens = 32, .output_tokens = 3},
                      {.t_ns = 500 * US, .input_tokens = 16, .output_tokens = 2},
                      {.t_ns = 600 * US, .input_tokens = 8, .output_tokens = 1}};
    memset(&hl, 0, sizeof(hl));
    sim_result r;
    assert_int_equal(sim_run(&c, reqs, 3, &r, NULL, 0), 0);
    assert_int_equal(r.recs[0].e2e_ns, 5520 * US);
    assert_int_equal(r.recs[1].outcome, LT_OK);
    assert_int_equal(r.recs[1].ttft_ns, 6280 * US);
    assert_int_equal(r.recs[1].e2e_ns, 8280 * US);
    assert_int_equal(r.recs[2].outcome, LT_REJECTED);
    assert_int_equal(r.recs[2].http_status, 429);
    assert_int_equal(r.recs[2].e2e_ns, 2000 * US);
    assert_non_null(strstr(r.recs[2].error, "held past its deadline (Retry-After 3)"));
    assert_int_equal(hl.n_recheck, 3);
    assert_int_equal(hl.recheck_t[0], 2600 * US);
    assert_int_equal(hl.recheck_held[0], 1); /* C, B itself excluded */
    assert_int_equal(hl.recheck_until[0], 10500 * US);
    assert_int_equal(hl.recheck_t[1], 2600 * US);
    assert_int_equal(hl.recheck_until[1], 2600 * US);
    assert_int_equal(hl.recheck_t[2], 5520 * US);
    assert_int_equal(hl.recheck_held[2], 0);
    /* The router's own in-flight prefill: A's prompt until its first token. */
    assert_int_equal(hl.n_decide, 3);
    assert_int_equal(hl.decide_inflight_prefill[0], 0);
    assert_int_equal(hl.decide_inflight_prefill[1], 32);
    assert_int_equal(hl.decide_inflight_prefill[2], 32);
    assert_int_equal(hl.decide_block_size[0], 16);
    /* Feedback: first tokens and ends, with TTFT from the arrival. */
    assert_int_equal(hl.n_first, 2);
    assert_int_equal(hl.first_t[0], 1520 * US);
    assert_int_equal(hl.first_ttft[1], 6280 * US);
    /* ... the time each was admitted (B after its hold) and what the
     * admitting decision predicted, handed back */
    assert_int_equal(hl.first_admitted[0], 0);
    assert_int_equal(hl.first_admitted[1], 5520 * US);
    assert_true(hl.first_pred[0] == 1 && hl.first_pred[1] == 3);
    assert_true(hl.end_pred[0] == 2 && hl.end_pred[1] == 4);
    assert_int_equal(hl.n_end, 2);
    assert_int_equal(hl.end_t[0], 5520 * US);
    assert_int_equal(hl.end_t[1], 8780 * US);
    /* ... each end with its tokens and first-to-last-token time */
    assert_int_equal(hl.end_tokens[0], 3);
    assert_int_equal(hl.end_decode[0], (5520 - 1520) * US);
    assert_int_equal(hl.end_tokens[1], 2);
    assert_int_equal(hl.end_decode[1], (8780 - 6780) * US);
    assert_int_equal(r.stats.held, 2);
    assert_int_equal(r.stats.admitted_after_hold, 1);
    assert_int_equal(r.stats.hold_timeouts, 1);
    assert_int_equal(r.stats.rejected_after_hold, 0);
    assert_int_equal(r.stats.hold_passes, 2);
    assert_int_equal(r.stats.leaked_blocks, 0);
    sim_result_free(&r);

    /* The router's 1 ms tick (scaled down from 100 ms) adds a pass at every
     * tick while something is held: 1000, 2000, 3000, 4000, 5000. */
    c.tick_ns = 1000 * US;
    memset(&hl, 0, sizeof(hl));
    assert_int_equal(sim_run(&c, reqs, 3, &r, NULL, 0), 0);
    assert_int_equal(r.stats.hold_passes, 7);
    assert_int_equal(hl.n_recheck, 2 + 2 + 2 + 3 + 1);
    assert_int_equal(hl.recheck_t[0], 1000 * US);
    assert_int_equal(hl.recheck_t[9], 5520 * US);
    assert_int_equal(r.recs[1].ttft_ns, 6280 * US); /* same outcome */
    assert_int_equal(r.recs[2].e2e_ns, 2000 * US);
    sim_result_free(&r);

    /* Heartbeats every 1 ms, no tick: the same passes at the heartbeats. */
    c.tick_ns = 0;
    c.heartbeat_ns = 1000 * US;
    memset(&hl, 0, sizeof(hl));
    assert_int_equal(sim_run(&c, reqs, 3, &r, NULL, 0), 0);
    assert_int_equal(r.stats.hold_passes, 7);
    assert_int_equal(hl.recheck_t[0], 1000 * US);
    sim_result_free(&r);
}

/* The real burst policy through the simulator under a burst: every held
 * request ends admitted or with a 429, nothing is left pending, pools are
 * empty, and two runs agree. */
static void test_burst_policy_holds(void **state)
{
    (void)state;
    sim_config c;
    tiny_config(&c);
    c.heartbeat_ns = 100 * 1000 * US;
    c.admission = "burst";
    /* Decode steps grow with the batch (2 ms + 0.5 ms per sequence): the
     * burst's batch goes over the TPOT SLO while TTFT has slack to hold. */
    c.cost.decode_step_us_per_seq = 500;
    c.params.slo_ttft_ms = 1000;
    c.params.slo_tpot_ms = 10;
    c.params.hold_max_ms = 500;
    enum { N = 300 };
    lt_req *reqs = calloc(N, sizeof(*reqs));
    assert_non_null(reqs);
    for (int i = 0; i < N; i++) {
        /* 1 req/s for 100 s, then 200 at once within 0.2 s */
        reqs[i].t_ns = i < 100 ? (int64_t)i * TD_NS_PER_S
                               : 100 * TD_NS_PER_S + (int64_t)(i - 100) * TD_NS_PER_MS;
        reqs[i].input_tokens = 64 + (i % 7) * 16;
        reqs[i].output_tokens = 8 + (i % 5) * 4;
    }
    sim_result r1, r2;
    char err[256];
    assert_int_equal(sim_run(&c, reqs, N, &r1, err, sizeof(err)), 0);
    assert_int_equal(sim_run(&c, reqs, N, &r2, err, sizeof(err)), 0);
    size_t ok = 0, rej = 0;
    for (int i = 0; i < N; i++) {
        assert_int_not_equal(r1.recs[i].outcome, LT_PENDING);
        ok += r1.recs[i].outcome == LT_OK;
        rej += r1.recs[i].outcome == LT_REJECTED;
        assert_int_equal(r1.recs[i].ttft_ns, r2.recs[i].ttft_ns);
        assert_int_equal(r1.recs[i].outcome, r2.recs[i].outcome);
    }
    assert_int_equal(ok + rej, N);
    assert_true(rej > 0);
    assert_true(r1.stats.held > 0);
    assert_int_equal(r1.stats.held, r1.stats.admitted_after_hold + r1.stats.rejected_after_hold +
                                        r1.stats.hold_timeouts);
    assert_int_equal(r1.stats.leaked_blocks, 0);
    sim_result_free(&r1);
    sim_result_free(&r2);
    free(reqs);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand_computed_times),
        cmocka_unit_test(test_colocated_slowdown),
        cmocka_unit_test(test_one_token_output),
        cmocka_unit_test(test_host_two_speeds),
        cmocka_unit_test(test_admission_changes_rejections),
        cmocka_unit_test(test_retry_ttft_seen_by_policy),
        cmocka_unit_test(test_pressure_determinism_and_no_leaks),
        cmocka_unit_test(test_summary_fields),
        cmocka_unit_test(test_step_cost),
        cmocka_unit_test(test_one_cost_model),
        cmocka_unit_test(test_hold_queue_hand_computed),
        cmocka_unit_test(test_fresh_loads_between_heartbeats),
        cmocka_unit_test(test_burst_policy_holds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
