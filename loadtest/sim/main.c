/* tandem-sim: simulate a Tandem cluster on a trace (docs/simulator.md).
 *
 *   tandem-sim run  --trace FILE --format F [filters, scaling] [cluster] [--admission NAME ...]
 *                   [--cost FILE] [--slo-ttft-ms X --slo-tpot-ms Y] --out DIR
 *   tandem-sim tune --trace FILE --format F [cluster] --loads 0.5,1,1.5,2
 *                   --policies max_outstanding,... --slo-ttft-ms X --slo-tpot-ms Y --out DIR
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/log.h"
#include "loadtest/lt_report.h"
#include "loadtest/lt_trace.h"
#include "loadtest/sim/sim.h"
#include "loadtest/sim/sim_tune.h"

struct sim_opts {
    const char *trace, *format, *filter_model, *log_type, *admission, *cost, *router_cost, *out,
        *log_level;
    const char *loads, *policies, *holdout;
    double speedup, rate, start_s, end_s, slo_ttft_ms, slo_tpot_ms, train_fraction, target_capacity;
    /* The router's admission keys (router/rt_main.c), read over adm_params_defaults. */
    double bucket_rate, bucket_burst, queue_max_ms, short_window_s, long_window_s, hold_max_ms,
        burst_cv, burst_rate_ratio, slo_margin, speed_step, speed_track;
    int64_t hold_max, max_prompt_tokens, max_output_tokens;
    double length_scale;
    int64_t max_requests, prefill, decode, kv_blocks, block_size, max_num_seqs, max_batched_tokens,
        max_chunk_tokens, max_model_len, max_context, heartbeat_ms, tick_ms, max_outstanding,
        chunk_cap, retry_429, seed;
    bool keep_failed, skip_bad, no_plots, check_kv;
};

#define SIM_OPT(name, type, def, min, max, choices, help, field)                                   \
    {                                                                                              \
        name, type, def, min, max, choices, help, offsetof(struct sim_opts, field), 0              \
    }

