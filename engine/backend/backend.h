/* backend: the compute interface of the engine. A backend runs the forward pass
 * of a loaded model over a flattened batch of tokens and owns (or borrows) the
 * paged KV pool. Backends are a const ops table plus a void *ctx, chosen at run
 * time by name ("cpu"; "cuda" where built and a GPU is present).
 *
 * Batch model. One be_forward call takes n_tokens tokens from n_seqs sequences,
 * mixed freely: a prefill chunk is several consecutive positions of one
 * sequence, a decode step is one. For every token: its id, its position in its
 * sequence, and its sequence index (0..n_seqs-1). For every sequence: its block
 * table (int32 block ids into the KV pool, one per block_size positions).
 *
 * KV. The pool layout is common/kv_layout.h: token at position p of a
 * sequence lives in block block_table[p / block_size], slot p % block_size. The
 * forward first writes the K/V of this batch's tokens for a layer, then each
 * token attends to positions 0..pos of its own sequence (causal), reading them
 * from the paged blocks: earlier positions must already hold valid K/V (from
 * earlier calls, or from a KV transfer). Positions of one sequence inside a
 * batch must be distinct.
 *
 * Logits. Only the rows named in out_rows (indices into the token arrays,
 * typically each sequence's last token) get logits, in that order.
 *
 * Threading: one be_backend is driven by one thread at a time. Results are
 * deterministic; with the default matmul (BE_MATMUL_DETERMINISTIC) each
 * token's logits are bit-identical whatever else is in the batch.
 */
#ifndef TANDEM_ENGINE_BACKEND_BACKEND_H
#define TANDEM_ENGINE_BACKEND_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "common/kv_layout.h"
#include "engine/model.h"

/* Where a backend's KV pool lives (and where a caller's kv_mem must live). */
enum be_mem {
    BE_MEM_HOST = 0,   /* host memory the CPU reads and writes */
    BE_MEM_DEVICE = 1, /* GPU memory (cudaMalloc'd, or a transport's device pool) */
};

/* Called once per layer, as soon as layer `layer` has written the K/V of every
 * token of the batch into the pool: before that layer's attention and FFN run,
 * so a prefill worker can ship layer l's blocks while l (and l + 1...) compute.
 * Runs on the forward's thread; it must not call back into the backend. A
 * non-zero return aborts the forward, which then returns that value.
 *
 * fence: NULL when the K/V of layer `layer` are final at the call (the CPU
 * backend; a device backend without be_options.async_fence). Otherwise an
 * opaque handle valid during the call only (CUDA: a cudaEvent_t recorded on
 * the compute stream right after the layer's K/V write): the K/V are final
 * once it completes, and a reader orders itself after it (cudaStreamWaitEvent
 * or cudaEventSynchronize) instead of syncing the device. */
typedef int (*be_layer_done_fn)(void *arg, int layer, void *fence);

typedef struct be_batch {
    int n_tokens;          /* tokens in the batch, >= 1 */
    const int32_t *tokens; /* [n_tokens] token ids */
    const int32_t *pos;    /* [n_tokens] position of each token in its sequence */
    const int32_t *seq;    /* [n_tokens] sequence index, 0..n_seqs-1 */

    int n_seqs;                         /* >= 1 */
    const int32_t *const *block_tables; /* [n_seqs] -> [n_blocks[s]] block ids */
    const int32_t *n_blocks;            /* [n_seqs] entries in each block table */

    int n_out;               /* rows that need logits, 0..n_tokens */
    const int32_t *out_rows; /* [n_out] token indices */
    float *logits;           /* [n_out][vocab_size], written by the forward */

    be_layer_done_fn on_layer_done; /* optional */
    void *on_layer_done_arg;
} be_batch;

enum be_matmul {
    /* Our own blocked kernel: each output element is one dot product with a
     * fixed reduction order, so a row's result never depends on the batch. */
    BE_MATMUL_DETERMINISTIC = 0,
    /* OpenBLAS cblas_sgemm on the whole batch: faster for big prefills, but its
     * reduction order may change with the number of rows. */
    BE_MATMUL_BLAS = 1,
};

typedef struct be_options {
    int n_threads;        /* compute threads including the caller; 0: 1 */
    int max_batch_tokens; /* largest n_tokens per forward; scratch is sized for it */
    int max_seqs;         /* largest n_seqs per forward */
    kv_layout kv;         /* n_layers, n_kv_heads, head_dim must match the model */
    void *kv_mem;         /* caller's region of kv_layout_pool_bytes(&kv) bytes, 64-byte
                           * aligned, living until be_close; NULL: the backend allocates */
    enum be_matmul matmul;
    int device;              /* device ordinal of a device backend (cuda:N); cpu ignores it */
    enum be_mem kv_mem_kind; /* what kv_mem is: host, or device memory on `device` */
    /* Device backends: F32 matrices are converted to BF16 at load (half the
     * bytes per token) unless this is set, which keeps them F32 (for exact
     * comparisons with the CPU backend). F16/BF16 matrices stay as stored. */
    int keep_f32_weights;
    /* Device backends: hand the layer hook the compute stream's event as its
     * fence (0: wait for the event on the host before the hook, so the hook
     * sees final K/V as on the CPU). */
    int async_fence;
} be_options;

