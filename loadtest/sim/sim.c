/* sim: the event loop, the simulated workers and the simulated router.
 *
 * One request's path (docs/workers.md, decode/dc_engine.c, prefill/pf_engine.c):
 *
 *   arrival      router: admission decides (429 or admit), dispatch picks a
 *                decode and a prefill worker (least_loaded score over the
 *                last heartbeats plus the router's own in-flight counts)
 *   QUEUED       decode worker's FIFO until kvc_seq_alloc finds blocks for
 *                the prompt (with one block per running sequence in reserve)
 *   PREFILL      prefill worker's sch (prefill_only, hold_kv_on_finish):
 *                chunked and batched steps until the prompt is computed
 *   transfer     transfer_us_fixed + transfer_us_per_block per prompt block, then the prefill
 *                worker frees its held blocks
 *   join         at the decode worker's next step boundary: kvc_seq_commit,
 *                sch_add_prefilled; the first token reaches the client (TTFT)
 *   RUNNING      decode steps, one token per step per sequence, until the
 *                trace's output length; the router's outstanding count drops
 *
 * A worker runs one step at a time: what arrives while it computes (new
 * requests, landed transfers) is taken at the step's end, as the engine
 * threads do between steps.
 */
#include "loadtest/sim/sim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "engine/kvcache/kvc.h"
#include "engine/sched/sch.h"

enum { SIM__PREFILL = 0, SIM__DECODE = 1 };
enum { SIM__EV_STEP_END = 1, SIM__EV_XFER_DONE = 2, SIM__EV_HOLD_DEADLINE = 3, SIM__EV_RETRY = 4 };

typedef struct sim__ev {
    int64_t t;    /* ns */
    uint64_t seq; /* insertion order: ties at equal t run FIFO */
    uint32_t type;
    uint32_t arg; /* worker index (STEP_END) or request index (the others) */
} sim__ev;

typedef struct sim__heap {
    sim__ev *v;
    size_t n, cap;
    uint64_t next_seq;
} sim__heap;

/* A FIFO of request indexes linked through sim__req.next. */
typedef struct sim__fifo {
    int64_t head, tail; /* -1 when empty */
    uint32_t len;
} sim__fifo;

typedef struct sim__worker {
    int role;
    kvc_pool *pool;
    sch *s;
    int busy;                 /* a step is in flight */
    uint32_t inflight;        /* the router's requests on it (rt_worker.inflight) */
    uint64_t inflight_tokens; /* prefill: their prompt tokens */
    /* The last heartbeat's load report (wrk_load), and inflight /
     * inflight_tokens when it came (adm_fresh_load). */
    uint64_t hb_queued_prefill;
    uint32_t hb_running, hb_waiting, hb_free, hb_total;
    uint32_t inflight_at_hb;
    uint64_t inflight_tokens_at_hb;
    sim__fifo queue;  /* decode: waiting for destination blocks */
    sim__fifo landed; /* decode: transfer done, to join at the next boundary */
    sim__fifo inbox;  /* prefill: Prefill.Run calls to add to sch */
    sch_step step;    /* the step in flight (busy) */
} sim__worker;

typedef struct sim__req {
    int64_t next;         /* FIFO link */
    int64_t hprev, hnext; /* hold-queue links (-1: none) */
    int64_t kv_dst;       /* decode worker's destination sequence */
    int64_t kv_src;       /* prefill worker's held sequence */
    int64_t hold_until;   /* ns; the deadline decide gave (while held) */
    int64_t arrive_ns;    /* this attempt reached the router (a retry is a new request) */
    int64_t admit_ns;     /* the policy admitted it (rt_req t_admit) */
    adm_pred pred;        /* what the admitting decision predicted (rt_req adm_pred) */
    uint32_t dec, pre;
    uint32_t n_prompt, n_out;
    uint32_t admitted_slot;  /* its index in sim__ctx.admitted while admitted */
    uint8_t held;            /* in the hold queue (rt_req RT_R_HELD) */
    uint8_t prefill_counted; /* its prompt is in inflight_prefill_tokens */
} sim__req;

typedef struct sim__ctx {
    const sim_config *cfg;
    const lt_req *reqs;
    size_t n;
    lt_record *recs;
    sim__req *rq;
    sim__worker *w; /* n_prefill prefill workers, then n_decode decode workers */
    uint32_t nw;
    uint32_t rr_prefill, rr_decode;
    uint32_t outstanding;
    /* The admitted, unfinished requests (the router's live requests with a
     * decode stream), unordered, and scratch for adm_input.own_remaining. */
    uint32_t *admitted, *remaining;
    uint32_t n_admitted;
    /* The router's hold queue (rt_ctx held_head / held_tail / n_held) and its
     * own count of admitted prompt tokens without a first token. */
    int64_t held_head, held_tail;
    uint32_t n_held;
    int pass_due; /* a request ended: recheck the held ones after this event */
    uint64_t inflight_prefill_tokens;
    uint64_t inflight_prefill_pairs;
    const adm_ops *adm;
    void *adm_ctx;
    sim__heap heap;
    int32_t *zeros;      /* max_model_len token ids (content does not matter) */
    sch_result *results; /* one per item of the largest step */
    uint32_t results_cap;
    int64_t now;
    /* The host's speed (cost.host_slow_*): slow or not until host_switch_ns,
     * stretches drawn from rng as simulated time passes. */
    int host_slow;
    int64_t host_switch_ns;
    uint64_t rng;
    sim_stats stats;
    int err;
    char *errbuf;
    size_t errlen;
} sim__ctx;

