/* Unit tests for common/rpc: a real gRPC server and client on loopback.
 *
 * The server side mimics a worker: handlers hand streaming calls to an
 * "engine" thread through a queue, and the engine sends tokens from its own
 * thread, polling rpc_call_cancelled each step. Test-only conventions for
 * Decode.Generate: sampling.max_tokens is the number of messages to stream
 * (0 = until cancelled), sampling.seed the pause between messages in
 * microseconds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "common/rpc.h"
#include "proto/tandem.pb-c.h"
#include "watchdog.h"

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define M_GENERATE  "/tandem.v1.Decode/Generate"
#define M_HEARTBEAT "/tandem.v1.Router/Heartbeat"
#define M_PREFILL   "/tandem.v1.Prefill/Run"
#define M_CANCEL    "/tandem.v1.Decode/Cancel"
#define MAX_ACTIVE  128

typedef struct job {
    rpc_call *call;
    uint32_t total; /* messages to send; 0 = until cancelled */
    uint32_t sent;
    int64_t pace_ns; /* pause between messages */
    int64_t next_ns;
    int end_err; /* code the stream ends with after its messages */
} job;

typedef struct fixture {
    rpc_server *srv;
    char target[64];
    pthread_t engine;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job *incoming[MAX_ACTIVE]; /* handler -> engine */
    int n_incoming;
    bool stop;
    atomic_int engine_cancels; /* streams the engine saw cancelled */
    atomic_int cancel_cbs;     /* cancel callbacks run */
    atomic_int streams_done;   /* streams finished OK */
    rpc_call *parked;          /* Prefill.Run call that never replies on its own */
} fixture;

/* Server-side code runs on gRPC and engine threads, where cmocka's asserts
 * cannot be used: failures are counted and checked by the main thread. */
static atomic_int g_bad;
#define CHECK(x)                                                                                   \
    do {                                                                                           \
        if (!(x)) {                                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #x);                  \
            atomic_fetch_add(&g_bad, 1);                                                           \
        }                                                                                          \
    } while (0)
#define CHECK_EQ(a, b) CHECK((a) == (b))

/* ------------------------------------------------------------ server side -- */

static void *engine_main(void *arg)
{
    fixture *f = arg;
    job *active[MAX_ACTIVE];
    int n = 0;
    for (;;) {
        pthread_mutex_lock(&f->mu);
        while (n == 0 && f->n_incoming == 0 && !f->stop)
            pthread_cond_wait(&f->cv, &f->mu);
        if (f->stop && n == 0 && f->n_incoming == 0) {
            pthread_mutex_unlock(&f->mu);
            break;
        }
        for (int i = 0; i < f->n_incoming; i++)
            active[n++] = f->incoming[i];
        f->n_incoming = 0;
        pthread_mutex_unlock(&f->mu);

        bool paced = false;
        int64_t now = td_now_ns();
        for (int i = 0; i < n;) {
            job *j = active[i];
            bool done = false;
            if (rpc_call_cancelled(j->call)) {
                atomic_fetch_add(&f->engine_cancels, 1);
                CHECK_EQ(rpc_call_finish(j->call, TD_ECANCELED, "cancelled"), TD_ECANCELED);
                done = true;
            } else if (now >= j->next_ns) {
                Tandem__V1__DecodeResponse resp = TANDEM__V1__DECODE_RESPONSE__INIT;
                uint32_t tok = j->sent;
                resp.n_token_ids = 1;
                resp.token_ids = &tok;
                bool last = j->total && j->sent + 1 == j->total;
                if (last) resp.finish_reason = TANDEM__V1__FINISH_REASON__FINISH_REASON_LENGTH;
                int rc = rpc_call_send(j->call, &resp.base);
                if (rc == 0) {
                    j->sent++;
                    j->next_ns = now + j->pace_ns;
                    if (last) {
                        CHECK_EQ(rpc_call_finish(j->call, j->end_err,
                                                 j->end_err ? "shape mismatch" : NULL),
                                 0);
                        atomic_fetch_add(&f->streams_done, 1);
                        done = true;
                    }
                } else {
                    CHECK_EQ(rc, TD_ECANCELED);
                    /* Seen on the next step through rpc_call_cancelled. */
                }
            }
            if (done) {
                free(j);
                active[i] = active[--n];
            } else {
                if (j->pace_ns) paced = true;
                i++;
            }
        }
        if (paced) td_sleep_ns(50 * TD_NS_PER_US);
    }
    return NULL;
}

