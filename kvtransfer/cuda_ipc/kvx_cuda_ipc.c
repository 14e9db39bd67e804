/* cuda_ipc transport: same host, GPU memory. The receiver's pool is device
 * memory; the handshake passes its cudaIpcMemHandle_t on the unix control
 * socket, the sender opens it and copies blocks device-to-device with
 * cudaMemcpyAsync on its own stream. A CUDA event recorded after a post's
 * copies is polled by the progress thread; when it completes the sender sends
 * the POST ("written") notice, and the receiver marks the blocks landed.
 * A cancel is acknowledged only once no copy of the request is pending. */
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/cuda/kvx_cuda.h"
#include "kvtransfer/kvx_internal.h"

#define MOD "kvx_cuda_ipc"

typedef struct ipc_pending {
    kvx__post *post;
    kvx__peer *peer;
    cudaEvent_t ev;
    struct ipc_pending *next;
} ipc_pending;

typedef struct ipc_ep {
    cudaStream_t stream;
    void *owned_pool;
    ipc_pending *pending; /* sender: posts whose copies are in flight, oldest first */
    ipc_pending *tail;
} ipc_ep;

typedef struct ipc_peer {
    uint8_t *remote; /* sender: the receiver's pool, opened from its handle */
    size_t bytes;
} ipc_peer;

static int ipc_ep_init(kvx_ep *ep)
{
    ipc_ep *t = calloc(1, sizeof(*t));
    if (!t) return TD_ENOMEM;
    ep->tp = t;
    return kvx__cuda_ep_setup(MOD, ep, &t->stream, &t->owned_pool);
}

static void ipc_ep_fini(kvx_ep *ep)
{
    ipc_ep *t = ep->tp;
    if (!t) return;
    cudaSetDevice(ep->p.cuda_device); /* may run on any application thread */
    if (t->stream) cudaStreamSynchronize(t->stream);
    while (t->pending) {
        ipc_pending *pd = t->pending;
        t->pending = pd->next;
        cudaEventDestroy(pd->ev);
        free(pd);
    }
    if (t->stream) cudaStreamDestroy(t->stream);
    if (t->owned_pool) cudaFree(t->owned_pool);
    free(t);
    ep->tp = NULL;
}

static int ipc_ack_extra(kvx_ep *ep, kvx__peer *p, kvx_wire_hello *ack, int *fd)
{
    cudaIpcMemHandle_t h;
    _Static_assert(sizeof(h) + sizeof(uint64_t) <= KVX_WIRE_EXTRA_MAX, "ipc handle fits");
    int rc = kvx__cuda_err(MOD, cudaIpcGetMemHandle(&h, ep->pool), "cudaIpcGetMemHandle");
    if (rc < 0) return rc;
    uint64_t bytes = ep->pool_bytes;
    memcpy(ack->extra, &bytes, sizeof(bytes));
    memcpy(ack->extra + sizeof(bytes), &h, sizeof(h));
    ack->extra_len = (uint32_t)(sizeof(bytes) + sizeof(h));
    *fd = -1;
    return 0;
}

static int ipc_peer_attach(kvx_ep *ep, kvx__peer *p, int fd)
{
    if (fd >= 0) close(fd);
    const kvx_wire_hello *h = &p->remote;
    cudaIpcMemHandle_t mh;
    uint64_t bytes;
    if (h->extra_len != sizeof(bytes) + sizeof(mh)) return TD_EPROTO;
    memcpy(&bytes, h->extra, sizeof(bytes));
    memcpy(&mh, h->extra + sizeof(bytes), sizeof(mh));
    if (h->num_blocks == 0 || h->block_bytes == 0 ||
        (uint64_t)h->n_layers * h->num_blocks > UINT64_MAX / h->block_bytes ||
        (uint64_t)h->n_layers * h->num_blocks * h->block_bytes != bytes)
        return TD_EPROTO;
    int rc = kvx__cuda_err(MOD, cudaSetDevice(ep->p.cuda_device), "cudaSetDevice");
    void *ptr = NULL;
    if (rc == 0)
        rc = kvx__cuda_err(MOD, cudaIpcOpenMemHandle(&ptr, mh, cudaIpcMemLazyEnablePeerAccess),
                           "cudaIpcOpenMemHandle");
    if (rc < 0) return rc;
    ipc_peer *ip = calloc(1, sizeof(*ip));
    if (!ip) {
        cudaIpcCloseMemHandle(ptr);
        return TD_ENOMEM;
    }
    ip->remote = ptr;
    ip->bytes = (size_t)bytes;
    p->tp = ip;
    return 0;
}

