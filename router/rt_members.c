/* The router's worker table: registration, heartbeats, health checks, and the
 * choice of workers for a request. Handlers on the gRPC thread only queue the
 * call; the table lives on the loop thread. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "proto/health.pb-c.h"
#include "router/rt.h"

#define MOD "router"

static const char *rt__state_name(enum rt_wstate s)
{
    switch (s) {
    case RT_W_CHECKING:
        return "checking";
    case RT_W_READY:
        return "ready";
    case RT_W_DRAINING:
        return "draining";
    default:
        return "down";
    }
}

static const char *rt__role_name(enum rt_role r)
{
    return r == RT_PREFILL ? "prefill" : "decode";
}

void rt_event_push(rt_ctx *c, rpc_call *call, const ProtobufCMessage *msg, enum rt_event_type type)
{
    rt_event *ev = calloc(1, sizeof(*ev));
    if (!ev) {
        rpc_call_finish(call, TD_ENOMEM, "out of memory");
        return;
    }
    ev->wake.kind = RT_WAKE_EVENT;
    ev->type = type;
    ev->call = call;
    ev->msg = msg;
    rt_wake_push(c, &ev->wake);
}

static void rt__on_register(rpc_call *call, const ProtobufCMessage *msg, void *arg)
{
    rt_event_push(arg, call, msg, RT_EV_REGISTER);
}

static void rt__on_heartbeat(rpc_call *call, const ProtobufCMessage *msg, void *arg)
{
    rt_event_push(arg, call, msg, RT_EV_HEARTBEAT);
}

int rt_members_add_methods(rt_ctx *c, rpc_server *srv)
{
    int rc = rpc_server_add_method(srv, "/tandem.v1.Router/RegisterWorker",
                                   &tandem__v1__register_request__descriptor, rt__on_register, c);
    if (rc == 0)
        rc = rpc_server_add_method(srv, "/tandem.v1.Router/Heartbeat",
                                   &tandem__v1__heartbeat_request__descriptor, rt__on_heartbeat, c);
    return rc;
}

static rt_worker *rt__find(rt_ctx *c, const char *id)
{
    for (uint32_t i = 0; i < c->n_workers; i++)
        if (strcmp(c->workers[i]->id, id) == 0) return c->workers[i];
    return NULL;
}

/* Constant-time comparison, so a wrong token's timing says nothing. */
static int rt__secret_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = (unsigned char)(la != lb);
    for (size_t i = 0; i < lb; i++)
        d |= (unsigned char)(a[i < la ? i : 0] ^ b[i]);
    return d == 0;
}

static void rt__health_notify(rpc_stream *s, void *arg)
{
    (void)s;
    rt_worker *w = arg;
    rt_wake_push(w->ctx, &w->wake);
}

static void rt__check_health(rt_ctx *c, rt_worker *w)
{
    if (w->health) return;
    Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    q.service = "";
    if (rpc_client_stream(w->client, "/grpc.health.v1.Health/Check", &q.base,
                          &grpc__health__v1__health_check_response__descriptor,
                          td_now_ns() + 2000000000LL, rt__health_notify, w, &w->health) != 0)
        w->health = NULL;
    (void)c;
}

static void rt__set_state(rt_ctx *c, rt_worker *w, enum rt_wstate s, const char *why)
{
    if (w->state == s) return;
    td_log_info(MOD, "worker_state", "worker=%s role=%s addr=%s from=%s to=%s why=\"%s\"", w->id,
                rt__role_name(w->role), w->rpc_addr, rt__state_name(w->state), rt__state_name(s),
                why);
    w->state = s;
    (void)c;
}

