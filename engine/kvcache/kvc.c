/* kvc: paged KV cache bookkeeping. See kvc.h for the model. */
#include "engine/kvcache/kvc.h"

#include "common/err.h"
#include "common/log.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

enum { KVC_FREE = 0, KVC_USED = 1, KVC_CACHED = 2 };

#define KVC_NONE       (-1)
#define KVC_SLOT_BITS  32
#define KVC_SLOT_MASK  0xffffffffLL
#define KVC_MAX_SEQS   (1u << 24)
#define KVC_MAX_BLOCKS (1u << 30)
#define KVC_MAX_GEN    0x7fffffffu /* keeps ids positive */

typedef struct kvc_seq {
    int32_t *table; /* max_blocks_per_seq entries, n_blocks in use */
    uint32_t gen;   /* 1..KVC_MAX_GEN, bumped on free; high half of the id */
    bool live;
    uint32_t n_blocks;
    uint32_t n_tokens;
    uint32_t n_committed;
    uint32_t n_hashed;  /* leading full blocks whose chain hash is known */
    uint64_t last_hash; /* chain hash of block n_hashed - 1 (hash_seed if none) */
} kvc_seq;

struct kvc_pool {
    kvc_config cfg;
    uint32_t bs;

    /* per block, num_blocks entries */
    uint32_t *refcnt;
    uint8_t *state;
    uint8_t *registered; /* 1: in the hash table under hash[b] */
    uint64_t *hash;
    int32_t *lru_prev, *lru_next;
    int32_t *tokens; /* num_blocks * bs: token ids of registered blocks, to verify hits */

    int32_t *free_stack; /* num_blocks; top at n_free - 1 */
    uint32_t n_free, n_used, n_cached, n_registered;
    int32_t lru_head, lru_tail; /* head = oldest = next to evict */

    /* open addressing, linear probing, backward-shift delete; entry = block id */
    int32_t *ht;
    uint32_t ht_mask;

    kvc_seq *seqs;       /* max_seqs */
    int32_t *seq_tables; /* max_seqs * max_blocks_per_seq */
    uint32_t *free_seqs; /* stack of free slots */
    uint32_t n_free_seqs;

    int32_t *hit_scratch;   /* max_blocks_per_seq: blocks found by a lookup */
    uint64_t *hash_scratch; /* max_blocks_per_seq: their chain hashes */
    uint8_t *hash_buf;      /* 8 + 4 * bs bytes: parent hash || token ids */
    uint32_t *check_refs;   /* num_blocks, kvc_check scratch */
    uint8_t *check_seen;    /* num_blocks, kvc_check scratch */

    kvc_stats st; /* only the uint64 counters are kept here */
};

/* ---- ids ---- */

static int64_t seq_id(const kvc_pool *p, uint32_t slot)
{
    return ((int64_t)p->seqs[slot].gen << KVC_SLOT_BITS) | (int64_t)slot;
}

static kvc_seq *seq_get(const kvc_pool *p, int64_t id)
{
    if (id <= 0) return NULL;
    uint64_t slot = (uint64_t)id & KVC_SLOT_MASK;
    uint64_t gen = (uint64_t)id >> KVC_SLOT_BITS;
    if (slot >= p->cfg.max_seqs) return NULL;
    kvc_seq *s = &p->seqs[slot];
    if (!s->live || s->gen != gen) return NULL;
    return s;
}

/* ---- hashing ---- */

/* buf: 8 + 4 * bs bytes of scratch. */
static uint64_t chain_hash(uint8_t *buf, uint32_t bs, uint64_t parent, const int32_t *tokens)
{
    /* Literal concatenation parent || tokens, so the hash of a block names its
     * whole prefix. Token ids are hashed in host byte order. */
    memcpy(buf, &parent, sizeof parent);
    memcpy(buf + sizeof parent, tokens, (size_t)bs * sizeof(int32_t));
    return XXH3_64bits(buf, sizeof parent + (size_t)bs * sizeof(int32_t));
}

static uint64_t block_hash(kvc_pool *p, uint64_t parent, const int32_t *tokens)
{
    return chain_hash(p->hash_buf, p->bs, parent, tokens);
}

