/* lt_trace: trace readers (BurstGPT, Azure, Mooncake), filters and time scaling. */
#include "loadtest/lt_trace.h"

#include "common/clock.h"
#include "common/err.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#define LT_CSV_MAX_FIELDS 32

static const char *const k_format_names[] = {"burstgpt", "azure", "mooncake"};

int lt_format_parse(const char *name, enum lt_format *out)
{
    for (int i = 0; i < 3; i++) {
        if (name && strcmp(name, k_format_names[i]) == 0) {
            *out = (enum lt_format)i;
            return 0;
        }
    }
    return TD_EINVAL;
}

const char *lt_format_name(enum lt_format fmt)
{
    return (unsigned)fmt < 3 ? k_format_names[fmt] : "unknown";
}

void lt_trace_init(lt_trace *tr)
{
    memset(tr, 0, sizeof(*tr));
}

void lt_trace_free(lt_trace *tr)
{
    if (!tr) return;
    free(tr->reqs);
    free(tr->hashes);
    memset(tr, 0, sizeof(*tr));
}

int lt_trace_push(lt_trace *tr, const lt_req *req)
{
    if (tr->n == tr->cap) {
        size_t cap = tr->cap ? tr->cap * 2 : 256;
        if (cap > SIZE_MAX / sizeof(lt_req)) return TD_ENOMEM;
        lt_req *r = realloc(tr->reqs, cap * sizeof(lt_req));
        if (!r) return TD_ENOMEM;
        tr->reqs = r;
        tr->cap = cap;
    }
    tr->reqs[tr->n++] = *req;
    return 0;
}

/* Strict integer: optional surrounding blanks, digits only, fits in int32 >= 0. */
static int parse_count(const char *s, int32_t *out)
{
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s < '0' || *s > '9') return TD_EFORMAT;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    /* Some exports write counts as "12.0": accept an all-zero fraction. */
    if (*end == '.') {
        end++;
        while (*end == '0')
            end++;
    }
    while (*end == ' ' || *end == '\t')
        end++;
    if (*end != '\0' || errno == ERANGE || v < 0 || v > INT32_MAX) return TD_EFORMAT;
    *out = (int32_t)v;
    return 0;
}

/* Finite, non-negative decimal seconds into ns. */
static int parse_seconds_ns(const char *s, double unit_ns, int64_t *out)
{
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s == '\0') return TD_EFORMAT;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    while (*end == ' ' || *end == '\t')
        end++;
    if (*end != '\0' || errno == ERANGE || !isfinite(v) || v < 0 || v * unit_ns > 9.0e18)
        return TD_EFORMAT;
    *out = (int64_t)llround(v * unit_ns);
    return 0;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
 * civil-from-days inverse, reworked here from the published derivation). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int read_digits(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9') return TD_EFORMAT;
        v = v * 10 + (c - '0');
    }
    *p += n;
    *out = v;
    return 0;
}

int lt_parse_datetime(const char *s, int64_t *out_ns)
{
    const char *p = s;
    while (*p == ' ' || *p == '"')
        p++;
    int y, mo, d, h, mi, sec;
    if (read_digits(&p, 4, &y) || *p++ != '-' || read_digits(&p, 2, &mo) || *p++ != '-' ||
        read_digits(&p, 2, &d))
        return TD_EFORMAT;
    if (*p != ' ' && *p != 'T') return TD_EFORMAT;
    p++;
    if (read_digits(&p, 2, &h) || *p++ != ':' || read_digits(&p, 2, &mi) || *p++ != ':' ||
        read_digits(&p, 2, &sec))
        return TD_EFORMAT;
    /* Years outside 1900..2200 would overflow int64 ns or are not trace dates. */
    if (y < 1900 || y > 2200 || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 ||
        sec > 60)
        return TD_EFORMAT;
    int64_t frac_ns = 0;
    if (*p == '.') {
        p++;
        int64_t scale = 100000000;
        if (*p < '0' || *p > '9') return TD_EFORMAT;
        while (*p >= '0' && *p <= '9') {
            frac_ns += (*p - '0') * scale; /* digits past the 9th add 0 */
            scale /= 10;
            p++;
        }
    }
    if (*p == 'Z') p++;
    while (*p == ' ' || *p == '"')
        p++;
    if (*p != '\0') return TD_EFORMAT;
    int64_t days = days_from_civil(y, mo, d);
    *out_ns = ((days * 24 + h) * 60 + mi) * 60 * TD_NS_PER_S + (int64_t)sec * TD_NS_PER_S + frac_ns;
    return 0;
}

