/* Unit tests for engine/kvcache (kvc): a property test against a reference
 * model of the pool, then targeted cases (prefix hits, LRU order, ENOSPC,
 * copy-on-write, a decode worker's transfer destination, error paths).
 * kvc_check runs after every operation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/err.h"
#include "engine/kvcache/kvc.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

/* ---- seeded PRNG (xorshift64*) ---- */

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

/* ---- reference model: plain arrays and linear scans ----
 *
 * The model implements the documented policy independently: FREE blocks are a
 * stack (block 0 handed out first), CACHED blocks an array ordered oldest
 * first, a sequence frees its blocks last first, and a cached block is found
 * by comparing its whole token prefix (no hashing at all). */

#define MB 64  /* blocks */
#define MS 12  /* sequences */
#define MT 256 /* tokens per sequence */

enum { M_FREE, M_USED, M_CACHED };

typedef struct mseq {
    bool live;
    int64_t id;
    int32_t table[MT];
    uint32_t n_blocks, n_tokens, n_committed;
    uint32_t n_known; /* tok[0, n_known) are chosen: the prompt, then grown positions */
    int32_t tok[MT];
} mseq;

typedef struct model {
    uint32_t nb, bs, max_bps, max_seqs;
    bool pc;
    uint32_t refcnt[MB];
    int state[MB];
    bool reg[MB];
    uint32_t plen[MB];
    int32_t prefix[MB][MT];
    int32_t free_stack[MB];
    uint32_t n_free;
    int32_t lru[MB]; /* oldest first */
    uint32_t n_lru;
    mseq seqs[MS];
    uint64_t lookups, lookup_hits, query_blocks, hit_blocks, evictions, cows;
} model;

static void m_init(model *m, uint32_t nb, uint32_t bs, uint32_t max_bps, uint32_t max_seqs, bool pc)
{
    memset(m, 0, sizeof *m);
    m->nb = nb;
    m->bs = bs;
    m->max_bps = max_bps;
    m->max_seqs = max_seqs;
    m->pc = pc;
    for (uint32_t i = 0; i < nb; i++)
        m->free_stack[i] = (int32_t)(nb - 1 - i);
    m->n_free = nb;
}

static int32_t m_take(model *m)
{
    int32_t b;
    if (m->n_free > 0) {
        b = m->free_stack[--m->n_free];
    } else {
        b = m->lru[0];
        memmove(m->lru, m->lru + 1, (m->n_lru - 1) * sizeof m->lru[0]);
        m->n_lru--;
        m->reg[b] = false;
        m->evictions++;
    }
    m->state[b] = M_USED;
    m->refcnt[b] = 1;
    return b;
}

static void m_ref(model *m, int32_t b)
{
    if (m->state[b] == M_CACHED) {
        uint32_t i = 0;
        while (m->lru[i] != b)
            i++;
        memmove(m->lru + i, m->lru + i + 1, (m->n_lru - i - 1) * sizeof m->lru[0]);
        m->n_lru--;
        m->state[b] = M_USED;
    }
    m->refcnt[b]++;
}

static void m_unref(model *m, int32_t b)
{
    if (--m->refcnt[b] > 0) return;
    if (m->reg[b]) {
        m->state[b] = M_CACHED;
        m->lru[m->n_lru++] = b;
    } else {
        m->state[b] = M_FREE;
        m->free_stack[m->n_free++] = b;
    }
}

static int32_t m_find(const model *m, const int32_t *tokens, uint32_t len)
{
    for (uint32_t b = 0; b < m->nb; b++)
        if (m->reg[b] && m->plen[b] == len && memcmp(m->prefix[b], tokens, len * 4) == 0)
            return (int32_t)b;
    return -1;
}

static uint32_t m_limit(const model *m, uint32_t n_prompt, uint32_t n_slots)
{
    uint32_t lim = (n_prompt - 1) / m->bs;
    if (n_slots / m->bs < lim) lim = n_slots / m->bs;
    if (m->max_bps < lim) lim = m->max_bps;
    return lim;
}

static uint32_t m_hits(const model *m, const int32_t *tokens, uint32_t lim, int32_t *hits)
{
    if (!m->pc) return 0;
    uint32_t n = 0;
    while (n < lim) {
        int32_t b = m_find(m, tokens, (n + 1) * m->bs);
        if (b < 0) break;
        hits[n++] = b;
    }
    return n;
}

static uint32_t m_live(const model *m)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < MS; i++)
        n += m->seqs[i].live;
    return n;
}

static uint32_t m_blocks_for(const model *m, uint32_t n)
{
    return (n + m->bs - 1) / m->bs;
}

