/* Unit tests for common/metrics. The rendered text is checked two ways: as an
 * exact string for a small registry, and by a validating parser of the
 * Prometheus text format 0.0.4 written here (line grammar, HELP/TYPE rules,
 * label escaping, histogram invariants), which is itself tested on bad input.
 * Run with --bench for update costs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "common/metrics.h"
#include "fail_alloc.h"

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a validating parser for the exposition format ---------------------- */

#define V_MAX_FAMS 64
#define V_MAX_KEYS 2048
#define V_MAX_HIST 256
#define V_TEXT     512

struct v_fam {
    char name[V_TEXT];
    char type[16]; /* "" until TYPE */
    bool help, closed, has_samples;
};

struct v_hist {
    int fam;
    char labels[V_TEXT]; /* label pairs without le, as written */
    double last_le;
    uint64_t last_cum;
    int nbuckets;
    bool inf, sum, count;
    uint64_t inf_cum, count_value;
};

struct v_state {
    struct v_fam fams[V_MAX_FAMS];
    int nfams;
    int current; /* family of the previous line, -1 at start */
    char *keys[V_MAX_KEYS];
    int nkeys;
    struct v_hist hist[V_MAX_HIST];
    int nhist;
    char err[V_TEXT + 128];
    int line;
};

static bool v_fail(struct v_state *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool v_fail(struct v_state *s, const char *fmt, ...)
{
    int n = snprintf(s->err, sizeof(s->err), "line %d: ", s->line);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err + n, sizeof(s->err) - (size_t)n, fmt, ap);
    va_end(ap);
    return false;
}

static bool is_name_start(char c, bool colon)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
}

static bool is_name_char(char c, bool colon)
{
    return is_name_start(c, colon) || (c >= '0' && c <= '9');
}

/* Reads a metric (colon true) or label name at *p into out. */
static bool v_name(const char **p, char *out, bool colon)
{
    const char *s = *p;
    if (!is_name_start(*s, colon)) return false;
    size_t n = 0;
    while (is_name_char(*s, colon) && n + 1 < V_TEXT)
        out[n++] = *s++;
    out[n] = '\0';
    *p = s;
    return true;
}

/* Go's ParseFloat spellings as Prometheus writes them. */
static bool v_float(const char *s, double *out)
{
    if (strcmp(s, "+Inf") == 0) {
        *out = INFINITY;
        return true;
    }
    if (strcmp(s, "-Inf") == 0) {
        *out = -INFINITY;
        return true;
    }
    if (strcmp(s, "NaN") == 0) {
        *out = NAN;
        return true;
    }
    if (!*s || strchr(s, 'x') || strchr(s, 'X') || strchr(s, 'n') || strchr(s, 'N') ||
        strchr(s, 'i') || strchr(s, 'I'))
        return false;
    char *end;
    *out = strtod(s, &end);
    return *end == '\0';
}

static int v_family_of_line(struct v_state *s, int fam)
{
    if (fam != s->current) {
        if (s->fams[fam].closed) return -1;
        if (s->current >= 0) s->fams[s->current].closed = true;
        s->current = fam;
    }
    return fam;
}

static int v_find_fam(struct v_state *s, const char *name)
{
    for (int i = 0; i < s->nfams; i++)
        if (strcmp(s->fams[i].name, name) == 0) return i;
    return -1;
}

static int v_add_fam(struct v_state *s, const char *name)
{
    int i = v_find_fam(s, name);
    if (i >= 0 || s->nfams == V_MAX_FAMS) return i;
    snprintf(s->fams[s->nfams].name, V_TEXT, "%s", name);
    return s->nfams++;
}

static bool v_help_text(const char *p)
{
    for (; *p; p++) {
        if (*p == '\\') {
            p++;
            if (*p != '\\' && *p != 'n') return false;
        }
    }
    return true;
}

static bool v_comment(struct v_state *s, const char *line)
{
    bool help = strncmp(line, "# HELP ", 7) == 0;
    bool type = strncmp(line, "# TYPE ", 7) == 0;
    if (!help && !type) return true; /* a plain comment */
    const char *p = line + 7;
    char name[V_TEXT];
    if (!v_name(&p, name, true)) return v_fail(s, "bad metric name in %s", help ? "HELP" : "TYPE");
    if (*p != ' ') return v_fail(s, "expected a space after the name");
    p++;
    int fam = v_add_fam(s, name);
    if (fam < 0) return v_fail(s, "too many families");
    if (v_family_of_line(s, fam) < 0) return v_fail(s, "family %s is not contiguous", name);
    struct v_fam *f = &s->fams[fam];
    if (f->has_samples)
        return v_fail(s, "%s for %s after its samples", help ? "HELP" : "TYPE", name);
    if (help) {
        if (f->help) return v_fail(s, "second HELP for %s", name);
        if (!v_help_text(p)) return v_fail(s, "bad escape in HELP text");
        f->help = true;
        return true;
    }
    if (f->type[0]) return v_fail(s, "second TYPE for %s", name);
    static const char *const types[] = {"counter", "gauge", "histogram", "summary", "untyped"};
    for (size_t i = 0; i < 5; i++) {
        if (strcmp(p, types[i]) == 0) {
            snprintf(f->type, sizeof(f->type), "%s", p);
            return true;
        }
    }
    return v_fail(s, "unknown type '%s'", p);
}

