/* tandem-router-bench: what the router adds. A stand-in worker in this
 * process answers Decode.Generate at once (T one-token messages, then the
 * final one) and registers with a real tandem-router as a prefill and a
 * decode worker. Measured in the same run:
 *   1. latency of a streaming request sent straight to the stand-in vs
 *      through the router (Router.Generate), alternating, p50/p99 of each and
 *      of what the router adds;
 *   2. requests per second through the router with C requests in flight,
 *      beside the same load sent straight to the stand-in.
 * --admission NAME runs the router with that admission policy; with
 * --compare-admission NAME a second router runs NAME beside it, the stand-in
 * registers with both, and every round sends one request straight, one
 * through each router (their order alternating), so the two policies'
 * added latencies come from the same moments of the same machine. */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/rpc.h"
#include "proto/health.pb-c.h"
#include "proto/tandem.pb-c.h"

struct rb_opts {
    const char *router_bin, *admission, *compare_admission, *cost_model, *router_config;
    int64_t requests, concurrency, tokens;
};

#define RB_OPT(name, type, def, min, max, help, field)                                             \
    {                                                                                              \
        name, type, def, min, max, NULL, help, offsetof(struct rb_opts, field), 0                  \
    }

static const struct cfg_option rb_table[] = {
    RB_OPT("router-bin", CFG_STRING, "build/bin/tandem-router", NULL, NULL,
           "The tandem-router binary to measure", router_bin),
    RB_OPT("requests", CFG_INT64, "2000", "10", "10000000", "Requests per measurement", requests),
    RB_OPT("concurrency", CFG_INT64, "64", "1", "4096", "Requests in flight for the rate",
           concurrency),
    RB_OPT("tokens", CFG_INT64, "8", "1", "4096", "Token messages per request", tokens),
    RB_OPT("admission", CFG_STRING, "none", NULL, NULL, "The router's --admission", admission),
    RB_OPT("compare-admission", CFG_STRING, "", NULL, NULL,
           "A second router with this --admission, measured beside the first", compare_admission),
    RB_OPT("cost-model", CFG_STRING, "", NULL, NULL, "The routers' --cost-model (empty: none)",
           cost_model),
    RB_OPT("router-config", CFG_STRING, "", NULL, NULL,
           "The routers' --config (empty: none): admission keys such as burst's speed-step",
           router_config),
};

static int g_tokens = 8;

/* ---- the stand-in worker ---- */

static void sw_generate(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    (void)req;
    (void)arg;
    uint32_t tok = 7;
    Tandem__V1__DecodeResponse m = TANDEM__V1__DECODE_RESPONSE__INIT;
    m.n_token_ids = 1;
    m.token_ids = &tok;
    for (int i = 0; i + 1 < g_tokens; i++)
        rpc_call_send(call, &m.base);
    m.finish_reason = TANDEM__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    rpc_call_send(call, &m.base);
    rpc_call_finish(call, 0, NULL);
}

static void sw_health(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    (void)req;
    (void)arg;
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    rpc_call_reply(call, &r.base);
}

