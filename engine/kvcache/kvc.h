/* kvc: paged KV cache bookkeeping — block pool, block tables, prefix cache.
 *
 * The pool hands out block ids in [0, num_blocks); the memory of a block is laid
 * out by kv_layout.h and owned by the backend. kvc never touches KV memory: where
 * memory must move (copy-on-write after a fork) it says which block to copy and
 * the caller copies it.
 *
 * A sequence is a block table plus three counters, all in tokens:
 *   n_tokens     slots assigned: positions [0, n_tokens) have a slot, slot of
 *                position p = block table[p / block_size], offset p % block_size
 *   n_committed  positions whose KV has landed in memory (<= n_tokens)
 *   capacity     n_blocks * block_size (>= n_tokens; the rest is headroom)
 *
 * Block states (each block is in exactly one):
 *   FREE    refcount 0, no content; on the free stack
 *   USED    refcount > 0 (referenced by that many block tables)
 *   CACHED  refcount 0 but holds a committed full block registered in the prefix
 *           cache; on the LRU list, evicted oldest first only when FREE runs out
 *
 * Prefix cache: a full, committed block i of a sequence is registered under
 * hash(i) = XXH3_64(hash(i-1) || token ids of block i), hash(-1) = hash_seed.
 * A new sequence whose prompt starts with registered blocks shares them
 * (refcount++) instead of recomputing them. Hits are verified token by token
 * against the block's stored ids, so only two different prefixes that end in
 * the same block of tokens and collide in 64 bits (about 2^-64 per pair) could
 * be confused, as in every hash-chained prefix cache.
 *
 * Sequence ids are int64 handles (slot + generation): an id whose sequence was
 * freed fails cleanly with TD_ENOENT, even if the slot was reused. Ids are
 * always > 0.
 *
 * Ownership of blocks. A sequence and its block references belong to the
 * caller that created it (kvc_seq_alloc, kvc_seq_fork) until that caller hands
 * the id on (e.g. to the scheduler with sch_add_prefilled) or frees it; only
 * kvc_seq_free (or kvc_pool_free) returns them to the pool. kvc has no clock
 * and never frees a sequence on its own.
 *
 * On a decode worker the destination blocks of a KV transfer are such a plain
 * sequence, and the transfer's final event decides its end: from
 * kvx_recv_register until that request's KVX_EV_DONE or KVX_EV_FAILED the
 * transfer owns the blocks, and the worker must not free, grow, fork or commit
 * the sequence. On KVX_EV_DONE it calls kvc_seq_commit (then decodes on it),
 * on KVX_EV_FAILED kvc_seq_free. A cancel or a deadline ends the transfer
 * (kvx_cancel, the deadline given to kvx_recv_register), never the sequence
 * directly, so the blocks go back only once nothing can write them any more.
 * (A kvx_recv_register that fails takes nothing: the worker frees at once.)
 *
 * Errors: every int function returns 0 or a negative TD_E* code. TD_ENOSPC
 * (no free block or sequence slot) leaves the pool exactly as it was: an
 * allocation is all-or-nothing, including the LRU order and the counters.
 *
 * Cost: alloc/free of a block is O(1) (free stack, intrusive LRU list, open
 * addressing hash table); nothing allocates memory after kvc_pool_create.
 * Not thread-safe: one pool belongs to one thread (the engine step loop).
 */
#ifndef TANDEM_ENGINE_KVCACHE_KVC_H
#define TANDEM_ENGINE_KVCACHE_KVC_H

#include <stdbool.h>
#include <stdint.h>

#define KVC_DEFAULT_BLOCK_SIZE 16
#define KVC_MAX_BLOCK_SIZE     1024

typedef struct kvc_pool kvc_pool;

typedef struct kvc_config {
    uint32_t num_blocks;         /* blocks in the pool, >= 1 */
    uint32_t block_size;         /* tokens per block; 0 means KVC_DEFAULT_BLOCK_SIZE */
    uint32_t max_seqs;           /* sequences alive at once, >= 1 */
    uint32_t max_blocks_per_seq; /* block-table capacity of one sequence; 0 means num_blocks */
    bool enable_prefix_cache;
    uint64_t hash_seed; /* hash of the empty prefix; a model fingerprint keeps pools apart */
} kvc_config;

typedef struct kvc_stats {
    uint32_t num_blocks;
    uint32_t used;       /* USED blocks (refcount > 0) */
    uint32_t free;       /* FREE blocks */
    uint32_t cached;     /* CACHED blocks: unreferenced, evictable; used + free + cached = total */
    uint32_t registered; /* blocks in the prefix cache, referenced or not */
    uint32_t live_seqs;
    uint64_t lookups;      /* sequence allocations that consulted the prefix cache */
    uint64_t lookup_hits;  /* ... of which reused at least one block */
    uint64_t query_blocks; /* full prompt blocks looked up */
    uint64_t hit_blocks;   /* ... of which were reused (hit rate = hit_blocks / query_blocks) */
    uint64_t evictions;    /* CACHED blocks taken back for new content */
    uint64_t cow_copies;   /* copy-on-write block copies reported */
} kvc_stats;

/* A block copy the caller must perform (all layers, K and V) before writing
 * into dst. src < 0: no copy. */
typedef struct kvc_cow {
    int32_t src;
    int32_t dst;
} kvc_cow;

/* What kvc_seq_alloc creates. */
typedef struct kvc_seq_spec {
    const int32_t *tokens; /* n_prompt token ids for the prefix lookup; borrowed for the
                              call; may be NULL when the prefix cache is off */
    uint32_t n_prompt;     /* tokens of the prompt (>= 1) */
    uint32_t n_slots;      /* slots to assign now (tokens about to be computed,
                              cached prefix included); <= n_capacity when that is set */
    uint32_t n_capacity;   /* tokens of blocks to hold (prompt + headroom); 0 = n_slots */
} kvc_seq_spec;