static void rt__on_register_event(rt_ctx *c, rt_event *ev)
{
    const Tandem__V1__RegisterRequest *q = (const void *)ev->msg;
    Tandem__V1__RegisterResponse resp = TANDEM__V1__REGISTER_RESPONSE__INIT;
    const char *token = c->opts->cluster_token ? c->opts->cluster_token : "";
    if (token[0] && !rt__secret_equal(q->cluster_token ? q->cluster_token : "", token)) {
        td_log_warn(MOD, "register_refused", "worker=%s why=\"bad cluster token\"",
                    q->worker_id ? q->worker_id : "");
        resp.reason = "cluster token does not match";
        rpc_call_reply(ev->call, &resp.base);
        return;
    }
    enum rt_role role = q->role == TANDEM__V1__WORKER_ROLE__WORKER_ROLE_PREFILL  ? RT_PREFILL
                        : q->role == TANDEM__V1__WORKER_ROLE__WORKER_ROLE_DECODE ? RT_DECODE
                                                                                 : 0;
    if (!role || !q->worker_id || !q->worker_id[0] || !q->rpc_address || !q->rpc_address[0]) {
        resp.reason = "role, worker_id and rpc_address are required";
        rpc_call_reply(ev->call, &resp.base);
        return;
    }
    if (c->max_model_len && q->max_model_len && q->max_model_len != c->max_model_len)
        td_log_warn(MOD, "context_differs", "worker=%s max_model_len=%u cluster=%u", q->worker_id,
                    q->max_model_len, c->max_model_len);
    rt_worker *w = rt__find(c, q->worker_id);
    if (!w) {
        if (c->n_workers == c->cap_workers) {
            uint32_t cap = c->cap_workers ? 2 * c->cap_workers : 16;
            rt_worker **nw = realloc(c->workers, cap * sizeof(*nw));
            if (!nw) {
                rpc_call_finish(ev->call, TD_ENOMEM, "out of memory");
                return;
            }
            c->workers = nw;
            c->cap_workers = cap;
        }
        w = calloc(1, sizeof(*w));
        if (!w) {
            rpc_call_finish(ev->call, TD_ENOMEM, "out of memory");
            return;
        }
        w->wake.kind = RT_WAKE_WORKER;
        w->ctx = c;
        snprintf(w->id, sizeof(w->id), "%s", q->worker_id);
        c->workers[c->n_workers++] = w;
    }
    if (strcmp(w->rpc_addr, q->rpc_address) != 0 || !w->client) {
        /* A new address (a restarted worker elsewhere): drop the old channel. */
        rpc_stream_free(w->health);
        w->health = NULL;
        rpc_client_free(w->client);
        w->client = NULL;
        snprintf(w->rpc_addr, sizeof(w->rpc_addr), "%s", q->rpc_address);
        if (rpc_client_create(w->rpc_addr, &w->client) != 0) {
            rpc_call_finish(ev->call, TD_EINVAL, "bad rpc_address");
            return;
        }
    }
    w->role = role;
    snprintf(w->kv_endpoint, sizeof(w->kv_endpoint), "%s", q->kv_endpoint ? q->kv_endpoint : "");
    snprintf(w->transport, sizeof(w->transport), "%s",
             q->n_kv_transports ? q->kv_transports[0] : "tcp");
    w->max_model_len = q->max_model_len;
    w->block_size = q->kv_shape ? q->kv_shape->block_size : 0;
    if (q->max_model_len && (!c->max_model_len || q->max_model_len < c->max_model_len))
        c->max_model_len = q->max_model_len;
    w->epoch = ++c->next_epoch;
    w->last_beat_ns = td_now_ns();
    w->state = RT_W_DOWN; /* so the transition below is logged */
    rt__set_state(c, w, RT_W_CHECKING, "registered");
    rt__check_health(c, w);
    resp.accepted = 1;
    resp.epoch = w->epoch;
    resp.heartbeat_interval_ms = c->heartbeat_ms;
    resp.heartbeat_timeout_ms = 3 * c->heartbeat_ms;
    rpc_call_reply(ev->call, &resp.base);
}

static void rt__on_heartbeat_event(rt_ctx *c, rt_event *ev)
{
    const Tandem__V1__HeartbeatRequest *q = (const void *)ev->msg;
    Tandem__V1__HeartbeatResponse resp = TANDEM__V1__HEARTBEAT_RESPONSE__INIT;
    rt_worker *w = q->worker_id ? rt__find(c, q->worker_id) : NULL;
    if (w && w->epoch == q->epoch) {
        resp.known = 1;
        w->last_beat_ns = td_now_ns();
        if (q->load) {
            w->load = *q->load;
            Tandem__V1__LoadReport init = TANDEM__V1__LOAD_REPORT__INIT;
            w->load.base = init.base; /* no pointer into the freed message */
            w->inflight_at_load = w->inflight;
            w->inflight_tokens_at_load = w->inflight_tokens;
        }
        if (w->load.draining && w->state != RT_W_DOWN) {
            rt__set_state(c, w, RT_W_DRAINING, "the worker drains");
        } else if (w->state == RT_W_DOWN || w->state == RT_W_DRAINING) {
            rt__set_state(c, w, RT_W_CHECKING, "heartbeat again");
            rt__check_health(c, w);
        }
    }
    rpc_call_reply(ev->call, &resp.base);
}

void rt_members_on_event(rt_ctx *c, rt_event *ev)
{
    if (ev->type == RT_EV_REGISTER)
        rt__on_register_event(c, ev);
    else
        rt__on_heartbeat_event(c, ev);
    free(ev);
}

