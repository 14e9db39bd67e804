/* shm transport: same host, CPU memory. The receiver's pool is a memfd; the
 * handshake passes it to the sender over the unix control socket
 * (SCM_RIGHTS), the sender maps it and a transfer is a copy straight into
 * the receiver's blocks (runs of adjacent blocks in one go, streaming stores:
 * kvx__copy), followed by a POST ("written") notice on the control socket
 * that the receiver checks against the request before marking blocks
 * landed. The notices of one loop iteration leave in one write.
 *
 * Both mappings of the memfd are populated when they are made (the
 * receiver's allocates and zeroes the pages, the sender's fills its page
 * table), so no transfer takes a page fault.
 *
 * Trust: a mapped sender can write anywhere in the pool; the receiver only
 * decides what counts as landed. That is the usual same-host trade-off (the
 * peer is another worker of the same deployment). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD "kvx_shm"

typedef struct shm_ep {
    int memfd; /* receiver: backing of the pool, -1 otherwise */
    void *map; /* receiver: the shared mapping; sender: owned pool (kvx__pool_map) */
    size_t map_bytes;
} shm_ep;

typedef struct shm_peer {
    uint8_t *remote; /* sender: the receiver's pool mapped here */
    size_t bytes;
} shm_peer;

static int shm_ep_init(kvx_ep *ep)
{
    shm_ep *s = calloc(1, sizeof(*s));
    if (!s) return TD_ENOMEM;
    s->memfd = -1;
    ep->tp = s;
    if (ep->pool) return 0;
    if (ep->p.role == KVX_ROLE_SEND) {
        int rc = kvx__pool_map(ep->pool_bytes, &s->map);
        if (rc < 0) return rc;
    } else {
        s->memfd = memfd_create("tandem-kvx-pool", MFD_CLOEXEC);
        if (s->memfd < 0) return td_err_from_errno(errno);
        if (ftruncate(s->memfd, (off_t)ep->pool_bytes) < 0) return td_err_from_errno(errno);
        /* MAP_POPULATE allocates every page now rather than at the first
         * transfer's faults. */
        void *m = mmap(NULL, ep->pool_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       s->memfd, 0);
        if (m == MAP_FAILED) return td_err_from_errno(errno);
        s->map = m;
    }
    s->map_bytes = ep->pool_bytes;
    ep->pool = s->map;
    ep->pool_owned = 1;
    return 0;
}

static void shm_ep_fini(kvx_ep *ep)
{
    shm_ep *s = ep->tp;
    if (!s) return;
    if (s->map) munmap(s->map, s->map_bytes);
    if (s->memfd >= 0) close(s->memfd);
    free(s);
    ep->tp = NULL;
}

static int shm_ack_extra(kvx_ep *ep, kvx__peer *p, kvx_wire_hello *ack, int *fd)
{
    shm_ep *s = ep->tp;
    if (s->memfd < 0) return TD_EINVAL;
    uint64_t bytes = ep->pool_bytes;
    memcpy(ack->extra, &bytes, sizeof(bytes));
    ack->extra_len = sizeof(bytes);
    *fd = s->memfd;
    return 0;
}

static int shm_peer_attach(kvx_ep *ep, kvx__peer *p, int fd)
{
    if (fd < 0) {
        td_log_error(MOD, "no_pool_fd", "peer=%d", p->id);
        return TD_EPROTO;
    }
    int rc = 0;
    uint64_t bytes = 0;
    const kvx_wire_hello *h = &p->remote;
    struct stat st;
    if (h->extra_len != sizeof(bytes)) {
        rc = TD_EPROTO;
        goto out;
    }
    memcpy(&bytes, h->extra, sizeof(bytes));
    /* The mapping must hold every (layer, block) the receiver announced. */
    if (h->num_blocks == 0 || h->block_bytes == 0 ||
        (uint64_t)h->n_layers * h->num_blocks > UINT64_MAX / h->block_bytes ||
        (uint64_t)h->n_layers * h->num_blocks * h->block_bytes != bytes || bytes > SIZE_MAX ||
        fstat(fd, &st) < 0 || (uint64_t)st.st_size < bytes) {
        rc = TD_EPROTO;
        goto out;
    }
    void *m = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (m == MAP_FAILED) {
        rc = td_err_from_errno(errno);
        goto out;
    }
    shm_peer *sp = calloc(1, sizeof(*sp));
    if (!sp) {
        munmap(m, (size_t)bytes);
        rc = TD_ENOMEM;
        goto out;
    }
    sp->remote = m;
    sp->bytes = (size_t)bytes;
    p->tp = sp;
out:
    close(fd);
    return rc;
}

static void shm_peer_close(kvx_ep *ep, kvx__peer *p)
{
    shm_peer *sp = p->tp;
    if (!sp) return;
    munmap(sp->remote, sp->bytes);
    free(sp);
    p->tp = NULL;
}

static int shm_send_post(kvx_ep *ep, kvx__peer *p, kvx__post *post)
{
    shm_peer *sp = p->tp;
    size_t bb = ep->block_bytes;
    size_t remote_blocks = p->remote.num_blocks;
    /* A run of pairs whose sources and destinations both follow each other
     * is one contiguous range on both sides: one copy. */
    for (int i = 0; i < post->n;) {
        const kvx_pair *pr = &post->pairs[i];
        int k = 1;
        while (i + k < post->n && post->pairs[i + k].src == pr->src + (uint32_t)k &&
               post->pairs[i + k].dst == pr->dst + (uint32_t)k)
            k++;
        /* dst < remote num_blocks was checked when the layer was posted. */
        size_t doff = ((size_t)post->layer * remote_blocks + pr->dst) * bb;
        kvx__copy(sp->remote + doff, kvx__block_ptr(ep, ep->pool, post->layer, pr->src),
                  bb * (size_t)k);
        i += k;
    }
    kvx__stat_add(&ep->st.bytes_sent, (uint64_t)post->n * bb);
    kvx_wire_req m = {.hash = post->req->hash, .layer = post->layer, .n = (uint32_t)post->n};
    int rc = kvx__ctrl_queue(ep, p, KVX_MSG_POST, &m, sizeof(m), post->pairs,
                             sizeof(kvx_pair) * (size_t)post->n);
    kvx__post_done(ep, post);
    return rc;
}

const kvx__ops kvx__shm_ops = {
    .name = "shm",
    .cancel_ack = 1,
    .unix_ctrl = 1,
    .own_pool = 1,
    .ep_init = shm_ep_init,
    .ep_fini = shm_ep_fini,
    .ack_extra = shm_ack_extra,
    .peer_attach = shm_peer_attach,
    .peer_close = shm_peer_close,
    .send_post = shm_send_post,
};
