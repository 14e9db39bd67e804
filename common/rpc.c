/* rpc: gRPC C core server and client (see rpc.h for the contract).
 *
 * Every grpc_call_start_batch completes exactly once on the completion queue
 * the call is bound to, with a tag that points at an rpc__tag embedded in the
 * object it belongs to; the tag's kind says which handler runs. Objects are
 * reference counted under their own mutex: one reference per batch in flight
 * plus one for the application; the last release frees, on whichever thread.
 */
#include "rpc.h"

#include "clock.h"
#include "err.h"
#include "log.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MOD "rpc"

/* ThreadSanitizer builds: a tag given to gRPC on one thread (start_batch,
 * request_call) comes back from grpc_completion_queue_next on another, and
 * the happens-before that the queue provides is inside gRPC, which a
 * distribution build does not instrument. Without telling TSan, every object
 * handed over that way reads as a race; with it, what TSan still reports in
 * this file is about our own locking. Nothing in other builds. */
#if defined(__SANITIZE_THREAD__)
#define RPC__TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RPC__TSAN 1
#endif
#endif
#ifdef RPC__TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define RPC__HANDOFF(tag)  __tsan_release(tag)
#define RPC__TAKEOVER(tag) __tsan_acquire(tag)
#else
#define RPC__HANDOFF(tag)  ((void)(tag))
#define RPC__TAKEOVER(tag) ((void)(tag))
#endif

/* Trailing metadata key carrying the exact TD_E* code of a server status. */
#define RPC_ERR_KEY "tandem-err"

/* HTTP/2 keepalive on both sides while calls are open: ping after this much
 * silence, drop the connection when the ack takes longer than the timeout. */
#define RPC_KEEPALIVE_MS         20000
#define RPC_KEEPALIVE_TIMEOUT_MS 10000

/* Poll period of the server CQ thread while it waits for handed-out calls to
 * be finished during shutdown (releases on other threads do not wake it). */
#define RPC_SHUTDOWN_POLL_NS (20 * TD_NS_PER_MS)

enum rpc__tag_kind {
    TAG_NEW_CALL,     /* server: a registered method's call arrived (obj: rpc__method) */
    TAG_UNKNOWN_CALL, /* server: a call for an unregistered method arrived (obj: server) */
    TAG_CALL_CLOSE,   /* server: RECV_CLOSE_ON_SERVER completed (obj: rpc_call) */
    TAG_CALL_SEND,    /* server: a send batch completed (obj: rpc_call) */
    TAG_SHUTDOWN,     /* server: grpc_server_shutdown_and_notify completed */
    TAG_STREAM_START, /* client: the request was sent (obj: rpc_stream) */
    TAG_STREAM_RECV,  /* client: a message (or the end) was received (obj: rpc_stream) */
    TAG_STREAM_STATUS /* client: the status arrived (obj: rpc_stream) */
};

typedef struct rpc__tag {
    enum rpc__tag_kind kind;
    void *obj;
} rpc__tag;

/* ------------------------------------------------------------ shared bits -- */

int rpc_err_from_grpc(int code)
{
    switch ((grpc_status_code)code) {
    case GRPC_STATUS_OK:
        return 0;
    case GRPC_STATUS_CANCELLED:
        return TD_ECANCELED;
    case GRPC_STATUS_INVALID_ARGUMENT:
        return TD_EINVAL;
    case GRPC_STATUS_DEADLINE_EXCEEDED:
        return TD_ETIMEDOUT;
    case GRPC_STATUS_NOT_FOUND:
        return TD_ENOENT;
    case GRPC_STATUS_ALREADY_EXISTS:
        return TD_EEXIST;
    case GRPC_STATUS_PERMISSION_DENIED:
    case GRPC_STATUS_UNAUTHENTICATED:
        return TD_EDECLINED;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
        return TD_EAGAIN;
    case GRPC_STATUS_FAILED_PRECONDITION:
        return TD_EMISMATCH;
    case GRPC_STATUS_ABORTED:
        return TD_EAGAIN;
    case GRPC_STATUS_OUT_OF_RANGE:
        return TD_ERANGE;
    case GRPC_STATUS_UNIMPLEMENTED:
        return TD_EUNSUPPORTED;
    case GRPC_STATUS_UNAVAILABLE:
        return TD_EUNAVAILABLE;
    case GRPC_STATUS_DATA_LOSS:
        return TD_EIO;
    case GRPC_STATUS_INTERNAL:
    case GRPC_STATUS_UNKNOWN:
    default:
        return TD_EINTERNAL;
    }
}

int rpc_grpc_from_err(int err)
{
    switch (err) {
    case 0:
        return GRPC_STATUS_OK;
    case TD_EINVAL:
    case TD_EFORMAT:
    case TD_ETOOLONG:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case TD_ENOENT:
        return GRPC_STATUS_NOT_FOUND;
    case TD_EEXIST:
        return GRPC_STATUS_ALREADY_EXISTS;
    case TD_EAGAIN:
    case TD_EDECLINED:
    case TD_ENOSPC:
    case TD_ENOMEM:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case TD_ETIMEDOUT:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    case TD_ECANCELED:
        return GRPC_STATUS_CANCELLED;
    case TD_EUNAVAILABLE:
    case TD_ECONNREFUSED:
    case TD_ECONNRESET:
    case TD_ECLOSED:
    case TD_ENODEV:
        return GRPC_STATUS_UNAVAILABLE;
    case TD_EUNSUPPORTED:
        return GRPC_STATUS_UNIMPLEMENTED;
    case TD_EMISMATCH:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case TD_ERANGE:
        return GRPC_STATUS_OUT_OF_RANGE;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

int64_t rpc_deadline_from_timeout_ms(uint64_t timeout_ms)
{
    if (timeout_ms == 0 || timeout_ms > (uint64_t)(INT64_MAX / TD_NS_PER_MS) / 2)
        return RPC_NO_DEADLINE;
    return td_now_ns() + (int64_t)timeout_ms * TD_NS_PER_MS;
}

uint64_t rpc_timeout_ms_left(int64_t deadline_ns)
{
    if (deadline_ns == RPC_NO_DEADLINE) return 0;
    int64_t left = deadline_ns - td_now_ns();
    if (left < TD_NS_PER_MS) return 1; /* expired or nearly: the smallest budget, not "none" */
    return (uint64_t)(left / TD_NS_PER_MS);
}

/* Serialises msg into a new byte buffer (owned by the caller). */
static int rpc__pack(const ProtobufCMessage *msg, grpc_byte_buffer **out)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    if (len > RPC_MAX_MESSAGE_BYTES) return TD_ETOOLONG;
    grpc_slice slice = grpc_slice_malloc(len);
    size_t packed = protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice));
    if (packed != len) {
        grpc_slice_unref(slice);
        return TD_EINTERNAL;
    }
    *out = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return *out ? 0 : TD_ENOMEM;
}

