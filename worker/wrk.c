#include "worker/wrk.h"

#include <errno.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/httpd.h"
#include "common/log.h"
#include "proto/health.pb-c.h"
#include "proto/tandem.pb-c.h"

/* ---------------------------------------------------------------- options -- */

#define WRK_OPT(name, type, def, min, max, choices, help, field)                                   \
    {                                                                                              \
        name, type, def, min, max, choices, help, offsetof(wrk_opts, field), 0                     \
    }

static const struct cfg_option wrk_common_opts[] = {
    WRK_OPT("model", CFG_STRING, NULL, NULL, NULL, NULL,
            "Checkpoint: HF directory, llama2.c .bin or GGUF file (required)", model),
    WRK_OPT("tokenizer", CFG_STRING, NULL, NULL, NULL, NULL,
            "Tokenizer file (only for logs; workers take token ids)", tokenizer),
    WRK_OPT("router", CFG_STRING, NULL, NULL, NULL, NULL,
            "Router gRPC address host:port: register, then heartbeat every second "
            "(unset: serve standalone)",
            router),
    WRK_OPT("worker-id", CFG_STRING, NULL, NULL, NULL, NULL,
            "Stable worker name for the router (default: role-host-port)", worker_id),
    WRK_OPT("kv-transport", CFG_STRING, "tcp", NULL, NULL, "tcp|shm|cuda_ipc|nccl",
            "KV block transport", kv_transport),
    WRK_OPT("kv-blocks", CFG_INT64, "0", "0", "16777216", NULL,
            "KV blocks in the pool (0: from --kv-memory-fraction, else room for "
            "--max-num-seqs sequences of the full context)",
            kv_blocks),
    WRK_OPT("kv-memory-fraction", CFG_DOUBLE, "0", "0", "0.95", NULL,
            "Share of the host's memory for the KV pool when --kv-blocks is 0 (0: unused)",
            kv_memory_fraction),
    WRK_OPT("kv-dtype", CFG_STRING, "f32", NULL, NULL, "f32|f16", "KV cache element type",
            kv_dtype),
    WRK_OPT("block-size", CFG_INT64, "16", "1", "1024", NULL, "Tokens per KV block", block_size),
    WRK_OPT("max-num-seqs", CFG_INT64, "64", "1", "4096", NULL, "Sequences in one engine step",
            max_num_seqs),
    WRK_OPT("max-batched-tokens", CFG_INT64, "512", "1", "1048576", NULL,
            "Tokens in one engine step (prefill chunks and decode tokens)", max_batched_tokens),
    WRK_OPT("max-chunk-tokens", CFG_INT64, "0", "0", "1048576", NULL,
            "Prefill chunk cap per sequence per step (0: none)", max_chunk_tokens),
    WRK_OPT("max-model-len", CFG_INT64, "0", "0", "16777216", NULL,
            "Prompt + generated tokens of one request (0: the model's context)", max_model_len),
    WRK_OPT("prefix-cache", CFG_BOOL, "true", NULL, NULL, NULL,
            "Share full prompt blocks between requests", prefix_cache),
    WRK_OPT("threads", CFG_INT64, "1", "1", "256", NULL, "Compute threads", threads),
    WRK_OPT("device", CFG_STRING, "auto", NULL, NULL, NULL,
            "auto|cpu|cuda[:N]; cuda needs a GPU KV transport (cuda_ipc, nccl), auto takes the "
            "CPU with tcp/shm",
            device),
    WRK_OPT("metrics-listen", CFG_STRING, NULL, NULL, NULL, NULL,
            "host:port for GET /metrics and /health over HTTP (unset: off)", metrics_listen),
    WRK_OPT("drain-timeout", CFG_DURATION, "30s", "0", NULL, NULL,
            "On SIGTERM, how long running requests may take to finish", drain_timeout_ns),
    WRK_OPT("cluster-token", CFG_STRING, NULL, NULL, NULL, NULL,
            "Shared secret presented to the router when registering", cluster_token),
};

