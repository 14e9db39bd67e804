/* kvx core: endpoints, the progress thread, the control protocol, requests,
 * leases, timers. Transports plug in through kvx__ops (kvx_internal.h).
 *
 * Request state machine (receiver):
 *   REGISTERED --BEGIN from a peer--> BOUND --all blocks landed--> DONE (released)
 *   any --cancel/deadline, tcp or unbound--> FAILED (released at once)
 *   BOUND --cancel/deadline, direct write--> CLOSING --CANCEL_ACK or peer death--> FAILED
 *   any --peer death / protocol error--> FAILED (released)
 * Request state machine (sender):
 *   OPEN --BEGIN_ACK--> ACKED (posts flow) --DONE from receiver--> DONE
 *   any --cancel/deadline/FAIL/peer death--> CLOSING --in-flight posts drained--> FAILED
 */
#include "kvtransfer/kvx.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD               "kvx"
#define KVX__MAX_REQS     4096
#define KVX__CTRL_OUT_MAX (8u << 20) /* bytes queued to a peer before it counts as stalled */

typedef struct kvx__pending {
    kvx__conn c;
    kvx__buf in;
    int64_t t0_ns;
    int closed;
    struct kvx__pending *next;
} kvx__pending;

struct kvx__cmd {
    int (*fn)(kvx_ep *ep, void *arg);
    void *arg;
    int rc;
    int done;
    kvx__cmd *next;
};

uint64_t kvx_req_hash(const char *req_id)
{
    return XXH3_64bits(req_id, strlen(req_id));
}

/* ---------- small helpers ---------- */

int kvx__set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return td_err_from_errno(errno);
    return 0;
}

int kvx__conn_add(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) return td_err_from_errno(errno);
    c->events = events;
    return 0;
}

int kvx__conn_mod(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    if (c->events == events) return 0;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) return td_err_from_errno(errno);
    c->events = events;
    return 0;
}

void kvx__conn_del(kvx_ep *ep, kvx__conn *c)
{
    if (c->fd >= 0) epoll_ctl(ep->epfd, EPOLL_CTL_DEL, c->fd, NULL);
}

static int buf_reserve(kvx__buf *b, size_t extra)
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

static void copy_id(char *dst, const char *src)
{
    snprintf(dst, KVX_REQ_ID_MAX, "%s", src);
}

/* Parses "a.b.c.d:port" (IPv4 only). */
static int parse_inet(const char *addr, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof(host)) return TD_EINVAL;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535) return TD_EINVAL;
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) return TD_EINVAL;
    return 0;
}

static int parse_unix(const char *path, struct sockaddr_un *su)
{
    if (strlen(path) >= sizeof(su->sun_path) || !path[0]) return TD_EINVAL;
    memset(su, 0, sizeof(*su));
    su->sun_family = AF_UNIX;
    strcpy(su->sun_path, path);
    return 0;
}

/* ---------- events (progress -> application) ---------- */

