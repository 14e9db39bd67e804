/* sch: continuous-batching scheduler core (vLLM v1 style). Pure logic: no
 * threads, no I/O, no tensors; deterministic for a given call sequence.
 *
 * The engine's step loop:
 *   sch_schedule(s, &step)        which tokens of which sequences to compute now
 *   forward pass over step.items  (KV slots from kvc_seq_table(pool, item.kv_seq))
 *   sample one token per item with item.sample
 *   sch_update(s, results, ...)   report the tokens, get the finished sequences
 *
 * Each step fills a token budget (max_num_batched_tokens) over at most
 * max_num_seqs running sequences, in this order:
 *   1. running sequences that decode: one token each;
 *   2. running sequences still in prefill: the next chunk of their prompt (a long
 *      prompt is split into chunks across steps);
 *   3. admission of waiting sequences, head first, while the budget, the running
 *      limit and KV blocks last: the prefix cache may supply the start of the
 *      prompt, the rest is prefilled in chunks. Admission stops at the first
 *      sequence that does not fit (FCFS, no overtaking).
 * When a running sequence needs a block and none is left, the lowest-priority
 * running sequence (largest priority value, then latest arrival) is preempted by
 * recompute: its blocks are freed and it goes back to the waiting queue, where
 * its prompt and generated tokens are computed again once admitted. No new
 * sequence is admitted in a step that preempted.
 *
 * Sequence states:
 *   WAITING  --admitted (blocks allocated)-->  RUNNING
 *   RUNNING  --preempted-->  WAITING (front, by priority and arrival)
 *   RUNNING  --finished (sch_update) / aborted-->  gone
 * sch_add_prefilled enters RUNNING directly (decode workers: the KV arrived from
 * a prefill worker), or WAITING with its KV kept when max_num_seqs are running.
 *
 * Modes: prefill workers set prefill_only (a sequence finishes once its prompt
 * is computed and its first token sampled; it takes the blocks of its whole
 * prompt at admission, so it is never preempted) and hold_kv_on_finish (the
 * caller keeps the blocks until they are sent; sch_detach does the same for a
 * cancelled one); decode workers use sch_add_prefilled.
 *
 * Not thread-safe: one scheduler (and its kvc pool) per engine thread.
 */
#ifndef TANDEM_ENGINE_SCHED_SCH_H
#define TANDEM_ENGINE_SCHED_SCH_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/kvcache/kvc.h"

typedef struct sch sch;

typedef struct sch_config {
    uint32_t max_num_batched_tokens; /* token budget of one step, >= max_num_seqs */
    uint32_t max_num_seqs;           /* running sequences at once, >= 1 */
    uint32_t max_chunk_tokens;       /* cap on one sequence's prefill chunk per step, so
                                        several prompts progress together; 0 = none */
    uint32_t max_seqs;               /* sequences known at once (waiting + running);
                                        0 means 4 * max_num_seqs */
    uint32_t max_model_len;          /* prompt + generated tokens of one sequence;
                                        must fit in the pool and in one block table */
    bool prefill_only;               /* finish each sequence after its first sampled token */
    bool hold_kv_on_finish;          /* finished sequences hand their kvc sequence to the caller */
    bool check_kv; /* run kvc_check after each schedule and update (tests, debug) */
} sch_config;

typedef struct sch_request {
    uint64_t req_id;         /* caller's id, unique among live sequences */
    const int32_t *prompt;   /* n_prompt token ids; copied by sch_add */
    uint32_t n_prompt;       /* >= 1 */
    uint32_t max_new_tokens; /* >= 1; clamped so that prompt + generated <= max_model_len */
    int32_t priority;        /* lower runs first; equal priorities are FCFS */
} sch_request;

/* One sequence's share of a step: compute positions [start, start + n). */
typedef struct sch_item {
    uint64_t req_id;
    int64_t kv_seq;        /* kvc sequence: its block table gives every slot */
    const int32_t *tokens; /* n token ids at positions start..start+n-1 (tokens - start
                              is the whole sequence); owned by the scheduler, valid
                              until sch_update */
    uint32_t start;        /* positions [0, start) are already in the KV cache */
    uint32_t n;            /* tokens to compute, >= 1 */
    bool sample;           /* sample a token from the logits of position start + n - 1 */
    bool prefill;          /* prompt (or recompute) chunk rather than a decode token */
} sch_item;

typedef struct sch_step {
    const sch_item *items; /* decode items first, then prefill chunks; owned by the
                              scheduler, valid until the next sch_schedule */
    uint32_t n_items;
    uint32_t n_tokens; /* flattened batch size: sum of items[i].n */
    uint32_t n_prefill_tokens;
    uint32_t n_decode_tokens;
    const uint64_t *preempted; /* req ids preempted this step (KV freed, recomputed later) */
    uint32_t n_preempted;
} sch_step;

enum sch_finish {
    SCH_FINISH_NONE = 0,
    SCH_FINISH_STOP = 1,      /* the caller said stop (EOS, stop string) */
    SCH_FINISH_LENGTH = 2,    /* max_new_tokens or max_model_len reached */
    SCH_FINISH_PREFILLED = 3, /* prefill_only: prompt done, first token sampled */
};

