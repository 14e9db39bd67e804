/* The decode worker (tandem-decode), internal interfaces.
 *
 * Threads and who owns what:
 *   gRPC CQ thread   runs dc_handle_generate / dc_handle_cancel: checks the
 *                    request against the model (read-only facts) and pushes a
 *                    dc_req or dc_cmd onto the engine's queue. Touches nothing
 *                    else.
 *   engine thread    dc_engine_run: owns the eng (scheduler, block pool,
 *                    backend), every dc_req from its pop to its finish, the
 *                    prefill streams and the kvx receive registrations.
 *   sender thread    dc_outbox: takes one batch of stream messages per engine
 *                    iteration and sends them (the engine thread never writes
 *                    a socket per token).
 *   kvx thread       the transfer endpoint's progress thread (kvx.h).
 *
 * A request's KV blocks: allocated by the engine thread when the request
 * leaves the queue, registered with kvx; kvx owns them until its final event
 * for that request (DONE: committed and handed to the scheduler with
 * eng_add_prefilled; FAILED: freed). The eng frees them when the request
 * finishes or is aborted.
 */
#ifndef TANDEM_DECODE_DC_H
#define TANDEM_DECODE_DC_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/mpscq.h"
#include "common/rpc.h"
#include "engine/runtime/eng.h"
#include "kvtransfer/kvx.h"
#include "proto/tandem.pb-c.h"
#include "worker/wrk.h"

typedef struct dc_outbox dc_outbox;

/* One stream message for the sender thread. */
typedef struct dc_msg {
    rpc_call *call;
    uint32_t n_tokens;
    uint32_t tokens[4];
    bool final;        /* finish the call after this message */
    int finish_reason; /* Tandem__V1__FinishReason for the final message */
    int err;           /* final: 0 or the TD_E* status */
    char details[160]; /* final with err: the status message */
    uint32_t cached_prompt_tokens;
    bool has_timings;
    Tandem__V1__Timings timings;
} dc_msg;

/* Batch size of the decode worker's outbox (messages): what a step of a
 * few running requests fills; a larger step chains batches. */
#define DC_OUTBOX_BATCH_MSGS 16

/* Starts the sender thread, with batches of batch_msgs messages. */
int dc_outbox_create(uint32_t batch_msgs, dc_outbox **out);
/* Engine thread: a slot for the next message of the current batch (NULL when
 * out of memory: the caller fails the request's call directly). The slot is
 * the engine thread's until dc_outbox_flush, then the sender thread's until
 * sent; its batch goes back to the outbox's pool after that. */
dc_msg *dc_outbox_add(dc_outbox *o);
/* Engine thread: hands the current batch (if any) to the sender thread. */
void dc_outbox_flush(dc_outbox *o);
/* Sends what is queued, stops the thread, frees. */
void dc_outbox_free(dc_outbox *o);

/* The worker's shared context. Written by main before the threads start;
 * the atomics are the only fields that change after. */
typedef struct dc_ctx {
    const wrk_opts *opts;
    const mdl_model *model;
    eng *engine;
    kvx_ep *kvx;
    char kv_endpoint[512]; /* what prefill workers dial */
    const char *transport;
    uint32_t max_model_len;
    int64_t prefill_timeout_ns;
    wrk_health health;
    wrk_load load;
    wrk_metrics metrics;
    dc_outbox *outbox;
    mpscq cmdq;
    int wake_fd; /* eventfd: a prefill stream has news */
    _Atomic int draining;
    _Atomic int stop;
    _Atomic uint64_t accepted; /* requests pushed to the engine */
} dc_ctx;

/* gRPC handlers (CQ thread). */
void dc_handle_generate(rpc_call *call, const ProtobufCMessage *req, void *arg);
void dc_handle_cancel(rpc_call *call, const ProtobufCMessage *req, void *arg);

/* The engine thread's body: runs until ctx->stop, then fails what is left
 * with UNAVAILABLE and returns. */
void *dc_engine_run(void *ctx);

#endif