static void on_generate(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    fixture *f = arg;
    const Tandem__V1__DecodeRequest *r = (const Tandem__V1__DecodeRequest *)req;
    job *j = calloc(1, sizeof(*j));
    if (!j) {
        rpc_call_finish(call, TD_ENOMEM, "no memory");
        return;
    }
    j->call = call;
    j->total = r->sampling ? r->sampling->max_tokens : 1;
    j->pace_ns = r->sampling ? (int64_t)r->sampling->seed * TD_NS_PER_US : 0;
    /* ignore_eos: end with TD_EMISMATCH; min_tokens 7: end with TD_EAGAIN
     * (a server's "try again later"), which a poll must tell from "nothing
     * yet". */
    j->end_err = r->sampling && r->sampling->ignore_eos        ? TD_EMISMATCH
                 : r->sampling && r->sampling->min_tokens == 7 ? TD_EAGAIN
                                                               : 0;
    pthread_mutex_lock(&f->mu);
    f->incoming[f->n_incoming++] = j;
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

static void on_heartbeat(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    const Tandem__V1__HeartbeatRequest *r = (const Tandem__V1__HeartbeatRequest *)req;
    if (strcmp(r->worker_id, "declined") == 0) {
        rpc_call_finishf(call, TD_EDECLINED, "worker %s not admitted", "declined");
        return;
    }
    Tandem__V1__HeartbeatResponse resp = TANDEM__V1__HEARTBEAT_RESPONSE__INIT;
    resp.known = strcmp(r->worker_id, "decode-0") == 0 && r->load && r->load->free_kv_blocks == 100;
    resp.drain = r->seq % 2 == 1;
    CHECK_EQ(rpc_call_reply(call, &resp.base), 0);
}

static void on_parked_cancel(rpc_call *call, void *arg)
{
    fixture *f = arg;
    atomic_fetch_add(&f->cancel_cbs, 1);
    pthread_mutex_lock(&f->mu);
    f->parked = NULL;
    pthread_mutex_unlock(&f->mu);
    CHECK_EQ(rpc_call_finish(call, TD_ECANCELED, NULL), TD_ECANCELED);
}

/* Never replies: ends only through its cancel callback. */
static void on_prefill(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    fixture *f = arg;
    CHECK(rpc_call_deadline_ns(call) != RPC_NO_DEADLINE);
    CHECK(rpc_call_deadline_ns(call) < td_now_ns() + 10 * TD_NS_PER_S);
    CHECK(strcmp(rpc_call_method(call), M_PREFILL) == 0);
    pthread_mutex_lock(&f->mu);
    f->parked = call;
    pthread_mutex_unlock(&f->mu);
    rpc_call_on_cancel(call, on_parked_cancel, f);
}

static int fixture_setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(pthread_mutex_init(&f->mu, NULL), 0);
    assert_int_equal(pthread_cond_init(&f->cv, NULL), 0);
    assert_int_equal(rpc_server_create("127.0.0.1:0", &f->srv), 0);
    assert_true(rpc_server_port(f->srv) > 0);
    assert_int_equal(rpc_server_add_method(f->srv, M_GENERATE,
                                           &tandem__v1__decode_request__descriptor, on_generate, f),
                     0);
    assert_int_equal(rpc_server_add_method(f->srv, M_HEARTBEAT,
                                           &tandem__v1__heartbeat_request__descriptor, on_heartbeat,
                                           f),
                     0);
    assert_int_equal(rpc_server_add_method(f->srv, M_PREFILL,
                                           &tandem__v1__prefill_request__descriptor, on_prefill, f),
                     0);
    assert_int_equal(rpc_server_add_method(f->srv, M_HEARTBEAT,
                                           &tandem__v1__heartbeat_request__descriptor, on_heartbeat,
                                           f),
                     TD_EEXIST);
    assert_int_equal(rpc_server_start(f->srv), 0);
    assert_int_equal(rpc_server_start(f->srv), TD_EINVAL);
    assert_int_equal(rpc_server_add_method(f->srv, M_CANCEL,
                                           &tandem__v1__cancel_request__descriptor, on_heartbeat,
                                           f),
                     TD_EINVAL);
    snprintf(f->target, sizeof(f->target), "127.0.0.1:%d", rpc_server_port(f->srv));
    assert_int_equal(pthread_create(&f->engine, NULL, engine_main, f), 0);
    *state = f;
    return 0;
}

static void fixture_stop_server(fixture *f)
{
    rpc_server_free(f->srv); /* returns only once the engine finished every call */
    f->srv = NULL;
}

static int fixture_teardown(void **state)
{
    fixture *f = *state;
    watchdog_disarm(); /* a test that failed inside a bounded step left it armed */
    if (f->srv) fixture_stop_server(f);
    pthread_mutex_lock(&f->mu);
    f->stop = true;
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->engine, NULL);
    assert_int_equal(atomic_load(&g_bad), 0);
    pthread_cond_destroy(&f->cv);
    pthread_mutex_destroy(&f->mu);
    free(f);
    return 0;
}

/* ------------------------------------------------------------ client side -- */

