#include "engine/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "engine/sampler_kernels.h"

struct smp_sampler {
    smp_params p;
    int32_t *stop_ids; /* own copy of p.stop_ids */
    int vocab;
    uint64_t key; /* the seed, scrambled: the random stream's key */
    int generated;
    int32_t *idx; /* [vocab] candidate ids (scratch) */
    float *prob;  /* [vocab] softmax numerators, the largest 1 (scratch) */
};

/* splitmix64's finaliser: nearby inputs give unrelated outputs. */
static uint64_t smp__mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

void smp_params_defaults(smp_params *p)
{
    memset(p, 0, sizeof(*p));
    p->top_p = 1.0f;
    p->eos_id = -1;
}

int smp_create(const smp_params *p, int vocab_size, smp_sampler **out)
{
    *out = NULL;
    if (vocab_size <= 0 || p->n_stop_ids < 0 || (p->n_stop_ids > 0 && !p->stop_ids) ||
        p->max_tokens < 0 || p->min_tokens < 0 || isnan(p->temperature) || isnan(p->top_p))
        return TD_EINVAL;
    smp_sampler *s = calloc(1, sizeof(*s));
    if (!s) return TD_ENOMEM;
    s->p = *p;
    s->vocab = vocab_size;
    s->key = smp__mix(p->seed);
    s->idx = malloc((size_t)vocab_size * sizeof(*s->idx));
    s->prob = malloc((size_t)vocab_size * sizeof(*s->prob));
    if (p->n_stop_ids > 0) {
        s->stop_ids = malloc((size_t)p->n_stop_ids * sizeof(int32_t));
        if (s->stop_ids) memcpy(s->stop_ids, p->stop_ids, (size_t)p->n_stop_ids * sizeof(int32_t));
    }
    if (!s->idx || !s->prob || (p->n_stop_ids > 0 && !s->stop_ids)) {
        smp_free(s);
        return TD_ENOMEM;
    }
    s->p.stop_ids = s->stop_ids;
    *out = s;
    return 0;
}

void smp_free(smp_sampler *s)
{
    if (!s) return;
    free(s->stop_ids);
    free(s->idx);
    free(s->prob);
    free(s);
}

int smp_generated(const smp_sampler *s)
{
    return s->generated;
}

/* Counter-based random stream: the draw for generated token g is a pure
 * function of (seed, g), not the state of a generator. A request whose first
 * token is drawn on a prefill worker and the rest on a decode worker draws
 * exactly what one process draws, whatever else shares the batch. */
static float smp__uniform(const smp_sampler *s) /* [0, 1) */
{
    uint64_t x = smp__mix(s->key + (uint64_t)s->generated);
    return (float)(x >> 40) / 16777216.0f;
}

int smp_logits_find_nan(const float *logits, int n)
{
    for (int i = 0; i < n; i++)
        if (isnan(logits[i])) return i;
    return -1;
}

/* qsort has no context argument in C11: the probabilities being sorted are
 * passed through a thread-local pointer, so samplers on different threads
 * stay independent. */
static _Thread_local const float *smp__sort_prob;

/* 1 when a ranks after b: lower probability, or equal and higher id. */
static inline int smp__after(const float *prob, int32_t a, int32_t b)
{
    return prob[a] < prob[b] || (prob[a] == prob[b] && a > b);
}

/* Orders candidates by decreasing probability, then increasing id. */
static int smp__cmp(const void *a, const void *b)
{
    int32_t ia = *(const int32_t *)a, ib = *(const int32_t *)b;
    if (smp__after(smp__sort_prob, ia, ib)) return 1;
    if (smp__after(smp__sort_prob, ib, ia)) return -1;
    return 0;
}

/* Keeps the k best ids of prob[0..V) in idx[0..k) (unordered) with a min-heap
 * whose root is the worst kept candidate: O(V log k). */
