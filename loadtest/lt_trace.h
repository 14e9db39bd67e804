/* lt_trace: request traces for the load tester.
 *
 * Readers for the BurstGPT CSV (both schemas: 6 columns, and 8 with
 * `Session ID` and `Elapsed time`; columns are found by header name), the Azure
 * LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens) and
 * Mooncake JSONL (timestamp in ms, input_length, output_length, hash_ids).
 * All three become one array of lt_req: arrival time in ns from the first kept
 * request, prompt and response token counts.
 *
 * Errors: 0 or a negative TD_E* code; err[errlen] (when not NULL) receives a
 * reason naming the file line ("line 17: Response tokens: not an integer").
 */
#ifndef TANDEM_LOADTEST_LT_TRACE_H
#define TANDEM_LOADTEST_LT_TRACE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum lt_format {
    LT_FMT_BURSTGPT = 0,
    LT_FMT_AZURE,
    LT_FMT_MOONCAKE,
};

/* Parses "burstgpt", "azure" or "mooncake". 0 or TD_EINVAL. */
int lt_format_parse(const char *name, enum lt_format *out);
const char *lt_format_name(enum lt_format fmt);

typedef struct lt_req {
    int64_t t_ns;          /* scheduled send time, ns after the first request */
    int32_t input_tokens;  /* prompt length in tokens */
    int32_t output_tokens; /* response length in tokens (sent as max_tokens) */
    int64_t line;          /* 1-based line in the source file; 0 for synthetic */
    size_t hash_off;       /* Mooncake: first of this request's hash ids in lt_trace.hashes */
    uint32_t n_hash;       /* Mooncake: number of hash ids (prompt blocks); 0 elsewhere */
} lt_req;

typedef struct lt_read_opts {
    const char *model;    /* BurstGPT: keep only this Model (exact match); NULL = all */
    const char *log_type; /* BurstGPT: keep only this Log Type; NULL = all */
    int keep_failed;      /* keep rows with 0 response tokens (default: skip, count) */
    int skip_bad;         /* skip and count malformed rows instead of failing */
    double start_s;       /* window start, seconds after the earliest data row's timestamp */
    double end_s;         /* window end (exclusive) in the same clock; <= 0: no end */
    size_t max_requests;  /* keep only the first N requests after the filters; 0 = all */
} lt_read_opts;

typedef struct lt_trace {
    lt_req *reqs; /* n requests sorted by t_ns; owned by the trace */
    size_t n;
    size_t cap;
    /* What the reader saw (counts of data rows, header excluded). */
    size_t rows;       /* data rows read */
    size_t failed;     /* rows with 0 response tokens that were skipped */
    size_t bad;        /* malformed rows skipped under skip_bad */
    size_t filtered;   /* rows dropped by model / log type / window / first-N */
    size_t unsorted;   /* rows whose timestamp went backwards (the trace is then sorted) */
    double src_span_s; /* span of the kept rows in the trace's own clock, before scaling */
    /* Mooncake hash_ids of every kept request, referenced by lt_req.hash_off. */
    uint64_t *hashes;
    size_t n_hashes, hashes_cap;
} lt_trace;

/* Zeroed trace. */
void lt_trace_init(lt_trace *tr);
/* Frees tr->reqs and tr->hashes and zeroes tr; accepts NULL. */
void lt_trace_free(lt_trace *tr);
/* Appends one request (grows the array). 0 or TD_ENOMEM. */
int lt_trace_push(lt_trace *tr, const lt_req *req);

/* Longest line a reader accepts, in bytes with its newline. A longer line is
 * an error naming it (or a bad row skipped whole under skip_bad), so a file
 * without newlines cannot make the reader grow without bound. Real rows are
 * under 100 bytes (CSV) and a few KiB (Mooncake hash_ids). */
#define LT_TRACE_MAX_LINE ((size_t)1 << 20)

/* Reads a trace file into tr (which must be initialised and empty). opts may be
 * NULL (defaults: everything but failed rows, fail on bad rows). On error tr is
 * left empty. path must be a regular file (TD_EINVAL otherwise: a device or a
 * FIFO has no end to read to). */
