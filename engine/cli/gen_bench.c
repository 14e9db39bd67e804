#include "engine/cli/gen_bench.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "engine/backend/backend.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* The llama2.c-style single-file decoder measured on this machine (NOTES.md):
 * 15M model, one thread. */
#define BENCH_REF_TOK_S 315.0

/* ---- plain memory-read bandwidth ---- */

typedef struct bench_sum_arg {
    const float *a;
    size_t n;
    float out;
} bench_sum_arg;

#if defined(__x86_64__)
__attribute__((target("avx2"))) static float bench_sum_avx2(const float *a, size_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_loadu_ps(a + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_loadu_ps(a + i + 24));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    float s = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    for (; i < n; i++)
        s += a[i];
    return s;
}
#endif

static float bench_sum(const float *a, size_t n)
{
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) return bench_sum_avx2(a, n);
#endif
    float s[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            s[l] += a[i + l];
    for (; i < n; i++)
        s[0] += a[i];
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

static void *bench_sum_main(void *varg)
{
    bench_sum_arg *a = varg;
    a->out = bench_sum(a->a, a->n);
    return NULL;
}

/* Best of 3 passes over a[0..n) with `threads` threads, in GB/s. */
static double bench_mem_read(const float *a, size_t n, int threads, float *sink)
{
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        bench_sum_arg args[2];
        pthread_t th[2];
        size_t per = n / (size_t)threads;
        int64_t t0 = td_now_ns();
        for (int i = 0; i < threads; i++) {
            args[i].a = a + (size_t)i * per;
            args[i].n = i == threads - 1 ? n - (size_t)i * per : per;
            if (i > 0) pthread_create(&th[i], NULL, bench_sum_main, &args[i]);
        }
        bench_sum_main(&args[0]);
        for (int i = 1; i < threads; i++)
            pthread_join(th[i], NULL);
        double s = td_ns_to_s(td_now_ns() - t0);
        for (int i = 0; i < threads; i++)
            *sink += args[i].out;
        double gbs = (double)n * sizeof(float) / s / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

/* ---- decode ---- */

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

static int open_be(const mdl_model *m, int threads, enum be_matmul mm, int max_seqs,
                   uint32_t blocks, be_backend **be)
{
    be_options o;
    be_options_defaults(&o, m);
    o.n_threads = threads;
    o.matmul = mm;
    o.max_seqs = max_seqs;
    o.max_batch_tokens = 512;
    o.kv.num_blocks = blocks;
    char err[256] = "";
    int rc = be_open("cpu", m, &o, be, err, sizeof(err));
    if (rc != 0) fprintf(stderr, "bench: backend: %s\n", err);
    return rc;
}

/* B sequences, each prefilled with a prompt of `plen` tokens in one call, then
 * `steps` greedy decode steps of B tokens. Returns decode tokens/s, and the
 * logits of sequence 0 at every step when rec is not NULL ([steps][V]). */
static int bench_batch(const mdl_model *m, int threads, enum be_matmul mm, int B, int plen,
                       int steps, double *tok_s, float *rec)
{
    int V = m->cfg.vocab_size, bs = 16;
    int blocks_per_seq = (plen + steps + bs - 1) / bs;
    be_backend *be = NULL;
    int rc = open_be(m, threads, mm, B, (uint32_t)(B * blocks_per_seq), &be);
    if (rc != 0) return rc;
    int32_t *tables = malloc((size_t)B * blocks_per_seq * sizeof(int32_t));
    const int32_t **tptr = malloc((size_t)B * sizeof(*tptr));
    int32_t *nblk = malloc((size_t)B * sizeof(int32_t));
    int n_max = B * plen > B ? B * plen : B;
    int32_t *tok = malloc((size_t)n_max * sizeof(int32_t)), *pos = malloc((size_t)n_max * 4);
    int32_t *seq = malloc((size_t)n_max * 4), *rows = malloc((size_t)B * 4);
    float *logits = malloc((size_t)B * V * sizeof(float));
    rc = TD_ENOMEM;
    if (!tables || !tptr || !nblk || !tok || !pos || !seq || !rows || !logits) goto out;
    for (int s = 0; s < B; s++) {
        for (int i = 0; i < blocks_per_seq; i++)
            tables[s * blocks_per_seq + i] = s * blocks_per_seq + i;
        tptr[s] = tables + (size_t)s * blocks_per_seq;
        nblk[s] = blocks_per_seq;
    }
    int n = 0;
    for (int s = 0; s < B; s++) {
        for (int i = 0; i < plen; i++) {
            tok[n] = i == 0 ? 1 : (int32_t)((s * 131 + i * 17) % V);
            pos[n] = i;
            seq[n++] = s;
        }
        rows[s] = n - 1;
    }
    be_batch b = {.n_tokens = n,
                  .tokens = tok,
                  .pos = pos,
                  .seq = seq,
                  .n_seqs = B,
                  .block_tables = tptr,
                  .n_blocks = nblk,
                  .n_out = B,
                  .out_rows = rows,
                  .logits = logits};
    if ((rc = be_forward(be, &b)) != 0) goto out;
    int64_t t0 = td_now_ns();
    for (int step = 0; step < steps; step++) {
        if (rec) memcpy(rec + (size_t)step * V, logits, (size_t)V * sizeof(float));
        for (int s = 0; s < B; s++) {
            tok[s] = argmax(logits + (size_t)s * V, V);
            pos[s] = plen + step;
            seq[s] = s;
            rows[s] = s;
        }
        be_batch d = {.n_tokens = B,
                      .tokens = tok,
                      .pos = pos,
                      .seq = seq,
                      .n_seqs = B,
                      .block_tables = tptr,
                      .n_blocks = nblk,
                      .n_out = B,
                      .out_rows = rows,
                      .logits = logits};
        if ((rc = be_forward(be, &d)) != 0) goto out;
    }
    *tok_s = (double)B * steps / td_ns_to_s(td_now_ns() - t0);
    rc = 0;
out:
    be_close(be);
    free(tables);
    free(tptr);
    free(nblk);
    free(tok);
    free(pos);
    free(seq);
    free(rows);
    free(logits);
    return rc;
}

/* Prompt of n tokens in one forward; tokens/s. */
static int bench_prefill(const mdl_model *m, int threads, enum be_matmul mm, int n, double *tok_s)
{
    be_backend *be = NULL;
    int rc = open_be(m, threads, mm, 1, (uint32_t)((n + 15) / 16), &be);
    if (rc != 0) return rc;
    int32_t *tok = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4), *seq = calloc((size_t)n, 4);
    int32_t *table = malloc((size_t)((n + 15) / 16) * 4);
    float *logits = malloc((size_t)m->cfg.vocab_size * sizeof(float));
    rc = TD_ENOMEM;
    if (!tok || !pos || !seq || !table || !logits) goto out;
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)((i * 31 + 1) % m->cfg.vocab_size);
        pos[i] = i;
    }
    for (int i = 0; i < (n + 15) / 16; i++)
        table[i] = i;
    const int32_t *tptr[1] = {table};
    int32_t nb = (n + 15) / 16, last = n - 1;
    be_batch b = {.n_tokens = n,
                  .tokens = tok,
                  .pos = pos,
                  .seq = seq,
                  .n_seqs = 1,
                  .block_tables = tptr,
                  .n_blocks = &nb,
                  .n_out = 1,
                  .out_rows = &last,
                  .logits = logits};
    double best = 0;
    for (int rep = 0; rep < 2; rep++) {
        int64_t t0 = td_now_ns();
        if ((rc = be_forward(be, &b)) != 0) goto out;
        double r = n / td_ns_to_s(td_now_ns() - t0);
        if (r > best) best = r;
    }
    *tok_s = best;
    rc = 0;
