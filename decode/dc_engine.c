/* The decode worker's engine thread: requests from the gRPC handlers, KV
 * blocks, prefill calls, the step loop and the token streams.
 *
 * A request's states (dc_req.state), all on this thread:
 *
 *   QUEUED    waiting in arrival order for KV blocks (a full pool delays, it
 *             does not fail)
 *      | blocks allocated, registered with kvx, Prefill.Run started
 *   PREFILL   the prefill worker computes and pushes the prompt's KV
 *      | kvx DONE and the PrefillResponse (first token) both arrived
 *   RUNNING   in the engine's batch; tokens stream out once per step
 *      | finished (EOS, stop id, length) -> final message, call finished
 *
 *   any state --cancel, deadline, prefill failure, kvx FAILED--> CLOSING
 *   CLOSING   waits until nothing refers to the blocks any more (kvx's final
 *             event for the request, the prefill stream ended), frees them
 *             and finishes the call with the error. Nothing else returns
 *             destination blocks.
 */
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "decode/dc.h"

#define MOD             "decode"
#define DC_MAX_STOP_IDS 80

enum dc_state { DC_QUEUED, DC_PREFILL, DC_RUNNING, DC_CLOSING };

typedef struct dc_req dc_req;
struct dc_req {
    dc_req *prev, *next; /* live list */
    dc_req *qnext;       /* QUEUED FIFO */
    rpc_call *call;
    const Tandem__V1__DecodeRequest *msg; /* owned by the call */
    char id[KVX_REQ_ID_MAX];
    int32_t *prompt;
    uint32_t n_prompt;
    eng_request er;
    int32_t stop_ids[DC_MAX_STOP_IDS];
    int64_t deadline_ns;
    enum dc_state state;
    int64_t kv_seq;
    uint32_t n_cached;
    bool registered;                   /* kvx knows the request */
    bool kv_final;                     /* kvx's final event came */
    bool kv_landed;                    /* ... and it was DONE */
    uint64_t kv_blocks_seen;           /* kvx_recv_landed at the last stall check */
    rpc_stream *prefill;               /* Prefill.Run call */
    struct dc_prefill_client *pclient; /* the prefill worker's channel and liveness */
    bool prefill_ended;
    bool have_first;
    int32_t first_token;
    uint32_t n_sent;
    int err;
    char details[160];
    int64_t t_arrival, t_prefill_start, t_progress, t_first, t_last;
    uint64_t transfer_us;
    Tandem__V1__Timings pt; /* what the prefill worker measured */
};

typedef enum { DC_CMD_CANCEL = 1 } dc_cmd_type;

typedef struct dc_cmd {
    mpscq_node node;
    dc_cmd_type type;
    rpc_call *call; /* Decode.Cancel, answered by the engine */
    char id[KVX_REQ_ID_MAX];
} dc_cmd;

typedef struct dc_prefill_client {
    char addr[256];
    rpc_client *client;
    int64_t last_alive_ns; /* KV or an answer from this worker, for any request */
} dc_prefill_client;

typedef struct dc_engine {
    dc_ctx *ctx;
    dc_req *live; /* every request this thread holds */
    uint32_t n_live;
    dc_req *queue_head, *queue_tail; /* QUEUED requests, FIFO through qnext */
    dc_prefill_client clients[64];
    int n_clients;
    uint64_t n_ended; /* requests that left the live list so far */
    wrk_heap heap;
} dc_engine;

/* ------------------------------------------------------------ handlers -- */

/* What the handlers push: a new request or a command. */
typedef struct dc_envelope {
    mpscq_node node;
    int is_cmd;
    void *item;
} dc_envelope;

static void dc__push(dc_ctx *c, int is_cmd, void *item)
{
    dc_envelope *e = malloc(sizeof(*e));
    if (!e) { /* cannot queue: answer at once */
        if (is_cmd) {
            dc_cmd *cmd = item;
            rpc_call_finish(cmd->call, TD_ENOMEM, "out of memory");
            free(cmd);
        } else {
            dc_req *r = item;
            rpc_call_finish(r->call, TD_ENOMEM, "out of memory");
            free(r->prompt);
            free(r);
        }
        return;
    }
    e->is_cmd = is_cmd;
    e->item = item;
    mpscq_push(&c->cmdq, &e->node);
}