static int sw_register(rpc_client *router, const char *id, int role, const char *addr)
{
    Tandem__V1__RegisterRequest q = TANDEM__V1__REGISTER_REQUEST__INIT;
    q.worker_id = (char *)id;
    q.role = role;
    q.rpc_address = (char *)addr;
    q.max_model_len = 1 << 20;
    ProtobufCMessage *resp = NULL;
    int rc = rpc_client_unary(router, "/tandem.v1.Router/RegisterWorker", &q.base,
                              &tandem__v1__register_response__descriptor,
                              td_now_ns() + 2000000000LL, &resp, NULL);
    if (rc == 0) protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

/* ---- clients ---- */

static int efd = -1;

static void on_notify(rpc_stream *s, void *arg)
{
    (void)s;
    (void)arg;
    uint64_t one = 1;
    (void)!write(efd, &one, sizeof(one));
}

static uint32_t prompt_ids[4] = {1, 2, 3, 4};

static int start_call(rpc_client *c, bool via_router, rpc_stream **out)
{
    if (via_router) {
        Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
        Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
        sp.max_tokens = (uint32_t)g_tokens;
        q.n_prompt_token_ids = 4;
        q.prompt_token_ids = prompt_ids;
        q.sampling = &sp;
        return rpc_client_stream(c, "/tandem.v1.Router/Generate", &q.base,
                                 &tandem__v1__generate_response__descriptor, RPC_NO_DEADLINE,
                                 on_notify, NULL, out);
    }
    Tandem__V1__RequestMeta meta = TANDEM__V1__REQUEST_META__INIT;
    meta.request_id = "bench";
    Tandem__V1__DecodeRequest q = TANDEM__V1__DECODE_REQUEST__INIT;
    q.meta = &meta;
    q.n_prompt_token_ids = 4;
    q.prompt_token_ids = prompt_ids;
    q.prefill_address = "x";
    return rpc_client_stream(c, "/tandem.v1.Decode/Generate", &q.base,
                             &tandem__v1__decode_response__descriptor, RPC_NO_DEADLINE, on_notify,
                             NULL, out);
}

/* Reads s to its end; 0 when it ended OK, -1 on error, 1 when not yet. */
static int drain(rpc_stream *s, int64_t wait_ns)
{
    for (;;) {
        ProtobufCMessage *m = NULL;
        int rc = wait_ns == 0 ? rpc_stream_poll(s, &m) : rpc_stream_next(s, wait_ns, &m);
        if (rc == RPC_PENDING) return 1;
        if (rc != 0) return -1;
        if (!m) return 0;
        protobuf_c_message_free_unpacked(m, NULL);
    }
}

static double one_request(rpc_client *c, bool via_router)
{
    rpc_stream *s = NULL;
    int64_t t0 = td_now_ns();
    if (start_call(c, via_router, &s) != 0) return -1;
    int rc = drain(s, -1);
    double us = (double)(td_now_ns() - t0) / 1000.0;
    rpc_stream_free(s);
    return rc == 0 ? us : -1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
    qsort(v, n, sizeof(*v), cmp_double);
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i];
}

/* n requests with `conc` in flight; returns requests/s. */
static double rate(rpc_client *c, bool via_router, int n, int conc, int *failed)
{
    rpc_stream **open = calloc((size_t)conc, sizeof(*open));
    int started = 0, done = 0;
    *failed = 0;
    int64_t t0 = td_now_ns();
    while (done < n) {
        for (int i = 0; i < conc; i++)
            if (!open[i] && started < n) {
                if (start_call(c, via_router, &open[i]) != 0) {
                    (*failed)++;
                    done++;
                    open[i] = NULL;
                }
                started++;
            }
        struct pollfd p = {.fd = efd, .events = POLLIN};
        (void)poll(&p, 1, 100);
        uint64_t v;
        (void)!read(efd, &v, sizeof(v));
        for (int i = 0; i < conc; i++) {
            if (!open[i]) continue;
            int rc = drain(open[i], 0);
            if (rc == 1) continue;
            if (rc < 0) (*failed)++;
            rpc_stream_free(open[i]);
            open[i] = NULL;
            done++;
        }
    }
    double s = td_ns_to_s(td_now_ns() - t0);
    free(open);
    return n / s;
}

/* One router as a child process: its pid, its stdout (kept open: closing it
 * would end the child on its next write) and its gRPC address. 0 or -1. */
struct rb_router {
    pid_t pid;
    FILE *out;
    char addr[64];
};