static const struct cfg_option wrk_prefill_opts[] = {
    WRK_OPT("listen", CFG_STRING, "127.0.0.1:50061", NULL, NULL, NULL,
            "gRPC listen address of the Prefill service", listen),
};

static const struct cfg_option wrk_decode_opts[] = {
    WRK_OPT("listen", CFG_STRING, "127.0.0.1:50071", NULL, NULL, NULL,
            "gRPC listen address of the Decode service", listen),
    WRK_OPT("kv-listen", CFG_STRING, "127.0.0.1:0", NULL, NULL, NULL,
            "KV transfer listen address (tcp: host:port, port 0 picks one; shm: a unix "
            "socket path, default /tmp/tandem-kv-<pid>.sock)",
            kv_listen),
    WRK_OPT("prefill-timeout", CFG_DURATION, "2s", "100ms", NULL, NULL,
            "A prefill worker silent this long (no reply, no KV) fails the request",
            prefill_timeout_ns),
};

static const char wrk_prefill_notes[] =
    "\nServes tandem.v1.Prefill (Run, Cancel) and grpc.health.v1.Health/Check.\n"
    "Computes a prompt's KV cache and pushes it layer by layer into the blocks a decode\n"
    "worker named, then answers with the first token. SIGTERM drains and exits 0.\n";

static const char wrk_decode_notes[] =
    "\nServes tandem.v1.Decode (Generate, Cancel) and grpc.health.v1.Health/Check.\n"
    "Allocates KV blocks for a prompt, asks the named prefill worker to fill them, then\n"
    "generates with continuous batching and streams the tokens. SIGTERM drains and exits 0.\n";