/* Splits one CSV line in place. Handles double-quoted fields with "" escapes;
 * strips a trailing CR. Returns the field count, or -1 for an unterminated quote. */
static int csv_split(char *line, char **fields, int max_fields)
{
    size_t len = strlen(line);
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        line[--len] = '\0';
    int n = 0;
    char *p = line;
    for (;;) {
        if (n == max_fields) return n + 1; /* too many: caller reports */
        if (*p == '"') {
            char *w = ++p;
            fields[n++] = w;
            for (;;) {
                if (*p == '\0') return -1;
                if (*p == '"' && p[1] == '"') {
                    *w++ = '"';
                    p += 2;
                } else if (*p == '"') {
                    p++;
                    break;
                } else {
                    *w++ = *p++;
                }
            }
            *w = '\0';
            if (*p == ',') {
                p++;
                continue;
            }
            if (*p == '\0') return n;
            return -1;
        }
        fields[n++] = p;
        char *comma = strchr(p, ',');
        if (!comma) return n;
        *comma = '\0';
        p = comma + 1;
    }
}

static int is_blank(const char *s)
{
    for (; *s; s++)
        if (*s != ' ' && *s != '\t' && *s != '\r' && *s != '\n') return 0;
    return 1;
}

/* One parsed row before filtering. */
struct row {
    int64_t t_src_ns; /* in the trace's own clock */
    int32_t in, out;
    int64_t line;
    const uint64_t *hash; /* Mooncake hash ids (reader scratch), n_hash of them */
    uint32_t n_hash;
};

struct reader {
    const lt_read_opts *o;
    lt_trace *tr;
    char *err;
    size_t errlen;
    int have_first;
    int64_t first_ns; /* the earliest data row's timestamp: origin of the window */
    int64_t last_ns;
    uint64_t *scratch; /* hash ids of the row being parsed */
    size_t scratch_cap;
};

/* Column indices found in a CSV header; -1 when absent. */
struct csv_cols {
    int ts, model, req, resp, log_type, ncols;
};

static int header_index(char **f, int n, const char *name)
{
    for (int i = 0; i < n; i++) {
        const char *s = f[i];
        while (*s == ' ' || *s == '\xef' || *s == '\xbb' || *s == '\xbf') /* BOM, blanks */
            s++;
        if (strcmp(s, name) == 0) return i;
    }
    return -1;
}

/* Keeps or drops a parsed row (common to every format). */
static int reader_take(struct reader *r, const struct row *row)
{
    lt_trace *tr = r->tr;
    if (!r->have_first) {
        r->have_first = 1;
        r->first_ns = row->t_src_ns;
    } else if (row->t_src_ns < r->last_ns) {
        tr->unsorted++;
    }
    if (row->t_src_ns < r->first_ns) r->first_ns = row->t_src_ns; /* the earliest row */
    r->last_ns = row->t_src_ns;
    if (row->out == 0 && !r->o->keep_failed) {
        tr->failed++;
        return 0;
    }
    /* t_ns holds the source time until the trace is finished. */
    lt_req q = {.t_ns = row->t_src_ns,
                .input_tokens = row->in,
                .output_tokens = row->out,
                .line = row->line,
                .hash_off = tr->n_hashes,
                .n_hash = row->n_hash};
    if (row->n_hash > 0) {
        if (tr->n_hashes + row->n_hash > tr->hashes_cap) {
            size_t cap = (tr->n_hashes + row->n_hash) * 2;
            if (cap > SIZE_MAX / sizeof(uint64_t)) return TD_ENOMEM;
            uint64_t *h = realloc(tr->hashes, cap * sizeof(uint64_t));
            if (!h) return TD_ENOMEM;
            tr->hashes = h;
            tr->hashes_cap = cap;
        }
        memcpy(tr->hashes + tr->n_hashes, row->hash, row->n_hash * sizeof(uint64_t));
        tr->n_hashes += row->n_hash;
    }
    return lt_trace_push(tr, &q);
}

/* A malformed row: fail, or count it under skip_bad. */
static int reader_bad(struct reader *r, int64_t line, const char *what)
{
    if (r->o->skip_bad) {
        r->tr->bad++;
        return 0;
    }
    td_err_set(r->err, r->errlen, "line %lld: %s", (long long)line, what);
    return TD_EFORMAT;
}