static int open_generate(rpc_client *c, uint32_t total, uint32_t pace_us, int64_t deadline_ns,
                         rpc_stream **out)
{
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = total;
    sp.seed = pace_us;
    Tandem__V1__RequestMeta meta = TANDEM__V1__REQUEST_META__INIT;
    meta.request_id = "req-test-1";
    Tandem__V1__DecodeRequest req = TANDEM__V1__DECODE_REQUEST__INIT;
    req.meta = &meta;
    req.sampling = &sp;
    uint32_t prompt[3] = {1, 2, 3};
    req.n_prompt_token_ids = 3;
    req.prompt_token_ids = prompt;
    return rpc_client_stream(c, M_GENERATE, &req.base, &tandem__v1__decode_response__descriptor,
                             deadline_ns, NULL, NULL, out);
}

/* Reads the rest of a stream, checking that token i arrives i-th (counting from
 * first). Returns the stream's final code; *count gets the number of messages. */
static int drain_from(rpc_stream *s, uint32_t first, uint32_t *count)
{
    uint32_t n = first;
    for (;;) {
        ProtobufCMessage *m = NULL;
        int rc = rpc_stream_next(s, 5 * TD_NS_PER_S, &m);
        if (rc < 0 || !m) {
            *count = n - first;
            return rc;
        }
        Tandem__V1__DecodeResponse *r = (Tandem__V1__DecodeResponse *)m;
        assert_int_equal(r->n_token_ids, 1);
        assert_int_equal(r->token_ids[0], n);
        n++;
        protobuf_c_message_free_unpacked(m, NULL);
    }
}

static int drain_stream(rpc_stream *s, uint32_t *count)
{
    return drain_from(s, 0, count);
}

static void wait_for(atomic_int *v, int want)
{
    int64_t until = td_now_ns() + 5 * TD_NS_PER_S;
    while (atomic_load(v) < want && td_now_ns() < until)
        td_sleep_ns(TD_NS_PER_MS);
    assert_int_equal(atomic_load(v), want);
}

static void test_unary_round_trip(void **state)
{
    fixture *f = *state;
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);
    for (uint64_t seq = 0; seq < 3; seq++) {
        Tandem__V1__LoadReport load = TANDEM__V1__LOAD_REPORT__INIT;
        load.free_kv_blocks = 100;
        Tandem__V1__HeartbeatRequest req = TANDEM__V1__HEARTBEAT_REQUEST__INIT;
        req.worker_id = "decode-0";
        req.seq = seq;
        req.load = &load;
        ProtobufCMessage *resp = NULL;
        rpc_status st;
        assert_int_equal(rpc_client_unary(c, M_HEARTBEAT, &req.base,
                                          &tandem__v1__heartbeat_response__descriptor,
                                          td_now_ns() + 5 * TD_NS_PER_S, &resp, &st),
                         0);
        assert_int_equal(st.err, 0);
        assert_int_equal(st.grpc_code, GRPC_STATUS_OK);
        Tandem__V1__HeartbeatResponse *r = (Tandem__V1__HeartbeatResponse *)resp;
        assert_true(r->known);
        assert_int_equal(r->drain, seq % 2 == 1);
        protobuf_c_message_free_unpacked(resp, NULL);
    }

    /* A handler's TD code comes back exactly, with its message. */
    Tandem__V1__HeartbeatRequest req = TANDEM__V1__HEARTBEAT_REQUEST__INIT;
    req.worker_id = "declined";
    ProtobufCMessage *resp = (ProtobufCMessage *)1;
    rpc_status st;
    assert_int_equal(rpc_client_unary(c, M_HEARTBEAT, &req.base,
                                      &tandem__v1__heartbeat_response__descriptor, RPC_NO_DEADLINE,
                                      &resp, &st),
                     TD_EDECLINED);
    assert_null(resp);
    assert_int_equal(st.grpc_code, GRPC_STATUS_RESOURCE_EXHAUSTED);
    assert_string_equal(st.details, "worker declined not admitted");

    /* Unknown method: UNIMPLEMENTED. */
    assert_int_equal(rpc_client_unary(c, "/tandem.v1.Nope/Nothing", &req.base,
                                      &tandem__v1__heartbeat_response__descriptor,
                                      td_now_ns() + 5 * TD_NS_PER_S, &resp, &st),
                     TD_EUNSUPPORTED);
    assert_int_equal(st.grpc_code, GRPC_STATUS_UNIMPLEMENTED);

    /* No request: refused locally. */
    assert_int_equal(rpc_client_unary(c, M_HEARTBEAT, NULL,
                                      &tandem__v1__heartbeat_response__descriptor, RPC_NO_DEADLINE,
                                      &resp, &st),
                     TD_EINVAL);
    rpc_client_free(c);
}