int wrk_opts_parse(enum wrk_role role, int argc, char **argv, wrk_opts *o, cfg **out)
{
    *out = NULL;
    const char *prog = role == WRK_PREFILL ? "tandem-prefill" : "tandem-decode";
    const struct cfg_option *extra = role == WRK_PREFILL ? wrk_prefill_opts : wrk_decode_opts;
    size_t n_common = sizeof(wrk_common_opts) / sizeof(wrk_common_opts[0]);
    size_t n_extra = role == WRK_PREFILL ? sizeof(wrk_prefill_opts) / sizeof(wrk_prefill_opts[0])
                                         : sizeof(wrk_decode_opts) / sizeof(wrk_decode_opts[0]);
    /* The table must outlive the cfg: a static buffer per process is enough
     * (one parse per process). */
    static struct cfg_option table[64];
    if (n_common + n_extra > sizeof(table) / sizeof(table[0])) return TD_EINTERNAL;
    memcpy(table, wrk_common_opts, n_common * sizeof(table[0]));
    memcpy(table + n_common, extra, n_extra * sizeof(table[0]));
    memset(o, 0, sizeof(*o));
    cfg *c = NULL;
    int rc = cfg_create(&c, prog, table, n_common + n_extra, o);
    if (rc != 0) return rc;
    rc = cfg_parse(c, argc, argv);
    if (rc == CFG_HELP) {
        printf("%s%s", cfg_help(c), role == WRK_PREFILL ? wrk_prefill_notes : wrk_decode_notes);
        cfg_free(c);
        return CFG_HELP;
    }
    int npos = 0;
    char *const *pos = cfg_positional(c, &npos);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", prog, cfg_error(c));
    } else if (npos > 0) {
        fprintf(stderr, "%s: unexpected argument '%s' (see --help)\n", prog, pos[0]);
        rc = TD_EINVAL;
    } else if (!o->model) {
        fprintf(stderr, "%s: --model is required\n", prog);
        rc = TD_EINVAL;
    }
    if (rc != 0) {
        cfg_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

int wrk_engine_config(const wrk_opts *o, const mdl_model *m, enum wrk_role role, eng_config *ec,
                      char *err, size_t errlen)
{
    eng_config_defaults(ec);
    /* The KV pool is the transport's memory: device memory for the GPU
     * transports, host memory for tcp/shm; the backend must compute there. */
    int gpu_kv = strcmp(o->kv_transport, "cuda_ipc") == 0 || strcmp(o->kv_transport, "nccl") == 0;
    int rc = be_device_resolve(o->device, !gpu_kv, &ec->backend, &ec->device, err, errlen);
    if (rc != 0) return rc;
    if (gpu_kv != (strcmp(ec->backend, "cuda") == 0)) {
        td_err_set(err, errlen,
                   gpu_kv ? "--kv-transport %s keeps the KV pool in GPU memory: it needs "
                            "--device cuda (or auto with a GPU)"
                          : "--device cuda needs a GPU KV transport (--kv-transport cuda_ipc or "
                            "nccl), not %s",
                   o->kv_transport);
        return TD_EINVAL;
    }
    ec->kv_mem_kind = gpu_kv ? BE_MEM_DEVICE : BE_MEM_HOST;
    ec->n_threads = (int)o->threads;
    ec->kv_dtype = strcmp(o->kv_dtype, "f16") == 0 ? KV_DTYPE_F16 : KV_DTYPE_F32;
    ec->block_size = (uint32_t)o->block_size;
    ec->max_num_seqs = (uint32_t)o->max_num_seqs;
    ec->max_num_batched_tokens = (uint32_t)o->max_batched_tokens;
    ec->max_chunk_tokens = (uint32_t)o->max_chunk_tokens;
    ec->max_model_len = (uint32_t)o->max_model_len;
    ec->prefix_cache = o->prefix_cache;
    ec->prefill_only = role == WRK_PREFILL;
    /* A decode worker holds requests waiting for their KV as well as running
     * ones: room for four times the batch. */
    ec->max_seqs = 4 * ec->max_num_seqs;
    if (o->kv_blocks > 0) {
        ec->num_blocks = (uint32_t)o->kv_blocks;
    } else if (o->kv_memory_fraction > 0) {
        long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        kv_layout l;
        eng_config probe = *ec;
        probe.num_blocks = 0;
        if (pages <= 0 || psz <= 0 || eng_layout_for(m, &probe, &l) != 0) {
            td_err_set(err, errlen, "cannot size the KV pool from the host's memory");
            return TD_EINVAL;
        }
        double bytes = o->kv_memory_fraction * (double)pages * (double)psz;
        double per_block = (double)kv_layout_block_bytes(&l) * l.n_layers;
        double n = bytes / per_block;
        ec->num_blocks = n > 16777216.0 ? 16777216u : (uint32_t)n;
    }
    kv_layout l;
    if (eng_layout_for(m, ec, &l) != 0) {
        td_err_set(err, errlen,
                   "%u KV blocks of %u tokens cannot hold one sequence of the context (%d tokens)",
                   ec->num_blocks, ec->block_size,
                   ec->max_model_len ? (int)ec->max_model_len : m->cfg.max_seq_len);
        return TD_EINVAL;
    }
    return 0;
}

/* -------------------------------------------------------------- sampling -- */

int wrk_sampling(const mdl_config *mc, const Tandem__V1__SamplingParams *sp, uint64_t seed_if_unset,
                 int32_t *stop_ids, int cap, smp_params *out, char *err, size_t errlen)
{
    smp_params_defaults(out);
    if (sp) {
        if (!(sp->temperature >= 0) || !(sp->top_p >= 0 && sp->top_p <= 1)) {
            td_err_set(err, errlen, "sampling: temperature must be >= 0 and top_p in [0, 1]");
            return TD_EINVAL;
        }
        out->temperature = sp->temperature;
        out->top_k = (int)(sp->top_k > 1000000 ? 1000000 : sp->top_k);
        out->top_p = sp->top_p > 0 ? sp->top_p : 1.0f;
        out->seed = sp->has_seed ? sp->seed : seed_if_unset;
        out->min_tokens = (int)(sp->min_tokens > 1000000 ? 1000000 : sp->min_tokens);
        out->ignore_eos = sp->ignore_eos;
    } else {
        out->seed = seed_if_unset;
    }
    out->eos_id = mc->eos_id;
    int n = 0;
    if (!out->ignore_eos)
        for (int i = 0; i < mc->n_eos_extra && n < cap; i++)
            stop_ids[n++] = mc->eos_extra[i];
    /* llama2.c stops at BOS, as tandem-generate does; ignore_eos lifts that
     * too, leaving max_tokens the only end. */
    if (mc->format == MDL_FORMAT_LLAMA2C && !out->ignore_eos && n < cap)
        stop_ids[n++] = mc->bos_id >= 0 ? mc->bos_id : 1;
    size_t n_req = sp ? sp->n_stop_token_ids : 0;
    if (n_req > (size_t)(cap - n)) {
        td_err_set(err, errlen, "sampling.stop_token_ids: at most %d", cap - n);
        return TD_EINVAL;
    }
    for (size_t i = 0; i < n_req; i++) {
        if (sp->stop_token_ids[i] >= (uint32_t)mc->vocab_size) {
            td_err_set(err, errlen,
                       "sampling.stop_token_ids[%zu] = %u is not below the vocabulary size %d", i,
                       sp->stop_token_ids[i], mc->vocab_size);
            return TD_EINVAL;
        }
        stop_ids[n++] = (int32_t)sp->stop_token_ids[i];
    }
    out->stop_ids = stop_ids;
    out->n_stop_ids = n;
    return 0;
}

/* ---------------------------------------------------------------- health -- */

static void wrk_health_check(rpc_call *call, const ProtobufCMessage *req, void *arg)
{
    const Grpc__Health__V1__HealthCheckRequest *q = (const void *)req;
    wrk_health *h = arg;
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    /* The server as a whole and the two tandem services are known. */
    if (q->service && q->service[0] && strcmp(q->service, "tandem.v1.Prefill") != 0 &&
        strcmp(q->service, "tandem.v1.Decode") != 0) {
        rpc_call_finish(call, TD_ENOENT, "unknown service");
        return;
    }
    resp.status = atomic_load(&h->status) == WRK_SERVING
                      ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                      : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
    rpc_call_reply(call, &resp.base);
}

int wrk_health_add(rpc_server *s, wrk_health *h)
{
    return rpc_server_add_method(s, "/grpc.health.v1.Health/Check",
                                 &grpc__health__v1__health_check_request__descriptor,
                                 wrk_health_check, h);
}

int wrk_rpc_start(const char *prog, const char *listen, const wrk_method *methods, size_t n,
                  void *arg, wrk_health *h, rpc_server **out)
{
    *out = NULL;
    rpc_server *srv = NULL;
    int rc = rpc_server_create(listen, &srv);
    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = rpc_server_add_method(srv, methods[i].path, methods[i].req, methods[i].fn, arg);
    if (rc == 0) rc = wrk_health_add(srv, h);
    if (rc == 0) rc = rpc_server_start(srv);
    if (rc != 0) {
        fprintf(stderr, "%s: cannot serve gRPC on %s: %s\n", prog, listen, td_strerror(rc));
        rpc_server_free(srv);
        return rc;
    }
    *out = srv;
    return 0;
}

/* --------------------------------------------------------------- signals -- */

static void wrk_sigset(sigset_t *s)
{
    sigemptyset(s);
    sigaddset(s, SIGTERM);
    sigaddset(s, SIGINT);
}

void wrk_signals_block(void)
{
    sigset_t s;
    wrk_sigset(&s);
    sigaddset(&s, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
}

int wrk_signal_wait(int64_t timeout_ns)
{
    sigset_t s;
    wrk_sigset(&s);
    for (;;) {
        int sig;
        if (timeout_ns < 0) {
            sig = sigwaitinfo(&s, NULL);
        } else {
            struct timespec ts = {.tv_sec = timeout_ns / 1000000000,
                                  .tv_nsec = timeout_ns % 1000000000};
            sig = sigtimedwait(&s, NULL, &ts);
        }
        if (sig > 0) return sig;
        if (errno == EAGAIN) return 0;
        if (errno != EINTR) return 0;
    }
}

/* ------------------------------------------------------------------ load -- */

void wrk_load_publish(wrk_load *l, eng *e, uint32_t in_flight, int64_t step_ns)
{
    eng_stats s;
    eng_stats_get(e, &s);
    atomic_store(&l->queued_prefill_tokens, s.queued_prefill_tokens);
    atomic_store(&l->running_seqs, s.running);
    atomic_store(&l->waiting_seqs, s.waiting);
    atomic_store(&l->free_kv_blocks, s.kv.free + s.kv.cached);
    atomic_store(&l->total_kv_blocks, s.kv.num_blocks);
    atomic_store(&l->in_flight, in_flight);
    atomic_store(&l->prefix_hit_blocks, s.kv.hit_blocks);
    atomic_store(&l->prefix_query_blocks, s.kv.query_blocks);
    atomic_store(&l->preemptions, s.preemptions);
    if (step_ns > 0) {
        uint64_t us = (uint64_t)(step_ns / 1000);
        uint64_t avg = atomic_load(&l->step_time_us);
        atomic_store(&l->step_time_us, avg ? (avg * 7 + us) / 8 : us);
        atomic_store(&l->last_step_time_us, us);
    }
}

/* --------------------------------------------------------------- metrics -- */

static const double wrk_batch_buckets[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};

int wrk_metrics_init(wrk_metrics *m)
{
    memset(m, 0, sizeof(*m));
    int rc = met_registry_create(&m->reg, "tandem_");
    static const char *const outcome[] = {"outcome"};
    const double *lb = met_latency_buckets;
    size_t nb = met_latency_nbuckets;
    if (rc == 0)
        rc = met_counter_family(m->reg, "tandem_requests_total", "Requests ended, by outcome",
                                outcome, 1, &m->requests);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_queue_seconds",
                               "Time a request waited before its compute started", lb, nb,
                               &m->queue_seconds);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_prefill_seconds",
                               "Prefill time of a request, first chunk to first token", lb, nb,
                               &m->prefill_seconds);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_transfer_seconds",
                               "KV transfer time of a request, begin to last block landed", lb, nb,
                               &m->transfer_seconds);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_step_seconds", "Engine step time", lb, nb,
                               &m->step_seconds);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_ttft_seconds",
                               "Time to first token as this worker saw it", lb, nb,
                               &m->ttft_seconds);
    if (rc == 0)
        rc = met_histogram_new(m->reg, "tandem_inter_token_seconds",
                               "Time between a request's consecutive tokens", lb, nb,
                               &m->itl_seconds);
    if (rc == 0)
        rc = met_histogram_new(
            m->reg, "tandem_batch_size", "Sequences in one engine step", wrk_batch_buckets,
            sizeof(wrk_batch_buckets) / sizeof(wrk_batch_buckets[0]), &m->batch_size);
    if (rc == 0)
        rc = met_counter_new(m->reg, "tandem_kv_transfer_bytes_total", "KV bytes moved",
                             &m->transfer_bytes);
    if (rc == 0)
        rc = met_counter_new(m->reg, "tandem_prefix_cache_hit_blocks_total",
                             "Prompt blocks served from the prefix cache", &m->prefix_hit_blocks);
    if (rc == 0)
        rc = met_counter_new(m->reg, "tandem_prefix_cache_query_blocks_total",
                             "Full prompt blocks looked up in the prefix cache",
                             &m->prefix_query_blocks);
    if (rc == 0)
        rc = met_counter_new(m->reg, "tandem_prompt_tokens_computed_total",
                             "Prompt tokens this worker computed", &m->prompt_tokens_computed);
    if (rc == 0)
        rc = met_counter_new(m->reg, "tandem_prompt_tokens_cached_total",
                             "Prompt tokens this worker took from its prefix cache",
                             &m->prompt_tokens_cached);
    if (rc == 0)
        rc = met_counter_new(m->reg, "tandem_preemptions_total",
                             "Sequences preempted and recomputed", &m->preemptions);
    if (rc == 0)
        rc = met_gauge_new(m->reg, "tandem_running_seqs", "Sequences running", &m->running);
    if (rc == 0)
        rc = met_gauge_new(m->reg, "tandem_waiting_seqs", "Sequences waiting", &m->waiting);
    if (rc == 0)
        rc = met_gauge_new(m->reg, "tandem_kv_blocks_free",
                           "KV blocks a new request can take (free + evictable cached)",
                           &m->kv_free);
    if (rc == 0)
        rc = met_gauge_new(m->reg, "tandem_kv_blocks_total", "KV blocks in the pool", &m->kv_total);
    if (rc != 0) wrk_metrics_free(m);
    return rc;
}

