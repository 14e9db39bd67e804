/* tandem-router: the cluster's front door. See router/rt.h for its threads
 * and docs/router.md for a request's path through it. */
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/log.h"
#include "router/rt.h"
#include "router/rt_http.h"

#define MOD "router"

#define RT_OPT(name, type, def, min, max, choices, help, field)                                    \
    {                                                                                              \
        name, type, def, min, max, choices, help, offsetof(rt_opts, field), 0                      \
    }

static const struct cfg_option rt_table[] = {
    RT_OPT("http-listen", CFG_STRING, "127.0.0.1:8000", NULL, NULL, NULL,
           "OpenAI-compatible HTTP API address", http_listen),
    RT_OPT("grpc-listen", CFG_STRING, "127.0.0.1:50051", NULL, NULL, NULL,
           "gRPC address: Router.Generate for clients; workers register here (their --router)",
           grpc_listen),
    RT_OPT("model", CFG_STRING, NULL, NULL, NULL, NULL,
           "Model directory or file the workers serve: the tokenizer, chat template and model "
           "name come from it",
           model),
    RT_OPT("tokenizer", CFG_STRING, NULL, NULL, NULL, NULL,
           "Tokenizer file (default: found beside --model)", tokenizer),
    RT_OPT("served-model-name", CFG_STRING, NULL, NULL, NULL, NULL,
           "Model name in the API (default: the base name of --model)", served_model_name),
    RT_OPT("chat-template", CFG_STRING, NULL, NULL, NULL, NULL,
           "Chat template file for models without one", chat_template),
    RT_OPT("policy", CFG_STRING, "least_loaded", NULL, NULL,
           "round_robin|least_loaded|prefix_affinity",
           "Worker choice: prefix_affinity sends prompts sharing a prefix to one prefill worker",
           policy),
    RT_OPT("admission", CFG_STRING, "none", NULL, NULL,
           "none|max_outstanding|token_bucket|queue_threshold|burst", "Admission control policy",
           admission),
    RT_OPT("max-outstanding", CFG_INT64, "256", "1", "1000000", NULL,
           "max_outstanding: admitted requests at once (more get 429)", max_outstanding),
    /* The policies' parameters: unset ones keep adm_params_defaults. */
    RT_OPT("bucket-rate", CFG_DOUBLE, NULL, "0", NULL, NULL, "token_bucket: requests per second",
           bucket_rate),
    RT_OPT("bucket-burst", CFG_DOUBLE, NULL, "0", NULL, NULL, "token_bucket: bucket size",
           bucket_burst),
    RT_OPT("queue-max-ms", CFG_DOUBLE, NULL, "0", NULL, NULL,
           "queue_threshold: reject when predicted prefill queueing exceeds this", queue_max_ms),
    RT_OPT("slo-ttft-ms", CFG_DOUBLE, NULL, "0", NULL, NULL, "burst: the TTFT SLO it protects",
           slo_ttft_ms),
    RT_OPT("slo-tpot-ms", CFG_DOUBLE, NULL, "0", NULL, NULL,
           "burst: the time-per-output-token SLO it protects", slo_tpot_ms),
    RT_OPT("short-window-s", CFG_DOUBLE, NULL, "0", NULL, NULL, "burst: short arrival-rate window",
           short_window_s),
    RT_OPT("long-window-s", CFG_DOUBLE, NULL, "0", NULL, NULL, "burst: long arrival-rate window",
           long_window_s),
    RT_OPT("hold-max-ms", CFG_DOUBLE, NULL, "0", NULL, NULL,
           "burst: longest a request may wait in the hold queue", hold_max_ms),
    RT_OPT("hold-max", CFG_INT64, NULL, "0", "1000000", NULL, "burst: hold queue bound", hold_max),
    RT_OPT("burst-cv", CFG_DOUBLE, NULL, "0", NULL, NULL,
           "burst: inter-arrival CV above which arrivals are a burst", burst_cv),
    RT_OPT("burst-rate-ratio", CFG_DOUBLE, NULL, "0", NULL, NULL,
           "burst: short/long window rate ratio above which arrivals are a burst",
           burst_rate_ratio),
    RT_OPT("slo-margin", CFG_DOUBLE, NULL, "0", "1", NULL,
           "burst: admit within this fraction of the SLOs (0, 1]", slo_margin),
    RT_OPT("speed-step", CFG_DOUBLE, NULL, "0", "1", NULL,
           "burst: step of its SLO feedback (0: off)", speed_step),
    RT_OPT("speed-track", CFG_DOUBLE, NULL, "0", "1", NULL,
           "burst: weight of each request in its measured speed (0: off)", speed_track),
    RT_OPT("cost-model", CFG_STRING, NULL, NULL, NULL, NULL,
           "Cost model file for queue_threshold and burst (tandem-sim and the profiler write it)",
           cost_model),
    RT_OPT("request-timeout-ms", CFG_INT64, "600000", "0", NULL, NULL,
           "Deadline of a request from its arrival (0: none)", request_timeout_ms),
    RT_OPT("http-head-timeout-ms", CFG_INT64, "10000", "10", "3600000", NULL,
           "A request whose head or body is not complete this long after its first byte gets "
           "408 (slow clients)",
           http_head_timeout_ms),
    RT_OPT("http-idle-timeout-ms", CFG_INT64, "60000", "10", "86400000", NULL,
           "A keep-alive connection with nothing in flight is closed after this long",
           http_idle_timeout_ms),
    RT_OPT("max-body-bytes", CFG_INT64, "4194304", "1024", "1073741824", NULL,
           "Largest request body (larger: 413)", max_body_bytes),
    RT_OPT("api-key", CFG_STRING, NULL, NULL, NULL, NULL,
           "Bearer token clients must send (unset: no authentication)", api_key),
    RT_OPT("api-keys-file", CFG_STRING, NULL, NULL, NULL, NULL,
           "File of accepted Bearer tokens, one per line", api_keys_file),
    RT_OPT("cluster-token", CFG_STRING, NULL, NULL, NULL, NULL,
           "Shared secret workers must present to register", cluster_token),
    RT_OPT("heartbeat-ms", CFG_INT64, "1000", "50", "60000", NULL,
           "Heartbeat period asked of workers; 3 missed take a worker out of rotation",
           heartbeat_ms),
};