/* ---- cost ---- */

double sim_step_us(const adm_cost *c, const struct sch_step *step)
{
    double us = 0, ctx = 0, pairs = 0;
    uint32_t n_dec = 0;
    for (uint32_t i = 0; i < step->n_items; i++) {
        const sch_item *it = &step->items[i];
        if (it->prefill) {
            /* token j of the chunk (position start + j) attends over start + j + 1 */
            pairs += (double)it->n * it->start + (double)it->n * (it->n + 1) / 2;
            continue;
        }
        n_dec++;
        ctx += (double)it->start + it->n; /* positions the new token attends over */
    }
    if (step->n_prefill_tokens > 0)
        us += c->prefill_us_fixed + c->prefill_us_per_token * step->n_prefill_tokens +
              c->prefill_us_per_token_ctx * pairs;
    if (n_dec > 0)
        us += c->decode_step_us_fixed + c->decode_step_us_per_seq * n_dec +
              c->decode_step_us_per_ctx_token * ctx;
    return us;
}

/* ---- the host's two speeds (adm_cost host_slow_*) ---- */

static int sim__host_model(const adm_cost *c)
{
    return c->host_slow_share > 0 && c->host_slow_factor > 0;
}

/* splitmix64: a uniform double in [0, 1). */
static double sim__uniform(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

/* The length of a stretch in the current state: exponential, with the slow
 * stretches' mean, or the fast ones' that gives the slow share. */
static int64_t sim__host_stretch_ns(sim__ctx *c)
{
    const adm_cost *k = &c->cfg->cost;
    double mean_us = c->host_slow
                         ? k->host_slow_mean_us
                         : k->host_slow_mean_us * (1 - k->host_slow_share) / k->host_slow_share;
    double ns = -log(1 - sim__uniform(&c->rng)) * mean_us * 1000.0;
    if (ns > 1e17) ns = 1e17; /* three years: never, for a simulation */
    return ns < 1 ? 1 : (int64_t)ns;
}

/* The factor on a step that starts now: the stretches up to now are drawn
 * first, in time order, so a run's stretches depend on the seed alone. */
static double sim__host_factor(sim__ctx *c)
{
    if (!sim__host_model(&c->cfg->cost)) return 1;
    while (c->now >= c->host_switch_ns) {
        c->host_slow = !c->host_slow;
        c->host_switch_ns += sim__host_stretch_ns(c);
    }
    return c->host_slow ? c->cfg->cost.host_slow_factor : 1;
}

/* ---- event heap (binary, min on (t, seq)) ---- */

static int sim__ev_less(const sim__ev *a, const sim__ev *b)
{
    return a->t < b->t || (a->t == b->t && a->seq < b->seq);
}

static int sim__push(sim__ctx *c, int64_t t, uint32_t type, uint32_t arg)
{
    sim__heap *h = &c->heap;
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 256;
        sim__ev *v = realloc(h->v, cap * sizeof(*v));
        if (!v) return TD_ENOMEM;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    sim__ev e = {.t = t, .seq = h->next_seq++, .type = type, .arg = arg};
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!sim__ev_less(&e, &h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = e;
    return 0;
}

static sim__ev sim__pop(sim__heap *h)
{
    sim__ev top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const sim__ev *best = &last;
        if (l < h->n && sim__ev_less(&h->v[l], best)) {
            m = l;
            best = &h->v[l];
        }
        if (l + 1 < h->n && sim__ev_less(&h->v[l + 1], best)) m = l + 1;
        if (m == i) break;
        h->v[i] = h->v[m];
        i = m;
    }
    if (h->n > 0) h->v[i] = last;
    return top;
}

/* ---- FIFOs ---- */

static void sim__fifo_init(sim__fifo *f)
{
    f->head = f->tail = -1;
    f->len = 0;
}

static void sim__fifo_push(sim__ctx *c, sim__fifo *f, int64_t i)
{
    c->rq[i].next = -1;
    if (f->tail >= 0)
        c->rq[f->tail].next = i;
    else
        f->head = i;
    f->tail = i;
    f->len++;
}

static int64_t sim__fifo_pop(sim__ctx *c, sim__fifo *f)
{
    int64_t i = f->head;
    if (i < 0) return -1;
    f->head = c->rq[i].next;
    if (f->head < 0) f->tail = -1;
    f->len--;
    return i;
}

/* ---- records ---- */

static void sim__fail(sim__ctx *c, int rc, const char *what)
{
    if (c->err) return;
    c->err = rc;
    if (c->errbuf) snprintf(c->errbuf, c->errlen, "%s: %s", what, td_strerror(rc));
}

static void sim__chunk(sim__ctx *c, size_t i)
{
    lt_record *r = &c->recs[i];
    int64_t t = c->now - r->send_ns;
    if (r->n_chunks == 0) r->ttft_ns = t;
    if (r->n_chunks < r->chunk_cap) r->chunk_ns[r->n_chunks] = t;
    r->n_chunks++;
}

/* rt__prefill_done: the router stops counting the prompt as in flight. */
static void sim__prefill_done(sim__ctx *c, size_t i)
{
    sim__req *q = &c->rq[i];
    if (!q->prefill_counted) return;
    c->inflight_prefill_tokens -= q->n_prompt;
    c->inflight_prefill_pairs -= adm_prefill_pairs(q->n_prompt);
    q->prefill_counted = 0;
}

/* The request is complete at c->now: the router forgets it (rt__end). */
static void sim__complete(sim__ctx *c, size_t i)
{
    lt_record *r = &c->recs[i];
    sim__req *q = &c->rq[i];
    r->e2e_ns = c->now - r->send_ns;
    r->output_tokens = r->n_chunks;
    r->http_status = 200;
    r->outcome = LT_OK;
    sim__worker *d = &c->w[q->dec];
    if (d->inflight) d->inflight--;
    uint32_t last = c->admitted[--c->n_admitted]; /* swap-remove */
    c->admitted[q->admitted_slot] = last;
    c->rq[last].admitted_slot = q->admitted_slot;
    sim__prefill_done(c, i);
    if (c->outstanding) c->outstanding--;
    if (c->adm->on_end)
        c->adm->on_end(c->adm_ctx, c->now, (uint32_t)r->n_chunks, r->e2e_ns - r->ttft_ns, &q->pred);
    /* The router rechecks the hold queue from a 0 ms timer, after the
     * current callback: here, after the current event. */
    if (c->n_held) c->pass_due = 1;
}

/* ---- workers ---- */

static int sim__worker_run(sim__ctx *c, uint32_t wi);

/* PREFILL -> RUNNING on a decode worker (dc__join): the KV landed. */
static void sim__join(sim__ctx *c, sim__worker *w, size_t i)
{
    sim__req *q = &c->rq[i];
    int rc = kvc_seq_commit(w->pool, q->kv_dst, c->zeros, q->n_prompt);
    if (rc != 0) {
        sim__fail(c, rc, "decode: commit of landed KV");
        return;
    }
    sim__chunk(c, i); /* the prefill's token reaches the client */
    sim__worker *p = &c->w[q->pre];
    if (p->inflight) p->inflight--; /* the router drops it at the first token */
    p->inflight_tokens = p->inflight_tokens > q->n_prompt ? p->inflight_tokens - q->n_prompt : 0;
    sim__prefill_done(c, i);
    if (c->adm->on_first_token)
        /* From this attempt's arrival, as the router's t_arrival: the
         * client's earlier 429s are not this request's time. */
        c->adm->on_first_token(c->adm_ctx, c->now, c->now - q->arrive_ns, q->admit_ns, &q->pred);
    if (q->n_out <= 1) {
        (void)kvc_seq_free(w->pool, q->kv_dst);
        q->kv_dst = -1;
        sim__complete(c, i);
        return;
    }
    sch_request sr = {.req_id = i,
                      .prompt = c->zeros,
                      .n_prompt = q->n_prompt,
                      .max_new_tokens = q->n_out,
                      .priority = 0};
    rc = sch_add_prefilled(w->s, &sr, q->kv_dst, 0);
    if (rc != 0) {
        sim__fail(c, rc, "decode: sch_add_prefilled");
        return;
    }
    q->kv_dst = -1; /* the scheduler owns it */
}

/* QUEUED -> PREFILL for the head of the decode queue while blocks last (dc__admit). */
static int sim__admit(sim__ctx *c, sim__worker *w)
{
    while (w->queue.head >= 0) {
        size_t i = (size_t)w->queue.head;
        sim__req *q = &c->rq[i];
        sch_stats ss;
        sch_stats_get(w->s, &ss);
        uint32_t need = kvc_blocks_for(w->pool, q->n_prompt);
        if (kvc_available_blocks(w->pool) < need + ss.n_running) break;
        kvc_seq_spec spec = {.tokens = c->zeros, .n_prompt = q->n_prompt, .n_slots = q->n_prompt};
        int rc = kvc_seq_alloc(w->pool, &spec, &q->kv_dst, NULL);
        if (rc == TD_ENOSPC) break;
        if (rc != 0) {
            sim__fail(c, rc, "decode: kvc_seq_alloc");
            return rc;
        }
        (void)sim__fifo_pop(c, &w->queue);
        sim__fifo_push(c, &c->w[q->pre].inbox, (int64_t)i);
        rc = sim__worker_run(c, q->pre);
        if (rc) return rc;
    }
    return 0;
}

/* A step of a worker with this role starts now: is a worker of the other
 * role mid-step? (adm_cost's co-location factors; the step is charged by
 * the state at its start.) */
static bool sim__other_role_busy(const sim__ctx *c, int role)
{
    for (uint32_t k = 0; k < c->nw; k++)
        if (c->w[k].role != role && c->w[k].busy) return true;
    return false;
}

/* Takes what arrived between steps, then starts the next step if any. */
static int sim__worker_run(sim__ctx *c, uint32_t wi)
{
    sim__worker *w = &c->w[wi];
    if (w->busy || c->err) return c->err;
    int rc;
    if (w->role == SIM__DECODE) {
        int64_t i;
        while ((i = sim__fifo_pop(c, &w->landed)) >= 0 && !c->err)
            sim__join(c, w, (size_t)i);
        if (c->err) return c->err;
        if ((rc = sim__admit(c, w)) != 0) return rc;
    } else {
        while (w->inbox.head >= 0) {
            size_t i = (size_t)w->inbox.head;
            sim__req *q = &c->rq[i];
            sch_request sr = {.req_id = i,
                              .prompt = c->zeros,
                              .n_prompt = q->n_prompt,
                              .max_new_tokens = 1,
                              .priority = 0};
            rc = sch_add(w->s, &sr);
            if (rc == TD_ENOSPC) break; /* max_seqs known: the rest waits in the inbox */
            if (rc != 0) {
                sim__fail(c, rc, "prefill: sch_add");
                return rc;
            }
            (void)sim__fifo_pop(c, &w->inbox);
        }
    }
    sch_step *step = &w->step;
    rc = sch_schedule(w->s, step);
    if (rc != 0) {
        sim__fail(c, rc, "sch_schedule");
        return rc;
    }
    if (step->n_items == 0) return 0;
    c->stats.preemptions += step->n_preempted;
    if (w->role == SIM__DECODE)
        c->stats.steps_decode++;
    else
        c->stats.steps_prefill++;
    const adm_cost *cost = &c->cfg->cost;
    double us = sim_step_us(cost, step);
    if (sim__other_role_busy(c, w->role))
        us *= 1 + (w->role == SIM__DECODE ? cost->decode_extra_when_prefilling
                                          : cost->prefill_extra_when_decoding);
    us *= sim__host_factor(c);
    int64_t dt = (int64_t)llround(us * 1000.0);
    if (dt < 1) dt = 1; /* time always moves on */
    w->busy = 1;
    return sim__push(c, c->now + dt, SIM__EV_STEP_END, wi);
}

static int sim__step_end(sim__ctx *c, uint32_t wi)
{
    sim__worker *w = &c->w[wi];
    const sch_step *st = &w->step;
    w->busy = 0;
    if (st->n_items > c->results_cap) {
        uint32_t cap = st->n_items * 2;
        sch_result *r = realloc(c->results, cap * sizeof(*r));
        if (!r) return TD_ENOMEM;
        c->results = r;
        c->results_cap = cap;
    }
    for (uint32_t k = 0; k < st->n_items; k++) {
        c->results[k] = (sch_result){.token = 0, .stop = false}; /* ignore_eos: length ends it */
        /* A decode worker streams every sampled token at the step's end. */
        if (w->role == SIM__DECODE && st->items[k].sample) sim__chunk(c, st->items[k].req_id);
    }
    const sch_finished *fin = NULL;
    uint32_t nfin = 0;
    int rc = sch_update(w->s, c->results, st->n_items, &fin, &nfin);
    if (rc != 0) {
        sim__fail(c, rc, "sch_update");
        return rc;
    }
    if (c->cfg->check_kv && (rc = kvc_check(w->pool)) != 0) {
        sim__fail(c, rc, "kvc_check");
        return rc;
    }
    for (uint32_t k = 0; k < nfin; k++) {
        size_t i = (size_t)fin[k].req_id;
        if (w->role == SIM__DECODE) {
            sim__complete(c, i);
            continue;
        }
        /* Prefill done, blocks held until the transfer ends (pf_engine). */
        sim__req *q = &c->rq[i];
        q->kv_src = fin[k].kv_seq;
        double us = c->cfg->cost.transfer_us_fixed +
                    c->cfg->cost.transfer_us_per_block * kvc_blocks_for(w->pool, q->n_prompt);
        if ((rc = sim__push(c, c->now + (int64_t)llround(us * 1000.0), SIM__EV_XFER_DONE,
                            (uint32_t)i)) != 0)
            return rc;
    }
    return sim__worker_run(c, wi);
}

/* kvx DONE: the prefill worker frees its blocks, the decode worker joins the
 * request at its next step boundary. */
static int sim__xfer_done(sim__ctx *c, size_t i)
{
    sim__req *q = &c->rq[i];
    sim__worker *p = &c->w[q->pre];
    int rc = kvc_seq_free(p->pool, q->kv_src);
    if (rc != 0) {
        sim__fail(c, rc, "prefill: free held KV");
        return rc;
    }
    q->kv_src = -1;
    sim__fifo_push(c, &c->w[q->dec].landed, (int64_t)i);
    if ((rc = sim__worker_run(c, q->dec)) != 0) return rc;
    return sim__worker_run(c, q->pre);
}

/* ---- router ---- */

static double sim__score(const sim__worker *w)
{
    /* router/rt_members.c rt__score */
    double s = (double)w->inflight + w->hb_waiting;
    if (w->role == SIM__PREFILL) s += (double)w->hb_queued_prefill / 512.0;
    if (w->role == SIM__DECODE && w->hb_total) s += 1.0 - (double)w->hb_free / w->hb_total;
    return s;
}

/* rt__pick with least_loaded: from the round-robin offset, the first lowest score. */
static uint32_t sim__pick(sim__ctx *c, uint32_t first, uint32_t count, uint32_t *rr)
{
    uint32_t best = first;
    double best_s = 0;
    for (uint32_t k = 0; k < count; k++) {
        uint32_t wi = first + (*rr + k) % count;
        double s = sim__score(&c->w[wi]);
        if (k == 0 || s < best_s) {
            best = wi;
            best_s = s;
        }
    }
    (*rr)++;
    return best;
}

static void sim__heartbeat(sim__ctx *c)
{
    for (uint32_t i = 0; i < c->nw; i++) {
        sim__worker *w = &c->w[i];
        sch_stats ss;
        kvc_stats ks;
        sch_stats_get(w->s, &ss);
        kvc_stats_get(w->pool, &ks);
        w->hb_queued_prefill = ss.queued_prefill_tokens;
        w->hb_running = ss.n_running;
        w->hb_waiting = ss.n_waiting;
        w->hb_free = ks.free + ks.cached;
        w->hb_total = ks.num_blocks;
        w->inflight_at_hb = w->inflight;
        w->inflight_tokens_at_hb = w->inflight_tokens;
    }
}

/* rt__adm_input: what the policy sees for request i now. */
static void sim__adm_input(sim__ctx *c, size_t i, adm_input *in)
{
    const sim__req *q = &c->rq[i];
    memset(in, 0, sizeof(*in));
    in->now_ns = c->now;
    in->outstanding = c->outstanding;
    in->held = c->n_held - (q->held ? 1 : 0);
    in->prompt_tokens = q->n_prompt;
    in->max_tokens = q->n_out;
    in->inflight_prefill_tokens = c->inflight_prefill_tokens;
    in->inflight_prefill_pairs = c->inflight_prefill_pairs;
    in->hold_until_ns = q->held ? q->hold_until : 0;
    for (uint32_t k = 0; k < c->nw; k++) {
        const sim__worker *w = &c->w[k];
        if (w->role == SIM__PREFILL) {
            adm_input_add_prefill(in, w->inflight_tokens, w->inflight_tokens_at_hb,
                                  w->hb_queued_prefill);
        } else {
            adm_input_add_decode(in, w->inflight, w->inflight_at_hb, w->hb_running, w->hb_waiting,
                                 w->hb_free, w->hb_total);
            in->block_size = c->cfg->block_size;
        }
    }
    if (!c->adm->uses_remaining) return;
    /* rt__adm_remaining: what each admitted request may still generate. */
    for (uint32_t k = 0; k < c->n_admitted; k++) {
        uint32_t j = c->admitted[k];
        uint32_t sent = c->recs[j].n_chunks > 0 ? (uint32_t)c->recs[j].n_chunks : 0;
        c->remaining[k] = c->rq[j].n_out > sent ? c->rq[j].n_out - sent : 0;
    }
    adm_input_set_remaining(in, c->remaining, c->n_admitted);
}

/* rt__admit + rt__start: a decode and a prefill worker, the request counts
 * as outstanding and its prompt as in-flight prefill. */
static int sim__admit_req(sim__ctx *c, size_t i, const adm_pred *pred)
{
    const sim_config *cfg = c->cfg;
    sim__req *q = &c->rq[i];
    q->admit_ns = c->now;
    q->pred = *pred;
    c->outstanding++;
    q->dec = sim__pick(c, cfg->n_prefill, cfg->n_decode, &c->rr_decode);
    q->pre = sim__pick(c, 0, cfg->n_prefill, &c->rr_prefill);
    c->w[q->dec].inflight++;
    q->admitted_slot = c->n_admitted;
    c->admitted[c->n_admitted++] = (uint32_t)i;
    c->w[q->pre].inflight++;
    c->w[q->pre].inflight_tokens += q->n_prompt;
    c->inflight_prefill_tokens += q->n_prompt;
    c->inflight_prefill_pairs += adm_prefill_pairs(q->n_prompt);
    q->prefill_counted = 1;
    sim__fifo_push(c, &c->w[q->dec].queue, (int64_t)i);
    return sim__worker_run(c, q->dec);
}

/* A 429 at c->now, at arrival or out of the hold queue. The simulated
 * client sends it again after Retry-After while it has retries left (the
 * load tester's --retry-429: Retry-After is 1..60 s, which that client
 * honours as is); else the request ends rejected, its e2e from the first
 * send (none for a first-attempt rejection at arrival, as before). */
static int sim__reject(sim__ctx *c, size_t i, const char *reason, uint32_t retry_after_s,
                       int at_arrival)
{
    lt_record *r = &c->recs[i];
    uint32_t ra = retry_after_s ? retry_after_s : 1;
    if ((uint32_t)r->attempts <= c->cfg->retry_429) {
        c->stats.client_retries++;
        return sim__push(c, c->now + (int64_t)ra * 1000000000, SIM__EV_RETRY, (uint32_t)i);
    }
    r->http_status = 429;
    r->outcome = LT_REJECTED;
    r->e2e_ns = at_arrival && r->attempts == 1 ? -1 : c->now - r->send_ns;
    snprintf(r->error, sizeof(r->error), "%s (Retry-After %u)", reason ? reason : "rejected", ra);
    return 0;
}

static void sim__unhold(sim__ctx *c, size_t i)
{
    sim__req *q = &c->rq[i];
    if (q->hprev >= 0)
        c->rq[q->hprev].hnext = q->hnext;
    else
        c->held_head = q->hnext;
    if (q->hnext >= 0)
        c->rq[q->hnext].hprev = q->hprev;
    else
        c->held_tail = q->hprev;
    q->hprev = q->hnext = -1;
    q->held = 0;
    c->n_held--;
}

/* rt_admission_pass: every held request, oldest first, rechecked; a hold
 * past its deadline is a 429, never a late answer. */
static int sim__hold_pass(sim__ctx *c)
{
    c->pass_due = 0;
    if (c->held_head < 0) return 0;
    c->stats.hold_passes++;
    if (c->cfg->heartbeat_ns <= 0) sim__heartbeat(c); /* live state, as at arrivals */
    int rc = 0;
    for (int64_t i = c->held_head, next; i >= 0 && rc == 0; i = next) {
        next = c->rq[i].hnext;
        adm_input in;
        sim__adm_input(c, (size_t)i, &in);
        adm_decision d;
        c->adm->recheck(c->adm_ctx, &in, &d);
        if (d.verdict == ADM_HOLD && c->now < c->rq[i].hold_until) continue;
        sim__unhold(c, (size_t)i);
        if (d.verdict == ADM_ADMIT) {
            c->stats.admitted_after_hold++;
            rc = sim__admit_req(c, (size_t)i, &d.pred);
        } else if (d.verdict == ADM_HOLD) {
            c->stats.hold_timeouts++;
            rc = sim__reject(c, (size_t)i, "held past its deadline", d.retry_after_s, 0);
        } else {
            c->stats.rejected_after_hold++;
            rc = sim__reject(c, (size_t)i, d.reason, d.retry_after_s, 0);
        }
    }
    return rc;
}

/* One attempt of request i reaching the router (rt_req_dispatch). */
static int sim__attempt(sim__ctx *c, size_t i)
{
    const sim_config *cfg = c->cfg;
    lt_record *r = &c->recs[i];
    sim__req *q = &c->rq[i];
    q->arrive_ns = c->now;
    if (q->n_prompt >= cfg->max_model_len || q->n_prompt + q->n_out > cfg->max_model_len) {
        r->http_status = 400;
        r->outcome = LT_ERROR;
        snprintf(r->error, sizeof(r->error), "prompt + max_tokens exceed the context of %u tokens",
                 cfg->max_model_len);
        c->stats.too_long++;
        return 0;
    }
    if (cfg->heartbeat_ns <= 0) sim__heartbeat(c);
    adm_input in;
    sim__adm_input(c, i, &in);
    adm_decision d;
    c->adm->decide(c->adm_ctx, &in, &d);
    if (d.verdict == ADM_REJECT) return sim__reject(c, i, d.reason, d.retry_after_s, 1);
    if (d.verdict == ADM_HOLD && c->adm->recheck) {
        /* rt_req_dispatch: into the hold queue, costing the workers nothing,
         * until a pass admits it or its deadline passes. */
        q->held = 1;
        q->hold_until = d.hold_until_ns;
        q->hprev = c->held_tail;
        q->hnext = -1;
        if (c->held_tail >= 0)
            c->rq[c->held_tail].hnext = (int64_t)i;
        else
            c->held_head = (int64_t)i;
        c->held_tail = (int64_t)i;
        c->n_held++;
        c->stats.held++;
        /* The router's hold timer fires at the earliest deadline still held:
         * one event per held request, skipped once it is not held. */
        int64_t t = d.hold_until_ns > c->now ? d.hold_until_ns : c->now;
        return sim__push(c, t, SIM__EV_HOLD_DEADLINE, (uint32_t)i);
    }
    return sim__admit_req(c, i, &d.pred);
}

static int sim__arrive(sim__ctx *c, size_t i)
{
    lt_record *r = &c->recs[i];
    r->send_ns = r->sched_ns; /* the simulated client is never late */
    r->attempts = 1;
    return sim__attempt(c, i);
}

/* A client retry of a 429: the same request again; its times still count
 * from the first send. */
static int sim__retry(sim__ctx *c, size_t i)
{
    c->recs[i].attempts++;
    return sim__attempt(c, i);
}

/* ---- setup and the loop ---- */

void sim_config_defaults(sim_config *c)
{
    memset(c, 0, sizeof(*c));
    c->n_prefill = 1;
    c->n_decode = 1;
    c->kv_blocks = 1024;
    c->block_size = 16;
    c->max_num_seqs = 64;
    c->max_batched_tokens = 512;
    c->max_model_len = 4096;
    c->heartbeat_ns = 1000000000;
    c->tick_ns = 100000000;
    c->admission = "none";
    adm_params_defaults(&c->params);
    adm_cost_defaults(&c->cost);
    c->seed = 1;
}

static int sim__workers_create(sim__ctx *c)
{
    const sim_config *cfg = c->cfg;
    c->nw = cfg->n_prefill + cfg->n_decode;
    c->w = calloc(c->nw, sizeof(*c->w));
    if (!c->w) return TD_ENOMEM;
    for (uint32_t i = 0; i < c->nw; i++) {
        sim__worker *w = &c->w[i];
        w->role = i < cfg->n_prefill ? SIM__PREFILL : SIM__DECODE;
        sim__fifo_init(&w->queue);
        sim__fifo_init(&w->landed);
        sim__fifo_init(&w->inbox);
        /* Every live sequence holds a block, so kv_blocks + max_num_seqs
         * sequence slots can never run out before blocks do. */
        kvc_config kc = {.num_blocks = cfg->kv_blocks,
                         .block_size = cfg->block_size,
                         .max_seqs = cfg->kv_blocks + cfg->max_num_seqs,
                         .enable_prefix_cache = false};
        int rc = kvc_pool_create(&kc, &w->pool);
        if (rc) return rc;
        sch_config sc = {.max_num_batched_tokens = cfg->max_batched_tokens,
                         .max_num_seqs = cfg->max_num_seqs,
                         .max_chunk_tokens = cfg->max_chunk_tokens,
                         .max_seqs = w->role == SIM__DECODE ? cfg->kv_blocks + cfg->max_num_seqs
                                                            : 4 * cfg->max_num_seqs,
                         .max_model_len = cfg->max_model_len,
                         .prefill_only = w->role == SIM__PREFILL,
                         .hold_kv_on_finish = w->role == SIM__PREFILL,
                         .check_kv = false};
        rc = sch_create(&sc, w->pool, &w->s);
        if (rc) return rc;
    }
    return 0;
}

static void sim__ctx_free(sim__ctx *c)
{
    for (uint32_t i = 0; c->w && i < c->nw; i++) {
        sch_free(c->w[i].s);
        kvc_pool_free(c->w[i].pool);
    }
    free(c->w);
    if (c->adm && c->adm_ctx) c->adm->destroy(c->adm_ctx);
    free(c->heap.v);
    free(c->zeros);
    free(c->results);
    free(c->rq);
    free(c->admitted);
    free(c->remaining);
}

void sim_result_free(sim_result *r)
{
    if (!r) return;
    free(r->recs);
    free(r->arena);
    memset(r, 0, sizeof(*r));
}

static int sim__records(sim__ctx *c, sim_result *out)
{
    const sim_config *cfg = c->cfg;
    size_t slots = 0;
    for (size_t i = 0; i < c->n; i++) {
        sim__req *q = &c->rq[i];
        q->next = q->hprev = q->hnext = -1;
        q->kv_dst = q->kv_src = -1;
        q->n_prompt = c->reqs[i].input_tokens > 0 ? (uint32_t)c->reqs[i].input_tokens : 1;
        /* max_tokens 0 asks the router for the rest of the context. */
        q->n_out = c->reqs[i].output_tokens > 0       ? (uint32_t)c->reqs[i].output_tokens
                   : q->n_prompt < cfg->max_model_len ? cfg->max_model_len - q->n_prompt
                                                      : 1;
        uint32_t cap = cfg->chunk_cap && cfg->chunk_cap < q->n_out ? cfg->chunk_cap : q->n_out;
        if (slots > SIZE_MAX / sizeof(int64_t) - cap) return TD_ENOMEM;
        slots += cap;
    }
    out->arena = malloc((slots ? slots : 1) * sizeof(int64_t));
    if (!out->arena) return TD_ENOMEM;
    size_t off = 0;
    for (size_t i = 0; i < c->n; i++) {
        lt_record *r = &c->recs[i];
        sim__req *q = &c->rq[i];
        uint32_t cap = cfg->chunk_cap && cfg->chunk_cap < q->n_out ? cfg->chunk_cap : q->n_out;
        *r = (lt_record){.sched_ns = c->reqs[i].t_ns,
                         .send_ns = -1,
                         .ttft_ns = -1,
                         .e2e_ns = -1,
                         .input_tokens = (int32_t)q->n_prompt,
                         .max_tokens = c->reqs[i].output_tokens,
                         .chunk_ns = out->arena + off,
                         .chunk_cap = (int32_t)cap,
                         .outcome = LT_PENDING};
        off += cap;
    }
    return 0;
}

static int sim__check_config(const sim_config *cfg, char *err, size_t errlen)
{
    const char *why = NULL;
    if (cfg->n_prefill < 1 || cfg->n_decode < 1)
        why = "at least one prefill and one decode worker";
    else if (cfg->block_size < 1 || cfg->block_size > KVC_MAX_BLOCK_SIZE)
        why = "block size out of range";
    else if (cfg->max_model_len < 2)
        why = "max_model_len must be at least 2";
    else if ((uint64_t)cfg->kv_blocks * cfg->block_size < cfg->max_model_len)
        why = "kv_blocks * block_size must hold one sequence of max_model_len tokens";
    else if (cfg->max_num_seqs < 1 || cfg->max_batched_tokens < cfg->max_num_seqs)
        why = "max_batched_tokens must be >= max_num_seqs >= 1";
    else
        why = adm_cost_host_problem(&cfg->cost);
    if (!why) return 0;
    if (err) snprintf(err, errlen, "%s", why);
    return TD_EINVAL;
}

int sim_run(const sim_config *cfg, const lt_req *reqs, size_t n, sim_result *out, char *err,
            size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (err && errlen) err[0] = '\0';
    int rc = sim__check_config(cfg, err, errlen);
    if (rc) return rc;
    sim__ctx c = {.cfg = cfg,
                  .reqs = reqs,
                  .n = n,
                  .held_head = -1,
                  .held_tail = -1,
                  .errbuf = err,
                  .errlen = errlen,
                  .rng = cfg->seed};
    if (sim__host_model(&cfg->cost)) {
        /* Slow at time 0 with the slow share's odds (stretch lengths are
         * memoryless, so the run starts in the long-run mix). */
        c.host_slow = sim__uniform(&c.rng) < cfg->cost.host_slow_share;
        c.host_switch_ns = sim__host_stretch_ns(&c);
    }
    c.adm = cfg->policy ? cfg->policy : adm_find(cfg->admission);
    if (!c.adm) {
        if (err)
            snprintf(err, errlen, "unknown admission policy \"%s\" (one of %s)",
                     cfg->admission ? cfg->admission : "", adm_names());
        return TD_EINVAL;
    }
    adm_params params = cfg->params;
    /* One cost model for the steps and the predictions, unless the router's
     * is given apart. */
    params.cost = cfg->router_cost_set ? cfg->router_cost : cfg->cost;
    rc = c.adm->create(&params, &c.adm_ctx);
    if (rc) {
        c.adm = NULL;
        if (err)
            snprintf(err, errlen, "admission %s: bad parameters: %s", cfg->admission,
                     td_strerror(rc));
        return rc;
    }
    out->recs = calloc(n ? n : 1, sizeof(*out->recs));
    c.rq = calloc(n ? n : 1, sizeof(*c.rq));
    c.zeros = calloc(cfg->max_model_len, sizeof(int32_t));
    c.admitted = calloc(n ? n : 1, sizeof(*c.admitted));
    c.remaining = calloc(n ? n : 1, sizeof(*c.remaining));
    rc = TD_ENOMEM;
    if (!out->recs || !c.rq || !c.zeros || !c.admitted || !c.remaining) goto fail;
    c.recs = out->recs;
    out->n = n;
    if ((rc = sim__records(&c, out)) != 0) goto fail;
    if ((rc = sim__workers_create(&c)) != 0) {
        if (err) snprintf(err, errlen, "worker setup: %s", td_strerror(rc));
        goto fail;
    }

    /* The loop: the next of (heartbeat, tick, heap event, arrival); at equal
     * times heartbeats first, then ticks, then events (a step that ends frees
     * room), then arrivals. Ticks matter only while requests are held. */
    size_t next_arrival = 0;
    int64_t next_hb = 0, next_tick = 0;
    while (rc == 0 && (c.heap.n > 0 || next_arrival < n)) {
        int64_t t_ev = c.heap.n ? c.heap.v[0].t : INT64_MAX;
        int64_t t_ar = next_arrival < n ? reqs[next_arrival].t_ns : INT64_MAX;
        int64_t t = t_ev < t_ar ? t_ev : t_ar;
        c.stats.events++;
        if (cfg->heartbeat_ns > 0 && next_hb <= t) {
            c.now = next_hb;
            sim__heartbeat(&c);
            /* Skip idle stretches whole: the state does not change in them.
             * Held requests are rechecked at every heartbeat, so none is
             * skipped while some are held. */
            int64_t k = c.n_held ? 1 : (t - next_hb) / cfg->heartbeat_ns + 1;
            next_hb += k * cfg->heartbeat_ns;
            if (c.n_held) {
                rc = sim__hold_pass(&c);
                if (cfg->tick_ns > 0 && next_tick <= c.now) next_tick = c.now + cfg->tick_ns;
            }
            if (c.err) rc = c.err;
            continue;
        }
        if (c.n_held && cfg->tick_ns > 0) {
            if (next_tick < c.now) /* ticks while nothing was held are skipped */
                next_tick = (c.now / cfg->tick_ns + 1) * cfg->tick_ns;
            if (next_tick <= t) {
                c.now = next_tick;
                next_tick += cfg->tick_ns;
                rc = sim__hold_pass(&c);
                if (c.err) rc = c.err;
                continue;
            }
        }
        c.now = t;
        if (t_ev <= t_ar) {
            sim__ev e = sim__pop(&c.heap);
            if (e.type == SIM__EV_STEP_END)
                rc = sim__step_end(&c, e.arg);
            else if (e.type == SIM__EV_XFER_DONE)
                rc = sim__xfer_done(&c, e.arg);
            else if (e.type == SIM__EV_RETRY)
                rc = sim__retry(&c, e.arg);
            else if (c.rq[e.arg].held) /* the hold timer at this deadline */
                rc = sim__hold_pass(&c);
        } else {
            rc = sim__arrive(&c, next_arrival++);
        }
        if (rc == 0 && c.pass_due) rc = sim__hold_pass(&c);
        if (c.err) rc = c.err;
    }
    if (rc) {
        if (err && !err[0]) snprintf(err, errlen, "simulation: %s", td_strerror(rc));
        goto fail;
    }
    c.stats.sim_end_s = (double)c.now / 1e9;
    c.stats.speed_prefill = c.stats.speed_decode = 1;
    if (c.adm->speed) c.adm->speed(c.adm_ctx, &c.stats.speed_prefill, &c.stats.speed_decode);
    for (uint32_t i = 0; i < c.nw; i++) {
        kvc_stats ks;
        kvc_stats_get(c.w[i].pool, &ks);
        c.stats.leaked_blocks += ks.used;
        if ((rc = kvc_check(c.w[i].pool)) != 0) {
            if (err) snprintf(err, errlen, "worker %u: block pool check failed", i);
            goto fail;
        }
    }
    out->stats = c.stats;
    sim__ctx_free(&c);
    return 0;
fail:
    sim__ctx_free(&c);
    sim_result_free(out);
    return rc;
}
