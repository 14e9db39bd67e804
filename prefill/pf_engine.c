/* The prefill worker's engine thread: requests from the gRPC handlers,
 * connections to decode workers, prefill batches, layer-by-layer KV posts.
 *
 * A request's states (pf_req.state), all on this thread:
 *
 *   RUNNING   queued in or computed by the engine (prefill-only); each step's
 *             per-layer hook posts the blocks that step finished to kvx
 *      | first token drawn: the engine hands the blocks over (held)
 *   SENDING   the last layers are on the wire; waiting for kvx DONE
 *      | DONE -> PrefillResponse, blocks freed
 *
 *   any state --cancel, deadline, kvx FAILED, send error--> CLOSING
 *   CLOSING   waits for kvx's final event (so nothing reads the blocks any
 *             more), frees them, finishes the call with the error.
 */
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "prefill/pf.h"
#include "proto/tandem.pb-c.h"

#define MOD             "prefill"
#define PF_MAX_STOP_IDS 80
#define PF_MAX_PEERS    64

enum pf_state { PF_RUNNING, PF_SENDING, PF_CLOSING };

typedef struct pf_req pf_req;

/* What the gRPC thread hands the engine thread: a run (embedded in its
 * pf_req, so a run allocates nothing more) or a cancel (calloc'd, rare). */
typedef struct pf_envelope {
    mpscq_node node;
    int is_cancel;
    rpc_call *call;
    pf_req *req;
    char id[KVX_REQ_ID_MAX];
} pf_envelope;

/* One request, in a slot of pf_ctx.reqs: the struct, then its prompt
 * (int32 x max_model_len), then its pairs (kvx_pair x blocks of
 * max_model_len), at pf_ctx.req_prompt_off / req_pairs_off. */
struct pf_req {
    pf_req *prev, *next; /* live list */
    rpc_call *call;
    const Tandem__V1__PrefillRequest *msg; /* owned by the call */
    char id[KVX_REQ_ID_MAX];
    int32_t *prompt; /* n_prompt token ids, in this request's slot */
    uint32_t n_prompt;
    eng_request er;
    int32_t stop_ids[PF_MAX_STOP_IDS];
    int64_t deadline_ns;
    enum pf_state state;
    bool in_engine; /* added to the eng and not yet handed back */
    bool began;     /* kvx knows the request */
    bool kv_final, kv_ok;
    int64_t kv_seq; /* held blocks, once the eng handed them over */
    int32_t first_token;
    /* Blocks of the prompt: dst ids from the request, pairs filled as the
     * source blocks are computed. Blocks [skip_blocks, n_blocks) are sent. */
    kvx_pair *pairs; /* n_blocks, in this request's slot */
    uint32_t n_blocks, skip_blocks;
    uint32_t posted_upto; /* blocks [skip_blocks, posted_upto) posted in every layer */
    uint32_t lo, hi;      /* this step's range */
    bool seen;
    uint32_t cached_tokens; /* prefix computed before (this worker's prefix cache) */
    int send_err;
    uint64_t bytes_sent;
    int err;
    char details[192];
    int64_t t_arrival, t_start, t_done;
    uint64_t transfer_us;
    pf_envelope env; /* its trip through pf_ctx.cmdq */
};

typedef struct pf_peer {
    char endpoint[512];
    int id;
} pf_peer;

/* Requests started in one pass over the command queue open their
 * transfers in one kvx_send_begin_batch call: a burst of arrivals costs this
 * thread one round trip to the transfer's progress thread, not one each. */
#define PF__BEGIN_BATCH 64

typedef struct pf__begins {
    pf_req *req[PF__BEGIN_BATCH];
    kvx_begin b[PF__BEGIN_BATCH];
    int rcs[PF__BEGIN_BATCH];
    int n;
} pf__begins;

typedef struct pf_engine {
    pf_ctx *ctx;
    pf_req *live;
    uint32_t n_live;
    pf_peer peers[PF_MAX_PEERS];
    int n_peers;
    uint64_t n_ended; /* requests reaped so far */
    wrk_heap heap;
    pf__begins begins; /* requests of this pass waiting for their BEGIN */
} pf_engine;

