/* tandem-backend-gpu-check: the CUDA backend against the CPU backend on one
 * checkpoint, then its batch invariance; and throughput figures on random
 * weights. Built only with CUDA; tests/gpu/run.sh drives it.
 *
 * Usage:
 *   tandem-backend-gpu-check correct MODEL TOL [--exact-tokens]
 *     1. a 24-token prompt in one prefill: logits of every row, CPU vs GPU,
 *        max |gpu - cpu| / max |cpu| per row <= TOL;
 *     2. 64 greedy steps on each backend alone: the logits of the steps
 *        where both still follow the same tokens within TOL, and with
 *        --exact-tokens the 64 tokens identical;
 *     3. on the GPU, 16 sequences (prompts of 5..50 tokens) decoded 32 steps
 *        each alone, then all together in one batch: identical tokens.
 *   tandem-backend-gpu-check decode-bench   Llama-3-8B shape, random BF16
 *     weights, batch 1/8/64: tokens/s and weight+KV bytes read per second,
 *     beside a device-to-device cudaMemcpy measured in the same run.
 *   tandem-backend-gpu-check prefill-bench  the same model, one 2,048-token
 *     prefill: TFLOP/s beside a plain cublasGemmEx of the FFN's size.
 *   tandem-backend-gpu-check copy-bw  device-to-device cudaMemcpy GB/s
 *     (bytes read + written per second, 1 GiB buffers).
 * Exit: 0 pass, 1 fail, 77 skipped (no device), 2 usage. One line per check
 * starting with PASS, FAIL or INFO. */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "engine/backend/backend.h"
#include "engine/model.h"

#define PROMPT     24
#define GREEDY     64
#define NSEQ       16
#define INV_STEPS  32
#define MAX_BLOCKS 64 /* per sequence in these checks: 1,024 positions of block 16 */

static int g_fail;
/* The backend checked against the CPU: "cuda", or what TANDEM_CHECK_BACKEND
 * names (cpu against cpu checks this program itself on a machine without a
 * GPU; only `correct` honours it). */
static const char *g_under_test = "cuda";

static void result(int ok, const char *fmt, double a, double b)
{
    printf("%s ", ok ? "PASS" : "FAIL");
    printf(fmt, a, b);
    printf("\n");
    fflush(stdout);
    if (!ok) g_fail = 1;
}

static be_backend *open_be(const char *name, const mdl_model *m, int max_tokens, int max_seqs,
                           uint32_t blocks)
{
    be_options o;
    be_options_defaults(&o, m);
    o.max_batch_tokens = max_tokens;
    o.max_seqs = max_seqs;
    o.kv.num_blocks = blocks;
    o.keep_f32_weights = 1; /* F32 checkpoints compare in F32; BF16 stay BF16 */
    be_backend *b = NULL;
    char err[256] = "";
    int rc = be_open(name, m, &o, &b, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "be_open %s: %s (%s)\n", name, err, td_err_name(rc));
        return NULL;
    }
    return b;
}

/* One forward of n tokens of sequence `seq` (of n_seqs, tables[s] = blocks
 * s * MAX_BLOCKS...) at positions p0..p0+n-1; logits of rows rows[0..n_out). */