int kvc_prefix_hashes(uint64_t hash_seed, uint32_t block_size, const int32_t *tokens,
                      uint32_t n_tokens, uint64_t *out, uint32_t cap)
{
    if (block_size == 0 || block_size > KVC_MAX_BLOCK_SIZE || (n_tokens > 0 && !tokens) ||
        (cap > 0 && !out))
        return TD_EINVAL;
    uint8_t buf[sizeof(uint64_t) + KVC_MAX_BLOCK_SIZE * sizeof(int32_t)];
    uint32_t n = n_tokens / block_size;
    if (n > cap) n = cap;
    uint64_t parent = hash_seed;
    for (uint32_t i = 0; i < n; i++)
        out[i] = parent = chain_hash(buf, block_size, parent, tokens + (size_t)i * block_size);
    return (int)n;
}

static int32_t ht_find(const kvc_pool *p, uint64_t h)
{
    uint32_t i = (uint32_t)h & p->ht_mask;
    for (;;) {
        int32_t b = p->ht[i];
        if (b == KVC_NONE) return KVC_NONE;
        if (p->hash[b] == h) return b;
        i = (i + 1) & p->ht_mask;
    }
}

static void ht_insert(kvc_pool *p, int32_t b)
{
    uint32_t i = (uint32_t)p->hash[b] & p->ht_mask;
    while (p->ht[i] != KVC_NONE)
        i = (i + 1) & p->ht_mask;
    p->ht[i] = b;
}

static void ht_remove(kvc_pool *p, int32_t b)
{
    uint32_t i = (uint32_t)p->hash[b] & p->ht_mask;
    while (p->ht[i] != b)
        i = (i + 1) & p->ht_mask;
    /* Backward-shift deletion: move later entries of the probe run into the hole
     * when their home slot does not lie strictly between the hole and them. */
    uint32_t hole = i;
    uint32_t j = i;
    for (;;) {
        j = (j + 1) & p->ht_mask;
        int32_t e = p->ht[j];
        if (e == KVC_NONE) break;
        uint32_t home = (uint32_t)p->hash[e] & p->ht_mask;
        bool in_between = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!in_between) {
            p->ht[hole] = e;
            hole = j;
        }
    }
    p->ht[hole] = KVC_NONE;
}

static void block_register(kvc_pool *p, int32_t b, uint64_t h, const int32_t *tokens)
{
    p->hash[b] = h;
    p->registered[b] = 1;
    memcpy(p->tokens + (size_t)b * p->bs, tokens, (size_t)p->bs * sizeof(int32_t));
    ht_insert(p, b);
    p->n_registered++;
}

static void block_unregister(kvc_pool *p, int32_t b)
{
    ht_remove(p, b);
    p->registered[b] = 0;
    p->n_registered--;
}

/* ---- LRU of CACHED blocks ---- */

static void lru_push_tail(kvc_pool *p, int32_t b)
{
    p->lru_prev[b] = p->lru_tail;
    p->lru_next[b] = KVC_NONE;
    if (p->lru_tail != KVC_NONE)
        p->lru_next[p->lru_tail] = b;
    else
        p->lru_head = b;
    p->lru_tail = b;
}

static void lru_remove(kvc_pool *p, int32_t b)
{
    int32_t pr = p->lru_prev[b], nx = p->lru_next[b];
    if (pr != KVC_NONE)
        p->lru_next[pr] = nx;
    else
        p->lru_head = nx;
    if (nx != KVC_NONE)
        p->lru_prev[nx] = pr;
    else
        p->lru_tail = pr;
    p->lru_prev[b] = p->lru_next[b] = KVC_NONE;
}

/* ---- block life cycle ---- */

/* Takes a block for new content: a FREE one, else the oldest CACHED one. The
 * caller has checked that n_free + n_cached is large enough. */
static int32_t block_take(kvc_pool *p)
{
    int32_t b;
    if (p->n_free > 0) {
        b = p->free_stack[--p->n_free];
    } else {
        b = p->lru_head;
        lru_remove(p, b);
        block_unregister(p, b);
        p->n_cached--;
        p->st.evictions++;
    }
    p->state[b] = KVC_USED;
    p->refcnt[b] = 1;
    p->n_used++;
    return b;
}

/* Adds a reference to a block found in the prefix cache. */
static void block_ref(kvc_pool *p, int32_t b)
{
    if (p->state[b] == KVC_CACHED) {
        lru_remove(p, b);
        p->n_cached--;
        p->state[b] = KVC_USED;
        p->n_used++;
    }
    p->refcnt[b]++;
}

