/* Backend conformance, run against every backend present (be_find): against
 * a naive double-precision forward written here (both RoPE layouts, GQA, q/k/v
 * biases), batch invariance (a sequence alone vs in a batch of 8 mixed-length
 * sequences joining at different steps), paged KV with shuffled block ids,
 * copy_blocks, the layer hook, the caller's KV region and bad batches. The CPU
 * backend must match bit for bit where it promises to; a device backend
 * (cuBLAS picks its reduction order by shape) must give the same tokens and
 * logits within a tolerance. CPU-only tests (its kernels, thread counts, BLAS
 * mode, allocation failures) run once. A backend that is built but has no
 * device here is skipped with a message. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "engine/sampler.h"
#include "fail_alloc.h"
#include "engine/backend/backend.h"
#include "engine/backend/cpu/cpu_kernels.h"
#include "engine/model.h"

static int g_head_dim = 8;

static mdl_model *make_model(enum mdl_rope_layout layout, int bias, int tied)
{
    mdl_config c;
    mdl_config_defaults(&c);
    c.dim = 48;
    c.hidden_dim = 80;
    c.n_layers = 2;
    c.n_heads = 6;
    c.n_kv_heads = 2;
    c.head_dim = g_head_dim;
    c.vocab_size = 97;
    c.max_seq_len = 128;
    c.rope_layout = layout;
    c.qkv_bias = bias;
    c.tied_output = tied;
    mdl_model *m = NULL;
    assert_int_equal(mdl_create_random(&c, 1234, 0.2f, &m), 0);
    return m;
}

/* ---- naive reference: one sequence, dense KV, doubles ---- */

static void ref_matvec(double *out, const double *x, const float *W, const float *b, int N, int K)
{
    for (int n = 0; n < N; n++) {
        double s = b ? b[n] : 0.0;
        for (int k = 0; k < K; k++)
            s += (double)W[(size_t)n * K + k] * x[k];
        out[n] = s;
    }
}

static void ref_rmsnorm(double *o, const double *x, const float *w, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        o[i] = x[i] * inv * w[i];
}

static void ref_rope(double *v, int hd, int pos, double theta, enum mdl_rope_layout layout)
{
    for (int i = 0; i < hd / 2; i++) {
        double ang = pos * pow(theta, -2.0 * i / hd);
        double co = cos(ang), si = sin(ang);
        int a = layout == MDL_ROPE_ADJACENT ? 2 * i : i;
        int b = layout == MDL_ROPE_ADJACENT ? 2 * i + 1 : i + hd / 2;
        double x = v[a], y = v[b];
        v[a] = x * co - y * si;
        v[b] = x * si + y * co;
    }
}

/* logits[n_tok][V] for every position of tokens[0..n_tok). */
static void ref_forward(const mdl_model *m, const int32_t *tokens, int n_tok, double *logits)
{
    const mdl_config *c = &m->cfg;
    int D = c->dim, H = c->hidden_dim, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    int qd = nh * hd, kvd = nkv * hd;
    double *kc = calloc((size_t)c->n_layers * n_tok * kvd, sizeof(double));
    double *vc = calloc((size_t)c->n_layers * n_tok * kvd, sizeof(double));
    double *x = malloc(D * sizeof(double)), *xb = malloc(D * sizeof(double));
    double *q = malloc(qd * sizeof(double)), *att = malloc(qd * sizeof(double));
    double *tmp = malloc(D * sizeof(double)), *g = malloc(H * sizeof(double));
    double *u = malloc(H * sizeof(double)), *sc = malloc(n_tok * sizeof(double));
    for (int p = 0; p < n_tok; p++) {
        for (int i = 0; i < D; i++)
            x[i] = m->tok_embed[(size_t)tokens[p] * D + i];
        for (int l = 0; l < c->n_layers; l++) {
            const mdl_layer *L = &m->layers[l];
            double *K = kc + ((size_t)l * n_tok + p) * kvd,
                   *Vv = vc + ((size_t)l * n_tok + p) * kvd;
            ref_rmsnorm(xb, x, L->attn_norm, D, c->norm_eps);
            ref_matvec(q, xb, L->wq, L->bq, qd, D);
            ref_matvec(K, xb, L->wk, L->bk, kvd, D);
            ref_matvec(Vv, xb, L->wv, L->bv, kvd, D);
            for (int h = 0; h < nh; h++)
                ref_rope(q + h * hd, hd, p, c->rope_theta, c->rope_layout);
            for (int h = 0; h < nkv; h++)
                ref_rope(K + h * hd, hd, p, c->rope_theta, c->rope_layout);
            for (int h = 0; h < nh; h++) {
                int kh = h / (nh / nkv);
                double mx = -1e300, sum = 0;
                for (int t = 0; t <= p; t++) {
                    const double *kt = kc + ((size_t)l * n_tok + t) * kvd + kh * hd;
                    double s = 0;
                    for (int i = 0; i < hd; i++)
                        s += q[h * hd + i] * kt[i];
                    sc[t] = s / sqrt((double)hd);
                    if (sc[t] > mx) mx = sc[t];
                }
                for (int t = 0; t <= p; t++)
                    sum += (sc[t] = exp(sc[t] - mx));
                for (int i = 0; i < hd; i++) {
                    double s = 0;
                    for (int t = 0; t <= p; t++)
                        s += sc[t] / sum * vc[((size_t)l * n_tok + t) * kvd + kh * hd + i];
                    att[h * hd + i] = s;
                }
            }
            ref_matvec(tmp, att, L->wo, NULL, D, qd);
            for (int i = 0; i < D; i++)
                x[i] += tmp[i];
            ref_rmsnorm(xb, x, L->ffn_norm, D, c->norm_eps);
            ref_matvec(g, xb, L->w_gate, NULL, H, D);
            ref_matvec(u, xb, L->w_up, NULL, H, D);
            for (int i = 0; i < H; i++)
                g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            ref_matvec(tmp, g, L->w_down, NULL, D, H);
            for (int i = 0; i < D; i++)
                x[i] += tmp[i];
        }
        ref_rmsnorm(xb, x, m->final_norm, D, c->norm_eps);
        ref_matvec(logits + (size_t)p * c->vocab_size, xb, m->output, NULL, c->vocab_size, D);
    }
    free(kc);
    free(vc);
    free(x);
    free(xb);
    free(q);
    free(att);
    free(tmp);
    free(g);
    free(u);
    free(sc);
}

static enum kv_dtype g_kv_dtype = KV_DTYPE_F32;

/* The backend under test, and whether it promises bit-identical results
 * across batch shapes (the CPU's deterministic matmul does; cuBLAS does not). */
static const char *g_backend = "cpu";
static int g_exact = 1;

/* a and b: n logits of the same rows. Exact backends: the same bits. Others:
 * within 1e-3 of each other relative to the row's largest magnitude. */
static void expect_same_logits(const float *a, const float *b, size_t n)
{
    if (g_exact) {
        assert_memory_equal(a, b, n * sizeof(float));
        return;
    }
    double amax = 1e-6, dmax = 0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(a[i]) > amax) amax = fabs(a[i]);
        if (fabs((double)a[i] - b[i]) > dmax) dmax = fabs((double)a[i] - b[i]);
    }
    if (dmax > 1e-3 * amax) fail_msg("%s: logits differ by %g (scale %g)", g_backend, dmax, amax);
}

static be_backend *open_cpu(const mdl_model *m, int threads, enum be_matmul mm, void *kv_mem,
                            uint32_t num_blocks)
{
    be_options o;
    be_options_defaults(&o, m);
    o.kv.dtype = g_kv_dtype;
    o.n_threads = threads;
    o.matmul = mm;
    o.kv_mem = kv_mem;
    o.max_batch_tokens = 256;
    o.keep_f32_weights = 1; /* device backends: F32 models stay F32 for the comparisons */
    if (num_blocks) o.kv.num_blocks = num_blocks;
    be_backend *b = NULL;
    char err[256] = "";
    int rc = be_open(g_backend, m, &o, &b, err, sizeof(err));
    if (rc != 0) fail_msg("be_open: %s", err);
    return b;
}

