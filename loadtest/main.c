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
#include "common/err.h"
#include "common/log.h"
#include "loadtest/lt_prompt.h"
#include "loadtest/lt_replay.h"
#include "loadtest/lt_report.h"
#include "loadtest/lt_synth.h"
#include "loadtest/lt_trace.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
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
        "filters:  --filter-model NAME  --log-type TYPE  --keep-failed  --skip-bad\n"
        "          --start-s S  --end-s E  --max-requests N\n"
        "URL:      http://HOST:PORT[/PATH] (POST /v1/completions, SSE) or grpc://HOST:PORT\n"
        "          (tandem.v1.Router/Generate streams)\n"
        "client:   --timeout-s T (default 600)  --max-conns N (1024)  --warm-conns N (4)\n"
        "          --filler-id ID (token id used without --tokenizer, default 100)\n"
        "          --no-verify (skip encoding every prompt length)  --no-plots\n"
        "          --spin-us U (busy-wait the last U us before each send; default 0)\n"
        "          --rt-priority P (SCHED_FIFO for the send loop when permitted; default off)\n"
        "          --block-tokens N (tokens per Mooncake hash id, default 512)\n"
        "          --log-level debug|info|warn|error\n");
}

enum {
    OPT_TRACE = 256,
    OPT_FORMAT,
    OPT_URL,
    OPT_TOKENIZER,
    OPT_MODEL,
    OPT_SPEEDUP,
    OPT_RATE,
    OPT_SLO_TTFT,
    OPT_SLO_TPOT,
    OPT_OUT,
    OPT_FILTER_MODEL,
    OPT_LOG_TYPE,
    OPT_KEEP_FAILED,
    OPT_SKIP_BAD,
    OPT_START,
    OPT_END,
    OPT_MAX_REQ,
    OPT_TIMEOUT,
    OPT_MAX_CONNS,
    OPT_WARM_CONNS,
    OPT_FILLER_ID,
    OPT_NO_VERIFY,
    OPT_NO_PLOTS,
    OPT_SPIN_US,
    OPT_RT_PRIORITY,
    OPT_BLOCK_TOKENS,
    OPT_N,
    OPT_SEED,
    OPT_GSHAPE,
    OPT_GSCALE,
    OPT_REQ_ZIPF,
    OPT_REQ_MAX,
    OPT_RESP_ZIPF,
    OPT_RESP_MAX,
    OPT_WRITE_TRACE,
    OPT_WINDOW,
    OPT_LOG_LEVEL,
    OPT_HELP,
};

