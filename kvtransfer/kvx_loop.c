/* kvx event loop: the endpoint object, its progress thread, the command
 * queue (application -> progress), the event queue (progress -> application)
 * and the timers. Peers live in kvx_peer.c and kvx_handshake.c, requests in
 * kvx_req.c, the batched post ring in kvx_post.c; transports plug in through
 * kvx__ops (kvx_internal.h).
 *
 * One iteration of the progress thread:
 *   epoll_wait (0 while a transport has device work, else up to one tick)
 *   -> posts published in the post ring are accepted (kvx_post.c)
 *   -> I/O callbacks (sockets, the wake eventfd: commands)
 *   -> posts published meanwhile are accepted; accepted posts start
 *   -> transport progress (device events)
 *   -> timers (heartbeats, stalls, deadlines) once per tick
 *   -> dead peers reaped (never inside their own callbacks)
 */
#include "kvtransfer/kvx.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD "kvx"

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

/* ---------- events (progress -> application) ---------- */

/* Under ev_mu: makes the queue hold at least cap slots. */
static int ev_grow(kvx_ep *ep, int cap)
{
    if (cap <= ep->ev_cap) return 0;
    int c = ep->ev_cap;
    while (c < cap)
        c *= 2;
    kvx_event *n = malloc(sizeof(*n) * (size_t)c);
    if (!n) return TD_ENOMEM;
    for (int i = 0; i < ep->ev_count; i++)
        n[i] = ep->evs[(ep->ev_head + i) % ep->ev_cap];
    free(ep->evs);
    ep->evs = n;
    ep->ev_head = 0;
    ep->ev_cap = c;
    return 0;
}

int kvx__ev_reserve(kvx_ep *ep, int k, int grow, int room)
{
    pthread_mutex_lock(&ep->ev_mu);
    int used = ep->ev_count + ep->ev_promised;
    int rc = 0;
    if (used + k + (grow ? room : 0) > ep->ev_cap)
        rc = grow ? ev_grow(ep, used + k + room) : TD_EAGAIN;
    if (rc == 0) ep->ev_promised += k;
    pthread_mutex_unlock(&ep->ev_mu);
    return rc;
}

void kvx__ev_release(kvx_ep *ep, int k)
{
    if (k <= 0) return;
    pthread_mutex_lock(&ep->ev_mu);
    assert(ep->ev_promised >= k);
    ep->ev_promised -= k;
    pthread_mutex_unlock(&ep->ev_mu);
}

