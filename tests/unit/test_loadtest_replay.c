/* Unit tests for loadtest/lt_replay against the small SSE server of
 * tests/integration/lt_sse_server.c on 127.0.0.1: request bodies, SSE
 * parsing, 429, stalls and mid-stream closes recorded as errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "loadtest/lt_replay.h"
#include "tests/integration/lt_sse_server.h"
#include "watchdog.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void test_url_parse(void **state)
{
    (void)state;
    lt_url u;
    assert_int_equal(lt_url_parse("http://127.0.0.1:8000", &u), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 8000);
    assert_string_equal(u.path, "/v1/completions");
    assert_true(lt_url_is_loopback(&u));
    assert_int_equal(lt_url_parse("http://[::1]:9/v1/chat/completions", &u), 0);
    assert_string_equal(u.host, "::1");
    assert_string_equal(u.path, "/v1/chat/completions");
    assert_true(lt_url_is_loopback(&u));
    assert_int_equal(lt_url_parse("http://example.com/", &u), 0);
    assert_int_equal(u.port, 80);
    assert_false(lt_url_is_loopback(&u));
    assert_int_equal(lt_url_parse("https://127.0.0.1:1", &u), TD_EINVAL);
    assert_int_equal(lt_url_parse("http://:80", &u), TD_EINVAL);
    assert_int_equal(lt_url_parse("http://127.0.0.1:0", &u), TD_EINVAL);
    assert_int_equal(lt_url_parse("http://127.0.0.1:65536", &u), TD_EINVAL);
    assert_int_equal(lt_url_parse("http://127.0.0.1:80/a b", &u), TD_EINVAL);
    assert_int_equal(lt_url_parse("http://127.0.0.1x80", &u), 0); /* a host name */
    assert_int_equal(lt_url_parse(NULL, &u), TD_EINVAL);
}

struct fixture {
    lt_sse_server *srv;
    lt_prompt *prompt;
    lt_replay_opts o;
    lt_req reqs[128];
    lt_run run;
};

static void setup_run_held(struct fixture *f, enum lt_sse_mode mode, int tokens, size_t n,
                           int64_t gap_ns, int64_t hold_ns)
{
    memset(f, 0, sizeof(*f));
    assert_int_equal(lt_sse_server_start_held(mode, tokens, hold_ns, &f->srv), 0);
    assert_int_equal(lt_prompt_create_ids(100, 64, &f->prompt), 0);
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", lt_sse_server_port(f->srv));
    assert_int_equal(lt_url_parse(url, &f->o.url), 0);
    f->o.model = "tiny \"m\"";
    f->o.prompt = f->prompt;
    f->o.timeout_ns = 5 * TD_NS_PER_S;
    f->o.warm_conns = 2;
    for (size_t i = 0; i < n; i++)
        f->reqs[i] = (lt_req){
            .t_ns = (int64_t)i * gap_ns, .input_tokens = 3 + (int32_t)i, .output_tokens = 4};
}

static void setup_run(struct fixture *f, enum lt_sse_mode mode, int tokens, size_t n,
                      int64_t gap_ns)
{
    setup_run_held(f, mode, tokens, n, gap_ns, 0);
}

static void teardown_run(struct fixture *f)
{
    lt_run_free(&f->run);
    lt_sse_server_stop(f->srv);
    lt_prompt_free(f->prompt);
}