/* Decodes a byte buffer; NULL when it is not a valid desc message. */
static ProtobufCMessage *rpc__unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc)
{
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb)) return NULL;
    grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
    ProtobufCMessage *msg =
        protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
    grpc_slice_unref(all);
    grpc_byte_buffer_reader_destroy(&reader);
    return msg;
}

static gpr_timespec rpc__gpr_deadline(int64_t deadline_ns)
{
    if (deadline_ns == RPC_NO_DEADLINE) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    int64_t left = deadline_ns - td_now_ns();
    if (left < 0) left = 0;
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos(left, GPR_TIMESPAN));
}

static int64_t rpc__td_deadline(gpr_timespec deadline)
{
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0) return RPC_NO_DEADLINE;
    gpr_timespec mono = gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC);
    gpr_timespec left = gpr_time_sub(mono, gpr_now(GPR_CLOCK_MONOTONIC));
    return td_now_ns() + (int64_t)left.tv_sec * TD_NS_PER_S + left.tv_nsec;
}

static void rpc__copy_slice(char *dst, size_t cap, grpc_slice s)
{
    size_t n = GRPC_SLICE_LENGTH(s);
    if (n >= cap) n = cap - 1;
    memcpy(dst, GRPC_SLICE_START_PTR(s), n);
    dst[n] = '\0';
}

/* Absolute deadline for pthread_cond_timedwait (CLOCK_MONOTONIC condvars). */
static struct timespec rpc__abs_mono(int64_t from_now_ns)
{
    int64_t t = td_now_ns() + from_now_ns;
    struct timespec ts = {.tv_sec = t / TD_NS_PER_S, .tv_nsec = t % TD_NS_PER_S};
    return ts;
}

static int rpc__cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) return TD_ENOMEM;
    int rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0) rc = pthread_cond_init(cv, &attr);
    pthread_condattr_destroy(&attr);
    return rc == 0 ? 0 : TD_ENOMEM;
}

/* ---------------------------------------------------------------- server -- */

typedef struct rpc__method {
    struct rpc_server *srv;
    char *name;
    void *handle; /* from grpc_server_register_method */
    const ProtobufCMessageDescriptor *req_desc;
    rpc_handler_fn fn;
    void *arg;
    struct rpc__method *next;
    /* The one outstanding grpc_server_request_registered_call. */
    rpc__tag tag;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
    bool armed;
} rpc__method;

typedef struct rpc__out {
    grpc_byte_buffer *bb;
    struct rpc__out *next;
} rpc__out;

struct rpc_server {
    grpc_server *server;
    grpc_completion_queue *cq;
    pthread_t thread;
    bool started;
    int port;
    rpc__method *methods;
    rpc__tag shutdown_tag;
    /* Calls of unregistered methods (answered UNIMPLEMENTED). */
    rpc__tag unknown_tag;
    grpc_call *unknown_call;
    grpc_call_details unknown_details;
    grpc_metadata_array unknown_md;
    bool unknown_armed;

    pthread_mutex_t mu; /* guards the fields below */
    bool shutting_down;
    bool shutdown_done;
    int live_calls; /* rpc_call objects not yet freed */
};

/* Server call states, one per call (guarded by rpc_call.mu):
 *   RUNNING  -> the application holds it; sends queue and go out in order
 *   FINISHING-> rpc_call_finish queued the status behind the queued messages
 *   the close batch completing sets closed (and cancelled when the client
 *   went away, the deadline passed or the server shut down); after that,
 *   sends are refused with TD_ECANCELED. The object is freed at refs == 0. */
struct rpc_call {
    rpc_server *srv;
    rpc__method *method; /* NULL for unknown methods */
    grpc_call *call;
    int64_t deadline_ns;
    grpc_metadata_array req_md;
    grpc_byte_buffer *req_payload;
    ProtobufCMessage *req;

    rpc__tag close_tag;
    rpc__tag send_tag;
    int close_cancelled; /* written by gRPC when the close batch completes */
    atomic_int cancelled;

    pthread_mutex_t mu;
    int refs;
    bool app_done;      /* rpc_call_finish was called */
    bool closed;        /* the close batch completed */
    bool md_sent;       /* initial metadata went out */
    bool send_inflight; /* a send batch is outstanding (at most one) */
    bool finish_pending, finish_started;
    rpc__out *head, *tail;
    grpc_byte_buffer *inflight_bb;
    grpc_status_code fin_code;
    grpc_slice fin_details;
    grpc_metadata fin_md;
    char fin_err[16];
    rpc_cancel_fn cancel_fn;
    void *cancel_arg;
    bool cancel_fired;
};

static void rpc__call_free(rpc_call *c)
{
    rpc_server *s = c->srv;
    rpc__out *o = c->head;
    while (o) {
        rpc__out *next = o->next;
        grpc_byte_buffer_destroy(o->bb);
        free(o);
        o = next;
    }
    if (c->inflight_bb) grpc_byte_buffer_destroy(c->inflight_bb);
    if (c->finish_pending) {
        grpc_slice_unref(c->fin_details);
        grpc_slice_unref(c->fin_md.value);
    }
    if (c->req) protobuf_c_message_free_unpacked(c->req, NULL);
    if (c->req_payload) grpc_byte_buffer_destroy(c->req_payload);
    grpc_metadata_array_destroy(&c->req_md);
    grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    free(c);

    pthread_mutex_lock(&s->mu);
    s->live_calls--;
    pthread_mutex_unlock(&s->mu);
}

/* Drops one reference; c->mu held on entry, released on return. */
static void rpc__call_unref_unlock(rpc_call *c)
{
    int refs = --c->refs;
    pthread_mutex_unlock(&c->mu);
    if (refs == 0) rpc__call_free(c);
}

