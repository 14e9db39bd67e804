/* worker library: membership against a real gRPC Router service on
 * loopback (registration fields, heartbeats carrying the load, re-register
 * when the router forgets, drain), the health service, the metrics endpoint,
 * the sampling parameters both workers build. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "proto/health.pb-c.h"
#include "proto/tandem.pb-c.h"
#include "worker/wrk.h"

/* A router that records what workers say. */
typedef struct fake_router {
    pthread_mutex_t mu;
    int registers, heartbeats;
    char worker_id[128], rpc_address[128], kv_endpoint[128];
    uint32_t total_blocks, block_size, free_blocks_seen;
    int forget_next; /* answer the next heartbeat with known = false */
    int drain;
} fake_router;

static void on_register(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    fake_router *f = arg;
    const Tandem__V1__RegisterRequest *r = (const void *)req;
    pthread_mutex_lock(&f->mu);
    f->registers++;
    snprintf(f->worker_id, sizeof(f->worker_id), "%s", r->worker_id);
    snprintf(f->rpc_address, sizeof(f->rpc_address), "%s", r->rpc_address);
    snprintf(f->kv_endpoint, sizeof(f->kv_endpoint), "%s", r->kv_endpoint);
    f->total_blocks = r->total_kv_blocks;
    f->block_size = r->kv_shape ? r->kv_shape->block_size : 0;
    pthread_mutex_unlock(&f->mu);
    Tandem__V1__RegisterResponse resp = TANDEM__V1__REGISTER_RESPONSE__INIT;
    resp.accepted = 1;
    resp.epoch = 42;
    resp.heartbeat_interval_ms = 50;
    rpc_call_reply(call, &resp.base);
}

static void on_heartbeat(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    fake_router *f = arg;
    const Tandem__V1__HeartbeatRequest *h = (const void *)req;
    Tandem__V1__HeartbeatResponse resp = TANDEM__V1__HEARTBEAT_RESPONSE__INIT;
    pthread_mutex_lock(&f->mu);
    f->heartbeats++;
    if (h->load) f->free_blocks_seen = h->load->free_kv_blocks;
    resp.known = h->epoch == 42 && !f->forget_next;
    f->forget_next = 0;
    resp.drain = f->drain;
    pthread_mutex_unlock(&f->mu);
    rpc_call_reply(call, &resp.base);
}

static int wait_for(fake_router *f, int *field, int at_least)
{
    for (int i = 0; i < 400; i++) {
        pthread_mutex_lock(&f->mu);
        int v = *field;
        pthread_mutex_unlock(&f->mu);
        if (v >= at_least) return 1;
        usleep(10000);
    }
    return 0;
}

static void test_membership(void **state)
{
    (void)state;
    fake_router f = {.registers = 0};
    pthread_mutex_init(&f.mu, NULL);
    rpc_server *srv = NULL;
    assert_int_equal(rpc_server_create("127.0.0.1:0", &srv), 0);
    assert_int_equal(rpc_server_add_method(srv, "/tandem.v1.Router/RegisterWorker",
                                           &tandem__v1__register_request__descriptor, on_register,
                                           &f),
                     0);
    assert_int_equal(rpc_server_add_method(srv, "/tandem.v1.Router/Heartbeat",
                                           &tandem__v1__heartbeat_request__descriptor, on_heartbeat,
                                           &f),
                     0);
    assert_int_equal(rpc_server_start(srv), 0);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", rpc_server_port(srv));

    kv_layout l = {.n_layers = 2,
                   .num_blocks = 77,
                   .block_size = 16,
                   .n_kv_heads = 2,
                   .head_dim = 8,
                   .dtype = KV_DTYPE_F32};
    wrk_load load;
    memset(&load, 0, sizeof(load));
    atomic_store(&load.free_kv_blocks, 70);
    atomic_store(&load.total_kv_blocks, 77);
    _Atomic int drain = 0;
    wrk_member_info mi = {.role = WRK_DECODE,
                          .worker_id = "decode-7",
                          .rpc_address = "127.0.0.1:1234",
                          .kv_endpoint = "127.0.0.1:5678",
                          .kv_transport = "tcp",
                          .model = "m",
                          .layout = &l,
                          .fingerprint = 0xabc,
                          .max_running_seqs = 8,
                          .max_batch_tokens = 64};
    wrk_member *m = NULL;
    assert_int_equal(wrk_member_start(addr, &mi, &load, &drain, &m), 0);
    assert_true(wait_for(&f, &f.registers, 1));
    assert_true(wait_for(&f, &f.heartbeats, 2));
    pthread_mutex_lock(&f.mu);
    assert_string_equal(f.worker_id, "decode-7");
    assert_string_equal(f.rpc_address, "127.0.0.1:1234");
    assert_string_equal(f.kv_endpoint, "127.0.0.1:5678");
    assert_int_equal(f.total_blocks, 77);
    assert_int_equal(f.block_size, 16);
    assert_int_equal(f.free_blocks_seen, 70);
    /* The router forgets the worker: it registers again. */
    f.forget_next = 1;
    pthread_mutex_unlock(&f.mu);
    assert_true(wait_for(&f, &f.registers, 2));
    /* The router asks for a drain. */
    pthread_mutex_lock(&f.mu);
    f.drain = 1;
    int beats = f.heartbeats;
    pthread_mutex_unlock(&f.mu);
    assert_true(wait_for(&f, &f.heartbeats, beats + 2));
    assert_int_equal(atomic_load(&drain), 1);
    wrk_member_stop(m);
    rpc_server_free(srv);
    pthread_mutex_destroy(&f.mu);
}

