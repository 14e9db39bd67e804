/* token_bucket: bucket_rate requests per second, bucket_burst at once.
 *
 * Kept as the virtual time at which the bucket will be full again (the
 * generic cell rate algorithm), in integer nanoseconds, so that refills are
 * exact: with rate 10/s a token comes back every 100,000,000 ns, not every
 * 0.1 s give or take a rounding.
 *
 *   T    = round(1e9 / bucket_rate) ns, the time one token takes to refill
 *   tau  = round((bucket_burst - 1) * T) ns, how far ahead tat may run
 *   now' = max(now, last now)         (a clock going back: no time elapsed)
 *   t0   = max(tat, now')             (idle: the bucket is full, not fuller)
 *   t0 - now' <= tau  ->  admit, tat = t0 + T
 *   otherwise         ->  reject, Retry-After = ceil((t0 - tau - now') / 1 s)
 *
 * State machine: EMPTY (no arrival yet; tat = now at the first) -> RUNNING.
 * It never holds, so no recheck. */
#include <math.h>
#include <stdlib.h>

#include "common/err.h"
#include "router/admission/adm_int.h"

typedef struct adm__bucket {
    int64_t period_ns; /* T */
    int64_t tau_ns;
    int64_t tat_ns;  /* theoretical arrival time of the next request */
    int64_t last_ns; /* latest now seen */
    bool started;
} adm__bucket;

static int adm__bucket_create(const adm_params *p, void **ctx)
{
    if (!p || !ctx || !isfinite(p->bucket_rate) || !(p->bucket_rate > 0) ||
        !isfinite(p->bucket_burst) || !(p->bucket_burst >= 1) || p->bucket_rate < 1e-6 ||
        p->bucket_burst > 1e9)
        return TD_EINVAL;
    adm__bucket *b = calloc(1, sizeof(*b));
    if (!b) return TD_ENOMEM;
    b->period_ns = llround(1e9 / p->bucket_rate);
    if (b->period_ns < 1) b->period_ns = 1;
    b->tau_ns = llround((p->bucket_burst - 1) * (double)b->period_ns);
    *ctx = b;
    return 0;
}

static void adm__bucket_destroy(void *ctx)
{
    free(ctx);
}

static void adm__bucket_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    adm__bucket *b = ctx;
    int64_t now = in->now_ns;
    if (!b->started) {
        b->started = true;
        b->tat_ns = now;
        b->last_ns = now;
    }
    if (now < b->last_ns) now = b->last_ns;
    b->last_ns = now;
    int64_t t0 = b->tat_ns > now ? b->tat_ns : now;
    if (t0 - now <= b->tau_ns) {
        b->tat_ns = t0 + b->period_ns;
        adm__admit(out, "admitted");
        return;
    }
    int64_t wait_ns = t0 - b->tau_ns - now; /* > 0 */
    adm__reject(out, adm__retry_s((double)wait_ns / 1e3), "rate limit (token_bucket)");
}

const adm_ops adm__token_bucket_ops = {
    .name = "token_bucket",
    .create = adm__bucket_create,
    .destroy = adm__bucket_destroy,
    .decide = adm__bucket_decide,
};
