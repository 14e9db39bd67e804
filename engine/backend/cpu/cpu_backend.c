#include "engine/backend/cpu/cpu_backend.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "engine/backend/cpu/cpu_kernels.h"
#include "engine/backend/cpu/cpu_pool.h"
#include "engine/sampler_kernels.h"

/* Up to three matrices sharing one input, computed in one parallel region
 * (q/k/v, or gate/up), so a layer has few barriers. */
#define CPU_MAX_JOBS 3
typedef struct cpu_mm_job {
    mdl_mat W;         /* [N][K] in its stored dtype */
    const float *bias; /* [N] or NULL */
    float *out;        /* [T][N] */
    int N;
    int first_task; /* tasks [first_task, first_task + ceil(N / rows_per_task)) */
} cpu_mm_job;

typedef struct cpu_mm {
    const float *x; /* [T][K] */
    int T, K;
    int rows_per_task; /* multiple of 4 */
    int n_jobs;
    cpu_mm_job jobs[CPU_MAX_JOBS];
} cpu_mm;

typedef struct cpu_ctx {
    const mdl_model *m;
    be_options o;
    kv_layout kv;
    float *kv_base; /* pool region: [layer][block]{K[bs][kvh][hd], V[bs][kvh][hd]} */
    size_t kv_bytes;
    int own_kv;
    cpool *pool;

    /* Scratch, T = max_batch_tokens: */
    float *x;        /* [T][dim] residual stream */
    float *xb;       /* [T][max(dim, qd)] normalised input / attention output */
    float *q;        /* [T][qd] */
    float *k;        /* [T][kvd] */
    float *v;        /* [T][kvd] */
    float *tmp;      /* [T][dim] */
    float *hb;       /* [T][hidden] */
    float *hb2;      /* [T][hidden] */
    float *rope;     /* [T][head_dim/2][2] cos, sin */
    float *inv_freq; /* [head_dim/2] */
    float *att;      /* [n_threads][CPU__ATTN_RUN][att_heads][max_seq_len] scores */
    int att_heads;   /* heads one attention task takes at most (bounds att) */
    int *seq_maxpos; /* [max_seqs] */

    /* Per-forward state read by the parallel tasks. */
    const be_batch *b;
    int layer;
    int attn_groups; /* attention tasks per run of tokens: heads split in this many */
    int attn_run;    /* tokens per attention task: 1, or CPU__ATTN_RUN in a prefill */
} cpu_ctx;

/* Consecutive tokens one attention task takes in a prefill: a sequence's
 * queries there share every block they read. */
#define CPU__ATTN_RUN 4
_Static_assert(CPU__ATTN_RUN <= CK_ATTN_Q, "a run's queries of one sequence go to one kernel call");

/* Heads one attention task takes at most: all of a token's, unless the
 * scores of a run of tokens at the full context would pass 4 MiB per
 * thread. */
static int cpu__att_heads(const mdl_config *mc)
{
    int by_size = (1 << 20) / CPU__ATTN_RUN / (mc->max_seq_len > 0 ? mc->max_seq_len : 1);
    return by_size < 1 ? 1 : by_size < mc->n_heads ? by_size : mc->n_heads;
}

static int cpu__fail(char *err, size_t errlen, int code, const char *msg)
{
    if (err && errlen) snprintf(err, errlen, "%s", msg);
    return code;
}

static float *cpu__alloc(size_t n_floats)
{
    if (n_floats > (SIZE_MAX - 64) / sizeof(float)) return NULL;
    size_t bytes = ((n_floats ? n_floats : 1) * sizeof(float) + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, bytes); /* bytes is a multiple of the alignment */
    if (!p) return NULL;
    memset(p, 0, bytes);
    return p;
}

static int cpu_probe(void)
{
    return 0;
}

static void cpu_destroy(void *vctx)
{
    cpu_ctx *c = vctx;
    if (!c) return;
    cpool_free(c->pool);
    if (c->own_kv) free(c->kv_base);
    free(c->x);
    free(c->xb);
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->tmp);
    free(c->hb);
    free(c->hb2);
    free(c->rope);
    free(c->inv_freq);
    free(c->att);
    free(c->seq_maxpos);
    free(c);
}

