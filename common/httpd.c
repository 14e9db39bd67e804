/* httpd: the server (listening, accepting, closing) and the simple mode on
 * its own thread. One connection's work is in httpd_conn.c. */
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/err.h"
#include "common/httpd_int.h"
#include "common/log.h"

#define HD_BACKLOG 511

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

/* A listening socket, made before any libuv handle exists so that a failure
 * leaves nothing to close asynchronously. Returns the fd or TD_EIO. */
static int hd_listen_fd(const char *addr, const struct sockaddr_in *sa, int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) goto fail;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)sa, sizeof(*sa)) != 0) goto fail;
    if (listen(fd, HD_BACKLOG) != 0) goto fail;
    struct sockaddr_in bound;
    socklen_t blen = sizeof(bound);
    if (getsockname(fd, (struct sockaddr *)&bound, &blen) != 0) goto fail;
    *port = ntohs(bound.sin_port);
    return fd;
fail:;
    int e = errno;
    td_log_error("httpd", "listen_failed", "addr=%s err=\"%s\"", addr, strerror(e));
    if (fd >= 0) close(fd);
    return TD_EIO;
}

void httpd__handle_gone(httpd *h)
{
    if (--h->handles > 0 || !h->closing) return;
    if (h->done) h->done(h->done_arg);
    if (!h->thr) free(h); /* the simple mode frees in httpd_stop */
}

static void hd_handle_closed(uv_handle_t *hnd)
{
    httpd__handle_gone(hnd->data);
}

static void hd_on_connection(uv_stream_t *server, int status);

static void hd_reject_closed(uv_handle_t *hnd)
{
    httpd *h = hnd->data;
    h->reject_busy = false;
    if (h->accept_stalled && !h->closing) {
        h->accept_stalled = false;
        hd_on_connection((uv_stream_t *)&h->listener, 0);
    }
    httpd__handle_gone(h);
}

static void hd_on_connection(uv_stream_t *server, int status)
{
    httpd *h = server->data;
    if (status < 0 || h->closing) return;
    if (httpd__conn_accept(h) == 0) return;
    /* Out of memory. libuv stops accepting until this connection is taken, so
     * take it with the spare handle and drop it; if the spare is busy, come
     * back when it is free. */
    if (h->reject_busy) {
        h->accept_stalled = true;
        return;
    }
    uv_tcp_init(h->loop, &h->reject);
    h->reject.data = h;
    h->reject_busy = true;
    h->handles++;
    uv_accept(server, (uv_stream_t *)&h->reject);
    uv_close((uv_handle_t *)&h->reject, hd_reject_closed);
}

int httpd_start_on_loop(uv_loop_t *loop, const httpd_config *cfg, httpd_request_fn fn, void *arg,
                        httpd **out)
{
    if (!out) return TD_EINVAL;
    *out = NULL;
    struct sockaddr_in sa;
    if (!loop || !cfg || !fn || !cfg->addr || hd_parse_addr(cfg->addr, &sa) != 0)
        return TD_EINVAL;
    if (cfg->head_timeout_ms < 0 || cfg->idle_timeout_ms < 0 || cfg->max_conns < 0)
        return TD_EINVAL;
    httpd *h = calloc(1, sizeof(*h));
    if (!h) return TD_ENOMEM;
    /* libuv writes without MSG_NOSIGNAL: a client that reset its connection
     * must cost an EPIPE on this thread, not the process. */
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, NULL);
    h->loop = loop;
    h->fn = fn;
    h->arg = arg;
    h->cfg = *cfg;
    h->cfg.addr = NULL;
    if (!h->cfg.max_body) h->cfg.max_body = 4u << 20;
    if (!h->cfg.max_head) h->cfg.max_head = 8u << 10;
    if (!h->cfg.head_timeout_ms) h->cfg.head_timeout_ms = 10000;
    if (!h->cfg.idle_timeout_ms) h->cfg.idle_timeout_ms = 60000;
    if (!h->cfg.max_conns) h->cfg.max_conns = 1024;
    if (!h->cfg.max_write_queue) h->cfg.max_write_queue = 1u << 20;
    httpd__settings(&h->settings);

    int fd = hd_listen_fd(cfg->addr, &sa, &h->port);
    if (fd < 0) {
        free(h);
        return fd;
    }
    uv_tcp_init(loop, &h->listener);
    h->listener.data = h;
    h->handles = 1;
    int rc = uv_tcp_open(&h->listener, fd);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&h->listener, HD_BACKLOG, hd_on_connection);
    if (rc != 0) {
        /* Rare (the socket already listens). The handle must close through the
         * loop; h is freed then, without a done callback. */
        td_log_error("httpd", "listen_failed", "addr=%s err=\"%s\"", cfg->addr, uv_strerror(rc));
        if (!uv_is_closing((uv_handle_t *)&h->listener)) {
            h->closing = true;
            uv_close((uv_handle_t *)&h->listener, hd_handle_closed);
        }
        return TD_EIO;
    }
    *out = h;
    return 0;
}