#define SIM_COMMON_OPTS                                                                            \
    SIM_OPT("trace", CFG_STRING, NULL, NULL, NULL, NULL, "Trace file (required)", trace),          \
        SIM_OPT("format", CFG_STRING, NULL, NULL, NULL, "burstgpt|azure|mooncake",                 \
                "Trace format (required)", format),                                                \
        SIM_OPT("filter-model", CFG_STRING, NULL, NULL, NULL, NULL,                                \
                "BurstGPT: keep only rows of this Model", filter_model),                           \
        SIM_OPT("log-type", CFG_STRING, NULL, NULL, NULL, NULL,                                    \
                "BurstGPT: keep only rows of this Log Type", log_type),                            \
        SIM_OPT("keep-failed", CFG_BOOL, "false", NULL, NULL, NULL,                                \
                "Keep rows with 0 response tokens", keep_failed),                                  \
        SIM_OPT("skip-bad", CFG_BOOL, "false", NULL, NULL, NULL, "Skip malformed rows", skip_bad), \
        SIM_OPT("start-s", CFG_DOUBLE, "0", NULL, NULL, NULL,                                      \
                "Window start, seconds after the first row", start_s),                             \
        SIM_OPT("end-s", CFG_DOUBLE, "0", NULL, NULL, NULL, "Window end; <= 0: no end", end_s),    \
        SIM_OPT("max-requests", CFG_INT64, "0", "0", "1099511627776", NULL,                        \
                "Keep the first N requests after the filters; 0: all", max_requests),              \
        SIM_OPT("speedup", CFG_DOUBLE, "0", "0", NULL, NULL, "Divide inter-arrival times by X",    \
                speedup),                                                                          \
        SIM_OPT("rate", CFG_DOUBLE, "0", "0", NULL, NULL, "Rescale arrivals to this mean rate",    \
                rate),                                                                             \
        SIM_OPT("max-context", CFG_INT64, "0", "0", "16777216", NULL,                              \
                "Scale prompt + output of longer requests down to fit N; 0: off", max_context),    \
        SIM_OPT("length-scale", CFG_DOUBLE, "1", "0", NULL, NULL,                                  \
                "Multiply every prompt and output length by X (before the clips)", length_scale),  \
        SIM_OPT("max-prompt-tokens", CFG_INT64, "0", "0", "2147483647", NULL,                      \
                "Clip prompts to N tokens; 0: off", max_prompt_tokens),                            \
        SIM_OPT("max-output-tokens", CFG_INT64, "0", "0", "2147483647", NULL,                      \
                "Clip outputs to N tokens; 0: off", max_output_tokens),                            \
        SIM_OPT("prefill", CFG_INT64, "1", "1", "4096", NULL, "Prefill workers", prefill),         \
        SIM_OPT("decode", CFG_INT64, "1", "1", "4096", NULL, "Decode workers", decode),            \
        SIM_OPT("kv-blocks", CFG_INT64, "1024", "1", "16777216", NULL, "KV blocks per worker",     \
                kv_blocks),                                                                        \
        SIM_OPT("block-size", CFG_INT64, "16", "1", "1024", NULL, "Tokens per KV block",           \
                block_size),                                                                       \
        SIM_OPT("max-num-seqs", CFG_INT64, "64", "1", "4096", NULL, "Sequences in one step",       \
                max_num_seqs),                                                                     \
        SIM_OPT("max-batched-tokens", CFG_INT64, "512", "1", "1048576", NULL,                      \
                "Tokens in one step", max_batched_tokens),                                         \
        SIM_OPT("max-chunk-tokens", CFG_INT64, "0", "0", "1048576", NULL,                          \
                "Prefill chunk cap per sequence; 0: none", max_chunk_tokens),                      \
        SIM_OPT("max-model-len", CFG_INT64, "0", "0", "16777216", NULL,                            \
                "Context of the model (0: --max-context, else 4096)", max_model_len),              \
        SIM_OPT("heartbeat-ms", CFG_INT64, "1000", "0", "600000", NULL,                            \
                "Load reports to the router every T ms; 0: the router sees live state",            \
                heartbeat_ms),                                                                     \
        SIM_OPT("tick-ms", CFG_INT64, "100", "0", "600000", NULL,                                  \
                "The router's tick: held requests are rechecked on it; 0: heartbeats only",        \
                tick_ms),                                                                          \
        SIM_OPT("cost", CFG_STRING, NULL, NULL, NULL, NULL,                                        \
                "Cost model file (adm_cost_load; keys left out are 0); default adm_cost_defaults", \
                cost),                                                                             \
        SIM_OPT("router-cost", CFG_STRING, NULL, NULL, NULL, NULL,                                 \
                "The router's cost model when it differs from the simulated cluster's (--cost): "  \
                "a profile taken when the cluster ran faster or slower",                           \
                router_cost),                                                                      \
        SIM_OPT("slo-ttft-ms", CFG_DOUBLE, "0", "0", NULL, NULL,                                   \
                "TTFT SLO (ms) of the report, and burst's when set; 0: unchecked", slo_ttft_ms),   \
        SIM_OPT("slo-tpot-ms", CFG_DOUBLE, "0", "0", NULL, NULL,                                   \
                "TPOT SLO (ms) of the report, and burst's when set; 0: unchecked", slo_tpot_ms),   \
        SIM_OPT("max-outstanding", CFG_INT64, "256", "1", "1000000", NULL,                         \
                "max_outstanding: admitted requests at once", max_outstanding),                    \
        SIM_OPT("bucket-rate", CFG_DOUBLE, NULL, "0", NULL, NULL, "token_bucket: requests/s",      \
                bucket_rate),                                                                      \
        SIM_OPT("bucket-burst", CFG_DOUBLE, NULL, "0", NULL, NULL, "token_bucket: bucket size",    \
                bucket_burst),                                                                     \
        SIM_OPT("queue-max-ms", CFG_DOUBLE, NULL, "0", NULL, NULL,                                 \
                "queue_threshold: reject above this predicted prefill queueing", queue_max_ms),    \
        SIM_OPT("short-window-s", CFG_DOUBLE, NULL, "0", NULL, NULL,                               \
                "burst: short arrival-rate window", short_window_s),                               \
        SIM_OPT("long-window-s", CFG_DOUBLE, NULL, "0", NULL, NULL,                                \
                "burst: long arrival-rate window", long_window_s),                                 \
        SIM_OPT("hold-max-ms", CFG_DOUBLE, NULL, "0", NULL, NULL,                                  \
                "burst: longest a request may wait in the hold queue", hold_max_ms),               \
        SIM_OPT("hold-max", CFG_INT64, NULL, "0", "1000000", NULL, "burst: hold queue bound",      \
                hold_max),                                                                         \
        SIM_OPT("burst-cv", CFG_DOUBLE, NULL, "0", NULL, NULL,                                     \
                "burst: inter-arrival CV above which arrivals are a burst", burst_cv),             \
        SIM_OPT("burst-rate-ratio", CFG_DOUBLE, NULL, "0", NULL, NULL,                             \
                "burst: short/long rate ratio above which arrivals are a burst",                   \
                burst_rate_ratio),                                                                 \
        SIM_OPT("slo-margin", CFG_DOUBLE, NULL, "0", "1", NULL,                                    \
                "burst: admit within this fraction of the SLOs (0, 1]", slo_margin),               \
        SIM_OPT("speed-step", CFG_DOUBLE, NULL, "0", "1", NULL,                                    \
                "burst: step of its SLO feedback (0: off)", speed_step),                           \
        SIM_OPT("speed-track", CFG_DOUBLE, NULL, "0", "1", NULL,                                   \
                "burst: weight of each request in its measured speed (0: off)", speed_track),      \
        SIM_OPT("retry-429", CFG_INT64, "0", "0", "100", NULL,                                     \
                "Client retries of a 429 after its Retry-After (the load tester's)", retry_429),   \
        SIM_OPT("seed", CFG_INT64, "1", "0", NULL, NULL,                                           \
                "Seed of the host's slow stretches (the cost model's host_slow_* keys)", seed),    \
        SIM_OPT("chunk-cap", CFG_INT64, "0", "0", "16777216", NULL,                                \
                "Token times kept per request (ITL, tokens.csv); 0: all", chunk_cap),              \
        SIM_OPT("check-kv", CFG_BOOL, "false", NULL, NULL, NULL,                                   \
                "Walk every block pool after every step", check_kv),                               \
        SIM_OPT("out", CFG_STRING, NULL, NULL, NULL, NULL, "Report directory (required)", out),    \
        SIM_OPT("log-level", CFG_STRING, NULL, NULL, NULL, "debug|info|warn|error",                \
                "Log threshold", log_level)

