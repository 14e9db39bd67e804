/* lt_report: summary arithmetic, report files, gnuplot plots, run comparison. */
#include "loadtest/lt_report.h"

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

const char *lt_outcome_name(enum lt_outcome o)
{
    switch (o) {
    case LT_OK:
        return "ok";
    case LT_REJECTED:
        return "rejected";
    case LT_ERROR:
        return "error";
    default:
        return "pending";
    }
}

double lt_record_tpot_ms(const lt_record *r)
{
    if (r->output_tokens <= 1 || r->ttft_ns < 0 || r->e2e_ns < r->ttft_ns) return 0;
    return td_ns_to_ms(r->e2e_ns - r->ttft_ns) / (double)(r->output_tokens - 1);
}

int lt_record_is_good(const lt_record *r, const lt_slo *slo)
{
    if (r->outcome != LT_OK) return 0;
    if (slo->ttft_ms > 0 && !(r->ttft_ns >= 0 && td_ns_to_ms(r->ttft_ns) <= slo->ttft_ms)) return 0;
    if (slo->tpot_ms > 0 && lt_record_tpot_ms(r) > slo->tpot_ms) return 0;
    return 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v[n]: the smallest value with at least
 * p% of the samples at or below it. */
static double pct_sorted(const double *v, size_t n, double p)
{
    size_t rank = (size_t)ceil(p / 100.0 * (double)n);
    if (rank < 1) rank = 1;
    return v[rank - 1];
}

void lt_pcts_of(double *v, size_t n, lt_pcts *out)
{
    memset(out, 0, sizeof(*out));
    out->n = n;
    if (n == 0) return;
    qsort(v, n, sizeof(double), cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    out->mean = sum / (double)n;
    out->p50 = pct_sorted(v, n, 50);
    out->p90 = pct_sorted(v, n, 90);
    out->p99 = pct_sorted(v, n, 99);
    out->max = v[n - 1];
}

size_t lt_report_reasons(const lt_record *recs, size_t n, lt_reason *out, size_t max)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const lt_record *r = &recs[i];
        if (r->outcome != LT_ERROR && r->outcome != LT_REJECTED) continue;
        const char *e = r->error[0] ? r->error : lt_outcome_name(r->outcome);
        size_t j = 0;
        while (j < k && !(out[j].outcome == r->outcome && strcmp(out[j].error, e) == 0))
            j++;
        if (j < k)
            out[j].count++;
        else if (k < max)
            out[k++] = (lt_reason){.error = e, .outcome = r->outcome, .count = 1};
    }
    return k;
}

