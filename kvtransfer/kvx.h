/* kvx: paged KV block transfer between a prefill (sender) and a decode
 * (receiver) worker.
 *
 * A transfer moves blocks of bytes described by (layer, source block,
 * destination block) between two pools laid out as common/kv_layout.h
 * says. The receiver registers a request (id minted by the router) with its
 * destination block ids; the sender posts work layer by layer as layers finish;
 * the receiver learns when each layer and the whole request have landed.
 *
 * Transports (chosen by name at run time, see kvx_transport_available):
 *   "tcp"      across hosts; scatter/gather straight from/to block memory.
 *   "shm"      same host, CPU: the receiver's pool is a memfd the sender maps.
 *   "cuda_ipc" same host, GPU: the receiver's pool is GPU memory shared by a
 *              CUDA IPC handle (built when CUDA is found).
 *   "nccl"     GPU to GPU across hosts (built when NCCL is found).
 *
 * Threading contract. Each endpoint owns one progress thread that does all
 * socket and device I/O, except that "tcp" gives each data connection a
 * writer thread (sender) or a reader thread (receiver) of its own, which
 * moves frame bytes only: requests, leases and events stay with the
 * progress thread. The kvx_* calls below may be made from any
 * application thread; each one hands a command to the progress thread and
 * waits for its answer (microseconds), so they never race with transfers.
 * The exception is kvx_send_layers, the sender's hot path: it copies its
 * posts into a ring preallocated with the endpoint, wakes the progress thread
 * once and returns without waiting for it (errors that depend on the
 * request's state come back as events, see there).
 * Results come back as events: kvx_ep_poll() drains them without blocking, and
 * kvx_ep_event_fd() is readable (an eventfd) whenever events are pending, so an
 * event loop can wait on it. No callback ever runs on the progress thread.
 *
 * Ownership of blocks (the lease). From a successful kvx_recv_register() until
 * that request's final event (KVX_EV_DONE or KVX_EV_FAILED), the destination
 * blocks belong to the transfer: the application must not reuse them. The
 * final event returns them: after it nothing writes them any more. On the
 * sender, the source blocks named in kvx_send_layer() must stay unchanged
 * until KVX_EV_LAYER_SENT for that layer (or the final event).
 *
 * A request is complete only when every registered block of every layer has
 * landed exactly once; anything less ends in KVX_EV_FAILED (peer died, stalled,
 * cancel, deadline, protocol error). Partial KV is never reported as done.
 */
#ifndef TANDEM_KVTRANSFER_KVX_H
#define TANDEM_KVTRANSFER_KVX_H

#include <stddef.h>
#include <stdint.h>

#include "common/kv_layout.h"

#define KVX_REQ_ID_MAX  64  /* request id bytes, including the NUL */
#define KVX_ERR_MSG_MAX 192 /* event message bytes, including the NUL */

typedef struct kvx_ep kvx_ep;

enum kvx_role {
    KVX_ROLE_RECV = 0, /* decode side: listens, owns destination blocks */
    KVX_ROLE_SEND = 1, /* prefill side: connects, owns source blocks */
};

typedef struct kvx_params {
    const char *transport; /* "tcp", "shm", "cuda_ipc" or "nccl"; copied */
    enum kvx_role role;
    uint64_t model_fingerprint; /* checked in the handshake */
    kv_layout layout;           /* of the local pool; checked in the handshake */
    /* Local pool, kv_layout_pool_bytes(&layout) bytes. NULL: the transport
     * allocates it (shm: a memfd; cuda_ipc/nccl: device memory; tcp: host
     * memory) and kvx_ep_pool() returns it. shm and cuda_ipc receivers
     * require NULL (the pool must be shareable). Non-NULL: caller-owned, must
     * outlive the endpoint. */
    void *pool;
    int n_data_conns;         /* tcp: data connections per peer (0 = 2) */
    int64_t stall_timeout_ns; /* peer silent this long = dead (0 = 1.5 s) */
    int max_comms;            /* nccl: communicators kept at once (0 = 4) */
    int64_t comm_idle_ns;     /* nccl: idle communicator torn down (0 = 30 s) */
    int cuda_device;          /* cuda_ipc / nccl: device ordinal */
    /* Sender: bytes of the post ring behind kvx_send_layers (allocated once,
     * with the endpoint). A post takes KVX_POST_HDR_BYTES + 8 * n bytes from
     * the call until its KVX_EV_LAYER_SENT (or until it is dropped). 0 = room
     * for every block of the pool posted once in every layer, one post per
     * 4 blocks: n_layers * num_blocks * (8 + KVX_POST_HDR_BYTES / 4), clamped
     * to [4 MiB, 64 MiB]. Set: rounded up to 8 bytes, at least 4 KiB. */
    size_t post_ring_bytes;
} kvx_params;

