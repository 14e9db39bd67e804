/* Membership: register with the router, then heartbeat with the load. One
 * thread; it sleeps on a condition variable between beats so that stop is
 * immediate. States: UNREGISTERED --RegisterWorker accepted--> REGISTERED
 * --Heartbeat says unknown--> UNREGISTERED; any RPC error keeps the state and
 * retries after the interval. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "proto/tandem.pb-c.h"
#include "worker/wrk.h"

struct wrk_member {
    rpc_client *client;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    const wrk_load *load;
    _Atomic int *drain;
    /* What RegisterWorker sends, built once. */
    char worker_id[128], rpc_address[256], kv_endpoint[512], transport[16], model[512];
    char fingerprint[17];
    char cluster_token[256];
    uint32_t max_model_len;
    enum wrk_role role;
    kv_layout layout;
    uint32_t max_running_seqs, max_batch_tokens;
    uint64_t started_unix_us;
};

static int wrk__register(wrk_member *m, uint64_t *epoch, uint32_t *interval_ms)
{
    Tandem__V1__KvShape shape = TANDEM__V1__KV_SHAPE__INIT;
    shape.model_fingerprint = m->fingerprint;
    shape.dtype = m->layout.dtype == KV_DTYPE_F16 ? TANDEM__V1__KV_DTYPE__KV_DTYPE_F16
                                                  : TANDEM__V1__KV_DTYPE__KV_DTYPE_F32;
    shape.layout = TANDEM__V1__KV_LAYOUT_KIND__KV_LAYOUT_LAYER_BLOCK_KV;
    shape.block_size = m->layout.block_size;
    shape.n_layers = m->layout.n_layers;
    shape.n_kv_heads = m->layout.n_kv_heads;
    shape.head_dim = m->layout.head_dim;
    shape.bytes_per_block_per_layer = kv_layout_block_bytes(&m->layout);
    char *transports[1] = {m->transport};
    Tandem__V1__RegisterRequest req = TANDEM__V1__REGISTER_REQUEST__INIT;
    req.worker_id = m->worker_id;
    req.role = m->role == WRK_PREFILL ? TANDEM__V1__WORKER_ROLE__WORKER_ROLE_PREFILL
                                      : TANDEM__V1__WORKER_ROLE__WORKER_ROLE_DECODE;
    req.rpc_address = m->rpc_address;
    req.kv_endpoint = m->kv_endpoint;
    req.n_kv_transports = 1;
    req.kv_transports = transports;
    req.model = m->model;
    req.kv_shape = &shape;
    req.max_running_seqs = m->max_running_seqs;
    req.total_kv_blocks = m->layout.num_blocks;
    req.max_batch_tokens = m->max_batch_tokens;
    req.protocol_version = 1;
    req.started_unix_us = m->started_unix_us;
    req.max_model_len = m->max_model_len;
    req.cluster_token = m->cluster_token;
    ProtobufCMessage *resp = NULL;
    rpc_status st;
    int rc = rpc_client_unary(m->client, "/tandem.v1.Router/RegisterWorker", &req.base,
                              &tandem__v1__register_response__descriptor,
                              td_now_ns() + 2000000000LL, &resp, &st);
    if (rc != 0) {
        td_log_warn("wrk", "register_failed", "worker=%s err=%s detail=\"%s\"", m->worker_id,
                    td_err_name(rc), st.details);
        return rc;
    }
    Tandem__V1__RegisterResponse *r = (Tandem__V1__RegisterResponse *)resp;
    if (!r->accepted) {
        td_log_error("wrk", "register_refused", "worker=%s reason=\"%s\"", m->worker_id,
                     r->reason ? r->reason : "");
        rc = TD_EDECLINED;
    } else {
        *epoch = r->epoch;
        if (r->heartbeat_interval_ms) *interval_ms = r->heartbeat_interval_ms;
        td_log_info("wrk", "registered", "worker=%s epoch=%llu", m->worker_id,
                    (unsigned long long)r->epoch);
    }
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

static int wrk__heartbeat(wrk_member *m, uint64_t epoch, uint64_t seq, bool *known)
{
    const wrk_load *l = m->load;
    Tandem__V1__LoadReport load = TANDEM__V1__LOAD_REPORT__INIT;
    load.queued_prefill_tokens = atomic_load(&l->queued_prefill_tokens);
    load.running_seqs = atomic_load(&l->running_seqs);
    load.waiting_seqs = atomic_load(&l->waiting_seqs);
    load.free_kv_blocks = atomic_load(&l->free_kv_blocks);
    load.total_kv_blocks = atomic_load(&l->total_kv_blocks);
    load.step_time_us = atomic_load(&l->step_time_us);
    load.last_step_time_us = atomic_load(&l->last_step_time_us);
    load.draining = atomic_load(&l->draining) != 0;
    Tandem__V1__HeartbeatRequest req = TANDEM__V1__HEARTBEAT_REQUEST__INIT;
    req.worker_id = m->worker_id;
    req.epoch = epoch;
    req.seq = seq;
    req.load = &load;
    ProtobufCMessage *resp = NULL;
    int rc = rpc_client_unary(m->client, "/tandem.v1.Router/Heartbeat", &req.base,
                              &tandem__v1__heartbeat_response__descriptor,
                              td_now_ns() + 1000000000LL, &resp, NULL);
    if (rc != 0) return rc;
    Tandem__V1__HeartbeatResponse *r = (Tandem__V1__HeartbeatResponse *)resp;
    *known = r->known;
    if (r->drain && m->drain) atomic_store(m->drain, 1);
    protobuf_c_message_free_unpacked(resp, NULL);
    return 0;
}

static void *wrk__member_thread(void *arg)
{
    wrk_member *m = arg;
    uint64_t epoch = 0, seq = 0;
    uint32_t interval_ms = 1000;
    bool registered = false;
    for (;;) {
        if (!registered) {
            registered = wrk__register(m, &epoch, &interval_ms) == 0;
        } else {
            bool known = true;
            if (wrk__heartbeat(m, epoch, ++seq, &known) == 0 && !known) {
                td_log_warn("wrk", "router_forgot_worker", "worker=%s", m->worker_id);
                registered = false;
                continue;
            }
        }
        pthread_mutex_lock(&m->mu);
        struct timeval now;
        gettimeofday(&now, NULL);
        struct timespec until = {.tv_sec = now.tv_sec + interval_ms / 1000,
                                 .tv_nsec = now.tv_usec * 1000L + (interval_ms % 1000) * 1000000L};
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (!m->stop && pthread_cond_timedwait(&m->cv, &m->mu, &until) == 0) {
        }
        bool stop = m->stop;
        pthread_mutex_unlock(&m->mu);
        if (stop) break;
    }
    return NULL;
}

int wrk_member_start(const char *router_addr, const wrk_member_info *info, const wrk_load *load,
                     _Atomic int *drain, wrk_member **out)
{
    *out = NULL;
    wrk_member *m = calloc(1, sizeof(*m));
    if (!m) return TD_ENOMEM;
    int rc = rpc_client_create(router_addr, &m->client);
    if (rc != 0) {
        free(m);
        return rc;
    }
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    m->load = load;
    m->drain = drain;
    m->role = info->role;
    m->layout = *info->layout;
    m->max_running_seqs = info->max_running_seqs;
    m->max_batch_tokens = info->max_batch_tokens;
    m->max_model_len = info->max_model_len;
    snprintf(m->cluster_token, sizeof(m->cluster_token), "%s",
             info->cluster_token ? info->cluster_token : "");
    snprintf(m->worker_id, sizeof(m->worker_id), "%s", info->worker_id);
    snprintf(m->rpc_address, sizeof(m->rpc_address), "%s", info->rpc_address);
    snprintf(m->kv_endpoint, sizeof(m->kv_endpoint), "%s",
             info->kv_endpoint ? info->kv_endpoint : "");
    snprintf(m->transport, sizeof(m->transport), "%s", info->kv_transport);
    snprintf(m->model, sizeof(m->model), "%s", info->model);
    snprintf(m->fingerprint, sizeof(m->fingerprint), "%016llx",
             (unsigned long long)info->fingerprint);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    m->started_unix_us = (uint64_t)tv.tv_sec * 1000000u + (uint64_t)tv.tv_usec;
    if (pthread_create(&m->thread, NULL, wrk__member_thread, m) != 0) {
        rpc_client_free(m->client);
        free(m);
        return TD_ENOMEM;
    }
    *out = m;
    return 0;
}

void wrk_member_stop(wrk_member *m)
{
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    m->stop = true;
    pthread_cond_signal(&m->cv);
    pthread_mutex_unlock(&m->mu);
    pthread_join(m->thread, NULL);
    rpc_client_free(m->client);
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->cv);
    free(m);
}