void dc_handle_generate(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    dc_ctx *c = arg;
    const Tandem__V1__DecodeRequest *m = (const Tandem__V1__DecodeRequest *)req;
    const char *id = m->meta ? m->meta->request_id : NULL;
    if (atomic_load(&c->draining) || atomic_load(&c->health.status) != WRK_SERVING) {
        rpc_call_finish(call, TD_EUNAVAILABLE, "decode worker is draining");
        return;
    }
    if (!id || !id[0]) return (void)rpc_call_finishf(call, TD_EINVAL, "meta.request_id is empty");
    if (strlen(id) >= KVX_REQ_ID_MAX)
        return (void)rpc_call_finishf(call, TD_EINVAL, "meta.request_id is longer than %d bytes",
                                      KVX_REQ_ID_MAX - 1);
    if (m->n_prompt_token_ids == 0)
        return (void)rpc_call_finishf(call, TD_EINVAL, "prompt_token_ids is empty");
    if (!m->prefill_address || !m->prefill_address[0])
        return (void)rpc_call_finishf(call, TD_EINVAL, "prefill_address is empty");
    int vocab = c->model->cfg.vocab_size;
    for (size_t i = 0; i < m->n_prompt_token_ids; i++)
        if (m->prompt_token_ids[i] >= (uint32_t)vocab)
            return (void)rpc_call_finishf(
                call, TD_EINVAL, "prompt_token_ids[%zu] = %u is not below the vocabulary size %d",
                i, m->prompt_token_ids[i], vocab);
    const Tandem__V1__SamplingParams *sp = m->sampling;
    uint64_t max_tokens = sp && sp->max_tokens ? sp->max_tokens : 0;
    if (m->n_prompt_token_ids >= c->max_model_len)
        return (void)rpc_call_finishf(call, TD_EINVAL,
                                      "prompt of %zu tokens exceeds the context of %u tokens",
                                      m->n_prompt_token_ids, c->max_model_len);
    if (max_tokens == 0) max_tokens = c->max_model_len - m->n_prompt_token_ids;
    if (m->n_prompt_token_ids + max_tokens > c->max_model_len)
        return (void)rpc_call_finishf(
            call, TD_EINVAL,
            "prompt (%zu tokens) + max_tokens (%llu) exceeds the context of %u tokens",
            m->n_prompt_token_ids, (unsigned long long)max_tokens, c->max_model_len);
    dc_req *r = calloc(1, sizeof(*r));
    int32_t *prompt = malloc(m->n_prompt_token_ids * sizeof(int32_t));
    if (!r || !prompt) {
        free(r);
        free(prompt);
        rpc_call_finish(call, TD_ENOMEM, "out of memory");
        return;
    }
    for (size_t i = 0; i < m->n_prompt_token_ids; i++)
        prompt[i] = (int32_t)m->prompt_token_ids[i];
    r->call = call;
    r->msg = m;
    snprintf(r->id, sizeof(r->id), "%s", id);
    r->prompt = prompt;
    r->n_prompt = (uint32_t)m->n_prompt_token_ids;
    r->kv_seq = -1;
    r->t_arrival = td_now_ns();
    r->deadline_ns = rpc_call_deadline_ns(call);
    if (m->meta->timeout_ms) {
        int64_t d = rpc_deadline_from_timeout_ms(m->meta->timeout_ms);
        if (d < r->deadline_ns) r->deadline_ns = d;
    }
    /* Sampling: the same parameters tandem-generate takes. */
    smp_params p;
    char why[192];
    if (wrk_sampling(&c->model->cfg, sp, (uint64_t)td_now_ns(), r->stop_ids, DC_MAX_STOP_IDS, &p,
                     why, sizeof(why)) != 0) {
        free(r->prompt);
        free(r);
        rpc_call_finish(call, TD_EINVAL, why);
        return;
    }
    r->er = (eng_request){.id = (uint64_t)(uintptr_t)r,
                          .prompt = r->prompt,
                          .n_prompt = r->n_prompt,
                          .max_tokens = (uint32_t)max_tokens,
                          .sampling = p,
                          .priority = -m->meta->priority};
    atomic_fetch_add(&c->accepted, 1);
    dc__push(c, 0, r);
}

