/* Scheduling accuracy of the open-loop replay: 2,000 requests at 400 req/s
 * (Poisson arrivals) against the small SSE server on 127.0.0.1 in a thread of
 * this process. Passes when the p99 lateness of send times (actual - scheduled)
 * is under 2 ms. Timing-sensitive: registered under the "timing" label. */
#include "common/clock.h"
#include "common/err.h"
#include "loadtest/lt_replay.h"
#include "loadtest/lt_synth.h"
#include "tests/integration/lt_sse_server.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 2000;
    double rate = argc > 2 ? atof(argv[2]) : 400;
    double limit_ms = argc > 3 ? atof(argv[3]) : 2.0;
    int64_t spin_us = argc > 4 ? atol(argv[4]) : 0;

    lt_synth_params p;
    lt_synth_defaults(&p);
    p.n = n;
    p.seed = 5;
    p.gamma_shape = 1.0; /* Poisson process */
    p.gamma_scale_s = 1.0 / rate;
    p.req_max = 64;
    p.resp_max = 4;
    p.resp_zipf_s = 0.01; /* nearly uniform 1..4 tokens */
    lt_trace tr;
    lt_trace_init(&tr);
    if (lt_synth_generate(&p, &tr) != 0 || lt_trace_scale_to_rate(&tr, rate) != 0) {
        fprintf(stderr, "FAIL: cannot build the trace\n");
        return 1;
    }
    lt_sse_server *srv;
    if (lt_sse_server_start(LT_SSE_OK, 0, &srv) != 0) {
        fprintf(stderr, "FAIL: cannot start the SSE server\n");
        return 1;
    }
    lt_prompt *prompt;
    if (lt_prompt_create_ids(100, 64, &prompt) != 0) return 1;
    lt_replay_opts o = {.prompt = prompt,
                        .timeout_ns = 10 * TD_NS_PER_S,
                        .warm_conns = 8,
                        .spin_ns = spin_us * TD_NS_PER_US};
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", lt_sse_server_port(srv));
    lt_url_parse(url, &o.url);
    /* Up to three attempts: load from other processes on a small shared
     * machine delays the loop thread; a client that is late every time still
     * fails. Every attempt's numbers are printed. */
    int ok = 0;
    for (int attempt = 1; attempt <= 3 && !ok; attempt++) {
        /* Attempt 1 at the default priority; later ones ask for SCHED_FIFO
         * (--rt-priority), which only a loaded machine needs. */
        o.rt_priority = attempt == 1 ? 0 : 10;
        lt_run run;
        char err[256] = "";
        int rc = lt_replay_run(&o, tr.reqs, tr.n, &run, err, sizeof(err));
        if (rc) {
            fprintf(stderr, "FAIL: replay: %s %s\n", td_strerror(rc), err);
            return 1;
        }
        lt_slo slo = {0};
        lt_summary s;
        lt_summary_compute(run.recs, run.n, &slo, &s);
        printf("sched attempt %d (%s): %zu requests at %.0f req/s over %.2f s: ok %zu errors %zu "
               "conns %d\n",
               attempt, o.rt_priority ? "SCHED_FIFO 10 if permitted" : "default priority",
               s.requests, lt_trace_mean_rate(&tr), s.duration_s, s.ok, s.errors, run.conns_opened);
        printf("sched attempt %d: lateness ms: mean %.3f p50 %.3f p90 %.3f p99 %.3f max %.3f "
               "(limit p99 < %.1f)\n",
               attempt, s.lateness.mean, s.lateness.p50, s.lateness.p90, s.lateness.p99,
               s.lateness.max, limit_ms);
        printf("sched attempt %d: ttft ms p50 %.3f p99 %.3f; e2e ms p50 %.3f p99 %.3f\n", attempt,
               s.ttft.p50, s.ttft.p99, s.e2e.p50, s.e2e.p99);
        if (s.ok != n) {
            fprintf(stderr, "FAIL: %zu of %zu requests failed\n", n - s.ok, n);
            attempt = 3;
        }
        ok = s.ok == n && s.lateness.p99 < limit_ms;
        lt_run_free(&run);
    }
    lt_prompt_free(prompt);
    lt_sse_server_stop(srv);
    lt_trace_free(&tr);
    if (!ok) {
        fprintf(stderr, "FAIL: p99 lateness over the limit or failed requests\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