out:
    be_close(be);
    free(tok);
    free(pos);
    free(seq);
    free(table);
    free(logits);
    return rc;
}

/* Is sequence 0 bit-identical alone and inside a batch of 8? */
static int bench_invariant(const mdl_model *m, enum be_matmul mm, int *same)
{
    int V = m->cfg.vocab_size, steps = 8;
    float *a = malloc((size_t)steps * V * sizeof(float)), *b = malloc((size_t)steps * V * 4);
    double r;
    int rc = TD_ENOMEM;
    if (a && b && (rc = bench_batch(m, 1, mm, 1, 8, steps, &r, a)) == 0 &&
        (rc = bench_batch(m, 1, mm, 8, 8, steps, &r, b)) == 0)
        *same = memcmp(a, b, (size_t)steps * V * sizeof(float)) == 0;
    free(a);
    free(b);
    return rc;
}

int gen_bench_run(const mdl_model *given)
{
    mdl_model *own = NULL;
    const mdl_model *m = given;
    if (!m) {
        mdl_config c;
        mdl_config_defaults(&c);
        snprintf(c.arch, sizeof(c.arch), "random-15M");
        c.dim = 288;
        c.hidden_dim = 768;
        c.n_layers = 6;
        c.n_heads = 6;
        c.n_kv_heads = 6;
        c.vocab_size = 32000;
        c.max_seq_len = 512;
        c.tied_output = 1; /* like stories15M: the classifier is the embedding */
        c.rope_layout = MDL_ROPE_ADJACENT;
        int rc = mdl_create_random(&c, 42, 0.05f, &own);
        if (rc != 0) return rc;
        m = own;
    }
    const mdl_config *mc = &m->cfg;
    int rc = 0;
    printf("model: %s dim=%d hidden=%d layers=%d heads=%d kv_heads=%d vocab=%d\n", mc->arch,
           mc->dim, mc->hidden_dim, mc->n_layers, mc->n_heads, mc->n_kv_heads, mc->vocab_size);
    printf("weights read per token: %.1f MB (f32)\n", (double)m->weight_bytes / 1e6);

    /* Memory bandwidth: a 1 GB array, vectorised sum. */
    size_t n = (size_t)1 << 28; /* floats = 1 GiB */
    float *arr = malloc(n * sizeof(float));
    double bw1 = 0, bw2 = 0;
    float sink = 0;
    if (arr) {
        for (size_t i = 0; i < n; i++)
            arr[i] = (float)(i & 7);
        bw1 = bench_mem_read(arr, n, 1, &sink);
        bw2 = bench_mem_read(arr, n, 2, &sink);
        free(arr);
        printf("memory read: %.1f GB/s (1 thread), %.1f GB/s (2 threads)  [sink %g]\n", bw1, bw2,
               (double)sink);
    }

    int steps = mc->max_seq_len - 8 < 200 ? mc->max_seq_len - 8 : 200;
    double t1 = 0, t2 = 0, tb = 0;
    if ((rc = bench_batch(m, 1, BE_MATMUL_DETERMINISTIC, 1, 1, steps, &t1, NULL)) ||
        (rc = bench_batch(m, 2, BE_MATMUL_DETERMINISTIC, 1, 1, steps, &t2, NULL)) ||
        (rc = bench_batch(m, 1, BE_MATMUL_BLAS, 1, 1, steps, &tb, NULL)))
        goto out;
    double gb = (double)m->weight_bytes / 1e9;
    printf("decode, 1 sequence, %d steps from BOS:\n", steps);
    printf("  deterministic 1 thread : %7.1f tok/s  %5.1f GB/s of weights (%.0f%% of read bw)"
           "  ratio vs llama2.c-style %.0f tok/s: %.2fx\n",
           t1, t1 * gb, bw1 > 0 ? 100 * t1 * gb / bw1 : 0, BENCH_REF_TOK_S, t1 / BENCH_REF_TOK_S);
    printf("  deterministic 2 threads: %7.1f tok/s  %5.1f GB/s of weights (%.0f%% of read bw)\n",
           t2, t2 * gb, bw2 > 0 ? 100 * t2 * gb / bw2 : 0);
    printf("  openblas      1 thread : %7.1f tok/s  %5.1f GB/s of weights\n", tb, tb * gb);

    printf("batched decode (prompt 16, 32 steps), tokens/s:\n");
    printf("  %-6s %14s %14s %14s\n", "batch", "det 1 thread", "det 2 threads", "blas 1 thread");
    const int batches[3] = {1, 8, 32};
    for (int i = 0; i < 3; i++) {
        double d1, d2, b1;
        if ((rc = bench_batch(m, 1, BE_MATMUL_DETERMINISTIC, batches[i], 16, 32, &d1, NULL)) ||
            (rc = bench_batch(m, 2, BE_MATMUL_DETERMINISTIC, batches[i], 16, 32, &d2, NULL)) ||
            (rc = bench_batch(m, 1, BE_MATMUL_BLAS, batches[i], 16, 32, &b1, NULL)))
            goto out;
        printf("  %-6d %14.1f %14.1f %14.1f\n", batches[i], d1, d2, b1);
    }
    int plen = mc->max_seq_len < 128 ? mc->max_seq_len : 128;
    double pd, pb;
    if ((rc = bench_prefill(m, 1, BE_MATMUL_DETERMINISTIC, plen, &pd)) ||
        (rc = bench_prefill(m, 1, BE_MATMUL_BLAS, plen, &pb)))
        goto out;
    printf("prefill of %d tokens, 1 thread: deterministic %.1f tok/s, openblas %.1f tok/s\n", plen,
           pd, pb);
    int same_det = 0, same_blas = 0;
    if ((rc = bench_invariant(m, BE_MATMUL_DETERMINISTIC, &same_det)) ||
        (rc = bench_invariant(m, BE_MATMUL_BLAS, &same_blas)))
        goto out;
    printf("batch invariance (seq alone vs in batch of 8, logits bit-identical): "
           "deterministic %s, openblas %s\n",
           same_det ? "yes" : "NO", same_blas ? "yes" : "no");
out:
    mdl_free(own);
    if (rc != 0) fprintf(stderr, "bench failed: %s\n", td_strerror(rc));
    return rc;
}
