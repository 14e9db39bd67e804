/* httpd_conn: one client connection of httpd.
 *
 * Requests of a connection sit in one list in arrival order (first..last).
 * Only the first request's output goes to the socket; a later request's
 * output is held on that request until every earlier one ended, which keeps
 * pipelined responses in order whatever order the app answers them in.
 *
 * Request states:
 *   PARSING  head or body still arriving (c->cur; always the last)
 *   APP      handed to the app, response not ended
 *   DONE     response ended; freed as soon as it is the first
 * A request the app owns (APP) when its connection closes becomes an orphan:
 * detached (r->c == NULL), told through on_close, freed when the app ends it.
 *
 * Connection timer, one at a time (timer_kind):
 *   IDLE    nothing in flight and nothing arriving: idle_timeout -> close
 *   HEAD    a request is arriving: head_timeout since its first byte -> 408
 *   LINGER  a close-after response is being flushed / the client is given a
 *           moment to read it (we discard what it still sends) -> close
 *   DOOM    a write could not be queued: close on the next loop turn, so the
 *           app is never called back from inside its own call
 *   NONE    requests in flight, the app is working
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/err.h"
#include "common/httpd_int.h"

#define HD_LINGER_MS 2000 /* after a close-after response: time to read it */

enum { HD_R_PARSING, HD_R_APP, HD_R_DONE };
enum { HD_T_NONE, HD_T_IDLE, HD_T_HEAD, HD_T_LINGER, HD_T_DOOM };
enum { HD_P_URL, HD_P_FIELD, HD_P_VALUE }; /* the part of the head being stored */

/* One write: the uv request and the bytes it sends, one allocation. */
typedef struct hd_out {
    uv_write_t req;
    httpd__conn *c;
    struct hd_out *next; /* held on a request that is not first yet */
    size_t len;          /* bytes of data */
    char data[];
} hd_out;

struct httpd_req {
    httpd__conn *c;  /* NULL once orphaned */
    httpd_req *next; /* in c's list, or in the orphan list while notifying */
    int state;       /* HD_R_* */
    int method;      /* enum http_method */
    bool keep_alive; /* the connection stays open after this response */
    bool http10;
    bool started;    /* stream_start was called */
    bool chunked;    /* the stream is chunked (else close-delimited) */
    bool want_drain; /* stream_write returned TD_EAGAIN, on_drain due */
    bool notifying;  /* orphan inside the on_close pass: not freed yet */
    char *head;      /* url '\0' (name '\0' value '\0')* */
    size_t head_len, head_cap;
    size_t hdr_start; /* offset of the first header name in head */
    int head_part;    /* HD_P_* */
    const char *path, *query;
    char *body; /* body_len bytes + '\0' */
    size_t body_len, body_cap;
    hd_out *held, **held_tail; /* output waiting for earlier responses */
    void (*on_close)(void *arg, httpd_req *r);
    void *close_arg;
    void (*on_drain)(void *arg, httpd_req *r);
    void *drain_arg;
};

struct httpd__conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shut;
    http_parser parser;
    httpd *h;
    httpd__conn *prev, *next; /* h->conns */
    httpd_req *first, *last;  /* requests in arrival order */
    httpd_req *cur;           /* the request being parsed, or NULL */
    size_t queued;            /* bytes handed to uv_write not yet done + held */
    size_t head_bytes;        /* of cur's head so far */
    int fail_status;          /* set by a parser callback: answer this and close; -1: close */
    const char *fail_msg;
    int timer_kind; /* HD_T_* */
    int handles;    /* tcp + timer not yet closed */
    bool closing;   /* uv_close issued */
    bool doomed;    /* closing on the next loop turn */
    bool no_more;   /* parse no further requests (close-after, error) */
    bool shutting;  /* close-after response done: shutdown issued */
};

static void hd_on_timer(uv_timer_t *t);

/* ---- requests ---- */

static httpd_req *hd_req_new(httpd__conn *c)
{
    httpd_req *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    r->c = c;
    r->held_tail = &r->held;
    r->query = "";
    r->path = "";
    return r;
}

