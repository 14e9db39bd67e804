/* wrk: what the prefill and decode workers share, written once.
 *
 *   options      one option table (flags and --config keys) for both binaries
 *   engine       the eng_config both derive from the options and the model
 *   health       grpc.health.v1.Health/Check: NOT_SERVING until the model is
 *                loaded and again while draining
 *   signals      SIGTERM/SIGINT turn into a drain request the main thread waits on
 *   load         the engine thread's load snapshot (atomics), read by the
 *                heartbeat and the metrics endpoint
 *   metrics      Prometheus text over HTTP on --metrics-listen (common/httpd)
 *   membership   Router.RegisterWorker, then Router.Heartbeat every second with
 *                the LoadReport, on a thread of its own (only with --router)
 *
 * Ownership: every wrk_* object is created and freed by the binary's main
 * thread; the engine thread only writes wrk_load and reads the health state.
 */
#ifndef TANDEM_WORKER_WRK_H
#define TANDEM_WORKER_WRK_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/clock.h"
#include "common/config.h"
#include "common/metrics.h"
#include "common/rpc.h"
#include "engine/model.h"
#include "engine/runtime/eng.h"
#include "kvtransfer/kvx.h"

enum wrk_role {
    WRK_PREFILL = 1,
    WRK_DECODE = 2,
};

/* The options of both workers (common/config fills it). Strings are owned by
 * the cfg returned with them. */
typedef struct wrk_opts {
    const char *model, *tokenizer, *listen, *router, *kv_transport, *kv_listen, *metrics_listen;
    const char *worker_id, *cluster_token, *kv_dtype;
    const char *device; /* --device auto|cpu|cuda[:N] */
    int64_t kv_blocks, block_size, max_num_seqs, max_batched_tokens, max_chunk_tokens;
    int64_t max_model_len, threads;
    double kv_memory_fraction;
    int64_t drain_timeout_ns, prefill_timeout_ns;
    bool prefix_cache;
} wrk_opts;

/* Parses argv for the given role into o. Returns 0 with *c set (free with
 * cfg_free after the last use of o), CFG_HELP after printing the help, or a
 * negative TD_E* code after printing one line naming the problem. */
int wrk_opts_parse(enum wrk_role role, int argc, char **argv, wrk_opts *o, cfg **c);

/* The engine configuration of a worker: pool size from --kv-blocks (or
 * --kv-memory-fraction of the host's memory), batch limits, prefix cache.
 * TD_EINVAL with a message in err when they cannot hold one sequence. */
int wrk_engine_config(const wrk_opts *o, const mdl_model *m, enum wrk_role role, eng_config *ec,
                      char *err, size_t errlen);

/* The sampler parameters of a request, exactly as both workers (and
 * tandem-generate) build them: EOS from the model, its further EOS ids unless
 * ignore_eos, BOS for llama2.c checkpoints (llama2.c stops there), then the
 * request's stop ids. stop_ids (cap entries, cap >= 8 + MDL_MAX_EOS) receives
 * the ids and must outlive *out's use. sp may be NULL (greedy). A request
 * without a seed gets seed_if_unset. Returns 0 or TD_EINVAL (too many stop
 * ids, or a bad temperature / top_p), with the reason in err. */
struct Tandem__V1__SamplingParams;
int wrk_sampling(const mdl_config *mc, const struct Tandem__V1__SamplingParams *sp,
                 uint64_t seed_if_unset, int32_t *stop_ids, int cap, smp_params *out, char *err,
                 size_t errlen);

/* ---- the engine and its KV pool, the same for both roles ---- */

/* What a worker computes with: the model, the KV transfer endpoint whose
 * memory is the KV pool (shareable for shm), the engine on that pool. */
typedef struct wrk_engine {
    mdl_model *model;
    kvx_ep *kvx;
    eng *engine;
    eng_config cfg; /* as opened (defaults filled from the options) */
} wrk_engine;

/* Loads --model (16-bit weights kept as stored), derives the engine
 * configuration and its one kv_layout, creates the KV endpoint from that
 * layout (receiver for decode, sender for prefill) and opens the engine on
 * the endpoint's pool, with the per-layer hook (NULL: none). Prints one line
 * naming the problem and returns its code on failure; what was created is in
 * *w either way, for wrk_engine_close. */
int wrk_engine_open(const wrk_opts *o, enum wrk_role role, eng_layer_fn hook, void *hook_arg,
                    wrk_engine *w);
/* Closes the engine, then the endpoint (it owns the pool's memory), then the
 * model. Accepts a zeroed or partly opened one. */
void wrk_engine_close(wrk_engine *w);

/* ---- heap upkeep (engine thread) ---- */