void dc_handle_cancel(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    dc_ctx *c = arg;
    const Tandem__V1__CancelRequest *m = (const Tandem__V1__CancelRequest *)req;
    if (!m->request_id || !m->request_id[0])
        return (void)rpc_call_finishf(call, TD_EINVAL, "request_id is empty");
    dc_cmd *cmd = calloc(1, sizeof(*cmd));
    if (!cmd) {
        rpc_call_finish(call, TD_ENOMEM, "out of memory");
        return;
    }
    cmd->type = DC_CMD_CANCEL;
    cmd->call = call;
    snprintf(cmd->id, sizeof(cmd->id), "%s", m->request_id);
    dc__push(c, 1, cmd);
}

/* -------------------------------------------------------------- engine -- */

static void dc__detail(dc_req *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void dc__detail(dc_req *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->details, sizeof(r->details), fmt, ap);
    va_end(ap);
}

static void dc__live_add(dc_engine *d, dc_req *r)
{
    r->prev = NULL;
    r->next = d->live;
    if (d->live) d->live->prev = r;
    d->live = r;
    d->n_live++;
}

static void dc__live_remove(dc_engine *d, dc_req *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        d->live = r->next;
    if (r->next) r->next->prev = r->prev;
    d->n_live--;
    d->n_ended++;
}

static dc_req *dc__find(dc_engine *d, const char *id)
{
    for (dc_req *r = d->live; r; r = r->next)
        if (strcmp(r->id, id) == 0) return r;
    return NULL;
}

static const char *dc__outcome(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case TD_ECANCELED:
        return "cancelled";
    case TD_ETIMEDOUT:
        return "deadline";
    case TD_EUNAVAILABLE:
        return "unavailable";
    case TD_EMISMATCH:
        return "mismatch";
    default:
        return "error";
    }
}

/* Ends the call (through the outbox, after any tokens queued before) and
 * frees the request. Its blocks must already be released. */
static void dc__finish(dc_engine *d, dc_req *r, int finish_reason)
{
    dc_ctx *c = d->ctx;
    dc_msg *m = dc_outbox_add(c->outbox);
    if (m) {
        m->call = r->call;
        m->final = true;
        m->err = r->err;
        m->finish_reason = finish_reason;
        snprintf(m->details, sizeof(m->details), "%s", r->details);
        m->cached_prompt_tokens = r->n_cached;
        if (r->msg->want_timings && r->err == 0) {
            Tandem__V1__Timings t = TANDEM__V1__TIMINGS__INIT;
            t.prefill_queue_us = r->pt.prefill_queue_us;
            t.prefill_us = r->pt.prefill_us;
            t.transfer_us = r->transfer_us;
            if (r->t_first) t.first_token_us = (uint64_t)(r->t_first - r->t_arrival) / 1000;
            if (r->t_first && r->t_last) t.decode_us = (uint64_t)(r->t_last - r->t_first) / 1000;
            t.e2e_us = (uint64_t)(td_now_ns() - r->t_arrival) / 1000;
            m->timings = t;
            m->has_timings = true;
        }
    } else {
        rpc_call_finish(r->call, r->err ? r->err : TD_ENOMEM, r->details);
    }
    wrk_metrics_outcome(&c->metrics, dc__outcome(r->err));
    td_log_info(MOD, "request_end", "req=%s outcome=%s tokens=%u%s%s%s", r->id, dc__outcome(r->err),
                r->n_sent, r->err ? " detail=\"" : "", r->details, r->err ? "\"" : "");
    if (r->prefill) rpc_stream_free(r->prefill);
    dc__live_remove(d, r);
    free(r->prompt);
    free(r);
}

/* Starts failing r: from here on it only waits for what still refers to its
 * blocks, then ends with err. */
static void dc__fail(dc_engine *d, dc_req *r, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void dc__fail(dc_engine *d, dc_req *r, int err, const char *fmt, ...)
{
    if (r->state == DC_CLOSING) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->details, sizeof(r->details), fmt, ap);
    va_end(ap);
    r->err = err;
    if (r->state == DC_QUEUED) {
        /* Unlink from the FIFO: it holds nothing yet. */
        dc_req **pp = &d->queue_head, *prev = NULL;
        while (*pp && *pp != r) {
            prev = *pp;
            pp = &(*pp)->qnext;
        }
        if (*pp) {
            *pp = r->qnext;
            if (d->queue_tail == r) d->queue_tail = prev;
        }
    } else if (r->state == DC_RUNNING) {
        (void)eng_abort(d->ctx->engine, r->er.id);
        r->kv_seq = -1; /* the eng freed them */
    } else if (r->state == DC_PREFILL) {
        if (r->registered && !r->kv_final) (void)kvx_cancel(d->ctx->kvx, r->id);
        if (r->prefill && !r->prefill_ended) rpc_stream_cancel(r->prefill);
    }
    r->state = DC_CLOSING;
}