static void emit_ex(kvx_ep *ep, enum kvx_event_type type, const char *req_id, int layer, int peer,
                    int err, const char *msg, int64_t elapsed_ns)
{
    pthread_mutex_lock(&ep->ev_mu);
    if (ep->ev_count == ep->ev_cap) {
        int cap = ep->ev_cap * 2;
        kvx_event *n = malloc(sizeof(*n) * (size_t)cap);
        if (!n) {
            /* Losing an event would leave a lease hanging: keep the oldest
             * and log loudly; this needs cap events pending in memory. */
            pthread_mutex_unlock(&ep->ev_mu);
            td_log_error(MOD, "event_queue_oom", "req=%s", req_id ? req_id : "");
            return;
        }
        for (int i = 0; i < ep->ev_count; i++)
            n[i] = ep->evs[(ep->ev_head + i) % ep->ev_cap];
        free(ep->evs);
        ep->evs = n;
        ep->ev_head = 0;
        ep->ev_cap = cap;
    }
    kvx_event *e = &ep->evs[(ep->ev_head + ep->ev_count) % ep->ev_cap];
    memset(e, 0, sizeof(*e));
    e->type = type;
    if (req_id) copy_id(e->req_id, req_id);
    e->layer = layer;
    e->peer = peer;
    e->err = err;
    e->elapsed_ns = elapsed_ns;
    if (msg) snprintf(e->msg, sizeof(e->msg), "%s", msg);
    ep->ev_count++;
    pthread_mutex_unlock(&ep->ev_mu);
    uint64_t one = 1;
    if (write(ep->ev_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        td_log_warn(MOD, "event_fd_write_failed", "errno=%d", errno);
}

static void emit(kvx_ep *ep, enum kvx_event_type type, const char *req_id, int layer, int peer,
                 int err, const char *msg)
{
    emit_ex(ep, type, req_id, layer, peer, err, msg, 0);
}

int kvx_ep_event_fd(kvx_ep *ep)
{
    return ep->ev_fd;
}

int kvx_ep_poll(kvx_ep *ep, kvx_event *evs, int max)
{
    if (!ep || !evs || max <= 0) return TD_EINVAL;
    pthread_mutex_lock(&ep->ev_mu);
    int n = 0;
    while (n < max && ep->ev_count > 0) {
        evs[n++] = ep->evs[ep->ev_head];
        ep->ev_head = (ep->ev_head + 1) % ep->ev_cap;
        ep->ev_count--;
    }
    if (ep->ev_count == 0) {
        /* Drain the eventfd under the lock so a later emit re-arms it. */
        uint64_t v;
        if (read(ep->ev_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
            td_log_warn(MOD, "event_fd_read_failed", "errno=%d", errno);
    }
    pthread_mutex_unlock(&ep->ev_mu);
    return n;
}

int kvx_ep_wait(kvx_ep *ep, kvx_event *evs, int max, int64_t timeout_ns)
{
    int n = kvx_ep_poll(ep, evs, max);
    if (n != 0) return n;
    struct pollfd pfd = {.fd = ep->ev_fd, .events = POLLIN};
    int ms = (int)((timeout_ns + TD_NS_PER_MS - 1) / TD_NS_PER_MS);
    if (poll(&pfd, 1, ms) < 0 && errno != EINTR) return td_err_from_errno(errno);
    return kvx_ep_poll(ep, evs, max);
}

void kvx_ep_stats(kvx_ep *ep, kvx_stats *out)
{
    kvx_stats *s = &ep->st;
    memset(out, 0, sizeof(*out));
    out->bytes_sent = __atomic_load_n(&s->bytes_sent, __ATOMIC_RELAXED);
    out->bytes_received = __atomic_load_n(&s->bytes_received, __ATOMIC_RELAXED);
    out->requests_done = __atomic_load_n(&s->requests_done, __ATOMIC_RELAXED);
    out->requests_failed = __atomic_load_n(&s->requests_failed, __ATOMIC_RELAXED);
    out->frames_rejected = __atomic_load_n(&s->frames_rejected, __ATOMIC_RELAXED);
    out->peers = __atomic_load_n(&s->peers, __ATOMIC_RELAXED);
    out->comms = __atomic_load_n(&s->comms, __ATOMIC_RELAXED);
    out->comm_bytes = __atomic_load_n(&s->comm_bytes, __ATOMIC_RELAXED);
}

/* ---------- commands (application -> progress) ---------- */

static int call(kvx_ep *ep, int (*fn)(kvx_ep *, void *), void *arg)
{
    kvx__cmd cmd = {.fn = fn, .arg = arg};
    pthread_mutex_lock(&ep->mu);
    if (ep->stopping) {
        pthread_mutex_unlock(&ep->mu);
        return TD_ECLOSED;
    }
    if (ep->cmd_tail)
        ep->cmd_tail->next = &cmd;
    else
        ep->cmd_head = &cmd;
    ep->cmd_tail = &cmd;
    pthread_mutex_unlock(&ep->mu);
    uint64_t one = 1;
    if (write(ep->wake.fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        td_log_warn(MOD, "wake_write_failed", "errno=%d", errno);
    pthread_mutex_lock(&ep->mu);
    while (!cmd.done)
        pthread_cond_wait(&ep->cv, &ep->mu);
    pthread_mutex_unlock(&ep->mu);
    return cmd.rc;
}

static void run_commands(kvx_ep *ep)
{
    pthread_mutex_lock(&ep->mu);
    kvx__cmd *c = ep->cmd_head;
    ep->cmd_head = ep->cmd_tail = NULL;
    pthread_mutex_unlock(&ep->mu);
    while (c) {
        kvx__cmd *next = c->next;
        int rc = c->fn(ep, c->arg);
        pthread_mutex_lock(&ep->mu);
        c->rc = rc;
        c->done = 1;
        pthread_cond_broadcast(&ep->cv);
        pthread_mutex_unlock(&ep->mu);
        c = next;
    }
}

static void on_wake(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    uint64_t v;
    if (read(c->fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        td_log_warn(MOD, "wake_read_failed", "errno=%d", errno);
    run_commands(ep);
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

int kvx__ctrl_send(kvx_ep *ep, kvx__peer *p, uint16_t type, const void *a, size_t alen,
                   const void *b, size_t blen)
{
    if (p->dead) return TD_ECLOSED;
    if (alen + blen > KVX_WIRE_MAX_BODY) return TD_ETOOLONG;
    if (p->out.len > KVX__CTRL_OUT_MAX) {
        kvx__peer_fail(ep, p, TD_ETIMEDOUT, "peer stopped reading its control connection");
        return TD_ETIMEDOUT;
    }
    kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL, .type = type, .len = (uint32_t)(alen + blen)};
    if (buf_reserve(&p->out, sizeof(h) + alen + blen) < 0) return TD_ENOMEM;
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
    int rc = ctrl_flush(ep, p);
    if (rc < 0) kvx__peer_fail(ep, p, TD_ECONNRESET, "control send failed: %s", td_strerror(rc));
    return rc;
}

static int send_req_msg(kvx_ep *ep, kvx__peer *p, uint16_t type, uint64_t hash, int err)
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

static void req_free(kvx__req *r)
{
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
        emit_ex(ep, KVX_EV_DONE, r->id, -1, r->peer ? r->peer->id : -1, 0, NULL,
                td_now_ns() - r->t0_ns);
    } else {
        kvx__stat_add(&ep->st.requests_failed, 1);
        td_log_warn(MOD, "recv_request_failed", "req=%s err=%s landed=%llu", r->id,
                    td_err_name(err), (unsigned long long)r->n_landed);
        emit_ex(ep, KVX_EV_FAILED, r->id, -1, r->peer ? r->peer->id : -1, err, msg,
                td_now_ns() - r->t0_ns);
    }
    req_free(r);
    /* The sender hears of it last. A send that fails fails the peer, and
     * that finishes every request still bound to it: r must be gone by
     * then, or it would end twice (a FAILED for a request that had landed
     * whole, then this DONE with a wiped id). Peers are freed only at the
     * end of a loop iteration, so peer is still valid here. */
    if (peer && !peer->dead)
        send_req_msg(ep, peer, err == 0 ? KVX_MSG_DONE : KVX_MSG_FAIL, hash, err);
}

/* Receiver, local decision to stop (cancel, deadline). A sender that writes
 * our memory directly must confirm it stopped before the blocks go back. */
static void rreq_abort(kvx_ep *ep, kvx__req *r, int err, const char *msg)
{
    if (r->closing) return;
    if (ep->ops->cancel_ack && r->peer && !r->peer->dead) {
        r->closing = 1;
        r->final_err = err;
        r->closing_ns = td_now_ns();
        snprintf(r->final_msg, sizeof(r->final_msg), "%s", msg ? msg : "");
        send_req_msg(ep, r->peer, KVX_MSG_CANCEL, r->hash, err);
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
    if (++r->layer_count[layer] == (uint32_t)r->n_blocks)
        emit(ep, KVX_EV_LAYER_LANDED, r->id, (int)layer, r->peer ? r->peer->id : -1, 0, NULL);
    if (r->n_landed == (uint64_t)r->n_blocks * ep->p.layout.n_layers)
        kvx__rreq_finish(ep, r, 0, NULL);
}

static void sreq_maybe_reap(kvx_ep *ep, kvx__req *r)
{
    if (!r->closing || r->inflight > 0) return;
    /* Only now is nothing of r in flight: tell the receiver it may release
     * the blocks (a direct writer's copies have all finished). */
    if (r->peer && !r->peer->dead) {
        if (r->notify) send_req_msg(ep, r->peer, KVX_MSG_CANCEL, r->hash, r->final_err);
        if (r->ack_cancel) send_req_msg(ep, r->peer, KVX_MSG_CANCEL_ACK, r->hash, 0);
    }
    if (r->final_err == 0) {
        kvx__stat_add(&ep->st.requests_done, 1);
        emit_ex(ep, KVX_EV_DONE, r->id, -1, r->peer ? r->peer->id : -1, 0, NULL,
                td_now_ns() - r->t0_ns);
    } else {
        kvx__stat_add(&ep->st.requests_failed, 1);
        td_log_warn(MOD, "send_request_failed", "req=%s err=%s", r->id, td_err_name(r->final_err));
        emit_ex(ep, KVX_EV_FAILED, r->id, -1, r->peer ? r->peer->id : -1, r->final_err,
                r->final_msg, td_now_ns() - r->t0_ns);
    }
    req_free(r);
}

void kvx__post_done(kvx_ep *ep, kvx__post *post)
{
    kvx__req *r = post->req;
    if (!r->closing)
        emit(ep, KVX_EV_LAYER_SENT, r->id, (int)post->layer, r->peer ? r->peer->id : -1, 0, NULL);
    r->inflight--;
    free(post);
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
        free(p);
    }
    r->wait_tail = NULL;
    if (ep->ops->sreq_abort) ep->ops->sreq_abort(ep, r);
    sreq_maybe_reap(ep, r);
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
    emit(ep, KVX_EV_PEER_ERROR, NULL, -1, p->id, err, msg);
}

static void peer_free(kvx_ep *ep, kvx__peer *p)
{
    if (ep->ops->peer_free) ep->ops->peer_free(ep, p);
    free(p->in.data);
    free(p->out.data);
    free(p);
}

static void reap_peers(kvx_ep *ep)
{
    kvx__peer **pp = &ep->peers;
    while (*pp) {
        kvx__peer *p = *pp;
        if (p->dead) {
            *pp = p->next;
            peer_free(ep, p);
        } else {
            pp = &p->next;
        }
    }
}

static kvx__peer *peer_by_id(kvx_ep *ep, int id)
{
    for (kvx__peer *p = ep->peers; p; p = p->next)
        if (p->id == id) return p;
    return NULL;
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
        send_req_msg(ep, p, KVX_MSG_FAIL, m->hash, TD_ENOENT);
        return;
    }
    if (r->peer && r->peer != p) {
        send_req_msg(ep, p, KVX_MSG_FAIL, m->hash, TD_EEXIST);
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
        free(post);
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
static void kick_posts(kvx_ep *ep)
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

static void handle_msg(kvx_ep *ep, kvx__peer *p, uint16_t type, const uint8_t *body, uint32_t len)
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
                send_req_msg(ep, p, KVX_MSG_CANCEL_ACK, m.hash, 0);
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

static void on_ctrl(kvx_ep *ep, kvx__conn *c, uint32_t events)
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
        if (buf_reserve(&p->in, 65536) < 0) {
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
        p->last_rx_ns = td_now_ns();
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
            handle_msg(ep, p, h.type, body, h.len);
            if (p->dead) return;
            off += used;
        }
        buf_consume(&p->in, off);
    }
}

static kvx__peer *peer_new(kvx_ep *ep, int fd)
{
    kvx__peer *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->id = ep->next_peer_id++;
    p->ctrl.fd = fd;
    p->ctrl.on_io = on_ctrl;
    p->ctrl.peer = p;
    p->last_rx_ns = td_now_ns();
    return p;
}

/* ---------- handshake ---------- */

static void hello_local(const kvx_ep *ep, kvx_wire_hello *h)
{
    const kv_layout *l = &ep->p.layout;
    memset(h, 0, sizeof(*h));
    h->version = KVX_WIRE_VERSION;
    h->layout = KVX_WIRE_LAYOUT_LAYER_MAJOR;
    h->fingerprint = ep->p.model_fingerprint;
    h->dtype = (uint32_t)l->dtype;
    h->block_size = l->block_size;
    h->block_bytes = ep->block_bytes;
    h->n_layers = l->n_layers;
    h->num_blocks = l->num_blocks;
    h->n_kv_heads = l->n_kv_heads;
    h->head_dim = l->head_dim;
    h->n_data_conns = (uint32_t)ep->p.n_data_conns;
    snprintf(h->transport, sizeof(h->transport), "%s", ep->transport);
}

static void pending_close(kvx_ep *ep, kvx__pending *pd)
{
    if (pd->closed) return;
    kvx__conn_del(ep, &pd->c);
    if (pd->c.fd >= 0) close(pd->c.fd);
    pd->c.fd = -1;
    pd->closed = 1;
}

static int send_all(int fd, const void *a, size_t alen, int pass_fd)
{
    struct iovec iov = {.iov_base = (void *)a, .iov_len = alen};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } cm;
    if (pass_fd >= 0) {
        memset(&cm, 0, sizeof(cm));
        mh.msg_control = cm.buf;
        mh.msg_controllen = sizeof(cm.buf);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    size_t done = 0;
    while (done < alen) {
        ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                /* At most 1 s for the peer to make room; a signal that
                 * interrupts the wait is not the peer's fault, so the rest
                 * of the second is waited out. */
                int64_t until = td_now_ns() + TD_NS_PER_S;
                int pr;
                do {
                    int64_t left = until - td_now_ns();
                    if (left <= 0) return TD_ETIMEDOUT;
                    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
                    pr = poll(&pfd, 1, (int)((left + TD_NS_PER_MS - 1) / TD_NS_PER_MS));
                } while (pr < 0 && errno == EINTR);
                if (pr < 0) return td_err_from_errno(errno);
                if (pr == 0) return TD_ETIMEDOUT;
                continue;
            }
            return td_err_from_errno(errno);
        }
        done += (size_t)n;
        iov.iov_base = (uint8_t *)a + done;
        iov.iov_len = alen - done;
        mh.msg_control = NULL;
        mh.msg_controllen = 0;
    }
    return 0;
}

static int send_msg_blocking(int fd, uint16_t type, const void *body, uint32_t len, int pass_fd)
{
    uint8_t buf[sizeof(kvx_wire_hdr) + sizeof(kvx_wire_hello)];
    kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL, .type = type, .len = len};
    if (len > sizeof(buf) - sizeof(h)) return TD_ETOOLONG;
    memcpy(buf, &h, sizeof(h));
    memcpy(buf + sizeof(h), body, len);
    return send_all(fd, buf, sizeof(h) + len, pass_fd);
}

static void receiver_hello(kvx_ep *ep, kvx__pending *pd, const kvx_wire_hello *remote)
{
    kvx_wire_hello local;
    hello_local(ep, &local);
    char field[32], msg[KVX_ERR_MSG_MAX];
    if (kvx_wire_hello_check(&local, remote, field, sizeof(field), msg, sizeof(msg)) < 0) {
        kvx_wire_nak nak;
        memset(&nak, 0, sizeof(nak));
        snprintf(nak.field, sizeof(nak.field), "%s", field);
        snprintf(nak.msg, sizeof(nak.msg), "%s", msg);
        (void)send_msg_blocking(pd->c.fd, KVX_MSG_HELLO_NAK, &nak, sizeof(nak), -1);
        td_log_error(MOD, "handshake_mismatch", "field=%s msg=\"%s\"", field, msg);
        emit(ep, KVX_EV_PEER_ERROR, NULL, -1, -1, TD_EMISMATCH, msg);
        pending_close(ep, pd);
        return;
    }
    int fd = pd->c.fd;
    kvx__conn_del(ep, &pd->c);
    pd->c.fd = -1;
    pending_close(ep, pd);
    kvx__peer *p = peer_new(ep, fd);
    if (!p) {
        close(fd);
        return;
    }
    p->remote = *remote;
    uint64_t tok = XXH3_64bits_withSeed(&p, sizeof(p), (uint64_t)td_now_ns());
    p->token = tok ? tok : 1;
    local.token = p->token;
    int pass_fd = -1, rc = 0;
    if (ep->ops->ack_extra) rc = ep->ops->ack_extra(ep, p, &local, &pass_fd);
    if (rc == 0) rc = send_msg_blocking(fd, KVX_MSG_HELLO_ACK, &local, sizeof(local), pass_fd);
    if (rc == 0) rc = kvx__conn_add(ep, &p->ctrl, EPOLLIN);
    if (rc == 0 && ep->ops->peer_start) rc = ep->ops->peer_start(ep, p);
    p->next = ep->peers;
    ep->peers = p;
    __atomic_fetch_add(&ep->st.peers, 1, __ATOMIC_RELAXED);
    if (rc < 0) {
        kvx__peer_fail(ep, p, rc, "handshake failed: %s", td_strerror(rc));
        return;
    }
    td_log_info(MOD, "peer_accepted", "peer=%d transport=%s", p->id, ep->transport);
}

static void on_pending(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    kvx__pending *pd = c->tp;
    for (;;) {
        if (buf_reserve(&pd->in, 512) < 0) {
            pending_close(ep, pd);
            return;
        }
        size_t want = sizeof(kvx_wire_hdr);
        if (pd->in.len >= sizeof(kvx_wire_hdr)) {
            kvx_wire_hdr h;
            memcpy(&h, pd->in.data, sizeof(h));
            int ok = h.magic == KVX_WIRE_MAGIC_CTRL &&
                     ((h.type == KVX_MSG_HELLO && h.len == sizeof(kvx_wire_hello)) ||
                      (h.type == KVX_MSG_DATA_HELLO && h.len == sizeof(kvx_wire_data_hello)));
            if (!ok) {
                td_log_warn(MOD, "bad_hello", "magic=%08x type=%u len=%u", h.magic, h.type, h.len);
                kvx__stat_add(&ep->st.frames_rejected, 1);
                pending_close(ep, pd);
                return;
            }
            want = sizeof(h) + h.len;
            if (pd->in.len == want) {
                if (h.type == KVX_MSG_HELLO) {
                    kvx_wire_hello hello;
                    if (kvx_wire_hello_decode(pd->in.data + sizeof(h), h.len, &hello) < 0) {
                        td_log_warn(MOD, "bad_hello", "extra_len=%u", hello.extra_len);
                        kvx__stat_add(&ep->st.frames_rejected, 1);
                        pending_close(ep, pd);
                        return;
                    }
                    receiver_hello(ep, pd, &hello);
                    return;
                }
                kvx_wire_data_hello dh;
                memcpy(&dh, pd->in.data + sizeof(h), sizeof(dh));
                kvx__peer *p = ep->peers;
                while (p && (p->dead || p->token != dh.token))
                    p = p->next;
                if (!p || !ep->ops->data_conn) {
                    kvx__stat_add(&ep->st.frames_rejected, 1);
                    pending_close(ep, pd);
                    return;
                }
                int fd = pd->c.fd;
                kvx__conn_del(ep, &pd->c);
                pd->c.fd = -1;
                pending_close(ep, pd);
                if (ep->ops->data_conn(ep, p, fd, dh.index) < 0) close(fd);
                return;
            }
        }
        /* Read exactly up to the end of the hello: what follows belongs to
         * the connection's next owner. */
        ssize_t n = recv(c->fd, pd->in.data + pd->in.len, want - pd->in.len, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            pending_close(ep, pd);
            return;
        }
        pd->in.len += (size_t)n;
    }
}

static void on_listen(kvx_ep *ep, kvx__conn *c, uint32_t events)
{
    for (;;) {
        int fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR)
                td_log_warn(MOD, "accept_failed", "errno=%d", errno);
            if (errno == EINTR) continue;
            return;
        }
        if (!ep->ops->unix_ctrl) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        kvx__pending *pd = calloc(1, sizeof(*pd));
        if (!pd) {
            close(fd);
            continue;
        }
        pd->c.fd = fd;
        pd->c.on_io = on_pending;
        pd->c.tp = pd;
        pd->t0_ns = td_now_ns();
        if (kvx__conn_add(ep, &pd->c, EPOLLIN) < 0) {
            close(fd);
            free(pd);
            continue;
        }
        pd->next = ep->pending;
        ep->pending = pd;
    }
}

/* ---------- timers ---------- */

static void timers(kvx_ep *ep, int64_t now)
{
    int64_t stall = ep->p.stall_timeout_ns;
    for (kvx__peer *p = ep->peers; p; p = p->next) {
        if (p->dead) continue;
        if (now - p->last_rx_ns > stall) {
            kvx__peer_fail(ep, p, TD_ETIMEDOUT, "peer silent for %lld ms",
                           (long long)((now - p->last_rx_ns) / TD_NS_PER_MS));
            continue;
        }
        if (now - p->last_hb_ns > stall / 4) {
            p->last_hb_ns = now;
            kvx__ctrl_send(ep, p, KVX_MSG_HEARTBEAT, NULL, 0, NULL, 0);
        }
    }
    for (int i = 0; i < ep->reqs_hi; i++) {
        kvx__req *r = &ep->reqs[i];
        if (!r->used) continue;
        if (ep->p.role == KVX_ROLE_RECV && r->closing && now - r->closing_ns > stall) {
            /* A direct writer that never confirms it stopped cannot be
             * trusted with our memory: drop the peer. */
            kvx__peer_fail(ep, r->peer, TD_ETIMEDOUT, "peer did not acknowledge a cancel");
            continue;
        }
        if (r->deadline_ns && now > r->deadline_ns && !r->closing) {
            if (ep->p.role == KVX_ROLE_RECV)
                rreq_abort(ep, r, TD_ETIMEDOUT, "request deadline exceeded");
            else
                kvx__sreq_finish(ep, r, TD_ETIMEDOUT, "request deadline exceeded", 1);
        }
    }
    kvx__pending **pp = &ep->pending;
    while (*pp) {
        kvx__pending *pd = *pp;
        if (!pd->closed && now - pd->t0_ns > stall) {
            td_log_warn(MOD, "handshake_timeout", NULL);
            pending_close(ep, pd);
        }
        if (pd->closed) {
            *pp = pd->next;
            free(pd->in.data);
            free(pd);
        } else {
            pp = &pd->next;
        }
    }
}

/* ---------- the progress thread ---------- */

static void *progress_main(void *arg)
{
    kvx_ep *ep = arg;
    struct epoll_event evs[64];
    int64_t next_tick = td_now_ns();
    int busy = 0;
    if (ep->ops->thread_init) ep->ops->thread_init(ep);
    while (!ep->stopping) {
        int n = epoll_wait(ep->epfd, evs, 64, busy ? 0 : (int)(ep->tick_ns / TD_NS_PER_MS));
        if (n < 0 && errno != EINTR) {
            td_log_error(MOD, "epoll_failed", "errno=%d", errno);
            break;
        }
        for (int i = 0; i < n; i++) {
            kvx__conn *c = evs[i].data.ptr;
            c->on_io(ep, c, evs[i].events);
        }
        kick_posts(ep);
        busy = ep->ops->progress ? ep->ops->progress(ep) : 0;
        int64_t now = td_now_ns();
        if (now >= next_tick) {
            timers(ep, now);
            next_tick = now + ep->tick_ns;
        }
        reap_peers(ep);
    }
    return NULL;
}

static int stop_fn(kvx_ep *ep, void *arg)
{
    ep->stopping = 1;
    return 0;
}

/* ---------- public API ---------- */

int kvx_transport_available(const char *name, char *why, size_t why_len)
{
    const kvx__ops *ops = name ? kvx__ops_find(name) : NULL;
    if (!ops) {
        if (why && why_len)
            snprintf(why, why_len, "transport '%s' is not built into this binary",
                     name ? name : "(null)");
        return 0;
    }
    if (ops->available) return ops->available(why, why_len);
    if (why && why_len) why[0] = 0;
    return 1;
}

void *kvx_ep_pool(kvx_ep *ep)
{
    return ep ? ep->pool : NULL;
}

int kvx_ep_create(const kvx_params *params, kvx_ep **out)
{
    if (!params || !out || !params->transport) return TD_EINVAL;
    *out = NULL;
    const kv_layout *l = &params->layout;
    if (l->n_layers == 0 || l->num_blocks == 0 || l->block_size == 0 || l->n_kv_heads == 0 ||
        l->head_dim == 0 || (int)l->dtype < 0 || l->dtype > KV_DTYPE_BF16 ||
        (params->role != KVX_ROLE_RECV && params->role != KVX_ROLE_SEND))
        return TD_EINVAL;
    /* pool bytes must fit: n_layers * num_blocks * block_bytes */
    size_t bb = kv_layout_block_bytes(l);
    if (bb / 2 / l->block_size != kv_layout_token_bytes(l) ||
        (uint64_t)l->n_layers * l->num_blocks > SIZE_MAX / bb)
        return TD_ERANGE;
    const kvx__ops *ops = kvx__ops_find(params->transport);
    if (!ops) {
        td_log_error(MOD, "unknown_transport", "name=%s", params->transport);
        return TD_EUNSUPPORTED;
    }
    char why[160];
    if (ops->available && !ops->available(why, sizeof(why))) {
        td_log_error(MOD, "transport_unavailable", "name=%s why=\"%s\"", ops->name, why);
        return TD_ENODEV;
    }
    if (params->pool && ops->own_pool && params->role == KVX_ROLE_RECV) return TD_EINVAL;
    kvx_ep *ep = calloc(1, sizeof(*ep));
    if (!ep) return TD_ENOMEM;
    ep->p = *params;
    snprintf(ep->transport, sizeof(ep->transport), "%s", ops->name);
    ep->p.transport = ep->transport;
    if (ep->p.n_data_conns <= 0) ep->p.n_data_conns = 2;
    if (ep->p.n_data_conns > 16) ep->p.n_data_conns = 16;
    if (ep->p.stall_timeout_ns <= 0) ep->p.stall_timeout_ns = 1500 * TD_NS_PER_MS;
    if (ep->p.max_comms <= 0) ep->p.max_comms = 4;
    if (ep->p.comm_idle_ns <= 0) ep->p.comm_idle_ns = 30 * TD_NS_PER_S;
    ep->tick_ns = ep->p.stall_timeout_ns / 8 < 50 * TD_NS_PER_MS ? ep->p.stall_timeout_ns / 8
                                                                 : 50 * TD_NS_PER_MS;
    if (ep->tick_ns < TD_NS_PER_MS) ep->tick_ns = TD_NS_PER_MS;
    ep->ops = ops;
    ep->pool = params->pool;
    ep->block_bytes = bb;
    ep->pool_bytes = kv_layout_pool_bytes(l);
    ep->epfd = ep->wake.fd = ep->listen.fd = ep->ev_fd = -1;
    pthread_mutex_init(&ep->mu, NULL);
    pthread_cond_init(&ep->cv, NULL);
    pthread_mutex_init(&ep->ev_mu, NULL);
    int rc = TD_ENOMEM;
    ep->max_reqs = KVX__MAX_REQS;
    ep->ev_cap = 256;
    ep->reqs = calloc((size_t)ep->max_reqs, sizeof(*ep->reqs));
    ep->evs = calloc((size_t)ep->ev_cap, sizeof(*ep->evs));
    ep->owner = malloc(sizeof(*ep->owner) * l->num_blocks);
    ep->owner_pos = calloc(l->num_blocks, sizeof(*ep->owner_pos));
    ep->kick = calloc((size_t)ep->max_reqs, sizeof(*ep->kick));
    if (!ep->reqs || !ep->evs || !ep->owner || !ep->owner_pos || !ep->kick) goto fail;
    for (uint32_t i = 0; i < l->num_blocks; i++)
        ep->owner[i] = -1;
    ep->epfd = epoll_create1(EPOLL_CLOEXEC);
    ep->wake.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ep->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ep->epfd < 0 || ep->wake.fd < 0 || ep->ev_fd < 0) {
        rc = td_err_from_errno(errno);
        goto fail;
    }
    ep->wake.on_io = on_wake;
    if ((rc = kvx__conn_add(ep, &ep->wake, EPOLLIN)) < 0) goto fail;
    if (ops->ep_init && (rc = ops->ep_init(ep)) < 0) goto fail;
    if (!ep->pool) {
        rc = TD_EINVAL; /* the transport had to allocate one */
        goto fail;
    }
    if (pthread_create(&ep->thread, NULL, progress_main, ep) != 0) {
        rc = TD_ENOMEM;
        goto fail;
    }
    ep->thread_started = 1;
    *out = ep;
    return 0;
fail:
    kvx_ep_destroy(ep);
    return rc;
}