static const char rt_notes[] =
    "\nServes POST /v1/completions, POST /v1/chat/completions (stream true: SSE),\n"
    "GET /v1/models, GET /health, GET /metrics on --http-listen, and tandem.v1.Router\n"
    "(Generate, RegisterWorker, Heartbeat) on --grpc-listen. Workers join with\n"
    "tandem-prefill/tandem-decode --router <grpc-listen>.\n";

/* The tokenizer beside a model: tokenizer.json in a directory, else
 * tokenizer.bin or a llama2.c tok<N>.bin next to a file. */
static int rt_find_tokenizer(const char *model, char *out, size_t cap)
{
    struct stat st;
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", model);
    if (!(stat(dir, &st) == 0 && S_ISDIR(st.st_mode))) {
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        else
            snprintf(dir, sizeof(dir), ".");
    }
    const char *names[] = {"tokenizer.json", "tokenizer.bin"};
    for (size_t i = 0; i < 2; i++) {
        int n = snprintf(out, cap, "%s/%s", dir, names[i]);
        if (n > 0 && (size_t)n < cap && stat(out, &st) == 0) return 0;
    }
    DIR *d = opendir(dir);
    if (!d) return TD_ENOENT;
    struct dirent *e;
    int rc = TD_ENOENT;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n > 7 && strncmp(e->d_name, "tok", 3) == 0 && strcmp(e->d_name + n - 4, ".bin") == 0) {
            int k = snprintf(out, cap, "%s/%s", dir, e->d_name);
            if (k < 0 || (size_t)k >= cap) continue;
            rc = 0;
            break;
        }
    }
    closedir(d);
    return rc;
}

static void rt_model_name(const rt_opts *o, char *out, size_t cap)
{
    if (o->served_model_name) {
        snprintf(out, cap, "%s", o->served_model_name);
        return;
    }
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s", o->model ? o->model : "tandem");
    size_t n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/')
        tmp[--n] = '\0';
    const char *base = strrchr(tmp, '/');
    base = base ? base + 1 : tmp;
    snprintf(out, cap, "%s", base);
    char *dot = strrchr(out, '.');
    if (dot && (strcmp(dot, ".bin") == 0 || strcmp(dot, ".gguf") == 0)) *dot = '\0';
}

/* The admission parameters: the library's defaults, then what the options
 * set (flags or --config keys, e.g. a file tandem-sim tune wrote). */
