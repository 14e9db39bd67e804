/* tcp transport: blocks travel on n data connections per peer pair, each a
 * stream of [kvx_wire_frame][payload]. The sender gathers headers and payloads
 * straight from block memory with sendmsg(iovec[]); the receiver validates
 * each header, then reads the payload straight into the destination block.
 * No staging copy on either side. Frames of a post are spread round-robin
 * over the connections. Every socket is non-blocking and driven by the
 * endpoint's epoll, so a stalled peer never blocks the progress thread. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD           "kvx_tcp"
#define TCP_MAX_CONNS 16
#define TCP_IOV       64
#define TCP_SCRATCH   (256u << 10) /* bytes; sink for payloads we must not keep */

typedef struct tcp_frame {
    kvx_wire_frame hdr;
    kvx__post *post;
    const uint8_t *payload; /* hdr.len bytes of sender block memory */
    struct tcp_frame *next;
} tcp_frame;

typedef struct tcp_dconn {
    kvx__conn c;
    int used;
    /* sender: queue of frames; head is being written, off bytes of it done */
    tcp_frame *head, *tail;
    size_t off;
    /* receiver: current header, then payload */
    kvx_wire_frame rh;
    size_t rh_got;
    int in_payload;
    int discard;
    uint8_t *dst;
    size_t left; /* payload bytes still to read */
    kvx__req *req;
    uint32_t layer, block;
} tcp_dconn;

typedef struct tcp_peer {
    int n;
    int rr;
    tcp_dconn d[TCP_MAX_CONNS];
} tcp_peer;

typedef struct tcp_ep {
    uint8_t *scratch;
    void *owned_pool;
} tcp_ep;

static int tcp_ep_init(kvx_ep *ep)
{
    tcp_ep *t = calloc(1, sizeof(*t));
    if (!t) return TD_ENOMEM;
    ep->tp = t;
    t->scratch = malloc(TCP_SCRATCH);
    if (!t->scratch) return TD_ENOMEM;
    if (!ep->pool) {
        if (posix_memalign(&t->owned_pool, 4096, ep->pool_bytes) != 0) return TD_ENOMEM;
        ep->pool = t->owned_pool;
        ep->pool_owned = 1;
    }
    return 0;
}

static void tcp_ep_fini(kvx_ep *ep)
{
    tcp_ep *t = ep->tp;
    if (!t) return;
    free(t->scratch);
    free(t->owned_pool);
    free(t);
    ep->tp = NULL;
}

static tcp_peer *peer_tp(kvx__peer *p)
{
    if (!p->tp) p->tp = calloc(1, sizeof(tcp_peer));
    return p->tp;
}

/* One frame of a post is finished (written, or dropped). */
static void frame_done(kvx_ep *ep, tcp_frame *f)
{
    kvx__post *post = f->post;
    if (--post->remaining == 0) {
        free(post->tp);
        kvx__post_done(ep, post);
    }
}

static void conn_close(kvx_ep *ep, tcp_dconn *d)
{
    kvx__conn_del(ep, &d->c);
    if (d->c.fd >= 0) close(d->c.fd);
    d->c.fd = -1;
}

/* ---------- sender ---------- */

static void conn_write(kvx_ep *ep, tcp_dconn *d)
{
    kvx__peer *p = d->c.peer;
    while (d->head && !p->dead) {
        struct iovec iov[TCP_IOV];
        int k = 0;
        size_t off = d->off;
        for (tcp_frame *f = d->head; f && k < TCP_IOV - 1; f = f->next) {
            if (off < sizeof(f->hdr)) {
                iov[k].iov_base = (uint8_t *)&f->hdr + off;
                iov[k++].iov_len = sizeof(f->hdr) - off;
                iov[k].iov_base = (void *)f->payload;
                iov[k++].iov_len = f->hdr.len;
            } else {
                iov[k].iov_base = (void *)(f->payload + (off - sizeof(f->hdr)));
                iov[k++].iov_len = f->hdr.len - (off - sizeof(f->hdr));
            }
            off = 0;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)k};
        ssize_t n = sendmsg(d->c.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                if (kvx__conn_mod(ep, &d->c, EPOLLIN | EPOLLOUT) < 0)
                    kvx__peer_fail(ep, p, TD_EIO, "epoll failed");
                return;
            }
            kvx__peer_fail(ep, p, td_err_from_errno(errno), "data connection write failed");
            return;
        }
        kvx__stat_add(&ep->st.bytes_sent, (uint64_t)n);
        size_t left = (size_t)n;
        while (left > 0 && d->head) {
            tcp_frame *f = d->head;
            size_t rem = sizeof(f->hdr) + f->hdr.len - d->off;
            if (left < rem) {
                d->off += left;
                break;
            }
            left -= rem;
            d->off = 0;
            d->head = f->next;
            if (!d->head) d->tail = NULL;
            frame_done(ep, f);
        }
    }
    if (!p->dead && kvx__conn_mod(ep, &d->c, EPOLLIN) < 0)
        kvx__peer_fail(ep, p, TD_EIO, "epoll failed");
}

