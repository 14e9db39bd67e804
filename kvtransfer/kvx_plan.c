/* kvx_plan: see kvx_plan.h. */
#include "kvtransfer/kvx_plan.h"

#include <stdlib.h>
#include <string.h>

#include "common/err.h"

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_pair_dst(const void *a, const void *b)
{
    const kvx_pair *x = a, *y = b;
    return x->dst < y->dst ? -1 : x->dst > y->dst;
}

int kvx_plan_build(const uint32_t *reg, int n_reg, const kvx_pair *pairs, int n_pairs,
                   uint32_t num_src, uint32_t num_dst, kvx_plan_op *ops)
{
    if (n_reg < 0 || n_pairs < 0 || (n_reg > 0 && !reg) || (n_pairs > 0 && (!pairs || !ops)))
        return TD_EINVAL;
    if (n_pairs == 0) return 0;
    int rc = TD_ENOMEM;
    uint32_t *sreg = malloc(sizeof(*sreg) * (size_t)(n_reg > 0 ? n_reg : 1));
    kvx_pair *sp = malloc(sizeof(*sp) * (size_t)n_pairs);
    if (!sreg || !sp) goto out;
    memcpy(sreg, reg, sizeof(*sreg) * (size_t)n_reg);
    memcpy(sp, pairs, sizeof(*sp) * (size_t)n_pairs);
    qsort(sreg, (size_t)n_reg, sizeof(*sreg), cmp_u32);
    qsort(sp, (size_t)n_pairs, sizeof(*sp), cmp_pair_dst);
    rc = TD_EINVAL;
    for (int i = 0; i < n_pairs; i++) {
        if (sp[i].src >= num_src || sp[i].dst >= num_dst) goto out;
        if (i > 0 && sp[i].dst == sp[i - 1].dst) goto out;
        if (!bsearch(&sp[i].dst, sreg, (size_t)n_reg, sizeof(*sreg), cmp_u32)) goto out;
    }
    int n_ops = 0;
    for (int i = 0; i < n_pairs; i++) {
        kvx_plan_op *last = n_ops > 0 ? &ops[n_ops - 1] : NULL;
        if (last && sp[i].dst == last->dst + last->count && sp[i].src == last->src + last->count) {
            last->count++;
        } else {
            ops[n_ops].src = sp[i].src;
            ops[n_ops].dst = sp[i].dst;
            ops[n_ops].count = 1;
            n_ops++;
        }
    }
    rc = n_ops;
out:
    free(sreg);
    free(sp);
    return rc;
}