int lt_summary_compute(const lt_record *recs, size_t n, const lt_slo *slo, lt_summary *out)
{
    memset(out, 0, sizeof(*out));
    out->slo = *slo;
    out->requests = n;
    size_t n_itl = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t stored =
            recs[i].n_chunks < recs[i].chunk_cap ? recs[i].n_chunks : recs[i].chunk_cap;
        if (recs[i].outcome == LT_OK && stored > 1) n_itl += (size_t)stored - 1;
    }
    size_t cap = n ? n : 1;
    double *ttft = malloc(cap * sizeof(double)), *tpot = malloc(cap * sizeof(double));
    double *e2e = malloc(cap * sizeof(double)), *late = malloc(cap * sizeof(double));
    double *itl = malloc((n_itl ? n_itl : 1) * sizeof(double));
    int rc = TD_ENOMEM;
    if (!ttft || !tpot || !e2e || !late || !itl) goto done;
    size_t nt = 0, np = 0, ne = 0, nl = 0, ni = 0;
    int64_t end_ns = 0;
    for (size_t i = 0; i < n; i++) {
        const lt_record *r = &recs[i];
        switch (r->outcome) {
        case LT_OK:
            out->ok++;
            break;
        case LT_REJECTED:
            out->rejected++;
            break;
        case LT_ERROR:
            out->errors++;
            break;
        default:
            out->pending++;
            break;
        }
        if (r->attempts > 1) {
            out->retried++;
            out->retries += (size_t)r->attempts - 1;
            out->no_retry.rejected++; /* its first answer was a 429 */
        } else {
            out->no_retry.ok += r->outcome == LT_OK;
            out->no_retry.rejected += r->outcome == LT_REJECTED;
            out->no_retry.good += lt_record_is_good(r, slo);
        }
        if (r->send_ns >= 0) {
            late[nl++] = td_ns_to_ms(r->send_ns - r->sched_ns);
            if (r->e2e_ns >= 0 && r->send_ns + r->e2e_ns > end_ns) end_ns = r->send_ns + r->e2e_ns;
        }
        if (r->outcome != LT_OK) continue;
        if (lt_record_is_good(r, slo)) out->good++;
        out->input_tokens += r->input_tokens;
        out->output_tokens += r->output_tokens;
        if (r->ttft_ns >= 0) ttft[nt++] = td_ns_to_ms(r->ttft_ns);
        if (r->e2e_ns >= 0) e2e[ne++] = td_ns_to_ms(r->e2e_ns);
        if (r->output_tokens > 1) tpot[np++] = lt_record_tpot_ms(r);
        int32_t stored = r->n_chunks < r->chunk_cap ? r->n_chunks : r->chunk_cap;
        for (int32_t k = 1; k < stored; k++)
            itl[ni++] = td_ns_to_ms(r->chunk_ns[k] - r->chunk_ns[k - 1]);
    }
    out->duration_s = td_ns_to_s(end_ns);
    if (out->duration_s > 0) {
        out->req_per_s = (double)out->ok / out->duration_s;
        out->out_tok_per_s = (double)out->output_tokens / out->duration_s;
        out->goodput_req_per_s = (double)out->good / out->duration_s;
        out->no_retry.goodput_req_per_s = (double)out->no_retry.good / out->duration_s;
    }
    lt_pcts_of(ttft, nt, &out->ttft);
    lt_pcts_of(tpot, np, &out->tpot);
    lt_pcts_of(e2e, ne, &out->e2e);
    lt_pcts_of(late, nl, &out->lateness);
    lt_pcts_of(itl, ni, &out->itl);
    rc = 0;
done:
    free(ttft);
    free(tpot);
    free(e2e);
    free(late);
    free(itl);
    return rc;
}

void lt_summary_print(FILE *fp, const lt_summary *s, const char *out)
{
    fprintf(fp, "requests %zu  ok %zu  rejected %zu  errors %zu  duration %.2f s\n", s->requests,
            s->ok, s->rejected, s->errors, s->duration_s);
    fprintf(fp, "throughput %.2f req/s  %.1f output tok/s\n", s->req_per_s, s->out_tok_per_s);
    fprintf(fp, "goodput %.2f req/s (%zu requests within TTFT <= %g ms, TPOT <= %g ms)\n",
            s->goodput_req_per_s, s->good, s->slo.ttft_ms, s->slo.tpot_ms);
    if (s->retried > 0)
        fprintf(fp,
                "client retries: %zu requests retried after a 429 (%zu retries); without them: "
                "ok %zu  rejected %zu  goodput %.2f req/s (%zu good)\n",
                s->retried, s->retries, s->no_retry.ok, s->no_retry.rejected,
                s->no_retry.goodput_req_per_s, s->no_retry.good);
    const struct {
        const char *name;
        const lt_pcts *p;
    } rows[] = {{"ttft_ms", &s->ttft},
                {"itl_ms", &s->itl},
                {"tpot_ms", &s->tpot},
                {"e2e_ms", &s->e2e},
                {"lateness_ms", &s->lateness}};
    fprintf(fp, "%-12s %10s %10s %10s %10s %10s\n", "", "mean", "p50", "p90", "p99", "max");
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        fprintf(fp, "%-12s %10.3f %10.3f %10.3f %10.3f %10.3f\n", rows[i].name, rows[i].p->mean,
                rows[i].p->p50, rows[i].p->p90, rows[i].p->p99, rows[i].p->max);
    fprintf(fp, "report: %s/summary.json\n", out);
}

/* ---- files ---- */

static int mkdir_p(const char *dir)
{
    char path[4096];
    if (snprintf(path, sizeof(path), "%s", dir) >= (int)sizeof(path)) return TD_ETOOLONG;
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST) return td_err_from_errno(errno);
        *p = '/';
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST) return td_err_from_errno(errno);
    return 0;
}

static FILE *open_in(const char *dir, const char *name, const char *mode, char *path, size_t cap)
{
    if (snprintf(path, cap, "%s/%s", dir, name) >= (int)cap) return NULL;
    return fopen(path, mode);
}