static void test_stream_10000_in_order(void **state)
{
    fixture *f = *state;
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);
    rpc_stream *s;
    assert_int_equal(open_generate(c, 10000, 0, td_now_ns() + 30 * TD_NS_PER_S, &s), 0);
    uint32_t n = 0;
    assert_int_equal(drain_stream(s, &n), 0);
    assert_int_equal(n, 10000);
    assert_int_equal(rpc_stream_status(s)->grpc_code, GRPC_STATUS_OK);
    /* After the end, next keeps saying "end". */
    ProtobufCMessage *m = (ProtobufCMessage *)1;
    assert_int_equal(rpc_stream_next(s, 0, &m), 0);
    assert_null(m);
    rpc_stream_free(s);
    wait_for(&f->streams_done, 1);
    rpc_client_free(c);
}

static void test_deadline_exceeded(void **state)
{
    fixture *f = *state;
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);
    Tandem__V1__PrefillRequest req = TANDEM__V1__PREFILL_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    rpc_status st;
    /* The server never answers: only the deadline ends these calls. Ignored,
     * they would block for good; the watchdog fails the test in seconds. */
    watchdog_arm(5, "rpc_client_unary 200 ms deadline (deadline ignored?)");
    int64_t t0 = td_now_ns();
    int rc = rpc_client_unary(c, M_PREFILL, &req.base, &tandem__v1__prefill_response__descriptor,
                              t0 + 200 * TD_NS_PER_MS, &resp, &st);
    int64_t took = td_now_ns() - t0;
    watchdog_disarm();
    assert_int_equal(rc, TD_ETIMEDOUT);
    assert_true(took >= 190 * TD_NS_PER_MS);
    assert_true(took < 2 * TD_NS_PER_S);
    assert_int_equal(st.grpc_code, GRPC_STATUS_DEADLINE_EXCEEDED);
    assert_null(resp);
    /* The server saw its deadline pass: the parked handler was cancelled. */
    wait_for(&f->cancel_cbs, 1);

    /* A stream's deadline too, after some messages went through. */
    rpc_stream *s;
    watchdog_arm(5, "stream of endless messages with a 200 ms deadline (deadline ignored?)");
    assert_int_equal(open_generate(c, 0, 1000, td_now_ns() + 200 * TD_NS_PER_MS, &s), 0);
    uint32_t n = 0;
    assert_int_equal(drain_stream(s, &n), TD_ETIMEDOUT);
    watchdog_disarm();
    assert_true(n > 0);
    rpc_stream_free(s);
    wait_for(&f->engine_cancels, 1);
    rpc_client_free(c);
}

static void test_client_cancel_mid_stream(void **state)
{
    fixture *f = *state;
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);
    rpc_stream *s;
    assert_int_equal(open_generate(c, 0, 100, RPC_NO_DEADLINE, &s), 0);
    for (uint32_t i = 0; i < 50; i++) {
        ProtobufCMessage *m = NULL;
        assert_int_equal(rpc_stream_next(s, 5 * TD_NS_PER_S, &m), 0);
        assert_non_null(m);
        assert_int_equal(((Tandem__V1__DecodeResponse *)m)->token_ids[0], i);
        protobuf_c_message_free_unpacked(m, NULL);
    }
    rpc_stream_cancel(s);
    rpc_stream_cancel(s); /* idempotent */
    uint32_t more = 0;
    assert_int_equal(drain_from(s, 50, &more), TD_ECANCELED);
    assert_int_equal(rpc_stream_status(s)->grpc_code, GRPC_STATUS_CANCELLED);
    rpc_stream_free(s);
    /* The engine on the server noticed and finished the call. */
    wait_for(&f->engine_cancels, 1);

    /* Freeing a stream that is still running cancels it too. */
    assert_int_equal(open_generate(c, 0, 100, RPC_NO_DEADLINE, &s), 0);
    ProtobufCMessage *m = NULL;
    assert_int_equal(rpc_stream_next(s, 5 * TD_NS_PER_S, &m), 0);
    protobuf_c_message_free_unpacked(m, NULL);
    rpc_stream_free(s);
    wait_for(&f->engine_cancels, 2);
    rpc_client_free(c);
}