/* Starts the next send batch when none is in flight. c->mu held. */
static void rpc__call_pump(rpc_call *c)
{
    if (c->send_inflight || c->closed) return;
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    bool have_msg = c->head != NULL;
    bool with_status = c->finish_pending && !c->finish_started && (!have_msg || !c->head->next);
    if (!have_msg && !with_status) return;
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    if (have_msg) {
        rpc__out *o = c->head;
        c->head = o->next;
        if (!c->head) c->tail = NULL;
        c->inflight_bb = o->bb;
        free(o);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->inflight_bb;
        n++;
    }
    if (with_status) {
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = c->fin_code;
        ops[n].data.send_status_from_server.status_details = &c->fin_details;
        if (c->fin_code != GRPC_STATUS_OK) {
            ops[n].data.send_status_from_server.trailing_metadata_count = 1;
            ops[n].data.send_status_from_server.trailing_metadata = &c->fin_md;
        }
        n++;
        c->finish_started = true;
    }
    RPC__HANDOFF(&c->send_tag);
    grpc_call_error ce = grpc_call_start_batch(c->call, ops, n, &c->send_tag, NULL);
    if (ce != GRPC_CALL_OK) {
        /* Cannot happen with a well-formed batch; fail the call rather than hang. */
        td_log_error(MOD, "start_batch_failed", "method=%s grpc_call_error=%d",
                     c->method ? c->method->name : "?", (int)ce);
        if (c->inflight_bb) {
            grpc_byte_buffer_destroy(c->inflight_bb);
            c->inflight_bb = NULL;
        }
        grpc_call_cancel_with_status(c->call, GRPC_STATUS_INTERNAL, "send failed", NULL);
        return;
    }
    c->md_sent = true;
    c->send_inflight = true;
    c->refs++;
}

/* Queues the status (rpc_call_finish without releasing). c->mu held. */
static void rpc__call_set_finish(rpc_call *c, int err, const char *details)
{
    c->finish_pending = true;
    c->fin_code = (grpc_status_code)rpc_grpc_from_err(err);
    c->fin_details = grpc_slice_from_copied_string(details ? details : "");
    snprintf(c->fin_err, sizeof(c->fin_err), "%d", err);
    c->fin_md.key = grpc_slice_from_static_string(RPC_ERR_KEY);
    c->fin_md.value = grpc_slice_from_copied_string(c->fin_err);
    rpc__call_pump(c);
}

static void rpc__method_arm(rpc__method *m)
{
    rpc_server *s = m->srv;
    grpc_metadata_array_init(&m->md);
    m->payload = NULL;
    m->call = NULL;
    RPC__HANDOFF(&m->tag);
    grpc_call_error ce = grpc_server_request_registered_call(
        s->server, m->handle, &m->call, &m->deadline, &m->md, &m->payload, s->cq, s->cq, &m->tag);
    if (ce != GRPC_CALL_OK) {
        td_log_error(MOD, "request_call_failed", "method=%s grpc_call_error=%d", m->name, (int)ce);
        grpc_metadata_array_destroy(&m->md);
        return;
    }
    m->armed = true;
}

static void rpc__unknown_arm(rpc_server *s)
{
    grpc_call_details_init(&s->unknown_details);
    grpc_metadata_array_init(&s->unknown_md);
    s->unknown_call = NULL;
    RPC__HANDOFF(&s->unknown_tag);
    grpc_call_error ce = grpc_server_request_call(s->server, &s->unknown_call, &s->unknown_details,
                                                  &s->unknown_md, s->cq, s->cq, &s->unknown_tag);
    if (ce != GRPC_CALL_OK) {
        td_log_error(MOD, "request_call_failed", "method=* grpc_call_error=%d", (int)ce);
        grpc_call_details_destroy(&s->unknown_details);
        grpc_metadata_array_destroy(&s->unknown_md);
        return;
    }
    s->unknown_armed = true;
}

/* Wraps a newly arrived grpc_call; takes ownership of call, md and payload. */
static rpc_call *rpc__call_new(rpc_server *s, rpc__method *m, grpc_call *call,
                               gpr_timespec deadline, grpc_metadata_array md,
                               grpc_byte_buffer *payload)
{
    rpc_call *c = calloc(1, sizeof(*c));
    if (!c || pthread_mutex_init(&c->mu, NULL) != 0) {
        free(c);
        td_log_error(MOD, "call_alloc_failed", NULL);
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
        grpc_call_unref(call);
        grpc_metadata_array_destroy(&md);
        if (payload) grpc_byte_buffer_destroy(payload);
        return NULL;
    }
    c->srv = s;
    c->method = m;
    c->call = call;
    c->deadline_ns = rpc__td_deadline(deadline);
    c->req_md = md;
    c->req_payload = payload;
    c->close_tag = (rpc__tag){TAG_CALL_CLOSE, c};
    c->send_tag = (rpc__tag){TAG_CALL_SEND, c};
    pthread_mutex_lock(&s->mu);
    s->live_calls++;
    pthread_mutex_unlock(&s->mu);

    /* The close batch tells us when the call is over, and whether it was
     * cancelled; it holds one reference until it completes. */
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    RPC__HANDOFF(&c->close_tag);
    grpc_call_error ce = grpc_call_start_batch(call, &op, 1, &c->close_tag, NULL);
    if (ce != GRPC_CALL_OK) {
        td_log_error(MOD, "start_batch_failed", "op=recv_close grpc_call_error=%d", (int)ce);
        grpc_call_cancel_with_status(call, GRPC_STATUS_INTERNAL, "internal error", NULL);
        c->closed = true;
        atomic_store(&c->cancelled, 1);
    }
    c->refs = 1; /* the close batch's, or the caller's to drop when closed */
    return c;
}

static void rpc__on_new_call(rpc_server *s, rpc__method *m, bool ok)
{
    m->armed = false;
    if (!ok) {
        /* Shutdown: the request was withdrawn. */
        grpc_metadata_array_destroy(&m->md);
        return;
    }
    grpc_call *call = m->call;
    gpr_timespec deadline = m->deadline;
    grpc_metadata_array md = m->md;
    grpc_byte_buffer *payload = m->payload;
    pthread_mutex_lock(&s->mu);
    bool stopping = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (!stopping) rpc__method_arm(m);

    rpc_call *c = rpc__call_new(s, m, call, deadline, md, payload);
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    if (c->closed) {
        rpc__call_unref_unlock(c); /* the call could not start: frees */
        return;
    }
    if (stopping) {
        c->app_done = true;
        rpc__call_set_finish(c, TD_EUNAVAILABLE, "server shutting down");
        pthread_mutex_unlock(&c->mu);
        return;
    }
    if (payload) c->req = rpc__unpack(payload, m->req_desc);
    if (!c->req) {
        td_log_warn(MOD, "bad_request", "method=%s payload_bytes=%zu", m->name,
                    payload ? grpc_byte_buffer_length(payload) : 0);
        c->app_done = true;
        rpc__call_set_finish(c, TD_EINVAL, payload ? "request does not decode" : "no request");
        pthread_mutex_unlock(&c->mu);
        return;
    }
    c->refs++; /* the application's reference, released by rpc_call_finish */
    pthread_mutex_unlock(&c->mu);
    m->fn(c, c->req, m->arg);
}

