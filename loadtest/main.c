/* tandem-loadtest: replay LLM serving traces (BurstGPT, Azure, Mooncake) or
 * BurstGPT-shaped synthetic workloads open-loop against an OpenAI-compatible
 * server, and report throughput, SLO goodput and latency percentiles.
 *
 *   tandem-loadtest replay --trace FILE --format burstgpt|azure|mooncake --url URL --out DIR ...
 *   tandem-loadtest synth  [--n N --seed S ...] (--url URL --out DIR | --write-trace FILE)
 *   tandem-loadtest fit    --trace FILE --format F [--window-s W]
 *   tandem-loadtest compare DIR_A DIR_B
 */
#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/log.h"
#include "loadtest/lt_prompt.h"
#include "loadtest/lt_replay.h"
#include "loadtest/lt_report.h"
#include "loadtest/lt_synth.h"
#include "loadtest/lt_trace.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *fp)
{
    fprintf(
        fp,
        "usage:\n"
        "  tandem-loadtest replay --trace FILE --format burstgpt|azure|mooncake --url URL --out "
        "DIR\n"
        "                         [--tokenizer PATH] [--model NAME] [--speedup X | --rate RPS]\n"
        "                         [--slo-ttft-ms A] [--slo-tpot-ms B] [filters] [client options]\n"
        "  tandem-loadtest synth  [--n N] [--seed S] [--gamma-shape K] [--gamma-scale-s T]\n"
        "                         [--req-zipf S] [--req-max N] [--resp-zipf S] [--resp-max N]\n"
        "                         (--write-trace FILE | --url URL --out DIR [replay options])\n"
        "  tandem-loadtest fit    --trace FILE --format F [--window-s W] [filters]\n"
        "  tandem-loadtest compare DIR_A DIR_B\n"
        "\n"
        "URL: http://HOST:PORT[/PATH] (POST /v1/completions, SSE) or grpc://HOST:PORT\n"
        "     (tandem.v1.Router/Generate streams)\n"
        "Every subcommand takes --config FILE (the format of common/config.h) and\n"
        "--help, which lists its options with defaults and ranges:\n"
        "  tandem-loadtest replay --help\n");
}

/* Every option of every subcommand, as common/config fills them; each
 * subcommand's table names the subset it accepts. */
struct lt_opts {
    const char *trace, *format, *url, *tokenizer, *model, *out, *write_trace;
    const char *filter_model, *log_type, *log_level;
    double speedup, rate, slo_ttft_ms, slo_tpot_ms, timeout_s, window_s, start_s, end_s;
    double gamma_shape, gamma_scale_s, req_zipf, resp_zipf;
    int64_t max_requests, max_conns, warm_conns, filler_id, spin_us, rt_priority, block_tokens;
    int64_t max_context, max_prompt_tokens, max_output_tokens, retry_429;
    double length_scale;
    int64_t n, seed, req_max, resp_max;
    bool keep_failed, skip_bad, no_verify, no_plots;
};

#define LT_OPT(name, type, def, min, max, choices, help, field)                                    \
    {                                                                                              \
        name, type, def, min, max, choices, help, offsetof(struct lt_opts, field), 0               \
    }

/* Option groups, shared by the subcommands' tables below. */
#define LT_TRACE_OPTS                                                                              \
    LT_OPT("trace", CFG_STRING, NULL, NULL, NULL, NULL, "Trace file (required)", trace),           \
        LT_OPT("format", CFG_STRING, NULL, NULL, NULL, "burstgpt|azure|mooncake",                  \
               "Trace format (required)", format)