/* ------------------------------------------------------------ handlers -- */

void pf_handle_run(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    pf_ctx *c = arg;
    const Tandem__V1__PrefillRequest *m = (const Tandem__V1__PrefillRequest *)req;
    const char *id = m->meta ? m->meta->request_id : NULL;
    if (atomic_load(&c->draining) || atomic_load(&c->health.status) != WRK_SERVING)
        return (void)rpc_call_finishf(call, TD_EUNAVAILABLE, "prefill worker is draining");
    if (!id || !id[0]) return (void)rpc_call_finishf(call, TD_EINVAL, "meta.request_id is empty");
    if (strlen(id) >= KVX_REQ_ID_MAX)
        return (void)rpc_call_finishf(call, TD_EINVAL, "meta.request_id is longer than %d bytes",
                                      KVX_REQ_ID_MAX - 1);
    size_t n = m->n_prompt_token_ids;
    if (n == 0) return (void)rpc_call_finishf(call, TD_EINVAL, "prompt_token_ids is empty");
    if (n >= c->max_model_len)
        return (void)rpc_call_finishf(call, TD_EINVAL,
                                      "prompt of %zu tokens exceeds the context of %u tokens", n,
                                      c->max_model_len);
    int vocab = c->model->cfg.vocab_size;
    for (size_t i = 0; i < n; i++)
        if (m->prompt_token_ids[i] >= (uint32_t)vocab)
            return (void)rpc_call_finishf(
                call, TD_EINVAL, "prompt_token_ids[%zu] = %u is not below the vocabulary size %d",
                i, m->prompt_token_ids[i], vocab);
    const Tandem__V1__KvDestination *d = m->dest;
    if (!d || !d->kv_endpoint || !d->kv_endpoint[0])
        return (void)rpc_call_finishf(call, TD_EINVAL, "dest.kv_endpoint is empty");
    if (d->transport && d->transport[0] && strcmp(d->transport, c->opts->kv_transport) != 0)
        return (void)rpc_call_finishf(call, TD_EMISMATCH, "dest.transport: decode %s, prefill %s",
                                      d->transport, c->opts->kv_transport);
    size_t want_blocks = (n + c->block_size - 1) / c->block_size;
    if (d->n_block_ids != want_blocks)
        return (void)rpc_call_finishf(
            call, TD_EINVAL,
            "dest.block_ids: %zu ids for a prompt of %zu tokens (needs %zu blocks of %u)",
            d->n_block_ids, n, want_blocks, c->block_size);
    if (d->skip_tokens % c->block_size != 0 || d->skip_tokens >= n)
        return (void)rpc_call_finishf(
            call, TD_EINVAL,
            "dest.skip_tokens = %u must be a multiple of %u below the prompt length",
            d->skip_tokens, c->block_size);

    pf_req *r = wrk_pool_get(&c->reqs);
    if (!r) return (void)rpc_call_finishf(call, TD_ENOMEM, "out of memory");
    memset(r, 0, sizeof(*r));
    int32_t *prompt = (int32_t *)(void *)((char *)r + c->req_prompt_off);
    kvx_pair *pairs = (kvx_pair *)(void *)((char *)r + c->req_pairs_off);
    for (size_t i = 0; i < n; i++)
        prompt[i] = (int32_t)m->prompt_token_ids[i];
    for (size_t i = 0; i < want_blocks; i++)
        pairs[i] = (kvx_pair){.src = 0, .dst = d->block_ids[i]};
    smp_params p;
    char why[192];
    if (wrk_sampling(&c->model->cfg, m->sampling, (uint64_t)td_now_ns(), r->stop_ids,
                     PF_MAX_STOP_IDS, &p, why, sizeof(why)) != 0) {
        wrk_pool_put(&c->reqs, r);
        return (void)rpc_call_finishf(call, TD_EINVAL, "%s", why);
    }
    r->call = call;
    r->msg = m;
    snprintf(r->id, sizeof(r->id), "%s", id);
    r->prompt = prompt;
    r->n_prompt = (uint32_t)n;
    r->pairs = pairs;
    r->n_blocks = (uint32_t)want_blocks;
    r->skip_blocks = d->skip_tokens / c->block_size;
    r->posted_upto = r->skip_blocks;
    r->kv_seq = -1;
    r->t_arrival = td_now_ns();
    r->deadline_ns = rpc_call_deadline_ns(call);
    if (m->meta->timeout_ms) {
        int64_t dl = rpc_deadline_from_timeout_ms(m->meta->timeout_ms);
        if (dl < r->deadline_ns) r->deadline_ns = dl;
    }
    r->er = (eng_request){.id = (uint64_t)(uintptr_t)r,
                          .prompt = r->prompt,
                          .n_prompt = r->n_prompt,
                          .max_tokens = 1,
                          .sampling = p,
                          .priority = -m->meta->priority};
    r->env.req = r;
    mpscq_push(&c->cmdq, &r->env.node);
}

