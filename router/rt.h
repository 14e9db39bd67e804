/* The router (tandem-router), internal interfaces.
 *
 * Threads:
 *   loop thread    a libuv loop: the HTTP front end, timers, admission, the
 *                  worker table, every request from arrival to its last byte.
 *                  All state below belongs to it.
 *   gRPC thread    common/rpc's server thread: Router.RegisterWorker,
 *                  Router.Heartbeat and Router.Generate handlers only push an
 *                  rt_event onto the loop's queue (mpscq + uv_async).
 *   client threads common/rpc's client CQ threads: stream notifications only
 *                  mark a request (or worker) and push it onto the same queue.
 *
 * Ownership: an rt_req belongs to the loop from its arrival until it is
 * freed after its front end's response ended and its downstream stream was
 * freed (rpc_stream_free: no notification can follow). Workers are never
 * freed before shutdown (a worker that goes away stays in the table, DOWN),
 * so a request's worker pointers stay valid.
 */
#ifndef TANDEM_ROUTER_RT_H
#define TANDEM_ROUTER_RT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "common/metrics.h"
#include "common/mpscq.h"
#include "common/rpc.h"
#include "engine/tokenizer/tok.h"
#include "proto/tandem.pb-c.h"
#include "router/admission/adm.h"

#define RT_ID_MAX 64

typedef struct rt_ctx rt_ctx;
typedef struct rt_req rt_req;

/* Everything that sits on the loop's queue embeds one: a gRPC event, a
 * request whose stream has news, a worker whose health check answered.
 * `queued` coalesces wake-ups: an object is on the queue at most once. */
enum rt_wake_kind { RT_WAKE_EVENT = 1, RT_WAKE_REQ, RT_WAKE_WORKER };
typedef struct rt_wake {
    mpscq_node node;
    enum rt_wake_kind kind;
    _Atomic int queued;
} rt_wake;

enum rt_event_type { RT_EV_REGISTER = 1, RT_EV_HEARTBEAT, RT_EV_GENERATE };

/* A gRPC call handed from the gRPC thread to the loop. */
typedef struct rt_event {
    rt_wake wake;
    enum rt_event_type type;
    rpc_call *call;
    const ProtobufCMessage *msg; /* owned by the call */
} rt_event;

/* ------------------------------------------------------------ workers -- */

enum rt_role { RT_PREFILL = 1, RT_DECODE = 2 };

/* A worker's state in the router's table:
 *   CHECKING --health SERVING--> READY --3 missed heartbeats / failed call--> DOWN
 *   DOWN --heartbeat--> CHECKING;   any --heartbeat says draining--> DRAINING
 *   (re-registering with the same id starts again at CHECKING) */
enum rt_wstate { RT_W_CHECKING, RT_W_READY, RT_W_DRAINING, RT_W_DOWN };

typedef struct rt_worker {
    rt_wake wake; /* health-check completion */
    rt_ctx *ctx;
    char id[128];
    enum rt_role role;
    char rpc_addr[256];
    char kv_endpoint[512];
    char transport[16];
    uint32_t max_model_len;
    uint64_t epoch;
    int64_t last_beat_ns;
    enum rt_wstate state;
    rpc_client *client;
    rpc_stream *health;               /* a health check in flight */
    Tandem__V1__LoadReport load;      /* last heartbeat's (scalar fields only) */
    uint32_t inflight;                /* this router's requests on the worker (prefill: until
                                         their first token) */
    uint64_t inflight_tokens;         /* prefill: their prompt tokens */
    uint32_t inflight_at_load;        /* inflight and inflight_tokens when `load` came, so the */
    uint64_t inflight_tokens_at_load; /* load can be brought up to now (adm_fresh_load) */
    uint32_t block_size;              /* from its KV shape */
    uint64_t served;
} rt_worker;

/* Sets up the table's gRPC methods on srv (before rpc_server_start). */
int rt_members_add_methods(rt_ctx *c, rpc_server *srv);
/* Loop thread: a Register or Heartbeat event (frees it). */
void rt_members_on_event(rt_ctx *c, rt_event *ev);
/* Loop thread: a worker's health check answered. */
void rt_members_on_health(rt_ctx *c, rt_worker *w);
/* Loop thread, every tick: heartbeats missed -> DOWN. */
void rt_members_tick(rt_ctx *c);
/* Loop thread: a call to w failed in a way that says it is gone. */
void rt_members_mark_down(rt_ctx *c, rt_worker *w, const char *why);
void rt_members_free(rt_ctx *c);