static int start_router(const struct rb_opts *o, const char *admission, struct rb_router *r)
{
    int pipefd[2];
    if (pipe(pipefd) != 0) return -1;
    r->pid = fork();
    if (r->pid < 0) return -1;
    if (r->pid == 0) {
        dup2(pipefd[1], 1);
        close(pipefd[0]);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 2);
        const char *argv[16] = {o->router_bin,   "--grpc-listen", "127.0.0.1:0",
                                "--http-listen", "127.0.0.1:0",   "--heartbeat-ms",
                                "60000",         "--admission",   admission};
        int argc = 9;
        if (o->cost_model[0]) {
            argv[argc++] = "--cost-model";
            argv[argc++] = o->cost_model;
        }
        if (o->router_config[0]) {
            argv[argc++] = "--config";
            argv[argc++] = o->router_config;
        }
        argv[argc] = NULL;
        execv(o->router_bin, (char *const *)argv);
        _exit(127);
    }
    close(pipefd[1]);
    char line[512] = "";
    r->out = fdopen(pipefd[0], "r");
    if (!r->out || !fgets(line, sizeof(line), r->out)) {
        fprintf(stderr, "tandem-router-bench: %s --admission %s did not start\n", o->router_bin,
                admission);
        return -1;
    }
    char *g = strstr(line, "grpc=");
    if (!g || sscanf(g, "grpc=%63s", r->addr) != 1) return -1;
    return 0;
}

static void stop_router(struct rb_router *r)
{
    if (r->pid > 0) {
        kill(r->pid, SIGTERM);
        waitpid(r->pid, NULL, 0);
    }
    if (r->out) fclose(r->out);
}

/* Registers the stand-in with router as both roles, then waits until the
 * router has health-checked it and serves. 0 or -1. */
static int join_router(rpc_client *router, const char *sw_addr)
{
    if (sw_register(router, "bench-prefill", TANDEM__V1__WORKER_ROLE__WORKER_ROLE_PREFILL,
                    sw_addr) != 0 ||
        sw_register(router, "bench-decode", TANDEM__V1__WORKER_ROLE__WORKER_ROLE_DECODE, sw_addr) !=
            0) {
        fprintf(stderr, "tandem-router-bench: registration failed\n");
        return -1;
    }
    double probe = -1;
    for (int i = 0; i < 100 && probe < 0; i++) {
        probe = one_request(router, true);
        if (probe < 0) usleep(20000);
    }
    if (probe < 0) {
        fprintf(stderr, "tandem-router-bench: the router never served\n");
        return -1;
    }
    for (int i = 0; i < 200; i++) /* warm the path */
        one_request(router, true);
    return 0;
}