static void hd_req_free(httpd_req *r)
{
    hd_out *o = r->held;
    while (o) {
        hd_out *next = o->next;
        free(o);
        o = next;
    }
    free(r->head);
    free(r->body);
    free(r);
}

static void hd_conn_append(httpd__conn *c, httpd_req *r)
{
    r->next = NULL;
    if (c->last)
        c->last->next = r;
    else
        c->first = r;
    c->last = r;
}

/* ---- timers ---- */

static void hd_timer_set(httpd__conn *c, int kind, int ms)
{
    if (c->closing || (c->doomed && kind != HD_T_DOOM)) return;
    c->timer_kind = kind;
    if (kind == HD_T_NONE)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, hd_on_timer, (uint64_t)ms, 0);
}

/* Picks the timer for the connection's state (HEAD is started by the parser). */
static void hd_conn_timer(httpd__conn *c)
{
    if (c->closing || c->doomed || c->shutting) return;
    if (c->cur && c->timer_kind == HD_T_HEAD) return;
    if (!c->first) {
        if (c->timer_kind != HD_T_IDLE) hd_timer_set(c, HD_T_IDLE, c->h->cfg.idle_timeout_ms);
    } else {
        hd_timer_set(c, HD_T_NONE, 0);
    }
}

static void hd_conn_doom(httpd__conn *c)
{
    if (c->closing || c->doomed) return;
    c->doomed = true;
    hd_timer_set(c, HD_T_DOOM, 0);
}

/* ---- output ---- */

static hd_out *hd_out_new(size_t len)
{
    hd_out *o = malloc(sizeof(*o) + len);
    if (!o) return NULL;
    o->next = NULL;
    o->len = len;
    return o;
}

static void hd_conn_drain(httpd__conn *c)
{
    size_t half = c->h->cfg.max_write_queue / 2;
    /* Rescan after each callback: the app may end requests from on_drain. */
    while (!c->closing && !c->doomed && c->queued < half) {
        httpd_req *r = c->first;
        while (r && !r->want_drain)
            r = r->next;
        if (!r) return;
        r->want_drain = false;
        if (r->on_drain) r->on_drain(r->drain_arg, r);
    }
}

static void hd_write_done(uv_write_t *w, int status)
{
    hd_out *o = (hd_out *)w;
    httpd__conn *c = o->c;
    c->queued -= o->len;
    free(o);
    if (c->closing) return;
    if (status < 0) {
        httpd__conn_close(c);
        return;
    }
    hd_conn_drain(c);
}

/* o's bytes are already counted in c->queued. */
static void hd_conn_send(httpd__conn *c, hd_out *o)
{
    o->c = c;
    uv_buf_t b = uv_buf_init(o->data, (unsigned)o->len);
    if (c->doomed || uv_write(&o->req, (uv_stream_t *)&c->tcp, &b, 1, hd_write_done) != 0) {
        c->queued -= o->len;
        free(o);
        hd_conn_doom(c);
    }
}

/* Output of r, in order: to the socket if r is first, else held. */
static void hd_req_emit(httpd_req *r, hd_out *o)
{
    httpd__conn *c = r->c;
    c->queued += o->len;
    if (r == c->first) {
        hd_conn_send(c, o);
    } else {
        *r->held_tail = o;
        r->held_tail = &o->next;
    }
}

static void hd_on_shutdown(uv_shutdown_t *s, int status)
{
    httpd__conn *c = s->data;
    if (c->closing) return;
    if (status < 0) {
        httpd__conn_close(c);
        return;
    }
    /* Our side is done. Let the client read the answer before the close:
     * closing with unread input would reset the connection and could destroy
     * the answer in flight. We keep discarding what it sends meanwhile. */
    hd_timer_set(c, HD_T_LINGER, HD_LINGER_MS);
}

