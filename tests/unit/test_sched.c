/* Unit tests for engine/sched (sch) over a real kvc pool and a mock engine.
 *
 * The mock engine keeps a fake KV memory: each slot records the token id and
 * position written into it. Before computing an item it checks that every
 * earlier position of the sequence is present in the slots its block table
 * names (so a wrong table, a lost block, a bad prefix-cache hit or a block
 * reused while still referenced shows up), and it only writes into blocks no
 * other sequence holds. Sampled tokens are a function of the tokens so far, so
 * any schedule (chunking, preemption) must produce the same outputs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/err.h"
#include "common/log.h"
#include "engine/kvcache/kvc.h"
#include "engine/sched/sch.h"
#ifdef TSCH_HAVE_ENGINE
#include "engine/backend/backend.h"
#include "engine/model.h"
#endif

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define VOCAB 50
#define EOS   0

static uint64_t rng_state;

static uint64_t rng_next(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static uint32_t rng_below(uint32_t n)
{
    return n ? (uint32_t)(rng_next() % n) : 0;
}

/* ---- mock engine ---- */

typedef struct mock {
    kvc_pool *pool;
    sch *s;
    uint32_t bs;
    int32_t *kv_tok; /* num_blocks * bs */
    int32_t *kv_pos;
    bool use_eos;
    /* outputs by request id */
    uint32_t n_req;
    int32_t **out;
    uint32_t *out_len;
    enum sch_finish *reason;
    uint32_t *preempts;
    uint64_t steps, max_step_tokens;
    uint32_t budget, max_running;
    /* copy of the last step, for tests to inspect */
    sch_item last[64];
    uint32_t n_last;
    uint64_t last_preempted[64];
    uint32_t n_last_preempted;
} mock;

static int32_t next_token(uint64_t req_id, const int32_t *tokens, uint32_t n)
{
    uint64_t h = req_id * 0x9E3779B97F4A7C15ULL;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ (uint64_t)tokens[i]) * 0x100000001B3ULL;
    return (int32_t)(h % VOCAB);
}

static void mock_init(mock *m, kvc_pool *pool, sch *s, uint32_t n_req)
{
    memset(m, 0, sizeof *m);
    m->pool = pool;
    m->s = s;
    m->bs = kvc_block_size(pool);
    size_t slots = (size_t)kvc_num_blocks(pool) * m->bs;
    m->kv_tok = malloc(slots * sizeof *m->kv_tok);
    m->kv_pos = malloc(slots * sizeof *m->kv_pos);
    for (size_t i = 0; i < slots; i++)
        m->kv_tok[i] = m->kv_pos[i] = -1;
    m->n_req = n_req;
    m->out = calloc(n_req, sizeof *m->out);
    m->out_len = calloc(n_req, sizeof *m->out_len);
    m->reason = calloc(n_req, sizeof *m->reason);
    m->preempts = calloc(n_req, sizeof *m->preempts);
    assert_non_null(m->kv_tok);
    assert_non_null(m->kv_pos);
    assert_non_null(m->out);
}

static void mock_free(mock *m)
{
    for (uint32_t i = 0; i < m->n_req; i++)
        free(m->out[i]);
    free(m->out);
    free(m->out_len);
    free(m->reason);
    free(m->preempts);
    free(m->kv_tok);
    free(m->kv_pos);
}

static size_t slot_of(const mock *m, const int32_t *table, uint32_t pos)
{
    return (size_t)table[pos / m->bs] * m->bs + pos % m->bs;
}

/* Runs one step: schedule, check, "compute", sample, update. Returns the
 * number of items (0: nothing ran). */