#define LT_FILTER_OPTS                                                                             \
    LT_OPT("filter-model", CFG_STRING, NULL, NULL, NULL, NULL,                                     \
           "BurstGPT: keep only rows of this Model", filter_model),                                \
        LT_OPT("log-type", CFG_STRING, NULL, NULL, NULL, NULL,                                     \
               "BurstGPT: keep only rows of this Log Type", log_type),                             \
        LT_OPT("keep-failed", CFG_BOOL, "false", NULL, NULL, NULL,                                 \
               "Keep rows with 0 response tokens (default: skip and count them)", keep_failed),    \
        LT_OPT("skip-bad", CFG_BOOL, "false", NULL, NULL, NULL,                                    \
               "Skip and count malformed rows instead of failing", skip_bad),                      \
        LT_OPT("start-s", CFG_DOUBLE, "0", NULL, NULL, NULL,                                       \
               "Window start, seconds after the first row", start_s),                              \
        LT_OPT("end-s", CFG_DOUBLE, "0", NULL, NULL, NULL,                                         \
               "Window end (exclusive), same clock; <= 0: no end", end_s),                         \
        LT_OPT("max-requests", CFG_INT64, "0", "0", "1099511627776", NULL,                         \
               "Keep the first N requests after the filters; 0: all", max_requests)
#define LT_REPLAY_OPTS                                                                             \
    LT_OPT("url", CFG_STRING, NULL, NULL, NULL, NULL,                                              \
           "Target: http://HOST:PORT[/PATH] (OpenAI SSE) or grpc://HOST:PORT", url),               \
        LT_OPT("out", CFG_STRING, NULL, NULL, NULL, NULL, "Report directory", out),                \
        LT_OPT("tokenizer", CFG_STRING, NULL, NULL, NULL, NULL,                                    \
               "Build text prompts of exact length with this tokenizer", tokenizer),               \
        LT_OPT("model", CFG_STRING, NULL, NULL, NULL, NULL, "Model name sent in requests", model), \
        LT_OPT("speedup", CFG_DOUBLE, "0", "0", NULL, NULL,                                        \
               "Divide inter-arrival times by X; 0: off", speedup),                                \
        LT_OPT("rate", CFG_DOUBLE, "0", "0", NULL, NULL,                                           \
               "Rescale arrivals to this mean rate (req/s); 0: off", rate),                        \
        LT_OPT("slo-ttft-ms", CFG_DOUBLE, "0", "0", NULL, NULL, "TTFT SLO for goodput (ms)",       \
               slo_ttft_ms),                                                                       \
        LT_OPT("slo-tpot-ms", CFG_DOUBLE, "0", "0", NULL, NULL, "TPOT SLO for goodput (ms)",       \
               slo_tpot_ms),                                                                       \
        LT_OPT("timeout-s", CFG_DOUBLE, "600", "0.001", NULL, NULL, "Per-request timeout (s)",     \
               timeout_s),                                                                         \
        LT_OPT("max-conns", CFG_INT64, "1024", "1", "100000", NULL, "Connections at most",         \
               max_conns),                                                                         \
        LT_OPT("warm-conns", CFG_INT64, "4", "0", "100000", NULL,                                  \
               "Connections opened before the first send", warm_conns),                            \
        LT_OPT("filler-id", CFG_INT64, "100", "0", "2147483647", NULL,                             \
               "Token id of the prompts sent without --tokenizer", filler_id),                     \
        LT_OPT("no-verify", CFG_BOOL, "false", NULL, NULL, NULL,                                   \
               "Skip encoding every prompt to check its length", no_verify),                       \
        LT_OPT("no-plots", CFG_BOOL, "false", NULL, NULL, NULL, "Do not run gnuplot", no_plots),   \
        LT_OPT("spin-us", CFG_INT64, "0", "0", "100000", NULL,                                     \
               "Busy-wait the last U us before each send", spin_us),                               \
        LT_OPT("rt-priority", CFG_INT64, "0", "0", "99", NULL,                                     \
               "SCHED_FIFO priority of the send loop when permitted; 0: off", rt_priority),        \
        LT_OPT("block-tokens", CFG_INT64, "512", "1", "1048576", NULL,                             \
               "Tokens per Mooncake hash id", block_tokens),                                       \
        LT_OPT("max-context", CFG_INT64, "0", "0", "2147483647", NULL,                             \
               "Scale prompt + output tokens of longer requests down to fit N; 0: off",            \
               max_context),                                                                       \
        LT_OPT("length-scale", CFG_DOUBLE, "1", "0", NULL, NULL,                                   \
               "Multiply every prompt and output length by X (before the clips)", length_scale),   \
        LT_OPT("max-prompt-tokens", CFG_INT64, "0", "0", "2147483647", NULL,                       \
               "Clip prompts to N tokens; 0: off", max_prompt_tokens),                             \
        LT_OPT("max-output-tokens", CFG_INT64, "0", "0", "2147483647", NULL,                       \
               "Clip outputs (max_tokens) to N tokens; 0: off", max_output_tokens),                \
        LT_OPT("retry-429", CFG_INT64, "0", "0", "100", NULL,                                      \
               "Retry a 429 up to N times after its Retry-After, as the OpenAI client does",       \
               retry_429)
