#include "common/httpd.h"

#include <http_parser.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "common/err.h"
#include "common/log.h"

#define HD_MAX_HEAD  8192
#define HD_MAX_URL   2048
#define HD_MAX_CONNS 256
#define HD_IDLE_MS   10000

typedef struct hd_conn hd_conn;

struct httpd {
    uv_loop_t loop;
    uv_tcp_t listener;
    uv_async_t stop;
    pthread_t thread;
    bool thread_started;
    httpd_handler_fn fn;
    void *arg;
    int port;
    int n_conns;
    hd_conn *conns; /* intrusive list of open connections */
    http_parser_settings settings;
};

/* Connection states: READING (parsing requests, answering each as it
 * completes) -> CLOSING (uv_close issued on the socket and the timer; freed
 * when both close callbacks ran). */
struct hd_conn {
    uv_tcp_t tcp;
    uv_timer_t idle;
    http_parser parser;
    httpd *h;
    hd_conn *prev, *next;
    char url[HD_MAX_URL + 1];
    size_t url_len;
    size_t head_bytes;
    bool in_head;
    bool too_long;
    bool has_body;
    bool closing;
    int open_handles;
};

typedef struct hd_write {
    uv_write_t req;
    hd_conn *c;
    bool close_after;
    char *buf;
} hd_write;

static void hd_conn_closed(uv_handle_t *hnd)
{
    hd_conn *c = hnd->data;
    if (--c->open_handles == 0) free(c);
}

static void hd_conn_close(hd_conn *c)
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
    uv_close((uv_handle_t *)&c->idle, hd_conn_closed);
}

static void hd_write_done(uv_write_t *req, int status)
{
    hd_write *w = (hd_write *)req;
    if ((status < 0 || w->close_after) && !w->c->closing) hd_conn_close(w->c);
    free(w->buf);
    free(w);
}

static const char *hd_reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 413:
        return "Payload Too Large";
    case 431:
        return "Request Header Fields Too Large";
    case 503:
        return "Service Unavailable";
    default:
        return "Error";
    }
}

/* Writes one response; the body is taken over (freed after the write). */
static void hd_send(hd_conn *c, int status, const char *ctype, char *body, size_t len,
                    bool head_only, bool close_after)
{
    char hdr[256];
    int n = snprintf(hdr, sizeof(hdr),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n", status,
                     hd_reason(status), ctype ? ctype : "text/plain; charset=utf-8", len,
                     close_after ? "Connection: close\r\n" : "");
    size_t body_len = head_only ? 0 : len;
    hd_write *w = calloc(1, sizeof(*w));
    char *buf = w ? malloc((size_t)n + body_len) : NULL;
    if (!w || !buf) {
        free(w);
        free(buf);
        free(body);
        hd_conn_close(c);
        return;
    }
    memcpy(buf, hdr, (size_t)n);
    if (body_len) memcpy(buf + n, body, body_len);
    free(body);
    w->c = c;
    w->buf = buf;
    w->close_after = close_after;
    uv_buf_t b = uv_buf_init(buf, (unsigned)((size_t)n + body_len));
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, hd_write_done) != 0) {
        free(buf);
        free(w);
        hd_conn_close(c);
    }
}

static void hd_send_text(hd_conn *c, int status, const char *text, bool close_after)
{
    size_t len = strlen(text);
    char *body = malloc(len);
    if (body) memcpy(body, text, len);
    hd_send(c, status, NULL, body, body ? len : 0, false, close_after);
}

static int hd_on_message_begin(http_parser *p)
{
    hd_conn *c = p->data;
    c->url_len = 0;
    c->too_long = false;
    c->has_body = false;
    c->in_head = true;
    return 0;
}

static int hd_on_url(http_parser *p, const char *at, size_t len)
{
    hd_conn *c = p->data;
    if (c->url_len + len > HD_MAX_URL) {
        c->too_long = true;
        return 0;
    }
    memcpy(c->url + c->url_len, at, len);
    c->url_len += len;
    return 0;
}

static int hd_on_headers_complete(http_parser *p)
{
    hd_conn *c = p->data;
    c->in_head = false;
    c->head_bytes = 0;
    return 0;
}

static int hd_on_body(http_parser *p, const char *at, size_t len)
{
    (void)at;
    (void)len;
    hd_conn *c = p->data;
    c->has_body = true;
    return 0;
}

static int hd_on_message_complete(http_parser *p)
{
    hd_conn *c = p->data;
    bool keep = http_should_keep_alive(p) != 0;
    c->in_head = true; /* what follows is the next request's head */
    if (c->too_long) {
        hd_send_text(c, 431, "request line too long\n", true);
        return 1;
    }
    if (c->has_body) {
        hd_send_text(c, 413, "this endpoint takes no body\n", true);
        return 1;
    }
    c->url[c->url_len] = '\0';
    char *q = strchr(c->url, '?');
    if (q) *q = '\0';
    const char *method = http_method_str((enum http_method)p->method);
    bool head_only = p->method == HTTP_HEAD;
    httpd_response r = {.status = 404};
    if (p->method != HTTP_GET && p->method != HTTP_HEAD) {
        hd_send_text(c, 405, "method not allowed\n", !keep);
        return 0;
    }
    c->h->fn(c->h->arg, method, c->url, &r);
    hd_send(c, r.status, r.content_type, r.body, r.body ? r.len : 0, head_only, !keep);
    return keep ? 0 : 1;
}

