/* rpc: gRPC (C core) server and client carrying protobuf-c messages.
 *
 * This is the only module that touches the gRPC C core API. Everything else in
 * Tandem sees protobuf-c messages in, protobuf-c messages out, TD_E* codes and
 * monotonic deadlines (td_now_ns() base, nanoseconds).
 *
 * Methods are named by their full gRPC path, "/tandem.v1.Decode/Generate".
 * Unary and server-streaming calls are the same on the wire (one request
 * message, zero or more response messages, a status), so one call handle
 * serves both; "unary" only means the handler replies with exactly one message.
 *
 * Threads
 *   Server: one completion-queue (CQ) thread per rpc_server, started by
 *   rpc_server_start. It accepts calls, decodes requests and runs the handlers
 *   and cancel callbacks. Handlers must not block: reply at once, or hand the
 *   call to another thread (an engine thread) through a queue and return.
 *   rpc_call_send, rpc_call_finish, rpc_call_cancelled and
 *   rpc_call_deadline_ns are safe from any thread; a send never blocks on the
 *   network (messages queue behind the one in flight, in order).
 *
 *   Client: one CQ thread per rpc_client, for streams. rpc_client_unary blocks
 *   the calling thread (its own completion queue, no thread hop). Stream
 *   messages are decoded on the CQ thread into a bounded per-stream buffer
 *   (RPC_STREAM_WINDOW messages; when it is full the stream stops reading and
 *   HTTP/2 flow control pushes back on the server) and taken with
 *   rpc_stream_next from any one thread at a time. An optional notify callback
 *   runs on the CQ thread when a message or the end arrives, so an event loop
 *   can wake itself (uv_async_send) and drain with rpc_stream_next(wait 0).
 *
 * Async contract (server calls)
 *   A handler that is run owns one reference to the call and must release it
 *   with exactly one rpc_call_finish, from any thread, also after the call was
 *   cancelled (the finish is then a no-op on the wire). Until then the call
 *   and its request message stay valid. rpc_server_free cancels calls in
 *   flight and waits until every handed-out call is finished.
 *   The cancel callback runs at most once, on the CQ thread, when the client
 *   cancels, the deadline passes or the server shuts down, and only if the
 *   call was not finished before the cancellation was seen; the call pointer is
 *   valid during the callback. It may run concurrently with rpc_call_send or
 *   rpc_call_finish on another thread; it may itself call rpc_call_finish.
 *
 * Errors
 *   gRPC statuses map to TD_E* codes (UNAVAILABLE -> TD_EUNAVAILABLE,
 *   DEADLINE_EXCEEDED -> TD_ETIMEDOUT, CANCELLED -> TD_ECANCELED,
 *   INVALID_ARGUMENT -> TD_EINVAL, ...). A server that finishes with a TD code
 *   also sends it in the trailing metadata key "tandem-err", so the client gets
 *   the exact code back (TD_EAGAIN and TD_EDECLINED both travel as
 *   RESOURCE_EXHAUSTED but stay distinct). A request payload that does not
 *   decode is answered INVALID_ARGUMENT by the server itself; the handler is
 *   not run. Unknown methods get UNIMPLEMENTED.
 */
#ifndef TANDEM_COMMON_RPC_H
#define TANDEM_COMMON_RPC_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* No deadline. */
#define RPC_NO_DEADLINE INT64_MAX

/* Decoded messages a client stream buffers ahead of its reader. */
#define RPC_STREAM_WINDOW 64

/* Largest message either side accepts, bytes. */
#define RPC_MAX_MESSAGE_BYTES (64 * 1024 * 1024)

/* Outcome of a finished call as the client saw it. */
typedef struct rpc_status {
    int err;           /* 0 or a TD_E* code */
    int grpc_code;     /* grpc_status_code as sent by the peer or the library */
    char details[256]; /* status message, truncated, NUL-terminated */
    int from_peer;     /* 1: the peer's application ended the call with this status (it sent
                          its TD code); 0: the library or the transport did (peer gone,
                          connection refused, deadline) */
} rpc_status;

/* Deadline (td_now_ns() clock) for a RequestMeta.timeout_ms budget received
 * now; 0 (no budget) gives RPC_NO_DEADLINE. */
int64_t rpc_deadline_from_timeout_ms(uint64_t timeout_ms);

/* Budget to put in RequestMeta.timeout_ms of the next hop: milliseconds left
 * until deadline_ns, at least 1 when the deadline has passed (so it is not
 * read as "no deadline"), 0 for RPC_NO_DEADLINE. */