/* The defaults are lt_synth_defaults()'s, written out for --help. */
#define LT_SYNTH_OPTS                                                                              \
    LT_OPT("n", CFG_INT64, "1000", "1", "100000000", NULL, "Requests to generate", n),             \
        LT_OPT("seed", CFG_INT64, "1", "0", NULL, NULL, "Random seed", seed),                      \
        LT_OPT("gamma-shape", CFG_DOUBLE, "0.5", NULL, NULL, NULL,                                 \
               "Inter-arrival Gamma shape k (> 0)", gamma_shape),                                  \
        LT_OPT("gamma-scale-s", CFG_DOUBLE, "2", NULL, NULL, NULL,                                 \
               "Inter-arrival Gamma scale in seconds (> 0)", gamma_scale_s),                       \
        LT_OPT("req-zipf", CFG_DOUBLE, "1.1", NULL, NULL, NULL,                                    \
               "Request-length Zipf exponent (> 0)", req_zipf),                                    \
        LT_OPT("req-max", CFG_INT64, "4096", "1", "16777216", NULL,                                \
               "Request length at most (tokens)", req_max),                                        \
        LT_OPT("resp-zipf", CFG_DOUBLE, "1.1", NULL, NULL, NULL,                                   \
               "Response-length Zipf exponent (> 0)", resp_zipf),                                  \
        LT_OPT("resp-max", CFG_INT64, "1024", "1", "16777216", NULL,                               \
               "Response length at most (tokens)", resp_max),                                      \
        LT_OPT("write-trace", CFG_STRING, NULL, NULL, NULL, NULL,                                  \
               "Write the trace as Mooncake-style JSONL to FILE ('-': stdout)", write_trace)
#define LT_LOG_OPTS                                                                                \
    LT_OPT("log-level", CFG_STRING, NULL, NULL, NULL, "debug|info|warn|error", "Log threshold",    \
           log_level)

static const struct cfg_option replay_table[] = {LT_TRACE_OPTS, LT_FILTER_OPTS, LT_REPLAY_OPTS,
                                                 LT_LOG_OPTS};
static const struct cfg_option synth_table[] = {LT_SYNTH_OPTS, LT_REPLAY_OPTS, LT_LOG_OPTS};
static const struct cfg_option fit_table[] = {LT_TRACE_OPTS, LT_FILTER_OPTS,
                                              LT_OPT("window-s", CFG_DOUBLE, "600", NULL, NULL,
                                                     NULL, "Rate window for the fit (s)", window_s),
                                              LT_LOG_OPTS};
static const struct cfg_option compare_table[] = {LT_LOG_OPTS};

#define LT_NOPTS(t) (sizeof(t) / sizeof((t)[0]))

struct args {
    const char *trace, *url, *tokenizer, *model, *out, *write_trace;
    enum lt_format format;
    int have_format;
    double speedup, rate, slo_ttft_ms, slo_tpot_ms, timeout_s, window_s;
    lt_read_opts read;
    int max_conns, warm_conns, no_verify, no_plots;
    long filler_id;
    long spin_us;
    long rt_priority;
    long block_tokens;
    lt_lengths lengths;
    int retry_429;
    lt_synth_params synth;
};

