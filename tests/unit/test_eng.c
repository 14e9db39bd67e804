/* Engine runtime: the step loop over a real (random-weight) model.
 *
 * Twin checks: every request run in a crowded batch (with preemptions) draws
 * the tokens it draws alone; a request split between a prefill-only runtime
 * and a decoding runtime (KV copied between their pools, as a transfer would)
 * draws the tokens it draws in one runtime, greedy and seeded. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "engine/runtime/eng.h"

enum { N_REQ = 12, MAX_NEW = 24, VOCAB = 64, CTX = 96 };

static mdl_model *g_model;

static int setup(void **state)
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
    c.vocab_size = VOCAB;
    c.max_seq_len = CTX;
    c.eos_id = -1;
    return mdl_create_random(&c, 99, 0.5f, &g_model);
}

static int teardown(void **state)
{
    (void)state;
    mdl_free(g_model);
    return 0;
}

static uint64_t rng = 0x1234;
static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng % n);
}

typedef struct req_case {
    int32_t prompt[64];
    uint32_t n_prompt;
    uint32_t max_new;
    smp_params sp;
} req_case;

static void make_cases(req_case *c, int n, int seeded)
{
    for (int i = 0; i < n; i++) {
        c[i].n_prompt = 1 + rnd(60);
        for (uint32_t j = 0; j < c[i].n_prompt; j++)
            c[i].prompt[j] = (int32_t)rnd(VOCAB);
        /* Shared prefixes: every third prompt starts like the first. */
        if (i % 3 == 2 && c[0].n_prompt > 20 && c[i].n_prompt > 20)
            memcpy(c[i].prompt, c[0].prompt, 20 * sizeof(int32_t));
        c[i].max_new = 1 + rnd(MAX_NEW);
        smp_params_defaults(&c[i].sp);
        if (seeded) {
            c[i].sp.temperature = 0.8f;
            c[i].sp.top_p = 0.9f;
            c[i].sp.seed = 1000 + (uint64_t)i;
        }
    }
}

static eng *open_eng(uint32_t num_blocks, uint32_t max_num_seqs, int prefix, int prefill_only)
{
    eng_config ec;
    eng_config_defaults(&ec);
    ec.num_blocks = num_blocks;
    ec.max_num_seqs = max_num_seqs;
    ec.max_num_batched_tokens = 48;
    ec.max_chunk_tokens = 16;
    ec.max_seqs = 32;
    ec.prefix_cache = prefix;
    ec.prefill_only = prefill_only;
    ec.check_kv = true;
    eng *e = NULL;
    char err[256] = "";
    int rc = eng_open(g_model, &ec, &e, err, sizeof(err));
    if (rc != 0) print_error("eng_open: %s\n", err);
    assert_int_equal(rc, 0);
    return e;
}

/* Runs every case through e at once; out[i] gets the generated tokens. */
static void run_all(eng *e, const req_case *c, int n, int32_t out[][MAX_NEW + 1], uint32_t *n_out)
{
    for (int i = 0; i < n; i++) {
        eng_request r = {.id = 100 + (uint64_t)i,
                         .prompt = c[i].prompt,
                         .n_prompt = c[i].n_prompt,
                         .max_tokens = c[i].max_new,
                         .sampling = c[i].sp};
        assert_int_equal(eng_add(e, &r), 0);
        n_out[i] = 0;
    }
    int done = 0;
    for (int guard = 0; done < n; guard++) {
        assert_true(guard < 10000);
        const eng_event *ev;
        uint32_t nev;
        int rc = eng_step(e, &ev, &nev, NULL);
        assert_int_equal(rc, 0);
        for (uint32_t k = 0; k < nev; k++) {
            int i = (int)(ev[k].id - 100);
            assert_true(i >= 0 && i < n);
            assert_int_not_equal(ev[k].finish, ENG_FINISH_ERROR);
            out[i][n_out[i]++] = ev[k].token;
            if (ev[k].finish != ENG_FINISH_NONE) done++;
        }
    }
    const eng_event *ev;
    uint32_t nev;
    assert_int_equal(eng_step(e, &ev, &nev, NULL), TD_EAGAIN);
}

static void check_batch_vs_alone(int seeded)
{
    req_case c[N_REQ];
    make_cases(c, N_REQ, seeded);
    static int32_t ref[N_REQ][MAX_NEW + 1], got[N_REQ][MAX_NEW + 1];
    uint32_t n_ref[N_REQ], n_got[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        eng *e = open_eng(0, 1, 0, 0);
        run_all(e, &c[i], 1, &ref[i], &n_ref[i]);
        eng_close(e);
    }
    /* 12 blocks of 16 for up to 12 requests of up to 84 tokens: preemption. */
    eng *e = open_eng(12, 8, 1, 0);
    run_all(e, c, N_REQ, got, n_got);
    eng_stats s;
    eng_stats_get(e, &s);
    assert_true(s.preemptions > 0);
    assert_int_equal(s.kv.used, 0);
    eng_close(e);
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(n_got[i], n_ref[i]);
        assert_int_equal(n_ref[i], c[i].max_new);
        assert_memory_equal(got[i], ref[i], n_ref[i] * sizeof(int32_t));
    }
}

