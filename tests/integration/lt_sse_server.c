/* lt_sse_server: canned SSE responses from a libuv loop on its own thread. */
#include "lt_sse_server.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <uv.h>

struct lt_sse_server {
    uv_loop_t loop;
    uv_tcp_t listener;
    uv_async_t stop;
    uv_timer_t hold; /* lt_sse_server_start_held: ends the hold */
    pthread_t thread;
    pthread_mutex_t mu;
    enum lt_sse_mode mode;
    int tokens;
    int port;
    size_t requests;                       /* under mu */
    size_t reject_first;                   /* under mu: lt_sse_server_reject_first */
    char last_body[4096];                  /* under mu */
    int64_t arrivals[LT_SSE_MAX_ARRIVALS]; /* under mu: CLOCK_MONOTONIC ns per request */
    size_t n_arrivals;                     /* under mu */
    char *canned;                          /* the response for a fixed token count */
    size_t canned_len;
};

#define TRICKLE_SLICE 37 /* bytes per write in LT_SSE_TRICKLE, prime so cuts wander */

struct sconn {
    uv_tcp_t tcp;
    uv_timer_t trickle; /* LT_SSE_TRICKLE: paces the slices */
    int handles;        /* open handles; freed at 0 */
    char *out;          /* LT_SSE_TRICKLE: response being sent (owned) */
    size_t out_len, out_off;
    lt_sse_server *srv;
    char *buf;
    size_t len, cap;
    int closing;
};

struct swrite {
    uv_write_t req;
    struct sconn *c;
    char *owned; /* freed after the write, NULL for the canned response */
    int close_after;
};

static int append(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t nc = (*len + n + 1) * 2;
        char *nb = realloc(*buf, nc);
        if (!nb) return -1;
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
    return 0;
}

static int append_event(char **buf, size_t *len, size_t *cap, const char *event)
{
    char size[32];
    int k = snprintf(size, sizeof(size), "%zx\r\n", strlen(event));
    return append(buf, len, cap, size, (size_t)k) || append(buf, len, cap, event, strlen(event)) ||
           append(buf, len, cap, "\r\n", 2);
}

/* Builds the response for `tokens` events in this server's mode. */
static char *build_response(enum lt_sse_mode mode, int tokens, size_t *out_len)
{
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = 0;
    if (mode == LT_SSE_REJECT) {
        const char *body = "{\"error\":{\"message\":\"overloaded\",\"type\":\"rate_limit\","
                           "\"code\":429}}";
        char head[256];
        int k = snprintf(head, sizeof(head),
                         "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                         "Retry-After: 1\r\nContent-Length: %zu\r\n\r\n",
                         strlen(body));
        rc = append(&buf, &len, &cap, head, (size_t)k) ||
             append(&buf, &len, &cap, body, strlen(body));
    } else {
        const char *head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
        rc = append(&buf, &len, &cap, head, strlen(head));
        int n = (mode == LT_SSE_STALL || mode == LT_SSE_CLOSE) ? 1 : tokens;
        for (int i = 0; i < n && !rc; i++)
            rc = append_event(&buf, &len, &cap,
                              "data: {\"id\":\"cmpl-t\",\"object\":\"text_completion\","
                              "\"choices\":[{\"index\":0,\"text\":\" tok\","
                              "\"finish_reason\":null}]}\n\n");
        if (!rc && (mode == LT_SSE_OK || mode == LT_SSE_NO_DONE)) {
            char usage[200];
            snprintf(usage, sizeof(usage),
                     "data: {\"id\":\"cmpl-t\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,"
                     "\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n",
                     tokens, tokens + 1);
            rc = append_event(&buf, &len, &cap, usage);
            if (!rc && mode == LT_SSE_OK) rc = append_event(&buf, &len, &cap, "data: [DONE]\n\n");
            if (!rc) rc = append(&buf, &len, &cap, "0\r\n\r\n", 5);
        }
    }
    if (rc) {
        free(buf);
        return NULL;
    }
    *out_len = len;
    return buf;
}

static void on_conn_closed(uv_handle_t *h)
{
    struct sconn *c = h->data;
    if (--c->handles > 0) return;
    free(c->out);
    free(c->buf);
    free(c);
}

static void sconn_close(struct sconn *c)
{
    if (c->closing) return;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    uv_close((uv_handle_t *)&c->trickle, on_conn_closed);
}

static void on_written(uv_write_t *req, int status)
{
    struct swrite *w = req->data;
    if ((status < 0 || w->close_after) && !w->c->closing) sconn_close(w->c);
    free(w->owned);
    free(w);
}

