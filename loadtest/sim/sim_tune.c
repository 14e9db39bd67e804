/* sim_tune: capacity sweep, grid search on the training part, held-out report. */
#include "loadtest/sim/sim_tune.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/err.h"

#define SIM__MAX_LOADS 16
#define SIM__MAX_GRID  16

/* The parameters searched, per policy: the router's config key, where it
 * goes in adm_params, and its grid. A grid is in the knob's unit, or in
 * multiples of the simulated capacity (req/s) or of the TTFT SLO (ms), so
 * one table serves every cluster. Policies are searched coordinate by
 * coordinate from adm_params_defaults (with the SLOs of the run): each knob
 * in turn over its grid, the others held, for SIM__ROUNDS rounds. A policy
 * without a knob (none) is evaluated as it is. burst's SLOs (slo-ttft-ms,
 * slo-tpot-ms) are the run's, fixed, and written with the chosen knobs. */
enum sim__unit { SIM__ABS = 0, SIM__X_CAP, SIM__X_SLO_TTFT };

typedef struct sim__knob {
    const char *policy;
    const char *key; /* the router's config key */
    size_t offset;   /* field of adm_params */
    int is_u32;      /* uint32_t field, else double */
    enum sim__unit unit;
    double grid[SIM__MAX_GRID];
    int n_grid;
} sim__knob;

#define SIM__ROUNDS 2
#define SIM__F(f)   offsetof(adm_params, f)

static const sim__knob sim__knobs[] = {
    {"max_outstanding",
     "max-outstanding",
     SIM__F(max_outstanding),
     1,
     SIM__ABS,
     {2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256},
     14},
    {"token_bucket",
     "bucket-rate",
     SIM__F(bucket_rate),
     0,
     SIM__X_CAP,
     {0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0},
     9},
    {"token_bucket",
     "bucket-burst",
     SIM__F(bucket_burst),
     0,
     SIM__ABS,
     {1, 2, 4, 8, 16, 32, 64},
     7},
    {"queue_threshold",
     "queue-max-ms",
     SIM__F(queue_max_ms),
     0,
     SIM__X_SLO_TTFT,
     {0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0},
     9},
    {"burst",
     "hold-max-ms",
     SIM__F(hold_max_ms),
     0,
     SIM__X_SLO_TTFT,
     {0, 0.1, 0.25, 0.5, 0.75, 1.0},
     6},
    {"burst", "burst-rate-ratio", SIM__F(burst_rate_ratio), 0, SIM__ABS, {1, 1.25, 1.5, 2, 3}, 5},
    {"burst", "slo-margin", SIM__F(slo_margin), 0, SIM__ABS, {0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1}, 7},
    {"burst", "burst-cv", SIM__F(burst_cv), 0, SIM__ABS, {0.5, 1, 1.5, 2, 3}, 5},
    {"burst", "short-window-s", SIM__F(short_window_s), 0, SIM__ABS, {0.5, 1, 2, 5}, 4},
    {"burst", "long-window-s", SIM__F(long_window_s), 0, SIM__ABS, {10, 30, 60, 120}, 4},
    /* The SLO feedback only pays when the router's cost model is off the
     * cluster's (--router-cost); with the same model the search keeps 0. */
    {"burst", "speed-step", SIM__F(speed_step), 0, SIM__ABS, {0, 0.02, 0.05, 0.1, 0.2}, 5},
};
#define SIM__N_KNOBS (sizeof(sim__knobs) / sizeof(sim__knobs[0]))

/* The knob's value in adm_params. */
static double sim__knob_get(const sim__knob *k, const adm_params *p)
{
    const char *f = (const char *)p + k->offset;
    return k->is_u32 ? (double)*(const uint32_t *)f : *(const double *)f;
}

/* Sets the knob to grid point g (scaled to capacity or SLO). */
static void sim__knob_set(const sim__knob *k, int g, double cap, const lt_slo *slo, adm_params *p)
{
    double v = k->grid[g] * (k->unit == SIM__X_CAP        ? cap
                             : k->unit == SIM__X_SLO_TTFT ? slo->ttft_ms
                                                          : 1.0);
    char *f = (char *)p + k->offset;
    if (k->is_u32)
        *(uint32_t *)f = (uint32_t)llround(v);
    else
        *(double *)f = v;
}