static void test_batch_equals_alone_greedy(void **state)
{
    (void)state;
    check_batch_vs_alone(0);
}

static void test_batch_equals_alone_seeded(void **state)
{
    (void)state;
    check_batch_vs_alone(1);
}

/* Prefill in one runtime, copy the prompt's blocks into another runtime's
 * pool (what kvx does between processes), decode there. */
static void check_split(int seeded)
{
    req_case c[N_REQ];
    make_cases(c, N_REQ, seeded);
    static int32_t ref[N_REQ][MAX_NEW + 1];
    uint32_t n_ref[N_REQ];
    eng *whole = open_eng(0, 8, 0, 0);
    run_all(whole, c, N_REQ, ref, n_ref);
    eng_close(whole);

    eng *pre = open_eng(64, 8, 1, 1);
    eng *dec = open_eng(64, 8, 1, 0);
    const kv_layout *lp = eng_layout(pre), *ld = eng_layout(dec);
    size_t bb = kv_layout_block_bytes(lp);
    assert_int_equal(bb, kv_layout_block_bytes(ld));
    for (int i = 0; i < N_REQ; i++) {
        eng_request r = {.id = (uint64_t)i,
                         .prompt = c[i].prompt,
                         .n_prompt = c[i].n_prompt,
                         .max_tokens = c[i].max_new,
                         .sampling = c[i].sp};
        assert_int_equal(eng_add(pre, &r), 0);
        const eng_event *ev = NULL;
        uint32_t nev = 0;
        int32_t first = -1;
        int64_t src = -1;
        while (first < 0) {
            assert_int_equal(eng_step(pre, &ev, &nev, NULL), 0);
            for (uint32_t k = 0; k < nev; k++) {
                assert_int_equal(ev[k].finish, ENG_FINISH_PREFILLED);
                first = ev[k].token;
                src = ev[k].kv_seq;
            }
        }
        assert_int_equal(first, ref[i][0]);
        /* Destination blocks for the prompt, as a decode worker allocates. */
        kvc_pool *dp = eng_kvc(dec);
        kvc_seq_spec spec = {
            .tokens = c[i].prompt, .n_prompt = c[i].n_prompt, .n_slots = c[i].n_prompt};
        int64_t dst = -1;
        assert_int_equal(kvc_seq_alloc(dp, &spec, &dst, NULL), 0);
        uint32_t ns = 0, nd = 0;
        const int32_t *ts = kvc_seq_table(eng_kvc(pre), src, &ns);
        const int32_t *td = kvc_seq_table(dp, dst, &nd);
        assert_int_equal(ns, nd);
        for (uint32_t l = 0; l < lp->n_layers; l++)
            for (uint32_t b = 0; b < ns; b++)
                memcpy((char *)eng_kv_base(dec) + kv_layout_block_offset(ld, l, (uint32_t)td[b]),
                       (char *)eng_kv_base(pre) + kv_layout_block_offset(lp, l, (uint32_t)ts[b]),
                       bb);
        assert_int_equal(kvc_seq_free(eng_kvc(pre), src), 0);
        assert_int_equal(kvc_seq_commit(dp, dst, c[i].prompt, c[i].n_prompt), 0);
        int done = 0;
        assert_int_equal(eng_add_prefilled(dec, &r, dst, first, &done), 0);
        if (done != ENG_FINISH_NONE) {
            assert_int_equal(c[i].max_new, 1);
            assert_int_equal(kvc_seq_free(dp, dst), 0);
        }
    }
    static int32_t got[N_REQ][MAX_NEW + 1];
    uint32_t n_got[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        got[i][0] = ref[i][0];
        n_got[i] = 1;
    }
    for (int guard = 0;; guard++) {
        assert_true(guard < 10000);
        const eng_event *ev;
        uint32_t nev;
        int rc = eng_step(dec, &ev, &nev, NULL);
        if (rc == TD_EAGAIN) break;
        assert_int_equal(rc, 0);
        for (uint32_t k = 0; k < nev; k++)
            got[ev[k].id][n_got[ev[k].id]++] = ev[k].token;
    }
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(n_got[i], n_ref[i]);
        assert_memory_equal(got[i], ref[i], n_ref[i] * sizeof(int32_t));
    }
    eng_stats s;
    eng_stats_get(pre, &s);
    assert_int_equal(s.kv.used, 0);
    eng_stats_get(dec, &s);
    assert_int_equal(s.kv.used, 0);
    eng_close(pre);
    eng_close(dec);
}

static void test_split_greedy(void **state)
{
    (void)state;
    check_split(0);
}

