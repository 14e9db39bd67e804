#include "engine/runtime/eng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "engine/sched/sch.h"

/* A live request. The scheduler knows it as sch req_id = slot index plus a
 * generation in the high bits, so a step's item finds its request in O(1) and
 * a stale id never matches a reused slot. */
typedef struct eng_req {
    bool live;
    uint64_t id; /* caller's */
    uint32_t gen;
    uint32_t n_prompt;
    smp_sampler *smp;
    int smp_finish; /* enum smp_finish of the last accepted token */
    int err;        /* sampling failed this step */
} eng_req;

struct eng {
    eng_config cfg;
    const mdl_model *model;
    kv_layout layout;
    uint64_t fingerprint;
    be_backend *be;
    void *layer_fence; /* the backend's fence during the layer hook, else NULL */
    kvc_pool *pool;
    sch *sched;

    eng_req *reqs; /* [max_seqs] */
    uint32_t *free_reqs;
    uint32_t n_free_reqs;

    /* Step scratch, sized at open: nothing is allocated per step. */
    int32_t *tokens, *pos, *seq; /* [max_num_batched_tokens] */
    const int32_t **tables;      /* [max_num_seqs] */
    int32_t *n_blocks, *out_rows;
    float *logits; /* [max_num_seqs][vocab] */
    eng_item *items;
    sch_result *results;
    eng_event *events;
    int64_t *kv_of_item; /* [max_num_seqs] */
    uint32_t n_events;
    int vocab;
};

static const uint32_t ENG_SLOT_BITS = 32;

void eng_config_defaults(eng_config *c)
{
    memset(c, 0, sizeof(*c));
    c->backend = "cpu";
    c->n_threads = 1;
    c->matmul = BE_MATMUL_DETERMINISTIC;
    c->kv_dtype = KV_DTYPE_F32;
    c->block_size = KVC_DEFAULT_BLOCK_SIZE;
}

/* Fills the derived fields of c (on a copy). */
static int eng__resolve(const mdl_model *m, eng_config *c)
{
    if (!c->backend) c->backend = "cpu";
    if (c->n_threads <= 0) c->n_threads = 1;
    if (c->block_size == 0) c->block_size = KVC_DEFAULT_BLOCK_SIZE;
    if (c->block_size > KVC_MAX_BLOCK_SIZE) return TD_EINVAL;
    if (c->max_num_seqs == 0) c->max_num_seqs = 64;
    if (c->max_num_batched_tokens == 0) c->max_num_batched_tokens = 512;
    if (c->max_num_batched_tokens < c->max_num_seqs) c->max_num_batched_tokens = c->max_num_seqs;
    if (c->max_seqs == 0) c->max_seqs = 4 * c->max_num_seqs;
    if (c->max_seqs < c->max_num_seqs) return TD_EINVAL;
    uint32_t ctx = (uint32_t)m->cfg.max_seq_len;
    if (c->max_model_len == 0 || c->max_model_len > ctx) c->max_model_len = ctx;
    if (c->max_model_len < 2) return TD_EINVAL;
    uint64_t per_seq = (c->max_model_len + c->block_size - 1) / c->block_size;
    if (c->num_blocks == 0) {
        uint64_t want = per_seq * c->max_num_seqs;
        c->num_blocks = (uint32_t)(want > 65536 ? 65536 : want);
    }
    if (c->num_blocks < per_seq) return TD_EINVAL; /* one full-length sequence must fit */
    return 0;
}

int eng_layout_for(const mdl_model *m, const eng_config *c, kv_layout *out)
{
    if (!m || !c || !out) return TD_EINVAL;
    eng_config r = *c;
    int rc = eng__resolve(m, &r);
    if (rc != 0) return rc;
    memset(out, 0, sizeof(*out));
    out->n_layers = (uint32_t)m->cfg.n_layers;
    out->n_kv_heads = (uint32_t)m->cfg.n_kv_heads;
    out->head_dim = (uint32_t)m->cfg.head_dim;
    out->block_size = r.block_size;
    out->num_blocks = r.num_blocks;
    out->dtype = r.kv_dtype;
    return 0;
}

