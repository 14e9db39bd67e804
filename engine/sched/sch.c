/* sch: continuous-batching scheduler core. See sch.h for the policy. */
#include "engine/sched/sch.h"

#include "common/err.h"
#include "common/log.h"

#include <stdlib.h>
#include <string.h>

enum { SEQ_FREE = 0, SEQ_WAITING, SEQ_RUNNING, SEQ_DONE };

#define NO_ITEM (-1)

typedef struct sch_seq {
    uint64_t req_id;
    int32_t *tokens; /* cap entries: prompt then generated */
    uint32_t cap;    /* n_prompt + max_new_tokens */
    uint32_t n_prompt;
    uint32_t n_tokens;   /* prompt + generated so far */
    uint32_t n_computed; /* positions whose KV is in the cache */
    uint32_t max_new;
    uint32_t n_generated;
    uint32_t n_preempt;
    int32_t priority;
    uint64_t arrival; /* admission order key among equal priorities */
    int64_t kv;       /* kvc sequence, -1 when none */
    int32_t item;     /* index in the current step's items, NO_ITEM */
    uint8_t state;
    bool aborted; /* abort asked while in the step in flight */
} sch_seq;

struct sch {
    sch_config cfg;
    kvc_pool *pool;

    sch_seq *seqs;        /* max_seqs */
    uint32_t *free_slots; /* stack */
    uint32_t n_free_slots;
    uint32_t *waiting; /* slots, sorted by (priority, arrival) */
    uint32_t n_waiting;
    uint32_t *running; /* slots, sorted by (priority, arrival); max_num_seqs */
    uint32_t n_running;
    uint32_t *done; /* slots finished by the last call, released by the next one */
    uint32_t n_done;

    /* step in flight */
    sch_item *items;     /* max_num_seqs */
    uint32_t *item_slot; /* max_num_seqs */
    uint32_t n_items;
    uint64_t *preempted; /* max_seqs */
    uint32_t n_preempted;
    sch_finished *finished; /* max_num_seqs */
    uint32_t n_finished;
    bool in_flight;

    uint64_t next_arrival;
    sch_stats st;
};

/* ---- ordered slot arrays ---- */

static bool seq_before(const sch *s, uint32_t a, uint32_t b)
{
    const sch_seq *x = &s->seqs[a], *y = &s->seqs[b];
    if (x->priority != y->priority) return x->priority < y->priority;
    return x->arrival < y->arrival;
}

static void list_insert(const sch *s, uint32_t *list, uint32_t *n, uint32_t slot)
{
    uint32_t i = *n;
    while (i > 0 && seq_before(s, slot, list[i - 1]))
        i--;
    memmove(list + i + 1, list + i, (*n - i) * sizeof *list);
    list[i] = slot;
    (*n)++;
}

static void list_remove(uint32_t *list, uint32_t *n, uint32_t slot)
{
    for (uint32_t i = 0; i < *n; i++) {
        if (list[i] != slot) continue;
        memmove(list + i, list + i + 1, (*n - i - 1) * sizeof *list);
        (*n)--;
        return;
    }
}

/* ---- life cycle ---- */