enum kvx_event_type {
    KVX_EV_LAYER_LANDED = 1,  /* receiver: every block of `layer` has landed */
    KVX_EV_LAYER_SENT = 2,    /* sender: one post (kvx_send_layers/kvx_send_layer) of
                               * `layer` left; its source blocks may be reused */
    KVX_EV_DONE = 3,          /* both: whole request landed (sender: confirmed) */
    KVX_EV_FAILED = 4,        /* both: request ended without completing; err says why */
    KVX_EV_PEER_ERROR = 5,    /* a peer connection failed or was rejected; peer, err, msg */
    KVX_EV_POST_REJECTED = 6, /* sender: a kvx_send_layers() post named no open request
                               * (never begun, or its final event already emitted);
                               * req_id, layer, err = TD_ENOENT. Nothing was sent. Not a
                               * final event: it ends nothing. */
};

typedef struct kvx_event {
    enum kvx_event_type type;
    char req_id[KVX_REQ_ID_MAX]; /* empty for KVX_EV_PEER_ERROR */
    int layer;                   /* LAYER_* events; -1 otherwise */
    int peer;                    /* peer id, or -1 when unknown */
    int err;                     /* TD_E* code for FAILED / PEER_ERROR, else 0 */
    char msg[KVX_ERR_MSG_MAX];   /* human-readable detail, may be empty */
    int64_t elapsed_ns;          /* DONE/FAILED: transfer time (receiver: since BEGIN
                                  * arrived, or since registration when it never did;
                                  * sender: since kvx_send_begin), else 0 */
} kvx_event;

/* One block copy within a layer: source block id (sender pool) to destination
 * block id (receiver pool). */
typedef struct kvx_pair {
    uint32_t src;
    uint32_t dst;
} kvx_pair;

/* Statistics of an endpoint (for metrics). */
typedef struct kvx_stats {
    uint64_t bytes_sent;     /* payload bytes */
    uint64_t bytes_received; /* payload bytes landed */
    uint64_t requests_done;
    uint64_t requests_failed;
    uint64_t frames_rejected; /* bad frames from the wire */
    int peers;                /* live peers */
    int comms;                /* nccl: live communicators */
    uint64_t comm_bytes;      /* nccl: device memory held by communicators */
    uint64_t posts_refused;   /* kvx_send_layers calls answered TD_EAGAIN */
} kvx_stats;

/* One post of kvx_send_layers: `n` block copies of layer `layer` of request
 * req_id. Every pointer is read during the call only (the pairs are copied). */
typedef struct kvx_layer_post {
    const char *req_id;    /* opened with kvx_send_begin, 1..KVX_REQ_ID_MAX-1 bytes */
    int layer;             /* 0 .. layout.n_layers - 1 */
    const kvx_pair *pairs; /* n pairs; src < local num_blocks */
    int n;                 /* 1 .. KVX_POST_MAX_PAIRS */
} kvx_layer_post;

#define KVX_POST_HDR_BYTES 128    /* post ring bytes per post, besides 8 per pair */
#define KVX_POST_MAX_PAIRS 131064 /* pairs in one post (one POST message on the wire) */

/* 1 when the named transport is compiled in and can run here (cuda_ipc and
 * nccl need a device), else 0; `why` (may be NULL) receives the reason. */
int kvx_transport_available(const char *name, char *why, size_t why_len);

/* Creates an endpoint and starts its progress thread. params is copied.
 * Returns 0 and *out, or TD_EINVAL (bad params), TD_EUNSUPPORTED (transport
 * not built), TD_ENODEV (no GPU for a GPU transport), TD_ENOMEM. */
int kvx_ep_create(const kvx_params *params, kvx_ep **out);

/* Stops the progress thread, fails every open request (their final events are
 * dropped with the endpoint), closes peers and frees the pool if the endpoint
 * allocated it. Accepts NULL. */
void kvx_ep_destroy(kvx_ep *ep);