static void hd_conn_shutdown(httpd__conn *c)
{
    c->no_more = true;
    if (c->doomed) return;
    c->shutting = true;
    c->shut.data = c;
    /* uv_shutdown waits for the queued writes. The timer bounds a client that
     * does not read at all. */
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, hd_on_shutdown) != 0) {
        c->shutting = false;
        hd_conn_doom(c);
        return;
    }
    hd_timer_set(c, HD_T_LINGER, c->h->cfg.idle_timeout_ms);
}

/* Frees ended requests at the front and releases the next one's held output. */
static void hd_conn_advance(httpd__conn *c)
{
    while (c->first && c->first->state == HD_R_DONE) {
        httpd_req *r = c->first;
        c->first = r->next;
        if (!c->first) c->last = NULL;
        bool close_after = !r->keep_alive;
        hd_req_free(r);
        if (close_after) {
            hd_conn_shutdown(c);
            return;
        }
        httpd_req *n = c->first;
        if (!n) break;
        hd_out *o = n->held;
        n->held = NULL;
        n->held_tail = &n->held;
        while (o) {
            hd_out *next = o->next;
            o->next = NULL;
            hd_conn_send(c, o);
            o = next;
        }
    }
    hd_conn_timer(c);
}

static void hd_req_done(httpd_req *r)
{
    r->state = HD_R_DONE;
    r->want_drain = false;
    if (r == r->c->first) hd_conn_advance(r->c);
}

/* An orphan ended by the app. */
static int hd_orphan_end(httpd_req *r)
{
    if (r->notifying)
        r->state = HD_R_DONE; /* freed at the end of the on_close pass */
    else
        hd_req_free(r);
    return TD_ECLOSED;
}

static const char *hd_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 400 ? "OK" : "Error";
    }
}

static const char *hd_conn_header(const httpd_req *r)
{
    if (!r->keep_alive) return "Connection: close\r\n";
    return r->http10 ? "Connection: keep-alive\r\n" : "";
}

#define HD_HEAD_FMT "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s%s\r\n"

/* A response head plus body_len bytes of room (o->len counts both). */
static hd_out *hd_head_new(const httpd_req *r, int status, const char *ctype, const char *extra,
                           const char *framing, size_t body_len)
{
    if (!ctype) ctype = "text/plain; charset=utf-8";
    if (!extra) extra = "";
    const char *reason = hd_reason(status);
    const char *conn = hd_conn_header(r);
    int n = snprintf(NULL, 0, HD_HEAD_FMT, status, reason, ctype, framing, conn, extra);
    if (n < 0) return NULL;
    hd_out *o = hd_out_new((size_t)n + 1 + body_len);
    if (!o) return NULL;
    snprintf(o->data, (size_t)n + 1, HD_HEAD_FMT, status, reason, ctype, framing, conn, extra);
    o->len = (size_t)n + body_len;
    return o;
}

/* The response with Content-Length; ends r. */
static int hd_req_respond(httpd_req *r, int status, const char *ctype, const char *extra,
                          const char *body, size_t len)
{
    char framing[48];
    snprintf(framing, sizeof(framing), "Content-Length: %zu\r\n", len);
    size_t send = r->method == HTTP_HEAD ? 0 : len;
    hd_out *o = hd_head_new(r, status, ctype, extra, framing, send);
    if (!o) {
        hd_conn_doom(r->c);
        hd_req_done(r);
        return TD_ENOMEM;
    }
    if (send) memcpy(o->data + o->len - send, body, send);
    hd_req_emit(r, o);
    hd_req_done(r);
    return 0;
}

/* An error found by httpd: answered in order, then the connection closes. */
static void hd_conn_fail(httpd__conn *c, int status, const char *msg)
{
    c->no_more = true;
    httpd_req *r = c->cur;
    c->cur = NULL;
    if (status < 0) { /* out of memory while parsing: no answer possible */
        httpd__conn_close(c);
        return;
    }
    if (!r) {
        r = hd_req_new(c);
        if (!r) {
            httpd__conn_close(c);
            return;
        }
        hd_conn_append(c, r);
    }
    r->keep_alive = false;
    r->method = HTTP_GET; /* a body even if the request was a HEAD */
    if (c->timer_kind == HD_T_HEAD) hd_timer_set(c, HD_T_NONE, 0);
    char body[256];
    int n = snprintf(body, sizeof(body),
                     "{\"error\":{\"message\":\"%s\",\"type\":\"invalid_request_error\","
                     "\"param\":null,\"code\":null}}",
                     msg);
    hd_req_respond(r, status, "application/json", NULL, body, (size_t)n);
}

