/* burst: admit what meets the SLOs, hold through a transient burst, reject a
 * sustained overload with a Retry-After from the predicted drain time.
 *
 * Arrival estimators (updated by decide only, allocation-free):
 *   count_w    arrivals decayed by exp(-dt / w), one per window w (short, long)
 *   rate_w     count_w before this arrival / (w * (1 - exp(-history / w))):
 *              the divisor is the window the counter has actually seen, so a
 *              fresh policy does not read its long window as quiet
 *   gap mean, variance   exponentially weighted (ADM__GAP_ALPHA) over
 *              inter-arrival times; cv = sqrt(var) / mean
 *   burst  =   rate_short > burst_rate_ratio * rate_long  or  cv > burst_cv
 *   mean_prompt, mean_out   weighted means of prompt_tokens and max_tokens
 *
 * decide (an arrival), in order:
 *   no ready prefill or decode worker        -> REJECT 1 s, "no workers"
 *   cost model lacks prefill or decode       -> ADMIT while outstanding < max_outstanding,
 *                                               else REJECT 1 s
 *   predict with the held requests ahead: held * mean_prompt prefill tokens,
 *   held sequences in the decode batch, its decode steps beside prefills for
 *   the share of the time the short window's rate keeps the prefill workers
 *   busy (adm__burst_prefill_share, adm__predict)
 *   meets both SLOs                          -> ADMIT
 *   not a burst, or held >= hold_max         -> REJECT, Retry-After = ceil(drain)
 *   hold = min(hold_max_ms, TTFT budget - predicted TTFT)   (the TTFT slack)
 *   drain <= hold (so hold > 0)              -> HOLD until now + hold
 *   otherwise                                -> REJECT, Retry-After = ceil(drain)
 * The hold never outlasts the TTFT slack because TTFT counts from arrival: a
 * request admitted after its slack would miss the SLO anyway. So what a hold
 * absorbs is a burst on the decode side (a batch past the TPOT SLO, KV blocks
 * short) while the prefill side has room; a prefill backlog past the TTFT
 * budget does not drain faster than the hold lasts, and is rejected.
 * recheck (a held request, oldest first, so nothing held is ahead of it):
 *   no ready worker                          -> REJECT 1 s, "no workers"
 *   now >= hold_until_ns                     -> REJECT, Retry-After = ceil(drain)
 *   cost model unknown                       -> ADMIT while outstanding < cap, else HOLD
 *   meets both SLOs                          -> ADMIT
 *   otherwise                                -> HOLD (same deadline)
 * A clock that goes back counts as no time elapsed (now' = max(now, last)).
 *
 * SLO feedback (speed_step > 0): the predictions above use the cost model
 * with its prefill and transfer times multiplied by speed_prefill and its
 * decode times by speed_decode, each in [1, ADM_SPEED_MAX]. An admitted
 * request whose first token came after the TTFT SLO multiplies
 * speed_prefill by (1 + step), one within it by (1 - step / 19); the same
 * for speed_decode with a finished request's time per output token against
 * the TPOT SLO. So the factors rise while more than about 1 in 20 admitted
 * requests miss an SLO and fall back to 1 (the model as profiled) while
 * fewer do: an integral controller on the admitted requests' violations,
 * which corrects a cost model that has become optimistic (the host slowed
 * down after the profile) and leaves an accurate one alone.
 *
 * Speed tracking (speed_track = w > 0): every admission hands back what it
 * predicted with the cost model as profiled (adm_pred: the TTFT from the
 * admission, the time per output token). At the request's first token
 *     track_prefill += w (ln(observed TTFT / predicted) - track_prefill)
 * and at its end the same for track_decode with its time per output token,
 * each ratio first clamped to [1/16, 16] (one stray sample moves the
 * estimate by a bounded step). The predictions also multiply by
 * exp(track_prefill) and exp(track_decode): with the feedback's factors,
 * each product clamped to [1 / ADM_SPEED_MAX, ADM_SPEED_MAX]. The ratios
 * compare with the unscaled model, so the estimate does not depend on what
 * it made the policy admit: it converges on how much slower (> 1) or faster
 * (< 1) the cluster runs than when it was profiled, within about 1 / w
 * requests, whether or not any request misses its SLO. */
#include <math.h>
#include <stdlib.h>

#include "common/err.h"
#include "router/admission/adm_int.h"

/* Weight of the newest sample in the gap and length means (about the last
 * 16 arrivals). */
#define ADM__GAP_ALPHA (1.0 / 16)

