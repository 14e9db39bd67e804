#include "engine/cli/gen_bench.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/err.h"
#include "engine/backend/backend.h"
#include "engine/backend/cpu/cpu_kernels.h"

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
/* noipa: no copy of it specialised to one call's constant length (GCC then
 * warned about its tail loop). */
__attribute__((target("avx2"), noipa)) static float bench_sum_avx2(const float *a, size_t n)
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

/* What a decode step's attention reads, read alone: a pool laid out as the
 * CPU backend's (per layer, `seqs` sequences of `bps` contiguous blocks,
 * each a K half then a V half of half_floats floats), summed in the order
 * the attention of one thread walks it (per layer and sequence, the K
 * halves of its blocks, then their V halves), and the same bytes as one
 * sequential array. Best of 5 in ms each, every pass after a 64 MiB read
 * that leaves none of the pool in the cache (as a step finds it: a long
 * context's K and V pass the last-level cache). The walk's ratio to the
 * sequential read is the cost of the block layout's pattern on this host,
 * which the 1 GB read bandwidth above does not show. */
static int bench_kv_walk(int layers, int seqs, int bps, size_t half_floats, double *walk_ms,
                         double *flat_ms, float *sink)
{
    size_t blocks = (size_t)layers * seqs * bps, n = blocks * 2 * half_floats;
    size_t junk_n = ((size_t)64 << 20) / sizeof(float);
    float *pool = malloc(n * sizeof(float)), *junk = malloc(junk_n * sizeof(float));
    if (!pool || !junk) {
        free(pool);
        free(junk);
        return TD_ENOMEM;
    }
    for (size_t i = 0; i < n; i++)
        pool[i] = (float)(i & 1023);
    for (size_t i = 0; i < junk_n; i++)
        junk[i] = 1.0f;
    *walk_ms = *flat_ms = 1e30;
    for (int rep = 0; rep < 5; rep++)
        for (int flat = 0; flat < 2; flat++) {
            *sink += bench_sum(junk, junk_n);
            int64_t t0 = td_now_ns();
            if (flat) {
                *sink += bench_sum(pool, n);
            } else {
                for (size_t ls = 0; ls < (size_t)layers * seqs; ls++)
                    for (int half = 0; half < 2; half++)
                        for (int b = 0; b < bps; b++)
                            *sink += bench_sum(pool + ((ls * bps + b) * 2 + half) * half_floats,
                                               half_floats);
            }
            double ms = td_ns_to_s(td_now_ns() - t0) * 1e3;
            double *best = flat ? flat_ms : walk_ms;
            if (ms < *best) *best = ms;
        }
    free(pool);
    free(junk);
    return 0;
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

/* One run of a few ms of the FMA loop with `bits`-wide vectors (512 or 256):
 * GFLOP/s, 0 when the CPU lacks them (ck_fma_gflops: 12 independent chains,
 * thread CPU time). */
static double bench_fma_once(int bits, float *sink)
{
    return ck_fma_gflops(bits, 1000000, sink);
}

/* Best of 5 runs of bench_fma_once. */
static double bench_fma_peak(int bits, float *sink)
{
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double gf = bench_fma_once(bits, sink);
        if (gf > best) best = gf;
    }
    return best;
}

/* Flops of the matmuls of one token's forward, without the classifier
 * (counted per output row: flops_out). */
static double bench_flops_layers(const mdl_model *m)
{
    const mdl_config *c = &m->cfg;
    double qd = (double)c->n_heads * c->head_dim, kvd = (double)c->n_kv_heads * c->head_dim;
    double per = qd * c->dim + 2 * kvd * c->dim + c->dim * qd + 3.0 * c->hidden_dim * c->dim;
    return 2 * per * c->n_layers;
}

static double bench_flops_out(const mdl_model *m)
{
    return 2.0 * m->cfg.vocab_size * m->cfg.dim;
}

