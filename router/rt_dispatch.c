/* A request's life in the router, after its front end parsed it: admission,
 * the choice of a decode and a prefill worker, Decode.Generate, the relay of
 * its stream to the front end, one retry before the first token, cancel.
 * All on the loop thread. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "router/rt.h"

#define MOD "router"

rt_req *rt_req_new(rt_ctx *c, const rt_front_ops *front, void *front_data)
{
    rt_req *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    r->wake.kind = RT_WAKE_REQ;
    r->ctx = c;
    r->front = front;
    r->front_data = front_data;
    r->t_arrival = td_now_ns();
    r->deadline_ns = c->opts->request_timeout_ms > 0
                         ? r->t_arrival + c->opts->request_timeout_ms * 1000000LL
                         : RPC_NO_DEADLINE;
    snprintf(r->id, sizeof(r->id), "req-%08x-%06llu", c->id_salt,
             (unsigned long long)++c->next_req);
    r->next = c->live;
    if (c->live) c->live->prev = r;
    c->live = r;
    c->n_live++;
    met_gauge_set(c->metrics.inflight, c->n_live);
    return r;
}

static void rt__free(rt_req *r)
{
    rt_ctx *c = r->ctx;
    if (r->prev)
        r->prev->next = r->next;
    else
        c->live = r->next;
    if (r->next) r->next->prev = r->prev;
    c->n_live--;
    met_gauge_set(c->metrics.inflight, c->n_live);
    free(r->prompt);
    free(r->stop_ids);
    free(r);
}

/* The request leaves its prefill worker's own count (at its first token, or
 * when its attempt ends before it). */
static void rt__prefill_release(rt_req *r)
{
    rt_worker *p = r->prefill;
    if (p->inflight) p->inflight--;
    p->inflight_tokens = p->inflight_tokens > r->n_prompt ? p->inflight_tokens - r->n_prompt : 0;
}

/* Releases what the current attempt holds downstream. */
static void rt__drop_stream(rt_req *r)
{
    if (r->stream) {
        rpc_stream_free(r->stream); /* no notification follows */
        r->stream = NULL;
    }
    if (r->decode && r->decode->inflight) r->decode->inflight--;
    if (r->prefill && !r->t_first) rt__prefill_release(r);
}

static void rt__on_hold_timer(uv_timer_t *t);

static void rt__prefill_done(rt_req *r)
{
    if (!r->prefill_counted) return;
    r->ctx->inflight_prefill_tokens -= r->n_prompt;
    r->ctx->inflight_prefill_pairs -= adm_prefill_pairs(r->n_prompt);
    r->prefill_counted = false;
}

static void rt__end(rt_req *r, int finish, int err, const char *details)
{
    rt_ctx *c = r->ctx;
    if (r->state == RT_R_ENDED) return;
    rt__drop_stream(r);
    rt__prefill_done(r);
    r->state = RT_R_ENDED;
    if (r->admitted) {
        c->outstanding--;
        if (c->adm->on_end)
            c->adm->on_end(c->adm_ctx, td_now_ns(), r->t_first ? r->n_generated : 0,
                           r->t_first && r->t_last > r->t_first ? r->t_last - r->t_first : 0,
                           &r->adm_pred);
        rt_metrics_speed(c);
        /* Room freed: look at the held requests from the loop, not from
         * inside this request's end. */
        if (c->held_head) {
            c->hold_timer.data = c;
            uv_timer_start(&c->hold_timer, rt__on_hold_timer, 0, 0);
        }
    }
    int64_t now = td_now_ns();
    if (err == 0) {
        met_histogram_observe(c->metrics.e2e, td_ns_to_s(now - r->t_arrival));
        if (r->t_first)
            met_histogram_observe(c->metrics.ttft, td_ns_to_s(r->t_first - r->t_arrival));
    }
    td_log_info(MOD, "request_end",
                "req=%s err=%s prompt_tokens=%u tokens=%u attempts=%d decode=%s prefill=%s "
                "queue_us=%llu tokenize_us=%llu prefill_queue_us=%llu prefill_us=%llu "
                "transfer_us=%llu ttft_us=%lld e2e_us=%lld%s%s%s",
                r->id, err ? td_err_name(err) : "OK", r->n_prompt, r->n_generated, r->attempts,
                r->decode ? r->decode->id : "-", r->prefill ? r->prefill->id : "-",
                (unsigned long long)(r->t_dispatch ? (r->t_dispatch - r->t_arrival) / 1000 : 0),
                (unsigned long long)r->tokenize_us, (unsigned long long)r->timings.prefill_queue_us,
                (unsigned long long)r->timings.prefill_us,
                (unsigned long long)r->timings.transfer_us,
                (long long)(r->t_first ? (r->t_first - r->t_arrival) / 1000 : -1),
                (long long)((now - r->t_arrival) / 1000), err ? " detail=\"" : "",
                err ? details : "", err ? "\"" : "");
    r->front->end(r, finish, err, details);
}

