/* adm: admission control, pure code. No I/O and no clock of its own: the
 * caller passes the time and what it knows of the cluster, so the router and
 * the simulator (loadtest/sim) run the same decisions. The one exception is
 * the cost-model file (adm_cost_load / adm_cost_save), read once at start.
 *
 * A policy is a const ops table chosen by name (adm_find):
 *   none             admit everything
 *   max_outstanding  reject once max_outstanding admitted requests are unfinished
 *   token_bucket     bucket_rate requests/s, bucket_burst at once (exact, integer ns)
 *   queue_threshold  reject when the predicted prefill queueing > queue_max_ms
 *   burst            predict TTFT and TPOT; admit, hold through a transient
 *                    burst while the request's TTFT slack lasts, or reject
 *                    with a Retry-After from the predicted drain time
 * docs/admission.md gives each policy's rules and formulas.
 *
 * Calls, all from one thread (the router's loop, or the simulator):
 *   decide          once per arriving request; ADM_ADMIT, ADM_REJECT or
 *                   ADM_HOLD (only policies with a recheck hold)
 *   recheck         a held request looked at again (no arrival), in hold
 *                   order, oldest first; NULL for policies that never hold
 *   on_first_token, on_end   feedback; optional (NULL)
 * Same inputs in the same order give the same decisions: policies keep no
 * clock, no randomness, and allocate only in create.
 *
 * Time: now_ns may go backwards (a clock jump passed in); a policy treats
 * that as no time elapsed. Ownership: a policy's state (ctx) is created by
 * create and freed by destroy (NULL accepted). Decision reasons are static
 * strings.
 */
#ifndef TANDEM_ROUTER_ADMISSION_ADM_H
#define TANDEM_ROUTER_ADMISSION_ADM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Longest Retry-After a policy suggests, seconds. */
#define ADM_RETRY_MAX_S 60u

/* Attention pairs of a p-token prompt prefilled from position 0: p (p + 1) / 2
 * (what adm_input.inflight_prefill_pairs sums). */
static inline uint64_t adm_prefill_pairs(uint32_t prompt_tokens)
{
    return (uint64_t)prompt_tokens * ((uint64_t)prompt_tokens + 1) / 2;
}

/* A worker's load as a policy should see it now, from a heartbeat up to a
 * period old: what this router has on the worker now, plus what the last
 * heartbeat reported beyond what this router had on it when that heartbeat
 * came (another router's work). The report alone would still count this
 * router's requests that ended since, and miss the ones it sent since. */
static inline uint64_t adm_fresh_load(uint64_t own_now, uint64_t reported, uint64_t own_at_report)
{
    return own_now + (reported > own_at_report ? reported - own_at_report : 0);
}

/* What the caller knows when a request arrives (decide) or when a held one is
 * looked at again (recheck). */
typedef struct adm_input {
    int64_t now_ns;                   /* td_now_ns() clock, passed in */
    uint32_t outstanding;             /* admitted and not finished (this request excluded) */
    uint32_t held;                    /* in the hold queue (this request excluded) */
    uint32_t prompt_tokens;           /* of this request */
    uint32_t max_tokens;              /* of this request: what it may generate */
    uint64_t inflight_prefill_tokens; /* router's own: prompt tokens admitted, first
                                         token not yet seen */
    uint64_t inflight_prefill_pairs;  /* router's own, the same prompts: sum of p (p + 1) / 2,
                                         the (token, position attended) pairs of their
                                         attention (prefill_us_per_token_ctx) */
    /* Cluster state, summed over ready workers. The loads are as of now
     * (adm_fresh_load per worker: this router's own work now plus the
     * heartbeats' excess); the KV blocks are the last heartbeats'. */
    uint64_t queued_prefill_tokens;       /* prefill workers: prompt tokens waiting or in prefill */
    uint32_t running_seqs;                /* decode workers: sequences in the batch, or on their way
                                             to it (this router's: sent to the worker, not ended) */
    uint32_t waiting_seqs;                /* decode workers: of those, the ones the heartbeats
                                             reported waiting for blocks or a slot */
    uint32_t free_kv_blocks;              /* decode workers: free KV blocks */
    uint32_t total_kv_blocks;             /* decode workers: all KV blocks */
    uint32_t block_size;                  /* tokens per KV block (0: unknown) */
    uint32_t ready_prefill, ready_decode; /* ready workers of each role */
    /* The tokens each of this router's own requests among running_seqs (sent
     * to a decode worker, not ended) may still generate, ascending; NULL and
     * 0 when unknown or the policy does not set uses_remaining (sorted by
     * adm_input_set_remaining). Borrowed for the call. burst's drain: the k-th of them
     * is when k sequences will have left the batch, where a steady-state
     * guess (every sequence lives the mean output) can be far off in a
     * burst. Added to the agreed interface. */
    const uint32_t *own_remaining;
    uint32_t n_own_remaining;
    /* recheck only: the hold_until_ns decide returned for this request
     * (0: unknown). Added to the agreed interface so that a pure recheck
     * knows the request's deadline. Deadlines are not in hold-queue order
     * (burst bounds each by the request's TTFT slack): the caller keeps a
     * timer per held request and rechecks it at its deadline. */
    int64_t hold_until_ns;
} adm_input;