static void test_replay_ok(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_OK, 4, 20, 2 * TD_NS_PER_MS);
    char err[256] = "";
    int64_t t0 = td_now_ns();
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 20, &f.run, err, sizeof(err)), 0);
    assert_true(td_now_ns() - t0 < 3 * TD_NS_PER_S);
    assert_int_equal(f.run.n, 20);
    assert_int_equal(lt_sse_server_requests(f.srv), 20);
    for (size_t i = 0; i < 20; i++) {
        const lt_record *r = &f.run.recs[i];
        assert_int_equal(r->outcome, LT_OK);
        assert_int_equal(r->http_status, 200);
        assert_int_equal(r->n_chunks, 4);
        assert_int_equal(r->output_tokens, 4); /* from usage */
        assert_true(r->send_ns >= r->sched_ns);
        assert_true(r->ttft_ns > 0 && r->e2e_ns >= r->ttft_ns);
        assert_true(r->chunk_ns[3] >= r->chunk_ns[0]);
        assert_int_equal(r->sched_ns, (int64_t)i * 2 * TD_NS_PER_MS);
    }
    char body[4096];
    lt_sse_server_last_body(f.srv, body, sizeof(body));
    /* The last request (19 = 0x13): 22 prompt tokens as an id array, head
     * digits 3, 1 first. */
    assert_non_null(strstr(body, "{\"model\":\"tiny \\\"m\\\"\",\"prompt\":[103,101,100,"));
    assert_non_null(strstr(body, ",100],\"max_tokens\":4,\"ignore_eos\":true,\"stream\":true"));
    int ids = 0;
    for (char *p = strstr(body, "[103"); p && *p != ']'; p++)
        ids += *p == ',';
    assert_int_equal(ids + 1, 22);
    assert_true(f.run.conns_opened >= 2);

    lt_slo slo = {.ttft_ms = 1000, .tpot_ms = 1000};
    lt_summary s;
    assert_int_equal(lt_summary_compute(f.run.recs, f.run.n, &slo, &s), 0);
    assert_int_equal(s.ok, 20);
    assert_int_equal(s.good, 20);
    assert_int_equal(s.itl.n, 60);
    teardown_run(&f);
}

/* Responses cut in 37-byte slices a millisecond apart: chunk sizes, SSE lines
 * and JSON straddle reads. */
static void test_replay_trickled_stream(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_TRICKLE, 4, 6, 5 * TD_NS_PER_MS);
    char err[256];
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 6, &f.run, err, sizeof(err)), 0);
    for (size_t i = 0; i < 6; i++) {
        const lt_record *r = &f.run.recs[i];
        if (r->outcome != LT_OK) print_message("request %zu: %s\n", i, r->error);
        assert_int_equal(r->outcome, LT_OK);
        assert_int_equal(r->n_chunks, 4);
        assert_int_equal(r->output_tokens, 4);
        /* The server needs about 17 slices, one per ms, so the last byte cannot
         * arrive before ~16 ms (reads may coalesce slices under load, so the
         * gaps between tokens are only checked for order). */
        for (int k = 1; k < 4; k++)
            assert_true(r->chunk_ns[k] >= r->chunk_ns[k - 1]);
        assert_true(r->e2e_ns >= 10 * TD_NS_PER_MS);
        assert_true(r->e2e_ns >= r->chunk_ns[3]);
    }
    teardown_run(&f);
}

static void test_replay_queue_when_pool_full(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_OK, 0, 30, 0); /* all at t = 0; tokens follow max_tokens */
    f.o.max_conns = 2;
    for (int i = 0; i < 30; i++)
        f.reqs[i].output_tokens = 1 + i % 5;
    char err[256];
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 30, &f.run, err, sizeof(err)), 0);
    for (size_t i = 0; i < 30; i++) {
        assert_int_equal(f.run.recs[i].outcome, LT_OK);
        assert_int_equal(f.run.recs[i].n_chunks, 1 + (int)i % 5);
    }
    assert_int_equal(f.run.conns_opened, 2);
    teardown_run(&f);
}

static void test_replay_rejected(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_REJECT, 4, 5, TD_NS_PER_MS);
    char err[256];
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 5, &f.run, err, sizeof(err)), 0);
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(f.run.recs[i].outcome, LT_REJECTED);
        assert_int_equal(f.run.recs[i].http_status, 429);
        assert_non_null(strstr(f.run.recs[i].error, "HTTP 429: {\"error\""));
    }
    teardown_run(&f);
}

