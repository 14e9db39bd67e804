/* The policy table, the parameters' defaults, and the two policies without
 * state worth a file: none and max_outstanding. */
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "router/admission/adm_int.h"

void adm_params_defaults(adm_params *p)
{
    /* SLOs: about 5x the unloaded TTFT of a 200-token prompt and 3x the
     * unloaded decode step of the 15m model on the 2-core host (adm_cost.c);
     * the tuner (tandem-sim tune) replaces these. */
    *p = (adm_params){
        .max_outstanding = 256,
        .bucket_rate = 10.0,
        .bucket_burst = 20.0,
        .queue_max_ms = 500.0,
        .slo_ttft_ms = 250.0,
        .slo_tpot_ms = 15.0,
        .short_window_s = 1.0,
        .long_window_s = 30.0,
        .hold_max_ms = 200.0,
        .hold_max = 64,
        .burst_cv = 1.5,
        .burst_rate_ratio = 1.5,
        .slo_margin = 0.8,
        .speed_step = 0,
        .speed_track = 0,
    };
    adm_cost_defaults(&p->cost);
}

void adm_input_add_prefill(adm_input *in, uint64_t own_tokens, uint64_t own_tokens_at_report,
                           uint64_t queued_tokens)
{
    in->ready_prefill++;
    in->queued_prefill_tokens += adm_fresh_load(own_tokens, queued_tokens, own_tokens_at_report);
}

void adm_input_add_decode(adm_input *in, uint32_t own, uint32_t own_at_report, uint32_t running,
                          uint32_t waiting, uint32_t free_blocks, uint32_t total_blocks)
{
    uint64_t seqs = adm_fresh_load(own, (uint64_t)running + waiting, own_at_report);
    uint32_t w = seqs < waiting ? (uint32_t)seqs : waiting;
    in->ready_decode++;
    in->running_seqs += (uint32_t)(seqs - w);
    in->waiting_seqs += w;
    in->free_kv_blocks += free_blocks;
    in->total_kv_blocks += total_blocks;
}

static int adm__cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

void adm_input_set_remaining(adm_input *in, uint32_t *v, uint32_t n)
{
    if (n) qsort(v, n, sizeof(*v), adm__cmp_u32);
    in->own_remaining = v;
    in->n_own_remaining = n;
}

int adm_remaining_push(adm_remaining *r, uint32_t tokens)
{
    if (r->n == r->cap) {
        if (r->cap > UINT32_MAX / 2) return TD_ENOMEM;
        uint32_t cap = r->cap ? 2 * r->cap : 64;
        uint32_t *v = realloc(r->v, (size_t)cap * sizeof(*v));
        if (!v) return TD_ENOMEM;
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n++] = tokens;
    return 0;
}

void adm_remaining_free(adm_remaining *r)
{
    free(r->v);
    *r = (adm_remaining){0};
}

/* ---- none: admit everything ---- */

static int adm__none_create(const adm_params *p, void **ctx)
{
    (void)p;
    *ctx = NULL;
    return 0;
}

static void adm__none_destroy(void *ctx)
{
    (void)ctx;
}

static void adm__none_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    (void)ctx;
    (void)in;
    adm__admit(out, "admitted");
}

/* ---- max_outstanding: a cap on unfinished admitted requests ---- */

typedef struct adm__cap {
    uint32_t max;
} adm__cap;

static int adm__cap_create(const adm_params *p, void **ctx)
{
    if (!p || p->max_outstanding == 0) return TD_EINVAL;
    adm__cap *c = malloc(sizeof(*c));
    if (!c) return TD_ENOMEM;
    c->max = p->max_outstanding;
    *ctx = c;
    return 0;
}

static void adm__cap_destroy(void *ctx)
{
    free(ctx);
}

static void adm__cap_decide(void *ctx, const adm_input *in, adm_decision *out)
{
    const adm__cap *c = ctx;
    if (in->outstanding < c->max) {
        adm__admit(out, "admitted");
        return;
    }
    /* Without a rate estimate, one second is the honest hint. */
    adm__reject(out, 1, "too many requests in flight (max_outstanding)");
}

static const adm_ops adm__none_ops = {
    .name = "none",
    .create = adm__none_create,
    .destroy = adm__none_destroy,
    .decide = adm__none_decide,
};

static const adm_ops adm__cap_ops = {
    .name = "max_outstanding",
    .create = adm__cap_create,
    .destroy = adm__cap_destroy,
    .decide = adm__cap_decide,
};

/* In adm_names order. */
static const adm_ops *const adm__policies[] = {
    &adm__none_ops,  &adm__cap_ops, &adm__token_bucket_ops, &adm__queue_threshold_ops,
    &adm__burst_ops,
};

const adm_ops *adm_find(const char *name)
{
    if (!name) return NULL;
    for (size_t i = 0; i < sizeof(adm__policies) / sizeof(adm__policies[0]); i++)
        if (strcmp(adm__policies[i]->name, name) == 0) return adm__policies[i];
    return NULL;
}

const char *adm_names(void)
{
    return "none|max_outstanding|token_bucket|queue_threshold|burst";
}