static uint32_t mock_step(mock *m)
{
    sch_step st;
    assert_int_equal(sch_schedule(m->s, &st), 0);
    m->steps++;
    uint32_t sum = 0, n_decode = 0;
    for (uint32_t i = 0; i < st.n_items; i++) {
        const sch_item *it = &st.items[i];
        sum += it->n;
        assert_true(it->n >= 1);
        /* Decode items come first. */
        if (!it->prefill) assert_int_equal(n_decode++, i);
    }
    assert_int_equal(sum, st.n_tokens);
    assert_true(st.n_tokens <= m->budget);
    assert_true(st.n_items <= m->max_running);
    if (st.n_tokens > m->max_step_tokens) m->max_step_tokens = st.n_tokens;
    assert_true(st.n_items <= 64 && st.n_preempted <= 64);
    memcpy(m->last, st.items, st.n_items * sizeof *st.items);
    m->n_last = st.n_items;
    memcpy(m->last_preempted, st.preempted, st.n_preempted * sizeof *st.preempted);
    m->n_last_preempted = st.n_preempted;
    for (uint32_t i = 0; i < st.n_preempted; i++)
        m->preempts[st.preempted[i]]++;
    if (st.n_items == 0) return 0;

    /* The flattened batch agrees with the items. */
    {
        int32_t ftok[256], fpos[256], fseq[256], nbl[64], rows[64], n_out = -1;
        const int32_t *tabs[64];
        assert_true(st.n_tokens <= 256);
        assert_int_equal(sch_step_flatten(m->s, &st, ftok, fpos, fseq, tabs, nbl, rows, &n_out), 0);
        uint32_t row = 0;
        int32_t k = 0;
        for (uint32_t i = 0; i < st.n_items; i++) {
            const sch_item *it = &st.items[i];
            uint32_t nb = 0;
            assert_ptr_equal(tabs[i], kvc_seq_table(m->pool, it->kv_seq, &nb));
            assert_int_equal(nbl[i], nb);
            for (uint32_t j = 0; j < it->n; j++, row++) {
                assert_int_equal(ftok[row], it->tokens[j]);
                assert_int_equal(fpos[row], it->start + j);
                assert_int_equal(fseq[row], i);
            }
            if (it->sample) assert_int_equal(rows[k++], row - 1);
        }
        assert_int_equal(row, st.n_tokens);
        assert_int_equal(n_out, k);
    }
    /* Attention reads of every item first (as within one layer of a batch):
     * all earlier positions must hold this sequence's tokens. */
    for (uint32_t i = 0; i < st.n_items; i++) {
        const sch_item *it = &st.items[i];
        uint32_t n_tok = 0, n_blocks = 0;
        const int32_t *all = sch_seq_tokens(m->s, it->req_id, &n_tok);
        const int32_t *table = kvc_seq_table(m->pool, it->kv_seq, &n_blocks);
        assert_non_null(all);
        assert_non_null(table);
        assert_true(it->start + it->n <= n_tok);
        assert_ptr_equal(it->tokens, all + it->start);
        assert_true((uint64_t)n_blocks * m->bs >= it->start + it->n);
        for (uint32_t q = 0; q < it->start; q++) {
            size_t sl = slot_of(m, table, q);
            assert_int_equal(m->kv_pos[sl], (int32_t)q);
            assert_int_equal(m->kv_tok[sl], all[q]);
        }
        /* Written blocks belong to this sequence alone. */
        for (uint32_t q = it->start; q < it->start + it->n; q++)
            assert_int_equal(kvc_block_refcount(m->pool, table[q / m->bs]), 1);
    }
    sch_result res[64];
    assert_true(st.n_items <= 64);
    for (uint32_t i = 0; i < st.n_items; i++) {
        const sch_item *it = &st.items[i];
        const int32_t *all = sch_seq_tokens(m->s, it->req_id, NULL);
        const int32_t *table = kvc_seq_table(m->pool, it->kv_seq, NULL);
        for (uint32_t q = it->start; q < it->start + it->n; q++) {
            size_t sl = slot_of(m, table, q);
            m->kv_tok[sl] = all[q];
            m->kv_pos[sl] = (int32_t)q;
        }
        res[i].token = 0;
        res[i].stop = false;
        if (it->sample) {
            res[i].token = next_token(it->req_id, all, it->start + it->n);
            res[i].stop = m->use_eos && res[i].token == EOS;
        }
    }
    const sch_finished *fin = NULL;
    uint32_t n_fin = 0;
    assert_int_equal(sch_update(m->s, res, st.n_items, &fin, &n_fin), 0);
    for (uint32_t i = 0; i < n_fin; i++) {
        uint64_t r = fin[i].req_id;
        assert_true(r < m->n_req);
        assert_null(m->out[r]);
        m->out[r] = malloc(fin[i].n_tokens * sizeof(int32_t));
        memcpy(m->out[r], fin[i].tokens, fin[i].n_tokens * sizeof(int32_t));
        m->out_len[r] = fin[i].n_tokens;
        m->reason[r] = fin[i].reason;
        assert_int_equal(fin[i].n_preemptions, m->preempts[r]);
    }
    return st.n_items;
}

static void mock_run(mock *m, uint32_t max_steps)
{
    for (uint32_t k = 0; k < max_steps; k++) {
        sch_stats ss;
        sch_stats_get(m->s, &ss);
        if (ss.n_waiting == 0 && ss.n_running == 0) return;
        mock_step(m);
    }
    fail_msg("did not finish in %u steps", max_steps);
}

typedef struct setup {
    kvc_pool *pool;
    sch *s;
} setup;

static void make(setup *u, uint32_t num_blocks, uint32_t bs, bool pc, const sch_config *sc)
{
    kvc_config kc = {.num_blocks = num_blocks,
                     .block_size = bs,
                     .max_seqs = 64,
                     .max_blocks_per_seq = 64,
                     .enable_prefix_cache = pc};
    assert_int_equal(kvc_pool_create(&kc, &u->pool), 0);
    assert_int_equal(sch_create(sc, u->pool, &u->s), 0);
}

static void unmake(setup *u)
{
    sch_free(u->s);
    kvc_stats st;
    kvc_stats_get(u->pool, &st);
    assert_int_equal(st.used, 0);
    assert_int_equal(st.live_seqs, 0);
    assert_int_equal(kvc_check(u->pool), 0);
    kvc_pool_free(u->pool);
}

static void add_req(sch *s, uint64_t id, const int32_t *prompt, uint32_t n, uint32_t max_new)
{
    sch_request r = {.req_id = id, .prompt = prompt, .n_prompt = n, .max_new_tokens = max_new};
    assert_int_equal(sch_add(s, &r), 0);
}

/* ---- tests ---- */

