/* lt_replay: open-loop HTTP/SSE replay client on libuv. */
#include "loadtest/lt_replay.h"

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "loadtest/lt_grpc.h"
#include "loadtest/lt_sse.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <http_parser.h>
#include <netdb.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include <uv.h>

#define LT_NO_REQ SIZE_MAX

/* ---- URL ---- */

int lt_url_parse(const char *url, lt_url *out)
{
    memset(out, 0, sizeof(*out));
    if (!url) return TD_EINVAL;
    const char *p;
    if (strncmp(url, "http://", 7) == 0) {
        p = url + 7;
    } else if (strncmp(url, "grpc://", 7) == 0) {
        p = url + 7;
        out->grpc = 1;
    } else {
        return TD_EINVAL;
    }
    const char *host_end;
    const char *host = p;
    if (*p == '[') {
        host = ++p;
        host_end = strchr(p, ']');
        if (!host_end) return TD_EINVAL;
        p = host_end + 1;
    } else {
        while (*p && *p != ':' && *p != '/')
            p++;
        host_end = p;
    }
    size_t hl = (size_t)(host_end - host);
    if (hl == 0 || hl >= sizeof(out->host)) return TD_EINVAL;
    memcpy(out->host, host, hl);
    out->host[hl] = '\0';
    out->port = 80;
    int have_port = 0;
    if (*p == ':') {
        have_port = 1;
        p++;
        long port = 0;
        int digits = 0;
        while (*p >= '0' && *p <= '9' && digits < 6) {
            port = port * 10 + (*p++ - '0');
            digits++;
        }
        if (digits == 0 || port < 1 || port > 65535) return TD_EINVAL;
        out->port = (int)port;
    }
    if (out->grpc) {
        /* gRPC: an explicit port and no path. */
        return *p == '\0' && have_port ? 0 : TD_EINVAL;
    }
    if (*p == '\0' || strcmp(p, "/") == 0) {
        snprintf(out->path, sizeof(out->path), "/v1/completions");
    } else if (*p == '/') {
        if (strlen(p) >= sizeof(out->path)) return TD_EINVAL;
        for (const char *q = p; *q; q++)
            if ((unsigned char)*q <= ' ' || *q == 0x7f)
                return TD_EINVAL; /* no spaces or controls in a request line */
        snprintf(out->path, sizeof(out->path), "%s", p);
    } else {
        return TD_EINVAL;
    }
    return 0;
}

