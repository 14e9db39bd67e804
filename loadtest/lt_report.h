/* lt_report: per-request records, the run summary (throughput, SLO goodput,
 * latency percentiles), summary.json, requests.csv, gnuplot plots and the
 * side-by-side comparison of two runs.
 *
 * Definitions (docs/loadtest.md says the same):
 *   TTFT   = first content chunk's arrival - actual send time.
 *   ITL    = gap between consecutive content chunks of one request.
 *   TPOT   = (e2e - TTFT) / (output_tokens - 1); 0 when output_tokens <= 1.
 *   e2e    = last byte of the response - actual send time.
 *   lateness = actual send time - scheduled send time.
 *   goodput: a request is good when it is ok, TTFT <= SLO_ttft and its mean
 *            TPOT <= SLO_tpot (an SLO <= 0 is not checked); a rejected or
 *            failed request is never good. Goodput in req/s is the good count
 *            divided by the run duration. This is the one definition: the
 *            load tester, the simulator and its tuner all call
 *            lt_record_is_good / lt_summary_compute, and print the SLO with
 *            every result.
 *   client retries (--retry-429): send_ns is the first attempt's, so TTFT and
 *            e2e include the 429s and the waits (what the user saw). Without
 *            retries is the same run read as a client that does not retry
 *            would have: a request whose first answer was a 429 is rejected.
 *   duration = from the first scheduled send (t = 0) to the last completion.
 */
#ifndef TANDEM_LOADTEST_LT_REPORT_H
#define TANDEM_LOADTEST_LT_REPORT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum lt_outcome {
    LT_PENDING = 0, /* never sent or never finished (the run was cut short) */
    LT_OK,
    LT_REJECTED, /* HTTP 429 */
    LT_ERROR,    /* anything else: status != 200, timeout, reset, protocol error */
};
const char *lt_outcome_name(enum lt_outcome o);

typedef struct lt_record {
    int64_t sched_ns;      /* scheduled send time, ns after the run's start */
    int64_t send_ns;       /* actual send time, ns after the start; -1 when not sent */
    int64_t ttft_ns;       /* -1 when no token arrived */
    int64_t e2e_ns;        /* -1 when not finished */
    int32_t input_tokens;  /* trace prompt length */
    int32_t max_tokens;    /* trace response length, sent as max_tokens */
    int32_t output_tokens; /* usage.completion_tokens when reported, else n_chunks */
    int32_t n_chunks;      /* content chunks received (SSE events with a choice) */
    int64_t *chunk_ns;     /* chunk arrival times since send, [min(n_chunks, chunk_cap)];
                              borrowed from the run's arena, not owned by the record */
    int32_t chunk_cap;
    int32_t attempts; /* times sent: 1 + 429s retried (0 when never sent) */
    int http_status;  /* of the last attempt; 0 when no status line arrived */
    enum lt_outcome outcome;
    char error[96]; /* reason for LT_ERROR / LT_REJECTED; "" otherwise */
} lt_record;

typedef struct lt_slo {
    double ttft_ms; /* <= 0: not checked */
    double tpot_ms; /* <= 0: not checked */
} lt_slo;

typedef struct lt_pcts {
    size_t n;
    double mean, p50, p90, p99, max; /* milliseconds; 0 when n == 0 */
} lt_pcts;

typedef struct lt_summary {
    size_t requests, ok, rejected, errors, pending;
    size_t good; /* ok and within both SLOs */
    double duration_s;
    double req_per_s, out_tok_per_s, goodput_req_per_s;
    int64_t input_tokens, output_tokens; /* sums over ok requests */
    lt_pcts ttft, itl, tpot, e2e, lateness;
    lt_slo slo;
    /* Client retries of 429s: how many requests were retried, how many
     * retries in all, and the run as a client without retries saw it. */
    size_t retried, retries;
    struct {
        size_t ok, rejected, good;
        double goodput_req_per_s; /* over the same duration */
    } no_retry;
} lt_summary;

/* TPOT of one record in ms (see above). */
double lt_record_tpot_ms(const lt_record *r);
/* 1 when r is ok and meets slo (rejected and failed: never). */
int lt_record_is_good(const lt_record *r, const lt_slo *slo);

/* Computes the summary of n records. 0 or TD_ENOMEM. */
int lt_summary_compute(const lt_record *recs, size_t n, const lt_slo *slo, lt_summary *out);

/* Prints the summary table of a run (counts, throughput, goodput, latency
 * percentiles in ms) and the path of out/summary.json to fp. */
void lt_summary_print(FILE *fp, const lt_summary *s, const char *out);

/* One distinct failure reason and how many records gave it. */
typedef struct lt_reason {
    const char *error; /* a record's error text (borrowed from recs) */
    enum lt_outcome outcome;
    size_t count;
} lt_reason;

/* The distinct reasons of the rejected and failed records, in order of first
 * appearance: up to max of them in out[], each with its count (records whose
 * reason is not among the first max are not counted). Returns how many were
 * filled. For telling the operator why requests failed without opening
 * requests.csv. */
size_t lt_report_reasons(const lt_record *recs, size_t n, lt_reason *out, size_t max);

/* Percentiles (nearest rank on sorted copies) of v[n] in ms. Sorts v in place. */
void lt_pcts_of(double *v, size_t n, lt_pcts *out);

/* Writes summary.json, requests.csv and the time-series/CDF data files to dir
 * (created when missing). extra (may be NULL) is merged into summary.json as
 * "run" (borrowed). 0 or a TD_E* code; err gets the failing path. */
struct cJSON;
int lt_report_write(const char *dir, const lt_record *recs, size_t n, const lt_summary *s,
                    const struct cJSON *extra, char *err, size_t errlen);

/* Renders PNG plots in dir from the data files written by lt_report_write, by
 * running gnuplot on a generated script (dir/plots.gp). TD_ENOENT when gnuplot
 * cannot be run (the caller warns and goes on), TD_EIO when it failed. */
int lt_report_plot(const char *dir, const lt_slo *slo);

/* Prints two runs' summary.json side by side with relative change. 0 or a
 * TD_E* code with err set. */
int lt_report_compare(const char *dir_a, const char *dir_b, FILE *out, char *err, size_t errlen);

#endif
