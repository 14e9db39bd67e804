/* The sender thread of the decode worker: turns each engine iteration's batch
 * of dc_msg into DecodeResponse messages and call finishes. One batch per
 * iteration (one allocation, one wake-up), whatever the number of requests. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "decode/dc.h"

typedef struct dc_batch {
    mpscq_node node;
    uint32_t n, cap;
    dc_msg msgs[];
} dc_batch;

struct dc_outbox {
    mpscq q;
    pthread_t thread;
    _Atomic int stop;
    dc_batch *cur; /* engine thread's batch being filled */
};

static void dc__send(dc_msg *m)
{
    if (m->n_tokens > 0 || m->final) {
        Tandem__V1__DecodeResponse r = TANDEM__V1__DECODE_RESPONSE__INIT;
        r.n_token_ids = m->n_tokens;
        r.token_ids = m->tokens;
        if (m->final && m->err == 0) {
            r.finish_reason = (Tandem__V1__FinishReason)m->finish_reason;
            r.cached_prompt_tokens = m->cached_prompt_tokens;
            if (m->has_timings) r.timings = &m->timings;
        }
        /* An error ends the stream with its status; tokens before it still
         * go out. */
        if (m->n_tokens > 0 || m->err == 0) (void)rpc_call_send(m->call, &r.base);
    }
    if (m->final) (void)rpc_call_finish(m->call, m->err, m->err ? m->details : NULL);
}

static void dc__drain(dc_outbox *o)
{
    mpscq_node *n;
    while ((n = mpscq_pop(&o->q)) != NULL) {
        dc_batch *b = mpscq_entry(n, dc_batch, node);
        for (uint32_t i = 0; i < b->n; i++)
            dc__send(&b->msgs[i]);
        free(b);
    }
}

static void *dc__outbox_thread(void *arg)
{
    dc_outbox *o = arg;
    for (;;) {
        int rc = mpscq_wait(&o->q, 100000000LL);
        dc__drain(o);
        if (rc != 0 && rc != TD_ETIMEDOUT) break;
        if (atomic_load(&o->stop)) {
            dc__drain(o);
            break;
        }
    }
    return NULL;
}

int dc_outbox_create(dc_outbox **out)
{
    *out = NULL;
    dc_outbox *o = calloc(1, sizeof(*o));
    if (!o) return TD_ENOMEM;
    int rc = mpscq_init(&o->q);
    if (rc != 0) {
        free(o);
        return rc;
    }
    if (pthread_create(&o->thread, NULL, dc__outbox_thread, o) != 0) {
        mpscq_close(&o->q);
        free(o);
        return TD_ENOMEM;
    }
    *out = o;
    return 0;
}

dc_msg *dc_outbox_add(dc_outbox *o)
{
    dc_batch *b = o->cur;
    if (!b || b->n == b->cap) {
        uint32_t cap = b ? b->cap * 2 : 16;
        dc_batch *nb = realloc(b, sizeof(*nb) + cap * sizeof(dc_msg));
        if (!nb) return NULL;
        if (!b) nb->n = 0;
        nb->cap = cap;
        o->cur = b = nb;
    }
    dc_msg *m = &b->msgs[b->n++];
    memset(m, 0, sizeof(*m));
    return m;
}

void dc_outbox_flush(dc_outbox *o)
{
    if (!o->cur || o->cur->n == 0) return;
    mpscq_push(&o->q, &o->cur->node);
    o->cur = NULL;
}

void dc_outbox_free(dc_outbox *o)
{
    if (!o) return;
    dc_outbox_flush(o);
    free(o->cur);
    atomic_store(&o->stop, 1);
    dc_batch *wake = calloc(1, sizeof(*wake)); /* an empty batch wakes the thread at once */
    if (wake) mpscq_push(&o->q, &wake->node);  /* (else it notices within 100 ms) */
    pthread_join(o->thread, NULL);
    mpscq_close(&o->q);
    free(o);
}