void kvx_ep_destroy(kvx_ep *ep)
{
    if (!ep) return;
    if (ep->thread_started) {
        call(ep, stop_fn, NULL);
        pthread_join(ep->thread, NULL);
    }
    pthread_mutex_lock(&ep->mu);
    ep->stopping = 1;
    pthread_mutex_unlock(&ep->mu);
    /* The thread is gone: tear down on this one. Requests end without events
     * (nobody is left to read them). */
    for (kvx__peer *p = ep->peers; p; p = p->next) {
        if (!p->dead) {
            for (int i = 0; ep->reqs && i < ep->reqs_hi; i++) {
                kvx__req *r = &ep->reqs[i];
                if (r->used && r->peer == p && ep->p.role == KVX_ROLE_SEND)
                    kvx__sreq_finish(ep, r, TD_ECLOSED, "endpoint closed", 0);
            }
            if (ep->ops->peer_close) ep->ops->peer_close(ep, p);
            if (p->ctrl.fd >= 0) close(p->ctrl.fd);
            p->dead = 1;
        }
    }
    reap_peers(ep);
    for (int i = 0; ep->reqs && i < ep->reqs_hi; i++)
        if (ep->reqs[i].used) {
            kvx__req *r = &ep->reqs[i];
            while (r->wait_head) {
                kvx__post *p = r->wait_head;
                r->wait_head = p->next;
                free(p);
            }
            req_free(r);
        }
    while (ep->pending) {
        kvx__pending *pd = ep->pending;
        ep->pending = pd->next;
        if (!pd->closed && pd->c.fd >= 0) close(pd->c.fd);
        free(pd->in.data);
        free(pd);
    }
    if (ep->listen.fd >= 0) {
        close(ep->listen.fd);
        if (ep->listen_path[0]) unlink(ep->listen_path);
    }
    if (ep->ops && ep->ops->ep_fini) ep->ops->ep_fini(ep);
    if (ep->epfd >= 0) close(ep->epfd);
    if (ep->wake.fd >= 0) close(ep->wake.fd);
    if (ep->ev_fd >= 0) close(ep->ev_fd);
    pthread_mutex_destroy(&ep->mu);
    pthread_cond_destroy(&ep->cv);
    pthread_mutex_destroy(&ep->ev_mu);
    free(ep->reqs);
    free(ep->evs);
    free(ep->owner);
    free(ep->owner_pos);
    free(ep->kick);
    free(ep);
}