static void on_send_conn(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    tcp_dconn *d = c->tp;
    kvx__peer *p = c->peer;
    if (p->dead) return;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        /* The receiver never writes on a data connection: readable means
         * closed, reset, or a broken peer. */
        uint8_t b;
        ssize_t n = recv(c->fd, &b, 1, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            kvx__peer_fail(ep, p, TD_ECONNRESET, "data connection closed by receiver");
            return;
        }
        if (n > 0) {
            kvx__peer_fail(ep, p, TD_EPROTO, "unexpected bytes on a data connection");
            return;
        }
    }
    if (events & EPOLLOUT) conn_write(ep, d);
}

static int tcp_peer_attach(kvx_ep *ep, kvx__peer *p, int fd)
{
    if (fd >= 0) close(fd);
    tcp_peer *tp = peer_tp(p);
    if (!tp) return TD_ENOMEM;
    tp->n = ep->p.n_data_conns;
    for (int i = 0; i < tp->n; i++)
        tp->d[i].c.fd = -1;
    for (int i = 0; i < tp->n; i++) {
        tcp_dconn *d = &tp->d[i];
        int rc = kvx__dial(ep, p->addr, ep->p.stall_timeout_ns, &d->c.fd);
        if (rc < 0) return rc;
        d->used = 1;
        kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL,
                          .type = KVX_MSG_DATA_HELLO,
                          .len = sizeof(kvx_wire_data_hello)};
        kvx_wire_data_hello dh = {.token = p->token, .index = (uint32_t)i};
        uint8_t buf[sizeof(h) + sizeof(dh)];
        memcpy(buf, &h, sizeof(h));
        memcpy(buf + sizeof(h), &dh, sizeof(dh));
        if (send(d->c.fd, buf, sizeof(buf), MSG_NOSIGNAL) != (ssize_t)sizeof(buf))
            return TD_ECONNRESET;
        if ((rc = kvx__set_nonblock(d->c.fd)) < 0) return rc;
        d->c.on_io = on_send_conn;
        d->c.peer = p;
        d->c.tp = d;
    }
    return 0;
}

static int tcp_peer_start(kvx_ep *ep, kvx__peer *p)
{
    tcp_peer *tp = peer_tp(p);
    if (!tp) return TD_ENOMEM;
    for (int i = 0; i < tp->n; i++) {
        int rc = kvx__conn_add(ep, &tp->d[i].c, EPOLLIN);
        if (rc < 0) return rc;
    }
    return 0;
}

static int tcp_send_post(kvx_ep *ep, kvx__peer *p, kvx__post *post)
{
    tcp_peer *tp = p->tp;
    tcp_frame *fr = calloc((size_t)post->n, sizeof(*fr));
    if (!fr || !tp || tp->n == 0) {
        free(fr);
        post->tp = NULL;
        post->remaining = 0;
        kvx__post_done(ep, post);
        return TD_ENOMEM;
    }
    post->tp = fr;
    post->remaining = post->n;
    int touched[TCP_MAX_CONNS] = {0};
    for (int i = 0; i < post->n; i++) {
        tcp_frame *f = &fr[i];
        f->hdr.magic = KVX_WIRE_MAGIC_FRAME;
        f->hdr.layer = post->layer;
        f->hdr.hash = post->req->hash;
        f->hdr.dst = post->pairs[i].dst;
        f->hdr.src = post->pairs[i].src;
        f->hdr.len = ep->block_bytes;
        f->post = post;
        f->payload = kvx__block_ptr(ep, ep->pool, post->layer, post->pairs[i].src);
        int k = tp->rr++ % tp->n;
        tcp_dconn *d = &tp->d[k];
        if (d->tail)
            d->tail->next = f;
        else
            d->head = f;
        d->tail = f;
        touched[k] = 1;
    }
    for (int k = 0; !p->dead && k < tp->n; k++)
        if (touched[k]) conn_write(ep, &tp->d[k]);
    return 0;
}

/* Drops r's frames that have not started; a frame whose header is on the wire
 * must finish so the stream stays in sync (its source stays readable until
 * the request's final event). */
static void tcp_sreq_abort(kvx_ep *ep, kvx__req *r)
{
    tcp_peer *tp = r->peer ? r->peer->tp : NULL;
    if (!tp) return;
    for (int k = 0; k < tp->n; k++) {
        tcp_dconn *d = &tp->d[k];
        tcp_frame **pp = &d->head, *dropped = NULL, *last = NULL;
        while (*pp) {
            tcp_frame *f = *pp;
            int busy = f == d->head && d->off > 0;
            if (f->post->req == r && !busy) {
                *pp = f->next;
                f->next = dropped;
                dropped = f;
            } else {
                last = f;
                pp = &f->next;
            }
        }
        d->tail = last;
        while (dropped) {
            tcp_frame *f = dropped;
            dropped = f->next;
            frame_done(ep, f);
        }
    }
}

/* ---------- receiver ---------- */

