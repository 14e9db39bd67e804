/* The prefill worker (tandem-prefill), internal interfaces.
 *
 * Threads and who owns what:
 *   gRPC CQ thread   pf_handle_run / pf_handle_cancel: check the request and
 *                    push it onto the engine's queue; nothing else.
 *   engine thread    pf_engine_run: owns the eng (prefill-only), the kvx send
 *                    side (connections to decode workers, one per KV
 *                    endpoint, made on the first request and kept), every
 *                    pf_req from its pop to its reply.
 *   kvx thread       the transfer endpoint's progress thread.
 *
 * A request's KV blocks (source side): taken by the scheduler at admission
 * for the whole prompt (never preempted), posted to kvx layer by layer from
 * the per-layer hook as each layer of each finished block is computed, and
 * freed only after kvx's final event for the request (DONE or FAILED): a
 * block being sent is never freed or reused.
 */
#ifndef TANDEM_PREFILL_PF_H
#define TANDEM_PREFILL_PF_H

#include <stdatomic.h>
#include <stdint.h>

#include "common/mpscq.h"
#include "common/rpc.h"
#include "engine/runtime/eng.h"
#include "kvtransfer/kvx.h"
#include "worker/wrk.h"
#include "worker/wrk_pool.h"

typedef struct pf_ctx {
    const wrk_opts *opts;
    const mdl_model *model;
    eng *engine;
    kvx_ep *kvx;
    uint32_t max_model_len;
    uint32_t block_size;
    kvx_layer_post *posts; /* [max_num_seqs]: one layer's posts of a step */
    void **post_reqs;      /* [max_num_seqs]: the request of each post */
    uint32_t max_posts;
    /* Request slots (pf_req + its prompt + its pairs, one size: the longest
     * prompt the engine takes), made at start for max_num_seqs requests.
     * A slot is taken by pf_handle_run (gRPC thread) and belongs to that
     * request until the engine thread reaps it (pf__remove: after kvx's
     * final event, the reply or error sent), which puts it back; a run
     * that is refused before it is queued puts it back at once. */
    wrk_pool reqs;
    size_t req_prompt_off, req_pairs_off; /* byte offsets in a slot */
    wrk_health health;
    wrk_load load;
    wrk_metrics metrics;
    mpscq cmdq;
    _Atomic int draining;
    _Atomic int stop;
} pf_ctx;

void pf_handle_run(rpc_call *call, const ProtobufCMessage *req, void *arg);
void pf_handle_cancel(rpc_call *call, const ProtobufCMessage *req, void *arg);

/* Sets up c->reqs (c->max_model_len and c->block_size set): slots for
 * max_num_seqs requests made now. 0 or TD_ENOMEM; wrk_pool_fini undoes it. */
int pf_reqs_init(pf_ctx *c, uint32_t max_num_seqs);

/* The eng's per-layer hook (eng_config.on_layer, arg: the pf_ctx). */
int pf_on_layer(void *arg, const eng_item *items, uint32_t n_items, int layer);

/* The engine thread's body: runs until ctx->stop, then fails what is left. */
void *pf_engine_run(void *ctx);

#endif