static void test_stream_wait_and_error_end(void **state)
{
    fixture *f = *state;
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);

    /* Paced at 300 ms: the first message comes at once, then a bounded wait
     * times out with TD_EAGAIN, and a poll too. */
    rpc_stream *s;
    assert_int_equal(open_generate(c, 2, 300000, td_now_ns() + 5 * TD_NS_PER_S, &s), 0);
    ProtobufCMessage *m = NULL;
    assert_int_equal(rpc_stream_next(s, 5 * TD_NS_PER_S, &m), 0);
    assert_non_null(m);
    protobuf_c_message_free_unpacked(m, NULL);
    int64_t t0 = td_now_ns();
    assert_int_equal(rpc_stream_next(s, 20 * TD_NS_PER_MS, &m), TD_EAGAIN);
    assert_null(m);
    assert_true(td_now_ns() - t0 >= 19 * TD_NS_PER_MS);
    assert_int_equal(rpc_stream_next(s, 0, &m), TD_EAGAIN);
    assert_int_equal(rpc_stream_poll(s, &m), RPC_PENDING);
    assert_false(rpc_stream_ended(s));
    uint32_t n = 0;
    assert_int_equal(drain_from(s, 1, &n), 0);
    assert_int_equal(n, 1);
    assert_true(rpc_stream_ended(s));
    rpc_stream_free(s);

    /* A stream that ends with an error after its messages: every message
     * first, then the server's exact code and message. */
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 5;
    sp.ignore_eos = true;
    Tandem__V1__DecodeRequest req = TANDEM__V1__DECODE_REQUEST__INIT;
    req.sampling = &sp;
    assert_int_equal(rpc_client_stream(c, M_GENERATE, &req.base,
                                       &tandem__v1__decode_response__descriptor,
                                       td_now_ns() + 5 * TD_NS_PER_S, NULL, NULL, &s),
                     0);
    assert_int_equal(drain_stream(s, &n), TD_EMISMATCH);
    assert_int_equal(n, 5);
    assert_true(rpc_stream_ended(s));
    assert_int_equal(rpc_stream_status(s)->grpc_code, GRPC_STATUS_FAILED_PRECONDITION);
    assert_string_equal(rpc_stream_status(s)->details, "shape mismatch");
    rpc_stream_free(s);

    /* A stream whose end status is TD_EAGAIN: a poll returns the messages,
     * then TD_EAGAIN as the end (never RPC_PENDING once it ended). */
    sp.ignore_eos = false;
    sp.min_tokens = 7;
    sp.max_tokens = 2;
    assert_int_equal(rpc_client_stream(c, M_GENERATE, &req.base,
                                       &tandem__v1__decode_response__descriptor,
                                       td_now_ns() + 5 * TD_NS_PER_S, NULL, NULL, &s),
                     0);
    int msgs = 0, rc;
    int64_t until = td_now_ns() + 5 * TD_NS_PER_S;
    while ((rc = rpc_stream_poll(s, &m)) == RPC_PENDING || (rc == 0 && m)) {
        assert_true(td_now_ns() < until);
        if (rc == 0) {
            msgs++;
            protobuf_c_message_free_unpacked(m, NULL);
        } else {
            usleep(1000);
        }
    }
    assert_int_equal(rc, TD_EAGAIN);
    assert_int_equal(msgs, 2);
    assert_true(rpc_stream_ended(s));
    assert_int_equal(rpc_stream_poll(s, &m), TD_EAGAIN);
    rpc_stream_free(s);
    rpc_client_free(c);
}

static void test_server_absent_unavailable(void **state)
{
    (void)state;
    /* A port that was just bound and released: nothing listens there. */
    rpc_server *srv;
    assert_int_equal(rpc_server_create("127.0.0.1:0", &srv), 0);
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", rpc_server_port(srv));
    rpc_server_free(srv);

    rpc_client *c;
    assert_int_equal(rpc_client_create(target, &c), 0);
    Tandem__V1__HeartbeatRequest req = TANDEM__V1__HEARTBEAT_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    rpc_status st;
    int64_t t0 = td_now_ns();
    assert_int_equal(rpc_client_unary(c, M_HEARTBEAT, &req.base,
                                      &tandem__v1__heartbeat_response__descriptor,
                                      t0 + 10 * TD_NS_PER_S, &resp, &st),
                     TD_EUNAVAILABLE);
    assert_true(td_now_ns() - t0 < TD_NS_PER_S);
    assert_int_equal(st.grpc_code, GRPC_STATUS_UNAVAILABLE);

    rpc_stream *s;
    t0 = td_now_ns();
    assert_int_equal(open_generate(c, 10, 0, t0 + 10 * TD_NS_PER_S, &s), 0);
    uint32_t n = 0;
    assert_int_equal(drain_stream(s, &n), TD_EUNAVAILABLE);
    assert_int_equal(n, 0);
    assert_true(td_now_ns() - t0 < TD_NS_PER_S);
    rpc_stream_free(s);
    rpc_client_free(c);
}

/* Sends raw bytes as the request of method; returns the gRPC status. */
static grpc_channel *raw_channel(const char *target)
{
    grpc_init();
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, creds, NULL);
    grpc_channel_credentials_release(creds);
    return ch;
}

static void raw_channel_close(grpc_channel *ch)
{
    grpc_channel_destroy(ch);
    grpc_shutdown();
}