enum adm_verdict {
    ADM_ADMIT = 0,
    ADM_REJECT = 1, /* 429 with Retry-After */
    ADM_HOLD = 2,   /* keep in the router's hold queue until hold_until_ns */
};

/* What a policy predicted for a request when it admitted it, from its cost
 * model as profiled (without any correction the policy applies to it):
 * its TTFT counted from the admission, and its mean time per output token.
 * Microseconds; 0: no prediction. The caller keeps it with the request and
 * hands it back with the request's outcome (on_first_token, on_end), so a
 * policy can measure how far the cluster now is from its profile. Added to
 * the agreed interface for burst's speed tracking. */
typedef struct adm_pred {
    double ttft_us;
    double tpot_us;
} adm_pred;

typedef struct adm_decision {
    enum adm_verdict verdict;
    adm_pred pred;          /* ADM_ADMIT: the predictions above (zeros when none) */
    int64_t hold_until_ns;  /* ADM_HOLD: the deadline (same clock as now_ns); past it,
                               recheck rejects */
    uint32_t retry_after_s; /* ADM_REJECT: seconds for Retry-After, 1..ADM_RETRY_MAX_S */
    const char *reason;     /* static text for the error message and logs */
} adm_decision;

/* The cost model, fitted by the profiler, read from a file by the router and
 * the simulator. Microseconds. All zero: unknown (policies that need it fall
 * back to a cap on outstanding requests). */
typedef struct adm_cost {
    double prefill_us_fixed;             /* one prefill batch: fixed part */
    double prefill_us_per_token;         /* one prefill batch: per prompt token in it */
    double prefill_us_per_token_ctx;     /* one prefill batch: per prompt token per position
                                            it attends over (the quadratic attention part:
                                            a p-token prompt from position 0 has
                                            p (p + 1) / 2 such pairs) */
    double decode_step_us_fixed;         /* one decode step: fixed part */
    double decode_step_us_per_seq;       /* per sequence in the batch */
    double decode_step_us_per_ctx_token; /* per context token, summed over the batch */
    double transfer_us_per_block;        /* KV transfer, per block (all layers) */
    double transfer_us_fixed;            /* per request: the hand-off's fixed part (the
                                            transfer's last message, the decode worker
                                            taking the request, the first token's hops to
                                            the client), paid even by a one-block prompt */
    /* Workers that share a host's cores slow each other down: a prefill batch
     * that runs while a decode worker steps takes (1 + prefill_extra_when_decoding)
     * times as long, a decode step during a prefill (1 + decode_extra_when_prefilling)
     * times. 0 (the default) for workers on hosts or devices of their own; the
     * profiler measures both on the cluster it runs against. */
    double prefill_extra_when_decoding;
    double decode_extra_when_prefilling;
    /* A host whose cores are shared with other machines runs at two speeds:
     * for stretches of host_slow_mean_us on average, host_slow_share of the
     * time, every step takes host_slow_factor times as long. The profiler
     * measures them; the simulator draws such stretches (sim.h); the
     * policies predict with the fast host's figures above. All 0: a steady
     * host. */
    double host_slow_share;
    double host_slow_factor;
    double host_slow_mean_us;
} adm_cost;

