/* Unit tests for loadtest/lt_report: goodput and percentile arithmetic on
 * hand-made records, report files, plots, compare. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "loadtest/lt_report.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MS TD_NS_PER_MS

static int64_t chunks_a[4] = {100 * MS, 120 * MS, 140 * MS, 160 * MS};
static int64_t chunks_b[3] = {300 * MS, 400 * MS, 500 * MS};
static int64_t chunks_c[1] = {50 * MS};

/* Four hand-made records:
 *  a: ok, TTFT 100 ms, 4 tokens, e2e 160 ms -> TPOT 20 ms      (good)
 *  b: ok, TTFT 300 ms, 3 tokens, e2e 500 ms -> TPOT 100 ms     (TTFT and TPOT miss)
 *  c: ok, TTFT 50 ms, 1 token, e2e 50 ms    -> TPOT 0          (good)
 *  d: 429 rejected
 *  e: error (timeout) */
static void make_records(lt_record r[5])
{
    memset(r, 0, 5 * sizeof(lt_record));
    r[0] = (lt_record){.sched_ns = 0,
                       .send_ns = 1 * MS,
                       .ttft_ns = 100 * MS,
                       .e2e_ns = 160 * MS,
                       .input_tokens = 10,
                       .max_tokens = 4,
                       .output_tokens = 4,
                       .n_chunks = 4,
                       .chunk_ns = chunks_a,
                       .chunk_cap = 4,
                       .http_status = 200,
                       .outcome = LT_OK};
    r[1] = (lt_record){.sched_ns = 1000 * MS,
                       .send_ns = 1003 * MS,
                       .ttft_ns = 300 * MS,
                       .e2e_ns = 500 * MS,
                       .input_tokens = 20,
                       .max_tokens = 3,
                       .output_tokens = 3,
                       .n_chunks = 3,
                       .chunk_ns = chunks_b,
                       .chunk_cap = 3,
                       .http_status = 200,
                       .outcome = LT_OK};
    r[2] = (lt_record){.sched_ns = 2000 * MS,
                       .send_ns = 2000 * MS,
                       .ttft_ns = 50 * MS,
                       .e2e_ns = 50 * MS,
                       .input_tokens = 30,
                       .max_tokens = 1,
                       .output_tokens = 1,
                       .n_chunks = 1,
                       .chunk_ns = chunks_c,
                       .chunk_cap = 1,
                       .http_status = 200,
                       .outcome = LT_OK};
    r[3] = (lt_record){.sched_ns = 3000 * MS,
                       .send_ns = 3002 * MS,
                       .ttft_ns = -1,
                       .e2e_ns = 1 * MS,
                       .http_status = 429,
                       .outcome = LT_REJECTED};
    snprintf(r[3].error, sizeof(r[3].error), "HTTP 429");
    r[4] = (lt_record){.sched_ns = 3500 * MS,
                       .send_ns = 3500 * MS,
                       .ttft_ns = -1,
                       .e2e_ns = 500 * MS,
                       .outcome = LT_ERROR};
    snprintf(r[4].error, sizeof(r[4].error), "timeout");
}