static struct v_hist *v_hist_of(struct v_state *s, int fam, const char *labels)
{
    for (int i = 0; i < s->nhist; i++)
        if (s->hist[i].fam == fam && strcmp(s->hist[i].labels, labels) == 0) return &s->hist[i];
    if (s->nhist == V_MAX_HIST) return NULL;
    struct v_hist *h = &s->hist[s->nhist++];
    memset(h, 0, sizeof(*h));
    h->fam = fam;
    h->last_le = -INFINITY;
    snprintf(h->labels, sizeof(h->labels), "%s", labels);
    return h;
}

static void v_append(char *dst, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void v_append(char *dst, size_t cap, const char *fmt, ...)
{
    size_t len = strlen(dst);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst + len, cap - len, fmt, ap);
    va_end(ap);
}

static bool v_sample(struct v_state *s, const char *line)
{
    const char *p = line;
    char name[V_TEXT], lname[V_TEXT];
    if (!v_name(&p, name, true)) return v_fail(s, "bad metric name");
    char others[V_TEXT] = ""; /* label pairs except le, canonical text */
    char le[V_TEXT] = "";
    bool has_le = false;
    char seen[MET_MAX_LABELS + 2][V_TEXT];
    int nseen = 0;
    if (*p == '{') {
        p++;
        while (*p != '}') {
            if (!v_name(&p, lname, false)) return v_fail(s, "bad label name");
            if (strncmp(lname, "__", 2) == 0) return v_fail(s, "reserved label name %s", lname);
            for (int i = 0; i < nseen; i++)
                if (strcmp(seen[i], lname) == 0) return v_fail(s, "label %s twice", lname);
            if (nseen < MET_MAX_LABELS + 2) snprintf(seen[nseen++], V_TEXT, "%s", lname);
            if (p[0] != '=' || p[1] != '"') return v_fail(s, "expected =\" after label name");
            p += 2;
            char value[V_TEXT];
            size_t n = 0;
            const char *raw = p;
            while (*p != '"') {
                if (!*p) return v_fail(s, "unterminated label value");
                if (*p == '\\') {
                    p++;
                    if (*p != '\\' && *p != '"' && *p != 'n')
                        return v_fail(s, "bad escape \\%c in label value", *p ? *p : '0');
                }
                if (n + 1 < sizeof(value)) value[n++] = *p;
                p++;
            }
            value[n] = '\0';
            size_t rawlen = (size_t)(p - raw);
            p++;
            if (strcmp(lname, "le") == 0) {
                has_le = true;
                snprintf(le, sizeof(le), "%s", value);
            } else {
                v_append(others, sizeof(others), "%s%s=\"%.*s\"", others[0] ? "," : "", lname,
                         (int)rawlen, raw);
            }
            if (*p == ',')
                p++;
            else if (*p != '}')
                return v_fail(s, "expected , or } after label value");
        }
        p++;
    }
    if (*p != ' ') return v_fail(s, "expected a space before the value");
    p++;
    char valtext[64];
    size_t n = 0;
    while (*p && *p != ' ' && n + 1 < sizeof(valtext))
        valtext[n++] = *p++;
    valtext[n] = '\0';
    double value;
    if (!v_float(valtext, &value)) return v_fail(s, "bad value '%s'", valtext);
    if (*p == ' ') { /* optional timestamp: an int64 */
        p++;
        if (*p == '-') p++;
        if (!*p) return v_fail(s, "empty timestamp");
        for (; *p; p++)
            if (*p < '0' || *p > '9') return v_fail(s, "bad timestamp");
    }

    /* Which family? Exact name, or a histogram's _bucket/_sum/_count. */
    int fam = v_find_fam(s, name);
    const char *suffix = "";
    if (fam < 0 || !s->fams[fam].type[0]) {
        static const char *const sfx[] = {"_bucket", "_sum", "_count"};
        fam = -1;
        for (int i = 0; i < 3 && fam < 0; i++) {
            size_t ln = strlen(name), ls = strlen(sfx[i]);
            if (ln > ls && strcmp(name + ln - ls, sfx[i]) == 0) {
                char base[V_TEXT];
                snprintf(base, sizeof(base), "%.*s", (int)(ln - ls), name);
                int b = v_find_fam(s, base);
                if (b >= 0 && strcmp(s->fams[b].type, "histogram") == 0) {
                    fam = b;
                    suffix = sfx[i];
                }
            }
        }
    }
    if (fam < 0) return v_fail(s, "sample %s before (or without) its TYPE line", name);
    if (v_family_of_line(s, fam) < 0) return v_fail(s, "family of %s is not contiguous", name);
    struct v_fam *f = &s->fams[fam];
    f->has_samples = true;
    if (strcmp(f->type, "histogram") == 0 && suffix[0] == '\0')
        return v_fail(s, "histogram %s has a sample without suffix", name);

    /* No two samples with the same name and labels. */
    char key[3 * V_TEXT + 16];
    snprintf(key, sizeof(key), "%s{%s,le=%s}", name, others, le);
    for (int i = 0; i < s->nkeys; i++)
        if (strcmp(s->keys[i], key) == 0) return v_fail(s, "duplicate sample %s", key);
    if (s->nkeys < V_MAX_KEYS) s->keys[s->nkeys++] = strdup(key);

    if (strcmp(f->type, "counter") == 0 && !(value >= 0))
        return v_fail(s, "counter %s is negative or NaN", name);
    if (strcmp(f->type, "histogram") != 0) {
        if (has_le) return v_fail(s, "le label outside a histogram bucket");
        return true;
    }
    struct v_hist *h = v_hist_of(s, fam, others);
    if (!h) return v_fail(s, "too many histogram series");
    if (strcmp(suffix, "_bucket") == 0) {
        double bound;
        if (!has_le || !v_float(le, &bound) || isnan(bound))
            return v_fail(s, "bucket without a valid le");
        if (h->inf) return v_fail(s, "bucket after the +Inf bucket");
        if (!(bound > h->last_le)) return v_fail(s, "le %s not increasing", le);
        if (!(value >= 0) || value != floor(value))
            return v_fail(s, "bucket count %s not a whole number", valtext);
        uint64_t cum = (uint64_t)value;
        if (h->nbuckets && cum < h->last_cum)
            return v_fail(s, "bucket counts not cumulative (%llu after %llu)",
                          (unsigned long long)cum, (unsigned long long)h->last_cum);
        h->last_le = bound;
        h->last_cum = cum;
        h->nbuckets++;
        if (isinf(bound)) {
            h->inf = true;
            h->inf_cum = cum;
        }
    } else if (has_le) {
        return v_fail(s, "le label on %s", name);
    } else if (strcmp(suffix, "_sum") == 0) {
        if (h->sum) return v_fail(s, "second _sum");
        h->sum = true;
    } else {
        if (h->count) return v_fail(s, "second _count");
        if (!(value >= 0) || value != floor(value)) return v_fail(s, "_count not a whole number");
        h->count = true;
        h->count_value = (uint64_t)value;
    }
    return true;
}

