/* httpd: an HTTP/1.1 server on libuv + http-parser. Two ways to use it:
 *
 *  - on a loop the caller runs (httpd_start_on_loop): the router's
 *    OpenAI-compatible front end. Requests are handed over whole (head and
 *    body); the app answers each with one response or a stream of chunks, now
 *    or later, from the loop thread.
 *  - the simple mode (httpd_start): its own thread and a synchronous handler,
 *    for the GET /metrics and GET /health endpoints every binary exposes next
 *    to its gRPC port. It runs on the same core.
 *
 * Behaviour: keep-alive; pipelined requests answered in order (the bytes of a
 * later response are held until the earlier response ended; the app may end
 * them in any order); HTTP/1.0 and "Connection: close" honoured;
 * "Expect: 100-continue" answered; request bodies with Content-Length or
 * chunked. Errors found by httpd itself (400 malformed, 408 too slow, 413 body
 * too large, 431 head too large) are answered with an OpenAI-style JSON error
 * body and "Connection: close". A client that closes its side of the
 * connection (EOF) or resets it counts as gone: the requests it has in flight
 * get their on_close.
 *
 * Threads: everything below, callbacks included, runs on the loop thread,
 * except httpd_start and httpd_stop (any thread, not the server's own).
 */
#ifndef TANDEM_COMMON_HTTPD_H
#define TANDEM_COMMON_HTTPD_H

#include <stddef.h>
#include <uv.h>

typedef struct httpd httpd;
typedef struct httpd_req httpd_req; /* one request */

typedef struct httpd_config {
    const char *addr;       /* "127.0.0.1:8000"; port 0 picks one; copied */
    size_t max_body;        /* bytes; 0: 4 MiB. Larger -> 413 (answered as soon as
                               Content-Length says so, or when a chunked body passes
                               it), connection closed */
    size_t max_head;        /* bytes of request line + headers; 0: 8 KiB. Larger -> 431 */
    int head_timeout_ms;    /* 0: 10000. A request head (or body) not complete this
                               long after its first byte -> 408 and close */
    int idle_timeout_ms;    /* 0: 60000. A keep-alive connection with nothing in
                               flight is closed after this long */
    int max_conns;          /* 0: 1024. Further connections are accepted and closed */
    size_t max_write_queue; /* bytes; 0: 1 MiB. Bytes queued on a connection (not yet
                               taken by the kernel) beyond which httpd_stream_write
                               returns TD_EAGAIN */
} httpd_config;

/* The whole request (head and body) arrived. r belongs to httpd; the app must
 * end it with httpd_respond or httpd_stream_end exactly once, during the call
 * or later. */
typedef void (*httpd_request_fn)(void *arg, httpd_req *r);

/* Listens on cfg->addr and serves on loop, which the caller runs; call it on
 * the loop's thread. It blocks SIGPIPE in that thread (libuv writes without
 * MSG_NOSIGNAL; a client that reset its connection then costs an EPIPE, not
 * the process). arg is not owned. Returns 0 and *out, TD_EINVAL (arguments, address), TD_EIO (bind or
 * listen failed: errno logged), TD_ENOMEM. On an error nothing was started
 * and no callback runs. */
int httpd_start_on_loop(uv_loop_t *loop, const httpd_config *cfg, httpd_request_fn fn, void *arg,
                        httpd **out);

/* On the loop thread: stops listening and closes every connection. Requests
 * the app has not ended get their on_close (during this call) and must still
 * be ended by the app, which is then a no-op. done(arg) runs once, from the
 * loop, when every handle is closed; h is freed after done returns. done may
 * be NULL. A second call is ignored. */
void httpd_close(httpd *h, void (*done)(void *arg), void *arg);

/* The bound port. */
int httpd_port(const httpd *h);

/* Request accessors. The strings belong to r and stay valid until the
 * response ends (httpd_respond or httpd_stream_end). */
