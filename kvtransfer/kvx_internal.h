/* kvx internals shared by the core and the transports (tcp/, shm/,
 * cuda_ipc/, nccl/). The core, by object: kvx_loop.c (the endpoint, its
 * progress thread, command and event queues, timers), kvx_post.c (the
 * sender's post ring), kvx_req.c (request state machines), kvx_peer.c
 * (peers' control connections), kvx_handshake.c (listen, accept, connect).
 * Everything here runs on the endpoint's progress thread unless a comment
 * says otherwise. */
#ifndef TANDEM_KVTRANSFER_KVX_INTERNAL_H
#define TANDEM_KVTRANSFER_KVX_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#include "kvtransfer/kvx.h"
#include "kvtransfer/kvx_wire.h"

typedef struct kvx__peer kvx__peer;
typedef struct kvx__req kvx__req;
typedef struct kvx__conn kvx__conn;
typedef struct kvx__post kvx__post;
typedef struct kvx__cmd kvx__cmd;

/* Anything registered with the endpoint's epoll. */
typedef void (*kvx__io_fn)(kvx_ep *ep, kvx__conn *c, uint32_t events);
struct kvx__conn {
    int fd;
    uint32_t events; /* current epoll interest */
    kvx__io_fn on_io;
    kvx__peer *peer; /* NULL for the listener, wake fd and pending conns */
    void *tp;        /* transport or core state for this conn */
};

typedef struct kvx__buf {
    uint8_t *data;
    size_t len, cap;
} kvx__buf;

struct kvx__peer {
    int id;
    int dead;    /* failed: reaped at the end of the loop iteration */
    int ev_left; /* 1 while its KVX_EV_PEER_ERROR is reserved and not emitted */
    kvx__conn ctrl;
    kvx__buf in, out;   /* control stream buffers */
    int out_deferred;   /* out holds queued messages not tried yet (kvx__ctrl_queue) */
    int64_t last_rx_ns; /* atomic: last byte received on any of its connections (tcp
                         * readers store it too) */
    int64_t last_hb_ns; /* last heartbeat sent */
    kvx_wire_hello remote;
    uint64_t token; /* receiver: data connections present it */
    char addr[128]; /* sender: the receiver's address */
    void *tp;       /* transport per-peer state */
    kvx__peer *next;
};

/* Sender: one post of kvx_send_layers(), a record in the endpoint's post
 * ring (kvx_post.c) from the call until kvx__post_free. The application
 * thread writes it up to `pairs`; the progress thread owns it afterwards. */
struct kvx__post {
    uint32_t rec_bytes; /* ring record bytes, this header included; multiple of 8 */
    uint32_t rec_flags; /* KVX__REC_* */
    uint64_t hash;      /* of id */
    char id[KVX_REQ_ID_MAX];
    kvx__req *req; /* set when accepted */
    uint32_t layer;
    int n;
    int ev;        /* 1 while it holds an event reservation (its LAYER_SENT) */
    int remaining; /* transport units (tcp: frames) not yet finished */
    void *tp;      /* transport state (tcp: frame array) */
    kvx__post *next;
    kvx_pair pairs[]; /* n */
};
#define KVX__REC_SKIP 1u /* filler up to the end of the ring; only rec_* are valid */
#define KVX__REC_FREE 2u /* released: the tail may pass it */
_Static_assert(sizeof(kvx__post) <= KVX_POST_HDR_BYTES, "post header outgrew its documented size");

/* Receiver: an accepted connection before its HELLO or DATA_HELLO. */
typedef struct kvx__pending {
    kvx__conn c;
    kvx__buf in;
    int64_t t0_ns;
    int closed;
    int ev_left; /* 1 while a KVX_EV_PEER_ERROR (handshake mismatch) is reserved */
    struct kvx__pending *next;
} kvx__pending;