static int csv_parse_header(struct reader *r, enum lt_format fmt, char *line, struct csv_cols *c)
{
    char *f[LT_CSV_MAX_FIELDS];
    int n = csv_split(line, f, LT_CSV_MAX_FIELDS);
    if (n <= 0 || n > LT_CSV_MAX_FIELDS) {
        td_err_set(r->err, r->errlen, "line 1: cannot parse the CSV header");
        return TD_EFORMAT;
    }
    c->ncols = n;
    if (fmt == LT_FMT_BURSTGPT) {
        c->ts = header_index(f, n, "Timestamp");
        c->model = header_index(f, n, "Model");
        c->req = header_index(f, n, "Request tokens");
        c->resp = header_index(f, n, "Response tokens");
        c->log_type = header_index(f, n, "Log Type");
        if (c->ts < 0 || c->req < 0 || c->resp < 0) {
            td_err_set(r->err, r->errlen,
                       "line 1: not a BurstGPT header (need Timestamp, Request tokens, "
                       "Response tokens)");
            return TD_EFORMAT;
        }
    } else {
        c->ts = header_index(f, n, "TIMESTAMP");
        c->req = header_index(f, n, "ContextTokens");
        c->resp = header_index(f, n, "GeneratedTokens");
        c->model = c->log_type = -1;
        if (c->ts < 0 || c->req < 0 || c->resp < 0) {
            td_err_set(r->err, r->errlen,
                       "line 1: not an Azure trace header (need TIMESTAMP, ContextTokens, "
                       "GeneratedTokens)");
            return TD_EFORMAT;
        }
    }
    return 0;
}

static int csv_row(struct reader *r, enum lt_format fmt, const struct csv_cols *c, char *line,
                   int64_t lineno)
{
    char *f[LT_CSV_MAX_FIELDS];
    char what[160];
    int n = csv_split(line, f, LT_CSV_MAX_FIELDS);
    if (n < 0) return reader_bad(r, lineno, "unterminated quoted field");
    if (n != c->ncols) {
        snprintf(what, sizeof(what), "expected %d columns, found %d", c->ncols, n);
        return reader_bad(r, lineno, what);
    }
    struct row row = {.line = lineno};
    int rc = fmt == LT_FMT_BURSTGPT ? parse_seconds_ns(f[c->ts], 1e9, &row.t_src_ns)
                                    : lt_parse_datetime(f[c->ts], &row.t_src_ns);
    if (rc) {
        snprintf(what, sizeof(what), "%s: bad timestamp '%.40s'",
                 fmt == LT_FMT_BURSTGPT ? "Timestamp" : "TIMESTAMP", f[c->ts]);
        return reader_bad(r, lineno, what);
    }
    if (parse_count(f[c->req], &row.in)) {
        snprintf(what, sizeof(what), "%s: not a token count '%.40s'",
                 fmt == LT_FMT_BURSTGPT ? "Request tokens" : "ContextTokens", f[c->req]);
        return reader_bad(r, lineno, what);
    }
    if (parse_count(f[c->resp], &row.out)) {
        snprintf(what, sizeof(what), "%s: not a token count '%.40s'",
                 fmt == LT_FMT_BURSTGPT ? "Response tokens" : "GeneratedTokens", f[c->resp]);
        return reader_bad(r, lineno, what);
    }
    r->tr->rows++;
    if (fmt == LT_FMT_BURSTGPT) {
        if ((r->o->model && c->model >= 0 && strcmp(f[c->model], r->o->model) != 0) ||
            (r->o->log_type && c->log_type >= 0 && strcmp(f[c->log_type], r->o->log_type) != 0)) {
            r->tr->filtered++;
            return 0;
        }
    }
    return reader_take(r, &row);
}

static int json_count(const cJSON *obj, const char *key, int32_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < 0 ||
        v->valuedouble > INT32_MAX || v->valuedouble != floor(v->valuedouble))
        return TD_EFORMAT;
    *out = (int32_t)v->valuedouble;
    return 0;
}