struct listen_arg {
    int fd;
};

static int listen_fn(kvx_ep *ep, void *arg)
{
    struct listen_arg *a = arg;
    if (ep->listen.fd >= 0) return TD_EEXIST;
    ep->listen.fd = a->fd;
    ep->listen.on_io = on_listen;
    int rc = kvx__conn_add(ep, &ep->listen, EPOLLIN);
    if (rc < 0) ep->listen.fd = -1;
    return rc;
}

int kvx_listen(kvx_ep *ep, const char *addr, char *bound, size_t bound_len)
{
    if (!ep || !addr || ep->p.role != KVX_ROLE_RECV) return TD_EINVAL;
    int fd = -1, rc;
    if (ep->ops->unix_ctrl) {
        struct sockaddr_un su;
        if ((rc = parse_unix(addr, &su)) < 0) return rc;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return td_err_from_errno(errno);
        unlink(addr);
        if (bind(fd, (struct sockaddr *)&su, sizeof(su)) < 0 || listen(fd, 64) < 0) {
            rc = td_err_from_errno(errno);
            close(fd);
            return rc;
        }
        snprintf(ep->listen_path, sizeof(ep->listen_path), "%s", addr);
        if (bound && bound_len) snprintf(bound, bound_len, "%s", addr);
    } else {
        struct sockaddr_in sa;
        if ((rc = parse_inet(addr, &sa)) < 0) return rc;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return td_err_from_errno(errno);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        socklen_t sl = sizeof(sa);
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 256) < 0 ||
            getsockname(fd, (struct sockaddr *)&sa, &sl) < 0) {
            rc = td_err_from_errno(errno);
            close(fd);
            return rc;
        }
        char host[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &sa.sin_addr, host, sizeof(host));
        if (bound && bound_len) snprintf(bound, bound_len, "%s:%u", host, ntohs(sa.sin_port));
    }
    struct listen_arg a = {.fd = fd};
    rc = call(ep, listen_fn, &a);
    if (rc < 0) {
        close(fd);
        if (ep->ops->unix_ctrl) unlink(addr);
        ep->listen_path[0] = 0;
    }
    return rc;
}