void wrk_metrics_free(wrk_metrics *m)
{
    met_registry_free(m->reg);
    memset(m, 0, sizeof(*m));
}

void wrk_metrics_outcome(wrk_metrics *m, const char *outcome)
{
    met_counter *c = NULL;
    const char *v[1] = {outcome};
    if (met_counter_get(m->requests, v, &c) == 0) met_counter_inc(c);
}

void wrk_metrics_sync(wrk_metrics *m, const wrk_load *l)
{
    met_gauge_set(m->running, atomic_load(&l->running_seqs));
    met_gauge_set(m->waiting, atomic_load(&l->waiting_seqs));
    met_gauge_set(m->kv_free, atomic_load(&l->free_kv_blocks));
    met_gauge_set(m->kv_total, atomic_load(&l->total_kv_blocks));
    uint64_t v = atomic_load(&l->prefix_hit_blocks);
    met_counter_add(m->prefix_hit_blocks, v - m->synced_hits);
    m->synced_hits = v;
    v = atomic_load(&l->prefix_query_blocks);
    met_counter_add(m->prefix_query_blocks, v - m->synced_queries);
    m->synced_queries = v;
    v = atomic_load(&l->preemptions);
    met_counter_add(m->preemptions, v - m->synced_preemptions);
    m->synced_preemptions = v;
}