static void on_trickle(uv_timer_t *t)
{
    struct sconn *c = t->data;
    if (c->closing || !c->out) return;
    size_t k = c->out_len - c->out_off < TRICKLE_SLICE ? c->out_len - c->out_off : TRICKLE_SLICE;
    struct swrite *w = calloc(1, sizeof(*w));
    if (!w || !(w->owned = malloc(k))) {
        free(w);
        sconn_close(c);
        return;
    }
    memcpy(w->owned, c->out + c->out_off, k);
    w->c = c;
    w->req.data = w;
    uv_buf_t b = uv_buf_init(w->owned, (unsigned)k);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        free(w->owned);
        free(w);
        sconn_close(c);
        return;
    }
    c->out_off += k;
    if (c->out_off == c->out_len) {
        uv_timer_stop(&c->trickle);
        free(c->out);
        c->out = NULL;
    }
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void respond(struct sconn *c, const char *body, size_t body_len)
{
    lt_sse_server *s = c->srv;
    int64_t now = mono_ns();
    pthread_mutex_lock(&s->mu);
    s->requests++;
    int reject = s->requests <= s->reject_first;
    if (s->n_arrivals < LT_SSE_MAX_ARRIVALS) s->arrivals[s->n_arrivals++] = now;
    size_t k = body_len < sizeof(s->last_body) - 1 ? body_len : sizeof(s->last_body) - 1;
    memcpy(s->last_body, body, k);
    s->last_body[k] = '\0';
    pthread_mutex_unlock(&s->mu);

    enum lt_sse_mode mode = reject ? LT_SSE_REJECT : s->mode;
    if (mode == LT_SSE_TRICKLE) {
        size_t len;
        char *resp = build_response(LT_SSE_OK, s->tokens > 0 ? s->tokens : 4, &len);
        if (!resp || c->out) { /* one response in flight per connection */
            free(resp);
            sconn_close(c);
            return;
        }
        c->out = resp;
        c->out_len = len;
        c->out_off = 0;
        uv_timer_start(&c->trickle, on_trickle, 0, 1);
        return;
    }
    struct swrite *w = calloc(1, sizeof(*w));
    if (!w) {
        sconn_close(c);
        return;
    }
    w->c = c;
    w->req.data = w;
    w->close_after = mode == LT_SSE_CLOSE;
    const char *data = reject ? NULL : s->canned;
    size_t len = reject ? 0 : s->canned_len;
    if (!data) {
        /* tokens == 0: as many events as the request's max_tokens. */
        int n = 1;
        const char *mt = strstr(body, "\"max_tokens\":");
        if (mt && mt < body + body_len) n = atoi(mt + 13);
        n = n < 1 ? 1 : n > 4096 ? 4096 : n;
        w->owned = build_response(mode, n, &len);
        if (!w->owned) {
            free(w);
            sconn_close(c);
            return;
        }
        data = w->owned;
    }
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        free(w->owned);
        free(w);
        sconn_close(c);
    }
}

