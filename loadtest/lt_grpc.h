/* lt_grpc: the gRPC transport of the replay: one Router.Generate server
 * stream per request (tandem.v1, common/rpc.h), driven from the replay's libuv
 * loop.
 *
 * Threads: rpc's client completion-queue thread runs a notify callback when a
 * stream has a message or ended; it only queues the request's index and wakes
 * the loop (uv_async_send). The loop thread drains the streams with
 * rpc_stream_next(wait 0), stamps and counts the tokens, and finishes records.
 * So records are only ever touched by the loop thread.
 *
 * Token counting: every GenerateResponse carrying token ids is one chunk
 * (arrival stamped when the loop drains it, after the thread hop); output
 * tokens are the final message's completion_tokens when set, else the sum of
 * token ids received.
 */
#ifndef TANDEM_LOADTEST_LT_GRPC_H
#define TANDEM_LOADTEST_LT_GRPC_H

#include "loadtest/lt_report.h"
#include "loadtest/lt_trace.h"

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct lt_replay_opts;
typedef struct lt_grpc lt_grpc;

/* Runs on the loop thread when request i has finished (its record is final). */
typedef void (*lt_grpc_done_fn)(void *arg, size_t i);

/* target: "host:port" (copied). recs[n] and reqs[n] are borrowed and must
 * outlive the lt_grpc. Registers one async handle on loop. TD_EUNSUPPORTED
 * when built without gRPC; TD_EINVAL, TD_ENOMEM. */
int lt_grpc_create(uv_loop_t *loop, const char *target, const struct lt_replay_opts *o,
                   const lt_req *reqs, lt_record *recs, size_t n, lt_grpc_done_fn done, void *arg,
                   lt_grpc **out);

/* Starts request i now; start_ns is the run's t = 0 (td_now_ns clock). A
 * request that cannot start is finished as an error (done runs). */
void lt_grpc_send(lt_grpc *g, size_t i, int64_t start_ns);

/* Closes the async handle (the loop can then end). Streams still open are
 * cancelled and freed (their requests are not reported). */
void lt_grpc_close(lt_grpc *g);

/* Frees everything after the loop has ended. Accepts NULL. */
void lt_grpc_free(lt_grpc *g);

#endif
