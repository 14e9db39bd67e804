#include "engine/sampler.h"

#include <math.h>
#include <stdbool.h>
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
    int32_t *idx; /* [vocab] candidate ids (scratch), only with top-k or top-p */
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
    /* Only top-k and top-p need a scratch of the vocabulary's size: the
     * softmax numerators are written over the logits. */
    bool cut = p->temperature > 0.0f &&
               ((p->top_k > 0 && p->top_k < vocab_size) || (p->top_p > 0.0f && p->top_p < 1.0f));
    if (cut) s->idx = malloc((size_t)vocab_size * sizeof(*s->idx));
    if (p->n_stop_ids > 0) {
        s->stop_ids = malloc((size_t)p->n_stop_ids * sizeof(int32_t));
        if (s->stop_ids) memcpy(s->stop_ids, p->stop_ids, (size_t)p->n_stop_ids * sizeof(int32_t));
    }
    if ((cut && !s->idx) || (p->n_stop_ids > 0 && !s->stop_ids)) {
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

/* ---- top-p alone: the nucleus without sorting the vocabulary ----
 *
 * Sorting the candidates cost about 3 ms per token over a 32,000-id
 * vocabulary when the distribution is flat (a high-entropy position: most
 * ids pass the (1-p)/(V-1) cut), more than the forward pass of a small
 * model. The nucleus is the ids above a threshold: the last id the sorted
 * walk takes, (tau, t), is found by a radix select on the probabilities'
 * bit patterns (monotone for non-negative floats). Bucket the ids still
 * undecided by their top bits, take whole buckets from the top while
 * their mass stays below the target, and go down into the bucket that
 * crosses it, until that bucket is small enough to sort (by decreasing
 * probability, then increasing id, as the walk orders them) or holds one
 * value (ids in increasing order). The nucleus is then every id with
 * probability above tau, or equal to it and id up to t; it is drawn from in
 * id order. A few passes over the vocabulary instead of a sort.
 *
 * The set is the sorted walk's, up to rounding in the running mass
 * (summed in double, bucket by bucket); drawing in id order rather than
 * probability order changes which id a given uniform number lands on, not
 * the distribution drawn from. Same logits and seed: same token, always.
 * With few candidates (a peaked distribution) they are sorted and walked
 * as before. */
#define SMP__BUCKETS  512
#define SMP__SORT_MAX 64
/* Above this k, top-k selects by bucketing too; up to it, the heap and a
 * sort of what it keeps cost no more (both about 0.13 ms at k = 1,000 over
 * 32,000 flat logits, with top-p after it). */
#define SMP__HEAP_K_MAX 1024
/* Ids per block of the draw's walk over the vocabulary. */
#define SMP__DRAW_BLOCK 256

static inline uint32_t smp__bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    return u;
}

/* Per-thread bucket masses, four-way so that ids falling in the same bucket
 * one after another do not wait on each other's addition. */
static _Thread_local double smp__bmass[4][SMP__BUCKETS];

/* Buckets over the bit patterns [lo, hi], at most SMP__BUCKETS of them:
 * returns the shift that maps a pattern to its bucket ((bits - lo) >>
 * shift), the count in *nb, and clears their masses. */
static int smp__buckets(uint32_t lo, uint32_t hi, int *nb)
{
    int shift = 0;
    while (((hi - lo) >> shift) >= SMP__BUCKETS)
        shift++;
    *nb = (int)((hi - lo) >> shift) + 1;
    for (int t = 0; t < 4; t++)
        memset(smp__bmass[t], 0, (size_t)*nb * sizeof(double));
    return shift;
}

/* The bucket from the top down whose mass takes *c to target, adding the
 * buckets above it to *c; -1 when none does (rounding: all are in). */
static int smp__crossing(int nb, double target, double *c)
{
    for (int b = nb - 1; b >= 0; b--) {
        double bm = smp__bmass[0][b] + smp__bmass[1][b] + smp__bmass[2][b] + smp__bmass[3][b];
        if (*c + bm >= target) return b;
        *c += bm;
    }
    return -1;
}

