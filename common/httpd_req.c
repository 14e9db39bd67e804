/* httpd_req: one request of httpd: its accessors and the response API
 * (respond, stream start/write/end). The bytes go out through the
 * connection's ordered output (httpd_conn.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/err.h"
#include "common/httpd_int.h"

httpd_req *httpd__req_new(httpd__conn *c)
{
    httpd_req *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    r->c = c;
    r->held_tail = &r->held;
    r->query = "";
    r->path = "";
    return r;
}

void httpd__req_free(httpd_req *r)
{
    httpd__out *o = r->held;
    while (o) {
        httpd__out *next = o->next;
        free(o);
        o = next;
    }
    free(r->head);
    free(r->body);
    free(r);
}

httpd__out *httpd__out_new(size_t len)
{
    httpd__out *o = malloc(sizeof(*o) + len);
    if (!o) return NULL;
    o->next = NULL;
    o->len = len;
    return o;
}

/* An orphan ended by the app. */
static int hd_orphan_end(httpd_req *r)
{
    if (r->notifying)
        r->state = HD_R_DONE; /* freed at the end of the on_close pass */
    else
        httpd__req_free(r);
    return TD_ECLOSED;
}

static const char *hd_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return status < 400 ? "OK" : "Error";
    }
}

static const char *hd_conn_header(const httpd_req *r)
{
    if (!r->keep_alive) return "Connection: close\r\n";
    return r->http10 ? "Connection: keep-alive\r\n" : "";
}

#define HD_HEAD_FMT "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s%s\r\n"

/* A response head plus body_len bytes of room (o->len counts both). */
static httpd__out *hd_head_new(const httpd_req *r, int status, const char *ctype, const char *extra,
                               const char *framing, size_t body_len)
{
    if (!ctype) ctype = "text/plain; charset=utf-8";
    if (!extra) extra = "";
    const char *reason = hd_reason(status);
    const char *conn = hd_conn_header(r);
    int n = snprintf(NULL, 0, HD_HEAD_FMT, status, reason, ctype, framing, conn, extra);
    if (n < 0) return NULL;
    httpd__out *o = httpd__out_new((size_t)n + 1 + body_len);
    if (!o) return NULL;
    snprintf(o->data, (size_t)n + 1, HD_HEAD_FMT, status, reason, ctype, framing, conn, extra);
    o->len = (size_t)n + body_len;
    return o;
}

/* The response with Content-Length; ends r. */
int httpd__req_respond(httpd_req *r, int status, const char *ctype, const char *extra,
                       const char *body, size_t len)
{
    char framing[48];
    snprintf(framing, sizeof(framing), "Content-Length: %zu\r\n", len);
    size_t send = r->method == HTTP_HEAD ? 0 : len;
    httpd__out *o = hd_head_new(r, status, ctype, extra, framing, send);
    if (!o) {
        httpd__conn_doom(r->c);
        httpd__req_done(r);
        return TD_ENOMEM;
    }
    if (send) memcpy(o->data + o->len - send, body, send);
    httpd__req_emit(r, o);
    httpd__req_done(r);
    return 0;
}

/* ---- the public response API ---- */

int httpd_respond(httpd_req *r, int status, const char *content_type, const char *extra_headers,
                  const char *body, size_t len)
{
    if (!r || (len && !body)) return TD_EINVAL;
    if (!r->c) return hd_orphan_end(r);
    if (r->state != HD_R_APP || r->started) return TD_EINVAL;
    if (r->c->doomed) {
        httpd__req_done(r);
        return TD_ECLOSED;
    }
    return httpd__req_respond(r, status, content_type, extra_headers, body, len);
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
    httpd__out *o = hd_head_new(r, status, content_type, extra_headers, framing, 0);
    if (!o) {
        httpd__conn_doom(c);
        return TD_ENOMEM;
    }
    httpd__req_emit(r, o);
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
        httpd__out *o = httpd__out_new(len + (r->chunked ? 24 : 0));
        if (!o) {
            httpd__conn_doom(c);
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
        httpd__req_emit(r, o);
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
        httpd__out *o = httpd__out_new(5);
        if (o) {
            memcpy(o->data, "0\r\n\r\n", 5);
            httpd__req_emit(r, o);
        } else {
            httpd__conn_doom(c);
            rc = TD_ENOMEM;
        }
    }
    httpd__req_done(r);
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