/* CLOSING requests whose blocks nobody uses any more are finished. */
static void dc__reap(dc_engine *d)
{
    for (dc_req *r = d->live, *next; r; r = next) {
        next = r->next;
        if (r->state != DC_CLOSING) continue;
        if (r->registered && !r->kv_final) continue;
        if (r->prefill && !r->prefill_ended) {
            /* Read away what the prefill worker sent before the request
             * closed (its PrefillResponse can be waiting): a stream counts
             * as ended only once its messages are read, and
             * dc__poll_prefill no longer looks at a CLOSING request. Left
             * unread, the request never ended and its blocks leaked. */
            ProtobufCMessage *msg = NULL;
            int rc;
            while ((rc = rpc_stream_poll(r->prefill, &msg)) == 0 && msg) {
                protobuf_c_message_free_unpacked(msg, NULL);
                msg = NULL;
            }
            if (rc == RPC_PENDING) continue;
            r->prefill_ended = true;
        }
        if (r->kv_seq > 0) (void)kvc_seq_free(eng_kvc(d->ctx->engine), r->kv_seq);
        r->kv_seq = -1;
        dc__finish(d, r, TANDEM__V1__FINISH_REASON__FINISH_REASON_ERROR);
    }
}

static dc_prefill_client *dc__prefill_client(dc_engine *d, const char *addr)
{
    for (int i = 0; i < d->n_clients; i++)
        if (strcmp(d->clients[i].addr, addr) == 0) return &d->clients[i];
    if (d->n_clients == (int)(sizeof(d->clients) / sizeof(d->clients[0]))) return NULL;
    dc_prefill_client *pc = &d->clients[d->n_clients];
    if (rpc_client_create(addr, &pc->client) != 0) return NULL;
    snprintf(pc->addr, sizeof(pc->addr), "%s", addr);
    pc->last_alive_ns = td_now_ns();
    d->n_clients++;
    return pc;
}

/* A sign of life from r's prefill worker: this request progressed. */
static void dc__progress(dc_req *r)
{
    r->t_progress = td_now_ns();
    if (r->pclient) r->pclient->last_alive_ns = r->t_progress;
}

static void dc__wake(rpc_stream *s, void *arg)
{
    (void)s;
    dc_ctx *c = arg;
    uint64_t one = 1;
    (void)!write(c->wake_fd, &one, sizeof(one));
}

/* Requests admitted in one pass are registered with the KV transfer in one
 * call (one round trip to its progress thread, not one per request: a burst
 * of arrivals does not hold this thread for a round trip each). */
#define DC__ADMIT_BATCH 64

/* PREFILL, blocks registered (rc == 0) or not: asks the prefill worker to
 * run r's prompt into ids[0 .. nb) (the first blocks hold cached tokens),
 * or fails r. Frees ids. */