/* Returns NULL when text is valid exposition format, else a message (owned
 * by the caller's state). */
static const char *validate(struct v_state *s, const char *text)
{
    memset(s, 0, sizeof(*s));
    s->current = -1;
    bool ok = true;
    if (*text && text[strlen(text) - 1] != '\n') {
        ok = v_fail(s, "text does not end with a newline");
    }
    const char *p = text;
    while (ok && *p) {
        s->line++;
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char *line = strndup(p, len);
        assert_non_null(line);
        if (len == 0)
            ok = v_fail(s, "empty line");
        else if (line[0] == '#')
            ok = v_comment(s, line);
        else
            ok = v_sample(s, line);
        free(line);
        p += len + (nl ? 1 : 0);
    }
    for (int i = 0; ok && i < s->nhist; i++) {
        struct v_hist *h = &s->hist[i];
        const char *name = s->fams[h->fam].name;
        if (!h->inf)
            ok = v_fail(s, "histogram %s{%s} has no +Inf bucket", name, h->labels);
        else if (!h->count || !h->sum)
            ok = v_fail(s, "histogram %s{%s} lacks _count or _sum", name, h->labels);
        else if (h->count_value != h->inf_cum)
            ok = v_fail(s, "histogram %s{%s}: +Inf bucket %llu != _count %llu", name, h->labels,
                        (unsigned long long)h->inf_cum, (unsigned long long)h->count_value);
    }
    for (int i = 0; i < s->nkeys; i++)
        free(s->keys[i]);
    s->nkeys = 0;
    return ok ? NULL : s->err;
}

static void assert_valid(const char *text)
{
    struct v_state *s = malloc(sizeof(*s));
    assert_non_null(s);
    const char *err = validate(s, text);
    if (err) fail_msg("invalid exposition text: %s\n%s", err, text);
    free(s);
}

/* The validator must reject what the format forbids, or it proves nothing. */
static void test_validator_rejects(void **state)
{
    (void)state;
    static const struct {
        const char *text, *why;
    } bad[] = {
        {"# TYPE a counter\na 1", "does not end with a newline"},
        {"a 1\n", "before (or without) its TYPE"},
        {"# TYPE a counter\na 1\n# HELP a x\n", "after its samples"},
        {"# TYPE a counter\n# TYPE a counter\n", "second TYPE"},
        {"# HELP a x\n# HELP a y\n", "second HELP"},
        {"# HELP a bad \\t escape\n", "bad escape in HELP"},
        {"# TYPE a countr\n", "unknown type"},
        {"# TYPE 1a counter\n", "bad metric name"},
        {"# TYPE a counter\na{b=\"x\\t\"} 1\n", "bad escape"},
        {"# TYPE a counter\na{b=\"x} 1\n", "unterminated"},
        {"# TYPE a counter\na{b=\"x\"c=\"y\"} 1\n", "expected , or }"},
        {"# TYPE a counter\na{b=\"1\",b=\"2\"} 1\n", "label b twice"},
        {"# TYPE a counter\na{__b=\"1\"} 1\n", "reserved label"},
        {"# TYPE a counter\na{b=\"1\"} 1\na{b=\"1\"} 2\n", "duplicate sample"},
        {"# TYPE a counter\na -1\n", "negative"},
        {"# TYPE a counter\na one\n", "bad value"},
        {"# TYPE a counter\na  1\n", "bad value"},
        {"# TYPE a counter\na 1 12x\n", "bad timestamp"},
        {"# TYPE a counter\n# TYPE b gauge\nb 1\na 2\n", "not contiguous"},
        {"# TYPE a counter\n\na 1\n", "empty line"},
        {"# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"0.5\"} 2\n", "not increasing"},
        {"# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n", "not cumulative"},
        {"# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", "no +Inf"},
        {"# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", "!= _count"},
        {"# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n", "lacks _count or _sum"},
        {"# TYPE h histogram\nh_bucket 2\n", "without a valid le"},
        {"# TYPE h histogram\nh 2\n", "without suffix"},
        {"# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_bucket{le=\"+Inf\"} 1\n", "duplicate"},
        {"# TYPE g gauge\ng{le=\"1\"} 1\n", "le label outside"},
    };
    struct v_state *s = malloc(sizeof(*s));
    assert_non_null(s);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *err = validate(s, bad[i].text);
        if (!err || !strstr(err, bad[i].why))
            fail_msg("validator case %zu: got '%s', want '%s'", i, err ? err : "(accepted)",
                     bad[i].why);
    }
    /* And accepts what the format allows (comments, timestamps, NaN). */
    assert_null(validate(s, "# just a comment\n# TYPE a gauge\na{b=\"\\\"\\n\\\\\"} NaN 123\n"
                            "# TYPE h histogram\nh_bucket{x=\"1\",le=\"0.5\"} 0\n"
                            "h_bucket{x=\"1\",le=\"+Inf\"} 3\nh_sum{x=\"1\"} 2.5\n"
                            "h_count{x=\"1\"} 3\n"));
    assert_null(validate(s, ""));
    free(s);
}

