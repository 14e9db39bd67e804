/* httpd internals shared by httpd.c (the server: listening, accepting,
 * closing, the simple mode) and httpd_conn.c (one connection: parsing,
 * ordered output, timers, backpressure). Not for other modules. */
#ifndef TANDEM_COMMON_HTTPD_INT_H
#define TANDEM_COMMON_HTTPD_INT_H

#include <http_parser.h>
#include <pthread.h>
#include <stdbool.h>
#include <uv.h>

#include "common/httpd.h"

typedef struct httpd__conn httpd__conn;

/* The simple mode's thread and loop (NULL in loop mode). */
typedef struct httpd__thread {
    uv_loop_t loop;
    uv_async_t stop;
    pthread_t thread;
    httpd_handler_fn fn;
    void *arg;
} httpd__thread;

struct httpd {
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_tcp_t reject;     /* drops a connection we could not allocate for */
    bool reject_busy;    /* reject is open or closing */
    bool accept_stalled; /* a connection waits in libuv for uv_accept */
    httpd_config cfg;    /* defaults filled in; cfg.addr is not kept */
    httpd_request_fn fn;
    void *arg;
    http_parser_settings settings;
    int port;
    int n_conns;
    httpd__conn *conns; /* open connections (not yet closing) */
    int handles;        /* listener, reject while busy, connections not yet freed */
    bool closing;
    void (*done)(void *arg);
    void *done_arg;
    httpd__thread *thr;  /* simple mode */
    char rbuf[64 * 1024]; /* read buffer shared by the connections (one loop thread) */
};

/* httpd_conn.c */
void httpd__settings(http_parser_settings *s);
/* Accepts one pending connection. Returns 0 or TD_ENOMEM (nothing accepted). */
int httpd__conn_accept(httpd *h);
/* Closes now: requests the app owns get on_close. */
void httpd__conn_close(httpd__conn *c);
/* The response to r will close the connection (the simple mode's 413). */
void httpd__req_close_after(httpd_req *r);
int httpd__req_method(const httpd_req *r); /* enum http_method */

/* httpd.c: one of h->handles is gone; finishes httpd_close when none is left. */
void httpd__handle_gone(httpd *h);

#endif