static int bench_all_f32(const mdl_model *m)
{
    int ok = m->tok_embed_mat.dtype == MDL_DTYPE_F32 && m->output_mat.dtype == MDL_DTYPE_F32;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const mdl_layer_mats *L = &m->layers[l].mat;
        ok &= L->wq.dtype == MDL_DTYPE_F32 && L->wk.dtype == MDL_DTYPE_F32 &&
              L->wv.dtype == MDL_DTYPE_F32 && L->wo.dtype == MDL_DTYPE_F32 &&
              L->w_gate.dtype == MDL_DTYPE_F32 && L->w_up.dtype == MDL_DTYPE_F32 &&
              L->w_down.dtype == MDL_DTYPE_F32;
    }
    return ok;
}

/* The CPU backend's matmul kernel alone, 1 thread, on every layer matrix of
 * the model with T rows of x, thread CPU time, BENCH_KERNEL_PASSES passes.
 * On a shared host the kernel's rate moves between passes (by up to 40% here,
 * while the FMA loop, which touches no memory, barely moves), so each pass is
 * timed between two runs of the FMA loop at `bits` (their results go to
 * *sink) and divided by their mean: *gflops is the best pass, ratio[0..2]
 * the median, lowest and highest fraction of the peak measured around it. */
#define BENCH_KERNEL_PASSES 15

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts r[0..n) and writes its median, lowest and highest to out[0..2]. */
static void bench_spread(double *r, int n, double out[3])
{
    qsort(r, (size_t)n, sizeof(double), cmp_double);
    out[0] = r[n / 2];
    out[1] = r[0];
    out[2] = r[n - 1];
}