static grpc_status_code raw_call(grpc_channel *ch, const char *method, const uint8_t *bytes,
                                 size_t len)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice mslice = grpc_slice_from_static_string(method);
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(5, GPR_TIMESPAN));
    grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, mslice, NULL,
                                               deadline, NULL);
    grpc_slice payload = grpc_slice_from_copied_buffer((const char *)bytes, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&payload, 1);
    grpc_slice_unref(payload);
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_byte_buffer *recv = NULL;
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[5].data.recv_status_on_client.status = &code;
    ops[5].data.recv_status_on_client.status_details = &details;
    int tag;
    assert_int_equal(grpc_call_start_batch(call, ops, 6, &tag, NULL), GRPC_CALL_OK);
    grpc_event ev =
        grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    assert_int_equal(ev.type, GRPC_OP_COMPLETE);
    if (code != GRPC_STATUS_OK) assert_null(recv);
    if (recv) grpc_byte_buffer_destroy(recv);
    grpc_byte_buffer_destroy(bb);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_destroy(cq);
    return code;
}

static void test_garbage_invalid_argument(void **state)
{
    fixture *f = *state;
    /* Field 1 (worker_id, length-delimited) claiming 2^31 bytes. */
    const uint8_t bad_len[] = {0x0a, 0x80, 0x80, 0x80, 0x80, 0x08, 'x'};
    /* A varint that never ends. */
    const uint8_t bad_varint[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    /* Wire type 7 does not exist. */
    const uint8_t bad_wire[] = {0x0f, 0x01};
    grpc_channel *ch = raw_channel(f->target);
    assert_int_equal(raw_call(ch, M_HEARTBEAT, bad_len, sizeof(bad_len)),
                     GRPC_STATUS_INVALID_ARGUMENT);
    assert_int_equal(raw_call(ch, M_HEARTBEAT, bad_varint, sizeof(bad_varint)),
                     GRPC_STATUS_INVALID_ARGUMENT);
    assert_int_equal(raw_call(ch, M_GENERATE, bad_wire, sizeof(bad_wire)),
                     GRPC_STATUS_INVALID_ARGUMENT);
    /* Random bytes: either a message protobuf-c accepts (unknown fields are
     * skipped) and the handler answers, or INVALID_ARGUMENT; never a crash
     * (run under ASan). Fixed seed: the same inputs every run. */
    unsigned seed = 12345;
    int rejected = 0;
    for (int i = 0; i < 100; i++) {
        uint8_t junk[64];
        size_t n = 1 + (size_t)(rand_r(&seed) % (int)sizeof(junk));
        for (size_t k = 0; k < n; k++)
            junk[k] = (uint8_t)rand_r(&seed);
        grpc_status_code code = raw_call(ch, M_HEARTBEAT, junk, n);
        assert_true(code == GRPC_STATUS_OK || code == GRPC_STATUS_INVALID_ARGUMENT);
        rejected += code == GRPC_STATUS_INVALID_ARGUMENT;
    }
    assert_true(rejected > 0);
    raw_channel_close(ch);
    /* The server still serves well-formed calls. */
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);
    rpc_stream *s;
    assert_int_equal(open_generate(c, 3, 0, td_now_ns() + 5 * TD_NS_PER_S, &s), 0);
    uint32_t n = 0;
    assert_int_equal(drain_stream(s, &n), 0);
    assert_int_equal(n, 3);
    rpc_stream_free(s);
    rpc_client_free(c);
}

typedef struct notify_count {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int events;
} notify_count;

static void on_notify(rpc_stream *s, void *arg)
{
    notify_count *nc = arg;
    pthread_mutex_lock(&nc->mu);
    nc->events++;
    pthread_cond_signal(&nc->cv);
    pthread_mutex_unlock(&nc->mu);
}

static void test_64_concurrent_streams(void **state)
{
    fixture *f = *state;
    enum { N = 64, PER = 200 };
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);
    notify_count nc = {.events = 0};
    pthread_mutex_init(&nc.mu, NULL);
    pthread_cond_init(&nc.cv, NULL);
    rpc_stream *s[N];
    uint32_t got[N] = {0};
    bool ended[N] = {false};
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = PER;
    Tandem__V1__DecodeRequest req = TANDEM__V1__DECODE_REQUEST__INIT;
    req.sampling = &sp;
    for (int i = 0; i < N; i++)
        assert_int_equal(rpc_client_stream(c, M_GENERATE, &req.base,
                                           &tandem__v1__decode_response__descriptor,
                                           td_now_ns() + 30 * TD_NS_PER_S, on_notify, &nc, &s[i]),
                         0);
    /* One reader drains all streams without blocking, woken by notify: the
     * pattern of an event loop. */
    int left = N;
    int64_t until = td_now_ns() + 30 * TD_NS_PER_S;
    while (left > 0 && td_now_ns() < until) {
        for (int i = 0; i < N; i++) {
            while (!ended[i]) {
                ProtobufCMessage *m = NULL;
                int rc = rpc_stream_next(s[i], 0, &m);
                if (rc == TD_EAGAIN) break;
                assert_int_equal(rc, 0);
                if (!m) {
                    ended[i] = true;
                    left--;
                    break;
                }
                assert_int_equal(((Tandem__V1__DecodeResponse *)m)->token_ids[0], got[i]);
                got[i]++;
                protobuf_c_message_free_unpacked(m, NULL);
            }
        }
        pthread_mutex_lock(&nc.mu);
        if (nc.events == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 10 * TD_NS_PER_MS;
            if (ts.tv_nsec >= TD_NS_PER_S) {
                ts.tv_sec++;
                ts.tv_nsec -= TD_NS_PER_S;
            }
            pthread_cond_timedwait(&nc.cv, &nc.mu, &ts);
        }
        nc.events = 0;
        pthread_mutex_unlock(&nc.mu);
    }
    assert_int_equal(left, 0);
    for (int i = 0; i < N; i++) {
        assert_int_equal(got[i], PER);
        rpc_stream_free(s[i]);
    }
    wait_for(&f->streams_done, N);
    pthread_cond_destroy(&nc.cv);
    pthread_mutex_destroy(&nc.mu);
    rpc_client_free(c);
}