static void test_chunked_prefill_exact(void **state)
{
    (void)state;
    sch_config c = {.max_num_batched_tokens = 32, .max_num_seqs = 4, .max_model_len = 256};
    setup u;
    make(&u, 64, 16, false, &c);
    int32_t prompt[100];
    for (int i = 0; i < 100; i++)
        prompt[i] = i % VOCAB;
    add_req(u.s, 1, prompt, 100, 3);
    uint32_t want_start[] = {0, 32, 64, 96, 100, 101};
    uint32_t want_n[] = {32, 32, 32, 4, 1, 1};
    for (int k = 0; k < 6; k++) {
        sch_step st;
        assert_int_equal(sch_schedule(u.s, &st), 0);
        assert_int_equal(st.n_items, 1);
        assert_int_equal(st.items[0].start, want_start[k]);
        assert_int_equal(st.items[0].n, want_n[k]);
        assert_int_equal(st.items[0].sample, k >= 3);
        assert_int_equal(st.items[0].prefill, k <= 3);
        kvc_seq_info info;
        assert_int_equal(kvc_seq_get_info(u.pool, st.items[0].kv_seq, &info), 0);
        assert_int_equal(info.n_tokens, want_start[k] + want_n[k]); /* slots for this chunk only */
        sch_result r = {.token = 7};
        const sch_finished *fin;
        uint32_t n_fin;
        assert_int_equal(sch_update(u.s, &r, 1, &fin, &n_fin), 0);
        assert_int_equal(n_fin, k == 5 ? 1 : 0);
        if (k == 5) {
            assert_int_equal(fin[0].reason, SCH_FINISH_LENGTH);
            assert_int_equal(fin[0].n_tokens, 103);
            assert_int_equal(fin[0].tokens[100], 7);
            assert_int_equal(fin[0].kv_seq, -1);
        }
    }
    sch_step st;
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.n_items, 0);
    unmake(&u);
}

static void test_decode_first_and_budget(void **state)
{
    (void)state;
    sch_config c = {.max_num_batched_tokens = 20, .max_num_seqs = 8, .max_model_len = 512};
    setup u;
    make(&u, 128, 16, false, &c);
    int32_t p[200];
    for (int i = 0; i < 200; i++)
        p[i] = (i * 7) % VOCAB;
    add_req(u.s, 1, p, 5, 50);
    add_req(u.s, 2, p + 1, 6, 50);
    /* Step 1: both prompts (5 + 6 tokens). */
    sch_step st;
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.n_items, 2);
    assert_int_equal(st.n_tokens, 11);
    sch_result r[4] = {{.token = 3}, {.token = 4}, {.token = 5}, {.token = 6}};
    assert_int_equal(sch_update(u.s, r, 2, NULL, NULL), 0);
    /* A long prompt arrives: the two decodes go first, the prompt gets the
     * remaining 18 tokens of the budget. */
    add_req(u.s, 3, p, 150, 4);
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.n_items, 3);
    assert_int_equal(st.items[0].req_id, 1);
    assert_false(st.items[0].prefill);
    assert_int_equal(st.items[0].n, 1);
    assert_int_equal(st.items[0].start, 5);
    assert_int_equal(st.items[1].req_id, 2);
    assert_int_equal(st.items[1].n, 1);
    assert_int_equal(st.items[2].req_id, 3);
    assert_true(st.items[2].prefill);
    assert_int_equal(st.items[2].start, 0);
    assert_int_equal(st.items[2].n, 18);
    assert_false(st.items[2].sample);
    assert_int_equal(st.n_tokens, 20);
    assert_int_equal(st.n_decode_tokens, 2);
    assert_int_equal(st.n_prefill_tokens, 18);
    /* Results must match the items one to one. */
    assert_int_equal(sch_update(u.s, r, 2, NULL, NULL), TD_EINVAL);
    assert_int_equal(sch_schedule(u.s, &st), TD_EINVAL); /* previous step not updated */
    assert_int_equal(sch_update(u.s, r, 3, NULL, NULL), 0);
    /* Next step: decodes again first, then the next chunk from 18. */
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.items[2].start, 18);
    assert_int_equal(st.items[2].n, 18);
    sch_stats ss;
    sch_stats_get(u.s, &ss);
    assert_int_equal(ss.queued_prefill_tokens, 150 - 18);
    assert_int_equal(sch_update(u.s, r, 3, NULL, NULL), 0);
    sch_free(u.s);
    kvc_pool_free(u.pool);
}

static void test_chunk_cap(void **state)
{
    (void)state;
    /* Two long prompts share the step instead of the first taking the whole
     * budget; the cap does not apply to decode. */
    sch_config c = {.max_num_batched_tokens = 64,
                    .max_num_seqs = 4,
                    .max_chunk_tokens = 24,
                    .max_model_len = 128};
    setup u;
    make(&u, 64, 4, false, &c);
    int32_t p[100] = {0};
    add_req(u.s, 1, p, 50, 2);
    add_req(u.s, 2, p, 50, 2);
    add_req(u.s, 3, p, 50, 2);
    sch_step st;
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.n_items, 3);
    assert_int_equal(st.items[0].n, 24);
    assert_int_equal(st.items[1].n, 24);
    assert_int_equal(st.items[2].n, 16); /* what is left of the budget */
    sch_result r[3] = {{0}};
    assert_int_equal(sch_update(u.s, r, 3, NULL, NULL), 0);
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.items[0].start, 24);
    assert_int_equal(st.items[0].n, 24);
    assert_int_equal(st.items[2].start, 16);
    assert_int_equal(st.items[2].n, 16);
    assert_int_equal(sch_update(u.s, r, 3, NULL, NULL), 0);
    sch_free(u.s);
    kvc_pool_free(u.pool);
}

