/* kvx peers: the control connection of each peer (buffered, non-blocking
 * writes, message framing on reads), peer failure and reaping. The handshake
 * that makes a peer is in kvx_handshake.c; control messages about requests
 * are handled in kvx_req.c (kvx__handle_msg).
 *
 * A peer ends only through kvx__peer_fail, which fails its requests and
 * reports KVX_EV_PEER_ERROR (its slot reserved when the peer was made); the
 * memory goes at the end of the loop iteration (kvx__reap_peers), never
 * inside a callback. */
#include "kvtransfer/kvx.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD               "kvx"
#define KVX__CTRL_OUT_MAX (8u << 20) /* bytes queued to a peer before it counts as stalled */

int kvx__buf_reserve(kvx__buf *b, size_t extra)
{
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *d = realloc(b->data, cap);
    if (!d) return TD_ENOMEM;
    b->data = d;
    b->cap = cap;
    return 0;
}

static void buf_consume(kvx__buf *b, size_t n)
{
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

/* ---------- control messages ---------- */

static int ctrl_flush(kvx_ep *ep, kvx__peer *p)
{
    while (p->out.len > 0) {
        ssize_t n = send(p->ctrl.fd, p->out.data, p->out.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            return td_err_from_errno(errno);
        }
        buf_consume(&p->out, (size_t)n);
    }
    return kvx__conn_mod(ep, &p->ctrl, EPOLLIN | (p->out.len ? EPOLLOUT : 0));
}

/* Appends one message to p's output; flushes it now unless defer. */
static int ctrl_put(kvx_ep *ep, kvx__peer *p, uint16_t type, const void *a, size_t alen,
                    const void *b, size_t blen, int defer)
{
    if (p->dead) return TD_ECLOSED;
    if (alen + blen > KVX_WIRE_MAX_BODY) return TD_ETOOLONG;
    if (p->out.len > KVX__CTRL_OUT_MAX) {
        kvx__peer_fail(ep, p, TD_ETIMEDOUT, "peer stopped reading its control connection");
        return TD_ETIMEDOUT;
    }
    kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL, .type = type, .len = (uint32_t)(alen + blen)};
    if (kvx__buf_reserve(&p->out, sizeof(h) + alen + blen) < 0) {
        /* A control message that cannot be queued would be lost (a DONE, a
         * CANCEL) and leave the other side waiting: the stream is unusable. */
        kvx__peer_fail(ep, p, TD_ENOMEM, "no memory for the control stream");
        return TD_ENOMEM;
    }
    memcpy(p->out.data + p->out.len, &h, sizeof(h));
    p->out.len += sizeof(h);
    if (alen) {
        memcpy(p->out.data + p->out.len, a, alen);
        p->out.len += alen;
    }
    if (blen) {
        memcpy(p->out.data + p->out.len, b, blen);
        p->out.len += blen;
    }
    if (defer) {
        p->out_deferred = 1;
        return 0;
    }
    p->out_deferred = 0;
    int rc = ctrl_flush(ep, p);
    if (rc < 0) kvx__peer_fail(ep, p, TD_ECONNRESET, "control send failed: %s", td_strerror(rc));
    return rc;
}

int kvx__ctrl_send(kvx_ep *ep, kvx__peer *p, uint16_t type, const void *a, size_t alen,
                   const void *b, size_t blen)
{
    return ctrl_put(ep, p, type, a, alen, b, blen, 0);
}

int kvx__ctrl_queue(kvx_ep *ep, kvx__peer *p, uint16_t type, const void *a, size_t alen,
                    const void *b, size_t blen)
{
    return ctrl_put(ep, p, type, a, alen, b, blen, 1);
}

int kvx__ctrl_flush_now(kvx_ep *ep, kvx__peer *p)
{
    if (p->dead) return TD_ECONNRESET;
    p->out_deferred = 0;
    int rc = ctrl_flush(ep, p);
    if (rc < 0) {
        kvx__peer_fail(ep, p, TD_ECONNRESET, "control send failed: %s", td_strerror(rc));
        return TD_ECONNRESET;
    }
    return 0;
}

void kvx__flush_peers(kvx_ep *ep)
{
    for (kvx__peer *p = ep->peers; p; p = p->next) {
        if (p->dead || !p->out_deferred) continue;
        p->out_deferred = 0;
        int rc = ctrl_flush(ep, p);
        if (rc < 0)
            kvx__peer_fail(ep, p, TD_ECONNRESET, "control send failed: %s", td_strerror(rc));
    }
}

/* ---------- peers ---------- */