int kvx__dial(const kvx_ep *ep, const char *addr, int64_t timeout_ns, int *out_fd)
{
    int rc, fd;
    struct timeval tv = {.tv_sec = timeout_ns / TD_NS_PER_S,
                         .tv_usec = (timeout_ns % TD_NS_PER_S) / 1000};
    if (ep->ops->unix_ctrl) {
        struct sockaddr_un su;
        if ((rc = parse_unix(addr, &su)) < 0) return rc;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return td_err_from_errno(errno);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        if (connect(fd, (struct sockaddr *)&su, sizeof(su)) < 0) {
            rc = td_err_from_errno(errno);
            close(fd);
            return rc;
        }
    } else {
        struct sockaddr_in sa;
        if ((rc = parse_inet(addr, &sa)) < 0) return rc;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return td_err_from_errno(errno);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            rc = td_err_from_errno(errno);
            close(fd);
            return rc;
        }
    }
    *out_fd = fd;
    return 0;
}

/* Reads exactly n bytes (blocking socket with a receive timeout); collects a
 * passed descriptor into *fd_out when asked. */
static int recv_exact(int fd, void *buf, size_t n, int *fd_out)
{
    size_t done = 0;
    while (done < n) {
        struct iovec iov = {.iov_base = (uint8_t *)buf + done, .iov_len = n - done};
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(sizeof(int))];
        } cm;
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        if (fd_out) {
            mh.msg_control = cm.buf;
            mh.msg_controllen = sizeof(cm.buf);
        }
        ssize_t r = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return errno == EAGAIN ? TD_ETIMEDOUT : td_err_from_errno(errno);
        if (r == 0) return TD_ECONNRESET;
        if (fd_out) {
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
                    c->cmsg_len == CMSG_LEN(sizeof(int))) {
                    if (*fd_out >= 0) close(*fd_out);
                    memcpy(fd_out, CMSG_DATA(c), sizeof(int));
                }
        }
        done += (size_t)r;
    }
    return 0;
}