/* The knob's value as the config file gets it: a rate (in multiples of the
 * capacity) multiplied by rate_scale, the target capacity over the simulated
 * one (sim_tune_opts.target_capacity). */
static double sim__knob_written(const sim__knob *k, const adm_params *p, double rate_scale)
{
    double v = sim__knob_get(k, p);
    return k->unit == SIM__X_CAP ? v * rate_scale : v;
}

/* "key=value ..." of the policy's knobs as written, for the table. */
static void sim__knobs_str(const char *policy, const adm_params *p, double rate_scale, char *buf,
                           size_t cap)
{
    size_t off = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < SIM__N_KNOBS && off < cap; i++) {
        if (strcmp(sim__knobs[i].policy, policy) != 0) continue;
        int w = snprintf(buf + off, cap - off, "%s%s=%.4g", off ? " " : "", sim__knobs[i].key,
                         sim__knob_written(&sim__knobs[i], p, rate_scale));
        if (w < 0) break;
        off += (size_t)w;
    }
    if (!buf[0]) snprintf(buf, cap, "-");
}

typedef struct sim__eval {
    double goodput_rps, rejected_pct, p90_ttft_ms, good_frac;
} sim__eval;

/* Copies reqs[n] with arrival times scaled to a mean rate of rate_rps. */
static int sim__scaled(const lt_req *reqs, size_t n, double rate_rps, lt_req **out)
{
    *out = malloc((n ? n : 1) * sizeof(lt_req));
    if (!*out) return TD_ENOMEM;
    memcpy(*out, reqs, n * sizeof(lt_req));
    if (n < 2) return 0;
    int64_t t0 = reqs[0].t_ns, span = reqs[n - 1].t_ns - t0;
    if (span <= 0) return 0;
    double cur = (double)(n - 1) / ((double)span / 1e9);
    double f = cur / rate_rps;
    for (size_t i = 0; i < n; i++)
        (*out)[i].t_ns = (int64_t)llround((double)(reqs[i].t_ns - t0) * f);
    return 0;
}

static int sim__eval_at(const sim_config *cfg, const lt_req *reqs, size_t n, double rate,
                        const lt_slo *slo, sim__eval *ev, char *err, size_t errlen)
{
    lt_req *r = NULL;
    int rc = sim__scaled(reqs, n, rate, &r);
    if (rc) return rc;
    sim_result res;
    rc = sim_run(cfg, r, n, &res, err, errlen);
    free(r);
    if (rc) return rc;
    lt_summary s;
    rc = lt_summary_compute(res.recs, res.n, slo, &s);
    if (rc == 0) {
        ev->goodput_rps = s.goodput_req_per_s;
        ev->rejected_pct = s.requests ? 100.0 * (double)s.rejected / (double)s.requests : 0;
        ev->p90_ttft_ms = s.ttft.p90;
        ev->good_frac = s.requests ? (double)s.good / (double)s.requests : 0;
    }
    sim_result_free(&res);
    return rc;
}

/* Highest rate where admission none keeps >= 90% of requests within the SLOs. */
static int sim__capacity(const sim_config *base, const lt_req *reqs, size_t n, const lt_slo *slo,
                         double *cap, char *err, size_t errlen)
{
    sim_config c = *base;
    c.admission = "none";
    sim__eval ev;
    double lo = 0, hi = 0, r = 1.0;
    int rc;
    /* Bracket: double up from 1 req/s (or halve down) until the bound flips. */
    for (int k = 0; k < 40; k++) {
        if ((rc = sim__eval_at(&c, reqs, n, r, slo, &ev, err, errlen)) != 0) return rc;
        if (ev.good_frac >= 0.9) {
            lo = r;
            if (hi > 0) break;
            r *= 2;
        } else {
            hi = r;
            if (lo > 0) break;
            r /= 2;
        }
    }
    if (lo == 0 || hi == 0) {
        if (err) snprintf(err, errlen, "no capacity found: the SLOs are never (or always) met");
        return TD_EINVAL;
    }
    for (int k = 0; k < 10; k++) {
        double mid = sqrt(lo * hi);
        if ((rc = sim__eval_at(&c, reqs, n, mid, slo, &ev, err, errlen)) != 0) return rc;
        if (ev.good_frac >= 0.9)
            lo = mid;
        else
            hi = mid;
    }
    *cap = lo;
    return 0;
}

