/* eng: the engine runtime — the one step loop every path runs.
 *
 * An eng owns, for one model: the compute backend, the KV block pool (kvc),
 * the continuous-batching scheduler (sch) and the sampler of every live
 * request. All of them are sized from one kv_layout (eng_layout_for), so the
 * block size and block count can never disagree between the backend's memory,
 * the pool's bookkeeping and a KV transfer. tandem-generate, the prefill
 * worker and the decode worker all drive it the same way:
 *
 *     eng_add / eng_add_prefilled      requests in
 *     eng_step                         schedule -> forward -> sample -> update
 *     the step's events                tokens and finished requests out
 *
 * so the single process and the disaggregated cluster produce the same tokens
 * for the same request, greedy or seeded (the sampler's random stream is keyed
 * by (seed, token index), see engine/sampler.h).
 *
 * Ownership. Requests are named by the caller's 64-bit id (unique among live
 * requests). A request belongs to the eng from a successful eng_add or
 * eng_add_prefilled until the step event that finishes it, or eng_abort /
 * eng_detach. KV blocks: a finished prefill-only request hands its kvc
 * sequence to the caller in the event (kv_seq): the caller frees it with
 * kvc_seq_free(eng_kvc(e), ...) once nothing reads the blocks any more (the
 * transfer's final event). Everything else the eng frees itself.
 *
 * Threading: one thread drives an eng (the worker's engine thread); nothing
 * here locks. The per-layer hook runs on that thread, inside eng_step.
 * Allocation: per request (prompt copy, sampler), never per token or step.
 */
#ifndef TANDEM_ENGINE_RUNTIME_ENG_H
#define TANDEM_ENGINE_RUNTIME_ENG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/kv_layout.h"
#include "engine/backend/backend.h"
#include "engine/kvcache/kvc.h"
#include "engine/model.h"
#include "engine/sampler.h"

typedef struct eng eng;

/* One sequence's share of the step being computed, as the per-layer hook
 * sees it: positions [start, start + n) of request id are computed now. */
typedef struct eng_item {
    uint64_t id;
    uint32_t start;
    uint32_t n;
    uint32_t n_prompt;    /* prompt tokens of the request */
    const int32_t *table; /* block table: n_blocks block ids (the pool's memory) */
    uint32_t n_blocks;
} eng_item;

/* Runs on the engine thread once per layer per step, as soon as the backend
 * wrote that layer's K/V for every token of the step (before its attention):
 * a prefill worker posts the layer's finished blocks to the KV transfer here.
 * A non-zero return fails the whole step (every item ends with that error). */
typedef int (*eng_layer_fn)(void *arg, const eng_item *items, uint32_t n_items, int layer);

/* Inside an eng_layer_fn call: the backend's fence for that layer (see
 * be_layer_done_fn): NULL when the layer's K/V are final at the call (CPU, or
 * a device backend without async_fence), else a cudaEvent_t to order after.
 * NULL outside the hook. */
void *eng_layer_fence(const eng *e);

/* Runs before a sampled row is sampled, with the raw logits [vocab] (read
 * only; valid during the call): tandem-generate's --logits-out. */
typedef void (*eng_logits_fn)(void *arg, uint64_t id, const float *logits, int vocab);

typedef struct eng_config {
    const char *backend;             /* "cpu" or "cuda" (NULL: "cpu"); be_device_resolve
                                        turns a --device spec into it and `device` */
    int device;                      /* device ordinal of a device backend */
    int n_threads;                   /* compute threads, >= 1 (0: 1) */
    enum be_matmul matmul;           /* BE_MATMUL_DETERMINISTIC keeps batch invariance */
    enum kv_dtype kv_dtype;          /* KV element type */
    uint32_t block_size;             /* tokens per KV block (0: 16) */
    uint32_t num_blocks;             /* KV blocks per layer (0: enough for max_num_seqs
                                        sequences of max_model_len, at most 64 Ki) */
    uint32_t max_num_seqs;           /* sequences in one step (0: 64) */
    uint32_t max_num_batched_tokens; /* tokens in one step (0: 512) */
    uint32_t max_chunk_tokens;       /* prefill chunk cap per sequence (0: none) */
    uint32_t max_seqs;               /* requests known at once, waiting + running
                                        (0: 4 * max_num_seqs) */
    uint32_t max_model_len;          /* prompt + generated tokens (0: the model's context) */
    bool prefix_cache;               /* share full prompt blocks between requests */
    bool prefill_only;               /* prefill worker: a request ends after its first
                                        token and hands its KV to the caller */
    bool check_kv;                   /* walk the pool after every step (tests) */
    bool no_prefault;                /* leave the KV pool's pages untouched until used (by default
                                        eng_open writes the whole pool once: no page faults on the
                                        step path, a steady resident size) */
    void *kv_mem;                    /* KV region of kv_layout_pool_bytes(eng_layout_for())
                                        bytes owned by the caller (a transfer's shared pool),
                                        living until eng_close; NULL: the backend allocates */
    enum be_mem kv_mem_kind;         /* what kv_mem is (a GPU transport's pool: device) */
    bool async_fence;                /* device backend: the layer hook gets the compute
                                        stream's event (eng_layer_fence) instead of a host wait */
    eng_layer_fn on_layer;           /* optional */
    void *on_layer_arg;
    eng_logits_fn on_logits; /* optional */
    void *on_logits_arg;
} eng_config;

/* Defaults: cpu, 1 thread, deterministic matmul, f32 KV, block 16, the rest
 * 0 (derived at eng_open). */