static int add_peer_fn(kvx_ep *ep, void *arg)
{
    kvx__peer *p = arg;
    p->last_rx_ns = td_now_ns();
    int rc = kvx__set_nonblock(p->ctrl.fd);
    if (rc == 0) rc = kvx__conn_add(ep, &p->ctrl, EPOLLIN);
    if (rc == 0 && ep->ops->peer_start) rc = ep->ops->peer_start(ep, p);
    p->next = ep->peers;
    ep->peers = p;
    __atomic_fetch_add(&ep->st.peers, 1, __ATOMIC_RELAXED);
    if (rc < 0) {
        kvx__peer_fail(ep, p, rc, "peer start failed: %s", td_strerror(rc));
        return rc;
    }
    return p->id;
}

static int alloc_peer_id_fn(kvx_ep *ep, void *arg)
{
    return ep->next_peer_id++;
}

int kvx_connect(kvx_ep *ep, const char *addr, int *peer, char *msg, size_t msg_len)
{
    if (!ep || !addr || !peer || ep->p.role != KVX_ROLE_SEND) return TD_EINVAL;
    if (msg && msg_len) msg[0] = 0;
    int fd = -1, pass_fd = -1, rc;
    kvx__peer *p = NULL;
    if ((rc = kvx__dial(ep, addr, ep->p.stall_timeout_ns, &fd)) < 0) goto fail;
    kvx_wire_hello h;
    hello_local(ep, &h);
    if (ep->ops->hello_extra && (rc = ep->ops->hello_extra(ep, &h)) < 0) goto fail;
    if ((rc = send_msg_blocking(fd, KVX_MSG_HELLO, &h, sizeof(h), -1)) < 0) goto fail;
    kvx_wire_hdr rh;
    if ((rc = recv_exact(fd, &rh, sizeof(rh), &pass_fd)) < 0) goto fail;
    if (rh.magic != KVX_WIRE_MAGIC_CTRL) {
        rc = TD_EPROTO;
        goto fail;
    }
    if (rh.type == KVX_MSG_HELLO_NAK && rh.len == sizeof(kvx_wire_nak)) {
        kvx_wire_nak nak;
        if ((rc = recv_exact(fd, &nak, sizeof(nak), NULL)) < 0) goto fail;
        nak.msg[sizeof(nak.msg) - 1] = 0;
        if (msg && msg_len) snprintf(msg, msg_len, "%s", nak.msg);
        td_log_error(MOD, "handshake_rejected", "msg=\"%s\"", nak.msg);
        rc = TD_EMISMATCH;
        goto fail;
    }
    if (rh.type != KVX_MSG_HELLO_ACK || rh.len != sizeof(kvx_wire_hello)) {
        rc = TD_EPROTO;
        goto fail;
    }
    p = calloc(1, sizeof(*p));
    if (!p) {
        rc = TD_ENOMEM;
        goto fail;
    }
    uint8_t raw[sizeof(kvx_wire_hello)];
    if ((rc = recv_exact(fd, raw, sizeof(raw), &pass_fd)) < 0) goto fail;
    if ((rc = kvx_wire_hello_decode(raw, sizeof(raw), &p->remote)) < 0) goto fail;
    char field[32], m[KVX_ERR_MSG_MAX];
    if (kvx_wire_hello_check(&h, &p->remote, field, sizeof(field), m, sizeof(m)) < 0) {
        if (msg && msg_len) snprintf(msg, msg_len, "%s", m);
        td_log_error(MOD, "handshake_mismatch", "msg=\"%s\"", m);
        rc = TD_EMISMATCH;
        goto fail;
    }
    p->id = call(ep, alloc_peer_id_fn, NULL);
    p->ctrl.fd = fd;
    p->ctrl.on_io = on_ctrl;
    p->ctrl.peer = p;
    p->token = p->remote.token;
    snprintf(p->addr, sizeof(p->addr), "%s", addr);
    if (ep->ops->peer_attach) {
        rc = ep->ops->peer_attach(ep, p, pass_fd);
        pass_fd = -1; /* the transport owns it now */
        if (rc < 0) goto fail;
    }
    fd = -1; /* owned by p */
    rc = call(ep, add_peer_fn, p);
    if (rc < 0) return rc; /* p was failed and is reaped by the progress thread */
    *peer = rc;
    td_log_info(MOD, "peer_connected", "peer=%d addr=%s transport=%s", rc, addr, ep->transport);
    return 0;
fail:
    if (p) {
        if (ep->ops->peer_close && p->tp) ep->ops->peer_close(ep, p);
        peer_free(ep, p);
    }
    if (pass_fd >= 0) close(pass_fd);
    if (fd >= 0) close(fd);
    if (rc == TD_EMISMATCH) emit(ep, KVX_EV_PEER_ERROR, NULL, -1, -1, rc, msg);
    return rc;
}