/* A burst of requests leaves free pages inside glibc's heaps (the gRPC
 * threads' arenas above all): freed, yet resident, so the worker's RSS keeps
 * the burst's peak. Measured after a bursty load on a busy host: gdb's
 * malloc_trim(0) on the idle workers gave back 1.0 MiB (prefill) and
 * 1.4 MiB (decode); after a steady load, nothing (docs/deploy.md, "Soak").
 * So the engine thread trims when it has nothing to do: at most once per
 * WRK_HEAP_TRIM_NS, and only when requests ended since the last trim (an
 * idle worker does not trim again and again). malloc_trim takes each
 * arena's lock in turn; on a worker's few MiB of heap it is short, and
 * idle means no step is waiting on it. */
#define WRK_HEAP_TRIM_NS (10 * TD_NS_PER_S)

typedef struct wrk_heap {
    int64_t last_ns;      /* when it last trimmed (0: never) */
    uint64_t ended_at;    /* requests_ended then */
    uint64_t trims;       /* how many times it trimmed */
    int64_t last_trim_ns; /* how long the last trim took */
} wrk_heap;

/* Call on the engine thread when it is idle (nothing running, waiting or in
 * flight). requests_ended: a count of requests ended so far (grows only).
 * Trims (glibc's malloc_trim; nothing elsewhere) when WRK_HEAP_TRIM_NS have
 * passed since the last trim and requests_ended moved; returns 1 when it
 * did, else 0. h starts zeroed. */
int wrk_heap_idle(wrk_heap *h, uint64_t requests_ended, int64_t now_ns);

/* ---- health ---- */

enum wrk_health_status {
    WRK_NOT_SERVING = 0,
    WRK_SERVING = 1,
};

typedef struct wrk_health {
    _Atomic int status; /* enum wrk_health_status */
} wrk_health;

/* Registers grpc.health.v1.Health/Check on s (before rpc_server_start). h
 * must outlive the server. */
int wrk_health_add(rpc_server *s, wrk_health *h);

/* One of a role's gRPC methods: its full path, request type and handler. */
typedef struct wrk_method {
    const char *path;
    const ProtobufCMessageDescriptor *req;
    rpc_handler_fn fn;
} wrk_method;

/* A worker's gRPC server on listen: the role's methods (each called with
 * arg), the health check, started. Prints one line naming the address and
 * returns its code on failure (*out stays NULL). */
int wrk_rpc_start(const char *prog, const char *listen, const wrk_method *methods, size_t n,
                  void *arg, wrk_health *h, rpc_server **out);

/* ---- signals ---- */

/* Blocks SIGTERM, SIGINT and SIGPIPE in the calling thread; threads created
 * afterwards inherit the mask, so only wrk_signal_wait sees them. Call first
 * in main. */
void wrk_signals_block(void);

/* Waits up to timeout_ns (< 0: forever) for SIGTERM or SIGINT. Returns the
 * signal number, or 0 on timeout. */
int wrk_signal_wait(int64_t timeout_ns);

/* ---- load (engine thread writes, others read) ---- */

typedef struct wrk_load {
    _Atomic uint64_t queued_prefill_tokens;
    _Atomic uint32_t running_seqs;
    _Atomic uint32_t waiting_seqs;
    _Atomic uint32_t free_kv_blocks; /* FREE + CACHED: what a new request can take */
    _Atomic uint32_t total_kv_blocks;
    _Atomic uint64_t step_time_us; /* exponentially weighted mean */
    _Atomic uint64_t last_step_time_us;
    _Atomic uint32_t in_flight; /* requests the worker holds in any state */
    _Atomic uint64_t prefix_hit_blocks, prefix_query_blocks, preemptions; /* totals */
    _Atomic int draining; /* set by main when the worker drains */
} wrk_load;

/* Publishes the engine's state (engine thread, after each step or change). */
void wrk_load_publish(wrk_load *l, eng *e, uint32_t in_flight, int64_t step_ns);

/* ---- metrics ---- */

/* The metrics both workers export; families of the registry, updated by the
 * engine thread (atomics). */
typedef struct wrk_metrics {
    met_registry *reg;
    met_family *requests; /* tandem_requests_total{outcome} */
    met_histogram *queue_seconds, *prefill_seconds, *transfer_seconds, *step_seconds, *ttft_seconds,
        *itl_seconds;
    met_histogram *batch_size;
    met_counter *transfer_bytes, *prefix_hit_blocks, *prefix_query_blocks, *preemptions;
    met_counter *prompt_tokens_computed, *prompt_tokens_cached; /* prefill: per request */
    met_gauge *running, *waiting, *kv_free, *kv_total;
    uint64_t synced_hits, synced_queries, synced_preemptions; /* totals already counted */
} wrk_metrics;