static void rpc__on_unknown_call(rpc_server *s, bool ok)
{
    s->unknown_armed = false;
    if (!ok) {
        grpc_call_details_destroy(&s->unknown_details);
        grpc_metadata_array_destroy(&s->unknown_md);
        return;
    }
    grpc_call *call = s->unknown_call;
    char method[128];
    rpc__copy_slice(method, sizeof(method), s->unknown_details.method);
    gpr_timespec deadline = s->unknown_details.deadline;
    grpc_metadata_array md = s->unknown_md;
    grpc_call_details_destroy(&s->unknown_details);
    pthread_mutex_lock(&s->mu);
    bool stopping = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (!stopping) rpc__unknown_arm(s);

    td_log_warn(MOD, "unknown_method", "method=%s", method);
    rpc_call *c = rpc__call_new(s, NULL, call, deadline, md, NULL);
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    if (c->closed) {
        rpc__call_unref_unlock(c);
        return;
    }
    c->app_done = true;
    rpc__call_set_finish(c, TD_EUNSUPPORTED, "unknown method");
    pthread_mutex_unlock(&c->mu);
}

static void rpc__on_call_close(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    c->closed = true;
    bool fire = false;
    if (c->close_cancelled) {
        atomic_store(&c->cancelled, 1);
        /* Queued messages will never go out. */
        rpc__out *o = c->head;
        while (o) {
            rpc__out *next = o->next;
            grpc_byte_buffer_destroy(o->bb);
            free(o);
            o = next;
        }
        c->head = c->tail = NULL;
        fire = !c->app_done && c->cancel_fn && !c->cancel_fired;
        if (fire) c->cancel_fired = true;
    }
    pthread_mutex_unlock(&c->mu);
    if (fire) c->cancel_fn(c, c->cancel_arg);
    pthread_mutex_lock(&c->mu);
    rpc__call_unref_unlock(c);
}

static void rpc__on_call_send(rpc_call *c, bool ok)
{
    pthread_mutex_lock(&c->mu);
    c->send_inflight = false;
    if (c->inflight_bb) {
        grpc_byte_buffer_destroy(c->inflight_bb);
        c->inflight_bb = NULL;
    }
    if (ok) rpc__call_pump(c);
    rpc__call_unref_unlock(c);
}

static bool rpc__server_done(rpc_server *s)
{
    pthread_mutex_lock(&s->mu);
    bool done = s->shutdown_done && s->live_calls == 0;
    pthread_mutex_unlock(&s->mu);
    if (!done) return false;
    for (rpc__method *m = s->methods; m; m = m->next)
        if (m->armed) return false;
    return !s->unknown_armed;
}

static void *rpc__server_thread(void *arg)
{
    rpc_server *s = arg;
    int64_t next_warn_ns = 0;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        bool stopping = s->shutting_down;
        int live = s->live_calls;
        pthread_mutex_unlock(&s->mu);
        if (stopping && live > 0) {
            /* A call the application never finishes would hang shutdown: say so. */
            int64_t now = td_now_ns();
            if (next_warn_ns == 0) {
                next_warn_ns = now + 2 * TD_NS_PER_S;
            } else if (now >= next_warn_ns) {
                td_log_warn(MOD, "shutdown_waiting", "port=%d unfinished_calls=%d", s->port, live);
                next_warn_ns = now + 2 * TD_NS_PER_S;
            }
        }
        gpr_timespec until = stopping ? rpc__gpr_deadline(td_now_ns() + RPC_SHUTDOWN_POLL_NS)
                                      : gpr_inf_future(GPR_CLOCK_MONOTONIC);
        grpc_event ev = grpc_completion_queue_next(s->cq, until, NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type == GRPC_OP_COMPLETE) {
            rpc__tag *tag = ev.tag;
            RPC__TAKEOVER(tag);
            switch (tag->kind) {
            case TAG_NEW_CALL:
                rpc__on_new_call(s, tag->obj, ev.success);
                break;
            case TAG_UNKNOWN_CALL:
                rpc__on_unknown_call(s, ev.success);
                break;
            case TAG_CALL_CLOSE:
                rpc__on_call_close(tag->obj);
                break;
            case TAG_CALL_SEND:
                rpc__on_call_send(tag->obj, ev.success);
                break;
            case TAG_SHUTDOWN:
                pthread_mutex_lock(&s->mu);
                s->shutdown_done = true;
                pthread_mutex_unlock(&s->mu);
                break;
            default:
                td_log_error(MOD, "bad_tag", "kind=%d", (int)tag->kind);
                break;
            }
        }
        if (stopping && rpc__server_done(s)) break;
    }
    return NULL;
}

/* One integer channel argument (gRPC's API takes a non-const key). */
#define RPC__INT_ARG(name, val)                                                                    \
    {                                                                                              \
        .type = GRPC_ARG_INTEGER, .key = (char *)(name), .value.integer = (val)                    \
    }