static void dc__dispatch(dc_engine *d, dc_req *r, uint32_t *ids, uint32_t nb, int rc)
{
    dc_ctx *c = d->ctx;
    if (rc != 0) {
        free(ids);
        dc__fail(d, r, rc,
                 rc == TD_EEXIST ? "request id %s is already in flight"
                                 : "cannot register the KV destination of %s",
                 r->id);
        return;
    }
    r->registered = true;
    Tandem__V1__RequestMeta meta = TANDEM__V1__REQUEST_META__INIT;
    meta.request_id = r->id;
    meta.timeout_ms = rpc_timeout_ms_left(r->deadline_ns);
    meta.admitted_unix_us = r->msg->meta->admitted_unix_us;
    meta.priority = r->msg->meta->priority;
    Tandem__V1__KvDestination dest = TANDEM__V1__KV_DESTINATION__INIT;
    dest.decode_address = "";
    dest.kv_endpoint = c->kv_endpoint;
    dest.transport = (char *)c->transport;
    dest.n_block_ids = nb;
    dest.block_ids = ids;
    dest.skip_tokens = r->n_cached;
    Tandem__V1__PrefillRequest pr = TANDEM__V1__PREFILL_REQUEST__INIT;
    pr.meta = &meta;
    pr.n_prompt_token_ids = r->n_prompt;
    pr.prompt_token_ids = (uint32_t *)r->prompt; /* ids < vocab: same bits */
    Tandem__V1__SamplingParams seeded = TANDEM__V1__SAMPLING_PARAMS__INIT;
    if (r->msg->sampling) seeded = *r->msg->sampling;
    /* The first token is drawn there with the seed the rest is drawn
     * with here. */
    seeded.seed = r->er.sampling.seed;
    seeded.has_seed = true;
    seeded.n_stop = 0;
    seeded.stop = NULL;
    pr.sampling = &seeded;
    pr.dest = &dest;
    dc_prefill_client *pc = dc__prefill_client(d, r->msg->prefill_address);
    r->pclient = pc;
    if (!pc) {
        free(ids);
        dc__fail(d, r, TD_EINVAL, "bad prefill_address \"%s\"", r->msg->prefill_address);
        return;
    }
    rc = rpc_client_stream(pc->client, "/tandem.v1.Prefill/Run", &pr.base,
                           &tandem__v1__prefill_response__descriptor, r->deadline_ns, dc__wake, c,
                           &r->prefill);
    free(ids);
    if (rc != 0) {
        r->prefill = NULL;
        dc__fail(d, r, rc, "cannot call the prefill worker: %s", td_strerror(rc));
    }
}

/* QUEUED -> PREFILL for the head of the queue while blocks last. */
static void dc__admit(dc_engine *d)
{
    dc_ctx *c = d->ctx;
    kvc_pool *pool = eng_kvc(c->engine);
    const kv_layout *l = eng_layout(c->engine);
    for (;;) {
        dc_req *batch[DC__ADMIT_BATCH];
        uint32_t *batch_ids[DC__ADMIT_BATCH], batch_nb[DC__ADMIT_BATCH];
        kvx_recv_reg regs[DC__ADMIT_BATCH];
        int rcs[DC__ADMIT_BATCH];
        int n = 0;
        while (d->queue_head && n < DC__ADMIT_BATCH) {
            dc_req *r = d->queue_head;
            /* Keep one block per running sequence in reserve so the batch
             * can grow without preempting at every step. */
            eng_stats es;
            eng_stats_get(c->engine, &es);
            uint32_t need = kvc_blocks_for(pool, r->n_prompt);
            if (kvc_available_blocks(pool) < need + es.running) break;
            kvc_seq_spec spec = {
                .tokens = r->prompt, .n_prompt = r->n_prompt, .n_slots = r->n_prompt};
            int rc = kvc_seq_alloc(pool, &spec, &r->kv_seq, &r->n_cached);
            if (rc == TD_ENOSPC) break;
            d->queue_head = r->qnext;
            if (!d->queue_head) d->queue_tail = NULL;
            r->state = DC_PREFILL;
            r->t_prefill_start = r->t_progress = td_now_ns();
            if (rc != 0) {
                r->kv_seq = -1;
                dc__fail(d, r, rc, "cannot allocate KV blocks: %s", td_strerror(rc));
                continue;
            }
            uint32_t nb = 0;
            const int32_t *table = kvc_seq_table(pool, r->kv_seq, &nb);
            uint32_t skip_blocks = r->n_cached / l->block_size;
            uint32_t *ids = malloc(nb * sizeof(uint32_t));
            if (!ids) {
                dc__fail(d, r, TD_ENOMEM, "out of memory");
                continue;
            }
            for (uint32_t i = 0; i < nb; i++)
                ids[i] = (uint32_t)table[i];
            int64_t kv_deadline = r->deadline_ns == RPC_NO_DEADLINE ? 0 : r->deadline_ns;
            regs[n] = (kvx_recv_reg){.req_id = r->id,
                                     .dst_blocks = ids + skip_blocks,
                                     .n_blocks = (int)(nb - skip_blocks),
                                     .deadline_ns = kv_deadline};
            batch[n] = r;
            batch_ids[n] = ids;
            batch_nb[n] = nb;
            n++;
        }
        if (n == 0) return;
        int ok = kvx_recv_register_batch(c->kvx, regs, n, rcs);
        for (int i = 0; i < n; i++)
            dc__dispatch(d, batch[i], batch_ids[i], batch_nb[i], ok < 0 ? ok : rcs[i]);
        if (n < DC__ADMIT_BATCH) return;
    }
}