/* Parses the options of one subcommand (argv[0] is its name) with table.
 * Returns 0 with *cfg_out set (it owns a's strings and the positionals:
 * free it after the last use of a), CFG_HELP after printing the help, or a
 * negative TD_E* code after printing the error. npos: the positional
 * arguments the subcommand takes. */
static int parse_args(const char *cmd, const struct cfg_option *table, size_t ntable, int npos,
                      int argc, char **argv, struct lt_opts *o, struct args *a, cfg **cfg_out)
{
    memset(o, 0, sizeof(*o));
    memset(a, 0, sizeof(*a));
    *cfg_out = NULL;
    char prog[64];
    snprintf(prog, sizeof(prog), "tandem-loadtest %s%s", cmd,
             strcmp(cmd, "compare") == 0 ? " DIR_A DIR_B" : "");
    cfg *c = NULL;
    int rc = cfg_create(&c, prog, table, ntable, o);
    if (rc != 0) return rc;
    rc = cfg_parse(c, argc, argv);
    if (rc == CFG_HELP) {
        fputs(cfg_help(c), stdout);
        cfg_free(c);
        return CFG_HELP;
    }
    int got = 0;
    char *const *pos = cfg_positional(c, &got);
    if (rc != 0) {
        fprintf(stderr, "tandem-loadtest %s: %s\n", cmd, cfg_error(c));
    } else if (got > npos) {
        fprintf(stderr, "tandem-loadtest %s: unexpected argument '%s' (see --help)\n", cmd,
                pos[npos]);
        rc = TD_EINVAL;
    } else if (got < npos) {
        fprintf(stderr, "usage: %s\n", prog);
        rc = TD_EINVAL;
    } else if (o->speedup > 0 && o->rate > 0) {
        fprintf(stderr, "tandem-loadtest: --speedup and --rate are exclusive\n");
        rc = TD_EINVAL;
    } else if (o->max_context == 1) {
        fprintf(stderr, "tandem-loadtest: --max-context must be 0 (off) or at least 2 (one "
                        "prompt and one output token)\n");
        rc = TD_EINVAL;
    }
    if (rc != 0) {
        cfg_free(c);
        return rc;
    }
    if (o->log_level) {
        enum td_log_level lvl;
        if (td_log_level_parse(o->log_level, &lvl) == 0) td_log_set_level(lvl);
    }
    if (o->format) {
        a->have_format = lt_format_parse(o->format, &a->format) == 0; /* cfg checked the name */
    }
    a->trace = o->trace;
    a->url = o->url;
    a->tokenizer = o->tokenizer;
    a->model = o->model;
    a->out = o->out;
    a->write_trace = o->write_trace;
    a->speedup = o->speedup;
    a->rate = o->rate;
    a->slo_ttft_ms = o->slo_ttft_ms;
    a->slo_tpot_ms = o->slo_tpot_ms;
    a->timeout_s = o->timeout_s;
    a->window_s = o->window_s;
    a->read = (lt_read_opts){.model = o->filter_model,
                             .log_type = o->log_type,
                             .keep_failed = o->keep_failed,
                             .skip_bad = o->skip_bad,
                             .start_s = o->start_s,
                             .end_s = o->end_s,
                             .max_requests = (size_t)o->max_requests};
    /* The tables' bounds keep every integer below in its field's range. */
    a->max_conns = (int)o->max_conns;
    a->warm_conns = (int)o->warm_conns;
    a->no_verify = o->no_verify;
    a->no_plots = o->no_plots;
    a->filler_id = (long)o->filler_id;
    a->spin_us = (long)o->spin_us;
    a->rt_priority = (long)o->rt_priority;
    a->block_tokens = (long)o->block_tokens;
    a->lengths = (lt_lengths){.scale = o->length_scale,
                              .max_prompt = (int32_t)o->max_prompt_tokens,
                              .max_output = (int32_t)o->max_output_tokens,
                              .max_context = (int32_t)o->max_context};
    a->retry_429 = (int)o->retry_429;
    a->synth = (lt_synth_params){.seed = (uint64_t)o->seed,
                                 .n = (size_t)o->n,
                                 .gamma_shape = o->gamma_shape,
                                 .gamma_scale_s = o->gamma_scale_s,
                                 .req_zipf_s = o->req_zipf,
                                 .req_max = (int32_t)o->req_max,
                                 .resp_zipf_s = o->resp_zipf,
                                 .resp_max = (int32_t)o->resp_max};
    *cfg_out = c;
    return 0;
}

