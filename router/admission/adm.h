/* adm: admission control, pure code. No I/O and no clock of its own: the
 * caller passes the time and what it knows of the cluster, so the router and
 * the simulator run the same decisions.
 *
 * A policy is a const ops table chosen by name (adm_find). The router calls
 * decide once per arriving request and on_end when an admitted request ends.
 * Policies here: "none" (admit everything) and "max_outstanding" (reject with
 * a Retry-After once `max_outstanding` admitted requests are unfinished).
 * Burst-aware policies plug in behind the same table.
 *
 * Ownership: a policy's state (ctx) is created by create and freed by
 * destroy; it is used by one thread (the router's loop).
 */
#ifndef TANDEM_ROUTER_ADMISSION_ADM_H
#define TANDEM_ROUTER_ADMISSION_ADM_H

#include <stdint.h>

/* What the router knows when a request arrives. */
typedef struct adm_input {
    int64_t now_ns;         /* td_now_ns() of the arrival */
    uint32_t outstanding;   /* admitted, not yet finished (this request excluded) */
    uint32_t prompt_tokens; /* of this request */
    uint32_t max_tokens;    /* of this request */
    /* Cluster state from the workers' heartbeats (sums over ready workers). */
    uint64_t queued_prefill_tokens;
    uint32_t running_seqs;
    uint32_t free_kv_blocks;
    uint32_t total_kv_blocks;
    uint32_t ready_prefill, ready_decode;
} adm_input;

enum adm_verdict {
    ADM_ADMIT = 0,
    ADM_REJECT = 1, /* 429 with Retry-After */
};

typedef struct adm_decision {
    enum adm_verdict verdict;
    uint32_t retry_after_s; /* ADM_REJECT: seconds for the Retry-After header, >= 1 */
    const char *reason;     /* static text for the error message and logs */
} adm_decision;

/* Parameters of every policy (each reads what it needs). */
typedef struct adm_params {
    uint32_t max_outstanding; /* max_outstanding: admitted requests at once (>= 1) */
} adm_params;

/* Cost model of one worker step and of a KV transfer, in microseconds: what
 * the router and the simulator predict latencies from. A step's time is the
 * prefill part (prefill_us_fixed + prefill_us_per_token * prefill tokens of
 * the step, when it has any) plus the decode part (decode_step_us_fixed +
 * decode_step_us_per_seq * decode sequences + decode_step_us_per_ctx_token *
 * the context tokens those sequences attend over, when it has any). A
 * transfer takes transfer_us_per_block per KV block sent. */
typedef struct adm_cost {
    double prefill_us_fixed, prefill_us_per_token;
    double decode_step_us_fixed, decode_step_us_per_seq, decode_step_us_per_ctx_token;
    double transfer_us_per_block;
} adm_cost;

typedef struct adm_ops {
    const char *name;
    int (*create)(const adm_params *p, void **ctx);
    void (*destroy)(void *ctx);
    void (*decide)(void *ctx, const adm_input *in, adm_decision *out);
    void (*on_end)(void *ctx, int64_t now_ns); /* an admitted request ended; optional */
} adm_ops;

/* The policy called name, or NULL. */
const adm_ops *adm_find(const char *name);

/* '|'-separated names of every policy, for --help. */
const char *adm_names(void);

#endif