static cJSON *pcts_json(const lt_pcts *p)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "n", (double)p->n);
    cJSON_AddNumberToObject(o, "mean", p->mean);
    cJSON_AddNumberToObject(o, "p50", p->p50);
    cJSON_AddNumberToObject(o, "p90", p->p90);
    cJSON_AddNumberToObject(o, "p99", p->p99);
    cJSON_AddNumberToObject(o, "max", p->max);
    return o;
}

static cJSON *summary_json(const lt_summary *s, const cJSON *extra)
{
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    cJSON_AddNumberToObject(root, "requests", (double)s->requests);
    cJSON_AddNumberToObject(root, "ok", (double)s->ok);
    cJSON_AddNumberToObject(root, "rejected", (double)s->rejected);
    cJSON_AddNumberToObject(root, "errors", (double)s->errors);
    cJSON_AddNumberToObject(root, "pending", (double)s->pending);
    cJSON_AddNumberToObject(root, "duration_s", s->duration_s);
    cJSON *tp = cJSON_AddObjectToObject(root, "throughput");
    if (tp) {
        cJSON_AddNumberToObject(tp, "req_per_s", s->req_per_s);
        cJSON_AddNumberToObject(tp, "output_tok_per_s", s->out_tok_per_s);
        cJSON_AddNumberToObject(tp, "input_tokens", (double)s->input_tokens);
        cJSON_AddNumberToObject(tp, "output_tokens", (double)s->output_tokens);
    }
    cJSON *slo = cJSON_AddObjectToObject(root, "slo");
    if (slo) {
        cJSON_AddNumberToObject(slo, "ttft_ms", s->slo.ttft_ms);
        cJSON_AddNumberToObject(slo, "tpot_ms", s->slo.tpot_ms);
    }
    cJSON *gp = cJSON_AddObjectToObject(root, "goodput");
    if (gp) {
        cJSON_AddNumberToObject(gp, "requests", (double)s->good);
        cJSON_AddNumberToObject(gp, "req_per_s", s->goodput_req_per_s);
        cJSON_AddNumberToObject(gp, "fraction",
                                s->requests ? (double)s->good / (double)s->requests : 0);
    }
    cJSON *cr = cJSON_AddObjectToObject(root, "client_retries");
    if (cr) {
        cJSON_AddNumberToObject(cr, "requests_retried", (double)s->retried);
        cJSON_AddNumberToObject(cr, "retries", (double)s->retries);
        cJSON *w = cJSON_AddObjectToObject(cr, "with_retries");
        if (w) {
            cJSON_AddNumberToObject(w, "ok", (double)s->ok);
            cJSON_AddNumberToObject(w, "rejected", (double)s->rejected);
            cJSON_AddNumberToObject(w, "good", (double)s->good);
            cJSON_AddNumberToObject(w, "goodput_req_per_s", s->goodput_req_per_s);
        }
        cJSON *wo = cJSON_AddObjectToObject(cr, "without_retries");
        if (wo) {
            cJSON_AddNumberToObject(wo, "ok", (double)s->no_retry.ok);
            cJSON_AddNumberToObject(wo, "rejected", (double)s->no_retry.rejected);
            cJSON_AddNumberToObject(wo, "good", (double)s->no_retry.good);
            cJSON_AddNumberToObject(wo, "goodput_req_per_s", s->no_retry.goodput_req_per_s);
        }
    }
    cJSON_AddItemToObject(root, "ttft_ms", pcts_json(&s->ttft));
    cJSON_AddItemToObject(root, "itl_ms", pcts_json(&s->itl));
    cJSON_AddItemToObject(root, "tpot_ms", pcts_json(&s->tpot));
    cJSON_AddItemToObject(root, "e2e_ms", pcts_json(&s->e2e));
    cJSON_AddItemToObject(root, "lateness_ms", pcts_json(&s->lateness));
    if (extra) cJSON_AddItemToObject(root, "run", cJSON_Duplicate(extra, 1));
    return root;
}

static double ms_or_nan(int64_t ns)
{
    return ns >= 0 ? td_ns_to_ms(ns) : NAN;
}

/* CSV fields are plain numbers and the error text with quotes doubled. */
static void csv_quote(FILE *fp, const char *s)
{
    fputc('"', fp);
    for (; *s; s++) {
        if (*s == '"') fputc('"', fp);
        fputc(*s == '\n' || *s == '\r' ? ' ' : *s, fp);
    }
    fputc('"', fp);
}

