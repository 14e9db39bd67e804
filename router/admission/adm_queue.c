/* queue_threshold: reject when the predicted prefill queueing exceeds a bound.
 *
 *   ahead = max(queued_prefill_tokens, inflight_prefill_tokens), pairs their
 *           attention pairs (adm__prefill_wait_us)
 *   wait  = (ahead x prefill_us_per_token + pairs x prefill_us_per_token_ctx)
 *           / ready_prefill + prefill_us_fixed   (0 when nothing is ahead)
 *   wait <= queue_max_ms  ->  admit
 *   otherwise             ->  reject, Retry-After = ceil((wait - queue_max_ms) / 1 s),
 *                             when the queue will have drained back to the bound
 * No ready prefill or decode worker: reject, Retry-After 1, "no workers".
 * A cost model without prefill figures: admit while outstanding <
 * max_outstanding. Stateless between calls; it never holds. */
#include <math.h>
#include <stdlib.h>

#include "common/err.h"
#include "router/admission/adm_int.h"

typedef struct adm__queue {
    double max_wait_us;
    uint32_t cap;
    adm_cost cost;
} adm__queue;

static int adm__queue_create(const adm_params *p, void **ctx)
{
    if (!p || !ctx || !isfinite(p->queue_max_ms) || p->queue_max_ms < 0 ||
        p->max_outstanding == 0 || !adm__cost_valid(&p->cost))
        return TD_EINVAL;
    adm__queue *q = calloc(1, sizeof(*q));
    if (!q) return TD_ENOMEM;
    q->max_wait_us = p->queue_max_ms * 1e3;
    q->cap = p->max_outstanding;
    q->cost = p->cost;
    *ctx = q;
    return 0;
}

static void adm__queue_destroy(void *ctx)
{
    free(ctx);
}

static void adm__queue_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    const adm__queue *q = ctx;
    if (in->ready_prefill == 0 || in->ready_decode == 0) {
        adm__reject(out, 1, "no workers");
        return;
    }
    if (!adm__cost_knows_prefill(&q->cost)) {
        if (in->outstanding < q->cap)
            adm__admit(out, "admitted (no cost model: outstanding cap)");
        else
            adm__reject(out, 1, "too many requests in flight (no cost model)");
        return;
    }
    double wait = adm__prefill_wait_us(&q->cost, in, 0, 0);
    if (wait <= q->max_wait_us) {
        adm__admit(out, "admitted");
        return;
    }
    adm__reject(out, adm__retry_s(wait - q->max_wait_us),
                "predicted queueing over the bound (queue_threshold)");
}

const adm_ops adm__queue_threshold_ops = {
    .name = "queue_threshold",
    .create = adm__queue_create,
    .destroy = adm__queue_destroy,
    .decide = adm__queue_decide,
};
