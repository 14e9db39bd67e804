/* tcp transport: blocks travel on n data connections per peer pair, each a
 * stream of runs: [kvx_wire_run][n kvx_wire_frame headers][n payloads]
 * (kvx_wire.h; a lone [kvx_wire_frame][payload] is also accepted). The
 * sender gathers a run's heads and payloads straight from block memory with
 * one sendmsg(iovec[]); the receiver validates and claims every block of the
 * run, then reads the payloads straight into their blocks with one recvmsg
 * over their addresses, as many as have arrived. No staging copy on either
 * side, and a call moves up to TCP_BATCH bytes at either end, not one block:
 * a raw socket blast is 15-20% faster with 1 MiB calls than with 256 KiB
 * ones (the size of a 16-token block of a 4096-wide f16 layer; measured in
 * docs/kvtransfer.md). Frames of a post are spread round-robin over the
 * connections.
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
 * (under each connection's mutex) and signals the writers. A writer takes up
 * to TCP_RUN frames or TCP_BATCH bytes of its queue as one run and writes it
 * whole with blocking sendmsg calls, then moves the run's frames to the
 * connection's done list and wakes the progress thread (one eventfd per
 * endpoint, written once per burst), which finishes them (LAYER_SENT).
 * Frames of the run being written are busy: a cancel leaves them to finish,
 * so the stream stays in sync (their source stays readable until the
 * request's final event).
 *
 * Receiver. A reader reads a head (and a run's frame headers), takes
 * ep->loop_mu once to claim the blocks (kvx__rreq_claim), reads payloads into
 * the blocks with no lock held, and takes loop_mu once per read to land the
 * blocks it completed. The read that takes a run's last bytes also asks for
 * the next head. When a lease ends while its blocks are being read (cancel,
 * deadline, peer failure), tcp_rreq_release turns the rest of them to a sink
 * and waits for the reader's recv in progress: a non-blocking recv of bytes
 * already queued (the reader waits for data with poll() outside that window),
 * so the wait is short and bounded, and nothing writes the blocks once the
 * release returns.
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
#define TCP_RUN       63           /* frames per run the sender writes (+ the heads: 64 iovecs) */
#define TCP_BATCH     (2u << 20)   /* a run stops once its payload reaches this */
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
    tcp_frame *head, *tail;           /* queued */
    tcp_frame *done_head, *done_tail; /* written, for the progress thread */
    int n_busy;                       /* frames from head in the run being written */
    /* receiver: the reader's own state ... */
    union {
        kvx_wire_frame f;
        kvx_wire_run r;
    } head_buf; /* the head being read */
    size_t head_got;
    kvx_wire_frame ents[KVX_WIRE_RUN_MAX]; /* the run's frame headers */
    size_t ents_got;                       /* bytes of them read */
    int phase;                             /* RD_HEAD, RD_ENTS, RD_PAY */
    int n_blk, cur;                        /* blocks of the run; the first unfinished */
    struct tcp_rblk {
        uint8_t *dst; /* where the payload's next byte goes */
        size_t left;  /* payload bytes still to read */
    } blk[KVX_WIRE_RUN_MAX];
    uint8_t *scratch; /* TCP_SCRATCH bytes */
    /* ... and, under mu, what a lease release changes */
    kvx__req *req[KVX_WIRE_RUN_MAX]; /* claimed request of each block, NULL: none */
    uint8_t discard[KVX_WIRE_RUN_MAX];
    int in_recv; /* the reader is inside a recv into blocks */
} tcp_dconn;

enum { RD_HEAD, RD_ENTS, RD_PAY };

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

/* Writer: writes iov[0..n) whole with blocking sendmsg calls. 0, 1 when
 * the connection is being stopped, or a TD_E* code. */