static int write_requests_csv(FILE *fp, const lt_record *recs, size_t n, const lt_slo *slo)
{
    fprintf(fp, "id,sched_ms,send_ms,lateness_ms,ttft_ms,tpot_ms,e2e_ms,input_tokens,max_tokens,"
                "output_tokens,chunks,status,outcome,good,error\n");
    for (size_t i = 0; i < n; i++) {
        const lt_record *r = &recs[i];
        double send = ms_or_nan(r->send_ns);
        fprintf(fp, "%zu,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%d,%d,%d,%d,%d,%s,%d,", i,
                td_ns_to_ms(r->sched_ns), send,
                r->send_ns >= 0 ? send - td_ns_to_ms(r->sched_ns) : NAN, ms_or_nan(r->ttft_ns),
                r->outcome == LT_OK ? lt_record_tpot_ms(r) : NAN, ms_or_nan(r->e2e_ns),
                r->input_tokens, r->max_tokens, r->output_tokens, r->n_chunks, r->http_status,
                lt_outcome_name(r->outcome), lt_record_is_good(r, slo));
        csv_quote(fp, r->error);
        fputc('\n', fp);
    }
    return ferror(fp) ? TD_EIO : 0;
}

static int write_tokens_csv(FILE *fp, const lt_record *recs, size_t n)
{
    fprintf(fp, "id,index,arrival_ms\n");
    for (size_t i = 0; i < n; i++) {
        int32_t stored =
            recs[i].n_chunks < recs[i].chunk_cap ? recs[i].n_chunks : recs[i].chunk_cap;
        for (int32_t k = 0; k < stored; k++)
            fprintf(fp, "%zu,%d,%.3f\n", i, k, td_ns_to_ms(recs[i].chunk_ns[k]));
    }
    return ferror(fp) ? TD_EIO : 0;
}

/* Per-second buckets: requests sent, ok completions, good completions. */
static int write_timeseries(FILE *fp, const lt_record *recs, size_t n, const lt_slo *slo)
{
    int64_t end = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t t = recs[i].send_ns >= 0 ? recs[i].send_ns : recs[i].sched_ns;
        if (recs[i].send_ns >= 0 && recs[i].e2e_ns >= 0) t = recs[i].send_ns + recs[i].e2e_ns;
        end = t > end ? t : end;
    }
    size_t nb = (size_t)(end / TD_NS_PER_S) + 1;
    size_t *b = calloc(nb * 3, sizeof(size_t));
    if (!b) return TD_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const lt_record *r = &recs[i];
        if (r->send_ns >= 0) b[(size_t)(r->send_ns / TD_NS_PER_S) * 3]++;
        if (r->outcome == LT_OK && r->e2e_ns >= 0) {
            size_t k = (size_t)((r->send_ns + r->e2e_ns) / TD_NS_PER_S);
            b[k * 3 + 1]++;
            if (lt_record_is_good(r, slo)) b[k * 3 + 2]++;
        }
    }
    fprintf(fp, "# second sent_rps ok_rps goodput_rps\n");
    for (size_t k = 0; k < nb; k++)
        fprintf(fp, "%zu %zu %zu %zu\n", k, b[k * 3], b[k * 3 + 1], b[k * 3 + 2]);
    free(b);
    return ferror(fp) ? TD_EIO : 0;
}

/* Empirical CDF of ok requests' TTFT, TPOT and e2e: "value_ms fraction" per
 * series, series separated by two blank lines (gnuplot's `index`). */
static int write_cdf(FILE *fp, const lt_record *recs, size_t n)
{
    double *v = malloc((n ? n : 1) * sizeof(double));
    if (!v) return TD_ENOMEM;
    for (int series = 0; series < 3; series++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            const lt_record *r = &recs[i];
            if (r->outcome != LT_OK) continue;
            if (series == 0 && r->ttft_ns >= 0)
                v[m++] = td_ns_to_ms(r->ttft_ns);
            else if (series == 1 && r->output_tokens > 1)
                v[m++] = lt_record_tpot_ms(r);
            else if (series == 2 && r->e2e_ns >= 0)
                v[m++] = td_ns_to_ms(r->e2e_ns);
        }
        qsort(v, m, sizeof(double), cmp_double);
        fprintf(fp, "# %s\n", series == 0 ? "ttft_ms" : series == 1 ? "tpot_ms" : "e2e_ms");
        if (m == 0) fprintf(fp, "0 0\n"); /* an empty block would shift gnuplot's indices */
        for (size_t i = 0; i < m; i++)
            fprintf(fp, "%.3f %.6f\n", v[i], (double)(i + 1) / (double)m);
        fprintf(fp, "\n\n");
    }
    free(v);
    return ferror(fp) ? TD_EIO : 0;
}

