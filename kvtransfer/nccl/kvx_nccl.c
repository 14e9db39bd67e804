/* nccl transport: GPU to GPU across hosts. Control runs on the TCP control
 * connection (handshake carries the first ncclUniqueId); data moves with
 * grouped ncclSend/ncclRecv per posted layer on a dedicated stream. Both
 * sides issue the same ordered op list: the receiver's registered blocks
 * (BEGIN_ACK) and the sender's pairs (POST) go through kvx_plan_build on
 * both sides.
 *
 * Communicators (2 ranks: sender 0, receiver 1) are created lazily on the
 * first post to a peer (COMM_OPEN carries the id), at most max_comms at once
 * (the least recently used idle one is closed to make room, else the post
 * fails with TD_ENOSPC), and an idle one is torn down after comm_idle_ns
 * (COMM_CLOSE). Device memory taken by each is measured (cudaMemGetInfo
 * around the init) and reported in kvx_stats. A dead peer's communicator is
 * aborted (ncclCommAbort) so no stream waits forever. */
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/cuda/kvx_cuda.h"
#include "kvtransfer/kvx_internal.h"
#include "kvtransfer/kvx_plan.h"

#define MOD "kvx_nccl"

typedef struct nccl_pending {
    kvx__peer *peer;
    cudaEvent_t ev;
    kvx__post *post; /* sender */
    /* receiver */
    kvx__req *req;
    uint64_t hash;
    uint32_t layer;
    int n;
    kvx_pair *pairs;
    struct nccl_pending *next;
} nccl_pending;

typedef struct nccl_ep {
    cudaStream_t stream;
    void *owned_pool;
    nccl_pending *pending, *tail; /* in issue order */
    int comms;
} nccl_ep;

typedef struct nccl_peer {
    ncclComm_t comm;
    int have_comm;
    ncclUniqueId uid; /* from the handshake, used by the first comm */
    int have_uid;
    int64_t last_use_ns;
    int pending;
    uint64_t mem_bytes;
} nccl_peer;

static int nccl_err(ncclResult_t r, const char *what)
{
    if (r == ncclSuccess) return 0;
    td_log_error(MOD, "nccl_error", "call=%s err=%d msg=\"%s\"", what, (int)r,
                 ncclGetErrorString(r));
    return TD_EIO;
}

static int n_ep_init(kvx_ep *ep)
{
    nccl_ep *t = calloc(1, sizeof(*t));
    if (!t) return TD_ENOMEM;
    ep->tp = t;
    return kvx__cuda_ep_setup(MOD, ep, &t->stream, &t->owned_pool);
}

static void pending_free(nccl_pending *pd)
{
    if (pd->ev) cudaEventDestroy(pd->ev);
    free(pd->pairs);
    free(pd);
}

static void n_ep_fini(kvx_ep *ep)
{
    nccl_ep *t = ep->tp;
    if (!t) return;
    cudaSetDevice(ep->p.cuda_device); /* may run on any application thread */
    while (t->pending) {
        nccl_pending *pd = t->pending;
        t->pending = pd->next;
        pending_free(pd);
    }
    if (t->stream) cudaStreamDestroy(t->stream);
    if (t->owned_pool) cudaFree(t->owned_pool);
    free(t);
    ep->tp = NULL;
}

static nccl_peer *peer_tp(kvx__peer *p)
{
    if (!p->tp) p->tp = calloc(1, sizeof(nccl_peer));
    return p->tp;
}

static int n_hello_extra(kvx_ep *ep, kvx_wire_hello *h)
{
    ncclUniqueId id;
    _Static_assert(sizeof(id) <= KVX_WIRE_EXTRA_MAX, "nccl id fits");
    int rc = nccl_err(ncclGetUniqueId(&id), "ncclGetUniqueId");
    if (rc < 0) return rc;
    memcpy(h->extra, &id, sizeof(id));
    h->extra_len = sizeof(id);
    return 0;
}