/* Choice of workers for one request (loop thread). avoid (may be NULL) is a
 * worker not to pick again (a retry). NULL when none is ready. */
rt_worker *rt_pick_decode(rt_ctx *c, const rt_worker *avoid);
rt_worker *rt_pick_prefill(rt_ctx *c, const int32_t *prompt, uint32_t n_prompt,
                           const rt_worker *avoid);
uint32_t rt_ready_count(const rt_ctx *c, enum rt_role role);

/* ------------------------------------------------------------ requests -- */

/* How a request's output leaves the router: the HTTP (OpenAI) front end or
 * the gRPC Router.Generate front end implement it. Every call is on the loop
 * thread. */
typedef struct rt_front_ops {
    /* New token ids (after the first of them arrived, tokens are final). */
    void (*tokens)(rt_req *r, const uint32_t *ids, size_t n);
    /* The end: err 0 with finish (Tandem__V1__FinishReason), or an error with
     * its TD code and message. The front end ends its response here and then
     * calls rt_req_release. */
    void (*end)(rt_req *r, int finish, int err, const char *details);
} rt_front_ops;

enum rt_rstate {
    RT_R_NEW,     /* parsed, not dispatched */
    RT_R_HELD,    /* in the admission hold queue */
    RT_R_RUNNING, /* Decode.Generate in flight */
    RT_R_ENDED,   /* the front end was told; waiting for the stream to be freed */
};

struct rt_req {
    rt_wake wake;          /* stream notification */
    rt_req *hprev, *hnext; /* the hold queue, while RT_R_HELD */
    int64_t hold_until_ns;
    bool prefill_counted; /* its prompt is in ctx->inflight_prefill_tokens and _pairs */
    rt_req *prev, *next;  /* the loop's list of live requests */
    rt_ctx *ctx;
    char id[RT_ID_MAX];
    const rt_front_ops *front;
    void *front_data; /* the front end's own state */
    enum rt_rstate state;
    /* The request as dispatched. */
    uint32_t *prompt; /* router-owned copy */
    uint32_t n_prompt;
    Tandem__V1__SamplingParams sampling; /* scalars + stop ids copied; no stop strings */
    uint32_t *stop_ids;
    uint32_t max_tokens;
    bool want_timings;
    int64_t t_arrival, t_dispatch, t_first, deadline_ns;
    int64_t t_admit;   /* the policy admitted it (after any hold) */
    adm_pred adm_pred; /* what the admitting decision predicted; handed back to the policy */
    uint64_t tokenize_us;
    /* Downstream. */
    rt_worker *decode, *prefill;
    rpc_stream *stream;
    int attempts;
    uint32_t n_generated;
    bool admitted;
    bool cancel_requested;  /* the front end stopped wanting output */
    bool released;          /* the front end let go; freed once its wake-up is popped */
    bool paused;            /* the client reads slowly: stop taking messages (flow control
                               then holds the decode worker) until the front end resumes */
    int finish;             /* finish reason from the final message */
    uint32_t retry_after_s; /* TD_EDECLINED: what admission suggested */
    int64_t t_last;
    Tandem__V1__Timings timings; /* from the decode worker's final message */
    uint32_t cached_prompt_tokens;
};

/* Creates a request (loop thread) for the given front end; id minted here. */
rt_req *rt_req_new(rt_ctx *c, const rt_front_ops *front, void *front_data);
/* Admission, choice of workers, Decode.Generate. On a failure before the
 * call starts, front->end runs before this returns. prompt is copied. */
void rt_req_dispatch(rt_req *r);
/* The front end no longer wants output (client gone, stop string matched):
 * cancels downstream; front->end still runs once. */
void rt_req_cancel(rt_req *r);
/* The front end decided the end itself (a stop string matched): cancels
 * downstream and ends r now with finish; front->end runs before this
 * returns. */
void rt_req_finish_early(rt_req *r, int finish);
/* The front end is done with r (after its end callback). */
void rt_req_release(rt_req *r);
/* Loop thread: r's wake-up was popped from the queue. */
void rt_req_on_popped(rt_req *r);
void rt_req_on_wake(rt_req *r);

