/* sim: discrete-event simulation of a Tandem cluster — the router (admission
 * and dispatch), P prefill workers and D decode workers — driven by a trace.
 *
 * What is real code and what is modelled:
 *   real     admission (router/admission, the policy found by name), the
 *            continuous-batching scheduler (sch) and the block pool (kvc) of
 *            every worker: prefill workers run sch in prefill_only +
 *            hold_kv_on_finish mode, decode workers allocate destination
 *            blocks with kvc_seq_alloc and add requests with
 *            sch_add_prefilled, as decode/dc_engine.c does;
 *   modelled the forward pass (a step takes sim_step_us of the sch_step the
 *            scheduler built), the KV transfer (transfer_us_fixed plus
 *            transfer_us_per_block per block), the wire (no RPC latency) and,
 *            when the cost gives host_slow_*, a host that runs slower in
 *            stretches drawn from the seed. The router's least_loaded score
 *            (router/rt_members.c) is rewritten here over the simulated
 *            heartbeats.
 *
 * Time is an integer ns clock starting at 0 with the trace. Events are
 * ordered by (time, sequence number), so a run is deterministic: the same
 * trace, config, cost and seed give byte-identical records.
 *
 * Ownership: sim_run fills out[n] (the caller's, n == number of requests);
 * chunk times go to an arena the records borrow, freed by sim_result_free.
 */
#ifndef TANDEM_LOADTEST_SIM_SIM_H
#define TANDEM_LOADTEST_SIM_SIM_H

#include <stddef.h>
#include <stdint.h>

#include "loadtest/lt_report.h"
#include "loadtest/lt_trace.h"
#include "router/admission/adm.h"

/* Duration in us of one engine step: prefill part plus decode part (see
 * adm_cost). items[n] are sch_item-shaped: positions [start, start + n). */
struct sch_step;
double sim_step_us(const adm_cost *c, const struct sch_step *step);

typedef struct sim_config {
    uint32_t n_prefill, n_decode; /* workers, >= 1 each */
    uint32_t kv_blocks;           /* KV blocks per worker */
    uint32_t block_size;          /* tokens per block */
    uint32_t max_num_seqs;        /* per step */
    uint32_t max_batched_tokens;  /* per step */
    uint32_t max_chunk_tokens;    /* prefill chunk cap; 0 = none */
    uint32_t max_model_len;       /* prompt + output tokens of one request */
    int64_t heartbeat_ns;         /* load reports to the router; 0 = live state */
    int64_t tick_ns;              /* the router's tick (rt_on_tick, 100 ms): held requests
                                     are rechecked on it; 0 = only at heartbeats */
    const char *admission;        /* policy name for adm_find */
    const adm_ops *policy;        /* when set, used instead of adm_find(admission) (tests);
                                     borrowed */
    adm_params params;            /* its parameters (params.cost is ignored: router_cost or
                                     cost is used) */
    adm_cost cost;                /* the cost model: the simulated steps and, unless
                                     router_cost_set, the policy's predictions (the router's
                                     --cost-model) */
    adm_cost router_cost;         /* router_cost_set: the policy's predictions use this one
                                     instead (a profile taken when the cluster ran otherwise) */
    int router_cost_set;
    uint32_t retry_429; /* client retries of a 429, after its Retry-After (the load
                           tester's --retry-429); 0 = none */
    uint32_t chunk_cap; /* token times kept per record; 0 = all */
    int check_kv;       /* kvc_check after every step (tests) */
    uint64_t seed;      /* the host's slow stretches (cost.host_slow_*): the same
                           seed draws the same stretches */
} sim_config;

/* Defaults: 1 + 1 workers, 1024 blocks of 16, 64 seqs, 512 tokens, context
 * 4096, heartbeat 1 s, tick 100 ms, admission "none" with adm_params_defaults,
 * adm_cost_defaults, seed 1. */
void sim_config_defaults(sim_config *c);

typedef struct sim_stats {
    uint64_t events;
    uint64_t steps_prefill, steps_decode;
    uint64_t preemptions;
    uint64_t too_long; /* requests refused (400) for exceeding the context */
    uint64_t held;     /* ADM_HOLD verdicts (requests put in the hold queue) */
    uint64_t admitted_after_hold, rejected_after_hold, hold_timeouts; /* how holds ended */
    uint64_t hold_passes;    /* rechecks of the hold queue (ends, heartbeats, ticks, deadlines) */
    uint64_t client_retries; /* 429s the simulated client sent again (retry_429) */
    uint32_t leaked_blocks;  /* blocks not free at the end, all workers (0 expected) */
    double sim_end_s;        /* simulated time of the last event */
    /* The factors the policy applied to its cost model at the end (adm_ops
     * speed; 1 and 1 for a policy without one): the router's
     * tandem_router_admission_speed_factor gauges. */
    double speed_prefill, speed_decode;
} sim_stats;

typedef struct sim_result {
    lt_record *recs; /* n records, one per trace request, in trace order */
    size_t n;
    int64_t *arena; /* chunk times the records point into */
    sim_stats stats;
} sim_result;

/* Simulates reqs[n] (sorted by t_ns). 0, TD_EINVAL (config, unknown policy,
 * bad parameters), TD_ENOMEM, TD_EINTERNAL (a pool or scheduler invariant
 * broke); err names what. On success *out is the caller's (sim_result_free). */
int sim_run(const sim_config *cfg, const lt_req *reqs, size_t n, sim_result *out, char *err,
            size_t errlen);
void sim_result_free(sim_result *r);

#endif
