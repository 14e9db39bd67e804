/* The sender thread of the decode worker: turns each engine iteration's batch
 * of dc_msg into DecodeResponse messages and call finishes. One wake-up per
 * iteration, whatever the number of requests. Batches are objects of one size
 * from a wrk_pool, taken by the engine thread and given back by the sender
 * thread once sent: an iteration allocates nothing (it used to malloc a batch
 * sized to its requests on the engine thread for the sender thread to free,
 * once per token step). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "decode/dc.h"
#include "worker/wrk_pool.h"

typedef struct dc_batch {
    mpscq_node node;
    uint32_t n; /* messages filled, at most dc_outbox.batch_msgs */
    dc_msg msgs[];
} dc_batch;

/* Batches made at start, and kept idle at most. A step usually fills a
 * few messages of a batch, and the sender can fall some steps behind on a
 * busy host (under heaptrack, with 16 kept, one step in twelve still had to
 * malloc a batch): 64 small batches are kept rather than a few large ones. */
#define DC_BATCHES_PREALLOC 16
#define DC_BATCHES_KEEP     64

struct dc_outbox {
    mpscq q;
    pthread_t thread;
    _Atomic int stop;
    uint32_t batch_msgs; /* messages per batch */
    wrk_pool batches;    /* dc_batch of batch_msgs messages each */
    dc_batch *cur;       /* engine thread's batch being filled */
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
        wrk_pool_put(&o->batches, b); /* sent: the engine thread may fill it again */
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

int dc_outbox_create(uint32_t batch_msgs, dc_outbox **out)
{
    *out = NULL;
    if (batch_msgs == 0) return TD_EINVAL;
    dc_outbox *o = calloc(1, sizeof(*o));
    if (!o) return TD_ENOMEM;
    o->batch_msgs = batch_msgs;
    int rc = wrk_pool_init(&o->batches, sizeof(dc_batch) + (size_t)batch_msgs * sizeof(dc_msg),
                           DC_BATCHES_PREALLOC, DC_BATCHES_KEEP);
    if (rc != 0) goto fail;
    rc = mpscq_init(&o->q);
    if (rc != 0) goto fail;
    if (pthread_create(&o->thread, NULL, dc__outbox_thread, o) != 0) {
        mpscq_close(&o->q);
        rc = TD_ENOMEM;
        goto fail;
    }
    *out = o;
    return 0;
fail:
    wrk_pool_fini(&o->batches);
    free(o);
    return rc;
}

dc_msg *dc_outbox_add(dc_outbox *o)
{
    /* A full batch goes to the sender now and the next one continues it:
     * the queue keeps them in order. */
    if (o->cur && o->cur->n == o->batch_msgs) dc_outbox_flush(o);
    if (!o->cur) {
        dc_batch *b = wrk_pool_get(&o->batches);
        if (!b) return NULL;
        memset(&b->node, 0, sizeof(b->node));
        b->n = 0;
        o->cur = b;
    }
    dc_msg *m = &o->cur->msgs[o->cur->n++];
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
    atomic_store(&o->stop, 1);
    /* An empty batch wakes the thread at once (else it notices within
     * 100 ms). */
    dc_batch *wake = wrk_pool_get(&o->batches);
    if (wake) {
        memset(&wake->node, 0, sizeof(wake->node));
        wake->n = 0;
        mpscq_push(&o->q, &wake->node);
    }
    pthread_join(o->thread, NULL);
    /* The thread may have ended before the wake-up batch arrived: take back
     * what is left, so every batch is in the pool before fini frees it. */
    dc__drain(o);
    mpscq_close(&o->q);
    wrk_pool_fini(&o->batches);
    free(o);
}