struct register_arg {
    const char *id;
    const uint32_t *dst;
    int n;
    int64_t deadline_ns;
};

static int register_fn(kvx_ep *ep, void *arg)
{
    struct register_arg *a = arg;
    uint64_t hash = kvx_req_hash(a->id);
    for (int i = 0; i < ep->reqs_hi; i++)
        if (ep->reqs[i].used && (ep->reqs[i].hash == hash || !strcmp(ep->reqs[i].id, a->id)))
            return TD_EEXIST;
    for (int i = 0; i < a->n; i++)
        if (a->dst[i] >= ep->p.layout.num_blocks) return TD_EINVAL;
    kvx__req *r = req_alloc(ep);
    if (!r) return TD_ENOSPC;
    int rc = 0, i;
    for (i = 0; i < a->n; i++) {
        if (ep->owner[a->dst[i]] >= 0) {
            /* Leased by another request, or listed twice in this one. */
            rc = ep->owner[a->dst[i]] == r->slot ? TD_EINVAL : TD_EEXIST;
            break;
        }
        ep->owner[a->dst[i]] = r->slot;
        ep->owner_pos[a->dst[i]] = (uint32_t)i;
    }
    if (rc < 0) {
        while (--i >= 0)
            ep->owner[a->dst[i]] = -1;
        req_free(r);
        return rc;
    }
    copy_id(r->id, a->id);
    r->hash = hash;
    r->deadline_ns = a->deadline_ns;
    r->t0_ns = td_now_ns();
    r->n_blocks = a->n;
    r->dst = malloc(sizeof(uint32_t) * (size_t)a->n);
    r->landed = calloc((size_t)a->n * ep->p.layout.n_layers, 1);
    r->layer_count = calloc(ep->p.layout.n_layers, sizeof(uint32_t));
    if (!r->dst || !r->landed || !r->layer_count) {
        for (i = 0; i < a->n; i++)
            ep->owner[a->dst[i]] = -1;
        req_free(r);
        return TD_ENOMEM;
    }
    memcpy(r->dst, a->dst, sizeof(uint32_t) * (size_t)a->n);
    return 0;
}