static void block_unref(kvc_pool *p, int32_t b)
{
    if (--p->refcnt[b] > 0) return;
    p->n_used--;
    if (p->registered[b]) {
        p->state[b] = KVC_CACHED;
        lru_push_tail(p, b);
        p->n_cached++;
    } else {
        p->state[b] = KVC_FREE;
        p->free_stack[p->n_free++] = b;
    }
}

/* ---- pool ---- */

int kvc_pool_create(const kvc_config *cfg, kvc_pool **out)
{
    if (!cfg || !out) return TD_EINVAL;
    *out = NULL;
    kvc_config c = *cfg;
    if (c.block_size == 0) c.block_size = KVC_DEFAULT_BLOCK_SIZE;
    if (c.max_blocks_per_seq == 0) c.max_blocks_per_seq = c.num_blocks;
    if (c.num_blocks == 0 || c.num_blocks > KVC_MAX_BLOCKS || c.block_size > KVC_MAX_BLOCK_SIZE ||
        c.max_seqs == 0 || c.max_seqs > KVC_MAX_SEQS || c.max_blocks_per_seq > KVC_MAX_BLOCKS) {
        td_log_error("kvc", "bad_config", "num_blocks=%u block_size=%u max_seqs=%u", c.num_blocks,
                     c.block_size, c.max_seqs);
        return TD_EINVAL;
    }
    /* Every position of a sequence must fit in uint32 tokens. */
    if ((uint64_t)c.max_blocks_per_seq * c.block_size > UINT32_MAX) return TD_EINVAL;

    kvc_pool *p = calloc(1, sizeof *p);
    if (!p) return TD_ENOMEM;
    p->cfg = c;
    p->bs = c.block_size;
    size_t nb = c.num_blocks;
    uint32_t ht_size = 16;
    while (ht_size < 2 * (uint64_t)c.num_blocks)
        ht_size <<= 1;
    p->ht_mask = ht_size - 1;

    p->refcnt = calloc(nb, sizeof *p->refcnt);
    p->state = calloc(nb, 1);
    p->registered = calloc(nb, 1);
    p->hash = calloc(nb, sizeof *p->hash);
    p->lru_prev = malloc(nb * sizeof *p->lru_prev);
    p->lru_next = malloc(nb * sizeof *p->lru_next);
    p->free_stack = malloc(nb * sizeof *p->free_stack);
    p->ht = malloc((size_t)ht_size * sizeof *p->ht);
    p->check_refs = calloc(nb, sizeof *p->check_refs);
    p->check_seen = calloc(nb, 1);
    /* Block tokens are kept only with the prefix cache (to verify hits). */
    p->tokens = c.enable_prefix_cache ? malloc(nb * p->bs * sizeof *p->tokens) : NULL;
    p->seqs = calloc(c.max_seqs, sizeof *p->seqs);
    p->free_seqs = malloc(c.max_seqs * sizeof *p->free_seqs);
    p->seq_tables = malloc((size_t)c.max_seqs * c.max_blocks_per_seq * sizeof *p->seq_tables);
    p->hit_scratch = malloc(((size_t)c.max_blocks_per_seq + 1) * sizeof *p->hit_scratch);
    p->hash_scratch = malloc(((size_t)c.max_blocks_per_seq + 1) * sizeof *p->hash_scratch);
    p->hash_buf = malloc(sizeof(uint64_t) + (size_t)p->bs * sizeof(int32_t));
    if (!p->refcnt || !p->state || !p->registered || !p->hash || !p->lru_prev || !p->lru_next ||
        !p->free_stack || !p->ht || !p->check_refs || !p->check_seen ||
        (c.enable_prefix_cache && !p->tokens) || !p->seqs || !p->free_seqs || !p->seq_tables ||
        !p->hit_scratch || !p->hash_scratch || !p->hash_buf) {
        kvc_pool_free(p);
        return TD_ENOMEM;
    }
    /* Free stack popped from the top: block 0 is handed out first. */
    for (uint32_t i = 0; i < c.num_blocks; i++) {
        p->free_stack[i] = (int32_t)(c.num_blocks - 1 - i);
        p->lru_prev[i] = p->lru_next[i] = KVC_NONE;
    }
    p->n_free = c.num_blocks;
    p->lru_head = p->lru_tail = KVC_NONE;
    for (uint32_t i = 0; i < ht_size; i++)
        p->ht[i] = KVC_NONE;
    for (uint32_t i = 0; i < c.max_seqs; i++) {
        p->seqs[i].table = p->seq_tables + (size_t)i * c.max_blocks_per_seq;
        p->seqs[i].gen = 1;
        p->free_seqs[i] = c.max_seqs - 1 - i;
    }
    p->n_free_seqs = c.max_seqs;
    *out = p;
    return 0;
}