int wrk_metrics_init(wrk_metrics *m);
void wrk_metrics_free(wrk_metrics *m);
/* Counts one request ending with outcome ("ok", "cancelled", "error", ...). */
void wrk_metrics_outcome(wrk_metrics *m, const char *outcome);
/* Copies the gauges and the engine's totals from the load snapshot (called
 * before rendering, on the metrics thread only). */
void wrk_metrics_sync(wrk_metrics *m, const wrk_load *l);

/* One engine step with its metrics (step time, batch size). Returns 0 with
 * the step's events, or TD_EAGAIN when nothing ran (an internal error of the
 * step is logged and reported as nothing ran). forward_ns may be NULL. */
int wrk_step(eng *e, wrk_metrics *m, const eng_event **evs, uint32_t *n, int64_t *forward_ns);

typedef struct wrk_http wrk_http;
/* Serves GET /metrics (Prometheus text) and GET /health (200 while serving,
 * 503 otherwise) on addr. All pointers must outlive the server. */
int wrk_http_start(const char *addr, wrk_metrics *m, const wrk_load *l, wrk_health *h,
                   wrk_http **out);
int wrk_http_port(const wrk_http *w);
void wrk_http_stop(wrk_http *w);

/* ---- membership ---- */

typedef struct wrk_member wrk_member;

typedef struct wrk_member_info {
    enum wrk_role role;
    const char *worker_id;   /* copied */
    const char *rpc_address; /* copied */
    const char *kv_endpoint; /* copied; "" for prefill */
    const char *kv_transport;
    const char *model;
    const kv_layout *layout;
    uint64_t fingerprint;
    uint32_t max_running_seqs, max_batch_tokens;
    uint32_t max_model_len;
    const char *cluster_token; /* NULL or "": none */
} wrk_member_info;

/* What a worker of this role serving model m through engine e (opened with
 * ec) tells the router; worker_id and rpc_address are filled by
 * wrk_node_start. kv_endpoint: "" for prefill. The strings are borrowed. */
wrk_member_info wrk_member_info_of(enum wrk_role role, const wrk_opts *o, const mdl_model *m,
                                   const eng *e, const eng_config *ec, const char *kv_endpoint);

/* Starts registering with the router at addr, then heartbeating every
 * second with the load; re-registers when the router forgets the worker;
 * keeps trying while the router is down. drain (may be NULL) is set when the
 * router asks the worker to drain. */
int wrk_member_start(const char *router_addr, const wrk_member_info *info, const wrk_load *load,
                     _Atomic int *drain, wrk_member **out);
void wrk_member_stop(wrk_member *m);

/* ---- a worker's public face, the same for both roles ---- */

/* What a worker exposes once its engine and gRPC server run: the metrics
 * endpoint, its advertised address and name, its membership. */
typedef struct wrk_node {
    wrk_http *http;     /* NULL without --metrics-listen */
    wrk_member *member; /* NULL without --router */
    char rpc_addr[256]; /* what peers dial */
    char worker_id[300];
} wrk_node;

/* Starts the metrics endpoint and, with --router, membership. mi carries the
 * role-specific fields (layout, KV endpoint, limits); its worker_id and
 * rpc_address are filled here. Prints one line naming the problem and
 * returns its code on failure (n is then safe to wrk_node_stop). */
int wrk_node_start(wrk_node *n, const wrk_opts *o, rpc_server *srv, wrk_metrics *m, wrk_load *l,
                   wrk_health *h, _Atomic int *drain, wrk_member_info *mi);
void wrk_node_stop(wrk_node *n); /* accepts a zeroed node */

/* Serves until SIGTERM/SIGINT or a drain request, then drains: health
 * NOT_SERVING, *draining set (handlers refuse new work), waits until no
 * request is in flight or --drain-timeout passed (a second signal cuts it
 * short). mod names the worker in the log. */
void wrk_serve_until_drained(const wrk_opts *o, const char *mod, _Atomic int *draining, wrk_load *l,
                             wrk_health *h);

/* "host:port" of a server bound on listen_addr's host with the given port
 * (what peers should dial). */
void wrk_advertised_addr(const char *listen_addr, int port, char *out, size_t cap);

/* The status a request reports when its KV transfer failed with kvx_err
 * (KVX_EV_FAILED). Past the request's own deadline it is TD_ETIMEDOUT (a
 * 504, not retried) whatever kvx says: both workers act on that deadline and
 * the other side's cancel may arrive first. Before it, a cancel stays
 * TD_ECANCELED and anything else (kvx reports a silent peer as a timeout
 * too) is TD_EUNAVAILABLE, which the router retries elsewhere. */
int wrk_kv_failure_status(int kvx_err, int64_t deadline_ns);

#endif