static int bench_matmul_only(const mdl_model *m, int T, int bits, float *sink, double *gflops,
                             double ratio[3])
{
    const mdl_config *c = &m->cfg;
    int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    int kmax = c->hidden_dim > qd ? c->hidden_dim : qd, nmax = c->hidden_dim;
    if (c->dim > kmax) kmax = c->dim;
    if (c->dim > nmax) nmax = c->dim;
    if (qd > nmax) nmax = qd;
    /* 64-byte aligned, as the backend's activation buffers are (with a
     * malloc'd x half of the 32-byte loads straddled two cache lines) */
    size_t xb = ((size_t)T * kmax * sizeof(float) + 63) / 64 * 64;
    size_t ob = ((size_t)T * nmax * sizeof(float) + 63) / 64 * 64;
    float *x = aligned_alloc(64, xb);
    float *out = aligned_alloc(64, ob);
    if (!x || !out) {
        free(x);
        free(out);
        return TD_ENOMEM;
    }
    for (size_t i = 0; i < (size_t)T * kmax; i++)
        x[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
    ck_init();
    double best = 0, r[BENCH_KERNEL_PASSES];
    for (int rep = 0; rep < BENCH_KERNEL_PASSES; rep++) {
        double p0 = bench_fma_once(bits, sink);
        int64_t t0 = td_thread_cpu_ns();
        for (int l = 0; l < c->n_layers; l++) {
            const mdl_layer_mats *L = &m->layers[l].mat;
            const mdl_mat *mats[7] = {&L->wq,     &L->wk,   &L->wv,    &L->wo,
                                      &L->w_gate, &L->w_up, &L->w_down};
            int N[7] = {qd, kvd, kvd, c->dim, c->hidden_dim, c->hidden_dim, c->dim};
            int K[7] = {c->dim, c->dim, c->dim, qd, c->dim, c->dim, c->hidden_dim};
            for (int i = 0; i < 7; i++)
                ck_matmul(out, N[i], x, mats[i]->data, mats[i]->dtype, NULL, T, K[i], 0, N[i]);
        }
        double sec = td_ns_to_s(td_thread_cpu_ns() - t0);
        double p1 = bench_fma_once(bits, sink);
        double gf = bench_flops_layers(m) * T / sec / 1e9;
        if (gf > best) best = gf;
        r[rep] = p0 + p1 > 0 ? gf / ((p0 + p1) / 2) : 0;
    }
    bench_spread(r, BENCH_KERNEL_PASSES, ratio);
    free(x);
    free(out);
    *gflops = best;
    return 0;
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int open_be(const mdl_model *m, int threads, enum be_matmul mm, int max_seqs, int max_tokens,
                   uint32_t blocks, enum kv_dtype kv, be_backend **be);

/* ---- an in-run llama2.c-style reference decoder ----
 * The structure of llama2.c's run.c (one sequence, dense KV cache, a matmul
 * that is a plain double loop), its matmul compiled like `make runfast` with
 * -march=native (-Ofast, AVX2/FMA), so the ratio printed below compares both
 * decoders on the same machine at the same moment. */

#if defined(__x86_64__)
__attribute__((optimize("Ofast"), target("avx2,fma")))
#else
__attribute__((optimize("Ofast")))
#endif
static void
l2c_matmul(float *xout, const float *x, const float *w, int n, int d)
{
    for (int i = 0; i < d; i++) {
        float val = 0.0f;
        for (int j = 0; j < n; j++)
            val += w[(size_t)i * n + j] * x[j];
        xout[i] = val;
    }
}

static void l2c_rmsnorm(float *o, const float *x, const float *w, int n, float eps)
{
    float ss = 0.0f;
    for (int j = 0; j < n; j++)
        ss += x[j] * x[j];
    ss = 1.0f / sqrtf(ss / (float)n + eps);
    for (int j = 0; j < n; j++)
        o[j] = w[j] * (ss * x[j]);
}

/* State of the reference decoder for one sequence of up to max_pos tokens. */
typedef struct l2c_state {
    const mdl_model *m;
    int max_pos;
    float *x, *xb, *xb2, *q, *hb, *hb2, *att, *logits, *kc, *vc;
} l2c_state;

static void l2c_free(l2c_state *s)
{
    free(s->x);
    free(s->xb);
    free(s->xb2);
    free(s->q);
    free(s->hb);
    free(s->hb2);
    free(s->att);
    free(s->logits);
    free(s->kc);
    free(s->vc);
}

static int l2c_init(l2c_state *s, const mdl_model *m, int max_pos)
{
    const mdl_config *c = &m->cfg;
    int D = c->dim, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    size_t cache = (size_t)c->n_layers * (size_t)max_pos * kvd;
    memset(s, 0, sizeof(*s));
    s->m = m;
    s->max_pos = max_pos;
    s->x = malloc((size_t)D * 4);
    s->xb = malloc((size_t)(D > qd ? D : qd) * 4);
    s->xb2 = malloc((size_t)D * 4);
    s->q = malloc((size_t)qd * 4);
    s->hb = malloc((size_t)c->hidden_dim * 4);
    s->hb2 = malloc((size_t)c->hidden_dim * 4);
    s->att = malloc((size_t)max_pos * 4);
    s->logits = malloc((size_t)c->vocab_size * 4);
    s->kc = malloc(cache * 4);
    s->vc = malloc(cache * 4);
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->hb || !s->hb2 || !s->att || !s->logits ||
        !s->kc || !s->vc) {
        l2c_free(s);
        return TD_ENOMEM;
    }
    return 0;
}

/* One token at position pos (< max_pos); returns the greedy next token. */
static int l2c_step(l2c_state *s, int token, int pos)
{
    const mdl_model *m = s->m;
    const mdl_config *c = &m->cfg;
    int D = c->dim, H = c->hidden_dim, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    int qd = nh * hd, kvd = nkv * hd, L = c->n_layers, P = s->max_pos;
    float *x = s->x, *xb = s->xb, *xb2 = s->xb2, *q = s->q, *hb = s->hb, *hb2 = s->hb2;
    memcpy(x, m->tok_embed + (size_t)token * D, (size_t)D * 4);
    for (int l = 0; l < L; l++) {
        const mdl_layer *ly = &m->layers[l];
        float *k = s->kc + ((size_t)l * P + pos) * kvd;
        float *v = s->vc + ((size_t)l * P + pos) * kvd;
        l2c_rmsnorm(xb, x, ly->attn_norm, D, c->norm_eps);
        l2c_matmul(q, xb, ly->wq, D, qd);
        l2c_matmul(k, xb, ly->wk, D, kvd);
        l2c_matmul(v, xb, ly->wv, D, kvd);
        for (int i = 0; i < qd; i += 2) {
            float freq = 1.0f / powf(c->rope_theta, (float)(i % hd) / (float)hd);
            float fcr = cosf(pos * freq), fci = sinf(pos * freq);
            for (int r = 0; r < (i < kvd ? 2 : 1); r++) {
                float *vec = r == 0 ? q : k;
                float v0 = vec[i], v1 = vec[i + 1];
                vec[i] = v0 * fcr - v1 * fci;
                vec[i + 1] = v0 * fci + v1 * fcr;
            }
        }
        for (int h = 0; h < nh; h++) {
            const float *qh = q + h * hd;
            int kh = h / (nh / nkv);
            float mx = -INFINITY, sum = 0.0f, *att = s->att;
            for (int t = 0; t <= pos; t++) {
                const float *kt = s->kc + ((size_t)l * P + t) * kvd + kh * hd;
                float sc = 0.0f;
                for (int i = 0; i < hd; i++)
                    sc += qh[i] * kt[i];
                att[t] = sc / sqrtf((float)hd);
                if (att[t] > mx) mx = att[t];
            }
            for (int t = 0; t <= pos; t++)
                sum += (att[t] = expf(att[t] - mx));
            float *o = xb + h * hd;
            memset(o, 0, (size_t)hd * 4);
            for (int t = 0; t <= pos; t++) {
                const float *vt = s->vc + ((size_t)l * P + t) * kvd + kh * hd;
                float a = att[t] / sum;
                for (int i = 0; i < hd; i++)
                    o[i] += a * vt[i];
            }
        }
        l2c_matmul(xb2, xb, ly->wo, qd, D);
        for (int i = 0; i < D; i++)
            x[i] += xb2[i];
        l2c_rmsnorm(xb, x, ly->ffn_norm, D, c->norm_eps);
        l2c_matmul(hb, xb, ly->w_gate, D, H);
        l2c_matmul(hb2, xb, ly->w_up, D, H);
        for (int i = 0; i < H; i++)
            hb[i] = hb[i] * (1.0f / (1.0f + expf(-hb[i]))) * hb2[i];
        l2c_matmul(xb2, hb, ly->w_down, H, D);
        for (int i = 0; i < D; i++)
            x[i] += xb2[i];
    }
    l2c_rmsnorm(x, x, m->final_norm, D, c->norm_eps);
    l2c_matmul(s->logits, x, m->output, D, c->vocab_size);
    return argmax(s->logits, c->vocab_size);
}

/* Our single-thread deterministic decode and the reference decoder, stepped
 * alternately at the same positions so that both see the same machine load;
 * tokens/s from each one's median step time. */
static int bench_pair(const mdl_model *m, int steps, double *ours, double *ref)
{
    l2c_state s;
    /* The reference reads F32 weights: with F16/BF16 ones kept as stored it
     * is skipped (*ref 0) and only ours is timed. */
    int with_ref = bench_all_f32(m);
    int rc = l2c_init(&s, m, with_ref ? steps : 1);
    if (rc != 0) return rc;
    be_backend *be = NULL;
    int blocks = (steps + 15) / 16, V = m->cfg.vocab_size;
    int64_t *ns_a = malloc((size_t)steps * sizeof(int64_t));
    int64_t *ns_b = malloc((size_t)steps * sizeof(int64_t));
    int32_t *table = malloc((size_t)blocks * sizeof(int32_t));
    float *logits = malloc((size_t)V * sizeof(float));
    rc = TD_ENOMEM;
    if (!ns_a || !ns_b || !table || !logits) goto out;
    if ((rc = open_be(m, 1, BE_MATMUL_DETERMINISTIC, 1, 0, (uint32_t)blocks, KV_DTYPE_F32, &be)) !=
        0)
        goto out;
    for (int i = 0; i < blocks; i++)
        table[i] = i;
    const int32_t *tptr[1] = {table};
    int32_t nb = blocks, seq = 0, row = 0, tok_a = 1, tok_b = 1;
    for (int p = 0; p < steps; p++) {
        int64_t t0 = td_now_ns();
        int32_t pos = p;
        be_batch b = {.n_tokens = 1,
                      .tokens = &tok_a,
                      .pos = &pos,
                      .seq = &seq,
                      .n_seqs = 1,
                      .block_tables = tptr,
                      .n_blocks = &nb,
                      .n_out = 1,
                      .out_rows = &row,
                      .logits = logits};
        if ((rc = be_forward(be, &b)) != 0) goto out;
        tok_a = argmax(logits, V);
        int64_t t1 = td_now_ns();
        if (with_ref) tok_b = l2c_step(&s, tok_b, p);
        ns_a[p] = t1 - t0;
        ns_b[p] = td_now_ns() - t1;
    }
    qsort(ns_a, (size_t)steps, sizeof(int64_t), cmp_i64);
    qsort(ns_b, (size_t)steps, sizeof(int64_t), cmp_i64);
    *ours = 1.0 / td_ns_to_s(ns_a[steps / 2]);
    *ref = with_ref ? 1.0 / td_ns_to_s(ns_b[steps / 2]) : 0;
    rc = 0;
out:
    be_close(be);
    l2c_free(&s);
    free(ns_a);
    free(ns_b);
    free(table);
    free(logits);
    return rc;
}

/* ---- decode ---- */

/* max_tokens: the largest forward the caller makes (at least 512). */
static int open_be(const mdl_model *m, int threads, enum be_matmul mm, int max_seqs, int max_tokens,
                   uint32_t blocks, enum kv_dtype kv, be_backend **be)
{
    be_options o;
    be_options_defaults(&o, m);
    o.n_threads = threads;
    o.matmul = mm;
    o.max_seqs = max_seqs;
    o.max_batch_tokens = max_tokens > 512 ? max_tokens : 512;
    o.kv.num_blocks = blocks;
    o.kv.dtype = kv;
    char err[256] = "";
    int rc = be_open("cpu", m, &o, be, err, sizeof(err));
    if (rc != 0) fprintf(stderr, "bench: backend: %s\n", err);
    return rc;
}

/* B sequences, each prefilled with a prompt of `plen` tokens in one call, then
 * `steps` greedy decode steps of B tokens. Returns decode tokens/s from the
 * median step time (robust to the preemptions of a shared machine), and the
 * logits of sequence 0 at every step when rec is not NULL ([steps][V]). */
static int bench_batch_kv(const mdl_model *m, int threads, enum be_matmul mm, int B, int plen,
                          int steps, enum kv_dtype kv, double *tok_s, float *rec)
{
    int V = m->cfg.vocab_size, bs = 16;
    int blocks_per_seq = (plen + steps + bs - 1) / bs;
    be_backend *be = NULL;
    int rc = open_be(m, threads, mm, B, B * plen, (uint32_t)(B * blocks_per_seq), kv, &be);
    if (rc != 0) return rc;
    int32_t *tables = malloc((size_t)B * blocks_per_seq * sizeof(int32_t));
    const int32_t **tptr = malloc((size_t)B * sizeof(*tptr));
    int32_t *nblk = malloc((size_t)B * sizeof(int32_t));
    int n_max = B * plen > B ? B * plen : B;
    int32_t *tok = malloc((size_t)n_max * sizeof(int32_t)), *pos = malloc((size_t)n_max * 4);
    int32_t *seq = malloc((size_t)n_max * 4), *rows = malloc((size_t)B * 4);
    float *logits = malloc((size_t)B * V * sizeof(float));
    int64_t *step_ns = malloc((size_t)steps * sizeof(int64_t));
    rc = TD_ENOMEM;
    if (!tables || !tptr || !nblk || !tok || !pos || !seq || !rows || !logits || !step_ns) goto out;
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
    for (int step = 0; step < steps; step++) {
        int64_t t0 = td_now_ns();
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
        step_ns[step] = td_now_ns() - t0;
    }
    qsort(step_ns, (size_t)steps, sizeof(int64_t), cmp_i64);
    *tok_s = (double)B / td_ns_to_s(step_ns[steps / 2]);
    rc = 0;
out:
    free(step_ns);
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

static int bench_batch(const mdl_model *m, int threads, enum be_matmul mm, int B, int plen,
                       int steps, double *tok_s, float *rec)
{
    return bench_batch_kv(m, threads, mm, B, plen, steps, KV_DTYPE_F32, tok_s, rec);
}

/* Prompt of n tokens in one forward; tokens/s of the best pass. With ratio
 * (else NULL), each pass is also timed between two runs of the FMA loop at
 * `bits` (their results go to *sink), as bench_matmul_only's are, and its
 * flops (flops_tok per token) divided by their mean: ratio[0..2] the median,
 * lowest and highest fraction of the peak measured around a pass. */
static int bench_prefill(const mdl_model *m, int threads, enum be_matmul mm, int n, double *tok_s,
                         int bits, float *sink, double flops_tok, double ratio[3])
{
    be_backend *be = NULL;
    int rc = open_be(m, threads, mm, 1, n, (uint32_t)((n + 15) / 16), KV_DTYPE_F32, &be);
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
    /* Best of several: a short prompt's forward is tens of ms, which one time
     * slice lost on a shared host would dominate. */
    double best = 0, pr[10];
    int reps = n <= 512 ? 10 : 2;
    for (int rep = 0; rep < reps; rep++) {
        double p0 = ratio ? bench_fma_once(bits, sink) : 0;
        int64_t t0 = td_now_ns();
        if ((rc = be_forward(be, &b)) != 0) goto out;
        double r = n / td_ns_to_s(td_now_ns() - t0);
        double p1 = ratio ? bench_fma_once(bits, sink) : 0;
        if (r > best) best = r;
        pr[rep] = p0 + p1 > 0 ? r * flops_tok / 1e9 / ((p0 + p1) / 2) : 0;
    }
    *tok_s = best;
    if (ratio) bench_spread(pr, reps, ratio);
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
    printf("weights read per token: %.1f MB (as stored: %s)\n", (double)m->weight_bytes / 1e6,
           bench_all_f32(m) ? "f32" : "f16/bf16 matrices kept, widened in the matmul");
    ck_init();
    float fsink = 0;
    double peak512 = bench_fma_peak(512, &fsink), peak256 = bench_fma_peak(256, &fsink);
    double peak = peak512 > peak256 ? peak512 : peak256;
    printf("FMA peak, 1 thread, fp32: %.1f GFLOP/s (512-bit loop), %.1f GFLOP/s (256-bit loop); "
           "matmul kernel: %s",
           peak512, peak256, ck_variant());
    if (ck_fma512_ratio() > 0)
        printf(" (start-up probe: 512-bit FMAs at %.2fx the 256-bit rate; AVX-512 for every shape "
               "from 1.5x)",
               ck_fma512_ratio());
    printf("  [sink %g]\n", (double)fsink);

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
    double t1 = 0, t2 = 0, tb = 0, tl = 0;
    if ((rc = bench_pair(m, steps, &t1, &tl)) ||
        (rc = bench_batch(m, 2, BE_MATMUL_DETERMINISTIC, 1, 1, steps, &t2, NULL)) ||
        (rc = bench_batch(m, 1, BE_MATMUL_BLAS, 1, 1, steps, &tb, NULL)))
        goto out;
    double gb = (double)m->weight_bytes / 1e9;
    printf("decode, 1 sequence, %d steps from BOS (tokens/s from the median step):\n", steps);
    printf("  limit from the weight bytes: %.1f tok/s at 1-thread read bw, %.1f at 2 threads\n",
           gb > 0 ? bw1 / gb : 0, gb > 0 ? bw2 / gb : 0);
    printf("  deterministic 1 thread : %7.1f tok/s  %5.1f GB/s of weights (%.0f%% of read bw)\n",
           t1, t1 * gb, bw1 > 0 ? 100 * t1 * gb / bw1 : 0);
    if (tl > 0)
        printf("  llama2.c-style, same run : %7.1f tok/s  %5.1f GB/s  -> ratio %.2fx\n", tl,
               tl * gb, t1 / tl);
    else
        printf("  llama2.c-style, same run : skipped (it reads f32 weights)\n");
    if (own)
        printf("  ratio vs the %.0f tok/s measured for llama2.c-style on an idle machine "
               "(NOTES.md): %.2fx\n",
               BENCH_REF_TOK_S, t1 / BENCH_REF_TOK_S);
    printf("  deterministic 2 threads: %7.1f tok/s  %5.1f GB/s of weights (%.0f%% of read bw)\n",
           t2, t2 * gb, bw2 > 0 ? 100 * t2 * gb / bw2 : 0);
    printf("  openblas      1 thread : %7.1f tok/s  %5.1f GB/s of weights%s\n", tb, tb * gb,
           bench_all_f32(m) ? "" : " (f16/bf16: runs the deterministic kernel)");

    double fl = bench_flops_layers(m), fo = bench_flops_out(m);
    printf("batched decode (prompt 16, 32 steps), tokens/s from the median step; %% of the FMA "
           "peak\n(1 thread: %.1f GFLOP/s; 2 threads: twice that) counting the matmul flops "
           "(%.1f MFLOP/token):\n",
           peak, (fl + fo) / 1e6);
    printf("  %-6s %22s %22s %14s\n", "batch", "det 1 thread", "det 2 threads", "blas 1 thread");
    const int batches[3] = {1, 8, 32};
    for (int i = 0; i < 3; i++) {
        double d1, d2, b1;
        if ((rc = bench_batch(m, 1, BE_MATMUL_DETERMINISTIC, batches[i], 16, 32, &d1, NULL)) ||
            (rc = bench_batch(m, 2, BE_MATMUL_DETERMINISTIC, batches[i], 16, 32, &d2, NULL)) ||
            (rc = bench_batch(m, 1, BE_MATMUL_BLAS, batches[i], 16, 32, &b1, NULL)))
            goto out;
        double p1 = peak > 0 ? 100 * d1 * (fl + fo) / 1e9 / peak : 0;
        double p2 = peak > 0 ? 100 * d2 * (fl + fo) / 1e9 / (2 * peak) : 0;
        printf("  %-6d %12.1f (%4.1f%%) %12.1f (%4.1f%%) %14.1f\n", batches[i], d1, p1, d2, p2, b1);
    }
    /* The same at the contexts a served decode batch holds: attention
     * reads every position's K and V, which the short prompt above hides.
     * 192 fits every test model; 1,024 where the model's context allows
     * (the 4k shapes), where the K/V reads outweigh the weights'. Each with
     * the KV cache in f32 and in f16 (half the bytes, widened in the
     * attention kernels' registers). */
    const int lctxs[2] = {mc->max_seq_len - 32 < 192 ? mc->max_seq_len - 32 : 192, 1024};
    for (int i = 0; i < 2; i++) {
        int lctx = lctxs[i];
        if (lctx < 16 || (i > 0 && lctx + 32 > mc->max_seq_len)) continue;
        double d16, h16;
        if ((rc = bench_batch(m, 1, BE_MATMUL_DETERMINISTIC, 16, lctx, 32, &d16, NULL)) ||
            (rc = bench_batch_kv(m, 1, BE_MATMUL_DETERMINISTIC, 16, lctx, 32, KV_DTYPE_F16, &h16,
                                 NULL)))
            goto out;
        printf("batched decode at a long context (prompt %d, 32 steps), batch 16, det 1 thread: "
               "%.1f tok/s (%.1f%% of the FMA peak in the matmul flops); with an f16 KV cache "
               "%.1f tok/s (%.2fx)\n",
               lctx, d16, peak > 0 ? 100 * d16 * (fl + fo) / 1e9 / peak : 0, h16,
               d16 > 0 ? h16 / d16 : 0);
    }
    /* Batch-1 decode after a long prompt (3,000 tokens, where the context
     * allows): the step's time over that at a 16-token context is what its
     * attention adds, mostly reading K and V, printed beside the same bytes
     * read alone in the same order (bench_kv_walk). */
    int dctx = 3000;
    if (dctx + 32 <= mc->max_seq_len) {
        double s16, sl, walk, flat;
        int bps = (dctx + 32 + 15) / 16;
        size_t half = (size_t)16 * mc->n_kv_heads * mc->head_dim;
        if ((rc = bench_batch(m, 1, BE_MATMUL_DETERMINISTIC, 1, 16, 32, &s16, NULL)) ||
            (rc = bench_batch(m, 1, BE_MATMUL_DETERMINISTIC, 1, dctx, 32, &sl, NULL)) ||
            (rc = bench_kv_walk(mc->n_layers, 1, bps, half, &walk, &flat, &fsink)))
            goto out;
        double mb = (double)mc->n_layers * bps * 2 * half * sizeof(float) / 1e6;
        double extra = 1e3 / sl - 1e3 / s16;
        printf("decode of 1 sequence after %d tokens, det 1 thread, f32 KV: %.2f ms per step "
               "(%.2f at 16 tokens; %.2f ms more, for %.1f MB of K and V: %.1f GB/s); the same "
               "blocks read alone in the same order: %.2f ms (%.1f GB/s), as one array %.2f ms "
               "(%.1f GB/s)\n",
               dctx, 1e3 / sl, 1e3 / s16, extra, mb, extra > 0 ? mb / extra : 0, walk, mb / walk,
               flat, mb / flat);
    }
    int plen = mc->max_seq_len < 128 ? mc->max_seq_len : 128;
    int bits = peak512 > peak256 ? 512 : 256;
    double pf = fl + fo / plen; /* one classifier row per prompt */
    double pd, pb, rp[3];
    if ((rc = bench_prefill(m, 1, BE_MATMUL_DETERMINISTIC, plen, &pd, bits, &fsink, pf, rp)) ||
        (rc = bench_prefill(m, 1, BE_MATMUL_BLAS, plen, &pb, 0, NULL, 0, NULL)))
        goto out;
    printf("prefill of %d tokens, 1 thread: deterministic %.1f tok/s (%.1f%% of the FMA peak), "
           "openblas %.1f tok/s (%.1f%%); deterministic per pass %.1f%% of the peak around it "
           "(median of 10; %.1f-%.1f%%)\n",
           plen, pd, peak > 0 ? 100 * pd * pf / 1e9 / peak : 0, pb,
           peak > 0 ? 100 * pb * pf / 1e9 / peak : 0, 100 * rp[0], 100 * rp[1], 100 * rp[2]);
    /* A long prompt, where the model's context allows (the 4k shapes): each
     * token's attention reads its whole prefix, about 14.5 GFLOP against
     * the matmuls' 24.5 at 2,048 tokens on the 15m shape, and about half
     * the time (docs/cpu-throughput.md, eleventh round). */
    int llen = 2048;
    if (mc->max_seq_len >= llen) {
        double pl;
        if ((rc = bench_prefill(m, 1, BE_MATMUL_DETERMINISTIC, llen, &pl, 0, NULL, 0, NULL)))
            goto out;
        printf("prefill of %d tokens, 1 thread: deterministic %.1f tok/s (%.0f ms)\n", llen, pl,
               pl > 0 ? 1e3 * llen / pl : 0);
    }
    const int rows[2] = {32, plen};
    double gk[2], rk[2][3];
    for (int i = 0; i < 2; i++)
        if ((rc = bench_matmul_only(m, rows[i], bits, &fsink, &gk[i], rk[i]))) goto out;
    printf("matmul kernel alone (thread CPU time), layer matrices, 1 thread, %d passes, each "
           "against the FMA loop run just before and after it  [sink %g]:\n",
           BENCH_KERNEL_PASSES, (double)fsink);
    for (int i = 0; i < 2; i++)
        printf("  %3d rows: best %.1f GFLOP/s (%.1f%% of the peak above); per pass %.1f%% of the "
               "peak around it (median; %.1f-%.1f%%)\n",
               rows[i], gk[i], peak > 0 ? 100 * gk[i] / peak : 0, 100 * rk[i][0], 100 * rk[i][1],
               100 * rk[i][2]);
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