static int rt_adm_params(cfg *conf, const rt_opts *o, adm_params *p)
{
    adm_params_defaults(p);
#define RT_SET(key, field, value)                                                                  \
    do {                                                                                           \
        const char *src = cfg_source(conf, key);                                                   \
        if (src && strcmp(src, "default") != 0) p->field = (value);                                \
    } while (0)
    p->max_outstanding = (uint32_t)o->max_outstanding;
    RT_SET("bucket-rate", bucket_rate, o->bucket_rate);
    RT_SET("bucket-burst", bucket_burst, o->bucket_burst);
    RT_SET("queue-max-ms", queue_max_ms, o->queue_max_ms);
    RT_SET("slo-ttft-ms", slo_ttft_ms, o->slo_ttft_ms);
    RT_SET("slo-tpot-ms", slo_tpot_ms, o->slo_tpot_ms);
    RT_SET("short-window-s", short_window_s, o->short_window_s);
    RT_SET("long-window-s", long_window_s, o->long_window_s);
    RT_SET("hold-max-ms", hold_max_ms, o->hold_max_ms);
    RT_SET("hold-max", hold_max, (uint32_t)o->hold_max);
    RT_SET("burst-cv", burst_cv, o->burst_cv);
    RT_SET("burst-rate-ratio", burst_rate_ratio, o->burst_rate_ratio);
    RT_SET("slo-margin", slo_margin, o->slo_margin);
    RT_SET("speed-step", speed_step, o->speed_step);
    RT_SET("speed-track", speed_track, o->speed_track);
#undef RT_SET
    if (o->cost_model) {
        char err[256] = "";
        if (adm_cost_load(o->cost_model, &p->cost, err, sizeof(err)) != 0) {
            fprintf(stderr, "tandem-router: --cost-model %s: %s\n", o->cost_model, err);
            return TD_EINVAL;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ loop -- */

void rt_wake_push(rt_ctx *c, rt_wake *w)
{
    if (atomic_exchange(&w->queued, 1)) return;
    mpscq_push(&c->q, &w->node);
}

static void rt_wake_fn(void *arg)
{
    uv_async_send(arg);
}

static void rt_on_wake(uv_async_t *a)
{
    rt_ctx *c = a->data;
    mpscq_ack(&c->q);
    mpscq_node *n;
    while ((n = mpscq_pop(&c->q)) != NULL) {
        rt_wake *w = mpscq_entry(n, rt_wake, node);
        atomic_store(&w->queued, 0);
        switch (w->kind) {
        case RT_WAKE_EVENT: {
            rt_event *ev = (rt_event *)w;
            if (ev->type == RT_EV_GENERATE)
                rt_grpc_on_event(c, ev);
            else
                rt_members_on_event(c, ev);
            break;
        }
        case RT_WAKE_REQ:
            rt_req_on_popped((rt_req *)w);
            break;
        case RT_WAKE_WORKER:
            rt_members_on_health(c, (rt_worker *)w);
            break;
        }
    }
}

static void rt_on_tick(uv_timer_t *t)
{
    rt_ctx *c = t->data;
    rt_members_tick(c);
    rt_grpc_check_cancelled(c);
    rt_admission_pass(c); /* heartbeats may have changed what the policy sees */
}

/* ------------------------------------------------------------- metrics -- */

int rt_metrics_init(rt_metrics *m)
{
    memset(m, 0, sizeof(*m));
    int rc = met_registry_create(&m->reg, "tandem_");
    static const char *const req_labels[] = {"endpoint", "outcome"};
    static const char *const worker_labels[] = {"role", "state"};
    const double *lb = met_latency_buckets;
    size_t nb = met_latency_nbuckets;
    if (rc == 0)
        rc = met_counter_family(m->reg, "tandem_router_requests_total",
                                "Requests ended, by endpoint and outcome", req_labels, 2,
                                &m->requests);
    if (rc == 0)
        rc = met_gauge_family(m->reg, "tandem_router_workers", "Workers by role and state",
                              worker_labels, 2, &m->workers);
    if (rc == 0)
        rc =
            met_histogram_new(m->reg, "tandem_router_ttft_seconds",
                              "Arrival at the router to the first token relayed", lb, nb, &m->ttft);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_router_inter_token_seconds",
                               "Time between consecutive token messages of a request", lb, nb,
                               &m->itl);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_router_e2e_seconds",
                               "Arrival to the last byte of a successful request", lb, nb, &m->e2e);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_router_queue_seconds",
                               "Arrival to dispatch (parsing, tokenizing, admission)", lb, nb,
                               &m->queue);
    if (rc == 0)
        rc =
            met_gauge_new(m->reg, "tandem_router_inflight", "Requests in the router", &m->inflight);
    if (rc == 0)
        rc = met_counter_new(m->reg, "tandem_router_retries_total",
                             "Requests retried on other workers before their first token",
                             &m->retries);
    static const char *const verdict[] = {"verdict"};
    if (rc == 0)
        rc = met_counter_family(
            m->reg, "tandem_router_admission_total",
            "Admission decisions: admitted, held, rejected, admitted_after_hold, "
            "rejected_after_hold, hold_timeout",
            verdict, 1, &m->admission);
    if (rc == 0)
        rc = met_gauge_new(m->reg, "tandem_router_held", "Requests in the admission hold queue",
                           &m->held);
    static const char *const stage[] = {"stage"};
    if (rc == 0)
        rc = met_gauge_family(m->reg, "tandem_router_admission_speed_factor",
                              "The factor the admission policy's SLO feedback applies to the cost "
                              "model's prefill and transfer (stage=prefill) or decode "
                              "(stage=decode) times; 1: the model as profiled",
                              stage, 1, &m->speed);
    static const char *const prefill[] = {"prefill"}, *const decode[] = {"decode"};
    if (rc == 0) rc = met_gauge_get(m->speed, prefill, &m->speed_prefill);
    if (rc == 0) rc = met_gauge_get(m->speed, decode, &m->speed_decode);
    if (rc == 0) {
        met_gauge_set(m->speed_prefill, 1);
        met_gauge_set(m->speed_decode, 1);
    }
    if (rc != 0) rt_metrics_free(m);
    return rc;
}

