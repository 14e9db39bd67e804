/* tcp transport: blocks travel on n data connections per peer pair, each a
 * stream of [kvx_wire_frame][payload]. The sender gathers headers and payloads
 * straight from block memory with sendmsg(iovec[]); the receiver validates
 * each header, then reads the payload straight into the destination block.
 * No staging copy on either side. Frames of a post are spread round-robin
 * over the connections.
 *
 * Threads. Every data connection has its own I/O thread at each end (a
 * writer on the sender, a reader on the receiver), so n connections move
 * data on 2n threads besides the two progress threads, as a raw n-stream
 * socket blast does: on loopback the sending side's kernel work (copy in,
 * both TCP stacks) outweighs the receiving side's (copy out), and one
 * thread per end left a core idle half the time (docs/kvtransfer.md, "Where
 * the time went"). The progress thread keeps everything else: requests,
 * leases, events, control messages, timers.
 *
 * Sender. The progress thread queues a post's frames on the connections
 * (under each connection's mutex) and signals the writers. A writer gathers
 * up to TCP_BATCH bytes of queued frames into one blocking sendmsg, then
 * moves the frames it finished to the connection's done list and wakes the
 * progress thread (one eventfd per endpoint, written once per burst), which
 * finishes them (LAYER_SENT). Frames inside the writer's current sendmsg are
 * busy: a cancel leaves them to finish, so the stream stays in sync (their
 * source stays readable until the request's final event).
 *
 * Receiver. A reader reads a header, takes ep->loop_mu to claim the block
 * (kvx__rreq_claim), reads the payload into the block with no lock held,
 * and takes loop_mu again to land it. When a lease ends while a payload is
 * being read (cancel, deadline, peer failure), tcp_rreq_release turns the
 * rest of that payload to a sink and waits for the reader's recv in progress:
 * a non-blocking recv of bytes already queued (the reader waits for data
 * with poll() outside that window), so the wait is short and bounded, and
 * nothing writes the block once the release returns.
 *
 * Errors an I/O thread meets (closed connection, bad frame, write failure)
 * go to the progress thread, which fails the peer. Stopping a connection
 * (peer_close) sets its stop flag and shuts the socket down, which wakes a
 * thread blocked in sendmsg or poll. Writers are joined in peer_close (they
 * never take loop_mu); readers in peer_free, which the progress thread runs
 * outside loop_mu. Lock order: loop_mu, then a connection's mu. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
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
#define TCP_BATCH     (2u << 20)   /* bytes gathered into one sendmsg at most */
#define TCP_SCRATCH   (256u << 10) /* bytes; sink for payloads we must not keep */
#define TCP_POLL_MS   200          /* a reader re-checks its stop flag this often */

typedef struct tcp_frame {
    kvx_wire_frame hdr;
    kvx__post *post;
    const uint8_t *payload; /* hdr.len bytes of sender block memory */
    struct tcp_frame *next;
} tcp_frame;

typedef struct tcp_dconn {
    kvx__conn c; /* sender: in epoll for EPOLLIN (the receiver closing it) */
    int used;
    kvx_ep *ep;
    pthread_t th;
    int th_started;
    int mu_init;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;         /* atomic; set under mu */
    int err;          /* under mu: the I/O thread failed (TD_E*), err_msg says how */
    char err_msg[96]; /* under mu */
    /* sender, under mu */
    tcp_frame *head, *tail;           /* queued; head may be partly written */
    tcp_frame *done_head, *done_tail; /* written, for the progress thread */
    int n_busy;                       /* frames from head inside the writer's sendmsg */
    size_t off;                       /* bytes of head written */
    /* receiver: the reader's own state ... */
    kvx_wire_frame rh;
    size_t rh_got;
    int in_payload;
    uint8_t *dst; /* where the payload's next byte goes */
    size_t left;  /* payload bytes still to read */
    uint32_t layer, block;
    uint8_t *scratch; /* TCP_SCRATCH bytes */
    /* ... and, under mu, what a lease release changes */
    kvx__req *req; /* claimed request of the payload being read, NULL: discard */
    int discard;
    int in_recv; /* the reader is inside a recv into the block */
} tcp_dconn;

typedef struct tcp_peer {
    int n;
    int rr;
    tcp_dconn d[TCP_MAX_CONNS];
} tcp_peer;

