/* tandem-rpc-bench: cost of the gRPC layer (common/rpc) on loopback, printed
 * beside raw TCP moving the same bytes in the same run.
 *
 *   unary:  sequential round trips of a Prefill.Run-sized request (prompt of
 *           --tokens token ids) and its response; p50/p99 latency.
 *           Reference: TCP ping-pong of the same request and response sizes.
 *   stream: one Decode.Generate stream of --msgs one-token messages sent by an
 *           engine thread through rpc_call_send; messages per second.
 *           Reference: the same frames over one TCP connection, one write(2)
 *           per message, read back by a reader thread.
 *
 * Client and server run in this process (one client thread, the server's CQ
 * thread, an engine thread), like the TCP reference (two threads).
 *
 *   tandem-rpc-bench [--seconds S] [--tokens N] [--msgs M]
 */
#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/log.h"
#include "common/rpc.h"
#include "proto/tandem.pb-c.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define M_RUN       "/tandem.v1.Prefill/Run"
#define M_GENERATE  "/tandem.v1.Decode/Generate"
#define MAX_SAMPLES (1 << 20)

typedef struct opts {
    double seconds; /* per latency measurement */
    uint32_t tokens;
    uint32_t msgs;
} opts;

/* ------------------------------------------------------------------ stats -- */

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

typedef struct lat {
    int64_t *ns;
    size_t n;
    double p50_us, p99_us, mean_us;
} lat;

static void lat_finish(lat *l)
{
    qsort(l->ns, l->n, sizeof(int64_t), cmp_i64);
    double sum = 0;
    for (size_t i = 0; i < l->n; i++)
        sum += (double)l->ns[i];
    l->mean_us = l->n ? sum / (double)l->n / 1e3 : 0;
    l->p50_us = l->n ? (double)l->ns[l->n / 2] / 1e3 : 0;
    l->p99_us = l->n ? (double)l->ns[(size_t)((double)l->n * 0.99)] / 1e3 : 0;
}

/* ------------------------------------------------------------ gRPC server -- */

static size_t g_resp_bytes;

static void fill_response(Tandem__V1__PrefillResponse *resp, Tandem__V1__Timings *t)
{
    t->prefill_us = 12345;
    t->transfer_us = 2345;
    t->prefill_queue_us = 17;
    resp->first_token_id = 29871;
    resp->computed_tokens = 512;
    resp->blocks_sent = 22 * 32;
    resp->bytes_sent = 22ull * 32 * 65536;
    resp->timings = t;
}

static void on_run(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    Tandem__V1__PrefillResponse resp = TANDEM__V1__PREFILL_RESPONSE__INIT;
    Tandem__V1__Timings t = TANDEM__V1__TIMINGS__INIT;
    fill_response(&resp, &t);
    int rc = rpc_call_reply(call, &resp.base);
    if (rc < 0) fprintf(stderr, "reply failed: %s\n", td_strerror(rc));
}

typedef struct engine {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rpc_call *call; /* handed over by the handler */
    uint32_t msgs;
    bool stop;
} engine;

static void on_generate(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    engine *e = arg;
    const Tandem__V1__DecodeRequest *r = (const Tandem__V1__DecodeRequest *)req;
    pthread_mutex_lock(&e->mu);
    e->call = call;
    e->msgs = r->sampling ? r->sampling->max_tokens : 0;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

/* Sends each stream's messages from its own thread, as a decode engine does. */
static void *engine_main(void *arg)
{
    engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->call && !e->stop)
            pthread_cond_wait(&e->cv, &e->mu);
        if (!e->call) {
            pthread_mutex_unlock(&e->mu);
            return NULL;
        }
        rpc_call *call = e->call;
        uint32_t n = e->msgs;
        e->call = NULL;
        pthread_mutex_unlock(&e->mu);
        int rc = 0;
        for (uint32_t i = 0; i < n && rc == 0; i++) {
            Tandem__V1__DecodeResponse m = TANDEM__V1__DECODE_RESPONSE__INIT;
            uint32_t tok = 1000 + (i % 30000);
            m.n_token_ids = 1;
            m.token_ids = &tok;
            rc = rpc_call_send(call, &m.base);
        }
        rpc_call_finish(call, rc, NULL);
    }
}