static void rt__notify(rpc_stream *s, void *arg)
{
    (void)s;
    rt_req *r = arg;
    rt_wake_push(r->ctx, &r->wake);
}

/* Starts (or restarts) Decode.Generate on a fresh choice of workers. */
static void rt__start(rt_req *r)
{
    rt_ctx *c = r->ctx;
    rt_worker *old_d = r->decode, *old_p = r->prefill;
    r->decode = rt_pick_decode(c, old_d);
    r->prefill = rt_pick_prefill(c, (const int32_t *)r->prompt, r->n_prompt, old_p);
    if (!r->decode || !r->prefill) {
        char msg[128];
        snprintf(msg, sizeof(msg), "no %s worker is ready", !r->decode ? "decode" : "prefill");
        rt__end(r, TANDEM__V1__FINISH_REASON__FINISH_REASON_ERROR, TD_EUNAVAILABLE, msg);
        return;
    }
    Tandem__V1__RequestMeta meta = TANDEM__V1__REQUEST_META__INIT;
    meta.request_id = r->id;
    meta.timeout_ms = rpc_timeout_ms_left(r->deadline_ns);
    Tandem__V1__SamplingParams sp = r->sampling;
    sp.max_tokens = r->max_tokens;
    Tandem__V1__DecodeRequest q = TANDEM__V1__DECODE_REQUEST__INIT;
    q.meta = &meta;
    q.n_prompt_token_ids = r->n_prompt;
    q.prompt_token_ids = r->prompt;
    q.sampling = &sp;
    q.prefill_address = r->prefill->rpc_addr;
    q.want_timings = 1;
    r->attempts++;
    int rc = rpc_client_stream(r->decode->client, "/tandem.v1.Decode/Generate", &q.base,
                               &tandem__v1__decode_response__descriptor, r->deadline_ns, rt__notify,
                               r, &r->stream);
    if (rc != 0) {
        r->stream = NULL;
        rt__end(r, TANDEM__V1__FINISH_REASON__FINISH_REASON_ERROR, rc,
                "cannot call the decode worker");
        return;
    }
    r->decode->inflight++;
    r->prefill->inflight++;
    r->prefill->inflight_tokens += r->n_prompt;
    r->decode->served++;
    r->state = RT_R_RUNNING;
    if (!r->prefill_counted) {
        c->inflight_prefill_tokens += r->n_prompt;
        c->inflight_prefill_pairs += adm_prefill_pairs(r->n_prompt);
        r->prefill_counted = true;
    }
}

static void rt__adm_count(rt_ctx *c, const char *verdict)
{
    met_counter *k = NULL;
    const char *lv[1] = {verdict};
    if (met_counter_get(c->metrics.admission, lv, &k) == 0) met_counter_inc(k);
}

/* in->own_remaining: what each of the router's requests on a ready decode
 * worker (counted in its inflight from the call until rt__drop_stream) may
 * still generate, ascending. Left unknown when the scratch cannot grow. */
static void rt__adm_remaining(rt_ctx *c, adm_input *in)
{
    adm_remaining *rem = &c->adm_remaining;
    rem->n = 0;
    for (const rt_req *o = c->live; o; o = o->next) {
        if (!o->stream || !o->decode || o->decode->state != RT_W_READY) continue;
        /* max_tokens 0 (no context length known): no bound, last to leave. */
        uint32_t left = !o->max_tokens                   ? UINT32_MAX
                        : o->max_tokens > o->n_generated ? o->max_tokens - o->n_generated
                                                         : 0;
        /* Out of memory: no list (unknown), not a short one that would
         * promise an early drain. */
        if (adm_remaining_push(rem, left) != 0) return;
    }
    adm_input_set_remaining(in, rem->v, rem->n);
}