/* parse_args' result as the subcommand's exit status: 0 for --help, 2 for
 * a usage error; -1 to go on. */
static int parse_status(int rc)
{
    return rc == CFG_HELP ? 0 : rc != 0 ? 2 : -1;
}

static int read_trace(const struct args *a, lt_trace *tr)
{
    if (!a->trace || !a->have_format) {
        fprintf(stderr, "tandem-loadtest: --trace and --format are required\n");
        return 2;
    }
    char err[512] = "";
    lt_trace_init(tr);
    int rc = lt_trace_read(a->trace, a->format, &a->read, tr, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "tandem-loadtest: %s: %s\n", a->trace, err[0] ? err : td_strerror(rc));
        return 1;
    }
    td_log_info("loadtest", "trace_read",
                "path=%s format=%s rows=%zu kept=%zu failed_skipped=%zu bad_skipped=%zu "
                "filtered=%zu unsorted=%zu span_s=%.3f",
                a->trace, lt_format_name(a->format), tr->rows, tr->n, tr->failed, tr->bad,
                tr->filtered, tr->unsorted, tr->src_span_s);
    return 0;
}

/* Encodes every request's prompt and checks its token count. A 1-token prompt
 * cannot be exact when the tokenizer adds BOS (BOS plus one word): counted apart. */
static int verify_prompts(const lt_prompt *p, const lt_trace *tr, int32_t block_tokens)
{
    size_t checked = 0, short_bos = 0;
    int rc = 0;
    for (size_t i = 0; i < tr->n && rc == 0; i++) {
        int32_t n = tr->reqs[i].input_tokens > 0 ? tr->reqs[i].input_tokens : 1, got;
        lt_prompt_shape shape = {.hashes = tr->hashes ? tr->hashes + tr->reqs[i].hash_off : NULL,
                                 .n_hash = tr->reqs[i].n_hash,
                                 .block_tokens = block_tokens};
        rc = lt_prompt_count(p, n, (uint64_t)i, &shape, &got);
        if (rc == 0 && got != n) {
            if (n == 1 && got == 2) {
                short_bos++;
            } else {
                fprintf(stderr,
                        "tandem-loadtest: request %zu: prompt for %d tokens encodes to %d\n", i, n,
                        got);
                rc = TD_EMISMATCH;
            }
        }
        checked++;
    }
    if (rc == 0)
        td_log_info("loadtest", "prompts_verified",
                    "requests=%zu word=%s head_words=%d one_token_with_bos=%zu", checked,
                    lt_prompt_word(p), lt_prompt_n_alt(p), short_bos);
    return rc;
}