static void test_admission_stops_when_blocks_run_out(void **state)
{
    (void)state;
    sch_config c = {.max_num_batched_tokens = 1000, .max_num_seqs = 16, .max_model_len = 40};
    setup u;
    make(&u, 10, 4, false, &c);
    int32_t p[64] = {0};
    add_req(u.s, 1, p, 16, 4); /* 4 blocks */
    add_req(u.s, 2, p, 20, 4); /* 5 blocks */
    add_req(u.s, 3, p, 12, 4); /* 3 blocks: would fit in what is left, but FCFS */
    add_req(u.s, 4, p, 1, 4);
    sch_step st;
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.n_items, 2);
    assert_int_equal(st.items[0].req_id, 1);
    assert_int_equal(st.items[1].req_id, 2);
    kvc_stats ks;
    kvc_stats_get(u.pool, &ks);
    assert_int_equal(ks.free, 1);
    sch_stats ss;
    sch_stats_get(u.s, &ss);
    assert_int_equal(ss.n_running, 2);
    assert_int_equal(ss.n_waiting, 2);
    sch_result r[2] = {{.token = 1}, {.token = 1}};
    assert_int_equal(sch_update(u.s, r, 2, NULL, NULL), 0);
    sch_free(u.s);
    kvc_pool_free(u.pool);
}

static void test_max_num_seqs(void **state)
{
    (void)state;
    sch_config c = {.max_num_batched_tokens = 1000, .max_num_seqs = 3, .max_model_len = 64};
    setup u;
    make(&u, 64, 4, false, &c);
    int32_t p[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    for (uint64_t i = 0; i < 5; i++)
        add_req(u.s, i, p, 8, 2);
    sch_step st;
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.n_items, 3);
    sch_result r[3] = {{.token = 1}, {.token = 1}, {.token = 1}};
    assert_int_equal(sch_update(u.s, r, 3, NULL, NULL), 0);
    sch_free(u.s);
    kvc_pool_free(u.pool);
}

/* Runs n_req random requests through a scheduler and returns the mock with
 * their outputs. */
static void run_workload(mock *m, setup *u, uint32_t num_blocks, bool pc, uint32_t budget,
                         uint32_t max_running, uint64_t seed, uint32_t n_req, bool staggered)
{
    sch_config c = {.max_num_batched_tokens = budget,
                    .max_num_seqs = max_running,
                    .max_seqs = 64,
                    .max_model_len = 96,
                    .check_kv = true};
    make(u, num_blocks, 4, pc, &c);
    mock_init(m, u->pool, u->s, n_req);
    m->budget = budget;
    m->max_running = max_running;
    m->use_eos = true;
    rng_state = seed;
    int32_t stem[64];
    for (int i = 0; i < 64; i++)
        stem[i] = (int32_t)rng_below(VOCAB);
    uint32_t added = 0;
    while (added < n_req) {
        uint32_t burst = staggered ? 1 + rng_below(4) : n_req;
        for (uint32_t k = 0; k < burst && added < n_req; k++, added++) {
            int32_t p[80];
            uint32_t n = 1 + rng_below(60);
            uint32_t shared = rng_below(2) ? rng_below(n + 1) : 0;
            for (uint32_t i = 0; i < n; i++)
                p[i] = i < shared ? stem[i] : (int32_t)rng_below(VOCAB);
            add_req(u->s, added, p, n, 1 + rng_below(30));
        }
        if (staggered) mock_step(m);
    }
    mock_run(m, 100000);
    for (uint32_t r = 0; r < n_req; r++)
        assert_non_null(m->out[r]);
}

static void test_preemption_recompute_same_output(void **state)
{
    (void)state;
    const uint32_t n_req = 40;
    mock roomy, tight;
    setup ur, ut;
    run_workload(&roomy, &ur, 64 * 24, false, 64, 16, 0xabc, n_req, false);
    /* 24 blocks of 4 tokens = one max_model_len sequence: constant preemption. */
    run_workload(&tight, &ut, 24, false, 64, 16, 0xabc, n_req, false);
    sch_stats sr, stt;
    sch_stats_get(ur.s, &sr);
    sch_stats_get(ut.s, &stt);
    assert_int_equal(sr.preemptions, 0);
    assert_true(stt.preemptions > 10);
    print_message("roomy: %llu steps, tight: %llu steps, %llu preemptions\n",
                  (unsigned long long)sr.steps, (unsigned long long)stt.steps,
                  (unsigned long long)stt.preemptions);
    for (uint32_t r = 0; r < n_req; r++) {
        assert_int_equal(roomy.out_len[r], tight.out_len[r]);
        assert_memory_equal(roomy.out[r], tight.out[r], roomy.out_len[r] * sizeof(int32_t));
        assert_int_equal(roomy.reason[r], tight.reason[r]);
    }
    mock_free(&roomy);
    mock_free(&tight);
    unmake(&ur);
    unmake(&ut);
}

static void test_random_runs_prefix_cache(void **state)
{
    (void)state;
    /* Many random sequences to completion, with the prefix cache, arriving
     * over time; kvc_check runs after every schedule and update. Outputs must
     * match a run with ample blocks and no cache. */
    const uint32_t n_req = 60;
    for (uint64_t seed = 1; seed <= 3; seed++) {
        mock ref, m;
        setup ur, u;
        run_workload(&ref, &ur, 64 * 24, false, 48, 8, seed, n_req, true);
        run_workload(&m, &u, 40, true, 48, 8, seed, n_req, true);
        for (uint32_t r = 0; r < n_req; r++) {
            assert_int_equal(ref.out_len[r], m.out_len[r]);
            assert_memory_equal(ref.out[r], m.out[r], ref.out_len[r] * sizeof(int32_t));
        }
        kvc_stats ks;
        kvc_stats_get(u.pool, &ks);
        sch_stats ss;
        sch_stats_get(u.s, &ss);
        print_message("seed %llu: steps=%llu preemptions=%llu prefix hits=%llu/%llu\n",
                      (unsigned long long)seed, (unsigned long long)ss.steps,
                      (unsigned long long)ss.preemptions, (unsigned long long)ks.hit_blocks,
                      (unsigned long long)ks.query_blocks);
        assert_true(ks.hit_blocks > 0);
        assert_int_equal(ks.used, 0); /* finished sequences freed their blocks */
        mock_free(&ref);
        mock_free(&m);
        unmake(&ur);
        unmake(&u);
    }
}