int eng_open(const mdl_model *m, const eng_config *c, eng **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!m || !c) return TD_EINVAL;
    eng *e = calloc(1, sizeof(*e));
    if (!e) return TD_ENOMEM;
    e->cfg = *c;
    e->model = m;
    e->vocab = m->cfg.vocab_size;
    int rc = eng__resolve(m, &e->cfg);
    if (rc != 0) {
        td_err_set(err, errlen,
                   "engine config: max_model_len %u needs more than %u KV blocks of %u",
                   c->max_model_len, c->num_blocks, c->block_size);
        goto fail;
    }
    const eng_config *k = &e->cfg;
    rc = eng_layout_for(m, k, &e->layout);
    if (rc != 0) goto fail;
    e->fingerprint = mdl_fingerprint(m);

    be_options bo;
    be_options_defaults(&bo, m);
    bo.n_threads = k->n_threads;
    bo.matmul = k->matmul;
    bo.max_batch_tokens = (int)k->max_num_batched_tokens;
    bo.max_seqs = (int)k->max_num_seqs;
    bo.kv = e->layout;
    bo.kv_mem = k->kv_mem;
    bo.kv_mem_kind = k->kv_mem_kind;
    bo.device = k->device;
    bo.async_fence = k->async_fence;
    rc = be_open(k->backend, m, &bo, &e->be, err, errlen);
    if (rc != 0) goto fail;
    /* Touch the whole KV pool now: no page faults on the step path later,
     * and a worker's resident memory is its steady size from the start. */
    void *kv_base = NULL;
    size_t kv_bytes = 0;
    be_kv_region(e->be, &kv_base, &kv_bytes);
    if (kv_base && !k->no_prefault && be_kv_mem(e->be) == BE_MEM_HOST)
        memset(kv_base, 0, kv_bytes); /* a device pool is zeroed by its backend */

    kvc_config kc = {.num_blocks = e->layout.num_blocks,
                     .block_size = e->layout.block_size,
                     .max_seqs = k->max_seqs,
                     .enable_prefix_cache = k->prefix_cache,
                     .hash_seed = e->fingerprint};
    rc = kvc_pool_create(&kc, &e->pool);
    if (rc != 0) {
        td_err_set(err, errlen, "KV block pool: %s", td_strerror(rc));
        goto fail;
    }
    sch_config sc = {.max_num_batched_tokens = k->max_num_batched_tokens,
                     .max_num_seqs = k->max_num_seqs,
                     .max_chunk_tokens = k->max_chunk_tokens,
                     .max_seqs = k->max_seqs,
                     .max_model_len = k->max_model_len,
                     .prefill_only = k->prefill_only,
                     .hold_kv_on_finish = k->prefill_only,
                     .check_kv = k->check_kv};
    rc = sch_create(&sc, e->pool, &e->sched);
    if (rc != 0) {
        td_err_set(err, errlen, "scheduler: %s", td_strerror(rc));
        goto fail;
    }

    size_t nt = k->max_num_batched_tokens, ns = k->max_num_seqs;
    e->reqs = calloc(k->max_seqs, sizeof(*e->reqs));
    e->free_reqs = malloc(k->max_seqs * sizeof(*e->free_reqs));
    e->tokens = malloc(nt * sizeof(int32_t));
    e->pos = malloc(nt * sizeof(int32_t));
    e->seq = malloc(nt * sizeof(int32_t));
    e->tables = malloc(ns * sizeof(*e->tables));
    e->n_blocks = malloc(ns * sizeof(int32_t));
    e->out_rows = malloc(ns * sizeof(int32_t));
    e->logits = malloc(ns * (size_t)e->vocab * sizeof(float));
    e->items = malloc(ns * sizeof(*e->items));
    e->results = malloc(ns * sizeof(*e->results));
    e->events = malloc(ns * sizeof(*e->events));
    e->kv_of_item = malloc(ns * sizeof(int64_t));
    if (!e->reqs || !e->free_reqs || !e->tokens || !e->pos || !e->seq || !e->tables ||
        !e->n_blocks || !e->out_rows || !e->logits || !e->items || !e->results || !e->events ||
        !e->kv_of_item) {
        rc = TD_ENOMEM;
        td_err_set(err, errlen, "engine scratch: out of memory");
        goto fail;
    }
    for (uint32_t i = 0; i < k->max_seqs; i++)
        e->free_reqs[e->n_free_reqs++] = k->max_seqs - 1 - i;
    *out = e;
    return 0;
fail:
    eng_close(e);
    return rc;
}

void eng_close(eng *e)
{
    if (!e) return;
    if (e->reqs)
        for (uint32_t i = 0; i < e->cfg.max_seqs; i++)
            smp_free(e->reqs[i].smp);
    sch_free(e->sched);
    kvc_pool_free(e->pool);
    be_close(e->be);
    free(e->reqs);
    free(e->free_reqs);
    free(e->tokens);
    free(e->pos);
    free(e->seq);
    free(e->tables);
    free(e->n_blocks);
    free(e->out_rows);
    free(e->logits);
    free(e->items);
    free(e->results);
    free(e->events);
    free(e->kv_of_item);
    free(e);
}