int rpc_server_create(const char *addr, rpc_server **out)
{
    if (!addr || !out) return TD_EINVAL;
    *out = NULL;
    rpc_server *s = calloc(1, sizeof(*s));
    if (!s) return TD_ENOMEM;
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        return TD_ENOMEM;
    }
    grpc_init();
    grpc_arg args[] = {
        RPC__INT_ARG(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, RPC_MAX_MESSAGE_BYTES),
        RPC__INT_ARG(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, RPC_MAX_MESSAGE_BYTES),
        /* Find clients that vanished without a FIN (host down, partition) so
         * their calls are cancelled and their KV blocks freed. */
        RPC__INT_ARG(GRPC_ARG_KEEPALIVE_TIME_MS, RPC_KEEPALIVE_MS),
        RPC__INT_ARG(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, RPC_KEEPALIVE_TIMEOUT_MS),
        /* Accept our clients' keepalive pings (the default policing allows one
         * per 5 minutes and closes the connection after two strikes). */
        RPC__INT_ARG(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, RPC_KEEPALIVE_MS / 2),
        /* gRPC binds with SO_REUSEPORT by default: a second server on a taken
         * port would start and share its connections with the first (two
         * workers answering at one address). A taken port is an error. */
        RPC__INT_ARG(GRPC_ARG_ALLOW_REUSEPORT, 0),
    };
    grpc_channel_args cargs = {.num_args = sizeof(args) / sizeof(args[0]), .args = args};
    s->server = grpc_server_create(&cargs, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    s->shutdown_tag = (rpc__tag){TAG_SHUTDOWN, s};
    s->unknown_tag = (rpc__tag){TAG_UNKNOWN_CALL, s};
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    s->port = grpc_server_add_http2_port(s->server, addr, creds);
    grpc_server_credentials_release(creds);
    if (s->port <= 0) {
        td_log_error(MOD, "bind_failed", "addr=%s", addr);
        rpc_server_free(s);
        return TD_EIO;
    }
    *out = s;
    return 0;
}

