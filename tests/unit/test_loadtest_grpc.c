/* Unit tests for the gRPC transport of the replay (loadtest/lt_grpc) against
 * a Router.Generate server made with common/rpc on 127.0.0.1: token streams,
 * RESOURCE_EXHAUSTED as rejected, a failure mid-stream and a stalled stream
 * (deadline) as errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "loadtest/lt_replay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef TANDEM_LT_HAVE_GRPC
#include "common/rpc.h"
#include "loadtest/lt_grpc.h"
#include "proto/tandem.pb-c.h"
#include "watchdog.h"

#include <pthread.h>

enum mode { M_OK, M_REJECT, M_TRY_LATER, M_FAIL_MID, M_STALL };
static enum mode g_mode;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static size_t g_prompt_ids, g_max_tokens, g_calls;
static int g_ignore_eos;

static void on_cancel(rpc_call *call, void *arg)
{
    (void)arg;
    rpc_call_finish(call, TD_ECANCELED, "cancelled");
}

/* Runs on the server's CQ thread; replies at once (never blocks). */
static void handle_generate(rpc_call *call, const ProtobufCMessage *m, void *arg)
{
    (void)arg;
    const Tandem__V1__GenerateRequest *req = (const Tandem__V1__GenerateRequest *)m;
    pthread_mutex_lock(&g_mu);
    g_calls++;
    /* Calls may be handled out of order: keep the longest prompt seen. */
    if (req->n_prompt_token_ids > g_prompt_ids) g_prompt_ids = req->n_prompt_token_ids;
    g_max_tokens = req->sampling ? req->sampling->max_tokens : 0;
    g_ignore_eos = req->sampling ? req->sampling->ignore_eos : 0;
    pthread_mutex_unlock(&g_mu);
    if (g_mode == M_REJECT) {
        rpc_call_finish(call, TD_EDECLINED, "admission: over capacity");
        return;
    }
    if (g_mode == M_TRY_LATER) {
        rpc_call_finish(call, TD_EAGAIN, "queue full");
        return;
    }
    uint32_t max = req->sampling ? req->sampling->max_tokens : 1;
    uint32_t n = g_mode == M_OK ? max : 1;
    for (uint32_t k = 0; k < n; k++) {
        Tandem__V1__GenerateResponse resp = TANDEM__V1__GENERATE_RESPONSE__INIT;
        uint32_t id = 7 + k;
        resp.request_id = (char *)"r";
        resp.n_token_ids = 1;
        resp.token_ids = &id;
        if (g_mode == M_OK && k + 1 == n) {
            resp.finish_reason = TANDEM__V1__FINISH_REASON__FINISH_REASON_LENGTH;
            resp.completion_tokens = n;
            resp.prompt_tokens = (uint32_t)req->n_prompt_token_ids;
        }
        if (rpc_call_send(call, &resp.base) != 0) break;
    }
    if (g_mode == M_OK)
        rpc_call_finish(call, 0, NULL);
    else if (g_mode == M_FAIL_MID)
        rpc_call_finish(call, TD_EUNAVAILABLE, "decode worker lost");
    else
        rpc_call_on_cancel(call, on_cancel, NULL); /* M_STALL: finish when the deadline hits */
}

struct fixture {
    rpc_server *srv;
    lt_prompt *prompt;
    lt_replay_opts o;
    lt_req reqs[16];
    lt_run run;
};

static void run_mode(struct fixture *f, enum mode mode, size_t n, int64_t timeout_ns)
{
    memset(f, 0, sizeof(*f));
    g_mode = mode;
    g_calls = 0;
    g_prompt_ids = 0;
    assert_int_equal(rpc_server_create("127.0.0.1:0", &f->srv), 0);
    assert_int_equal(rpc_server_add_method(f->srv, "/tandem.v1.Router/Generate",
                                           &tandem__v1__generate_request__descriptor,
                                           handle_generate, NULL),
                     0);
    assert_int_equal(rpc_server_start(f->srv), 0);
    assert_int_equal(lt_prompt_create_ids(100, 64, &f->prompt), 0);
    char url[64];
    snprintf(url, sizeof(url), "grpc://127.0.0.1:%d", rpc_server_port(f->srv));
    assert_int_equal(lt_url_parse(url, &f->o.url), 0);
    assert_true(f->o.url.grpc);
    f->o.prompt = f->prompt;
    f->o.timeout_ns = timeout_ns;
    for (size_t i = 0; i < n; i++)
        f->reqs[i] = (lt_req){
            .t_ns = (int64_t)i * TD_NS_PER_MS, .input_tokens = 5 + (int32_t)i, .output_tokens = 3};
    char err[256] = "";
    /* A stalled stream ends only at its deadline: bound the run so an
     * ignored deadline fails here in seconds rather than hanging. */
    watchdog_arm((unsigned)(timeout_ns / TD_NS_PER_S) + 10,
                 "lt_replay_run over gRPC (a deadline ignored?)");
    int rc = lt_replay_run(&f->o, f->reqs, n, &f->run, err, sizeof(err));
    watchdog_disarm();
    if (rc) print_message("replay: %s\n", err);
    assert_int_equal(rc, 0);
}

static void teardown(struct fixture *f)
{
    lt_run_free(&f->run);
    rpc_server_free(f->srv);
    lt_prompt_free(f->prompt);
}