struct wrk_http {
    httpd *srv;
    wrk_metrics *m;
    const wrk_load *l;
    wrk_health *h;
};

static void wrk_http_handle(void *arg, const char *method, const char *path, httpd_response *r)
{
    wrk_http *w = arg;
    if (strcmp(path, "/metrics") == 0) {
        wrk_metrics_sync(w->m, w->l);
        char *body = NULL;
        size_t len = 0;
        if (met_render(w->m->reg, &body, &len) != 0) {
            r->status = 503;
            return;
        }
        r->status = 200;
        r->content_type = MET_CONTENT_TYPE;
        r->body = body;
        r->len = len;
    } else if (strcmp(path, "/health") == 0) {
        bool ok = atomic_load(&w->h->status) == WRK_SERVING;
        r->status = ok ? 200 : 503;
        r->body = strdup(ok ? "serving\n" : "not serving\n");
        r->len = r->body ? strlen(r->body) : 0;
    } else {
        r->status = 404;
        r->body = strdup("not found: try /metrics or /health\n");
        r->len = r->body ? strlen(r->body) : 0;
    }
}

int wrk_http_start(const char *addr, wrk_metrics *m, const wrk_load *l, wrk_health *h,
                   wrk_http **out)
{
    *out = NULL;
    wrk_http *w = calloc(1, sizeof(*w));
    if (!w) return TD_ENOMEM;
    w->m = m;
    w->l = l;
    w->h = h;
    int rc = httpd_start(addr, wrk_http_handle, w, &w->srv);
    if (rc != 0) {
        free(w);
        return rc;
    }
    *out = w;
    return 0;
}