typedef struct adm__burst {
    adm_params p;
    /* arrival estimators */
    bool started;
    int64_t first_ns;        /* first arrival: how much history the counters hold */
    int64_t last_arrival_ns; /* the counters are as of this time */
    int64_t last_ns;         /* latest now seen by decide or recheck */
    double count_short, count_long;
    uint32_t n_gaps;
    double gap_mean_s, gap_var_s2;
    double mean_prompt, mean_out;       /* tokens */
    double speed_prefill, speed_decode; /* SLO feedback factors, >= 1 */
    double track_prefill, track_decode; /* speed tracking: ln of the measured factors */
    double fp, fd;                      /* the factors applied now (adm__burst_rescale) */
    adm_cost cost_now;                  /* p.cost scaled by them */
} adm__burst;

static int adm__burst_create(const adm_params *p, void **ctx)
{
    if (!p || !ctx || p->max_outstanding == 0 || !adm__cost_valid(&p->cost)) return TD_EINVAL;
    if (!isfinite(p->slo_ttft_ms) || !(p->slo_ttft_ms > 0) || !isfinite(p->slo_tpot_ms) ||
        !(p->slo_tpot_ms > 0) || !isfinite(p->short_window_s) || !(p->short_window_s > 0) ||
        !isfinite(p->long_window_s) || !(p->long_window_s > p->short_window_s) ||
        !isfinite(p->hold_max_ms) || !(p->hold_max_ms >= 0) || !isfinite(p->burst_cv) ||
        !(p->burst_cv >= 0) || !isfinite(p->burst_rate_ratio) || !(p->burst_rate_ratio >= 1) ||
        !(p->slo_margin > 0) || !(p->slo_margin <= 1) || !(p->speed_step >= 0) ||
        !(p->speed_step <= 1) || !(p->speed_track >= 0) || !(p->speed_track <= 1))
        return TD_EINVAL;
    adm__burst *b = calloc(1, sizeof(*b));
    if (!b) return TD_ENOMEM;
    b->p = *p;
    b->last_ns = INT64_MIN;
    b->speed_prefill = b->speed_decode = 1;
    b->fp = b->fd = 1;
    b->cost_now = p->cost;
    *ctx = b;
    return 0;
}

static void adm__burst_destroy(void *ctx)
{
    free(ctx);
}

static int64_t adm__burst_now(adm__burst *b, int64_t now)
{
    if (now < b->last_ns) now = b->last_ns;
    b->last_ns = now;
    return now;
}

static double adm__rate(double count, double w, double history_s)
{
    double seen = w * -expm1(-history_s / w);
    return seen > 0 ? count / seen : 0;
}

/* Updates the estimators for an arrival at now; true when it looks like a burst. */
static bool adm__burst_observe(adm__burst *b, int64_t now, const adm_input *in)
{
    if (!b->started) {
        b->started = true;
        b->first_ns = b->last_arrival_ns = now;
        b->mean_prompt = in->prompt_tokens;
        b->mean_out = in->max_tokens;
        b->count_short = b->count_long = 1;
        return false;
    }
    double gap = (double)(now - b->last_arrival_ns) / 1e9; /* >= 0: now is clamped */
    double history = (double)(now - b->first_ns) / 1e9;
    b->count_short *= exp(-gap / b->p.short_window_s);
    b->count_long *= exp(-gap / b->p.long_window_s);
    double rate_s = adm__rate(b->count_short, b->p.short_window_s, history);
    double rate_l = adm__rate(b->count_long, b->p.long_window_s, history);
    b->count_short += 1;
    b->count_long += 1;
    b->last_arrival_ns = now;

    if (b->n_gaps++ == 0) {
        b->gap_mean_s = gap;
        b->gap_var_s2 = 0;
    } else {
        double d = gap - b->gap_mean_s;
        b->gap_mean_s += ADM__GAP_ALPHA * d;
        b->gap_var_s2 = (1 - ADM__GAP_ALPHA) * (b->gap_var_s2 + ADM__GAP_ALPHA * d * d);
    }
    bool bursty_cv = false;
    if (b->n_gaps >= 2) {
        double sd = sqrt(b->gap_var_s2);
        bursty_cv = b->gap_mean_s > 0 ? sd / b->gap_mean_s > b->p.burst_cv : true;
    }
    return rate_s > b->p.burst_rate_ratio * rate_l || bursty_cv;
}

static bool adm__burst_no_workers(const adm_input *in, adm_decision *out)
{
    if (in->ready_prefill && in->ready_decode) return false;
    adm__reject(out, 1, "no workers");
    return true;
}