/* The local pool (caller's or the transport's; device memory for GPU
 * transports). Owned by the endpoint when it allocated it. */
void *kvx_ep_pool(kvx_ep *ep);

/* Receiver: listens. tcp/nccl: addr "127.0.0.1:0" style (port 0 = any; the
 * bound address is written to bound, which may be NULL). shm/cuda_ipc: a unix
 * socket path. Returns 0 or a TD_E* code. */
int kvx_listen(kvx_ep *ep, const char *addr, char *bound, size_t bound_len);

/* Sender: connects to a receiver and runs the handshake (blocking, bounded by
 * the stall timeout). On success *peer is the peer id. On TD_EMISMATCH msg
 * names the field and both values (msg may be NULL). */
int kvx_connect(kvx_ep *ep, const char *addr, int *peer, char *msg, size_t msg_len);

/* Receiver: registers request req_id (copied) with its destination block ids
 * (copied; each < layout.num_blocks, no duplicates, none leased by another
 * open request). Every layer of the layout is expected for every block.
 * deadline_ns: absolute td_now_ns() deadline, 0 for none. Returns 0, or
 * TD_EINVAL, TD_EEXIST (id already open, or a block already leased), TD_ERANGE
 * (more than 262138 blocks), TD_ENOSPC (4096 requests open), TD_ENOMEM (no
 * memory for its state or for its n_layers + 1 events). */
int kvx_recv_register(kvx_ep *ep, const char *req_id, const uint32_t *dst_blocks, int n_blocks,
                      int64_t deadline_ns);

/* One request of kvx_recv_register_batch: kvx_recv_register's arguments. */
typedef struct kvx_recv_reg {
    const char *req_id;
    const uint32_t *dst_blocks;
    int n_blocks;
    int64_t deadline_ns;
} kvx_recv_reg;

/* Receiver: registers n requests (1..4096) in one round trip to the progress
 * thread instead of n (a decode worker admitting a burst, a batch of
 * prefills). Each is registered or refused on its own, in order, exactly as
 * kvx_recv_register would have done it at that point (an id or a block named
 * by an earlier entry is taken); rcs[i] (caller-owned, n entries) receives
 * entry i's result. Returns the number registered, or a negative code and
 * then registers nothing: TD_EINVAL when ep, regs or rcs is NULL, ep is not a
 * receiver or n is out of range; TD_ECLOSED while the endpoint is being
 * destroyed. */
int kvx_recv_register_batch(kvx_ep *ep, const kvx_recv_reg *regs, int n, int *rcs);

/* Sender: opens request req_id towards peer (sends BEGIN; the receiver
 * answers with its registered blocks, or fails the request with TD_ENOENT
 * when it has not registered it). deadline as above. Returns 0, TD_ENOENT
 * (no such peer), TD_ECONNRESET (peer gone), TD_EEXIST (id open), TD_ENOSPC
 * (4096 requests open), TD_ENOMEM (no memory for its events). */
int kvx_send_begin(kvx_ep *ep, int peer, const char *req_id, int64_t deadline_ns);

/* One request of kvx_send_begin_batch: kvx_send_begin's arguments. */
typedef struct kvx_begin {
    int peer;
    const char *req_id;
    int64_t deadline_ns;
} kvx_begin;

/* Sender: opens n requests (1..4096) in one round trip to the progress
 * thread; their BEGIN messages leave in one write per peer, before the call
 * returns. Each is opened or refused on its own, in order, as kvx_send_begin
 * would (rcs[i] gets entry i's result; a peer whose connection fails while
 * its BEGINs are written refuses them with TD_ECONNRESET). Returns the
 * number opened, or a negative code as kvx_recv_register_batch (opening
 * nothing). */
int kvx_send_begin_batch(kvx_ep *ep, const kvx_begin *begins, int n, int *rcs);