static const struct cfg_option run_table[] = {
    SIM_COMMON_OPTS,
    SIM_OPT("admission", CFG_STRING, "none", NULL, NULL, NULL, "Admission policy (adm_find)",
            admission),
    SIM_OPT("no-plots", CFG_BOOL, "false", NULL, NULL, NULL, "Do not run gnuplot", no_plots),
};

static const struct cfg_option tune_table[] = {
    SIM_COMMON_OPTS,
    SIM_OPT("loads", CFG_STRING, "0.5,1,1.5,2", NULL, NULL, NULL,
            "Loads as multiples of the simulated capacity", loads),
    SIM_OPT("policies", CFG_STRING, "token_bucket,queue_threshold,burst,max_outstanding", NULL,
            NULL, NULL, "Policies to tune (those this build has)", policies),
    SIM_OPT("train-fraction", CFG_DOUBLE, "0.5", "0.05", "0.95", NULL,
            "Share of the trace (its first requests) tuned on; the rest is held out",
            train_fraction),
    SIM_OPT("holdout", CFG_STRING, NULL, NULL, NULL, NULL,
            "Held-out trace (same format, filters and scaling): tune on all of --trace", holdout),
    SIM_OPT("target-capacity", CFG_DOUBLE, "0", "0", NULL, NULL,
            "Capacity (req/s) of the cluster and traffic the configs are for, as measured there: "
            "knobs tuned in multiples of the simulated capacity are written in multiples of this "
            "one; 0: the simulated one",
            target_capacity),
};