int lt_report_write(const char *dir, const lt_record *recs, size_t n, const lt_summary *s,
                    const struct cJSON *extra, char *err, size_t errlen)
{
    int rc = mkdir_p(dir);
    if (rc) {
        td_err_set(err, errlen, "%s: cannot create: %s", dir, td_strerror(rc));
        return rc;
    }
    char path[4200];
    static const char *const names[] = {"summary.json", "requests.csv", "tokens.csv",
                                        "timeseries.dat", "cdf.dat"};
    for (int f = 0; f < 5; f++) {
        FILE *fp = open_in(dir, names[f], "w", path, sizeof(path));
        if (!fp) {
            td_err_set(err, errlen, "%s/%s: cannot open for writing", dir, names[f]);
            return TD_EIO;
        }
        switch (f) {
        case 0: {
            cJSON *j = summary_json(s, extra);
            char *text = j ? cJSON_Print(j) : NULL;
            rc = text ? (fprintf(fp, "%s\n", text) < 0 ? TD_EIO : 0) : TD_ENOMEM;
            free(text);
            cJSON_Delete(j);
            break;
        }
        case 1:
            rc = write_requests_csv(fp, recs, n, &s->slo);
            break;
        case 2:
            rc = write_tokens_csv(fp, recs, n);
            break;
        case 3:
            rc = write_timeseries(fp, recs, n, &s->slo);
            break;
        default:
            rc = write_cdf(fp, recs, n);
            break;
        }
        if (fclose(fp) != 0 && !rc) rc = TD_EIO;
        if (rc) {
            td_err_set(err, errlen, "%s: write failed: %s", path, td_strerror(rc));
            return rc;
        }
    }
    return 0;
}

int lt_report_plot(const char *dir, const lt_slo *slo)
{
    char path[4200];
    FILE *fp = open_in(dir, "plots.gp", "w", path, sizeof(path));
    if (!fp) return TD_EIO;
    /* Paths inside the script are relative: gnuplot runs with dir as its cwd. */
    fprintf(fp, "set terminal png size 1000,600\n"
                "set grid\n"
                "set key top left\n"
                "set output 'rate_goodput.png'\n"
                "set yrange [0:*]\n"
                "set offsets 0, 0, graph 0.1, 0\n"
                "set title 'Arrival rate, completions and goodput (1 s buckets)'\n"
                "set xlabel 'time (s)'\n"
                "set ylabel 'requests / s'\n"
                "plot 'timeseries.dat' using 1:2 with steps title 'sent', \\\n"
                "     '' using 1:3 with steps title 'ok', \\\n"
                "     '' using 1:4 with steps lw 2 title 'goodput (within SLOs)'\n"
                "set output 'ttft.png'\n"
                "set title 'TTFT by send time (ok requests)'\n"
                "set ylabel 'TTFT (ms)'\n"
                "set offsets 0, 0, 0, 0\n"
                "set datafile separator ','\n"
                "set datafile missing 'nan'\n"
                "plot 'requests.csv' every ::1 using ($3/1000):5 with points pt 7 ps 0.4 "
                "title 'TTFT'");
    if (slo->ttft_ms > 0) fprintf(fp, ", %g with lines lw 2 title 'SLO'", slo->ttft_ms);
    fprintf(fp, "\n"
                "set datafile separator whitespace\n"
                "set output 'latency_cdf.png'\n"
                "set title 'Latency CDFs (ok requests)'\n"
                "set xlabel 'latency (ms)'\n"
                "set ylabel 'fraction of requests'\n"
                "set logscale x\n"
                "set key bottom right\n"
                "plot 'cdf.dat' index 0 using 1:2 with steps title 'TTFT', \\\n"
                "     '' index 1 using 1:2 with steps title 'TPOT', \\\n"
                "     '' index 2 using 1:2 with steps title 'e2e'\n");
    if (fclose(fp) != 0) return TD_EIO;

    pid_t pid = fork();
    if (pid < 0) return TD_EIO;
    if (pid == 0) {
        if (chdir(dir) != 0) _exit(126);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            close(devnull);
        }
        execlp("gnuplot", "gnuplot", "plots.gp", (char *)NULL);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) return TD_EIO;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127) return TD_ENOENT;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return TD_EIO;
    return 0;
}