int wrk_http_port(const wrk_http *w)
{
    return httpd_port(w->srv);
}

void wrk_http_stop(wrk_http *w)
{
    if (!w) return;
    httpd_stop(w->srv);
    free(w);
}

void wrk_advertised_addr(const char *listen_addr, int port, char *out, size_t cap)
{
    const char *colon = strrchr(listen_addr, ':');
    size_t hl = colon ? (size_t)(colon - listen_addr) : strlen(listen_addr);
    if (hl == 0 || (hl == 7 && strncmp(listen_addr, "0.0.0.0", 7) == 0))
        snprintf(out, cap, "127.0.0.1:%d", port);
    else
        snprintf(out, cap, "%.*s:%d", (int)hl, listen_addr, port);
}

/* ------------------------------------------------------------------ node -- */

int wrk_node_start(wrk_node *n, const wrk_opts *o, rpc_server *srv, wrk_metrics *m, wrk_load *l,
                   wrk_health *h, _Atomic int *drain, wrk_member_info *mi)
{
    const char *prog = mi->role == WRK_PREFILL ? "tandem-prefill" : "tandem-decode";
    memset(n, 0, sizeof(*n));
    int rc;
    if (o->metrics_listen) {
        rc = wrk_http_start(o->metrics_listen, m, l, h, &n->http);
        if (rc != 0) {
            fprintf(stderr, "%s: cannot serve metrics on %s: %s\n", prog, o->metrics_listen,
                    td_strerror(rc));
            return rc;
        }
    }
    wrk_advertised_addr(o->listen, rpc_server_port(srv), n->rpc_addr, sizeof(n->rpc_addr));
    if (o->worker_id && o->worker_id[0])
        snprintf(n->worker_id, sizeof(n->worker_id), "%s", o->worker_id);
    else
        snprintf(n->worker_id, sizeof(n->worker_id), "%s-%s",
                 mi->role == WRK_PREFILL ? "prefill" : "decode", n->rpc_addr);
    mi->worker_id = n->worker_id;
    mi->rpc_address = n->rpc_addr;
    if (o->router) {
        rc = wrk_member_start(o->router, mi, l, drain, &n->member);
        if (rc != 0) {
            fprintf(stderr, "%s: cannot reach the router at %s: %s\n", prog, o->router,
                    td_strerror(rc));
            return rc;
        }
    }
    return 0;
}