static int check_id(const char *id)
{
    if (!id) return TD_EINVAL;
    size_t n = strlen(id);
    return n == 0 || n >= KVX_REQ_ID_MAX ? TD_EINVAL : 0;
}

int kvx_recv_register(kvx_ep *ep, const char *req_id, const uint32_t *dst_blocks, int n_blocks,
                      int64_t deadline_ns)
{
    if (!ep || ep->p.role != KVX_ROLE_RECV || check_id(req_id) < 0 || !dst_blocks ||
        n_blocks <= 0 || (uint32_t)n_blocks > ep->p.layout.num_blocks)
        return TD_EINVAL;
    /* The block list travels back in one BEGIN_ACK. */
    if ((size_t)n_blocks > (KVX_WIRE_MAX_BODY - sizeof(kvx_wire_req)) / sizeof(uint32_t))
        return TD_ERANGE;
    struct register_arg a = {req_id, dst_blocks, n_blocks, deadline_ns};
    return call(ep, register_fn, &a);
}

struct begin_arg {
    int peer;
    const char *id;
    int64_t deadline_ns;
};

static int begin_fn(kvx_ep *ep, void *arg)
{
    struct begin_arg *a = arg;
    kvx__peer *p = peer_by_id(ep, a->peer);
    if (!p) return TD_ENOENT;
    if (p->dead) return TD_ECONNRESET;
    uint64_t hash = kvx_req_hash(a->id);
    for (int i = 0; i < ep->reqs_hi; i++)
        if (ep->reqs[i].used && (ep->reqs[i].hash == hash || !strcmp(ep->reqs[i].id, a->id)))
            return TD_EEXIST;
    kvx__req *r = req_alloc(ep);
    if (!r) return TD_ENOSPC;
    copy_id(r->id, a->id);
    r->hash = hash;
    r->deadline_ns = a->deadline_ns;
    r->t0_ns = td_now_ns();
    kvx_wire_req m = {.hash = hash, .n = (uint32_t)strlen(a->id)};
    /* r joins the peer only once BEGIN is queued: a send that fails the peer
     * (reset, stalled reader) must not also finish r with a FAILED event, as
     * the caller gets the error code instead and owns nothing of r. */
    int rc = kvx__ctrl_send(ep, p, KVX_MSG_BEGIN, &m, sizeof(m), a->id, m.n);
    if (rc < 0) {
        req_free(r);
        return rc;
    }
    r->peer = p;
    return 0;
}

int kvx_send_begin(kvx_ep *ep, int peer, const char *req_id, int64_t deadline_ns)
{
    if (!ep || ep->p.role != KVX_ROLE_SEND || check_id(req_id) < 0) return TD_EINVAL;
    struct begin_arg a = {peer, req_id, deadline_ns};
    return call(ep, begin_fn, &a);
}

struct layer_arg {
    const char *id;
    int layer;
    const kvx_pair *pairs;
    int n;
};

static int layer_fn(kvx_ep *ep, void *arg)
{
    struct layer_arg *a = arg;
    kvx__req *r = req_by_id(ep, a->id);
    if (!r) return TD_ENOENT;
    if (r->closing) return r->final_err < 0 ? r->final_err : TD_ECANCELED;
    for (int i = 0; i < a->n; i++)
        if (a->pairs[i].src >= ep->p.layout.num_blocks ||
            a->pairs[i].dst >= r->peer->remote.num_blocks)
            return TD_EINVAL;
    kvx__post *post = malloc(sizeof(*post) + sizeof(kvx_pair) * (size_t)a->n);
    if (!post) return TD_ENOMEM;
    memset(post, 0, sizeof(*post));
    post->req = r;
    post->layer = (uint32_t)a->layer;
    post->n = a->n;
    memcpy(post->pairs, a->pairs, sizeof(kvx_pair) * (size_t)a->n);
    /* Queue it; the data moves after this command returns (kick_posts), so
     * the caller (the engine's compute thread) never waits for a copy. */
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
    return 0;
}

int kvx_send_layer(kvx_ep *ep, const char *req_id, int layer, const kvx_pair *pairs, int n)
{
    if (!ep || ep->p.role != KVX_ROLE_SEND || check_id(req_id) < 0 || layer < 0 ||
        (uint32_t)layer >= ep->p.layout.n_layers || n <= 0 || !pairs ||
        (size_t)n > KVX_WIRE_MAX_BODY / sizeof(kvx_pair) - 8)
        return TD_EINVAL;
    struct layer_arg a = {req_id, layer, pairs, n};
    return call(ep, layer_fn, &a);
}

static int cancel_fn(kvx_ep *ep, void *arg)
{
    kvx__req *r = req_by_id(ep, arg);
    if (!r || r->closing) return TD_ENOENT;
    if (ep->p.role == KVX_ROLE_RECV)
        rreq_abort(ep, r, TD_ECANCELED, "canceled locally");
    else
        kvx__sreq_finish(ep, r, TD_ECANCELED, "canceled locally", 1);
    return 0;
}

int kvx_cancel(kvx_ep *ep, const char *req_id)
{
    if (!ep || check_id(req_id) < 0) return TD_EINVAL;
    return call(ep, cancel_fn, (void *)req_id);
}