static dc_req *dc__from_eng(uint64_t id)
{
    return (dc_req *)(uintptr_t)id;
}

/* Queues tokens for r's stream in this iteration's batch. */
static int dc__emit(dc_engine *d, dc_req *r, const int32_t *toks, uint32_t n)
{
    dc_msg *m = dc_outbox_add(d->ctx->outbox);
    if (!m) return TD_ENOMEM;
    m->call = r->call;
    for (uint32_t i = 0; i < n; i++)
        m->tokens[i] = (uint32_t)toks[i];
    m->n_tokens = n;
    r->n_sent += n;
    int64_t now = td_now_ns();
    if (r->t_last) met_histogram_observe(d->ctx->metrics.itl_seconds, td_ns_to_s(now - r->t_last));
    r->t_last = now;
    return 0;
}

static int dc__finish_reason(int f)
{
    return f == ENG_FINISH_STOP ? TANDEM__V1__FINISH_REASON__FINISH_REASON_STOP
                                : TANDEM__V1__FINISH_REASON__FINISH_REASON_LENGTH;
}

/* PREFILL -> RUNNING once the KV landed and the first token came. */
static void dc__join(dc_engine *d, dc_req *r)
{
    dc_ctx *c = d->ctx;
    kvc_pool *pool = eng_kvc(c->engine);
    int rc = kvc_seq_commit(pool, r->kv_seq, r->prompt, r->n_prompt);
    if (rc != 0) {
        dc__fail(d, r, TD_EINTERNAL, "cannot commit the landed KV: %s", td_strerror(rc));
        return;
    }
    r->t_first = td_now_ns();
    met_histogram_observe(c->metrics.ttft_seconds, td_ns_to_s(r->t_first - r->t_arrival));
    int done = ENG_FINISH_NONE;
    rc = eng_add_prefilled(c->engine, &r->er, r->kv_seq, r->first_token, &done);
    if (rc != 0) {
        dc__fail(d, r, rc, "cannot start decoding: %s", td_strerror(rc));
        return;
    }
    if (dc__emit(d, r, &r->first_token, 1) != 0) {
        if (done == ENG_FINISH_NONE)
            (void)eng_abort(c->engine, r->er.id);
        else
            (void)kvc_seq_free(pool, r->kv_seq);
        r->kv_seq = -1;
        r->state = DC_CLOSING;
        r->err = TD_ENOMEM;
        return;
    }
    if (done != ENG_FINISH_NONE) {
        (void)kvc_seq_free(pool, r->kv_seq);
        r->kv_seq = -1;
        dc__finish(d, r, dc__finish_reason(done));
        return;
    }
    r->kv_seq = -1; /* the eng owns it now */
    r->state = DC_RUNNING;
}

static void dc__on_kvx(dc_engine *d)
{
    kvx_event evs[64];
    int n;
    while ((n = kvx_ep_poll(d->ctx->kvx, evs, 64)) > 0) {
        for (int i = 0; i < n; i++) {
            const kvx_event *e = &evs[i];
            if (e->type == KVX_EV_PEER_ERROR) {
                td_log_warn(MOD, "kv_peer_error", "peer=%d err=%s msg=\"%s\"", e->peer,
                            td_err_name(e->err), e->msg);
                continue;
            }
            dc_req *r = dc__find(d, e->req_id);
            if (!r) continue;
            if (e->type == KVX_EV_LAYER_LANDED) {
                dc__progress(r);
            } else if (e->type == KVX_EV_DONE) {
                r->kv_final = r->kv_landed = true;
                r->transfer_us = (uint64_t)e->elapsed_ns / 1000;
                met_histogram_observe(d->ctx->metrics.transfer_seconds, td_ns_to_s(e->elapsed_ns));
            } else if (e->type == KVX_EV_FAILED) {
                r->kv_final = true;
                dc__fail(d, r, wrk_kv_failure_status(e->err, r->deadline_ns),
                         "KV transfer failed: %s", e->msg[0] ? e->msg : td_strerror(e->err));
            }
        }
    }
}