/* ---- the registry ------------------------------------------------------- */

static void test_exact_text(void **state)
{
    (void)state;
    met_registry *r;
    assert_int_equal(met_registry_create(&r, "tandem_"), 0);
    met_family *req;
    assert_int_equal(met_counter_family(r, "tandem_requests_total",
                                        "Requests by route and code.\nEscapes: \\ and \"",
                                        (const char *[]){"route", "code"}, 2, &req),
                     0);
    met_counter *ok, *odd;
    assert_int_equal(met_counter_get(req, (const char *[]){"/v1/completions", "200"}, &ok), 0);
    assert_int_equal(met_counter_get(req, (const char *[]){"a\"b\\c\nd", "500"}, &odd), 0);
    met_counter *again;
    assert_int_equal(met_counter_get(req, (const char *[]){"/v1/completions", "200"}, &again), 0);
    assert_ptr_equal(ok, again); /* same labels, same series */
    met_counter_inc(ok);
    met_counter_add(ok, 41);
    met_counter_inc(odd);

    met_gauge *free_blocks;
    assert_int_equal(met_gauge_new(r, "tandem_kv_blocks_free", "Free KV blocks.", &free_blocks), 0);
    met_gauge_set(free_blocks, 100);
    met_gauge_add(free_blocks, -57.5);

    met_histogram *ttft;
    const double bounds[] = {0.125, 0.5, 1};
    assert_int_equal(
        met_histogram_new(r, "tandem_ttft_seconds", "Time to first token.", bounds, 3, &ttft), 0);
    met_histogram_observe(ttft, 0.0625);
    met_histogram_observe(ttft, 0.125); /* on the bound: counted in le="0.125" */
    met_histogram_observe(ttft, 0.75);
    met_histogram_observe(ttft, 4);
    met_histogram_observe(ttft, NAN); /* dropped */

    met_counter *bytes;
    assert_int_equal(met_counter_new(r, "tandem_kvx_seconds_total", "Transfer time.", &bytes), 0);
    met_counter_add_f(bytes, 0.25);
    met_counter_add_f(bytes, -1); /* ignored: counters only go up */
    met_counter_add(bytes, 2);

    met_family *empty;
    assert_int_equal(
        met_gauge_family(r, "tandem_queue_depth", "", (const char *[]){"queue"}, 1, &empty), 0);

    char *text;
    size_t len;
    assert_int_equal(met_render(r, &text, &len), 0);
    const char *want = "# HELP tandem_requests_total Requests by route and code.\\nEscapes: \\\\ "
                       "and \"\n"
                       "# TYPE tandem_requests_total counter\n"
                       "tandem_requests_total{route=\"/v1/completions\",code=\"200\"} 42\n"
                       "tandem_requests_total{route=\"a\\\"b\\\\c\\nd\",code=\"500\"} 1\n"
                       "# HELP tandem_kv_blocks_free Free KV blocks.\n"
                       "# TYPE tandem_kv_blocks_free gauge\n"
                       "tandem_kv_blocks_free 42.5\n"
                       "# HELP tandem_ttft_seconds Time to first token.\n"
                       "# TYPE tandem_ttft_seconds histogram\n"
                       "tandem_ttft_seconds_bucket{le=\"0.125\"} 2\n"
                       "tandem_ttft_seconds_bucket{le=\"0.5\"} 2\n"
                       "tandem_ttft_seconds_bucket{le=\"1\"} 3\n"
                       "tandem_ttft_seconds_bucket{le=\"+Inf\"} 4\n"
                       "tandem_ttft_seconds_sum 4.9375\n"
                       "tandem_ttft_seconds_count 4\n"
                       "# HELP tandem_kvx_seconds_total Transfer time.\n"
                       "# TYPE tandem_kvx_seconds_total counter\n"
                       "tandem_kvx_seconds_total 2.25\n"
                       "# HELP tandem_queue_depth \n"
                       "# TYPE tandem_queue_depth gauge\n";
    assert_string_equal(text, want);
    assert_int_equal(len, strlen(want));
    assert_valid(text);
    free(text);

    assert_true(met_counter_value(ok) == 42);
    assert_true(met_gauge_value(free_blocks) == 42.5);
    assert_int_equal(met_histogram_count(ttft), 4);
    assert_true(met_histogram_sum(ttft) == 4.9375);
    met_registry_free(r);
    met_registry_free(NULL);
}