int rpc_server_add_method(rpc_server *s, const char *method,
                          const ProtobufCMessageDescriptor *req_desc, rpc_handler_fn fn, void *arg)
{
    if (!s || !method || method[0] != '/' || !req_desc || !fn || s->started) return TD_EINVAL;
    for (rpc__method *m = s->methods; m; m = m->next)
        if (strcmp(m->name, method) == 0) return TD_EEXIST;
    rpc__method *m = calloc(1, sizeof(*m));
    if (!m) return TD_ENOMEM;
    m->name = strdup(method);
    if (!m->name) {
        free(m);
        return TD_ENOMEM;
    }
    /* The whole request arrives with the call: both shapes we serve take
     * exactly one request message. */
    m->handle = grpc_server_register_method(s->server, m->name, NULL,
                                            GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    if (!m->handle) {
        free(m->name);
        free(m);
        return TD_EEXIST;
    }
    m->srv = s;
    m->req_desc = req_desc;
    m->fn = fn;
    m->arg = arg;
    m->tag = (rpc__tag){TAG_NEW_CALL, m};
    m->next = s->methods;
    s->methods = m;
    return 0;
}

int rpc_server_start(rpc_server *s)
{
    if (!s || s->started) return TD_EINVAL;
    grpc_server_start(s->server);
    for (rpc__method *m = s->methods; m; m = m->next)
        rpc__method_arm(m);
    rpc__unknown_arm(s);
    int rc = pthread_create(&s->thread, NULL, rpc__server_thread, s);
    if (rc != 0) {
        td_log_error(MOD, "thread_create_failed", "errno=%d", rc);
        /* The requests armed above complete (withdrawn) during shutdown, which
         * rpc_server_free drains on the caller's thread. */
        return td_err_from_errno(rc);
    }
    s->started = true;
    td_log_info(MOD, "server_started", "port=%d", s->port);
    return 0;
}

int rpc_server_port(const rpc_server *s)
{
    return s ? s->port : 0;
}

void rpc_server_free(rpc_server *s)
{
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->shutting_down = true;
    pthread_mutex_unlock(&s->mu);
    if (s->server) {
        RPC__HANDOFF(&s->shutdown_tag);
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
        /* No grace period: calls in flight end now, their handlers hear of it
         * through the cancel callback / rpc_call_cancelled. */
        grpc_server_cancel_all_calls(s->server);
        if (s->started) {
            pthread_join(s->thread, NULL);
        } else {
            /* Never started (or the thread did not start): drain here. */
            while (!rpc__server_done(s)) {
                grpc_event ev = grpc_completion_queue_next(
                    s->cq, rpc__gpr_deadline(td_now_ns() + RPC_SHUTDOWN_POLL_NS), NULL);
                if (ev.type != GRPC_OP_COMPLETE) continue;
                rpc__tag *tag = ev.tag;
                RPC__TAKEOVER(tag);
                if (tag->kind == TAG_SHUTDOWN) {
                    s->shutdown_done = true;
                } else if (tag->kind == TAG_NEW_CALL) {
                    rpc__on_new_call(s, tag->obj, ev.success);
                } else if (tag->kind == TAG_UNKNOWN_CALL) {
                    rpc__on_unknown_call(s, ev.success);
                } else if (tag->kind == TAG_CALL_CLOSE) {
                    rpc__on_call_close(tag->obj);
                } else if (tag->kind == TAG_CALL_SEND) {
                    rpc__on_call_send(tag->obj, ev.success);
                }
            }
        }
        grpc_server_destroy(s->server);
    }
    if (s->cq) {
        grpc_completion_queue_shutdown(s->cq);
        for (;;) {
            grpc_event ev =
                grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        }
        grpc_completion_queue_destroy(s->cq);
    }
    rpc__method *m = s->methods;
    while (m) {
        rpc__method *next = m->next;
        free(m->name);
        free(m);
        m = next;
    }
    pthread_mutex_destroy(&s->mu);
    if (s->port > 0) td_log_info(MOD, "server_stopped", "port=%d", s->port);
    free(s);
    grpc_shutdown();
}

/* Serialises msg into a new queue entry. */
static int rpc__out_new(const ProtobufCMessage *msg, rpc__out **out)
{
    rpc__out *o = malloc(sizeof(*o));
    if (!o) return TD_ENOMEM;
    int rc = rpc__pack(msg, &o->bb);
    if (rc < 0) {
        free(o);
        return rc;
    }
    o->next = NULL;
    *out = o;
    return 0;
}

static void rpc__out_free(rpc__out *o)
{
    if (!o) return;
    grpc_byte_buffer_destroy(o->bb);
    free(o);
}

/* Appends to the send queue. c->mu held. */
static void rpc__call_enqueue(rpc_call *c, rpc__out *o)
{
    if (c->tail)
        c->tail->next = o;
    else
        c->head = o;
    c->tail = o;
}

int rpc_call_send(rpc_call *c, const ProtobufCMessage *msg)
{
    if (!c || !msg) return TD_EINVAL;
    if (atomic_load(&c->cancelled)) return TD_ECANCELED;
    rpc__out *o;
    int rc = rpc__out_new(msg, &o);
    if (rc < 0) return rc;
    pthread_mutex_lock(&c->mu);
    if (c->app_done || atomic_load(&c->cancelled)) {
        rc = c->app_done ? TD_EINVAL : TD_ECANCELED;
        pthread_mutex_unlock(&c->mu);
        rpc__out_free(o);
        return rc;
    }
    rpc__call_enqueue(c, o);
    rpc__call_pump(c);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

int rpc_call_finish(rpc_call *c, int err, const char *details)
{
    if (!c) return TD_EINVAL;
    pthread_mutex_lock(&c->mu);
    if (c->app_done) {
        pthread_mutex_unlock(&c->mu);
        td_log_error(MOD, "double_finish", NULL);
        return TD_EINVAL;
    }
    c->app_done = true;
    int rc = 0;
    if (atomic_load(&c->cancelled))
        rc = TD_ECANCELED;
    else
        rpc__call_set_finish(c, err, details);
    rpc__call_unref_unlock(c);
    return rc;
}

int rpc_call_finishf(rpc_call *c, int err, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return rpc_call_finish(c, err, msg);
}

int rpc_call_reply(rpc_call *c, const ProtobufCMessage *msg)
{
    if (!c) return TD_EINVAL;
    rpc__out *o = NULL;
    int rc = msg ? rpc__out_new(msg, &o) : TD_EINVAL;
    pthread_mutex_lock(&c->mu);
    if (c->app_done) {
        pthread_mutex_unlock(&c->mu);
        rpc__out_free(o);
        td_log_error(MOD, "double_finish", NULL);
        return TD_EINVAL;
    }
    c->app_done = true;
    if (atomic_load(&c->cancelled)) {
        rc = TD_ECANCELED;
    } else if (rc == 0) {
        /* Message and status queued together go out as one batch. */
        rpc__call_enqueue(c, o);
        o = NULL;
        rpc__call_set_finish(c, 0, NULL);
    } else {
        rpc__call_set_finish(c, TD_EINTERNAL, "reply could not be serialised");
    }
    rpc__call_unref_unlock(c);
    rpc__out_free(o);
    return rc;
}

void rpc_call_on_cancel(rpc_call *c, rpc_cancel_fn fn, void *arg)
{
    pthread_mutex_lock(&c->mu);
    c->cancel_fn = fn;
    c->cancel_arg = arg;
    bool fire = fn && atomic_load(&c->cancelled) && !c->app_done && !c->cancel_fired;
    if (fire) c->cancel_fired = true;
    pthread_mutex_unlock(&c->mu);
    if (fire) fn(c, arg);
}

int rpc_call_cancelled(const rpc_call *c)
{
    return atomic_load(&((rpc_call *)c)->cancelled);
}

int64_t rpc_call_deadline_ns(const rpc_call *c)
{
    return c->deadline_ns;
}

const char *rpc_call_method(const rpc_call *c)
{
    return c->method ? c->method->name : "";
}

/* ---------------------------------------------------------------- client -- */

struct rpc_client {
    grpc_channel *channel;
    grpc_completion_queue *cq; /* streams only; unary calls use their own */
    pthread_t thread;
    atomic_int streams;
    char target[128];
};

/* Stream states (guarded by rpc_stream.mu): the start, status and receive
 * batches are each outstanding at most once; the stream is over for the
 * reader when the status arrived, the last receive returned the end and the
 * buffer is empty; it may be freed when no batch is outstanding. */
struct rpc_stream {
    rpc_client *cli;
    grpc_call *call;
    const ProtobufCMessageDescriptor *desc;
    rpc_notify_fn notify;
    void *notify_arg;
    char method[128];

    rpc__tag start_tag, recv_tag, status_tag;
    grpc_byte_buffer *send_bb;
    grpc_byte_buffer *recv_bb;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code code;
    grpc_slice details;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool start_inflight, recv_inflight, status_inflight;
    bool md_received; /* the first receive also took the initial metadata */
    bool eof;         /* a receive returned no message: nothing more will come */
    int in_notify;    /* notify callbacks running */
    int local_err;    /* a message did not decode */
    ProtobufCMessage *ring[RPC_STREAM_WINDOW];
    unsigned ring_head, ring_count;
    rpc_status status;
};

static void rpc__status_fill(rpc_status *st, grpc_status_code code, grpc_slice details,
                             const grpc_metadata_array *trail)
{
    st->grpc_code = (int)code;
    st->err = rpc_err_from_grpc((int)code);
    st->from_peer = 0;
    rpc__copy_slice(st->details, sizeof(st->details), details);
    if (code == GRPC_STATUS_OK || !trail) return;
    /* The server's exact TD code, when it sent one. */
    for (size_t i = 0; i < trail->count; i++) {
        if (!grpc_slice_str_cmp(trail->metadata[i].key, RPC_ERR_KEY)) {
            char buf[16];
            rpc__copy_slice(buf, sizeof(buf), trail->metadata[i].value);
            char *end;
            long v = strtol(buf, &end, 10);
            if (*end == '\0' && v < 0 && v > -1000) {
                st->err = (int)v;
                st->from_peer = 1;
            }
        }
    }
}

static void rpc__log_status(const char *method, const rpc_status *st)
{
    if (st->err == 0) return;
    enum td_log_level lvl = st->err == TD_ECANCELED ? TD_LOG_DEBUG : TD_LOG_INFO;
    if (TD_LOG_ENABLED(lvl))
        td_log_emit(lvl, MOD, "call_failed", "method=%s err=%s grpc_code=%d details=\"%s\"", method,
                    td_err_name(st->err), st->grpc_code, st->details);
}

static grpc_channel *rpc__channel_create(const char *target)
{
    grpc_arg args[] = {
        RPC__INT_ARG(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, RPC_MAX_MESSAGE_BYTES),
        RPC__INT_ARG(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, RPC_MAX_MESSAGE_BYTES),
        /* A worker that restarts is back within a second, not after gRPC's
         * default exponential backoff (1 s doubling up to 120 s). */
        RPC__INT_ARG(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100),
        RPC__INT_ARG(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000),
        /* Retries are the router's decision (before the first token only);
         * transparent retries would also buffer every request. */
        RPC__INT_ARG(GRPC_ARG_ENABLE_RETRIES, 0),
        /* A decode stream can run for minutes with nothing sent by the client:
         * ping while calls are open so a dead server is noticed in
         * RPC_KEEPALIVE_MS + RPC_KEEPALIVE_TIMEOUT_MS, not at the deadline. */
        RPC__INT_ARG(GRPC_ARG_KEEPALIVE_TIME_MS, RPC_KEEPALIVE_MS),
        RPC__INT_ARG(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, RPC_KEEPALIVE_TIMEOUT_MS),
        RPC__INT_ARG(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0),
    };
    grpc_channel_args cargs = {.num_args = sizeof(args) / sizeof(args[0]), .args = args};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, creds, &cargs);
    grpc_channel_credentials_release(creds);
    return ch;
}

/* Starts a receive batch. s->mu held; s->recv_inflight is false. */
static void rpc__stream_recv(rpc_stream *s)
{
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    if (!s->md_received) {
        ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[n].data.recv_initial_metadata.recv_initial_metadata = &s->init_md;
        n++;
        s->md_received = true;
    }
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = &s->recv_bb;
    n++;
    s->recv_bb = NULL;
    RPC__HANDOFF(&s->recv_tag);
    grpc_call_error ce = grpc_call_start_batch(s->call, ops, n, &s->recv_tag, NULL);
    if (ce != GRPC_CALL_OK) {
        td_log_error(MOD, "start_batch_failed", "op=recv grpc_call_error=%d", (int)ce);
        s->eof = true;
        s->local_err = TD_EINTERNAL;
        grpc_call_cancel(s->call, NULL);
        return;
    }
    s->recv_inflight = true;
}

static void rpc__on_stream_event(rpc_stream *s, enum rpc__tag_kind kind, bool ok)
{
    pthread_mutex_lock(&s->mu);
    switch (kind) {
    case TAG_STREAM_START:
        s->start_inflight = false;
        grpc_byte_buffer_destroy(s->send_bb);
        s->send_bb = NULL;
        break;
    case TAG_STREAM_RECV:
        s->recv_inflight = false;
        if (ok && s->recv_bb) {
            ProtobufCMessage *msg = rpc__unpack(s->recv_bb, s->desc);
            grpc_byte_buffer_destroy(s->recv_bb);
            s->recv_bb = NULL;
            if (!msg) {
                td_log_warn(MOD, "bad_response", "method=%s", s->method);
                s->local_err = TD_EPROTO;
                s->eof = true;
                grpc_call_cancel_with_status(s->call, GRPC_STATUS_INTERNAL,
                                             "response does not decode", NULL);
            } else {
                s->ring[(s->ring_head + s->ring_count) % RPC_STREAM_WINDOW] = msg;
                s->ring_count++;
                if (s->ring_count < RPC_STREAM_WINDOW) rpc__stream_recv(s);
            }
        } else {
            s->eof = true;
        }
        break;
    case TAG_STREAM_STATUS:
        s->status_inflight = false;
        rpc__status_fill(&s->status, s->code, s->details, &s->trail_md);
        rpc__log_status(s->method, &s->status);
        break;
    default:
        break;
    }
    bool notify = s->notify && kind != TAG_STREAM_START;
    if (notify) s->in_notify++; /* rpc_stream_free waits for the callback to return */
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (!notify) return;
    s->notify(s, s->notify_arg);
    pthread_mutex_lock(&s->mu);
    s->in_notify--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void *rpc__client_thread(void *arg)
{
    rpc_client *c = arg;
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        rpc__tag *tag = ev.tag;
        RPC__TAKEOVER(tag);
        rpc__on_stream_event(tag->obj, tag->kind, ev.success);
    }
    return NULL;
}

int rpc_client_create(const char *target, rpc_client **out)
{
    if (!target || !out || strlen(target) >= sizeof(((rpc_client *)0)->target)) return TD_EINVAL;
    *out = NULL;
    rpc_client *c = calloc(1, sizeof(*c));
    if (!c) return TD_ENOMEM;
    grpc_init();
    snprintf(c->target, sizeof(c->target), "%s", target);
    c->channel = rpc__channel_create(target);
    c->cq = grpc_completion_queue_create_for_next(NULL);
    int rc = pthread_create(&c->thread, NULL, rpc__client_thread, c);
    if (rc != 0) {
        grpc_completion_queue_shutdown(c->cq);
        grpc_completion_queue_destroy(c->cq);
        grpc_channel_destroy(c->channel);
        free(c);
        grpc_shutdown();
        return td_err_from_errno(rc);
    }
    *out = c;
    return 0;
}

void rpc_client_free(rpc_client *c)
{
    if (!c) return;
    if (atomic_load(&c->streams) != 0)
        td_log_error(MOD, "client_free_with_streams", "streams=%d", atomic_load(&c->streams));
    grpc_channel_destroy(c->channel);
    grpc_completion_queue_shutdown(c->cq);
    pthread_join(c->thread, NULL);
    grpc_completion_queue_destroy(c->cq);
    free(c);
    grpc_shutdown();
}

int rpc_client_unary(rpc_client *c, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_desc, int64_t deadline_ns,
                     ProtobufCMessage **resp, rpc_status *status)
{
    rpc_status local;
    rpc_status *st = status ? status : &local;
    memset(st, 0, sizeof(*st));
    if (!c || !method || !req || !resp_desc || !resp) {
        st->err = TD_EINVAL;
        return TD_EINVAL;
    }
    *resp = NULL;
    grpc_byte_buffer *send_bb;
    int rc = rpc__pack(req, &send_bb);
    if (rc < 0) {
        st->err = rc;
        return rc;
    }
    /* A private queue plucked by this thread: no hand-off to another thread,
     * and any number of threads may call at once. */
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice mslice = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                               mslice, NULL, rpc__gpr_deadline(deadline_ns), NULL);
    grpc_slice_unref(mslice);

    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_byte_buffer *recv_bb = NULL;
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[5].data.recv_status_on_client.status = &code;
    ops[5].data.recv_status_on_client.status_details = &details;
    int tag = 0;
    grpc_call_error ce = grpc_call_start_batch(call, ops, 6, &tag, NULL);
    if (ce != GRPC_CALL_OK) {
        td_log_error(MOD, "start_batch_failed", "method=%s grpc_call_error=%d", method, (int)ce);
        st->err = TD_EINTERNAL;
        st->grpc_code = GRPC_STATUS_INTERNAL;
    } else {
        /* The call's deadline bounds this wait. */
        grpc_event ev =
            grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        (void)ev; /* the batch includes RECV_STATUS: the status says it all */
        rpc__status_fill(st, code, details, &trail_md);
        if (st->err == 0) {
            ProtobufCMessage *msg = recv_bb ? rpc__unpack(recv_bb, resp_desc) : NULL;
            if (!msg) {
                st->err = TD_EPROTO;
                snprintf(st->details, sizeof(st->details), "%s",
                         recv_bb ? "response does not decode" : "no response message");
            }
            *resp = msg;
        }
        rpc__log_status(method, st);
    }
    if (recv_bb) grpc_byte_buffer_destroy(recv_bb);
    grpc_byte_buffer_destroy(send_bb);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_destroy(cq);
    return st->err;
}