static void test_grpc_ok(void **state)
{
    (void)state;
    struct fixture f;
    run_mode(&f, M_OK, 8, 5 * TD_NS_PER_S);
    for (size_t i = 0; i < 8; i++) {
        const lt_record *r = &f.run.recs[i];
        if (r->outcome != LT_OK) print_message("request %zu: %s\n", i, r->error);
        assert_int_equal(r->outcome, LT_OK);
        assert_int_equal(r->output_tokens, 3);
        assert_true(r->n_chunks >= 1 && r->n_chunks <= 3);
        assert_true(r->ttft_ns >= 0 && r->e2e_ns >= r->ttft_ns);
    }
    /* The handler wrote these on the server's CQ thread, which is still
     * running: read them under the same lock. */
    pthread_mutex_lock(&g_mu);
    size_t calls = g_calls, prompt_ids = g_prompt_ids, max_tokens = g_max_tokens;
    int ignore_eos = g_ignore_eos;
    pthread_mutex_unlock(&g_mu);
    assert_int_equal(calls, 8);
    assert_int_equal(prompt_ids, 12); /* the longest request: 5 + 7 ids */
    assert_int_equal(max_tokens, 3);
    assert_true(ignore_eos);
    teardown(&f);
}

static void test_grpc_rejected_and_errors(void **state)
{
    (void)state;
    struct fixture f;
    run_mode(&f, M_REJECT, 3, 5 * TD_NS_PER_S);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(f.run.recs[i].outcome, LT_REJECTED);
        assert_non_null(strstr(f.run.recs[i].error, "TD_EDECLINED"));
    }
    teardown(&f);

    /* TD_EAGAIN as the final status reads like "nothing yet" from
     * rpc_stream_next: it must still end as rejected, not wait for the timeout. */
    int64_t t1 = td_now_ns();
    run_mode(&f, M_TRY_LATER, 3, 5 * TD_NS_PER_S);
    assert_true(td_now_ns() - t1 < 2 * TD_NS_PER_S);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(f.run.recs[i].outcome, LT_REJECTED);
        assert_non_null(strstr(f.run.recs[i].error, "TD_EAGAIN"));
    }
    teardown(&f);

    run_mode(&f, M_FAIL_MID, 3, 5 * TD_NS_PER_S);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(f.run.recs[i].outcome, LT_ERROR);
        assert_non_null(strstr(f.run.recs[i].error, "decode worker lost"));
        assert_int_equal(f.run.recs[i].n_chunks, 1);
    }
    teardown(&f);

    int64_t t0 = td_now_ns();
    run_mode(&f, M_STALL, 2, 300 * TD_NS_PER_MS);
    assert_true(td_now_ns() - t0 < 3 * TD_NS_PER_S);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(f.run.recs[i].outcome, LT_ERROR);
        assert_non_null(strstr(f.run.recs[i].error, "TD_ETIMEDOUT"));
    }
    teardown(&f);
}

static void count_done(void *arg, size_t i)
{
    (void)i;
    (*(int *)arg)++;
}

/* lt_grpc_close with streams still open (the server never answers): the
 * streams go before the async handle closes, so no notify reaches the handle
 * once it is closed, nor the loop once it is gone (libuv would write to a
 * closed descriptor, or abort). */
static void test_grpc_close_with_streams_open(void **state)
{
    (void)state;
    g_mode = M_STALL;
    pthread_mutex_lock(&g_mu);
    g_calls = 0;
    pthread_mutex_unlock(&g_mu);
    rpc_server *srv;
    assert_int_equal(rpc_server_create("127.0.0.1:0", &srv), 0);
    assert_int_equal(rpc_server_add_method(srv, "/tandem.v1.Router/Generate",
                                           &tandem__v1__generate_request__descriptor,
                                           handle_generate, NULL),
                     0);
    assert_int_equal(rpc_server_start(srv), 0);
    lt_prompt *prompt;
    assert_int_equal(lt_prompt_create_ids(100, 64, &prompt), 0);
    lt_replay_opts o;
    memset(&o, 0, sizeof(o));
    o.prompt = prompt;
    lt_req reqs[2] = {{.input_tokens = 4, .output_tokens = 2},
                      {.input_tokens = 5, .output_tokens = 2}};
    lt_record recs[2];
    memset(recs, 0, sizeof(recs));
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", rpc_server_port(srv));
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    int done = 0;
    lt_grpc *g;
    assert_int_equal(lt_grpc_create(&loop, target, &o, reqs, recs, 2, count_done, &done, &g), 0);
    lt_grpc_send(g, 0, td_now_ns());
    lt_grpc_send(g, 1, td_now_ns());
    size_t calls = 0;
    int64_t end = td_now_ns() + 5 * TD_NS_PER_S;
    while (calls < 2 && td_now_ns() < end) {
        uv_run(&loop, UV_RUN_NOWAIT);
        td_sleep_ns(TD_NS_PER_MS);
        pthread_mutex_lock(&g_mu);
        calls = g_calls;
        pthread_mutex_unlock(&g_mu);
    }
    assert_int_equal(calls, 2);
    lt_grpc_close(g);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    td_sleep_ns(100 * TD_NS_PER_MS); /* a late notify would land here */
    lt_grpc_free(g);
    assert_int_equal(done, 0);
    rpc_server_free(srv);
    lt_prompt_free(prompt);
}

static void test_grpc_url(void **state)
{
    (void)state;
    lt_url u;
    assert_int_equal(lt_url_parse("grpc://127.0.0.1:7000", &u), 0);
    assert_true(u.grpc);
    assert_int_equal(u.port, 7000);
    assert_int_equal(lt_url_parse("grpc://127.0.0.1", &u), TD_EINVAL);
    assert_int_equal(lt_url_parse("grpc://127.0.0.1:7000/x", &u), TD_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grpc_url),
        cmocka_unit_test(test_grpc_ok),
        cmocka_unit_test(test_grpc_rejected_and_errors),
        cmocka_unit_test(test_grpc_close_with_streams_open),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else

static void test_grpc_absent(void **state)
{
    (void)state;
    print_message("skip: built without common/rpc\n");
    skip();
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_grpc_absent)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#endif