static void test_number_formatting(void **state)
{
    (void)state;
    met_registry *r;
    assert_int_equal(met_registry_create(&r, ""), 0);
    static const struct {
        double v;
        const char *text;
    } cases[] = {
        {0.1, "0.1"},
        {1e-9, "1e-09"},
        {123456789.0, "123456789"},
        {-2.5, "-2.5"},
        {INFINITY, "+Inf"},
        {-INFINITY, "-Inf"},
        {NAN, "NaN"},
        {10, "10"},
        {1e20, "100000000000000000000"},
        {1e21, "1e+21"},
        {0.0001, "0.0001"},
        {0.00001, "1e-05"},
        {-0.0, "-0"},
        {1e300, "1e+300"},
        {4.9375, "4.9375"},
        {2.5e-7, "2.5e-07"},
        {1.0 / 3, "0.3333333333333333"},
    };
    met_gauge *g;
    assert_int_equal(met_gauge_new(r, "g", "g", &g), 0);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        met_gauge_set(g, cases[i].v);
        char *text;
        assert_int_equal(met_render(r, &text, NULL), 0);
        char want[128];
        snprintf(want, sizeof(want), "# HELP g g\n# TYPE g gauge\ng %s\n", cases[i].text);
        assert_string_equal(text, want);
        assert_valid(text);
        free(text);
    }
    /* Random doubles: the text reads back exactly and is never longer than
     * %.17g; counters print integers exactly up to 2^64-1. */
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < 3000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        double v;
        memcpy(&v, &x, sizeof(v));
        if (!isfinite(v)) continue;
        if (i % 3 == 0) v = (double)(x % 100000) / 1000.0; /* short decimals too */
        met_gauge_set(g, v);
        char *text;
        assert_int_equal(met_render(r, &text, NULL), 0);
        const char *num = strstr(text, "\ng ") + 3;
        char *end;
        double back = strtod(num, &end);
        assert_true(*end == '\n');
        char longest[40];
        snprintf(longest, sizeof(longest), "%.17g", v);
        if (back != v || (size_t)(end - num) > strlen(longest))
            fail_msg("%.17g rendered as %.*s", v, (int)(end - num), num);
        free(text);
    }
    met_counter *big;
    assert_int_equal(met_counter_new(r, "big_total", "b", &big), 0);
    met_counter_add(big, UINT64_MAX);
    char *btext;
    assert_int_equal(met_render(r, &btext, NULL), 0);
    assert_non_null(strstr(btext, "\nbig_total 18446744073709551615\n"));
    free(btext);
    /* Latency buckets render as valid, increasing le values. */
    met_histogram *h;
    assert_int_equal(met_histogram_new(r, "lat_seconds", "Latency.", met_latency_buckets,
                                       met_latency_nbuckets, &h),
                     0);
    for (int i = 0; i < 100; i++)
        met_histogram_observe(h, i * 0.7);
    char *text;
    assert_int_equal(met_render(r, &text, NULL), 0);
    assert_non_null(strstr(text, "lat_seconds_bucket{le=\"0.0025\"} 1\n"));
    assert_non_null(strstr(text, "lat_seconds_bucket{le=\"10\"} 15\n"));
    assert_non_null(strstr(text, "lat_seconds_bucket{le=\"60\"} 86\n"));
    assert_non_null(strstr(text, "lat_seconds_bucket{le=\"+Inf\"} 100\n"));
    assert_valid(text);
    free(text);
    met_registry_free(r);
}

