/* Unit tests for loadtest/sim: event times computed by hand on a tiny trace,
 * admission changing rejections, determinism, the report's fields, block
 * pools empty at the end under pressure, the cost model and its file. */
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

    /* An unknown policy or bad parameters fail before anything runs. */
    char err[256];
    c.admission = "no_such_policy";
    assert_int_equal(sim_run(&c, reqs, 3, &r, err, sizeof(err)), TD_EINVAL);
    assert_non_null(strstr(err, "no_such_policy"));
    c.admission = "max_outstanding";
    c.params.max_outstanding = 0;
    assert_int_equal(sim_run(&c, reqs, 3, &r, err, sizeof(err)), TD_EINVAL);
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
}

static void test_cost_file(void **state)
{
    (void)state;
    char path[] = "/tmp/test_sim_cost_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "# measured\nprefill_us_fixed = 7\ndecode_step_us_per_seq = 3.5\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    adm_cost c;
    sim_cost_defaults(&c);
    double keep = c.transfer_us_per_block;
    char err[256];
    assert_int_equal(sim_cost_load(path, &c, err, sizeof(err)), 0);
    assert_true(c.prefill_us_fixed == 7);
    assert_true(c.decode_step_us_per_seq == 3.5);
    assert_true(c.transfer_us_per_block == keep);
    /* An unknown key is an error naming it, and c is left alone. */
    FILE *fp = fopen(path, "w");
    fputs("prefill_us_fixd = 1\n", fp);
    fclose(fp);
    assert_int_not_equal(sim_cost_load(path, &c, err, sizeof(err)), 0);
    assert_non_null(strstr(err, "prefill_us_fixd"));
    assert_true(c.prefill_us_fixed == 7);
    unlink(path);
    assert_int_not_equal(sim_cost_load("/nonexistent/cost", &c, err, sizeof(err)), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand_computed_times),
        cmocka_unit_test(test_one_token_output),
        cmocka_unit_test(test_admission_changes_rejections),
        cmocka_unit_test(test_pressure_determinism_and_no_leaks),
        cmocka_unit_test(test_summary_fields),
        cmocka_unit_test(test_step_cost),
        cmocka_unit_test(test_cost_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