static int forward_seq(be_backend *be, const int32_t *tok, int n, int p0, int n_out,
                       const int32_t *rows, float *logits, int32_t tables[][MAX_BLOCKS], int n_seqs,
                       int seq)
{
    int32_t pos[1024], sq[1024];
    const int32_t *tp[NSEQ];
    int32_t nb[NSEQ];
    if (n > 1024 || n_seqs > NSEQ) return TD_EINVAL;
    for (int i = 0; i < n; i++) {
        pos[i] = p0 + i;
        sq[i] = seq;
    }
    for (int s = 0; s < n_seqs; s++) {
        tp[s] = tables[s];
        nb[s] = MAX_BLOCKS;
    }
    be_batch b = {.n_tokens = n,
                  .tokens = tok,
                  .pos = pos,
                  .seq = sq,
                  .n_seqs = n_seqs,
                  .block_tables = tp,
                  .n_blocks = nb,
                  .n_out = n_out,
                  .out_rows = rows,
                  .logits = logits};
    return be_forward(be, &b);
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* max |a - b| / max |b| over one row of n. */
static double rel_err(const float *a, const float *b, int n)
{
    double amax = 1e-30, d = 0;
    for (int i = 0; i < n; i++) {
        if (fabs(b[i]) > amax) amax = fabs(b[i]);
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e; /* NaN counts as the largest */
    }
    return d / amax;
}

/* Greedy decode of one sequence: prompt, then `steps` tokens into out;
 * logits of each step into lg[steps][V] (may be NULL). */
static int greedy(be_backend *be, const int32_t *prompt, int np, int steps, int32_t *out, float *lg,
                  int V, int32_t tables[][MAX_BLOCKS])
{
    float *row = malloc((size_t)V * sizeof(float));
    if (!row) return TD_ENOMEM;
    int32_t last = np - 1;
    int rc = forward_seq(be, prompt, np, 0, 1, &last, row, tables, 1, 0);
    for (int s = 0; s < steps && rc == 0; s++) {
        out[s] = argmax(row, V);
        if (lg) memcpy(lg + (size_t)s * V, row, (size_t)V * sizeof(float));
        if (s + 1 < steps) {
            int32_t r0 = 0;
            rc = forward_seq(be, &out[s], 1, np + s, 1, &r0, row, tables, 1, 0);
        }
    }
    free(row);
    return rc;
}

static int32_t prompt_tok(int s, int i, int V)
{
    return (int32_t)((s * 131 + i * 17 + 7) % V);
}

/* 16 sequences decoded together: every prompt prefilled in the first batch,
 * then one token each per step. */
static int batched(be_backend *be, int V, int32_t out[NSEQ][INV_STEPS],
                   int32_t tables[][MAX_BLOCKS])
{
    static int32_t tok[NSEQ * 64], pos[NSEQ * 64], sq[NSEQ * 64];
    int32_t rows[NSEQ];
    const int32_t *tp[NSEQ];
    int32_t nb[NSEQ];
    float *lg = malloc((size_t)NSEQ * V * sizeof(float));
    if (!lg) return TD_ENOMEM;
    for (int s = 0; s < NSEQ; s++) {
        tp[s] = tables[s];
        nb[s] = MAX_BLOCKS;
    }
    int rc = 0;
    for (int step = 0; step < INV_STEPS && rc == 0; step++) {
        int n = 0;
        for (int s = 0; s < NSEQ; s++) {
            int np = 5 + 3 * s;
            if (step == 0) {
                for (int i = 0; i < np; i++) {
                    tok[n] = prompt_tok(s, i, V);
                    pos[n] = i;
                    sq[n++] = s;
                }
            } else {
                tok[n] = out[s][step - 1];
                pos[n] = np + step - 1;
                sq[n++] = s;
            }
            rows[s] = n - 1;
        }
        be_batch b = {.n_tokens = n,
                      .tokens = tok,
                      .pos = pos,
                      .seq = sq,
                      .n_seqs = NSEQ,
                      .block_tables = tp,
                      .n_blocks = nb,
                      .n_out = NSEQ,
                      .out_rows = rows,
                      .logits = lg};
        rc = be_forward(be, &b);
        for (int s = 0; s < NSEQ && rc == 0; s++)
            out[s][step] = argmax(lg + (size_t)s * V, V);
    }
    free(lg);
    return rc;
}

static int check_correct(const char *path, double tol, int exact_tokens)
{
    mdl_model *m = NULL;
    char err[256] = "";
    int rc = mdl_load_ex(path, MDL_LOAD_KEEP_DTYPE, &m, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "load %s: %s\n", path, err);
        return 1;
    }
    int V = m->cfg.vocab_size;
    if (m->cfg.max_seq_len < PROMPT + GREEDY || m->cfg.max_seq_len < 50 + INV_STEPS) {
        fprintf(stderr, "%s: context too short for the checks\n", path);
        mdl_free(m);
        return 1;
    }
    printf("INFO model %s: dim %d layers %d heads %d/%d head_dim %d vocab %d matrices %s\n", path,
           m->cfg.dim, m->cfg.n_layers, m->cfg.n_heads, m->cfg.n_kv_heads, m->cfg.head_dim, V,
           m->layers[0].mat.wq.dtype == MDL_DTYPE_F32    ? "f32"
           : m->layers[0].mat.wq.dtype == MDL_DTYPE_BF16 ? "bf16"
                                                         : "f16");
    static int32_t tables[NSEQ][MAX_BLOCKS];
    for (int s = 0; s < NSEQ; s++)
        for (int i = 0; i < MAX_BLOCKS; i++)
            tables[s][i] = s * MAX_BLOCKS + (MAX_BLOCKS - 1 - i); /* reversed: paging matters */
    uint32_t blocks = NSEQ * MAX_BLOCKS;
    be_backend *cpu = open_be("cpu", m, 1024, NSEQ, blocks);
    be_backend *gpu = open_be(g_under_test, m, 1024, NSEQ, blocks);
    float *lc = malloc((size_t)(PROMPT > GREEDY ? PROMPT : GREEDY) * V * sizeof(float));
    float *lgp = malloc((size_t)(PROMPT > GREEDY ? PROMPT : GREEDY) * V * sizeof(float));
    int fail = 0;
    if (!cpu || !gpu || !lc || !lgp) {
        fail = 1;
        goto out;
    }
    /* 1. one prefill, every row */
    int32_t prompt[PROMPT], rows[PROMPT];
    for (int i = 0; i < PROMPT; i++) {
        prompt[i] = prompt_tok(0, i, V);
        rows[i] = i;
    }
    if (forward_seq(cpu, prompt, PROMPT, 0, PROMPT, rows, lc, tables, 1, 0) != 0 ||
        forward_seq(gpu, prompt, PROMPT, 0, PROMPT, rows, lgp, tables, 1, 0) != 0) {
        printf("FAIL prefill forward failed\n");
        fail = 1;
        goto out;
    }
    double worst = 0;
    for (int r = 0; r < PROMPT; r++) {
        double e = rel_err(lgp + (size_t)r * V, lc + (size_t)r * V, V);
        if (!(e <= worst)) worst = e;
    }
    result(worst <= tol, "prefill logits: max relative error %.3g (tolerance %.3g)", worst, tol);

    /* 2. greedy on each backend alone */
    int32_t tc[GREEDY], tg[GREEDY];
    if (greedy(cpu, prompt, PROMPT, GREEDY, tc, lc, V, tables) != 0 ||
        greedy(gpu, prompt, PROMPT, GREEDY, tg, lgp, V, tables) != 0) {
        printf("FAIL greedy forward failed\n");
        fail = 1;
        goto out;
    }
    int same = 0;
    while (same < GREEDY && tc[same] == tg[same])
        same++;
    worst = 0;
    for (int s = 0; s < same; s++) { /* the logits of steps with the same history */
        double e = rel_err(lgp + (size_t)s * V, lc + (size_t)s * V, V);
        if (!(e <= worst)) worst = e;
    }
    result(worst <= tol, "decode logits over %.0f same-history steps: max relative error %.3g",
           (double)same, worst);
    if (exact_tokens)
        result(same == GREEDY, "greedy tokens identical: %.0f of %.0f", (double)same,
               (double)GREEDY);
    else
        printf("INFO greedy tokens identical: %d of %d (not required at this precision)\n", same,
               GREEDY);

    /* 3. batch invariance on the GPU */
    static int32_t alone[NSEQ][INV_STEPS], together[NSEQ][INV_STEPS];
    for (int s = 0; s < NSEQ; s++) {
        int32_t p[64];
        int np = 5 + 3 * s;
        for (int i = 0; i < np; i++)
            p[i] = prompt_tok(s, i, V);
        int32_t t1[NSEQ][MAX_BLOCKS];
        memcpy(t1[0], tables[s], sizeof(t1[0]));
        if (greedy(gpu, p, np, INV_STEPS, alone[s], NULL, V, t1) != 0) {
            printf("FAIL invariance: alone forward failed\n");
            fail = 1;
            goto out;
        }
    }
    if (batched(gpu, V, together, tables) != 0) {
        printf("FAIL invariance: batched forward failed\n");
        fail = 1;
        goto out;
    }
    int diff = 0;
    for (int s = 0; s < NSEQ; s++)
        diff += memcmp(alone[s], together[s], sizeof(alone[s])) != 0;
    result(diff == 0, "batch invariance on the GPU: %.0f of %.0f sequences differ alone vs batch",
           (double)diff, (double)NSEQ);
out:
    free(lc);
    free(lgp);
    be_close(cpu);
    be_close(gpu);
    mdl_free(m);
    return fail || g_fail;
}