static void usage(FILE *fp)
{
    fprintf(fp, "usage:\n"
                "  tandem-sim run  --trace FILE --format burstgpt|azure|mooncake --out DIR\n"
                "                  [--prefill P --decode D --kv-blocks K ...] [--admission NAME]\n"
                "                  [--cost FILE] [--slo-ttft-ms X --slo-tpot-ms Y]\n"
                "  tandem-sim tune --trace FILE --format F --out DIR [--loads 0.5,1,1.5,2]\n"
                "                  [--policies a,b,c] --slo-ttft-ms X --slo-tpot-ms Y\n"
                "  tandem-sim run --help   lists every option\n");
}

/* Parses one subcommand's options into o and the simulation config. Returns
 * -1 to go on, else the exit status (0 after --help, 2 on a usage error). */
static int parse(const char *cmd, const struct cfg_option *t, size_t nt, int argc, char **argv,
                 struct sim_opts *o, sim_config *sc, cfg **cf)
{
    memset(o, 0, sizeof(*o));
    char prog[32];
    snprintf(prog, sizeof(prog), "tandem-sim %s", cmd);
    if (cfg_create(cf, prog, t, nt, o) != 0) return 2;
    int rc = cfg_parse(*cf, argc, argv);
    if (rc == CFG_HELP) {
        fputs(cfg_help(*cf), stdout);
        return 0;
    }
    int npos = 0;
    (void)cfg_positional(*cf, &npos);
    if (rc != 0) {
        fprintf(stderr, "tandem-sim %s: %s\n", cmd, cfg_error(*cf));
        return 2;
    }
    if (npos > 0 || !o->trace || !o->format || !o->out) {
        fprintf(stderr,
                "tandem-sim %s: --trace, --format and --out are required (no "
                "positional arguments)\n",
                cmd);
        return 2;
    }
    if (o->speedup > 0 && o->rate > 0) {
        fprintf(stderr, "tandem-sim: --speedup and --rate are exclusive\n");
        return 2;
    }
    if (o->max_context == 1) {
        fprintf(stderr, "tandem-sim: --max-context must be 0 (off) or at least 2\n");
        return 2;
    }
    if (o->log_level) {
        enum td_log_level lvl;
        if (td_log_level_parse(o->log_level, &lvl) == 0) td_log_set_level(lvl);
    }
    sim_config_defaults(sc);
    sc->n_prefill = (uint32_t)o->prefill;
    sc->n_decode = (uint32_t)o->decode;
    sc->kv_blocks = (uint32_t)o->kv_blocks;
    sc->block_size = (uint32_t)o->block_size;
    sc->max_num_seqs = (uint32_t)o->max_num_seqs;
    sc->max_batched_tokens = (uint32_t)o->max_batched_tokens;
    sc->max_chunk_tokens = (uint32_t)o->max_chunk_tokens;
    sc->max_model_len = o->max_model_len ? (uint32_t)o->max_model_len
                        : o->max_context ? (uint32_t)o->max_context
                                         : 4096;
    sc->heartbeat_ns = o->heartbeat_ms * TD_NS_PER_MS;
    sc->tick_ns = o->tick_ms * TD_NS_PER_MS;
    sc->chunk_cap = (uint32_t)o->chunk_cap;
    sc->retry_429 = (uint32_t)o->retry_429;
    sc->seed = (uint64_t)o->seed;
    sc->check_kv = o->check_kv;
    if (o->admission) sc->admission = o->admission;
    /* As the router's rt_adm_params: adm_params_defaults, then the keys set. */
    adm_params *p = &sc->params;
    p->max_outstanding = (uint32_t)o->max_outstanding;
#define SIM_SET(key, field, value)                                                                 \
    do {                                                                                           \
        const char *src = cfg_source(*cf, key);                                                    \
        if (src && strcmp(src, "default") != 0) p->field = (value);                                \
    } while (0)
    SIM_SET("bucket-rate", bucket_rate, o->bucket_rate);
    SIM_SET("bucket-burst", bucket_burst, o->bucket_burst);
    SIM_SET("queue-max-ms", queue_max_ms, o->queue_max_ms);
    SIM_SET("short-window-s", short_window_s, o->short_window_s);
    SIM_SET("long-window-s", long_window_s, o->long_window_s);
    SIM_SET("hold-max-ms", hold_max_ms, o->hold_max_ms);
    SIM_SET("hold-max", hold_max, (uint32_t)o->hold_max);
    SIM_SET("burst-cv", burst_cv, o->burst_cv);
    SIM_SET("burst-rate-ratio", burst_rate_ratio, o->burst_rate_ratio);
    SIM_SET("slo-margin", slo_margin, o->slo_margin);
    SIM_SET("speed-step", speed_step, o->speed_step);
    SIM_SET("speed-track", speed_track, o->speed_track);
#undef SIM_SET
    if (o->slo_ttft_ms > 0) p->slo_ttft_ms = o->slo_ttft_ms;
    if (o->slo_tpot_ms > 0) p->slo_tpot_ms = o->slo_tpot_ms;
    if (o->cost) {
        char err[512] = "";
        if (adm_cost_load(o->cost, &sc->cost, err, sizeof(err)) != 0) {
            fprintf(stderr, "tandem-sim: --cost %s: %s\n", o->cost, err);
            return 2;
        }
    }
    if (o->router_cost) {
        char err[512] = "";
        if (adm_cost_load(o->router_cost, &sc->router_cost, err, sizeof(err)) != 0) {
            fprintf(stderr, "tandem-sim: --router-cost %s: %s\n", o->router_cost, err);
            return 2;
        }
        sc->router_cost_set = 1;
    }
    return -1;
}