typedef struct tcp_ep {
    void *owned_pool;
    kvx__conn done; /* eventfd: I/O threads finished frames or failed */
    int signalled;  /* atomic: a wake of `done` is on its way */
} tcp_ep;

static void on_done(kvx_ep *ep, kvx__conn *c, uint32_t events);

static int tcp_ep_init(kvx_ep *ep)
{
    tcp_ep *t = calloc(1, sizeof(*t));
    if (!t) return TD_ENOMEM;
    ep->tp = t;
    t->done.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (t->done.fd < 0) return td_err_from_errno(errno);
    t->done.on_io = on_done;
    int rc = kvx__conn_add(ep, &t->done, EPOLLIN);
    if (rc < 0) return rc;
    if (!ep->pool) {
        if ((rc = kvx__pool_map(ep->pool_bytes, &t->owned_pool)) < 0) return rc;
        ep->pool = t->owned_pool;
        ep->pool_owned = 1;
    }
    return 0;
}

static void tcp_ep_fini(kvx_ep *ep)
{
    tcp_ep *t = ep->tp;
    if (!t) return;
    kvx__pool_unmap(t->owned_pool, ep->pool_bytes);
    if (t->done.fd >= 0) {
        kvx__conn_del(ep, &t->done);
        close(t->done.fd);
    }
    free(t);
    ep->tp = NULL;
}

static tcp_peer *peer_tp(kvx__peer *p)
{
    if (!p->tp) p->tp = calloc(1, sizeof(tcp_peer));
    return p->tp;
}