void kvc_pool_free(kvc_pool *p)
{
    if (!p) return;
    free(p->refcnt);
    free(p->state);
    free(p->registered);
    free(p->hash);
    free(p->lru_prev);
    free(p->lru_next);
    free(p->free_stack);
    free(p->ht);
    free(p->check_refs);
    free(p->check_seen);
    free(p->tokens);
    free(p->seqs);
    free(p->free_seqs);
    free(p->seq_tables);
    free(p->hit_scratch);
    free(p->hash_scratch);
    free(p->hash_buf);
    free(p);
}

uint32_t kvc_block_size(const kvc_pool *p)
{
    return p->bs;
}

uint32_t kvc_num_blocks(const kvc_pool *p)
{
    return p->cfg.num_blocks;
}

uint32_t kvc_max_blocks_per_seq(const kvc_pool *p)
{
    return p->cfg.max_blocks_per_seq;
}

uint32_t kvc_blocks_for(const kvc_pool *p, uint32_t n_tokens)
{
    return (uint32_t)(((uint64_t)n_tokens + p->bs - 1) / p->bs);
}

uint32_t kvc_available_blocks(const kvc_pool *p)
{
    return p->n_free + p->n_cached;
}

/* ---- prefix lookup ---- */

/* Fills hit_scratch / hash_scratch with the cached leading full blocks of
 * tokens, at most max_blocks of them, and returns how many. */
static uint32_t prefix_walk(kvc_pool *p, const int32_t *tokens, uint32_t max_blocks)
{
    uint64_t parent = p->cfg.hash_seed;
    uint32_t n = 0;
    for (; n < max_blocks; n++) {
        const int32_t *bt = tokens + (size_t)n * p->bs;
        uint64_t h = block_hash(p, parent, bt);
        int32_t b = ht_find(p, h);
        if (b == KVC_NONE) break;
        /* Equal hashes are not proof: compare the token ids too. (The parent
         * chain is implied: the previous block matched the same way.) */
        if (memcmp(p->tokens + (size_t)b * p->bs, bt, (size_t)p->bs * sizeof(int32_t)) != 0) break;
        p->hit_scratch[n] = b;
        p->hash_scratch[n] = h;
        parent = h;
    }
    return n;
}

/* Full blocks of a prompt that may come from the cache: the last token is
 * always recomputed because its logits are needed. */
static uint32_t lookup_limit(const kvc_pool *p, uint32_t n_prompt, uint32_t n_slots)
{
    uint32_t lim = n_prompt > 0 ? (n_prompt - 1) / p->bs : 0;
    uint32_t by_slots = n_slots / p->bs;
    if (by_slots < lim) lim = by_slots;
    if (lim > p->cfg.max_blocks_per_seq) lim = p->cfg.max_blocks_per_seq;
    return lim;
}

int kvc_prefix_match(const kvc_pool *p, const int32_t *tokens, uint32_t n_tokens,
                     uint32_t *n_cached)
{
    if (!p || !n_cached || (n_tokens > 0 && !tokens)) return TD_EINVAL;
    *n_cached = 0;
    if (!p->cfg.enable_prefix_cache) return 0;
    /* prefix_walk writes only scratch buffers; the pool state is unchanged. */
    kvc_pool *mp = (kvc_pool *)p;
    *n_cached = prefix_walk(mp, tokens, lookup_limit(p, n_tokens, n_tokens)) * p->bs;
    return 0;
}

/* ---- sequences ---- */