/* ---- compare ---- */

#define LT_SUMMARY_MAX_BYTES (16 << 20)

static cJSON *load_summary(const char *dir, char *err, size_t errlen, int *rc)
{
    char path[4200];
    FILE *fp = open_in(dir, "summary.json", "r", path, sizeof(path));
    if (!fp) {
        td_err_set(err, errlen, "%s/summary.json: %s", dir, strerror(errno));
        *rc = TD_ENOENT;
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), fp)) > 0) {
        /* a summary is a few KiB; anything far larger is not one */
        if (len + got > LT_SUMMARY_MAX_BYTES) {
            free(buf);
            fclose(fp);
            td_err_set(err, errlen, "%s: larger than %d bytes (not a summary.json)", path,
                       LT_SUMMARY_MAX_BYTES);
            *rc = TD_ETOOLONG;
            return NULL;
        }
        if (len + got + 1 > cap) {
            cap = (len + got + 1) * 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(fp);
                *rc = TD_ENOMEM;
                return NULL;
            }
            buf = nb;
        }
        memcpy(buf + len, chunk, got);
        len += got;
    }
    fclose(fp);
    cJSON *j = buf ? (buf[len] = '\0', cJSON_Parse(buf)) : NULL;
    free(buf);
    if (!j) {
        td_err_set(err, errlen, "%s: not valid JSON", path);
        *rc = TD_EFORMAT;
    }
    return j;
}

/* Looks up "a.b" in j; NAN when absent. */
static double json_path(const cJSON *j, const char *path)
{
    char key[64];
    const char *dot = strchr(path, '.');
    if (dot) {
        size_t k = (size_t)(dot - path);
        if (k >= sizeof(key)) return NAN;
        memcpy(key, path, k);
        key[k] = '\0';
        return json_path(cJSON_GetObjectItemCaseSensitive(j, key), dot + 1);
    }
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, path);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

int lt_report_compare(const char *dir_a, const char *dir_b, FILE *out, char *err, size_t errlen)
{
    static const char *const keys[] = {
        "slo.ttft_ms", /* the SLO goes with every goodput */
        "slo.tpot_ms",
        "requests",
        "ok",
        "rejected",
        "errors",
        "duration_s",
        "throughput.req_per_s",
        "throughput.output_tok_per_s",
        "goodput.req_per_s",
        "goodput.fraction",
        "client_retries.requests_retried",
        "client_retries.without_retries.goodput_req_per_s",
        "ttft_ms.p50",
        "ttft_ms.p90",
        "ttft_ms.p99",
        "tpot_ms.p50",
        "tpot_ms.p99",
        "itl_ms.p50",
        "itl_ms.p99",
        "e2e_ms.p50",
        "e2e_ms.p90",
        "e2e_ms.p99",
        "lateness_ms.p50",
        "lateness_ms.p99",
        "lateness_ms.max",
    };
    int rc = 0;
    cJSON *a = load_summary(dir_a, err, errlen, &rc);
    if (!a) return rc;
    cJSON *b = load_summary(dir_b, err, errlen, &rc);
    if (!b) {
        cJSON_Delete(a);
        return rc;
    }
    fprintf(out, "%-28s %14s %14s %9s\n", "metric", "A", "B", "B vs A");
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        double va = json_path(a, keys[i]), vb = json_path(b, keys[i]);
        char delta[32] = "";
        if (isfinite(va) && isfinite(vb) && va != 0)
            snprintf(delta, sizeof(delta), "%+.1f%%", (vb - va) / fabs(va) * 100);
        fprintf(out, "%-28s %14.3f %14.3f %9s\n", keys[i], va, vb, delta);
    }
    fprintf(out, "A = %s\nB = %s\n", dir_a, dir_b);
    cJSON_Delete(a);
    cJSON_Delete(b);
    return ferror(out) ? TD_EIO : 0;
}