static void hd_alloc(uv_handle_t *hnd, size_t suggested, uv_buf_t *buf)
{
    (void)hnd;
    static _Thread_local char slab[16384];
    (void)suggested;
    *buf = uv_buf_init(slab, sizeof(slab));
}

static void hd_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    hd_conn *c = s->data;
    if (nread < 0) {
        hd_conn_close(c);
        return;
    }
    if (nread == 0 || c->closing) return;
    uv_timer_again(&c->idle);
    if (c->in_head) {
        c->head_bytes += (size_t)nread;
        if (c->head_bytes > HD_MAX_HEAD) {
            uv_read_stop(s);
            hd_send_text(c, 431, "request head too large\n", true);
            return;
        }
    }
    size_t used = http_parser_execute(&c->parser, &c->h->settings, buf->base, (size_t)nread);
    if (c->closing) return;
    if (c->parser.http_errno != HPE_OK) {
        uv_read_stop(s);
        if (c->parser.http_errno != HPE_CB_message_complete)
            hd_send_text(c, 400, "malformed request\n", true);
        return;
    }
    (void)used;
}

static void hd_on_idle(uv_timer_t *t)
{
    hd_conn_close(t->data);
}

static void hd_on_connection(uv_stream_t *server, int status)
{
    httpd *h = server->data;
    if (status < 0) return;
    hd_conn *c = calloc(1, sizeof(*c));
    if (!c) return;
    c->h = h;
    uv_tcp_init(&h->loop, &c->tcp);
    uv_timer_init(&h->loop, &c->idle);
    c->tcp.data = c;
    c->idle.data = c;
    c->open_handles = 2;
    c->next = h->conns;
    if (h->conns) h->conns->prev = c;
    h->conns = c;
    h->n_conns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 || h->n_conns > HD_MAX_CONNS) {
        hd_conn_close(c);
        return;
    }
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->in_head = true;
    uv_timer_start(&c->idle, hd_on_idle, HD_IDLE_MS, HD_IDLE_MS);
    uv_read_start((uv_stream_t *)&c->tcp, hd_alloc, hd_on_read);
}

static void hd_on_stop(uv_async_t *a)
{
    httpd *h = a->data;
    while (h->conns)
        hd_conn_close(h->conns);
    uv_close((uv_handle_t *)&h->listener, NULL);
    uv_close((uv_handle_t *)&h->stop, NULL);
}

static void *hd_thread(void *arg)
{
    httpd *h = arg;
    uv_run(&h->loop, UV_RUN_DEFAULT);
    return NULL;
}

static int hd_parse_addr(const char *addr, struct sockaddr_in *sa)
{
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof(host)) return TD_EINVAL;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535) return TD_EINVAL;
    if (strcmp(host, "localhost") == 0) snprintf(host, sizeof(host), "127.0.0.1");
    return uv_ip4_addr(host[0] ? host : "0.0.0.0", (int)port, sa) == 0 ? 0 : TD_EINVAL;
}

int httpd_start(const char *addr, httpd_handler_fn fn, void *arg, httpd **out)
{
    *out = NULL;
    struct sockaddr_in sa;
    if (!addr || !fn || hd_parse_addr(addr, &sa) != 0) return TD_EINVAL;
    httpd *h = calloc(1, sizeof(*h));
    if (!h) return TD_ENOMEM;
    h->fn = fn;
    h->arg = arg;
    h->settings.on_message_begin = hd_on_message_begin;
    h->settings.on_url = hd_on_url;
    h->settings.on_headers_complete = hd_on_headers_complete;
    h->settings.on_body = hd_on_body;
    h->settings.on_message_complete = hd_on_message_complete;
    if (uv_loop_init(&h->loop) != 0) {
        free(h);
        return TD_ENOMEM;
    }
    uv_tcp_init(&h->loop, &h->listener);
    uv_async_init(&h->loop, &h->stop, hd_on_stop);
    h->listener.data = h;
    h->stop.data = h;
    int rc = uv_tcp_bind(&h->listener, (const struct sockaddr *)&sa, 0);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&h->listener, 128, hd_on_connection);
    if (rc != 0) {
        td_log_error("httpd", "listen_failed", "addr=%s err=\"%s\"", addr, uv_strerror(rc));
        uv_close((uv_handle_t *)&h->listener, NULL);
        uv_close((uv_handle_t *)&h->stop, NULL);
        uv_run(&h->loop, UV_RUN_DEFAULT);
        uv_loop_close(&h->loop);
        free(h);
        return TD_EIO;
    }
    struct sockaddr_storage bound;
    int blen = sizeof(bound);
    uv_tcp_getsockname(&h->listener, (struct sockaddr *)&bound, &blen);
    h->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    if (pthread_create(&h->thread, NULL, hd_thread, h) != 0) {
        hd_on_stop(&h->stop);
        uv_run(&h->loop, UV_RUN_DEFAULT);
        uv_loop_close(&h->loop);
        free(h);
        return TD_ENOMEM;
    }
    h->thread_started = true;
    *out = h;
    return 0;
}

int httpd_port(const httpd *h)
{
    return h->port;
}

void httpd_stop(httpd *h)
{
    if (!h) return;
    uv_async_send(&h->stop);
    if (h->thread_started) pthread_join(h->thread, NULL);
    uv_loop_close(&h->loop);
    free(h);
}