/* Serves every complete request in the buffer (keep-alive, in order). */
static void serve(struct sconn *c)
{
    for (;;) {
        char *end = c->len >= 4 ? memmem(c->buf, c->len, "\r\n\r\n", 4) : NULL;
        if (!end) return;
        size_t head_len = (size_t)(end - c->buf) + 4;
        size_t body_len = 0;
        for (char *p = c->buf; p < end; p++) {
            if ((p == c->buf || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
                body_len = strtoul(p + 15, NULL, 10);
                break;
            }
        }
        if (c->len < head_len + body_len) return;
        char saved = c->buf[head_len + body_len];
        c->buf[head_len + body_len] = '\0';
        respond(c, c->buf + head_len, body_len);
        c->buf[head_len + body_len] = saved;
        if (c->closing) return;
        memmove(c->buf, c->buf + head_len + body_len, c->len - head_len - body_len);
        c->len -= head_len + body_len;
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct sconn *c = h->data;
    if (c->cap - c->len < 16384) {
        size_t nc = c->cap ? c->cap * 2 : 65536;
        char *nb = realloc(c->buf, nc);
        if (!nb) {
            *buf = uv_buf_init(NULL, 0);
            return;
        }
        c->buf = nb;
        c->cap = nc;
    }
    *buf = uv_buf_init(c->buf + c->len, (unsigned)(c->cap - c->len - 1));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct sconn *c = st->data;
    (void)buf;
    if (nread < 0) {
        sconn_close(c);
        return;
    }
    c->len += (size_t)nread;
    serve(c);
}

static void on_connection(uv_stream_t *server, int status)
{
    lt_sse_server *s = server->data;
    if (status < 0) return;
    struct sconn *c = calloc(1, sizeof(*c));
    if (!c) return;
    c->srv = s;
    uv_tcp_init(&s->loop, &c->tcp);
    uv_timer_init(&s->loop, &c->trickle);
    c->tcp.data = c->trickle.data = c;
    c->handles = 2;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        sconn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (uv_is_closing(h)) return;
    if ((h->type == UV_TCP || h->type == UV_TIMER) && h->data && h->data != arg) {
        sconn_close(h->data);
        return;
    }
    uv_close(h, NULL);
}

static void on_stop(uv_async_t *a)
{
    lt_sse_server *s = a->data;
    uv_walk(&s->loop, close_walk, s);
}

/* The hold is over: listen with the normal backlog and accept from now on. */
static void on_hold_end(uv_timer_t *t)
{
    lt_sse_server *s = t->data;
    if (uv_listen((uv_stream_t *)&s->listener, 1024, on_connection) != 0)
        fprintf(stderr, "lt_sse_server: listen after the hold failed\n");
    uv_close((uv_handle_t *)&s->hold, NULL);
}

static void *run(void *arg)
{
    lt_sse_server *s = arg;
    uv_run(&s->loop, UV_RUN_DEFAULT);
    return NULL;
}

void lt_sse_server_reject_first(lt_sse_server *s, size_t n)
{
    pthread_mutex_lock(&s->mu);
    s->reject_first = n;
    pthread_mutex_unlock(&s->mu);
}

int lt_sse_server_start(enum lt_sse_mode mode, int tokens, lt_sse_server **out)
{
    return lt_sse_server_start_held(mode, tokens, 0, out);
}

int lt_sse_server_start_held(enum lt_sse_mode mode, int tokens, int64_t hold_ns,
                             lt_sse_server **out)
{
    lt_sse_server *s = calloc(1, sizeof(*s));
    if (!s) return -1;
    s->mode = mode;
    s->tokens = tokens;
    pthread_mutex_init(&s->mu, NULL);
    if (tokens > 0 && mode != LT_SSE_TRICKLE) {
        s->canned = build_response(mode, tokens, &s->canned_len);
        if (!s->canned) goto fail;
    }
    if (uv_loop_init(&s->loop) != 0) goto fail;
    uv_tcp_init(&s->loop, &s->listener);
    s->listener.data = s; /* close_walk tells it apart from connections by this */
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", 0, &addr);
    if (uv_tcp_bind(&s->listener, (const struct sockaddr *)&addr, 0) != 0) goto fail_loop;
    if (hold_ns > 0) {
        /* Listening (connections queue in the kernel) but not accepting: a
         * plain listen(2) with a backlog of 0, which Linux reads as one
         * waiting connection; uv_listen takes over when the hold ends. */
        uv_os_fd_t fd;
        if (uv_fileno((uv_handle_t *)&s->listener, &fd) != 0 || listen(fd, 0) != 0) goto fail_loop;
        uv_timer_init(&s->loop, &s->hold);
        s->hold.data = s; /* close_walk: not a connection */
        uv_timer_start(&s->hold, on_hold_end, (uint64_t)((hold_ns + 999999) / 1000000), 0);
    } else if (uv_listen((uv_stream_t *)&s->listener, 1024, on_connection) != 0) {
        goto fail_loop;
    }
    struct sockaddr_storage name;
    int namelen = sizeof(name);
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&name, &namelen);
    s->port = ntohs(((struct sockaddr_in *)&name)->sin_port);
    uv_async_init(&s->loop, &s->stop, on_stop);
    s->stop.data = s;
    if (pthread_create(&s->thread, NULL, run, s) != 0) goto fail_loop;
    *out = s;
    return 0;
fail_loop:
    uv_walk(&s->loop, close_walk, s);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
fail:
    free(s->canned);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return -1;
}

int lt_sse_server_port(const lt_sse_server *s)
{
    return s->port;
}

size_t lt_sse_server_requests(lt_sse_server *s)
{
    pthread_mutex_lock(&s->mu);
    size_t n = s->requests;
    pthread_mutex_unlock(&s->mu);
    return n;
}

size_t lt_sse_server_arrivals(lt_sse_server *s, int64_t *t_ns, size_t cap)
{
    pthread_mutex_lock(&s->mu);
    size_t n = s->n_arrivals;
    if (cap > 0) memcpy(t_ns, s->arrivals, (n < cap ? n : cap) * sizeof(*t_ns));
    pthread_mutex_unlock(&s->mu);
    return n;
}

void lt_sse_server_last_body(lt_sse_server *s, char *buf, size_t cap)
{
    pthread_mutex_lock(&s->mu);
    snprintf(buf, cap, "%s", s->last_body);
    pthread_mutex_unlock(&s->mu);
}

void lt_sse_server_stop(lt_sse_server *s)
{
    if (!s) return;
    uv_async_send(&s->stop);
    pthread_join(s->thread, NULL);
    uv_loop_close(&s->loop);
    free(s->canned);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