static int smp__top_k(const float *prob, int V, int k, int32_t *idx)
{
    int n = 0;
    for (int32_t i = 0; i < V; i++) {
        if (n < k) {
            int c = n++;
            idx[c] = i;
            while (c > 0) { /* sift up: worse candidates toward the root */
                int par = (c - 1) / 2;
                if (!smp__after(prob, idx[c], idx[par])) break;
                int32_t t = idx[c];
                idx[c] = idx[par];
                idx[par] = t;
                c = par;
            }
        } else if (smp__after(prob, idx[0], i)) {
            idx[0] = i;
            int c = 0;
            for (;;) { /* sift down */
                int l = 2 * c + 1, r = l + 1, w = c;
                if (l < n && smp__after(prob, idx[l], idx[w])) w = l;
                if (r < n && smp__after(prob, idx[r], idx[w])) w = r;
                if (w == c) break;
                int32_t t = idx[c];
                idx[c] = idx[w];
                idx[w] = t;
                c = w;
            }
        }
    }
    return n;
}

int smp_sample(smp_sampler *s, float *logits, int32_t *token)
{
    const smp_params *p = &s->p;
    int V = s->vocab;
    if (s->generated < p->min_tokens) {
        if (p->eos_id >= 0 && p->eos_id < V) logits[p->eos_id] = -INFINITY;
        for (int i = 0; i < p->n_stop_ids; i++)
            if (p->stop_ids[i] >= 0 && p->stop_ids[i] < V) logits[p->stop_ids[i]] = -INFINITY;
    }
    int best = smpk_argmax(logits, V);
    if (best < 0) return TD_ERANGE;
    /* -inf: everything is masked; +inf: that id has all the mass. */
    if (p->temperature <= 0.0f || isinf(logits[best])) {
        *token = best;
        return 0;
    }
    /* Softmax at temperature (no NaN left: the argmax checked). The
     * numerators are not divided by their sum: every step below compares
     * them with each other or with a fraction of a sum of them, so the
     * division would change nothing but cost a pass. The largest is exactly
     * 1, so the sum is at least 1. */
    float sum = smpk_exp_sum(s->prob, logits, V, logits[best], p->temperature);

    int n = 0;
    int use_k = p->top_k > 0 && p->top_k < V;
    int use_p = p->top_p > 0.0f && p->top_p < 1.0f;
    if (!use_k && !use_p) {
        float r = smp__uniform(s) * sum, cdf = 0.0f;
        for (int i = 0; i < V; i++) {
            cdf += s->prob[i];
            if (r < cdf) {
                *token = i;
                return 0;
            }
        }
        *token = best; /* rounding left r above the total */
        return 0;
    }
    /* Candidates: with top-p alone, ids below (1-p)/(V-1) can never be in the
     * nucleus (llama2.c's cut), which keeps the sort short. */
    if (use_k) {
        n = smp__top_k(s->prob, V, p->top_k, s->idx);
    } else {
        float floor_p = V > 1 ? (1.0f - p->top_p) / (float)(V - 1) * sum : 0.0f;
        for (int i = 0; i < V; i++)
            if (s->prob[i] >= floor_p) s->idx[n++] = i;
    }
    if (n == 0) {
        *token = best;
        return 0;
    }
    smp__sort_prob = s->prob;
    qsort(s->idx, (size_t)n, sizeof(int32_t), smp__cmp);
    float mass = 0.0f;
    for (int i = 0; i < n; i++)
        mass += s->prob[s->idx[i]];
    if (use_p) {
        float target = p->top_p * mass, c = 0.0f;
        for (int i = 0; i < n; i++) {
            c += s->prob[s->idx[i]];
            if (c >= target) {
                n = i + 1;
                break;
            }
        }
        mass = 0.0f;
        for (int i = 0; i < n; i++)
            mass += s->prob[s->idx[i]];
    }
    float r = smp__uniform(s) * mass, cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += s->prob[s->idx[i]];
        if (r < cdf) {
            *token = s->idx[i];
            return 0;
        }
    }
    *token = s->idx[n - 1];
    return 0;
}

enum smp_finish smp_accept(smp_sampler *s, int32_t token)
{
    const smp_params *p = &s->p;
    s->generated++;
    if (token == p->eos_id && p->eos_id >= 0 && !p->ignore_eos) return SMP_STOP_EOS;
    for (int i = 0; i < p->n_stop_ids; i++)
        if (token == p->stop_ids[i]) return SMP_STOP_TOKEN;
    if (p->max_tokens > 0 && s->generated >= p->max_tokens) return SMP_STOP_LENGTH;
    return SMP_CONTINUE;
}
