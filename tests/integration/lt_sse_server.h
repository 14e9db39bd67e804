/* lt_sse_server: a minimal OpenAI-style streaming server for load-tester tests.
 *
 * Listens on 127.0.0.1 (port chosen by the kernel) and runs its own libuv loop
 * on its own thread. Every POST gets a canned text/event-stream response
 * (chunked), so serving a request costs one write. Modes inject the failures
 * the load tester must record as errors.
 */
#ifndef TANDEM_TESTS_LT_SSE_SERVER_H
#define TANDEM_TESTS_LT_SSE_SERVER_H

#include <stddef.h>
#include <stdint.h>

enum lt_sse_mode {
    LT_SSE_OK = 0,  /* tokens events, a usage event, [DONE], end of chunked body */
    LT_SSE_STALL,   /* headers and one token, then silence (connection kept open) */
    LT_SSE_CLOSE,   /* headers and one token, then the connection is closed */
    LT_SSE_REJECT,  /* 429 with an OpenAI error body and Retry-After */
    LT_SSE_NO_DONE, /* a complete chunked body without data: [DONE] */
    LT_SSE_TRICKLE, /* the OK response cut in 37-byte slices, one every millisecond:
                       SSE lines and chunk framing straddle reads, tokens arrive apart */
};

typedef struct lt_sse_server lt_sse_server;

/* Arrival times kept per server (lt_sse_server_arrivals); later ones are counted only. */
#define LT_SSE_MAX_ARRIVALS 16384

/* tokens: events per response; 0 means "max_tokens of the request" (capped at
 * 4096). On success *out is owned by the caller (lt_sse_server_stop). */
int lt_sse_server_start(enum lt_sse_mode mode, int tokens, lt_sse_server **out);
/* As lt_sse_server_start, with a slow accept: for hold_ns after the start the
 * socket listens with a backlog of one connection and nothing is accepted.
 * Once one connection waits in that backlog the kernel drops the SYN of the
 * next, whose connect then completes only on its SYN retransmission (about
 * 1 s later on Linux), after the hold: a connect slower than any response. */
int lt_sse_server_start_held(enum lt_sse_mode mode, int tokens, int64_t hold_ns,
                             lt_sse_server **out);
int lt_sse_server_port(const lt_sse_server *s);
/* Requests fully received so far (thread-safe). */
size_t lt_sse_server_requests(lt_sse_server *s);
/* Copies into t_ns (up to cap entries) the CLOCK_MONOTONIC time, in ns (the
 * clock of td_now_ns), at which each request had fully arrived, in arrival
 * order: a clock independent of the client's. Returns how many are kept
 * (at most LT_SSE_MAX_ARRIVALS). Thread-safe. */
size_t lt_sse_server_arrivals(lt_sse_server *s, int64_t *t_ns, size_t cap);
/* From now on, the first n requests the server has received (counted from
 * its start) are answered with LT_SSE_REJECT's 429 and Retry-After whatever
 * the mode; later ones as the mode says. For client-retry tests. Thread-safe. */
void lt_sse_server_reject_first(lt_sse_server *s, size_t n);
/* Copies the last request body received (NUL-terminated, truncated to cap). */
void lt_sse_server_last_body(lt_sse_server *s, char *buf, size_t cap);
/* Stops the loop, closes every connection, joins the thread, frees s. */
void lt_sse_server_stop(lt_sse_server *s);

#endif
