#include "router/admission/adm.h"

#include <stdlib.h>
#include <string.h>

#include "common/err.h"

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
    *out = (adm_decision){.verdict = ADM_ADMIT, .retry_after_s = 0, .reason = "admitted"};
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
        *out = (adm_decision){.verdict = ADM_ADMIT, .retry_after_s = 0, .reason = "admitted"};
        return;
    }
    /* Without a rate estimate, one second is the honest hint. */
    *out = (adm_decision){.verdict = ADM_REJECT,
                          .retry_after_s = 1,
                          .reason = "too many requests in flight (max_outstanding)"};
}

static const adm_ops adm__policies[] = {
    {"none", adm__none_create, adm__none_destroy, adm__none_decide, NULL},
    {"max_outstanding", adm__cap_create, adm__cap_destroy, adm__cap_decide, NULL},
};

const adm_ops *adm_find(const char *name)
{
    if (!name) return NULL;
    for (size_t i = 0; i < sizeof(adm__policies) / sizeof(adm__policies[0]); i++)
        if (strcmp(adm__policies[i].name, name) == 0) return &adm__policies[i];
    return NULL;
}

const char *adm_names(void)
{
    return "none|max_outstanding";
}