static uint64_t eng__sch_id(const eng *e, uint32_t slot)
{
    return ((uint64_t)e->reqs[slot].gen << ENG_SLOT_BITS) | slot;
}

static eng_req *eng__from_sch(eng *e, uint64_t sch_id)
{
    uint32_t slot = (uint32_t)(sch_id & 0xffffffffu);
    if (slot >= e->cfg.max_seqs) return NULL;
    eng_req *q = &e->reqs[slot];
    if (!q->live || q->gen != (uint32_t)(sch_id >> ENG_SLOT_BITS)) return NULL;
    return q;
}

static int eng__find(const eng *e, uint64_t id, uint32_t *slot)
{
    for (uint32_t i = 0; i < e->cfg.max_seqs; i++)
        if (e->reqs[i].live && e->reqs[i].id == id) {
            *slot = i;
            return 0;
        }
    return TD_ENOENT;
}

static void eng__release(eng *e, eng_req *q)
{
    smp_free(q->smp);
    q->smp = NULL;
    q->live = false;
    e->free_reqs[e->n_free_reqs++] = (uint32_t)(q - e->reqs);
}

/* Validates r and takes a slot with its sampler. */
static int eng__new_req(eng *e, const eng_request *r, uint32_t *slot_out)
{
    if (!r || !r->prompt || r->n_prompt == 0 || r->max_tokens == 0) return TD_EINVAL;
    for (uint32_t i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= e->vocab) return TD_EINVAL;
    if (r->n_prompt >= e->cfg.max_model_len) return TD_ETOOLONG;
    uint32_t dummy;
    if (eng__find(e, r->id, &dummy) == 0) return TD_EEXIST;
    if (e->n_free_reqs == 0) return TD_ENOSPC;
    uint32_t max_tokens = r->max_tokens;
    if (max_tokens > e->cfg.max_model_len - r->n_prompt)
        max_tokens = e->cfg.max_model_len - r->n_prompt;
    smp_params sp = r->sampling;
    sp.max_tokens = (int)max_tokens;
    smp_sampler *smp = NULL;
    int rc = smp_create(&sp, e->vocab, &smp);
    if (rc != 0) return rc;
    uint32_t slot = e->free_reqs[--e->n_free_reqs];
    eng_req *q = &e->reqs[slot];
    q->live = true;
    q->id = r->id;
    q->gen++;
    q->n_prompt = r->n_prompt;
    q->smp = smp;
    q->smp_finish = SMP_CONTINUE;
    q->err = 0;
    *slot_out = slot;
    return 0;
}

static sch_request eng__sch_req(const eng *e, uint32_t slot, const eng_request *r)
{
    uint32_t max_tokens = r->max_tokens;
    if (max_tokens > e->cfg.max_model_len - r->n_prompt)
        max_tokens = e->cfg.max_model_len - r->n_prompt;
    sch_request sr = {.req_id = eng__sch_id(e, slot),
                      .prompt = r->prompt,
                      .n_prompt = r->n_prompt,
                      .max_new_tokens = max_tokens,
                      .priority = r->priority};
    return sr;
}

int eng_add(eng *e, const eng_request *r)
{
    if (!e) return TD_EINVAL;
    uint32_t slot;
    int rc = eng__new_req(e, r, &slot);
    if (rc != 0) return rc;
    sch_request sr = eng__sch_req(e, slot, r);
    rc = sch_add(e->sched, &sr);
    if (rc != 0) eng__release(e, &e->reqs[slot]);
    return rc;
}

int eng_add_prefilled(eng *e, const eng_request *r, int64_t kv_seq, int32_t first_token, int *done)
{
    if (!e || !done) return TD_EINVAL;
    *done = ENG_FINISH_NONE;
    if (first_token < 0 || first_token >= e->vocab) return TD_EINVAL;
    uint32_t slot;
    int rc = eng__new_req(e, r, &slot);
    if (rc != 0) return rc;
    eng_req *q = &e->reqs[slot];
    enum smp_finish f = smp_accept(q->smp, first_token);
    if (f != SMP_CONTINUE || r->n_prompt + 1 >= e->cfg.max_model_len) {
        *done = f == SMP_STOP_EOS || f == SMP_STOP_TOKEN ? ENG_FINISH_STOP : ENG_FINISH_LENGTH;
        eng__release(e, q);
        return 0;
    }
    sch_request sr = eng__sch_req(e, slot, r);
    rc = sch_add_prefilled(e->sched, &sr, kv_seq, first_token);
    if (rc != 0) eng__release(e, q);
    return rc;
}