uint64_t rpc_timeout_ms_left(int64_t deadline_ns);

/* Maps a gRPC status code to a TD_E* code (0 for OK). */
int rpc_err_from_grpc(int grpc_code);
/* Maps a TD_E* code to the gRPC status code a server sends for it (0 for 0). */
int rpc_grpc_from_err(int err);

/* ---------------------------------------------------------------- server -- */

typedef struct rpc_server rpc_server;
typedef struct rpc_call rpc_call;

/* Runs on the server's CQ thread for each call of a registered method.
 * call: owned by the library; the handler (or whoever it hands the call to)
 *       must call rpc_call_finish on it exactly once.
 * req:  the decoded request, of the descriptor given at registration; owned by
 *       the call, valid until rpc_call_finish.
 * arg:  the pointer given at registration. */
typedef void (*rpc_handler_fn)(rpc_call *call, const ProtobufCMessage *req, void *arg);

/* Runs on the CQ thread when the call is cancelled (see the contract above). */
typedef void (*rpc_cancel_fn)(rpc_call *call, void *arg);

/* Creates a server listening on addr ("127.0.0.1:0" picks a free port; read it
 * back with rpc_server_port). Methods are added next, then rpc_server_start.
 * Returns 0, TD_EINVAL (bad address), TD_EIO (cannot bind) or TD_ENOMEM. */
int rpc_server_create(const char *addr, rpc_server **out);

/* Registers a method before rpc_server_start. method: full path, copied.
 * req_desc: descriptor of the request message (static, generated code).
 * Returns 0, TD_EINVAL (started already, bad arguments), TD_EEXIST or
 * TD_ENOMEM. */
int rpc_server_add_method(rpc_server *s, const char *method,
                          const ProtobufCMessageDescriptor *req_desc, rpc_handler_fn fn, void *arg);

/* Starts serving on the server's own CQ thread. Returns 0, TD_EINVAL (already
 * started) or TD_EIO. */
int rpc_server_start(rpc_server *s);

/* Bound TCP port. */
int rpc_server_port(const rpc_server *s);

/* Stops accepting calls, cancels calls in flight (their cancel callbacks run),
 * waits until every call handed to a handler has been finished (from whatever
 * thread holds it) and frees everything. Must not be called from a handler or
 * a cancel callback. Accepts NULL. */
void rpc_server_free(rpc_server *s);

/* Queues msg for sending on a call; msg is serialised before return (the
 * caller keeps ownership of msg). Any thread, never after rpc_call_finish.
 * When no send is in flight the gRPC batch starts on the calling thread (gRPC
 * may write the socket there); later ones start on the CQ thread as each
 * previous send completes, so messages go out in order, one at a time. The
 * queue is not bounded: a producer that can outrun the client should bound
 * itself (token streams are bounded by max_tokens).
 * Returns 0, TD_ECANCELED when the call is cancelled (nothing sent; the
 * caller should stop and finish), TD_EINVAL for a NULL message, TD_ETOOLONG
 * over RPC_MAX_MESSAGE_BYTES, TD_ENOMEM. */
int rpc_call_send(rpc_call *call, const ProtobufCMessage *msg);

/* Ends the call: the status is sent after every queued message. err: 0 for OK
 * or a TD_E* code; details: status message for the client (copied, may be
 * NULL). Releases the caller's reference: the call and its request must not be
 * used after this returns. Any thread. Returns 0 or TD_ECANCELED when the call
 * had already been cancelled (the call is released all the same). */
int rpc_call_finish(rpc_call *call, int err, const char *details);

