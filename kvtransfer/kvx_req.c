/* kvx requests: the receiver's and the sender's request state machines, the
 * control messages that drive them, and the calls that open, post to and
 * cancel them. Everything here runs on the progress thread except the
 * public entry points, which hand a command to it (kvx__call).
 *
 * Receiver (one kvx__req per kvx_recv_register; the blocks are leased):
 *
 *   state       | event                                  | next
 *   ------------+----------------------------------------+------------------------------
 *   REGISTERED  | BEGIN from a peer                      | BOUND (only that peer writes)
 *   BOUND       | last block of the last layer lands     | DONE: lease back, DONE sent
 *   any         | peer death, stall, protocol error      | FAILED: lease back
 *   REGISTERED, | cancel / deadline                      | FAILED at once (frames still
 *   BOUND (tcp) |                                        | on the wire go to a sink)
 *   BOUND (shm, | cancel / deadline                      | CLOSING: CANCEL sent
 *   cuda_ipc,   |                                        |
 *   nccl)       |                                        |
 *   CLOSING     | CANCEL_ACK, peer death, stall timeout  | FAILED: lease back
 *
 * Sender (one kvx__req per kvx_send_begin):
 *
 *   state       | event                                  | next
 *   ------------+----------------------------------------+------------------------------
 *   OPEN        | BEGIN_ACK (the receiver's block list)  | ACKED: waiting posts start
 *   OPEN, ACKED | post                                   | same (queued / started)
 *   any         | DONE from the receiver                 | DONE
 *   any         | cancel, deadline, FAIL, peer death,    | CLOSING: unstarted posts
 *               | a post the receiver did not register   | dropped
 *   CLOSING     | last in-flight post finished           | FAILED; only now CANCEL or
 *               |                                        | CANCEL_ACK goes out
 *
 * Each request ends with exactly one final event (DONE or FAILED), emitted
 * when its slot is freed. */
#include "kvtransfer/kvx.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD "kvx"

int kvx__send_req_msg(kvx_ep *ep, kvx__peer *p, uint16_t type, uint64_t hash, int err)
{
    kvx_wire_req m = {.hash = hash, .err = err};
    return kvx__ctrl_send(ep, p, type, &m, sizeof(m), NULL, 0);
}

/* ---------- requests ---------- */

static kvx__req *req_by_id(kvx_ep *ep, const char *id)
{
    for (int i = 0; i < ep->reqs_hi; i++)
        if (ep->reqs[i].used && strcmp(ep->reqs[i].id, id) == 0) return &ep->reqs[i];
    return NULL;
}

static kvx__req *req_by_hash(kvx_ep *ep, uint64_t hash, kvx__peer *p)
{
    for (int i = 0; i < ep->reqs_hi; i++) {
        kvx__req *r = &ep->reqs[i];
        if (r->used && r->hash == hash && (!p || r->peer == p)) return r;
    }
    return NULL;
}

static kvx__req *req_alloc(kvx_ep *ep)
{
    for (int i = 0; i < ep->max_reqs; i++) {
        kvx__req *r = &ep->reqs[i];
        if (!r->used) {
            memset(r, 0, sizeof(*r));
            r->used = 1;
            r->slot = i;
            if (i >= ep->reqs_hi) ep->reqs_hi = i + 1;
            return r;
        }
    }
    return NULL;
}

void kvx__req_free(kvx_ep *ep, kvx__req *r)
{
    kvx__ev_release(ep, r->ev_left);
    free(r->dst);
    free(r->landed);
    free(r->layer_count);
    free(r->reg);
    int slot = r->slot;
    memset(r, 0, sizeof(*r));
    r->slot = slot;
}

