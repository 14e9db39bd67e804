/* metrics: counters, gauges and histograms, rendered in the Prometheus text
 * exposition format, version 0.0.4 (what GET /metrics serves).
 *
 * A registry holds families. A family has a name, a help line, a type, and
 * 0..MET_MAX_LABELS label names fixed at creation. A family holds series,
 * one per distinct tuple of label values, created on first lookup.
 *
 *     met_family *f;
 *     met_counter_family(reg, "tandem_requests_total", "Requests by result.",
 *                        (const char *[]){"result"}, 1, &f);
 *     met_counter *ok;
 *     met_counter_get(f, (const char *[]){"ok"}, &ok);   -- once, at set-up
 *     met_counter_inc(ok);                                -- hot path
 *
 * Hot path: updates (inc/add/set/observe) are lock-free atomics on the
 * series; nothing is allocated and no lock is taken. Lookups (the *_get
 * functions) take the family's mutex and may allocate: look series up once
 * and keep the pointer. Rendering takes the registry's and each family's
 * mutex, never blocking updates.
 *
 * Lifetime: families and series live until met_registry_free; every pointer
 * handed out is owned by the registry and stays valid (and stable) until then.
 * All functions are thread-safe.
 *
 * Limits (lookups past them fail, never silently drop):
 *   MET_MAX_LABELS label names per family, MET_MAX_LABEL_VALUE bytes per
 *   label value (valid UTF-8), MET_MAX_SERIES series per family (TD_ENOSPC:
 *   a guard against unbounded label values such as request ids),
 *   MET_MAX_BUCKETS bucket bounds per histogram.
 *
 * Names: metric names match [a-zA-Z_:][a-zA-Z0-9_:]* and start with the
 * registry's prefix ("tandem_" in the product); label names match
 * [a-zA-Z_][a-zA-Z0-9_]* and do not start with "__"; "le" is reserved in
 * histograms. A name that would produce the same sample names as another
 * family (x and x_count of histogram x) is refused with TD_EEXIST.
 */
#ifndef TANDEM_COMMON_METRICS_H
#define TANDEM_COMMON_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define MET_MAX_LABELS      8
#define MET_MAX_LABEL_VALUE 256
#define MET_MAX_SERIES      4096
#define MET_MAX_BUCKETS     64
#define MET_MAX_NAME        200

/* Content-Type header for what met_render produces. */
#define MET_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

typedef struct met_registry met_registry;
typedef struct met_family met_family;
typedef struct met_counter met_counter;
typedef struct met_gauge met_gauge;
typedef struct met_histogram met_histogram;

/* Latency buckets in seconds, 1 ms .. 60 s, for TTFT, inter-token and e2e
 * latency histograms. */
extern const double met_latency_buckets[];
extern const size_t met_latency_nbuckets;

/* Creates an empty registry. prefix ("tandem_") is required at the start of
 * every metric name; "" allows any valid name. prefix is copied.
 * Returns 0, TD_EINVAL or TD_ENOMEM. */
int met_registry_create(met_registry **out, const char *prefix);

/* Frees the registry, its families and series. No other thread may use them
 * any more. NULL is fine. */
void met_registry_free(met_registry *r);

/* Registers a family. name, help and label_names (nlabels of them; may be
 * NULL when nlabels is 0) are copied. help may be any UTF-8 text; it is
 * escaped on output. *out is owned by r.
 * Returns 0, TD_EINVAL (bad name, label name, help or bounds), TD_EEXIST
 * (name taken) or TD_ENOMEM. */
int met_counter_family(met_registry *r, const char *name, const char *help,
                       const char *const *label_names, size_t nlabels, met_family **out);
int met_gauge_family(met_registry *r, const char *name, const char *help,
                     const char *const *label_names, size_t nlabels, met_family **out);
/* bounds: nbounds (1..MET_MAX_BUCKETS) finite upper bounds, strictly
 * increasing, copied; a +Inf bucket is always added. An observation v falls
 * in the first bucket with v <= bound. */
int met_histogram_family(met_registry *r, const char *name, const char *help,
                         const char *const *label_names, size_t nlabels, const double *bounds,
                         size_t nbounds, met_family **out);

/* Finds or creates the series with these label values (nlabels of them, in
 * the order of the family's label names; NULL when the family has none).
 * Values are copied. *out is owned by the registry.
 * Returns 0, TD_EINVAL (wrong family type, a NULL, too long or non-UTF-8
 * value), TD_ENOSPC (MET_MAX_SERIES reached) or TD_ENOMEM. */
int met_counter_get(met_family *f, const char *const *label_values, met_counter **out);
int met_gauge_get(met_family *f, const char *const *label_values, met_gauge **out);
int met_histogram_get(met_family *f, const char *const *label_values, met_histogram **out);

/* Shorthands for a family without labels and its only series. */
int met_counter_new(met_registry *r, const char *name, const char *help, met_counter **out);
int met_gauge_new(met_registry *r, const char *name, const char *help, met_gauge **out);
int met_histogram_new(met_registry *r, const char *name, const char *help, const double *bounds,
                      size_t nbounds, met_histogram **out);

/* Hot path (lock-free). Counters only go up: met_counter_add_f ignores
 * negative and NaN amounts. Integer amounts are exact up to 2^64. */
void met_counter_inc(met_counter *c);
void met_counter_add(met_counter *c, uint64_t n);
void met_counter_add_f(met_counter *c, double v);
void met_gauge_set(met_gauge *g, double v);
void met_gauge_add(met_gauge *g, double delta);
/* NaN observations are dropped. */
void met_histogram_observe(met_histogram *h, double v);

/* Current values (for tests and for code that reads its own metrics). */
double met_counter_value(const met_counter *c);
double met_gauge_value(const met_gauge *g);
uint64_t met_histogram_count(const met_histogram *h);
double met_histogram_sum(const met_histogram *h);

/* Renders every family, in registration order, as Prometheus text format
 * 0.0.4 (serve it with MET_CONTENT_TYPE). *out is malloc'd,
 * NUL-terminated, *len bytes without the NUL; the caller frees it.
 * Within one histogram series the +Inf bucket always equals _count even while
 * other threads observe (both come from one pass over the buckets); _sum may
 * lag by in-flight observations. Returns 0 or TD_ENOMEM. */
int met_render(met_registry *r, char **out, size_t *len);

#endif