static int cpu_create(const mdl_model *m, const be_options *o, void **out, char *err, size_t errlen)
{
    *out = NULL;
    const mdl_config *mc = &m->cfg;
    if (o->kv.dtype != KV_DTYPE_F32 && o->kv.dtype != KV_DTYPE_F16)
        return cpu__fail(err, errlen, TD_EUNSUPPORTED, "cpu backend: KV dtype must be f32 or f16");
    if (o->max_batch_tokens < 1 || o->max_batch_tokens > (1 << 20) || o->max_seqs < 1 ||
        o->max_seqs > (1 << 20) || o->n_threads < 0 || o->n_threads > 256)
        return cpu__fail(err, errlen, TD_EINVAL, "cpu backend: bad batch or thread limits");
    ck_init();
    cpu_ctx *c = calloc(1, sizeof(*c));
    if (!c) return TD_ENOMEM;
    c->m = m;
    c->o = *o;
    if (c->o.n_threads == 0) c->o.n_threads = 1;
    c->kv = o->kv;
    c->kv_bytes = kv_layout_pool_bytes(&c->kv);
    int rc = TD_ENOMEM;
    if (o->kv_mem) {
        c->kv_base = o->kv_mem;
    } else {
        c->kv_base = cpu__alloc(c->kv_bytes / sizeof(float));
        if (!c->kv_base) goto fail;
        c->own_kv = 1;
    }
    size_t T = (size_t)o->max_batch_tokens;
    size_t dim = (size_t)mc->dim, hd = (size_t)mc->head_dim;
    size_t qd = (size_t)mc->n_heads * hd, kvd = (size_t)mc->n_kv_heads * hd;
    size_t xbw = dim > qd ? dim : qd;
    c->att_heads = cpu__att_heads(mc);
    if (!(c->x = cpu__alloc(T * dim)) || !(c->xb = cpu__alloc(T * xbw)) ||
        !(c->q = cpu__alloc(T * qd)) || !(c->k = cpu__alloc(T * kvd)) ||
        !(c->v = cpu__alloc(T * kvd)) || !(c->tmp = cpu__alloc(T * dim)) ||
        !(c->hb = cpu__alloc(T * (size_t)mc->hidden_dim)) ||
        !(c->hb2 = cpu__alloc(T * (size_t)mc->hidden_dim)) || !(c->rope = cpu__alloc(T * hd)) ||
        !(c->inv_freq = cpu__alloc(hd / 2)) ||
        !(c->att = cpu__alloc((size_t)c->o.n_threads * CPU__ATTN_RUN * (size_t)c->att_heads *
                              (size_t)mc->max_seq_len)))
        goto fail;
    c->seq_maxpos = calloc((size_t)o->max_seqs, sizeof(int));
    if (!c->seq_maxpos) goto fail;
    mdl_rope_inv_freq(mc, c->inv_freq);
    rc = cpool_create(c->o.n_threads, &c->pool);
    if (rc != 0) goto fail;
    if (o->matmul == BE_MATMUL_BLAS) openblas_set_num_threads(c->o.n_threads);
    *out = c;
    return 0;
fail:
    cpu_destroy(c);
    return cpu__fail(err, errlen, rc, "cpu backend: out of memory for scratch or KV pool");
}

static void cpu_kv_region(void *vctx, void **base, size_t *bytes)
{
    cpu_ctx *c = vctx;
    *base = c->kv_base;
    *bytes = c->kv_bytes;
}

/* ---- matmul ---- */

static void cpu__mm_task(void *arg, int task, int thread)
{
    (void)thread;
    const cpu_mm *mm = arg;
    int j = 0;
    while (j + 1 < mm->n_jobs && task >= mm->jobs[j + 1].first_task)
        j++;
    const cpu_mm_job *job = &mm->jobs[j];
    int r0 = (task - job->first_task) * mm->rows_per_task;
    int r1 = r0 + mm->rows_per_task;
    if (r1 > job->N) r1 = job->N;
    ck_matmul(job->out, job->N, mm->x, job->W.data, job->W.dtype, job->bias, mm->T, mm->K, r0, r1);
}

/* out_i = x W_i^T (+ b_i) for each job; x: [T][K]. BLAS mode takes F32
 * matrices only: with F16/BF16 weights (MDL_LOAD_KEEP_DTYPE) it runs the
 * deterministic kernel, which widens them in registers. */