void pf_handle_cancel(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    pf_ctx *c = arg;
    const Tandem__V1__CancelRequest *m = (const Tandem__V1__CancelRequest *)req;
    if (!m->request_id || !m->request_id[0])
        return (void)rpc_call_finishf(call, TD_EINVAL, "request_id is empty");
    pf_envelope *e = calloc(1, sizeof(*e));
    if (!e) return (void)rpc_call_finishf(call, TD_ENOMEM, "out of memory");
    e->is_cancel = 1;
    e->call = call;
    snprintf(e->id, sizeof(e->id), "%s", m->request_id);
    mpscq_push(&c->cmdq, &e->node);
}

int pf_reqs_init(pf_ctx *c, uint32_t max_num_seqs)
{
    /* One size for every request: the longest prompt (max_model_len - 1
     * tokens) and its blocks, so no request mallocs a size of its own. */
    size_t max_blocks = ((size_t)c->max_model_len + c->block_size - 1) / c->block_size;
    size_t a = _Alignof(max_align_t);
    c->req_prompt_off = (sizeof(pf_req) + a - 1) / a * a;
    c->req_pairs_off =
        (c->req_prompt_off + sizeof(int32_t) * (size_t)c->max_model_len + a - 1) / a * a;
    size_t bytes = c->req_pairs_off + sizeof(kvx_pair) * max_blocks;
    /* Made for one full batch; a burst beyond it adds slots, up to four
     * batches' worth kept idle afterwards. */
    return wrk_pool_init(&c->reqs, bytes, max_num_seqs, 4 * max_num_seqs);
}

/* -------------------------------------------------------------- engine -- */

static void pf__detail(pf_req *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void pf__detail(pf_req *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->details, sizeof(r->details), fmt, ap);
    va_end(ap);
}

static pf_req *pf__find(pf_engine *d, const char *id)
{
    for (pf_req *r = d->live; r; r = r->next)
        if (strcmp(r->id, id) == 0) return r;
    return NULL;
}

static void pf__remove(pf_engine *d, pf_req *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        d->live = r->next;
    if (r->next) r->next->prev = r->prev;
    d->n_live--;
    d->n_ended++;
    wrk_pool_put(&d->ctx->reqs, r);
}

static const char *pf__outcome(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case TD_ECANCELED:
        return "cancelled";
    case TD_ETIMEDOUT:
        return "deadline";
    case TD_EMISMATCH:
        return "mismatch";
    default:
        return "error";
    }
}

static void pf__fail(pf_engine *d, pf_req *r, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void pf__fail(pf_engine *d, pf_req *r, int err, const char *fmt, ...)
{
    if (r->state == PF_CLOSING) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->details, sizeof(r->details), fmt, ap);
    va_end(ap);
    r->err = err;
    if (r->in_engine) {
        int64_t kv = -1;
        if (eng_detach(d->ctx->engine, r->er.id, &kv) == 0) r->kv_seq = kv;
        r->in_engine = false;
    }
    if (r->began && !r->kv_final) (void)kvx_cancel(d->ctx->kvx, r->id);
    r->state = PF_CLOSING;
}