static bool adm__burst_cost_known(const adm__burst *b)
{
    return adm__cost_knows_prefill(&b->p.cost) && adm__cost_knows_decode(&b->p.cost);
}

/* What an admission hands back: the predictions of the unscaled model. Every
 * prefill and transfer term of the TTFT scales by fp, every term of the step
 * time by fd (adm__burst_rescale), so dividing gives them exactly. */
static void adm__burst_pred_out(const adm__burst *b, const adm__pred *pr, adm_decision *out)
{
    out->pred.ttft_us = pr->ttft_us / b->fp;
    out->pred.tpot_us = pr->tpot_us / b->fd;
}

/* The share of the prefill workers' time the arrivals keep them busy at the
 * short window's rate as of now (after the arrivals up to now): each brings
 * a prefill of the mean prompt. What runs beside a request's decode steps
 * is the prefill of those that come after it. */
static double adm__burst_prefill_share(const adm__burst *b, const adm_input *in, int64_t now)
{
    if (!b->started || !in->ready_prefill) return 0;
    double w = b->p.short_window_s;
    double since = (double)(now - b->last_arrival_ns) / 1e9;
    double rate = adm__rate(b->count_short * exp(-since / w), w, (double)(now - b->first_ns) / 1e9);
    return rate * adm__prefill_own_us(&b->cost_now, b->mean_prompt) / 1e6 / in->ready_prefill;
}

/* held: requests held ahead of this one (decide: all of them; recheck: none). */
static void adm__burst_predict(const adm__burst *b, const adm_input *in, uint32_t held, int64_t now,
                               adm__pred *pr)
{
    const double m = b->p.slo_margin;
    adm__predict(&b->cost_now, in, (double)held * b->mean_prompt,
                 (double)held * b->mean_prompt * (b->mean_prompt + 1) / 2, held, b->mean_prompt,
                 b->mean_out, adm__burst_prefill_share(b, in, now), m * b->p.slo_ttft_ms * 1e3,
                 m * b->p.slo_tpot_ms * 1e3, pr);
}

static void adm__burst_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    adm__burst *b = ctx;
    int64_t now = adm__burst_now(b, in->now_ns);
    bool burst = adm__burst_observe(b, now, in);
    if (adm__burst_no_workers(in, out)) goto means;
    if (!adm__burst_cost_known(b)) {
        if (in->outstanding < b->p.max_outstanding)
            adm__admit(out, "admitted (no cost model: outstanding cap)");
        else
            adm__reject(out, 1, "too many requests in flight (no cost model)");
        goto means;
    }
    adm__pred pr;
    adm__burst_predict(b, in, in->held, now, &pr);
    if (pr.meets) {
        adm__admit(out, "admitted");
        /* Admitted now, it goes ahead of the held requests it was predicted
         * behind: what it is measured against counts none of them. */
        if (in->held) adm__burst_predict(b, in, 0, now, &pr);
        adm__burst_pred_out(b, &pr, out);
    } else if (!burst) {
        adm__reject(out, adm__retry_s(pr.drain_us), "over the SLOs under sustained load (burst)");
    } else if (in->held >= b->p.hold_max) {
        adm__reject(out, adm__retry_s(pr.drain_us), "over the SLOs, hold queue full (burst)");
    } else {
        /* TTFT counts from arrival: a hold spends the request's TTFT slack.
         * Work ahead in the prefill queue drains no faster than the hold
         * lasts, so a request over the TTFT budget is not helped by holding
         * it; one over the TPOT budget or short of KV blocks is, when the
         * decode side drains within its slack. */
        double slack_us = pr.ttft_budget_us - pr.ttft_us;
        double hold_us = fmin(b->p.hold_max_ms * 1e3, slack_us);
        if (hold_us > 0 && pr.drain_us <= hold_us)
            adm__hold(out, now + llround(hold_us * 1e3), "held through a burst");
        else
            adm__reject(out, adm__retry_s(pr.drain_us),
                        "over the SLOs, a hold would not bring it within them (burst)");
    }
means:
    /* After the prediction: held requests ahead are sized by those before it. */
    b->mean_prompt += ADM__GAP_ALPHA * ((double)in->prompt_tokens - b->mean_prompt);
    b->mean_out += ADM__GAP_ALPHA * ((double)in->max_tokens - b->mean_out);
}

