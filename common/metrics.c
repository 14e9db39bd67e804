#include "metrics.h"

#include "err.h"
#include "log.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum met_type { MET_COUNTER, MET_GAUGE, MET_HISTOGRAM };

#define MET__LE_CHARS 32 /* longest shortest-form double ("-2.2250738585072014e-308") fits */

static void format_double(char *out, size_t cap, double v);

static const char *const type_names[] = {"counter", "gauge", "histogram"};

const double met_latency_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5,   1.0,    2.5,   5.0,  10.0,  30.0, 60.0};
const size_t met_latency_nbuckets = sizeof(met_latency_buckets) / sizeof(met_latency_buckets[0]);

/* Every series starts with this header. Series are allocated one by one,
 * cache-line aligned, so two hot series never share a line. */
struct met__series {
    uint64_t hash;
    char **values; /* nlabels owned strings */
};

struct met_counter {
    struct met__series s;
    _Atomic uint64_t n;     /* integer part: exact */
    _Atomic uint64_t fbits; /* fractional adds: a double, as bits */
};

struct met_gauge {
    struct met__series s;
    _Atomic uint64_t bits; /* double as bits */
};

struct met_histogram {
    struct met__series s;
    const met_family *f;
    _Atomic uint64_t sum_bits;
    _Atomic uint64_t counts[]; /* f->nbounds + 1, per bucket (not cumulative); last is +Inf */
};

struct met_family {
    met_registry *r;
    enum met_type type;
    char *name;
    char *help;
    char *labels[MET_MAX_LABELS];
    size_t nlabels;
    double *bounds; /* histograms: nbounds finite upper bounds */
    size_t nbounds;
    char (*le)[MET__LE_CHARS]; /* bounds as rendered, nbounds + 1 ("+Inf" last) */
    pthread_mutex_t mu;        /* guards series/nseries/cap */
    struct met__series **series;
    size_t nseries, cap;
};

struct met_registry {
    char *prefix;
    pthread_mutex_t mu; /* guards fams/nfams/cap */
    met_family **fams;
    size_t nfams, cap;
};

/* ---- atomics on doubles ------------------------------------------------- */

static uint64_t d2u(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return u;
}

static double u2d(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

static void atomic_add_double(_Atomic uint64_t *bits, double delta)
{
    uint64_t old = atomic_load_explicit(bits, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(bits, &old, d2u(u2d(old) + delta),
                                                  memory_order_relaxed, memory_order_relaxed)) {
    }
}

/* ---- validation --------------------------------------------------------- */

static bool valid_metric_name(const char *s)
{
    if (!s || !*s || strlen(s) > MET_MAX_NAME) return false;
    for (size_t i = 0; s[i]; i++) {
        char ch = s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' || ch == ':' ||
                  (i > 0 && ch >= '0' && ch <= '9');
        if (!ok) return false;
    }
    return true;
}

static bool valid_label_name(const char *s)
{
    if (!s || !*s || strlen(s) > MET_MAX_NAME || strncmp(s, "__", 2) == 0) return false;
    for (size_t i = 0; s[i]; i++) {
        char ch = s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' ||
                  (i > 0 && ch >= '0' && ch <= '9');
        if (!ok) return false;
    }
    return true;
}

/* Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. */
static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n) return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* ---- registry ----------------------------------------------------------- */

int met_registry_create(met_registry **out, const char *prefix)
{
    if (!out) return TD_EINVAL;
    *out = NULL;
    if (!prefix) return TD_EINVAL;
    if (*prefix && !valid_metric_name(prefix)) return TD_EINVAL;
    met_registry *r = calloc(1, sizeof(*r));
    if (!r) return TD_ENOMEM;
    r->prefix = strdup(prefix);
    if (!r->prefix || pthread_mutex_init(&r->mu, NULL) != 0) {
        free(r->prefix);
        free(r);
        return TD_ENOMEM;
    }
    *out = r;
    return 0;
}