static int sim__parse_loads(const char *s, double *v, int *n)
{
    *n = 0;
    while (s && *s) {
        char *end;
        errno = 0;
        double x = strtod(s, &end);
        if (end == s || errno || !(x > 0) || *n == SIM__MAX_LOADS) return TD_EINVAL;
        v[(*n)++] = x;
        s = end;
        if (*s == ',')
            s++;
        else if (*s)
            return TD_EINVAL;
    }
    return *n ? 0 : TD_EINVAL;
}

static int sim__write_conf(const char *dir, const char *policy, const adm_params *p,
                           const sim_tune_opts *o, double cap, double rate_scale)
{
    char path[4096];
    if (snprintf(path, sizeof(path), "%s/admission-%s.conf", dir, policy) >= (int)sizeof(path))
        return TD_ETOOLONG;
    FILE *fp = fopen(path, "w");
    if (!fp) return td_err_from_errno(errno);
    fprintf(fp,
            "# tandem-sim tune: goodput summed over loads %s x %.3f req/s (simulated "
            "capacity),\n# tuned on %s, SLO TTFT <= %g ms, TPOT <= %g ms\n"
            "# rates in multiples of the capacity written for %.3f req/s\n"
            "# tandem-router --config this-file (keys are the router's)\nadmission = %s\n",
            o->loads, cap, o->holdout ? "all of the trace" : "the first part of the trace",
            o->slo.ttft_ms, o->slo.tpot_ms, cap * rate_scale, policy);
    for (size_t i = 0; i < SIM__N_KNOBS; i++) {
        const sim__knob *k = &sim__knobs[i];
        if (strcmp(k->policy, policy) != 0) continue;
        double v = sim__knob_written(k, p, rate_scale);
        if (k->is_u32)
            fprintf(fp, "%s = %u\n", k->key, (uint32_t)llround(v));
        else
            fprintf(fp, "%s = %.6g\n", k->key, v);
    }
    if (strcmp(policy, "burst") == 0) /* the SLOs it protects: the run's, fixed */
        fprintf(fp, "slo-ttft-ms = %.6g\nslo-tpot-ms = %.6g\n", p->slo_ttft_ms, p->slo_tpot_ms);
    int rc = ferror(fp) ? TD_EIO : 0;
    if (fclose(fp) != 0 && rc == 0) rc = TD_EIO;
    return rc;
}

/* Goodput summed over the loads on reqs[n]; *feasible 0 when the policy
 * refuses the parameters (create: TD_EINVAL, e.g. short >= long window). */
static int sim__score(const sim_config *c, const lt_req *reqs, size_t n, const double *loads,
                      int n_loads, double cap, const lt_slo *slo, double *sum, int *feasible,
                      char *err, size_t errlen)
{
    *sum = 0;
    *feasible = 1;
    for (int l = 0; l < n_loads; l++) {
        sim__eval ev;
        int rc = sim__eval_at(c, reqs, n, loads[l] * cap, slo, &ev, err, errlen);
        if (rc == TD_EINVAL && strstr(err ? err : "", "bad parameters")) {
            *feasible = 0;
            if (err) err[0] = '\0';
            return 0;
        }
        if (rc) return rc;
        *sum += ev.goodput_rps;
    }
    return 0;
}

/* Coordinate search of the policy's knobs in c->params. */
static int sim__search(sim_config *c, const lt_req *reqs, size_t n, const double *loads,
                       int n_loads, double cap, const lt_slo *slo, char *err, size_t errlen)
{
    double best = -1;
    int feasible = 0;
    int rc = sim__score(c, reqs, n, loads, n_loads, cap, slo, &best, &feasible, err, errlen);
    if (rc) return rc;
    if (!feasible) best = -1;
    for (int round = 0; round < SIM__ROUNDS; round++) {
        int moved = 0;
        for (size_t i = 0; i < SIM__N_KNOBS; i++) {
            const sim__knob *k = &sim__knobs[i];
            if (strcmp(k->policy, c->admission) != 0) continue;
            for (int g = 0; g < k->n_grid; g++) {
                adm_params keep = c->params;
                sim__knob_set(k, g, cap, slo, &c->params);
                if (sim__knob_get(k, &c->params) == sim__knob_get(k, &keep)) {
                    c->params = keep;
                    continue;
                }
                double sum;
                rc = sim__score(c, reqs, n, loads, n_loads, cap, slo, &sum, &feasible, err, errlen);
                if (rc) return rc;
                if (feasible && sum > best) {
                    best = sum;
                    moved = 1;
                } else {
                    c->params = keep;
                }
            }
        }
        if (!moved) break;
    }
    return 0;
}

