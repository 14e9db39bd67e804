/* kvx_plan: the deterministic per-layer op list both NCCL peers derive.
 *
 * NCCL point-to-point operations between two ranks match in issue order, so
 * sender and receiver must issue the same sequence of equally sized
 * ncclSend/ncclRecv calls. Both sides know the receiver's registered
 * destination blocks (BEGIN_ACK) and the sender's posted pairs (POST), and
 * both run this pure function on them, so they get the same list.
 *
 * Order: pairs sorted by destination block id; runs where both source and
 * destination ids are consecutive are merged into one op of `count` blocks
 * (one contiguous range on each side, kv_layout.h puts consecutive blocks of a
 * layer next to each other).
 */
#ifndef TANDEM_KVTRANSFER_KVX_PLAN_H
#define TANDEM_KVTRANSFER_KVX_PLAN_H

#include <stdint.h>

#include "kvtransfer/kvx.h"

typedef struct kvx_plan_op {
    uint32_t src;   /* first source block id */
    uint32_t dst;   /* first destination block id */
    uint32_t count; /* consecutive blocks */
} kvx_plan_op;

/* Validates pairs (each src < num_src, dst < num_dst, dst registered in
 * reg[0..n_reg), no dst twice) and writes the ordered op list to ops
 * (caller-owned, room for n_pairs ops). Returns the op count (>= 0), or
 * TD_EINVAL (a bad or unregistered id, a duplicate dst), TD_ENOMEM.
 * Inputs are not modified. */
int kvx_plan_build(const uint32_t *reg, int n_reg, const kvx_pair *pairs, int n_pairs,
                   uint32_t num_src, uint32_t num_dst, kvx_plan_op *ops);

#endif