static void series_free(met_family *f, struct met__series *s)
{
    if (!s) return;
    for (size_t i = 0; i < f->nlabels && s->values; i++)
        free(s->values[i]);
    free(s->values);
    free(s);
}

static void family_free(met_family *f)
{
    if (!f) return;
    for (size_t i = 0; i < f->nseries; i++)
        series_free(f, f->series[i]);
    free(f->series);
    for (size_t i = 0; i < f->nlabels; i++)
        free(f->labels[i]);
    free(f->bounds);
    free(f->le);
    free(f->help);
    free(f->name);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

void met_registry_free(met_registry *r)
{
    if (!r) return;
    for (size_t i = 0; i < r->nfams; i++)
        family_free(r->fams[i]);
    free(r->fams);
    free(r->prefix);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

/* True when the sample names of a family (name, type) and of f overlap. */
static bool names_clash(const char *name, enum met_type type, const met_family *f)
{
    static const char *const suffixes[] = {"_bucket", "_sum", "_count"};
    if (strcmp(name, f->name) == 0) return true;
    size_t ln = strlen(name), lf = strlen(f->name);
    for (size_t i = 0; i < 3; i++) {
        size_t ls = strlen(suffixes[i]);
        if (f->type == MET_HISTOGRAM && ln == lf + ls && strncmp(name, f->name, lf) == 0 &&
            strcmp(name + lf, suffixes[i]) == 0)
            return true;
        if (type == MET_HISTOGRAM && lf == ln + ls && strncmp(f->name, name, ln) == 0 &&
            strcmp(f->name + ln, suffixes[i]) == 0)
            return true;
    }
    return false;
}

static int family_new(met_registry *r, enum met_type type, const char *name, const char *help,
                      const char *const *label_names, size_t nlabels, const double *bounds,
                      size_t nbounds, met_family **out)
{
    if (!out) return TD_EINVAL;
    *out = NULL;
    if (!r || !valid_metric_name(name) || strncmp(name, r->prefix, strlen(r->prefix)) != 0 ||
        !help || !valid_utf8((const unsigned char *)help, strlen(help)) ||
        nlabels > MET_MAX_LABELS || (nlabels > 0 && !label_names)) {
        td_log_error("metrics", "bad_family", "name=%s prefix=%s nlabels=%zu",
                     valid_metric_name(name) ? name : "(invalid)", r ? r->prefix : "-", nlabels);
        return TD_EINVAL;
    }
    for (size_t i = 0; i < nlabels; i++) {
        bool ok = valid_label_name(label_names[i]) &&
                  !(type == MET_HISTOGRAM && strcmp(label_names[i], "le") == 0);
        for (size_t j = 0; ok && j < i; j++)
            ok = strcmp(label_names[i], label_names[j]) != 0;
        if (!ok) {
            td_log_error("metrics", "bad_label_name", "name=%s label_index=%zu", name, i);
            return TD_EINVAL;
        }
    }
    if (type == MET_HISTOGRAM) {
        bool ok = bounds && nbounds >= 1 && nbounds <= MET_MAX_BUCKETS;
        for (size_t i = 0; ok && i < nbounds; i++)
            ok = isfinite(bounds[i]) && (i == 0 || bounds[i] > bounds[i - 1]);
        if (!ok) {
            td_log_error("metrics", "bad_buckets", "name=%s nbounds=%zu", name, nbounds);
            return TD_EINVAL;
        }
    }

    met_family *f = calloc(1, sizeof(*f));
    if (!f) return TD_ENOMEM;
    if (pthread_mutex_init(&f->mu, NULL) != 0) {
        free(f);
        return TD_ENOMEM;
    }
    f->r = r;
    f->type = type;
    f->name = strdup(name);
    f->help = strdup(help);
    int rc = f->name && f->help ? 0 : TD_ENOMEM;
    for (size_t i = 0; i < nlabels && rc == 0; i++) {
        f->labels[i] = strdup(label_names[i]);
        f->nlabels = i + 1;
        if (!f->labels[i]) rc = TD_ENOMEM;
    }
    if (rc == 0 && type == MET_HISTOGRAM) {
        /* The le strings never change: format them once, not per scrape. */
        f->bounds = malloc(nbounds * sizeof(double));
        f->le = malloc((nbounds + 1) * sizeof(*f->le));
        if (f->bounds && f->le) {
            memcpy(f->bounds, bounds, nbounds * sizeof(double));
            f->nbounds = nbounds;
            for (size_t i = 0; i < nbounds; i++)
                format_double(f->le[i], sizeof(f->le[i]), bounds[i]);
            snprintf(f->le[nbounds], sizeof(f->le[nbounds]), "+Inf");
        } else {
            rc = TD_ENOMEM;
        }
    }
    if (rc != 0) {
        family_free(f);
        return rc;
    }

    pthread_mutex_lock(&r->mu);
    for (size_t i = 0; i < r->nfams && rc == 0; i++)
        if (names_clash(name, type, r->fams[i])) rc = TD_EEXIST;
    if (rc == 0 && r->nfams == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        met_family **fams = realloc(r->fams, cap * sizeof(*fams));
        if (fams) {
            r->fams = fams;
            r->cap = cap;
        } else {
            rc = TD_ENOMEM;
        }
    }
    if (rc == 0) r->fams[r->nfams++] = f;
    pthread_mutex_unlock(&r->mu);
    if (rc != 0) {
        if (rc == TD_EEXIST) td_log_error("metrics", "name_taken", "name=%s", name);
        family_free(f);
        return rc;
    }
    *out = f;
    return 0;
}

int met_counter_family(met_registry *r, const char *name, const char *help,
                       const char *const *label_names, size_t nlabels, met_family **out)
{
    return family_new(r, MET_COUNTER, name, help, label_names, nlabels, NULL, 0, out);
}

int met_gauge_family(met_registry *r, const char *name, const char *help,
                     const char *const *label_names, size_t nlabels, met_family **out)
{
    return family_new(r, MET_GAUGE, name, help, label_names, nlabels, NULL, 0, out);
}

int met_histogram_family(met_registry *r, const char *name, const char *help,
                         const char *const *label_names, size_t nlabels, const double *bounds,
                         size_t nbounds, met_family **out)
{
    return family_new(r, MET_HISTOGRAM, name, help, label_names, nlabels, bounds, nbounds, out);
}

/* ---- series lookup ------------------------------------------------------ */

static uint64_t hash_values(const char *const *values, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        for (const unsigned char *p = (const unsigned char *)values[i]; *p; p++) {
            h ^= *p;
            h *= 1099511628211ull;
        }
        h ^= 0xff; /* separator: ("ab","c") != ("a","bc") */
        h *= 1099511628211ull;
    }
    return h;
}

static size_t series_size(const met_family *f)
{
    switch (f->type) {
    case MET_COUNTER:
        return sizeof(met_counter);
    case MET_GAUGE:
        return sizeof(met_gauge);
    case MET_HISTOGRAM:
        return sizeof(met_histogram) + (f->nbounds + 1) * sizeof(_Atomic uint64_t);
    }
    return 0;
}

static int series_get(met_family *f, enum met_type type, const char *const *values,
                      struct met__series **out)
{
    if (!out) return TD_EINVAL;
    *out = NULL;
    if (!f || f->type != type || (f->nlabels > 0 && !values)) return TD_EINVAL;
    for (size_t i = 0; i < f->nlabels; i++) {
        if (!values[i]) return TD_EINVAL;
        size_t len = strnlen(values[i], MET_MAX_LABEL_VALUE + 1);
        if (len > MET_MAX_LABEL_VALUE || !valid_utf8((const unsigned char *)values[i], len))
            return TD_EINVAL;
    }
    uint64_t h = hash_values(values, f->nlabels);

    int rc = 0;
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->nseries; i++) {
        struct met__series *s = f->series[i];
        if (s->hash != h) continue;
        size_t k = 0;
        while (k < f->nlabels && strcmp(s->values[k], values[k]) == 0)
            k++;
        if (k == f->nlabels) {
            *out = s;
            goto unlock;
        }
    }
    if (f->nseries >= MET_MAX_SERIES) {
        rc = TD_ENOSPC;
        td_log_warn("metrics", "too_many_series", "name=%s max=%d", f->name, MET_MAX_SERIES);
        goto unlock;
    }
    if (f->nseries == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 4;
        struct met__series **grown = realloc(f->series, cap * sizeof(*grown));
        if (!grown) {
            rc = TD_ENOMEM;
            goto unlock;
        }
        f->series = grown;
        f->cap = cap;
    }
    size_t size = (series_size(f) + 63) & ~(size_t)63;
    struct met__series *s = aligned_alloc(64, size);
    if (!s) {
        rc = TD_ENOMEM;
        goto unlock;
    }
    memset(s, 0, size); /* all-zero bits: counts 0, doubles +0.0 */
    s->hash = h;
    if (f->nlabels > 0) {
        s->values = calloc(f->nlabels, sizeof(char *));
        for (size_t i = 0; s->values && i < f->nlabels; i++) {
            s->values[i] = strdup(values[i]);
            if (!s->values[i]) {
                series_free(f, s);
                rc = TD_ENOMEM;
                goto unlock;
            }
        }
        if (!s->values) {
            free(s);
            rc = TD_ENOMEM;
            goto unlock;
        }
    }
    if (type == MET_HISTOGRAM) ((met_histogram *)s)->f = f;
    f->series[f->nseries++] = s;
    *out = s;
unlock:
    pthread_mutex_unlock(&f->mu);
    return rc;
}