/* What the caller reports for items[i] of the step (one entry per item). */
typedef struct sch_result {
    int32_t token; /* the sampled token; ignored when !items[i].sample */
    bool stop;     /* finish the sequence after this token; ignored when !sample */
} sch_result;

typedef struct sch_finished {
    uint64_t req_id;
    enum sch_finish reason;
    const int32_t *tokens; /* prompt then generated tokens, n_tokens of them; valid
                              until the next sch_schedule, sch_update or sch_add */
    uint32_t n_tokens;
    uint32_t n_prompt;
    uint32_t n_preemptions;
    int64_t kv_seq; /* hold_kv_on_finish: the caller now owns this kvc sequence (its
                       computed blocks are committed) and frees it; else -1 */
} sch_finished;

typedef struct sch_stats {
    uint32_t n_waiting;
    uint32_t n_running;
    uint64_t queued_prefill_tokens; /* tokens still to prefill, waiting + running */
    uint64_t steps;
    uint64_t preemptions;
    uint64_t scheduled_tokens;
    uint64_t finished;
} sch_stats;

/* Creates a scheduler over pool (borrowed: it must outlive the scheduler and is
 * used by no one else while sequences run, except kvc_seq_free on held
 * sequences). cfg is read during the call. TD_EINVAL for a bad config (e.g.
 * max_model_len that could not fit in the pool), TD_ENOMEM. */
int sch_create(const sch_config *cfg, kvc_pool *pool, sch **out);

/* Frees the scheduler and the kvc sequences of all its sequences (held ones
 * belong to the caller already). NULL is accepted. */
void sch_free(sch *s);

/* Queues a request (WAITING). The prompt is copied. TD_EEXIST (req_id live),
 * TD_ETOOLONG (prompt >= max_model_len), TD_ENOSPC (max_seqs known), TD_EINVAL. */
int sch_add(sch *s, const sch_request *req);

/* Decode workers: adds a request whose prompt KV is already in kv_seq (all
 * n_prompt tokens committed with kvc_seq_commit) and whose
 * first token was sampled by the prefill worker. Enters RUNNING directly (or
 * waits with its KV when max_num_seqs are running). max_new_tokens counts the
 * first token, so it must be >= 2 (else there is nothing to decode: TD_EINVAL).
 * On success the scheduler owns kv_seq; on error the caller still does. */
int sch_add_prefilled(sch *s, const sch_request *req, int64_t kv_seq, int32_t first_token);

/* Drops a request wherever it is and frees its blocks. If it is part of the step
 * in flight, its result is ignored and it goes away at sch_update. It is not
 * reported as finished. TD_ENOENT if unknown. */
int sch_abort(sch *s, uint64_t req_id);

/* Drops a request like sch_abort but hands its kvc sequence (or -1 when it
 * holds none) to the caller in *kv_seq instead of freeing it: a prefill
 * worker keeps the blocks until the transfer reading them has ended.
 * TD_ENOENT if unknown, TD_EAGAIN while it is part of the step in flight
 * (call again after sch_update). */
int sch_detach(sch *s, uint64_t req_id, int64_t *kv_seq);

/* Builds the next step into *out. An empty step (n_items 0) means nothing can
 * run now; it needs no sch_update. TD_EINVAL if the previous non-empty step was
 * not updated yet. */
int sch_schedule(sch *s, sch_step *out);

/* Reports the results of the last step: results[i] for items[i], n_results ==
 * n_items. Advances every sequence, commits its KV to the prefix cache, appends
 * sampled tokens, finishes sequences (caller's stop, length, prefill_only).
 * *finished (may be NULL with n_finished NULL) lists them, owned by the
 * scheduler, valid until the next sch_schedule, sch_update or sch_add. */
int sch_update(sch *s, const sch_result *results, uint32_t n_results, const sch_finished **finished,
               uint32_t *n_finished);

/* Flattens step (the last sch_schedule's) into the arrays a forward pass takes
 * (engine/backend's be_batch). For batch row j (items in order, n positions
 * each): tokens[j], pos[j] and seq[j] (the item index). For item i: tables[i]
 * and n_blocks[i], its block table (the pool's memory, valid until the pool
 * changes). out_rows[0, *n_out): the rows whose logits are sampled, one per
 * item with sample set, in item order (so results[i] of sch_update is the
 * sample of the item owning out_rows' entry). All arrays are the caller's:
 * tokens, pos and seq hold step->n_tokens entries; tables, n_blocks and
 * out_rows step->n_items. TD_EINVAL if step is not the step in flight. */
int sch_step_flatten(const sch *s, const sch_step *step, int32_t *tokens, int32_t *pos,
                     int32_t *seq, const int32_t **tables, int32_t *n_blocks, int32_t *out_rows,
                     int32_t *n_out);

/* Tokens (prompt then generated) of a live request, owned by the scheduler,
 * valid until the next call that changes it. NULL if unknown. O(max_seqs). */
const int32_t *sch_seq_tokens(const sch *s, uint64_t req_id, uint32_t *n_tokens);

void sch_stats_get(const sch *s, sch_stats *out);

#endif