static void cpu__matmul(cpu_ctx *c, cpu_mm *mm)
{
    int all_f32 = 1;
    for (int i = 0; i < mm->n_jobs; i++)
        all_f32 &= mm->jobs[i].W.dtype == MDL_DTYPE_F32;
    if (c->o.matmul == BE_MATMUL_BLAS && all_f32) {
        for (int i = 0; i < mm->n_jobs; i++) {
            cpu_mm_job *jb = &mm->jobs[i];
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mm->T, jb->N, mm->K, 1.0f, mm->x,
                        mm->K, (const float *)jb->W.data, mm->K, 0.0f, jb->out, jb->N);
            if (jb->bias)
                for (int t = 0; t < mm->T; t++)
                    for (int n = 0; n < jb->N; n++)
                        jb->out[(size_t)t * jb->N + n] += jb->bias[n];
        }
        return;
    }
    int nt = cpool_threads(c->pool);
    int total_rows = 0;
    for (int i = 0; i < mm->n_jobs; i++)
        total_rows += mm->jobs[i].N;
    /* About 8 tasks per thread balances load without many atomic hand-outs. */
    int rpt = nt == 1 ? total_rows : total_rows / (nt * 8);
    rpt = (rpt + 3) & ~3;
    if (rpt < 16) rpt = 16;
    mm->rows_per_task = rpt;
    int tasks = 0;
    for (int i = 0; i < mm->n_jobs; i++) {
        mm->jobs[i].first_task = tasks;
        tasks += (mm->jobs[i].N + rpt - 1) / rpt;
    }
    cpool_run(c->pool, cpu__mm_task, mm, tasks);
}

static void cpu__mm1(cpu_ctx *c, float *out, const float *x, mdl_mat W, const float *bias, int T,
                     int K, int N)
{
    cpu_mm mm = {.x = x, .T = T, .K = K, .n_jobs = 1};
    mm.jobs[0] = (cpu_mm_job){.W = W, .bias = bias, .out = out, .N = N};
    cpu__matmul(c, &mm);
}

/* ---- attention ---- */

/* Element offset of (slot, kv head) inside a block: K at +0, V at +v_elems. */
static inline void *cpu__kv_block(const cpu_ctx *c, int layer, int32_t block)
{
    size_t off = kv_layout_block_offset(&c->kv, (uint32_t)layer, (uint32_t)block);
    return (char *)c->kv_base + off;
}

static int cpu_copy_blocks(void *vctx, const int32_t *src, const int32_t *dst, int n)
{
    cpu_ctx *c = vctx;
    size_t bytes = kv_layout_block_bytes(&c->kv);
    for (int i = 0; i < n; i++) {
        if (src[i] == dst[i]) continue;
        for (uint32_t l = 0; l < c->kv.n_layers; l++)
            memcpy(cpu__kv_block(c, (int)l, dst[i]), cpu__kv_block(c, (int)l, src[i]), bytes);
    }
    return 0;
}

/* Element el of a KV block, and the element type the attention kernels read
 * (an f16 pool's rows are widened in their registers). */
static inline const void *cpu__kv_at(const cpu_ctx *c, const void *blk, size_t el)
{
    return (const char *)blk + el * kv_dtype_size(c->kv.dtype);
}

static inline enum mdl_dtype cpu__kv_elem(const cpu_ctx *c)
{
    return c->kv.dtype == KV_DTYPE_F16 ? MDL_DTYPE_F16 : MDL_DTYPE_F32;
}

/* Asks for bytes from p in the cache ahead of their use: the next KV block's
 * K or V half, which no hardware prefetcher finds (a sequence's blocks are
 * anywhere in the pool). */
static inline void cpu__prefetch(const void *p, size_t bytes)
{
    for (size_t o = 0; o < bytes; o += 64)
        __builtin_prefetch((const char *)p + o, 0, 3);
}

/* Is token t the only one of its sequence in the run [t0, t1)? A decode
 * token is; a prefill's tokens share their run with their neighbours. Only
 * those tokens prefetch the next block: a prefill's runs re-read the blocks
 * the runs before them read, mostly still in the cache, where asking for a
 * whole block half at once measured slower (a 2,048-token prompt 4-5%). */
static int cpu__alone_in_run(const be_batch *b, int t0, int t1, int t)
{
    for (int u = t0; u < t1; u++)
        if (u != t && b->seq[u] == b->seq[t]) return 0;
    return 1;
}