static void test_shutdown_with_calls_in_flight(void **state)
{
    fixture *f = *state;
    enum { N = 8 };
    rpc_client *c;
    assert_int_equal(rpc_client_create(f->target, &c), 0);
    rpc_stream *s[N];
    for (int i = 0; i < N; i++) {
        assert_int_equal(open_generate(c, 0, 200, RPC_NO_DEADLINE, &s[i]), 0);
        ProtobufCMessage *m = NULL;
        assert_int_equal(rpc_stream_next(s[i], 5 * TD_NS_PER_S, &m), 0);
        protobuf_c_message_free_unpacked(m, NULL);
    }
    /* Plus one parked unary call, waited on by another thread. */
    rpc_stream *parked;
    Tandem__V1__PrefillRequest preq = TANDEM__V1__PREFILL_REQUEST__INIT;
    assert_int_equal(rpc_client_stream(c, M_PREFILL, &preq.base,
                                       &tandem__v1__prefill_response__descriptor,
                                       td_now_ns() + 5 * TD_NS_PER_S, NULL, NULL, &parked),
                     0);
    int64_t until = td_now_ns() + 5 * TD_NS_PER_S;
    for (;;) {
        pthread_mutex_lock(&f->mu);
        bool seen = f->parked != NULL;
        pthread_mutex_unlock(&f->mu);
        if (seen || td_now_ns() > until) break;
        td_sleep_ns(TD_NS_PER_MS);
    }

    int64_t t0 = td_now_ns();
    fixture_stop_server(f);
    assert_true(td_now_ns() - t0 < 2 * TD_NS_PER_S);
    assert_int_equal(atomic_load(&f->engine_cancels), N);
    assert_int_equal(atomic_load(&f->cancel_cbs), 1);
    for (int i = 0; i < N; i++) {
        uint32_t n = 0;
        ProtobufCMessage *m = NULL;
        int rc;
        /* Whatever was in flight, then a failure. */
        while ((rc = rpc_stream_next(s[i], 5 * TD_NS_PER_S, &m)) == 0 && m) {
            protobuf_c_message_free_unpacked(m, NULL);
            n++;
        }
        assert_true(rc == TD_EUNAVAILABLE || rc == TD_ECANCELED);
        rpc_stream_free(s[i]);
    }
    ProtobufCMessage *m = NULL;
    int rc = rpc_stream_next(parked, 5 * TD_NS_PER_S, &m);
    assert_true(rc == TD_EUNAVAILABLE || rc == TD_ECANCELED);
    rpc_stream_free(parked);
    rpc_client_free(c);
}

static const char *g_argv0;

/* A worker process that dies (SIGKILL) mid-stream: the client hears of it
 * promptly from the closed connection, not at its deadline. The server runs in
 * a fresh process (this binary re-executed with --serve) so gRPC state is not
 * shared across fork(). */
static void test_server_killed_mid_stream(void **state)
{
    (void)state;
    int fds[2];
    assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 1);
        execl(g_argv0, g_argv0, "--serve", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    char line[32] = {0};
    size_t got = 0;
    while (got < sizeof(line) - 1) {
        ssize_t r = read(fds[0], line + got, 1);
        if (r <= 0 || line[got] == '\n') break;
        got++;
    }
    close(fds[0]);
    int port = atoi(line);
    assert_true(port > 0);
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);

    rpc_client *c;
    assert_int_equal(rpc_client_create(target, &c), 0);
    rpc_stream *s;
    assert_int_equal(open_generate(c, 0, 1000, td_now_ns() + 30 * TD_NS_PER_S, &s), 0);
    for (int i = 0; i < 5; i++) {
        ProtobufCMessage *m = NULL;
        assert_int_equal(rpc_stream_next(s, 5 * TD_NS_PER_S, &m), 0);
        assert_non_null(m);
        protobuf_c_message_free_unpacked(m, NULL);
    }
    int64_t t0 = td_now_ns();
    assert_int_equal(kill(pid, SIGKILL), 0);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    uint32_t n = 0;
    assert_int_equal(drain_from(s, 5, &n), TD_EUNAVAILABLE);
    assert_true(td_now_ns() - t0 < TD_NS_PER_S);
    rpc_stream_free(s);
    rpc_client_free(c);
}