static lt_lengths sim_lengths(const struct sim_opts *o)
{
    return (lt_lengths){.scale = o->length_scale,
                        .max_prompt = (int32_t)o->max_prompt_tokens,
                        .max_output = (int32_t)o->max_output_tokens,
                        .max_context = (int32_t)o->max_context};
}

/* Reads the trace with the filters, scales and clips lengths as the load
 * tester does, scales time. 0, 1 or 2. */
static int load_trace(const struct sim_opts *o, lt_trace *tr, lt_lengths_stats *fitted)
{
    enum lt_format fmt;
    if (lt_format_parse(o->format, &fmt) != 0) {
        fprintf(stderr, "tandem-sim: --format: unknown format \"%s\"\n", o->format);
        return 2;
    }
    lt_read_opts ro = {.model = o->filter_model,
                       .log_type = o->log_type,
                       .keep_failed = o->keep_failed,
                       .skip_bad = o->skip_bad,
                       .start_s = o->start_s,
                       .end_s = o->end_s,
                       .max_requests = (size_t)o->max_requests};
    char err[512] = "";
    lt_trace_init(tr);
    int rc = lt_trace_read(o->trace, fmt, &ro, tr, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "tandem-sim: %s: %s\n", o->trace, err[0] ? err : td_strerror(rc));
        return 1;
    }
    lt_lengths lo = sim_lengths(o);
    if (lt_trace_fit_lengths(tr, &lo, fitted) != 0) { /* max-context >= 2: checked by parse */
        fprintf(stderr, "tandem-sim: --length-scale must be a finite number >= 0\n");
        lt_trace_free(tr);
        return 2;
    }
    if (o->speedup > 0) lt_trace_speedup(tr, o->speedup);
    if (o->rate > 0 && lt_trace_scale_to_rate(tr, o->rate) != 0) {
        fprintf(stderr, "tandem-sim: --rate needs at least two distinct arrival times\n");
        lt_trace_free(tr);
        return 1;
    }
    return 0;
}