void httpd_close(httpd *h, void (*done)(void *arg), void *arg)
{
    if (!h || h->closing) return;
    h->closing = true;
    h->done = done;
    h->done_arg = arg;
    uv_close((uv_handle_t *)&h->listener, hd_handle_closed);
    while (h->conns)
        httpd__conn_close(h->conns);
}

int httpd_port(const httpd *h)
{
    return h->port;
}

/* ---- the simple mode ---- */

static void hd_simple_request(void *arg, httpd_req *r)
{
    httpd *h = arg;
    int m = httpd__req_method(r);
    if (m != HTTP_GET && m != HTTP_HEAD) {
        static const char msg[] = "method not allowed\n";
        httpd_respond(r, 405, NULL, NULL, msg, sizeof(msg) - 1);
        return;
    }
    size_t blen = 0;
    httpd_req_body(r, &blen);
    if (blen > 0) {
        static const char msg[] = "this endpoint takes no body\n";
        httpd__req_close_after(r);
        httpd_respond(r, 413, NULL, NULL, msg, sizeof(msg) - 1);
        return;
    }
    httpd_response resp = {.status = 404};
    h->thr->fn(h->thr->arg, httpd_req_method(r), httpd_req_path(r), &resp);
    size_t len = resp.body ? resp.len : 0;
    httpd_respond(r, resp.status, resp.content_type, NULL, resp.body, len);
    free(resp.body);
}

static void hd_simple_stop(uv_async_t *a)
{
    httpd *h = a->data;
    httpd_close(h, NULL, NULL);
    uv_close((uv_handle_t *)a, NULL);
}

static void *hd_simple_thread(void *arg)
{
    httpd__thread *t = arg;
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, NULL); /* see httpd_start_on_loop */
    uv_run(&t->loop, UV_RUN_DEFAULT);
    return NULL;
}

int httpd_start(const char *addr, httpd_handler_fn fn, void *arg, httpd **out)
{
    if (!out) return TD_EINVAL;
    *out = NULL;
    if (!addr || !fn) return TD_EINVAL;
    httpd__thread *t = calloc(1, sizeof(*t));
    if (!t) return TD_ENOMEM;
    if (uv_loop_init(&t->loop) != 0) {
        free(t);
        return TD_ENOMEM;
    }
    t->fn = fn;
    t->arg = arg;
    /* Bodies are refused: max_body 1 answers 413 from Content-Length, and the
     * handler wrapper refuses a 1-byte body. */
    httpd_config cfg = {.addr = addr, .max_body = 1, .idle_timeout_ms = 10000, .max_conns = 256};
    httpd *h = NULL;
    int rc = httpd_start_on_loop(&t->loop, &cfg, hd_simple_request, NULL, &h);
    if (rc != 0) {
        uv_run(&t->loop, UV_RUN_DEFAULT); /* a half-made listener closes */
        uv_loop_close(&t->loop);
        free(t);
        return rc;
    }
    h->arg = h;
    h->thr = t;
    uv_async_init(&t->loop, &t->stop, hd_simple_stop);
    t->stop.data = h;
    if (pthread_create(&t->thread, NULL, hd_simple_thread, t) != 0) {
        hd_simple_stop(&t->stop);
        uv_run(&t->loop, UV_RUN_DEFAULT);
        uv_loop_close(&t->loop);
        free(t);
        free(h);
        return TD_ENOMEM;
    }
    *out = h;
    return 0;
}

void httpd_stop(httpd *h)
{
    if (!h || !h->thr) return;
    httpd__thread *t = h->thr;
    uv_async_send(&t->stop);
    pthread_join(t->thread, NULL);
    uv_loop_close(&t->loop);
    free(t);
    free(h);
}
