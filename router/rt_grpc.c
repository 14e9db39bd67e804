/* The router's gRPC front end: Router.Generate for gRPC clients. The handler
 * only queues the call; the loop thread turns it into an rt_req and relays
 * the decode worker's stream as GenerateResponse messages. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "router/rt.h"

typedef struct rt_gfront {
    rpc_call *call;
    const Tandem__V1__GenerateRequest *q; /* owned by the call */
    tok_stream *detok;                    /* want_text */
    uint32_t eos_skip;                    /* tokens not to detokenize: stop ids */
} rt_gfront;

static void rt__g_tokens(rt_req *r, const uint32_t *ids, size_t n)
{
    rt_gfront *g = r->front_data;
    Tandem__V1__GenerateResponse m = TANDEM__V1__GENERATE_RESPONSE__INIT;
    m.request_id = r->id;
    m.n_token_ids = n;
    m.token_ids = (uint32_t *)ids;
    char text[4096];
    size_t len = 0;
    if (g->detok) {
        for (size_t i = 0; i < n; i++) {
            size_t w = 0;
            if (tok_stream_push(g->detok, (int32_t)ids[i], text + len, sizeof(text) - 1 - len,
                                &w) == 0)
                len += w;
        }
    }
    text[len] = '\0';
    m.text = text;
    (void)rpc_call_send(g->call, &m.base);
}

static void rt__g_end(rt_req *r, int finish, int err, const char *details)
{
    rt_gfront *g = r->front_data;
    rt_ctx *c = r->ctx;
    if (err == 0) {
        Tandem__V1__GenerateResponse m = TANDEM__V1__GENERATE_RESPONSE__INIT;
        m.request_id = r->id;
        m.finish_reason = (Tandem__V1__FinishReason)finish;
        m.prompt_tokens = r->n_prompt;
        m.completion_tokens = r->n_generated;
        Tandem__V1__Timings t = r->timings;
        Tandem__V1__Timings init = TANDEM__V1__TIMINGS__INIT;
        t.base = init.base;
        t.queue_us = (uint64_t)(r->t_dispatch - r->t_arrival) / 1000;
        t.tokenize_us = r->tokenize_us;
        t.first_token_us = r->t_first ? (uint64_t)(r->t_first - r->t_arrival) / 1000 : 0;
        t.e2e_us = (uint64_t)(td_now_ns() - r->t_arrival) / 1000;
        if (g->q->want_timings) m.timings = &t;
        m.text = "";
        (void)rpc_call_send(g->call, &m.base);
        (void)rpc_call_finish(g->call, 0, NULL);
        rt_metrics_outcome(c, "grpc_generate", "ok");
    } else {
        (void)rpc_call_finish(g->call, err, details);
        rt_metrics_outcome(c, "grpc_generate", td_err_name(err));
    }
    tok_stream_free(g->detok);
    free(g);
    rt_req_release(r);
}

static const rt_front_ops rt__grpc_front = {.tokens = rt__g_tokens, .end = rt__g_end};

static void rt__on_generate(rpc_call *call, const ProtobufCMessage *msg, void *arg)
{
    rt_event_push(arg, call, msg, RT_EV_GENERATE);
}

int rt_grpc_add_methods(rt_ctx *c, rpc_server *srv)
{
    return rpc_server_add_method(srv, "/tandem.v1.Router/Generate",
                                 &tandem__v1__generate_request__descriptor, rt__on_generate, c);
}