static int m_alloc(model *m, const int32_t *prompt, uint32_t n_prompt, uint32_t n_slots,
                   uint32_t n_cap, mseq **out)
{
    uint32_t cap = n_cap ? n_cap : n_slots;
    uint32_t need = m_blocks_for(m, cap);
    if (need > m->max_bps) return TD_ETOOLONG;
    if (m_live(m) == m->max_seqs) return TD_ENOSPC;
    int32_t hits[MT];
    uint32_t lim = m_limit(m, n_prompt, n_slots);
    uint32_t n_hit = m_hits(m, prompt, lim, hits), hit_cached = 0;
    for (uint32_t i = 0; i < n_hit; i++)
        hit_cached += m->state[hits[i]] == M_CACHED;
    if (need - n_hit + hit_cached > m->n_free + m->n_lru) return TD_ENOSPC;
    mseq *s = NULL;
    for (uint32_t i = 0; i < MS && !s; i++)
        if (!m->seqs[i].live) s = &m->seqs[i];
    memset(s, 0, sizeof *s);
    s->live = true;
    for (uint32_t i = 0; i < n_hit; i++) {
        m_ref(m, hits[i]);
        s->table[i] = hits[i];
    }
    for (uint32_t i = n_hit; i < need; i++)
        s->table[i] = m_take(m);
    s->n_blocks = need;
    s->n_tokens = n_slots;
    s->n_committed = n_hit * m->bs;
    memcpy(s->tok, prompt, n_prompt * 4);
    s->n_known = n_prompt;
    if (m->pc) {
        m->lookups++;
        m->lookup_hits += n_hit > 0;
        m->query_blocks += lim;
        m->hit_blocks += n_hit;
    }
    *out = s;
    return 0;
}

static int m_grow(model *m, mseq *s, uint32_t n_new, kvc_cow *cow)
{
    cow->src = cow->dst = -1;
    if (n_new == 0) return 0;
    uint32_t total = s->n_tokens + n_new;
    uint32_t blocks = m_blocks_for(m, total);
    if (blocks > m->max_bps) return TD_ETOOLONG;
    uint32_t add = blocks > s->n_blocks ? blocks - s->n_blocks : 0;
    uint32_t wi = s->n_tokens / m->bs;
    bool need_cow = s->n_tokens % m->bs && wi < s->n_blocks && m->refcnt[s->table[wi]] > 1;
    if (add + need_cow > m->n_free + m->n_lru) return TD_ENOSPC;
    if (need_cow) {
        int32_t src = s->table[wi];
        int32_t dst = m_take(m);
        m_unref(m, src);
        s->table[wi] = dst;
        cow->src = src;
        cow->dst = dst;
        m->cows++;
    }
    for (uint32_t i = 0; i < add; i++)
        s->table[s->n_blocks + i] = m_take(m);
    s->n_blocks += add;
    s->n_tokens = total;
    return 0;
}

static void m_commit(model *m, mseq *s, uint32_t n)
{
    if (m->pc) {
        for (uint32_t i = s->n_committed / m->bs; i < n / m->bs; i++) {
            int32_t b = s->table[i];
            uint32_t len = (i + 1) * m->bs;
            if (!m->reg[b] && m_find(m, s->tok, len) < 0) {
                m->reg[b] = true;
                m->plen[b] = len;
                memcpy(m->prefix[b], s->tok, len * 4);
            }
        }
    }
    s->n_committed = n;
}

static void m_free_seq(model *m, mseq *s)
{
    for (uint32_t i = s->n_blocks; i-- > 0;)
        m_unref(m, s->table[i]);
    s->live = false;
}

static uint32_t m_registered(const model *m)
{
    uint32_t n = 0;
    for (uint32_t b = 0; b < m->nb; b++)
        n += m->reg[b];
    return n;
}

/* Compares the pool with the model; fails the test on any difference. */
static void compare(const kvc_pool *p, const model *m)
{
    assert_int_equal(kvc_check(p), 0);
    kvc_stats st;
    kvc_stats_get(p, &st);
    assert_int_equal(st.free, m->n_free);
    assert_int_equal(st.cached, m->n_lru);
    assert_int_equal(kvc_available_blocks(p), m->n_free + m->n_lru);
    assert_int_equal(st.used, m->nb - m->n_free - m->n_lru);
    assert_int_equal(st.registered, m_registered(m));
    assert_int_equal(st.live_seqs, m_live(m));
    assert_int_equal(st.lookups, m->lookups);
    assert_int_equal(st.lookup_hits, m->lookup_hits);
    assert_int_equal(st.query_blocks, m->query_blocks);
    assert_int_equal(st.hit_blocks, m->hit_blocks);
    assert_int_equal(st.evictions, m->evictions);
    assert_int_equal(st.cow_copies, m->cows);
    for (uint32_t b = 0; b < m->nb; b++)
        assert_int_equal(kvc_block_refcount(p, (int32_t)b), (int)m->refcnt[b]);
    for (uint32_t i = 0; i < MS; i++) {
        const mseq *s = &m->seqs[i];
        if (!s->live) continue;
        uint32_t nb = 0;
        const int32_t *t = kvc_seq_table(p, s->id, &nb);
        assert_non_null(t);
        assert_int_equal(nb, s->n_blocks);
        assert_memory_equal(t, s->table, nb * sizeof *t);
        kvc_seq_info info;
        assert_int_equal(kvc_seq_get_info(p, s->id, &info), 0);
        assert_int_equal(info.n_tokens, s->n_tokens);
        assert_int_equal(info.n_committed, s->n_committed);
    }
}