/* ---- the public response API ---- */

int httpd_respond(httpd_req *r, int status, const char *content_type, const char *extra_headers,
                  const char *body, size_t len)
{
    if (!r || (len && !body)) return TD_EINVAL;
    if (!r->c) return hd_orphan_end(r);
    if (r->state != HD_R_APP || r->started) return TD_EINVAL;
    if (r->c->doomed) {
        hd_req_done(r);
        return TD_ECLOSED;
    }
    return hd_req_respond(r, status, content_type, extra_headers, body, len);
}

int httpd_stream_start(httpd_req *r, int status, const char *content_type,
                       const char *extra_headers)
{
    if (!r) return TD_EINVAL;
    if (!r->c) return TD_ECLOSED;
    if (r->state != HD_R_APP || r->started) return TD_EINVAL;
    r->started = true;
    httpd__conn *c = r->c;
    if (c->doomed) return TD_ECLOSED;
    r->chunked = !r->http10;
    if (!r->chunked) { /* close-delimited: nothing can follow on this connection */
        r->keep_alive = false;
        c->no_more = true;
    }
    const char *framing = r->chunked ? "Transfer-Encoding: chunked\r\n" : "";
    hd_out *o = hd_head_new(r, status, content_type, extra_headers, framing, 0);
    if (!o) {
        hd_conn_doom(c);
        return TD_ENOMEM;
    }
    hd_req_emit(r, o);
    return c->doomed ? TD_ECLOSED : 0;
}

int httpd_stream_write(httpd_req *r, const char *data, size_t len)
{
    if (!r || (len && !data)) return TD_EINVAL;
    if (!r->c) return TD_ECLOSED;
    if (r->state != HD_R_APP || !r->started) return TD_EINVAL;
    httpd__conn *c = r->c;
    if (c->doomed) return TD_ECLOSED;
    if (len > 0 && r->method != HTTP_HEAD) {
        hd_out *o = hd_out_new(len + (r->chunked ? 24 : 0));
        if (!o) {
            hd_conn_doom(c);
            return TD_ENOMEM;
        }
        size_t n = 0;
        if (r->chunked) n = (size_t)snprintf(o->data, 20, "%zx\r\n", len);
        memcpy(o->data + n, data, len);
        n += len;
        if (r->chunked) {
            memcpy(o->data + n, "\r\n", 2);
            n += 2;
        }
        o->len = n;
        hd_req_emit(r, o);
        if (c->doomed) return TD_ECLOSED;
    }
    if (c->queued > c->h->cfg.max_write_queue) {
        r->want_drain = true;
        return TD_EAGAIN;
    }
    return 0;
}

int httpd_stream_end(httpd_req *r)
{
    if (!r) return TD_EINVAL;
    if (!r->c) return hd_orphan_end(r);
    if (r->state != HD_R_APP || !r->started) return TD_EINVAL;
    httpd__conn *c = r->c;
    int rc = 0;
    if (c->doomed) {
        rc = TD_ECLOSED;
    } else if (r->chunked && r->method != HTTP_HEAD) {
        hd_out *o = hd_out_new(5);
        if (o) {
            memcpy(o->data, "0\r\n\r\n", 5);
            hd_req_emit(r, o);
        } else {
            hd_conn_doom(c);
            rc = TD_ENOMEM;
        }
    }
    hd_req_done(r);
    return rc;
}

void httpd_req_on_close(httpd_req *r, void (*fn)(void *arg, httpd_req *r), void *arg)
{
    r->on_close = fn;
    r->close_arg = arg;
}