/* Finishes the requests that are done with their blocks. */
static void pf__reap(pf_engine *d)
{
    pf_ctx *c = d->ctx;
    for (pf_req *r = d->live, *next; r; r = next) {
        next = r->next;
        bool ok = r->state == PF_SENDING && r->kv_ok;
        bool closed = r->state == PF_CLOSING && (!r->began || r->kv_final);
        if (!ok && !closed) continue;
        if (r->kv_seq > 0) (void)kvc_seq_free(eng_kvc(c->engine), r->kv_seq);
        r->kv_seq = -1;
        if (ok) {
            Tandem__V1__Timings t = TANDEM__V1__TIMINGS__INIT;
            t.prefill_queue_us = r->t_start ? (uint64_t)(r->t_start - r->t_arrival) / 1000 : 0;
            t.prefill_us = r->t_start ? (uint64_t)(r->t_done - r->t_start) / 1000 : 0;
            t.transfer_us = r->transfer_us;
            Tandem__V1__PrefillResponse resp = TANDEM__V1__PREFILL_RESPONSE__INIT;
            resp.first_token_id = (uint32_t)r->first_token;
            resp.computed_tokens = r->n_prompt - r->cached_tokens;
            resp.cached_tokens = r->cached_tokens;
            resp.blocks_sent =
                (uint64_t)(r->n_blocks - r->skip_blocks) * eng_layout(c->engine)->n_layers;
            resp.bytes_sent = r->bytes_sent;
            resp.timings = &t;
            rpc_call_reply(r->call, &resp.base);
            if (r->t_start) {
                met_histogram_observe(c->metrics.queue_seconds,
                                      td_ns_to_s(r->t_start - r->t_arrival));
                met_histogram_observe(c->metrics.prefill_seconds,
                                      td_ns_to_s(r->t_done - r->t_start));
            }
            met_counter_add(c->metrics.transfer_bytes, r->bytes_sent);
            met_counter_add(c->metrics.prompt_tokens_computed, r->n_prompt - r->cached_tokens);
            met_counter_add(c->metrics.prompt_tokens_cached, r->cached_tokens);
        } else {
            rpc_call_finish(r->call, r->err, r->details);
        }
        wrk_metrics_outcome(&c->metrics, pf__outcome(ok ? 0 : r->err));
        td_log_info(MOD, "request_end", "req=%s outcome=%s computed=%u cached=%u%s%s%s", r->id,
                    pf__outcome(ok ? 0 : r->err), r->n_prompt - r->cached_tokens, r->cached_tokens,
                    ok ? "" : " detail=\"", ok ? "" : r->details, ok ? "" : "\"");
        pf__remove(d, r);
    }
}

/* The peer id for a decode worker's KV endpoint: connected on first use
 * (handshake: model, layout, dtype, block size), kept afterwards. */
static int pf__peer(pf_engine *d, const char *endpoint, int *peer, char *msg, size_t msg_len)
{
    for (int i = 0; i < d->n_peers; i++)
        if (strcmp(d->peers[i].endpoint, endpoint) == 0) {
            *peer = d->peers[i].id;
            return 0;
        }
    int rc = kvx_connect(d->ctx->kvx, endpoint, peer, msg, msg_len);
    if (rc != 0) return rc;
    if (d->n_peers == PF_MAX_PEERS) { /* forget the oldest */
        memmove(d->peers, d->peers + 1, sizeof(d->peers[0]) * (PF_MAX_PEERS - 1));
        d->n_peers--;
    }
    snprintf(d->peers[d->n_peers].endpoint, sizeof(d->peers[0].endpoint), "%s", endpoint);
    d->peers[d->n_peers++].id = *peer;
    td_log_info(MOD, "kv_connected", "endpoint=%s peer=%d", endpoint, *peer);
    return 0;
}