/* Reads `key = value` lines (blank lines and # comments allowed; keys are the
 * field names above; keys not in the file are 0). Unknown or repeated key, a
 * value that is not a finite number >= 0, a line without '=', or host keys
 * that break adm_cost_host_problem's rule: TD_EFORMAT with the line and key
 * (or the rule) in err. Missing file: TD_ENOENT (other errno mapped).
 * *out is written only on success. err may be NULL. */
int adm_cost_load(const char *path, adm_cost *out, char *err, size_t errlen);

/* The rule the host_slow_* keys follow together: all 0, or host_slow_share
 * in [0, 1) with host_slow_factor >= 1 and host_slow_mean_us > 0 once the
 * share or the factor is set. NULL when c follows it, else what is wrong
 * (static text). adm_cost_load refuses a file that breaks it. */
const char *adm_cost_host_problem(const adm_cost *c);

/* Writes every field (round-trips exactly through adm_cost_load). 0 or TD_E*. */
int adm_cost_save(const char *path, const adm_cost *c);

/* Figures for the 15m test model on a 2-core CPU host (sources in adm_cost.c). */
void adm_cost_defaults(adm_cost *c);

/* Parameters of every policy (each reads what it needs; create checks them
 * and returns TD_EINVAL when one it reads is out of range). */
typedef struct adm_params {
    uint32_t max_outstanding;             /* max_outstanding; also the cap of queue_threshold and
                                             burst when the cost model is unknown (>= 1) */
    double bucket_rate;                   /* token_bucket: requests/s (> 0) */
    double bucket_burst;                  /* token_bucket: bucket size, requests (>= 1) */
    double queue_max_ms;                  /* queue_threshold: reject when predicted prefill
                                             queueing exceeds this (>= 0) */
    double slo_ttft_ms, slo_tpot_ms;      /* burst: the SLOs it protects (> 0) */
    double short_window_s, long_window_s; /* burst: arrival-rate windows, 0 < short < long */
    double hold_max_ms;                   /* burst: longest a request is held (>= 0) */
    uint32_t hold_max;                    /* burst: hold queue bound (0: never hold) */
    double burst_cv; /* burst: inter-arrival CV above which arrivals are a burst */
    /* burst: short-window rate above burst_rate_ratio x the long-window rate is
     * a burst (>= 1). Added to the agreed interface: a steady stream measured
     * by two decayed counters never reads exactly equal, so "above" needs a
     * margin. */
    double burst_rate_ratio;
    /* burst: admit when the predicted TTFT and TPOT are within this fraction
     * of their SLOs, (0, 1]. Added to the agreed interface: a request's TPOT
     * is its mean over a batch that later admissions grow, so admitting up to
     * the SLO itself leaves the running requests at the edge of it. */
    double slo_margin;
    /* burst: step of its SLO feedback, [0, 1]; 0: off. Two factors, each
     * in [1, ADM_SPEED_MAX], multiply the cost model's times: prefill and
     * transfer ones by the first, decode ones by the second. An admitted
     * request over the TTFT SLO at its first token raises the first by this
     * step (x (1 + speed_step)), one within it lowers it by a nineteenth of
     * that; the same for the second with the time per output token at its
     * end. Violations among admitted requests then settle near 5%: a cost
     * model more optimistic than the cluster now (a profile taken when the
     * host ran faster) is corrected, an accurate one is left as it is.
     * Added to the agreed interface. */
    double speed_step;
    /* burst: weight of the newest admitted request in its measured speed,
     * [0, 1]; 0: off. A request's first token against the TTFT predicted
     * when it was admitted (adm_pred), and its time per output token against
     * the one predicted, each ratio taken in a logarithmic moving average:
     * two more factors, in [1 / ADM_SPEED_MAX, ADM_SPEED_MAX], on the cost
     * model's prefill and transfer times and on its decode times. Unlike the
     * SLO feedback they also go below 1: a profile taken while the host ran
     * slower than it does now is corrected too, and they follow the cluster
     * whether or not any request misses its SLO. Added to the agreed
     * interface. */
    double speed_track;
    adm_cost cost;
} adm_params;