/* All positions of one sequence in one call, logits for every row. */
static int run_prefill_all(be_backend *be, const int32_t *tokens, int n, const int32_t *table,
                           int32_t n_blocks, float *logits)
{
    int32_t pos[128], seq[128], rows[128];
    for (int i = 0; i < n; i++) {
        pos[i] = i;
        seq[i] = 0;
        rows[i] = i;
    }
    const int32_t *tables[1] = {table};
    be_batch b = {.n_tokens = n,
                  .tokens = tokens,
                  .pos = pos,
                  .seq = seq,
                  .n_seqs = 1,
                  .block_tables = tables,
                  .n_blocks = &n_blocks,
                  .n_out = n,
                  .out_rows = rows,
                  .logits = logits};
    return be_forward(be, &b);
}

static void check_against_reference_tol(enum mdl_rope_layout layout, int bias, int tied, double tol)
{
    mdl_model *m = make_model(layout, bias, tied);
    int V = m->cfg.vocab_size, n = 40;
    int32_t tokens[40], table[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int i = 0; i < n; i++)
        tokens[i] = (i * 37 + 5) % V;
    double *want = malloc((size_t)n * V * sizeof(double));
    float *got = malloc((size_t)n * V * sizeof(float));
    ref_forward(m, tokens, n, want);
    be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 0);
    assert_int_equal(run_prefill_all(be, tokens, n, table, 8, got), 0);
    double maxerr = 0;
    for (size_t i = 0; i < (size_t)n * V; i++)
        if (fabs(got[i] - want[i]) > maxerr) maxerr = fabs(got[i] - want[i]);
    if (!g_exact) tol *= 5; /* another summation order, still F32 */
    if (maxerr > tol)
        fail_msg("%s: layout %d bias %d: max |logit error| %g", g_backend, layout, bias, maxerr);
    be_close(be);
    free(want);
    free(got);
    mdl_free(m);
}

static void check_against_reference(enum mdl_rope_layout layout, int bias, int tied)
{
    check_against_reference_tol(layout, bias, tied, 1e-4);
}

static void test_reference_half_rope_bias(void **s)
{
    (void)s;
    check_against_reference(MDL_ROPE_HALF, 1, 0);
}

static void check_invariance(int threads_batch);

/* Head sizes that exercise every path of the attention kernels (32-wide
 * chunks, 8-wide chunks, scalar tails; 16-wide dot blocks and tails). */
static void test_reference_head_dims(void **s)
{
    (void)s;
    const int dims[3] = {40, 36, 64};
    for (int i = 0; i < 3; i++) {
        g_head_dim = dims[i];
        check_against_reference(MDL_ROPE_HALF, 1, 0);
        check_invariance(2);
    }
    g_head_dim = 8;
}

static void test_reference_adjacent_rope_tied(void **s)
{
    (void)s;
    check_against_reference(MDL_ROPE_ADJACENT, 0, 1);
}

/* ---- batch invariance ---- */

#define NSEQ  8
#define STEPS 12
static const int prompt_len[NSEQ] = {3, 17, 1, 33, 6, 9, 40, 2};

static int32_t prompt_tok(int s, int i)
{
    return (int32_t)((s * 31 + i * 7 + 3) % 97);
}

/* Greedy decode of all sequences in `which` (bitmask), sequence s joining at
 * step s * stagger (its whole prompt as a prefill chunk inside that step's
 * batch, next to the other sequences' decode tokens). Records tokens and the
 * logits of each generated step. */
static void run_batch(be_backend *be, unsigned which, int stagger, int32_t out[NSEQ][STEPS],
                      float *logits_out /* [NSEQ][STEPS][V] */, int V)
{
    int32_t tables[NSEQ][8];
    for (int s = 0; s < NSEQ; s++)
        for (int i = 0; i < 8; i++)
            tables[s][i] = s * 8 + i;
    const int32_t *tptr[NSEQ];
    int32_t nblk[NSEQ];
    for (int s = 0; s < NSEQ; s++) {
        tptr[s] = tables[s];
        nblk[s] = 8;
    }
    int32_t tok[256], pos[256], seq[256], rows[NSEQ], rseq[NSEQ];
    int done[NSEQ] = {0}, next_tok[NSEQ] = {0};
    float *logits = malloc((size_t)NSEQ * V * sizeof(float));
    for (int step = 0; step < STEPS + NSEQ * stagger; step++) {
        int n = 0, no = 0;
        for (int s = 0; s < NSEQ; s++) {
            if (!(which & (1u << s)) || step < s * stagger || done[s] >= STEPS) continue;
            if (step == s * stagger) {
                for (int i = 0; i < prompt_len[s]; i++) {
                    tok[n] = prompt_tok(s, i);
                    pos[n] = i;
                    seq[n++] = s;
                }
            } else {
                tok[n] = next_tok[s];
                pos[n] = prompt_len[s] + done[s] - 1;
                seq[n++] = s;
            }
            rows[no] = n - 1;
            rseq[no++] = s;
        }
        if (n == 0) continue;
        be_batch b = {.n_tokens = n,
                      .tokens = tok,
                      .pos = pos,
                      .seq = seq,
                      .n_seqs = NSEQ,
                      .block_tables = tptr,
                      .n_blocks = nblk,
                      .n_out = no,
                      .out_rows = rows,
                      .logits = logits};
        assert_int_equal(be_forward(be, &b), 0);
        for (int i = 0; i < no; i++) {
            int s = rseq[i];
            const float *lg = logits + (size_t)i * V;
            int best = 0;
            for (int v = 1; v < V; v++)
                if (lg[v] > lg[best]) best = v;
            memcpy(logits_out + ((size_t)s * STEPS + done[s]) * V, lg, (size_t)V * sizeof(float));
            out[s][done[s]++] = best;
            next_tok[s] = best;
        }
    }
    free(logits);
}

static void check_invariance_of(const mdl_model *m, int threads_batch)
{
    int V = m->cfg.vocab_size;
    size_t lbytes = (size_t)NSEQ * STEPS * V * sizeof(float);
    float *alone = calloc(1, lbytes), *batched = calloc(1, lbytes);
    int32_t ta[NSEQ][STEPS], tb[NSEQ][STEPS];
    be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 64);
    for (int s = 0; s < NSEQ; s++)
        run_batch(be, 1u << s, 0, ta, alone, V);
    be_close(be);
    be = open_cpu(m, threads_batch, BE_MATMUL_DETERMINISTIC, NULL, 64);
    run_batch(be, 0xff, 1, tb, batched, V);
    be_close(be);
    assert_memory_equal(ta, tb, sizeof(ta));
    expect_same_logits(alone, batched, lbytes / sizeof(float));
    free(alone);
    free(batched);
}

static void check_invariance(int threads_batch)
{
    mdl_model *m = make_model(MDL_ROPE_HALF, 1, 0);
    check_invariance_of(m, threads_batch);
    mdl_free(m);
}

/* ---- weights kept in F16/BF16 ---- */

static uint16_t to_bf16(float f) /* round to nearest even (no NaN here) */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* v[0..n) uniform in [-0.5, 0.5), from the 64-bit LCG state *r. */
static void fill_uniform(float *v, int n, uint64_t *r)
{
    for (int i = 0; i < n; i++) {
        *r = *r * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (float)(*r >> 40) / (float)(1 << 24) - 0.5f;
    }
}

static float from_half(uint16_t h, enum mdl_dtype dt)
{
    float f;
    if (dt == MDL_DTYPE_F16) {
        ck_f16_to_f32(&f, &h, 1);
    } else {
        uint32_t u = (uint32_t)h << 16;
        memcpy(&f, &u, 4);
    }
    return f;
}

/* A view of m whose matrices are held as dt (F16 or BF16), as
 * mdl_load_ex(MDL_LOAD_KEEP_DTYPE) leaves them, with NULL float pointers;
 * m's own F32 matrices are rounded to the same values, so the two models are
 * the same numbers in two layouts. */
typedef struct half_model {
    mdl_model m;
    uint16_t *bufs[64];
    int n;
} half_model;

static void half_mat(half_model *h, mdl_mat *mat, const float **f32, size_t n, enum mdl_dtype dt)
{
    float *w = (float *)*f32; /* the test owns the random model */
    uint16_t *b = malloc(n * sizeof(uint16_t));
    assert_non_null(b);
    if (dt == MDL_DTYPE_F16)
        ck_f32_to_f16(b, w, (int)n);
    else
        for (size_t i = 0; i < n; i++)
            b[i] = to_bf16(w[i]);
    for (size_t i = 0; i < n; i++)
        w[i] = from_half(b[i], dt);
    assert_true(h->n < 64);
    h->bufs[h->n++] = b;
    mat->data = b;
    mat->dtype = dt;
    *f32 = NULL;
}