/* Receiver: echo the sender's id so both hold the first communicator's id. */
static int n_ack_extra(kvx_ep *ep, kvx__peer *p, kvx_wire_hello *ack, int *fd)
{
    *fd = -1;
    if (p->remote.extra_len != sizeof(ncclUniqueId)) return TD_EPROTO;
    memcpy(ack->extra, p->remote.extra, sizeof(ncclUniqueId));
    ack->extra_len = sizeof(ncclUniqueId);
    return peer_tp(p) ? 0 : TD_ENOMEM;
}

static int n_peer_attach(kvx_ep *ep, kvx__peer *p, int fd)
{
    if (fd >= 0) close(fd);
    if (p->remote.extra_len != sizeof(ncclUniqueId)) return TD_EPROTO;
    nccl_peer *np = peer_tp(p);
    if (!np) return TD_ENOMEM;
    memcpy(&np->uid, p->remote.extra, sizeof(np->uid));
    np->have_uid = 1;
    return 0;
}

static int comm_init(kvx_ep *ep, kvx__peer *p, const ncclUniqueId *id, int rank)
{
    nccl_ep *t = ep->tp;
    nccl_peer *np = p->tp;
    size_t free0 = 0, free1 = 0, total = 0;
    cudaMemGetInfo(&free0, &total);
    int64_t t0 = td_now_ns();
    int rc = nccl_err(ncclCommInitRank(&np->comm, 2, *id, rank), "ncclCommInitRank");
    if (rc < 0) return rc;
    cudaMemGetInfo(&free1, &total);
    np->have_comm = 1;
    np->mem_bytes = free0 > free1 ? free0 - free1 : 0;
    np->last_use_ns = td_now_ns();
    t->comms++;
    __atomic_fetch_add(&ep->st.comms, 1, __ATOMIC_RELAXED);
    kvx__stat_add(&ep->st.comm_bytes, np->mem_bytes);
    td_log_info(MOD, "comm_open", "peer=%d rank=%d device_mib=%.1f init_ms=%.1f comms=%d", p->id,
                rank, (double)np->mem_bytes / (1 << 20), td_ns_to_ms(td_now_ns() - t0), t->comms);
    return 0;
}

static void comm_drop(kvx_ep *ep, kvx__peer *p, int abort_it)
{
    nccl_ep *t = ep->tp;
    nccl_peer *np = p->tp;
    if (!np || !np->have_comm) return;
    if (abort_it) {
        ncclCommAbort(np->comm);
    } else {
        cudaStreamSynchronize(t->stream);
        ncclCommDestroy(np->comm);
    }
    np->have_comm = 0;
    t->comms--;
    __atomic_fetch_sub(&ep->st.comms, 1, __ATOMIC_RELAXED);
    __atomic_fetch_sub(&ep->st.comm_bytes, np->mem_bytes, __ATOMIC_RELAXED);
    td_log_info(MOD, "comm_close", "peer=%d aborted=%d comms=%d", p->id, abort_it, t->comms);
}

/* Sender: a communicator to p, opening one (and closing an idle one to stay
 * within max_comms) when needed. */
static int ensure_comm(kvx_ep *ep, kvx__peer *p)
{
    nccl_ep *t = ep->tp;
    nccl_peer *np = peer_tp(p);
    if (!np) return TD_ENOMEM;
    if (np->have_comm) return 0;
    if (t->comms >= ep->p.max_comms) {
        kvx__peer *lru = NULL;
        for (kvx__peer *q = ep->peers; q; q = q->next) {
            nccl_peer *nq = q->tp;
            if (q->dead || !nq || !nq->have_comm || nq->pending > 0) continue;
            if (!lru || nq->last_use_ns < ((nccl_peer *)lru->tp)->last_use_ns) lru = q;
        }
        if (!lru) {
            td_log_warn(MOD, "comm_limit", "max_comms=%d all busy", ep->p.max_comms);
            return TD_ENOSPC;
        }
        kvx__ctrl_send(ep, lru, KVX_MSG_COMM_CLOSE, NULL, 0, NULL, 0);
        comm_drop(ep, lru, 0);
    }
    ncclUniqueId id;
    if (np->have_uid) {
        id = np->uid;
        np->have_uid = 0;
    } else {
        int rc = nccl_err(ncclGetUniqueId(&id), "ncclGetUniqueId");
        if (rc < 0) return rc;
    }
    int rc = kvx__ctrl_send(ep, p, KVX_MSG_COMM_OPEN, &id, sizeof(id), NULL, 0);
    if (rc < 0) return rc;
    return comm_init(ep, p, &id, 0);
}