/* A task's scores row for the i-th token of its run and j-th head of its
 * group, in its thread's scratch att (rows of msl, heads per token). */
static inline float *cpu__att_row(float *att, size_t msl, int heads, int i, int j)
{
    return att + ((size_t)i * (size_t)heads + (size_t)j) * msl;
}

/* The softmax of each (token, head) row of tokens [t0, t1), heads [h0, h1),
 * over positions 0..pos, and the token's attention output cleared for the
 * values to be added into. The numerators and their sum are the sampler's
 * (smpk_exp_sum: a vectorised e^x within 2 ulp, the sum kept in 8 lanes and
 * folded in a fixed order): every row's bits depend on its own scores alone,
 * not on the batch or the CPU, and a long prompt's rows are no longer a
 * libm call and a dependent add per position. A row with a NaN score is all
 * NaN, as the scalar max would have left it. */
static void cpu__attn_softmax(cpu_ctx *c, float *att, int t0, int t1, int h0, int h1)
{
    const mdl_config *mc = &c->m->cfg;
    for (int t = t0; t < t1; t++) {
        int n = c->b->pos[t] + 1;
        for (int h = h0; h < h1; h++) {
            float *ah = cpu__att_row(att, (size_t)mc->max_seq_len, c->att_heads, t - t0, h - h0);
            float mx = smpk_max(ah, n);
            float inv = isnan(mx) ? NAN : 1.0f / smpk_exp_sum(ah, ah, n, mx, 1.0f);
            for (int p = 0; p < n; p++)
                ah[p] *= inv;
            memset(c->xb + ((size_t)t * mc->n_heads + h) * mc->head_dim, 0,
                   (size_t)mc->head_dim * sizeof(float));
        }
    }
}

/* A run of consecutive tokens and a group of their query heads:
 * softmax(q k^T / sqrt(hd)) v over positions 0..pos of each token, for each
 * head. The heads of a group, and the tokens of a run, walk the blocks
 * together: each block's K (then V) rows are read once, in address order,
 * for all heads and for every token of the run that belongs to the same
 * sequence (a prefill's queries), rather than once per head and token in
 * strides of a row. The per-(token, head) arithmetic (the same kernel calls
 * on the same rows, in the same order) and so every bit of the result do not
 * depend on how tokens and heads are grouped. */