static int jsonl_row(struct reader *r, const char *line, int64_t lineno)
{
    cJSON *j = cJSON_Parse(line);
    if (!j || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return reader_bad(r, lineno, "not a JSON object");
    }
    struct row row = {.line = lineno};
    const char *bad = NULL;
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(j, "timestamp");
    if (!cJSON_IsNumber(ts) || !isfinite(ts->valuedouble) || ts->valuedouble < 0 ||
        ts->valuedouble > 9.0e12)
        bad = "timestamp: missing or not a non-negative number of ms";
    else if (json_count(j, "input_length", &row.in))
        bad = "input_length: missing or not a token count";
    else if (json_count(j, "output_length", &row.out))
        bad = "output_length: missing or not a token count";
    else {
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "hash_ids");
        if (h && !cJSON_IsArray(h)) {
            bad = "hash_ids: not an array";
        } else if (h) {
            int nh = cJSON_GetArraySize(h);
            if ((size_t)nh > r->scratch_cap) {
                uint64_t *s = realloc(r->scratch, (size_t)nh * 2 * sizeof(uint64_t));
                if (!s) {
                    cJSON_Delete(j);
                    return TD_ENOMEM;
                }
                r->scratch = s;
                r->scratch_cap = (size_t)nh * 2;
            }
            const cJSON *e;
            uint32_t k = 0;
            cJSON_ArrayForEach(e, h)
            {
                /* Integers up to 2^53 survive a double exactly. */
                if (!cJSON_IsNumber(e) || e->valuedouble < 0 ||
                    e->valuedouble > 9007199254740992.0 ||
                    e->valuedouble != floor(e->valuedouble)) {
                    bad = "hash_ids: not an array of non-negative integers";
                    break;
                }
                r->scratch[k++] = (uint64_t)e->valuedouble;
            }
            row.hash = r->scratch;
            row.n_hash = k;
        }
    }
    if (!bad) row.t_src_ns = (int64_t)llround(ts->valuedouble * 1e6);
    cJSON_Delete(j);
    if (bad) return reader_bad(r, lineno, bad);
    r->tr->rows++;
    return reader_take(r, &row);
}

static int cmp_req_time(const void *a, const void *b)
{
    const lt_req *x = a, *y = b;
    if (x->t_ns != y->t_ns) return x->t_ns < y->t_ns ? -1 : 1;
    return x->line < y->line ? -1 : (x->line > y->line); /* stable by line */
}

/* Reads one line, its '\n' included, into *buf (grown as needed, never past
 * LT_TRACE_MAX_LINE + 1 bytes). Returns its length, -1 at the end of the
 * input, or -2 when the line is longer than LT_TRACE_MAX_LINE (its rest is
 * read and dropped; memory stays bounded), -3 when out of memory. *has_nul
 * is set when the line holds a NUL byte. */
static ssize_t read_line(FILE *fp, char **buf, size_t *cap, int *has_nul)
{
    size_t n = 0;
    int c, too_long = 0;
    *has_nul = 0;
    while ((c = getc(fp)) != EOF) {
        if (n >= LT_TRACE_MAX_LINE) {
            too_long = 1;
            if (c == '\n') break;
            continue;
        }
        if (n + 2 > *cap) {
            size_t nc = *cap ? *cap * 2 : 256;
            if (nc > LT_TRACE_MAX_LINE + 1) nc = LT_TRACE_MAX_LINE + 1;
            char *nb = realloc(*buf, nc);
            if (!nb) return -3;
            *buf = nb;
            *cap = nc;
        }
        if (c == '\0') *has_nul = 1;
        (*buf)[n++] = (char)c;
        if (c == '\n') break;
    }
    if (too_long) return -2;
    if (n == 0 && c == EOF) return -1;
    (*buf)[n] = '\0';
    return (ssize_t)n;
}