static size_t stream_msg_bytes(void)
{
    Tandem__V1__DecodeResponse m = TANDEM__V1__DECODE_RESPONSE__INIT;
    uint32_t tok = 1000 + 12345;
    m.n_token_ids = 1;
    m.token_ids = &tok;
    return protobuf_c_message_get_packed_size(&m.base);
}

/* -------------------------------------------------------------- raw TCP -- */

static int tcp_listen(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 4) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static int tcp_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                            .sin_port = htons((uint16_t)port)};
    int one = 1;
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int read_full(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

typedef struct tcp_peer {
    int lfd;
    size_t req_bytes, resp_bytes; /* ping-pong: frame sizes without the 4-byte length */
    uint32_t msgs;                /* stream: frames to read */
    size_t msg_bytes;
    int64_t done_ns;
} tcp_peer;

/* Ping-pong server: reads length-prefixed requests, answers each with a
 * length-prefixed response of resp_bytes. */
static void *tcp_echo_main(void *arg)
{
    tcp_peer *p = arg;
    int fd = accept4(p->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return NULL;
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    uint8_t *buf = malloc(p->req_bytes + p->resp_bytes + 8);
    uint8_t *resp = buf + p->req_bytes + 4;
    uint32_t rlen = htonl((uint32_t)p->resp_bytes);
    memcpy(resp, &rlen, 4);
    memset(resp + 4, 0x5a, p->resp_bytes);
    for (;;) {
        uint32_t len;
        if (read_full(fd, &len, 4) < 0) break;
        len = ntohl(len);
        if (len > p->req_bytes || read_full(fd, buf, len) < 0) break;
        if (write_full(fd, resp, p->resp_bytes + 4) < 0) break;
    }
    free(buf);
    close(fd);
    return NULL;
}

/* Stream reader: reads msgs length-prefixed frames with large reads, as a
 * buffered reader would. */
static void *tcp_sink_main(void *arg)
{
    tcp_peer *p = arg;
    int fd = accept4(p->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return NULL;
    size_t cap = 1 << 16, have = 0;
    uint8_t *buf = malloc(cap);
    uint32_t got = 0;
    while (got < p->msgs) {
        ssize_t r = read(fd, buf + have, cap - have);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        have += (size_t)r;
        size_t off = 0;
        while (have - off >= 4) {
            uint32_t len;
            memcpy(&len, buf + off, 4);
            len = ntohl(len);
            if (have - off < 4 + (size_t)len) break;
            off += 4 + len;
            got++;
        }
        memmove(buf, buf + off, have - off);
        have -= off;
    }
    p->done_ns = td_now_ns();
    free(buf);
    close(fd);
    return NULL;
}

/* ------------------------------------------------------------- measurements -- */

static int bench_grpc_unary(rpc_client *c, const Tandem__V1__PrefillRequest *req, double seconds,
                            lat *out)
{
    for (int i = 0; i < 200; i++) { /* warm-up: connection, allocator */
        ProtobufCMessage *resp;
        int rc = rpc_client_unary(c, M_RUN, &req->base, &tandem__v1__prefill_response__descriptor,
                                  td_now_ns() + 5 * TD_NS_PER_S, &resp, NULL);
        if (rc < 0) return rc;
        protobuf_c_message_free_unpacked(resp, NULL);
    }
    int64_t end = td_now_ns() + (int64_t)(seconds * 1e9);
    out->n = 0;
    while (out->n < MAX_SAMPLES) {
        int64_t t0 = td_now_ns();
        if (t0 >= end) break;
        ProtobufCMessage *resp;
        int rc = rpc_client_unary(c, M_RUN, &req->base, &tandem__v1__prefill_response__descriptor,
                                  t0 + 5 * TD_NS_PER_S, &resp, NULL);
        if (rc < 0) return rc;
        protobuf_c_message_free_unpacked(resp, NULL);
        out->ns[out->n++] = td_now_ns() - t0;
    }
    lat_finish(out);
    return 0;
}

static int bench_tcp_pingpong(size_t req_bytes, size_t resp_bytes, double seconds, lat *out)
{
    tcp_peer p = {.req_bytes = req_bytes, .resp_bytes = resp_bytes};
    int port;
    p.lfd = tcp_listen(&port);
    if (p.lfd < 0) return TD_EIO;
    pthread_t th;
    if (pthread_create(&th, NULL, tcp_echo_main, &p) != 0) {
        close(p.lfd);
        return TD_EIO;
    }
    int fd = tcp_connect(port);
    int rc = fd < 0 ? TD_EIO : 0;
    uint8_t *req = calloc(1, req_bytes + 4);
    uint8_t *resp = malloc(resp_bytes + 4);
    uint32_t len = htonl((uint32_t)req_bytes);
    memcpy(req, &len, 4);
    memset(req + 4, 0xa5, req_bytes);
    int64_t end = 0;
    out->n = 0;
    for (int i = -200; rc == 0 && out->n < MAX_SAMPLES; i++) {
        int64_t t0 = td_now_ns();
        if (i == 0)
            end = t0 + (int64_t)(seconds * 1e9);
        else if (i > 0 && t0 >= end)
            break;
        if (write_full(fd, req, req_bytes + 4) < 0 || read_full(fd, resp, 4) < 0 ||
            read_full(fd, resp + 4, ntohl(*(uint32_t *)resp)) < 0) {
            rc = TD_EIO;
            break;
        }
        if (i >= 0) out->ns[out->n++] = td_now_ns() - t0;
    }
    if (fd >= 0) close(fd);
    pthread_join(th, NULL);
    close(p.lfd);
    free(req);
    free(resp);
    if (rc == 0) lat_finish(out);
    return rc;
}

static int bench_grpc_stream(rpc_client *c, uint32_t msgs, double *per_s)
{
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = msgs;
    Tandem__V1__RequestMeta meta = TANDEM__V1__REQUEST_META__INIT;
    meta.request_id = "req-bench-stream";
    Tandem__V1__DecodeRequest req = TANDEM__V1__DECODE_REQUEST__INIT;
    req.meta = &meta;
    req.sampling = &sp;
    int64_t t0 = td_now_ns();
    rpc_stream *s;
    int rc = rpc_client_stream(c, M_GENERATE, &req.base, &tandem__v1__decode_response__descriptor,
                               RPC_NO_DEADLINE, NULL, NULL, &s);
    if (rc < 0) return rc;
    uint32_t got = 0;
    for (;;) {
        ProtobufCMessage *m;
        rc = rpc_stream_next(s, -1, &m);
        if (rc < 0 || !m) break;
        got++;
        protobuf_c_message_free_unpacked(m, NULL);
    }
    int64_t t1 = td_now_ns();
    rpc_stream_free(s);
    if (rc == 0 && got != msgs) rc = TD_EPROTO;
    *per_s = (double)got / td_ns_to_s(t1 - t0);
    return rc;
}

static int bench_tcp_stream(uint32_t msgs, size_t msg_bytes, double *per_s)
{
    tcp_peer p = {.msgs = msgs, .msg_bytes = msg_bytes};
    int port;
    p.lfd = tcp_listen(&port);
    if (p.lfd < 0) return TD_EIO;
    pthread_t th;
    if (pthread_create(&th, NULL, tcp_sink_main, &p) != 0) {
        close(p.lfd);
        return TD_EIO;
    }
    int fd = tcp_connect(port);
    int rc = fd < 0 ? TD_EIO : 0;
    uint8_t frame[256];
    uint32_t len = htonl((uint32_t)msg_bytes);
    memcpy(frame, &len, 4);
    memset(frame + 4, 0x11, msg_bytes);
    int64_t t0 = td_now_ns();
    for (uint32_t i = 0; rc == 0 && i < msgs; i++)
        if (write_full(fd, frame, msg_bytes + 4) < 0) rc = TD_EIO;
    pthread_join(th, NULL);
    if (fd >= 0) close(fd);
    close(p.lfd);
    *per_s = (double)msgs / td_ns_to_s(p.done_ns - t0);
    return rc;
}

/* -------------------------------------------------------------------- main -- */

/* The options as common/config parses them (flags or --config FILE). */
struct bench_opts {
    double seconds;
    int64_t tokens, msgs;
};

static const struct cfg_option bench_table[] = {
    {"seconds", CFG_DOUBLE, "3", "0.001", "600", NULL, "Seconds per latency measurement",
     offsetof(struct bench_opts, seconds), 0},
    {"tokens", CFG_INT64, "512", "0", "1000000", NULL, "Prompt length of each request (tokens)",
     offsetof(struct bench_opts, tokens), 0},
    {"msgs", CFG_INT64, "200000", "1", "4294967295", NULL, "Stream messages for the throughput run",
     offsetof(struct bench_opts, msgs), 0},
};

/* Returns 0, CFG_HELP (help printed) or a negative TD_E* code (error printed). */
static int parse_args(int argc, char **argv, opts *o)
{
    struct bench_opts b;
    cfg *c = NULL;
    int rc = cfg_create(&c, "tandem-rpc-bench", bench_table,
                        sizeof(bench_table) / sizeof(bench_table[0]), &b);
    if (rc != 0) return rc;
    rc = cfg_parse(c, argc, argv);
    int npos = 0;
    char *const *pos = cfg_positional(c, &npos);
    if (rc == CFG_HELP) {
        fputs(cfg_help(c), stdout);
    } else if (rc != 0) {
        fprintf(stderr, "tandem-rpc-bench: %s\n", cfg_error(c));
    } else if (npos > 0) {
        fprintf(stderr, "tandem-rpc-bench: unexpected argument '%s' (see --help)\n", pos[0]);
        rc = TD_EINVAL;
    } else {
        *o = (opts){.seconds = b.seconds, .tokens = (uint32_t)b.tokens, .msgs = (uint32_t)b.msgs};
    }
    cfg_free(c);
    return rc;
}

int main(int argc, char **argv)
{
    opts o;
    int prc = parse_args(argc, argv, &o);
    if (prc == CFG_HELP) return 0;
    if (prc != 0) return 2;
    if (!getenv("TANDEM_LOG_LEVEL")) td_log_set_level(TD_LOG_WARN);

    /* The request: a Prefill.Run of a prompt of o.tokens token ids. */
    uint32_t *prompt = malloc(sizeof(uint32_t) * (o.tokens ? o.tokens : 1));
    uint32_t *blocks = malloc(sizeof(uint32_t) * (o.tokens / 16 + 1));
    lat grpc_lat = {.ns = malloc(sizeof(int64_t) * MAX_SAMPLES)};
    lat tcp_lat = {.ns = malloc(sizeof(int64_t) * MAX_SAMPLES)};
    if (!prompt || !blocks || !grpc_lat.ns || !tcp_lat.ns) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (uint32_t i = 0; i < o.tokens; i++)
        prompt[i] = 1 + (i * 7919u) % 32000u; /* typical ids: 2-3 varint bytes */
    for (uint32_t i = 0; i < o.tokens / 16 + 1; i++)
        blocks[i] = 1000 + i;
    Tandem__V1__RequestMeta meta = TANDEM__V1__REQUEST_META__INIT;
    meta.request_id = "req-bench-000001";
    meta.timeout_ms = 30000;
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 256;
    Tandem__V1__KvDestination dest = TANDEM__V1__KV_DESTINATION__INIT;
    dest.decode_address = "127.0.0.1:7100";
    dest.kv_endpoint = "127.0.0.1:7101";
    dest.transport = "tcp";
    dest.n_block_ids = o.tokens / 16 + 1;
    dest.block_ids = blocks;
    Tandem__V1__PrefillRequest req = TANDEM__V1__PREFILL_REQUEST__INIT;
    req.meta = &meta;
    req.n_prompt_token_ids = o.tokens;
    req.prompt_token_ids = prompt;
    req.sampling = &sp;
    req.dest = &dest;
    size_t req_bytes = protobuf_c_message_get_packed_size(&req.base);
    Tandem__V1__PrefillResponse resp = TANDEM__V1__PREFILL_RESPONSE__INIT;
    Tandem__V1__Timings t = TANDEM__V1__TIMINGS__INIT;
    fill_response(&resp, &t);
    g_resp_bytes = protobuf_c_message_get_packed_size(&resp.base);
    size_t msg_bytes = stream_msg_bytes();

    engine e = {.call = NULL};
    pthread_mutex_init(&e.mu, NULL);
    pthread_cond_init(&e.cv, NULL);
    pthread_t eth;
    rpc_server *srv = NULL;
    rpc_client *cli = NULL;
    int rc = rpc_server_create("127.0.0.1:0", &srv);
    if (rc == 0)
        rc = rpc_server_add_method(srv, M_RUN, &tandem__v1__prefill_request__descriptor, on_run,
                                   NULL);
    if (rc == 0)
        rc = rpc_server_add_method(srv, M_GENERATE, &tandem__v1__decode_request__descriptor,
                                   on_generate, &e);
    if (rc == 0) rc = rpc_server_start(srv);
    if (rc == 0 && pthread_create(&eth, NULL, engine_main, &e) != 0) rc = TD_EIO;
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", rpc_server_port(srv));
    if (rc == 0) rc = rpc_client_create(target, &cli);
    if (rc < 0) {
        fprintf(stderr, "setup failed: %s\n", td_strerror(rc));
        return 1;
    }

    printf("tandem-rpc-bench: loopback, client and server in one process, %.1f s per latency "
           "run\n",
           o.seconds);
    printf("unary: request %zu B (Prefill.Run, %u prompt tokens), response %zu B\n", req_bytes,
           o.tokens, g_resp_bytes);
    rc = bench_grpc_unary(cli, &req, o.seconds, &grpc_lat);
    if (rc == 0) rc = bench_tcp_pingpong(req_bytes, g_resp_bytes, o.seconds, &tcp_lat);
    if (rc < 0) {
        fprintf(stderr, "unary run failed: %s\n", td_strerror(rc));
        return 1;
    }
    printf("  %-22s %10s %10s %10s %10s\n", "", "p50 us", "p99 us", "mean us", "calls/s");
    printf("  %-22s %10.1f %10.1f %10.1f %10.0f\n", "gRPC unary", grpc_lat.p50_us, grpc_lat.p99_us,
           grpc_lat.mean_us, 1e6 / grpc_lat.mean_us);
    printf("  %-22s %10.1f %10.1f %10.1f %10.0f\n", "raw TCP ping-pong", tcp_lat.p50_us,
           tcp_lat.p99_us, tcp_lat.mean_us, 1e6 / tcp_lat.mean_us);
    printf("  %-22s %10.2fx %9.2fx %9.2fx\n", "gRPC / TCP", grpc_lat.p50_us / tcp_lat.p50_us,
           grpc_lat.p99_us / tcp_lat.p99_us, grpc_lat.mean_us / tcp_lat.mean_us);

    printf("stream: %u messages of %zu B (Decode.Generate, one token each)\n", o.msgs, msg_bytes);
    double grpc_rate = 0, tcp_rate = 0;
    rc = bench_grpc_stream(cli, o.msgs, &grpc_rate);
    if (rc == 0) rc = bench_tcp_stream(o.msgs, msg_bytes, &tcp_rate);
    if (rc < 0) {
        fprintf(stderr, "stream run failed: %s\n", td_strerror(rc));
        return 1;
    }
    printf("  %-22s %12.0f msg/s\n", "gRPC server stream", grpc_rate);
    printf("  %-22s %12.0f msg/s (one write(2) per message)\n", "raw TCP stream", tcp_rate);
    printf("  %-22s %12.2fx\n", "gRPC / TCP", grpc_rate / tcp_rate);

    rpc_client_free(cli);
    rpc_server_free(srv);
    pthread_mutex_lock(&e.mu);
    e.stop = true;
    pthread_cond_signal(&e.cv);
    pthread_mutex_unlock(&e.mu);
    pthread_join(eth, NULL);
    pthread_cond_destroy(&e.cv);
    pthread_mutex_destroy(&e.mu);
    free(prompt);
    free(blocks);
    free(grpc_lat.ns);
    free(tcp_lat.ns);
    return 0;
}