static cJSON *run_json(const struct sim_opts *o, const sim_config *sc, const lt_trace *tr,
                       const lt_lengths_stats *fitted, const sim_result *res)
{
    cJSON *x = cJSON_CreateObject();
    if (!x) return NULL;
    cJSON_AddStringToObject(x, "source", o->trace);
    cJSON_AddStringToObject(x, "url", "sim://");
    cJSON_AddStringToObject(x, "simulator", "tandem-sim");
    cJSON_AddNumberToObject(x, "speedup", o->speedup);
    cJSON_AddNumberToObject(x, "target_rate_rps", o->rate);
    cJSON_AddNumberToObject(x, "retry_429", (double)o->retry_429);
    cJSON_AddNumberToObject(x, "scheduled_mean_rate_rps", lt_trace_mean_rate(tr));
    cJSON_AddNumberToObject(x, "max_context", (double)o->max_context);
    cJSON_AddNumberToObject(x, "context_scaled", (double)fitted->context_fitted);
    lt_lengths lo = sim_lengths(o);
    cJSON_AddItemToObject(x, "lengths", lt_lengths_json(&lo, fitted));
    cJSON_AddNumberToObject(x, "trace_rows", (double)tr->rows);
    cJSON_AddNumberToObject(x, "trace_failed_skipped", (double)tr->failed);
    cJSON_AddNumberToObject(x, "trace_bad_skipped", (double)tr->bad);
    cJSON_AddNumberToObject(x, "trace_filtered", (double)tr->filtered);
    cJSON *cl = cJSON_AddObjectToObject(x, "cluster");
    if (cl) {
        cJSON_AddNumberToObject(cl, "prefill", sc->n_prefill);
        cJSON_AddNumberToObject(cl, "decode", sc->n_decode);
        cJSON_AddNumberToObject(cl, "kv_blocks", sc->kv_blocks);
        cJSON_AddNumberToObject(cl, "block_size", sc->block_size);
        cJSON_AddNumberToObject(cl, "max_num_seqs", sc->max_num_seqs);
        cJSON_AddNumberToObject(cl, "max_batched_tokens", sc->max_batched_tokens);
        cJSON_AddNumberToObject(cl, "max_chunk_tokens", sc->max_chunk_tokens);
        cJSON_AddNumberToObject(cl, "max_model_len", sc->max_model_len);
        cJSON_AddNumberToObject(cl, "heartbeat_ms", (double)sc->heartbeat_ns / 1e6);
        cJSON_AddNumberToObject(cl, "tick_ms", (double)sc->tick_ns / 1e6);
        cJSON_AddStringToObject(cl, "admission", sc->admission);
        const adm_params *p = &sc->params;
        cJSON *ap = cJSON_AddObjectToObject(cl, "admission_params");
        if (ap) { /* the router's keys */
            cJSON_AddNumberToObject(ap, "max-outstanding", p->max_outstanding);
            cJSON_AddNumberToObject(ap, "bucket-rate", p->bucket_rate);
            cJSON_AddNumberToObject(ap, "bucket-burst", p->bucket_burst);
            cJSON_AddNumberToObject(ap, "queue-max-ms", p->queue_max_ms);
            cJSON_AddNumberToObject(ap, "slo-ttft-ms", p->slo_ttft_ms);
            cJSON_AddNumberToObject(ap, "slo-tpot-ms", p->slo_tpot_ms);
            cJSON_AddNumberToObject(ap, "short-window-s", p->short_window_s);
            cJSON_AddNumberToObject(ap, "long-window-s", p->long_window_s);
            cJSON_AddNumberToObject(ap, "hold-max-ms", p->hold_max_ms);
            cJSON_AddNumberToObject(ap, "hold-max", p->hold_max);
            cJSON_AddNumberToObject(ap, "burst-cv", p->burst_cv);
            cJSON_AddNumberToObject(ap, "burst-rate-ratio", p->burst_rate_ratio);
            cJSON_AddNumberToObject(ap, "slo-margin", p->slo_margin);
            cJSON_AddNumberToObject(ap, "speed-step", p->speed_step);
            cJSON_AddNumberToObject(ap, "speed-track", p->speed_track);
        }
    }
    cJSON *co = cJSON_AddObjectToObject(x, "cost");
    if (co) {
        cJSON_AddNumberToObject(co, "prefill_us_fixed", sc->cost.prefill_us_fixed);
        cJSON_AddNumberToObject(co, "prefill_us_per_token", sc->cost.prefill_us_per_token);
        cJSON_AddNumberToObject(co, "prefill_us_per_token_ctx", sc->cost.prefill_us_per_token_ctx);
        cJSON_AddNumberToObject(co, "decode_step_us_fixed", sc->cost.decode_step_us_fixed);
        cJSON_AddNumberToObject(co, "decode_step_us_per_seq", sc->cost.decode_step_us_per_seq);
        cJSON_AddNumberToObject(co, "decode_step_us_per_ctx_token",
                                sc->cost.decode_step_us_per_ctx_token);
        cJSON_AddNumberToObject(co, "transfer_us_per_block", sc->cost.transfer_us_per_block);
        cJSON_AddNumberToObject(co, "transfer_us_fixed", sc->cost.transfer_us_fixed);
        cJSON_AddNumberToObject(co, "prefill_extra_when_decoding",
                                sc->cost.prefill_extra_when_decoding);
        cJSON_AddNumberToObject(co, "decode_extra_when_prefilling",
                                sc->cost.decode_extra_when_prefilling);
        cJSON_AddNumberToObject(co, "host_slow_share", sc->cost.host_slow_share);
        cJSON_AddNumberToObject(co, "host_slow_factor", sc->cost.host_slow_factor);
        cJSON_AddNumberToObject(co, "host_slow_mean_us", sc->cost.host_slow_mean_us);
        cJSON_AddNumberToObject(co, "seed", (double)sc->seed);
    }
    cJSON *st = cJSON_AddObjectToObject(x, "sim");
    if (st) {
        cJSON_AddNumberToObject(st, "events", (double)res->stats.events);
        cJSON_AddNumberToObject(st, "steps_prefill", (double)res->stats.steps_prefill);
        cJSON_AddNumberToObject(st, "steps_decode", (double)res->stats.steps_decode);
        cJSON_AddNumberToObject(st, "preemptions", (double)res->stats.preemptions);
        cJSON_AddNumberToObject(st, "too_long", (double)res->stats.too_long);
        cJSON_AddNumberToObject(st, "held", (double)res->stats.held);
        cJSON_AddNumberToObject(st, "admitted_after_hold", (double)res->stats.admitted_after_hold);
        cJSON_AddNumberToObject(st, "rejected_after_hold", (double)res->stats.rejected_after_hold);
        cJSON_AddNumberToObject(st, "hold_timeouts", (double)res->stats.hold_timeouts);
        cJSON_AddNumberToObject(st, "hold_passes", (double)res->stats.hold_passes);
        cJSON_AddNumberToObject(st, "client_retries", (double)res->stats.client_retries);
        cJSON_AddNumberToObject(st, "leaked_blocks", res->stats.leaked_blocks);
        cJSON_AddNumberToObject(st, "sim_end_s", res->stats.sim_end_s);
        cJSON_AddNumberToObject(st, "speed_prefill", res->stats.speed_prefill);
        cJSON_AddNumberToObject(st, "speed_decode", res->stats.speed_decode);
        /* The wall time goes to stderr only: reports stay byte-identical. */
    }
    return x;
}