static void pending_push(nccl_ep *t, nccl_pending *pd)
{
    if (t->tail)
        t->tail->next = pd;
    else
        t->pending = pd;
    t->tail = pd;
}

static int n_send_post(kvx_ep *ep, kvx__peer *p, kvx__post *post)
{
    nccl_ep *t = ep->tp;
    kvx__req *r = post->req;
    size_t bb = ep->block_bytes;
    kvx_plan_op *ops = malloc(sizeof(*ops) * (size_t)post->n);
    nccl_pending *pd = calloc(1, sizeof(*pd));
    int rc = ops && pd ? 0 : TD_ENOMEM;
    int n_ops = 0;
    if (rc == 0) {
        n_ops = kvx_plan_build(r->reg, r->n_reg, post->pairs, post->n, ep->p.layout.num_blocks,
                               p->remote.num_blocks, ops);
        rc = n_ops < 0 ? n_ops : 0;
    }
    if (rc == 0) rc = ensure_comm(ep, p);
    if (rc == 0) {
        /* The receiver posts its receives from this notice. */
        kvx_wire_req m = {.hash = r->hash, .layer = post->layer, .n = (uint32_t)post->n};
        rc = kvx__ctrl_send(ep, p, KVX_MSG_POST, &m, sizeof(m), post->pairs,
                            sizeof(kvx_pair) * (size_t)post->n);
    }
    nccl_peer *np = p->tp;
    if (rc == 0) {
        rc = nccl_err(ncclGroupStart(), "ncclGroupStart");
        for (int i = 0; i < n_ops && rc == 0; i++)
            rc = nccl_err(ncclSend(kvx__block_ptr(ep, ep->pool, post->layer, ops[i].src),
                                   (size_t)ops[i].count * bb, ncclUint8, 1, np->comm, t->stream),
                          "ncclSend");
        int rc2 = nccl_err(ncclGroupEnd(), "ncclGroupEnd");
        if (rc == 0) rc = rc2;
    }
    if (rc == 0)
        rc = kvx__cuda_err(MOD, cudaEventCreateWithFlags(&pd->ev, cudaEventDisableTiming),
                           "cudaEventCreate");
    if (rc == 0) rc = kvx__cuda_err(MOD, cudaEventRecord(pd->ev, t->stream), "cudaEventRecord");
    free(ops);
    if (rc < 0) {
        if (pd) pending_free(pd);
        kvx__post_done(ep, post);
        return rc;
    }
    pd->peer = p;
    pd->post = post;
    np->pending++;
    np->last_use_ns = td_now_ns();
    pending_push(t, pd);
    return 0;
}