void wrk_node_stop(wrk_node *n)
{
    wrk_member_stop(n->member);
    wrk_http_stop(n->http);
    n->member = NULL;
    n->http = NULL;
}

void wrk_serve_until_drained(const wrk_opts *o, const char *mod, _Atomic int *draining, wrk_load *l,
                             wrk_health *h)
{
    for (;;) {
        int sig = wrk_signal_wait(200000000LL);
        if (sig > 0 || atomic_load(draining)) {
            td_log_info(mod, "draining", "signal=%d timeout_s=%.1f", sig,
                        td_ns_to_s(o->drain_timeout_ns));
            break;
        }
    }
    atomic_store(draining, 1);
    atomic_store(&l->draining, 1);
    atomic_store(&h->status, WRK_NOT_SERVING);
    int64_t until = td_now_ns() + o->drain_timeout_ns;
    while (td_now_ns() < until && atomic_load(&l->in_flight) > 0)
        if (wrk_signal_wait(20000000LL) > 0) break; /* a second signal: stop now */
}

/* ---------------------------------------------------------------- engine -- */

int wrk_engine_open(const wrk_opts *o, enum wrk_role role, eng_layer_fn hook, void *hook_arg,
                    wrk_engine *w)
{
    const char *prog = role == WRK_PREFILL ? "tandem-prefill" : "tandem-decode";
    char err[512] = "";
    memset(w, 0, sizeof(*w));
    int rc = mdl_load_ex(o->model, MDL_LOAD_KEEP_DTYPE, &w->model, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "%s: cannot load %s: %s (%s)\n", prog, o->model, err, td_err_name(rc));
        return rc;
    }
    kv_layout layout;
    rc = wrk_engine_config(o, w->model, role, &w->cfg, err, sizeof(err));
    if (rc == 0) rc = eng_layout_for(w->model, &w->cfg, &layout);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", prog, err);
        return rc;
    }
    char why[256] = "";
    if (!kvx_transport_available(o->kv_transport, why, sizeof(why))) {
        fprintf(stderr, "%s: KV transport %s cannot run here: %s\n", prog, o->kv_transport, why);
        return TD_EUNSUPPORTED;
    }
    kvx_params kp = {.transport = o->kv_transport,
                     .role = role == WRK_PREFILL ? KVX_ROLE_SEND : KVX_ROLE_RECV,
                     .model_fingerprint = mdl_fingerprint(w->model),
                     .layout = layout,
                     .cuda_device = w->cfg.device};
    rc = kvx_ep_create(&kp, &w->kvx);
    if (rc != 0) {
        fprintf(stderr, "%s: cannot create the KV transfer endpoint: %s\n", prog, td_strerror(rc));
        return rc;
    }
    /* The KV pool is the endpoint's memory: blocks land (decode) or are read
     * (prefill) where the engine computes. */
    w->cfg.kv_mem = kvx_ep_pool(w->kvx);
    w->cfg.on_layer = hook;
    w->cfg.on_layer_arg = hook_arg;
    rc = eng_open(w->model, &w->cfg, &w->engine, err, sizeof(err));
    if (rc != 0) fprintf(stderr, "%s: cannot start the engine: %s\n", prog, err);
    return rc;
}