/* What the admission policy sees for r now. */
static void rt__adm_input(rt_ctx *c, const rt_req *r, adm_input *in)
{
    memset(in, 0, sizeof(*in));
    in->now_ns = td_now_ns();
    in->outstanding = c->outstanding;
    in->held = c->n_held - (r->state == RT_R_HELD ? 1 : 0);
    in->prompt_tokens = r->n_prompt;
    in->max_tokens = r->max_tokens;
    in->inflight_prefill_tokens = c->inflight_prefill_tokens;
    in->inflight_prefill_pairs = c->inflight_prefill_pairs;
    in->hold_until_ns = r->state == RT_R_HELD ? r->hold_until_ns : 0;
    for (uint32_t i = 0; i < c->n_workers; i++) {
        const rt_worker *w = c->workers[i];
        if (w->state != RT_W_READY) continue;
        if (w->role == RT_PREFILL) {
            adm_input_add_prefill(in, w->inflight_tokens, w->inflight_tokens_at_load,
                                  w->load.queued_prefill_tokens);
        } else {
            adm_input_add_decode(in, w->inflight, w->inflight_at_load, w->load.running_seqs,
                                 w->load.waiting_seqs, w->load.free_kv_blocks,
                                 w->load.total_kv_blocks);
            if (w->block_size) in->block_size = w->block_size;
        }
    }
    if (c->adm->uses_remaining) rt__adm_remaining(c, in);
}

static void rt__unhold(rt_ctx *c, rt_req *r)
{
    if (r->hprev)
        r->hprev->hnext = r->hnext;
    else
        c->held_head = r->hnext;
    if (r->hnext)
        r->hnext->hprev = r->hprev;
    else
        c->held_tail = r->hprev;
    r->hprev = r->hnext = NULL;
    c->n_held--;
    met_gauge_set(c->metrics.held, c->n_held);
    r->state = RT_R_NEW;
}

static void rt__admit(rt_req *r, const adm_pred *pred)
{
    rt_ctx *c = r->ctx;
    r->admitted = true;
    r->t_admit = td_now_ns();
    r->adm_pred = *pred;
    c->outstanding++;
    met_histogram_observe(c->metrics.queue, td_ns_to_s(r->t_admit - r->t_arrival));
    rt__start(r);
}

static void rt__on_hold_timer(uv_timer_t *t)
{
    rt_admission_pass(t->data);
}

/* The hold timer fires at the earliest deadline in the queue (deadlines are
 * not in queue order). */
static void rt__arm_hold_timer(rt_ctx *c)
{
    int64_t first = 0;
    for (rt_req *r = c->held_head; r; r = r->hnext)
        if (!first || r->hold_until_ns < first) first = r->hold_until_ns;
    if (!first) {
        uv_timer_stop(&c->hold_timer);
        return;
    }
    int64_t ms = (first - td_now_ns() + 999999) / 1000000;
    c->hold_timer.data = c;
    uv_timer_start(&c->hold_timer, rt__on_hold_timer, (uint64_t)(ms > 0 ? ms : 0), 0);
}

void rt_admission_pass(rt_ctx *c)
{
    if (!c->held_head) return;
    int64_t now = td_now_ns();
    for (rt_req *r = c->held_head, *next; r; r = next) {
        next = r->hnext;
        adm_input in;
        rt__adm_input(c, r, &in);
        adm_decision d;
        c->adm->recheck(c->adm_ctx, &in, &d);
        if (d.verdict == ADM_HOLD && now < r->hold_until_ns) continue;
        rt__unhold(c, r);
        if (d.verdict == ADM_ADMIT) {
            rt__adm_count(c, "admitted_after_hold");
            rt__admit(r, &d.pred);
        } else {
            /* Rejected, or its time in the queue ran out: 429, never a late
             * answer. */
            rt__adm_count(c, d.verdict == ADM_HOLD ? "hold_timeout" : "rejected_after_hold");
            r->retry_after_s = d.retry_after_s ? d.retry_after_s : 1;
            rt__end(r, 0, TD_EDECLINED,
                    d.verdict == ADM_HOLD ? "held past its deadline" : d.reason);
        }
    }
    rt__arm_hold_timer(c);
}