int lt_url_is_loopback(const lt_url *u)
{
    if (strcmp(u->host, "localhost") == 0 || strcmp(u->host, "::1") == 0) return 1;
    struct in_addr a;
    return inet_pton(AF_INET, u->host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

/* ---- state ---- */

enum conn_state { CONN_CONNECTING, CONN_IDLE, CONN_BUSY, CONN_CLOSING };

struct replay;

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer; /* per-request timeout */
    uv_connect_t connect_req;
    uv_write_t write_req;
    struct replay *rp;
    enum conn_state state;
    int warm;         /* opened before t = 0 */
    int open_handles; /* handles not yet closed; freed at 0 */
    size_t req;       /* request in flight, LT_NO_REQ when none */
    int64_t send_abs; /* td_now_ns() at send */
    int64_t now;      /* td_now_ns() of the read being parsed */
    http_parser parser;
    int msg_done;     /* the response message is complete */
    lt_sse sse;       /* the response body's event stream */
    char errbody[80]; /* start of a non-200 body */
    size_t errbody_len;
    /* Response headers: only Retry-After and retry-after-ms are kept. */
    int hdr_state;   /* 0 none yet, 1 in a field name, 2 in a value */
    char hfield[32]; /* current field name, truncated */
    size_t hfield_len;
    int hvalue_kind;    /* 1 retry-after, 2 retry-after-ms, 0 other */
    char hvalue[2][24]; /* [0] retry-after, [1] retry-after-ms */
    size_t hvalue_len[2];
    struct conn *idle_next, *idle_prev;
    struct conn *all_next, *all_prev;
    char head[1024];        /* request line, headers and the body up to the prompt */
    char tail[256];         /* the body after the prompt */
    lt_prompt_parts prompt; /* this request's prompt head (copied) and shared tail */
    char *owned_prompt;     /* whole prompt when built per request (hash ids), else NULL */
    char rbuf[65536];
};

struct replay {
    uv_loop_t loop;
    const lt_replay_opts *o;
    const lt_req *reqs;
    size_t n;
    lt_record *recs;
    struct sockaddr_storage addr;
    char host_hdr[300];
    char model_json[300]; /* "\"model\":\"...\"," or "" */
    int timerfd;
    uv_poll_t tick;
    uv_timer_t progress;
    int tick_open, progress_open;
    int64_t start_ns;
    int64_t start_wall_ns;
    int started;
    size_t next; /* next request to schedule */
    size_t done;
    size_t sent, ok, rejected, errors;
    size_t *waitq; /* FIFO of requests waiting for a connection */
    size_t wq_head, wq_len;
    struct conn *idle;
    struct conn *all;
    int open_conns;
    int warm_pending;
    int conns_opened;
    int stopping;
    lt_grpc *grpc; /* the gRPC transport, NULL for HTTP */
    /* Retries waiting for their time: a binary min-heap on (due, index),
     * at most one entry per request; one timer armed at the earliest. */
    struct retry_ent {
        int64_t due; /* td_now_ns clock */
        size_t i;
    } * retryq;
    size_t n_retry;
    uv_timer_t retry_timer;
    int retry_open;
    size_t retries;
    http_parser_settings settings;
};

static void conn_close(struct conn *c);
static void conn_send(struct conn *c, size_t i);
static void replay_stop(struct replay *rp);
static void arm_tick(struct replay *rp);
static void replay_begin(struct replay *rp);
static void dispatch_attempt(struct replay *rp, size_t i);
static void conn_open(struct replay *rp, size_t i, int warm);

static void idle_push(struct replay *rp, struct conn *c)
{
    c->state = CONN_IDLE;
    c->idle_prev = NULL;
    c->idle_next = rp->idle;
    if (rp->idle) rp->idle->idle_prev = c;
    rp->idle = c;
}

static void idle_remove(struct replay *rp, struct conn *c)
{
    if (c->idle_prev)
        c->idle_prev->idle_next = c->idle_next;
    else
        rp->idle = c->idle_next;
    if (c->idle_next) c->idle_next->idle_prev = c->idle_prev;
    c->idle_next = c->idle_prev = NULL;
}

/* ---- finishing requests ---- */

static void finish(struct conn *c, enum lt_outcome outcome)
{
    struct replay *rp = c->rp;
    size_t i = c->req;
    if (i == LT_NO_REQ) return;
    lt_record *r = &rp->recs[i];
    int64_t now = td_now_ns();
    r->outcome = outcome;
    r->e2e_ns = now - c->send_abs;
    if (outcome == LT_OK)
        r->output_tokens = c->sse.usage_tokens >= 0 ? c->sse.usage_tokens : r->n_chunks;
    else
        r->output_tokens = r->n_chunks;
    rp->ok += outcome == LT_OK;
    rp->rejected += outcome == LT_REJECTED;
    rp->errors += outcome == LT_ERROR;
    c->req = LT_NO_REQ;
    uv_timer_stop(&c->timer);
    rp->done++;
    if (rp->done == rp->n) replay_stop(rp);
}

static void fail(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct conn *c, const char *fmt, ...)
{
    if (c->req != LT_NO_REQ) {
        lt_record *r = &c->rp->recs[c->req];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->error, sizeof(r->error), fmt, ap);
        va_end(ap);
        finish(c, LT_ERROR);
    }
    conn_close(c);
}

/* Hands a free connection to the oldest waiting request, if any. */
static void serve_waitq(struct replay *rp)
{
    while (rp->wq_len > 0 && !rp->stopping) {
        size_t i = rp->waitq[rp->wq_head];
        struct conn *c = rp->idle;
        if (c) {
            idle_remove(rp, c);
        } else if (rp->open_conns >= rp->o->max_conns) {
            return;
        }
        rp->wq_head = (rp->wq_head + 1) % rp->n;
        rp->wq_len--;
        if (c) {
            conn_send(c, i);
        } else {
            conn_open(rp, i, 0);
        }
    }
}

/* ---- connections ---- */

static void on_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    if (--c->open_handles > 0) return;
    struct replay *rp = c->rp;
    if (c->all_prev)
        c->all_prev->all_next = c->all_next;
    else
        rp->all = c->all_next;
    if (c->all_next) c->all_next->all_prev = c->all_prev;
    lt_sse_free(&c->sse);
    free(c->owned_prompt);
    free(c);
}

static void conn_close(struct conn *c)
{
    if (c->state == CONN_CLOSING) return;
    struct replay *rp = c->rp;
    if (c->state == CONN_IDLE) idle_remove(rp, c);
    int was_warm = c->warm && c->state == CONN_CONNECTING;
    c->warm = 0;
    /* Closed before anything below can re-enter (replay_begin may stop the run
     * and close every connection). */
    c->state = CONN_CLOSING;
    rp->open_conns--;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    if (was_warm && --rp->warm_pending == 0 && !rp->started) replay_begin(rp);
    serve_waitq(rp);
}

/* The connection is free again: serve a waiting request or park it. */
static void conn_release(struct conn *c)
{
    struct replay *rp = c->rp;
    if (rp->stopping) {
        conn_close(c);
        return;
    }
    idle_push(rp, c);
    serve_waitq(rp);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    struct conn *c = h->data;
    *buf = uv_buf_init(c->rbuf, sizeof(c->rbuf));
}