struct kvx__req {
    int used;
    int slot;
    char id[KVX_REQ_ID_MAX];
    uint64_t hash;
    kvx__peer *peer; /* receiver: bound at BEGIN; sender: target */
    int64_t deadline_ns;
    int64_t t0_ns; /* receiver: registration, then BEGIN; sender: kvx_send_begin */
    int closing;   /* final outcome decided, waiting for in-flight work */
    int final_err; /* outcome when closing */
    char final_msg[KVX_ERR_MSG_MAX];
    /* receiver */
    uint32_t *dst; /* registered blocks, n_blocks */
    int n_blocks;
    uint8_t *landed;       /* [n_layers][n_blocks]: 0 none, 1 in progress, 2 landed */
    uint32_t *layer_count; /* [n_layers] blocks landed */
    uint64_t n_landed;
    /* sender */
    int acked;     /* BEGIN_ACK received */
    uint32_t *reg; /* receiver's registered blocks (BEGIN_ACK) */
    int n_reg;
    kvx__post *wait_head, *wait_tail; /* posted, not started yet (before the ack, or this
                                       * loop iteration) */
    int inflight;                     /* posts handed to the transport, not finished */
    int64_t closing_ns;               /* receiver: when a CANCEL was sent awaiting its ack */
    int notify;                       /* sender: tell the receiver (CANCEL) when reaped */
    int ack_cancel;                   /* sender: answer CANCEL_ACK when reaped */
    int kicked;                       /* sender: listed in ep->kick */
    int ev_left;                      /* events reserved for r not emitted yet (receiver:
                                       * its LAYER_LANDED + final; sender: its final) */
};

typedef struct kvx__ops {
    const char *name;
    int cancel_ack; /* work the sender started may still write the receiver's blocks: a
                     * receiver-side cancel waits for the sender's CANCEL_ACK */
    int unix_ctrl;  /* control over AF_UNIX (same host) */
    int own_pool;   /* the receiver's pool must be allocated by the transport */
    /* 1 when runnable here, else 0 and a reason. Any thread. */
    int (*available)(char *why, size_t n);
    /* Optional: endpoint set-up (allocate ep->pool when NULL) / tear-down. */
    int (*ep_init)(kvx_ep *ep);
    void (*ep_fini)(kvx_ep *ep);
    /* Optional: runs first on the progress thread (select the CUDA device). */
    void (*thread_init)(kvx_ep *ep);
    /* Optional, sender, caller thread: fill h->extra before HELLO. */
    int (*hello_extra)(kvx_ep *ep, kvx_wire_hello *h);
    /* Optional, receiver: fill ack->extra, *fd (>= 0: passed with SCM_RIGHTS). */
    int (*ack_extra)(kvx_ep *ep, kvx__peer *p, kvx_wire_hello *ack, int *fd);
    /* Optional, sender, caller thread: after the ACK (p->remote set); fd is the
     * passed descriptor or -1 (ownership moves to the transport). */
    int (*peer_attach)(kvx_ep *ep, kvx__peer *p, int fd);
    /* Optional: the peer joined the progress thread. */
    int (*peer_start)(kvx_ep *ep, kvx__peer *p);
    /* Optional: close the transport's connections of p and drop its queued
     * work (any thread that owns p). Memory that epoll events may still
     * point to stays until peer_free. */
    void (*peer_close)(kvx_ep *ep, kvx__peer *p);
    /* Optional: free transport peer state (after the loop iteration). */
    void (*peer_free)(kvx_ep *ep, kvx__peer *p);
    /* Optional, receiver: a data connection (tcp) for p; owns fd on success. */
    int (*data_conn)(kvx_ep *ep, kvx__peer *p, int fd, uint32_t index);
    /* Sender: start moving a post (validated against the ack). */
    int (*send_post)(kvx_ep *ep, kvx__peer *p, kvx__post *post);
    /* Optional, sender: drop work of r not started yet. */
    void (*sreq_abort)(kvx_ep *ep, kvx__req *r);
    /* Optional, receiver: r ends; stop writing its blocks now. */
    void (*rreq_release)(kvx_ep *ep, kvx__req *r);
    /* Optional, receiver: a POST for r (nccl launches receives). NULL: the
     * data is already there (direct write) and the core marks it landed. */
    int (*recv_post)(kvx_ep *ep, kvx__peer *p, kvx__req *r, uint32_t layer, const kvx_pair *pairs,
                     int n);
    /* Optional: a transport control message (nccl COMM_OPEN / COMM_CLOSE). */
    int (*ctrl_msg)(kvx_ep *ep, kvx__peer *p, uint16_t type, const uint8_t *body, uint32_t len);
    /* Optional: poll asynchronous work; returns 1 while work is outstanding. */
    int (*progress)(kvx_ep *ep);
    /* Optional: transport counters. */
    void (*stats)(kvx_ep *ep, kvx_stats *st);
} kvx__ops;