int rpc_client_stream(rpc_client *c, const char *method, const ProtobufCMessage *req,
                      const ProtobufCMessageDescriptor *resp_desc, int64_t deadline_ns,
                      rpc_notify_fn notify, void *arg, rpc_stream **out)
{
    if (!c || !method || !req || !resp_desc || !out) return TD_EINVAL;
    *out = NULL;
    rpc_stream *s = calloc(1, sizeof(*s));
    if (!s) return TD_ENOMEM;
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        return TD_ENOMEM;
    }
    if (rpc__cond_init_mono(&s->cv) < 0) {
        pthread_mutex_destroy(&s->mu);
        free(s);
        return TD_ENOMEM;
    }
    int rc = rpc__pack(req, &s->send_bb);
    if (rc < 0) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        free(s);
        return rc;
    }
    s->cli = c;
    s->desc = resp_desc;
    s->notify = notify;
    s->notify_arg = arg;
    snprintf(s->method, sizeof(s->method), "%s", method);
    s->start_tag = (rpc__tag){TAG_STREAM_START, s};
    s->recv_tag = (rpc__tag){TAG_STREAM_RECV, s};
    s->status_tag = (rpc__tag){TAG_STREAM_STATUS, s};
    s->details = grpc_empty_slice();
    grpc_metadata_array_init(&s->init_md);
    grpc_metadata_array_init(&s->trail_md);
    grpc_slice mslice = grpc_slice_from_copied_string(method);
    s->call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, mslice,
                                       NULL, rpc__gpr_deadline(deadline_ns), NULL);
    grpc_slice_unref(mslice);
    atomic_fetch_add(&c->streams, 1);

    pthread_mutex_lock(&s->mu);
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = s->send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    RPC__HANDOFF(&s->start_tag);
    grpc_call_error ce1 = grpc_call_start_batch(s->call, ops, 3, &s->start_tag, NULL);
    s->start_inflight = ce1 == GRPC_CALL_OK;
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &s->trail_md;
    ops[0].data.recv_status_on_client.status = &s->code;
    ops[0].data.recv_status_on_client.status_details = &s->details;
    RPC__HANDOFF(&s->status_tag);
    grpc_call_error ce2 = grpc_call_start_batch(s->call, ops, 1, &s->status_tag, NULL);
    s->status_inflight = ce2 == GRPC_CALL_OK;
    if (ce1 == GRPC_CALL_OK && ce2 == GRPC_CALL_OK) rpc__stream_recv(s);
    pthread_mutex_unlock(&s->mu);
    if (ce1 != GRPC_CALL_OK || ce2 != GRPC_CALL_OK) {
        td_log_error(MOD, "start_batch_failed", "method=%s grpc_call_error=%d,%d", method, (int)ce1,
                     (int)ce2);
        rpc_stream_free(s);
        return TD_EINTERNAL;
    }
    *out = s;
    return 0;
}