static void on_write(uv_write_t *wr, int status)
{
    struct conn *c = wr->data;
    if (c->state == CONN_CLOSING || status == 0) return;
    fail(c, "write: %s", uv_strerror(status));
}

static void on_timeout(uv_timer_t *t)
{
    struct conn *c = t->data;
    if (c->req == LT_NO_REQ) return;
    lt_record *r = &c->rp->recs[c->req];
    fail(c, "timeout after %.3f s (%d chunks received)", td_ns_to_s(c->rp->o->timeout_ns),
         r->n_chunks);
}

/* ---- SSE (loadtest/lt_sse.c parses; this records) ---- */

static void on_sse_text(void *arg)
{
    struct conn *c = arg;
    lt_record *r = &c->rp->recs[c->req];
    int64_t t = c->now - c->send_abs;
    if (r->n_chunks == 0) r->ttft_ns = t;
    if (r->n_chunks < r->chunk_cap) r->chunk_ns[r->n_chunks] = t;
    r->n_chunks++;
}

/* ---- HTTP response ---- */

static int on_body(http_parser *hp, const char *at, size_t len)
{
    struct conn *c = hp->data;
    if (hp->status_code == 200) {
        lt_sse_feed(&c->sse, at, len);
    } else {
        size_t room = sizeof(c->errbody) - 1 - c->errbody_len;
        size_t k = len < room ? len : room;
        memcpy(c->errbody + c->errbody_len, at, k);
        c->errbody_len += k;
        c->errbody[c->errbody_len] = '\0';
    }
    return 0;
}

static void hdr_append(char *buf, size_t cap, size_t *len, const char *at, size_t n)
{
    size_t k = n < cap - 1 - *len ? n : cap - 1 - *len;
    memcpy(buf + *len, at, k);
    *len += k;
    buf[*len] = '\0';
}

static int on_header_field(http_parser *hp, const char *at, size_t len)
{
    struct conn *c = hp->data;
    if (c->hdr_state != 1) {
        c->hdr_state = 1;
        c->hfield_len = 0;
        c->hfield[0] = '\0';
    }
    hdr_append(c->hfield, sizeof(c->hfield), &c->hfield_len, at, len);
    return 0;
}

static int on_header_value(http_parser *hp, const char *at, size_t len)
{
    struct conn *c = hp->data;
    if (c->hdr_state != 2) {
        c->hdr_state = 2;
        c->hvalue_kind = strcasecmp(c->hfield, "retry-after") == 0      ? 1
                         : strcasecmp(c->hfield, "retry-after-ms") == 0 ? 2
                                                                        : 0;
        if (c->hvalue_kind) c->hvalue_len[c->hvalue_kind - 1] = 0;
    }
    if (c->hvalue_kind) {
        int k = c->hvalue_kind - 1;
        hdr_append(c->hvalue[k], sizeof(c->hvalue[k]), &c->hvalue_len[k], at, len);
    }
    return 0;
}

static int on_headers_complete(http_parser *hp)
{
    struct conn *c = hp->data;
    c->rp->recs[c->req].http_status = hp->status_code;
    return 0;
}

static int on_message_complete(http_parser *hp)
{
    struct conn *c = hp->data;
    c->msg_done = 1;
    http_parser_pause(hp, 1); /* stop here: the request is finished after execute returns */
    return 0;
}

static void retry_push(struct replay *rp, int64_t due, size_t i);

/* The OpenAI client's wait before retry number `done + 1` of a 429, in ns. */
static int64_t retry_wait_ns(const struct conn *c, int done)
{
    char *end;
    if (c->hvalue_len[1] > 0) {
        double ms = strtod(c->hvalue[1], &end);
        if (end != c->hvalue[1] && ms > 0 && ms <= 60000) return (int64_t)(ms * 1e6);
    }
    if (c->hvalue_len[0] > 0) {
        double s = strtod(c->hvalue[0], &end);
        if (end != c->hvalue[0] && s > 0 && s <= 60) return (int64_t)(s * 1e9);
    }
    double b = 0.5 * (double)(1u << (done < 5 ? done : 5));
    return (int64_t)((b < 8 ? b : 8) * 1e9);
}