static void test_split_seeded(void **state)
{
    (void)state;
    check_split(1);
}

/* Bad requests are refused before anything is allocated; abort and detach
 * give every block back. */
static void test_bad_requests_and_abort(void **state)
{
    (void)state;
    eng *e = open_eng(0, 4, 0, 0);
    int32_t p[CTX + 1];
    for (int i = 0; i < CTX + 1; i++)
        p[i] = i % VOCAB;
    eng_request r = {.id = 1, .prompt = p, .n_prompt = 4, .max_tokens = 4};
    smp_params_defaults(&r.sampling);
    r.n_prompt = 0;
    assert_int_equal(eng_add(e, &r), TD_EINVAL);
    r.n_prompt = CTX;
    assert_int_equal(eng_add(e, &r), TD_ETOOLONG);
    r.n_prompt = 4;
    p[2] = VOCAB;
    assert_int_equal(eng_add(e, &r), TD_EINVAL);
    p[2] = 2;
    r.max_tokens = 0;
    assert_int_equal(eng_add(e, &r), TD_EINVAL);
    r.max_tokens = 50;
    assert_int_equal(eng_add(e, &r), 0);
    assert_int_equal(eng_add(e, &r), TD_EEXIST);
    const eng_event *ev;
    uint32_t nev;
    eng_step_stats ss;
    assert_int_equal(eng_step(e, &ev, &nev, &ss), 0);
    assert_int_equal(nev, 1);
    assert_int_equal(ss.n_prefill_tokens, 4);
    assert_int_equal(ss.n_ctx_tokens, 4); /* the prompt's 4 positions */
    assert_int_equal(eng_step(e, &ev, &nev, &ss), 0);
    assert_int_equal(ss.n_decode_tokens, 1);
    assert_int_equal(ss.n_ctx_tokens, 5); /* the first drawn token attends over 5 */
    assert_int_equal(eng_abort(e, 1), 0);
    assert_int_equal(eng_abort(e, 1), TD_ENOENT);
    eng_stats s;
    eng_stats_get(e, &s);
    assert_int_equal(s.kv.used, 0);
    assert_int_equal(eng_step(e, &ev, &nev, NULL), TD_EAGAIN);
    eng_close(e);

    /* Prefill-only: a detached request hands its blocks to the caller. */
    e = open_eng(0, 4, 0, 1);
    r.max_tokens = 4;
    r.n_prompt = 40;
    assert_int_equal(eng_add(e, &r), 0);
    assert_int_equal(eng_step(e, &ev, &nev, &ss), 0); /* first chunk of 16 */
    assert_int_equal(nev, 0);
    assert_int_equal(ss.n_ctx_tokens, 16);
    int64_t kv = -1;
    assert_int_equal(eng_detach(e, 1, &kv), 0);
    assert_true(kv > 0);
    eng_stats_get(e, &s);
    assert_int_equal(s.kv.used, 3); /* the whole prompt's blocks, taken at admission */
    assert_int_equal(kvc_seq_free(eng_kvc(e), kv), 0);
    eng_stats_get(e, &s);
    assert_int_equal(s.kv.used, 0);
    eng_close(e);
}

/* A model whose logits are NaN fails the request with an error event; the
 * runtime stays usable. */
static void test_nan_logits(void **state)
{
    (void)state;
    mdl_config c = g_model->cfg;
    mdl_model *m = NULL;
    assert_int_equal(mdl_create_random(&c, 5, 0.5f, &m), 0);
    float *emb = (float *)m->tok_embed;
    for (int i = 0; i < c.dim * c.vocab_size; i++)
        emb[i] = NAN;
    eng_config ec;
    eng_config_defaults(&ec);
    eng *e = NULL;
    char err[128];
    assert_int_equal(eng_open(m, &ec, &e, err, sizeof(err)), 0);
    int32_t p[3] = {1, 2, 3};
    eng_request r = {.id = 7, .prompt = p, .n_prompt = 3, .max_tokens = 5};
    smp_params_defaults(&r.sampling);
    assert_int_equal(eng_add(e, &r), 0);
    const eng_event *ev;
    uint32_t nev;
    assert_int_equal(eng_step(e, &ev, &nev, NULL), 0);
    assert_int_equal(nev, 1);
    assert_int_equal(ev[0].finish, ENG_FINISH_ERROR);
    assert_int_equal(ev[0].err, TD_ERANGE);
    eng_stats s;
    eng_stats_get(e, &s);
    assert_int_equal(s.kv.used, 0);
    assert_int_equal(eng_step(e, &ev, &nev, NULL), TD_EAGAIN);
    eng_close(e);
    mdl_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_equals_alone_greedy),
        cmocka_unit_test(test_batch_equals_alone_seeded),
        cmocka_unit_test(test_split_greedy),
        cmocka_unit_test(test_split_seeded),
        cmocka_unit_test(test_bad_requests_and_abort),
        cmocka_unit_test(test_nan_logits),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