static void test_finished_free_blocks(void **state)
{
    (void)state;
    sch_config c = {.max_num_batched_tokens = 64, .max_num_seqs = 4, .max_model_len = 64};
    setup u;
    make(&u, 32, 4, false, &c);
    int32_t p[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    add_req(u.s, 1, p, 10, 5);
    add_req(u.s, 2, p, 10, 5);
    sch_step st;
    assert_int_equal(sch_schedule(u.s, &st), 0);
    kvc_stats ks;
    kvc_stats_get(u.pool, &ks);
    assert_int_equal(ks.used, 6);
    /* Request 2 stops at once (EOS); request 1 goes on. */
    sch_result r[2] = {{.token = 11}, {.token = EOS, .stop = true}};
    const sch_finished *fin;
    uint32_t n_fin;
    assert_int_equal(sch_update(u.s, r, 2, &fin, &n_fin), 0);
    assert_int_equal(n_fin, 1);
    assert_int_equal(fin[0].req_id, 2);
    assert_int_equal(fin[0].reason, SCH_FINISH_STOP);
    assert_int_equal(fin[0].n_tokens, 11);
    kvc_stats_get(u.pool, &ks);
    assert_int_equal(ks.used, 3);
    /* Abort between steps frees at once; abort of an item in flight waits
     * for the update. */
    assert_int_equal(sch_abort(u.s, 2), TD_ENOENT);
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.n_items, 1);
    assert_int_equal(sch_abort(u.s, 1), 0);
    kvc_stats_get(u.pool, &ks);
    assert_int_equal(ks.used, 3);
    assert_int_equal(sch_abort(u.s, 1), TD_ENOENT);
    assert_int_equal(sch_update(u.s, r, 1, &fin, &n_fin), 0);
    assert_int_equal(n_fin, 0);
    kvc_stats_get(u.pool, &ks);
    assert_int_equal(ks.used, 0);
    add_req(u.s, 3, p, 10, 5);
    assert_int_equal(sch_abort(u.s, 3), 0); /* waiting */
    sch_stats ss;
    sch_stats_get(u.s, &ss);
    assert_int_equal(ss.n_waiting + ss.n_running, 0);
    unmake(&u);
}

static void test_no_admission_after_preemption(void **state)
{
    (void)state;
    sch_config c = {
        .max_num_batched_tokens = 64, .max_num_seqs = 4, .max_model_len = 24, .check_kv = true};
    setup u;
    make(&u, 6, 4, false, &c);
    mock m;
    mock_init(&m, u.pool, u.s, 4);
    m.budget = 64;
    m.max_running = 4;
    int32_t p[12] = {0};
    add_req(u.s, 1, p, 12, 8); /* 3 blocks */
    add_req(u.s, 2, p, 12, 8); /* 3 blocks: the pool is full */
    assert_int_equal(mock_step(&m), 2);
    /* A high-priority request that needs one block. */
    sch_request hi = {.req_id = 3, .prompt = p, .n_prompt = 2, .max_new_tokens = 8, .priority = -1};
    assert_int_equal(sch_add(u.s, &hi), 0);
    /* 1 needs a block for position 12: 2 (the lowest priority, latest) is
     * preempted, 1 takes one of its blocks. Request 3 would fit in the other
     * two, but nothing is admitted in a step that preempted. */
    assert_int_equal(mock_step(&m), 1);
    assert_int_equal(m.last[0].req_id, 1);
    assert_int_equal(m.n_last_preempted, 1);
    assert_int_equal(m.last_preempted[0], 2);
    sch_stats ss;
    sch_stats_get(u.s, &ss);
    assert_int_equal(ss.n_waiting, 2);
    /* Next step: 3 (priority) is admitted, 2 does not fit behind it. */
    assert_int_equal(mock_step(&m), 2);
    assert_int_equal(m.last[0].req_id, 1);
    assert_int_equal(m.last[1].req_id, 3);
    mock_run(&m, 200);
    assert_int_equal(m.out_len[1], 20);
    assert_int_equal(m.out_len[2], 20);
    assert_int_equal(m.out_len[3], 10);
    mock_free(&m);
    unmake(&u);
}

static void test_priority_victim(void **state)
{
    (void)state;
    /* Two running sequences; when the high-priority one needs a block, the
     * low-priority one is preempted even though it arrived first. */
    sch_config c = {
        .max_num_batched_tokens = 64, .max_num_seqs = 4, .max_model_len = 24, .check_kv = true};
    setup u;
    make(&u, 6, 4, false, &c);
    mock m;
    mock_init(&m, u.pool, u.s, 3);
    m.budget = 64;
    m.max_running = 4;
    int32_t p[12] = {0};
    sch_request lo = {.req_id = 1, .prompt = p, .n_prompt = 12, .max_new_tokens = 8};
    sch_request hi = {
        .req_id = 2, .prompt = p, .n_prompt = 12, .max_new_tokens = 8, .priority = -5};
    assert_int_equal(sch_add(u.s, &lo), 0);
    assert_int_equal(sch_add(u.s, &hi), 0);
    /* hi runs first (priority), both fit: 3 + 3 blocks. */
    assert_int_equal(mock_step(&m), 2);
    assert_int_equal(m.last[0].req_id, 2);
    assert_int_equal(m.last[1].req_id, 1);
    /* Both need a 4th block for position 12: hi gets it by preempting lo. */
    assert_int_equal(mock_step(&m), 1);
    assert_int_equal(m.last[0].req_id, 2);
    assert_int_equal(m.n_last_preempted, 1);
    assert_int_equal(m.last_preempted[0], 1);
    /* lo comes back (recompute of its 13 tokens) once hi is done. */
    mock_run(&m, 100);
    assert_int_equal(m.out_len[1], 20);
    assert_int_equal(m.out_len[2], 20);
    assert_int_equal(m.preempts[1], 1);
    mock_free(&m);
    unmake(&u);
}