static int cmd_run(int argc, char **argv)
{
    struct sim_opts o;
    sim_config sc;
    cfg *cf = NULL;
    int st =
        parse("run", run_table, sizeof(run_table) / sizeof(run_table[0]), argc, argv, &o, &sc, &cf);
    if (st >= 0) {
        cfg_free(cf);
        return st;
    }
    lt_trace tr;
    lt_lengths_stats fitted;
    if ((st = load_trace(&o, &tr, &fitted)) != 0) {
        cfg_free(cf);
        return st;
    }
    char err[512] = "";
    sim_result res;
    int64_t t0 = td_now_ns();
    int rc = sim_run(&sc, tr.reqs, tr.n, &res, err, sizeof(err));
    double wall_s = td_ns_to_s(td_now_ns() - t0);
    if (rc) {
        fprintf(stderr, "tandem-sim: %s\n", err[0] ? err : td_strerror(rc));
        lt_trace_free(&tr);
        cfg_free(cf);
        return rc == TD_EINVAL ? 2 : 1;
    }
    lt_slo slo = {.ttft_ms = o.slo_ttft_ms, .tpot_ms = o.slo_tpot_ms};
    lt_summary s;
    rc = lt_summary_compute(res.recs, res.n, &slo, &s);
    cJSON *extra = rc == 0 ? run_json(&o, &sc, &tr, &fitted, &res) : NULL;
    if (rc == 0) rc = lt_report_write(o.out, res.recs, res.n, &s, extra, err, sizeof(err));
    cJSON_Delete(extra);
    if (rc) {
        fprintf(stderr, "tandem-sim: report: %s\n", err[0] ? err : td_strerror(rc));
    } else {
        if (!o.no_plots) {
            int prc = lt_report_plot(o.out, &slo);
            if (prc == TD_ENOENT)
                td_log_warn("sim", "plots_skipped", "reason=\"gnuplot not found\"");
            else if (prc)
                td_log_warn("sim", "plots_failed", "err=%s dir=%s", td_err_name(prc), o.out);
        }
        lt_summary_print(stdout, &s, o.out);
        fprintf(stderr,
                "tandem-sim: %zu requests, %llu events, %llu prefill + %llu decode steps, "
                "%llu preemptions, %.1f s simulated in %.3f s\n",
                tr.n, (unsigned long long)res.stats.events,
                (unsigned long long)res.stats.steps_prefill,
                (unsigned long long)res.stats.steps_decode,
                (unsigned long long)res.stats.preemptions, res.stats.sim_end_s, wall_s);
        if (res.stats.leaked_blocks)
            fprintf(stderr, "tandem-sim: %u KV blocks still used at the end\n",
                    res.stats.leaked_blocks);
    }
    sim_result_free(&res);
    lt_trace_free(&tr);
    cfg_free(cf);
    return rc ? 1 : 0;
}