int kvc_seq_alloc(kvc_pool *p, const kvc_seq_spec *spec, int64_t *seq, uint32_t *n_cached)
{
    if (!p || !spec || !seq || spec->n_prompt == 0) return TD_EINVAL;
    if (p->cfg.enable_prefix_cache && !spec->tokens) return TD_EINVAL;
    if (spec->n_capacity != 0 && spec->n_capacity < spec->n_slots) return TD_EINVAL;
    uint32_t cap = spec->n_capacity ? spec->n_capacity : spec->n_slots;
    uint32_t need = kvc_blocks_for(p, cap);
    if (need > p->cfg.max_blocks_per_seq) return TD_ETOOLONG;
    if (p->n_free_seqs == 0) return TD_ENOSPC;

    uint32_t n_hit = 0, hit_cached = 0, query = 0;
    if (p->cfg.enable_prefix_cache) {
        query = lookup_limit(p, spec->n_prompt, spec->n_slots);
        n_hit = prefix_walk(p, spec->tokens, query);
        for (uint32_t i = 0; i < n_hit; i++)
            hit_cached += p->state[p->hit_scratch[i]] == KVC_CACHED;
    }
    /* Hits taken off the LRU list are no longer available for new blocks. */
    if ((uint64_t)(need - n_hit) + hit_cached > (uint64_t)p->n_free + p->n_cached) return TD_ENOSPC;

    uint32_t slot = p->free_seqs[--p->n_free_seqs];
    kvc_seq *s = &p->seqs[slot];
    s->live = true;
    s->n_tokens = spec->n_slots;
    s->n_committed = n_hit * p->bs;
    s->n_hashed = n_hit;
    s->last_hash = n_hit ? p->hash_scratch[n_hit - 1] : p->cfg.hash_seed;
    /* Reference the hits first so that taking new blocks cannot evict them. */
    for (uint32_t i = 0; i < n_hit; i++) {
        block_ref(p, p->hit_scratch[i]);
        s->table[i] = p->hit_scratch[i];
    }
    for (uint32_t i = n_hit; i < need; i++)
        s->table[i] = block_take(p);
    s->n_blocks = need;

    if (p->cfg.enable_prefix_cache) {
        p->st.lookups++;
        p->st.lookup_hits += n_hit > 0;
        p->st.query_blocks += query;
        p->st.hit_blocks += n_hit;
    }
    *seq = seq_id(p, slot);
    if (n_cached) *n_cached = n_hit * p->bs;
    return 0;
}

int kvc_seq_grow(kvc_pool *p, int64_t id, uint32_t n_new, kvc_cow *cow)
{
    if (!p) return TD_EINVAL;
    kvc_seq *s = seq_get(p, id);
    if (!s) return TD_ENOENT;
    if (cow) cow->src = cow->dst = KVC_NONE;
    if (n_new == 0) return 0;
    uint64_t total = (uint64_t)s->n_tokens + n_new;
    uint64_t blocks = (total + p->bs - 1) / p->bs;
    if (blocks > p->cfg.max_blocks_per_seq) return TD_ETOOLONG;
    uint32_t add = blocks > s->n_blocks ? (uint32_t)blocks - s->n_blocks : 0;

    /* The first slot written lies in block n_tokens / bs. Only a partially
     * filled block can be shared and still be written (full blocks are never
     * written again, blocks past n_tokens are never shared). */
    uint32_t wi = s->n_tokens / p->bs;
    bool need_cow = s->n_tokens % p->bs != 0 && wi < s->n_blocks && p->refcnt[s->table[wi]] > 1;
    if (need_cow && !cow) return TD_EINVAL;
    if ((uint64_t)add + need_cow > (uint64_t)p->n_free + p->n_cached) return TD_ENOSPC;

    if (need_cow) {
        int32_t src = s->table[wi];
        int32_t dst = block_take(p);
        block_unref(p, src); /* refcnt > 1: stays USED */
        s->table[wi] = dst;
        cow->src = src;
        cow->dst = dst;
        p->st.cow_copies++;
    }
    for (uint32_t i = 0; i < add; i++)
        s->table[s->n_blocks + i] = block_take(p);
    s->n_blocks += add;
    s->n_tokens = (uint32_t)total;
    return 0;
}

int kvc_seq_commit(kvc_pool *p, int64_t id, const int32_t *tokens, uint32_t n_computed)
{
    if (!p) return TD_EINVAL;
    kvc_seq *s = seq_get(p, id);
    if (!s) return TD_ENOENT;
    if (n_computed < s->n_committed || n_computed > s->n_tokens) return TD_EINVAL;
    if (!tokens && p->cfg.enable_prefix_cache && n_computed / p->bs > s->n_hashed) return TD_EINVAL;
    s->n_committed = n_computed;
    if (!p->cfg.enable_prefix_cache) return 0;
    uint32_t full = n_computed / p->bs;
    for (uint32_t i = s->n_hashed; i < full; i++) {
        const int32_t *bt = tokens + (size_t)i * p->bs;
        uint64_t h = block_hash(p, s->last_hash, bt);
        int32_t b = s->table[i];
        /* A block already registered (shared from the cache or a fork) holds
         * this very content; a duplicate of another cached block stays private. */
        if (!p->registered[b] && ht_find(p, h) == KVC_NONE) block_register(p, b, h, bt);
        s->last_hash = h;
        s->n_hashed = i + 1;
    }
    return 0;
}

