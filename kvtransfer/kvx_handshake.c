/* kvx handshake: listening and accepting (receiver), dialing and
 * kvx_connect (sender), and the HELLO / HELLO_ACK / HELLO_NAK exchange that
 * turns a connection into a peer (kvx_peer.c), or a tcp data connection
 * into one of a peer's (DATA_HELLO).
 *
 * Receiver: an accepted connection is pending (kvx__pending, reaped by the
 * timers) until its first message: a HELLO that matches becomes a peer, one
 * that does not gets HELLO_NAK and a KVX_EV_PEER_ERROR naming the field; a
 * DATA_HELLO with a known token goes to that peer's transport; anything else
 * is closed. Sender: kvx_connect runs the exchange on the caller's thread
 * with blocking sockets bounded by the stall timeout, then hands the peer to
 * the progress thread. */
#include "kvtransfer/kvx.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx_internal.h"

#define MOD "kvx"

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

void kvx__pending_close(kvx_ep *ep, kvx__pending *pd)
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
        pd->ev_left = 0; /* reserved at accept */
        kvx__emit(ep, KVX_EV_PEER_ERROR, NULL, -1, -1, TD_EMISMATCH, msg);
        kvx__pending_close(ep, pd);
        return;
    }
    int fd = pd->c.fd;
    kvx__conn_del(ep, &pd->c);
    pd->c.fd = -1;
    kvx__pending_close(ep, pd);
    kvx__peer *p = kvx__peer_new(ep, fd);
    if (!p) {
        close(fd);
        return;
    }
    p->ev_left = pd->ev_left; /* its PEER_ERROR, reserved at accept */
    pd->ev_left = 0;
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
        if (kvx__buf_reserve(&pd->in, 512) < 0) {
            kvx__pending_close(ep, pd);
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
                kvx__pending_close(ep, pd);
                return;
            }
            want = sizeof(h) + h.len;
            if (pd->in.len == want) {
                if (h.type == KVX_MSG_HELLO) {
                    kvx_wire_hello hello;
                    if (kvx_wire_hello_decode(pd->in.data + sizeof(h), h.len, &hello) < 0) {
                        td_log_warn(MOD, "bad_hello", "extra_len=%u", hello.extra_len);
                        kvx__stat_add(&ep->st.frames_rejected, 1);
                        kvx__pending_close(ep, pd);
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
                    kvx__pending_close(ep, pd);
                    return;
                }
                int fd = pd->c.fd;
                kvx__conn_del(ep, &pd->c);
                pd->c.fd = -1;
                kvx__pending_close(ep, pd);
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
            kvx__pending_close(ep, pd);
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
        /* Room for the PEER_ERROR this connection may end with. */
        if (!pd || kvx__ev_reserve(ep, 1, 1, 0) < 0) {
            free(pd);
            close(fd);
            continue;
        }
        pd->ev_left = 1;
        pd->c.fd = fd;
        pd->c.on_io = on_pending;
        pd->c.tp = pd;
        pd->t0_ns = td_now_ns();
        if (kvx__conn_add(ep, &pd->c, EPOLLIN) < 0) {
            kvx__ev_release(ep, pd->ev_left);
            close(fd);
            free(pd);
            continue;
        }
        pd->next = ep->pending;
        ep->pending = pd;
    }
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
    rc = kvx__call(ep, listen_fn, &a);
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
    __atomic_store_n(&p->last_rx_ns, td_now_ns(), __ATOMIC_RELAXED);
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
    /* Room for the PEER_ERROR of a mismatch now, or of the peer later. */
    if ((rc = kvx__ev_reserve(ep, 1, 1, 0)) < 0) return rc;
    int ev_held = 1;
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
    p->id = kvx__call(ep, alloc_peer_id_fn, NULL);
    p->ctrl.fd = fd;
    p->ctrl.on_io = kvx__peer_on_ctrl;
    p->ctrl.peer = p;
    p->token = p->remote.token;
    snprintf(p->addr, sizeof(p->addr), "%s", addr);
    if (ep->ops->peer_attach) {
        rc = ep->ops->peer_attach(ep, p, pass_fd);
        pass_fd = -1; /* the transport owns it now */
        if (rc < 0) goto fail;
    }
    fd = -1; /* owned by p */
    p->ev_left = 1;
    ev_held = 0;
    rc = kvx__call(ep, add_peer_fn, p);
    if (rc < 0) return rc; /* p was failed and is reaped by the progress thread */
    *peer = rc;
    td_log_info(MOD, "peer_connected", "peer=%d addr=%s transport=%s", rc, addr, ep->transport);
    return 0;
fail:
    if (p) {
        if (ep->ops->peer_close && p->tp) ep->ops->peer_close(ep, p);
        kvx__peer_free(ep, p);
    }
    if (pass_fd >= 0) close(pass_fd);
    if (fd >= 0) close(fd);
    if (rc == TD_EMISMATCH) {
        ev_held = 0;
        kvx__emit(ep, KVX_EV_PEER_ERROR, NULL, -1, -1, rc, msg);
    }
    if (ev_held) kvx__ev_release(ep, 1);
    return rc;
}