#define ADM_SPEED_MAX 4.0

/* Defaults of every field (docs/admission.md lists them). */
void adm_params_defaults(adm_params *p);

typedef struct adm_ops {
    const char *name;
    /* 0, or TD_EINVAL (a parameter out of range) / TD_ENOMEM; *ctx set on success. */
    int (*create)(const adm_params *p, void **ctx);
    void (*destroy)(void *ctx);
    /* A request arrived now (updates arrival estimators). */
    void (*decide)(void *ctx, const adm_input *in, adm_decision *out);
    /* A held request looked at again (no arrival): ADM_ADMIT, ADM_HOLD (keep
     * holding, same deadline) or ADM_REJECT. Optional: NULL means admit. */
    void (*recheck)(void *ctx, const adm_input *in, adm_decision *out);
    /* An admitted request's first token came, ttft_ns after its arrival and
     * now_ns - admitted_ns after its admission; pred is what the decision
     * that admitted it predicted. Optional. */
    void (*on_first_token)(void *ctx, int64_t now_ns, int64_t ttft_ns, int64_t admitted_ns,
                           const adm_pred *pred);
    /* An admitted request ended after n_tokens tokens (0 when it failed
     * before its first), its last decode_ns after its first: a time per
     * output token of decode_ns / (n_tokens - 1). Optional. (The token count
     * and time were added to the agreed interface for burst's SLO feedback,
     * pred for its speed tracking.) */
    void (*on_end)(void *ctx, int64_t now_ns, uint32_t n_tokens, int64_t decode_ns,
                   const adm_pred *pred);
    /* The factors the policy applies to its cost model now: prefill and
     * transfer times, decode times (burst: the SLO feedback's times the
     * speed tracking's; both 1 while neither is on). Optional: NULL for
     * policies without feedback. Read by the router for its metrics. */
    void (*speed)(const void *ctx, double *prefill, double *decode);
    /* The policy reads adm_input.own_remaining: the caller fills it only
     * then (a walk over its requests and a sort on every decision). */
    bool uses_remaining;
} adm_ops;

/* Adds one ready worker's load to in (router and simulator alike), brought up
 * to now with adm_fresh_load. A prefill worker: the prompt tokens this router
 * has on it now and had on it when its last report came, and the report's
 * queued tokens. A decode worker: the requests this router has on it now and
 * had then, the report's running and waiting sequences and its KV blocks. */
void adm_input_add_prefill(adm_input *in, uint64_t own_tokens, uint64_t own_tokens_at_report,
                           uint64_t queued_tokens);
void adm_input_add_decode(adm_input *in, uint32_t own, uint32_t own_at_report, uint32_t running,
                          uint32_t waiting, uint32_t free_blocks, uint32_t total_blocks);

/* Sorts v[0, n) (tokens each of the caller's own decode sequences may still
 * generate) ascending and lends it to in as own_remaining (router and
 * simulator alike). */
void adm_input_set_remaining(adm_input *in, uint32_t *v, uint32_t n);

/* A caller's scratch for own_remaining, refilled before each decision
 * (n = 0, then one push per sequence) and grown as needed: owned by the
 * caller (the router's context), freed with adm_remaining_free. */
typedef struct adm_remaining {
    uint32_t *v;
    uint32_t n, cap;
} adm_remaining;

/* Appends tokens. TD_ENOMEM when the buffer cannot grow: the list is then
 * unchanged, and a caller that lends no list leaves the policy its
 * steady-state guess (own_remaining unknown). */
int adm_remaining_push(adm_remaining *r, uint32_t tokens);
void adm_remaining_free(adm_remaining *r);

/* The policy called name, or NULL. */
const adm_ops *adm_find(const char *name);

/* '|'-separated names of every policy, for --help:
 * "none|max_outstanding|token_bucket|queue_threshold|burst". */
const char *adm_names(void);

#endif