int eng_abort(eng *e, uint64_t id)
{
    uint32_t slot;
    if (!e || eng__find(e, id, &slot) != 0) return TD_ENOENT;
    int rc = sch_abort(e->sched, eng__sch_id(e, slot));
    eng__release(e, &e->reqs[slot]);
    return rc;
}

int eng_detach(eng *e, uint64_t id, int64_t *kv_seq)
{
    uint32_t slot;
    if (!e || !kv_seq) return TD_EINVAL;
    *kv_seq = -1;
    if (eng__find(e, id, &slot) != 0) return TD_ENOENT;
    int rc = sch_detach(e->sched, eng__sch_id(e, slot), kv_seq);
    if (rc != 0) return rc;
    eng__release(e, &e->reqs[slot]);
    return 0;
}

typedef struct eng_hook {
    eng *e;
    uint32_t n_items;
} eng_hook;

static int eng__on_layer(void *arg, int layer, void *fence)
{
    eng_hook *h = arg;
    h->e->layer_fence = fence;
    int rc = h->e->cfg.on_layer(h->e->cfg.on_layer_arg, h->e->items, h->n_items, layer);
    h->e->layer_fence = NULL;
    return rc;
}

void *eng_layer_fence(const eng *e)
{
    return e->layer_fence;
}

static int eng__finish_of(const eng *e, enum sch_finish r, const eng_req *q)
{
    if (q->err) return ENG_FINISH_ERROR;
    /* A prefill worker's request ends after its first token whatever that
     * token is; the decode side finds out from it whether more follow. */
    if (e->cfg.prefill_only && r != SCH_FINISH_NONE) return ENG_FINISH_PREFILLED;
    switch (r) {
    case SCH_FINISH_PREFILLED:
        return ENG_FINISH_PREFILLED;
    case SCH_FINISH_LENGTH:
        return ENG_FINISH_LENGTH;
    case SCH_FINISH_STOP:
        return q->smp_finish == SMP_STOP_LENGTH ? ENG_FINISH_LENGTH : ENG_FINISH_STOP;
    default:
        return ENG_FINISH_NONE;
    }
}