static mseq *pick_live(model *m)
{
    uint32_t live = m_live(m);
    if (live == 0) return NULL;
    uint32_t k = rng_below(live);
    for (uint32_t i = 0; i < MS; i++)
        if (m->seqs[i].live && k-- == 0) return &m->seqs[i];
    return NULL;
}

/* Prompts drawn from a few shared stems so that prefixes repeat, over a small
 * alphabet so that equal blocks appear under different prefixes too. */
static uint32_t make_prompt(const int32_t stems[3][MT], int32_t *out, uint32_t max_len)
{
    uint32_t len = 1 + rng_below(max_len);
    uint32_t from_stem = rng_below(4) == 0 ? 0 : rng_below(len + 1);
    const int32_t *stem = stems[rng_below(3)];
    for (uint32_t i = 0; i < len; i++)
        out[i] = i < from_stem ? stem[i] : (int32_t)rng_below(4);
    return len;
}

static void run_property(uint64_t seed, bool pc, uint32_t n_ops)
{
    const uint32_t nb = 48, bs = 4, max_bps = 14, max_seqs = MS;
    kvc_config cfg = {.num_blocks = nb,
                      .block_size = bs,
                      .max_seqs = max_seqs,
                      .max_blocks_per_seq = max_bps,
                      .enable_prefix_cache = pc,
                      .hash_seed = 0x7a11de3ULL};
    kvc_pool *p = NULL;
    assert_int_equal(kvc_pool_create(&cfg, &p), 0);
    static model m;
    m_init(&m, nb, bs, max_bps, max_seqs, pc);
    rng_state = seed;
    int32_t stems[3][MT];
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < MT; i++)
            stems[s][i] = (int32_t)rng_below(4);
    int64_t stale[8] = {0};
    uint32_t n_stale = 0;
    uint32_t counts[7] = {0};

    for (uint32_t op = 0; op < n_ops; op++) {
        uint32_t kind = rng_below(100);
        mseq *s = pick_live(&m);
        if (kind < 22 || !s) { /* alloc (sometimes with headroom) */
            int32_t prompt[MT];
            uint32_t n_prompt = make_prompt(stems, prompt, 60);
            uint32_t n_slots = rng_below(2) ? n_prompt : 1 + rng_below(n_prompt);
            uint32_t n_cap = rng_below(3) == 0 ? n_slots + rng_below(20) : 0;
            kvc_seq_spec spec = {
                .tokens = prompt, .n_prompt = n_prompt, .n_slots = n_slots, .n_capacity = n_cap};
            mseq *ms = NULL;
            int want = m_alloc(&m, prompt, n_prompt, n_slots, n_cap, &ms);
            int64_t id = -1;
            uint32_t n_cached = 12345;
            int rc = kvc_seq_alloc(p, &spec, &id, &n_cached);
            assert_int_equal(rc, want);
            if (rc == 0) {
                ms->id = id;
                assert_true(id > 0);
                assert_int_equal(n_cached, ms->n_committed);
            }
            counts[0]++;
        } else if (kind < 50) { /* grow (chunk of prompt or decode tokens) */
            uint32_t n_new = rng_below(3) == 0 ? rng_below(2 * bs + 1) : 1;
            kvc_cow want_cow, cow;
            int want = m_grow(&m, s, n_new, &want_cow);
            int rc = kvc_seq_grow(p, s->id, n_new, &cow);
            assert_int_equal(rc, want);
            if (rc == 0) {
                assert_int_equal(cow.src, want_cow.src);
                assert_int_equal(cow.dst, want_cow.dst);
                for (; s->n_known < s->n_tokens; s->n_known++)
                    s->tok[s->n_known] = (int32_t)rng_below(4);
            }
            counts[1]++;
        } else if (kind < 68) { /* commit */
            uint32_t n = s->n_committed + rng_below(s->n_tokens - s->n_committed + 1);
            int rc = kvc_seq_commit(p, s->id, s->tok, n);
            assert_int_equal(rc, 0);
            m_commit(&m, s, n);
            /* Going backwards is refused and changes nothing. */
            if (n > 0) assert_int_equal(kvc_seq_commit(p, s->id, s->tok, n - 1), TD_EINVAL);
            counts[2]++;
        } else if (kind < 76) { /* fork */
            int64_t child = -1;
            int rc = kvc_seq_fork(p, s->id, &child);
            if (m_live(&m) == max_seqs) {
                assert_int_equal(rc, TD_ENOSPC);
            } else {
                assert_int_equal(rc, 0);
                mseq *c = NULL;
                for (uint32_t i = 0; i < MS && !c; i++)
                    if (!m.seqs[i].live) c = &m.seqs[i];
                *c = *s;
                c->id = child;
                c->n_blocks = m_blocks_for(&m, s->n_tokens);
                for (uint32_t i = 0; i < c->n_blocks; i++)
                    m.refcnt[c->table[i]]++;
            }
            counts[3]++;
        } else if (kind < 95) { /* free */
            int64_t id = s->id;
            assert_int_equal(kvc_seq_free(p, id), 0);
            m_free_seq(&m, s);
            stale[n_stale++ % 8] = id;
            counts[4]++;
        } else if (kind < 98) { /* read-only prefix lookup */
            int32_t prompt[MT], hits[MT];
            uint32_t n_prompt = make_prompt(stems, prompt, 60);
            uint32_t n_cached = 777;
            assert_int_equal(kvc_prefix_match(p, prompt, n_prompt, &n_cached), 0);
            uint32_t lim = m_limit(&m, n_prompt, n_prompt);
            assert_int_equal(n_cached, m_hits(&m, prompt, lim, hits) * bs);
            counts[5]++;
        } else { /* a stale id fails cleanly */
            if (n_stale > 0) {
                int64_t id = stale[rng_below(n_stale < 8 ? n_stale : 8)];
                kvc_cow cow;
                assert_int_equal(kvc_seq_grow(p, id, 1, &cow), TD_ENOENT);
                assert_int_equal(kvc_seq_free(p, id), TD_ENOENT);
                assert_null(kvc_seq_table(p, id, NULL));
            }
            counts[6]++;
        }
        compare(p, &m);
    }
    /* Free everything: nothing may stay referenced. */
    for (uint32_t i = 0; i < MS; i++)
        if (m.seqs[i].live) {
            assert_int_equal(kvc_seq_free(p, m.seqs[i].id), 0);
            m_free_seq(&m, &m.seqs[i]);
        }
    compare(p, &m);
    kvc_stats st;
    kvc_stats_get(p, &st);
    assert_int_equal(st.used, 0);
    assert_int_equal(st.free + st.cached, nb);
    assert_int_equal(st.live_seqs, 0);
    if (!pc) assert_int_equal(st.free, nb);
    /* One sequence can take the whole pool, evicting every cached block. */
    int32_t big[MT];
    for (uint32_t i = 0; i < max_bps * bs; i++)
        big[i] = 1000 + (int32_t)i;
    kvc_seq_spec spec = {.tokens = big, .n_prompt = max_bps * bs, .n_slots = max_bps * bs};
    int64_t id;
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, NULL), 0);
    assert_int_equal(kvc_check(p), 0);
    assert_int_equal(kvc_seq_free(p, id), 0);
    kvc_stats_get(p, &st);
    assert_int_equal(st.used, 0);
    assert_int_equal(st.free + st.cached, nb);
    print_message("seed=%llx ops: alloc=%u grow=%u commit=%u fork=%u free=%u match=%u "
                  "stale=%u; hits=%llu/%llu evictions=%llu cow=%llu\n",
                  (unsigned long long)seed, counts[0], counts[1], counts[2], counts[3], counts[4],
                  counts[5], counts[6], (unsigned long long)st.hit_blocks,
                  (unsigned long long)st.query_blocks, (unsigned long long)st.evictions,
                  (unsigned long long)st.cow_copies);
    if (pc) {
        assert_true(st.hit_blocks > 0); /* the workload did exercise the cache */
        assert_true(st.evictions > 0);
        assert_true(st.cow_copies > 0);
    }
    kvc_pool_free(p);
}