/* rpc_call_finish with the details formatted (printf; at most 255 bytes). */
int rpc_call_finishf(rpc_call *call, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Sends msg and finishes with OK: the usual end of a unary call (message and
 * status go out in one batch). Same rules as rpc_call_finish: the call is
 * released even on error; a msg that cannot be serialised ends the call with
 * INTERNAL and its code is returned. */
int rpc_call_reply(rpc_call *call, const ProtobufCMessage *msg);

/* Sets the cancel callback. Call it from the handler (on the CQ thread) so no
 * cancellation can be missed; if the call is already cancelled, fn runs before
 * this returns. */
void rpc_call_on_cancel(rpc_call *call, rpc_cancel_fn fn, void *arg);

/* Whether the call was cancelled (client gone, deadline, shutdown). Any thread;
 * cheap (one atomic load), meant to be polled by an engine step loop. */
int rpc_call_cancelled(const rpc_call *call);

/* Call deadline on the td_now_ns() clock, or RPC_NO_DEADLINE. */
int64_t rpc_call_deadline_ns(const rpc_call *call);

/* Full method path of the call ("/tandem.v1.Decode/Generate"); static for the
 * life of the call. */
const char *rpc_call_method(const rpc_call *call);

/* ---------------------------------------------------------------- client -- */

typedef struct rpc_client rpc_client;
typedef struct rpc_stream rpc_stream;

/* Runs on the client's CQ thread when a stream has a new message or ended.
 * Must not block and must not call rpc_stream_free; typically wakes the reader. */
typedef void (*rpc_notify_fn)(rpc_stream *stream, void *arg);

/* Creates a client for target ("127.0.0.1:7000"). Connects lazily; a server
 * that is down makes calls fail at once with TD_EUNAVAILABLE (no waiting for
 * it to come up). target is copied. Returns 0, TD_EINVAL or TD_ENOMEM. */
int rpc_client_create(const char *target, rpc_client **out);

/* Frees the client. Every stream must have been freed. Accepts NULL. */
void rpc_client_free(rpc_client *c);

/* Calls a method with one request and one response, blocking the caller.
 * deadline_ns: td_now_ns() clock or RPC_NO_DEADLINE. On success *resp is a new
 * message of resp_desc owned by the caller (free it with
 * protobuf_c_message_free_unpacked(msg, NULL)). status (optional) receives the
 * outcome either way. Returns 0 or the TD_E* code of the status
 * (TD_EPROTO when the server sent no message or one that does not decode). Any thread,
 * concurrently. */
int rpc_client_unary(rpc_client *c, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_desc, int64_t deadline_ns,
                     ProtobufCMessage **resp, rpc_status *status);

/* Starts a server-streaming call. notify (optional) and arg: see rpc_notify_fn.
 * On success *out is a stream owned by the caller, freed with rpc_stream_free.
 * Returns 0, TD_EINVAL or TD_ENOMEM; call failures (server down, deadline)
 * surface from rpc_stream_next. */
int rpc_client_stream(rpc_client *c, const char *method, const ProtobufCMessage *req,
                      const ProtobufCMessageDescriptor *resp_desc, int64_t deadline_ns,
                      rpc_notify_fn notify, void *arg, rpc_stream **out);

/* Takes the next message. wait_ns: 0 polls, < 0 waits without limit, > 0 waits
 * at most that long. Returns:
 *   0 with *msg set: a message, owned by the caller (free with
 *     protobuf_c_message_free_unpacked(msg, NULL));
 *   0 with *msg NULL: the stream ended with status OK;
 *   TD_EAGAIN: nothing yet (wait expired);
 *   another TD_E* code: the stream failed (see rpc_stream_status).
 * Messages that arrived before a failure are returned first. One reader thread
 * at a time. */
int rpc_stream_next(rpc_stream *s, int64_t wait_ns, ProtobufCMessage **msg);

/* Nothing there yet (rpc_stream_poll): a positive value, never a TD_E* code. */
#define RPC_PENDING 1

/* rpc_stream_next without waiting, for event loops: RPC_PENDING when nothing
 * is there yet and the stream is still open; otherwise exactly what
 * rpc_stream_next returns, so a stream that ended with TD_EAGAIN (the
 * server's "try again later") is told apart from "nothing yet" in one call,
 * with no window between two. */
int rpc_stream_poll(rpc_stream *s, ProtobufCMessage **msg);

/* Cancels the call (the server sees the cancellation); later rpc_stream_next
 * calls return TD_ECANCELED once the buffered messages are taken. Any thread,
 * also from the notify callback. Idempotent. */
void rpc_stream_cancel(rpc_stream *s);

/* Whether the stream has ended: rpc_stream_next will return no more messages
 * and its status is final. Tells a TD_EAGAIN end status (the server's "try
 * again later") from rpc_stream_next's "nothing yet". Any thread. */
int rpc_stream_ended(rpc_stream *s);

/* Final status, valid once rpc_stream_next returned the end or an error. */
const rpc_status *rpc_stream_status(const rpc_stream *s);

/* Cancels the call if it is still running, waits for the library to let go of
 * it, and frees the stream with any unread messages. Not from the notify
 * callback. Accepts NULL. */
void rpc_stream_free(rpc_stream *s);

#endif
