/* lt_synth: seeded samplers (xoshiro256**, Marsaglia-Tsang Gamma, bounded
 * Zipf), synthetic workload generation and parameter fits. */
#include "loadtest/lt_synth.h"

#include "common/clock.h"
#include "common/err.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void lt_rng_seed(lt_rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t lt_rng_next(lt_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double lt_rng_uniform(lt_rng *r)
{
    /* 53 random bits, shifted by half a step so 0 and 1 are never returned. */
    return ((double)(lt_rng_next(r) >> 11) + 0.5) * 0x1.0p-53;
}

double lt_rng_normal(lt_rng *r)
{
    for (;;) {
        double u = 2 * lt_rng_uniform(r) - 1, v = 2 * lt_rng_uniform(r) - 1;
        double q = u * u + v * v;
        if (q > 0 && q < 1) return u * sqrt(-2 * log(q) / q); /* the second variate is dropped */
    }
}

double lt_rng_gamma(lt_rng *r, double shape, double scale)
{
    if (shape < 1) {
        /* G(k) = G(k + 1) * U^(1/k); in log space so tiny k does not underflow to 0 early. */
        double g = lt_rng_gamma(r, shape + 1, 1.0);
        return scale * g * exp(log(lt_rng_uniform(r)) / shape);
    }
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9 * d);
    for (;;) {
        double x, v;
        do {
            x = lt_rng_normal(r);
            v = 1 + c * x;
        } while (v <= 0);
        v = v * v * v;
        double u = lt_rng_uniform(r);
        if (u < 1 - 0.0331 * x * x * x * x) return scale * d * v;
        if (log(u) < 0.5 * x * x + d * (1 - v + log(v))) return scale * d * v;
    }
}

int lt_zipf_init(lt_zipf *z, double s, int32_t n_max)
{
    memset(z, 0, sizeof(*z));
    if (n_max < 1 || !(s > 0) || !isfinite(s)) return TD_EINVAL;
    z->cdf = malloc((size_t)n_max * sizeof(double));
    if (!z->cdf) return TD_ENOMEM;
    double acc = 0;
    for (int32_t i = 0; i < n_max; i++) {
        acc += pow((double)(i + 1), -s);
        z->cdf[i] = acc;
    }
    for (int32_t i = 0; i < n_max; i++)
        z->cdf[i] /= acc;
    z->cdf[n_max - 1] = 1.0;
    z->n_max = n_max;
    z->s = s;
    return 0;
}

void lt_zipf_free(lt_zipf *z)
{
    if (!z) return;
    free(z->cdf);
    memset(z, 0, sizeof(*z));
}

int32_t lt_zipf_sample(const lt_zipf *z, lt_rng *r)
{
    double u = lt_rng_uniform(r);
    int32_t lo = 0, hi = z->n_max - 1; /* first index with cdf >= u */
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (z->cdf[mid] < u)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo + 1;
}

void lt_synth_defaults(lt_synth_params *p)
{
    *p = (lt_synth_params){.seed = 1,
                           .n = 1000,
                           .gamma_shape = 0.5,
                           .gamma_scale_s = 2.0,
                           .req_zipf_s = 1.1,
                           .req_max = 4096,
                           .resp_zipf_s = 1.1,
                           .resp_max = 1024};
}

int lt_synth_generate(const lt_synth_params *p, lt_trace *tr)
{
    if (!(p->gamma_shape > 0) || !(p->gamma_scale_s > 0) || !isfinite(p->gamma_shape) ||
        !isfinite(p->gamma_scale_s))
        return TD_EINVAL;
    lt_zipf zin, zout;
    int rc = lt_zipf_init(&zin, p->req_zipf_s, p->req_max);
    if (rc) return rc;
    rc = lt_zipf_init(&zout, p->resp_zipf_s, p->resp_max);
    if (rc) {
        lt_zipf_free(&zin);
        return rc;
    }
    lt_rng rng;
    lt_rng_seed(&rng, p->seed);
    double t_s = 0;
    for (size_t i = 0; i < p->n && rc == 0; i++) {
        if (i > 0) t_s += lt_rng_gamma(&rng, p->gamma_shape, p->gamma_scale_s);
        lt_req q = {.t_ns = (int64_t)llround(t_s * 1e9),
                    .input_tokens = lt_zipf_sample(&zin, &rng),
                    .output_tokens = lt_zipf_sample(&zout, &rng),
                    .line = 0};
        rc = lt_trace_push(tr, &q);
    }
    if (!rc) {
        tr->rows = tr->n;
        tr->src_span_s = t_s;
    }
    lt_zipf_free(&zin);
    lt_zipf_free(&zout);
    return rc;
}