static void test_property_prefix_cache(void **state)
{
    (void)state;
    run_property(0x5eed0001ULL, true, 4000);
    run_property(0x5eed0002ULL, true, 4000);
}

static void test_property_no_prefix_cache(void **state)
{
    (void)state;
    run_property(0x5eed0003ULL, false, 2000);
}

/* ---- targeted cases ---- */

static kvc_pool *make_pool(uint32_t nb, uint32_t bs, bool pc)
{
    kvc_config cfg = {.num_blocks = nb, .block_size = bs, .max_seqs = 8, .enable_prefix_cache = pc};
    kvc_pool *p = NULL;
    assert_int_equal(kvc_pool_create(&cfg, &p), 0);
    return p;
}

static int64_t alloc_prompt(kvc_pool *p, const int32_t *tokens, uint32_t n, uint32_t *n_cached)
{
    kvc_seq_spec spec = {.tokens = tokens, .n_prompt = n, .n_slots = n};
    int64_t id = -1;
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, n_cached), 0);
    assert_int_equal(kvc_check(p), 0);
    return id;
}

static void test_prefix_hit_shared_prompt(void **state)
{
    (void)state;
    kvc_pool *p = make_pool(32, 4, true);
    int32_t a[14], b[14];
    for (int i = 0; i < 14; i++)
        a[i] = b[i] = 100 + i;
    b[9] = 7; /* b shares a's first two blocks (tokens 0..7), differs in block 2 */
    uint32_t n_cached = 99;
    int64_t sa = alloc_prompt(p, a, 14, &n_cached);
    assert_int_equal(n_cached, 0);
    /* Nothing is cached before the KV lands. */
    uint32_t m = 99;
    assert_int_equal(kvc_prefix_match(p, b, 14, &m), 0);
    assert_int_equal(m, 0);
    assert_int_equal(kvc_seq_commit(p, sa, a, 14), 0); /* 3 full blocks registered */
    assert_int_equal(kvc_check(p), 0);
    kvc_stats st;
    kvc_stats_get(p, &st);
    assert_int_equal(st.registered, 3);

    int64_t sb = alloc_prompt(p, b, 14, &n_cached);
    assert_int_equal(n_cached, 8);
    const int32_t *ta = kvc_seq_table(p, sa, NULL);
    const int32_t *tb = kvc_seq_table(p, sb, NULL);
    assert_int_equal(ta[0], tb[0]);
    assert_int_equal(ta[1], tb[1]);
    assert_true(ta[2] != tb[2]);
    assert_int_equal(kvc_block_refcount(p, ta[0]), 2);
    kvc_seq_info info;
    assert_int_equal(kvc_seq_get_info(p, sb, &info), 0);
    assert_int_equal(info.n_committed, 8);
    assert_int_equal(info.n_tokens, 14);

    /* The same block content under another prefix is not a hit. */
    int32_t c[8];
    memcpy(c, a + 4, 4 * sizeof *c); /* block 1 of a, placed first */
    memcpy(c + 4, a + 4, 4 * sizeof *c);
    assert_int_equal(kvc_prefix_match(p, c, 8, &m), 0);
    assert_int_equal(m, 0);

    /* The last token is always computed: a prompt of exactly 3 cached blocks
     * reuses only 2. */
    assert_int_equal(kvc_prefix_match(p, a, 12, &m), 0);
    assert_int_equal(m, 8);
    assert_int_equal(kvc_prefix_match(p, a, 13, &m), 0);
    assert_int_equal(m, 12);

    kvc_stats_get(p, &st);
    assert_int_equal(st.lookups, 2);
    assert_int_equal(st.lookup_hits, 1);
    assert_int_equal(st.hit_blocks, 2);
    assert_int_equal(st.query_blocks, 3 + 3);

    /* Freed blocks stay cached and are hit again. */
    assert_int_equal(kvc_seq_free(p, sa), 0);
    assert_int_equal(kvc_seq_free(p, sb), 0);
    assert_int_equal(kvc_check(p), 0);
    kvc_stats_get(p, &st);
    assert_int_equal(st.used, 0);
    assert_int_equal(st.cached, 3);
    int64_t sc = alloc_prompt(p, a, 14, &n_cached);
    assert_int_equal(n_cached, 12);
    assert_int_equal(kvc_seq_free(p, sc), 0);
    kvc_pool_free(p);
}