static void test_prefill_only_hold_kv(void **state)
{
    (void)state;
    sch_config c = {.max_num_batched_tokens = 16,
                    .max_num_seqs = 4,
                    .max_model_len = 64,
                    .prefill_only = true,
                    .hold_kv_on_finish = true,
                    .check_kv = true};
    setup u;
    make(&u, 32, 4, true, &c);
    int32_t p[20];
    for (int i = 0; i < 20; i++)
        p[i] = 100 + i;
    add_req(u.s, 1, p, 20, 100);
    sch_result r = {.token = 9};
    const sch_finished *fin;
    uint32_t n_fin = 0;
    for (int k = 0; k < 2; k++) {
        sch_step st;
        assert_int_equal(sch_schedule(u.s, &st), 0);
        assert_int_equal(st.n_items, 1);
        assert_int_equal(st.items[0].sample, k == 1);
        assert_int_equal(sch_update(u.s, &r, 1, &fin, &n_fin), 0);
    }
    assert_int_equal(n_fin, 1);
    assert_int_equal(fin[0].reason, SCH_FINISH_PREFILLED);
    assert_int_equal(fin[0].n_tokens, 21);
    int64_t kv = fin[0].kv_seq;
    assert_true(kv > 0);
    /* The caller holds the blocks (to send them), then frees them. */
    kvc_seq_info info;
    assert_int_equal(kvc_seq_get_info(u.pool, kv, &info), 0);
    assert_int_equal(info.n_committed, 20);
    kvc_stats ks;
    kvc_stats_get(u.pool, &ks);
    assert_int_equal(ks.used, 5);
    assert_int_equal(kvc_seq_free(u.pool, kv), 0);
    /* The same prompt again: its full blocks come from the prefix cache. */
    add_req(u.s, 2, p, 20, 100);
    sch_step st;
    assert_int_equal(sch_schedule(u.s, &st), 0);
    assert_int_equal(st.items[0].start, 16);
    assert_int_equal(st.items[0].n, 4);
    assert_true(st.items[0].sample);
    assert_int_equal(sch_update(u.s, &r, 1, &fin, &n_fin), 0);
    assert_int_equal(n_fin, 1);
    assert_int_equal(kvc_seq_free(u.pool, fin[0].kv_seq), 0);
    unmake(&u);
}

static void test_decode_mode_prefilled(void **state)
{
    (void)state;
    sch_config c = {
        .max_num_batched_tokens = 8, .max_num_seqs = 2, .max_model_len = 64, .check_kv = true};
    setup u;
    make(&u, 32, 4, true, &c);
    int32_t p[10];
    for (int i = 0; i < 10; i++)
        p[i] = 200 + i;
    mock m;
    mock_init(&m, u.pool, u.s, 4);
    m.budget = 8;
    m.max_running = 2;
    /* A decode worker allocates prompt + headroom as a plain sequence, the KV
     * "arrives" (the mock writes it; a transfer would own the blocks until its
     * final event), then DONE commits the sequence and it runs. */
    int64_t kv[3];
    for (int k = 0; k < 3; k++) {
        kvc_seq_spec spec = {.tokens = p, .n_prompt = 10, .n_slots = 10, .n_capacity = 16};
        uint32_t n_cached = 0;
        assert_int_equal(kvc_seq_alloc(u.pool, &spec, &kv[k], &n_cached), 0);
        const int32_t *table = kvc_seq_table(u.pool, kv[k], NULL);
        for (uint32_t q = n_cached; q < 10; q++) {
            size_t sl = slot_of(&m, table, q);
            m.kv_tok[sl] = p[q];
            m.kv_pos[sl] = (int32_t)q;
        }
        /* Refused until every prompt position is committed. */
        sch_request req = {.req_id = (uint64_t)k, .prompt = p, .n_prompt = 10, .max_new_tokens = 5};
        assert_int_equal(sch_add_prefilled(u.s, &req, kv[k], 42), TD_EINVAL);
        assert_int_equal(kvc_seq_commit(u.pool, kv[k], p, 10), 0);
        assert_int_equal(sch_add_prefilled(u.s, &req, kv[k], 42), 0);
        assert_int_equal(sch_add_prefilled(u.s, &req, kv[k], 42), TD_EEXIST);
    }
    sch_stats ss;
    sch_stats_get(u.s, &ss);
    assert_int_equal(ss.n_running, 2);
    assert_int_equal(ss.n_waiting, 1); /* parked with its KV */
    assert_int_equal(mock_step(&m), 2);
    for (uint32_t i = 0; i < 2; i++) {
        assert_false(m.last[i].prefill);
        assert_int_equal(m.last[i].start, 10);
        assert_int_equal(m.last[i].n, 1);
        assert_true(m.last[i].sample);
    }
    mock_run(&m, 100);
    for (int k = 0; k < 3; k++) {
        assert_int_equal(m.out_len[k], 15);
        assert_int_equal(m.out[k][10], 42);
    }
    mock_free(&m);
    unmake(&u);
}