int lt_trace_read_stream(FILE *fp, enum lt_format fmt, const lt_read_opts *opts, lt_trace *tr,
                         char *err, size_t errlen)
{
    static const lt_read_opts defaults = {0};
    if (!fp || !tr || (unsigned)fmt > LT_FMT_MOONCAKE) return TD_EINVAL;
    struct reader r = {.o = opts ? opts : &defaults, .tr = tr, .err = err, .errlen = errlen};
    struct csv_cols cols = {0};
    char *line = NULL;
    size_t linecap = 0;
    int64_t lineno = 0;
    int rc = 0;
    int have_header = fmt == LT_FMT_MOONCAKE;
    ssize_t got;
    int has_nul;
    while ((got = read_line(fp, &line, &linecap, &has_nul)) != -1) {
        lineno++;
        if (got == -3) {
            td_err_set(err, errlen, "line %lld: out of memory", (long long)lineno);
            rc = TD_ENOMEM;
            break;
        }
        if (got == -2) {
            char what[96];
            snprintf(what, sizeof(what), "longer than %zu bytes (not a trace file?)",
                     LT_TRACE_MAX_LINE);
            rc = reader_bad(&r, lineno, what);
            if (rc) break;
            continue;
        }
        if (has_nul) {
            rc = reader_bad(&r, lineno, "NUL byte in line");
            if (rc) break;
            continue;
        }
        if (is_blank(line)) continue;
        if (!have_header) {
            rc = csv_parse_header(&r, fmt, line, &cols);
            if (rc) break;
            have_header = 1;
            continue;
        }
        rc = fmt == LT_FMT_MOONCAKE ? jsonl_row(&r, line, lineno)
                                    : csv_row(&r, fmt, &cols, line, lineno);
        if (rc) break;
    }
    free(line);
    free(r.scratch);
    if (!rc && ferror(fp)) {
        td_err_set(err, errlen, "read error after line %lld", (long long)lineno);
        rc = TD_EIO;
    }
    if (!rc && !have_header) {
        td_err_set(err, errlen, "empty file: no CSV header");
        rc = TD_EFORMAT;
    }
    if (rc) {
        lt_trace_free(tr);
        return rc;
    }
    /* n may be 0 (every row skipped): qsort must not see a NULL array */
    if (tr->unsorted && tr->n > 1) qsort(tr->reqs, tr->n, sizeof(lt_req), cmp_req_time);
    /* The window is applied once sorted, on the earliest row's clock. */
    if (r.o->start_s > 0 || r.o->end_s > 0) {
        size_t kept = 0;
        for (size_t i = 0; i < tr->n; i++) {
            double rel_s = td_ns_to_s(tr->reqs[i].t_ns - r.first_ns);
            if (rel_s < r.o->start_s || (r.o->end_s > 0 && rel_s >= r.o->end_s))
                tr->filtered++;
            else
                tr->reqs[kept++] = tr->reqs[i];
        }
        tr->n = kept;
    }
    if (r.o->max_requests && tr->n > r.o->max_requests) {
        tr->filtered += tr->n - r.o->max_requests;
        tr->n = r.o->max_requests;
    }
    if (tr->n > 0) {
        int64_t t0 = tr->reqs[0].t_ns;
        for (size_t i = 0; i < tr->n; i++)
            tr->reqs[i].t_ns -= t0;
        tr->src_span_s = td_ns_to_s(tr->reqs[tr->n - 1].t_ns);
    }
    return 0;
}

int lt_trace_read(const char *path, enum lt_format fmt, const lt_read_opts *opts, lt_trace *tr,
                  char *err, size_t errlen)
{
    FILE *fp = fopen(path, "r");
    if (!fp) {
        int e = errno;
        td_err_set(err, errlen, "%s: %s", path, strerror(e));
        return td_err_from_errno(e);
    }
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(fp);
        td_err_set(err, errlen, "%s: not a regular file", path);
        return TD_EINVAL;
    }
    int rc = lt_trace_read_stream(fp, fmt, opts, tr, err, errlen);
    fclose(fp);
    return rc;
}

int lt_trace_speedup(lt_trace *tr, double speedup)
{
    if (!(speedup > 0) || !isfinite(speedup)) return TD_EINVAL;
    for (size_t i = 0; i < tr->n; i++)
        tr->reqs[i].t_ns = (int64_t)llround((double)tr->reqs[i].t_ns / speedup);
    return 0;
}

double lt_trace_mean_rate(const lt_trace *tr)
{
    if (tr->n < 2) return 0;
    int64_t span = tr->reqs[tr->n - 1].t_ns - tr->reqs[0].t_ns;
    return span > 0 ? (double)(tr->n - 1) / td_ns_to_s(span) : 0;
}

int lt_trace_scale_to_rate(lt_trace *tr, double rate_rps)
{
    double cur = lt_trace_mean_rate(tr);
    if (!(rate_rps > 0) || !isfinite(rate_rps) || cur <= 0) return TD_EINVAL;
    return lt_trace_speedup(tr, rate_rps / cur);
}

