/* lt_grpc: Router.Generate streams for the replay (see lt_grpc.h). */
#include "loadtest/lt_grpc.h"

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "loadtest/lt_prompt.h"
#include "loadtest/lt_replay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef TANDEM_LT_HAVE_GRPC

#include "common/rpc.h"
#include "proto/tandem.pb-c.h"

#include <pthread.h>

#define LT_GRPC_METHOD "/tandem.v1.Router/Generate"

struct gstream {
    lt_grpc *g;
    size_t i;
    rpc_stream *s;    /* NULL when not started or freed */
    int64_t send_abs; /* td_now_ns() at send */
    int32_t usage;    /* completion_tokens of the final message, -1 when absent */
    int32_t tokens;   /* token ids received */
    int queued;       /* on the ready list (under g->mu) */
};

struct lt_grpc {
    uv_async_t wake;
    int wake_open;
    rpc_client *client;
    const lt_replay_opts *o;
    const lt_req *reqs;
    lt_record *recs;
    size_t n;
    lt_grpc_done_fn done;
    void *done_arg;
    struct gstream *gs; /* [n] */
    uint32_t *ids;      /* token-id prompt buffer, [max input tokens] */
    size_t ids_cap;
    pthread_mutex_t mu;
    size_t *ready; /* ring of request indices with news, [n], under mu */
    size_t ready_head, ready_len;
};

/* CQ thread: queue the request and wake the loop. */
static void on_notify(rpc_stream *s, void *arg)
{
    (void)s;
    struct gstream *st = arg;
    lt_grpc *g = st->g;
    pthread_mutex_lock(&g->mu);
    if (!st->queued) {
        st->queued = 1;
        g->ready[(g->ready_head + g->ready_len) % g->n] = st->i;
        g->ready_len++;
    }
    pthread_mutex_unlock(&g->mu);
    uv_async_send(&g->wake);
}

static void finish(lt_grpc *g, struct gstream *st, enum lt_outcome outcome)
{
    lt_record *r = &g->recs[st->i];
    r->outcome = outcome;
    r->e2e_ns = td_now_ns() - st->send_abs;
    r->output_tokens = st->usage >= 0 ? st->usage : st->tokens;
    rpc_stream_free(st->s);
    st->s = NULL;
    g->done(g->done_arg, st->i);
}

static void fail_status(lt_grpc *g, struct gstream *st, int rc)
{
    const rpc_status *status = rpc_stream_status(st->s);
    lt_record *r = &g->recs[st->i];
    r->http_status = status->grpc_code;
    snprintf(r->error, sizeof(r->error), "grpc %d %s: %.60s", status->grpc_code, td_err_name(rc),
             status->details);
    /* RESOURCE_EXHAUSTED from admission control is the gRPC face of a 429. */
    finish(g, st, rc == TD_EDECLINED || rc == TD_EAGAIN ? LT_REJECTED : LT_ERROR);
}

/* Loop thread: take everything a stream has. */
static void drain(lt_grpc *g, struct gstream *st)
{
    lt_record *r = &g->recs[st->i];
    while (st->s) {
        ProtobufCMessage *m = NULL;
        int rc = rpc_stream_poll(st->s, &m);
        if (rc == RPC_PENDING) return; /* another notify follows every completion */
        if (rc == 0 && m) {
            Tandem__V1__GenerateResponse *resp = (Tandem__V1__GenerateResponse *)m;
            if (resp->n_token_ids > 0) {
                int64_t t = td_now_ns() - st->send_abs;
                if (r->n_chunks == 0) r->ttft_ns = t;
                if (r->n_chunks < r->chunk_cap) r->chunk_ns[r->n_chunks] = t;
                r->n_chunks++;
                st->tokens += (int32_t)resp->n_token_ids;
            }
            if (resp->finish_reason != TANDEM__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED &&
                resp->completion_tokens > 0)
                st->usage = (int32_t)resp->completion_tokens;
            protobuf_c_message_free_unpacked(m, NULL);
            continue;
        }
        if (rc == 0) { /* ended with OK */
            r->http_status = 0;
            finish(g, st, LT_OK);
            return;
        }
        fail_status(g, st, rc);
        return;
    }
}

static void on_wake(uv_async_t *a)
{
    lt_grpc *g = a->data;
    for (;;) {
        pthread_mutex_lock(&g->mu);
        if (g->ready_len == 0) {
            pthread_mutex_unlock(&g->mu);
            return;
        }
        size_t i = g->ready[g->ready_head];
        g->ready_head = (g->ready_head + 1) % g->n;
        g->ready_len--;
        g->gs[i].queued = 0;
        pthread_mutex_unlock(&g->mu);
        drain(g, &g->gs[i]);
    }
}