static void test_bad_input(void **state)
{
    (void)state;
    kvc_config kc = {.num_blocks = 4, .block_size = 4, .max_seqs = 4};
    kvc_pool *pool;
    assert_int_equal(kvc_pool_create(&kc, &pool), 0);
    sch *s = NULL;
    sch_config c = {.max_num_batched_tokens = 8, .max_num_seqs = 2, .max_model_len = 17};
    assert_int_equal(sch_create(&c, pool, &s), TD_EINVAL); /* 5 blocks > pool */
    assert_null(s);
    c.max_model_len = 16;
    c.max_num_batched_tokens = 0;
    assert_int_equal(sch_create(&c, pool, &s), TD_EINVAL);
    c.max_num_batched_tokens = 1; /* below max_num_seqs: decodes would starve */
    assert_int_equal(sch_create(&c, pool, &s), TD_EINVAL);
    c.max_num_batched_tokens = 8;
    assert_int_equal(sch_create(&c, NULL, &s), TD_EINVAL);
    assert_int_equal(sch_create(&c, pool, &s), 0);
    int32_t p[16] = {0};
    sch_request r = {.req_id = 1, .prompt = p, .n_prompt = 16, .max_new_tokens = 1};
    assert_int_equal(sch_add(s, &r), TD_ETOOLONG);
    r.n_prompt = 0;
    assert_int_equal(sch_add(s, &r), TD_EINVAL);
    r.n_prompt = 4;
    r.max_new_tokens = 0;
    assert_int_equal(sch_add(s, &r), TD_EINVAL);
    r.max_new_tokens = 100; /* clamped to max_model_len */
    assert_int_equal(sch_add(s, &r), 0);
    assert_int_equal(sch_add(s, &r), TD_EEXIST);
    for (uint64_t i = 2; i <= 8; i++) {
        r.req_id = i;
        assert_int_equal(sch_add(s, &r), 0);
    }
    r.req_id = 9;
    assert_int_equal(sch_add(s, &r), TD_ENOSPC);                     /* max_seqs = 4 * 2 */
    assert_int_equal(sch_update(s, NULL, 0, NULL, NULL), TD_EINVAL); /* nothing in flight */
    {
        sch_step none = {0};
        int32_t a[4], n_out;
        const int32_t *t[4];
        assert_int_equal(sch_step_flatten(s, &none, a, a, a, t, a, a, &n_out), TD_EINVAL);
    }
    assert_int_equal(sch_add_prefilled(s, &r, 12345, 1), TD_ENOENT);
    assert_int_equal(sch_abort(s, 99), TD_ENOENT);
    sch_free(s);
    sch_free(NULL);
    kvc_stats st;
    kvc_stats_get(pool, &st);
    assert_int_equal(st.used, 0);
    kvc_pool_free(pool);
}

#ifdef TSCH_HAVE_ENGINE
/* ---- with the real CPU backend ----
 *
 * The same requests through the real forward pass (random tiny model, paged KV
 * laid out by kv_layout.h, the block tables kvc hands out): once one at a time
 * with the whole prompt in one chunk and ample blocks, once batched with small
 * chunks, a tight pool (preemption) and the prefix cache. With the backend's
 * deterministic matmul a token's logits do not depend on the batch, so greedy
 * outputs must be identical token for token. */

typedef struct eng_run {
    uint32_t budget, max_running, num_blocks, max_chunk;
    bool pc;
} eng_run;