void rt_req_dispatch(rt_req *r)
{
    rt_ctx *c = r->ctx;
    r->t_dispatch = td_now_ns();
    uint32_t ctx_len = c->max_model_len;
    char msg[192];
    if (r->n_prompt == 0) {
        rt__end(r, 0, TD_EINVAL, "the prompt is empty");
        return;
    }
    if (ctx_len && r->n_prompt >= ctx_len) {
        snprintf(msg, sizeof(msg), "prompt of %u tokens exceeds the context of %u tokens",
                 r->n_prompt, ctx_len);
        rt__end(r, 0, TD_ETOOLONG, msg);
        return;
    }
    if (r->max_tokens == 0 && ctx_len) r->max_tokens = ctx_len - r->n_prompt;
    if (ctx_len && (uint64_t)r->n_prompt + r->max_tokens > ctx_len) {
        snprintf(msg, sizeof(msg),
                 "prompt (%u tokens) + max_tokens (%u) exceeds the context of %u tokens",
                 r->n_prompt, r->max_tokens, ctx_len);
        rt__end(r, 0, TD_ETOOLONG, msg);
        return;
    }
    /* Admission: pure policy code over what the router knows now. */
    adm_input in;
    rt__adm_input(c, r, &in);
    adm_decision d;
    c->adm->decide(c->adm_ctx, &in, &d);
    rt__adm_count(c, d.verdict == ADM_ADMIT  ? "admitted"
                     : d.verdict == ADM_HOLD ? "held"
                                             : "rejected");
    if (d.verdict == ADM_REJECT) {
        r->retry_after_s = d.retry_after_s ? d.retry_after_s : 1;
        rt__end(r, 0, TD_EDECLINED, d.reason);
        return;
    }
    if (d.verdict == ADM_HOLD && c->adm->recheck) {
        /* Absorb a short burst: wait here, costing the workers nothing,
         * until the policy admits it or its deadline passes. */
        r->state = RT_R_HELD;
        r->hold_until_ns = d.hold_until_ns;
        r->hprev = c->held_tail;
        r->hnext = NULL;
        if (c->held_tail)
            c->held_tail->hnext = r;
        else
            c->held_head = r;
        c->held_tail = r;
        c->n_held++;
        met_gauge_set(c->metrics.held, c->n_held);
        rt__arm_hold_timer(c);
        return;
    }
    rt__admit(r, &d.pred);
}

/* Prefill workers in rotation other than w. */
static uint32_t rt__ready_prefill_besides(const rt_ctx *c, const rt_worker *w)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < c->n_workers; i++)
        if (c->workers[i] != w && c->workers[i]->role == RT_PREFILL &&
            c->workers[i]->state == RT_W_READY)
            n++;
    return n;
}

static bool rt__retryable(int err)
{
    return err == TD_EUNAVAILABLE || err == TD_ECONNRESET || err == TD_ECONNREFUSED ||
           err == TD_EMISMATCH || err == TD_EAGAIN;
}