static void half_make(half_model *h, mdl_model *m, enum mdl_dtype dt)
{
    memset(h, 0, sizeof(*h));
    h->m = *m;
    const mdl_config *c = &m->cfg;
    size_t d = (size_t)c->dim, hd = (size_t)c->hidden_dim;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    h->m.layers = malloc((size_t)c->n_layers * sizeof(mdl_layer));
    assert_non_null(h->m.layers);
    memcpy(h->m.layers, m->layers, (size_t)c->n_layers * sizeof(mdl_layer));
    for (int l = 0; l < c->n_layers; l++) {
        mdl_layer *L = &h->m.layers[l];
        half_mat(h, &L->mat.wq, &L->wq, qd * d, dt);
        half_mat(h, &L->mat.wk, &L->wk, kvd * d, dt);
        half_mat(h, &L->mat.wv, &L->wv, kvd * d, dt);
        half_mat(h, &L->mat.wo, &L->wo, d * qd, dt);
        half_mat(h, &L->mat.w_gate, &L->w_gate, hd * d, dt);
        half_mat(h, &L->mat.w_up, &L->w_up, hd * d, dt);
        half_mat(h, &L->mat.w_down, &L->w_down, d * hd, dt);
    }
    half_mat(h, &h->m.tok_embed_mat, &h->m.tok_embed, (size_t)c->vocab_size * d, dt);
    if (c->tied_output) {
        h->m.output_mat = h->m.tok_embed_mat;
        h->m.output = NULL;
    } else {
        half_mat(h, &h->m.output_mat, &h->m.output, (size_t)c->vocab_size * d, dt);
    }
    h->m.storage = NULL; /* never freed through the view */
}

static void half_free(half_model *h)
{
    for (int i = 0; i < h->n; i++)
        free(h->bufs[i]);
    free(h->m.layers);
}

/* F16/BF16 matrices widened in the matmul give the bits of the same values
 * held as F32, and the batch invariance holds for them too. */
static void test_half_weights(void **s)
{
    (void)s;
    const enum mdl_dtype dts[2] = {MDL_DTYPE_BF16, MDL_DTYPE_F16};
    for (int k = 0; k < 4; k++) {
        mdl_model *m = make_model(MDL_ROPE_HALF, 1, k & 1);
        half_model h;
        half_make(&h, m, dts[k >> 1]);
        int V = m->cfg.vocab_size;
        size_t lbytes = (size_t)NSEQ * STEPS * V * sizeof(float);
        float *lf = calloc(1, lbytes), *lh = calloc(1, lbytes);
        int32_t tf[NSEQ][STEPS], th[NSEQ][STEPS];
        be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 64);
        run_batch(be, 0xff, 1, tf, lf, V);
        be_close(be);
        be = open_cpu(&h.m, 2, BE_MATMUL_DETERMINISTIC, NULL, 64);
        run_batch(be, 0xff, 1, th, lh, V);
        be_close(be);
        /* BLAS mode falls back to the deterministic kernel for them */
        be = open_cpu(&h.m, 1, BE_MATMUL_BLAS, NULL, 64);
        float *lb = calloc(1, lbytes);
        int32_t tbl[NSEQ][STEPS];
        run_batch(be, 0xff, 1, tbl, lb, V);
        be_close(be);
        if (g_exact) {
            assert_memory_equal(tf, th, sizeof(tf));
            expect_same_logits(lf, lh, lbytes / sizeof(float));
            expect_same_logits(lf, lb, lbytes / sizeof(float));
        } else {
            /* A device backend rounds the activations to the weights' dtype
             * before each GEMM: close, not equal, to the F32 run. Only the
             * first step's logits share a history. */
            for (int q = 0; q < NSEQ; q++) {
                const float *a = lf + (size_t)q * STEPS * V, *h16 = lh + (size_t)q * STEPS * V;
                double amax = 1e-6, dmax = 0;
                for (int v = 0; v < V; v++) {
                    if (fabs(a[v]) > amax) amax = fabs(a[v]);
                    if (fabs((double)a[v] - h16[v]) > dmax) dmax = fabs((double)a[v] - h16[v]);
                }
                if (dmax > 3e-2 * amax) fail_msg("%s: half weights off by %g", g_backend, dmax);
            }
            expect_same_logits(lh, lb, lbytes / sizeof(float)); /* matmul mode is ignored */
        }
        if (k == 0) check_invariance_of(&h.m, 1);
        free(lf);
        free(lh);
        free(lb);
        half_free(&h);
        mdl_free(m);
    }
}

/* ck_matmul: any block shape, row range and dtype gives each element the
 * bits of a lone dot product (T = 1, one row of W) on the widened weights,
 * also with a scalar tail (K % 16 != 0) and a bias. */
static void test_matmul_blocking(void **s)
{
    (void)s;
    ck_init();
    enum { T = 15, N = 13 };
    const int Ks[3] = {288, 37, 64};
    for (int ki = 0; ki < 3; ki++) {
        int K = Ks[ki];
        float *x = malloc((size_t)T * K * sizeof(float)), *w = malloc((size_t)N * K * 4);
        uint16_t *wb = malloc((size_t)N * K * 2), *wh = malloc((size_t)N * K * 2);
        float *wbf = malloc((size_t)N * K * 4), *whf = malloc((size_t)N * K * 4);
        float bias[N], ref[T][N], got[T][N];
        assert_true(x && w && wb && wh && wbf && whf);
        uint64_t r = 99;
        fill_uniform(x, T * K, &r);
        fill_uniform(w, N * K, &r);
        for (int i = 0; i < N * K; i++) {
            wb[i] = to_bf16(w[i]);
            wbf[i] = from_half(wb[i], MDL_DTYPE_BF16);
        }
        ck_f32_to_f16(wh, w, N * K);
        ck_f16_to_f32(whf, wh, N * K);
        for (int j = 0; j < N; j++)
            bias[j] = (float)j * 0.25f - 1.0f;
        const void *ws[3] = {w, wh, wb};
        const float *wf[3] = {w, whf, wbf};
        const enum mdl_dtype dt[3] = {MDL_DTYPE_F32, MDL_DTYPE_F16, MDL_DTYPE_BF16};
        for (int d = 0; d < 3; d++)
            for (int wb_ = 0; wb_ < 2; wb_++) {
                const float *bi = wb_ ? bias : NULL;
                for (int t = 0; t < T; t++)
                    for (int j = 0; j < N; j++)
                        ck_matmul(ref[t], N, x + (size_t)t * K, wf[d], MDL_DTYPE_F32, bi, 1, K, j,
                                  j + 1);
                for (int nt = 1; nt <= T; nt++) {
                    memset(got, 0, sizeof(got));
                    ck_matmul(&got[0][0], N, x, ws[d], dt[d], bi, nt, K, 0, N);
                    for (int t = 0; t < nt; t++)
                        assert_memory_equal(got[t], ref[t], sizeof(ref[t]));
                    memset(got, 0, sizeof(got));
                    ck_matmul(&got[0][0], N, x, ws[d], dt[d], bi, nt, K, 1, N - 3);
                    for (int t = 0; t < nt; t++)
                        assert_memory_equal(&got[t][1], &ref[t][1], (N - 4) * sizeof(float));
                }
            }
        free(x);
        free(w);
        free(wb);
        free(wh);
        free(wbf);
        free(whf);
    }
}

/* ck_matmul against ck_dot (one dot product, an independent code path) on
 * the widened weights plus the bias (or +0.0f), for T rows of x in Ts, each
 * dtype, with and without a bias, over rows [j0, j1) of W that depend on T
 * (whole and partial ranges). Same bits for every element. */