void httpd_req_on_drain(httpd_req *r, void (*fn)(void *arg, httpd_req *r), void *arg)
{
    r->on_drain = fn;
    r->drain_arg = arg;
}

/* ---- accessors ---- */

const char *httpd_req_method(const httpd_req *r)
{
    return http_method_str((enum http_method)r->method);
}

const char *httpd_req_path(const httpd_req *r)
{
    return r->path;
}

const char *httpd_req_query(const httpd_req *r)
{
    return r->query;
}

const char *httpd_req_header(const httpd_req *r, const char *name)
{
    if (!r->head || !name) return NULL;
    const char *p = r->head + r->hdr_start, *end = r->head + r->head_len;
    while (p < end) {
        const char *value = p + strlen(p) + 1;
        if (value >= end) break;
        if (strcasecmp(p, name) == 0) return value;
        p = value + strlen(value) + 1;
    }
    return NULL;
}

const char *httpd_req_body(const httpd_req *r, size_t *len)
{
    if (len) *len = r->body_len;
    return r->body ? r->body : "";
}

void httpd__req_close_after(httpd_req *r)
{
    r->keep_alive = false;
    if (r->c) r->c->no_more = true;
}

int httpd__req_method(const httpd_req *r)
{
    return r->method;
}

/* ---- parsing ---- */

static int hd_fail_cb(httpd__conn *c, int status, const char *msg)
{
    c->fail_status = status;
    c->fail_msg = msg;
    return -1; /* stops the parser */
}

/* Appends a NUL (end of a part) if nul, then len bytes, keeping room for a
 * final NUL. */
static int hd_head_put(httpd__conn *c, httpd_req *r, bool nul, const char *at, size_t len)
{
    size_t need = r->head_len + (nul ? 1 : 0) + len + 2;
    if (need > r->head_cap) {
        size_t cap = r->head_cap ? r->head_cap : 512;
        while (cap < need)
            cap *= 2;
        char *p = realloc(r->head, cap);
        if (!p) return hd_fail_cb(c, -1, NULL);
        r->head = p;
        r->head_cap = cap;
    }
    if (nul) r->head[r->head_len++] = '\0';
    memcpy(r->head + r->head_len, at, len);
    r->head_len += len;
    return 0;
}

static int hd_head_add(http_parser *p, int part, const char *at, size_t len)
{
    httpd__conn *c = p->data;
    httpd_req *r = c->cur;
    if (c->closing || !r) return -1;
    bool next_part = r->head_part != part;
    /* Bytes of the head as sent, near enough: ": " and CRLF per header. */
    c->head_bytes += len + (part == HD_P_FIELD && next_part ? 4 : 0);
    if (c->head_bytes > c->h->cfg.max_head) return hd_fail_cb(c, 431, "request head too large");
    if (hd_head_put(c, r, next_part, at, len) != 0) return -1;
    if (next_part && part == HD_P_FIELD && r->hdr_start == 0) r->hdr_start = r->head_len - len;
    r->head_part = part;
    return 0;
}

static int hd_on_url(http_parser *p, const char *at, size_t len)
{
    return hd_head_add(p, HD_P_URL, at, len);
}

static int hd_on_header_field(http_parser *p, const char *at, size_t len)
{
    return hd_head_add(p, HD_P_FIELD, at, len);
}

static int hd_on_header_value(http_parser *p, const char *at, size_t len)
{
    return hd_head_add(p, HD_P_VALUE, at, len);
}

static int hd_on_message_begin(http_parser *p)
{
    httpd__conn *c = p->data;
    if (c->closing) return -1;
    httpd_req *r = hd_req_new(c);
    if (!r) return hd_fail_cb(c, -1, NULL);
    hd_conn_append(c, r);
    c->cur = r;
    c->head_bytes = 0;
    hd_timer_set(c, HD_T_HEAD, c->h->cfg.head_timeout_ms);
    return 0;
}