/* ---- throughput on random weights ---- */

/* A Llama-3-8B-shaped model whose matrices all view one random BF16 buffer
 * (the backend uploads each matrix to its own device memory, so what is
 * read per token is the real 16 GB); norms 1, no biases. */
typedef struct big_model {
    mdl_model m;
    uint16_t *w;
    float *ones;
} big_model;

static int big_make(big_model *b, int n_layers)
{
    memset(b, 0, sizeof(*b));
    mdl_config *c = &b->m.cfg;
    mdl_config_defaults(c);
    snprintf(c->arch, sizeof(c->arch), "LlamaForCausalLM");
    c->dim = 4096;
    c->hidden_dim = 14336;
    c->n_layers = n_layers;
    c->n_heads = 32;
    c->n_kv_heads = 8;
    c->head_dim = 128;
    c->vocab_size = 128256;
    c->max_seq_len = 8192;
    c->rope_theta = 500000.0f;
    c->rope_layout = MDL_ROPE_HALF;
    size_t biggest = (size_t)c->vocab_size * c->dim; /* > hidden * dim */
    b->w = malloc(biggest * sizeof(uint16_t));
    b->ones = malloc((size_t)c->dim * sizeof(float));
    b->m.layers = calloc((size_t)n_layers, sizeof(mdl_layer));
    if (!b->w || !b->ones || !b->m.layers) return TD_ENOMEM;
    uint64_t r = 12345;
    for (size_t i = 0; i < biggest; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        float f = ((float)(r >> 40) / (float)(1 << 24) - 0.5f) * 0.04f;
        uint32_t u;
        memcpy(&u, &f, 4);
        b->w[i] = (uint16_t)(u >> 16);
    }
    for (int i = 0; i < c->dim; i++)
        b->ones[i] = 1.0f;
    mdl_mat mat = {.data = b->w, .dtype = MDL_DTYPE_BF16};
    for (int l = 0; l < n_layers; l++) {
        mdl_layer *L = &b->m.layers[l];
        L->attn_norm = L->ffn_norm = b->ones;
        L->mat.wq = L->mat.wk = L->mat.wv = L->mat.wo = mat;
        L->mat.w_gate = L->mat.w_up = L->mat.w_down = mat;
    }
    b->m.final_norm = b->ones;
    b->m.tok_embed_mat = mat;
    b->m.output_mat = mat; /* same data: uploaded once, as a tied classifier */
    return 0;
}