static void dc__poll_prefill(dc_engine *d)
{
    for (dc_req *r = d->live; r; r = r->next) {
        if (!r->prefill || r->prefill_ended || r->state == DC_CLOSING) continue;
        ProtobufCMessage *msg = NULL;
        int rc = rpc_stream_poll(r->prefill, &msg);
        if (rc == RPC_PENDING) continue;
        if (rc == 0 && msg) {
            Tandem__V1__PrefillResponse *p = (Tandem__V1__PrefillResponse *)msg;
            if (p->first_token_id >= (uint32_t)d->ctx->model->cfg.vocab_size) {
                dc__fail(d, r, TD_EPROTO, "prefill worker sent token %u", p->first_token_id);
            } else {
                r->have_first = true;
                r->first_token = (int32_t)p->first_token_id;
                dc__progress(r);
                if (p->timings) r->pt = *p->timings;
            }
            protobuf_c_message_free_unpacked(msg, NULL);
            continue;
        }
        r->prefill_ended = true;
        if (rc == 0 && !r->have_first)
            dc__fail(d, r, TD_EPROTO, "prefill worker answered without a first token");
        else if (rc != 0) {
            const rpc_status *st = rpc_stream_status(r->prefill);
            int err = rc;
            if (err == TD_ECONNREFUSED || err == TD_ECONNRESET) err = TD_EUNAVAILABLE;
            dc__fail(d, r, err, "prefill worker: %s",
                     st && st->details[0] ? st->details : td_strerror(rc));
        }
    }
}

/* Whether blocks of r landed since the last check, a progress if so. A
 * layer's KVX_EV_LAYER_LANDED comes when all its blocks are in, which a long
 * prompt prefilled in chunks reaches with its last chunk only: on a slow host
 * that is seconds of blocks landing without an event. Asked only when r looks
 * stalled (a round trip to kvx's thread). */
static bool dc__kv_moved(dc_engine *d, dc_req *r)
{
    uint64_t landed = 0;
    if (!r->registered || kvx_recv_landed(d->ctx->kvx, r->id, &landed) != 0 ||
        landed <= r->kv_blocks_seen)
        return false;
    r->kv_blocks_seen = landed;
    dc__progress(r);
    return true;
}

static void dc__check_live(dc_engine *d)
{
    int64_t now = td_now_ns();
    for (dc_req *r = d->live, *next; r; r = next) {
        next = r->next;
        if (r->state == DC_CLOSING) continue;
        if (rpc_call_cancelled(r->call))
            dc__fail(d, r, TD_ECANCELED, "cancelled by the client");
        else if (r->deadline_ns != RPC_NO_DEADLINE && now >= r->deadline_ns)
            dc__fail(d, r, TD_ETIMEDOUT, "deadline exceeded");
        else if (r->state == DC_PREFILL && r->kv_landed && r->have_first)
            dc__join(d, r);
        else if (r->state == DC_PREFILL && !r->kv_landed &&
                 now - r->t_progress > d->ctx->prefill_timeout_ns &&
                 (!r->pclient || now - r->pclient->last_alive_ns > d->ctx->prefill_timeout_ns) &&
                 !dc__kv_moved(d, r))
            /* Stalled: no progress for this request and no sign of life from
             * its prefill worker for any request (a long queue there is not a
             * stall: the worker keeps sending other requests' KV). */
            dc__fail(d, r, TD_EUNAVAILABLE, "prefill worker %s stalled (no KV for %.1f s)",
                     r->msg->prefill_address, td_ns_to_s(now - r->t_progress));
    }
}

static void dc__on_queue(dc_engine *d)
{
    dc_ctx *c = d->ctx;
    mpscq_ack(&c->cmdq);
    mpscq_node *n;
    while ((n = mpscq_pop(&c->cmdq)) != NULL) {
        dc_envelope *e = mpscq_entry(n, dc_envelope, node);
        if (e->is_cmd) {
            dc_cmd *cmd = e->item;
            dc_req *r = dc__find(d, cmd->id);
            Tandem__V1__CancelResponse resp = TANDEM__V1__CANCEL_RESPONSE__INIT;
            resp.found = r && r->state != DC_CLOSING;
            if (resp.found) dc__fail(d, r, TD_ECANCELED, "cancelled (Decode.Cancel)");
            rpc_call_reply(cmd->call, &resp.base);
            free(cmd);
        } else {
            dc_req *r = e->item;
            dc__live_add(d, r);
            if (dc__find(d, r->id) != r) {
                /* The same id is live already: ids must be unique. */
                r->state = DC_CLOSING;
                r->err = TD_EEXIST;
                dc__detail(r, "request id %s is already in flight", r->id);
            } else {
                r->state = DC_QUEUED;
                r->qnext = NULL;
                if (d->queue_tail)
                    d->queue_tail->qnext = r;
                else
                    d->queue_head = r;
                d->queue_tail = r;
            }
        }
        free(e);
    }
}