static void test_errors(void **state)
{
    (void)state;
    met_registry *r;
    met_family *f = (met_family *)&f;
    assert_int_equal(met_registry_create(NULL, "tandem_"), TD_EINVAL);
    assert_int_equal(met_registry_create(&r, NULL), TD_EINVAL);
    assert_int_equal(met_registry_create(&r, "bad-prefix"), TD_EINVAL);
    assert_int_equal(met_registry_create(&r, "tandem_"), 0);
    enum td_log_level level = td_log_get_level();
    td_log_set_level(TD_LOG_OFF); /* each refusal logs; keep the output clean */

    /* Names. */
    assert_int_equal(met_counter_family(r, "other_total", "h", NULL, 0, &f), TD_EINVAL);
    assert_null(f);
    assert_int_equal(met_counter_family(r, "tandem_bad-name", "h", NULL, 0, &f), TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_", "h", NULL, 0, &f), 0);
    assert_int_equal(met_counter_family(r, "tandem_a:b_total", "h", NULL, 0, &f), 0);
    assert_int_equal(met_counter_family(r, "tandem_é", "h", NULL, 0, &f), TD_EINVAL);
    assert_int_equal(met_counter_family(r, NULL, "h", NULL, 0, &f), TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_x", NULL, NULL, 0, &f), TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_x", "bad utf8 \xff", NULL, 0, &f), TD_EINVAL);
    assert_int_equal(met_counter_family(NULL, "tandem_x", "h", NULL, 0, &f), TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_x", "h", NULL, 0, NULL), TD_EINVAL);
    /* Label names. */
    assert_int_equal(met_counter_family(r, "tandem_l", "h", (const char *[]){"1a"}, 1, &f),
                     TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_l", "h", (const char *[]){"__x"}, 1, &f),
                     TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_l", "h", (const char *[]){"a:b"}, 1, &f),
                     TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_l", "h", (const char *[]){"a", "a"}, 2, &f),
                     TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_l", "h", NULL, 1, &f), TD_EINVAL);
    const char *many[MET_MAX_LABELS + 1] = {"a", "b", "c", "d", "e", "f", "g", "h", "i"};
    assert_int_equal(met_counter_family(r, "tandem_l", "h", many, MET_MAX_LABELS + 1, &f),
                     TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_l", "h", many, MET_MAX_LABELS, &f), 0);
    const double b[] = {1, 2};
    assert_int_equal(met_histogram_family(r, "tandem_h1", "h", (const char *[]){"le"}, 1, b, 2, &f),
                     TD_EINVAL);
    assert_int_equal(met_counter_family(r, "tandem_le", "h", (const char *[]){"le"}, 1, &f), 0);
    /* Buckets. */
    assert_int_equal(met_histogram_family(r, "tandem_h1", "h", NULL, 0, NULL, 0, &f), TD_EINVAL);
    assert_int_equal(met_histogram_family(r, "tandem_h1", "h", NULL, 0, b, 0, &f), TD_EINVAL);
    assert_int_equal(
        met_histogram_family(r, "tandem_h1", "h", NULL, 0, (const double[]){2, 1}, 2, &f),
        TD_EINVAL);
    assert_int_equal(
        met_histogram_family(r, "tandem_h1", "h", NULL, 0, (const double[]){1, 1}, 2, &f),
        TD_EINVAL);
    assert_int_equal(
        met_histogram_family(r, "tandem_h1", "h", NULL, 0, (const double[]){1, INFINITY}, 2, &f),
        TD_EINVAL);
    assert_int_equal(
        met_histogram_family(r, "tandem_h1", "h", NULL, 0, (const double[]){NAN}, 1, &f),
        TD_EINVAL);
    double lots[MET_MAX_BUCKETS + 1];
    for (int i = 0; i <= MET_MAX_BUCKETS; i++)
        lots[i] = i;
    assert_int_equal(
        met_histogram_family(r, "tandem_h1", "h", NULL, 0, lots, MET_MAX_BUCKETS + 1, &f),
        TD_EINVAL);
    assert_int_equal(met_histogram_family(r, "tandem_h1", "h", NULL, 0, lots, MET_MAX_BUCKETS, &f),
                     0);
    /* Name clashes, including with a histogram's derived sample names. */
    assert_int_equal(met_gauge_family(r, "tandem_h1", "h", NULL, 0, &f), TD_EEXIST);
    assert_int_equal(met_gauge_family(r, "tandem_h1_count", "h", NULL, 0, &f), TD_EEXIST);
    assert_int_equal(met_gauge_family(r, "tandem_h1_bucket", "h", NULL, 0, &f), TD_EEXIST);
    assert_int_equal(met_gauge_family(r, "tandem_h1_sum", "h", NULL, 0, &f), TD_EEXIST);
    assert_int_equal(met_gauge_family(r, "tandem_h1_total", "h", NULL, 0, &f), 0);
    assert_int_equal(met_gauge_family(r, "tandem_h2_sum", "h", NULL, 0, &f), 0);
    assert_int_equal(met_histogram_family(r, "tandem_h2", "h", NULL, 0, b, 2, &f), TD_EEXIST);

    /* Series lookups. */
    met_family *fam;
    assert_int_equal(
        met_counter_family(r, "tandem_s_total", "h", (const char *[]){"a", "b"}, 2, &fam), 0);
    met_counter *c = (met_counter *)&c;
    met_gauge *g;
    assert_int_equal(met_counter_get(fam, NULL, &c), TD_EINVAL);
    assert_null(c);
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", NULL}, &c), TD_EINVAL);
    assert_int_equal(met_gauge_get(fam, (const char *[]){"x", "y"}, &g), TD_EINVAL); /* type */
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "\xc3\x28"}, &c), TD_EINVAL);
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "\xed\xa0\x80"}, &c),
                     TD_EINVAL); /* surrogate */
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "\xc0\xaf"}, &c),
                     TD_EINVAL); /* overlong */
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "h\xc3\xa9"}, &c), 0); /* é */
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "\xf0\x9f\x98\x80"}, &c), 0);
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "\xf4\x90\x80\x80"}, &c),
                     TD_EINVAL); /* above U+10FFFF */
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "\xf0\x9f\x98"}, &c),
                     TD_EINVAL); /* cut short */
    char longv[MET_MAX_LABEL_VALUE + 2];
    memset(longv, 'v', sizeof(longv) - 1);
    longv[sizeof(longv) - 1] = '\0';
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", longv}, &c), TD_EINVAL);
    longv[MET_MAX_LABEL_VALUE] = '\0';
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", longv}, &c), 0);
    assert_int_equal(met_counter_get(NULL, NULL, &c), TD_EINVAL);
    assert_int_equal(met_counter_get(fam, (const char *[]){"x", "y"}, NULL), TD_EINVAL);
    /* ("ab","c") and ("a","bc") are different series. */
    met_counter *c1, *c2;
    assert_int_equal(met_counter_get(fam, (const char *[]){"ab", "c"}, &c1), 0);
    assert_int_equal(met_counter_get(fam, (const char *[]){"a", "bc"}, &c2), 0);
    assert_ptr_not_equal(c1, c2);

    /* The series cap guards against unbounded label values. */
    met_family *wide;
    assert_int_equal(met_gauge_family(r, "tandem_wide", "h", (const char *[]){"id"}, 1, &wide), 0);
    char id[32];
    for (int i = 0; i < MET_MAX_SERIES; i++) {
        snprintf(id, sizeof(id), "%d", i);
        assert_int_equal(met_gauge_get(wide, (const char *[]){id}, &g), 0);
    }
    assert_int_equal(met_gauge_get(wide, (const char *[]){"one-more"}, &g), TD_ENOSPC);
    assert_int_equal(met_gauge_get(wide, (const char *[]){"7"}, &g), 0); /* existing: fine */

    char *text;
    assert_int_equal(met_render(r, &text, NULL), 0);
    assert_valid(text);
    free(text);
    assert_int_equal(met_render(NULL, &text, NULL), TD_EINVAL);
    assert_int_equal(met_render(r, NULL, NULL), TD_EINVAL);
    td_log_set_level(level);
    met_registry_free(r);
}