/* --retry-429 1 against a server that rejects its first 5 requests with
 * Retry-After: 1: the 3 first attempts get 429s, the 3 retries go out a
 * second later, 2 more 429s (final: rejected after 2 attempts) and one ok.
 * Times count from the first send, so the retried request's TTFT includes
 * the wait. */
static void test_replay_retry_429(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_OK, 4, 3, TD_NS_PER_MS);
    lt_sse_server_reject_first(f.srv, 5);
    f.o.retry_429 = 1;
    char err[256] = "";
    watchdog_arm(20, "replay with --retry-429 (retry never sent?)");
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 3, &f.run, err, sizeof(err)), 0);
    watchdog_disarm();
    assert_int_equal(lt_sse_server_requests(f.srv), 6);
    size_t ok = 0, rejected = 0;
    for (size_t i = 0; i < 3; i++) {
        const lt_record *r = &f.run.recs[i];
        assert_int_equal(r->attempts, 2);
        assert_true(r->e2e_ns >= 900 * TD_NS_PER_MS);
        if (r->outcome == LT_OK) {
            ok++;
            assert_int_equal(r->http_status, 200);
            assert_true(r->ttft_ns >= 900 * TD_NS_PER_MS);
            assert_int_equal(r->n_chunks, 4);
        } else {
            rejected++;
            assert_int_equal(r->outcome, LT_REJECTED);
            assert_int_equal(r->http_status, 429);
        }
    }
    assert_int_equal(ok, 1);
    assert_int_equal(rejected, 2);
    lt_slo slo = {.ttft_ms = 0, .tpot_ms = 0};
    lt_summary s;
    assert_int_equal(lt_summary_compute(f.run.recs, f.run.n, &slo, &s), 0);
    assert_int_equal(s.ok, 1);
    assert_int_equal(s.good, 1);
    assert_int_equal(s.retried, 3);
    assert_int_equal(s.retries, 3);
    assert_int_equal(s.no_retry.ok, 0);
    assert_int_equal(s.no_retry.rejected, 3);
    assert_int_equal(s.no_retry.good, 0);
    teardown_run(&f);
}

static void test_replay_stall_is_timeout_error(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_STALL, 4, 3, TD_NS_PER_MS);
    f.o.timeout_ns = 200 * TD_NS_PER_MS;
    char err[256];
    /* The server never finishes: only the timeout ends the run. */
    watchdog_arm(10, "replay of a stalling server with a 200 ms timeout (timeout ignored?)");
    int64_t t0 = td_now_ns();
    int rc = lt_replay_run(&f.o, f.reqs, 3, &f.run, err, sizeof(err));
    int64_t took = td_now_ns() - t0;
    watchdog_disarm();
    assert_int_equal(rc, 0);
    assert_true(took >= 200 * TD_NS_PER_MS && took < 2 * TD_NS_PER_S);
    for (size_t i = 0; i < 3; i++) {
        const lt_record *r = &f.run.recs[i];
        assert_int_equal(r->outcome, LT_ERROR);
        assert_non_null(strstr(r->error, "timeout"));
        assert_int_equal(r->n_chunks, 1);
        assert_true(r->ttft_ns >= 0);
        assert_true(r->e2e_ns >= 199 * TD_NS_PER_MS); /* libuv timers tick in ms */
    }
    teardown_run(&f);
}

static void test_replay_close_mid_stream_is_error(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_CLOSE, 4, 4, TD_NS_PER_MS);
    char err[256];
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 4, &f.run, err, sizeof(err)), 0);
    for (size_t i = 0; i < 4; i++) {
        const lt_record *r = &f.run.recs[i];
        assert_int_equal(r->outcome, LT_ERROR);
        assert_non_null(strstr(r->error, "closed mid-stream"));
        assert_int_equal(r->n_chunks, 1);
    }
    teardown_run(&f);
}