static void test_lru_eviction_order(void **state)
{
    (void)state;
    kvc_pool *p = make_pool(6, 2, true);
    /* Three sequences of 2 full blocks + 1 token (3 blocks, 2 registered). */
    int32_t t[3][5];
    int64_t s[3];
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < 5; i++)
            t[k][i] = 10 * (k + 1) + i;
    }
    s[0] = alloc_prompt(p, t[0], 5, NULL);
    assert_int_equal(kvc_seq_commit(p, s[0], t[0], 5), 0);
    s[1] = alloc_prompt(p, t[1], 5, NULL);
    assert_int_equal(kvc_seq_commit(p, s[1], t[1], 5), 0);
    int32_t blocks0[3], blocks1[3];
    memcpy(blocks0, kvc_seq_table(p, s[0], NULL), sizeof blocks0);
    memcpy(blocks1, kvc_seq_table(p, s[1], NULL), sizeof blocks1);
    /* Free 1 then 0: LRU (oldest first) = 1's blocks (last block first), then 0's. */
    assert_int_equal(kvc_seq_free(p, s[1]), 0);
    assert_int_equal(kvc_seq_free(p, s[0]), 0);
    assert_int_equal(kvc_check(p), 0);
    kvc_stats st;
    kvc_stats_get(p, &st);
    assert_int_equal(st.free, 2);
    assert_int_equal(st.cached, 4);

    /* A new 3-block sequence takes the 2 free blocks, then evicts the oldest
     * cached block: block 1 of sequence 1 (freed first, last block first). */
    s[2] = alloc_prompt(p, t[2], 5, NULL);
    const int32_t *t2 = kvc_seq_table(p, s[2], NULL);
    assert_int_equal(t2[2], blocks1[1]);
    kvc_stats_get(p, &st);
    assert_int_equal(st.evictions, 1);
    /* Sequence 1's first block is still cached; its second is gone. Sequence
     * 0 is whole. */
    uint32_t m;
    assert_int_equal(kvc_prefix_match(p, t[1], 5, &m), 0);
    assert_int_equal(m, 2);
    assert_int_equal(kvc_prefix_match(p, t[0], 5, &m), 0);
    assert_int_equal(m, 4);
    /* A hit moves blocks out of the LRU list: reusing 0's prefix and needing
     * one more block evicts 1's first block, not 0's. */
    uint32_t n_cached;
    int64_t s3 = alloc_prompt(p, t[0], 5, &n_cached);
    assert_int_equal(n_cached, 4);
    assert_int_equal(kvc_seq_table(p, s3, NULL)[2], blocks1[0]);
    assert_int_equal(kvc_prefix_match(p, t[1], 5, &m), 0);
    assert_int_equal(m, 0);
    assert_int_equal(kvc_seq_free(p, s3), 0);
    assert_int_equal(kvc_seq_free(p, s[2]), 0);
    assert_int_equal(kvc_check(p), 0);
    kvc_pool_free(p);
}