/* Updates from many threads, while another thread renders and validates:
 * nothing is lost, and every snapshot is valid (+Inf == _count). */
enum { THREADS = 4, PER_THREAD = 50000 };

struct hot {
    met_counter *c;
    met_gauge *g;
    met_histogram *h;
    met_family *fam;
    int id;
};

static void *updater(void *arg)
{
    struct hot *t = arg;
    char label[16];
    snprintf(label, sizeof(label), "t%d", t->id);
    met_counter *mine;
    if (met_counter_get(t->fam, (const char *[]){label}, &mine) != 0) return (void *)1;
    for (int i = 0; i < PER_THREAD; i++) {
        met_counter_inc(t->c);
        met_counter_inc(mine);
        met_gauge_add(t->g, 1);
        met_histogram_observe(t->h, (double)(i % 8) * 0.25); /* sums stay exact */
    }
    return NULL;
}

struct scraper {
    met_registry *r;
    _Atomic int stop;
    _Atomic int scrapes;
    _Atomic int bad;
};

static void *scrape(void *arg)
{
    struct scraper *s = arg;
    struct v_state *v = malloc(sizeof(*v));
    while (v && !atomic_load(&s->stop)) {
        char *text;
        if (met_render(s->r, &text, NULL) != 0) {
            s->bad++;
            break;
        }
        if (validate(v, text)) s->bad++;
        free(text);
        s->scrapes++;
    }
    free(v);
    return NULL;
}

