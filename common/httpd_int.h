/* httpd internals shared by httpd.c (the server: listening, accepting,
 * closing, the simple mode), httpd_conn.c (one connection: parsing, ordered
 * output, timers, backpressure) and httpd_req.c (one request: accessors and
 * the response API). Not for other modules. */
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
    httpd__thread *thr;   /* simple mode */
    char rbuf[64 * 1024]; /* read buffer shared by the connections (one loop thread) */
};

/* ---- requests and connections (states: see httpd_conn.c) ---- */

enum { HD_R_PARSING, HD_R_APP, HD_R_DONE };
enum { HD_T_NONE, HD_T_IDLE, HD_T_HEAD, HD_T_LINGER, HD_T_DOOM };
enum { HD_P_URL, HD_P_FIELD, HD_P_VALUE }; /* the part of the head being stored */

/* One write: the uv request and the bytes it sends, one allocation. */
typedef struct httpd__out {
    uv_write_t req;
    httpd__conn *c;
    struct httpd__out *next; /* held on a request that is not first yet */
    size_t len;              /* bytes of data */
    char data[];
} httpd__out;

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
    httpd__out *held, **held_tail; /* output waiting for earlier responses */
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

/* httpd_req.c */
httpd_req *httpd__req_new(httpd__conn *c); /* NULL: out of memory */
void httpd__req_free(httpd_req *r);        /* with its held output */
httpd__out *httpd__out_new(size_t len);    /* len bytes of data; NULL: out of memory */
/* A response with Content-Length; ends r (TD_ENOMEM: the connection closes). */
int httpd__req_respond(httpd_req *r, int status, const char *ctype, const char *extra,
                       const char *body, size_t len);

/* httpd_conn.c */
void httpd__settings(http_parser_settings *s);
/* Queues o (taken over) as r's output: to the socket if r is first, else held. */
void httpd__req_emit(httpd_req *r, httpd__out *o);
/* r's response ended: frees the ended requests at the front, releases held output. */
void httpd__req_done(httpd_req *r);
/* Closes c on the next loop turn (a write could not be queued). */
void httpd__conn_doom(httpd__conn *c);
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