static int cmd_tune(int argc, char **argv)
{
    struct sim_opts o;
    sim_config sc;
    cfg *cf = NULL;
    int st = parse("tune", tune_table, sizeof(tune_table) / sizeof(tune_table[0]), argc, argv, &o,
                   &sc, &cf);
    if (st >= 0) {
        cfg_free(cf);
        return st;
    }
    if (o.slo_ttft_ms <= 0 || o.slo_tpot_ms <= 0) {
        fprintf(stderr, "tandem-sim tune: --slo-ttft-ms and --slo-tpot-ms are required\n");
        cfg_free(cf);
        return 2;
    }
    lt_trace tr;
    lt_lengths_stats fitted;
    if ((st = load_trace(&o, &tr, &fitted)) != 0) {
        cfg_free(cf);
        return st;
    }
    lt_trace ho;
    lt_trace_init(&ho);
    if (o.holdout) {
        struct sim_opts oh = o;
        oh.trace = o.holdout;
        lt_lengths_stats fh;
        if ((st = load_trace(&oh, &ho, &fh)) != 0) {
            lt_trace_free(&tr);
            cfg_free(cf);
            return st;
        }
    }
    sim_tune_opts to = {.holdout = o.holdout ? &ho : NULL,
                        .loads = o.loads,
                        .policies = o.policies,
                        .train_fraction = o.train_fraction,
                        .target_capacity = o.target_capacity,
                        .slo = {.ttft_ms = o.slo_ttft_ms, .tpot_ms = o.slo_tpot_ms},
                        .out = o.out};
    char err[512] = "";
    int rc = sim_tune(&sc, &tr, &to, stdout, err, sizeof(err));
    if (rc) fprintf(stderr, "tandem-sim tune: %s\n", err[0] ? err : td_strerror(rc));
    lt_trace_free(&ho);
    lt_trace_free(&tr);
    cfg_free(cf);
    return rc == TD_EINVAL ? 2 : rc ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "run") == 0) return cmd_run(argc - 1, argv + 1);
    if (strcmp(argv[1], "tune") == 0) return cmd_tune(argc - 1, argv + 1);
    fprintf(stderr, "tandem-sim: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