int lt_trace_read(const char *path, enum lt_format fmt, const lt_read_opts *opts, lt_trace *tr,
                  char *err, size_t errlen);
/* Same, from an open stream (not closed). */
int lt_trace_read_stream(FILE *fp, enum lt_format fmt, const lt_read_opts *opts, lt_trace *tr,
                         char *err, size_t errlen);

/* Divides every arrival time by speedup (> 0). TD_EINVAL otherwise. */
int lt_trace_speedup(lt_trace *tr, double speedup);
/* Scales arrival times so that the mean rate, (n - 1) / span, equals rate_rps.
 * TD_EINVAL when rate_rps <= 0 or the trace has fewer than two distinct times. */
int lt_trace_scale_to_rate(lt_trace *tr, double rate_rps);
/* Mean request rate (n - 1) / span in req/s; 0 when undefined. */
double lt_trace_mean_rate(const lt_trace *tr);

/* Fits every request into a context of max_context tokens, so a trace taken
 * from a large model can be replayed against a small one. A request whose
 * prompt + output exceeds max_context gets both lengths multiplied by
 * max_context / (prompt + output), rounded down, each kept at least 1 (an
 * output of 0, a failed row kept with keep_failed, stays 0). A prompt of 0
 * counts as the 1 token the replay sends. Requests that fit are unchanged, as
 * are t_ns and the Mooncake hash ids (blocks past the scaled prompt are just
 * not used). *scaled (may be NULL) receives how many requests were changed.
 * TD_EINVAL when max_context < 2 (one prompt and one output token). */
int lt_trace_fit_context(lt_trace *tr, int32_t max_context, size_t *scaled);

/* What a replay does to the trace's lengths so that real traces fit a small
 * model, in this order: both lengths multiplied by scale (rounded to nearest;
 * a prompt, and an output that was > 0, stay at least 1); the prompt clipped
 * to max_prompt and the output to max_output; then lt_trace_fit_context to
 * max_context. A field <= 0 (scale: 0 or 1) leaves that step out. The
 * load tester, synth and tandem-sim apply the same, and state it in
 * summary.json (run.lengths). */
typedef struct lt_lengths {
    double scale;        /* length multiplier; 0 or 1: off */
    int32_t max_prompt;  /* prompt tokens at most; 0: off */
    int32_t max_output;  /* output tokens at most; 0: off */
    int32_t max_context; /* prompt + output at most (>= 2); 0: off */
} lt_lengths;

typedef struct lt_lengths_stats {
    size_t scaled;         /* requests whose lengths the scale changed */
    size_t prompt_clipped; /* prompts cut to max_prompt */
    size_t output_clipped; /* outputs cut to max_output */
    size_t context_fitted; /* requests scaled down to max_context */
} lt_lengths_stats;

/* Applies o to every request. TD_EINVAL (tr unchanged) when scale is < 0 or
 * not finite, or max_context is 1. st may be NULL. */
int lt_trace_fit_lengths(lt_trace *tr, const lt_lengths *o, lt_lengths_stats *st);

/* {"length_scale", "max_prompt_tokens", "max_output_tokens", "max_context",
 * "scaled", "prompt_clipped", "output_clipped", "context_scaled"} for
 * summary.json's run.lengths; NULL when out of memory. The caller owns it. */
struct cJSON;
struct cJSON *lt_lengths_json(const lt_lengths *o, const lt_lengths_stats *st);

/* Writes the trace as Mooncake-style JSONL (timestamp in ms, hash_ids when the
 * trace has them), so synthetic workloads can be saved and replayed. 0 or TD_EIO. */
int lt_trace_write_jsonl(const lt_trace *tr, FILE *fp);

/* Parses "YYYY-MM-DD HH:MM:SS[.fraction]" (also with 'T', up to 9 fraction
 * digits) as UTC into ns since the Unix epoch. 0 or TD_EFORMAT. */
int lt_parse_datetime(const char *s, int64_t *out_ns);

#endif