static void matmul_vs_dot(int K, int N, const int *Ts, int nT)
{
    int tmax = 0;
    for (int i = 0; i < nT; i++)
        tmax = Ts[i] > tmax ? Ts[i] : tmax;
    float *x = malloc((size_t)tmax * K * 4), *w = malloc((size_t)N * K * 4);
    float *wf = malloc((size_t)N * K * 4), *got = malloc((size_t)tmax * N * 4);
    uint16_t *wh = malloc((size_t)N * K * 2);
    float *bias = malloc((size_t)N * 4);
    assert_true(x && w && wf && got && wh && bias);
    uint64_t r = 7;
    fill_uniform(x, tmax * K, &r);
    fill_uniform(w, N * K, &r);
    for (int j = 0; j < N; j++)
        bias[j] = (float)j * 0.375f - 2.0f;
    const enum mdl_dtype dt[3] = {MDL_DTYPE_F32, MDL_DTYPE_F16, MDL_DTYPE_BF16};
    for (int d = 0; d < 3; d++) {
        const void *ws = w;
        if (dt[d] == MDL_DTYPE_F32) {
            memcpy(wf, w, (size_t)N * K * 4);
        } else {
            if (dt[d] == MDL_DTYPE_F16)
                ck_f32_to_f16(wh, w, N * K);
            else
                for (int i = 0; i < N * K; i++)
                    wh[i] = to_bf16(w[i]);
            for (int i = 0; i < N * K; i++)
                wf[i] = from_half(wh[i], dt[d]);
            ws = wh;
        }
        for (int nb = 0; nb < 2; nb++) {
            const float *bi = nb ? bias : NULL;
            for (int ti = 0; ti < nT; ti++) {
                int T = Ts[ti];
                int j0 = T % 3 == 0 ? 2 : 0, j1 = T % 2 ? N : N - 1;
                memset(got, 0, (size_t)tmax * N * 4);
                ck_matmul(got, N, x, ws, dt[d], bi, T, K, j0, j1);
                for (int t = 0; t < T; t++)
                    for (int j = j0; j < j1; j++) {
                        float ref =
                            ck_dot(x + (size_t)t * K, wf + (size_t)j * K, K) + (bi ? bi[j] : 0.0f);
                        assert_memory_equal(&got[(size_t)t * N + j], &ref, sizeof(float));
                    }
            }
        }
    }
    free(x);
    free(w);
    free(wf);
    free(got);
    free(wh);
    free(bias);
}

/* Every row count 1..40: the decode path below 4 rows, the register blocks
 * and their remainders above; K with and without a scalar tail. */
static void test_matmul_rows_vs_dot(void **s)
{
    (void)s;
    ck_init();
    int Ts[40];
    for (int i = 0; i < 40; i++)
        Ts[i] = i + 1;
    /* 4100: x tiles of 15 rows (three tiles at 40 rows) and a 4-element tail */
    const int Ks[5] = {288, 33, 80, 19, 4100};
    for (int ki = 0; ki < 5; ki++)
        matmul_vs_dot(Ks[ki], 11, Ts, 40);
}

/* Row counts where AVX-512 hosts pack W in blocks of 8 rows that share
 * accumulators between outputs (ck__matmul_pk, from 24 rows of x): row
 * counts leaving 0, 1 and 2 after the blocks of 3 x rows, ranges of 18 to
 * 21 rows of W (2 to 5 left after the blocks of 8, and a range not from 0),
 * K from one 16-element step to x tiles of 96 rows (K = 1344: 200 rows in
 * three tiles), K past the largest packed (2064) and K with a scalar tail,
 * which take the other blocks. */
static void test_matmul_many_rows_vs_dot(void **s)
{
    (void)s;
    ck_init();
    const int Ts[7] = {24, 25, 26, 97, 98, 99, 200};
    const int Ks[5] = {288, 16, 1344, 2064, 296};
    for (int ki = 0; ki < 5; ki++)
        matmul_vs_dot(Ks[ki], 21, Ts, 7);
}

/* The attention kernels against their definitions (cpu_kernels.h): every
 * score is ck_dot(q, k_j) * scale and every accumulated element the unfused
 * sum in order of j, bit for bit, for head sizes with and without a 16- or
 * 8-element tail, position counts around the 4-position blocks, and rows
 * further apart than a head (the KV slot holds every head). */
static void test_attn_kernels_vs_definition(void **s)
{
    (void)s;
    ck_init();
    enum { NMAX = 21, HMAX = 136 };
    const int hds[] = {8, 16, 24, 40, 48, 64, 72, 96, 128, 130, 136};
    static float rows[NMAX * 2 * HMAX], q[HMAX], w[NMAX], out[NMAX], acc[HMAX], ref[HMAX];
    uint32_t r = 12345;
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        r = r * 1664525u + 1013904223u;
        rows[i] = (float)(int32_t)r / 2147483648.0f;
    }
    for (size_t h = 0; h < sizeof(hds) / sizeof(hds[0]); h++) {
        int hd = hds[h];
        size_t stride = (size_t)2 * hd + 3;
        for (int i = 0; i < hd; i++)
            q[i] = rows[(size_t)i * 7 % (NMAX * HMAX)] * 0.5f;
        for (int n = 1; n <= NMAX; n++) {
            float scale = 1.0f / sqrtf((float)hd);
            ck_attn_scores(out, q, rows, MDL_DTYPE_F32, stride, n, hd, scale);
            for (int j = 0; j < n; j++) {
                float want = ck_dot(q, rows + (size_t)j * stride, hd) * scale;
                assert_memory_equal(&out[j], &want, sizeof(float));
                w[j] = out[j] * out[j];
            }
            for (int i = 0; i < hd; i++)
                acc[i] = ref[i] = 0.25f * (float)i;
            ck_attn_accum(acc, w, rows + 1, MDL_DTYPE_F32, stride, n, hd);
            for (int j = 0; j < n; j++)
                for (int i = 0; i < hd; i++)
                    ref[i] += w[j] * rows[1 + (size_t)j * stride + (size_t)i];
            assert_memory_equal(acc, ref, sizeof(float) * (size_t)hd);
        }
    }
}

/* ck_rope gives ck_rope_generic's bits: both layouts, head sizes with and
 * without a whole vector of pairs and with a tail, several heads per call,
 * signed zeros and large values among the inputs. */
static void test_rope_vs_generic(void **s)
{
    (void)s;
    ck_init();
    enum { HMAX = 136, HEADS = 3 };
    const int hds[] = {2, 6, 8, 16, 20, 36, 40, 48, 64, 130, 136};
    static float v[HEADS * HMAX], a[HEADS * HMAX], b[HEADS * HMAX], cs[HMAX];
    uint32_t r = 99;
    for (size_t i = 0; i < HEADS * HMAX; i++) {
        r = r * 1664525u + 1013904223u;
        v[i] = (float)(int32_t)r / 2147483648.0f * (i % 7 == 0 ? 3e4f : 1.0f);
    }
    v[5] = -0.0f;
    v[6] = 0.0f;
    for (size_t h = 0; h < sizeof(hds) / sizeof(hds[0]); h++) {
        int hd = hds[h];
        for (int i = 0; i < hd / 2; i++) {
            float ang = 37.0f * powf(10000.0f, -2.0f * (float)i / (float)hd);
            cs[2 * i] = cosf(ang);
            cs[2 * i + 1] = sinf(ang);
        }
        for (int layout = 0; layout < 2; layout++) {
            memcpy(a, v, sizeof(float) * (size_t)(HEADS * hd));
            memcpy(b, v, sizeof(float) * (size_t)(HEADS * hd));
            ck_rope(a, HEADS, cs, hd, (enum mdl_rope_layout)layout);
            ck_rope_generic(b, HEADS, cs, hd, (enum mdl_rope_layout)layout);
            assert_memory_equal(a, b, sizeof(float) * (size_t)(HEADS * hd));
            assert_true(memcmp(a, v, sizeof(float) * (size_t)(HEADS * hd)) != 0); /* rotated */
        }
    }
}

/* Several queries over the same rows (ck_attn_scores_q, ck_attn_accum_q)
 * give each query the bits of its one-query call: every query count, head
 * sizes with and without 16-element tails, row counts equal and different
 * (fewer than 4 in common, a common count off the 4-row groups), F32 and
 * F16 rows. */