static void test_goodput_arithmetic(void **state)
{
    (void)state;
    lt_record r[5];
    make_records(r);
    assert_true(fabs(lt_record_tpot_ms(&r[0]) - 20.0) < 1e-9);
    assert_true(fabs(lt_record_tpot_ms(&r[1]) - 100.0) < 1e-9);
    assert_true(lt_record_tpot_ms(&r[2]) == 0);

    lt_slo slo = {.ttft_ms = 200, .tpot_ms = 50};
    lt_summary s;
    assert_int_equal(lt_summary_compute(r, 5, &slo, &s), 0);
    assert_int_equal(s.requests, 5);
    assert_int_equal(s.ok, 3);
    assert_int_equal(s.rejected, 1);
    assert_int_equal(s.errors, 1);
    assert_int_equal(s.good, 2);
    /* Last completion: e at 3500 + 500 = 4000 ms. */
    assert_true(fabs(s.duration_s - 4.0) < 1e-9);
    assert_true(fabs(s.goodput_req_per_s - 0.5) < 1e-9);
    assert_true(fabs(s.req_per_s - 0.75) < 1e-9);
    assert_int_equal(s.output_tokens, 8);
    assert_true(fabs(s.out_tok_per_s - 2.0) < 1e-9);
    /* TTFT {50,100,300}: nearest-rank p50 = 100, p99 = 300. */
    assert_int_equal(s.ttft.n, 3);
    assert_true(s.ttft.p50 == 100 && s.ttft.p99 == 300 && s.ttft.max == 300);
    assert_true(fabs(s.ttft.mean - 150) < 1e-9);
    /* ITL: a: 20,20,20; b: 100,100 -> 5 gaps; p50 = 20, p90 = 100. */
    assert_int_equal(s.itl.n, 5);
    assert_true(s.itl.p50 == 20 && s.itl.p90 == 100);
    /* TPOT only where output_tokens > 1: {20, 100}. */
    assert_int_equal(s.tpot.n, 2);
    /* Lateness {1,3,0,2,0} ms over every sent request. */
    assert_int_equal(s.lateness.n, 5);
    assert_true(s.lateness.max == 3 && s.lateness.p50 == 1);

    /* Tighter TTFT SLO drops a; no SLO keeps all ok requests. */
    slo = (lt_slo){.ttft_ms = 60, .tpot_ms = 0};
    assert_int_equal(lt_summary_compute(r, 5, &slo, &s), 0);
    assert_int_equal(s.good, 1);
    slo = (lt_slo){0};
    assert_int_equal(lt_summary_compute(r, 5, &slo, &s), 0);
    assert_int_equal(s.good, 3);
    /* Boundary: TTFT exactly at the SLO counts. */
    slo = (lt_slo){.ttft_ms = 100, .tpot_ms = 20};
    assert_true(lt_record_is_good(&r[0], &slo));
    assert_false(lt_record_is_good(&r[3], &slo));

    assert_int_equal(lt_summary_compute(NULL, 0, &slo, &s), 0);
    assert_int_equal(s.requests, 0);
    assert_true(s.duration_s == 0 && s.goodput_req_per_s == 0);
}

static char *slurp(const char *path)
{
    FILE *fp = fopen(path, "r");
    if (!fp) return NULL;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof(buf) - 1, fp);
    buf[n] = '\0';
    fclose(fp);
    return buf;
}

/* Distinct failure reasons, in order of first appearance, with counts. */
/* Client retries: a request sent twice (its first answer a 429) counts as
 * ok with retries and as rejected without; a request rejected after its
 * retries is rejected both ways; the others are the same both ways. */
static void test_goodput_with_and_without_retries(void **state)
{
    (void)state;
    lt_record r[5];
    make_records(r);
    for (int i = 0; i < 5; i++)
        r[i].attempts = 1;
    r[0].attempts = 2; /* a: good after one retry */
    r[3].attempts = 3; /* d: 429 three times */
    lt_slo slo = {.ttft_ms = 200, .tpot_ms = 50};
    lt_summary s;
    assert_int_equal(lt_summary_compute(r, 5, &slo, &s), 0);
    assert_int_equal(s.ok, 3);
    assert_int_equal(s.good, 2);
    assert_int_equal(s.rejected, 1);
    assert_int_equal(s.retried, 2);
    assert_int_equal(s.retries, 3);
    assert_int_equal(s.no_retry.ok, 2);
    assert_int_equal(s.no_retry.good, 1);
    assert_int_equal(s.no_retry.rejected, 2);
    assert_true(fabs(s.no_retry.goodput_req_per_s - 1.0 / s.duration_s) < 1e-9);
    /* A rejected request is never good, whatever its times say. */
    r[3].ttft_ns = 1 * MS;
    assert_int_equal(lt_record_is_good(&r[3], &slo), 0);
}

