/* kv_layout: where a (layer, block) of the paged KV cache lives in memory.
 *
 * This is a fixed contract between the engine (which computes into blocks), the
 * KV cache bookkeeping (which hands out block ids) and kvtransfer (which ships
 * blocks between workers). Prefill and decode must agree on every field; the
 * kvtransfer handshake compares them.
 *
 * Memory of a pool of num_blocks blocks for n_layers layers, one region:
 *   region = [layer 0: block 0 .. block num_blocks-1][layer 1: ...]...
 *   block  = K[block_size tokens][n_kv_heads][head_dim] then V[same]
 * so one block of one layer is contiguous (block_bytes) and can be sent alone.
 * Slot t of a block holds the token at position (block index in the sequence's
 * block table) * block_size + t.
 */
#ifndef TANDEM_COMMON_KV_LAYOUT_H
#define TANDEM_COMMON_KV_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

enum kv_dtype {
    KV_DTYPE_F32 = 0,
    KV_DTYPE_F16 = 1,
    KV_DTYPE_BF16 = 2,
};

static inline size_t kv_dtype_size(enum kv_dtype dtype)
{
    return dtype == KV_DTYPE_F32 ? 4 : 2;
}

typedef struct kv_layout {
    uint32_t n_layers;
    uint32_t num_blocks; /* blocks per layer in the pool */
    uint32_t block_size; /* tokens per block (default 16) */
    uint32_t n_kv_heads;
    uint32_t head_dim;
    enum kv_dtype dtype;
} kv_layout;

/* Bytes of one token's K (or V) for all kv heads. */
static inline size_t kv_layout_token_bytes(const kv_layout *l)
{
    return (size_t)l->n_kv_heads * l->head_dim * kv_dtype_size(l->dtype);
}

/* Bytes of one block of one layer: K and V for block_size tokens. */
static inline size_t kv_layout_block_bytes(const kv_layout *l)
{
    return 2 * (size_t)l->block_size * kv_layout_token_bytes(l);
}

/* Bytes of the whole pool region. */
static inline size_t kv_layout_pool_bytes(const kv_layout *l)
{
    return (size_t)l->n_layers * l->num_blocks * kv_layout_block_bytes(l);
}

/* Byte offset of (layer, block) from the start of the region. */
static inline size_t kv_layout_block_offset(const kv_layout *l, uint32_t layer, uint32_t block)
{
    return ((size_t)layer * l->num_blocks + block) * kv_layout_block_bytes(l);
}

#endif