static void test_attn_q_kernels_vs_one(void **s)
{
    (void)s;
    ck_init();
    enum { NMAX = 19, HMAX = 128 };
    const int hds[] = {8, 16, 32, 40, 48, 64, 72, 80, 128}; /* 16-wide rests of 0, 16, 32 */
    static float rows[NMAX * 2 * HMAX], q[CK_ATTN_Q][HMAX], w[CK_ATTN_Q][NMAX];
    static float out[CK_ATTN_Q][NMAX], want[NMAX], acc[CK_ATTN_Q][HMAX], ref[HMAX];
    static uint16_t half[NMAX * 2 * HMAX];
    uint32_t r = 4242;
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        r = r * 1664525u + 1013904223u;
        rows[i] = (float)(int32_t)r / 2147483648.0f;
    }
    ck_f32_to_f16(half, rows, NMAX * 2 * HMAX);
    const int counts[][CK_ATTN_Q] = {{16, 16, 16, 16}, {13, 14, 15, 16}, {16, 15, 14, 13},
                                     {3, 19, 9, 1},    {19, 18, 17, 4},  {5, 5, 7, 6}};
    for (size_t h = 0; h < sizeof(hds) / sizeof(hds[0]); h++) {
        int hd = hds[h];
        size_t stride = (size_t)2 * hd + 3;
        float scale = 1.0f / sqrtf((float)hd);
        for (int k = 0; k < CK_ATTN_Q; k++)
            for (int i = 0; i < hd; i++)
                q[k][i] = rows[((size_t)i * 7 + (size_t)k * 11) % (NMAX * HMAX)] * 0.5f;
        for (int f16 = 0; f16 < 2; f16++) {
            const void *src = f16 ? (const void *)half : (const void *)rows;
            const void *vsrc = f16 ? (const void *)(half + 1) : (const void *)(rows + 1);
            enum mdl_dtype rt = f16 ? MDL_DTYPE_F16 : MDL_DTYPE_F32;
            for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++)
                for (int nq = 1; nq <= CK_ATTN_Q; nq++) {
                    const int *n = counts[c];
                    float *op[CK_ATTN_Q], *ap[CK_ATTN_Q];
                    const float *qp[CK_ATTN_Q], *wp[CK_ATTN_Q];
                    for (int k = 0; k < nq; k++) {
                        op[k] = out[k];
                        qp[k] = q[k];
                        ap[k] = acc[k];
                        wp[k] = w[k];
                    }
                    ck_attn_scores_q(op, qp, nq, src, rt, stride, n, hd, scale);
                    for (int k = 0; k < nq; k++) {
                        ck_attn_scores(want, q[k], src, rt, stride, n[k], hd, scale);
                        assert_memory_equal(out[k], want, sizeof(float) * (size_t)n[k]);
                        for (int j = 0; j < n[k]; j++)
                            w[k][j] = out[k][j] * out[k][j];
                        for (int i = 0; i < hd; i++)
                            acc[k][i] = 0.25f * (float)(i + k);
                    }
                    ck_attn_accum_q(ap, wp, nq, vsrc, rt, stride, n, hd);
                    for (int k = 0; k < nq; k++) {
                        for (int i = 0; i < hd; i++)
                            ref[i] = 0.25f * (float)(i + k);
                        ck_attn_accum(ref, w[k], vsrc, rt, stride, n[k], hd);
                        assert_memory_equal(acc[k], ref, sizeof(float) * (size_t)hd);
                    }
                }
        }
    }
}

/* A prompt in one forward (its tokens' queries several to a kernel call)
 * and the same prompt a token per forward (one query per call) give every
 * position the same logits, for head sizes the several-query kernels take
 * (multiples of 16) and one they leave to the one-query ones; with two
 * threads too. */
static void test_prefill_vs_token_by_token(void **s)
{
    (void)s;
    const int dims[] = {16, 48, 40};
    for (size_t d = 0; d < sizeof(dims) / sizeof(dims[0]); d++) {
        g_head_dim = dims[d];
        mdl_model *m = make_model(MDL_ROPE_HALF, 1, 0);
        int V = m->cfg.vocab_size, P = 45;
        float *whole = malloc((size_t)P * V * sizeof(float)), *steps = malloc((size_t)P * V * 4);
        int32_t tok[64], seq = 0, table[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        for (int i = 0; i < P; i++)
            tok[i] = prompt_tok(3, i);
        const int32_t *tptr[1] = {table};
        int32_t nb = 8;
        for (int threads = 1; threads <= 2; threads++) {
            be_backend *be = open_cpu(m, threads, BE_MATMUL_DETERMINISTIC, NULL, 16);
            assert_int_equal(run_prefill_all(be, tok, P, table, nb, whole), 0);
            be_close(be);
            be = open_cpu(m, threads, BE_MATMUL_DETERMINISTIC, NULL, 16);
            for (int32_t i = 0, zero = 0; i < P; i++) {
                be_batch one = {.n_tokens = 1,
                                .tokens = tok + i,
                                .pos = &i,
                                .seq = &seq,
                                .n_seqs = 1,
                                .block_tables = tptr,
                                .n_blocks = &nb,
                                .n_out = 1,
                                .out_rows = &zero,
                                .logits = steps + (size_t)i * V};
                assert_int_equal(be_forward(be, &one), 0);
            }
            be_close(be);
            expect_same_logits(whole, steps, (size_t)P * V);
        }
        free(whole);
        free(steps);
        mdl_free(m);
    }
    g_head_dim = 8;
}

enum { ATTN_NMAX = 21, ATTN_HMAX = 136, ATTN_NEL = ATTN_NMAX * 2 * ATTN_HMAX };

/* Scores and weighted sums over half rows of type rt against the same rows
 * widened to F32 first (wide), bit for bit, every head size in hds and
 * every count of rows up to ATTN_NMAX. */
static void check_attn_rows(const float *wide, const uint16_t *half, enum mdl_dtype rt,
                            const int *hds, size_t n_hds)
{
    float q[ATTN_HMAX], w[ATTN_NMAX], out[ATTN_NMAX], want[ATTN_NMAX], acc[ATTN_HMAX],
        ref[ATTN_HMAX];
    for (size_t h = 0; h < n_hds; h++) {
        int hd = hds[h];
        size_t stride = (size_t)2 * hd + 3;
        for (int i = 0; i < hd; i++)
            q[i] = wide[(size_t)i * 5 % ATTN_NEL] * 0.5f;
        for (int n = 1; n <= ATTN_NMAX; n++) {
            float scale = 1.0f / sqrtf((float)hd);
            ck_attn_scores(out, q, half, rt, stride, n, hd, scale);
            ck_attn_scores(want, q, wide, MDL_DTYPE_F32, stride, n, hd, scale);
            assert_memory_equal(out, want, sizeof(float) * (size_t)n);
            for (int j = 0; j < n; j++)
                w[j] = out[j] * out[j];
            for (int i = 0; i < hd; i++)
                acc[i] = ref[i] = 0.25f * (float)i;
            ck_attn_accum(acc, w, half + 1, rt, stride, n, hd);
            ck_attn_accum(ref, w, wide + 1, MDL_DTYPE_F32, stride, n, hd);
            assert_memory_equal(acc, ref, sizeof(float) * (size_t)hd);
        }
    }
}

/* F16 rows (an f16 KV pool's) read in place give the bits of the same rows
 * converted to F32 first, for every head size, tail and count of rows;
 * subnormal and negative-zero halves included. BF16 rows (no KV pool has
 * them; the generic kernels) the same. */
static void test_attn_f16_rows_vs_f32(void **s)
{
    (void)s;
    ck_init();
    const int hds[] = {8, 16, 24, 40, 48, 64, 72, 96, 128, 130, 136};
    static float src[ATTN_NEL], wide[ATTN_NEL];
    static uint16_t half[ATTN_NEL];
    uint32_t r = 777;
    for (size_t i = 0; i < ATTN_NEL; i++) {
        r = r * 1664525u + 1013904223u;
        src[i] = (float)(int32_t)r / 2147483648.0f * (i % 5 == 0 ? 1e-6f : 4.0f);
    }
    src[3] = -0.0f;
    ck_f32_to_f16(half, src, ATTN_NEL);
    ck_f16_to_f32(wide, half, ATTN_NEL);
    check_attn_rows(wide, half, MDL_DTYPE_F16, hds, sizeof(hds) / sizeof(hds[0]));
    for (size_t i = 0; i < ATTN_NEL; i++) {
        half[i] = to_bf16(src[i]);
        wide[i] = from_half(half[i], MDL_DTYPE_BF16);
    }
    check_attn_rows(wide, half, MDL_DTYPE_BF16, hds, sizeof(hds) / sizeof(hds[0]));
}

static void test_batch_invariance(void **s)
{
    (void)s;
    check_invariance(1);
}

static void test_batch_invariance_two_threads(void **s)
{
    (void)s;
    check_invariance(2);
}

/* f16 KV: close to the reference (K/V rounded to 11 significant bits), and
 * still batch invariant. */
static void test_kv_f16(void **s)
{
    (void)s;
    g_kv_dtype = KV_DTYPE_F16;
    check_against_reference_tol(MDL_ROPE_HALF, 1, 0, 2e-2);
    check_invariance(2);
    g_kv_dtype = KV_DTYPE_F32;
}

static void test_f16_conversion(void **s)
{
    (void)s;
    ck_init();
    /* Every finite half survives half -> float -> half. */
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00) continue; /* inf, NaN */
        uint16_t in = (uint16_t)h, back;
        float f;
        ck_f16_to_f32(&f, &in, 1);
        ck_f32_to_f16(&back, &f, 1);
        if (back != in) fail_msg("half 0x%04x -> %g -> 0x%04x", h, (double)f, back);
    }
    /* The 8-wide path agrees with the scalar one on every half. */
    static uint16_t all[65536];
    static float wide[65536];
    for (uint32_t h = 0; h < 65536; h++)
        all[h] = (uint16_t)h;
    ck_f16_to_f32(wide, all, 65536);
    for (uint32_t h = 0; h < 65536; h++) {
        float one;
        ck_f16_to_f32(&one, &all[h], 1);
        assert_memory_equal(&one, &wide[h], sizeof(float));
    }
    const float v[8] = {1.0f, 1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048, 65504.0f, 1e6f, 1e-9f, -2.5f,
                        0.1f};
    const uint16_t want[8] = {
        0x3c00, 0x3c00 /* tie to even */, 0x3c02, 0x7bff, 0x7c00, 0x0000, 0xc100, 0x2e66};
    uint16_t got[8];
    ck_f32_to_f16(got, v, 8); /* 8 wide: the vector path when the CPU has F16C */
    assert_memory_equal(got, want, sizeof(want));
    for (int i = 0; i < 8; i++) {
        ck_f32_to_f16(&got[i], &v[i], 1); /* scalar tail path */
        assert_int_equal(got[i], want[i]);
    }
}

