/* adm internals shared between the policy files (adm__ prefix). */
#ifndef TANDEM_ROUTER_ADMISSION_ADM_INT_H
#define TANDEM_ROUTER_ADMISSION_ADM_INT_H

#include <stdbool.h>

#include "router/admission/adm.h"

/* The policies' tables (adm.c lists them for adm_find). */
extern const adm_ops adm__token_bucket_ops;
extern const adm_ops adm__queue_threshold_ops;
extern const adm_ops adm__burst_ops;

/* Every field finite and >= 0. */
bool adm__cost_valid(const adm_cost *c);
/* Enough of the model to predict prefill queueing / decode step time. */
bool adm__cost_knows_prefill(const adm_cost *c);
bool adm__cost_knows_decode(const adm_cost *c);

/* Prompt tokens ahead of a new request in the prefill queues: the larger of
 * the heartbeats' queued_prefill_tokens and the router's own
 * inflight_prefill_tokens (each counts the same admitted work, one fresher,
 * one wider), plus extra_tokens (held requests ahead of it). */
double adm__prefill_ahead(const adm_input *in, double extra_tokens);

/* Predicted prefill queueing, us: the work ahead (adm__prefill_ahead plus
 * extra_tokens, and its attention pairs: the router's inflight_prefill_pairs,
 * the heartbeats' excess at the same pairs per token, plus extra_pairs),
 * spread over the ready prefill workers (>= 1):
 *   (ahead x prefill_us_per_token + pairs x prefill_us_per_token_ctx) / P,
 * plus one batch's fixed cost when anything is ahead; all of it times
 * adm__prefill_slowdown. */
double adm__prefill_wait_us(const adm_cost *c, const adm_input *in, double extra_tokens,
                            double extra_pairs);

/* The prefill side's co-location factor of the cost model (adm_cost), as
 * the cluster stands: prefill work is slowed while decode workers have
 * sequences (running_seqs > 0). 1 when not, or the factor is 0. */
double adm__prefill_slowdown(const adm_cost *c, const adm_input *in);

/* One prompt's own prefill from position 0, us:
 *   fixed + per_token x p + per_token_ctx x p (p + 1) / 2 */
double adm__prefill_own_us(const adm_cost *c, double prompt_tokens);

/* One request's predictions (adm_cost.c, docs/admission.md "Predictions"). */
typedef struct adm__pred {
    double wait_us;        /* prefill queueing ahead of it */
    double ttft_us;        /* wait + its own prefill + its KV transfer */
    double ttft_budget_us; /* max(SLO, its unloaded TTFT) */
    double tpot_us;        /* decode step time with it in the batch */
    double tpot_budget_us; /* max(SLO, its unloaded step time) */
    bool kv_short;         /* a decode worker lacks free blocks for its prompt */
    bool meets;            /* ttft <= budget, tpot <= budget, !kv_short */
    double drain_us;       /* until it would meet both (0 when meets; may be INFINITY) */
} adm__pred;

/* Needs ready_prefill and ready_decode >= 1 and a cost model that knows both.
 * extra_tokens, extra_pairs, extra_seqs: prompt tokens, their attention
 * pairs, and sequences of held requests ahead of it (they reach the prefill queue and the decode
 * batch first); mean_prompt, mean_out: mean prompt and output lengths of recent requests,
 * tokens (the context of the sequences the router admitted that the heartbeats do not show
 * yet; how fast sequences finish); prefill_share: the share of its decode steps that run
 * beside a prefill (clamped to [0, 1]), which take (1 + decode_extra_when_prefilling) times
 * as long. */
void adm__predict(const adm_cost *c, const adm_input *in, double extra_tokens, double extra_pairs,
                  double extra_seqs, double mean_prompt, double mean_out, double prefill_share,
                  double slo_ttft_us, double slo_tpot_us, adm__pred *out);

/* Retry-After for a drain time: ceil(us / 1 s), within 1..ADM_RETRY_MAX_S
 * (INFINITY and NaN give the maximum). */
uint32_t adm__retry_s(double drain_us);

/* Shorthands that fill a decision. */
void adm__admit(adm_decision *out, const char *reason);
void adm__reject(adm_decision *out, uint32_t retry_after_s, const char *reason);
void adm__hold(adm_decision *out, int64_t until_ns, const char *reason);

#endif