/* A router that is down: the worker keeps trying and stops cleanly. */
static void test_membership_router_down(void **state)
{
    (void)state;
    kv_layout l = {
        .n_layers = 1, .num_blocks = 4, .block_size = 16, .n_kv_heads = 1, .head_dim = 4};
    wrk_load load;
    memset(&load, 0, sizeof(load));
    wrk_member_info mi = {.role = WRK_PREFILL,
                          .worker_id = "p",
                          .rpc_address = "a",
                          .kv_endpoint = "",
                          .kv_transport = "tcp",
                          .model = "m",
                          .layout = &l};
    wrk_member *m = NULL;
    assert_int_equal(wrk_member_start("127.0.0.1:1", &mi, &load, NULL, &m), 0);
    usleep(100000);
    int64_t t0 = td_now_ns();
    wrk_member_stop(m);
    assert_true(td_now_ns() - t0 < 3000000000LL);
}

static void test_health(void **state)
{
    (void)state;
    wrk_health h;
    atomic_store(&h.status, WRK_NOT_SERVING);
    rpc_server *srv = NULL;
    assert_int_equal(rpc_server_create("127.0.0.1:0", &srv), 0);
    assert_int_equal(wrk_health_add(srv, &h), 0);
    assert_int_equal(rpc_server_start(srv), 0);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", rpc_server_port(srv));
    rpc_client *c = NULL;
    assert_int_equal(rpc_client_create(addr, &c), 0);
    for (int round = 0; round < 2; round++) {
        Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        q.service = "";
        ProtobufCMessage *resp = NULL;
        assert_int_equal(rpc_client_unary(c, "/grpc.health.v1.Health/Check", &q.base,
                                          &grpc__health__v1__health_check_response__descriptor,
                                          td_now_ns() + 2000000000LL, &resp, NULL),
                         0);
        Grpc__Health__V1__HealthCheckResponse *r = (void *)resp;
        assert_int_equal(r->status, round == 0 ? 2 /* NOT_SERVING */ : 1 /* SERVING */);
        protobuf_c_message_free_unpacked(resp, NULL);
        atomic_store(&h.status, WRK_SERVING);
    }
    Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    q.service = "no.such.Service";
    ProtobufCMessage *resp = NULL;
    assert_int_equal(rpc_client_unary(c, "/grpc.health.v1.Health/Check", &q.base,
                                      &grpc__health__v1__health_check_response__descriptor,
                                      td_now_ns() + 2000000000LL, &resp, NULL),
                     TD_ENOENT);
    rpc_client_free(c);
    rpc_server_free(srv);
}

/* The idle trim: not before a request ended, then at most once per
 * WRK_HEAP_TRIM_NS, and not again while nothing else ended. */
static void test_heap_idle(void **state)
{
    (void)state;
    wrk_heap h = {0};
    int64_t t = 5 * TD_NS_PER_S;
    assert_int_equal(wrk_heap_idle(&h, 0, t), 0); /* nothing ended yet */
    assert_int_equal(wrk_heap_idle(&h, 3, t), 1); /* first trim */
    assert_int_equal(h.trims, 1);
    assert_true(h.last_trim_ns >= 0);
    assert_int_equal(wrk_heap_idle(&h, 3, t + 2 * WRK_HEAP_TRIM_NS), 0); /* none ended since */
    assert_int_equal(wrk_heap_idle(&h, 4, t + WRK_HEAP_TRIM_NS - 1), 0); /* too soon */
    assert_int_equal(wrk_heap_idle(&h, 4, t + WRK_HEAP_TRIM_NS), 1);
    assert_int_equal(h.trims, 2);
    /* What a trim gives back is the allocator's business; that it leaves
     * live memory alone is checked by using some across one. */
    char *keep = malloc(1 << 20);
    assert_non_null(keep);
    memset(keep, 7, 1 << 20);
    for (int i = 0; i < 64; i++)
        free(malloc((size_t)(i + 1) * 4096));
    assert_int_equal(wrk_heap_idle(&h, 5, t + 3 * WRK_HEAP_TRIM_NS), 1);
    for (int i = 0; i < 1 << 20; i += 4096)
        assert_int_equal(keep[i], 7);
    free(keep);
}