/* BLAS mode computes the same function; only the last bits may differ. */
static void test_blas_mode_close(void **s)
{
    (void)s;
    mdl_model *m = make_model(MDL_ROPE_HALF, 1, 0);
    int V = m->cfg.vocab_size;
    size_t lbytes = (size_t)NSEQ * STEPS * V * sizeof(float);
    float *det = calloc(1, lbytes), *blas = calloc(1, lbytes);
    int32_t ta[NSEQ][STEPS], tb[NSEQ][STEPS];
    be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 64);
    run_batch(be, 0xff, 1, ta, det, V);
    be_close(be);
    be = open_cpu(m, 1, BE_MATMUL_BLAS, NULL, 64);
    run_batch(be, 0xff, 1, tb, blas, V);
    be_close(be);
    /* Compare the first step's logits (later steps may follow other tokens). */
    for (int q = 0; q < NSEQ; q++)
        for (int v = 0; v < V; v++)
            assert_true(fabsf(det[(size_t)q * STEPS * V + v] - blas[(size_t)q * STEPS * V + v]) <
                        1e-4f);
    free(det);
    free(blas);
    mdl_free(m);
}

/* ---- paged KV ---- */

static void test_paged_shuffled_blocks(void **s)
{
    (void)s;
    mdl_model *m = make_model(MDL_ROPE_ADJACENT, 0, 1);
    int V = m->cfg.vocab_size, n = 40; /* 3 blocks of 16 */
    int32_t tokens[40];
    for (int i = 0; i < n; i++)
        tokens[i] = (i * 13 + 1) % V;
    float *a = malloc((size_t)n * V * sizeof(float)), *b = malloc((size_t)n * V * sizeof(float));
    int32_t contiguous[3] = {0, 1, 2}, shuffled[3] = {29, 3, 17};
    be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 32);
    assert_int_equal(run_prefill_all(be, tokens, n, contiguous, 3, a), 0);
    be_close(be);
    /* Prefill 20 tokens, then decode the rest one at a time, in shuffled blocks. */
    be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 32);
    assert_int_equal(run_prefill_all(be, tokens, 20, shuffled, 3, b), 0);
    const int32_t *tables[1] = {shuffled};
    int32_t nb = 3, seq = 0;
    for (int p = 20; p < n; p++) {
        int32_t row = 0, pos = p;
        be_batch d = {.n_tokens = 1,
                      .tokens = &tokens[p],
                      .pos = &pos,
                      .seq = &seq,
                      .n_seqs = 1,
                      .block_tables = tables,
                      .n_blocks = &nb,
                      .n_out = 1,
                      .out_rows = &row,
                      .logits = b + (size_t)p * V};
        assert_int_equal(be_forward(be, &d), 0);
    }
    expect_same_logits(a, b, (size_t)n * V);
    be_close(be);
    free(a);
    free(b);
    mdl_free(m);
}

/* A NaN in one position's K and V (its token's embedding row poisoned):
 * every later position attends to it, so its attention softmax rows hold a
 * NaN score (smpk_max answers NaN) and the logits from there on are NaN;
 * the positions before it are untouched, bit for bit. */
static void test_nan_scores(void **s)
{
    (void)s;
    mdl_model *m = make_model(MDL_ROPE_HALF, 0, 0);
    int V = m->cfg.vocab_size, dim = m->cfg.dim, n = 40, at = 20;
    int32_t tokens[40], table[3] = {0, 1, 2};
    for (int i = 0; i < n; i++)
        tokens[i] = i == at ? V - 1 : (i * 13 + 1) % (V - 1);
    float *clean = malloc((size_t)n * V * sizeof(float)), *got = malloc((size_t)n * V * 4);
    be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 0);
    assert_int_equal(run_prefill_all(be, tokens, n, table, 3, clean), 0);
    be_close(be);
    float *row = (float *)m->tok_embed + (size_t)(V - 1) * dim; /* owned, writable F32 */
    for (int i = 0; i < dim; i++)
        row[i] = NAN;
    be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 0);
    assert_int_equal(run_prefill_all(be, tokens, n, table, 3, got), 0);
    be_close(be);
    assert_memory_equal(got, clean, (size_t)at * V * sizeof(float));
    for (size_t i = (size_t)at * V; i < (size_t)n * V; i++)
        if (!isnan(got[i])) fail_msg("logit %zu (position %zu) is %g, not NaN", i, i / V, got[i]);
    free(clean);
    free(got);
    mdl_free(m);
}

/* Copy-on-write: a prefix computed into blocks {0, 1} and copied to {5, 6}
 * continues from the copies exactly as from the originals. */
static void test_copy_blocks(void **s)
{
    (void)s;
    mdl_model *m = make_model(MDL_ROPE_HALF, 1, 0);
    int V = m->cfg.vocab_size;
    int32_t tokens[24];
    for (int i = 0; i < 24; i++)
        tokens[i] = (i * 11 + 2) % V;
    float *a = malloc((size_t)24 * V * sizeof(float)), *b = malloc((size_t)V * sizeof(float));
    be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 8);
    int32_t orig[2] = {0, 1}, copy[2] = {5, 6};
    assert_int_equal(run_prefill_all(be, tokens, 20, orig, 2, a), 0);
    assert_int_equal(be_copy_blocks(be, orig, copy, 2), 0);
    /* Scribble over the originals: the copies must not depend on them. */
    int32_t other[2] = {1, 0};
    int32_t junk[20];
    for (int i = 0; i < 20; i++)
        junk[i] = (i * 5 + 3) % V;
    assert_int_equal(run_prefill_all(be, junk, 20, other, 2, a), 0);
    const int32_t *tables[1] = {copy};
    int32_t nb = 2, seq = 0, row = 0, pos = 20;
    be_batch d = {.n_tokens = 1,
                  .tokens = &tokens[20],
                  .pos = &pos,
                  .seq = &seq,
                  .n_seqs = 1,
                  .block_tables = tables,
                  .n_blocks = &nb,
                  .n_out = 1,
                  .out_rows = &row,
                  .logits = b};
    assert_int_equal(be_forward(be, &d), 0);
    be_close(be);
    /* Reference: the same 21 tokens in one call. */
    be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, NULL, 8);
    assert_int_equal(run_prefill_all(be, tokens, 21, orig, 2, a), 0);
    expect_same_logits(a + (size_t)20 * V, b, (size_t)V);
    int32_t bad = 8;
    assert_int_equal(be_copy_blocks(be, &bad, copy, 1), TD_EINVAL);
    assert_int_equal(be_copy_blocks(be, copy, &bad, 1), TD_EINVAL);
    assert_int_equal(be_copy_blocks(be, orig, copy, -1), TD_EINVAL);
    assert_int_equal(be_copy_blocks(be, orig, copy, 0), 0);
    be_close(be);
    free(a);
    free(b);
    mdl_free(m);
}