/* Replays tr (already read or generated) and writes the report. */
static int run_replay(const struct args *a, lt_trace *tr, const char *source)
{
    if (!a->url || !a->out) {
        fprintf(stderr, "tandem-loadtest: --url and --out are required\n");
        return 2;
    }
    lt_replay_opts o = {.model = a->model,
                        .timeout_ns = (int64_t)(a->timeout_s * 1e9),
                        .max_conns = a->max_conns,
                        .warm_conns = a->warm_conns,
                        .progress = isatty(2),
                        .spin_ns = a->spin_us * TD_NS_PER_US,
                        .rt_priority = (int)a->rt_priority,
                        .retry_429 = a->retry_429,
                        .hashes = tr->hashes,
                        .block_tokens = (int32_t)a->block_tokens};
    if (lt_url_parse(a->url, &o.url) != 0) {
        fprintf(stderr,
                "tandem-loadtest: --url: expected http://HOST[:PORT][/PATH] or grpc://HOST:PORT, "
                "got '%s'\n",
                a->url);
        return 2;
    }
    if (!lt_url_is_loopback(&o.url))
        td_log_warn("loadtest", "non_loopback_target", "host=%s", o.url.host);
    if (a->speedup > 0) lt_trace_speedup(tr, a->speedup);
    if (a->rate > 0 && lt_trace_scale_to_rate(tr, a->rate) != 0) {
        fprintf(stderr, "tandem-loadtest: --rate needs at least two distinct arrival times\n");
        return 1;
    }
    lt_lengths_stats ls;
    if (lt_trace_fit_lengths(tr, &a->lengths, &ls) != 0) { /* max-context >= 2: parse_args */
        fprintf(stderr, "tandem-loadtest: --length-scale must be a finite number >= 0\n");
        return 2;
    }
    td_log_info("loadtest", "lengths",
                "length_scale=%g max_prompt=%d max_output=%d max_context=%d scaled=%zu "
                "prompt_clipped=%zu output_clipped=%zu context_scaled=%zu of=%zu",
                a->lengths.scale, (int)a->lengths.max_prompt, (int)a->lengths.max_output,
                (int)a->lengths.max_context, ls.scaled, ls.prompt_clipped, ls.output_clipped,
                ls.context_fitted, tr->n);
    int32_t max_in = 1;
    for (size_t i = 0; i < tr->n; i++)
        max_in = tr->reqs[i].input_tokens > max_in ? tr->reqs[i].input_tokens : max_in;

    char err[512] = "";
    lt_prompt *prompt = NULL;
    int rc;
    if (a->tokenizer) {
        rc = lt_prompt_create_text(a->tokenizer, max_in, &prompt, err, sizeof(err));
        if (rc) {
            fprintf(stderr, "tandem-loadtest: %s\n", err[0] ? err : td_strerror(rc));
            return 1;
        }
        if (!a->no_verify && (rc = verify_prompts(prompt, tr, (int32_t)a->block_tokens)) != 0) {
            fprintf(stderr, "tandem-loadtest: prompt verification failed: %s\n", td_strerror(rc));
            lt_prompt_free(prompt);
            return 1;
        }
    } else {
        rc = lt_prompt_create_ids((int32_t)a->filler_id, max_in, &prompt);
        if (rc) {
            fprintf(stderr, "tandem-loadtest: %s\n", td_strerror(rc));
            return 1;
        }
    }
    o.prompt = prompt;
    td_log_info("loadtest", "replay_start",
                "requests=%zu mean_rate_rps=%.3f span_s=%.3f url=%s prompt=%s", tr->n,
                lt_trace_mean_rate(tr), tr->n ? td_ns_to_s(tr->reqs[tr->n - 1].t_ns) : 0.0, a->url,
                a->tokenizer ? "text" : "token_ids");
    lt_run run;
    rc = lt_replay_run(&o, tr->reqs, tr->n, &run, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "tandem-loadtest: replay: %s\n", err[0] ? err : td_strerror(rc));
        lt_prompt_free(prompt);
        return 1;
    }
    lt_slo slo = {.ttft_ms = a->slo_ttft_ms, .tpot_ms = a->slo_tpot_ms};
    lt_summary s;
    rc = lt_summary_compute(run.recs, run.n, &slo, &s);
    cJSON *extra = cJSON_CreateObject();
    if (rc == 0 && extra) {
        cJSON_AddStringToObject(extra, "source", source);
        cJSON_AddStringToObject(extra, "url", a->url);
        cJSON_AddStringToObject(extra, "prompt", a->tokenizer ? "text" : "token_ids");
        if (a->tokenizer) {
            cJSON_AddStringToObject(extra, "tokenizer", a->tokenizer);
            cJSON_AddStringToObject(extra, "filler_word", lt_prompt_word(prompt));
        }
        if (a->model) cJSON_AddStringToObject(extra, "model", a->model);
        cJSON_AddNumberToObject(extra, "speedup", a->speedup);
        cJSON_AddNumberToObject(extra, "target_rate_rps", a->rate);
        cJSON_AddNumberToObject(extra, "scheduled_mean_rate_rps", lt_trace_mean_rate(tr));
        cJSON_AddNumberToObject(extra, "max_context", a->lengths.max_context);
        cJSON_AddNumberToObject(extra, "context_scaled", (double)ls.context_fitted);
        cJSON_AddItemToObject(extra, "lengths", lt_lengths_json(&a->lengths, &ls));
        cJSON_AddNumberToObject(extra, "retry_429", a->retry_429);
        cJSON_AddNumberToObject(extra, "trace_rows", (double)tr->rows);
        cJSON_AddNumberToObject(extra, "trace_failed_skipped", (double)tr->failed);
        cJSON_AddNumberToObject(extra, "trace_bad_skipped", (double)tr->bad);
        cJSON_AddNumberToObject(extra, "trace_filtered", (double)tr->filtered);
        cJSON_AddNumberToObject(extra, "connections_opened", run.conns_opened);
        cJSON_AddNumberToObject(extra, "start_unix_s", (double)run.start_wall_ns / 1e9);
        cJSON_AddNumberToObject(extra, "timeout_s", a->timeout_s);
    }
    if (rc == 0) rc = lt_report_write(a->out, run.recs, run.n, &s, extra, err, sizeof(err));
    cJSON_Delete(extra);
    if (rc) {
        fprintf(stderr, "tandem-loadtest: report: %s\n", err[0] ? err : td_strerror(rc));
    } else {
        if (!a->no_plots) {
            int prc = lt_report_plot(a->out, &slo);
            if (prc == TD_ENOENT)
                td_log_warn("loadtest", "plots_skipped", "reason=\"gnuplot not found\"");
            else if (prc)
                td_log_warn("loadtest", "plots_failed", "err=%s dir=%s", td_err_name(prc), a->out);
        }
        lt_summary_print(stdout, &s, a->out);
        /* Why requests failed, on stderr: requests.csv has every one. */
        lt_reason why[4];
        size_t nw = lt_report_reasons(run.recs, run.n, why, 4);
        if (nw > 0) {
            if (s.ok == 0)
                fprintf(stderr, "tandem-loadtest: all %zu requests failed; reasons:", s.requests);
            else
                fprintf(stderr, "tandem-loadtest: %zu of %zu requests failed; first reasons:",
                        s.rejected + s.errors, s.requests);
            for (size_t i = 0; i < nw; i++)
                fprintf(stderr, "%s %s: %s (x%zu)", i ? ";" : "", lt_outcome_name(why[i].outcome),
                        why[i].error, why[i].count);
            fputc('\n', stderr);
        }
        if (s.requests > 0 && s.ok == 0) rc = TD_EUNAVAILABLE; /* nothing was measured */
    }
    lt_run_free(&run);
    lt_prompt_free(prompt);
    return rc ? 1 : 0;
}