struct kvx_ep {
    kvx_params p;
    char transport[16];
    const kvx__ops *ops;
    void *pool;     /* local pool, pool_bytes */
    int pool_owned; /* transport allocated it */
    size_t pool_bytes;
    size_t block_bytes; /* one block of one layer */
    void *tp;           /* transport per-endpoint state */
    int epfd;
    kvx__conn wake;   /* eventfd: commands pending */
    kvx__conn listen; /* fd -1 when not listening */
    char listen_path[108];
    int ev_fd; /* eventfd: events pending (application side) */
    pthread_t thread;
    int thread_started;
    int stopping;
    /* Held by the progress thread while it works (everything but epoll_wait
     * and reaping peers). Transport I/O threads (tcp's per-connection
     * readers) take it to touch requests, leases and events; nothing else
     * needs it. Order: loop_mu before any transport lock, ev_mu last. */
    pthread_mutex_t loop_mu;
    /* command queue (application -> progress) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    kvx__cmd *cmd_head, *cmd_tail;
    /* event queue (progress -> application). Every event has a slot reserved
     * before the work that produces it is accepted (ev_count + ev_promised <=
     * ev_cap), so emitting never allocates and never drops one. */
    pthread_mutex_t ev_mu;
    kvx_event *evs;
    int ev_head, ev_count, ev_cap;
    int ev_promised; /* reserved slots not yet filled */
    /* sender: the post ring (kvx_post.c). Byte counters only grow; a record
     * starts at counter % ring_cap. [ring_tail, ring_read) is owned by the
     * progress thread, [ring_read, ring_head) is published and not read yet,
     * [ring_head, ring_tail + ring_cap) is free for producers. */
    uint8_t *ring;
    size_t ring_cap;         /* bytes, multiple of 8 */
    pthread_mutex_t ring_mu; /* producers (application threads) */
    uint64_t ring_head;      /* atomic: published (producers, under ring_mu) */
    uint64_t ring_tail;      /* atomic: released (progress thread) */
    uint64_t ring_read;      /* progress thread: consumed */
    int ring_signalled;      /* atomic: a wake is on its way (producers set, progress clears) */
    /* progress-thread state */
    kvx__peer *peers;
    int next_peer_id;
    struct kvx__pending *pending; /* accepted connections before their hello */
    kvx__req *reqs;               /* max_reqs slots */
    int max_reqs;
    int reqs_hi;         /* slots [reqs_hi, max_reqs) have never been used: scans stop here */
    int32_t *owner;      /* receiver: [num_blocks] slot leasing the block, -1 free */
    uint32_t *owner_pos; /* receiver: [num_blocks] index in that request's dst */
    int *kick;           /* sender: slots with new posts to start, n_kick of them */
    int n_kick;
    int64_t tick_ns;
    /* counters (atomics) */
    kvx_stats st;
};

/* Address of (layer, block) in a pool laid out like ep's. */
static inline uint8_t *kvx__block_ptr(const kvx_ep *ep, void *base, uint32_t layer, uint32_t block)
{
    return (uint8_t *)base + kv_layout_block_offset(&ep->p.layout, layer, block);
}

#define KVX__MAX_REQS 4096 /* open requests per endpoint */

static inline void kvx__copy_id(char *dst, const char *src)
{
    snprintf(dst, KVX_REQ_ID_MAX, "%s", src);
}

/* ---- kvx_loop.c ---- */