/* ----------------------------------------------------------------- ctx -- */

typedef struct rt_opts {
    const char *http_listen, *grpc_listen, *model, *tokenizer, *served_model_name;
    const char *chat_template, *policy, *prefill_policy, *admission, *api_key, *api_keys_file;
    const char *cluster_token, *cost_model;
    int64_t max_outstanding, request_timeout_ms, max_body_bytes, heartbeat_ms, hold_max;
    int64_t http_head_timeout_ms, http_idle_timeout_ms;
    double bucket_rate, bucket_burst, queue_max_ms, slo_ttft_ms, slo_tpot_ms, short_window_s,
        long_window_s, hold_max_ms, burst_cv, burst_rate_ratio, slo_margin, speed_step, speed_track;
} rt_opts;

typedef struct rt_metrics {
    met_registry *reg;
    met_family *requests; /* {endpoint, outcome} */
    met_family *workers;  /* {role, state} gauge */
    met_histogram *ttft, *itl, *e2e, *queue;
    met_gauge *inflight, *held;
    met_counter *retries;
    met_family *admission;                   /* {verdict}: admitted, held, rejected, hold_timeout */
    met_family *speed;                       /* {stage} gauge family (rt_metrics_speed) */
    met_gauge *speed_prefill, *speed_decode; /* its two series, 1 until a feedback moves them */
} rt_metrics;

struct rt_ctx {
    const rt_opts *opts;
    uv_loop_t *loop;
    uv_async_t wake;
    uv_timer_t tick;
    mpscq q; /* rt_event / rt_req / rt_worker wake-ups */
    rpc_server *grpc;
    tok_tokenizer *tok;
    char model_name[256];
    uint32_t max_model_len; /* 0: unknown until a worker registers */
    int32_t eos_id;
    /* Workers. */
    rt_worker **workers;
    uint32_t n_workers, cap_workers;
    uint32_t rr_decode, rr_prefill;
    struct rt_affinity_slot *affinity; /* prefix_affinity's prefix -> worker table */
    uint32_t heartbeat_ms;
    uint64_t next_epoch;
    /* Requests. */
    rt_req *live;
    uint32_t n_live, outstanding;
    uint64_t next_req;
    uint32_t id_salt;
    const adm_ops *adm;
    void *adm_ctx;
    rt_req *held_head, *held_tail; /* the admission hold queue, FIFO */
    uint32_t n_held;
    uint64_t inflight_prefill_tokens; /* prompts admitted, first token not yet seen */
    uint64_t inflight_prefill_pairs;  /* the same prompts' attention pairs (adm_prefill_pairs) */
    uv_timer_t hold_timer;            /* the earliest hold deadline */
    adm_remaining adm_remaining; /* scratch for adm_input.own_remaining; owned, freed at exit */
    rt_metrics metrics;
    bool stopping;
    _Atomic int grpc_freed;
};

/* gRPC thread: hands a call to the loop as an rt_event (answers it at once
 * when memory runs out). */
void rt_event_push(rt_ctx *c, rpc_call *call, const ProtobufCMessage *msg, enum rt_event_type type);

/* Looks at the held requests again (after a request ended, a heartbeat, a
 * hold deadline): admits, keeps holding or rejects each, in queue order. */
void rt_admission_pass(rt_ctx *c);

/* Pushes w onto the loop's queue unless it is there already (any thread). */
void rt_wake_push(rt_ctx *c, rt_wake *w);

/* gRPC front end: Router.Generate (rt_grpc.c). */
int rt_grpc_add_methods(rt_ctx *c, rpc_server *srv);
void rt_grpc_on_event(rt_ctx *c, rt_event *ev);
void rt_grpc_check_cancelled(rt_ctx *c);

int rt_metrics_init(rt_metrics *m);
void rt_metrics_free(rt_metrics *m);
void rt_metrics_outcome(rt_ctx *c, const char *endpoint, const char *outcome);
/* Copies the admission policy's SLO-feedback factors (adm_ops.speed) to the
 * speed gauges; nothing for a policy without feedback (they stay 1). */
void rt_metrics_speed(rt_ctx *c);

#endif