static void pf__forget_peer(pf_engine *d, int peer)
{
    for (int i = 0; i < d->n_peers; i++)
        if (d->peers[i].id == peer) {
            d->peers[i] = d->peers[--d->n_peers];
            return;
        }
}

/* The transfer of r is open (rc == 0) or cannot be: queue the prefill, or
 * end r. */
static void pf__begun(pf_engine *d, pf_req *r, int rc)
{
    pf_ctx *c = d->ctx;
    if (rc != 0) {
        r->state = PF_CLOSING;
        r->err = rc == TD_EEXIST ? TD_EEXIST : TD_EUNAVAILABLE;
        pf__detail(r, "cannot open the KV transfer to %s: %s", r->msg->dest->kv_endpoint,
                   td_strerror(rc));
        return;
    }
    r->began = true;
    rc = eng_add(c->engine, &r->er);
    if (rc != 0) {
        pf__fail(d, r, rc == TD_ENOSPC ? TD_EAGAIN : rc, "cannot queue the prefill: %s",
                 td_strerror(rc));
        return;
    }
    r->in_engine = true;
}

/* The peer of r's decode worker, connecting when new. Returns 0, or ends r
 * and returns the error. */
static int pf__peer_of(pf_engine *d, pf_req *r, int *peer)
{
    const char *endpoint = r->msg->dest->kv_endpoint;
    char msg[KVX_ERR_MSG_MAX] = "";
    int rc = pf__peer(d, endpoint, peer, msg, sizeof(msg));
    if (rc == TD_EMISMATCH) {
        r->state = PF_CLOSING;
        r->err = TD_EMISMATCH;
        pf__detail(r, "KV handshake with %s: %s", endpoint, msg);
    } else if (rc != 0) {
        pf__begun(d, r, rc);
    }
    return rc;
}

/* Opens the pending transfers in one call. A peer found gone (the decode
 * worker restarted) is forgotten and each of its requests tries once more
 * on a fresh connection, on its own. */
static void pf__begin_flush(pf_engine *d)
{
    pf_ctx *c = d->ctx;
    pf__begins *pb = &d->begins;
    if (pb->n == 0) return;
    int ok = kvx_send_begin_batch(c->kvx, pb->b, pb->n, pb->rcs);
    for (int i = 0; i < pb->n; i++) {
        pf_req *r = pb->req[i];
        int rc = ok < 0 ? ok : pb->rcs[i];
        if (rc == TD_ECONNRESET || rc == TD_ENOENT) {
            pf__forget_peer(d, pb->b[i].peer); /* reconnect once */
            int peer = -1;
            if (pf__peer_of(d, r, &peer) != 0) continue;
            rc = kvx_send_begin(c->kvx, peer, r->id, pb->b[i].deadline_ns);
            if (rc == TD_ECONNRESET || rc == TD_ENOENT) pf__forget_peer(d, peer);
        }
        pf__begun(d, r, rc);
    }
    pb->n = 0;
}

/* A new request: connect, then its transfer opens with the pass's others
 * (pf__begin_flush) and the prefill is queued. */
static void pf__start(pf_engine *d, pf_req *r)
{
    pf__begins *pb = &d->begins;
    r->prev = NULL;
    r->next = d->live;
    if (d->live) d->live->prev = r;
    d->live = r;
    d->n_live++;
    r->state = PF_RUNNING;
    if (pf__find(d, r->id) != r) {
        r->state = PF_CLOSING;
        r->err = TD_EEXIST;
        pf__detail(r, "request id %s is already in flight", r->id);
        return;
    }
    int peer = -1;
    if (pf__peer_of(d, r, &peer) != 0) return;
    if (pb->n == PF__BEGIN_BATCH) pf__begin_flush(d);
    pb->req[pb->n] = r;
    pb->b[pb->n] =
        (kvx_begin){.peer = peer,
                    .req_id = r->id,
                    .deadline_ns = r->deadline_ns == RPC_NO_DEADLINE ? 0 : r->deadline_ns};
    pb->n++;
}