/* Any application thread: runs fn(ep, arg) on the progress thread and waits
 * for its result (TD_ECLOSED once the endpoint stops). */
int kvx__call(kvx_ep *ep, int (*fn)(kvx_ep *, void *), void *arg);
/* Queues an event for the application (kvx_ep_poll). */
void kvx__emit_ex(kvx_ep *ep, enum kvx_event_type type, const char *req_id, int layer, int peer,
                  int err, const char *msg, int64_t elapsed_ns);
void kvx__emit(kvx_ep *ep, enum kvx_event_type type, const char *req_id, int layer, int peer,
               int err, const char *msg);
/* Reserves k event slots (each emit fills one). grow: the queue may grow (not
 * on the hot path), keeping `room` more slots free besides. Returns 0,
 * TD_EAGAIN (no room, grow 0) or TD_ENOMEM. Any thread. */
int kvx__ev_reserve(kvx_ep *ep, int k, int grow, int room);
/* Gives back k reserved slots that will not be filled. Any thread. */
void kvx__ev_release(kvx_ep *ep, int k);

/* ---- kvx_mem.c ---- */

/* A pool the transport owns: anonymous memory, huge pages advised, every
 * page touched once (no faults during transfers). Any thread. */
int kvx__pool_map(size_t bytes, void **out);
void kvx__pool_unmap(void *pool, size_t bytes);
/* memcpy, with streaming stores (and a fence) for large runs: for data the
 * copying core does not read again; 32-byte stores where the CPU has AVX.
 * Any thread. */
void kvx__copy(void *dst, const void *src, size_t n);
/* The streaming copy at any length: 32-byte stores (wide, AVX hosts only)
 * or 16-byte ones. For tests; kvx__copy picks. */
void kvx__copy_stream(void *dst, const void *src, size_t n, int wide);

/* ---- kvx_post.c ---- */

/* Sizes and allocates the post ring of a sender (endpoint creation). */
int kvx__ring_init(kvx_ep *ep);
void kvx__ring_fini(kvx_ep *ep);
/* Progress thread: hands every published post to kvx__post_accept. */
void kvx__posts_drain(kvx_ep *ep);
/* Progress thread: releases a post's record (and its event reservation). */
void kvx__post_free(kvx_ep *ep, kvx__post *post);

/* epoll helpers. */
int kvx__conn_add(kvx_ep *ep, kvx__conn *c, uint32_t events);
int kvx__conn_mod(kvx_ep *ep, kvx__conn *c, uint32_t events);
void kvx__conn_del(kvx_ep *ep, kvx__conn *c);
int kvx__set_nonblock(int fd);

/* Connects a blocking stream socket to addr (inet or unix per transport) with
 * send/receive timeouts of timeout_ns. Any thread. */
int kvx__dial(const kvx_ep *ep, const char *addr, int64_t timeout_ns, int *out_fd);

/* ---- kvx_peer.c ---- */

/* Grows b to hold extra more bytes. */
int kvx__buf_reserve(kvx__buf *b, size_t extra);
/* A peer on control connection fd (progress thread: takes the next id). */
kvx__peer *kvx__peer_new(kvx_ep *ep, int fd);
/* epoll callback of a peer's control connection. */
void kvx__peer_on_ctrl(kvx_ep *ep, kvx__conn *c, uint32_t events);
/* Frees a peer that is off the list (transport state, buffers). */
void kvx__peer_free(kvx_ep *ep, kvx__peer *p);

/* Marks p dead (closes it at the end of the iteration), fails its requests
 * and reports a KVX_EV_PEER_ERROR. */