void kvx__rreq_finish(kvx_ep *ep, kvx__req *r, int err, const char *msg)
{
    if (!r->used) return;
    kvx__peer *peer = r->peer;
    uint64_t hash = r->hash;
    if (ep->ops->rreq_release) ep->ops->rreq_release(ep, r);
    for (int i = 0; i < r->n_blocks; i++)
        ep->owner[r->dst[i]] = -1;
    if (err == 0) {
        kvx__stat_add(&ep->st.requests_done, 1);
        td_log_debug(MOD, "recv_request_done", "req=%s", r->id);
        r->ev_left--;
        kvx__emit_ex(ep, KVX_EV_DONE, r->id, -1, r->peer ? r->peer->id : -1, 0, NULL,
                     td_now_ns() - r->t0_ns);
    } else {
        kvx__stat_add(&ep->st.requests_failed, 1);
        td_log_warn(MOD, "recv_request_failed", "req=%s err=%s landed=%llu", r->id,
                    td_err_name(err), (unsigned long long)r->n_landed);
        r->ev_left--;
        kvx__emit_ex(ep, KVX_EV_FAILED, r->id, -1, r->peer ? r->peer->id : -1, err, msg,
                     td_now_ns() - r->t0_ns);
    }
    kvx__req_free(ep, r);
    /* The sender hears of it last. A send that fails fails the peer, and
     * that finishes every request still bound to it: r must be gone by
     * then, or it would end twice (a FAILED for a request that had landed
     * whole, then this DONE with a wiped id). Peers are freed only at the
     * end of a loop iteration, so peer is still valid here. */
    if (peer && !peer->dead)
        kvx__send_req_msg(ep, peer, err == 0 ? KVX_MSG_DONE : KVX_MSG_FAIL, hash, err);
}

/* Receiver, local decision to stop (cancel, deadline). A sender that writes
 * our memory directly must confirm it stopped before the blocks go back. */
void kvx__rreq_abort(kvx_ep *ep, kvx__req *r, int err, const char *msg)
{
    if (r->closing) return;
    if (ep->ops->cancel_ack && r->peer && !r->peer->dead) {
        r->closing = 1;
        r->final_err = err;
        r->closing_ns = td_now_ns();
        snprintf(r->final_msg, sizeof(r->final_msg), "%s", msg ? msg : "");
        kvx__send_req_msg(ep, r->peer, KVX_MSG_CANCEL, r->hash, err);
        return;
    }
    kvx__rreq_finish(ep, r, err, msg);
}

kvx__req *kvx__rreq_claim(kvx_ep *ep, kvx__peer *p, uint64_t hash, uint32_t layer, uint32_t dst,
                          int *bad)
{
    *bad = 0;
    if (layer >= ep->p.layout.n_layers || dst >= ep->p.layout.num_blocks) {
        *bad = 1;
        return NULL;
    }
    int32_t slot = ep->owner[dst];
    if (slot < 0) return NULL;
    kvx__req *r = &ep->reqs[slot];
    if (r->hash != hash || r->closing) return NULL;
    if (r->peer != p) {
        /* Only the peer that sent BEGIN may write a request's blocks. */
        return NULL;
    }
    uint8_t *st = &r->landed[(size_t)layer * r->n_blocks + ep->owner_pos[dst]];
    if (*st != 0) {
        *bad = 1;
        kvx__rreq_finish(ep, r, TD_EPROTO, "block sent twice");
        return NULL;
    }
    *st = 1;
    return r;
}

void kvx__rreq_land(kvx_ep *ep, kvx__req *r, uint32_t layer, uint32_t dst)
{
    r->landed[(size_t)layer * r->n_blocks + ep->owner_pos[dst]] = 2;
    r->n_landed++;
    kvx__stat_add(&ep->st.bytes_received, ep->block_bytes);
    if (++r->layer_count[layer] == (uint32_t)r->n_blocks) {
        r->ev_left--;
        kvx__emit(ep, KVX_EV_LAYER_LANDED, r->id, (int)layer, r->peer ? r->peer->id : -1, 0, NULL);
    }
    if (r->n_landed == (uint64_t)r->n_blocks * ep->p.layout.n_layers)
        kvx__rreq_finish(ep, r, 0, NULL);
}

static void sreq_maybe_reap(kvx_ep *ep, kvx__req *r)
{
    if (!r->closing || r->inflight > 0) return;
    /* Only now is nothing of r in flight: tell the receiver it may release
     * the blocks (a direct writer's copies have all finished). */
    if (r->peer && !r->peer->dead) {
        if (r->notify) kvx__send_req_msg(ep, r->peer, KVX_MSG_CANCEL, r->hash, r->final_err);
        if (r->ack_cancel) kvx__send_req_msg(ep, r->peer, KVX_MSG_CANCEL_ACK, r->hash, 0);
    }
    if (r->final_err == 0) {
        kvx__stat_add(&ep->st.requests_done, 1);
        r->ev_left--;
        kvx__emit_ex(ep, KVX_EV_DONE, r->id, -1, r->peer ? r->peer->id : -1, 0, NULL,
                     td_now_ns() - r->t0_ns);
    } else {
        kvx__stat_add(&ep->st.requests_failed, 1);
        td_log_warn(MOD, "send_request_failed", "req=%s err=%s", r->id, td_err_name(r->final_err));
        r->ev_left--;
        kvx__emit_ex(ep, KVX_EV_FAILED, r->id, -1, r->peer ? r->peer->id : -1, r->final_err,
                     r->final_msg, td_now_ns() - r->t0_ns);
    }
    kvx__req_free(ep, r);
}