/* rpc_stream_next's body; *pending (may be NULL) is set when the wait ended
 * with nothing there and the stream still open. */
static int rpc__stream_take(rpc_stream *s, int64_t wait_ns, ProtobufCMessage **msg, int *pending)
{
    if (pending) *pending = 0;
    if (!s || !msg) return TD_EINVAL;
    *msg = NULL;
    struct timespec until = rpc__abs_mono(wait_ns > 0 ? wait_ns : 0);
    int rc;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (s->ring_count > 0) {
            *msg = s->ring[s->ring_head];
            s->ring_head = (s->ring_head + 1) % RPC_STREAM_WINDOW;
            s->ring_count--;
            /* The buffer had been full: resume reading. */
            if (!s->recv_inflight && !s->eof) rpc__stream_recv(s);
            rc = 0;
            break;
        }
        if (s->local_err && !s->status_inflight) {
            s->status.err = s->local_err;
            rc = s->local_err;
            break;
        }
        if (s->eof && !s->status_inflight) {
            rc = s->status.err;
            break;
        }
        if (!s->eof && !s->recv_inflight) rpc__stream_recv(s);
        if (wait_ns == 0) {
            rc = TD_EAGAIN;
            if (pending) *pending = 1;
            break;
        }
        if (wait_ns < 0) {
            pthread_cond_wait(&s->cv, &s->mu);
        } else if (pthread_cond_timedwait(&s->cv, &s->mu, &until) == ETIMEDOUT) {
            wait_ns = 0; /* one last look, then TD_EAGAIN */
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int rpc_stream_next(rpc_stream *s, int64_t wait_ns, ProtobufCMessage **msg)
{
    return rpc__stream_take(s, wait_ns, msg, NULL);
}

int rpc_stream_poll(rpc_stream *s, ProtobufCMessage **msg)
{
    int pending = 0;
    int rc = rpc__stream_take(s, 0, msg, &pending);
    return pending ? RPC_PENDING : rc;
}

int rpc_stream_ended(rpc_stream *s)
{
    if (!s) return 1;
    pthread_mutex_lock(&s->mu);
    int ended = s->ring_count == 0 && (s->local_err || s->eof) && !s->status_inflight;
    pthread_mutex_unlock(&s->mu);
    return ended;
}

void rpc_stream_cancel(rpc_stream *s)
{
    if (s) grpc_call_cancel(s->call, NULL);
}

const rpc_status *rpc_stream_status(const rpc_stream *s)
{
    return &s->status;
}

void rpc_stream_free(rpc_stream *s)
{
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    if (s->status_inflight || s->recv_inflight) grpc_call_cancel(s->call, NULL);
    while (s->start_inflight || s->status_inflight || s->recv_inflight || s->in_notify)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    for (unsigned i = 0; i < s->ring_count; i++)
        protobuf_c_message_free_unpacked(s->ring[(s->ring_head + i) % RPC_STREAM_WINDOW], NULL);
    if (s->send_bb) grpc_byte_buffer_destroy(s->send_bb);
    if (s->recv_bb) grpc_byte_buffer_destroy(s->recv_bb);
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->init_md);
    grpc_metadata_array_destroy(&s->trail_md);
    grpc_call_unref(s->call);
    atomic_fetch_sub(&s->cli->streams, 1);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