static void test_sampling(void **state)
{
    (void)state;
    mdl_config mc;
    mdl_config_defaults(&mc);
    mc.vocab_size = 100;
    mc.eos_id = 2;
    mc.bos_id = 1;
    mc.format = MDL_FORMAT_LLAMA2C;
    int32_t ids[16];
    smp_params p;
    char err[128];
    assert_int_equal(wrk_sampling(&mc, NULL, 9, ids, 16, &p, err, sizeof(err)), 0);
    assert_true(p.temperature == 0.0f);
    assert_int_equal(p.seed, 9);
    assert_int_equal(p.eos_id, 2);
    assert_int_equal(p.n_stop_ids, 1); /* llama2.c: BOS stops */
    assert_int_equal(p.stop_ids[0], 1);
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    uint32_t stops[2] = {7, 100};
    sp.temperature = 0.5f;
    sp.has_seed = 1;
    sp.seed = 0;
    sp.n_stop_token_ids = 1;
    sp.stop_token_ids = stops;
    assert_int_equal(wrk_sampling(&mc, &sp, 9, ids, 16, &p, err, sizeof(err)), 0);
    assert_int_equal(p.seed, 0); /* 0 is a seed when has_seed */
    assert_int_equal(p.n_stop_ids, 2);
    assert_true(p.top_p == 1.0f);
    sp.n_stop_token_ids = 2; /* 100 is outside the vocabulary */
    assert_int_equal(wrk_sampling(&mc, &sp, 9, ids, 16, &p, err, sizeof(err)), TD_EINVAL);
    assert_non_null(strstr(err, "stop_token_ids[1]"));
    sp.n_stop_token_ids = 0;
    sp.ignore_eos = 1; /* lifts the llama2.c BOS stop too, as in tandem-generate */
    assert_int_equal(wrk_sampling(&mc, &sp, 9, ids, 16, &p, err, sizeof(err)), 0);
    assert_int_equal(p.n_stop_ids, 0);
    sp.ignore_eos = 0;
    sp.top_p = 1.5f;
    assert_int_equal(wrk_sampling(&mc, &sp, 9, ids, 16, &p, err, sizeof(err)), TD_EINVAL);
}

/* A failed KV transfer's status: the request's own deadline first, whatever
 * kvx reported; then a cancel; anything else is retryable. */
static void test_kv_failure_status(void **state)
{
    (void)state;
    int64_t past = td_now_ns() - 1, later = td_now_ns() + 60 * TD_NS_PER_S;
    assert_int_equal(wrk_kv_failure_status(TD_ECANCELED, past), TD_ETIMEDOUT);
    assert_int_equal(wrk_kv_failure_status(TD_ECONNRESET, past), TD_ETIMEDOUT);
    assert_int_equal(wrk_kv_failure_status(TD_ECANCELED, later), TD_ECANCELED);
    assert_int_equal(wrk_kv_failure_status(TD_ECANCELED, RPC_NO_DEADLINE), TD_ECANCELED);
    /* kvx's own stall timeout is not the request's deadline */
    assert_int_equal(wrk_kv_failure_status(TD_ETIMEDOUT, later), TD_EUNAVAILABLE);
    assert_int_equal(wrk_kv_failure_status(TD_ETIMEDOUT, RPC_NO_DEADLINE), TD_EUNAVAILABLE);
    assert_int_equal(wrk_kv_failure_status(TD_EPROTO, later), TD_EUNAVAILABLE);
}

static void test_metrics_endpoint(void **state)
{
    (void)state;
    wrk_metrics m;
    assert_int_equal(wrk_metrics_init(&m), 0);
    wrk_load load;
    memset(&load, 0, sizeof(load));
    atomic_store(&load.free_kv_blocks, 5);
    atomic_store(&load.total_kv_blocks, 9);
    atomic_store(&load.prefix_hit_blocks, 3);
    wrk_health h;
    atomic_store(&h.status, WRK_SERVING);
    wrk_metrics_outcome(&m, "ok");
    wrk_http *w = NULL;
    assert_int_equal(wrk_http_start("127.0.0.1:0", &m, &load, &h, &w), 0);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)wrk_http_port(w))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    const char *q = "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n";
    assert_int_equal(write(fd, q, strlen(q)), (ssize_t)strlen(q));
    static char buf[65536];
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof(buf) - 1 - n);
        if (r <= 0) break;
        n += (size_t)r;
    }
    buf[n] = '\0';
    close(fd);
    assert_non_null(strstr(buf, "tandem_kv_blocks_free 5"));
    assert_non_null(strstr(buf, "tandem_kv_blocks_total 9"));
    assert_non_null(strstr(buf, "tandem_prefix_cache_hit_blocks_total 3"));
    assert_non_null(strstr(buf, "tandem_requests_total{outcome=\"ok\"} 1"));
    wrk_http_stop(w);
    wrk_metrics_free(&m);
}

int main(void)
{
    wrk_signals_block();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_membership),
        cmocka_unit_test(test_membership_router_down),
        cmocka_unit_test(test_health),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_heap_idle),
        cmocka_unit_test(test_metrics_endpoint),
        cmocka_unit_test(test_kv_failure_status),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