static void ipc_peer_close(kvx_ep *ep, kvx__peer *p)
{
    ipc_ep *t = ep->tp;
    /* Copies towards a closing peer must end before its mapping goes. */
    if (t && t->stream) cudaStreamSynchronize(t->stream);
    ipc_pending **pp = t ? &t->pending : NULL;
    while (pp && *pp) {
        ipc_pending *pd = *pp;
        if (pd->peer == p) {
            *pp = pd->next;
            cudaEventDestroy(pd->ev);
            kvx__post_done(ep, pd->post);
            free(pd);
        } else {
            pp = &pd->next;
        }
    }
    if (t) {
        t->tail = NULL;
        for (ipc_pending *pd = t->pending; pd; pd = pd->next)
            t->tail = pd;
    }
    ipc_peer *ip = p->tp;
    if (ip) {
        cudaIpcCloseMemHandle(ip->remote);
        free(ip);
        p->tp = NULL;
    }
}

static int ipc_send_post(kvx_ep *ep, kvx__peer *p, kvx__post *post)
{
    ipc_ep *t = ep->tp;
    ipc_peer *ip = p->tp;
    size_t bb = ep->block_bytes;
    size_t remote_blocks = p->remote.num_blocks;
    int rc = 0;
    ipc_pending *pd = calloc(1, sizeof(*pd));
    if (!pd) {
        rc = TD_ENOMEM;
        goto fail;
    }
    for (int i = 0; i < post->n && rc == 0; i++) {
        const kvx_pair *pr = &post->pairs[i];
        size_t doff = ((size_t)post->layer * remote_blocks + pr->dst) * bb;
        rc = kvx__cuda_err(MOD,
                           cudaMemcpyAsync(ip->remote + doff,
                                           kvx__block_ptr(ep, ep->pool, post->layer, pr->src), bb,
                                           cudaMemcpyDeviceToDevice, t->stream),
                           "cudaMemcpyAsync");
    }
    if (rc == 0)
        rc = kvx__cuda_err(MOD, cudaEventCreateWithFlags(&pd->ev, cudaEventDisableTiming),
                           "cudaEventCreate");
    if (rc == 0) rc = kvx__cuda_err(MOD, cudaEventRecord(pd->ev, t->stream), "cudaEventRecord");
    if (rc < 0) {
        /* Copies may have been queued: wait for them before giving up. */
        cudaStreamSynchronize(t->stream);
        if (pd->ev) cudaEventDestroy(pd->ev);
        goto fail;
    }
    pd->post = post;
    pd->peer = p;
    if (t->tail)
        t->tail->next = pd;
    else
        t->pending = pd;
    t->tail = pd;
    return 0;
fail:
    free(pd);
    kvx__post_done(ep, post);
    return rc;
}

/* Completes posts whose copies finished, in order. */
static int ipc_progress(kvx_ep *ep)
{
    ipc_ep *t = ep->tp;
    while (t->pending) {
        ipc_pending *pd = t->pending;
        cudaError_t e = cudaEventQuery(pd->ev);
        if (e == cudaErrorNotReady) return 1;
        t->pending = pd->next;
        if (!t->pending) t->tail = NULL;
        cudaEventDestroy(pd->ev);
        kvx__post *post = pd->post;
        kvx__peer *p = pd->peer;
        free(pd);
        if (e != cudaSuccess) {
            kvx__cuda_err(MOD, e, "cudaEventQuery");
            kvx__req *r = post->req;
            kvx__post_done(ep, post);
            if (r->used) kvx__sreq_finish(ep, r, TD_EIO, "device copy failed", 1);
            continue;
        }
        if (!post->req->closing && !p->dead) {
            kvx_wire_req m = {
                .hash = post->req->hash, .layer = post->layer, .n = (uint32_t)post->n};
            kvx__stat_add(&ep->st.bytes_sent, (uint64_t)post->n * ep->block_bytes);
            kvx__ctrl_send(ep, p, KVX_MSG_POST, &m, sizeof(m), post->pairs,
                           sizeof(kvx_pair) * (size_t)post->n);
        }
        kvx__post_done(ep, post);
    }
    return 0;
}

const kvx__ops kvx__cuda_ipc_ops = {
    .name = "cuda_ipc",
    .cancel_ack = 1,
    .unix_ctrl = 1,
    .own_pool = 1,
    .available = kvx__cuda_available,
    .thread_init = kvx__cuda_thread_init,
    .ep_init = ipc_ep_init,
    .ep_fini = ipc_ep_fini,
    .ack_extra = ipc_ack_extra,
    .peer_attach = ipc_peer_attach,
    .peer_close = ipc_peer_close,
    .send_post = ipc_send_post,
    .progress = ipc_progress,
};