static void snapshot(const kvc_pool *p, int *refs, uint32_t nb, kvc_stats *st)
{
    for (uint32_t b = 0; b < nb; b++)
        refs[b] = kvc_block_refcount(p, (int32_t)b);
    kvc_stats_get(p, st);
}

static void test_enospc_leaves_pool_unchanged(void **state)
{
    (void)state;
    kvc_pool *p = make_pool(8, 4, true);
    int32_t a[17];
    for (int i = 0; i < 17; i++)
        a[i] = i;
    int64_t sa = alloc_prompt(p, a, 9, NULL); /* 3 blocks */
    assert_int_equal(kvc_seq_commit(p, sa, a, 9), 0);
    int64_t sb = alloc_prompt(p, a + 1, 8, NULL); /* 2 blocks, committed, then freed */
    assert_int_equal(kvc_seq_commit(p, sb, a + 1, 8), 0);
    assert_int_equal(kvc_seq_free(p, sb), 0);      /* 2 cached */
    int64_t sc = alloc_prompt(p, a + 10, 1, NULL); /* 1 block */
    int refs0[8], refs1[8];
    kvc_stats st0, st1;
    snapshot(p, refs0, 8, &st0);
    assert_int_equal(st0.free, 2);
    assert_int_equal(st0.cached, 2);

    /* 8 blocks needed, 2 of them shared from a's prefix, 6 new but only 4
     * available (2 free + 2 cached): refused, and the prefix hits must not be
     * left referenced. */
    kvc_seq_spec spec = {.tokens = a, .n_prompt = 17, .n_slots = 17, .n_capacity = 32};
    int64_t id = 42;
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, NULL), TD_ENOSPC);
    assert_int_equal(kvc_check(p), 0);
    snapshot(p, refs1, 8, &st1);
    assert_memory_equal(refs0, refs1, sizeof refs0);
    assert_memory_equal(&st0, &st1, sizeof st0);

    /* Growing past the pool is refused the same way. */
    assert_int_equal(kvc_seq_grow(p, sa, 20, NULL), TD_ENOSPC); /* 5 more blocks */
    assert_int_equal(kvc_check(p), 0);
    snapshot(p, refs1, 8, &st1);
    assert_memory_equal(refs0, refs1, sizeof refs0);
    assert_memory_equal(&st0, &st1, sizeof st0);
    kvc_seq_info info;
    assert_int_equal(kvc_seq_get_info(p, sa, &info), 0);
    assert_int_equal(info.n_tokens, 9);
    assert_int_equal(info.n_blocks, 3);

    /* The cached blocks are still there. */
    uint32_t m;
    assert_int_equal(kvc_prefix_match(p, a + 1, 9, &m), 0);
    assert_int_equal(m, 8);
    /* Exactly 4 more blocks fit: the 2 free, then the 2 cached ones evicted. */
    assert_int_equal(kvc_seq_grow(p, sa, 25 - 9, NULL), 0);
    kvc_stats_get(p, &st1);
    assert_int_equal(st1.free + st1.cached, 0);
    assert_int_equal(st1.evictions, 2);
    assert_int_equal(kvc_check(p), 0);
    assert_int_equal(kvc_seq_free(p, sa), 0);
    assert_int_equal(kvc_seq_free(p, sc), 0);
    kvc_pool_free(p);
}

static void test_fork_copy_on_write(void **state)
{
    (void)state;
    kvc_pool *p = make_pool(16, 4, true);
    int32_t a[6] = {1, 2, 3, 4, 5, 6};
    int64_t parent = alloc_prompt(p, a, 6, NULL); /* blocks: full, half */
    assert_int_equal(kvc_seq_commit(p, parent, a, 6), 0);
    int64_t child;
    assert_int_equal(kvc_seq_fork(p, parent, &child), 0);
    assert_int_equal(kvc_check(p), 0);
    int32_t pt[2];
    memcpy(pt, kvc_seq_table(p, parent, NULL), sizeof pt);
    assert_int_equal(kvc_block_refcount(p, pt[0]), 2);
    assert_int_equal(kvc_block_refcount(p, pt[1]), 2);
    kvc_seq_info info;
    assert_int_equal(kvc_seq_get_info(p, child, &info), 0);
    assert_int_equal(info.n_tokens, 6);
    assert_int_equal(info.n_committed, 6);

    /* The child writes position 6 into the shared half block: copy first. */
    assert_int_equal(kvc_seq_grow(p, child, 1, NULL), TD_EINVAL); /* needs a cow out */
    kvc_cow cow;
    assert_int_equal(kvc_seq_grow(p, child, 1, &cow), 0);
    assert_int_equal(cow.src, pt[1]);
    assert_true(cow.dst >= 0 && cow.dst != pt[1]);
    const int32_t *ct = kvc_seq_table(p, child, NULL);
    assert_int_equal(ct[0], pt[0]); /* the full block stays shared */
    assert_int_equal(ct[1], cow.dst);
    assert_int_equal(kvc_block_refcount(p, pt[1]), 1);
    assert_int_equal(kvc_check(p), 0);
    /* The parent is alone on its block again: no copy. */
    assert_int_equal(kvc_seq_grow(p, parent, 3, &cow), 0);
    assert_int_equal(cow.src, -1);
    /* A full shared block never needs a copy: fork at a block boundary. */
    int64_t child2;
    assert_int_equal(kvc_seq_grow(p, child, 1, &cow), 0); /* child: 8 tokens */
    assert_int_equal(kvc_seq_fork(p, child, &child2), 0);
    assert_int_equal(kvc_seq_grow(p, child2, 1, &cow), 0);
    assert_int_equal(cow.src, -1);
    kvc_stats st;
    kvc_stats_get(p, &st);
    assert_int_equal(st.cow_copies, 1);
    assert_int_equal(kvc_seq_free(p, parent), 0);
    assert_int_equal(kvc_seq_free(p, child), 0);
    assert_int_equal(kvc_seq_free(p, child2), 0);
    assert_int_equal(kvc_check(p), 0);
    kvc_stats_get(p, &st);
    assert_int_equal(st.used, 0);
    kvc_pool_free(p);
}