double lt_digamma(double x)
{
    /* Recurrence psi(x) = psi(x + 1) - 1/x up to x >= 6, then the asymptotic series. */
    double acc = 0;
    while (x < 6) {
        acc -= 1 / x;
        x += 1;
    }
    double f = 1 / (x * x);
    return acc + log(x) - 0.5 / x -
           f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f / 132))));
}

static double trigamma(double x)
{
    double acc = 0;
    while (x < 6) {
        acc += 1 / (x * x);
        x += 1;
    }
    double f = 1 / (x * x);
    return acc + 1 / x + f / 2 + f / x * (1.0 / 6 - f * (1.0 / 30 - f * (1.0 / 42 - f / 30)));
}

int lt_gamma_fit_samples(const double *x, size_t n, lt_gamma_fit *out)
{
    memset(out, 0, sizeof(*out));
    out->mle_shape = out->mle_scale = NAN;
    if (n < 2) return TD_EINVAL;
    double sum = 0, sumsq = 0, sumlog = 0;
    size_t npos = 0;
    for (size_t i = 0; i < n; i++) {
        sum += x[i];
        if (x[i] > 0) {
            sumlog += log(x[i]);
            npos++;
        }
    }
    double mean = sum / (double)n;
    for (size_t i = 0; i < n; i++)
        sumsq += (x[i] - mean) * (x[i] - mean);
    double var = sumsq / (double)(n - 1);
    out->n = n;
    out->n_zero = n - npos;
    out->mean = mean;
    if (!(var > 0) || !(mean > 0)) return TD_EINVAL;
    out->cv = sqrt(var) / mean;
    out->mom_shape = mean * mean / var;
    out->mom_scale = var / mean;
    if (npos >= 2) {
        double pmean = 0;
        for (size_t i = 0; i < n; i++)
            if (x[i] > 0) pmean += x[i];
        pmean /= (double)npos;
        double sdiff = log(pmean) - sumlog / (double)npos; /* >= 0 by Jensen */
        if (sdiff > 0) {
            /* Minka's closed-form start, then Newton on f(k) = log k - psi(k) - sdiff. */
            double k = (3 - sdiff + sqrt((sdiff - 3) * (sdiff - 3) + 24 * sdiff)) / (12 * sdiff);
            for (int it = 0; it < 50; it++) {
                double f = log(k) - lt_digamma(k) - sdiff;
                double fp = 1 / k - trigamma(k);
                double nk = k - f / fp;
                if (!(nk > 0)) nk = k / 2;
                if (fabs(nk - k) < 1e-10 * k) {
                    k = nk;
                    break;
                }
                k = nk;
            }
            out->mle_shape = k;
            out->mle_scale = pmean / k;
        }
    }
    return 0;
}

/* Negative log-likelihood per sample of Zipf(s) on 1..n_max, up to a constant. */
static double zipf_nll(double s, double mean_log, int32_t n_max)
{
    double h = 0;
    for (int32_t k = 1; k <= n_max; k++)
        h += exp(-s * log((double)k));
    return s * mean_log + log(h);
}

int lt_zipf_fit(const int32_t *x, size_t n, int32_t n_max, double *s_out)
{
    double sumlog = 0;
    size_t used = 0;
    int32_t xmax = 0;
    for (size_t i = 0; i < n; i++) {
        if (x[i] < 1) continue;
        sumlog += log((double)x[i]);
        used++;
        if (x[i] > xmax) xmax = x[i];
    }
    if (used == 0) return TD_EINVAL;
    if (n_max < xmax) n_max = xmax;
    double mean_log = sumlog / (double)used;
    /* The likelihood is log-concave in s: golden-section search brackets the optimum. */
    const double g = (sqrt(5.0) - 1) / 2;
    double a = 0.01, b = 10;
    double c = b - g * (b - a), d = a + g * (b - a);
    double fc = zipf_nll(c, mean_log, n_max), fd = zipf_nll(d, mean_log, n_max);
    while (b - a > 1e-5) {
        if (fc < fd) {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = zipf_nll(c, mean_log, n_max);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = zipf_nll(d, mean_log, n_max);
        }
    }
    *s_out = (a + b) / 2;
    return 0;
}