int sch_create(const sch_config *cfg, kvc_pool *pool, sch **out)
{
    if (!cfg || !pool || !out) return TD_EINVAL;
    *out = NULL;
    sch_config c = *cfg;
    if (c.max_seqs == 0) c.max_seqs = 4 * c.max_num_seqs;
    /* A budget below max_num_seqs would leave some running sequences out of
     * every step (the same ones, in priority order): starvation. */
    if (c.max_num_batched_tokens == 0 || c.max_num_seqs == 0 || c.max_model_len == 0 ||
        c.max_num_batched_tokens < c.max_num_seqs || c.max_seqs < c.max_num_seqs ||
        c.max_seqs > (1u << 24)) {
        td_log_error("sch", "bad_config", "max_num_batched_tokens=%u max_num_seqs=%u max_seqs=%u",
                     c.max_num_batched_tokens, c.max_num_seqs, c.max_seqs);
        return TD_EINVAL;
    }
    /* A sequence of max_model_len tokens must fit alone, or preemption could
     * never make room for it. */
    uint32_t need = kvc_blocks_for(pool, c.max_model_len);
    if (need > kvc_num_blocks(pool) || need > kvc_max_blocks_per_seq(pool)) {
        td_log_error("sch", "bad_config", "max_model_len=%u blocks=%u pool_blocks=%u",
                     c.max_model_len, need, kvc_num_blocks(pool));
        return TD_EINVAL;
    }
    sch *s = calloc(1, sizeof *s);
    if (!s) return TD_ENOMEM;
    s->cfg = c;
    s->pool = pool;
    s->seqs = calloc(c.max_seqs, sizeof *s->seqs);
    s->free_slots = malloc(c.max_seqs * sizeof *s->free_slots);
    s->waiting = malloc(c.max_seqs * sizeof *s->waiting);
    s->running = malloc(c.max_num_seqs * sizeof *s->running);
    s->done = malloc(c.max_seqs * sizeof *s->done);
    s->items = calloc(c.max_num_seqs, sizeof *s->items);
    s->item_slot = malloc(c.max_num_seqs * sizeof *s->item_slot);
    s->preempted = malloc(c.max_seqs * sizeof *s->preempted);
    s->finished = calloc(c.max_num_seqs, sizeof *s->finished);
    if (!s->seqs || !s->free_slots || !s->waiting || !s->running || !s->done || !s->items ||
        !s->item_slot || !s->preempted || !s->finished) {
        sch_free(s);
        return TD_ENOMEM;
    }
    for (uint32_t i = 0; i < c.max_seqs; i++) {
        s->free_slots[i] = c.max_seqs - 1 - i;
        s->seqs[i].kv = -1;
        s->seqs[i].item = NO_ITEM;
    }
    s->n_free_slots = c.max_seqs;
    *out = s;
    return 0;
}

void sch_free(sch *s)
{
    if (!s) return;
    if (s->seqs) {
        for (uint32_t i = 0; i < s->cfg.max_seqs; i++) {
            sch_seq *q = &s->seqs[i];
            if (q->state != SEQ_FREE && q->state != SEQ_DONE && q->kv > 0)
                kvc_seq_free(s->pool, q->kv);
            free(q->tokens);
        }
    }
    free(s->seqs);
    free(s->free_slots);
    free(s->waiting);
    free(s->running);
    free(s->done);
    free(s->items);
    free(s->item_slot);
    free(s->preempted);
    free(s->finished);
    free(s);
}

static void slot_release(sch *s, uint32_t slot)
{
    sch_seq *q = &s->seqs[slot];
    free(q->tokens);
    memset(q, 0, sizeof *q);
    q->kv = -1;
    q->item = NO_ITEM;
    s->free_slots[s->n_free_slots++] = slot;
}

/* Finished sequences keep their tokens until the next call so that the
 * caller can read sch_finished.tokens. */
static void reap_done(sch *s)
{
    for (uint32_t i = 0; i < s->n_done; i++)
        slot_release(s, s->done[i]);
    s->n_done = 0;
    s->n_finished = 0;
}

static sch_seq *find_req(const sch *s, uint64_t req_id, uint32_t *slot)
{
    for (uint32_t i = 0; i < s->cfg.max_seqs; i++) {
        sch_seq *q = &s->seqs[i];
        if ((q->state == SEQ_WAITING || q->state == SEQ_RUNNING) && q->req_id == req_id) {
            if (slot) *slot = i;
            return q;
        }
    }
    return NULL;
}

static int seq_new(sch *s, const sch_request *req, uint32_t *slot_out)
{
    if (!req || (req->n_prompt > 0 && !req->prompt) || req->n_prompt == 0 ||
        req->max_new_tokens == 0)
        return TD_EINVAL;
    if (req->n_prompt >= s->cfg.max_model_len) return TD_ETOOLONG;
    if (find_req(s, req->req_id, NULL)) return TD_EEXIST;
    if (s->n_free_slots == 0) return TD_ENOSPC;
    uint32_t max_new = req->max_new_tokens;
    if (max_new > s->cfg.max_model_len - req->n_prompt)
        max_new = s->cfg.max_model_len - req->n_prompt;
    uint32_t cap = req->n_prompt + max_new; /* <= max_model_len: no overflow */
    int32_t *tokens = malloc((size_t)cap * sizeof *tokens);
    if (!tokens) return TD_ENOMEM;
    memcpy(tokens, req->prompt, (size_t)req->n_prompt * sizeof *tokens);
    uint32_t slot = s->free_slots[--s->n_free_slots];
    sch_seq *q = &s->seqs[slot];
    q->req_id = req->req_id;
    q->tokens = tokens;
    q->cap = cap;
    q->n_prompt = q->n_tokens = req->n_prompt;
    q->max_new = max_new;
    q->priority = req->priority;
    q->arrival = s->next_arrival++;
    q->kv = -1;
    q->item = NO_ITEM;
    *slot_out = slot;
    return 0;
}