/* A decode worker's transfer destination is a plain sequence: allocated with
 * headroom before prefill runs, then committed when the transfer is DONE or
 * freed when it FAILED. kvc never frees it on its own. */
static void test_transfer_destination(void **state)
{
    (void)state;
    kvc_pool *p = make_pool(16, 4, true);
    int32_t a[10];
    for (int i = 0; i < 10; i++)
        a[i] = 50 + i;
    kvc_seq_spec spec = {.tokens = a, .n_prompt = 10, .n_slots = 10, .n_capacity = 10 + 8};
    int64_t d1, d2, d3;
    uint32_t m = 99;
    assert_int_equal(kvc_seq_alloc(p, &spec, &d1, &m), 0);
    assert_int_equal(m, 0);
    kvc_seq_info info;
    assert_int_equal(kvc_seq_get_info(p, d1, &info), 0);
    assert_int_equal(info.n_tokens, 10);
    assert_int_equal(info.n_committed, 0);
    assert_int_equal(info.n_blocks, 5);
    /* Blocks a transfer may still be writing are not in the prefix cache. */
    assert_int_equal(kvc_prefix_match(p, a, 10, &m), 0);
    assert_int_equal(m, 0);
    /* FAILED: freeing the sequence returns every block; the id goes stale. */
    assert_int_equal(kvc_seq_free(p, d1), 0);
    assert_int_equal(kvc_seq_free(p, d1), TD_ENOENT);
    assert_int_equal(kvc_seq_commit(p, d1, a, 10), TD_ENOENT);
    kvc_stats st;
    kvc_stats_get(p, &st);
    assert_int_equal(st.free, 16);
    assert_int_equal(st.live_seqs, 0);

    /* DONE: the commit registers the full blocks; decode then grows into the
     * headroom without new blocks. */
    assert_int_equal(kvc_seq_alloc(p, &spec, &d2, NULL), 0);
    assert_int_equal(kvc_seq_commit(p, d2, a, 10), 0);
    assert_int_equal(kvc_prefix_match(p, a, 10, &m), 0);
    assert_int_equal(m, 8);
    assert_int_equal(kvc_seq_grow(p, d2, 8, NULL), 0);
    assert_int_equal(kvc_seq_get_info(p, d2, &info), 0);
    assert_int_equal(info.n_tokens, 18);
    assert_int_equal(info.n_blocks, 5);

    /* A later destination shares the cached prefix (the prefill worker skips
     * those n_cached tokens); when its transfer fails, the shared blocks stay
     * with d2 and in the cache. */
    assert_int_equal(kvc_seq_alloc(p, &spec, &d3, &m), 0);
    assert_int_equal(m, 8);
    assert_int_equal(kvc_seq_get_info(p, d3, &info), 0);
    assert_int_equal(info.n_committed, 8);
    assert_int_equal(info.n_blocks, 5);
    int32_t t2[5];
    memcpy(t2, kvc_seq_table(p, d2, NULL), sizeof t2);
    const int32_t *t3 = kvc_seq_table(p, d3, NULL);
    assert_int_equal(t3[0], t2[0]);
    assert_int_equal(t3[1], t2[1]);
    assert_true(t3[2] != t2[2]);
    assert_int_equal(kvc_block_refcount(p, t2[0]), 2);
    assert_int_equal(kvc_check(p), 0);
    assert_int_equal(kvc_seq_free(p, d3), 0);
    assert_int_equal(kvc_block_refcount(p, t2[0]), 1);
    assert_int_equal(kvc_block_refcount(p, t2[1]), 1);
    assert_int_equal(kvc_prefix_match(p, a, 10, &m), 0);
    assert_int_equal(m, 8);
    assert_int_equal(kvc_check(p), 0);
    assert_int_equal(kvc_seq_free(p, d2), 0);
    kvc_stats_get(p, &st);
    assert_int_equal(st.used, 0);
    assert_int_equal(st.cached, 2);
    kvc_pool_free(p);
}