int met_counter_get(met_family *f, const char *const *label_values, met_counter **out)
{
    if (!out) return TD_EINVAL;
    struct met__series *s = NULL;
    int rc = series_get(f, MET_COUNTER, label_values, &s);
    if (out) *out = (met_counter *)s;
    return rc;
}

int met_gauge_get(met_family *f, const char *const *label_values, met_gauge **out)
{
    if (!out) return TD_EINVAL;
    struct met__series *s = NULL;
    int rc = series_get(f, MET_GAUGE, label_values, &s);
    if (out) *out = (met_gauge *)s;
    return rc;
}

int met_histogram_get(met_family *f, const char *const *label_values, met_histogram **out)
{
    if (!out) return TD_EINVAL;
    struct met__series *s = NULL;
    int rc = series_get(f, MET_HISTOGRAM, label_values, &s);
    if (out) *out = (met_histogram *)s;
    return rc;
}

int met_counter_new(met_registry *r, const char *name, const char *help, met_counter **out)
{
    met_family *f;
    if (out) *out = NULL;
    int rc = met_counter_family(r, name, help, NULL, 0, &f);
    return rc ? rc : met_counter_get(f, NULL, out);
}

int met_gauge_new(met_registry *r, const char *name, const char *help, met_gauge **out)
{
    met_family *f;
    if (out) *out = NULL;
    int rc = met_gauge_family(r, name, help, NULL, 0, &f);
    return rc ? rc : met_gauge_get(f, NULL, out);
}