int sch_add(sch *s, const sch_request *req)
{
    if (!s) return TD_EINVAL;
    reap_done(s);
    uint32_t slot;
    int rc = seq_new(s, req, &slot);
    if (rc < 0) return rc;
    s->seqs[slot].state = SEQ_WAITING;
    list_insert(s, s->waiting, &s->n_waiting, slot);
    return 0;
}

int sch_add_prefilled(sch *s, const sch_request *req, int64_t kv_seq, int32_t first_token)
{
    if (!s || !req) return TD_EINVAL;
    reap_done(s);
    kvc_seq_info info;
    int rc = kvc_seq_get_info(s->pool, kv_seq, &info);
    if (rc < 0) return rc;
    if (info.n_tokens != req->n_prompt || info.n_committed != req->n_prompt) return TD_EINVAL;
    /* The first token came with the prompt: nothing left to decode? */
    if (req->max_new_tokens < 2 || req->n_prompt + 1 >= s->cfg.max_model_len) return TD_EINVAL;
    uint32_t slot;
    rc = seq_new(s, req, &slot);
    if (rc < 0) return rc;
    sch_seq *q = &s->seqs[slot];
    q->tokens[q->n_tokens++] = first_token;
    q->n_generated = 1;
    q->n_computed = req->n_prompt;
    q->kv = kv_seq;
    if (s->n_running < s->cfg.max_num_seqs) {
        q->state = SEQ_RUNNING;
        list_insert(s, s->running, &s->n_running, slot);
    } else {
        /* Keeps its KV; admitted (no allocation but the next slot) when a
         * running sequence leaves. */
        q->state = SEQ_WAITING;
        list_insert(s, s->waiting, &s->n_waiting, slot);
    }
    return 0;
}

int sch_abort(sch *s, uint64_t req_id)
{
    if (!s) return TD_EINVAL;
    uint32_t slot;
    sch_seq *q = find_req(s, req_id, &slot);
    if (!q) return TD_ENOENT;
    if (q->aborted) return TD_ENOENT;
    if (s->in_flight && q->item != NO_ITEM) {
        q->aborted = true; /* the forward pass may be using its blocks */
        return 0;
    }
    if (q->state == SEQ_WAITING)
        list_remove(s->waiting, &s->n_waiting, slot);
    else
        list_remove(s->running, &s->n_running, slot);
    if (q->kv > 0) kvc_seq_free(s->pool, q->kv);
    slot_release(s, slot);
    return 0;
}

int sch_detach(sch *s, uint64_t req_id, int64_t *kv_seq)
{
    if (!s || !kv_seq) return TD_EINVAL;
    *kv_seq = -1;
    uint32_t slot;
    sch_seq *q = find_req(s, req_id, &slot);
    if (!q || q->aborted) return TD_ENOENT;
    if (s->in_flight && q->item != NO_ITEM) return TD_EAGAIN;
    if (q->state == SEQ_WAITING)
        list_remove(s->waiting, &s->n_waiting, slot);
    else
        list_remove(s->running, &s->n_running, slot);
    *kv_seq = q->kv;
    slot_release(s, slot);
    return 0;
}

/* ---- scheduling ---- */

static int check_pool(const sch *s)
{
    if (!s->cfg.check_kv) return 0;
    return kvc_check(s->pool);
}