void kvx__peer_fail(kvx_ep *ep, kvx__peer *p, int err, const char *fmt, ...)
{
    if (p->dead) return;
    p->dead = 1;
    char msg[KVX_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    int open = 0;
    for (int i = 0; i < ep->reqs_hi; i++)
        open += ep->reqs[i].used && ep->reqs[i].peer == p;
    /* A peer leaving with nothing in flight is a normal close. */
    td_log_emit(open ? TD_LOG_WARN : TD_LOG_INFO, MOD, open ? "peer_failed" : "peer_closed",
                "peer=%d err=%s open_requests=%d msg=\"%s\"", p->id, td_err_name(err), open, msg);
    for (int i = 0; i < ep->reqs_hi; i++) {
        kvx__req *r = &ep->reqs[i];
        if (!r->used || r->peer != p) continue;
        if (ep->p.role == KVX_ROLE_RECV)
            kvx__rreq_finish(ep, r, err, msg);
        else
            kvx__sreq_finish(ep, r, err, msg, 0);
    }
    if (ep->ops->peer_close) ep->ops->peer_close(ep, p);
    kvx__conn_del(ep, &p->ctrl);
    if (p->ctrl.fd >= 0) close(p->ctrl.fd);
    p->ctrl.fd = -1;
    __atomic_fetch_sub(&ep->st.peers, 1, __ATOMIC_RELAXED);
    p->ev_left = 0; /* reserved when the peer was made */
    kvx__emit(ep, KVX_EV_PEER_ERROR, NULL, -1, p->id, err, msg);
}

void kvx__peer_free(kvx_ep *ep, kvx__peer *p)
{
    kvx__ev_release(ep, p->ev_left);
    if (ep->ops->peer_free) ep->ops->peer_free(ep, p);
    free(p->in.data);
    free(p->out.data);
    free(p);
}

kvx__peer *kvx__peers_take_dead(kvx_ep *ep)
{
    kvx__peer *dead = NULL, **pp = &ep->peers;
    while (*pp) {
        kvx__peer *p = *pp;
        if (p->dead) {
            *pp = p->next;
            p->next = dead;
            dead = p;
        } else {
            pp = &p->next;
        }
    }
    return dead;
}

void kvx__peers_free(kvx_ep *ep, kvx__peer *dead)
{
    while (dead) {
        kvx__peer *p = dead;
        dead = p->next;
        kvx__peer_free(ep, p);
    }
}

void kvx__reap_peers(kvx_ep *ep)
{
    kvx__peers_free(ep, kvx__peers_take_dead(ep));
}

kvx__peer *kvx__peer_by_id(kvx_ep *ep, int id)
{
    for (kvx__peer *p = ep->peers; p; p = p->next)
        if (p->id == id) return p;
    return NULL;
}

void kvx__peer_on_ctrl(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    kvx__peer *p = c->peer;
    if (p->dead) return;
    if (events & EPOLLOUT) {
        int rc = ctrl_flush(ep, p);
        if (rc < 0) {
            kvx__peer_fail(ep, p, TD_ECONNRESET, "control write failed: %s", td_strerror(rc));
            return;
        }
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    for (;;) {
        if (kvx__buf_reserve(&p->in, 65536) < 0) {
            kvx__peer_fail(ep, p, TD_ENOMEM, "no memory for control input");
            return;
        }
        ssize_t n = recv(c->fd, p->in.data + p->in.len, p->in.cap - p->in.len, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        if (n <= 0) {
            kvx__peer_fail(ep, p, TD_ECONNRESET, "control connection closed by peer%s",
                           n < 0 ? " (error)" : "");
            return;
        }
        p->in.len += (size_t)n;
        __atomic_store_n(&p->last_rx_ns, td_now_ns(), __ATOMIC_RELAXED);
        size_t off = 0;
        for (;;) {
            kvx_wire_hdr h;
            const uint8_t *body;
            size_t used;
            int rc = kvx_wire_msg_next(p->in.data + off, p->in.len - off, &h, &body, &used);
            if (rc == 0) break;
            if (rc < 0) {
                kvx__peer_fail(ep, p, TD_EPROTO, "bad control header magic=%08x len=%u", h.magic,
                               h.len);
                return;
            }
            kvx__handle_msg(ep, p, h.type, body, h.len);
            if (p->dead) return;
            off += used;
        }
        buf_consume(&p->in, off);
    }
}

kvx__peer *kvx__peer_new(kvx_ep *ep, int fd)
{
    kvx__peer *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->id = ep->next_peer_id++;
    p->ctrl.fd = fd;
    p->ctrl.on_io = kvx__peer_on_ctrl;
    p->ctrl.peer = p;
    __atomic_store_n(&p->last_rx_ns, td_now_ns(), __ATOMIC_RELAXED);
    return p;
}