void kvx__post_done(kvx_ep *ep, kvx__post *post)
{
    kvx__req *r = post->req;
    /* A request the receiver confirmed (DONE) while this post's last bytes
     * were still being reported written (tcp writer threads) still gets its
     * LAYER_SENT, before its DONE; a failing one does not. */
    if (!r->closing || r->final_err == 0) {
        post->ev = 0; /* reserved by kvx_send_layers */
        kvx__emit(ep, KVX_EV_LAYER_SENT, r->id, (int)post->layer, r->peer ? r->peer->id : -1, 0,
                  NULL);
    }
    r->inflight--;
    kvx__post_free(ep, post);
    sreq_maybe_reap(ep, r);
}

void kvx__sreq_finish(kvx_ep *ep, kvx__req *r, int err, const char *msg, int notify_peer)
{
    if (!r->used || r->closing) return;
    r->closing = 1;
    r->final_err = err;
    snprintf(r->final_msg, sizeof(r->final_msg), "%s", msg ? msg : "");
    r->notify = notify_peer && err != 0;
    while (r->wait_head) {
        kvx__post *p = r->wait_head;
        r->wait_head = p->next;
        kvx__post_free(ep, p);
    }
    r->wait_tail = NULL;
    if (ep->ops->sreq_abort) ep->ops->sreq_abort(ep, r);
    sreq_maybe_reap(ep, r);
}

