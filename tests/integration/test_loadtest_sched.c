/* Scheduling accuracy of the open-loop replay: 2,000 requests at 400 req/s
 * (Poisson arrivals) against the small SSE server on 127.0.0.1 in a thread of
 * this process. Passes when the p99 lateness of send times (actual - scheduled)
 * is under 2 ms, and when clocks the replay does not own agree: the server's
 * arrival times follow the trace's schedule (p99 under 50 ms) and the run's
 * wall time is the trace's span (plus under 0.5 s). The replay's own lateness
 * is measured against its own base, so a base that drifts as requests go out
 * (the run stretches, every send still looks on time) shows only in the
 * second pair. Timing-sensitive: registered under the "timing" label. */
#include "common/clock.h"
#include "common/err.h"
#include "loadtest/lt_replay.h"
#include "loadtest/lt_synth.h"
#include "tests/integration/lt_sse_server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Lateness on the server's clock, sorted into off[0..n): the i-th arrival
 * (one server thread, so in order) against the i-th scheduled time (sorted),
 * less the smallest such offset (the server's t = 0; no request is early). */
static void server_lateness(const int64_t *arrival, const lt_trace *tr, int64_t *off)
{
    int64_t min = INT64_MAX;
    for (size_t i = 0; i < tr->n; i++) {
        off[i] = arrival[i] - tr->reqs[i].t_ns;
        if (off[i] < min) min = off[i];
    }
    for (size_t i = 0; i < tr->n; i++)
        off[i] -= min;
    qsort(off, tr->n, sizeof(*off), cmp_i64);
}

/* Nearest-rank percentile of sorted v[0..n), in ms. */
static double pct_ms(const int64_t *v, size_t n, double pct)
{
    size_t k = (size_t)(pct / 100.0 * (double)n + 0.999999);
    if (k < 1) k = 1;
    if (k > n) k = n;
    return td_ns_to_ms(v[k - 1]);
}

int main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 2000;
    double rate = argc > 2 ? atof(argv[2]) : 400;
    double limit_ms = argc > 3 ? atof(argv[3]) : 2.0;
    int64_t spin_us = argc > 4 ? atol(argv[4]) : 0;
    /* p99 lateness on the server's clock: its thread runs at normal priority, so
     * this is looser than the client's limit; a drift of 25 us per request
     * already passes it over 2,000 requests. */
    const double server_limit_ms = 50.0;
    const double wall_limit_ms = 500.0; /* run's wall time past the trace's span */

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
    int64_t *arrivals = malloc(LT_SSE_MAX_ARRIVALS * sizeof(int64_t));
    int64_t *off = malloc((n ? n : 1) * sizeof(int64_t));
    if (!arrivals || !off) return 1;
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
        size_t seen = lt_sse_server_arrivals(srv, NULL, 0);
        int64_t t0 = td_now_ns();
        int rc = lt_replay_run(&o, tr.reqs, tr.n, &run, err, sizeof(err));
        double wall_ms = td_ns_to_ms(td_now_ns() - t0);
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
        size_t got = lt_sse_server_arrivals(srv, arrivals, LT_SSE_MAX_ARRIVALS);
        double srv_p50 = -1, srv_p99 = -1, srv_max = -1;
        if (n > 0 && got == seen + n) {
            server_lateness(arrivals + seen, &tr, off);
            srv_p50 = pct_ms(off, n, 50);
            srv_p99 = pct_ms(off, n, 99);
            srv_max = pct_ms(off, n, 100);
        } else {
            fprintf(stderr, "FAIL: the server saw %zu requests, not %zu (or over %d in all)\n",
                    got - seen, n, LT_SSE_MAX_ARRIVALS);
            attempt = 3;
        }
        double span_ms = td_ns_to_ms(n ? tr.reqs[n - 1].t_ns : 0);
        printf("sched attempt %d: server clock lateness ms: p50 %.3f p99 %.3f max %.3f (limit "
               "p99 < %.1f); wall %.1f ms for a %.1f ms span (limit +%.0f)\n",
               attempt, srv_p50, srv_p99, srv_max, server_limit_ms, wall_ms, span_ms,
               wall_limit_ms);
        ok = s.ok == n && s.lateness.p99 < limit_ms && srv_p99 >= 0 && srv_p99 < server_limit_ms &&
             wall_ms < span_ms + wall_limit_ms;
        lt_run_free(&run);
    }
    free(off);
    free(arrivals);
    lt_prompt_free(prompt);
    lt_sse_server_stop(srv);
    lt_trace_free(&tr);
    if (!ok) {
        fprintf(stderr, "FAIL: p99 lateness (own or server clock) or wall time over the limit, "
                        "or failed requests\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