static void big_free(big_model *b)
{
    free(b->w);
    free(b->ones);
    free(b->m.layers);
}

/* Device-to-device copy bandwidth (read + write bytes per second). */
static double d2d_gbs(void)
{
    size_t bytes = (size_t)1 << 30;
    void *a = NULL, *b = NULL;
    double gbs = 0;
    cudaEvent_t e0 = NULL, e1 = NULL;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess ||
        cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess)
        goto out;
    if (cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice) != cudaSuccess) goto out;
    cudaEventRecord(e0, 0);
    for (int i = 0; i < 10; i++)
        cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0);
    cudaEventRecord(e1, 0);
    if (cudaEventSynchronize(e1) == cudaSuccess) {
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        gbs = 2.0 * 10 * (double)bytes / (ms * 1e-3) / 1e9;
    }
out:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return gbs;
}

static int bench_decode(void)
{
    big_model bm;
    if (big_make(&bm, 32) != 0) return 1;
    const mdl_config *c = &bm.m.cfg;
    int ctx = 512; /* positions already in the KV of each sequence */
    int max_b = 64;
    be_options o;
    be_options_defaults(&o, &bm.m);
    o.max_batch_tokens = max_b;
    o.max_seqs = max_b;
    o.kv.dtype = KV_DTYPE_BF16;
    o.kv.num_blocks = (uint32_t)(max_b * ((ctx + 64) / 16));
    be_backend *be = NULL;
    char err[256] = "";
    int64_t t0 = td_now_ns();
    int rc = be_open("cuda", &bm.m, &o, &be, err, sizeof(err));
    if (rc != 0) {
        printf("FAIL decode-bench: be_open: %s\n", err);
        big_free(&bm);
        return 1;
    }
    printf("INFO decode-bench: Llama-3-8B shape, BF16 weights and KV, upload %.1f s\n",
           (double)(td_now_ns() - t0) / 1e9);
    double copy = d2d_gbs();
    int per_seq = (ctx + 64) / 16;
    int32_t *tables = malloc((size_t)max_b * per_seq * sizeof(int32_t));
    const int32_t **tp = malloc((size_t)max_b * sizeof(*tp));
    int32_t *nb = malloc((size_t)max_b * sizeof(int32_t));
    int32_t tok[64], pos[64], sq[64], rows[64];
    float *lg = malloc((size_t)max_b * c->vocab_size * sizeof(float));
    if (!tables || !tp || !nb || !lg) {
        rc = TD_ENOMEM;
        goto out;
    }
    for (int s = 0; s < max_b; s++) {
        for (int i = 0; i < per_seq; i++)
            tables[s * per_seq + i] = s * per_seq + i;
        tp[s] = tables + (size_t)s * per_seq;
        nb[s] = per_seq;
    }
    /* KV positions 0..ctx-1 are whatever the pool holds (zeros): decode
     * steps read them all the same. */
    const int batches[3] = {1, 8, 64};
    for (int bi = 0; bi < 3 && rc == 0; bi++) {
        int B = batches[bi], steps = 32;
        for (int s = 0; s < B; s++) {
            tok[s] = (s * 7 + 1) % c->vocab_size;
            sq[s] = s;
            rows[s] = s;
        }
        int64_t t1 = 0;
        for (int it = -2; it < steps && rc == 0; it++) { /* 2 warm-up steps */
            if (it == 0) t1 = td_now_ns();
            for (int s = 0; s < B; s++)
                pos[s] = ctx + (it < 0 ? 0 : it);
            be_batch b = {.n_tokens = B,
                          .tokens = tok,
                          .pos = pos,
                          .seq = sq,
                          .n_seqs = B,
                          .block_tables = tp,
                          .n_blocks = nb,
                          .n_out = B,
                          .out_rows = rows,
                          .logits = lg};
            rc = be_forward(be, &b);
        }
        if (rc != 0) break;
        double sec = (double)(td_now_ns() - t1) / 1e9 / steps;
        /* bytes per step: every weight once (embedding rows aside), the KV
         * of every sequence read once per layer */
        double wbytes =
            2.0 * ((double)c->n_layers *
                       ((double)c->dim * (c->n_heads * 128 + 2 * c->n_kv_heads * 128) +
                        (double)c->n_heads * 128 * c->dim + 3.0 * c->dim * c->hidden_dim) +
                   (double)c->vocab_size * c->dim);
        double kvbytes = (double)B * (ctx + 16) * c->n_layers * 2.0 * c->n_kv_heads * 128 * 2;
        printf("INFO decode batch %2d: %.2f ms/step, %.0f tokens/s, %.0f GB/s of weights+KV "
               "(device copy %.0f GB/s)\n",
               B, sec * 1e3, B / sec, (wbytes + kvbytes) / sec / 1e9, copy);
    }
    if (rc != 0) printf("FAIL decode-bench: forward: %s\n", td_err_name(rc));
out:
    free(tables);
    free(tp);
    free(nb);
    free(lg);
    be_close(be);
    big_free(&bm);
    return rc != 0;
}

