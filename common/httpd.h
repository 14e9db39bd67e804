/* httpd: a small HTTP/1.1 server on its own libuv thread, for the endpoints
 * every binary exposes next to its gRPC port (GET /metrics in Prometheus text,
 * GET /health). Requests are parsed with http-parser.
 *
 * What it does: keep-alive, pipelined requests answered in order, a bound on
 * the request head (8 KiB: 431), bodies refused (413; these endpoints take
 * none), an idle timeout (a connection that sends nothing for 10 s is closed),
 * at most 256 connections (more are closed at once).
 *
 * Threads: httpd_start starts the loop thread; the handler runs on it, so it
 * must be quick and thread-safe with respect to what it reads (metrics are
 * atomics). httpd_stop closes every connection and joins the thread.
 */
#ifndef TANDEM_COMMON_HTTPD_H
#define TANDEM_COMMON_HTTPD_H

#include <stddef.h>

typedef struct httpd httpd;

typedef struct httpd_response {
    int status;               /* 200, 404, ... */
    const char *content_type; /* static string; NULL: text/plain */
    char *body;               /* malloc'd by the handler; freed by httpd */
    size_t len;
} httpd_response;

/* Fills resp for one request. method: "GET", "HEAD", ...; path: the URL path
 * without the query, NUL-terminated; both valid during the call. */
typedef void (*httpd_handler_fn)(void *arg, const char *method, const char *path,
                                 httpd_response *resp);

/* Listens on addr ("127.0.0.1:9100"; port 0 picks one) and serves on a new
 * thread. arg is not owned. Returns 0 and *out, TD_EINVAL (address), TD_EIO
 * (bind/listen failed: errno logged), TD_ENOMEM. */
int httpd_start(const char *addr, httpd_handler_fn fn, void *arg, httpd **out);

/* The bound port. */
int httpd_port(const httpd *h);

/* Stops serving, closes connections, joins the thread, frees. NULL is fine. */
void httpd_stop(httpd *h);

#endif