static void test_reasons(void **state)
{
    (void)state;
    lt_record r[8];
    memset(r, 0, sizeof(r));
    const char *errs[8] = {NULL,
                           "connect: connection refused",
                           "HTTP 500",
                           "connect: "
                           "connection refused",
                           NULL,
                           "timeout",
                           "HTTP 500",
                           ""};
    enum lt_outcome oc[8] = {LT_OK, LT_ERROR, LT_ERROR, LT_ERROR,
                             LT_OK, LT_ERROR, LT_ERROR, LT_REJECTED};
    for (int i = 0; i < 8; i++) {
        r[i].outcome = oc[i];
        if (errs[i]) snprintf(r[i].error, sizeof(r[i].error), "%s", errs[i]);
    }
    lt_reason why[4];
    assert_int_equal(lt_report_reasons(r, 8, why, 4), 4);
    assert_string_equal(why[0].error, "connect: connection refused");
    assert_int_equal(why[0].count, 2);
    assert_string_equal(why[1].error, "HTTP 500");
    assert_int_equal(why[1].count, 2);
    assert_string_equal(why[2].error, "timeout");
    assert_int_equal(why[2].count, 1);
    /* no text: the outcome's name */
    assert_string_equal(why[3].error, "rejected");
    assert_int_equal(why[3].outcome, LT_REJECTED);
    /* at most max; later reasons are left out, known ones still counted */
    assert_int_equal(lt_report_reasons(r, 8, why, 1), 1);
    assert_int_equal(why[0].count, 2);
    assert_int_equal(lt_report_reasons(r, 1, why, 4), 0); /* all ok */
    assert_int_equal(lt_report_reasons(NULL, 0, why, 4), 0);
}

static void test_report_files_plot_compare(void **state)
{
    (void)state;
    lt_record r[5];
    make_records(r);
    lt_slo slo = {.ttft_ms = 200, .tpot_ms = 50};
    lt_summary s;
    assert_int_equal(lt_summary_compute(r, 5, &slo, &s), 0);
    char dir[] = "/tmp/lt_report_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char a[256], b[256], path[320], err[256];
    snprintf(a, sizeof(a), "%s/a", dir);
    snprintf(b, sizeof(b), "%s/b/nested", dir);
    assert_int_equal(lt_report_write(a, r, 5, &s, NULL, err, sizeof(err)), 0);
    snprintf(path, sizeof(path), "%s/summary.json", a);
    char *text = slurp(path);
    assert_non_null(text);
    assert_non_null(strstr(text, "\"goodput\""));
    assert_non_null(strstr(text, "\"lateness_ms\""));
    snprintf(path, sizeof(path), "%s/requests.csv", a);
    text = slurp(path);
    assert_non_null(text);
    assert_non_null(strstr(text, "rejected,0,\"HTTP 429\""));
    assert_non_null(
        strstr(text, "\n0,0.000,1.000,1.000,100.000,20.000,160.000,10,4,4,4,200,ok,1,"));

    /* B: one more good request by loosening nothing but removing the error. */
    r[4].outcome = LT_OK;
    r[4].ttft_ns = 10 * MS;
    r[4].output_tokens = 1;
    lt_summary s2;
    assert_int_equal(lt_summary_compute(r, 5, &slo, &s2), 0);
    assert_int_equal(lt_report_write(b, r, 5, &s2, NULL, err, sizeof(err)), 0);

    char cmp[8192];
    FILE *fp = fmemopen(cmp, sizeof(cmp), "w");
    assert_int_equal(lt_report_compare(a, b, fp, err, sizeof(err)), 0);
    fclose(fp);
    assert_non_null(strstr(cmp, "goodput.req_per_s"));
    assert_non_null(strstr(cmp, "slo.ttft_ms")); /* the SLO printed with the goodput */
    assert_non_null(strstr(cmp, "client_retries.without_retries.goodput_req_per_s"));
    assert_non_null(strstr(cmp, "+50.0%")); /* good 2 -> 3 over the same 4 s */
    fp = fmemopen(cmp, sizeof(cmp), "w");
    assert_int_equal(lt_report_compare(a, "/nonexistent", fp, err, sizeof(err)), TD_ENOENT);
    fclose(fp);

    int prc = lt_report_plot(a, &slo);
    if (prc == TD_ENOENT) {
        print_message("gnuplot not found: plots not checked\n");
    } else {
        assert_int_equal(prc, 0);
        struct stat st;
        const char *pngs[] = {"rate_goodput.png", "ttft.png", "latency_cdf.png"};
        for (int i = 0; i < 3; i++) {
            snprintf(path, sizeof(path), "%s/%s", a, pngs[i]);
            assert_int_equal(stat(path, &st), 0);
            assert_true(st.st_size > 1000);
        }
    }
    char cmd[400];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_goodput_arithmetic),
        cmocka_unit_test(test_goodput_with_and_without_retries),
        cmocka_unit_test(test_reasons),
        cmocka_unit_test(test_report_files_plot_compare),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