int sim_tune(const sim_config *base, const lt_trace *tr, const sim_tune_opts *o, FILE *fp,
             char *err, size_t errlen)
{
    double loads[SIM__MAX_LOADS];
    int n_loads = 0;
    if (sim__parse_loads(o->loads, loads, &n_loads) != 0) {
        if (err) snprintf(err, errlen, "--loads: expected positive numbers separated by commas");
        return TD_EINVAL;
    }
    size_t n_train = o->holdout ? tr->n : (size_t)((double)tr->n * o->train_fraction);
    const lt_req *train = tr->reqs;
    const lt_req *test = o->holdout ? o->holdout->reqs : tr->reqs + n_train;
    size_t n_test = o->holdout ? o->holdout->n : tr->n - n_train;
    if (n_train < 2 || n_test < 2) {
        if (err)
            snprintf(err, errlen, "too few requests to tune on (%zu) or hold out (%zu)", n_train,
                     n_test);
        return TD_EINVAL;
    }
    if (mkdir(o->out, 0755) != 0 && errno != EEXIST) {
        if (err) snprintf(err, errlen, "%s: %s", o->out, strerror(errno));
        return td_err_from_errno(errno);
    }
    double cap = 0;
    int rc = sim__capacity(base, train, n_train, &o->slo, &cap, err, errlen);
    if (rc) return rc;
    fprintf(fp, "capacity (admission none, >= 90%% within SLO, training part): %.3f req/s\n", cap);
    double rate_scale = o->target_capacity > 0 ? o->target_capacity / cap : 1.0;
    if (o->target_capacity > 0)
        fprintf(fp, "configs written for a capacity of %.3f req/s (rates scaled by %.3f)\n",
                o->target_capacity, rate_scale);
    if (o->holdout)
        fprintf(fp,
                "training: the %zu requests of the trace, held out: the %zu of the other; "
                "numbers below are held out\n\n",
                n_train, n_test);
    else
        fprintf(fp, "training: requests 0..%zu, held out: %zu..%zu; numbers below are held out\n\n",
                n_train - 1, n_train, tr->n - 1);
    fprintf(fp, "SLO: TTFT <= %g ms and mean TPOT <= %g ms (lt_record_is_good)\n", o->slo.ttft_ms,
            o->slo.tpot_ms);
    fprintf(fp, "%-16s", "policy (config)");
    for (int l = 0; l < n_loads; l++)
        fprintf(fp, " | load %-4g goodput  rej%%   p90ttft", loads[l]);
    fputc('\n', fp);

    /* "none" first as the baseline, then the policies asked for. */
    char list[1024];
    snprintf(list, sizeof(list), "none,%s", o->policies ? o->policies : "");
    char *save = NULL;
    for (char *name = strtok_r(list, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        if (!*name || (strcmp(name, "none") == 0 && name != list)) continue;
        if (!adm_find(name)) {
            fprintf(fp, "%-16s (not in this build: %s)\n", name, adm_names());
            continue;
        }
        sim_config c = *base;
        c.admission = name;
        if ((rc = sim__search(&c, train, n_train, loads, n_loads, cap, &o->slo, err, errlen)) != 0)
            return rc;
        char conf[256];
        sim__knobs_str(name, &c.params, rate_scale, conf, sizeof(conf));
        fprintf(fp, "%-16s", name);
        for (int l = 0; l < n_loads; l++) {
            sim__eval ev;
            rc = sim__eval_at(&c, test, n_test, loads[l] * cap, &o->slo, &ev, err, errlen);
            if (rc) return rc;
            fprintf(fp, " | %13.3f %6.1f %9.1f", ev.goodput_rps, ev.rejected_pct, ev.p90_ttft_ms);
        }
        fprintf(fp, "\n%-16s %s\n", "", conf);
        if ((rc = sim__write_conf(o->out, name, &c.params, o, cap, rate_scale)) != 0) {
            if (err) snprintf(err, errlen, "%s: cannot write the config", o->out);
            return rc;
        }
    }
    fprintf(fp, "\nconfigs: %s/admission-<policy>.conf (goodput in req/s, p90 TTFT in ms)\n",
            o->out);
    return 0;
}