static void dc__step(dc_engine *d)
{
    dc_ctx *c = d->ctx;
    const eng_event *evs;
    uint32_t n;
    int64_t forward_ns;
    if (wrk_step(c->engine, &c->metrics, &evs, &n, &forward_ns) != 0) return;
    for (uint32_t i = 0; i < n; i++) {
        dc_req *r = dc__from_eng(evs[i].id);
        if (evs[i].finish == ENG_FINISH_ERROR) {
            r->state = DC_CLOSING;
            r->err = TD_EINTERNAL;
            dc__detail(r, "generation failed: %s",
                       evs[i].err == TD_ERANGE ? "the logits are NaN" : td_strerror(evs[i].err));
            continue;
        }
        if (dc__emit(d, r, &evs[i].token, 1) != 0) {
            if (evs[i].finish == ENG_FINISH_NONE) (void)eng_abort(c->engine, r->er.id);
            r->state = DC_CLOSING;
            r->err = TD_ENOMEM;
            continue;
        }
        if (evs[i].finish != ENG_FINISH_NONE) dc__finish(d, r, dc__finish_reason(evs[i].finish));
    }
    wrk_load_publish(&c->load, c->engine, d->n_live, forward_ns);
}

void *dc_engine_run(void *arg)
{
    dc_engine d = {.ctx = arg};
    dc_ctx *c = d.ctx;
    struct pollfd fds[3] = {{.fd = mpscq_fd(&c->cmdq), .events = POLLIN},
                            {.fd = kvx_ep_event_fd(c->kvx), .events = POLLIN},
                            {.fd = c->wake_fd, .events = POLLIN}};
    while (!atomic_load(&c->stop)) {
        dc__on_queue(&d);
        dc__on_kvx(&d);
        uint64_t v;
        (void)!read(c->wake_fd, &v, sizeof(v));
        dc__poll_prefill(&d);
        dc__check_live(&d);
        /* The prefill's tokens of the requests that just joined go out now,
         * not behind the step below: a step of a large batch takes tens of
         * milliseconds, and the client's time to first token would carry it. */
        dc_outbox_flush(c->outbox);
        dc__admit(&d);
        dc__step(&d);
        dc__reap(&d);
        dc_outbox_flush(c->outbox);
        eng_stats es;
        eng_stats_get(c->engine, &es);
        wrk_load_publish(&c->load, c->engine, d.n_live, 0);
        if (es.running == 0 && es.waiting == 0) {
            if (d.n_live == 0) (void)wrk_heap_idle(&d.heap, d.n_ended, td_now_ns());
            (void)poll(fds, 3, 20);
        }
    }
    /* Shutting down: fail what is left and wait (bounded) for the transfers
     * to let go of the blocks. */
    for (dc_req *r = d.live; r; r = r->next)
        dc__fail(&d, r, TD_EUNAVAILABLE, "decode worker is shutting down");
    int64_t until = td_now_ns() + 3000000000LL;
    while (d.live && td_now_ns() < until) {
        dc__on_kvx(&d);
        dc__poll_prefill(&d);
        dc__reap(&d);
        dc_outbox_flush(c->outbox);
        if (d.live) (void)poll(fds + 1, 2, 10);
    }
    for (dc_req *r = d.live, *next; r; r = next) { /* transfers that never ended */
        next = r->next;
        r->registered = false;
        if (r->prefill && !r->prefill_ended) rpc_stream_cancel(r->prefill);
        r->prefill_ended = true;
    }
    dc__reap(&d);
    dc_outbox_flush(c->outbox);
    for (int i = 0; i < d.n_clients; i++)
        rpc_client_free(d.clients[i].client);
    return NULL;
}