static const struct option k_opts[] = {
    {"trace", required_argument, NULL, OPT_TRACE},
    {"format", required_argument, NULL, OPT_FORMAT},
    {"url", required_argument, NULL, OPT_URL},
    {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
    {"model", required_argument, NULL, OPT_MODEL},
    {"speedup", required_argument, NULL, OPT_SPEEDUP},
    {"rate", required_argument, NULL, OPT_RATE},
    {"slo-ttft-ms", required_argument, NULL, OPT_SLO_TTFT},
    {"slo-tpot-ms", required_argument, NULL, OPT_SLO_TPOT},
    {"out", required_argument, NULL, OPT_OUT},
    {"filter-model", required_argument, NULL, OPT_FILTER_MODEL},
    {"log-type", required_argument, NULL, OPT_LOG_TYPE},
    {"keep-failed", no_argument, NULL, OPT_KEEP_FAILED},
    {"skip-bad", no_argument, NULL, OPT_SKIP_BAD},
    {"start-s", required_argument, NULL, OPT_START},
    {"end-s", required_argument, NULL, OPT_END},
    {"max-requests", required_argument, NULL, OPT_MAX_REQ},
    {"timeout-s", required_argument, NULL, OPT_TIMEOUT},
    {"max-conns", required_argument, NULL, OPT_MAX_CONNS},
    {"warm-conns", required_argument, NULL, OPT_WARM_CONNS},
    {"filler-id", required_argument, NULL, OPT_FILLER_ID},
    {"no-verify", no_argument, NULL, OPT_NO_VERIFY},
    {"no-plots", no_argument, NULL, OPT_NO_PLOTS},
    {"spin-us", required_argument, NULL, OPT_SPIN_US},
    {"rt-priority", required_argument, NULL, OPT_RT_PRIORITY},
    {"block-tokens", required_argument, NULL, OPT_BLOCK_TOKENS},
    {"n", required_argument, NULL, OPT_N},
    {"seed", required_argument, NULL, OPT_SEED},
    {"gamma-shape", required_argument, NULL, OPT_GSHAPE},
    {"gamma-scale-s", required_argument, NULL, OPT_GSCALE},
    {"req-zipf", required_argument, NULL, OPT_REQ_ZIPF},
    {"req-max", required_argument, NULL, OPT_REQ_MAX},
    {"resp-zipf", required_argument, NULL, OPT_RESP_ZIPF},
    {"resp-max", required_argument, NULL, OPT_RESP_MAX},
    {"write-trace", required_argument, NULL, OPT_WRITE_TRACE},
    {"window-s", required_argument, NULL, OPT_WINDOW},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

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
    lt_synth_params synth;
};

static int parse_double(const char *name, const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || errno || !isfinite(v)) {
        fprintf(stderr, "tandem-loadtest: --%s: not a number: '%s'\n", name, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_long(const char *name, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || errno || v < lo || v > hi) {
        fprintf(stderr, "tandem-loadtest: --%s: expected an integer in [%ld, %ld]: '%s'\n", name,
                lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, struct args *a)
{
    memset(a, 0, sizeof(*a));
    a->timeout_s = 600;
    a->max_conns = 1024;
    a->warm_conns = 4;
    a->filler_id = 100;
    a->window_s = 600;
    a->block_tokens = 512;
    lt_synth_defaults(&a->synth);
    optind = 1;
    int c;
    long v;
    while ((c = getopt_long(argc, argv, "h", k_opts, NULL)) != -1) {
        const char *name = NULL;
        for (const struct option *o = k_opts; o->name; o++)
            if (o->val == c) name = o->name;
        int bad = 0;
        switch (c) {
        case OPT_TRACE:
            a->trace = optarg;
            break;
        case OPT_FORMAT:
            if (lt_format_parse(optarg, &a->format) != 0) {
                fprintf(stderr, "tandem-loadtest: --format: burstgpt, azure or mooncake\n");
                bad = 1;
            }
            a->have_format = 1;
            break;
        case OPT_URL:
            a->url = optarg;
            break;
        case OPT_TOKENIZER:
            a->tokenizer = optarg;
            break;
        case OPT_MODEL:
            a->model = optarg;
            break;
        case OPT_SPEEDUP:
            bad = parse_double(name, optarg, &a->speedup) || !(a->speedup > 0);
            break;
        case OPT_RATE:
            bad = parse_double(name, optarg, &a->rate) || !(a->rate > 0);
            break;
        case OPT_SLO_TTFT:
            bad = parse_double(name, optarg, &a->slo_ttft_ms);
            break;
        case OPT_SLO_TPOT:
            bad = parse_double(name, optarg, &a->slo_tpot_ms);
            break;
        case OPT_OUT:
            a->out = optarg;
            break;
        case OPT_FILTER_MODEL:
            a->read.model = optarg;
            break;
        case OPT_LOG_TYPE:
            a->read.log_type = optarg;
            break;
        case OPT_KEEP_FAILED:
            a->read.keep_failed = 1;
            break;
        case OPT_SKIP_BAD:
            a->read.skip_bad = 1;
            break;
        case OPT_START:
            bad = parse_double(name, optarg, &a->read.start_s);
            break;
        case OPT_END:
            bad = parse_double(name, optarg, &a->read.end_s);
            break;
        case OPT_MAX_REQ:
            bad = parse_long(name, optarg, 1, 1L << 40, &v);
            a->read.max_requests = (size_t)v;
            break;
        case OPT_TIMEOUT:
            bad = parse_double(name, optarg, &a->timeout_s) || !(a->timeout_s > 0);
            break;
        case OPT_MAX_CONNS:
            bad = parse_long(name, optarg, 1, 100000, &v);
            a->max_conns = (int)v;
            break;
        case OPT_WARM_CONNS:
            bad = parse_long(name, optarg, 0, 100000, &v);
            a->warm_conns = (int)v;
            break;
        case OPT_FILLER_ID:
            bad = parse_long(name, optarg, 0, INT32_MAX, &a->filler_id);
            break;
        case OPT_NO_VERIFY:
            a->no_verify = 1;
            break;
        case OPT_NO_PLOTS:
            a->no_plots = 1;
            break;
        case OPT_SPIN_US:
            bad = parse_long(name, optarg, 0, 100000, &a->spin_us);
            break;
        case OPT_RT_PRIORITY:
            bad = parse_long(name, optarg, 0, 99, &a->rt_priority);
            break;
        case OPT_BLOCK_TOKENS:
            bad = parse_long(name, optarg, 1, 1 << 20, &a->block_tokens);
            break;
        case OPT_N:
            bad = parse_long(name, optarg, 1, 100000000, &v);
            a->synth.n = (size_t)v;
            break;
        case OPT_SEED:
            bad = parse_long(name, optarg, 0, LONG_MAX, &v);
            a->synth.seed = (uint64_t)v;
            break;
        case OPT_GSHAPE:
            bad = parse_double(name, optarg, &a->synth.gamma_shape);
            break;
        case OPT_GSCALE:
            bad = parse_double(name, optarg, &a->synth.gamma_scale_s);
            break;
        case OPT_REQ_ZIPF:
            bad = parse_double(name, optarg, &a->synth.req_zipf_s);
            break;
        case OPT_REQ_MAX:
            bad = parse_long(name, optarg, 1, 1 << 24, &v);
            a->synth.req_max = (int32_t)v;
            break;
        case OPT_RESP_ZIPF:
            bad = parse_double(name, optarg, &a->synth.resp_zipf_s);
            break;
        case OPT_RESP_MAX:
            bad = parse_long(name, optarg, 1, 1 << 24, &v);
            a->synth.resp_max = (int32_t)v;
            break;
        case OPT_WRITE_TRACE:
            a->write_trace = optarg;
            break;
        case OPT_WINDOW:
            bad = parse_double(name, optarg, &a->window_s);
            break;
        case OPT_LOG_LEVEL: {
            enum td_log_level lvl;
            if (td_log_level_parse(optarg, &lvl) != 0) {
                fprintf(stderr, "tandem-loadtest: --log-level: debug, info, warn or error\n");
                bad = 1;
            } else {
                td_log_set_level(lvl);
            }
            break;
        }
        case OPT_HELP:
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            return -1;
        }
        if (bad) {
            if (name) fprintf(stderr, "tandem-loadtest: bad value for --%s: '%s'\n", name, optarg);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "tandem-loadtest: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (a->speedup > 0 && a->rate > 0) {
        fprintf(stderr, "tandem-loadtest: --speedup and --rate are exclusive\n");
        return -1;
    }
    return 0;
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

static void print_summary(const lt_summary *s, const char *out)
{
    printf("requests %zu  ok %zu  rejected %zu  errors %zu  duration %.2f s\n", s->requests, s->ok,
           s->rejected, s->errors, s->duration_s);
    printf("throughput %.2f req/s  %.1f output tok/s\n", s->req_per_s, s->out_tok_per_s);
    printf("goodput %.2f req/s (%zu requests within TTFT <= %g ms, TPOT <= %g ms)\n",
           s->goodput_req_per_s, s->good, s->slo.ttft_ms, s->slo.tpot_ms);
    const struct {
        const char *name;
        const lt_pcts *p;
    } rows[] = {{"ttft_ms", &s->ttft},
                {"itl_ms", &s->itl},
                {"tpot_ms", &s->tpot},
                {"e2e_ms", &s->e2e},
                {"lateness_ms", &s->lateness}};
    printf("%-12s %10s %10s %10s %10s %10s\n", "", "mean", "p50", "p90", "p99", "max");
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        printf("%-12s %10.3f %10.3f %10.3f %10.3f %10.3f\n", rows[i].name, rows[i].p->mean,
               rows[i].p->p50, rows[i].p->p90, rows[i].p->p99, rows[i].p->max);
    printf("report: %s/summary.json\n", out);
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
        print_summary(&s, a->out);
    }
    lt_run_free(&run);
    lt_prompt_free(prompt);
    return rc ? 1 : 0;
}

static int cmd_replay(int argc, char **argv)
{
    struct args a;
    if (parse_args(argc, argv, &a) != 0) return 2;
    lt_trace tr;
    int rc = read_trace(&a, &tr);
    if (rc) return rc;
    rc = run_replay(&a, &tr, a.trace);
    lt_trace_free(&tr);
    return rc;
}

static int cmd_synth(int argc, char **argv)
{
    struct args a;
    if (parse_args(argc, argv, &a) != 0) return 2;
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

static int cmd_fit(int argc, char **argv)
{
    struct args a;
    if (parse_args(argc, argv, &a) != 0) return 2;
    lt_trace tr;
    int rc = read_trace(&a, &tr);
    if (rc) return rc;
    rc = lt_synth_fit_report(&tr, a.window_s, stdout);
    if (rc)
        fprintf(stderr, "tandem-loadtest: fit: %s (need at least 3 requests)\n", td_strerror(rc));
    lt_trace_free(&tr);
    return rc ? 1 : 0;
}

static int cmd_compare(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: tandem-loadtest compare DIR_A DIR_B\n");
        return 2;
    }
    char err[512] = "";
    int rc = lt_report_compare(argv[1], argv[2], stdout, err, sizeof(err));
    if (rc) fprintf(stderr, "tandem-loadtest: compare: %s\n", err[0] ? err : td_strerror(rc));
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