static void handle_begin(kvx_ep *ep, kvx__peer *p, const kvx_wire_req *m, const uint8_t *tail,
                         uint32_t tail_len)
{
    char id[KVX_REQ_ID_MAX];
    if (m->n == 0 || m->n >= KVX_REQ_ID_MAX || m->n != tail_len) {
        kvx__peer_fail(ep, p, TD_EPROTO, "bad BEGIN (id length %u)", m->n);
        return;
    }
    memcpy(id, tail, m->n);
    id[m->n] = 0;
    kvx__req *r = req_by_id(ep, id);
    if (!r || r->closing || r->hash != m->hash) {
        kvx__send_req_msg(ep, p, KVX_MSG_FAIL, m->hash, TD_ENOENT);
        return;
    }
    if (r->peer && r->peer != p) {
        kvx__send_req_msg(ep, p, KVX_MSG_FAIL, m->hash, TD_EEXIST);
        return;
    }
    r->peer = p;
    r->t0_ns = td_now_ns();
    td_log_debug(MOD, "begin", "req=%s peer=%d", r->id, p->id);
    kvx_wire_req ack = {.hash = r->hash, .n = (uint32_t)r->n_blocks};
    kvx__ctrl_send(ep, p, KVX_MSG_BEGIN_ACK, &ack, sizeof(ack), r->dst,
                   sizeof(uint32_t) * (size_t)r->n_blocks);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Sender: a post may only name blocks the receiver registered. */
static int post_check(kvx__req *r, const kvx__post *post)
{
    for (int i = 0; i < post->n; i++)
        if (!bsearch(&post->pairs[i].dst, r->reg, (size_t)r->n_reg, sizeof(uint32_t), cmp_u32))
            return TD_EINVAL;
    return 0;
}

static void post_start(kvx_ep *ep, kvx__req *r, kvx__post *post)
{
    int rc = post_check(r, post);
    if (rc < 0) {
        kvx__post_free(ep, post);
        kvx__sreq_finish(ep, r, rc, "posted a block the receiver did not register", 1);
        return;
    }
    r->inflight++;
    rc = ep->ops->send_post(ep, r->peer, post);
    if (rc < 0) {
        /* send_post owns post on failure too and has called post_done. */
        kvx__sreq_finish(ep, r, rc, "transport failed to send", 1);
    }
}

static void start_waiting_posts(kvx_ep *ep, kvx__req *r)
{
    uint64_t hash = r->hash;
    while (r->used && r->hash == hash && !r->closing && r->wait_head) {
        kvx__post *post = r->wait_head;
        r->wait_head = post->next;
        if (!r->wait_head) r->wait_tail = NULL;
        post->next = NULL;
        post_start(ep, r, post);
    }
}

/* Starts posts queued by kvx_send_layer since the last iteration. */
void kvx__kick_posts(kvx_ep *ep)
{
    int n = ep->n_kick;
    ep->n_kick = 0;
    for (int i = 0; i < n; i++) {
        kvx__req *r = &ep->reqs[ep->kick[i]];
        if (!r->used || !r->kicked) continue;
        r->kicked = 0;
        start_waiting_posts(ep, r);
    }
}

static void handle_begin_ack(kvx_ep *ep, kvx__peer *p, const kvx_wire_req *m, const uint8_t *tail,
                             uint32_t tail_len)
{
    kvx__req *r = req_by_hash(ep, m->hash, p);
    if (!r || r->closing || r->acked) return;
    if ((uint64_t)m->n * sizeof(uint32_t) != tail_len || m->n == 0) {
        kvx__peer_fail(ep, p, TD_EPROTO, "bad BEGIN_ACK");
        return;
    }
    r->reg = malloc(tail_len);
    if (!r->reg) {
        kvx__sreq_finish(ep, r, TD_ENOMEM, "no memory for the block list", 1);
        return;
    }
    memcpy(r->reg, tail, tail_len);
    r->n_reg = (int)m->n;
    qsort(r->reg, (size_t)r->n_reg, sizeof(uint32_t), cmp_u32);
    r->acked = 1;
    td_log_debug(MOD, "begin_ack", "req=%s peer=%d blocks=%d", r->id, p->id, r->n_reg);
    while (r->wait_head && r->used && !r->closing) {
        kvx__post *post = r->wait_head;
        r->wait_head = post->next;
        if (!r->wait_head) r->wait_tail = NULL;
        post->next = NULL;
        post_start(ep, r, post);
    }
}

static void handle_post(kvx_ep *ep, kvx__peer *p, const kvx_wire_req *m, const uint8_t *tail,
                        uint32_t tail_len)
{
    if ((uint64_t)m->n * sizeof(kvx_pair) != tail_len) {
        kvx__peer_fail(ep, p, TD_EPROTO, "bad POST length");
        return;
    }
    kvx__req *r = req_by_hash(ep, m->hash, p);
    if (!r || r->peer != p) return; /* released meanwhile: nothing to land */
    /* Closing (canceled, awaiting CANCEL_ACK): a transport that receives
     * itself (nccl) must still match the sender's queued sends. */
    if (r->closing && !ep->ops->recv_post) return;
    if (m->layer >= ep->p.layout.n_layers) {
        kvx__stat_add(&ep->st.frames_rejected, 1);
        kvx__rreq_finish(ep, r, TD_EPROTO, "POST layer out of range");
        return;
    }
    const kvx_pair *pairs = (const kvx_pair *)tail;
    if (ep->ops->recv_post) {
        int rc = ep->ops->recv_post(ep, p, r, m->layer, pairs, (int)m->n);
        if (rc < 0 && r->used && r->hash == m->hash)
            kvx__rreq_finish(ep, r, rc, "receive post failed");
        return;
    }
    uint64_t hash = r->hash;
    for (uint32_t i = 0; i < m->n; i++) {
        int bad;
        kvx_pair pr;
        memcpy(&pr, &pairs[i], sizeof(pr));
        kvx__req *c = kvx__rreq_claim(ep, p, hash, m->layer, pr.dst, &bad);
        if (!c) {
            kvx__stat_add(&ep->st.frames_rejected, 1);
            if (r->used && r->hash == hash)
                kvx__rreq_finish(ep, r, TD_EPROTO, "POST names a block outside the request");
            return;
        }
        kvx__rreq_land(ep, c, m->layer, pr.dst);
        if (!r->used || r->hash != hash) return; /* completed (or failed) inside land */
    }
}

void kvx__handle_msg(kvx_ep *ep, kvx__peer *p, uint16_t type, const uint8_t *body, uint32_t len)
{
    int recv = ep->p.role == KVX_ROLE_RECV;
    if (type == KVX_MSG_HEARTBEAT) return;
    if (type == KVX_MSG_COMM_OPEN || type == KVX_MSG_COMM_CLOSE) {
        if (!ep->ops->ctrl_msg || ep->ops->ctrl_msg(ep, p, type, body, len) < 0)
            kvx__peer_fail(ep, p, TD_EPROTO, "unexpected transport message %u", type);
        return;
    }
    kvx_wire_req m;
    const uint8_t *tail;
    uint32_t tail_len;
    if (kvx_wire_req_decode(type, body, len, &m, &tail, &tail_len) < 0) {
        kvx__peer_fail(ep, p, TD_EPROTO, "bad control message type=%u len=%u", type, len);
        return;
    }
    kvx__req *r;
    switch (type) {
    case KVX_MSG_BEGIN:
        if (!recv) goto unexpected;
        handle_begin(ep, p, &m, tail, tail_len);
        return;
    case KVX_MSG_BEGIN_ACK:
        if (recv) goto unexpected;
        handle_begin_ack(ep, p, &m, tail, tail_len);
        return;
    case KVX_MSG_POST:
        /* A POST says "written into your memory": tcp cannot do that, its
         * blocks land only as frames on the data connections. Taken from a
         * tcp peer it would mark blocks landed that never arrived. */
        if (!recv || ep->ops->data_conn) goto unexpected;
        handle_post(ep, p, &m, tail, tail_len);
        return;
    case KVX_MSG_DONE:
        if (recv) goto unexpected;
        if ((r = req_by_hash(ep, m.hash, p))) kvx__sreq_finish(ep, r, 0, NULL, 0);
        return;
    case KVX_MSG_FAIL:
    case KVX_MSG_CANCEL: {
        int err = m.err < 0 ? m.err : TD_ECANCELED;
        char msg[96];
        snprintf(msg, sizeof(msg), "%s by peer: %s", type == KVX_MSG_CANCEL ? "canceled" : "failed",
                 td_strerror(err));
        if (!(r = req_by_hash(ep, m.hash, p))) {
            /* Nothing of an unknown request is in flight here. */
            if (!recv && ep->ops->cancel_ack && type == KVX_MSG_CANCEL)
                kvx__send_req_msg(ep, p, KVX_MSG_CANCEL_ACK, m.hash, 0);
            return;
        }
        if (recv) {
            /* The sender has stopped writing for r (it sends CANCEL/FAIL
             * only after its last copy). */
            kvx__rreq_finish(ep, r, r->closing ? r->final_err : err, msg);
        } else {
            if (ep->ops->cancel_ack && type == KVX_MSG_CANCEL) r->ack_cancel = 1;
            kvx__sreq_finish(ep, r, err, msg, 0);
        }
        return;
    }
    case KVX_MSG_CANCEL_ACK:
        if (!recv) goto unexpected;
        if ((r = req_by_hash(ep, m.hash, p)) && r->closing)
            kvx__rreq_finish(ep, r, r->final_err, r->final_msg);
        return;
    default:
        break;
    }
unexpected:
    kvx__peer_fail(ep, p, TD_EPROTO, "unexpected control message type=%u", type);
}

/* Progress thread: one registration (kvx_recv_register's checks, in its
 * order). */
static int register_one(kvx_ep *ep, const kvx_recv_reg *a)
{
    uint64_t hash = kvx_req_hash(a->req_id);
    for (int i = 0; i < ep->reqs_hi; i++)
        if (ep->reqs[i].used && (ep->reqs[i].hash == hash || !strcmp(ep->reqs[i].id, a->req_id)))
            return TD_EEXIST;
    for (int i = 0; i < a->n_blocks; i++)
        if (a->dst_blocks[i] >= ep->p.layout.num_blocks) return TD_EINVAL;
    kvx__req *r = req_alloc(ep);
    if (!r) return TD_ENOSPC;
    int rc = 0, i;
    for (i = 0; i < a->n_blocks; i++) {
        if (ep->owner[a->dst_blocks[i]] >= 0) {
            /* Leased by another request, or listed twice in this one. */
            rc = ep->owner[a->dst_blocks[i]] == r->slot ? TD_EINVAL : TD_EEXIST;
            break;
        }
        ep->owner[a->dst_blocks[i]] = r->slot;
        ep->owner_pos[a->dst_blocks[i]] = (uint32_t)i;
    }
    if (rc < 0) {
        while (--i >= 0)
            ep->owner[a->dst_blocks[i]] = -1;
        kvx__req_free(ep, r);
        return rc;
    }
    kvx__copy_id(r->id, a->req_id);
    r->hash = hash;
    r->deadline_ns = a->deadline_ns;
    r->t0_ns = td_now_ns();
    r->n_blocks = a->n_blocks;
    r->dst = malloc(sizeof(uint32_t) * (size_t)a->n_blocks);
    r->landed = calloc((size_t)a->n_blocks * ep->p.layout.n_layers, 1);
    r->layer_count = calloc(ep->p.layout.n_layers, sizeof(uint32_t));
    /* Room for every event r can produce: one LAYER_LANDED per layer and its
     * final event. Emitting them later never allocates. */
    rc = TD_ENOMEM;
    if (r->dst && r->landed && r->layer_count)
        rc = kvx__ev_reserve(ep, (int)ep->p.layout.n_layers + 1, 1, 0);
    if (rc < 0) {
        for (i = 0; i < a->n_blocks; i++)
            ep->owner[a->dst_blocks[i]] = -1;
        kvx__req_free(ep, r);
        return rc;
    }
    r->ev_left = (int)ep->p.layout.n_layers + 1;
    memcpy(r->dst, a->dst_blocks, sizeof(uint32_t) * (size_t)a->n_blocks);
    return 0;
}

static int check_id(const char *id)
{
    if (!id) return TD_EINVAL;
    size_t n = strlen(id);
    return n == 0 || n >= KVX_REQ_ID_MAX ? TD_EINVAL : 0;
}

/* Caller side: what kvx_recv_register checks before the round trip. */
static int register_check(const kvx_ep *ep, const void *item)
{
    const kvx_recv_reg *a = item;
    if (check_id(a->req_id) < 0 || !a->dst_blocks || a->n_blocks <= 0 ||
        (uint32_t)a->n_blocks > ep->p.layout.num_blocks)
        return TD_EINVAL;
    /* The block list travels back in one BEGIN_ACK. */
    if ((size_t)a->n_blocks > (KVX_WIRE_MAX_BODY - sizeof(kvx_wire_req)) / sizeof(uint32_t))
        return TD_ERANGE;
    return 0;
}

/* A batch of registrations or BEGINs for the progress thread: rcs[i] holds
 * the caller's verdict on entry i (< 0: skipped) and receives its result. */
struct batch_arg {
    const void *items;
    int n;
    int *rcs;
};

/* Caller side of both batch calls: checks each of the n entries (item_size
 * bytes each) with check, then hands those that pass to fn on the progress
 * thread in one round trip. Returns fn's count, or TD_EINVAL. */
static int batch_call(kvx_ep *ep, enum kvx_role role, const void *items, size_t item_size, int n,
                      int *rcs, int (*check)(const kvx_ep *, const void *),
                      int (*fn)(kvx_ep *, void *))
{
    if (!ep || ep->p.role != role || !items || !rcs || n <= 0 || n > KVX__MAX_REQS)
        return TD_EINVAL;
    int todo = 0;
    for (int i = 0; i < n; i++) {
        rcs[i] = check(ep, (const char *)items + (size_t)i * item_size);
        todo += rcs[i] == 0;
    }
    if (todo == 0) return 0;
    struct batch_arg a = {items, n, rcs};
    return kvx__call(ep, fn, &a);
}

static int register_batch_fn(kvx_ep *ep, void *arg)
{
    struct batch_arg *a = arg;
    const kvx_recv_reg *regs = a->items;
    int ok = 0;
    for (int i = 0; i < a->n; i++) {
        if (a->rcs[i] < 0) continue;
        a->rcs[i] = register_one(ep, &regs[i]);
        ok += a->rcs[i] == 0;
    }
    return ok;
}

int kvx_recv_register(kvx_ep *ep, const char *req_id, const uint32_t *dst_blocks, int n_blocks,
                      int64_t deadline_ns)
{
    kvx_recv_reg reg = {req_id, dst_blocks, n_blocks, deadline_ns};
    int rc = 0;
    int n = kvx_recv_register_batch(ep, &reg, 1, &rc);
    return n < 0 ? n : rc;
}

int kvx_recv_register_batch(kvx_ep *ep, const kvx_recv_reg *regs, int n, int *rcs)
{
    return batch_call(ep, KVX_ROLE_RECV, regs, sizeof(*regs), n, rcs, register_check,
                      register_batch_fn);
}

/* Progress thread: opens one request and queues its BEGIN to its peer,
 * without writing it and without joining the request to the peer yet
 * (begin_batch_fn does both). */
static int begin_one(kvx_ep *ep, const kvx_begin *a)
{
    kvx__peer *p = kvx__peer_by_id(ep, a->peer);
    if (!p) return TD_ENOENT;
    if (p->dead) return TD_ECONNRESET;
    uint64_t hash = kvx_req_hash(a->req_id);
    int open = 0;
    for (int i = 0; i < ep->reqs_hi; i++) {
        if (!ep->reqs[i].used) continue;
        if (ep->reqs[i].hash == hash || !strcmp(ep->reqs[i].id, a->req_id)) return TD_EEXIST;
        open++;
    }
    kvx__req *r = req_alloc(ep);
    if (!r) return TD_ENOSPC;
    /* Its final event is reserved; the queue also grows here, off the hot
     * path, to keep room for one LAYER_SENT per layer of every open request,
     * so kvx_send_layers (which may not grow it) finds room. */
    int rc = kvx__ev_reserve(ep, 1, 1, (open + 1) * (int)ep->p.layout.n_layers);
    if (rc < 0) {
        kvx__req_free(ep, r);
        return rc;
    }
    r->ev_left = 1;
    kvx__copy_id(r->id, a->req_id);
    r->hash = hash;
    r->deadline_ns = a->deadline_ns;
    r->t0_ns = td_now_ns();
    kvx_wire_req m = {.hash = hash, .n = (uint32_t)strlen(a->req_id)};
    rc = kvx__ctrl_queue(ep, p, KVX_MSG_BEGIN, &m, sizeof(m), a->req_id, m.n);
    if (rc < 0) kvx__req_free(ep, r);
    return rc;
}

static int begin_batch_fn(kvx_ep *ep, void *arg)
{
    struct batch_arg *a = arg;
    const kvx_begin *begins = a->items;
    for (int i = 0; i < a->n; i++)
        if (a->rcs[i] == 0) a->rcs[i] = begin_one(ep, &begins[i]);
    /* The BEGINs leave now, one write per peer. A request joins its peer
     * only once its BEGIN is written (or queued behind a full socket): a
     * write that fails the peer must not also finish the request with a
     * FAILED event, as the caller gets the error code instead and owns
     * nothing of it, exactly as kvx_send_begin. */
    int ok = 0;
    for (int i = 0; i < a->n; i++) {
        if (a->rcs[i] < 0) continue;
        /* Both found as begin_one left them: ids are unique among open
         * requests, and a failed peer stays listed until the loop's end. */
        kvx__req *r = req_by_id(ep, begins[i].req_id);
        kvx__peer *p = kvx__peer_by_id(ep, begins[i].peer);
        int rc = p->out_deferred ? kvx__ctrl_flush_now(ep, p) : p->dead ? TD_ECONNRESET : 0;
        if (rc < 0) {
            kvx__req_free(ep, r);
            a->rcs[i] = rc;
            continue;
        }
        r->peer = p;
        ok++;
    }
    return ok;
}

static int begin_check(const kvx_ep *ep, const void *item)
{
    (void)ep;
    return check_id(((const kvx_begin *)item)->req_id);
}

int kvx_send_begin(kvx_ep *ep, int peer, const char *req_id, int64_t deadline_ns)
{
    kvx_begin b = {peer, req_id, deadline_ns};
    int rc = 0;
    int n = kvx_send_begin_batch(ep, &b, 1, &rc);
    return n < 0 ? n : rc;
}

int kvx_send_begin_batch(kvx_ep *ep, const kvx_begin *begins, int n, int *rcs)
{
    return batch_call(ep, KVX_ROLE_SEND, begins, sizeof(*begins), n, rcs, begin_check,
                      begin_batch_fn);
}

/* Sender, progress thread: a post read from the post ring. */
void kvx__post_accept(kvx_ep *ep, kvx__post *post)
{
    kvx__req *r = req_by_hash(ep, post->hash, NULL);
    if (!r || strcmp(r->id, post->id) != 0) {
        /* No open request of that id: never begun, or its final event is
         * out already. Reported per post; it ends nothing. */
        td_log_warn(MOD, "post_rejected", "req=%s layer=%u", post->id, post->layer);
        post->ev = 0;
        kvx__emit(ep, KVX_EV_POST_REJECTED, post->id, (int)post->layer, -1, TD_ENOENT,
                  "no open request with this id");
        kvx__post_free(ep, post);
        return;
    }
    if (r->closing) {
        /* Failing: its one FAILED event reports it. */
        kvx__post_free(ep, post);
        return;
    }
    for (int i = 0; i < post->n; i++)
        if (post->pairs[i].dst >= r->peer->remote.num_blocks) {
            kvx__post_free(ep, post);
            kvx__sreq_finish(ep, r, TD_EINVAL, "posted a block beyond the receiver's pool", 1);
            return;
        }
    post->req = r;
    post->next = NULL;
    /* Queue it; the data moves later in this loop iteration (kick_posts). */
    if (r->wait_tail)
        r->wait_tail->next = post;
    else
        r->wait_head = post;
    r->wait_tail = post;
    if (r->acked && !r->kicked) {
        if (ep->n_kick == ep->max_reqs) {
            start_waiting_posts(ep, r); /* list full of stale entries: start now */
        } else {
            r->kicked = 1;
            ep->kick[ep->n_kick++] = r->slot;
        }
    }
}

struct layer_arg {
    const char *id;
    const kvx_pair *pairs;
    int n;
};

/* kvx_send_layer's synchronous check of the request's state. */
static int layer_check_fn(kvx_ep *ep, void *arg)
{
    struct layer_arg *a = arg;
    kvx__req *r = req_by_id(ep, a->id);
    if (!r) return TD_ENOENT;
    if (r->closing) return r->final_err < 0 ? r->final_err : TD_ECANCELED;
    for (int i = 0; i < a->n; i++)
        if (a->pairs[i].dst >= r->peer->remote.num_blocks) return TD_EINVAL;
    return 0;
}

int kvx_send_layer(kvx_ep *ep, const char *req_id, int layer, const kvx_pair *pairs, int n)
{
    kvx_layer_post one = {.req_id = req_id, .layer = layer, .pairs = pairs, .n = n};
    if (!ep || ep->p.role != KVX_ROLE_SEND || check_id(req_id) < 0 || layer < 0 ||
        (uint32_t)layer >= ep->p.layout.n_layers || n <= 0 || !pairs || n > KVX_POST_MAX_PAIRS)
        return TD_EINVAL;
    for (int i = 0; i < n; i++)
        if (pairs[i].src >= ep->p.layout.num_blocks) return TD_EINVAL;
    struct layer_arg a = {req_id, pairs, n};
    int rc = kvx__call(ep, layer_check_fn, &a);
    if (rc < 0) return rc;
    return kvx_send_layers(ep, &one, 1);
}

static int cancel_fn(kvx_ep *ep, void *arg)
{
    kvx__req *r = req_by_id(ep, arg);
    if (!r || r->closing) return TD_ENOENT;
    if (ep->p.role == KVX_ROLE_RECV)
        kvx__rreq_abort(ep, r, TD_ECANCELED, "canceled locally");
    else
        kvx__sreq_finish(ep, r, TD_ECANCELED, "canceled locally", 1);
    return 0;
}

struct landed_arg {
    const char *id;
    uint64_t blocks;
};

static int landed_fn(kvx_ep *ep, void *arg)
{
    struct landed_arg *a = arg;
    kvx__req *r = req_by_id(ep, a->id);
    if (!r || r->closing) return TD_ENOENT;
    a->blocks = r->n_landed;
    return 0;
}

int kvx_recv_landed(kvx_ep *ep, const char *req_id, uint64_t *blocks)
{
    if (!ep || ep->p.role != KVX_ROLE_RECV || check_id(req_id) < 0 || !blocks) return TD_EINVAL;
    struct landed_arg a = {req_id, 0};
    int rc = kvx__call(ep, landed_fn, &a);
    if (rc == 0) *blocks = a.blocks;
    return rc;
}

int kvx_cancel(kvx_ep *ep, const char *req_id)
{
    if (!ep || check_id(req_id) < 0) return TD_EINVAL;
    return kvx__call(ep, cancel_fn, (void *)req_id);
}