int met_histogram_new(met_registry *r, const char *name, const char *help, const double *bounds,
                      size_t nbounds, met_histogram **out)
{
    met_family *f;
    if (out) *out = NULL;
    int rc = met_histogram_family(r, name, help, NULL, 0, bounds, nbounds, &f);
    return rc ? rc : met_histogram_get(f, NULL, out);
}

/* ---- updates ------------------------------------------------------------ */

void met_counter_inc(met_counter *c)
{
    atomic_fetch_add_explicit(&c->n, 1, memory_order_relaxed);
}

void met_counter_add(met_counter *c, uint64_t n)
{
    atomic_fetch_add_explicit(&c->n, n, memory_order_relaxed);
}

void met_counter_add_f(met_counter *c, double v)
{
    if (!(v > 0)) /* also rejects NaN */
        return;
    atomic_add_double(&c->fbits, v);
}

void met_gauge_set(met_gauge *g, double v)
{
    atomic_store_explicit(&g->bits, d2u(v), memory_order_relaxed);
}

void met_gauge_add(met_gauge *g, double delta)
{
    atomic_add_double(&g->bits, delta);
}

void met_histogram_observe(met_histogram *h, double v)
{
    if (isnan(v)) return;
    const double *b = h->f->bounds;
    size_t lo = 0, hi = h->f->nbounds; /* first bound >= v, or nbounds (+Inf) */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (v <= b[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    atomic_fetch_add_explicit(&h->counts[lo], 1, memory_order_relaxed);
    atomic_add_double(&h->sum_bits, v);
}

double met_counter_value(const met_counter *c)
{
    return (double)atomic_load_explicit(&c->n, memory_order_relaxed) +
           u2d(atomic_load_explicit(&c->fbits, memory_order_relaxed));
}

double met_gauge_value(const met_gauge *g)
{
    return u2d(atomic_load_explicit(&g->bits, memory_order_relaxed));
}

uint64_t met_histogram_count(const met_histogram *h)
{
    uint64_t total = 0;
    for (size_t i = 0; i <= h->f->nbounds; i++)
        total += atomic_load_explicit(&h->counts[i], memory_order_relaxed);
    return total;
}

double met_histogram_sum(const met_histogram *h)
{
    return u2d(atomic_load_explicit(&h->sum_bits, memory_order_relaxed));
}

/* ---- rendering ---------------------------------------------------------- */

struct buf {
    char *s;
    size_t len, cap;
    bool failed;
};

static void put(struct buf *b, const char *s, size_t n)
{
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *grown = realloc(b->s, cap);
        if (!grown) {
            b->failed = true;
            return;
        }
        b->s = grown;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void puts_(struct buf *b, const char *s)
{
    put(b, s, strlen(s));
}

static void put_u64(struct buf *b, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put(b, tmp + i, sizeof(tmp) - i);
}

/* Escapes \ and newline (help text); with quote also " (label values). */
static void put_escaped(struct buf *b, const char *s, bool quote)
{
    const char *run = s;
    for (; *s; s++) {
        const char *rep = *s == '\\'           ? "\\\\"
                          : *s == '\n'         ? "\\n"
                          : quote && *s == '"' ? "\\\""
                                               : NULL;
        if (!rep) continue;
        put(b, run, (size_t)(s - run));
        puts_(b, rep);
        run = s + 1;
    }
    put(b, run, (size_t)(s - run));
}

/* Shortest decimal that reads back as the same double, plain notation for
 * exponents -4..20 ("10", "0.0025"), else exponent notation ("1e-09");
 * Prometheus spellings for the special values. */
static void format_double(char *out, size_t cap, double v)
{
    if (isnan(v)) {
        snprintf(out, cap, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(out, cap, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    /* The shortest form has at most 17 digits. If one of 15 or fewer round-
     * trips, %.15g's rounding is that form padded with zeros (a double's
     * error is far below the 15th digit), so three tries suffice. */
    char e[40];
    for (int p = 15; p <= 17; p++) {
        snprintf(e, sizeof(e), "%.*e", p - 1, v);
        if (strtod(e, NULL) == v) break;
    }
    char *mant_end = strchr(e, 'e');
    int prec = 0, zeros = 0;
    for (const char *q = e; q < mant_end; q++) {
        if (*q < '0' || *q > '9') continue;
        if (*q == '0') {
            zeros++;
        } else {
            prec += zeros + 1;
            zeros = 0;
        }
    }
    if (prec == 0) prec = 1; /* v == 0 */
    int exp = atoi(mant_end + 1);
    if (exp < -4 || exp >= 21) {
        snprintf(out, cap, "%.*e", prec - 1, v); /* without the padding zeros */
        return;
    }
    int decimals = prec - 1 - exp;
    snprintf(out, cap, "%.*f", decimals > 0 ? decimals : 0, v);
}

/* name{l1="v1",...[,le="x"]} */
static void put_series_name(struct buf *b, const met_family *f, const char *suffix,
                            const struct met__series *s, const char *le)
{
    puts_(b, f->name);
    puts_(b, suffix);
    if (f->nlabels == 0 && !le) return;
    puts_(b, "{");
    for (size_t i = 0; i < f->nlabels; i++) {
        if (i) puts_(b, ",");
        puts_(b, f->labels[i]);
        puts_(b, "=\"");
        put_escaped(b, s->values[i], true);
        puts_(b, "\"");
    }
    if (le) {
        if (f->nlabels) puts_(b, ",");
        puts_(b, "le=\"");
        puts_(b, le);
        puts_(b, "\"");
    }
    puts_(b, "}");
}

static void render_series(struct buf *b, const met_family *f, const struct met__series *s)
{
    char num[64];
    switch (f->type) {
    case MET_COUNTER: {
        const met_counter *c = (const met_counter *)s;
        uint64_t n = atomic_load_explicit(&c->n, memory_order_relaxed);
        double fr = u2d(atomic_load_explicit(&c->fbits, memory_order_relaxed));
        put_series_name(b, f, "", s, NULL);
        puts_(b, " ");
        if (fr == 0) {
            put_u64(b, n);
        } else {
            format_double(num, sizeof(num), (double)n + fr);
            puts_(b, num);
        }
        puts_(b, "\n");
        break;
    }
    case MET_GAUGE:
        format_double(num, sizeof(num), met_gauge_value((const met_gauge *)s));
        put_series_name(b, f, "", s, NULL);
        puts_(b, " ");
        puts_(b, num);
        puts_(b, "\n");
        break;
    case MET_HISTOGRAM: {
        const met_histogram *h = (const met_histogram *)s;
        uint64_t cum = 0;
        for (size_t i = 0; i <= f->nbounds; i++) {
            cum += atomic_load_explicit(&h->counts[i], memory_order_relaxed);
            put_series_name(b, f, "_bucket", s, f->le[i]);
            puts_(b, " ");
            put_u64(b, cum);
            puts_(b, "\n");
        }
        put_series_name(b, f, "_sum", s, NULL);
        format_double(num, sizeof(num), met_histogram_sum(h));
        puts_(b, " ");
        puts_(b, num);
        puts_(b, "\n");
        put_series_name(b, f, "_count", s, NULL);
        puts_(b, " ");
        put_u64(b, cum);
        puts_(b, "\n");
        break;
    }
    }
}

int met_render(met_registry *r, char **out, size_t *len)
{
    if (!r || !out) return TD_EINVAL;
    *out = NULL;
    if (len) *len = 0;
    struct buf b = {0};
    put(&b, "", 0); /* an empty registry renders as "" */
    pthread_mutex_lock(&r->mu);
    for (size_t i = 0; i < r->nfams; i++) {
        met_family *f = r->fams[i];
        puts_(&b, "# HELP ");
        puts_(&b, f->name);
        puts_(&b, " ");
        put_escaped(&b, f->help, false);
        puts_(&b, "\n# TYPE ");
        puts_(&b, f->name);
        puts_(&b, " ");
        puts_(&b, type_names[f->type]);
        puts_(&b, "\n");
        pthread_mutex_lock(&f->mu);
        for (size_t k = 0; k < f->nseries; k++)
            render_series(&b, f, f->series[k]);
        pthread_mutex_unlock(&f->mu);
    }
    pthread_mutex_unlock(&r->mu);
    if (b.failed) {
        free(b.s);
        return TD_ENOMEM;
    }
    *out = b.s;
    if (len) *len = b.len;
    return 0;
}