static cJSON *gamma_json(const lt_gamma_fit *f)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "samples", (double)f->n);
    cJSON_AddNumberToObject(o, "zero_gaps", (double)f->n_zero);
    cJSON_AddNumberToObject(o, "mean_s", f->mean);
    cJSON_AddNumberToObject(o, "cv", f->cv);
    cJSON_AddNumberToObject(o, "mom_shape", f->mom_shape);
    cJSON_AddNumberToObject(o, "mom_scale_s", f->mom_scale);
    if (isfinite(f->mle_shape)) {
        cJSON_AddNumberToObject(o, "mle_shape", f->mle_shape);
        cJSON_AddNumberToObject(o, "mle_scale_s", f->mle_scale);
    } else {
        cJSON_AddNullToObject(o, "mle_shape");
        cJSON_AddNullToObject(o, "mle_scale_s");
    }
    return o;
}

int lt_synth_fit_report(const lt_trace *tr, double window_s, FILE *out)
{
    if (tr->n < 3) return TD_EINVAL;
    int rc = TD_ENOMEM;
    double *gaps = malloc((tr->n - 1) * sizeof(double));
    int32_t *lens = calloc(tr->n, sizeof(int32_t));
    cJSON *root = cJSON_CreateObject();
    cJSON *windows = NULL;
    if (!gaps || !lens || !root) goto done;
    for (size_t i = 1; i < tr->n; i++)
        gaps[i - 1] = td_ns_to_s(tr->reqs[i].t_ns - tr->reqs[i - 1].t_ns);

    cJSON_AddNumberToObject(root, "requests", (double)tr->n);
    cJSON_AddNumberToObject(root, "span_s", td_ns_to_s(tr->reqs[tr->n - 1].t_ns));
    cJSON_AddNumberToObject(root, "mean_rate_rps", lt_trace_mean_rate(tr));
    lt_gamma_fit gf;
    if (lt_gamma_fit_samples(gaps, tr->n - 1, &gf) == 0)
        cJSON_AddItemToObject(root, "interarrival_gamma", gamma_json(&gf));
    else
        cJSON_AddNullToObject(root, "interarrival_gamma");
    double s;
    for (size_t i = 0; i < tr->n; i++)
        lens[i] = tr->reqs[i].input_tokens;
    if (lt_zipf_fit(lens, tr->n, 0, &s) == 0) cJSON_AddNumberToObject(root, "request_zipf_s", s);
    int32_t maxlen = 0;
    for (size_t i = 0; i < tr->n; i++)
        maxlen = lens[i] > maxlen ? lens[i] : maxlen;
    cJSON_AddNumberToObject(root, "request_max", maxlen);
    maxlen = 0;
    for (size_t i = 0; i < tr->n; i++) {
        lens[i] = tr->reqs[i].output_tokens;
        maxlen = lens[i] > maxlen ? lens[i] : maxlen;
    }
    if (lt_zipf_fit(lens, tr->n, 0, &s) == 0) cJSON_AddNumberToObject(root, "response_zipf_s", s);
    cJSON_AddNumberToObject(root, "response_max", maxlen);

    /* Per window, as the BurstGPT paper fits Gamma to each period separately:
     * the gaps whose later request falls in [w, w + window). */
    cJSON_AddNumberToObject(root, "window_s", window_s);
    windows = cJSON_AddArrayToObject(root, "windows");
    if (!windows) goto done;
    if (window_s > 0) {
        int64_t w_ns = (int64_t)llround(window_s * 1e9);
        size_t i = 1;
        while (i < tr->n) {
            int64_t w0 = (tr->reqs[i].t_ns / w_ns) * w_ns;
            size_t j = i;
            while (j < tr->n && tr->reqs[j].t_ns < w0 + w_ns)
                j++;
            cJSON *w = cJSON_CreateObject();
            if (!w) goto done;
            cJSON_AddItemToArray(windows, w);
            cJSON_AddNumberToObject(w, "start_s", td_ns_to_s(w0));
            cJSON_AddNumberToObject(w, "requests", (double)(j - i));
            if (lt_gamma_fit_samples(gaps + (i - 1), j - i, &gf) == 0)
                cJSON_AddItemToObject(w, "gamma", gamma_json(&gf));
            else
                cJSON_AddNullToObject(w, "gamma");
            i = j;
        }
    }
    char *text = cJSON_Print(root);
    if (!text) goto done;
    rc = fprintf(out, "%s\n", text) < 0 ? TD_EIO : 0;
    free(text);
done:
    cJSON_Delete(root);
    free(gaps);
    free(lens);
    return rc;
}