static int cmd_replay(int argc, char **argv)
{
    struct lt_opts o;
    struct args a;
    cfg *c = NULL;
    int st = parse_status(
        parse_args("replay", replay_table, LT_NOPTS(replay_table), 0, argc, argv, &o, &a, &c));
    if (st >= 0) return st;
    lt_trace tr;
    int rc = read_trace(&a, &tr);
    if (rc == 0) {
        rc = run_replay(&a, &tr, a.trace);
        lt_trace_free(&tr);
    }
    cfg_free(c);
    return rc;
}

/* synth after parsing: generates, then writes and/or replays the trace. */
static int cmd_synth_run(const struct args *pa)
{
    const struct args a = *pa;
    lt_trace tr;
    lt_trace_init(&tr);
    int rc = lt_synth_generate(&a.synth, &tr);
    if (rc) {
        fprintf(stderr,
                "tandem-loadtest: synth: %s (shape, scale and Zipf exponents must be > 0)\n",
                td_strerror(rc));
        return 2;
    }
    td_log_info("loadtest", "synth",
                "n=%zu seed=%llu gamma_shape=%g gamma_scale_s=%g req_zipf=%g req_max=%d "
                "resp_zipf=%g resp_max=%d mean_rate_rps=%.3f",
                tr.n, (unsigned long long)a.synth.seed, a.synth.gamma_shape, a.synth.gamma_scale_s,
                a.synth.req_zipf_s, a.synth.req_max, a.synth.resp_zipf_s, a.synth.resp_max,
                lt_trace_mean_rate(&tr));
    if (a.write_trace) {
        FILE *fp = strcmp(a.write_trace, "-") == 0 ? stdout : fopen(a.write_trace, "w");
        if (!fp) {
            fprintf(stderr, "tandem-loadtest: %s: %s\n", a.write_trace, strerror(errno));
            lt_trace_free(&tr);
            return 1;
        }
        rc = lt_trace_write_jsonl(&tr, fp);
        if (fp != stdout && fclose(fp) != 0) rc = TD_EIO;
        if (rc) {
            fprintf(stderr, "tandem-loadtest: %s: write failed\n", a.write_trace);
            lt_trace_free(&tr);
            return 1;
        }
    }
    if (a.url || a.out)
        rc = run_replay(&a, &tr, "synth");
    else if (!a.write_trace) {
        fprintf(stderr, "tandem-loadtest: synth needs --write-trace FILE or --url and --out\n");
        rc = 2;
    }
    lt_trace_free(&tr);
    return rc;
}