/* A plain cuBLAS BF16 GEMM [M][K] x [N][K]^T in TFLOP/s. */
static double gemm_tflops(int M, int N, int K)
{
    void *a = NULL, *b = NULL, *c = NULL;
    cublasHandle_t h = NULL;
    double tf = 0;
    if (cudaMalloc(&a, (size_t)M * K * 2) != cudaSuccess ||
        cudaMalloc(&b, (size_t)N * K * 2) != cudaSuccess ||
        cudaMalloc(&c, (size_t)M * N * 4) != cudaSuccess ||
        cublasCreate(&h) != CUBLAS_STATUS_SUCCESS)
        goto out;
    cudaMemset(a, 0, (size_t)M * K * 2);
    cudaMemset(b, 0, (size_t)N * K * 2);
    const float al = 1, be = 0;
    int64_t t0 = 0;
    for (int it = 0; it < 12; it++) { /* 2 warm-up calls, 10 timed */
        if (it == 2) {
            if (cudaDeviceSynchronize() != cudaSuccess) goto out;
            t0 = td_now_ns();
        }
        if (cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &al, b, CUDA_R_16BF, K, a,
                         CUDA_R_16BF, K, &be, c, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
            goto out;
    }
    if (cudaDeviceSynchronize() != cudaSuccess) goto out;
    tf = 2.0 * M * N * K / ((double)(td_now_ns() - t0) / 1e9 / 10) / 1e12;
out:
    if (h) cublasDestroy(h);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    return tf;
}

static int bench_prefill(void)
{
    big_model bm;
    if (big_make(&bm, 32) != 0) return 1;
    const mdl_config *c = &bm.m.cfg;
    int T = 2048;
    be_options o;
    be_options_defaults(&o, &bm.m);
    o.max_batch_tokens = T;
    o.max_seqs = 1;
    o.kv.dtype = KV_DTYPE_BF16;
    o.kv.num_blocks = (uint32_t)(T / 16);
    be_backend *be = NULL;
    char err[256] = "";
    int rc = be_open("cuda", &bm.m, &o, &be, err, sizeof(err));
    if (rc != 0) {
        printf("FAIL prefill-bench: be_open: %s\n", err);
        big_free(&bm);
        return 1;
    }
    int32_t *tok = malloc((size_t)T * 4), *pos = malloc((size_t)T * 4), *sq = calloc((size_t)T, 4);
    int32_t *table = malloc((size_t)(T / 16) * 4), nbk = T / 16, row = T - 1;
    float *lg = malloc((size_t)c->vocab_size * 4);
    if (!tok || !pos || !sq || !table || !lg) {
        rc = TD_ENOMEM;
        goto out;
    }
    for (int i = 0; i < T; i++) {
        tok[i] = (i * 31 + 3) % c->vocab_size;
        pos[i] = i;
    }
    for (int i = 0; i < T / 16; i++)
        table[i] = i;
    const int32_t *tp[1] = {table};
    be_batch b = {.n_tokens = T,
                  .tokens = tok,
                  .pos = pos,
                  .seq = sq,
                  .n_seqs = 1,
                  .block_tables = tp,
                  .n_blocks = &nbk,
                  .n_out = 1,
                  .out_rows = &row,
                  .logits = lg};
    rc = be_forward(be, &b); /* warm-up */
    int64_t t0 = td_now_ns();
    for (int it = 0; it < 3 && rc == 0; it++)
        rc = be_forward(be, &b);
    if (rc != 0) {
        printf("FAIL prefill-bench: forward: %s\n", td_err_name(rc));
        goto out;
    }
    double sec = (double)(td_now_ns() - t0) / 1e9 / 3;
    double per_tok = 2.0 * c->n_layers *
                     ((double)c->dim * (c->n_heads + 2 * c->n_kv_heads) * 128 +
                      (double)c->n_heads * 128 * c->dim + 3.0 * c->dim * c->hidden_dim);
    double attn = 2.0 * 2.0 * c->n_layers * c->n_heads * 128 * ((double)T * (T + 1) / 2);
    double flops = per_tok * T + attn + 2.0 * c->dim * c->vocab_size;
    printf("INFO prefill %d tokens: %.1f ms, %.0f tokens/s, %.1f TFLOP/s (plain cuBLAS BF16 GEMM "
           "%dx%dx%d: %.1f TFLOP/s)\n",
           T, sec * 1e3, T / sec, flops / sec / 1e12, T, c->hidden_dim, c->dim,
           gemm_tflops(T, c->hidden_dim, c->dim));
out:
    free(tok);
    free(pos);
    free(sq);
    free(table);
    free(lg);
    be_close(be);
    big_free(&bm);
    return rc != 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: tandem-backend-gpu-check correct MODEL TOL [--exact-tokens] | "
                        "decode-bench | prefill-bench | copy-bw\n");
        return 2;
    }
    const char *env = getenv("TANDEM_CHECK_BACKEND");
    if (env && env[0] && strcmp(argv[1], "correct") == 0) g_under_test = env;
    const be_ops *cu = be_find(g_under_test);
    if (!cu || cu->probe() != 0) {
        printf("SKIP no CUDA device\n");
        return 77;
    }
    if (strcmp(argv[1], "correct") == 0 && argc >= 4)
        return check_correct(argv[2], atof(argv[3]),
                             argc >= 5 && strcmp(argv[4], "--exact-tokens") == 0);
    if (strcmp(argv[1], "decode-bench") == 0) return bench_decode();
    if (strcmp(argv[1], "prefill-bench") == 0) return bench_prefill();
    if (strcmp(argv[1], "copy-bw") == 0) {
        printf("device copy %.0f GB/s\n", d2d_gbs());
        return 0;
    }
    fprintf(stderr, "tandem-backend-gpu-check: unknown command %s\n", argv[1]);
    return 2;
}
