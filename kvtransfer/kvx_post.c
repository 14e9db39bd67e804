/* kvx post ring: the sender's hot path (kvx_send_layers).
 *
 * A prefill worker posts layer l of every request of its batch from inside
 * the engine's per-layer hook, so the call must cost next to nothing: no
 * round trip to the progress thread, no allocation, one wake-up. Posts are
 * copied into a byte ring allocated with the endpoint:
 *
 *   producers (application threads, serialised by ring_mu)
 *     reserve the posts' LAYER_SENT event slots (no growth: TD_EAGAIN),
 *     check the ring has room for every record (else TD_EAGAIN, nothing
 *     written), write the records, publish ring_head, and write the wake
 *     eventfd only when no wake is already on its way (ring_signalled);
 *   the progress thread
 *     clears ring_signalled, then reads records up to ring_head (every loop
 *     iteration and before each command batch, so one thread's posts and
 *     later calls keep their order) and hands each to kvx__post_accept;
 *     a record stays in place, as the kvx__post the transports work on,
 *     until kvx__post_free marks it free; ring_tail then passes every free
 *     record at the tail, which gives the room back to producers.
 *
 * Records are multiples of 8 bytes and never wrap: one that does not fit
 * before the end of the ring is preceded by a SKIP record filling the rest
 * (at least 8 bytes, enough for rec_bytes and rec_flags). A record held for a
 * long time (a post waiting for its request's BEGIN_ACK, frames stuck behind
 * a slow peer) holds the tail, and with it the room behind it: the ring must
 * cover the whole in-flight window, see kvx_params.post_ring_bytes.
 *
 * Memory order: head is stored (seq_cst) after the records are written and
 * read (seq_cst) before they are read; tail likewise for the room. The wake
 * flag is a Dekker pair with head: a producer stores head then exchanges the
 * flag; the progress thread clears the flag then loads head, so either the
 * progress thread sees the new head or the producer sees the flag cleared
 * and writes the eventfd. */
#include "kvtransfer/kvx.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD           "kvx"
#define RING_MIN      (4u << 10)
#define RING_DEF_MIN  (4u << 20)
#define RING_DEF_MAX  (64u << 20)
#define POST_HDR_SIZE ((sizeof(kvx__post) + 7) & ~(size_t)7)

static size_t rec_size(int n)
{
    return POST_HDR_SIZE + sizeof(kvx_pair) * (size_t)n;
}

int kvx__ring_init(kvx_ep *ep)
{
    if (ep->p.role != KVX_ROLE_SEND) return 0;
    size_t cap = ep->p.post_ring_bytes;
    if (cap == 0) {
        const kv_layout *l = &ep->p.layout;
        uint64_t want =
            (uint64_t)l->n_layers * l->num_blocks * (sizeof(kvx_pair) + KVX_POST_HDR_BYTES / 4);
        cap = want < RING_DEF_MIN ? RING_DEF_MIN : want > RING_DEF_MAX ? RING_DEF_MAX : want;
    }
    if (cap < RING_MIN) cap = RING_MIN;
    if (cap > SIZE_MAX - 8) return TD_ERANGE;
    cap = (cap + 7) & ~(size_t)7;
    ep->ring = malloc(cap);
    if (!ep->ring) return TD_ENOMEM;
    /* Touched once here: the posts never page-fault, and the sender's
     * resident size does not creep up as the ring first goes round. A
     * memset alone does not do it: the compiler folds malloc + memset(0)
     * into calloc, and calloc leaves a fresh mmap'd chunk (already zero)
     * untouched, so the ring's 4 MiB came in page by page over the first
     * minutes of load (the prefill worker's RSS growth in a soak). One
     * volatile write per page cannot be folded away. */
    memset(ep->ring, 0, cap);
    volatile uint8_t *touch = ep->ring;
    for (size_t off = 0; off < cap; off += 4096)
        touch[off] = 0;
    touch[cap - 1] = 0; /* the last page, when the ring does not start on one */
    ep->ring_cap = cap;
    ep->p.post_ring_bytes = cap;
    pthread_mutex_init(&ep->ring_mu, NULL);
    return 0;
}

void kvx__ring_fini(kvx_ep *ep)
{
    if (!ep->ring) return;
    pthread_mutex_destroy(&ep->ring_mu);
    free(ep->ring);
    ep->ring = NULL;
}

static int post_check(const kvx_ep *ep, const kvx_layer_post *p)
{
    if (!p->req_id || !p->pairs || p->n <= 0 || p->n > KVX_POST_MAX_PAIRS || p->layer < 0 ||
        (uint32_t)p->layer >= ep->p.layout.n_layers)
        return TD_EINVAL;
    size_t len = strnlen(p->req_id, KVX_REQ_ID_MAX);
    if (len == 0 || len >= KVX_REQ_ID_MAX) return TD_EINVAL;
    for (int i = 0; i < p->n; i++)
        if (p->pairs[i].src >= ep->p.layout.num_blocks) return TD_EINVAL;
    return 0;
}