static int hd_on_headers_complete(http_parser *p)
{
    httpd__conn *c = p->data;
    httpd_req *r = c->cur;
    if (c->closing || !r) return -1;
    /* Close the last part; a header without a value gets "". */
    if (r->head_part == HD_P_FIELD && hd_head_put(c, r, true, "", 0) != 0) return -1;
    if (hd_head_put(c, r, true, "", 0) != 0) return -1;
    if (r->hdr_start == 0) r->hdr_start = r->head_len; /* no headers */
    r->method = (int)p->method;
    r->http10 = p->http_major < 1 || (p->http_major == 1 && p->http_minor == 0);
    r->keep_alive = http_should_keep_alive(p) != 0;
    char *url = r->head;
    if (url[0] != '/' && url[0] != '*') { /* absolute form: "http://host/path?q" */
        struct http_parser_url u;
        http_parser_url_init(&u);
        if (http_parser_parse_url(url, strlen(url), 0, &u) != 0)
            return hd_fail_cb(c, 400, "malformed request target");
        url = (u.field_set & (1 << UF_PATH)) ? url + u.field_data[UF_PATH].off : NULL;
    }
    if (url) {
        char *q = strpbrk(url, "?#");
        if (q) {
            if (*q == '?') {
                r->query = q + 1;
                char *frag = strchr(q + 1, '#');
                if (frag) *frag = '\0';
            }
            *q = '\0';
        }
        r->path = url;
    } else {
        r->path = "/";
    }
    bool has_len = (p->flags & F_CONTENTLENGTH) != 0;
    bool chunked = (p->flags & F_CHUNKED) != 0;
    if (has_len && p->content_length > c->h->cfg.max_body)
        return hd_fail_cb(c, 413, "request body too large");
    if (has_len && p->content_length > 0) {
        r->body = malloc((size_t)p->content_length + 1);
        if (!r->body) return hd_fail_cb(c, -1, NULL);
        r->body_cap = (size_t)p->content_length + 1;
        r->body[0] = '\0';
    }
    const char *expect = httpd_req_header(r, "Expect");
    if (expect && strcasecmp(expect, "100-continue") == 0 && !r->http10 &&
        (chunked || (has_len && p->content_length > 0))) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        hd_out *o = hd_out_new(sizeof(cont) - 1);
        if (!o) return hd_fail_cb(c, -1, NULL);
        memcpy(o->data, cont, sizeof(cont) - 1);
        hd_req_emit(r, o);
    }
    return 0;
}

static int hd_on_body(http_parser *p, const char *at, size_t len)
{
    httpd__conn *c = p->data;
    httpd_req *r = c->cur;
    if (c->closing || !r) return -1;
    if (len > c->h->cfg.max_body - r->body_len) return hd_fail_cb(c, 413, "request body too large");
    if (r->body_len + len + 1 > r->body_cap) {
        size_t cap = r->body_cap ? r->body_cap : 4096;
        while (cap < r->body_len + len + 1)
            cap *= 2;
        char *b = realloc(r->body, cap);
        if (!b) return hd_fail_cb(c, -1, NULL);
        r->body = b;
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    r->body[r->body_len] = '\0';
    return 0;
}

static int hd_on_message_complete(http_parser *p)
{
    httpd__conn *c = p->data;
    httpd_req *r = c->cur;
    if (c->closing || !r) return -1;
    c->cur = NULL;
    r->state = HD_R_APP;
    if (!r->keep_alive || p->upgrade) c->no_more = true;
    hd_timer_set(c, HD_T_NONE, 0);
    c->h->fn(c->h->arg, r); /* may end r (and free it) before returning */
    if (c->closing || c->doomed) return -1;
    if (c->no_more) http_parser_pause(p, 1);
    return 0;
}

void httpd__settings(http_parser_settings *s)
{
    memset(s, 0, sizeof(*s));
    s->on_message_begin = hd_on_message_begin;
    s->on_url = hd_on_url;
    s->on_header_field = hd_on_header_field;
    s->on_header_value = hd_on_header_value;
    s->on_headers_complete = hd_on_headers_complete;
    s->on_body = hd_on_body;
    s->on_message_complete = hd_on_message_complete;
}

/* ---- the connection ---- */

static void hd_alloc(uv_handle_t *hnd, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    httpd__conn *c = hnd->data;
    *buf = uv_buf_init(c->h->rbuf, sizeof(c->h->rbuf));
}

static void hd_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    httpd__conn *c = s->data;
    if (c->closing) return;
    if (nread < 0) { /* EOF or reset: the client is gone */
        httpd__conn_close(c);
        return;
    }
    if (nread == 0 || c->no_more || c->doomed) return; /* discarded */
    http_parser_execute(&c->parser, &c->h->settings, buf->base, (size_t)nread);
    if (c->closing) return;
    if (c->fail_status) {
        hd_conn_fail(c, c->fail_status, c->fail_msg);
        return;
    }
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (e == HPE_OK || e == HPE_PAUSED || c->doomed) return;
    if (e == HPE_HEADER_OVERFLOW)
        hd_conn_fail(c, 431, "request head too large");
    else
        hd_conn_fail(c, 400, "malformed request");
}