/* Fills defaults for model m: 1 thread, 512 batch tokens, 64 sequences,
 * deterministic matmul, KV f32 with block size 16 and enough blocks for one
 * sequence of min(context, 4096) tokens (at least 64 blocks), kv_mem NULL,
 * device 0, host kv_mem kind, BF16 device weights, synchronous fence. */
void be_options_defaults(be_options *o, const mdl_model *m);

typedef struct be_ops {
    const char *name;
    /* 0 when the backend can run here, TD_ENODEV when its device is absent. */
    int (*probe)(void);
    int (*create)(const mdl_model *m, const be_options *o, void **ctx, char *err, size_t errlen);
    void (*destroy)(void *ctx);
    int (*forward)(void *ctx, const be_batch *b);
    /* Base and size of the KV pool region. */
    void (*kv_region)(void *ctx, void **base, size_t *bytes);
    /* Where the pool lives; a caller's kv_mem must be of this kind. */
    enum be_mem mem;
    /* Optional (NULL: TD_EUNSUPPORTED): copies blocks src[i] -> dst[i], all
     * layers, K and V; ids already validated. */
    int (*copy_blocks)(void *ctx, const int32_t *src, const int32_t *dst, int n);
} be_ops;

typedef struct be_backend be_backend;

/* The ops table of a backend by name; NULL when unknown or not built. */
const be_ops *be_find(const char *name);

/* Creates a backend for model m (which must outlive it). name: "cpu", "cuda".
 * Errors: TD_ENOENT (unknown name), TD_ENODEV (no device, or "cuda" in a build
 * without CUDA), TD_EINVAL (options),
 * TD_EUNSUPPORTED (e.g. a KV dtype the backend lacks), TD_ENOMEM. On success
 * *out is owned by the caller (be_close). */
int be_open(const char *name, const mdl_model *m, const be_options *o, be_backend **out, char *err,
            size_t errlen);
void be_close(be_backend *b); /* accepts NULL */

/* For backends: the checks every forward makes before touching anything (ids,
 * positions, block ids against the pool, sizes against the options): 0 or
 * TD_EINVAL. seq_maxpos[o->max_seqs] gets each sequence's highest position
 * in the batch (-1 for a sequence with no token), which the backends use to
 * size their block-table copies. */
int be_batch_check(const be_batch *b, const mdl_config *mc, const be_options *o, int *seq_maxpos);

/* Runs one forward pass; see the batch model above. Errors: TD_EINVAL (bad
 * batch: ids, positions, block ids out of range, too many tokens), or the
 * on_layer_done return value. The pool may hold partial K/V after an error. */
int be_forward(be_backend *b, const be_batch *batch);

/* Copies KV blocks src[i] -> dst[i] (i < n) in every layer, K and V: the
 * copy-on-write that kvc_seq_grow reports (kvc_cow) before a forked sequence
 * writes into a shared, partially filled block. Pairs run in order; a dst must
 * not be the src of a later pair. Errors: TD_EINVAL (id out of range, n < 0),
 * TD_EUNSUPPORTED (the backend has no copy). */
int be_copy_blocks(be_backend *b, const int32_t *src, const int32_t *dst, int n);

/* The KV pool region (the caller's kv_mem, or the backend's own), and where
 * it lives: a BE_MEM_DEVICE region must not be touched by the CPU. */
void be_kv_region(be_backend *b, void **base, size_t *bytes);
enum be_mem be_kv_mem(const be_backend *b);
const kv_layout *be_kv_layout(const be_backend *b);
const char *be_name(const be_backend *b);

/* --device: "auto", "cpu", "cuda" or "cuda:N". Resolves spec to a backend name
 * ("cpu" or "cuda", static strings) and a device ordinal. auto picks cuda:0
 * when the CUDA backend is built and probes a device, else cpu; with
 * prefer_cpu (the KV pool must be host memory) auto picks cpu. One log line
 * names the choice for auto. TANDEM_DEVICE in the environment, when set and
 * not "auto", is resolved in place of auto (the test suites set it to cpu so
 * that their CPU-exact expectations hold on a machine with a GPU); an
 * explicit spec wins over it. Errors (reason in err): TD_EINVAL (bad spec),
 * TD_ENODEV ("cuda" asked for but not built, or no device). */
int be_device_resolve(const char *spec, int prefer_cpu, const char **name, int *device, char *err,
                      size_t errlen);

#endif