static void cpu__attn_task(void *arg, int task, int thread)
{
    cpu_ctx *c = arg;
    const mdl_config *mc = &c->m->cfg;
    const be_batch *b = c->b;
    int G = c->attn_groups, Q = c->attn_run;
    int t0 = task / G * Q, g = task % G;
    int t1 = t0 + Q < b->n_tokens ? t0 + Q : b->n_tokens;
    int h0 = g * mc->n_heads / G, h1 = (g + 1) * mc->n_heads / G;
    int hd = mc->head_dim, kvh = mc->n_kv_heads, per_kv = mc->n_heads / kvh;
    int bs = (int)c->kv.block_size;
    /* This thread's scores: one row per token of the run and head of the
     * group (cpu__att_row). */
    size_t msl = (size_t)mc->max_seq_len;
    int att_heads = c->att_heads;
    float *att = c->att + (size_t)thread * CPU__ATTN_RUN * (size_t)att_heads * msl;
    const enum mdl_dtype et = cpu__kv_elem(c);
    float scale = 1.0f / sqrtf((float)hd);
    size_t tok_stride = (size_t)kvh * hd; /* elements per slot */
    size_t v_off = (size_t)bs * tok_stride;
    size_t half_bytes = (size_t)bs * tok_stride * kv_dtype_size(c->kv.dtype); /* K or V */
    int maxpos = 0;
    for (int t = t0; t < t1; t++)
        maxpos = b->pos[t] > maxpos ? b->pos[t] : maxpos;
    /* Two walks over the blocks in order, one table lookup per block_size
     * positions and group of the run's tokens of one sequence, and one
     * kernel call per head for the whole group, reading the rows in place:
     * the scores, then (after each row's softmax) the values. */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) cpu__attn_softmax(c, att, t0, t1, h0, h1);
        for (int p0 = 0; p0 <= maxpos; p0 += bs) {
            for (int t = t0, u; t < t1; t = u) {
                /* tokens [t, u): one sequence; those that reach block p0 */
                int nq = 0, qt[CPU__ATTN_RUN], nrow[CPU__ATTN_RUN];
                for (u = t; u < t1 && b->seq[u] == b->seq[t]; u++) {
                    if (p0 > b->pos[u]) continue;
                    int n = b->pos[u] - p0 + 1;
                    qt[nq] = u;
                    nrow[nq++] = n < bs ? n : bs;
                }
                if (nq == 0) continue;
                const int32_t *table = b->block_tables[b->seq[t]];
                const char *blk = cpu__kv_block(c, c->layer, table[p0 / bs]);
                /* The next block's half, for a decode token (no hardware
                 * prefetcher finds it: blocks lie anywhere). */
                int pos = b->pos[qt[0]];
                if (nq == 1 && p0 + bs <= pos && cpu__alone_in_run(b, t0, t1, qt[0])) {
                    cpu__prefetch((const char *)cpu__kv_block(c, c->layer, table[p0 / bs + 1]) +
                                      (pass ? half_bytes : 0),
                                  half_bytes);
                }
                /* one call per head for all the group's queries: each row is
                 * read once for them */
                for (int h = h0; h < h1; h++) {
                    size_t kv_el = (size_t)(h / per_kv) * hd;
                    /* each query's scores row from p0, and its query (pass
                     * 0) or output (pass 1) vector */
                    float *sc[CPU__ATTN_RUN], *vec[CPU__ATTN_RUN];
                    for (int k = 0; k < nq; k++) {
                        sc[k] = cpu__att_row(att, msl, att_heads, qt[k] - t0, h - h0) + p0;
                        vec[k] = (pass ? c->xb : c->q) + ((size_t)qt[k] * mc->n_heads + h) * hd;
                    }
                    if (pass == 0)
                        ck_attn_scores_q(sc, (const float *const *)vec, nq,
                                         cpu__kv_at(c, blk, kv_el), et, tok_stride, nrow, hd,
                                         scale);
                    else
                        ck_attn_accum_q(vec, (const float *const *)sc, nq,
                                        cpu__kv_at(c, blk, v_off + kv_el), et, tok_stride, nrow,
                                        hd);
                }
            }
        }
    }
}

/* ---- forward ---- */