typedef struct kvc_seq_info {
    uint32_t n_tokens;
    uint32_t n_committed;
    uint32_t n_blocks;
} kvc_seq_info;

/* The prefix-cache chain hashes of tokens[0, n_tokens), one per full block,
 * exactly as a pool with this hash_seed and block_size registers them:
 * out[i] = XXH3_64(out[i-1] || tokens of block i), out[-1] = hash_seed, where
 * || is the 8-byte hash in host byte order followed by block_size int32 ids.
 * Needs no pool, so a router can compute them for cache-aware placement.
 * Writes min(n_tokens / block_size, cap) hashes and returns that count, or
 * TD_EINVAL (block_size 0 or > KVC_MAX_BLOCK_SIZE, NULL pointers). */
int kvc_prefix_hashes(uint64_t hash_seed, uint32_t block_size, const int32_t *tokens,
                      uint32_t n_tokens, uint64_t *out, uint32_t cap);

/* Creates a pool. cfg is read during the call. *out is owned by the caller and
 * freed with kvc_pool_free. TD_EINVAL on a bad config, TD_ENOMEM. */
int kvc_pool_create(const kvc_config *cfg, kvc_pool **out);

/* Frees the pool and every sequence in it. NULL is accepted. */
void kvc_pool_free(kvc_pool *p);

uint32_t kvc_block_size(const kvc_pool *p);
uint32_t kvc_num_blocks(const kvc_pool *p);
uint32_t kvc_max_blocks_per_seq(const kvc_pool *p);

/* Blocks needed to hold n_tokens tokens (ceil(n_tokens / block_size)). */
uint32_t kvc_blocks_for(const kvc_pool *p, uint32_t n_tokens);

/* Blocks a new allocation could take now: FREE + CACHED. */
uint32_t kvc_available_blocks(const kvc_pool *p);

/* Read-only prefix lookup: *n_cached = tokens of the longest run of full blocks
 * of tokens[0, n_tokens) in the prefix cache, in whole blocks, at most
 * n_tokens - 1 (the last prompt token is always computed: its logits are
 * needed). Changes nothing, counts nothing. 0 when the prefix cache is off. */
int kvc_prefix_match(const kvc_pool *p, const int32_t *tokens, uint32_t n_tokens,
                     uint32_t *n_cached);

/* Creates a sequence: shares the cached prefix of spec->tokens (as
 * kvc_prefix_match, limited to n_slots), then allocates blocks up to
 * max(n_slots, n_capacity) tokens. The sequence has n_tokens = n_slots and
 * n_committed = *n_cached (the shared prefix). *seq receives its id; n_cached
 * may be NULL. TD_ENOSPC (pool or sequence slots full, nothing changed),
 * TD_ETOOLONG (more than max_blocks_per_seq blocks), TD_EINVAL. */
int kvc_seq_alloc(kvc_pool *p, const kvc_seq_spec *spec, int64_t *seq, uint32_t *n_cached);

/* Assigns slots to n_new more tokens, allocating blocks when the last is full.
 * If the block to be written is shared with another sequence (after a fork), a
 * fresh block replaces it in this table and *cow reports the copy the caller
 * must do first; otherwise cow->src = -1. cow may be NULL only when no copy can
 * be needed (the sequence was never forked): else TD_EINVAL. TD_ENOSPC (nothing
 * changed), TD_ETOOLONG, TD_ENOENT (stale id). */
int kvc_seq_grow(kvc_pool *p, int64_t seq, uint32_t n_new, kvc_cow *cow);

/* Declares that positions [0, n_computed) of seq hold their KV, with token ids
 * tokens[0, n_computed) (borrowed for the call). Registers the newly full blocks
 * in the prefix cache. n_computed must lie in [n_committed, n_tokens]. A block
 * whose content is already cached under another id stays private (the first
 * copy wins). */
int kvc_seq_commit(kvc_pool *p, int64_t seq, const int32_t *tokens, uint32_t n_computed);

/* Creates *child sharing every block of parent that holds its tokens (refcount++;
 * the parent's headroom stays the parent's). Whichever of the two next writes
 * into a shared partially filled block gets a copy-on-write from kvc_seq_grow.
 * TD_ENOSPC when sequence slots are full. */
int kvc_seq_fork(kvc_pool *p, int64_t parent, int64_t *child);

/* Frees a sequence: refcount-- on its blocks, last block first, so that the
 * cached prefix's first blocks are evicted last. TD_ENOENT for a stale id. */
int kvc_seq_free(kvc_pool *p, int64_t seq);

/* The block table of seq: n_blocks int32 block ids, owned by the pool, valid
 * until the next call that changes seq. NULL for a stale id. */
const int32_t *kvc_seq_table(const kvc_pool *p, int64_t seq, uint32_t *n_blocks);

int kvc_seq_get_info(const kvc_pool *p, int64_t seq, kvc_seq_info *out);

/* Reference count of a block (0 for FREE and CACHED), -1 if out of range. */
int kvc_block_refcount(const kvc_pool *p, int32_t block);

void kvc_stats_get(const kvc_pool *p, kvc_stats *out);

/* Walks the whole pool and checks its invariants: refcounts equal the table
 * references, FREE + USED + CACHED = total, every block in exactly one of the
 * free stack / LRU list / used set, hash table and registered blocks agree,
 * sequence counters are consistent. Returns 0, or TD_EINTERNAL after logging
 * the first violation. O(num_blocks + table entries); meant for tests and
 * debug builds, not for the hot path. */
int kvc_check(const kvc_pool *p);

#endif