void rt_metrics_free(rt_metrics *m)
{
    met_registry_free(m->reg);
    memset(m, 0, sizeof(*m));
}

void rt_metrics_speed(rt_ctx *c)
{
    if (!c->adm->speed) return;
    double prefill, decode;
    c->adm->speed(c->adm_ctx, &prefill, &decode);
    met_gauge_set(c->metrics.speed_prefill, prefill);
    met_gauge_set(c->metrics.speed_decode, decode);
}

void rt_metrics_outcome(rt_ctx *c, const char *endpoint, const char *outcome)
{
    met_counter *k = NULL;
    const char *lv[2] = {endpoint, outcome};
    if (met_counter_get(c->metrics.requests, lv, &k) == 0) met_counter_inc(k);
}

static void *rt_free_grpc(void *arg)
{
    rt_ctx *c = arg;
    rpc_server_free(c->grpc);
    atomic_store(&c->grpc_freed, 1);
    uv_async_send(&c->wake); /* let the loop see it */
    return NULL;
}

static void rt_close_handle(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* --------------------------------------------------------------- signals -- */

static void rt_on_signal(uv_signal_t *s, int signum)
{
    rt_ctx *c = s->data;
    td_log_info(MOD, "stopping", "signal=%d live=%u", signum, c->n_live);
    c->stopping = true;
    uv_stop(c->loop);
}

int main(int argc, char **argv)
{
    rt_opts o;
    cfg *conf = NULL;
    int rc =
        cfg_create(&conf, "tandem-router", rt_table, sizeof(rt_table) / sizeof(rt_table[0]), &o);
    if (rc != 0) return 2;
    rc = cfg_parse(conf, argc, argv);
    if (rc == CFG_HELP) {
        printf("%s%s", cfg_help(conf), rt_notes);
        cfg_free(conf);
        return 0;
    }
    int npos = 0;
    char *const *pos = cfg_positional(conf, &npos);
    if (rc != 0 || npos > 0) {
        if (rc != 0)
            fprintf(stderr, "tandem-router: %s\n", cfg_error(conf));
        else
            fprintf(stderr, "tandem-router: unexpected argument '%s' (see --help)\n", pos[0]);
        cfg_free(conf);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    static rt_ctx ctx;
    rt_ctx *c = &ctx;
    c->opts = &o;
    c->heartbeat_ms = (uint32_t)o.heartbeat_ms;
    (void)!getrandom(&c->id_salt, sizeof(c->id_salt), 0);
    rt_model_name(&o, c->model_name, sizeof(c->model_name));
    rc = 1;
    uv_loop_t loop;
    uv_loop_init(&loop);
    c->loop = &loop;
    bool metrics_ok = false, q_ok = false;
    void *http = NULL;

    char tok_path[4096] = "";
    if (o.tokenizer)
        snprintf(tok_path, sizeof(tok_path), "%s", o.tokenizer);
    else if (o.model && rt_find_tokenizer(o.model, tok_path, sizeof(tok_path)) != 0)
        tok_path[0] = '\0';
    if (tok_path[0]) {
        char err[256] = "";
        if (tok_load(tok_path, &c->tok, err, sizeof(err)) != 0) {
            fprintf(stderr, "tandem-router: tokenizer %s: %s\n", tok_path, err);
            goto out;
        }
    } else if (o.model) {
        fprintf(stderr, "tandem-router: no tokenizer found beside %s; pass --tokenizer\n", o.model);
        goto out;
    } else {
        td_log_warn(MOD, "no_tokenizer", "reason=\"no --model or --tokenizer: token ids only\"");
    }
    c->adm = adm_find(o.admission);
    adm_params ap;
    if (rt_adm_params(conf, &o, &ap) != 0) goto out;
    if (!c->adm || c->adm->create(&ap, &c->adm_ctx) != 0) {
        fprintf(stderr, "tandem-router: admission policy %s refused its parameters\n", o.admission);
        goto out;
    }
    if (rt_metrics_init(&c->metrics) != 0) goto out;
    metrics_ok = true;
    uv_async_init(&loop, &c->wake, rt_on_wake);
    c->wake.data = c;
    if (mpscq_init_wake(&c->q, rt_wake_fn, &c->wake) != 0) goto out;
    q_ok = true;
    uv_timer_init(&loop, &c->tick);
    uv_timer_init(&loop, &c->hold_timer);
    c->tick.data = c;
    uv_timer_start(&c->tick, rt_on_tick, 100, 100);
    uv_signal_t sigterm, sigint;
    uv_signal_init(&loop, &sigterm);
    uv_signal_init(&loop, &sigint);
    sigterm.data = sigint.data = c;
    uv_signal_start(&sigterm, rt_on_signal, SIGTERM);
    uv_signal_start(&sigint, rt_on_signal, SIGINT);

    if (rpc_server_create(o.grpc_listen, &c->grpc) != 0 ||
        rt_members_add_methods(c, c->grpc) != 0 || rt_grpc_add_methods(c, c->grpc) != 0 ||
        rpc_server_start(c->grpc) != 0) {
        fprintf(stderr, "tandem-router: cannot serve gRPC on %s\n", o.grpc_listen);
        goto out;
    }
    int http_port = 0;
    if (rt_http_start(c, &http, &http_port) != 0) {
        fprintf(stderr, "tandem-router: cannot serve HTTP on %s\n", o.http_listen);
        goto out;
    }
    printf("tandem-router ready http=127.0.0.1:%d grpc=127.0.0.1:%d model=%s\n", http_port,
           rpc_server_port(c->grpc), c->model_name);
    fflush(stdout);
    td_log_info(MOD, "ready", "http_port=%d grpc_port=%d model=%s policy=%s admission=%s",
                http_port, rpc_server_port(c->grpc), c->model_name, o.policy, o.admission);
    uv_run(&loop, UV_RUN_DEFAULT);

    /* Drain: stop taking requests, let the live ones finish (bounded). */
    rt_http_stop_accepting(http);
    int64_t until = td_now_ns() + 10000000000LL;
    while (c->n_live > 0 && td_now_ns() < until)
        uv_run(&loop, UV_RUN_ONCE);
    for (rt_req *r = c->live, *next; r; r = next) {
        next = r->next;
        rt_req_cancel(r);
    }
    until = td_now_ns() + 2000000000LL;
    while (c->n_live > 0 && td_now_ns() < until)
        uv_run(&loop, UV_RUN_NOWAIT);
    rc = 0;
out:
    rt_http_close(http);
    if (c->grpc) {
        /* rpc_server_free waits for every call handed to a handler to be
         * finished, and the loop finishes them: free it on a thread while
         * the loop keeps turning. */
        c->stopping = true;
        pthread_t t;
        if (pthread_create(&t, NULL, rt_free_grpc, c) == 0) {
            while (!atomic_load(&c->grpc_freed))
                uv_run(&loop, UV_RUN_ONCE);
            pthread_join(t, NULL);
        }
    }
    if (q_ok) {
        rt_on_wake(&c->wake);
        mpscq_close(&c->q);
    }
    rt_members_free(c);
    if (c->adm && c->adm_ctx) c->adm->destroy(c->adm_ctx);
    adm_remaining_free(&c->adm_remaining);
    if (metrics_ok) rt_metrics_free(&c->metrics);
    tok_free(c->tok);
    uv_walk(&loop, rt_close_handle, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    cfg_free(conf);
    return rc;
}
