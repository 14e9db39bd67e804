/* tandem-prefill: the prefill worker. See prefill/pf.h for its threads and
 * docs/workers.md for how a request flows. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "prefill/pf.h"
#include "proto/tandem.pb-c.h"

static int pf_run(const wrk_opts *o)
{
    const char *prog = "tandem-prefill";
    int rc;
    mdl_model *m = NULL;
    wrk_engine we = {0};
    pf_ctx *c = calloc(1, sizeof(*c));
    rpc_server *srv = NULL;
    wrk_node node = {0};
    pthread_t engine_thread;
    bool engine_started = false, cmdq_ok = false, metrics_ok = false;
    if (!c) return TD_ENOMEM;
    c->opts = o;

    rc = wrk_engine_open(o, WRK_PREFILL, pf_on_layer, c, &we);
    if (rc != 0) goto out;
    m = we.model;
    c->model = m;
    c->kvx = we.kvx;
    c->engine = we.engine;
    const eng_config ec = we.cfg;
    c->max_model_len = eng_max_model_len(c->engine);
    c->block_size = eng_layout(c->engine)->block_size;
    c->max_posts = ec.max_num_seqs;
    c->posts = calloc(c->max_posts, sizeof(*c->posts));
    c->post_reqs = calloc(c->max_posts, sizeof(*c->post_reqs));
    if (!c->posts || !c->post_reqs) {
        rc = TD_ENOMEM;
        goto out;
    }
    rc = pf_reqs_init(c, ec.max_num_seqs);
    if (rc != 0) goto out;

    rc = wrk_metrics_init(&c->metrics);
    if (rc != 0) goto out;
    metrics_ok = true;
    rc = mpscq_init(&c->cmdq);
    if (rc != 0) goto out;
    cmdq_ok = true;
    wrk_load_publish(&c->load, c->engine, 0, 0);

    static const wrk_method methods[] = {
        {"/tandem.v1.Prefill/Run", &tandem__v1__prefill_request__descriptor, pf_handle_run},
        {"/tandem.v1.Prefill/Cancel", &tandem__v1__cancel_request__descriptor, pf_handle_cancel},
    };
    rc = wrk_rpc_start(prog, o->listen, methods, sizeof(methods) / sizeof(methods[0]), c,
                       &c->health, &srv);
    if (rc != 0) goto out;
    if (pthread_create(&engine_thread, NULL, pf_engine_run, c) != 0) {
        rc = TD_ENOMEM;
        goto out;
    }
    engine_started = true;
    atomic_store(&c->health.status, WRK_SERVING);

    wrk_member_info mi = wrk_member_info_of(WRK_PREFILL, o, m, c->engine, &ec, "");
    rc = wrk_node_start(&node, o, srv, &c->metrics, &c->load, &c->health, &c->draining, &mi);
    if (rc != 0) goto out;
    printf("tandem-prefill ready grpc=%s transport=%s metrics=%d blocks=%u\n", node.rpc_addr,
           o->kv_transport, node.http ? wrk_http_port(node.http) : 0,
           eng_layout(c->engine)->num_blocks);
    fflush(stdout);
    td_log_info("prefill", "ready", "grpc=%s transport=%s blocks=%u", node.rpc_addr,
                o->kv_transport, eng_layout(c->engine)->num_blocks);
    wrk_serve_until_drained(o, "prefill", &c->draining, &c->load, &c->health);
    rc = 0;
out:
    wrk_node_stop(&node);
    if (engine_started) {
        atomic_store(&c->stop, 1);
        pthread_join(engine_thread, NULL);
    }
    rpc_server_free(srv);
    wrk_engine_close(&we);
    if (cmdq_ok) mpscq_close(&c->cmdq);
    if (metrics_ok) wrk_metrics_free(&c->metrics);
    wrk_pool_fini(&c->reqs);
    free(c->posts);
    free(c->post_reqs);
    free(c);
    return rc;
}

int main(int argc, char **argv)
{
    wrk_signals_block();
    wrk_opts o;
    cfg *conf = NULL;
    int rc = wrk_opts_parse(WRK_PREFILL, argc, argv, &o, &conf);
    if (rc == CFG_HELP) return 0;
    if (rc != 0) return 2;
    rc = pf_run(&o);
    cfg_free(conf);
    return rc == 0 ? 0 : 1;
}