void rt_members_on_health(rt_ctx *c, rt_worker *w)
{
    if (!w->health) return;
    ProtobufCMessage *msg = NULL;
    int rc = rpc_stream_poll(w->health, &msg);
    if (rc == RPC_PENDING) return;
    bool serving = false;
    if (rc == 0 && msg) {
        Grpc__Health__V1__HealthCheckResponse *h = (void *)msg;
        serving = h->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
        protobuf_c_message_free_unpacked(msg, NULL);
        /* Wait for the call's end before freeing it. */
        if (!rpc_stream_ended(w->health)) {
            if (serving && w->state == RT_W_CHECKING) rt__set_state(c, w, RT_W_READY, "serving");
            return;
        }
    }
    if (!rpc_stream_ended(w->health)) return;
    rpc_stream_free(w->health);
    w->health = NULL;
    if (w->state != RT_W_CHECKING) return;
    if (serving)
        rt__set_state(c, w, RT_W_READY, "serving");
    else
        td_log_info(MOD, "worker_not_serving", "worker=%s err=%s", w->id, td_err_name(rc));
}

void rt_members_tick(rt_ctx *c)
{
    int64_t now = td_now_ns();
    int64_t limit = 3 * (int64_t)c->heartbeat_ms * 1000000;
    for (uint32_t i = 0; i < c->n_workers; i++) {
        rt_worker *w = c->workers[i];
        if (w->state == RT_W_DOWN) continue;
        if (now - w->last_beat_ns > limit) rt__set_state(c, w, RT_W_DOWN, "3 heartbeats missed");
        /* A worker still checking is asked again at each heartbeat. */
        if (w->state == RT_W_CHECKING && !w->health && now - w->last_beat_ns < limit)
            rt__check_health(c, w);
    }
    /* The workers gauge: {role, state}. */
    static const char *roles[2] = {"prefill", "decode"};
    static const char *states[4] = {"checking", "ready", "draining", "down"};
    for (int r = 0; r < 2; r++)
        for (int s = 0; s < 4; s++) {
            uint32_t n = 0;
            for (uint32_t i = 0; i < c->n_workers; i++)
                n += c->workers[i]->role == (enum rt_role)(r + 1) &&
                     c->workers[i]->state == (enum rt_wstate)s;
            const char *lv[2] = {roles[r], states[s]};
            met_gauge *g = NULL;
            if (met_gauge_get(c->metrics.workers, lv, &g) == 0) met_gauge_set(g, n);
        }
}

void rt_members_mark_down(rt_ctx *c, rt_worker *w, const char *why)
{
    rt__set_state(c, w, RT_W_DOWN, why);
}

void rt_members_free(rt_ctx *c)
{
    for (uint32_t i = 0; i < c->n_workers; i++) {
        rt_worker *w = c->workers[i];
        rpc_stream_free(w->health);
        rpc_client_free(w->client);
        free(w);
    }
    free(c->workers);
    c->workers = NULL;
    c->n_workers = 0;
    free(c->affinity);
    c->affinity = NULL;
}

uint32_t rt_ready_count(const rt_ctx *c, enum rt_role role)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < c->n_workers; i++)
        n += c->workers[i]->role == role && c->workers[i]->state == RT_W_READY;
    return n;
}

/* Load score of a ready worker, lower is better: the router's own requests
 * on it plus what its last heartbeat said was queued. */
static double rt__score(const rt_worker *w)
{
    double s = w->inflight + w->load.waiting_seqs;
    if (w->role == RT_PREFILL) s += (double)w->load.queued_prefill_tokens / 512.0;
    if (w->role == RT_DECODE && w->load.total_kv_blocks)
        s += 1.0 - (double)w->load.free_kv_blocks / w->load.total_kv_blocks;
    return s;
}

static rt_worker *rt__pick(rt_ctx *c, enum rt_role role, const rt_worker *avoid, bool least,
                           uint32_t *rr)
{
    rt_worker *best = NULL;
    double best_s = 0;
    uint32_t n = c->n_workers;
    for (uint32_t k = 0; k < n; k++) {
        rt_worker *w = c->workers[(*rr + k) % n];
        if (w->role != role || w->state != RT_W_READY || w == avoid) continue;
        if (!least) {
            best = w;
            break;
        }
        double s = rt__score(w);
        if (!best || s < best_s) {
            best = w;
            best_s = s;
        }
    }
    if (!best && avoid && avoid->role == role && avoid->state == RT_W_READY)
        best = (rt_worker *)avoid; /* the only one left */
    (*rr)++;
    return best;
}