/* The per-layer hook (engine thread, inside eng_step): posts, for every
 * request of the step, the blocks whose KV this layer just finished, all in
 * one non-blocking kvx_send_layers call. A block is posted once, when its
 * last token is computed (or the prompt ends in it), so a block split over
 * two prefill chunks is sent whole. */
int pf_on_layer(void *arg, const eng_item *items, uint32_t n_items, int layer)
{
    pf_ctx *c = arg;
    const kv_layout *l = eng_layout(c->engine);
    uint32_t n_posts = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        const eng_item *it = &items[i];
        pf_req *r = (pf_req *)(uintptr_t)it->id;
        if (layer == 0) {
            if (!r->seen) {
                r->seen = true;
                r->cached_tokens = it->start;
                r->t_start = td_now_ns();
            }
            uint32_t end = it->start + it->n;
            uint32_t hi = end >= r->n_prompt ? r->n_blocks : end / l->block_size;
            if (hi > it->n_blocks) hi = it->n_blocks;
            r->lo = r->posted_upto;
            r->hi = hi > r->lo ? hi : r->lo;
            for (uint32_t b = r->lo; b < r->hi; b++)
                r->pairs[b].src = (uint32_t)it->table[b];
        }
        if (r->hi > r->lo && r->send_err == 0 && n_posts < c->max_posts) {
            c->post_reqs[n_posts] = r;
            c->posts[n_posts++] = (kvx_layer_post){.req_id = r->id,
                                                   .layer = layer,
                                                   .pairs = r->pairs + r->lo,
                                                   .n = (int)(r->hi - r->lo)};
        }
        if ((uint32_t)layer + 1 == l->n_layers) r->posted_upto = r->hi;
    }
    if (n_posts == 0) return 0;
    /* Sized so that it does not refuse (kvx.h); if it does, the requests of
     * this post fail rather than send holes. */
    int rc = kvx_send_layers(c->kvx, c->posts, (int)n_posts);
    for (uint32_t k = 0; k < n_posts; k++) {
        pf_req *r = c->post_reqs[k];
        if (rc != 0)
            r->send_err = rc;
        else
            r->bytes_sent += (uint64_t)c->posts[k].n * kv_layout_block_bytes(l);
    }
    return 0;
}

static void pf__step(pf_engine *d)
{
    pf_ctx *c = d->ctx;
    const eng_event *evs;
    uint32_t n;
    int64_t forward_ns;
    if (wrk_step(c->engine, &c->metrics, &evs, &n, &forward_ns) != 0) return;
    for (uint32_t i = 0; i < n; i++) {
        pf_req *r = (pf_req *)(uintptr_t)evs[i].id;
        r->in_engine = false;
        r->kv_seq = evs[i].kv_seq;
        if (evs[i].finish == ENG_FINISH_ERROR) {
            pf__fail(d, r, TD_EINTERNAL, "prefill failed: %s",
                     evs[i].err == TD_ERANGE ? "the logits are NaN" : td_strerror(evs[i].err));
            continue;
        }
        r->first_token = evs[i].token;
        r->t_done = td_now_ns();
        r->state = PF_SENDING;
    }
    /* A post that failed fails its request (the transfer is broken). */
    for (pf_req *r = d->live; r; r = r->next)
        if (r->send_err && r->state != PF_CLOSING)
            pf__fail(d, r, TD_EUNAVAILABLE, "sending KV failed: %s", td_strerror(r->send_err));
    wrk_load_publish(&c->load, c->engine, d->n_live, forward_ns);
}