static void test_replay_missing_done_is_error(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_NO_DONE, 4, 2, TD_NS_PER_MS);
    char err[256];
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 2, &f.run, err, sizeof(err)), 0);
    assert_int_equal(f.run.recs[0].outcome, LT_ERROR);
    assert_non_null(strstr(f.run.recs[0].error, "without [DONE]"));
    teardown_run(&f);
}

static void test_replay_connect_refused(void **state)
{
    (void)state;
    struct fixture f;
    setup_run(&f, LT_SSE_OK, 4, 3, TD_NS_PER_MS);
    lt_sse_server_stop(f.srv); /* the port is now closed */
    f.srv = NULL;
    char err[256];
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 3, &f.run, err, sizeof(err)), 0);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(f.run.recs[i].outcome, LT_ERROR);
        assert_non_null(strstr(f.run.recs[i].error, "connect"));
    }
    teardown_run(&f);

    /* Nothing to send and nobody listening: the warm connections fail, the
     * run still starts, ends at once and closes everything once. */
    setup_run(&f, LT_SSE_OK, 4, 0, 0);
    lt_sse_server_stop(f.srv);
    f.srv = NULL;
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 0, &f.run, err, sizeof(err)), 0);
    assert_int_equal(f.run.n, 0);
    teardown_run(&f);

    /* Nothing to send: returns at once. */
    setup_run(&f, LT_SSE_OK, 4, 0, 0);
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 0, &f.run, err, sizeof(err)), 0);
    assert_int_equal(f.run.n, 0);
    teardown_run(&f);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Median of v[0..n) (sorts a copy; n <= 128). */
static int64_t median_i64(const int64_t *v, size_t n)
{
    int64_t tmp[128];
    assert_true(n > 0 && n <= 128);
    memcpy(tmp, v, n * sizeof(*v));
    qsort(tmp, n, sizeof(*tmp), cmp_i64);
    return tmp[n / 2];
}

/* The schedule checked against clocks the replay does not own. Lateness as
 * recorded (send - scheduled, both on the replay's own base) catches a client
 * that sends every request late; it cannot catch a base that drifts, since
 * each send is then measured against the drifted base. The server's arrival
 * times can: request k must arrive at (server's t = 0) + its scheduled time,
 * so the offset arrival - scheduled must stay flat across the run. Medians of
 * ten requests at each end keep a preempted moment from counting; a drift of
 * 1 ms per request moves the last ten by ~90 ms. On a loaded 2-core machine
 * the median wake-up of the loop can itself pass a millisecond for a while,
 * so the timing bounds get up to three runs (as loadtest_sched does); a client
 * that is late or drifts every time still fails. Never early, every request
 * served and the wall time at least the span are checked on every run. */
static void test_replay_schedule_against_server_clock(void **state)
{
    (void)state;
    enum { N = 100 };
    int on_time = 0;
    for (int attempt = 1; attempt <= 3 && !on_time; attempt++) {
        struct fixture f;
        setup_run(&f, LT_SSE_OK, 1, N, 3 * TD_NS_PER_MS);
        char err[256];
        int64_t before = td_now_ns();
        assert_int_equal(lt_replay_run(&f.o, f.reqs, N, &f.run, err, sizeof(err)), 0);
        int64_t wall = td_now_ns() - before;
        int64_t late[N], arrival[N], off[N];
        assert_int_equal(lt_sse_server_arrivals(f.srv, arrival, N), N);
        for (size_t i = 0; i < N; i++) {
            const lt_record *r = &f.run.recs[i];
            assert_int_equal(r->outcome, LT_OK);
            late[i] = r->send_ns - r->sched_ns;
            assert_true(late[i] >= 0);
            /* Arrivals are in order on the server's one thread; the schedule
             * is sorted: the i-th arrival answers the i-th scheduled send. */
            off[i] = arrival[i] - f.reqs[i].t_ns;
            /* Never early: the run started after `before`. */
            assert_true(off[i] >= before);
        }
        int64_t late_p50 = median_i64(late, N);
        int64_t drift = median_i64(off + N - 10, 10) - median_i64(off, 10);
        int64_t span = f.reqs[N - 1].t_ns;
        assert_true(wall >= span);
        print_message("attempt %d: lateness p50 %.3f ms (limit 1.5); server clock: offset of the "
                      "last ten - the first ten %.3f ms (limit +-30); wall %.1f ms for a %.1f ms "
                      "span\n",
                      attempt, td_ns_to_ms(late_p50), td_ns_to_ms(drift), td_ns_to_ms(wall),
                      td_ns_to_ms(span));
        on_time = late_p50 < 3 * TD_NS_PER_MS / 2 && drift > -30 * TD_NS_PER_MS &&
                  drift < 30 * TD_NS_PER_MS && wall < span + TD_NS_PER_S;
        teardown_run(&f);
    }
    if (!on_time) fail_msg("late or drifting in all three runs (see the lines above)");
}