static void adm__burst_recheck(void *ctx, const adm_input *in, adm_decision *out)
{
    adm__burst *b = ctx;
    int64_t now = adm__burst_now(b, in->now_ns);
    int64_t until = in->hold_until_ns ? in->hold_until_ns : now + llround(b->p.hold_max_ms * 1e6);
    if (adm__burst_no_workers(in, out)) return;
    bool known = adm__burst_cost_known(b);
    adm__pred pr = {.meets = in->outstanding < b->p.max_outstanding, .drain_us = 1e6};
    if (known) adm__burst_predict(b, in, 0, now, &pr);
    if (in->hold_until_ns && now >= in->hold_until_ns) {
        adm__reject(out, adm__retry_s(pr.drain_us), "held past its deadline (burst)");
        return;
    }
    if (pr.meets) {
        adm__admit(out, "admitted after a hold");
        if (known) adm__burst_pred_out(b, &pr, out);
    } else
        adm__hold(out, until, "held through a burst");
}

/* The SLO feedback (top of the file). */
static void adm__burst_rescale(adm__burst *b)
{
    const adm_cost *c = &b->p.cost;
    adm_cost *s = &b->cost_now;
    const double lo = 1 / ADM_SPEED_MAX, hi = ADM_SPEED_MAX;
    const double fp = fmin(fmax(b->speed_prefill * exp(b->track_prefill), lo), hi);
    const double fd = fmin(fmax(b->speed_decode * exp(b->track_decode), lo), hi);
    b->fp = fp;
    b->fd = fd;
    s->prefill_us_fixed = c->prefill_us_fixed * fp;
    s->prefill_us_per_token = c->prefill_us_per_token * fp;
    s->prefill_us_per_token_ctx = c->prefill_us_per_token_ctx * fp;
    s->transfer_us_per_block = c->transfer_us_per_block * fp;
    s->transfer_us_fixed = c->transfer_us_fixed * fp;
    s->decode_step_us_fixed = c->decode_step_us_fixed * fd;
    s->decode_step_us_per_seq = c->decode_step_us_per_seq * fd;
    s->decode_step_us_per_ctx_token = c->decode_step_us_per_ctx_token * fd;
}

static void adm__speed_update(double *speed, double step, bool missed)
{
    *speed *= missed ? 1 + step : 1 - step / 19;
    *speed = fmin(fmax(*speed, 1), ADM_SPEED_MAX);
}

/* Speed tracking (top of the file): one measured / predicted sample. */
static void adm__track_update(double *track, double w, double measured_us, double predicted_us)
{
    if (!(measured_us > 0) || !(predicted_us > 0)) return;
    double r = fmin(fmax(measured_us / predicted_us, 1.0 / 16), 16);
    *track += w * (log(r) - *track);
}

static void adm__burst_first_token(void *ctx, int64_t now_ns, int64_t ttft_ns, int64_t admitted_ns,
                                   const adm_pred *pred)
{
    adm__burst *b = ctx;
    bool changed = false;
    if (b->p.speed_step > 0) {
        adm__speed_update(&b->speed_prefill, b->p.speed_step,
                          (double)ttft_ns > b->p.slo_ttft_ms * 1e6);
        changed = true;
    }
    if (b->p.speed_track > 0 && pred) {
        adm__track_update(&b->track_prefill, b->p.speed_track, (double)(now_ns - admitted_ns) / 1e3,
                          pred->ttft_us);
        changed = true;
    }
    if (changed) adm__burst_rescale(b);
}

static void adm__burst_end(void *ctx, int64_t now_ns, uint32_t n_tokens, int64_t decode_ns,
                           const adm_pred *pred)
{
    adm__burst *b = ctx;
    (void)now_ns;
    if (n_tokens < 2 || decode_ns < 0) return;
    double tpot_ns = (double)decode_ns / (n_tokens - 1);
    bool changed = false;
    if (b->p.speed_step > 0) {
        adm__speed_update(&b->speed_decode, b->p.speed_step, tpot_ns > b->p.slo_tpot_ms * 1e6);
        changed = true;
    }
    if (b->p.speed_track > 0 && pred) {
        adm__track_update(&b->track_decode, b->p.speed_track, tpot_ns / 1e3, pred->tpot_us);
        changed = true;
    }
    if (changed) adm__burst_rescale(b);
}

static void adm__burst_speed(const void *ctx, double *prefill, double *decode)
{
    const adm__burst *b = ctx;
    *prefill = b->fp;
    *decode = b->fd;
}

const adm_ops adm__burst_ops = {
    .name = "burst",
    .create = adm__burst_create,
    .destroy = adm__burst_destroy,
    .decide = adm__burst_decide,
    .recheck = adm__burst_recheck,
    .on_first_token = adm__burst_first_token,
    .on_end = adm__burst_end,
    .speed = adm__burst_speed,
    .uses_remaining = true,
};