static int cmd_synth(int argc, char **argv)
{
    struct lt_opts o;
    struct args a;
    cfg *c = NULL;
    int st = parse_status(
        parse_args("synth", synth_table, LT_NOPTS(synth_table), 0, argc, argv, &o, &a, &c));
    if (st >= 0) return st;
    int rc = cmd_synth_run(&a);
    cfg_free(c);
    return rc;
}
static int cmd_fit(int argc, char **argv)
{
    struct lt_opts o;
    struct args a;
    cfg *c = NULL;
    int st =
        parse_status(parse_args("fit", fit_table, LT_NOPTS(fit_table), 0, argc, argv, &o, &a, &c));
    if (st >= 0) return st;
    lt_trace tr;
    int rc = read_trace(&a, &tr);
    if (rc == 0) {
        rc = lt_synth_fit_report(&tr, a.window_s, stdout);
        if (rc)
            fprintf(stderr, "tandem-loadtest: fit: %s (need at least 3 requests)\n",
                    td_strerror(rc));
        lt_trace_free(&tr);
        rc = rc ? 1 : 0;
    }
    cfg_free(c);
    return rc;
}

static int cmd_compare(int argc, char **argv)
{
    struct lt_opts o;
    struct args a;
    cfg *c = NULL;
    int st = parse_status(
        parse_args("compare", compare_table, LT_NOPTS(compare_table), 2, argc, argv, &o, &a, &c));
    if (st >= 0) return st;
    char *const *dirs = cfg_positional(c, NULL);
    char err[512] = "";
    int rc = lt_report_compare(dirs[0], dirs[1], stdout, err, sizeof(err));
    if (rc) fprintf(stderr, "tandem-loadtest: compare: %s\n", err[0] ? err : td_strerror(rc));
    cfg_free(c);
    return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "replay") == 0) return cmd_replay(argc - 1, argv + 1);
    if (strcmp(cmd, "synth") == 0) return cmd_synth(argc - 1, argv + 1);
    if (strcmp(cmd, "fit") == 0) return cmd_fit(argc - 1, argv + 1);
    if (strcmp(cmd, "compare") == 0) return cmd_compare(argc - 1, argv + 1);
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "tandem-loadtest: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