void kvx__peer_fail(kvx_ep *ep, kvx__peer *p, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Frees the peers marked dead (end of a loop iteration, or destroy). */
void kvx__reap_peers(kvx_ep *ep);
/* The same in two steps: the dead peers leave the list (under loop_mu, so a
 * peer a transport thread is failing right now is not taken half-failed),
 * then they are freed (outside loop_mu: freeing joins transport threads,
 * which may be waiting for it). */
kvx__peer *kvx__peers_take_dead(kvx_ep *ep);
void kvx__peers_free(kvx_ep *ep, kvx__peer *dead);
kvx__peer *kvx__peer_by_id(kvx_ep *ep, int id);

/* ---- kvx_handshake.c ---- */

/* Closes a pending connection (freed by the timers). */
void kvx__pending_close(kvx_ep *ep, kvx__pending *pd);

/* ---- kvx_req.c ---- */

/* A control message from p (after the header was validated). */
void kvx__handle_msg(kvx_ep *ep, kvx__peer *p, uint16_t type, const uint8_t *body, uint32_t len);
/* Sends a kvx_wire_req message about one request. */
int kvx__send_req_msg(kvx_ep *ep, kvx__peer *p, uint16_t type, uint64_t hash, int err);
/* Frees a request slot's memory (no event). */
void kvx__req_free(kvx_ep *ep, kvx__req *r);
/* Sender: a post read from the ring: queue it on its request, or drop or
 * reject it (kvx_send_layers' contract). */
void kvx__post_accept(kvx_ep *ep, kvx__post *post);
/* Receiver, local decision to stop (cancel, deadline): FAILED at once, or
 * CLOSING until the direct writer confirms it stopped. */
void kvx__rreq_abort(kvx_ep *ep, kvx__req *r, int err, const char *msg);
/* Sender: starts the posts queued since the last loop iteration. */
void kvx__kick_posts(kvx_ep *ep);

/* Receiver: frame/notice for (layer, dst) of the request with hash from p.
 * Returns the request when the block may be written now (marks it in
 * progress), NULL when the data must be discarded (unknown or closed request:
 * *bad = 0; a protocol violation: *bad = 1, the request was failed). */
kvx__req *kvx__rreq_claim(kvx_ep *ep, kvx__peer *p, uint64_t hash, uint32_t layer, uint32_t dst,
                          int *bad);
/* Receiver: the claimed block has fully landed. */
void kvx__rreq_land(kvx_ep *ep, kvx__req *r, uint32_t layer, uint32_t dst);
/* Receiver: ends r with err (0 = done). */
void kvx__rreq_finish(kvx_ep *ep, kvx__req *r, int err, const char *msg);
/* Sender: a post finished (all its data left or was dropped). Frees it. */
void kvx__post_done(kvx_ep *ep, kvx__post *post);
/* Sender: ends r with err (0 = confirmed by the receiver). */
void kvx__sreq_finish(kvx_ep *ep, kvx__req *r, int err, const char *msg, int notify_peer);

/* Queues a control message to p (header + body parts) and tries to flush. */
int kvx__ctrl_send(kvx_ep *ep, kvx__peer *p, uint16_t type, const void *a, size_t alen,
                   const void *b, size_t blen);

/* Queues a control message to p without writing it yet: the progress thread
 * writes every peer's queued messages once per loop iteration, before it
 * sleeps (kvx__flush_peers), so n notices cost one syscall, not n. A later
 * kvx__ctrl_send to p writes them first, in order. */
int kvx__ctrl_queue(kvx_ep *ep, kvx__peer *p, uint16_t type, const void *a, size_t alen,
                    const void *b, size_t blen);
void kvx__flush_peers(kvx_ep *ep);
/* Writes what is queued to p now (what does not fit the socket waits for
 * EPOLLOUT, as ever); a failed write fails p. Returns 0, or TD_ECONNRESET
 * when p is dead or the write failed. */
int kvx__ctrl_flush_now(kvx_ep *ep, kvx__peer *p);

/* Counters. */
static inline void kvx__stat_add(uint64_t *ctr, uint64_t v)
{
    __atomic_fetch_add(ctr, v, __ATOMIC_RELAXED);
}

/* Transport tables (the ones built are listed in kvx_transports.c). */
extern const kvx__ops kvx__tcp_ops;
extern const kvx__ops kvx__shm_ops;
extern const kvx__ops kvx__cuda_ipc_ops;
extern const kvx__ops kvx__nccl_ops;
const kvx__ops *kvx__ops_find(const char *name);

#endif