static void add_item(sch *s, sch_step *st, uint32_t slot, uint32_t n)
{
    sch_seq *q = &s->seqs[slot];
    uint32_t k = s->n_items++;
    sch_item *it = &s->items[k];
    it->req_id = q->req_id;
    it->kv_seq = q->kv;
    it->tokens = q->tokens + q->n_computed;
    it->start = q->n_computed;
    it->n = n;
    it->sample = q->n_computed + n == q->n_tokens;
    it->prefill = !(q->n_computed >= q->n_prompt && q->n_tokens - q->n_computed == 1);
    s->item_slot[k] = slot;
    q->item = (int32_t)k;
    st->n_tokens += n;
    if (it->prefill)
        st->n_prefill_tokens += n;
    else
        st->n_decode_tokens += n;
}

static void drop_item(sch *s, sch_step *st, uint32_t k)
{
    sch_item *it = &s->items[k];
    st->n_tokens -= it->n;
    if (it->prefill)
        st->n_prefill_tokens -= it->n;
    else
        st->n_decode_tokens -= it->n;
    s->seqs[s->item_slot[k]].item = NO_ITEM;
    memmove(s->items + k, s->items + k + 1, (s->n_items - k - 1) * sizeof *s->items);
    memmove(s->item_slot + k, s->item_slot + k + 1, (s->n_items - k - 1) * sizeof *s->item_slot);
    s->n_items--;
    for (uint32_t i = k; i < s->n_items; i++)
        s->seqs[s->item_slot[i]].item = (int32_t)i;
}

/* Preempts the lowest-priority running sequence (the last of the sorted running
 * list) by recompute. Returns its slot; *budget gets its tokens back if it had
 * been scheduled in this step. */
static uint32_t preempt_last(sch *s, sch_step *st, uint32_t *budget)
{
    uint32_t slot = s->running[--s->n_running];
    sch_seq *q = &s->seqs[slot];
    if (q->item != NO_ITEM) {
        *budget += s->items[q->item].n;
        drop_item(s, st, (uint32_t)q->item);
    }
    kvc_seq_free(s->pool, q->kv);
    q->kv = -1;
    q->n_computed = 0;
    q->n_preempt++;
    q->state = SEQ_WAITING;
    list_insert(s, s->waiting, &s->n_waiting, slot);
    s->preempted[s->n_preempted++] = q->req_id;
    s->st.preemptions++;
    td_log_debug("sch", "preempt", "req=%llu tokens=%u", (unsigned long long)q->req_id,
                 q->n_tokens);
    return slot;
}

static bool is_decode(const sch_seq *q)
{
    return q->n_computed >= q->n_prompt && q->n_tokens - q->n_computed == 1;
}

/* Tokens of a sequence to compute this step: what remains, within the budget
 * and the per-sequence chunk cap. */
static uint32_t chunk_len(const sch *s, uint32_t remaining, uint32_t budget)
{
    uint32_t n = remaining < budget ? remaining : budget;
    if (s->cfg.max_chunk_tokens != 0 && n > s->cfg.max_chunk_tokens) n = s->cfg.max_chunk_tokens;
    return n;
}

/* One pass over the running list (decode sequences, or the ones in prefill). */
static int schedule_running(sch *s, sch_step *st, bool decode, uint32_t *budget)
{
    for (uint32_t i = 0; i < s->n_running && *budget != 0; i++) {
        uint32_t slot = s->running[i];
        sch_seq *q = &s->seqs[slot];
        if (q->item != NO_ITEM || is_decode(q) != decode) continue;
        uint32_t n = chunk_len(s, q->n_tokens - q->n_computed, *budget);
        bool self_preempted = false;
        for (;;) {
            int rc = kvc_seq_grow(s->pool, q->kv, n, NULL);
            if (rc == 0) break;
            if (rc != TD_ENOSPC) {
                td_log_error("sch", "grow_failed", "req=%llu err=%s", (unsigned long long)q->req_id,
                             td_err_name(rc));
                return rc;
            }
            /* The victim is the last of the running list, so it lies at or
             * after position i: the loop index stays valid. The sequence itself
             * is running, so the list is not empty. */
            if (preempt_last(s, st, budget) == slot) {
                self_preempted = true;
                break;
            }
        }
        if (self_preempted) break; /* it was the last: nothing after it */
        add_item(s, st, slot, n);
        *budget -= n;
    }
    return 0;
}