void eng_config_defaults(eng_config *c);

/* The one KV layout of an eng built from (m, c): n_layers, n_kv_heads and
 * head_dim from the model, block_size, num_blocks and dtype from c after
 * defaults. A worker creates its KV transfer endpoint from exactly this.
 * TD_EINVAL when c cannot hold one sequence of max_model_len. */
int eng_layout_for(const mdl_model *m, const eng_config *c, kv_layout *out);

/* Creates the runtime for model m (borrowed; it must outlive the eng).
 * c is copied. Errors as be_open, kvc_pool_create and sch_create, with a
 * reason in err. On success *out is the caller's (eng_close). */
int eng_open(const mdl_model *m, const eng_config *c, eng **out, char *err, size_t errlen);
void eng_close(eng *e); /* accepts NULL */

typedef struct eng_request {
    uint64_t id;           /* caller's id, unique among live requests */
    const int32_t *prompt; /* n_prompt token ids < vocab; copied */
    uint32_t n_prompt;     /* >= 1, < max_model_len */
    uint32_t max_tokens;   /* tokens to generate at most, >= 1 (clamped to the context) */
    smp_params sampling;   /* max_tokens is taken from above; stop ids copied */
    int32_t priority;      /* lower runs first */
} eng_request;

/* Queues a request that computes its prompt here. TD_EINVAL (ids out of
 * range, empty), TD_ETOOLONG (prompt >= max_model_len), TD_EEXIST (id live),
 * TD_ENOSPC (max_seqs requests known), TD_ENOMEM. */
int eng_add(eng *e, const eng_request *r);

/* Decode workers: adds a request whose prompt KV is in kv_seq (a sequence of
 * eng_kvc(e) with all n_prompt tokens committed) and whose first token was
 * drawn elsewhere. The first token is accepted as if drawn here (so the next
 * draw and the stop conditions continue exactly). When that token already
 * ends the request (EOS, max_tokens 1), nothing is added, *done receives the
 * finish (ENG_FINISH_*) and the caller still owns kv_seq; otherwise *done is
 * ENG_FINISH_NONE and the eng owns kv_seq. Errors as eng_add; on error the
 * caller still owns kv_seq. */
int eng_add_prefilled(eng *e, const eng_request *r, int64_t kv_seq, int32_t first_token, int *done);

/* Drops a request wherever it is and frees its blocks. No event is reported
 * for it. Not from inside eng_step (the layer hook). TD_ENOENT if unknown. */
int eng_abort(eng *e, uint64_t id);

/* Like eng_abort, but hands the request's kvc sequence (or -1) to the caller,
 * who frees it once nothing reads its blocks (prefill: the transfer ended).
 * Not from inside eng_step. TD_ENOENT if unknown. */
int eng_detach(eng *e, uint64_t id, int64_t *kv_seq);

enum eng_finish {
    ENG_FINISH_NONE = 0,      /* still running */
    ENG_FINISH_STOP = 1,      /* EOS or a stop token id */
    ENG_FINISH_LENGTH = 2,    /* max_tokens or the context */
    ENG_FINISH_PREFILLED = 3, /* prefill_only: prompt done, first token drawn */
    ENG_FINISH_ERROR = 4,     /* err says why (forward failed, NaN logits) */
};

/* What a step did for one request. */
typedef struct eng_event {
    uint64_t id;
    int32_t token;          /* the token drawn this step (-1 with ENG_FINISH_ERROR) */
    int finish;             /* enum eng_finish */
    int err;                /* ENG_FINISH_ERROR: TD_E* code */
    uint32_t n_preemptions; /* finished: times it was preempted and recomputed */
    int64_t kv_seq;         /* ENG_FINISH_PREFILLED: the caller now owns this kvc
                               sequence (see Ownership); else -1 */
} eng_event;

typedef struct eng_step_stats {
    uint32_t n_items;
    uint32_t n_tokens;
    uint32_t n_prefill_tokens;
    uint32_t n_decode_tokens;
    uint32_t n_preempted;
    uint64_t n_ctx_tokens; /* positions the step's attention reads, summed over its items
                              (each item's start + n): what a decode step's cost grows with */
    int64_t forward_ns;
} eng_step_stats;

/* Runs one step. *evs receives one event per request that drew a token or
 * ended this step (owned by the eng, valid until the next eng_* call).
 * Returns 0 after a step, TD_EAGAIN when nothing can run now (no events), or
 * TD_EINTERNAL when the scheduler or pool broke an invariant. A failed forward
 * pass is not an error of eng_step: it ends the step's requests with
 * ENG_FINISH_ERROR and the eng stays usable. stats may be NULL. */
int eng_step(eng *e, const eng_event **evs, uint32_t *n_evs, eng_step_stats *stats);

/* The block pool: a decode worker allocates and commits destination blocks
 * through it between steps (same thread). */
kvc_pool *eng_kvc(eng *e);
const kv_layout *eng_layout(const eng *e);
/* Base of the KV region (the caller's kv_mem, or the backend's). */
void *eng_kv_base(eng *e);
const mdl_model *eng_model(const eng *e);
uint32_t eng_max_model_len(const eng *e);
uint64_t eng_fingerprint(const eng *e); /* seeds the prefix hashes; keeps pools of different
                                           models apart */

typedef struct eng_stats {
    uint32_t running;
    uint32_t waiting;
    uint64_t queued_prefill_tokens;
    uint64_t preemptions;
    uint64_t steps;
    kvc_stats kv;
} eng_stats;
void eng_stats_get(const eng *e, eng_stats *out);

#endif