void rt_req_on_wake(rt_req *r)
{
    rt_ctx *c = r->ctx;
    if (r->state != RT_R_RUNNING || !r->stream) return;
    for (;;) {
        if (r->paused) return; /* resumed by the front end's drain callback */
        ProtobufCMessage *msg = NULL;
        int rc = rpc_stream_poll(r->stream, &msg);
        if (rc == RPC_PENDING) return;
        if (rc == 0 && msg) {
            Tandem__V1__DecodeResponse *m = (Tandem__V1__DecodeResponse *)msg;
            if (m->n_token_ids && !r->t_first) {
                r->t_first = td_now_ns();
                rt__prefill_release(r);
                rt__prefill_done(r);
                if (c->adm->on_first_token)
                    c->adm->on_first_token(c->adm_ctx, r->t_first, r->t_first - r->t_arrival,
                                           r->t_admit, &r->adm_pred);
                rt_metrics_speed(c);
            }
            if (m->n_token_ids) {
                int64_t now = td_now_ns();
                if (r->t_last) met_histogram_observe(c->metrics.itl, td_ns_to_s(now - r->t_last));
                r->t_last = now;
            }
            r->n_generated += (uint32_t)m->n_token_ids;
            if (m->finish_reason) {
                r->finish = m->finish_reason;
                r->cached_prompt_tokens = m->cached_prompt_tokens;
                if (m->timings) {
                    r->timings = *m->timings;
                    Tandem__V1__Timings init = TANDEM__V1__TIMINGS__INIT;
                    r->timings.base = init.base;
                }
            }
            if (m->n_token_ids && !r->cancel_requested)
                r->front->tokens(r, m->token_ids, m->n_token_ids);
            protobuf_c_message_free_unpacked(msg, NULL);
            if (r->state != RT_R_RUNNING) return; /* the front end ended it (stop string) */
            continue;
        }
        if (rc == 0) { /* the stream ended OK */
            rt__end(r, r->finish ? r->finish : TANDEM__V1__FINISH_REASON__FINISH_REASON_LENGTH, 0,
                    NULL);
            return;
        }
        const rpc_status *st = rpc_stream_status(r->stream);
        char details[256];
        snprintf(details, sizeof(details), "%s",
                 st && st->details[0] ? st->details : td_strerror(rc));
        if (st && !st->from_peer && rc == TD_EUNAVAILABLE)
            rt_members_mark_down(c, r->decode, "a call failed: unreachable");
        /* The decode worker could not reach or lost the prefill worker (its
         * messages for that start with "prefill worker"): out of rotation
         * until its next heartbeat and health check. That is one decode
         * worker's word, and its own link may be what failed (then every
         * prefill worker looks lost from it at once), so the last ready
         * prefill worker is not taken out on it: the retry goes to another
         * decode worker (rt_pick_decode avoids this one) and can still use
         * it. */
        if (st && st->from_peer && rc == TD_EUNAVAILABLE &&
            strncmp(st->details, "prefill worker", 14) == 0 &&
            rt__ready_prefill_besides(c, r->prefill) > 0)
            rt_members_mark_down(c, r->prefill, "a decode worker could not use it");
        if (r->cancel_requested) {
            rt__end(r, TANDEM__V1__FINISH_REASON__FINISH_REASON_CANCELLED, TD_ECANCELED,
                    "cancelled");
            return;
        }
        bool can_retry = r->n_generated == 0 && r->attempts < 2 && rt__retryable(rc) &&
                         (r->deadline_ns == RPC_NO_DEADLINE || td_now_ns() < r->deadline_ns);
        if (can_retry) {
            td_log_warn(MOD, "retry", "req=%s err=%s decode=%s prefill=%s detail=\"%s\"", r->id,
                        td_err_name(rc), r->decode->id, r->prefill->id, details);
            met_counter_inc(c->metrics.retries);
            rt__drop_stream(r);
            rt__start(r);
            return;
        }
        rt__end(r, TANDEM__V1__FINISH_REASON__FINISH_REASON_ERROR, rc, details);
        return;
    }
}

void rt_req_cancel(rt_req *r)
{
    r->cancel_requested = true;
    if (r->state == RT_R_RUNNING && r->stream) {
        rpc_stream_cancel(r->stream); /* the decode worker cancels the prefill */
        return;
    }
    if (r->state == RT_R_HELD) {
        rt__unhold(r->ctx, r);
        rt__arm_hold_timer(r->ctx);
    }
    if (r->state == RT_R_NEW)
        rt__end(r, TANDEM__V1__FINISH_REASON__FINISH_REASON_CANCELLED, TD_ECANCELED, "cancelled");
}

void rt_req_finish_early(rt_req *r, int finish)
{
    /* The front end decided the end (a stop string): cancel downstream and
     * end now with a normal finish. */
    r->cancel_requested = true;
    rt__end(r, finish, 0, NULL);
}

void rt_req_release(rt_req *r)
{
    if (atomic_load(&r->wake.queued)) {
        r->released = true; /* freed when its queued wake-up is popped */
        return;
    }
    rt__free(r);
}

void rt_req_on_popped(rt_req *r)
{
    if (r->released) {
        rt__free(r);
        return;
    }
    rt_req_on_wake(r);
}