int eng_step(eng *e, const eng_event **evs, uint32_t *n_evs, eng_step_stats *stats)
{
    *evs = e->events;
    *n_evs = 0;
    e->n_events = 0;
    if (stats) memset(stats, 0, sizeof(*stats));
    sch_step st;
    int rc = sch_schedule(e->sched, &st);
    if (rc != 0) return rc;
    if (st.n_items == 0) return TD_EAGAIN;
    int32_t n_out = 0;
    rc = sch_step_flatten(e->sched, &st, e->tokens, e->pos, e->seq, e->tables, e->n_blocks,
                          e->out_rows, &n_out);
    if (rc != 0) return rc;
    for (uint32_t i = 0; i < st.n_items; i++) {
        const sch_item *it = &st.items[i];
        eng_req *q = eng__from_sch(e, it->req_id);
        if (!q) return TD_EINTERNAL;
        e->items[i] = (eng_item){.id = q->id,
                                 .start = it->start,
                                 .n = it->n,
                                 .n_prompt = q->n_prompt,
                                 .table = e->tables[i],
                                 .n_blocks = (uint32_t)e->n_blocks[i]};
    }
    eng_hook hook = {.e = e, .n_items = st.n_items};
    be_batch b = {.n_tokens = (int)st.n_tokens,
                  .tokens = e->tokens,
                  .pos = e->pos,
                  .seq = e->seq,
                  .n_seqs = (int)st.n_items,
                  .block_tables = e->tables,
                  .n_blocks = e->n_blocks,
                  .n_out = n_out,
                  .out_rows = e->out_rows,
                  .logits = e->logits,
                  .on_layer_done = e->cfg.on_layer ? eng__on_layer : NULL,
                  .on_layer_done_arg = &hook};
    int64_t t0 = td_now_ns();
    int frc = be_forward(e->be, &b);
    int64_t fwd_ns = td_now_ns() - t0;
    if (frc != 0)
        td_log_error("eng", "forward_failed", "items=%u tokens=%u err=%s", st.n_items, st.n_tokens,
                     td_err_name(frc));

    if (frc != 0) {
        /* Nothing of this step may reach the prefix cache or a stream: abort
         * every item before the update (the scheduler then frees their blocks
         * instead of committing them) and report each as failed. */
        for (uint32_t i = 0; i < st.n_items; i++) {
            eng_req *q = eng__from_sch(e, st.items[i].req_id);
            (void)sch_abort(e->sched, st.items[i].req_id);
            if (!q) continue;
            e->results[i] = (sch_result){0};
            e->events[e->n_events++] = (eng_event){
                .id = q->id, .token = -1, .finish = ENG_FINISH_ERROR, .err = frc, .kv_seq = -1};
            eng__release(e, q);
        }
        rc = sch_update(e->sched, e->results, st.n_items, NULL, NULL);
        if (rc != 0) return rc;
        *n_evs = e->n_events;
        return 0;
    }

    /* Draw one token per sampled item. A draw that fails (logits all NaN)
     * stops that request with an error; the others go on. */
    int row = 0;
    for (uint32_t i = 0; i < st.n_items; i++) {
        const sch_item *it = &st.items[i];
        e->results[i] = (sch_result){.token = 0, .stop = false};
        if (!it->sample) continue;
        eng_req *q = eng__from_sch(e, it->req_id);
        float *lg = e->logits + (size_t)row++ * (size_t)e->vocab;
        if (e->cfg.on_logits) e->cfg.on_logits(e->cfg.on_logits_arg, q->id, lg, e->vocab);
        int32_t tok = -1;
        int src = smp_sample(q->smp, lg, &tok);
        if (src != 0) {
            q->err = src;
            td_log_error("eng", "sample_failed",
                         "id=%llu generated=%d err=%s reason=\"logits are NaN\"",
                         (unsigned long long)q->id, smp_generated(q->smp), td_err_name(src));
            e->results[i].stop = true;
            continue;
        }
        q->smp_finish = smp_accept(q->smp, tok);
        e->results[i].token = tok;
        e->results[i].stop = q->smp_finish != SMP_CONTINUE;
    }
    const sch_finished *fin = NULL;
    uint32_t n_fin = 0;
    rc = sch_update(e->sched, e->results, st.n_items, &fin, &n_fin);
    if (rc != 0) return rc;

    for (uint32_t i = 0; i < st.n_items; i++) {
        const sch_item *it = &st.items[i];
        if (!it->sample) continue;
        eng_req *q = eng__from_sch(e, it->req_id);
        int finish = ENG_FINISH_NONE;
        int64_t kv = -1;
        uint32_t npre = 0;
        for (uint32_t f = 0; f < n_fin; f++)
            if (fin[f].req_id == it->req_id) {
                finish = eng__finish_of(e, fin[f].reason, q);
                kv = fin[f].kv_seq;
                npre = fin[f].n_preemptions;
            }
        e->events[e->n_events++] = (eng_event){.id = q->id,
                                               .token = q->err ? -1 : e->results[i].token,
                                               .finish = finish,
                                               .err = q->err,
                                               .n_preemptions = npre,
                                               .kv_seq = kv};
        if (finish != ENG_FINISH_NONE) eng__release(e, q);
    }
    if (stats) {
        stats->n_items = st.n_items;
        stats->n_tokens = st.n_tokens;
        stats->n_prefill_tokens = st.n_prefill_tokens;
        stats->n_decode_tokens = st.n_decode_tokens;
        stats->n_preempted = st.n_preempted;
        for (uint32_t i = 0; i < st.n_items; i++)
            stats->n_ctx_tokens += (uint64_t)st.items[i].start + st.items[i].n;
        stats->forward_ns = fwd_ns;
    }
    *n_evs = e->n_events;
    return 0;
}

kvc_pool *eng_kvc(eng *e)
{
    return e->pool;
}

const kv_layout *eng_layout(const eng *e)
{
    return &e->layout;
}

void *eng_kv_base(eng *e)
{
    void *base = NULL;
    size_t bytes = 0;
    be_kv_region(e->be, &base, &bytes);
    return base;
}

const mdl_model *eng_model(const eng *e)
{
    return e->model;
}

uint32_t eng_max_model_len(const eng *e)
{
    return e->cfg.max_model_len;
}

uint64_t eng_fingerprint(const eng *e)
{
    return e->fingerprint;
}

void eng_stats_get(const eng *e, eng_stats *out)
{
    sch_stats ss;
    sch_stats_get(e->sched, &ss);
    memset(out, 0, sizeof(*out));
    out->running = ss.n_running;
    out->waiting = ss.n_waiting;
    out->queued_prefill_tokens = ss.queued_prefill_tokens;
    out->preemptions = ss.preemptions;
    out->steps = ss.steps;
    kvc_stats_get(e->pool, &out->kv);
}