static int32_t argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static void engine_run(const mdl_model *model, const eng_run *r, const int32_t prompts[][48],
                       const uint32_t *n_prompt, const uint32_t *max_new, uint32_t n_req,
                       int32_t out[][64], uint32_t *out_len, uint64_t *preemptions, uint64_t *hits)
{
    const uint32_t bs = 4;
    be_options o;
    be_options_defaults(&o, model);
    o.max_batch_tokens = (int)r->budget;
    o.max_seqs = (int)r->max_running;
    o.kv.block_size = bs;
    o.kv.num_blocks = r->num_blocks;
    be_backend *be = NULL;
    char err[256];
    assert_int_equal(be_open("cpu", model, &o, &be, err, sizeof err), 0);

    kvc_config kc = {.num_blocks = r->num_blocks,
                     .block_size = bs,
                     .max_seqs = 32,
                     .enable_prefix_cache = r->pc,
                     .hash_seed = 0xfeed};
    kvc_pool *pool = NULL;
    assert_int_equal(kvc_pool_create(&kc, &pool), 0);
    sch_config sc = {.max_num_batched_tokens = r->budget,
                     .max_num_seqs = r->max_running,
                     .max_chunk_tokens = r->max_chunk,
                     .max_seqs = 32,
                     .max_model_len = 64,
                     .check_kv = true};
    sch *s = NULL;
    assert_int_equal(sch_create(&sc, pool, &s), 0);
    for (uint32_t i = 0; i < n_req; i++) {
        sch_request q = {.req_id = i,
                         .prompt = prompts[i],
                         .n_prompt = n_prompt[i],
                         .max_new_tokens = max_new[i]};
        assert_int_equal(sch_add(s, &q), 0);
    }
    const int V = model->cfg.vocab_size;
    int32_t tok[64], pos[64], seq[64], nbl[16], rows[16], n_out = 0;
    const int32_t *tabs[16];
    float *logits = malloc((size_t)16 * V * sizeof *logits);
    assert_non_null(logits);
    uint32_t done = 0;
    for (int guard = 0; done < n_req; guard++) {
        assert_true(guard < 5000);
        sch_step st;
        assert_int_equal(sch_schedule(s, &st), 0);
        assert_true(st.n_items > 0);
        assert_true(st.n_tokens <= 64 && st.n_items <= 16);
        assert_int_equal(sch_step_flatten(s, &st, tok, pos, seq, tabs, nbl, rows, &n_out), 0);
        be_batch b = {.n_tokens = (int)st.n_tokens,
                      .tokens = tok,
                      .pos = pos,
                      .seq = seq,
                      .n_seqs = (int)st.n_items,
                      .block_tables = tabs,
                      .n_blocks = nbl,
                      .n_out = n_out,
                      .out_rows = rows,
                      .logits = logits};
        assert_int_equal(be_forward(be, &b), 0);
        sch_result res[16];
        int k = 0;
        for (uint32_t i = 0; i < st.n_items; i++) {
            res[i] = (sch_result){0};
            if (st.items[i].sample) {
                res[i].token = argmax(logits + (size_t)k * V, V);
                k++;
            }
        }
        const sch_finished *fin;
        uint32_t n_fin;
        assert_int_equal(sch_update(s, res, st.n_items, &fin, &n_fin), 0);
        for (uint32_t i = 0; i < n_fin; i++) {
            uint64_t id = fin[i].req_id;
            memcpy(out[id], fin[i].tokens, fin[i].n_tokens * sizeof(int32_t));
            out_len[id] = fin[i].n_tokens;
            done++;
        }
    }
    sch_stats ss;
    sch_stats_get(s, &ss);
    kvc_stats ks;
    kvc_stats_get(pool, &ks);
    *preemptions = ss.preemptions;
    *hits = ks.hit_blocks;
    assert_int_equal(ks.used, 0);
    free(logits);
    sch_free(s);
    kvc_pool_free(pool);
    be_close(be);
}

static void test_engine_twin(void **state)
{
    (void)state;
    mdl_config c;
    mdl_config_defaults(&c);
    c.dim = 32;
    c.hidden_dim = 64;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 8;
    c.vocab_size = 64;
    c.max_seq_len = 64;
    mdl_model *model = NULL;
    assert_int_equal(mdl_create_random(&c, 77, 0.3f, &model), 0);

    enum { N = 10 };
    static int32_t prompts[N][48], ref[N][64], got[N][64];
    uint32_t n_prompt[N], max_new[N], ref_len[N] = {0}, got_len[N] = {0};
    rng_state = 0x7e57;
    for (uint32_t i = 0; i < N; i++) {
        n_prompt[i] = 1 + rng_below(40);
        max_new[i] = 1 + rng_below(12);
        /* Half the prompts share a 20-token stem: prefix-cache hits. A
         * quarter start with the stem's second block: the same tokens at
         * other positions after another prefix, which must not hit. */
        for (uint32_t t = 0; t < n_prompt[i]; t++) {
            uint32_t sp = i % 4 == 1 ? t + 4 : t;
            bool stem = i % 2 == 0 || i % 4 == 1;
            prompts[i][t] = (int32_t)(stem && sp < 20 ? (sp * 5 + 1) % 64 : rng_below(64));
        }
    }
    uint64_t pre = 0, hits = 0;
    eng_run alone = {.budget = 64, .max_running = 1, .num_blocks = 64, .pc = false};
    engine_run(model, &alone, prompts, n_prompt, max_new, N, ref, ref_len, &pre, &hits);
    assert_int_equal(pre, 0);
    /* 16 blocks of 4 = one max_model_len sequence: preemption is certain with
     * 6 running; steps of at most 7 tokens, chunks of at most 5. */
    eng_run tight = {.budget = 7, .max_running = 6, .num_blocks = 16, .max_chunk = 5, .pc = true};
    engine_run(model, &tight, prompts, n_prompt, max_new, N, got, got_len, &pre, &hits);
    print_message("engine twin: %llu preemptions, %llu prefix-hit blocks\n",
                  (unsigned long long)pre, (unsigned long long)hits);
    assert_true(pre > 0);
    assert_true(hits > 0);
    for (uint32_t i = 0; i < N; i++) {
        assert_int_equal(got_len[i], n_prompt[i] + max_new[i]);
        assert_int_equal(ref_len[i], got_len[i]);
        assert_memory_equal(ref[i], got[i], ref_len[i] * sizeof(int32_t));
    }
    mdl_free(model);
}
#endif

int main(void)
{
    td_log_set_level(TD_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunked_prefill_exact),
        cmocka_unit_test(test_decode_first_and_budget),
        cmocka_unit_test(test_chunk_cap),
        cmocka_unit_test(test_admission_stops_when_blocks_run_out),
        cmocka_unit_test(test_max_num_seqs),
        cmocka_unit_test(test_preemption_recompute_same_output),
        cmocka_unit_test(test_random_runs_prefix_cache),
        cmocka_unit_test(test_finished_free_blocks),
        cmocka_unit_test(test_no_admission_after_preemption),
        cmocka_unit_test(test_priority_victim),
        cmocka_unit_test(test_prefill_only_hold_kv),
        cmocka_unit_test(test_decode_mode_prefilled),
        cmocka_unit_test(test_bad_input),
#ifdef TSCH_HAVE_ENGINE
        cmocka_unit_test(test_engine_twin),
#endif
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