static int n_recv_post(kvx_ep *ep, kvx__peer *p, kvx__req *r, uint32_t layer, const kvx_pair *pairs,
                       int n)
{
    nccl_ep *t = ep->tp;
    nccl_peer *np = p->tp;
    size_t bb = ep->block_bytes;
    if (!np || !np->have_comm) {
        kvx__peer_fail(ep, p, TD_EPROTO, "POST before COMM_OPEN");
        return 0;
    }
    kvx_plan_op *ops = malloc(sizeof(*ops) * (size_t)n);
    nccl_pending *pd = calloc(1, sizeof(*pd));
    kvx_pair *copy = malloc(sizeof(*copy) * (size_t)n);
    if (!ops || !pd || !copy) {
        free(ops);
        free(pd);
        free(copy);
        kvx__peer_fail(ep, p, TD_ENOMEM, "no memory for a receive plan");
        return 0;
    }
    memcpy(copy, pairs, sizeof(*copy) * (size_t)n);
    int n_ops = kvx_plan_build(r->dst, r->n_blocks, copy, n, p->remote.num_blocks,
                               ep->p.layout.num_blocks, ops);
    int bad = n_ops < 0;
    /* A request being canceled still receives what the sender already
     * posted (its blocks stay leased until CANCEL_ACK); nothing lands. */
    for (int i = 0; i < n && !bad && !r->closing; i++) {
        int b;
        if (!kvx__rreq_claim(ep, p, r->hash, layer, copy[i].dst, &b)) bad = 1;
    }
    if (bad) {
        /* The sender's sends are already queued; only tearing the peer down
         * (which aborts the communicator) unblocks them. */
        free(ops);
        free(pd);
        free(copy);
        kvx__stat_add(&ep->st.frames_rejected, 1);
        kvx__peer_fail(ep, p, TD_EPROTO, "POST disagrees with the registered blocks");
        return 0;
    }
    int rc = nccl_err(ncclGroupStart(), "ncclGroupStart");
    for (int i = 0; i < n_ops && rc == 0; i++)
        rc = nccl_err(ncclRecv(kvx__block_ptr(ep, ep->pool, layer, ops[i].dst),
                               (size_t)ops[i].count * bb, ncclUint8, 0, np->comm, t->stream),
                      "ncclRecv");
    int rc2 = nccl_err(ncclGroupEnd(), "ncclGroupEnd");
    if (rc == 0) rc = rc2;
    if (rc == 0)
        rc = kvx__cuda_err(MOD, cudaEventCreateWithFlags(&pd->ev, cudaEventDisableTiming),
                           "cudaEventCreate");
    if (rc == 0) rc = kvx__cuda_err(MOD, cudaEventRecord(pd->ev, t->stream), "cudaEventRecord");
    free(ops);
    if (rc < 0) {
        pd->pairs = copy;
        pending_free(pd);
        kvx__peer_fail(ep, p, rc, "receive launch failed");
        return 0;
    }
    pd->peer = p;
    pd->req = r;
    pd->hash = r->hash;
    pd->layer = layer;
    pd->n = n;
    pd->pairs = copy;
    np->pending++;
    np->last_use_ns = td_now_ns();
    pending_push(t, pd);
    return 0;
}

static int n_ctrl_msg(kvx_ep *ep, kvx__peer *p, uint16_t type, const uint8_t *body, uint32_t len)
{
    if (ep->p.role != KVX_ROLE_RECV) return TD_EPROTO;
    nccl_peer *np = peer_tp(p);
    if (!np) return TD_ENOMEM;
    if (type == KVX_MSG_COMM_CLOSE) {
        comm_drop(ep, p, 0);
        return 0;
    }
    if (len != sizeof(ncclUniqueId)) return TD_EPROTO;
    ncclUniqueId id;
    memcpy(&id, body, sizeof(id));
    comm_drop(ep, p, 0);
    return comm_init(ep, p, &id, 1);
}

/* Ends pending work of p (or of request r when r != NULL). */
static void drop_pending(kvx_ep *ep, kvx__peer *p, kvx__req *r)
{
    nccl_ep *t = ep->tp;
    nccl_pending **pp = &t->pending;
    t->tail = NULL;
    while (*pp) {
        nccl_pending *pd = *pp;
        int match = r ? pd->req == r : pd->peer == p;
        if (match) {
            *pp = pd->next;
            nccl_peer *np = pd->peer->tp;
            if (np) np->pending--;
            kvx__post *post = pd->post;
            pending_free(pd);
            if (post) kvx__post_done(ep, post);
        } else {
            t->tail = pd;
            pp = &pd->next;
        }
    }
}