static int admit_waiting(sch *s, sch_step *st, uint32_t *budget)
{
    while (s->n_waiting != 0 && s->n_running < s->cfg.max_num_seqs && *budget != 0) {
        uint32_t slot = s->waiting[0];
        sch_seq *q = &s->seqs[slot];
        int rc;
        if (q->kv > 0) {
            /* Decode sequence parked with its KV (sch_add_prefilled). */
            uint32_t n = q->n_tokens - q->n_computed;
            if (n > *budget) n = *budget;
            rc = kvc_seq_grow(s->pool, q->kv, n, NULL);
            if (rc == TD_ENOSPC) break;
            if (rc < 0) return rc;
            list_remove(s->waiting, &s->n_waiting, slot);
            q->state = SEQ_RUNNING;
            list_insert(s, s->running, &s->n_running, slot);
            add_item(s, st, slot, n);
            *budget -= n;
            continue;
        }
        /* All tokens so far (prompt, and generated ones after a preemption)
         * are the prompt of this admission. */
        uint32_t n_cached = 0;
        rc = kvc_prefix_match(s->pool, q->tokens, q->n_tokens, &n_cached);
        if (rc < 0) return rc;
        uint32_t n = chunk_len(s, q->n_tokens - n_cached, *budget);
        /* A prefill-only sequence takes the blocks of its whole prompt at
         * admission, so it never grows: it can neither preempt nor be
         * preempted, and a block being sent to a decode worker is never
         * freed or recomputed under the transfer (its pin). */
        kvc_seq_spec spec = {
            .tokens = q->tokens,
            .n_prompt = q->n_tokens,
            .n_slots = n_cached + n,
            .n_capacity = s->cfg.prefill_only ? q->n_tokens : 0,
        };
        uint32_t got = 0;
        rc = kvc_seq_alloc(s->pool, &spec, &q->kv, &got);
        if (rc == TD_ENOSPC) {
            q->kv = -1;
            break;
        }
        if (rc < 0) {
            q->kv = -1;
            return rc;
        }
        if (got != n_cached) {
            /* Same pool state, same lookup: cannot differ. */
            kvc_seq_free(s->pool, q->kv);
            q->kv = -1;
            return TD_EINTERNAL;
        }
        q->n_computed = n_cached;
        list_remove(s->waiting, &s->n_waiting, slot);
        q->state = SEQ_RUNNING;
        list_insert(s, s->running, &s->n_running, slot);
        add_item(s, st, slot, n);
        *budget -= n;
    }
    return 0;
}

int sch_schedule(sch *s, sch_step *out)
{
    if (!s || !out) return TD_EINVAL;
    if (s->in_flight) return TD_EINVAL;
    reap_done(s);
    memset(out, 0, sizeof *out);
    s->n_items = 0;
    s->n_preempted = 0;
    uint32_t budget = s->cfg.max_num_batched_tokens;
    int rc = schedule_running(s, out, true, &budget);
    if (rc == 0) rc = schedule_running(s, out, false, &budget);
    if (rc == 0 && s->n_preempted == 0) rc = admit_waiting(s, out, &budget);
    if (rc < 0) {
        /* Only an internal error lands here; leave no half-built step. */
        for (uint32_t k = 0; k < s->n_items; k++)
            s->seqs[s->item_slot[k]].item = NO_ITEM;
        s->n_items = 0;
        return rc;
    }
    out->items = s->items;
    out->n_items = s->n_items;
    out->preempted = s->preempted;
    out->n_preempted = s->n_preempted;
    /* An empty step has nothing to update. */
    s->in_flight = s->n_items > 0;
    s->st.steps++;
    s->st.scheduled_tokens += out->n_tokens;
    return check_pool(s);
}

static void finish(sch *s, uint32_t slot, enum sch_finish reason)
{
    sch_seq *q = &s->seqs[slot];
    list_remove(s->running, &s->n_running, slot);
    sch_finished *f = &s->finished[s->n_finished++];
    f->req_id = q->req_id;
    f->reason = reason;
    f->tokens = q->tokens;
    f->n_tokens = q->n_tokens;
    f->n_prompt = q->n_prompt;
    f->n_preemptions = q->n_preempt;
    if (s->cfg.hold_kv_on_finish) {
        f->kv_seq = q->kv;
    } else {
        kvc_seq_free(s->pool, q->kv);
        f->kv_seq = -1;
    }
    q->kv = -1;
    q->state = SEQ_DONE;
    s->done[s->n_done++] = slot;
    s->st.finished++;
}