/* A request that opens its own connection is timed from its send, not from
 * the start of its connect. The server holds its accept for 400 ms with one
 * connection already waiting in a backlog of one, so the kernel drops the
 * replay's SYN and the connect completes only on the retransmission (about
 * 1 s), while the response then comes at once: TTFT and e2e counted from the
 * connect would be a second, from the send they are a few milliseconds. */
static void test_replay_ttft_from_send_not_connect(void **state)
{
    (void)state;
    struct fixture f;
    setup_run_held(&f, LT_SSE_OK, 4, 1, 0, 400 * TD_NS_PER_MS);
    f.o.warm_conns = 0; /* the request opens its own connection */
    /* Fill the backlog: non-blocking connects, so one that is dropped too
     * does not hold up the test. */
    int fill[2];
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)f.o.url.port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    for (int k = 0; k < 2; k++) {
        fill[k] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        assert_true(fill[k] >= 0);
        int rc = connect(fill[k], (const struct sockaddr *)&sa, sizeof(sa));
        assert_true(rc == 0 || errno == EINPROGRESS);
    }
    td_sleep_ns(20 * TD_NS_PER_MS); /* the handshakes of the fillers are done */
    char err[256];
    assert_int_equal(lt_replay_run(&f.o, f.reqs, 1, &f.run, err, sizeof(err)), 0);
    const lt_record *r = &f.run.recs[0];
    if (r->outcome != LT_OK) print_message("request: %s\n", r->error);
    assert_int_equal(r->outcome, LT_OK);
    print_message("connect took %.1f ms, ttft %.3f ms, e2e %.3f ms\n", td_ns_to_ms(r->send_ns),
                  td_ns_to_ms(r->ttft_ns), td_ns_to_ms(r->e2e_ns));
    for (int k = 0; k < 2; k++)
        close(fill[k]);
    if (r->send_ns < 300 * TD_NS_PER_MS) {
        /* The kernel did not drop the SYN: nothing here tells connect from send. */
        teardown_run(&f);
        skip();
    }
    assert_true(r->ttft_ns >= 0 && r->ttft_ns < 200 * TD_NS_PER_MS);
    assert_true(r->e2e_ns >= r->ttft_ns && r->e2e_ns < 200 * TD_NS_PER_MS);
    teardown_run(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url_parse),
        cmocka_unit_test(test_replay_ok),
        cmocka_unit_test(test_replay_trickled_stream),
        cmocka_unit_test(test_replay_queue_when_pool_full),
        cmocka_unit_test(test_replay_rejected),
        cmocka_unit_test(test_replay_retry_429),
        cmocka_unit_test(test_replay_stall_is_timeout_error),
        cmocka_unit_test(test_replay_close_mid_stream_is_error),
        cmocka_unit_test(test_replay_missing_done_is_error),
        cmocka_unit_test(test_replay_connect_refused),
        cmocka_unit_test(test_replay_ttft_from_send_not_connect),
        cmocka_unit_test(test_replay_schedule_against_server_clock),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