/* Bytes the records of posts take when written from byte counter head on,
 * SKIP fillers included. */
static uint64_t ring_need(const kvx_ep *ep, uint64_t head, const kvx_layer_post *posts, int n)
{
    uint64_t pos = head;
    for (int i = 0; i < n; i++) {
        size_t rec = rec_size(posts[i].n);
        size_t end_room = ep->ring_cap - (size_t)(pos % ep->ring_cap);
        if (end_room < rec) pos += end_room;
        pos += rec;
    }
    return pos - head;
}

int kvx_send_layers(kvx_ep *ep, const kvx_layer_post *posts, int n_posts)
{
    if (!ep || ep->p.role != KVX_ROLE_SEND || !ep->ring || !posts || n_posts <= 0) return TD_EINVAL;
    uint64_t bytes = 0;
    for (int i = 0; i < n_posts; i++) {
        int rc = post_check(ep, &posts[i]);
        if (rc < 0) return rc;
        bytes += rec_size(posts[i].n);
    }
    /* Fillers at most double what a batch takes; half the ring always fits
     * once the ring drains. */
    if (bytes > ep->ring_cap / 2) return TD_ERANGE;

    pthread_mutex_lock(&ep->ring_mu);
    uint64_t head = __atomic_load_n(&ep->ring_head, __ATOMIC_RELAXED); /* ours */
    uint64_t tail = __atomic_load_n(&ep->ring_tail, __ATOMIC_SEQ_CST);
    uint64_t need = ring_need(ep, head, posts, n_posts);
    int rc = 0;
    if (need > ep->ring_cap - (head - tail))
        rc = TD_EAGAIN;
    else
        rc = kvx__ev_reserve(ep, n_posts, 0, 0);
    if (rc < 0) {
        pthread_mutex_unlock(&ep->ring_mu);
        kvx__stat_add(&ep->st.posts_refused, 1);
        return rc;
    }
    for (int i = 0; i < n_posts; i++) {
        const kvx_layer_post *p = &posts[i];
        size_t rec = rec_size(p->n);
        size_t off = (size_t)(head % ep->ring_cap);
        if (ep->ring_cap - off < rec) {
            kvx__post *skip = (kvx__post *)(ep->ring + off);
            skip->rec_bytes = (uint32_t)(ep->ring_cap - off);
            skip->rec_flags = KVX__REC_SKIP;
            head += ep->ring_cap - off;
            off = 0;
        }
        kvx__post *post = (kvx__post *)(ep->ring + off);
        memset(post, 0, POST_HDR_SIZE);
        post->rec_bytes = (uint32_t)rec;
        size_t len = strlen(p->req_id);
        memcpy(post->id, p->req_id, len + 1);
        post->hash = XXH3_64bits(p->req_id, len);
        post->layer = (uint32_t)p->layer;
        post->n = p->n;
        post->ev = 1;
        memcpy(post->pairs, p->pairs, sizeof(kvx_pair) * (size_t)p->n);
        head += rec;
    }
    __atomic_store_n(&ep->ring_head, head, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&ep->ring_mu);
    if (!__atomic_exchange_n(&ep->ring_signalled, 1, __ATOMIC_SEQ_CST)) {
        uint64_t one = 1;
        if (write(ep->wake.fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
            td_log_warn(MOD, "wake_write_failed", "errno=%d", errno);
    }
    return 0;
}

void kvx__posts_drain(kvx_ep *ep)
{
    if (!ep->ring) return;
    __atomic_store_n(&ep->ring_signalled, 0, __ATOMIC_SEQ_CST);
    uint64_t head = __atomic_load_n(&ep->ring_head, __ATOMIC_SEQ_CST);
    while (ep->ring_read < head) {
        kvx__post *post = (kvx__post *)(ep->ring + ep->ring_read % ep->ring_cap);
        ep->ring_read += post->rec_bytes;
        if (post->rec_flags & KVX__REC_SKIP) continue;
        kvx__post_accept(ep, post);
    }
}

void kvx__post_free(kvx_ep *ep, kvx__post *post)
{
    if (post->ev) {
        post->ev = 0;
        kvx__ev_release(ep, 1);
    }
    post->rec_flags |= KVX__REC_FREE;
    uint64_t tail = __atomic_load_n(&ep->ring_tail, __ATOMIC_RELAXED); /* ours */
    uint64_t t = tail;
    while (t < ep->ring_read) {
        kvx__post *r = (kvx__post *)(ep->ring + t % ep->ring_cap);
        if (!(r->rec_flags & (KVX__REC_SKIP | KVX__REC_FREE))) break;
        t += r->rec_bytes;
    }
    if (t != tail) __atomic_store_n(&ep->ring_tail, t, __ATOMIC_SEQ_CST);
}