static void pf__on_kvx(pf_engine *d)
{
    kvx_event evs[64];
    int n;
    while ((n = kvx_ep_poll(d->ctx->kvx, evs, 64)) > 0) {
        for (int i = 0; i < n; i++) {
            const kvx_event *e = &evs[i];
            if (e->type == KVX_EV_PEER_ERROR) {
                td_log_warn(MOD, "kv_peer_error", "peer=%d err=%s msg=\"%s\"", e->peer,
                            td_err_name(e->err), e->msg);
                if (e->peer >= 0) pf__forget_peer(d, e->peer);
                continue;
            }
            if (e->type == KVX_EV_POST_REJECTED) { /* its request already ended */
                td_log_debug(MOD, "kv_post_rejected", "req=%s layer=%d", e->req_id, e->layer);
                continue;
            }
            pf_req *r = pf__find(d, e->req_id);
            if (!r) continue;
            if (e->type == KVX_EV_DONE) {
                r->kv_final = r->kv_ok = true;
                r->transfer_us = (uint64_t)e->elapsed_ns / 1000;
                met_histogram_observe(d->ctx->metrics.transfer_seconds, td_ns_to_s(e->elapsed_ns));
            } else if (e->type == KVX_EV_FAILED) {
                r->kv_final = true;
                pf__fail(d, r, wrk_kv_failure_status(e->err, r->deadline_ns),
                         "KV transfer failed: %s", e->msg[0] ? e->msg : td_strerror(e->err));
            }
        }
    }
}

static void pf__on_queue(pf_engine *d)
{
    pf_ctx *c = d->ctx;
    mpscq_ack(&c->cmdq);
    mpscq_node *node;
    while ((node = mpscq_pop(&c->cmdq)) != NULL) {
        pf_envelope *e = mpscq_entry(node, pf_envelope, node);
        if (e->is_cancel) {
            /* Requests that came before the cancel open first, in order. */
            pf__begin_flush(d);
            pf_req *r = pf__find(d, e->id);
            Tandem__V1__CancelResponse resp = TANDEM__V1__CANCEL_RESPONSE__INIT;
            resp.found = r && r->state != PF_CLOSING;
            if (resp.found) pf__fail(d, r, TD_ECANCELED, "cancelled (Prefill.Cancel)");
            rpc_call_reply(e->call, &resp.base);
            free(e);
        } else {
            pf__start(d, e->req); /* e lives in the request's slot */
        }
    }
    pf__begin_flush(d);
}

static void pf__check_live(pf_engine *d)
{
    int64_t now = td_now_ns();
    for (pf_req *r = d->live; r; r = r->next) {
        if (r->state == PF_CLOSING) continue;
        if (rpc_call_cancelled(r->call))
            pf__fail(d, r, TD_ECANCELED, "cancelled by the caller");
        else if (r->deadline_ns != RPC_NO_DEADLINE && now >= r->deadline_ns)
            pf__fail(d, r, TD_ETIMEDOUT, "deadline exceeded");
    }
}

void *pf_engine_run(void *arg)
{
    pf_engine d = {.ctx = arg};
    pf_ctx *c = d.ctx;
    struct pollfd fds[2] = {{.fd = mpscq_fd(&c->cmdq), .events = POLLIN},
                            {.fd = kvx_ep_event_fd(c->kvx), .events = POLLIN}};
    while (!atomic_load(&c->stop)) {
        pf__on_queue(&d);
        pf__on_kvx(&d);
        pf__check_live(&d);
        pf__step(&d);
        pf__on_kvx(&d);
        pf__reap(&d);
        eng_stats es;
        eng_stats_get(c->engine, &es);
        wrk_load_publish(&c->load, c->engine, d.n_live, 0);
        if (es.running == 0 && es.waiting == 0) {
            if (d.n_live == 0) (void)wrk_heap_idle(&d.heap, d.n_ended, td_now_ns());
            (void)poll(fds, 2, 20);
        }
    }
    pf__on_queue(&d);
    for (pf_req *r = d.live; r; r = r->next)
        pf__fail(&d, r, TD_EUNAVAILABLE, "prefill worker is shutting down");
    int64_t until = td_now_ns() + 3000000000LL;
    while (d.live && td_now_ns() < until) {
        pf__on_kvx(&d);
        pf__reap(&d);
        if (d.live) (void)poll(fds + 1, 1, 10);
    }
    for (pf_req *r = d.live; r; r = r->next)
        r->began = false; /* the endpoint goes away with its transfers */
    pf__reap(&d);
    return NULL;
}