static void test_prefix_hashes(void **state)
{
    (void)state;
    int32_t t[10];
    for (int i = 0; i < 10; i++)
        t[i] = 1000 * i - 3;
    uint64_t h[4];
    /* Two full blocks of 4 in 10 tokens. */
    assert_int_equal(kvc_prefix_hashes(99, 4, t, 10, h, 4), 2);
    /* Written out by hand: XXH3_64(seed || block 0), then (h0 || block 1). */
    uint8_t buf[8 + 16];
    uint64_t seed = 99;
    memcpy(buf, &seed, 8);
    memcpy(buf + 8, t, 16);
    assert_true(h[0] == XXH3_64bits(buf, sizeof buf));
    memcpy(buf, &h[0], 8);
    memcpy(buf + 8, t + 4, 16);
    assert_true(h[1] == XXH3_64bits(buf, sizeof buf));
    /* A chain: a shorter prompt gives a prefix of the hashes; another seed or
     * another first block changes every later hash. */
    uint64_t g[4];
    assert_int_equal(kvc_prefix_hashes(99, 4, t, 7, g, 4), 1);
    assert_true(g[0] == h[0]);
    assert_int_equal(kvc_prefix_hashes(98, 4, t, 10, g, 4), 2);
    assert_true(g[0] != h[0] && g[1] != h[1]);
    t[0]++;
    assert_int_equal(kvc_prefix_hashes(99, 4, t, 10, g, 1), 1); /* cap */
    assert_true(g[0] != h[0]);
    assert_int_equal(kvc_prefix_hashes(99, 0, t, 10, g, 4), TD_EINVAL);
    assert_int_equal(kvc_prefix_hashes(99, 4, NULL, 10, g, 4), TD_EINVAL);
    assert_int_equal(kvc_prefix_hashes(99, 4, t, 10, NULL, 4), TD_EINVAL);
}

static void test_bad_input(void **state)
{
    (void)state;
    kvc_pool *p = NULL;
    kvc_config cfg = {.num_blocks = 0, .max_seqs = 1};
    assert_int_equal(kvc_pool_create(&cfg, &p), TD_EINVAL);
    assert_null(p);
    cfg = (kvc_config){.num_blocks = 4, .max_seqs = 0};
    assert_int_equal(kvc_pool_create(&cfg, &p), TD_EINVAL);
    cfg = (kvc_config){.num_blocks = 4, .max_seqs = 1, .block_size = KVC_MAX_BLOCK_SIZE + 1};
    assert_int_equal(kvc_pool_create(&cfg, &p), TD_EINVAL);
    assert_int_equal(kvc_pool_create(NULL, &p), TD_EINVAL);
    kvc_pool_free(NULL);

    cfg = (kvc_config){
        .num_blocks = 8, .max_seqs = 1, .max_blocks_per_seq = 2, .enable_prefix_cache = true};
    assert_int_equal(kvc_pool_create(&cfg, &p), 0);
    assert_int_equal(kvc_block_size(p), KVC_DEFAULT_BLOCK_SIZE);
    int32_t a[40] = {0};
    int64_t id;
    kvc_seq_spec spec = {.tokens = a, .n_prompt = 0, .n_slots = 1};
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, NULL), TD_EINVAL);
    spec = (kvc_seq_spec){.tokens = NULL, .n_prompt = 4, .n_slots = 4};
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, NULL), TD_EINVAL);
    spec = (kvc_seq_spec){.tokens = a, .n_prompt = 4, .n_slots = 8, .n_capacity = 4};
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, NULL), TD_EINVAL);
    spec = (kvc_seq_spec){.tokens = a, .n_prompt = 33, .n_slots = 33};
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, NULL), TD_ETOOLONG);
    spec = (kvc_seq_spec){.tokens = a, .n_prompt = 20, .n_slots = 20};
    assert_int_equal(kvc_seq_alloc(p, &spec, &id, NULL), 0);
    int64_t id2;
    assert_int_equal(kvc_seq_alloc(p, &spec, &id2, NULL), TD_ENOSPC); /* max_seqs = 1 */
    assert_int_equal(kvc_seq_fork(p, id, &id2), TD_ENOSPC);
    assert_int_equal(kvc_seq_grow(p, id, 13, NULL), TD_ETOOLONG);
    assert_int_equal(kvc_seq_commit(p, id, a, 21), TD_EINVAL);
    assert_int_equal(kvc_seq_commit(p, id, NULL, 20), TD_EINVAL);
    assert_int_equal(kvc_seq_grow(p, 0, 1, NULL), TD_ENOENT);
    assert_int_equal(kvc_seq_grow(p, -5, 1, NULL), TD_ENOENT);
    assert_int_equal(kvc_seq_grow(p, id + 1, 1, NULL), TD_ENOENT);
    assert_int_equal(kvc_block_refcount(p, 8), -1);
    assert_int_equal(kvc_check(p), 0);
    assert_int_equal(kvc_seq_free(p, id), 0);
    kvc_pool_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_property_prefix_cache),
        cmocka_unit_test(test_property_no_prefix_cache),
        cmocka_unit_test(test_prefix_hit_shared_prompt),
        cmocka_unit_test(test_lru_eviction_order),
        cmocka_unit_test(test_enospc_leaves_pool_unchanged),
        cmocka_unit_test(test_fork_copy_on_write),
        cmocka_unit_test(test_transfer_destination),
        cmocka_unit_test(test_prefix_hashes),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
