/* tandem-decode: the decode worker. See decode/dc.h for its threads and
 * docs/workers.md for how a request flows. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "decode/dc.h"

static int dc_run(const wrk_opts *o)
{
    const char *prog = "tandem-decode";
    int rc;
    mdl_model *m = NULL;
    wrk_engine we = {0};
    dc_ctx *c = calloc(1, sizeof(*c));
    rpc_server *srv = NULL;
    wrk_node node = {0};
    pthread_t engine_thread;
    bool engine_started = false, cmdq_ok = false, metrics_ok = false;
    if (!c) return TD_ENOMEM;
    c->opts = o;
    c->wake_fd = -1;
    c->transport = o->kv_transport;
    c->prefill_timeout_ns = o->prefill_timeout_ns;

    rc = wrk_engine_open(o, WRK_DECODE, NULL, NULL, &we);
    if (rc != 0) goto out;
    m = we.model;
    c->model = m;
    c->kvx = we.kvx;
    c->engine = we.engine;
    const eng_config ec = we.cfg;
    c->max_model_len = eng_max_model_len(c->engine);
    char kv_addr[512];
    if (strcmp(o->kv_transport, "shm") == 0 || strcmp(o->kv_transport, "cuda_ipc") == 0) {
        if (strchr(o->kv_listen, ':'))
            snprintf(kv_addr, sizeof(kv_addr), "/tmp/tandem-kv-%d.sock", (int)getpid());
        else
            snprintf(kv_addr, sizeof(kv_addr), "%s", o->kv_listen);
    } else {
        snprintf(kv_addr, sizeof(kv_addr), "%s", o->kv_listen);
    }
    rc = kvx_listen(c->kvx, kv_addr, c->kv_endpoint, sizeof(c->kv_endpoint));
    if (rc != 0) {
        fprintf(stderr, "%s: cannot listen for KV on %s: %s\n", prog, kv_addr, td_strerror(rc));
        goto out;
    }
    if (!c->kv_endpoint[0]) snprintf(c->kv_endpoint, sizeof(c->kv_endpoint), "%s", kv_addr);

    rc = wrk_metrics_init(&c->metrics);
    if (rc != 0) goto out;
    metrics_ok = true;
    rc = mpscq_init(&c->cmdq);
    if (rc != 0) goto out;
    cmdq_ok = true;
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->wake_fd < 0) {
        rc = TD_EIO;
        goto out;
    }
    rc = dc_outbox_create(DC_OUTBOX_BATCH_MSGS, &c->outbox);
    if (rc != 0) goto out;
    wrk_load_publish(&c->load, c->engine, 0, 0);

    static const wrk_method methods[] = {
        {"/tandem.v1.Decode/Generate", &tandem__v1__decode_request__descriptor, dc_handle_generate},
        {"/tandem.v1.Decode/Cancel", &tandem__v1__cancel_request__descriptor, dc_handle_cancel},
    };
    rc = wrk_rpc_start(prog, o->listen, methods, sizeof(methods) / sizeof(methods[0]), c,
                       &c->health, &srv);
    if (rc != 0) goto out;
    if (pthread_create(&engine_thread, NULL, dc_engine_run, c) != 0) {
        rc = TD_ENOMEM;
        goto out;
    }
    engine_started = true;
    atomic_store(&c->health.status, WRK_SERVING);

    wrk_member_info mi = wrk_member_info_of(WRK_DECODE, o, m, c->engine, &ec, c->kv_endpoint);
    rc = wrk_node_start(&node, o, srv, &c->metrics, &c->load, &c->health, &c->draining, &mi);
    if (rc != 0) goto out;
    /* One line on stdout that scripts wait for. */
    printf("tandem-decode ready grpc=%s kv=%s transport=%s metrics=%d blocks=%u\n", node.rpc_addr,
           c->kv_endpoint, o->kv_transport, node.http ? wrk_http_port(node.http) : 0,
           eng_layout(c->engine)->num_blocks);
    fflush(stdout);
    td_log_info("decode", "ready", "grpc=%s kv=%s transport=%s blocks=%u", node.rpc_addr,
                c->kv_endpoint, o->kv_transport, eng_layout(c->engine)->num_blocks);
    wrk_serve_until_drained(o, "decode", &c->draining, &c->load, &c->health);
    rc = 0;
out:
    wrk_node_stop(&node);
    if (engine_started) {
        atomic_store(&c->stop, 1);
        pthread_join(engine_thread, NULL);
    }
    dc_outbox_free(c->outbox); /* sends the last finishes */
    rpc_server_free(srv);
    wrk_engine_close(&we);
    if (cmdq_ok) mpscq_close(&c->cmdq);
    if (c->wake_fd >= 0) close(c->wake_fd);
    if (metrics_ok) wrk_metrics_free(&c->metrics);
    free(c);
    return rc;
}

int main(int argc, char **argv)
{
    wrk_signals_block();
    wrk_opts o;
    cfg *conf = NULL;
    int rc = wrk_opts_parse(WRK_DECODE, argc, argv, &o, &conf);
    if (rc == CFG_HELP) return 0;
    if (rc != 0) return 2;
    rc = dc_run(&o);
    cfg_free(conf);
    return rc == 0 ? 0 : 1;
}