static void n_rreq_release(kvx_ep *ep, kvx__req *r)
{
    nccl_ep *t = ep->tp;
    int any = 0;
    for (nccl_pending *pd = t->pending; pd; pd = pd->next)
        any |= pd->req == r;
    if (!any) return;
    /* Receives into r's blocks are queued: they must finish (or die with
     * the communicator) before the blocks go back to their owner. */
    if (r->peer && r->peer->dead) comm_drop(ep, r->peer, 1);
    cudaStreamSynchronize(t->stream);
    drop_pending(ep, NULL, r);
}

static void n_peer_close(kvx_ep *ep, kvx__peer *p)
{
    nccl_ep *t = ep->tp;
    comm_drop(ep, p, 1);
    if (t && t->stream) cudaStreamSynchronize(t->stream);
    if (t) drop_pending(ep, p, NULL);
}

static void n_peer_free(kvx_ep *ep, kvx__peer *p)
{
    free(p->tp);
    p->tp = NULL;
}

static int n_progress(kvx_ep *ep)
{
    nccl_ep *t = ep->tp;
    while (t->pending) {
        nccl_pending *pd = t->pending;
        cudaError_t e = cudaEventQuery(pd->ev);
        if (e == cudaErrorNotReady) break;
        t->pending = pd->next;
        if (!t->pending) t->tail = NULL;
        nccl_peer *np = pd->peer->tp;
        if (np) np->pending--;
        if (pd->post) {
            kvx__post *post = pd->post;
            kvx__req *r = post->req;
            if (e == cudaSuccess)
                kvx__stat_add(&ep->st.bytes_sent, (uint64_t)post->n * ep->block_bytes);
            pending_free(pd);
            kvx__post_done(ep, post);
            if (e != cudaSuccess && r->used) kvx__sreq_finish(ep, r, TD_EIO, "nccl send failed", 1);
            continue;
        }
        kvx__req *r = pd->req;
        if (e == cudaSuccess && r->used && r->hash == pd->hash && !r->closing) {
            for (int i = 0; i < pd->n && r->used && r->hash == pd->hash; i++)
                kvx__rreq_land(ep, r, pd->layer, pd->pairs[i].dst);
        } else if (e != cudaSuccess && r->used && r->hash == pd->hash) {
            kvx__rreq_finish(ep, r, TD_EIO, "nccl receive failed");
        }
        pending_free(pd);
    }
    /* Idle communicators go back (sender decides, the receiver follows). */
    if (ep->p.role == KVX_ROLE_SEND) {
        int64_t now = td_now_ns();
        for (kvx__peer *p = ep->peers; p; p = p->next) {
            nccl_peer *np = p->tp;
            if (p->dead || !np || !np->have_comm || np->pending > 0 ||
                now - np->last_use_ns < ep->p.comm_idle_ns)
                continue;
            kvx__ctrl_send(ep, p, KVX_MSG_COMM_CLOSE, NULL, 0, NULL, 0);
            comm_drop(ep, p, 0);
        }
    }
    return t->pending != NULL;
}

const kvx__ops kvx__nccl_ops = {
    .name = "nccl",
    .cancel_ack = 1,
    .unix_ctrl = 0,
    .available = kvx__cuda_available,
    .thread_init = kvx__cuda_thread_init,
    .ep_init = n_ep_init,
    .ep_fini = n_ep_fini,
    .hello_extra = n_hello_extra,
    .ack_extra = n_ack_extra,
    .peer_attach = n_peer_attach,
    .peer_close = n_peer_close,
    .peer_free = n_peer_free,
    .send_post = n_send_post,
    .rreq_release = n_rreq_release,
    .recv_post = n_recv_post,
    .ctrl_msg = n_ctrl_msg,
    .progress = n_progress,
};