/* Any thread: makes the progress thread run on_done soon (once per burst). */
static void wake_progress(kvx_ep *ep)
{
    tcp_ep *t = ep->tp;
    if (__atomic_exchange_n(&t->signalled, 1, __ATOMIC_SEQ_CST)) return;
    uint64_t one = 1;
    if (write(t->done.fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        td_log_warn(MOD, "wake_write_failed", "errno=%d", errno);
}

/* I/O thread: records why it stopped, for the progress thread. */
static void conn_set_err(tcp_dconn *d, int err, const char *msg)
{
    pthread_mutex_lock(&d->mu);
    if (!d->err && !__atomic_load_n(&d->stop, __ATOMIC_SEQ_CST)) {
        d->err = err;
        snprintf(d->err_msg, sizeof(d->err_msg), "%s", msg);
    }
    pthread_mutex_unlock(&d->mu);
    wake_progress(d->ep);
}

static int conn_init(kvx_ep *ep, kvx__peer *p, tcp_dconn *d, int fd)
{
    d->c.fd = fd;
    d->c.peer = p;
    d->c.tp = d;
    d->ep = ep;
    if (pthread_mutex_init(&d->mu, NULL) != 0) return TD_ENOMEM;
    if (pthread_cond_init(&d->cv, NULL) != 0) {
        pthread_mutex_destroy(&d->mu);
        return TD_ENOMEM;
    }
    d->mu_init = 1;
    return 0;
}

/* Tells d's thread to stop and wakes it; joins nothing. */
static void conn_stop(tcp_dconn *d)
{
    if (d->mu_init) {
        pthread_mutex_lock(&d->mu);
        __atomic_store_n(&d->stop, 1, __ATOMIC_SEQ_CST);
        pthread_cond_broadcast(&d->cv);
        pthread_mutex_unlock(&d->mu);
    }
    if (d->c.fd >= 0) shutdown(d->c.fd, SHUT_RDWR);
}

static void conn_join(tcp_dconn *d)
{
    if (d->th_started) {
        pthread_join(d->th, NULL);
        d->th_started = 0;
    }
}

/* One frame of a post is finished (written, or dropped). Progress thread. */
static void frame_done(kvx_ep *ep, tcp_frame *f)
{
    kvx__post *post = f->post;
    if (--post->remaining == 0) {
        free(post->tp);
        kvx__post_done(ep, post);
    }
}

/* Progress thread: frames the writers finished, errors the I/O threads met. */
static void on_done(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    tcp_ep *t = ep->tp;
    uint64_t v;
    if (read(c->fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        td_log_warn(MOD, "wake_read_failed", "errno=%d", errno);
    __atomic_store_n(&t->signalled, 0, __ATOMIC_SEQ_CST);
    for (kvx__peer *p = ep->peers; p; p = p->next) {
        tcp_peer *tp = p->tp;
        for (int k = 0; tp && !p->dead && k < tp->n; k++) {
            tcp_dconn *d = &tp->d[k];
            if (!d->used || !d->mu_init) continue;
            char msg[sizeof(d->err_msg)];
            pthread_mutex_lock(&d->mu);
            tcp_frame *f = d->done_head;
            d->done_head = d->done_tail = NULL;
            int err = d->err;
            memcpy(msg, d->err_msg, sizeof(msg));
            pthread_mutex_unlock(&d->mu);
            while (f) {
                tcp_frame *next = f->next;
                frame_done(ep, f);
                f = next;
            }
            if (err && !p->dead) kvx__peer_fail(ep, p, err, "%s", msg);
        }
    }
}

/* ---------- sender ---------- */

static void *writer_main(void *arg)
{
    tcp_dconn *d = arg;
    kvx_ep *ep = d->ep;
    struct iovec iov[TCP_IOV];
    pthread_setname_np(pthread_self(), "kvx-tcp-write");
    pthread_mutex_lock(&d->mu);
    for (;;) {
        while (!d->stop && !d->head)
            pthread_cond_wait(&d->cv, &d->mu);
        if (d->stop) break;
        int k = 0, nf = 0;
        size_t off = d->off, bytes = 0;
        for (tcp_frame *f = d->head; f && k < TCP_IOV - 1 && bytes < TCP_BATCH; f = f->next) {
            if (off < sizeof(f->hdr)) {
                iov[k].iov_base = (uint8_t *)&f->hdr + off;
                iov[k++].iov_len = sizeof(f->hdr) - off;
                iov[k].iov_base = (void *)f->payload;
                iov[k++].iov_len = f->hdr.len;
                bytes += sizeof(f->hdr) - off + f->hdr.len;
            } else {
                iov[k].iov_base = (void *)(f->payload + (off - sizeof(f->hdr)));
                iov[k++].iov_len = f->hdr.len - (off - sizeof(f->hdr));
                bytes += f->hdr.len - (off - sizeof(f->hdr));
            }
            off = 0;
            nf++;
        }
        d->n_busy = nf;
        pthread_mutex_unlock(&d->mu);
        /* Blocking: the thread sleeps in the kernel while the socket buffer
         * is full. SO_SNDTIMEO (the stall timeout) bounds each wait; a
         * stopped connection is shut down, which ends it at once. */
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)k};
        ssize_t n = sendmsg(d->c.fd, &mh, MSG_NOSIGNAL);
        int e = errno;
        pthread_mutex_lock(&d->mu);
        d->n_busy = 0;
        if (n < 0) {
            if (e == EINTR || e == EAGAIN || e == EWOULDBLOCK) continue;
            pthread_mutex_unlock(&d->mu);
            char msg[96];
            snprintf(msg, sizeof(msg), "data connection write failed: %s",
                     td_strerror(td_err_from_errno(e)));
            conn_set_err(d, td_err_from_errno(e), msg);
            return NULL;
        }
        kvx__stat_add(&ep->st.bytes_sent, (uint64_t)n);
        size_t left = (size_t)n;
        int finished = 0;
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
            f->next = NULL;
            if (d->done_tail)
                d->done_tail->next = f;
            else
                d->done_head = f;
            d->done_tail = f;
            finished = 1;
        }
        if (finished) {
            pthread_mutex_unlock(&d->mu);
            wake_progress(ep);
            pthread_mutex_lock(&d->mu);
        }
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

static void on_send_conn(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
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
        int dfd = -1;
        int rc = kvx__dial(ep, p->addr, ep->p.stall_timeout_ns, &dfd);
        if (rc < 0) return rc;
        d->used = 1;
        if ((rc = conn_init(ep, p, d, dfd)) < 0) {
            close(dfd);
            d->c.fd = -1;
            d->used = 0;
            return rc;
        }
        kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL,
                          .type = KVX_MSG_DATA_HELLO,
                          .len = sizeof(kvx_wire_data_hello)};
        kvx_wire_data_hello dh = {.token = p->token, .index = (uint32_t)i};
        uint8_t buf[sizeof(h) + sizeof(dh)];
        memcpy(buf, &h, sizeof(h));
        memcpy(buf + sizeof(h), &dh, sizeof(dh));
        if (send(d->c.fd, buf, sizeof(buf), MSG_NOSIGNAL) != (ssize_t)sizeof(buf))
            return TD_ECONNRESET;
        /* The socket stays blocking (with the dial's send timeout): only its
         * writer thread writes it. */
        d->c.on_io = on_send_conn;
    }
    return 0;
}

static int tcp_peer_start(kvx_ep *ep, kvx__peer *p)
{
    tcp_peer *tp = peer_tp(p);
    if (!tp) return TD_ENOMEM;
    for (int i = 0; i < tp->n; i++) {
        tcp_dconn *d = &tp->d[i];
        int rc = kvx__conn_add(ep, &d->c, EPOLLIN);
        if (rc < 0) return rc;
        if (pthread_create(&d->th, NULL, writer_main, d) != 0) return TD_ENOMEM;
        d->th_started = 1;
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
    tcp_frame *head[TCP_MAX_CONNS] = {0}, *tail[TCP_MAX_CONNS] = {0};
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
        if (tail[k])
            tail[k]->next = f;
        else
            head[k] = f;
        tail[k] = f;
    }
    /* One lock and one signal per connection for the whole post. */
    for (int k = 0; k < tp->n; k++) {
        if (!head[k]) continue;
        tcp_dconn *d = &tp->d[k];
        pthread_mutex_lock(&d->mu);
        if (d->tail)
            d->tail->next = head[k];
        else
            d->head = head[k];
        d->tail = tail[k];
        pthread_cond_signal(&d->cv);
        pthread_mutex_unlock(&d->mu);
    }
    return 0;
}

/* Drops r's frames that have not started; a frame whose header is on the wire
 * (or inside the writer's current sendmsg) must finish so the stream stays in
 * sync (its source stays readable until the request's final event). */
static void tcp_sreq_abort(kvx_ep *ep, kvx__req *r)
{
    tcp_peer *tp = r->peer ? r->peer->tp : NULL;
    if (!tp) return;
    for (int k = 0; k < tp->n; k++) {
        tcp_dconn *d = &tp->d[k];
        if (!d->mu_init) continue;
        tcp_frame *dropped = NULL;
        pthread_mutex_lock(&d->mu);
        tcp_frame **pp = &d->head, *last = NULL;
        int i = 0;
        while (*pp) {
            tcp_frame *f = *pp;
            int busy = i++ < d->n_busy || (f == d->head && d->off > 0);
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
        pthread_mutex_unlock(&d->mu);
        while (dropped) {
            tcp_frame *f = dropped;
            dropped = f->next;
            frame_done(ep, f);
        }
    }
}

/* ---------- receiver ---------- */

/* Reader, a whole header in d->rh: claims its block under loop_mu. Returns 0,
 * 1 when the thread must stop (quietly), or a TD_E* code with msg. */
static int reader_header(tcp_dconn *d, char *msg, size_t msg_len)
{
    kvx_ep *ep = d->ep;
    kvx__peer *p = d->c.peer;
    const kvx_wire_frame *h = &d->rh;
    if (kvx_wire_frame_check(h, ep->block_bytes, ep->p.layout.n_layers, ep->p.layout.num_blocks,
                             msg, msg_len) < 0) {
        kvx__stat_add(&ep->st.frames_rejected, 1);
        return TD_EPROTO;
    }
    pthread_mutex_lock(&ep->loop_mu);
    if (p->dead || __atomic_load_n(&d->stop, __ATOMIC_SEQ_CST)) {
        pthread_mutex_unlock(&ep->loop_mu);
        return 1;
    }
    int bad;
    kvx__req *r = kvx__rreq_claim(ep, p, h->hash, h->layer, h->dst, &bad);
    if (bad) {
        int dead = p->dead; /* failing the request may have failed the peer */
        pthread_mutex_unlock(&ep->loop_mu);
        kvx__stat_add(&ep->st.frames_rejected, 1);
        snprintf(msg, msg_len, "frame for block %u of layer %u sent twice", h->dst, h->layer);
        return dead ? 1 : TD_EPROTO;
    }
    d->in_payload = 1;
    d->left = h->len;
    d->layer = h->layer;
    d->block = h->dst;
    d->dst = r ? kvx__block_ptr(ep, ep->pool, h->layer, h->dst) : NULL;
    pthread_mutex_lock(&d->mu);
    d->req = r;
    /* Canceled/expired request or a block it does not own: swallow the
     * payload, write nothing. */
    d->discard = !r;
    pthread_mutex_unlock(&d->mu);
    pthread_mutex_unlock(&ep->loop_mu);
    if (!r) kvx__stat_add(&ep->st.frames_rejected, 1);
    return 0;
}

/* Reader, the payload is all read: lands the block under loop_mu. */
static void reader_land(tcp_dconn *d)
{
    kvx_ep *ep = d->ep;
    kvx__peer *p = d->c.peer;
    d->in_payload = 0;
    pthread_mutex_lock(&ep->loop_mu);
    pthread_mutex_lock(&d->mu);
    kvx__req *r = d->discard ? NULL : d->req;
    d->req = NULL;
    pthread_mutex_unlock(&d->mu);
    if (r && !p->dead) kvx__rreq_land(ep, r, d->layer, d->block);
    pthread_mutex_unlock(&ep->loop_mu);
}

/* Reader: waits until d's socket has bytes (or TCP_POLL_MS passes, so the
 * stop flag is seen). Returns 0 or a TD_E* code with msg. */
static int reader_wait(tcp_dconn *d, char *msg, size_t msg_len)
{
    struct pollfd pfd = {.fd = d->c.fd, .events = POLLIN};
    if (poll(&pfd, 1, TCP_POLL_MS) < 0 && errno != EINTR) {
        snprintf(msg, msg_len, "poll on a data connection failed");
        return td_err_from_errno(errno);
    }
    return 0;
}

/* Per block the reader makes one recvmsg per arrival of bytes, each ending
 * in the next frame's header once the payload's last bytes are asked for
 * (so no call reads a header alone in a steady stream), and polls right
 * after a short read instead of finding the socket empty with one more
 * recv: the blocks' syscalls and wake-ups are what kvx costs the cores
 * beyond a raw socket blast (docs/kvtransfer.md, "Where the time went"). */
static void *reader_main(void *arg)
{
    tcp_dconn *d = arg;
    kvx__peer *p = d->c.peer;
    int err = 0;
    char msg[96] = "";
    pthread_setname_np(pthread_self(), "kvx-tcp-read");
    while (!__atomic_load_n(&d->stop, __ATOMIC_SEQ_CST)) {
        struct iovec iov[2];
        int niov = 1, into_block = 0;
        size_t payload_want = 0;
        if (!d->in_payload) {
            iov[0].iov_base = (uint8_t *)&d->rh + d->rh_got;
            iov[0].iov_len = sizeof(d->rh) - d->rh_got;
        } else {
            pthread_mutex_lock(&d->mu);
            if (d->discard) {
                iov[0].iov_base = d->scratch;
                payload_want = d->left < TCP_SCRATCH ? d->left : TCP_SCRATCH;
            } else {
                iov[0].iov_base = d->dst;
                payload_want = d->left;
                d->in_recv = into_block = 1;
            }
            pthread_mutex_unlock(&d->mu);
            iov[0].iov_len = payload_want;
            if (payload_want == d->left) {
                /* The payload's end is asked for: the next header follows it. */
                iov[1].iov_base = &d->rh;
                iov[1].iov_len = sizeof(d->rh);
                niov = 2;
            }
        }
        size_t asked = iov[0].iov_len + (niov == 2 ? iov[1].iov_len : 0);
        /* Non-blocking inside the in_recv window: a lease release waits for
         * it, so it only copies what is already queued. */
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
        ssize_t n = recvmsg(d->c.fd, &mh, MSG_DONTWAIT);
        int e = errno;
        if (into_block) {
            pthread_mutex_lock(&d->mu);
            d->in_recv = 0;
            pthread_cond_broadcast(&d->cv);
            pthread_mutex_unlock(&d->mu);
        }
        if (n < 0 && (e == EAGAIN || e == EWOULDBLOCK || e == EINTR)) {
            if ((err = reader_wait(d, msg, sizeof(msg))) < 0) break;
            continue;
        }
        if (n <= 0) {
            err = TD_ECONNRESET;
            snprintf(msg, sizeof(msg), "data connection closed by sender%s",
                     d->in_payload ? " mid-block" : "");
            break;
        }
        __atomic_store_n(&p->last_rx_ns, td_now_ns(), __ATOMIC_RELAXED);
        size_t got = (size_t)n, hdr_got = got;
        if (d->in_payload) {
            size_t pay = got < payload_want ? got : payload_want;
            hdr_got = got - pay;
            d->left -= pay;
            if (into_block) d->dst += pay;
            if (d->left == 0) reader_land(d);
        }
        if (hdr_got > 0) {
            d->rh_got += hdr_got;
            if (d->rh_got == sizeof(d->rh)) {
                d->rh_got = 0;
                int rc = reader_header(d, msg, sizeof(msg));
                if (rc == 1) break;
                if (rc < 0) {
                    err = rc;
                    break;
                }
            }
        }
        /* A short read emptied the socket: wait for more without a recv
         * that would only say so. */
        if (got < asked && (err = reader_wait(d, msg, sizeof(msg))) < 0) break;
    }
    if (err) conn_set_err(d, err, msg);
    return NULL;
}

static int tcp_data_conn(kvx_ep *ep, kvx__peer *p, int fd, uint32_t index)
{
    tcp_peer *tp = peer_tp(p);
    if (!tp || index >= TCP_MAX_CONNS || tp->d[index].used || index >= p->remote.n_data_conns)
        return TD_EINVAL;
    tcp_dconn *d = &tp->d[index];
    memset(d, 0, sizeof(*d));
    d->scratch = malloc(TCP_SCRATCH);
    if (!d->scratch) return TD_ENOMEM;
    int rc = conn_init(ep, p, d, fd);
    if (rc == 0 && pthread_create(&d->th, NULL, reader_main, d) != 0) rc = TD_ENOMEM;
    if (rc < 0) {
        if (d->mu_init) {
            pthread_cond_destroy(&d->cv);
            pthread_mutex_destroy(&d->mu);
        }
        free(d->scratch);
        memset(d, 0, sizeof(*d));
        d->c.fd = -1;
        return rc; /* the caller closes fd */
    }
    d->th_started = 1;
    d->used = 1;
    if (tp->n < (int)index + 1) tp->n = (int)index + 1;
    return 0;
}

/* r's lease ends (under loop_mu): no reader writes its blocks after this. */
static void tcp_rreq_release(kvx_ep *ep, kvx__req *r)
{
    tcp_peer *tp = r->peer ? r->peer->tp : NULL;
    if (!tp) return;
    for (int k = 0; k < tp->n; k++) {
        tcp_dconn *d = &tp->d[k];
        if (!d->used || !d->mu_init) continue;
        pthread_mutex_lock(&d->mu);
        if (!d->discard && d->req == r) {
            /* The rest of this block goes to the sink: the lease is over. */
            d->discard = 1;
            d->req = NULL;
            while (d->in_recv)
                pthread_cond_wait(&d->cv, &d->mu);
        }
        pthread_mutex_unlock(&d->mu);
    }
}

static void tcp_peer_close(kvx_ep *ep, kvx__peer *p)
{
    tcp_peer *tp = p->tp;
    if (!tp) return;
    for (int k = 0; k < TCP_MAX_CONNS; k++) {
        tcp_dconn *d = &tp->d[k];
        if (!d->used) continue;
        if (ep->p.role == KVX_ROLE_SEND) {
            kvx__conn_del(ep, &d->c);
            conn_stop(d);
            conn_join(d); /* writers never wait for loop_mu */
            /* Every frame is ours now: finished or not, it is done. */
            tcp_frame *lists[2] = {d->done_head, d->head};
            d->done_head = d->done_tail = d->head = d->tail = NULL;
            d->off = 0;
            for (int i = 0; i < 2; i++)
                while (lists[i]) {
                    tcp_frame *f = lists[i];
                    lists[i] = f->next;
                    frame_done(ep, f);
                }
            if (d->c.fd >= 0) close(d->c.fd);
            d->c.fd = -1;
        } else {
            /* A reader may be waiting for loop_mu, which our caller may
             * hold: it is joined in tcp_peer_free, outside loop_mu. */
            conn_stop(d);
        }
    }
}

static void tcp_peer_free(kvx_ep *ep, kvx__peer *p)
{
    tcp_peer *tp = p->tp;
    if (!tp) return;
    for (int k = 0; k < TCP_MAX_CONNS; k++) {
        tcp_dconn *d = &tp->d[k];
        if (!d->used) continue;
        conn_stop(d);
        conn_join(d);
        if (d->c.fd >= 0) close(d->c.fd);
        if (d->mu_init) {
            pthread_cond_destroy(&d->cv);
            pthread_mutex_destroy(&d->mu);
        }
        free(d->scratch);
    }
    free(tp);
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