static int write_all(tcp_dconn *d, struct iovec *iov, int n)
{
    int k = 0;
    while (k < n) {
        struct msghdr mh = {.msg_iov = iov + k, .msg_iovlen = (size_t)(n - k)};
        /* Blocking: the thread sleeps in the kernel while the socket buffer
         * is full. SO_SNDTIMEO (the stall timeout) bounds each wait; a
         * stopped connection is shut down, which ends it at once. */
        ssize_t w = sendmsg(d->c.fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            int e = errno;
            if (__atomic_load_n(&d->stop, __ATOMIC_SEQ_CST)) return 1;
            if (e == EINTR || e == EAGAIN || e == EWOULDBLOCK) continue;
            return td_err_from_errno(e);
        }
        kvx__stat_add(&d->ep->st.bytes_sent, (uint64_t)w);
        size_t left = (size_t)w;
        while (k < n && left >= iov[k].iov_len)
            left -= iov[k++].iov_len;
        if (left > 0) {
            iov[k].iov_base = (uint8_t *)iov[k].iov_base + left;
            iov[k].iov_len -= left;
        }
    }
    return 0;
}

static void *writer_main(void *arg)
{
    tcp_dconn *d = arg;
    kvx_ep *ep = d->ep;
    struct iovec iov[1 + TCP_RUN];
    struct {
        kvx_wire_run run;
        kvx_wire_frame ents[TCP_RUN];
    } heads;
    pthread_setname_np(pthread_self(), "kvx-tcp-write");
    pthread_mutex_lock(&d->mu);
    for (;;) {
        while (!d->stop && !d->head)
            pthread_cond_wait(&d->cv, &d->mu);
        if (d->stop) break;
        int n = 0;
        size_t bytes = 0;
        for (tcp_frame *f = d->head; f && n < TCP_RUN && bytes < TCP_BATCH; f = f->next) {
            heads.ents[n] = f->hdr;
            iov[1 + n].iov_base = (void *)f->payload;
            iov[1 + n].iov_len = f->hdr.len;
            bytes += f->hdr.len;
            n++;
        }
        d->n_busy = n;
        pthread_mutex_unlock(&d->mu);
        memset(&heads.run, 0, sizeof(heads.run));
        heads.run.magic = KVX_WIRE_MAGIC_RUN;
        heads.run.n = (uint32_t)n;
        iov[0].iov_base = &heads;
        iov[0].iov_len = sizeof(heads.run) + (size_t)n * sizeof(kvx_wire_frame);
        int rc = write_all(d, iov, 1 + n);
        pthread_mutex_lock(&d->mu);
        d->n_busy = 0;
        if (rc == 1) break;
        if (rc < 0) {
            pthread_mutex_unlock(&d->mu);
            char msg[96];
            snprintf(msg, sizeof(msg), "data connection write failed: %s", td_strerror(rc));
            conn_set_err(d, rc, msg);
            return NULL;
        }
        /* The run's frames are the first n of the queue: only frames after
         * them can have been dropped meanwhile. */
        for (int i = 0; i < n; i++) {
            tcp_frame *f = d->head;
            d->head = f->next;
            if (!d->head) d->tail = NULL;
            f->next = NULL;
            if (d->done_tail)
                d->done_tail->next = f;
            else
                d->done_head = f;
            d->done_tail = f;
        }
        pthread_mutex_unlock(&d->mu);
        wake_progress(ep);
        pthread_mutex_lock(&d->mu);
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

/* Drops r's frames that have not started; a frame of the run being written
 * must finish so the stream stays in sync (its source stays readable until
 * the request's final event). */
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
            int busy = i++ < d->n_busy;
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

/* Reader, every frame header of the run in d->ents[0..n_blk): checks them
 * all, then claims their blocks under one loop_mu hold. Returns 0, 1 when the
 * thread must stop (quietly), or a TD_E* code with msg. */
static int reader_claim(tcp_dconn *d, char *msg, size_t msg_len)
{
    kvx_ep *ep = d->ep;
    kvx__peer *p = d->c.peer;
    int n = d->n_blk;
    for (int k = 0; k < n; k++)
        if (kvx_wire_frame_check(&d->ents[k], ep->block_bytes, ep->p.layout.n_layers,
                                 ep->p.layout.num_blocks, msg, msg_len) < 0) {
            kvx__stat_add(&ep->st.frames_rejected, 1);
            return TD_EPROTO;
        }
    kvx__req *rs[KVX_WIRE_RUN_MAX];
    int stale = 0;
    pthread_mutex_lock(&ep->loop_mu);
    if (p->dead || __atomic_load_n(&d->stop, __ATOMIC_SEQ_CST)) {
        pthread_mutex_unlock(&ep->loop_mu);
        return 1;
    }
    for (int k = 0; k < n; k++) {
        const kvx_wire_frame *h = &d->ents[k];
        int bad;
        rs[k] = kvx__rreq_claim(ep, p, h->hash, h->layer, h->dst, &bad);
        if (bad) {
            int dead = p->dead; /* failing the request may have failed the peer */
            pthread_mutex_unlock(&ep->loop_mu);
            kvx__stat_add(&ep->st.frames_rejected, 1);
            snprintf(msg, msg_len, "frame for block %u of layer %u sent twice", h->dst, h->layer);
            return dead ? 1 : TD_EPROTO;
        }
        stale += !rs[k];
        d->blk[k].dst = rs[k] ? kvx__block_ptr(ep, ep->pool, h->layer, h->dst) : NULL;
        d->blk[k].left = h->len;
    }
    pthread_mutex_lock(&d->mu);
    for (int k = 0; k < n; k++) {
        d->req[k] = rs[k];
        /* Canceled/expired request or a block it does not own: swallow the
         * payload, write nothing. */
        d->discard[k] = !rs[k];
    }
    pthread_mutex_unlock(&d->mu);
    pthread_mutex_unlock(&ep->loop_mu);
    if (stale) kvx__stat_add(&ep->st.frames_rejected, (uint64_t)stale);
    d->cur = 0;
    d->phase = RD_PAY;
    return 0;
}

/* Reader, d->head_buf complete: a lone frame is a run of one; a run head
 * asks for its frame headers next. Returns as reader_claim. */
static int reader_head(tcp_dconn *d, char *msg, size_t msg_len)
{
    d->head_got = 0;
    if (d->head_buf.r.magic == KVX_WIRE_MAGIC_RUN) {
        if (kvx_wire_run_check(&d->head_buf.r, msg, msg_len) < 0) {
            kvx__stat_add(&d->ep->st.frames_rejected, 1);
            return TD_EPROTO;
        }
        d->n_blk = (int)d->head_buf.r.n;
        d->ents_got = 0;
        d->phase = RD_ENTS;
        return 0;
    }
    d->ents[0] = d->head_buf.f;
    d->n_blk = 1;
    return reader_claim(d, msg, msg_len);
}

/* Reader: blocks [from, to) of the run are all read: lands them under one
 * loop_mu hold (a block whose lease ended meanwhile is not landed). */
static void reader_land(tcp_dconn *d, int from, int to)
{
    kvx_ep *ep = d->ep;
    kvx__peer *p = d->c.peer;
    kvx__req *rs[KVX_WIRE_RUN_MAX];
    pthread_mutex_lock(&ep->loop_mu);
    pthread_mutex_lock(&d->mu);
    for (int k = from; k < to; k++) {
        rs[k] = d->discard[k] ? NULL : d->req[k];
        d->req[k] = NULL;
    }
    pthread_mutex_unlock(&d->mu);
    for (int k = from; k < to; k++)
        if (rs[k] && !p->dead) kvx__rreq_land(ep, rs[k], d->ents[k].layer, d->ents[k].dst);
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

/* Reader, RD_PAY: the iovecs of the next read, from block cur on: every
 * block still to come, straight into its memory, until a block whose
 * payload goes to the sink (it comes first and alone, at most TCP_SCRATCH
 * bytes); and when the run's end is asked for, the next head. Sets
 * d->in_recv when a block's memory is in them. Returns the iovec count. */
static int reader_iov(tcp_dconn *d, struct iovec *iov)
{
    int n = 0, k = d->cur;
    pthread_mutex_lock(&d->mu);
    for (; k < d->n_blk; k++) {
        size_t left = d->blk[k].left;
        if (d->discard[k]) {
            if (n > 0) break;
            iov[n].iov_base = d->scratch;
            iov[n++].iov_len = left < TCP_SCRATCH ? left : TCP_SCRATCH;
            if (left > TCP_SCRATCH) break;
            k++;
            break;
        }
        iov[n].iov_base = d->blk[k].dst;
        iov[n++].iov_len = left;
        d->in_recv = 1;
    }
    pthread_mutex_unlock(&d->mu);
    if (k == d->n_blk) {
        iov[n].iov_base = &d->head_buf;
        iov[n++].iov_len = sizeof(d->head_buf);
    }
    return n;
}

/* Per run the reader makes one recvmsg per arrival of bytes, each asking for
 * everything of the run still to come (and the next head), and polls right
 * after a short read instead of finding the socket empty with one more
 * recv. */
static void *reader_main(void *arg)
{
    tcp_dconn *d = arg;
    kvx__peer *p = d->c.peer;
    int err = 0;
    char msg[96] = "";
    pthread_setname_np(pthread_self(), "kvx-tcp-read");
    d->phase = RD_HEAD;
    while (!__atomic_load_n(&d->stop, __ATOMIC_SEQ_CST)) {
        struct iovec iov[KVX_WIRE_RUN_MAX + 1];
        int niov;
        if (d->phase == RD_HEAD) {
            iov[0].iov_base = (uint8_t *)&d->head_buf + d->head_got;
            iov[0].iov_len = sizeof(d->head_buf) - d->head_got;
            niov = 1;
        } else if (d->phase == RD_ENTS) {
            iov[0].iov_base = (uint8_t *)d->ents + d->ents_got;
            iov[0].iov_len = (size_t)d->n_blk * sizeof(kvx_wire_frame) - d->ents_got;
            niov = 1;
        } else {
            niov = reader_iov(d, iov);
        }
        size_t asked = 0;
        for (int i = 0; i < niov; i++)
            asked += iov[i].iov_len;
        /* Non-blocking inside the in_recv window: a lease release waits for
         * it, so it only copies what is already queued. */
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
        ssize_t got = recvmsg(d->c.fd, &mh, MSG_DONTWAIT);
        int e = errno;
        if (d->phase == RD_PAY) {
            pthread_mutex_lock(&d->mu);
            if (d->in_recv) {
                d->in_recv = 0;
                pthread_cond_broadcast(&d->cv);
            }
            pthread_mutex_unlock(&d->mu);
        }
        if (got < 0 && (e == EAGAIN || e == EWOULDBLOCK || e == EINTR)) {
            if ((err = reader_wait(d, msg, sizeof(msg))) < 0) break;
            continue;
        }
        if (got <= 0) {
            err = TD_ECONNRESET;
            snprintf(msg, sizeof(msg), "data connection closed by sender%s",
                     d->phase == RD_PAY ? " mid-block" : "");
            break;
        }
        __atomic_store_n(&p->last_rx_ns, td_now_ns(), __ATOMIC_RELAXED);
        size_t left = (size_t)got;
        int rc = 0;
        if (d->phase == RD_ENTS) {
            d->ents_got += left;
            left = 0;
            if (d->ents_got == (size_t)d->n_blk * sizeof(kvx_wire_frame))
                rc = reader_claim(d, msg, sizeof(msg));
        } else if (d->phase == RD_PAY) {
            int from = d->cur;
            for (int i = 0; i < niov && left > 0 && d->cur < d->n_blk; i++) {
                if (iov[i].iov_base == &d->head_buf) break;
                size_t take = left < iov[i].iov_len ? left : iov[i].iov_len;
                struct tcp_rblk *b = &d->blk[d->cur];
                b->left -= take;
                if (b->dst) b->dst += take;
                left -= take;
                if (b->left == 0) d->cur++;
            }
            if (d->cur > from) reader_land(d, from, d->cur);
            if (d->cur == d->n_blk) d->phase = RD_HEAD;
        }
        if (d->phase == RD_HEAD && left > 0) {
            d->head_got += left;
            if (d->head_got == sizeof(d->head_buf)) rc = reader_head(d, msg, sizeof(msg));
        }
        if (rc == 1) break;
        if (rc < 0) {
            err = rc;
            break;
        }
        /* A short read emptied the socket: wait for more without a recv
         * that would only say so. */
        if ((size_t)got < asked && (err = reader_wait(d, msg, sizeof(msg))) < 0) break;
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
        int mine = 0;
        pthread_mutex_lock(&d->mu);
        for (int i = 0; i < (int)KVX_WIRE_RUN_MAX; i++)
            if (!d->discard[i] && d->req[i] == r) {
                /* The rest of this block goes to the sink: the lease is over. */
                d->discard[i] = 1;
                d->req[i] = NULL;
                mine = 1;
            }
        while (mine && d->in_recv)
            pthread_cond_wait(&d->cv, &d->mu);
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