/* Loop thread. */
void rt_grpc_on_event(rt_ctx *c, rt_event *ev)
{
    const Tandem__V1__GenerateRequest *q = (const void *)ev->msg;
    rpc_call *call = ev->call;
    free(ev);
    if (c->stopping) {
        rpc_call_finish(call, TD_EUNAVAILABLE, "the router is shutting down");
        return;
    }
    if (q->model && q->model[0] && strcmp(q->model, c->model_name) != 0) {
        char msg[320];
        snprintf(msg, sizeof(msg), "model \"%s\" is not served here (serving \"%s\")", q->model,
                 c->model_name);
        rpc_call_finish(call, TD_ENOENT, msg);
        return;
    }
    bool has_text = q->prompt && q->prompt[0];
    if (has_text == (q->n_prompt_token_ids > 0)) {
        rpc_call_finish(call, TD_EINVAL, "give exactly one of prompt and prompt_token_ids");
        return;
    }
    if (q->sampling && q->sampling->n_stop > 0) {
        rpc_call_finish(call, TD_EINVAL,
                        "sampling.stop strings are matched by the HTTP front end only; use "
                        "stop_token_ids here");
        return;
    }
    rt_gfront *g = calloc(1, sizeof(*g));
    if (!g) {
        rpc_call_finish(call, TD_ENOMEM, "out of memory");
        return;
    }
    g->call = call;
    g->q = q;
    rt_req *r = rt_req_new(c, &rt__grpc_front, g);
    if (!r) {
        free(g);
        rpc_call_finish(call, TD_ENOMEM, "out of memory");
        return;
    }
    if (q->timeout_ms) {
        int64_t d = rpc_deadline_from_timeout_ms(q->timeout_ms);
        if (d < r->deadline_ns) r->deadline_ns = d;
    }
    int64_t call_deadline = rpc_call_deadline_ns(call);
    if (call_deadline < r->deadline_ns) r->deadline_ns = call_deadline;
    int vocab = c->tok ? tok_vocab_size(c->tok) : 0;
    if (has_text) {
        int64_t t0 = td_now_ns();
        int32_t *ids = NULL;
        size_t n = 0;
        int rc = c->tok ? tok_encode(c->tok, q->prompt, strlen(q->prompt),
                                     tok_adds_bos(c->tok) ? TOK_ADD_BOS : 0, &ids, &n)
                        : TD_EUNSUPPORTED;
        r->tokenize_us = (uint64_t)(td_now_ns() - t0) / 1000;
        if (rc != 0) {
            r->state = RT_R_ENDED;
            rt__g_end(r, 0, rc == TD_EUNSUPPORTED ? TD_EINVAL : rc,
                      rc == TD_EUNSUPPORTED ? "the router has no tokenizer: send prompt_token_ids"
                                            : "the prompt cannot be tokenized");
            return;
        }
        r->prompt = (uint32_t *)ids; /* ids < vocab: the same bits */
        r->n_prompt = (uint32_t)n;
    } else {
        r->prompt = malloc(q->n_prompt_token_ids * sizeof(uint32_t));
        if (!r->prompt) {
            r->state = RT_R_ENDED;
            rt__g_end(r, 0, TD_ENOMEM, "out of memory");
            return;
        }
        for (size_t i = 0; i < q->n_prompt_token_ids; i++) {
            if (vocab && q->prompt_token_ids[i] >= (uint32_t)vocab) {
                char msg[128];
                snprintf(msg, sizeof(msg),
                         "prompt_token_ids[%zu] = %u is not below the vocabulary size %d", i,
                         q->prompt_token_ids[i], vocab);
                r->state = RT_R_ENDED;
                rt__g_end(r, 0, TD_EINVAL, msg);
                return;
            }
            r->prompt[i] = q->prompt_token_ids[i];
        }
        r->n_prompt = (uint32_t)q->n_prompt_token_ids;
    }
    if (q->sampling) {
        r->sampling = *q->sampling;
        Tandem__V1__SamplingParams init = TANDEM__V1__SAMPLING_PARAMS__INIT;
        r->sampling.base = init.base;
        r->sampling.n_stop = 0;
        r->sampling.stop = NULL;
        r->max_tokens = q->sampling->max_tokens;
    } else {
        r->sampling = (Tandem__V1__SamplingParams)TANDEM__V1__SAMPLING_PARAMS__INIT;
    }
    r->want_timings = q->want_timings;
    if (q->want_text && c->tok) {
        if (tok_stream_create(c->tok, &g->detok) == 0)
            for (uint32_t i = 0; i < r->n_prompt; i++) { /* decode in context */
                char sink[256];
                size_t w;
                (void)tok_stream_push(g->detok, (int32_t)r->prompt[i], sink, sizeof(sink), &w);
            }
    }
    rt_req_dispatch(r);
}

/* Loop thread, on each tick: gRPC clients that went away. */
void rt_grpc_check_cancelled(rt_ctx *c)
{
    for (rt_req *r = c->live, *next; r; r = next) {
        next = r->next;
        if (r->front != &rt__grpc_front || r->state != RT_R_RUNNING || r->cancel_requested)
            continue;
        rt_gfront *g = r->front_data;
        if (rpc_call_cancelled(g->call)) rt_req_cancel(r);
    }
}
