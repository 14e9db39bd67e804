/* lt_synth: BurstGPT-shaped synthetic workloads and the fit of their parameters.
 *
 * Arrivals: i.i.d. Gamma(shape k, scale theta) inter-arrival times (mean
 * k*theta seconds, coefficient of variation 1/sqrt(k)); BurstGPT's defaults are
 * k = 0.5, theta = 2 s (0.5 req/s, CV 1.41). Request and response lengths:
 * bounded Zipf, P(n) proportional to n^-s on n = 1..max. Everything is driven
 * by one seeded xoshiro256** generator, so a seed gives the same workload on
 * every machine.
 */
#ifndef TANDEM_LOADTEST_LT_SYNTH_H
#define TANDEM_LOADTEST_LT_SYNTH_H

#include "loadtest/lt_trace.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* xoshiro256** state, seeded through splitmix64. */
typedef struct lt_rng {
    uint64_t s[4];
} lt_rng;

void lt_rng_seed(lt_rng *r, uint64_t seed);
uint64_t lt_rng_next(lt_rng *r);
/* Uniform in the open interval (0, 1). */
double lt_rng_uniform(lt_rng *r);
/* Standard normal (Marsaglia polar method). */
double lt_rng_normal(lt_rng *r);
/* Gamma(shape, scale) by Marsaglia-Tsang; shape < 1 through the boost
 * Gamma(shape + 1) * U^(1/shape). shape, scale > 0. */
double lt_rng_gamma(lt_rng *r, double shape, double scale);

/* Bounded Zipf sampler on 1..n_max with exponent s (> 0): a cumulative table
 * built once (n_max doubles), then a binary search per sample. */
typedef struct lt_zipf {
    double *cdf; /* [n_max], owned */
    int32_t n_max;
    double s;
} lt_zipf;
/* 0, TD_EINVAL (n_max < 1, s <= 0) or TD_ENOMEM. */
int lt_zipf_init(lt_zipf *z, double s, int32_t n_max);
void lt_zipf_free(lt_zipf *z); /* accepts NULL and a zeroed struct */
int32_t lt_zipf_sample(const lt_zipf *z, lt_rng *r);

typedef struct lt_synth_params {
    uint64_t seed;
    size_t n;             /* number of requests */
    double gamma_shape;   /* inter-arrival Gamma shape k (default 0.5) */
    double gamma_scale_s; /* inter-arrival Gamma scale theta in seconds (default 2) */
    double req_zipf_s;    /* request-length Zipf exponent (default 1.1) */
    int32_t req_max;      /* request-length upper bound in tokens (default 4096) */
    double resp_zipf_s;   /* response-length Zipf exponent (default 1.1) */
    int32_t resp_max;     /* response-length upper bound in tokens (default 1024) */
} lt_synth_params;

/* BurstGPT generator defaults: seed 1, 1000 requests, Gamma(0.5, 2 s), Zipf 1.1. */
void lt_synth_defaults(lt_synth_params *p);

/* Fills tr (initialised, empty) with p->n requests; the first arrives at 0.
 * 0, TD_EINVAL on bad parameters, TD_ENOMEM. */
int lt_synth_generate(const lt_synth_params *p, lt_trace *tr);

/* Gamma parameters from samples. Method of moments: k = mean^2 / var,
 * theta = var / mean. MLE: solves log(k) - digamma(k) = log(mean) - mean(log x)
 * by Newton's method (needs every sample > 0; zeros are left out and counted). */
typedef struct lt_gamma_fit {
    size_t n;        /* samples used */
    size_t n_zero;   /* zero samples (left out of the MLE) */
    double mean, cv; /* sample mean (s) and coefficient of variation */
    double mom_shape, mom_scale;
    double mle_shape, mle_scale; /* NAN when the MLE is undefined */
} lt_gamma_fit;
/* 0, or TD_EINVAL with fewer than 2 samples or zero variance. */
int lt_gamma_fit_samples(const double *x, size_t n, lt_gamma_fit *out);

/* MLE of a bounded Zipf exponent on 1..n_max from samples (values < 1 are
 * left out, values > n_max raise n_max to the sample maximum when n_max <= 0).
 * Maximises -s * sum(log x) - n * log H(n_max, s) over s in (0.01, 10) by
 * golden-section search. 0 or TD_EINVAL (no usable samples). */
int lt_zipf_fit(const int32_t *x, size_t n, int32_t n_max, double *s_out);

double lt_digamma(double x);

/* The fit printed by `tandem-loadtest fit`: per window (window_s seconds of the
 * trace's time) and overall. Writes a JSON document to out. 0, TD_EINVAL when
 * the trace has fewer than 3 requests, TD_EIO, TD_ENOMEM. */
int lt_synth_fit_report(const lt_trace *tr, double window_s, FILE *out);

#endif