int lt_grpc_create(uv_loop_t *loop, const char *target, const lt_replay_opts *o, const lt_req *reqs,
                   lt_record *recs, size_t n, lt_grpc_done_fn done, void *arg, lt_grpc **out)
{
    if (!loop || !target || !o || !done || !out) return TD_EINVAL;
    lt_grpc *g = calloc(1, sizeof(*g));
    if (!g) return TD_ENOMEM;
    size_t cap = n ? n : 1;
    g->gs = calloc(cap, sizeof(*g->gs));
    g->ready = calloc(cap, sizeof(size_t));
    int32_t max_in = 1;
    for (size_t i = 0; i < n; i++)
        max_in = reqs[i].input_tokens > max_in ? reqs[i].input_tokens : max_in;
    g->ids_cap = (size_t)max_in;
    g->ids = malloc(g->ids_cap * sizeof(uint32_t));
    if (!g->gs || !g->ready || !g->ids) {
        lt_grpc_free(g);
        return TD_ENOMEM;
    }
    int rc = rpc_client_create(target, &g->client);
    if (rc) {
        lt_grpc_free(g);
        return rc;
    }
    pthread_mutex_init(&g->mu, NULL);
    g->o = o;
    g->reqs = reqs;
    g->recs = recs;
    g->n = cap;
    g->done = done;
    g->done_arg = arg;
    for (size_t i = 0; i < n; i++) {
        g->gs[i].g = g;
        g->gs[i].i = i;
        g->gs[i].usage = -1;
    }
    uv_async_init(loop, &g->wake, on_wake);
    g->wake.data = g;
    g->wake_open = 1;
    *out = g;
    return 0;
}

void lt_grpc_send(lt_grpc *g, size_t i, int64_t start_ns)
{
    const lt_req *q = &g->reqs[i];
    struct gstream *st = &g->gs[i];
    lt_record *r = &g->recs[i];
    Tandem__V1__SamplingParams sp = TANDEM__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = (uint32_t)q->output_tokens;
    sp.ignore_eos = 1;
    Tandem__V1__GenerateRequest req = TANDEM__V1__GENERATE_REQUEST__INIT;
    req.model = (char *)(g->o->model ? g->o->model : "");
    req.sampling = &sp;
    req.timeout_ms = g->o->timeout_ns > 0 ? (uint64_t)(g->o->timeout_ns / TD_NS_PER_MS) : 0;
    char client_id[32];
    snprintf(client_id, sizeof(client_id), "lt-%zu", i);
    req.client_request_id = client_id;
    lt_prompt_shape shape = {.block_tokens = g->o->block_tokens};
    const lt_prompt_shape *shp = NULL;
    if (g->o->hashes && q->n_hash > 0) {
        shape.hashes = g->o->hashes + q->hash_off;
        shape.n_hash = q->n_hash;
        shp = &shape;
    }
    char *text = NULL;
    size_t text_len;
    int prc = 0;
    if (lt_prompt_is_text(g->o->prompt)) {
        prc = lt_prompt_text(g->o->prompt, q->input_tokens, (uint64_t)i, shp, &text, &text_len);
        req.prompt = text;
    } else {
        req.n_prompt_token_ids =
            lt_prompt_ids(g->o->prompt, q->input_tokens, (uint64_t)i, shp, g->ids, g->ids_cap);
        req.prompt_token_ids = g->ids;
    }
    int64_t deadline = g->o->timeout_ns > 0 ? td_now_ns() + g->o->timeout_ns : RPC_NO_DEADLINE;
    st->send_abs = td_now_ns();
    r->send_ns = st->send_abs - start_ns;
    r->attempts = 1;
    int rc = prc ? prc
                 : rpc_client_stream(g->client, LT_GRPC_METHOD, &req.base,
                                     &tandem__v1__generate_response__descriptor, deadline,
                                     on_notify, st, &st->s);
    free(text);
    if (rc) {
        snprintf(r->error, sizeof(r->error), "grpc start: %s", td_strerror(rc));
        r->outcome = LT_ERROR;
        r->e2e_ns = td_now_ns() - st->send_abs;
        st->s = NULL;
        g->done(g->done_arg, i);
    }
}

void lt_grpc_close(lt_grpc *g)
{
    if (!g || !g->wake_open) return;
    g->wake_open = 0;
    for (size_t i = 0; i < g->n; i++)
        if (g->gs[i].s) rpc_stream_cancel(g->gs[i].s);
    /* Free them before the handle closes: a stream's notify (CQ thread)
     * calls uv_async_send on it, which must not happen once it is closed
     * (nor after the loop is gone). rpc_stream_free waits for the cancelled
     * batches and any running notify. */
    for (size_t i = 0; i < g->n; i++) {
        rpc_stream_free(g->gs[i].s);
        g->gs[i].s = NULL;
    }
    uv_close((uv_handle_t *)&g->wake, NULL);
}

void lt_grpc_free(lt_grpc *g)
{
    if (!g) return;
    if (g->gs) {
        for (size_t i = 0; i < g->n; i++)
            rpc_stream_free(g->gs[i].s);
    }
    if (g->client) {
        rpc_client_free(g->client);
        pthread_mutex_destroy(&g->mu);
    }
    free(g->gs);
    free(g->ready);
    free(g->ids);
    free(g);
}

#else /* built without gRPC */

int lt_grpc_create(uv_loop_t *loop, const char *target, const struct lt_replay_opts *o,
                   const lt_req *reqs, lt_record *recs, size_t n, lt_grpc_done_fn done, void *arg,
                   lt_grpc **out)
{
    (void)loop, (void)target, (void)o, (void)reqs, (void)recs, (void)n, (void)done, (void)arg;
    (void)out;
    return TD_EUNSUPPORTED;
}

void lt_grpc_send(lt_grpc *g, size_t i, int64_t start_ns)
{
    (void)g, (void)i, (void)start_ns;
}

void lt_grpc_close(lt_grpc *g)
{
    (void)g;
}

void lt_grpc_free(lt_grpc *g)
{
    (void)g;
}

#endif