rt_worker *rt_pick_decode(rt_ctx *c, const rt_worker *avoid)
{
    bool least = strcmp(c->opts->policy, "round_robin") != 0;
    return rt__pick(c, RT_DECODE, avoid, least, &c->rr_decode);
}

/* prefix_affinity: a table from the chain hash of a prompt prefix (whole
 * blocks of RT_AFFINITY_BLOCK tokens: hash(i) = XXH3(tokens of block i,
 * seed hash(i-1))) to the prefill worker that last computed it. A request
 * goes to the worker holding its longest known prefix — that worker's prefix
 * cache has those blocks — unless it is clearly busier than the least loaded
 * one; then every block of its prompt is recorded for the worker chosen.
 * Fixed size, open addressing, the oldest entry of a probe run replaced:
 * nothing is allocated per request. */
#define RT_AFFINITY_BLOCK      16
#define RT_AFFINITY_SLOTS      65536 /* power of two */
#define RT_AFFINITY_PROBE      8
#define RT_AFFINITY_MAX_BLOCKS 512

typedef struct rt_affinity_slot {
    uint64_t hash; /* 0: empty */
    const rt_worker *worker;
    uint64_t used; /* c->next_req when last set */
} rt_affinity_slot;

static rt_affinity_slot *rt__aff_find(rt_affinity_slot *t, uint64_t h)
{
    for (uint32_t k = 0; k < RT_AFFINITY_PROBE; k++) {
        rt_affinity_slot *e = &t[(h + k) & (RT_AFFINITY_SLOTS - 1)];
        if (e->hash == h) return e;
    }
    return NULL;
}

static void rt__aff_set(rt_affinity_slot *t, uint64_t h, const rt_worker *w, uint64_t now)
{
    rt_affinity_slot *victim = NULL;
    for (uint32_t k = 0; k < RT_AFFINITY_PROBE; k++) {
        rt_affinity_slot *e = &t[(h + k) & (RT_AFFINITY_SLOTS - 1)];
        if (e->hash == h || e->hash == 0) {
            victim = e;
            break;
        }
        if (!victim || e->used < victim->used) victim = e;
    }
    *victim = (rt_affinity_slot){.hash = h ? h : 1, .worker = w, .used = now};
}

static rt_worker *rt__pick_affinity(rt_ctx *c, const int32_t *prompt, uint32_t n_prompt,
                                    const rt_worker *avoid)
{
    if (!c->affinity) {
        c->affinity = calloc(RT_AFFINITY_SLOTS, sizeof(rt_affinity_slot));
        if (!c->affinity) return NULL;
    }
    rt_affinity_slot *t = c->affinity;
    uint32_t nb = n_prompt / RT_AFFINITY_BLOCK;
    if (nb > RT_AFFINITY_MAX_BLOCKS) nb = RT_AFFINITY_MAX_BLOCKS;
    uint64_t hashes[RT_AFFINITY_MAX_BLOCKS];
    uint64_t h = 0x7a6e64656d41ull;
    for (uint32_t i = 0; i < nb; i++) {
        h = XXH3_64bits_withSeed(prompt + (size_t)i * RT_AFFINITY_BLOCK,
                                 RT_AFFINITY_BLOCK * sizeof(int32_t), h);
        hashes[i] = h ? h : 1;
    }
    rt_worker *least = NULL;
    for (uint32_t i = 0; i < c->n_workers; i++) {
        rt_worker *w = c->workers[i];
        if (w->role != RT_PREFILL || w->state != RT_W_READY || w == avoid) continue;
        if (!least || rt__score(w) < rt__score(least)) least = w;
    }
    if (!least) return NULL;
    rt_worker *chosen = least;
    for (uint32_t i = nb; i-- > 0;) { /* the longest known prefix first */
        rt_affinity_slot *e = rt__aff_find(t, hashes[i]);
        if (!e) continue;
        rt_worker *w = (rt_worker *)e->worker;
        if (w->state == RT_W_READY && w != avoid && rt__score(w) <= rt__score(least) + 4.0)
            chosen = w;
        break;
    }
    for (uint32_t i = 0; i < nb; i++)
        rt__aff_set(t, hashes[i], chosen, c->next_req);
    return chosen;
}

rt_worker *rt_pick_prefill(rt_ctx *c, const int32_t *prompt, uint32_t n_prompt,
                           const rt_worker *avoid)
{
    const char *policy = c->opts->policy;
    if (strcmp(policy, "prefix_affinity") == 0) {
        rt_worker *w = rt__pick_affinity(c, prompt, n_prompt, avoid);
        if (w) return w;
    }
    bool least = strcmp(policy, "round_robin") != 0;
    return rt__pick(c, RT_PREFILL, avoid, least, &c->rr_prefill);
}