/* --serve: the server half of test_server_killed_mid_stream. */
static int serve_forever(void)
{
    void *state = NULL;
    if (fixture_setup(&state) != 0) return 1;
    fixture *f = state;
    printf("%d\n", rpc_server_port(f->srv));
    fflush(stdout);
    for (;;)
        pause();
}

static void test_status_mapping(void **state)
{
    (void)state;
    assert_int_equal(rpc_err_from_grpc(GRPC_STATUS_OK), 0);
    assert_int_equal(rpc_err_from_grpc(GRPC_STATUS_UNAVAILABLE), TD_EUNAVAILABLE);
    assert_int_equal(rpc_err_from_grpc(GRPC_STATUS_DEADLINE_EXCEEDED), TD_ETIMEDOUT);
    assert_int_equal(rpc_err_from_grpc(GRPC_STATUS_CANCELLED), TD_ECANCELED);
    assert_int_equal(rpc_err_from_grpc(GRPC_STATUS_INVALID_ARGUMENT), TD_EINVAL);
    assert_int_equal(rpc_err_from_grpc(GRPC_STATUS_UNIMPLEMENTED), TD_EUNSUPPORTED);
    assert_int_equal(rpc_err_from_grpc(9999), TD_EINTERNAL);
    assert_int_equal(rpc_grpc_from_err(0), GRPC_STATUS_OK);
    assert_int_equal(rpc_grpc_from_err(TD_EINVAL), GRPC_STATUS_INVALID_ARGUMENT);
    assert_int_equal(rpc_grpc_from_err(TD_ETIMEDOUT), GRPC_STATUS_DEADLINE_EXCEEDED);
    assert_int_equal(rpc_grpc_from_err(TD_EDECLINED), GRPC_STATUS_RESOURCE_EXHAUSTED);
    assert_int_equal(rpc_grpc_from_err(TD_EMISMATCH), GRPC_STATUS_FAILED_PRECONDITION);
    /* Every TD code maps to a status that maps back to a TD code. */
    for (int e = TD_EINVAL; e >= TD_ETOOLONG; e--)
        assert_true(rpc_err_from_grpc(rpc_grpc_from_err(e)) < 0);

    /* RequestMeta.timeout_ms <-> deadlines. */
    assert_int_equal(rpc_deadline_from_timeout_ms(0), RPC_NO_DEADLINE);
    assert_int_equal(rpc_deadline_from_timeout_ms(UINT64_MAX), RPC_NO_DEADLINE);
    int64_t d = rpc_deadline_from_timeout_ms(1500);
    assert_true(d > td_now_ns() + 1400 * TD_NS_PER_MS && d <= td_now_ns() + 1500 * TD_NS_PER_MS);
    uint64_t left = rpc_timeout_ms_left(d);
    assert_true(left >= 1400 && left <= 1500);
    assert_int_equal(rpc_timeout_ms_left(RPC_NO_DEADLINE), 0);
    assert_int_equal(rpc_timeout_ms_left(td_now_ns() - TD_NS_PER_S), 1);

    /* Bad arguments are refused, not crashed on. */
    rpc_server *srv = NULL;
    assert_int_equal(rpc_server_create(NULL, &srv), TD_EINVAL);
    assert_int_equal(rpc_server_create("unix:/nonexistent-dir/tandem.sock", &srv), TD_EIO);
    assert_null(srv);
    rpc_client *c = NULL;
    assert_int_equal(rpc_client_create(NULL, &c), TD_EINVAL);
    rpc_server_free(NULL);
    rpc_client_free(NULL);
    rpc_stream_free(NULL);
}

int main(int argc, char **argv)
{
    g_argv0 = argv[0];
    if (argc > 1 && strcmp(argv[1], "--serve") == 0) return serve_forever();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_mapping),
        cmocka_unit_test_setup_teardown(test_unary_round_trip, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_stream_10000_in_order, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_deadline_exceeded, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_client_cancel_mid_stream, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_stream_wait_and_error_end, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test(test_server_absent_unavailable),
        cmocka_unit_test(test_server_killed_mid_stream),
        cmocka_unit_test_setup_teardown(test_garbage_invalid_argument, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_64_concurrent_streams, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_shutdown_with_calls_in_flight, fixture_setup,
                                        fixture_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
