/* httpd: a real server on loopback, raw sockets as the clients.
 *
 * The simple mode runs on its own thread. The loop mode runs on a loop in a
 * thread of the test; the test thread hands it jobs (on_loop) and plays the
 * client. Callbacks on the loop thread check with CHECK (abort), not with
 * cmocka's asserts, which may only run on the test thread. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "common/err.h"
#include "common/httpd.h"
#include "fail_alloc.h"

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        if (!(x)) {                                                                                \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #x);                \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* ---- client side ---- */

static int dial(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    return fd;
}

/* False when the server closed the connection first. */
static bool try_send(int fd, const char *s, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t w = send(fd, s + off, len - off, MSG_NOSIGNAL);
        if (w <= 0) return false;
        off += (size_t)w;
    }
    return true;
}

static void send_str(int fd, const char *s)
{
    assert_true(try_send(fd, s, strlen(s)));
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reads into buf until it holds `until` (NULL: only EOF ends it), the peer
 * closes (*eof), or timeout_ms pass. Returns the bytes read; buf is
 * NUL-terminated. */
static size_t read_until(int fd, char *buf, size_t cap, const char *until, int timeout_ms,
                         bool *eof)
{
    size_t n = 0;
    bool closed = false;
    int64_t end = now_ms() + timeout_ms;
    buf[0] = '\0';
    while (n < cap - 1) {
        if (until && strstr(buf, until)) break;
        int64_t left = end - now_ms();
        if (left <= 0) break;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)left) <= 0) break;
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r <= 0) {
            closed = true;
            break;
        }
        n += (size_t)r;
        buf[n] = '\0';
    }
    if (eof) *eof = closed;
    return n;
}

/* True when the peer closes within timeout_ms (bytes before it are dropped). */
static bool wait_eof(int fd, int timeout_ms)
{
    char buf[4096];
    bool eof = false;
    int64_t end = now_ms() + timeout_ms;
    while (!eof && now_ms() < end)
        read_until(fd, buf, sizeof(buf), NULL, (int)(end - now_ms()), &eof);
    return eof;
}

static size_t count(const char *hay, const char *needle)
{
    size_t k = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
        k++;
    return k;
}

/* Decodes a chunked body. Returns 1 when the last chunk was seen, 0 when more
 * is needed, -1 when malformed. */
static int dechunk(const char *p, size_t n, char *out, size_t *out_len)
{
    size_t i = 0, o = 0;
    for (;;) {
        const char *crlf = memchr(p + i, '\r', n - i);
        if (!crlf || (size_t)(crlf - p) + 1 >= n) break;
        char *end;
        unsigned long len = strtoul(p + i, &end, 16);
        if (end != crlf || crlf[1] != '\n') return -1;
        size_t data = (size_t)(crlf - p) + 2;
        if (len == 0) {
            *out_len = o;
            return data + 2 <= n && memcmp(p + data, "\r\n", 2) == 0 ? 1 : 0;
        }
        if (data + len + 2 > n) break;
        if (memcmp(p + data + len, "\r\n", 2) != 0) return -1;
        if (out) memcpy(out + o, p + data, len);
        o += len;
        i = data + len + 2;
    }
    *out_len = o;
    return 0;
}

/* ---- the simple mode ---- */

static void handler(void *arg, const char *method, const char *path, httpd_response *r)
{
    (void)method;
    (*(int *)arg)++;
    if (strcmp(path, "/metrics") == 0) {
        r->status = 200;
        r->body = strdup("tandem_up 1\n");
        r->len = strlen(r->body);
    } else {
        r->status = 404;
        r->body = strdup("not found\n");
        r->len = strlen(r->body);
    }
}

static size_t slurp(int fd, char *buf, size_t cap, size_t want)
{
    size_t n = 0;
    while (n < cap - 1 && n < want) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 2000) <= 0) break;
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r <= 0) break;
        n += (size_t)r;
    }
    buf[n] = '\0';
    return n;
}

