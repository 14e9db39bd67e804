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

/* The parameters this build knows how to set, per policy: the router's
 * config key, where it goes in adm_params, and the grid searched. A policy
 * without an entry is evaluated with default parameters (none). */
typedef struct sim__knob {
    const char *policy;
    const char *key; /* the router's config key */
    size_t offset;   /* uint32_t field of adm_params */
    uint32_t grid[SIM__MAX_GRID];
    int n_grid;
} sim__knob;

static const sim__knob sim__knobs[] = {
    {"max_outstanding",
     "max-outstanding",
     offsetof(adm_params, max_outstanding),
     {2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256},
     14},
};

static const sim__knob *sim__knob_of(const char *policy)
{
    for (size_t i = 0; i < sizeof(sim__knobs) / sizeof(sim__knobs[0]); i++)
        if (strcmp(sim__knobs[i].policy, policy) == 0) return &sim__knobs[i];
    return NULL;
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

static int sim__write_conf(const char *dir, const char *policy, const sim__knob *k, uint32_t val,
                           const sim_tune_opts *o, double cap)
{
    char path[4096];
    if (snprintf(path, sizeof(path), "%s/admission-%s.conf", dir, policy) >= (int)sizeof(path))
        return TD_ETOOLONG;
    FILE *fp = fopen(path, "w");
    if (!fp) return td_err_from_errno(errno);
    fprintf(fp,
            "# tandem-sim tune: goodput summed over loads %s x %.3f req/s (simulated "
            "capacity),\n# tuned on the first %.0f%% of the trace, SLO TTFT <= %g ms, TPOT <= %g "
            "ms\nadmission = %s\n",
            o->loads, cap, o->train_fraction * 100, o->slo.ttft_ms, o->slo.tpot_ms, policy);
    if (k) fprintf(fp, "%s = %u\n", k->key, val);
    int rc = ferror(fp) ? TD_EIO : 0;
    if (fclose(fp) != 0 && rc == 0) rc = TD_EIO;
    return rc;
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
    if (o->holdout)
        fprintf(fp,
                "training: the %zu requests of the trace, held out: the %zu of the other; "
                "numbers below are held out\n\n",
                n_train, n_test);
    else
        fprintf(fp, "training: requests 0..%zu, held out: %zu..%zu; numbers below are held out\n\n",
                n_train - 1, n_train, tr->n - 1);
    fprintf(fp, "%-16s %-22s", "policy", "config");
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
        const sim__knob *k = sim__knob_of(name);
        sim_config c = *base;
        c.admission = name;
        int n_grid = k ? k->n_grid : 1;
        double best_sum = -1;
        uint32_t best_val = 0;
        for (int g = 0; g < n_grid; g++) {
            if (k) *(uint32_t *)((char *)&c.params + k->offset) = k->grid[g];
            double sum = 0;
            for (int l = 0; l < n_loads && rc == 0; l++) {
                sim__eval ev;
                rc = sim__eval_at(&c, train, n_train, loads[l] * cap, &o->slo, &ev, err, errlen);
                sum += ev.goodput_rps;
            }
            if (rc) return rc;
            if (sum > best_sum) {
                best_sum = sum;
                best_val = k ? k->grid[g] : 0;
            }
        }
        if (k) *(uint32_t *)((char *)&c.params + k->offset) = best_val;
        char conf[64];
        if (k)
            snprintf(conf, sizeof(conf), "%s=%u", k->key, best_val);
        else
            snprintf(conf, sizeof(conf), "-");
        fprintf(fp, "%-16s %-22s", name, conf);
        for (int l = 0; l < n_loads; l++) {
            sim__eval ev;
            rc = sim__eval_at(&c, test, n_test, loads[l] * cap, &o->slo, &ev, err, errlen);
            if (rc) return rc;
            fprintf(fp, " | %13.3f %6.1f %9.1f", ev.goodput_rps, ev.rejected_pct, ev.p90_ttft_ms);
        }
        fputc('\n', fp);
        if ((rc = sim__write_conf(o->out, name, k, best_val, o, cap)) != 0) {
            if (err) snprintf(err, errlen, "%s: cannot write the config", o->out);
            return rc;
        }
    }
    fprintf(fp, "\nconfigs: %s/admission-<policy>.conf (goodput in req/s, p90 TTFT in ms)\n",
            o->out);
    return 0;
}