static void hd_on_timer(uv_timer_t *t)
{
    httpd__conn *c = t->data;
    if (c->timer_kind == HD_T_HEAD) {
        hd_conn_fail(c, 408, "request not received in time");
        return;
    }
    httpd__conn_close(c); /* IDLE, LINGER, DOOM */
}

static void hd_conn_closed(uv_handle_t *hnd)
{
    httpd__conn *c = hnd->data;
    if (--c->handles > 0) return;
    httpd *h = c->h;
    free(c);
    httpd__handle_gone(h);
}

void httpd__conn_close(httpd__conn *c)
{
    if (c->closing) return;
    c->closing = true;
    httpd *h = c->h;
    if (c->prev)
        c->prev->next = c->next;
    else
        h->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    h->n_conns--;
    uv_close((uv_handle_t *)&c->tcp, hd_conn_closed);
    uv_close((uv_handle_t *)&c->timer, hd_conn_closed);

    /* Requests the app owns become orphans; the rest go now. */
    httpd_req *orphans = NULL, **tail = &orphans;
    httpd_req *r = c->first;
    c->first = c->last = c->cur = NULL;
    while (r) {
        httpd_req *next = r->next;
        if (r->state == HD_R_APP) {
            hd_out *o = r->held;
            while (o) {
                hd_out *on = o->next;
                c->queued -= o->len;
                free(o);
                o = on;
            }
            r->held = NULL;
            r->held_tail = &r->held;
            r->c = NULL;
            r->want_drain = false;
            r->notifying = true;
            r->next = NULL;
            *tail = r;
            tail = &r->next;
        } else {
            hd_req_free(r);
        }
        r = next;
    }
    /* No orphan is freed during this pass (notifying), so the list holds even
     * when a callback ends other requests. */
    for (r = orphans; r; r = r->next)
        if (r->on_close) r->on_close(r->close_arg, r);
    while (orphans) {
        r = orphans;
        orphans = r->next;
        r->notifying = false;
        if (r->state == HD_R_DONE) hd_req_free(r);
    }
}

int httpd__conn_accept(httpd *h)
{
    httpd__conn *c = calloc(1, sizeof(*c));
    if (!c) return TD_ENOMEM;
    c->h = h;
    uv_tcp_init(h->loop, &c->tcp);
    uv_timer_init(h->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->handles = 2;
    c->next = h->conns;
    if (h->conns) h->conns->prev = c;
    h->conns = c;
    h->n_conns++;
    h->handles++;
    if (uv_accept((uv_stream_t *)&h->listener, (uv_stream_t *)&c->tcp) != 0 ||
        h->n_conns > h->cfg.max_conns) {
        httpd__conn_close(c);
        return 0;
    }
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    uv_tcp_nodelay(&c->tcp, 1); /* streamed tokens go out as they come */
    hd_conn_timer(c);
    if (uv_read_start((uv_stream_t *)&c->tcp, hd_alloc, hd_on_read) != 0) httpd__conn_close(c);
    return 0;
}