int sch_update(sch *s, const sch_result *results, uint32_t n_results, const sch_finished **finished,
               uint32_t *n_finished)
{
    if (!s || (n_results > 0 && !results)) return TD_EINVAL;
    if (!s->in_flight || n_results != s->n_items) return TD_EINVAL;
    reap_done(s);
    s->in_flight = false;
    int err = 0;
    for (uint32_t k = 0; k < s->n_items; k++) {
        uint32_t slot = s->item_slot[k];
        sch_seq *q = &s->seqs[slot];
        const sch_item *it = &s->items[k];
        q->item = NO_ITEM;
        if (q->aborted) {
            list_remove(s->running, &s->n_running, slot);
            kvc_seq_free(s->pool, q->kv);
            slot_release(s, slot);
            continue;
        }
        q->n_computed += it->n;
        int rc = kvc_seq_commit(s->pool, q->kv, q->tokens, q->n_computed);
        if (rc < 0 && err == 0) err = rc;
        if (!it->sample) continue;
        q->tokens[q->n_tokens++] = results[k].token;
        q->n_generated++;
        enum sch_finish reason = SCH_FINISH_NONE;
        if (results[k].stop)
            reason = SCH_FINISH_STOP;
        else if (s->cfg.prefill_only)
            reason = SCH_FINISH_PREFILLED;
        else if (q->n_generated >= q->max_new || q->n_tokens >= s->cfg.max_model_len)
            reason = SCH_FINISH_LENGTH;
        if (reason != SCH_FINISH_NONE) finish(s, slot, reason);
    }
    s->n_items = 0;
    if (finished) *finished = s->finished;
    if (n_finished) *n_finished = s->n_finished;
    if (err < 0) return err;
    return check_pool(s);
}

int sch_step_flatten(const sch *s, const sch_step *step, int32_t *tokens, int32_t *pos,
                     int32_t *seq, const int32_t **tables, int32_t *n_blocks, int32_t *out_rows,
                     int32_t *n_out)
{
    if (!s || !step || !tokens || !pos || !seq || !tables || !n_blocks || !out_rows || !n_out)
        return TD_EINVAL;
    if (!s->in_flight || step->items != s->items || step->n_items != s->n_items) return TD_EINVAL;
    uint32_t row = 0;
    int32_t n = 0;
    for (uint32_t i = 0; i < s->n_items; i++) {
        const sch_item *it = &s->items[i];
        uint32_t nb = 0;
        tables[i] = kvc_seq_table(s->pool, it->kv_seq, &nb);
        if (!tables[i]) return TD_EINTERNAL;
        n_blocks[i] = (int32_t)nb;
        for (uint32_t j = 0; j < it->n; j++, row++) {
            tokens[row] = it->tokens[j];
            pos[row] = (int32_t)(it->start + j);
            seq[row] = (int32_t)i;
        }
        if (it->sample) out_rows[n++] = (int32_t)(row - 1);
    }
    *n_out = n;
    return 0;
}

const int32_t *sch_seq_tokens(const sch *s, uint64_t req_id, uint32_t *n_tokens)
{
    const sch_seq *q = s ? find_req(s, req_id, NULL) : NULL;
    if (n_tokens) *n_tokens = q ? q->n_tokens : 0;
    return q ? q->tokens : NULL;
}

void sch_stats_get(const sch *s, sch_stats *out)
{
    *out = s->st;
    out->n_waiting = s->n_waiting;
    out->n_running = s->n_running;
    uint64_t queued = 0;
    for (uint32_t i = 0; i < s->n_waiting; i++) {
        const sch_seq *q = &s->seqs[s->waiting[i]];
        queued += q->n_tokens - q->n_computed;
    }
    for (uint32_t i = 0; i < s->n_running; i++) {
        const sch_seq *q = &s->seqs[s->running[i]];
        if (!is_decode(q)) queued += q->n_tokens - q->n_computed;
    }
    out->queued_prefill_tokens = queued;
}