int kvc_seq_fork(kvc_pool *p, int64_t parent, int64_t *child)
{
    if (!p || !child) return TD_EINVAL;
    kvc_seq *ps = seq_get(p, parent);
    if (!ps) return TD_ENOENT;
    if (p->n_free_seqs == 0) return TD_ENOSPC;
    uint32_t slot = p->free_seqs[--p->n_free_seqs];
    kvc_seq *cs = &p->seqs[slot];
    uint32_t share = kvc_blocks_for(p, ps->n_tokens);
    for (uint32_t i = 0; i < share; i++) {
        cs->table[i] = ps->table[i];
        p->refcnt[ps->table[i]]++;
    }
    cs->live = true;
    cs->n_blocks = share;
    cs->n_tokens = ps->n_tokens;
    cs->n_committed = ps->n_committed;
    cs->n_hashed = ps->n_hashed;
    cs->last_hash = ps->last_hash;
    *child = seq_id(p, slot);
    return 0;
}

int kvc_seq_free(kvc_pool *p, int64_t id)
{
    if (!p) return TD_EINVAL;
    kvc_seq *s = seq_get(p, id);
    if (!s) return TD_ENOENT;
    for (uint32_t i = s->n_blocks; i-- > 0;)
        block_unref(p, s->table[i]);
    uint32_t slot = (uint32_t)(s - p->seqs);
    s->live = false;
    s->n_blocks = s->n_tokens = s->n_committed = s->n_hashed = 0;
    /* Ids stay > 0: generation 0 would allow id 0, above 2^31 - 1 a negative id. */
    if (++s->gen > KVC_MAX_GEN) s->gen = 1;
    p->free_seqs[p->n_free_seqs++] = slot;
    return 0;
}

const int32_t *kvc_seq_table(const kvc_pool *p, int64_t id, uint32_t *n_blocks)
{
    kvc_seq *s = p ? seq_get(p, id) : NULL;
    if (!s) {
        if (n_blocks) *n_blocks = 0;
        return NULL;
    }
    if (n_blocks) *n_blocks = s->n_blocks;
    return s->table;
}

int kvc_seq_get_info(const kvc_pool *p, int64_t id, kvc_seq_info *out)
{
    if (!p || !out) return TD_EINVAL;
    kvc_seq *s = seq_get(p, id);
    if (!s) return TD_ENOENT;
    out->n_tokens = s->n_tokens;
    out->n_committed = s->n_committed;
    out->n_blocks = s->n_blocks;
    return 0;
}

int kvc_block_refcount(const kvc_pool *p, int32_t block)
{
    if (!p || block < 0 || (uint32_t)block >= p->cfg.num_blocks) return -1;
    return (int)p->refcnt[block];
}

void kvc_stats_get(const kvc_pool *p, kvc_stats *out)
{
    *out = p->st;
    out->num_blocks = p->cfg.num_blocks;
    out->used = p->n_used;
    out->free = p->n_free;
    out->cached = p->n_cached;
    out->registered = p->n_registered;
    out->live_seqs = p->cfg.max_seqs - p->n_free_seqs;
}

/* ---- invariant checker ---- */

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            td_log_error("kvc", "check_failed", __VA_ARGS__);                                      \
            return TD_EINTERNAL;                                                                   \
        }                                                                                          \
    } while (0)

