/* lt_replay: open-loop replay of a trace against an OpenAI-compatible HTTP
 * server (POST /v1/completions, stream: true, SSE).
 *
 * One libuv loop on the calling thread. Requests are sent at their scheduled
 * times whatever happened to earlier ones: a timerfd armed at the next
 * scheduled time in CLOCK_MONOTONIC ns (libuv's own timers have 1 ms
 * resolution) wakes the loop, and every request that is due goes out on an
 * idle keep-alive connection, or a new one (up to max_conns; beyond that the
 * request waits for a free connection and its lateness shows it).
 *
 * Per request: actual send time, TTFT, every content chunk's arrival, e2e,
 * outcome (ok, 429 rejected, error with the reason). A request that exceeds
 * timeout (server stalls) or whose connection closes before the stream ends
 * is an error; its connection is closed and never reused.
 *
 * Client retries (retry_429 > 0, HTTP only): a 429 is sent again, up to
 * retry_429 times, after the wait the OpenAI Python client takes: the
 * response's retry-after-ms, else Retry-After in seconds, when within
 * (0, 60] s; else 0.5 s x 2^(retries so far), at most 8 s (no jitter, so
 * runs repeat). The record keeps its first send time (TTFT and e2e include
 * the waits) and counts its attempts; lt_summary reports the run with and
 * without the retries.
 *
 * Connection states (one table, one place that changes them):
 *   CONNECTING --connected--> BUSY (its request is written at once)
 *   IDLE --request--> BUSY --response complete, keep-alive--> IDLE
 *   any --error / EOF / timeout / not keep-alive--> CLOSING --closed--> freed
 */
#ifndef TANDEM_LOADTEST_LT_REPLAY_H
#define TANDEM_LOADTEST_LT_REPLAY_H

#include "loadtest/lt_prompt.h"
#include "loadtest/lt_report.h"
#include "loadtest/lt_trace.h"

#include <stddef.h>
#include <stdint.h>

typedef struct lt_url {
    char host[256]; /* name or address, without brackets */
    int port;       /* 1..65535; 80 when the URL has none */
    char path[512]; /* "/v1/completions" when the URL has no path */
    int grpc;       /* 1 for grpc://HOST:PORT (Router.Generate streams), 0 for http:// */
} lt_url;

/* Parses "http://HOST[:PORT][/PATH]" or "grpc://HOST:PORT" (IPv6 hosts in
 * brackets). Any host is accepted; TD_EINVAL for another scheme, an empty
 * host, a bad port, or a gRPC URL without a port or with a path. */
int lt_url_parse(const char *url, lt_url *out);
/* 1 when host is 127.0.0.0/8, ::1 or "localhost". */
int lt_url_is_loopback(const lt_url *u);

typedef struct lt_replay_opts {
    lt_url url;
    const char *model;       /* "model" field; NULL: omitted */
    const lt_prompt *prompt; /* borrowed; must outlive the run */
    const uint64_t *hashes;  /* lt_trace.hashes when requests carry Mooncake hash ids
                                (borrowed), else NULL */
    int32_t block_tokens;    /* tokens per hash id (default 512 when <= 0) */
    int64_t timeout_ns;      /* per request, from send to the end of the stream */
    int max_conns;           /* most open connections (default 1024 when <= 0) */
    int warm_conns;          /* connections opened before t = 0 (default 4 when < 0) */
    int progress;            /* redraw a progress line on stderr once a second */
    int64_t max_chunk_times; /* cap on stored chunk timestamps (default 64M when <= 0) */
    int64_t spin_ns;         /* wake this early and busy-wait to the send time (0: off) */
    int rt_priority;         /* > 0: the loop thread runs SCHED_FIFO at this priority during the run
                                (when permitted, else a warning); restored afterwards */
    int retry_429;           /* times a 429 is retried per request (0: never); HTTP only */
} lt_replay_opts;

/* The outcome of a run: n records in trace order; chunk times live in one
 * arena allocated up front. Owned by the caller (lt_run_free). */
typedef struct lt_run {
    lt_record *recs;
    size_t n;
    int64_t *arena;
    int64_t start_wall_ns; /* CLOCK_REALTIME at t = 0 */
    int conns_opened;      /* connections opened during the run */
} lt_run;

/* Replays reqs[n] (sorted by t_ns, as lt_trace gives them). Returns when every
 * request has finished (ok, rejected, error or timeout). Per-request failures
 * are recorded, not returned; the call itself fails (TD_EINVAL, TD_ENOMEM,
 * TD_ENOENT when the host does not resolve, TD_ERANGE when the chunk-time
 * arena would exceed max_chunk_times) only when it cannot run at all, and then
 * out is left empty. */
int lt_replay_run(const lt_replay_opts *o, const lt_req *reqs, size_t n, lt_run *out, char *err,
                  size_t errlen);
void lt_run_free(lt_run *run); /* accepts NULL */

#endif