void kvx__emit_ex(kvx_ep *ep, enum kvx_event_type type, const char *req_id, int layer, int peer,
                  int err, const char *msg, int64_t elapsed_ns)
{
    pthread_mutex_lock(&ep->ev_mu);
    /* The slot was reserved when the work that produces this event was
     * accepted: there is room, and nothing is allocated here. */
    assert(ep->ev_promised > 0 && ep->ev_count < ep->ev_cap);
    if (ep->ev_promised > 0) ep->ev_promised--;
    if (ep->ev_count == ep->ev_cap) {
        pthread_mutex_unlock(&ep->ev_mu);
        td_log_error(MOD, "event_not_reserved", "type=%d req=%s", (int)type, req_id ? req_id : "");
        return;
    }
    kvx_event *e = &ep->evs[(ep->ev_head + ep->ev_count) % ep->ev_cap];
    memset(e, 0, sizeof(*e));
    e->type = type;
    if (req_id) kvx__copy_id(e->req_id, req_id);
    e->layer = layer;
    e->peer = peer;
    e->err = err;
    e->elapsed_ns = elapsed_ns;
    if (msg) snprintf(e->msg, sizeof(e->msg), "%s", msg);
    /* The eventfd is written when the queue stops being empty only:
     * kvx_ep_poll drains it (under ev_mu) when it empties the queue, so it is
     * readable whenever events are pending, at one syscall per burst of
     * events rather than one per event. */
    int wake = ep->ev_count++ == 0;
    pthread_mutex_unlock(&ep->ev_mu);
    uint64_t one = 1;
    if (wake && write(ep->ev_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        td_log_warn(MOD, "event_fd_write_failed", "errno=%d", errno);
}

void kvx__emit(kvx_ep *ep, enum kvx_event_type type, const char *req_id, int layer, int peer,
               int err, const char *msg)
{
    kvx__emit_ex(ep, type, req_id, layer, peer, err, msg, 0);
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
    out->posts_refused = __atomic_load_n(&s->posts_refused, __ATOMIC_RELAXED);
}

/* ---------- commands (application -> progress) ---------- */

int kvx__call(kvx_ep *ep, int (*fn)(kvx_ep *, void *), void *arg)
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
    /* Posts published before these commands were queued go first: a
     * thread's kvx_send_layers and its later calls keep their order. The
     * ring is read after the list is taken, so it holds every post made
     * before any of these commands. */
    kvx__posts_drain(ep);
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

/* ---------- timers ---------- */

static void timers(kvx_ep *ep, int64_t now)
{
    int64_t stall = ep->p.stall_timeout_ns;
    for (kvx__peer *p = ep->peers; p; p = p->next) {
        if (p->dead) continue;
        int64_t last_rx = __atomic_load_n(&p->last_rx_ns, __ATOMIC_RELAXED);
        if (now - last_rx > stall) {
            kvx__peer_fail(ep, p, TD_ETIMEDOUT, "peer silent for %lld ms",
                           (long long)((now - last_rx) / TD_NS_PER_MS));
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
                kvx__rreq_abort(ep, r, TD_ETIMEDOUT, "request deadline exceeded");
            else
                kvx__sreq_finish(ep, r, TD_ETIMEDOUT, "request deadline exceeded", 1);
        }
    }
    kvx__pending **pp = &ep->pending;
    while (*pp) {
        kvx__pending *pd = *pp;
        if (!pd->closed && now - pd->t0_ns > stall) {
            td_log_warn(MOD, "handshake_timeout", NULL);
            kvx__pending_close(ep, pd);
        }
        if (pd->closed) {
            *pp = pd->next;
            kvx__ev_release(ep, pd->ev_left);
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
    pthread_setname_np(pthread_self(), ep->p.role == KVX_ROLE_SEND ? "kvx-send" : "kvx-recv");
    if (ep->ops->thread_init) ep->ops->thread_init(ep);
    while (!ep->stopping) {
        int n = epoll_wait(ep->epfd, evs, 64, busy ? 0 : (int)(ep->tick_ns / TD_NS_PER_MS));
        if (n < 0 && errno != EINTR) {
            td_log_error(MOD, "epoll_failed", "errno=%d", errno);
            break;
        }
        pthread_mutex_lock(&ep->loop_mu);
        /* Posts published before this wake-up go before the messages that
         * arrived with it (a CANCEL from the peer, say). */
        kvx__posts_drain(ep);
        for (int i = 0; i < n; i++) {
            kvx__conn *c = evs[i].data.ptr;
            c->on_io(ep, c, evs[i].events);
        }
        kvx__posts_drain(ep);
        kvx__kick_posts(ep);
        busy = ep->ops->progress ? ep->ops->progress(ep) : 0;
        int64_t now = td_now_ns();
        if (now >= next_tick) {
            timers(ep, now);
            next_tick = now + ep->tick_ns;
        }
        /* Before sleeping: notices queued during this iteration go out in
         * one write per peer. */
        kvx__flush_peers(ep);
        /* A tcp reader may fail its peer (a control write failing while it
         * lands a block) under loop_mu: dead peers are taken off the list
         * under it, and freed outside it, since freeing a peer joins its
         * transport threads, which may be waiting for loop_mu. */
        kvx__peer *dead = kvx__peers_take_dead(ep);
        pthread_mutex_unlock(&ep->loop_mu);
        kvx__peers_free(ep, dead);
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
    pthread_mutex_init(&ep->loop_mu, NULL);
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
    if ((rc = kvx__ring_init(ep)) < 0) goto fail;
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
        kvx__call(ep, stop_fn, NULL);
        pthread_join(ep->thread, NULL);
    }
    pthread_mutex_lock(&ep->mu);
    ep->stopping = 1;
    pthread_mutex_unlock(&ep->mu);
    /* The thread is gone: tear down on this one. Requests end without events
     * (nobody is left to read them). Transport I/O threads (tcp readers) may
     * still be running until the peers are reaped: they look at peers and
     * requests under loop_mu, so the peers die under it too, and the reap
     * (which joins them) runs outside it. */
    pthread_mutex_lock(&ep->loop_mu);
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
    pthread_mutex_unlock(&ep->loop_mu);
    kvx__reap_peers(ep);
    for (int i = 0; ep->reqs && i < ep->reqs_hi; i++)
        if (ep->reqs[i].used) {
            kvx__req *r = &ep->reqs[i];
            while (r->wait_head) {
                kvx__post *p = r->wait_head;
                r->wait_head = p->next;
                kvx__post_free(ep, p);
            }
            kvx__req_free(ep, r);
        }
    while (ep->pending) {
        kvx__pending *pd = ep->pending;
        ep->pending = pd->next;
        if (!pd->closed && pd->c.fd >= 0) close(pd->c.fd);
        kvx__ev_release(ep, pd->ev_left);
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
    /* Every reservation was filled or given back: requests, peers, pending
     * connections and posts are all gone (a leak here would have grown the
     * queue for nothing while the endpoint ran). */
    assert(ep->ev_promised == 0);
    pthread_mutex_destroy(&ep->mu);
    pthread_cond_destroy(&ep->cv);
    pthread_mutex_destroy(&ep->ev_mu);
    pthread_mutex_destroy(&ep->loop_mu);
    free(ep->reqs);
    free(ep->evs);
    free(ep->owner);
    free(ep->owner_pos);
    free(ep->kick);
    kvx__ring_fini(ep);
    free(ep);
}