/* The length of the shortest prefix of idx[0..n) whose mass reaches target
 * (all of it when none does). */
static int smp__prefix(const float *prob, const int32_t *idx, int n, double target)
{
    double c = 0.0;
    for (int k = 0; k < n; k++) {
        c += prob[idx[k]];
        if (c >= target) return k + 1;
    }
    return n;
}

/* Draws with u (in [0, 1)) from idx[0..n) in that order. */
static int32_t smp__walk(const float *prob, const int32_t *idx, int n, float u)
{
    float mass = 0.0f;
    for (int i = 0; i < n; i++)
        mass += prob[idx[i]];
    float r = u * mass, cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += prob[idx[i]];
        if (r < cdf) return idx[i];
    }
    return idx[n - 1]; /* rounding left r above the total */
}

/* What id i adds to the nucleus "prob > tau, or == tau and id <= t". */
static inline float smp__in(const float *prob, int32_t i, float tau, int32_t t)
{
    float x = prob[i];
    return x > tau || (x == tau && i <= t) ? x : 0.0f;
}

/* The mass of the nucleus among ids [i0, i1), in eight running sums of a
 * fixed layout (no branch on the ids, which fall in and out at random; the
 * compiler may keep the eight in one vector: same bits either way). */
static float smp__block_mass(const float *prob, int32_t i0, int32_t i1, float tau, int32_t t)
{
    float acc[8] = {0};
    int32_t i = i0;
    for (; i + 8 <= i1; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += smp__in(prob, i + j, tau, t);
    for (; i < i1; i++)
        acc[0] += smp__in(prob, i, tau, t);
    return smpk_fold8(acc);
}

/* The mass of the nucleus "prob > tau, or == tau and id <= t" over the
 * vocabulary, block by block (the order smp__draw_above walks it in). */
static float smp__nucleus_mass(const float *prob, int V, float tau, int32_t t)
{
    float mass = 0.0f;
    for (int32_t i0 = 0; i0 < V; i0 += SMP__DRAW_BLOCK)
        mass +=
            smp__block_mass(prob, i0, i0 + SMP__DRAW_BLOCK < V ? i0 + SMP__DRAW_BLOCK : V, tau, t);
    return mass;
}

/* Draws with u from the nucleus "prob > tau, or == tau and id <= t" in id
 * order: blocks of ids first (their masses, then the block the draw lands
 * in), then the ids of that block one by one. */
static int32_t smp__draw_above(const float *prob, int V, float tau, int32_t t, float u,
                               int32_t best)
{
    float r = u * smp__nucleus_mass(prob, V, tau, t), cum = 0.0f;
    int32_t last = best;
    for (int32_t i0 = 0; i0 < V; i0 += SMP__DRAW_BLOCK) {
        int32_t i1 = i0 + SMP__DRAW_BLOCK < V ? i0 + SMP__DRAW_BLOCK : V;
        float bm = smp__block_mass(prob, i0, i1, tau, t);
        if (bm > 0.0f && r < cum + bm) {
            float cdf = cum;
            for (int32_t i = i0; i < i1; i++) {
                float x = smp__in(prob, i, tau, t);
                if (x == 0.0f) continue;
                cdf += x;
                last = i;
                if (r < cdf) return i;
            }
        }
        cum += bm;
    }
    return last; /* rounding left r above the total */
}

/* How the select weighs an id: by its probability (top-p's mass) or as one
 * (top-k's count). */
enum { SMP__BY_MASS, SMP__BY_COUNT };

static inline double smp__weight(float x, int by)
{
    return by == SMP__BY_COUNT ? 1.0 : (double)x;
}

/* The bucket of a bit pattern at or above lo; the first level's range ends
 * at 1's pattern, and anything past it goes to the top bucket. */
static inline int smp__bucket(uint32_t bits, uint32_t lo, int shift, int nb)
{
    uint32_t b = (bits - lo) >> shift;
    return b < (uint32_t)nb ? (int)b : nb - 1;
}

/* Gathers the candidates (probability above 0 and at least floor_p) into
 * idx[0..m) in increasing id order and sums their weights into the first
 * level's buckets, which span the bit patterns from the floor's (or the
 * least positive float's) to 1's, the largest numerator. Returns m. */
static int smp__gather(const float *prob, int V, float floor_p, int by, int32_t *idx, uint32_t *lo,
                       int *shift, int *nb)
{
    *lo = floor_p > 0.0f ? smp__bits(floor_p) : 1;
    *shift = smp__buckets(*lo, smp__bits(1.0f), nb);
    int m = 0;
    for (int32_t i = 0; i < V; i++) {
        float x = prob[i];
        if (!(x > 0.0f) || x < floor_p) continue;
        smp__bmass[i & 3][smp__bucket(smp__bits(x), *lo, *shift, *nb)] += smp__weight(x, by);
        idx[m++] = i;
    }
    return m;
}

/* After smp__gather: the last id (*tau, *t) that the walk by decreasing
 * probability, then increasing id, takes before its weight reaches target.
 * When the candidates' weight falls short of it (fewer than k of them, or
 * rounding), every candidate: (floor_p, V). Scratch: idx[0..m). */
static void smp__select(const float *prob, int V, float floor_p, int by, double target,
                        int32_t *idx, int m, uint32_t lo, int shift, int nb, float *tau, int32_t *t)
{
    double c = 0.0; /* weight of the ids decided in */
    *tau = floor_p;
    *t = V;
    for (;;) {
        /* Rounding may leave the target above what is left: then all of
         * it is in (tau: the least probability left, every id at it). */
        int cross = smp__crossing(nb, target, &c);
        if (cross < 0) return;
        /* Keep the crossing bucket's ids, in increasing order (in place:
         * a write never passes its read). */
        uint32_t clo = UINT32_MAX, chi = 0;
        int n = 0;
        for (int k = 0; k < m; k++) {
            uint32_t bits = smp__bits(prob[idx[k]]);
            if (smp__bucket(bits, lo, shift, nb) != cross) continue;
            idx[n++] = idx[k];
            clo = bits < clo ? bits : clo;
            chi = bits > chi ? bits : chi;
        }
        m = n;
        memcpy(tau, &clo, sizeof(*tau));
        if (clo == chi || m <= SMP__SORT_MAX) {
            /* Small, or one value: walked in order until the target. */
            if (clo != chi) {
                smp__sort_prob = prob;
                qsort(idx, (size_t)m, sizeof(int32_t), smp__cmp);
            }
            int k = 0;
            for (; k < m - 1; k++) {
                c += smp__weight(prob[idx[k]], by);
                if (c >= target) break;
            }
            *tau = prob[idx[k]];
            *t = idx[k];
            return;
        }
        lo = clo;
        shift = smp__buckets(lo, chi, &nb);
        for (int k = 0; k < m; k++) {
            float x = prob[idx[k]];
            smp__bmass[k & 3][smp__bucket(smp__bits(x), lo, shift, nb)] += smp__weight(x, by);
        }
    }
}

/* The token drawn with u from the nucleus at p (0 < p < 1) of prob[0..V),
 * whose total is sum and whose largest value is 1 (at best). */
static int32_t smp__top_p(const float *prob, int V, float p, float sum, int32_t best, float u,
                          int32_t *idx)
{
    const double target = (double)p * (double)sum;
    /* Ids below (1-p)/(V-1) of the sum can never be in the nucleus (all of
     * them together hold less than 1-p of the mass): llama2.c's cut. */
    const float floor_p = V > 1 ? (1.0f - p) / (float)(V - 1) * sum : 0.0f;
    uint32_t lo;
    int nb, shift, m = smp__gather(prob, V, floor_p, SMP__BY_MASS, idx, &lo, &shift, &nb);
    if (m == 0) return best;
    if (m <= SMP__SORT_MAX) { /* few candidates: sort and walk them all */
        smp__sort_prob = prob;
        qsort(idx, (size_t)m, sizeof(int32_t), smp__cmp);
        return smp__walk(prob, idx, smp__prefix(prob, idx, m, target), u);
    }
    float tau;
    int32_t t;
    smp__select(prob, V, floor_p, SMP__BY_MASS, target, idx, m, lo, shift, nb, &tau, &t);
    return smp__draw_above(prob, V, tau, t, u, best);
}

/* top-k for a k too large for the heap (smp__top_k sorts what it keeps),
 * then top-p over what it kept when 0 < p < 1: the same select, by count,
 * then by mass (the nucleus of the renormalised top k is the sorted
 * walk's prefix that reaches p of the kept mass, so the shorter of the
 * two prefixes). */
static int32_t smp__top_k_select(const float *prob, int V, int k, float p, int32_t best, float u,
                                 int32_t *idx)
{
    uint32_t lo;
    int nb, shift, m = smp__gather(prob, V, 0.0f, SMP__BY_COUNT, idx, &lo, &shift, &nb);
    if (m == 0) return best;
    float tau;
    int32_t t;
    smp__select(prob, V, 0.0f, SMP__BY_COUNT, (double)k, idx, m, lo, shift, nb, &tau, &t);
    if (p > 0.0f && p < 1.0f) {
        float kept = smp__nucleus_mass(prob, V, tau, t);
        /* Candidates: the kept ids (and ties with the last kept past it,
         * which the walk reaches only after the kept ones). */
        m = smp__gather(prob, V, tau, SMP__BY_MASS, idx, &lo, &shift, &nb);
        float tau_p;
        int32_t t_p;
        smp__select(prob, V, tau, SMP__BY_MASS, (double)p * kept, idx, m, lo, shift, nb, &tau_p,
                    &t_p);
        if (tau_p > tau || (tau_p == tau && t_p < t)) { /* ends before top-k's */
            tau = tau_p;
            t = t_p;
        }
    }
    return smp__draw_above(prob, V, tau, t, u, best);
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
    /* Softmax at temperature (no NaN left: the argmax checked), written
     * over the logits (the caller's buffer; no copy of the vocabulary per
     * request). The numerators are not divided by their sum: every step below compares
     * them with each other or with a fraction of a sum of them, so the
     * division would change nothing but cost a pass. The largest is exactly
     * 1, so the sum is at least 1. */
    float *prob = logits;
    float sum = smpk_exp_sum(prob, logits, V, logits[best], p->temperature);

    int use_k = p->top_k > 0 && p->top_k < V;
    int use_p = p->top_p > 0.0f && p->top_p < 1.0f;
    if (!use_k && !use_p) {
        float r = smp__uniform(s) * sum, cdf = 0.0f;
        for (int i = 0; i < V; i++) {
            cdf += prob[i];
            if (r < cdf) {
                *token = i;
                return 0;
            }
        }
        *token = best; /* rounding left r above the total */
        return 0;
    }
    if (!use_k) {
        *token = smp__top_p(prob, V, p->top_p, sum, best, smp__uniform(s), s->idx);
        return 0;
    }
    if (p->top_k > SMP__HEAP_K_MAX) {
        *token = smp__top_k_select(prob, V, p->top_k, p->top_p, best, smp__uniform(s), s->idx);
        return 0;
    }
    int n = smp__top_k(prob, V, p->top_k, s->idx);
    if (n == 0) {
        *token = best;
        return 0;
    }
    smp__sort_prob = prob;
    qsort(s->idx, (size_t)n, sizeof(int32_t), smp__cmp);
    if (use_p) { /* top-p over what top-k kept, renormalised */
        double kept = 0.0;
        for (int i = 0; i < n; i++)
            kept += prob[s->idx[i]];
        n = smp__prefix(prob, s->idx, n, p->top_p * kept);
    }
    *token = smp__walk(prob, s->idx, n, smp__uniform(s));
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