int main(int argc, char **argv)
{
    struct rb_opts o;
    cfg *conf = NULL;
    if (cfg_create(&conf, "tandem-router-bench", rb_table, sizeof(rb_table) / sizeof(rb_table[0]),
                   &o) != 0)
        return 2;
    int rc = cfg_parse(conf, argc, argv);
    if (rc == CFG_HELP) {
        printf("%s", cfg_help(conf));
        cfg_free(conf);
        return 0;
    }
    if (rc != 0) {
        fprintf(stderr, "tandem-router-bench: %s\n", cfg_error(conf));
        cfg_free(conf);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    g_tokens = (int)o.tokens;
    efd = eventfd(0, EFD_NONBLOCK);

    rpc_server *sw = NULL;
    if (rpc_server_create("127.0.0.1:0", &sw) != 0 ||
        rpc_server_add_method(sw, "/tandem.v1.Decode/Generate",
                              &tandem__v1__decode_request__descriptor, sw_generate, NULL) != 0 ||
        rpc_server_add_method(sw, "/grpc.health.v1.Health/Check",
                              &grpc__health__v1__health_check_request__descriptor, sw_health,
                              NULL) != 0 ||
        rpc_server_start(sw) != 0) {
        fprintf(stderr, "tandem-router-bench: cannot start the stand-in worker\n");
        return 1;
    }
    char sw_addr[64];
    snprintf(sw_addr, sizeof(sw_addr), "127.0.0.1:%d", rpc_server_port(sw));

    bool two = o.compare_admission[0] != '\0';
    struct rb_router ra = {0}, rb = {0};
    rpc_client *router = NULL, *router_b = NULL, *direct = NULL;
    int ret = 1;
    size_t n = (size_t)o.requests;
    double *d = calloc(n, sizeof(double)), *r = calloc(n, sizeof(double)),
           *add = calloc(n, sizeof(double)), *r2 = calloc(n, sizeof(double)),
           *add2 = calloc(n, sizeof(double)), *diff = calloc(n, sizeof(double));
    if (!d || !r || !add || !r2 || !add2 || !diff) goto out;
    if (start_router(&o, o.admission, &ra) != 0) goto out;
    if (two && start_router(&o, o.compare_admission, &rb) != 0) goto out;
    if (rpc_client_create(ra.addr, &router) != 0 || rpc_client_create(sw_addr, &direct) != 0 ||
        (two && rpc_client_create(rb.addr, &router_b) != 0))
        goto out;
    if (join_router(router, sw_addr) != 0 || (two && join_router(router_b, sw_addr) != 0)) goto out;
    for (int i = 0; i < 200; i++) /* warm the direct path */
        one_request(direct, false);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        double a = one_request(direct, false), b, c = 0;
        if (two && (i & 1)) {
            c = one_request(router_b, true);
            b = one_request(router, true);
        } else {
            b = one_request(router, true);
            if (two) c = one_request(router_b, true);
        }
        if (a < 0 || b < 0 || c < 0) continue;
        d[k] = a;
        r[k] = b;
        add[k] = b - a;
        r2[k] = c;
        add2[k] = c - a;
        diff[k] = c - b;
        k++;
    }
    if (k == 0) {
        fprintf(stderr, "tandem-router-bench: every request failed\n");
        goto out;
    }
    printf("streaming request of %d token messages, %zu rounds sent one at a time:\n", g_tokens, k);
    printf("  straight to the worker:   p50 %8.1f us  p99 %8.1f us\n", pct(d, k, 0.5),
           pct(d, k, 0.99));
    printf("  through the router (admission %s): p50 %8.1f us  p99 %8.1f us\n", o.admission,
           pct(r, k, 0.5), pct(r, k, 0.99));
    printf("  added by the router (admission %s): p50 %8.1f us  p99 %8.1f us   (target p99 <= "
           "500 us)\n",
           o.admission, pct(add, k, 0.5), pct(add, k, 0.99));
    if (two) {
        printf("  through the router (admission %s): p50 %8.1f us  p99 %8.1f us\n",
               o.compare_admission, pct(r2, k, 0.5), pct(r2, k, 0.99));
        printf("  added by the router (admission %s): p50 %8.1f us  p99 %8.1f us\n",
               o.compare_admission, pct(add2, k, 0.5), pct(add2, k, 0.99));
        printf("  %s minus %s: p99 of added %+8.1f us, p50 of added %+8.1f us, "
               "p50 of per-round difference %+8.1f us\n",
               o.compare_admission, o.admission, pct(add2, k, 0.99) - pct(add, k, 0.99),
               pct(add2, k, 0.5) - pct(add, k, 0.5), pct(diff, k, 0.5));
    }
    int f1 = 0, f2 = 0, f3 = 0;
    double direct_rps = rate(direct, false, (int)n, (int)o.concurrency, &f1);
    double router_rps = rate(router, true, (int)n, (int)o.concurrency, &f2);
    printf("%lld requests, %lld in flight:\n", (long long)n, (long long)o.concurrency);
    printf("  straight to the worker: %8.0f req/s (%d failed)\n", direct_rps, f1);
    printf("  through the router (admission %s): %8.0f req/s (%d failed), %.2fx   (target >= "
           "5000 req/s)\n",
           o.admission, router_rps, f2, router_rps / direct_rps);
    if (two) {
        double b_rps = rate(router_b, true, (int)n, (int)o.concurrency, &f3);
        printf("  through the router (admission %s): %8.0f req/s (%d failed), %.2fx\n",
               o.compare_admission, b_rps, f3, b_rps / direct_rps);
    }
    ret = 0;
out:
    stop_router(&ra);
    stop_router(&rb);
    rpc_client_free(router);
    rpc_client_free(router_b);
    rpc_client_free(direct);
    rpc_server_free(sw);
    free(d);
    free(r);
    free(add);
    free(r2);
    free(add2);
    free(diff);
    cfg_free(conf);
    return ret;
}