static void test_threads(void **state)
{
    (void)state;
    met_registry *r;
    assert_int_equal(met_registry_create(&r, "tandem_"), 0);
    struct hot t[THREADS];
    met_counter *c;
    met_gauge *g;
    met_histogram *h;
    met_family *fam;
    assert_int_equal(met_counter_new(r, "tandem_ops_total", "Ops.", &c), 0);
    assert_int_equal(met_gauge_new(r, "tandem_level", "Level.", &g), 0);
    const double bounds[] = {0.25, 0.5, 1};
    assert_int_equal(met_histogram_new(r, "tandem_step_seconds", "Step.", bounds, 3, &h), 0);
    assert_int_equal(met_counter_family(r, "tandem_by_thread_total", "Per thread.",
                                        (const char *[]){"thread"}, 1, &fam),
                     0);
    struct scraper sc = {.r = r};
    pthread_t scr, th[THREADS];
    assert_int_equal(pthread_create(&scr, NULL, scrape, &sc), 0);
    /* Let the scraper finish one pass first: on a loaded machine the updaters
     * could otherwise end before it ever runs. */
    while (atomic_load(&sc.scrapes) == 0 && sc.bad == 0)
        sched_yield();
    for (int i = 0; i < THREADS; i++) {
        t[i] = (struct hot){.c = c, .g = g, .h = h, .fam = fam, .id = i};
        assert_int_equal(pthread_create(&th[i], NULL, updater, &t[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        void *ret;
        assert_int_equal(pthread_join(th[i], &ret), 0);
        assert_null(ret);
    }
    atomic_store(&sc.stop, 1);
    assert_int_equal(pthread_join(scr, NULL), 0);
    assert_int_equal(sc.bad, 0);
    assert_true(sc.scrapes >= 1);

    const uint64_t total = (uint64_t)THREADS * PER_THREAD;
    assert_true(met_counter_value(c) == (double)total);
    assert_true(met_gauge_value(g) == (double)total);
    assert_int_equal(met_histogram_count(h), total);
    /* per thread: values 0,.25,...,1.75 repeated; sum of one cycle is 7 */
    assert_true(met_histogram_sum(h) == (double)total / 8 * 7);
    char *text;
    assert_int_equal(met_render(r, &text, NULL), 0);
    assert_valid(text);
    char want[256];
    /* buckets: 0,.25 -> le .25 (2/8); .5 -> (3/8); .75,1 -> (5/8); rest +Inf */
    snprintf(want, sizeof(want),
             "tandem_step_seconds_bucket{le=\"0.25\"} %llu\n"
             "tandem_step_seconds_bucket{le=\"0.5\"} %llu\n"
             "tandem_step_seconds_bucket{le=\"1\"} %llu\n"
             "tandem_step_seconds_bucket{le=\"+Inf\"} %llu\n",
             (unsigned long long)(total / 8 * 2), (unsigned long long)(total / 8 * 3),
             (unsigned long long)(total / 8 * 5), (unsigned long long)total);
    assert_non_null(strstr(text, want));
    for (int i = 0; i < THREADS; i++) {
        snprintf(want, sizeof(want), "tandem_by_thread_total{thread=\"t%d\"} %d\n", i, PER_THREAD);
        assert_non_null(strstr(text, want));
    }
    free(text);
    met_registry_free(r);
}

/* Every allocation in building and rendering a registry fails in turn: each
 * call reports TD_ENOMEM, the registry stays consistent and frees cleanly. */
static int metrics_steps(char **text)
{
    met_registry *r = NULL;
    int rc = met_registry_create(&r, "tandem_");
    if (rc != 0) return rc;
    met_family *f;
    rc = met_counter_family(r, "tandem_a_total", "A.", (const char *[]){"x", "y"}, 2, &f);
    for (int i = 0; rc == 0 && i < 6; i++) { /* grows the series array */
        char v[8];
        snprintf(v, sizeof(v), "%d", i);
        met_counter *c;
        rc = met_counter_get(f, (const char *[]){"k", v}, &c);
        if (rc == 0) met_counter_inc(c);
    }
    for (int i = 0; rc == 0 && i < 20; i++) { /* grows the family array */
        char name[32];
        snprintf(name, sizeof(name), "tandem_g%d", i);
        met_gauge *g;
        rc = met_gauge_new(r, name, "G.", &g);
    }
    met_histogram *h;
    if (rc == 0)
        rc = met_histogram_new(r, "tandem_h_seconds", "H.", met_latency_buckets,
                               met_latency_nbuckets, &h);
    if (rc == 0) {
        met_histogram_observe(h, 0.3);
        rc = met_render(r, text, NULL); /* validated by the caller, disarmed */
    }
    met_registry_free(r);
    return rc;
}

static void test_alloc_failures(void **state)
{
    (void)state;
    enum td_log_level level = td_log_get_level();
    td_log_set_level(TD_LOG_OFF);
    for (long n = 0;; n++) {
        char *text = NULL;
        fail_alloc_arm(n);
        int rc = metrics_steps(&text);
        long hits = fail_alloc_disarm();
        if (text) {
            assert_valid(text);
            free(text);
        }
        if (hits == 0) {
            assert_int_equal(rc, 0);
            assert_true(n > 20);
            break;
        }
        if (rc != TD_ENOMEM) fail_msg("allocation %ld failed: rc %d, want TD_ENOMEM", n, rc);
    }
    td_log_set_level(level);
}

static int bench(void)
{
    enum { N = 20000000 };
    met_registry *r;
    met_counter *c;
    met_histogram *h;
    if (met_registry_create(&r, "tandem_") != 0 ||
        met_counter_new(r, "tandem_bench_total", "b", &c) != 0 ||
        met_histogram_new(r, "tandem_bench_seconds", "b", met_latency_buckets, met_latency_nbuckets,
                          &h) != 0)
        return 1;
    int64_t t0 = td_now_ns();
    for (int i = 0; i < N; i++)
        met_counter_inc(c);
    int64_t t1 = td_now_ns();
    for (int i = 0; i < N; i++)
        met_histogram_observe(h, (double)(i & 1023) * 0.01);
    int64_t t2 = td_now_ns();
    /* A scrape of a busy binary: 100 labelled counters, 20 labelled
     * histograms of 15 buckets, 20 gauges. */
    met_family *cf, *hf;
    if (met_counter_family(r, "tandem_req_total", "r", (const char *[]){"route", "code"}, 2, &cf) !=
            0 ||
        met_histogram_family(r, "tandem_lat_seconds", "l", (const char *[]){"worker"}, 1,
                             met_latency_buckets, met_latency_nbuckets, &hf) != 0)
        return 1;
    for (int i = 0; i < 100; i++) {
        char route[16], code[8];
        snprintf(route, sizeof(route), "/r%d", i / 5);
        snprintf(code, sizeof(code), "%d", 200 + i % 5);
        met_counter *x;
        if (met_counter_get(cf, (const char *[]){route, code}, &x) != 0) return 1;
        met_counter_add(x, (uint64_t)i * 1000);
    }
    for (int i = 0; i < 20; i++) {
        char w[16], name[32];
        snprintf(w, sizeof(w), "w%d", i);
        met_histogram *x;
        met_gauge *g;
        snprintf(name, sizeof(name), "tandem_gauge_%d", i);
        if (met_histogram_get(hf, (const char *[]){w}, &x) != 0 ||
            met_gauge_new(r, name, "g", &g) != 0)
            return 1;
        for (int k = 0; k < 100; k++)
            met_histogram_observe(x, k * 0.013);
        met_gauge_set(g, i * 0.37);
    }
    enum { SCRAPES = 200 };
    size_t len = 0;
    int64_t t3 = td_now_ns();
    for (int i = 0; i < SCRAPES; i++) {
        char *text;
        if (met_render(r, &text, &len) != 0) return 1;
        free(text);
    }
    int64_t t4 = td_now_ns();
    printf("met_counter_inc: %.2f ns; met_histogram_observe (15 buckets): %.2f ns "
           "(single thread, uncontended)\n"
           "met_render: %.1f us for %zu bytes (100 counters, 20 histograms x 15 buckets, "
           "22 more series)\n",
           (double)(t1 - t0) / N, (double)(t2 - t1) / N, (double)(t4 - t3) / SCRAPES / 1e3, len);
    met_registry_free(r);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_validator_rejects), cmocka_unit_test(test_exact_text),
        cmocka_unit_test(test_number_formatting), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_threads),           cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