static void complete(struct conn *c)
{
    lt_record *r = &c->rp->recs[c->req];
    struct replay *rp = c->rp;
    if (r->http_status == 429 && r->attempts <= rp->o->retry_429 && !rp->stopping) {
        /* A client retry: this attempt is not the request's end. */
        int keep = http_should_keep_alive(&c->parser);
        size_t i = c->req;
        c->req = LT_NO_REQ;
        uv_timer_stop(&c->timer);
        rp->retries++;
        retry_push(rp, td_now_ns() + retry_wait_ns(c, r->attempts - 1), i);
        if (keep && c->state == CONN_BUSY)
            conn_release(c);
        else
            conn_close(c);
        return;
    }
    int keep = http_should_keep_alive(&c->parser);
    lt_sse_end(&c->sse);
    for (char *q = c->errbody; *q; q++)
        if (*q == '\n' || *q == '\r') *q = ' ';
    if (r->http_status == 200 && c->sse.err[0]) {
        snprintf(r->error, sizeof(r->error), "%s", c->sse.err);
        finish(c, LT_ERROR);
    } else if (r->http_status == 200 && !c->sse.done_seen) {
        snprintf(r->error, sizeof(r->error), "stream ended without [DONE] (%d chunks)",
                 r->n_chunks);
        finish(c, LT_ERROR);
    } else if (r->http_status == 200) {
        finish(c, LT_OK);
    } else {
        snprintf(r->error, sizeof(r->error), "HTTP %d: %s", r->http_status, c->errbody);
        finish(c, r->http_status == 429 ? LT_REJECTED : LT_ERROR);
    }
    if (keep && c->state == CONN_BUSY)
        conn_release(c);
    else
        conn_close(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    if (c->state == CONN_CLOSING) return;
    if (nread == 0) return;
    if (c->req == LT_NO_REQ) {
        /* EOF or stray bytes on an idle keep-alive connection: drop it. */
        conn_close(c);
        return;
    }
    c->now = td_now_ns();
    if (nread < 0) {
        if (nread == UV_EOF) {
            /* A body delimited by the close completes here; anything else is cut short. */
            http_parser_execute(&c->parser, &c->rp->settings, NULL, 0);
            if (c->msg_done) {
                complete(c);
                conn_close(c);
                return;
            }
            if (c->rp->recs[c->req].http_status == 0)
                fail(c, "connection closed before any response (idle keep-alive closed by the "
                        "server?)");
            else
                fail(c, "connection closed mid-stream (%d chunks received)",
                     c->rp->recs[c->req].n_chunks);
        } else {
            fail(c, "read: %s", uv_strerror((int)nread));
        }
        return;
    }
    http_parser_execute(&c->parser, &c->rp->settings, buf->base, (size_t)nread);
    enum http_errno he = HTTP_PARSER_ERRNO(&c->parser);
    if (c->msg_done)
        complete(c);
    else if (he != HPE_OK)
        fail(c, "bad HTTP response: %s", http_errno_name(he));
    else if (c->sse.err[0])
        fail(c, "%s", c->sse.err);
}

/* ---- sending ---- */

static void conn_send(struct conn *c, size_t i)
{
    struct replay *rp = c->rp;
    const lt_req *q = &rp->reqs[i];
    lt_record *r = &rp->recs[i];
    c->state = CONN_BUSY;
    c->req = i;
    c->msg_done = 0;
    lt_sse_reset(&c->sse);
    c->errbody[0] = '\0';
    c->errbody_len = 0;
    c->hdr_state = 0;
    c->hvalue_len[0] = c->hvalue_len[1] = 0;
    c->hvalue[0][0] = c->hvalue[1][0] = '\0';
    http_parser_init(&c->parser, HTTP_RESPONSE);
    c->parser.data = c;

    /* The prompt head is per request (copied into the connection: it must live
     * until the write completes); the tail is shared, read-only bytes. */
    free(c->owned_prompt);
    c->owned_prompt = NULL;
    if (rp->o->hashes && q->n_hash > 0) {
        /* Shared prefix blocks: the prompt is built whole for this request. */
        lt_prompt_shape shape = {.hashes = rp->o->hashes + q->hash_off,
                                 .n_hash = q->n_hash,
                                 .block_tokens = rp->o->block_tokens};
        size_t len;
        if (lt_prompt_text(rp->o->prompt, q->input_tokens, (uint64_t)i, &shape, &c->owned_prompt,
                           &len) != 0) {
            fail(c, "out of memory building the prompt");
            return;
        }
        c->prompt.head_len = 0;
        c->prompt.tail = c->owned_prompt;
        c->prompt.tail_len = len;
    } else {
        lt_prompt_get(rp->o->prompt, q->input_tokens, (uint64_t)i, &c->prompt);
    }
    int text = lt_prompt_is_text(rp->o->prompt);
    char body_head[400];
    int bh = snprintf(body_head, sizeof(body_head), "{%s\"prompt\":%c", rp->model_json,
                      text ? '"' : '[');
    int tl = snprintf(c->tail, sizeof(c->tail),
                      "%c,\"max_tokens\":%d,\"ignore_eos\":true,\"stream\":true,"
                      "\"stream_options\":{\"include_usage\":true}}",
                      text ? '"' : ']', q->output_tokens);
    size_t body_len = (size_t)bh + c->prompt.head_len + c->prompt.tail_len + (size_t)tl;
    int hl = snprintf(c->head, sizeof(c->head),
                      "POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: tandem-loadtest\r\n"
                      "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                      "Content-Length: %zu\r\n\r\n%s",
                      rp->o->url.path, rp->host_hdr, body_len, body_head);
    uv_buf_t bufs[4] = {uv_buf_init(c->head, (unsigned)hl),
                        uv_buf_init(c->prompt.head, (unsigned)c->prompt.head_len),
                        uv_buf_init((char *)c->prompt.tail, (unsigned)c->prompt.tail_len),
                        uv_buf_init(c->tail, (unsigned)tl)};
    /* Times count from the first attempt's send: a retry's TTFT and e2e
     * include the 429s and the waits. */
    if (r->attempts == 0 || r->send_ns < 0) r->send_ns = td_now_ns() - rp->start_ns;
    c->send_abs = rp->start_ns + r->send_ns;
    r->attempts++;
    rp->sent++;
    c->write_req.data = c;
    int rc = uv_write(&c->write_req, (uv_stream_t *)&c->tcp, bufs, 4, on_write);
    if (rc) {
        fail(c, "write: %s", uv_strerror(rc));
        return;
    }
    if (rp->o->timeout_ns > 0) {
        uv_update_time(&rp->loop); /* the cached loop time may be a whole tick old */
        uv_timer_start(&c->timer, on_timeout, (uint64_t)((rp->o->timeout_ns + 999999) / 1000000),
                       0);
    }
}

static void on_connect(uv_connect_t *cr, int status)
{
    struct conn *c = cr->data;
    struct replay *rp = c->rp;
    if (c->state == CONN_CLOSING) return;
    if (status < 0) {
        fail(c, "connect: %s", uv_strerror(status));
        return;
    }
    int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc) {
        fail(c, "read start: %s", uv_strerror(rc));
        return;
    }
    if (c->warm) {
        c->warm = 0;
        rp->warm_pending--;
    }
    if (c->req != LT_NO_REQ) {
        size_t i = c->req;
        conn_send(c, i);
    } else {
        conn_release(c);
    }
    if (rp->warm_pending == 0 && !rp->started) replay_begin(rp);
}