const char *httpd_req_method(const httpd_req *r); /* "GET", "POST" ... */
const char *httpd_req_path(const httpd_req *r);   /* without the query */
const char *httpd_req_query(const httpd_req *r);  /* after '?'; "" if none */
/* Case-insensitive; NULL if absent; repeated headers: the first. */
const char *httpd_req_header(const httpd_req *r, const char *name);
/* The body (chunked bodies decoded), NUL-terminated for convenience (the NUL
 * is not counted in *len). "" and 0 when there is none. len may be NULL. */
const char *httpd_req_body(const httpd_req *r, size_t *len);

/* Responses: exactly one of these sequences per request, from the loop thread:
 *     httpd_respond(...)
 *     httpd_stream_start(...), httpd_stream_write(...)*, httpd_stream_end(...)
 * content_type NULL means "text/plain; charset=utf-8". extra_headers is NULL
 * or complete header lines, each ending in "\r\n" ("Retry-After: 3\r\n").
 * All strings and bodies are copied. To a HEAD request only the head is sent.
 *
 * After the client went away (on_close ran, or would have run had it been
 * set) these calls drop what they are given and return TD_ECLOSED; the ending
 * calls still end r. A call out of sequence returns TD_EINVAL and does
 * nothing. TD_ENOMEM: the connection is closed (on_close follows for the
 * other requests on it); an ending call has still ended r. */

/* A complete response with Content-Length. Ends r: r is invalid after. */
int httpd_respond(httpd_req *r, int status, const char *content_type, const char *extra_headers,
                  const char *body, size_t len);

/* Starts a streamed response: chunked for HTTP/1.1, close-delimited for
 * HTTP/1.0 (the connection closes when it ends). */
int httpd_stream_start(httpd_req *r, int status, const char *content_type,
                       const char *extra_headers);

/* Queues one chunk (len 0: nothing). Returns 0; TD_EAGAIN: queued, but the
 * connection's queue is over max_write_queue: stop producing until on_drain;
 * TD_ECLOSED: the client is gone, data dropped. */
int httpd_stream_write(httpd_req *r, const char *data, size_t len);

/* Ends a streamed response. r is invalid after. */
int httpd_stream_end(httpd_req *r);

/* fn(arg, r) runs once if the client disconnects (or httpd_close runs) before
 * r's response ended; r stays valid until the app ends it. Set it again to
 * replace; NULL clears. */
void httpd_req_on_close(httpd_req *r, void (*fn)(void *arg, httpd_req *r), void *arg);

/* fn(arg, r) runs when the connection's write queue fell below half of
 * max_write_queue after httpd_stream_write returned TD_EAGAIN for r (once per
 * TD_EAGAIN). */
void httpd_req_on_drain(httpd_req *r, void (*fn)(void *arg, httpd_req *r), void *arg);

/* ---- the simple mode (workers' /metrics and /health) ---- */

typedef struct httpd_response {
    int status;               /* 200, 404, ... */
    const char *content_type; /* static string; NULL: text/plain */
    char *body;               /* malloc'd by the handler; freed by httpd */
    size_t len;
} httpd_response;

/* Fills resp for one GET or HEAD request. method: "GET" or "HEAD"; path: the
 * URL path without the query, NUL-terminated; both valid during the call.
 * Other methods get 405 and requests with a body 413 without a call. */
typedef void (*httpd_handler_fn)(void *arg, const char *method, const char *path,
                                 httpd_response *resp);

/* Listens on addr ("127.0.0.1:9100"; port 0 picks one) and serves on a new
 * thread; the handler runs on that thread, so it must be quick and
 * thread-safe with respect to what it reads (metrics are atomics). Idle
 * connections close after 10 s, at most 256 connections. arg is not owned.
 * Returns 0 and *out, TD_EINVAL (address), TD_EIO (bind/listen failed: errno
 * logged), TD_ENOMEM. */
int httpd_start(const char *addr, httpd_handler_fn fn, void *arg, httpd **out);

/* Stops serving, closes connections, joins the thread, frees. Only for a
 * server from httpd_start. NULL is fine. */
void httpd_stop(httpd *h);

#endif