/* ---- hook, caller KV region, bad batches ---- */

static int hook_calls[16], hook_n, hook_fail_at = -1;
static int hook(void *arg, int layer, void *fence)
{
    (void)arg;
    assert_null(fence); /* CPU; a device backend without async_fence waits for it */
    hook_calls[hook_n++] = layer;
    return layer == hook_fail_at ? TD_ECANCELED : 0;
}

static void test_layer_hook_and_kv_mem(void **s)
{
    (void)s;
    mdl_model *m = make_model(MDL_ROPE_HALF, 0, 0);
    be_options o;
    be_options_defaults(&o, m);
    o.kv.num_blocks = 4;
    size_t bytes = kv_layout_pool_bytes(&o.kv);
    void *mem = NULL;
    assert_int_equal(posix_memalign(&mem, 64, bytes), 0);
    memset(mem, 0, bytes);
    const be_ops *ops = be_find(g_backend);
    if (ops->mem != BE_MEM_HOST) {
        /* A device backend refuses a host region: it cannot compute there. */
        be_backend *no = NULL;
        char err[256];
        o.kv_mem = mem;
        o.kv_mem_kind = BE_MEM_HOST;
        assert_int_equal(be_open(g_backend, m, &o, &no, err, sizeof(err)), TD_EUNSUPPORTED);
        assert_null(no);
        free(mem);
        mem = NULL;
    }
    be_backend *be = open_cpu(m, 1, BE_MATMUL_DETERMINISTIC, mem, 4);
    void *base;
    size_t got_bytes;
    be_kv_region(be, &base, &got_bytes);
    assert_int_equal(be_kv_mem(be), ops->mem);
    if (mem) assert_ptr_equal(base, mem);
    assert_int_equal(got_bytes, bytes);
    int32_t tok = 5, pos = 0, seq = 0, row = 0, table[1] = {2}, nb = 1;
    const int32_t *tables[1] = {table};
    float logits[97];
    be_batch b = {.n_tokens = 1,
                  .tokens = &tok,
                  .pos = &pos,
                  .seq = &seq,
                  .n_seqs = 1,
                  .block_tables = tables,
                  .n_blocks = &nb,
                  .n_out = 1,
                  .out_rows = &row,
                  .logits = logits,
                  .on_layer_done = hook};
    hook_n = 0;
    assert_int_equal(be_forward(be, &b), 0);
    assert_int_equal(hook_n, 2);
    assert_int_equal(hook_calls[0], 0);
    assert_int_equal(hook_calls[1], 1);
    /* K of layer 1, block 2, slot 0 was written into the caller's region. */
    const kv_layout *kl = be_kv_layout(be);
    if (mem) {
        const float *k = (const float *)((char *)mem + kv_layout_block_offset(kl, 1, 2));
        int nonzero = 0;
        for (uint32_t i = 0; i < kl->n_kv_heads * kl->head_dim; i++)
            nonzero |= k[i] != 0.0f;
        assert_true(nonzero);
    }
    hook_n = 0;
    hook_fail_at = 0;
    assert_int_equal(be_forward(be, &b), TD_ECANCELED);
    assert_int_equal(hook_n, 1);
    hook_fail_at = -1;

    /* Bad batches. */
    tok = 97;
    assert_int_equal(be_forward(be, &b), TD_EINVAL);
    tok = 5;
    pos = 16; /* needs a second block */
    assert_int_equal(be_forward(be, &b), TD_EINVAL);
    pos = 0;
    table[0] = 4; /* pool has 4 blocks */
    assert_int_equal(be_forward(be, &b), TD_EINVAL);
    table[0] = 0;
    row = 1;
    assert_int_equal(be_forward(be, &b), TD_EINVAL);
    row = 0;
    b.n_tokens = 0;
    assert_int_equal(be_forward(be, &b), TD_EINVAL);
    b.n_tokens = 1;
    seq = 1;
    assert_int_equal(be_forward(be, &b), TD_EINVAL);
    seq = 0;
    assert_int_equal(be_forward(be, &b), 0);
    be_close(be);
    free(mem);
    mdl_free(m);
}

/* be_open (1 and 2 threads), be_forward and smp_create with each allocation
 * failing in turn: errors, no leaks, and a forward never allocates. */
static void test_alloc_failures(void **s)
{
    (void)s;
    mdl_model *m = make_model(MDL_ROPE_HALF, 1, 0);
    for (int threads = 1; threads <= 2; threads++) {
        for (long n = 0;; n++) {
            be_options o;
            be_options_defaults(&o, m);
            o.n_threads = threads;
            be_backend *be = NULL;
            char err[256];
            fail_alloc_arm(n);
            int rc = be_open("cpu", m, &o, &be, err, sizeof(err));
            long hits = fail_alloc_disarm();
            if (hits == 0) {
                assert_int_equal(rc, 0);
                /* A forward allocates nothing: arm the very next allocation. */
                int32_t tok[3] = {1, 2, 3}, pos[3] = {0, 1, 2}, seq[3] = {0, 0, 0}, row = 2;
                int32_t table[1] = {0}, nb = 1;
                const int32_t *tables[1] = {table};
                float logits[97];
                be_batch b = {.n_tokens = 3,
                              .tokens = tok,
                              .pos = pos,
                              .seq = seq,
                              .n_seqs = 1,
                              .block_tables = tables,
                              .n_blocks = &nb,
                              .n_out = 1,
                              .out_rows = &row,
                              .logits = logits};
                fail_alloc_arm(0);
                assert_int_equal(be_forward(be, &b), 0);
                assert_int_equal(fail_alloc_disarm(), 0);
                be_close(be);
                break;
            }
            assert_true(rc < 0);
            assert_null(be);
        }
    }
    /* Greedy (no scratch) and top-p (an id scratch of the vocabulary's
     * size); a draw allocates nothing, also on the top-p select path (97
     * flat logits: more candidates than it sorts at once). */
    for (int cut = 0; cut <= 1; cut++) {
        for (long n = 0;; n++) {
            int32_t stops[2] = {5, 6};
            smp_params p;
            smp_params_defaults(&p);
            p.stop_ids = stops;
            p.n_stop_ids = 2;
            if (cut) {
                p.temperature = 1.0f;
                p.top_p = 0.9f;
            }
            smp_sampler *smp = NULL;
            fail_alloc_arm(n);
            int rc = smp_create(&p, 97, &smp);
            long hits = fail_alloc_disarm();
            if (hits == 0) {
                assert_int_equal(rc, 0);
                float lg[97];
                for (int i = 0; i < 97; i++)
                    lg[i] = 0.01f * (float)(i % 7);
                int32_t tok = -1;
                fail_alloc_arm(0);
                assert_int_equal(smp_sample(smp, lg, &tok), 0);
                assert_int_equal(fail_alloc_disarm(), 0);
                assert_true(tok >= 0 && tok < 97);
                smp_free(smp);
                break;
            }
            assert_int_equal(rc, TD_ENOMEM);
            assert_null(smp);
        }
    }
    mdl_free(m);
}