/* Opens a connection; request i (or LT_NO_REQ) is sent once it is connected. */
static void conn_open(struct replay *rp, size_t i, int warm)
{
    struct conn *c = calloc(1, sizeof(*c));
    if (!c) {
        if (i != LT_NO_REQ) {
            snprintf(rp->recs[i].error, sizeof(rp->recs[i].error), "out of memory");
            rp->recs[i].outcome = LT_ERROR;
            rp->errors++;
            if (++rp->done == rp->n) replay_stop(rp);
        }
        return;
    }
    c->rp = rp;
    c->req = LT_NO_REQ;
    lt_sse_init(&c->sse, on_sse_text, c);
    c->state = CONN_CONNECTING;
    c->warm = warm;
    uv_tcp_init(&rp->loop, &c->tcp);
    uv_timer_init(&rp->loop, &c->timer);
    c->tcp.data = c->timer.data = c->connect_req.data = c;
    c->open_handles = 2;
    c->all_next = rp->all;
    if (rp->all) rp->all->all_prev = c;
    rp->all = c;
    rp->open_conns++;
    rp->conns_opened++;
    if (warm) rp->warm_pending++;
    if (i != LT_NO_REQ) {
        /* Marked now so a failed connect is charged to this request (a
         * retry keeps its first send time). */
        c->req = i;
        lt_record *r = &rp->recs[i];
        if (r->attempts == 0 || r->send_ns < 0) r->send_ns = td_now_ns() - rp->start_ns;
        c->send_abs = rp->start_ns + r->send_ns;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    int rc =
        uv_tcp_connect(&c->connect_req, &c->tcp, (const struct sockaddr *)&rp->addr, on_connect);
    if (rc) fail(c, "connect: %s", uv_strerror(rc));
}

/* ---- scheduling ---- */

static void dispatch(struct replay *rp, size_t i)
{
    rp->recs[i].sched_ns = rp->reqs[i].t_ns;
    dispatch_attempt(rp, i);
}

/* ---- client retries ---- */

static int retry_less(const struct retry_ent *a, const struct retry_ent *b)
{
    return a->due < b->due || (a->due == b->due && a->i < b->i);
}

static void on_retry_timer(uv_timer_t *t);

static void arm_retry(struct replay *rp)
{
    if (!rp->retry_open || rp->n_retry == 0) return;
    int64_t wait = rp->retryq[0].due - td_now_ns();
    uv_update_time(&rp->loop);
    uv_timer_start(&rp->retry_timer, on_retry_timer,
                   (uint64_t)(wait > 0 ? (wait + 999999) / 1000000 : 0), 0);
}

static void retry_push(struct replay *rp, int64_t due, size_t i)
{
    struct retry_ent e = {.due = due, .i = i};
    size_t k = rp->n_retry++; /* room: one entry per request at most */
    while (k > 0) {
        size_t p = (k - 1) / 2;
        if (!retry_less(&e, &rp->retryq[p])) break;
        rp->retryq[k] = rp->retryq[p];
        k = p;
    }
    rp->retryq[k] = e;
    if (k == 0) arm_retry(rp);
}

static size_t retry_pop(struct replay *rp)
{
    size_t top = rp->retryq[0].i;
    struct retry_ent last = rp->retryq[--rp->n_retry];
    size_t k = 0;
    for (;;) {
        size_t l = 2 * k + 1, m = k;
        const struct retry_ent *best = &last;
        if (l < rp->n_retry && retry_less(&rp->retryq[l], best)) {
            m = l;
            best = &rp->retryq[l];
        }
        if (l + 1 < rp->n_retry && retry_less(&rp->retryq[l + 1], best)) m = l + 1;
        if (m == k) break;
        rp->retryq[k] = rp->retryq[m];
        k = m;
    }
    if (rp->n_retry > 0) rp->retryq[k] = last;
    return top;
}

static void on_retry_timer(uv_timer_t *t)
{
    struct replay *rp = t->data;
    int64_t now = td_now_ns();
    while (rp->n_retry > 0 && rp->retryq[0].due <= now && !rp->stopping) {
        size_t i = retry_pop(rp);
        lt_record *r = &rp->recs[i];
        /* A fresh attempt: what the 429 left is dropped. */
        r->http_status = 0;
        r->n_chunks = 0;
        r->ttft_ns = -1;
        r->error[0] = '\0';
        dispatch_attempt(rp, i);
    }
    arm_retry(rp);
}

static void dispatch_attempt(struct replay *rp, size_t i)
{
    if (rp->grpc) {
        rp->sent++;
        lt_grpc_send(rp->grpc, i, rp->start_ns);
        return;
    }
    struct conn *c = rp->idle;
    if (c) {
        idle_remove(rp, c);
        conn_send(c, i);
    } else if (rp->open_conns < rp->o->max_conns) {
        conn_open(rp, i, 0);
    } else {
        rp->waitq[(rp->wq_head + rp->wq_len) % rp->n] = i;
        rp->wq_len++;
    }
}

static void arm_tick(struct replay *rp)
{
    if (rp->next >= rp->n || rp->stopping) return;
    /* Wake spin_ns early; on_tick spins the rest (scheduler wake-up latency
     * is then paid before the deadline instead of after it). */
    int64_t at = rp->start_ns + rp->reqs[rp->next].t_ns - rp->o->spin_ns;
    if (at <= 0) at = 1;
    struct itimerspec its = {.it_value = {.tv_sec = at / TD_NS_PER_S, .tv_nsec = at % TD_NS_PER_S}};
    if (timerfd_settime(rp->timerfd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
        td_log_error("loadtest", "timerfd_settime_failed", "errno=%d", errno);
}

static void on_tick(uv_poll_t *h, int status, int events)
{
    (void)events;
    struct replay *rp = h->data;
    uint64_t expirations;
    if (read(rp->timerfd, &expirations, sizeof(expirations)) < 0 && errno != EAGAIN)
        td_log_warn("loadtest", "timerfd_read_failed", "errno=%d", errno);
    if (status < 0) return;
    int64_t now = td_now_ns();
    if (rp->next < rp->n && rp->o->spin_ns > 0) {
        int64_t due = rp->start_ns + rp->reqs[rp->next].t_ns;
        while (now < due && due - now <= rp->o->spin_ns)
            now = td_now_ns();
    }
    while (rp->next < rp->n && !rp->stopping && rp->start_ns + rp->reqs[rp->next].t_ns <= now) {
        dispatch(rp, rp->next++);
        now = td_now_ns();
    }
    arm_tick(rp);
}

static void on_progress(uv_timer_t *t)
{
    struct replay *rp = t->data;
    fprintf(stderr,
            "\r[%7.1fs] sent %zu/%zu  done %zu  ok %zu  429 %zu  err %zu  conns %d  waiting %zu  ",
            td_ns_to_s(td_now_ns() - rp->start_ns), rp->sent, rp->n, rp->done, rp->ok, rp->rejected,
            rp->errors, rp->open_conns, rp->wq_len);
    fflush(stderr);
}

static void replay_begin(struct replay *rp)
{
    rp->started = 1;
    rp->start_ns = td_now_ns();
    rp->start_wall_ns = td_wall_ns();
    if (rp->n == 0) {
        replay_stop(rp);
        return;
    }
    if (rp->o->progress && rp->progress_open)
        uv_timer_start(&rp->progress, on_progress, 1000, 1000);
    arm_tick(rp);
}

/* lt_grpc finished request i: count it like the HTTP path does. */
static void on_grpc_done(void *arg, size_t i)
{
    struct replay *rp = arg;
    enum lt_outcome oc = rp->recs[i].outcome;
    rp->ok += oc == LT_OK;
    rp->rejected += oc == LT_REJECTED;
    rp->errors += oc == LT_ERROR;
    if (++rp->done == rp->n) replay_stop(rp);
}

static void on_tick_closed(uv_handle_t *h)
{
    struct replay *rp = h->data;
    close(rp->timerfd);
    rp->timerfd = -1;
}

static void replay_stop(struct replay *rp)
{
    if (rp->stopping) return;
    rp->stopping = 1;
    if (rp->tick_open) {
        rp->tick_open = 0;
        uv_poll_stop(&rp->tick);
        uv_close((uv_handle_t *)&rp->tick, on_tick_closed);
    }
    if (rp->progress_open) {
        rp->progress_open = 0;
        if (rp->o->progress && rp->started) {
            on_progress(&rp->progress);
            fputc('\n', stderr);
        }
        uv_close((uv_handle_t *)&rp->progress, NULL);
    }
    if (rp->retry_open) {
        rp->retry_open = 0;
        uv_close((uv_handle_t *)&rp->retry_timer, NULL);
    }
    lt_grpc_close(rp->grpc);
    /* Connections still busy finish first (their requests are done only when
     * they end); everything idle or connecting without a request goes now. */
    for (struct conn *c = rp->all, *next; c; c = next) {
        next = c->all_next;
        if (c->req == LT_NO_REQ) conn_close(c);
    }
}

static int json_escape(const char *s, char *out, size_t cap)
{
    size_t w = 0;
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        char tmp[8];
        int k;
        if (ch == '"' || ch == '\\')
            k = snprintf(tmp, sizeof(tmp), "\\%c", ch);
        else if (ch < 0x20)
            k = snprintf(tmp, sizeof(tmp), "\\u%04x", ch);
        else
            k = snprintf(tmp, sizeof(tmp), "%c", ch);
        if (w + (size_t)k + 1 > cap) return TD_ETOOLONG;
        memcpy(out + w, tmp, (size_t)k);
        w += (size_t)k;
    }
    out[w] = '\0';
    return 0;
}

void lt_run_free(lt_run *run)
{
    if (!run) return;
    free(run->recs);
    free(run->arena);
    memset(run, 0, sizeof(*run));
}

int lt_replay_run(const lt_replay_opts *opts, const lt_req *reqs, size_t n, lt_run *out, char *err,
                  size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (!opts || !opts->prompt || (n > 0 && !reqs)) return TD_EINVAL;
    lt_replay_opts o = *opts;
    if (o.max_conns <= 0) o.max_conns = 1024;
    if (o.warm_conns < 0) o.warm_conns = 4;
    if (o.warm_conns > o.max_conns) o.warm_conns = o.max_conns;
    if (o.max_chunk_times <= 0) o.max_chunk_times = 64LL << 20;
    if (o.block_tokens <= 0) o.block_tokens = 512;

    /* Chunk-time arena: max(max_tokens, 1) + 1 slots per request, checked for overflow. */
    int64_t slots = 0;
    for (size_t i = 0; i < n; i++) {
        slots += (int64_t)(reqs[i].output_tokens > 0 ? reqs[i].output_tokens : 1) + 1;
        if (slots > o.max_chunk_times) {
            td_err_set(err, errlen,
                       "the trace needs more than %lld chunk timestamps; use --max-requests",
                       (long long)o.max_chunk_times);
            return TD_ERANGE;
        }
    }

    char port[8];
    snprintf(port, sizeof(port), "%d", o.url.port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int gai = getaddrinfo(o.url.host, port, &hints, &ai);
    if (gai != 0 || !ai) {
        td_err_set(err, errlen, "%s: %s", o.url.host, gai_strerror(gai));
        return TD_ENOENT;
    }
    if (o.url.grpc) o.warm_conns = 0; /* gRPC multiplexes every stream on one channel */

    int rc = TD_ENOMEM;
    struct replay *rp = calloc(1, sizeof(*rp));
    lt_record *recs = calloc(n ? n : 1, sizeof(lt_record));
    int64_t *arena = malloc((size_t)(slots ? slots : 1) * sizeof(int64_t));
    if (!rp || !recs || !arena) goto fail;
    rp->waitq = malloc((n ? n : 1) * sizeof(size_t));
    if (!rp->waitq) goto fail;
    if (o.retry_429 > 0) {
        if (o.url.grpc) {
            td_err_set(err, errlen, "--retry-429 needs an http:// URL");
            rc = TD_EINVAL;
            goto fail;
        }
        rp->retryq = malloc((n ? n : 1) * sizeof(*rp->retryq));
        if (!rp->retryq) goto fail;
    }
    if (ai->ai_addrlen > sizeof(rp->addr)) {
        rc = TD_EINVAL;
        goto fail;
    }
    memcpy(&rp->addr, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    ai = NULL;
    rp->o = &o;
    rp->reqs = reqs;
    rp->n = n;
    rp->recs = recs;
    rp->timerfd = -1;
    int64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        lt_record *r = &recs[i];
        r->sched_ns = reqs[i].t_ns;
        r->send_ns = r->ttft_ns = r->e2e_ns = -1;
        r->input_tokens = reqs[i].input_tokens;
        r->max_tokens = reqs[i].output_tokens;
        r->chunk_ns = arena + off;
        r->chunk_cap = (reqs[i].output_tokens > 0 ? reqs[i].output_tokens : 1) + 1;
        off += r->chunk_cap;
    }
    if (strchr(o.url.host, ':'))
        snprintf(rp->host_hdr, sizeof(rp->host_hdr), "[%s]:%d", o.url.host, o.url.port);
    else
        snprintf(rp->host_hdr, sizeof(rp->host_hdr), "%s:%d", o.url.host, o.url.port);
    if (o.model) {
        char esc[256];
        if (json_escape(o.model, esc, sizeof(esc)) != 0) {
            td_err_set(err, errlen, "model name too long");
            rc = TD_EINVAL;
            goto fail;
        }
        snprintf(rp->model_json, sizeof(rp->model_json), "\"model\":\"%s\",", esc);
    }
    rp->settings.on_body = on_body;
    rp->settings.on_headers_complete = on_headers_complete;
    rp->settings.on_header_field = on_header_field;
    rp->settings.on_header_value = on_header_value;
    rp->settings.on_message_complete = on_message_complete;

    /* Writes to a peer that closed must fail with EPIPE, not kill the process. */
    signal(SIGPIPE, SIG_IGN);

    rc = uv_loop_init(&rp->loop);
    if (rc) {
        td_err_set(err, errlen, "uv_loop_init: %s", uv_strerror(rc));
        rc = TD_EINTERNAL;
        goto fail;
    }
    rp->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (rp->timerfd < 0 || uv_poll_init(&rp->loop, &rp->tick, rp->timerfd) != 0) {
        td_err_set(err, errlen, "timerfd: %s", strerror(errno));
        if (rp->timerfd >= 0) close(rp->timerfd);
        uv_loop_close(&rp->loop);
        rc = TD_EINTERNAL;
        goto fail;
    }
    rp->tick.data = rp;
    rp->tick_open = 1;
    if (o.url.grpc) {
        rc =
            lt_grpc_create(&rp->loop, rp->host_hdr, &o, reqs, recs, n, on_grpc_done, rp, &rp->grpc);
        if (rc) {
            td_err_set(err, errlen, "grpc client for %s: %s", rp->host_hdr, td_strerror(rc));
            uv_close((uv_handle_t *)&rp->tick, NULL);
            uv_run(&rp->loop, UV_RUN_DEFAULT);
            close(rp->timerfd);
            uv_loop_close(&rp->loop);
            goto fail;
        }
    }
    uv_poll_start(&rp->tick, UV_READABLE, on_tick);
    uv_timer_init(&rp->loop, &rp->progress);
    rp->progress.data = rp;
    rp->progress_open = 1;
    uv_timer_init(&rp->loop, &rp->retry_timer);
    rp->retry_timer.data = rp;
    rp->retry_open = 1;

    for (int k = 0; k < o.warm_conns; k++)
        conn_open(rp, LT_NO_REQ, 1);
    if (rp->warm_pending == 0 && !rp->started) replay_begin(rp);
    /* On a loaded machine the send-time tail is other processes holding the CPU
     * when a timer fires; a real-time class for this (mostly sleeping) thread
     * removes that. Opt-in, and undone after the run. */
    int old_policy = 0, rt_set = 0;
    struct sched_param old_param;
    if (o.rt_priority > 0 && pthread_getschedparam(pthread_self(), &old_policy, &old_param) == 0) {
        struct sched_param sp = {.sched_priority = o.rt_priority};
        int e = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
        if (e == 0)
            rt_set = 1;
        else
            td_log_warn("loadtest", "rt_priority_refused", "priority=%d errno=%d", o.rt_priority,
                        e);
    }
    uv_run(&rp->loop, UV_RUN_DEFAULT);
    if (rt_set) pthread_setschedparam(pthread_self(), old_policy, &old_param);
    if (uv_loop_close(&rp->loop) != 0) td_log_warn("loadtest", "loop_close_busy", NULL);

    lt_grpc_free(rp->grpc);
    out->recs = recs;
    out->n = n;
    out->arena = arena;
    out->conns_opened = rp->conns_opened;
    out->start_wall_ns = rp->start_wall_ns;
    free(rp->retryq);
    free(rp->waitq);
    free(rp);
    return 0;
fail:
    if (ai) freeaddrinfo(ai);
    if (rp) {
        free(rp->waitq);
        free(rp->retryq);
    }
    free(rp);
    free(recs);
    free(arena);
    return rc;
}