/* Sender, the hot path: posts layer copies of one or more open requests (a
 * prefill batch: layer l of every request) in one call that does not wait for
 * the progress thread, allocates nothing and wakes the progress thread at
 * most once. The data moves after the call returns (after each request's
 * BEGIN_ACK). A layer may be posted in several posts; the union over a layer
 * must cover the receiver's registered blocks.
 *
 * All or nothing. The call returns
 *   0            every post was copied (pairs included) into the post ring;
 *   TD_EINVAL    a post is malformed: NULL or bad id, layer out of range, n
 *                out of 1..KVX_POST_MAX_PAIRS, a src >= local num_blocks; or
 *                ep is not a sender;
 *   TD_ERANGE    the posts need more than half the post ring (split the batch);
 *   TD_EAGAIN    no room now: the post ring, or the event queue's room for the
 *                posts' KVX_EV_LAYER_SENT events, is full;
 * and when it returns an error none of the posts was posted: retry the same
 * call later (after polling events), or fail the requests.
 *
 * Sizing, so that TD_EAGAIN does not happen in practice. Ring: a post holds
 * KVX_POST_HDR_BYTES + 8 * n bytes from this call until its LAYER_SENT;
 * params.post_ring_bytes must exceed the most that is in flight at once (the
 * default holds every block of the pool in every layer, in posts of 4 or more
 * blocks). Events: kvx_send_begin makes room for n_layers + 1 events per open
 * request, so a request posting each layer once never waits on it; posting a
 * layer in several posts uses spare room, which polling events frees.
 *
 * What becomes of each post is decided on the progress thread, in the order
 * the posts were made, and before any later call of the posting thread that
 * goes to the progress thread (a kvx_cancel right after finds the post
 * queued; kvx_ep_poll and kvx_ep_stats do not go there); a message
 * from the peer (its CANCEL) may overtake posts not yet read from the ring:
 *
 *   - request open and not failing: sent; exactly one KVX_EV_LAYER_SENT when
 *     its data left (source blocks reusable), or none when the request ends
 *     first (its final event covers it);
 *   - request failing (canceled, deadline, peer lost, ...) but its final event
 *     not yet emitted: dropped silently; the request's one KVX_EV_FAILED
 *     reports it;
 *   - a dst not below the receiver's num_blocks, or not registered for the
 *     request: the request fails, KVX_EV_FAILED with TD_EINVAL;
 *   - no open request of that id (never begun, or already ended with its
 *     final event): KVX_EV_POST_REJECTED (TD_ENOENT) for that post.
 * So a request opened with kvx_send_begin ends with exactly one final event
 * (DONE or FAILED), whatever is posted for it: no post ever produces a second
 * one, and a post for an ended request is only ever rejected. */
int kvx_send_layers(kvx_ep *ep, const kvx_layer_post *posts, int n_posts);

/* Sender: one post, checked first against the request's state (a round trip
 * to the progress thread), then posted as kvx_send_layers does. Returns 0,
 * TD_ENOENT (no such open request), TD_EINVAL (range, including dst against
 * the receiver's pool), the request's error once it is failing, or
 * kvx_send_layers' TD_ERANGE / TD_EAGAIN. Slower than kvx_send_layers; for
 * callers that want the state checked synchronously. */
int kvx_send_layer(kvx_ep *ep, const char *req_id, int layer, const kvx_pair *pairs, int n);

/* Either side: cancels an open request; the peer learns of it and both sides
 * end with KVX_EV_FAILED / TD_ECANCELED. Returns 0 or TD_ENOENT. */
int kvx_cancel(kvx_ep *ep, const char *req_id);

/* Receiver: the blocks of an open request landed so far, counted once per
 * layer (n_blocks x n_layers when whole), into *blocks. KVX_EV_LAYER_LANDED
 * comes only when a layer is whole, which a long prompt prefilled in chunks
 * reaches only with its last chunk; this tells a waiting receiver that the
 * transfer still moves. A round trip to the progress thread: for occasional
 * checks, not per block. Returns 0, TD_EINVAL or TD_ENOENT (no such open
 * request). */
int kvx_recv_landed(kvx_ep *ep, const char *req_id, uint64_t *blocks);

/* Readable (eventfd) while events are pending. Owned by the endpoint. */
int kvx_ep_event_fd(kvx_ep *ep);

/* Copies up to max pending events into evs (caller-owned); returns the count
 * (0 when none). Never blocks. */
int kvx_ep_poll(kvx_ep *ep, kvx_event *evs, int max);

/* Waits until an event is pending or timeout_ns passed, then polls. */
int kvx_ep_wait(kvx_ep *ep, kvx_event *evs, int max, int64_t timeout_ns);

/* Snapshot of the counters. */
void kvx_ep_stats(kvx_ep *ep, kvx_stats *out);

/* 64-bit hash of a request id as carried on the wire. */
uint64_t kvx_req_hash(const char *req_id);

#endif