static int cpu_forward(void *vctx, const be_batch *b)
{
    cpu_ctx *c = vctx;
    const mdl_model *m = c->m;
    const mdl_config *mc = &m->cfg;
    int rc = be_batch_check(b, mc, &c->o, c->seq_maxpos);
    if (rc != 0) return rc;
    int T = b->n_tokens, dim = mc->dim, hd = mc->head_dim, hidden = mc->hidden_dim;
    int qd = mc->n_heads * hd, kvd = mc->n_kv_heads * hd, half = hd / 2;
    int bs = (int)c->kv.block_size;
    c->b = b;

    for (int t = 0; t < T; t++) {
        ck_row_to_f32(c->x + (size_t)t * dim, m->tok_embed_mat.data, m->tok_embed_mat.dtype,
                      (size_t)b->tokens[t], dim);
        float *cs = c->rope + (size_t)t * hd;
        for (int i = 0; i < half; i++) {
            float ang = (float)b->pos[t] * c->inv_freq[i];
            cs[2 * i] = cosf(ang);
            cs[2 * i + 1] = sinf(ang);
        }
    }

    for (int l = 0; l < mc->n_layers; l++) {
        const mdl_layer *L = &m->layers[l];
        c->layer = l;
        for (int t = 0; t < T; t++)
            ck_rmsnorm(c->xb + (size_t)t * dim, c->x + (size_t)t * dim, L->attn_norm, dim,
                       mc->norm_eps);
        cpu_mm mm = {.x = c->xb, .T = T, .K = dim, .n_jobs = 3};
        mm.jobs[0] = (cpu_mm_job){.W = L->mat.wq, .bias = L->bq, .out = c->q, .N = qd};
        mm.jobs[1] = (cpu_mm_job){.W = L->mat.wk, .bias = L->bk, .out = c->k, .N = kvd};
        mm.jobs[2] = (cpu_mm_job){.W = L->mat.wv, .bias = L->bv, .out = c->v, .N = kvd};
        cpu__matmul(c, &mm);

        /* RoPE, then store this batch's K/V in the paged pool. */
        for (int t = 0; t < T; t++) {
            const float *cs = c->rope + (size_t)t * hd;
            ck_rope(c->q + (size_t)t * qd, mc->n_heads, cs, hd, mc->rope_layout);
            ck_rope(c->k + (size_t)t * kvd, mc->n_kv_heads, cs, hd, mc->rope_layout);
            int p = b->pos[t];
            void *blk = cpu__kv_block(c, l, b->block_tables[b->seq[t]][p / bs]);
            size_t k_el = (size_t)(p % bs) * kvd, v_el = k_el + (size_t)bs * kvd;
            if (c->kv.dtype == KV_DTYPE_F32) {
                memcpy((float *)blk + k_el, c->k + (size_t)t * kvd, (size_t)kvd * sizeof(float));
                memcpy((float *)blk + v_el, c->v + (size_t)t * kvd, (size_t)kvd * sizeof(float));
            } else {
                ck_f32_to_f16((uint16_t *)blk + k_el, c->k + (size_t)t * kvd, kvd);
                ck_f32_to_f16((uint16_t *)blk + v_el, c->v + (size_t)t * kvd, kvd);
            }
        }
        if (b->on_layer_done) {
            rc = b->on_layer_done(b->on_layer_done_arg, l, NULL);
            if (rc != 0) return rc;
        }

        /* A prefill's tokens go CPU__ATTN_RUN to a task (a batch with more
         * tokens than sequences holds one); one task per run when there are
         * enough for the threads, else the heads split, so that a few
         * sequences still spread; and never more heads in a task than its
         * scratch holds. */
        c->attn_run = T > b->n_seqs ? CPU__ATTN_RUN : 1;
        int runs = (T + c->attn_run - 1) / c->attn_run;
        int groups = c->o.n_threads == 1 ? 1 : (4 * c->o.n_threads + runs - 1) / runs;
        int min_groups = (mc->n_heads + c->att_heads - 1) / c->att_heads;
        groups = groups < min_groups ? min_groups : groups;
        c->attn_groups = groups < mc->n_heads ? groups : mc->n_heads;
        cpool_run(c->pool, cpu__attn_task, c, runs * c->attn_groups); /* -> xb [T][qd] */
        cpu__mm1(c, c->tmp, c->xb, L->mat.wo, NULL, T, qd, dim);
        for (size_t i = 0; i < (size_t)T * dim; i++)
            c->x[i] += c->tmp[i];

        for (int t = 0; t < T; t++)
            ck_rmsnorm(c->xb + (size_t)t * dim, c->x + (size_t)t * dim, L->ffn_norm, dim,
                       mc->norm_eps);
        cpu_mm mf = {.x = c->xb, .T = T, .K = dim, .n_jobs = 2};
        mf.jobs[0] = (cpu_mm_job){.W = L->mat.w_gate, .out = c->hb, .N = hidden};
        mf.jobs[1] = (cpu_mm_job){.W = L->mat.w_up, .out = c->hb2, .N = hidden};
        cpu__matmul(c, &mf);
        /* SwiGLU, a row at a time (smpk_silu_mul counts in int) */
        for (int t = 0; t < T; t++)
            smpk_silu_mul(c->hb + (size_t)t * hidden, c->hb2 + (size_t)t * hidden, hidden);
        cpu__mm1(c, c->tmp, c->hb, L->mat.w_down, NULL, T, hidden, dim);
        for (size_t i = 0; i < (size_t)T * dim; i++)
            c->x[i] += c->tmp[i];
    }

    if (b->n_out > 0) {
        for (int i = 0; i < b->n_out; i++)
            ck_rmsnorm(c->xb + (size_t)i * dim, c->x + (size_t)b->out_rows[i] * dim, m->final_norm,
                       dim, mc->norm_eps);
        cpu__mm1(c, b->logits, c->xb, m->output_mat, NULL, b->n_out, dim, mc->vocab_size);
    }
    c->b = NULL;
    return 0;
}

const be_ops be_cpu_ops = {
    .name = "cpu",
    .probe = cpu_probe,
    .create = cpu_create,
    .destroy = cpu_destroy,
    .forward = cpu_forward,
    .kv_region = cpu_kv_region,
    .mem = BE_MEM_HOST,
    .copy_blocks = cpu_copy_blocks,
};