int kvc_check(const kvc_pool *p)
{
    if (!p) return TD_EINVAL;
    uint32_t nb = p->cfg.num_blocks;
    memset(p->check_refs, 0, nb * sizeof *p->check_refs);
    memset(p->check_seen, 0, nb);

    uint32_t live = 0;
    for (uint32_t i = 0; i < p->cfg.max_seqs; i++) {
        const kvc_seq *s = &p->seqs[i];
        if (!s->live) continue;
        live++;
        CHECK(s->gen != 0 && s->gen <= KVC_MAX_GEN, "seq=%u what=bad_generation", i);
        CHECK(s->n_blocks <= p->cfg.max_blocks_per_seq, "seq=%u what=too_many_blocks", i);
        CHECK((uint64_t)s->n_blocks * p->bs >= s->n_tokens,
              "seq=%u what=tokens_over_capacity n_tokens=%u n_blocks=%u", i, s->n_tokens,
              s->n_blocks);
        CHECK(s->n_committed <= s->n_tokens, "seq=%u what=committed_over_tokens", i);
        CHECK((uint64_t)s->n_hashed * p->bs <= s->n_committed, "seq=%u what=hashed_over_committed",
              i);
        for (uint32_t j = 0; j < s->n_blocks; j++) {
            int32_t b = s->table[j];
            CHECK(b >= 0 && (uint32_t)b < nb, "seq=%u what=bad_block block=%d", i, b);
            p->check_refs[b]++;
        }
    }
    CHECK(live == p->cfg.max_seqs - p->n_free_seqs, "what=live_seq_count live=%u", live);

    uint32_t used = 0;
    for (uint32_t b = 0; b < nb; b++) {
        CHECK(p->refcnt[b] == p->check_refs[b], "block=%u what=refcount refcnt=%u refs=%u", b,
              p->refcnt[b], p->check_refs[b]);
        if (p->refcnt[b] > 0) {
            CHECK(p->state[b] == KVC_USED, "block=%u what=referenced_not_used state=%u", b,
                  p->state[b]);
            used++;
        } else {
            CHECK(p->state[b] != KVC_USED, "block=%u what=used_without_refs", b);
        }
        CHECK(p->state[b] != KVC_CACHED || p->registered[b], "block=%u what=cached_unregistered",
              b);
        CHECK(p->state[b] != KVC_FREE || !p->registered[b], "block=%u what=free_registered", b);
        CHECK(!p->registered[b] || p->cfg.enable_prefix_cache, "block=%u what=registered_no_cache",
              b);
    }
    CHECK(used == p->n_used, "what=used_count used=%u n_used=%u", used, p->n_used);

    for (uint32_t i = 0; i < p->n_free; i++) {
        int32_t b = p->free_stack[i];
        CHECK(b >= 0 && (uint32_t)b < nb, "what=bad_free_entry block=%d", b);
        CHECK(!p->check_seen[b], "block=%d what=twice_in_lists", b);
        CHECK(p->state[b] == KVC_FREE, "block=%d what=free_list_state state=%u", b, p->state[b]);
        p->check_seen[b] = 1;
    }
    uint32_t n_lru = 0;
    int32_t prev = KVC_NONE;
    for (int32_t b = p->lru_head; b != KVC_NONE; b = p->lru_next[b]) {
        CHECK(b >= 0 && (uint32_t)b < nb && n_lru < nb, "what=lru_corrupt block=%d", b);
        CHECK(!p->check_seen[b], "block=%d what=twice_in_lists", b);
        CHECK(p->state[b] == KVC_CACHED, "block=%d what=lru_state state=%u", b, p->state[b]);
        CHECK(p->lru_prev[b] == prev, "block=%d what=lru_prev", b);
        p->check_seen[b] = 1;
        prev = b;
        n_lru++;
    }
    CHECK(prev == p->lru_tail, "what=lru_tail");
    CHECK(n_lru == p->n_cached, "what=cached_count lru=%u n_cached=%u", n_lru, p->n_cached);
    for (uint32_t b = 0; b < nb; b++)
        CHECK(p->check_seen[b] || p->state[b] == KVC_USED, "block=%u what=lost", b);
    CHECK(p->n_free + p->n_used + p->n_cached == nb, "what=sum free=%u used=%u cached=%u",
          p->n_free, p->n_used, p->n_cached);

    uint32_t regs = 0, entries = 0;
    for (uint32_t b = 0; b < nb; b++) {
        if (!p->registered[b]) continue;
        regs++;
        CHECK(ht_find(p, p->hash[b]) == (int32_t)b, "block=%u what=hash_table_miss", b);
    }
    for (uint32_t i = 0; i <= p->ht_mask; i++) {
        int32_t b = p->ht[i];
        if (b == KVC_NONE) continue;
        CHECK(b >= 0 && (uint32_t)b < nb && p->registered[b], "what=stale_hash_entry slot=%u", i);
        entries++;
    }
    CHECK(regs == p->n_registered && entries == regs, "what=registered_count regs=%u entries=%u",
          regs, entries);
    return 0;
}