static void test_simple_mode(void **state)
{
    (void)state;
    int calls = 0;
    httpd *h = NULL;
    assert_int_equal(httpd_start("127.0.0.1:0", handler, &calls, &h), 0);
    int port = httpd_port(h);
    assert_true(port > 0);
    char buf[65536];

    /* Keep-alive, two pipelined requests answered in order. */
    int fd = dial(port);
    send_str(fd, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /nope?x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "not found\n", 2000, NULL);
    char *a = strstr(buf, "HTTP/1.1 200 OK"), *b = strstr(buf, "HTTP/1.1 404");
    assert_non_null(a);
    assert_non_null(b);
    assert_true(a < b);
    assert_non_null(strstr(buf, "tandem_up 1\n"));
    close(fd);

    /* Connection: close is honoured: the server closes after the answer. */
    fd = dial(port);
    send_str(fd, "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
    size_t n = slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_true(n > 0);
    assert_int_equal(count(buf, "HTTP/1.1 "), 1);
    close(fd);

    /* A HEAD gets the head only. */
    fd = dial(port);
    send_str(fd, "HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
    slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_non_null(strstr(buf, "Content-Length: 12\r\n"));
    assert_null(strstr(buf, "tandem_up"));
    close(fd);

    /* A body is refused, other methods too, garbage is a 400. */
    fd = dial(port);
    send_str(fd, "POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    bool eof = false;
    read_until(fd, buf, sizeof(buf), NULL, 2000, &eof);
    assert_non_null(strstr(buf, "HTTP/1.1 413"));
    assert_true(eof);
    close(fd);
    fd = dial(port);
    send_str(fd, "DELETE /metrics HTTP/1.1\r\n\r\n");
    slurp(fd, buf, sizeof(buf), 40);
    assert_non_null(strstr(buf, "HTTP/1.1 405"));
    close(fd);
    fd = dial(port);
    send_str(fd, "\x01\x02 garbage\r\n\r\n");
    slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_non_null(strstr(buf, "HTTP/1.1 400"));
    close(fd);

    /* A head beyond 8 KiB: 431 and closed. */
    fd = dial(port);
    static char big[12000];
    int k = snprintf(big, sizeof(big), "GET /metrics HTTP/1.1\r\nX-Long: ");
    memset(big + k, 'a', sizeof(big) - (size_t)k - 1);
    big[sizeof(big) - 1] = '\0';
    try_send(fd, big, strlen(big));
    slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_non_null(strstr(buf, "HTTP/1.1 431"));
    close(fd);

    /* Stop with a connection still open. */
    fd = dial(port);
    httpd_stop(h);
    close(fd);
    assert_true(calls >= 3);
}

static void test_bad_address(void **state)
{
    (void)state;
    httpd *h = NULL;
    int calls = 0;
    assert_int_equal(httpd_start("nonsense", handler, &calls, &h), TD_EINVAL);
    assert_int_equal(httpd_start("127.0.0.1:99999", handler, &calls, &h), TD_EINVAL);
    assert_null(h);
    /* A port already taken. */
    assert_int_equal(httpd_start("127.0.0.1:0", handler, &calls, &h), 0);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", httpd_port(h));
    httpd *h2 = NULL;
    assert_int_equal(httpd_start(addr, handler, &calls, &h2), TD_EIO);
    assert_null(h2);
    httpd_stop(h);
    httpd_stop(NULL);
}

/* ---- the loop mode: an app on a loop thread ---- */

enum { MODE_ECHO, MODE_REVERSE, MODE_STREAM, MODE_PRESSURE, MODE_HOLD };

#define PRESSURE_PIECE 4096

typedef struct app app;
typedef void (*app_job)(app *a, void *arg);

struct app {
    uv_loop_t loop;
    uv_async_t wake;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    app_job job;
    void *job_arg;
    bool job_done;
    bool closed; /* httpd_close's done ran */
    httpd *h;
    int port;
    int mode;
    /* loop thread only (the test reads them through on_loop) */
    int requests, closes, drains, eagains;
    httpd_req *held[8];
    int n_held;
    bool end_in_close;
    size_t pressure_total, pressure_sent, first_eagain_at;
};

static void app_wake(uv_async_t *w)
{
    app *a = w->data;
    pthread_mutex_lock(&a->mu);
    app_job job = a->job;
    void *arg = a->job_arg;
    a->job = NULL;
    pthread_mutex_unlock(&a->mu);
    if (!job) return;
    job(a, arg);
    pthread_mutex_lock(&a->mu);
    a->job_done = true;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

/* Runs job(a, arg) on the loop thread and waits for it. */
static void on_loop(app *a, app_job job, void *arg)
{
    pthread_mutex_lock(&a->mu);
    a->job = job;
    a->job_arg = arg;
    a->job_done = false;
    pthread_mutex_unlock(&a->mu);
    uv_async_send(&a->wake);
    pthread_mutex_lock(&a->mu);
    while (!a->job_done)
        pthread_cond_wait(&a->cv, &a->mu);
    pthread_mutex_unlock(&a->mu);
}

static void *app_thread(void *arg)
{
    app *a = arg;
    uv_run(&a->loop, UV_RUN_DEFAULT);
    return NULL;
}

static void pump(void *arg, httpd_req *r);

static void on_drain(void *arg, httpd_req *r)
{
    app *a = arg;
    a->drains++;
    pump(a, r);
}

/* Streams pressure_total bytes (a counting pattern) as fast as httpd takes
 * them, pausing on TD_EAGAIN until on_drain. */
static void pump(void *arg, httpd_req *r)
{
    app *a = arg;
    char piece[PRESSURE_PIECE];
    while (a->pressure_sent < a->pressure_total) {
        for (size_t i = 0; i < sizeof(piece); i++)
            piece[i] = (char)('a' + (a->pressure_sent + i) % 26);
        int rc = httpd_stream_write(r, piece, sizeof(piece));
        CHECK(rc == 0 || rc == TD_EAGAIN);
        a->pressure_sent += sizeof(piece);
        if (rc == TD_EAGAIN) {
            if (a->eagains++ == 0) a->first_eagain_at = a->pressure_sent;
            if (a->pressure_sent < a->pressure_total) return;
        }
    }
    CHECK(httpd_stream_end(r) == 0);
}

static void on_gone(void *arg, httpd_req *r)
{
    app *a = arg;
    a->closes++;
    /* Writing after the client left is dropped. */
    CHECK(httpd_stream_write(r, "x", 1) == TD_ECLOSED);
    if (a->end_in_close) {
        CHECK(httpd_stream_end(r) == TD_ECLOSED);
        for (int i = 0; i < a->n_held; i++)
            if (a->held[i] == r) a->held[i] = NULL;
    }
}

static void on_request(void *arg, httpd_req *r)
{
    app *a = arg;
    a->requests++;
    switch (a->mode) {
    case MODE_ECHO: {
        size_t blen;
        const char *body = httpd_req_body(r, &blen);
        const char *x = httpd_req_header(r, "x-TEST");
        size_t cap = blen + 512;
        char *out = malloc(cap);
        if (!out) { /* allocation failure tests */
            httpd_respond(r, 500, NULL, NULL, "", 0);
            return;
        }
        int n = snprintf(out, cap, "%s %s ?%s x=%s len=%zu:", httpd_req_method(r),
                         httpd_req_path(r), httpd_req_query(r), x ? x : "-", blen);
        memcpy(out + n, body, blen);
        int rc = httpd_respond(r, 200, "text/plain", "X-Echo: 1\r\n", out, (size_t)n + blen);
        CHECK(rc == 0 || rc == TD_ENOMEM || rc == TD_ECLOSED);
        free(out);
        break;
    }
    case MODE_REVERSE:
        a->held[a->n_held++] = r;
        if (a->n_held == 2) { /* answer the second before the first */
            CHECK(httpd_respond(a->held[1], 200, NULL, NULL, "second", 6) == 0);
            CHECK(httpd_respond(a->held[0], 200, NULL, NULL, "first", 5) == 0);
            a->n_held = 0;
        }
        break;
    case MODE_STREAM: {
        int rc = httpd_stream_start(r, 200, "text/event-stream", "Cache-Control: no-cache\r\n");
        for (int i = 0; i < 5 && rc == 0; i++) {
            char ev[32];
            int n = snprintf(ev, sizeof(ev), "data: %d\n\n", i);
            rc = httpd_stream_write(r, ev, (size_t)n);
        }
        CHECK(rc == 0 || rc == TD_ENOMEM || rc == TD_ECLOSED);
        rc = httpd_stream_end(r);
        CHECK(rc == 0 || rc == TD_ENOMEM || rc == TD_ECLOSED);
        break;
    }
    case MODE_PRESSURE:
        CHECK(httpd_stream_start(r, 200, "application/octet-stream", NULL) == 0);
        httpd_req_on_drain(r, on_drain, a);
        pump(a, r);
        break;
    case MODE_HOLD:
        CHECK(httpd_stream_start(r, 200, "text/event-stream", NULL) == 0);
        CHECK(httpd_stream_write(r, "data: hello\n\n", 13) == 0);
        httpd_req_on_close(r, on_gone, a);
        CHECK(a->n_held < 8);
        a->held[a->n_held++] = r;
        break;
    }
}

static void job_start(app *a, void *arg)
{
    const httpd_config *cfg = arg;
    CHECK(httpd_start_on_loop(&a->loop, cfg, on_request, a, &a->h) == 0);
    a->port = httpd_port(a->h);
}

static void app_start(app *a, int mode, const httpd_config *cfg)
{
    memset(a, 0, sizeof(*a));
    a->mode = mode;
    assert_int_equal(uv_loop_init(&a->loop), 0);
    assert_int_equal(uv_async_init(&a->loop, &a->wake, app_wake), 0);
    a->wake.data = a;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    assert_int_equal(pthread_create(&a->thread, NULL, app_thread, a), 0);
    on_loop(a, job_start, (void *)cfg);
    assert_true(a->port > 0);
}

static void on_closed(void *arg)
{
    app *a = arg;
    pthread_mutex_lock(&a->mu);
    a->closed = true;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

static void job_close(app *a, void *arg)
{
    (void)arg;
    httpd_close(a->h, on_closed, a);
    httpd_close(a->h, on_closed, a); /* a second call is ignored */
}

static void job_quit(app *a, void *arg)
{
    (void)arg;
    uv_close((uv_handle_t *)&a->wake, NULL);
}

static void app_stop(app *a)
{
    on_loop(a, job_close, NULL);
    pthread_mutex_lock(&a->mu);
    while (!a->closed)
        pthread_cond_wait(&a->cv, &a->mu);
    pthread_mutex_unlock(&a->mu);
    on_loop(a, job_quit, NULL);
    pthread_join(a->thread, NULL);
    assert_int_equal(uv_loop_close(&a->loop), 0); /* every handle closed */
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
}

typedef struct snap {
    int requests, closes, drains, eagains;
    size_t sent, first_eagain_at;
} snap;

static void job_snap(app *a, void *arg)
{
    snap *s = arg;
    s->requests = a->requests;
    s->closes = a->closes;
    s->drains = a->drains;
    s->eagains = a->eagains;
    s->sent = a->pressure_sent;
    s->first_eagain_at = a->first_eagain_at;
}

typedef struct app_set {
    bool end_in_close;
    size_t pressure_total;
} app_set;

static void job_set(app *a, void *arg)
{
    const app_set *s = arg;
    a->end_in_close = s->end_in_close;
    a->pressure_total = s->pressure_total;
}

static snap app_snap(app *a)
{
    snap s;
    on_loop(a, job_snap, &s);
    return s;
}

/* ---- loop mode tests ---- */

static void test_bodies(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0"};
    app_start(&a, MODE_ECHO, &cfg);
    char buf[8192];
    int fd = dial(a.port);

    /* Content-Length body, query, a header looked up case-insensitively. */
    send_str(fd, "POST /v1/completions?a=1&b=2 HTTP/1.1\r\nHost: x\r\nx-test: abc\r\n"
                 "Content-Type: application/json\r\nContent-Length: 11\r\n\r\nhello world");
    read_until(fd, buf, sizeof(buf), "hello world", 2000, NULL);
    assert_non_null(strstr(buf, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(buf, "Content-Type: text/plain\r\n"));
    assert_non_null(strstr(buf, "X-Echo: 1\r\n"));
    assert_null(strstr(buf, "Connection:"));
    assert_non_null(strstr(buf, "POST /v1/completions ?a=1&b=2 x=abc len=11:hello world"));

    /* Chunked body on the same connection, in pieces. */
    send_str(fd, "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
    usleep(20000);
    send_str(fd, "lo\r\n6\r\n world\r\n0\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "hello world", 2000, NULL);
    assert_non_null(strstr(buf, "POST /v1/chat/completions ? x=- len=11:hello world"));

    /* Expect: 100-continue is answered before the body is sent. */
    send_str(fd, "POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "\r\n\r\n", 2000, NULL);
    assert_string_equal(buf, "HTTP/1.1 100 Continue\r\n\r\n");
    send_str(fd, "abc");
    read_until(fd, buf, sizeof(buf), "len=3:abc", 2000, NULL);
    assert_non_null(strstr(buf, "HTTP/1.1 200 OK"));

    /* The absolute form of the target. */
    send_str(fd, "GET http://example.com:80/v1/models?x=y#frag HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "len=0:", 2000, NULL);
    assert_non_null(strstr(buf, "GET /v1/models ?x=y x=- len=0:"));
    send_str(fd, "GET http://example.com HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "len=0:", 2000, NULL);
    assert_non_null(strstr(buf, "GET / ? x=- len=0:"));

    /* A GET without body; an empty header value. */
    send_str(fd, "GET /v1/models HTTP/1.1\r\nX-Test:\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "len=0:", 2000, NULL);
    assert_non_null(strstr(buf, "GET /v1/models ? x= len=0:"));
    close(fd);

    snap s = app_snap(&a);
    assert_int_equal(s.requests, 6);
    app_stop(&a);
}

static void test_limits(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0", .max_body = 1000, .max_head = 1024};
    app_start(&a, MODE_ECHO, &cfg);
    char buf[8192];
    bool eof;

    /* 413 as soon as Content-Length says so, before any body byte. */
    int fd = dial(a.port);
    send_str(fd, "POST /v1/completions HTTP/1.1\r\nContent-Length: 100000\r\n\r\n");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_non_null(strstr(buf, "HTTP/1.1 413 Payload Too Large\r\n"));
    assert_non_null(strstr(buf, "Connection: close\r\n"));
    assert_non_null(strstr(buf, "Content-Type: application/json\r\n"));
    assert_non_null(strstr(buf, "{\"error\":{\"message\":\"request body too large\","
                                "\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}"));
    assert_true(eof);
    close(fd);

    /* A chunked body passing the limit. */
    fd = dial(a.port);
    send_str(fd, "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    char chunk[700];
    memset(chunk, 'z', sizeof(chunk));
    char hdr[16];
    for (int i = 0; i < 2; i++) {
        snprintf(hdr, sizeof(hdr), "%zx\r\n", sizeof(chunk));
        try_send(fd, hdr, strlen(hdr));
        try_send(fd, chunk, sizeof(chunk));
        try_send(fd, "\r\n", 2);
    }
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_non_null(strstr(buf, "HTTP/1.1 413"));
    assert_true(eof);
    close(fd);

    /* A body at the limit passes. */
    fd = dial(a.port);
    send_str(fd, "POST /x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n");
    char body[1001];
    memset(body, 'b', 1000);
    body[1000] = '\0';
    send_str(fd, body);
    read_until(fd, buf, sizeof(buf), "len=1000:", 2000, NULL);
    assert_non_null(strstr(buf, "HTTP/1.1 200"));
    close(fd);

    /* 431 for a head over max_head. */
    fd = dial(a.port);
    char big[2048];
    int k = snprintf(big, sizeof(big), "GET / HTTP/1.1\r\nX-Long: ");
    memset(big + k, 'a', sizeof(big) - (size_t)k - 1);
    big[sizeof(big) - 1] = '\0';
    send_str(fd, big);
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_non_null(strstr(buf, "HTTP/1.1 431"));
    assert_non_null(strstr(buf, "\"type\":\"invalid_request_error\""));
    assert_true(eof);
    close(fd);

    /* A bad request line: 400. */
    fd = dial(a.port);
    send_str(fd, "GET /\x01 HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_non_null(strstr(buf, "HTTP/1.1 400 Bad Request\r\n"));
    assert_non_null(strstr(buf, "malformed request"));
    assert_true(eof);
    close(fd);

    /* After a good request, garbage: the first is answered, then 400. */
    fd = dial(a.port);
    send_str(fd, "GET /ok HTTP/1.1\r\n\r\nNOT HTTP AT ALL\r\n\r\n");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    char *ok = strstr(buf, "HTTP/1.1 200"), *bad = strstr(buf, "HTTP/1.1 400");
    assert_non_null(ok);
    assert_non_null(bad);
    assert_true(ok < bad);
    assert_true(eof);
    close(fd);
    app_stop(&a);
}

static void test_max_conns(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0", .max_conns = 2};
    app_start(&a, MODE_ECHO, &cfg);
    int f1 = dial(a.port), f2 = dial(a.port), f3 = dial(a.port);
    assert_true(wait_eof(f3, 2000));
    char buf[1024];
    send_str(f1, "GET /a HTTP/1.1\r\n\r\n");
    read_until(f1, buf, sizeof(buf), "len=0:", 2000, NULL);
    assert_non_null(strstr(buf, "HTTP/1.1 200"));
    close(f1);
    close(f2);
    close(f3);
    app_stop(&a);
}

static void test_timeouts(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0", .head_timeout_ms = 200, .idle_timeout_ms = 400};
    app_start(&a, MODE_ECHO, &cfg);
    char buf[4096];
    bool eof;

    /* Slow-loris head: 408 and closed, after the head timeout. */
    int fd = dial(a.port);
    int64_t t0 = now_ms();
    send_str(fd, "GET / HT");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    int64_t took = now_ms() - t0;
    assert_non_null(strstr(buf, "HTTP/1.1 408 Request Timeout\r\n"));
    assert_non_null(strstr(buf, "Connection: close\r\n"));
    assert_true(eof);
    assert_true(took >= 150 && took < 2000);
    close(fd);

    /* Trickling bytes does not reset it. */
    fd = dial(a.port);
    t0 = now_ms();
    const char *slow = "GET /slow HTTP/1.1\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n";
    for (const char *p = slow; *p && now_ms() - t0 < 1000; p++) {
        try_send(fd, p, 1);
        usleep(30000);
    }
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_non_null(strstr(buf, "HTTP/1.1 408"));
    assert_true(now_ms() - t0 < 1500);
    close(fd);

    /* Slow body: 408. */
    fd = dial(a.port);
    send_str(fd, "POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_non_null(strstr(buf, "HTTP/1.1 408"));
    assert_true(eof);
    close(fd);

    /* Idle keep-alive connection: closed silently after the idle timeout. */
    fd = dial(a.port);
    send_str(fd, "GET /once HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "len=0:", 2000, NULL);
    assert_non_null(strstr(buf, "HTTP/1.1 200"));
    t0 = now_ms();
    size_t n = read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    took = now_ms() - t0;
    assert_int_equal(n, 0);
    assert_true(eof);
    assert_true(took >= 300 && took < 2000);
    close(fd);

    /* A connection that never sends anything: idle timeout too. */
    fd = dial(a.port);
    assert_true(wait_eof(fd, 2000));
    close(fd);
    app_stop(&a);
}

static void test_pipelining(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0"};
    app_start(&a, MODE_REVERSE, &cfg);
    char buf[4096];
    int fd = dial(a.port);
    send_str(fd, "GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "second", 2000, NULL);
    char *first = strstr(buf, "first"), *second = strstr(buf, "second");
    assert_non_null(first);
    assert_non_null(second);
    assert_true(first < second);
    assert_int_equal(count(buf, "HTTP/1.1 200 OK\r\n"), 2);
    assert_true(strncmp(buf, "HTTP/1.1 200 OK\r\n", 17) == 0);
    /* Again, in two writes, on the same connection. */
    send_str(fd, "GET /3 HTTP/1.1\r\n\r\n");
    usleep(20000);
    send_str(fd, "GET /4 HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "second", 2000, NULL);
    first = strstr(buf, "first");
    second = strstr(buf, "second");
    assert_non_null(first);
    assert_non_null(second);
    assert_true(first < second);
    close(fd);
    app_stop(&a);
}

static void test_streaming(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0"};
    app_start(&a, MODE_STREAM, &cfg);
    char buf[8192], out[8192];
    const char *want = "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n";

    int fd = dial(a.port);
    for (int round = 0; round < 2; round++) { /* twice on one connection */
        send_str(fd, "POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
        read_until(fd, buf, sizeof(buf), "0\r\n\r\n", 2000, NULL);
        assert_non_null(strstr(buf, "HTTP/1.1 200 OK\r\n"));
        assert_non_null(strstr(buf, "Transfer-Encoding: chunked\r\n"));
        assert_non_null(strstr(buf, "Content-Type: text/event-stream\r\n"));
        assert_non_null(strstr(buf, "Cache-Control: no-cache\r\n"));
        assert_null(strstr(buf, "Content-Length"));
        char *body = strstr(buf, "\r\n\r\n");
        assert_non_null(body);
        body += 4;
        size_t olen = 0;
        assert_int_equal(dechunk(body, strlen(body), out, &olen), 1);
        out[olen] = '\0';
        assert_string_equal(out, want);
    }
    close(fd);

    /* HTTP/1.0: close-delimited, no chunk framing. */
    fd = dial(a.port);
    send_str(fd, "GET /v1/completions HTTP/1.0\r\n\r\n");
    bool eof;
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_true(eof);
    assert_null(strstr(buf, "Transfer-Encoding"));
    assert_non_null(strstr(buf, "Connection: close\r\n"));
    char *body = strstr(buf, "\r\n\r\n");
    assert_non_null(body);
    assert_string_equal(body + 4, want);
    close(fd);
    app_stop(&a);
}

static void test_http10_and_close(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0"};
    app_start(&a, MODE_ECHO, &cfg);
    char buf[4096];
    bool eof;

    int fd = dial(a.port);
    send_str(fd, "GET /ten HTTP/1.0\r\n\r\n");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_true(eof);
    assert_non_null(strstr(buf, "Connection: close\r\n"));
    assert_non_null(strstr(buf, "GET /ten"));
    close(fd);

    fd = dial(a.port);
    send_str(fd, "GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "len=0:", 2000, NULL);
    assert_non_null(strstr(buf, "Connection: keep-alive\r\n"));
    send_str(fd, "GET /ka2 HTTP/1.0\r\n\r\n");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_non_null(strstr(buf, "GET /ka2"));
    assert_true(eof);
    close(fd);

    /* Connection: close on 1.1; what follows it is not served. */
    fd = dial(a.port);
    send_str(fd, "GET /c HTTP/1.1\r\nConnection: close\r\n\r\nGET /after HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), NULL, 3000, &eof);
    assert_true(eof);
    assert_int_equal(count(buf, "HTTP/1.1 "), 1);
    assert_non_null(strstr(buf, "Connection: close\r\n"));
    assert_null(strstr(buf, "/after"));
    close(fd);

    /* HEAD: the head with the length, no body. */
    fd = dial(a.port);
    send_str(fd, "HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "GET /g", 2000, NULL);
    assert_null(strstr(buf, "HEAD /h"));
    assert_int_equal(count(buf, "HTTP/1.1 200"), 2);
    close(fd);
    app_stop(&a);
}

static void test_backpressure(void **state)
{
    (void)state;
    app a;
    const size_t limit = 64 * 1024;
    httpd_config cfg = {.addr = "127.0.0.1:0", .max_write_queue = limit};
    app_start(&a, MODE_PRESSURE, &cfg);
    const size_t total = 48u << 20;
    on_loop(&a, job_set, &(app_set){.pressure_total = total});

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int small = 16 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)a.port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    send_str(fd, "GET /big HTTP/1.1\r\n\r\n");

    /* The client does not read: the app is told to stop after about
     * max_write_queue bytes, and stays stopped. */
    usleep(300000);
    snap s1 = app_snap(&a);
    usleep(200000);
    snap s2 = app_snap(&a);
    assert_true(s1.eagains >= 1);
    assert_true(s1.first_eagain_at >= limit - 2 * PRESSURE_PIECE);
    assert_true(s1.first_eagain_at <= limit + PRESSURE_PIECE);
    assert_int_equal(s1.sent, s2.sent);
    assert_int_equal(s1.drains, s2.drains);
    assert_true(s2.sent < total);

    /* Reading resumes it: drains fire and the whole stream arrives intact. */
    size_t cap = total + (1u << 20), n = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t head_end = 0;
    int done = 0;
    int64_t end = now_ms() + 60000;
    while (!done && n < cap && now_ms() < end) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 2000) <= 0) break;
        ssize_t r = read(fd, buf + n, cap - n);
        if (r <= 0) break;
        n += (size_t)r;
        if (!head_end) {
            char *e = memmem(buf, n, "\r\n\r\n", 4);
            if (e) head_end = (size_t)(e - buf) + 4;
        }
        if (head_end && n >= 5 && memcmp(buf + n - 5, "0\r\n\r\n", 5) == 0) {
            size_t olen = 0;
            done = dechunk(buf + head_end, n - head_end, NULL, &olen);
        }
    }
    assert_int_equal(done, 1);
    size_t olen = 0;
    char *out = malloc(total);
    assert_non_null(out);
    assert_int_equal(dechunk(buf + head_end, n - head_end, out, &olen), 1);
    assert_int_equal(olen, total);
    for (size_t i = 0; i < olen; i += 4093)
        assert_int_equal(out[i], (char)('a' + i % 26));
    free(out);
    free(buf);
    snap s3 = app_snap(&a);
    assert_true(s3.drains >= 1);
    assert_int_equal(s3.sent, total);
    close(fd);
    app_stop(&a);
}

typedef struct end_job {
    int i;
    int rc_write, rc_end;
} end_job;

static void job_end_held(app *a, void *arg)
{
    end_job *e = arg;
    httpd_req *r = a->held[e->i];
    e->rc_write = httpd_stream_write(r, "late", 4);
    e->rc_end = httpd_stream_end(r);
    a->held[e->i] = NULL;
}

static void test_disconnect(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0"};
    app_start(&a, MODE_HOLD, &cfg);
    char buf[4096];
    int fd = dial(a.port);
    send_str(fd, "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
    read_until(fd, buf, sizeof(buf), "data: hello", 2000, NULL);
    assert_non_null(strstr(buf, "data: hello"));
    close(fd); /* mid-stream */
    snap s = {0};
    for (int i = 0; i < 200 && s.closes == 0; i++) {
        usleep(10000);
        s = app_snap(&a);
    }
    assert_int_equal(s.closes, 1);
    /* The app still ends it; writes and the end report the client gone. */
    end_job e = {.i = 0};
    on_loop(&a, job_end_held, &e);
    assert_int_equal(e.rc_write, TD_ECLOSED);
    assert_int_equal(e.rc_end, TD_ECLOSED);
    usleep(50000);
    s = app_snap(&a);
    assert_int_equal(s.closes, 1); /* exactly once */

    /* A stream ended normally gets no on_close. */
    fd = dial(a.port);
    send_str(fd, "GET /a HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "data: hello", 2000, NULL);
    e.i = 1;
    on_loop(&a, job_end_held, &e);
    assert_int_equal(e.rc_write, 0);
    assert_int_equal(e.rc_end, 0);
    read_until(fd, buf, sizeof(buf), "0\r\n\r\n", 2000, NULL);
    assert_non_null(strstr(buf, "late"));
    close(fd);
    usleep(50000);
    s = app_snap(&a);
    assert_int_equal(s.closes, 1);
    app_stop(&a);
}

static void test_close_with_open_requests(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0"};
    app_start(&a, MODE_HOLD, &cfg);
    on_loop(&a, job_set, &(app_set){.end_in_close = true});
    char buf[4096];
    int f1 = dial(a.port), f2 = dial(a.port), idle = dial(a.port);
    send_str(f1, "GET /1 HTTP/1.1\r\n\r\n");
    send_str(f2, "GET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n"); /* /3 waits behind /2 */
    read_until(f1, buf, sizeof(buf), "data: hello", 2000, NULL);
    read_until(f2, buf, sizeof(buf), "data: hello", 2000, NULL);
    snap s = {0};
    for (int i = 0; i < 200 && s.requests < 3; i++) {
        usleep(10000);
        s = app_snap(&a);
    }
    assert_int_equal(s.requests, 3);
    app_stop(&a);
    assert_int_equal(a.closes, 3);
    assert_true(wait_eof(f1, 2000));
    assert_true(wait_eof(f2, 2000));
    assert_true(wait_eof(idle, 2000));
    close(f1);
    close(f2);
    close(idle);
}

static void test_bad_config(void **state)
{
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    httpd *h = (httpd *)1;
    httpd_config cfg = {.addr = "nonsense"};
    assert_int_equal(httpd_start_on_loop(&loop, &cfg, on_request, NULL, &h), TD_EINVAL);
    assert_null(h);
    cfg.addr = NULL;
    assert_int_equal(httpd_start_on_loop(&loop, &cfg, on_request, NULL, &h), TD_EINVAL);
    cfg.addr = "127.0.0.1:0";
    assert_int_equal(httpd_start_on_loop(&loop, &cfg, NULL, NULL, &h), TD_EINVAL);
    assert_int_equal(uv_run(&loop, UV_RUN_NOWAIT), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* Every allocation of a scenario fails in turn: each run either answers or
 * closes the connection, the server keeps serving, nothing leaks (ASan). */
static void alloc_scenario(app *a, const char *req, const char *done)
{
    char buf[8192];
    for (long i = 0; i < 200; i++) {
        fail_alloc_arm(i);
        int fd = dial(a->port);
        try_send(fd, req, strlen(req));
        bool eof = false;
        read_until(fd, buf, sizeof(buf), done, 2000, &eof);
        bool answered = strstr(buf, done) != NULL;
        long hits = fail_alloc_disarm();
        close(fd);
        assert_true(answered || eof || hits > 0);
        if (hits == 0) {
            assert_true(answered);
            print_message("%ld allocations failed in turn\n", i);
            return;
        }
    }
    fail(); /* never ran clean */
}

static void test_alloc_failures(void **state)
{
    (void)state;
    app a;
    httpd_config cfg = {.addr = "127.0.0.1:0"};
    app_start(&a, MODE_ECHO, &cfg);
    alloc_scenario(&a,
                   "POST /a?q=1 HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n"
                   "X-Test: t\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
                   "GET /b ? x=- len=0:");
    char buf[4096];
    int fd = dial(a.port);
    send_str(fd, "GET /after HTTP/1.1\r\n\r\n");
    read_until(fd, buf, sizeof(buf), "len=0:", 2000, NULL);
    assert_non_null(strstr(buf, "GET /after"));
    close(fd);
    app_stop(&a);

    app_start(&a, MODE_STREAM, &cfg);
    alloc_scenario(&a, "GET /s HTTP/1.1\r\n\r\nGET /t HTTP/1.1\r\n\r\n",
                   "data: 4\n\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream");
    app_stop(&a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_simple_mode),
        cmocka_unit_test(test_bad_address),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_bodies),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_max_conns),
        cmocka_unit_test(test_timeouts),
        cmocka_unit_test(test_pipelining),
        cmocka_unit_test(test_streaming),
        cmocka_unit_test(test_http10_and_close),
        cmocka_unit_test(test_backpressure),
        cmocka_unit_test(test_disconnect),
        cmocka_unit_test(test_close_with_open_requests),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