void wrk_engine_close(wrk_engine *w)
{
    eng_close(w->engine);
    kvx_ep_destroy(w->kvx);
    mdl_free(w->model);
    memset(w, 0, sizeof(*w));
}

int wrk_heap_idle(wrk_heap *h, uint64_t requests_ended, int64_t now_ns)
{
    if (requests_ended == h->ended_at) return 0; /* nothing ended since: nothing to give back */
    if (h->last_ns != 0 && now_ns - h->last_ns < WRK_HEAP_TRIM_NS) return 0;
    int64_t t0 = td_now_ns();
#ifdef __GLIBC__
    (void)malloc_trim(0);
#endif
    h->last_trim_ns = td_now_ns() - t0;
    h->last_ns = now_ns;
    h->ended_at = requests_ended;
    h->trims++;
    td_log_debug("wrk", "heap_trim", "took_us=%lld", (long long)(h->last_trim_ns / 1000));
    return 1;
}

int wrk_step(eng *e, wrk_metrics *m, const eng_event **evs, uint32_t *n, int64_t *forward_ns)
{
    eng_step_stats ss;
    int64_t t0 = td_now_ns();
    int rc = eng_step(e, evs, n, &ss);
    if (forward_ns) *forward_ns = rc == 0 ? ss.forward_ns : 0;
    if (rc == TD_EAGAIN) return rc;
    if (rc != 0) {
        td_log_error("wrk", "step_failed", "err=%s", td_err_name(rc));
        return TD_EAGAIN;
    }
    met_histogram_observe(m->step_seconds, td_ns_to_s(ss.forward_ns));
    met_histogram_observe(m->batch_size, ss.n_items);
    /* One line per step at debug level: what a cost model of the step is fitted against
     * (start on the host's monotonic clock, so two workers' lines line up). */
    td_log_debug("wrk", "step",
                 "start_us=%lld items=%u prefill_tokens=%u decode_tokens=%u ctx_tokens=%llu "
                 "forward_us=%lld step_us=%lld",
                 (long long)(t0 / 1000), ss.n_items, ss.n_prefill_tokens, ss.n_decode_tokens,
                 (unsigned long long)ss.n_ctx_tokens, (long long)(ss.forward_ns / 1000),
                 (long long)((td_now_ns() - t0) / 1000));
    return 0;
}

wrk_member_info wrk_member_info_of(enum wrk_role role, const wrk_opts *o, const mdl_model *m,
                                   const eng *e, const eng_config *ec, const char *kv_endpoint)
{
    return (wrk_member_info){.role = role,
                             .kv_endpoint = kv_endpoint,
                             .kv_transport = o->kv_transport,
                             .model = o->model,
                             .layout = eng_layout(e),
                             .fingerprint = mdl_fingerprint(m),
                             .max_running_seqs = ec->max_num_seqs,
                             .max_batch_tokens = ec->max_num_batched_tokens,
                             .max_model_len = eng_max_model_len(e),
                             .cluster_token = o->cluster_token};
}

int wrk_kv_failure_status(int kvx_err, int64_t deadline_ns)
{
    if (deadline_ns != RPC_NO_DEADLINE && td_now_ns() >= deadline_ns) return TD_ETIMEDOUT;
    return kvx_err == TD_ECANCELED ? TD_ECANCELED : TD_EUNAVAILABLE;
}