static void on_recv_conn(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    tcp_dconn *d = c->tp;
    kvx__peer *p = c->peer;
    tcp_ep *t = ep->tp;
    int got = 0;
    while (!p->dead) {
        ssize_t n;
        if (!d->in_payload) {
            n = recv(c->fd, (uint8_t *)&d->rh + d->rh_got, sizeof(d->rh) - d->rh_got, MSG_DONTWAIT);
        } else if (d->discard) {
            size_t want = d->left < TCP_SCRATCH ? d->left : TCP_SCRATCH;
            n = recv(c->fd, t->scratch, want, MSG_DONTWAIT);
        } else {
            n = recv(c->fd, d->dst, d->left, MSG_DONTWAIT);
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        if (n <= 0) {
            kvx__peer_fail(ep, p, TD_ECONNRESET, "data connection closed by sender%s",
                           d->in_payload ? " mid-block" : "");
            return;
        }
        got = 1;
        if (!d->in_payload) {
            d->rh_got += (size_t)n;
            if (d->rh_got < sizeof(d->rh)) continue;
            d->rh_got = 0;
            const kvx_wire_frame *h = &d->rh;
            char why[96];
            if (kvx_wire_frame_check(h, ep->block_bytes, ep->p.layout.n_layers,
                                     ep->p.layout.num_blocks, why, sizeof(why)) < 0) {
                kvx__stat_add(&ep->st.frames_rejected, 1);
                kvx__peer_fail(ep, p, TD_EPROTO, "%s", why);
                return;
            }
            int bad;
            kvx__req *r = kvx__rreq_claim(ep, p, h->hash, h->layer, h->dst, &bad);
            if (p->dead) return; /* failing the request failed the peer: d is gone */
            d->in_payload = 1;
            d->left = h->len;
            if (r) {
                d->discard = 0;
                d->req = r;
                d->layer = h->layer;
                d->block = h->dst;
                d->dst = kvx__block_ptr(ep, ep->pool, h->layer, h->dst);
            } else {
                /* Canceled/expired request or a block it does not own:
                 * swallow the payload, write nothing. */
                kvx__stat_add(&ep->st.frames_rejected, 1);
                d->discard = 1;
                d->req = NULL;
            }
            continue;
        }
        d->left -= (size_t)n;
        if (!d->discard) d->dst += n;
        if (d->left == 0) {
            d->in_payload = 0;
            if (!d->discard) {
                kvx__req *r = d->req;
                d->req = NULL;
                kvx__rreq_land(ep, r, d->layer, d->block);
            }
        }
    }
    if (got) p->last_rx_ns = td_now_ns();
}

static int tcp_data_conn(kvx_ep *ep, kvx__peer *p, int fd, uint32_t index)
{
    tcp_peer *tp = peer_tp(p);
    if (!tp || index >= TCP_MAX_CONNS || tp->d[index].used || index >= p->remote.n_data_conns)
        return TD_EINVAL;
    tcp_dconn *d = &tp->d[index];
    memset(d, 0, sizeof(*d));
    d->used = 1;
    d->c.fd = fd;
    d->c.on_io = on_recv_conn;
    d->c.peer = p;
    d->c.tp = d;
    if (tp->n < (int)index + 1) tp->n = (int)index + 1;
    int rc = kvx__conn_add(ep, &d->c, EPOLLIN);
    if (rc < 0) {
        d->used = 0;
        d->c.fd = -1;
    }
    return rc;
}

static void tcp_rreq_release(kvx_ep *ep, kvx__req *r)
{
    tcp_peer *tp = r->peer ? r->peer->tp : NULL;
    if (!tp) return;
    for (int k = 0; k < tp->n; k++) {
        tcp_dconn *d = &tp->d[k];
        if (d->in_payload && !d->discard && d->req == r) {
            /* The rest of this block goes to the sink: the lease is over. */
            d->discard = 1;
            d->req = NULL;
        }
    }
}

static void tcp_peer_close(kvx_ep *ep, kvx__peer *p)
{
    tcp_peer *tp = p->tp;
    if (!tp) return;
    for (int k = 0; k < TCP_MAX_CONNS; k++) {
        tcp_dconn *d = &tp->d[k];
        while (d->head) {
            tcp_frame *f = d->head;
            d->head = f->next;
            frame_done(ep, f);
        }
        d->tail = NULL;
        if (d->used && d->c.fd >= 0) conn_close(ep, d);
    }
}

static void tcp_peer_free(kvx_ep *ep, kvx__peer *p)
{
    free(p->tp);
    p->tp = NULL;
}

const kvx__ops kvx__tcp_ops = {
    .name = "tcp",
    .cancel_ack = 0,
    .unix_ctrl = 0,
    .ep_init = tcp_ep_init,
    .ep_fini = tcp_ep_fini,
    .peer_attach = tcp_peer_attach,
    .peer_start = tcp_peer_start,
    .peer_close = tcp_peer_close,
    .peer_free = tcp_peer_free,
    .data_conn = tcp_data_conn,
    .send_post = tcp_send_post,
    .sreq_abort = tcp_sreq_abort,
    .rreq_release = tcp_rreq_release,
};