int lt_trace_fit_context(lt_trace *tr, int32_t max_context, size_t *scaled)
{
    if (scaled) *scaled = 0;
    if (max_context < 2) return TD_EINVAL;
    const int64_t cap = max_context;
    size_t n_scaled = 0;
    for (size_t i = 0; i < tr->n; i++) {
        lt_req *q = &tr->reqs[i];
        /* int64 products: lengths are below 2^31, so in * cap stays below 2^62. */
        int64_t in = q->input_tokens > 0 ? q->input_tokens : 1;
        int64_t out = q->output_tokens > 0 ? q->output_tokens : 0;
        int64_t total = in + out;
        if (total <= cap) continue;
        int64_t new_in = in * cap / total, new_out = out * cap / total;
        if (new_in < 1) new_in = 1;
        if (out > 0 && new_out < 1) new_out = 1;
        /* Rounding down keeps the sum within cap; raising one side to 1 can
         * only happen when the other side's share is below cap - 1, so the sum
         * still fits. Kept as a guard should the rounding ever change. */
        while (new_in + new_out > cap) {
            if (new_in >= new_out && new_in > 1)
                new_in--;
            else
                new_out--;
        }
        q->input_tokens = (int32_t)new_in;
        q->output_tokens = (int32_t)new_out;
        n_scaled++;
    }
    if (scaled) *scaled = n_scaled;
    return 0;
}

static int32_t lt__scale_len(int32_t v, double scale, int32_t floor1)
{
    double x = nearbyint((double)v * scale);
    if (x > INT32_MAX) x = INT32_MAX;
    if (x < floor1) x = floor1;
    return (int32_t)x;
}

int lt_trace_fit_lengths(lt_trace *tr, const lt_lengths *o, lt_lengths_stats *st)
{
    lt_lengths_stats tmp = {0};
    if (st) *st = tmp;
    if (!isfinite(o->scale) || o->scale < 0 || o->max_context == 1) return TD_EINVAL;
    int scale_on = o->scale > 0 && o->scale != 1.0;
    for (size_t i = 0; i < tr->n; i++) {
        lt_req *q = &tr->reqs[i];
        if (scale_on) {
            int32_t in = lt__scale_len(q->input_tokens > 0 ? q->input_tokens : 1, o->scale, 1);
            int32_t out = q->output_tokens > 0 ? lt__scale_len(q->output_tokens, o->scale, 1) : 0;
            if (in != q->input_tokens || out != q->output_tokens) tmp.scaled++;
            q->input_tokens = in;
            q->output_tokens = out;
        }
        if (o->max_prompt > 0 && q->input_tokens > o->max_prompt) {
            q->input_tokens = o->max_prompt;
            tmp.prompt_clipped++;
        }
        if (o->max_output > 0 && q->output_tokens > o->max_output) {
            q->output_tokens = o->max_output;
            tmp.output_clipped++;
        }
    }
    if (o->max_context > 0) (void)lt_trace_fit_context(tr, o->max_context, &tmp.context_fitted);
    if (st) *st = tmp;
    return 0;
}

cJSON *lt_lengths_json(const lt_lengths *o, const lt_lengths_stats *st)
{
    cJSON *x = cJSON_CreateObject();
    if (!x) return NULL;
    cJSON_AddNumberToObject(x, "length_scale", o->scale > 0 ? o->scale : 1.0);
    cJSON_AddNumberToObject(x, "max_prompt_tokens", o->max_prompt);
    cJSON_AddNumberToObject(x, "max_output_tokens", o->max_output);
    cJSON_AddNumberToObject(x, "max_context", o->max_context);
    cJSON_AddNumberToObject(x, "scaled", (double)st->scaled);
    cJSON_AddNumberToObject(x, "prompt_clipped", (double)st->prompt_clipped);
    cJSON_AddNumberToObject(x, "output_clipped", (double)st->output_clipped);
    cJSON_AddNumberToObject(x, "context_scaled", (double)st->context_fitted);
    return x;
}

int lt_trace_write_jsonl(const lt_trace *tr, FILE *fp)
{
    for (size_t i = 0; i < tr->n; i++) {
        const lt_req *q = &tr->reqs[i];
        fprintf(fp, "{\"timestamp\": %.3f, \"input_length\": %d, \"output_length\": %d",
                (double)q->t_ns / 1e6, q->input_tokens, q->output_tokens);
        if (q->n_hash > 0) {
            fputs(", \"hash_ids\": [", fp);
            for (uint32_t k = 0; k < q->n_hash; k++)
                fprintf(fp, "%s%llu", k ? ", " : "",
                        (unsigned long long)tr->hashes[q->hash_off + k]);
            fputc(']', fp);
        }
        if (fputs("}\n", fp) < 0) return TD_EIO;
    }
    return fflush(fp) == 0 && !ferror(fp) ? 0 : TD_EIO;
}