static void test_open_errors(void **s)
{
    (void)s;
    mdl_model *m = make_model(MDL_ROPE_HALF, 0, 0);
    be_options o;
    be_options_defaults(&o, m);
    be_backend *be = NULL;
    char err[256];
    assert_int_equal(be_open("nope", m, &o, &be, err, sizeof(err)), TD_ENOENT);
    if (!be_find("cuda"))
        assert_int_equal(be_open("cuda", m, &o, &be, err, sizeof(err)), TD_ENODEV);
    assert_null(be_find("nope"));
    assert_non_null(be_find("cpu"));
    o.kv.head_dim = 4;
    assert_int_equal(be_open(g_backend, m, &o, &be, err, sizeof(err)), TD_EINVAL);
    be_options_defaults(&o, m);
    if (strcmp(g_backend, "cpu") == 0) {
        o.kv.dtype = KV_DTYPE_BF16;
        assert_int_equal(be_open("cpu", m, &o, &be, err, sizeof(err)), TD_EUNSUPPORTED);
        /* A region of the other kind (a GPU transport's pool) is refused. */
        be_options_defaults(&o, m);
        static _Alignas(64) char region[64];
        o.kv_mem = region;
        o.kv_mem_kind = BE_MEM_DEVICE;
        assert_int_equal(be_open("cpu", m, &o, &be, err, sizeof(err)), TD_EUNSUPPORTED);
    }
    assert_null(be);
    /* --device specs (ctest sets TANDEM_DEVICE=cpu; auto is tested without it) */
    const char *name;
    int dev;
    assert_int_equal(setenv("TANDEM_DEVICE", "gpu", 1), 0);
    assert_int_equal(be_device_resolve("auto", 0, &name, &dev, err, sizeof(err)), TD_EINVAL);
    assert_int_equal(setenv("TANDEM_DEVICE", "cpu", 1), 0);
    assert_int_equal(be_device_resolve("auto", 0, &name, &dev, err, sizeof(err)), 0);
    assert_string_equal(name, "cpu");
    assert_int_equal(be_device_resolve(NULL, 0, &name, &dev, err, sizeof(err)), 0);
    assert_string_equal(name, "cpu");
    assert_int_equal(unsetenv("TANDEM_DEVICE"), 0);
    assert_int_equal(be_device_resolve("cpu", 0, &name, &dev, err, sizeof(err)), 0);
    assert_string_equal(name, "cpu");
    assert_int_equal(be_device_resolve("auto", 1, &name, &dev, err, sizeof(err)), 0);
    assert_string_equal(name, "cpu");
    assert_int_equal(be_device_resolve("auto", 0, &name, &dev, err, sizeof(err)), 0);
    const be_ops *cu = be_find("cuda");
    assert_string_equal(name, cu && cu->probe() == 0 ? "cuda" : "cpu");
    assert_int_equal(be_device_resolve("gpu", 0, &name, &dev, err, sizeof(err)), TD_EINVAL);
    assert_int_equal(be_device_resolve("cuda:x", 0, &name, &dev, err, sizeof(err)), TD_EINVAL);
    assert_int_equal(be_device_resolve("cuda:", 0, &name, &dev, err, sizeof(err)), TD_EINVAL);
    if (!cu || cu->probe() != 0) {
        assert_int_equal(be_device_resolve("cuda", 0, &name, &dev, err, sizeof(err)), TD_ENODEV);
        assert_int_equal(be_device_resolve("cuda:1", 0, &name, &dev, err, sizeof(err)), TD_ENODEV);
    } else {
        assert_int_equal(be_device_resolve("cuda:1", 0, &name, &dev, err, sizeof(err)), 0);
        assert_int_equal(dev, 1);
    }
    mdl_free(m);
}

/* The kernel set follows the environment (the runs registered with
 * TANDEM_CPU_NO_AVX512 / TANDEM_CPU_AVX512) and, without it, the FMA probe's
 * rule: unless 512-bit FMAs run at 1.5x the 256-bit rate, the AVX-512
 * matmul gives way below 4 rows of x and for F32 weights at 16-23 rows
 * (ck__matmul_split512). */
static void test_kernel_choice(void **state)
{
    (void)state;
    ck_init();
    const char *v = ck_variant();
    float sink = 0;
    assert_true(ck_fma_gflops(128, 1000, &sink) == 0); /* no such width */
    assert_true(ck_fma_gflops(256, 0, &sink) == 0);    /* no run */
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f");
    if (avx2) assert_true(ck_fma_gflops(256, 20000, &sink) > 0);
    assert_int_equal(ck_fma_gflops(512, 20000, &sink) > 0, __builtin_cpu_supports("avx512f") != 0);
    if (!avx512) {
        assert_string_not_equal(v, "avx512");
        assert_null(strstr(v, "avx512")); /* nor the split name */
        assert_true(ck_fma512_ratio() == 0);
    } else if (getenv("TANDEM_CPU_NO_AVX512")) {
        assert_string_equal(v, "avx2");
    } else if (getenv("TANDEM_CPU_AVX512")) {
        assert_string_equal(v, "avx512");
    } else {
        double r = ck_fma512_ratio();
        assert_true(r > 0);
        assert_string_equal(v, r >= 1.5 ? "avx512"
                                        : "avx512 (split FMA: f32 a row at a time below 4 rows; "
                                          "avx2 for 16-bit below 4, f32 at 16-23)");
    }
    printf("kernels: %s (512-bit FMA rate %.2fx the 256-bit one)\n", v, ck_fma512_ratio());
#else
    (void)v;
#endif
}

/* A failed test must not leave another head size or KV dtype behind. */
static int reset_globals(void **s)
{
    (void)s;
    g_head_dim = 8;
    g_kv_dtype = KV_DTYPE_F32;
    return 0;
}

/* The conformance group for a device backend: everything above that does not
 * test the CPU's own kernels, threads or allocations. */
static int run_device_backend(const char *name)
{
    const be_ops *ops = be_find(name);
    if (!ops) {
        printf("SKIP %s backend: not built in this binary\n", name);
        return 0;
    }
    if (ops->probe() != 0) {
        printf("SKIP %s backend: built, but no device here\n", name);
        return 0;
    }
    g_backend = name;
    g_exact = 0;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_reference_half_rope_bias, reset_globals),
        cmocka_unit_test_setup(test_reference_adjacent_rope_tied, reset_globals),
        cmocka_unit_test_setup(test_reference_head_dims, reset_globals),
        cmocka_unit_test_setup(test_batch_invariance, reset_globals),
        cmocka_unit_test_setup(test_half_weights, reset_globals),
        cmocka_unit_test_setup(test_kv_f16, reset_globals),
        cmocka_unit_test_setup(test_paged_shuffled_blocks, reset_globals),
        cmocka_unit_test_setup(test_copy_blocks, reset_globals),
        cmocka_unit_test_setup(test_layer_hook_and_kv_mem, reset_globals),
        cmocka_unit_test_setup(test_open_errors, reset_globals),
    };
    int rc = cmocka_run_group_tests_name(name, tests, NULL, NULL);
    g_backend = "cpu";
    g_exact = 1;
    return rc;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_reference_half_rope_bias, reset_globals),
        cmocka_unit_test_setup(test_reference_adjacent_rope_tied, reset_globals),
        cmocka_unit_test_setup(test_reference_head_dims, reset_globals),
        cmocka_unit_test_setup(test_batch_invariance, reset_globals),
        cmocka_unit_test_setup(test_batch_invariance_two_threads, reset_globals),
        cmocka_unit_test_setup(test_half_weights, reset_globals),
        cmocka_unit_test_setup(test_matmul_blocking, reset_globals),
        cmocka_unit_test_setup(test_matmul_rows_vs_dot, reset_globals),
        cmocka_unit_test_setup(test_matmul_many_rows_vs_dot, reset_globals),
        cmocka_unit_test_setup(test_attn_kernels_vs_definition, reset_globals),
        cmocka_unit_test_setup(test_attn_f16_rows_vs_f32, reset_globals),
        cmocka_unit_test_setup(test_rope_vs_generic, reset_globals),
        cmocka_unit_test_setup(test_attn_q_kernels_vs_one, reset_globals),
        cmocka_unit_test_setup(test_prefill_vs_token_by_token, reset_globals),
        cmocka_unit_test_setup(test_blas_mode_close, reset_globals),
        cmocka_unit_test_setup(test_kv_f16, reset_globals),
        cmocka_unit_test_setup(test_f16_conversion, reset_globals),
        cmocka_unit_test_setup(test_paged_shuffled_blocks, reset_globals),
        cmocka_unit_test_setup(test_nan_scores, reset_globals),
        cmocka_unit_test_setup(test_copy_blocks, reset_globals),
        cmocka_unit_test_setup(test_layer_hook_and_kv_mem, reset_globals),
        cmocka_unit_test_setup(test_open_errors, reset_globals),
        cmocka_unit_test_setup(test_alloc_failures, reset_globals),
        cmocka_unit_test_setup(test_kernel_choice, reset_globals),
    };
    int rc = cmocka_run_group_tests_name("cpu", tests, NULL, NULL);
    return rc | run_device_backend("cuda");
}
