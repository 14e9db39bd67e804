/* Unit tests for kvtransfer (kvx): real sockets on 127.0.0.1 and unix
 * sockets, real child processes for the kill tests. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx.h"
#include "kvtransfer/kvx_internal.h"
#include "kvtransfer/kvx_wire.h"
#include "fail_alloc.h"

#define FP  0x1234abcd5678ef00ull
#define SEC TD_NS_PER_S

static kv_layout small_layout(uint32_t n_layers, uint32_t num_blocks)
{
    kv_layout l = {.n_layers = n_layers,
                   .num_blocks = num_blocks,
                   .block_size = 16,
                   .n_kv_heads = 2,
                   .head_dim = 64,
                   .dtype = KV_DTYPE_F16};
    return l; /* 8 KiB per block */
}

static void fill_random(void *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    uint8_t *b = p;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(b + i, &x, 8);
    }
    for (; i < n; i++)
        b[i] = (uint8_t)(x >> (i % 8));
}

/* The sender's post ring is resident from kvx_ep_create on: every page of it
 * was written once, so the ring does not fault in (and the worker's RSS does
 * not creep up) as posts first go round it. A plain memset after malloc was
 * folded into calloc, which left a fresh mmap'd ring untouched. */
static void test_send_ring_resident(void **state)
{
    (void)state;
    kvx_params p = {.transport = "tcp",
                    .role = KVX_ROLE_SEND,
                    .model_fingerprint = FP,
                    .layout = small_layout(2, 16),
                    .post_ring_bytes = 8u << 20};
    kvx_ep *ep = NULL;
    assert_int_equal(kvx_ep_create(&p, &ep), 0);
    assert_non_null(ep->ring);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)ep->ring & ~(uintptr_t)(page - 1);
    uintptr_t hi = ((uintptr_t)ep->ring + ep->ring_cap + page - 1) & ~(uintptr_t)(page - 1);
    size_t n_pages = (hi - lo) / page;
    unsigned char *vec = malloc(n_pages);
    assert_non_null(vec);
    assert_int_equal(mincore((void *)lo, hi - lo, vec), 0);
    size_t absent = 0;
    for (size_t i = 0; i < n_pages; i++)
        absent += !(vec[i] & 1);
    free(vec);
    assert_int_equal(absent, 0);
    kvx_ep_destroy(ep);
}

static const char *addr_for(const char *transport, char *buf, size_t n)
{
    static int seq;
    if (!strcmp(transport, "tcp"))
        snprintf(buf, n, "127.0.0.1:0");
    else
        snprintf(buf, n, "/tmp/tandem-kvx-test-%d-%d.sock", (int)getpid(), seq++);
    return buf;
}

static kvx_ep *mk_ep(const char *transport, enum kvx_role role, kv_layout l, uint64_t fp)
{
    kvx_params p = {.transport = transport,
                    .role = role,
                    .model_fingerprint = fp,
                    .layout = l,
                    .stall_timeout_ns = 1500 * TD_NS_PER_MS};
    kvx_ep *ep = NULL;
    assert_int_equal(kvx_ep_create(&p, &ep), 0);
    return ep;
}

static kvx_ep *mk_rx(const char *transport, kv_layout l, char *bound, size_t n)
{
    kvx_ep *rx = mk_ep(transport, KVX_ROLE_RECV, l, FP);
    char a[128];
    assert_int_equal(kvx_listen(rx, addr_for(transport, a, sizeof(a)), bound, n), 0);
    return rx;
}

/* A receiver and a sender of the same layout, connected: the sender's pool
 * filled from seed, the receiver's zeroed. Returns the peer id. */
static int mk_pair(const char *transport, kv_layout l, uint64_t seed, kvx_ep **rx, kvx_ep **tx)
{
    char bound[128];
    *rx = mk_rx(transport, l, bound, sizeof(bound));
    *tx = mk_ep(transport, KVX_ROLE_SEND, l, FP);
    fill_random(kvx_ep_pool(*tx), kv_layout_pool_bytes(&l), seed);
    memset(kvx_ep_pool(*rx), 0, kv_layout_pool_bytes(&l));
    int peer = -1;
    assert_int_equal(kvx_connect(*tx, bound, &peer, NULL, 0), 0);
    return peer;
}

/* Final events of other requests seen while waiting for one, kept for later
 * wait_final calls. */
static struct {
    kvx_ep *ep;
    kvx_event ev;
} stash[256];
static int n_stash;

/* Waits for the final event of req_id; counts LAYER events on the way. */
static kvx_event wait_final(kvx_ep *ep, const char *req_id, int64_t timeout_ns, int *layers)
{
    int64_t end = td_now_ns() + timeout_ns;
    kvx_event e;
    memset(&e, 0, sizeof(e));
    for (int i = 0; i < n_stash; i++)
        if (stash[i].ep == ep && !strcmp(stash[i].ev.req_id, req_id)) {
            e = stash[i].ev;
            stash[i] = stash[--n_stash];
            return e;
        }
    while (td_now_ns() < end) {
        kvx_event evs[1]; /* one at a time: nothing is dropped on return */
        int n = kvx_ep_wait(ep, evs, 1, 50 * TD_NS_PER_MS);
        assert_true(n >= 0);
        for (int i = 0; i < n; i++) {
            if (strcmp(evs[i].req_id, req_id) != 0) {
                int final = evs[i].type == KVX_EV_DONE || evs[i].type == KVX_EV_FAILED;
                if (final && n_stash < 256) {
                    stash[n_stash].ep = ep;
                    stash[n_stash++].ev = evs[i];
                }
                continue;
            }
            if (evs[i].type == KVX_EV_LAYER_LANDED || evs[i].type == KVX_EV_LAYER_SENT) {
                if (layers) (*layers)++;
                continue;
            }
            if (evs[i].type == KVX_EV_DONE || evs[i].type == KVX_EV_FAILED) return evs[i];
        }
    }
    e.type = 0;
    return e;
}

/* Checks that dst[i] of every layer holds src[i]'s bytes. */
static void verify(kvx_ep *tx, kvx_ep *rx, const kv_layout *lt, const kv_layout *lr,
                   const kvx_pair *pairs, int n)
{
    size_t bb = kv_layout_block_bytes(lt);
    for (uint32_t layer = 0; layer < lt->n_layers; layer++)
        for (int i = 0; i < n; i++) {
            const uint8_t *s =
                (uint8_t *)kvx_ep_pool(tx) + kv_layout_block_offset(lt, layer, pairs[i].src);
            const uint8_t *d =
                (uint8_t *)kvx_ep_pool(rx) + kv_layout_block_offset(lr, layer, pairs[i].dst);
            assert_memory_equal(s, d, bb);
        }
}

static void send_all_layers(kvx_ep *tx, const char *id, const kv_layout *l, const kvx_pair *pairs,
                            int n)
{
    for (uint32_t layer = 0; layer < l->n_layers; layer++)
        assert_int_equal(kvx_send_layer(tx, id, (int)layer, pairs, n), 0);
}

/* One request with non-contiguous destination blocks, checked byte-exact. */
static void one_transfer(const char *transport, uint32_t n_layers)
{
    kv_layout l = small_layout(n_layers, 64);
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 7, &rx, &tx);
    kvx_pair pairs[] = {{3, 40}, {4, 2}, {10, 17}, {11, 18}, {60, 0}, {0, 63}};
    int n = 6;
    uint32_t dst[6];
    for (int i = 0; i < n; i++)
        dst[i] = pairs[i].dst;
    assert_int_equal(kvx_recv_register(rx, "req-1", dst, n, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "req-1", 0), 0);
    send_all_layers(tx, "req-1", &l, pairs, n);
    int rl = 0, sl = 0;
    kvx_event er = wait_final(rx, "req-1", 10 * SEC, &rl);
    kvx_event es = wait_final(tx, "req-1", 10 * SEC, &sl);
    assert_int_equal(er.type, KVX_EV_DONE);
    assert_int_equal(es.type, KVX_EV_DONE);
    assert_true(er.elapsed_ns > 0 && er.elapsed_ns < 10 * SEC);
    assert_true(es.elapsed_ns >= er.elapsed_ns); /* the sender began first, ends last */
    assert_int_equal(rl, (int)n_layers);
    assert_int_equal(sl, (int)n_layers);
    verify(tx, rx, &l, &l, pairs, n);
    /* Untouched blocks stay zero. */
    uint8_t *z = (uint8_t *)kvx_ep_pool(rx) + kv_layout_block_offset(&l, 0, 1);
    for (size_t i = 0; i < kv_layout_block_bytes(&l); i++)
        assert_int_equal(z[i], 0);
    /* The lease returned: the same blocks register again. */
    assert_int_equal(kvx_recv_register(rx, "req-2", dst, n, 0), 0);
    kvx_stats st;
    kvx_ep_stats(rx, &st);
    assert_int_equal(st.requests_done, 1);
    assert_int_equal(st.bytes_received, (uint64_t)n * n_layers * kv_layout_block_bytes(&l));
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
    n_stash = 0;
}

static void test_tcp_basic(void **s)
{
    one_transfer("tcp", 4);
}
static void test_shm_basic(void **s)
{
    one_transfer("shm", 4);
}
static void test_tcp_many_layers(void **s)
{
    one_transfer("tcp", 48);
}
static void test_shm_many_layers(void **s)
{
    one_transfer("shm", 48);
}

/* Two senders into one receiver, each its own request. */
static void two_senders(const char *transport)
{
    kv_layout l = small_layout(3, 64);
    char bound[128];
    kvx_ep *rx = mk_rx(transport, l, bound, sizeof(bound));
    kvx_ep *tx[2];
    int peer[2];
    kvx_pair pairs[2][5];
    uint32_t dst[2][5];
    char id[2][16];
    for (int k = 0; k < 2; k++) {
        tx[k] = mk_ep(transport, KVX_ROLE_SEND, l, FP);
        fill_random(kvx_ep_pool(tx[k]), kv_layout_pool_bytes(&l), 100 + (uint64_t)k);
        assert_int_equal(kvx_connect(tx[k], bound, &peer[k], NULL, 0), 0);
        for (int i = 0; i < 5; i++) {
            pairs[k][i].src = (uint32_t)(i * 3 + k);
            pairs[k][i].dst = dst[k][i] = (uint32_t)(k * 30 + i * 2 + 1);
        }
        snprintf(id[k], sizeof(id[k]), "two-%d", k);
        assert_int_equal(kvx_recv_register(rx, id[k], dst[k], 5, 0), 0);
    }
    for (int k = 0; k < 2; k++)
        assert_int_equal(kvx_send_begin(tx[k], peer[k], id[k], 0), 0);
    for (uint32_t layer = 0; layer < l.n_layers; layer++)
        for (int k = 0; k < 2; k++)
            assert_int_equal(kvx_send_layer(tx[k], id[k], (int)layer, pairs[k], 5), 0);
    for (int k = 0; k < 2; k++) {
        assert_int_equal(wait_final(rx, id[k], 10 * SEC, NULL).type, KVX_EV_DONE);
        assert_int_equal(wait_final(tx[k], id[k], 10 * SEC, NULL).type, KVX_EV_DONE);
        verify(tx[k], rx, &l, &l, pairs[k], 5);
    }
    kvx_stats st;
    kvx_ep_stats(rx, &st);
    assert_int_equal(st.peers, 2);
    for (int k = 0; k < 2; k++)
        kvx_ep_destroy(tx[k]);
    kvx_ep_destroy(rx);
}

static void test_tcp_two_senders(void **s)
{
    two_senders("tcp");
}
static void test_shm_two_senders(void **s)
{
    two_senders("shm");
}

/* One sender into two receivers (different pool sizes). */
static void two_receivers(const char *transport)
{
    kv_layout lt = small_layout(3, 32);
    kv_layout lr[2] = {small_layout(3, 16), small_layout(3, 80)};
    kvx_ep *tx = mk_ep(transport, KVX_ROLE_SEND, lt, FP);
    fill_random(kvx_ep_pool(tx), kv_layout_pool_bytes(&lt), 9);
    kvx_ep *rx[2];
    int peer[2];
    kvx_pair pairs[2][4] = {{{0, 15}, {1, 3}, {2, 4}, {31, 0}}, {{5, 79}, {6, 50}, {7, 1}, {8, 2}}};
    for (int k = 0; k < 2; k++) {
        char bound[128];
        rx[k] = mk_rx(transport, lr[k], bound, sizeof(bound));
        assert_int_equal(kvx_connect(tx, bound, &peer[k], NULL, 0), 0);
        uint32_t dst[4];
        for (int i = 0; i < 4; i++)
            dst[i] = pairs[k][i].dst;
        assert_int_equal(kvx_recv_register(rx[k], k ? "fan-1" : "fan-0", dst, 4, 0), 0);
    }
    for (int k = 0; k < 2; k++) {
        const char *id = k ? "fan-1" : "fan-0";
        assert_int_equal(kvx_send_begin(tx, peer[k], id, 0), 0);
        send_all_layers(tx, id, &lt, pairs[k], 4);
    }
    for (int k = 0; k < 2; k++) {
        const char *id = k ? "fan-1" : "fan-0";
        assert_int_equal(wait_final(rx[k], id, 10 * SEC, NULL).type, KVX_EV_DONE);
        assert_int_equal(wait_final(tx, id, 10 * SEC, NULL).type, KVX_EV_DONE);
        verify(tx, rx[k], &lt, &lr[k], pairs[k], 4);
    }
    kvx_ep_destroy(tx);
    for (int k = 0; k < 2; k++)
        kvx_ep_destroy(rx[k]);
}

static void test_tcp_two_receivers(void **s)
{
    two_receivers("tcp");
}
static void test_shm_two_receivers(void **s)
{
    two_receivers("shm");
}

/* 100 requests in flight at once, interleaved layer by layer. */
static void hundred(const char *transport)
{
    enum { NREQ = 100, NB = 8 };
    kv_layout l = small_layout(4, NREQ * NB);
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 11, &rx, &tx);
    static kvx_pair pairs[NREQ][NB];
    char id[NREQ][16];
    for (int r = 0; r < NREQ; r++) {
        uint32_t dst[NB];
        for (int i = 0; i < NB; i++) {
            /* dst scattered over the pool, src in reverse order */
            pairs[r][i].dst = dst[i] = (uint32_t)((i * NREQ + r * 7) % (NREQ * NB));
            pairs[r][i].src = (uint32_t)(NREQ * NB - 1 - (r * NB + i));
        }
        snprintf(id[r], sizeof(id[r]), "many-%03d", r);
        assert_int_equal(kvx_recv_register(rx, id[r], dst, NB, 0), 0);
        assert_int_equal(kvx_send_begin(tx, peer, id[r], 0), 0);
    }
    for (uint32_t layer = 0; layer < l.n_layers; layer++)
        for (int r = 0; r < NREQ; r++)
            assert_int_equal(kvx_send_layer(tx, id[r], (int)layer, pairs[r], NB), 0);
    int done_rx = 0, done_tx = 0;
    int64_t end = td_now_ns() + 20 * SEC;
    while ((done_rx < NREQ || done_tx < NREQ) && td_now_ns() < end) {
        kvx_event evs[64];
        int n = kvx_ep_wait(rx, evs, 64, 10 * TD_NS_PER_MS);
        for (int i = 0; i < n; i++) {
            assert_int_not_equal(evs[i].type, KVX_EV_FAILED);
            done_rx += evs[i].type == KVX_EV_DONE;
        }
        n = kvx_ep_poll(tx, evs, 64);
        for (int i = 0; i < n; i++) {
            assert_int_not_equal(evs[i].type, KVX_EV_FAILED);
            done_tx += evs[i].type == KVX_EV_DONE;
        }
    }
    assert_int_equal(done_rx, NREQ);
    assert_int_equal(done_tx, NREQ);
    for (int r = 0; r < NREQ; r++)
        verify(tx, rx, &l, &l, pairs[r], NB);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

static void test_tcp_hundred_concurrent(void **s)
{
    hundred("tcp");
}
static void test_shm_hundred_concurrent(void **s)
{
    hundred("shm");
}

/* 1 GiB through a 16 MiB pool: 64 requests of 16 MiB each, the destination
 * mapping rotated per request so stale bytes would not pass the check. */
static void gib(const char *transport)
{
    kv_layout l = {.n_layers = 8,
                   .num_blocks = 32,
                   .block_size = 16,
                   .n_kv_heads = 8,
                   .head_dim = 128,
                   .dtype = KV_DTYPE_F16}; /* 64 KiB blocks, 16 MiB pool */
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 5, &rx, &tx);
    size_t total = 0;
    int nb = (int)l.num_blocks;
    kvx_pair pairs[32];
    uint32_t dst[32];
    int64_t t0 = td_now_ns();
    for (int r = 0; total < (1ull << 30); r++) {
        char id[32];
        snprintf(id, sizeof(id), "gib-%d", r);
        for (int i = 0; i < nb; i++) {
            pairs[i].src = (uint32_t)i;
            pairs[i].dst = dst[i] = (uint32_t)((i * 5 + r) % nb);
        }
        assert_int_equal(kvx_recv_register(rx, id, dst, nb, 0), 0);
        assert_int_equal(kvx_send_begin(tx, peer, id, 0), 0);
        send_all_layers(tx, id, &l, pairs, nb);
        assert_int_equal(wait_final(rx, id, 20 * SEC, NULL).type, KVX_EV_DONE);
        assert_int_equal(wait_final(tx, id, 20 * SEC, NULL).type, KVX_EV_DONE);
        /* Spot-check one block per layer byte-exact; all of them for the
         * first and last request. */
        if (r == 0 || total + kv_layout_pool_bytes(&l) >= (1ull << 30))
            verify(tx, rx, &l, &l, pairs, nb);
        else
            verify(tx, rx, &l, &l, &pairs[r % nb], 1);
        total += kv_layout_pool_bytes(&l);
    }
    double s = td_ns_to_s(td_now_ns() - t0);
    print_message("%s: 1 GiB in %.2f s (%.2f GB/s, unit-test build)\n", transport, s,
                  (double)total / s / 1e9);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

static void test_tcp_1gib(void **s)
{
    gib("tcp");
}
static void test_shm_1gib(void **s)
{
    gib("shm");
}

/* ---------- handshake ---------- */

static void mismatch_case(const char *transport, kv_layout lr, uint64_t fpr, kv_layout lt,
                          uint64_t fpt, const char *field)
{
    char bound[128];
    kvx_ep *rx = mk_ep(transport, KVX_ROLE_RECV, lr, fpr);
    char a[128];
    assert_int_equal(kvx_listen(rx, addr_for(transport, a, sizeof(a)), bound, sizeof(bound)), 0);
    kvx_ep *tx = mk_ep(transport, KVX_ROLE_SEND, lt, fpt);
    int peer = -1;
    char msg[256];
    assert_int_equal(kvx_connect(tx, bound, &peer, msg, sizeof(msg)), TD_EMISMATCH);
    assert_non_null(strstr(msg, field));
    assert_non_null(strstr(msg, "local="));
    assert_non_null(strstr(msg, "remote="));
    /* The receiver failed too, naming the field. */
    kvx_event e = {0};
    int64_t end = td_now_ns() + 3 * SEC;
    while (td_now_ns() < end && kvx_ep_wait(rx, &e, 1, 50 * TD_NS_PER_MS) == 0)
        ;
    assert_int_equal(e.type, KVX_EV_PEER_ERROR);
    assert_int_equal(e.err, TD_EMISMATCH);
    assert_non_null(strstr(e.msg, field));
    /* The sender reported it as an event too. */
    assert_int_equal(kvx_ep_poll(tx, &e, 1), 1);
    assert_int_equal(e.type, KVX_EV_PEER_ERROR);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

static void test_handshake_mismatch(void **s)
{
    const char *transports[] = {"tcp", "shm"};
    for (int t = 0; t < 2; t++) {
        const char *tr = transports[t];
        kv_layout l = small_layout(4, 32);
        kv_layout x;
        mismatch_case(tr, l, FP, l, FP + 1, "fingerprint");
        x = l;
        x.dtype = KV_DTYPE_BF16; /* same bytes, different dtype */
        mismatch_case(tr, l, FP, x, FP, "dtype");
        x = l;
        x.block_size = 32;
        x.n_kv_heads = 1; /* same block bytes, different block size */
        mismatch_case(tr, l, FP, x, FP, "block_size");
        x = l;
        x.n_kv_heads = 4;
        mismatch_case(tr, l, FP, x, FP, "block_bytes");
        x = l;
        x.n_layers = 5;
        mismatch_case(tr, l, FP, x, FP, "n_layers");
    }
}

/* Pure checks for the fields a kvx endpoint cannot get wrong itself. */
static void test_hello_check_fields(void **s)
{
    kvx_wire_hello a, b;
    memset(&a, 0, sizeof(a));
    a.version = KVX_WIRE_VERSION;
    a.layout = KVX_WIRE_LAYOUT_LAYER_MAJOR;
    strcpy(a.transport, "tcp");
    b = a;
    char field[32], msg[192];
    assert_int_equal(kvx_wire_hello_check(&a, &b, field, sizeof(field), msg, sizeof(msg)), 0);
    b.layout = 2;
    assert_int_equal(kvx_wire_hello_check(&a, &b, field, sizeof(field), msg, sizeof(msg)),
                     TD_EMISMATCH);
    assert_string_equal(field, "layout");
    assert_string_equal(msg, "layout mismatch: local=1 remote=2");
    b = a;
    b.version = 9;
    assert_int_equal(kvx_wire_hello_check(&a, &b, field, sizeof(field), msg, sizeof(msg)),
                     TD_EMISMATCH);
    assert_string_equal(field, "version");
    b = a;
    strcpy(b.transport, "shm");
    assert_int_equal(kvx_wire_hello_check(&a, &b, field, sizeof(field), msg, sizeof(msg)),
                     TD_EMISMATCH);
    assert_string_equal(msg, "transport mismatch: local=tcp remote=shm");
}

/* ---------- raw wire: bad frames ---------- */

static int raw_dial(const char *bound)
{
    char host[64];
    const char *c = strrchr(bound, ':');
    memcpy(host, bound, (size_t)(c - bound));
    host[c - bound] = 0;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(c + 1))};
    inet_pton(AF_INET, host, &sa.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    struct timeval tv = {.tv_sec = 3};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

static void raw_msg(int fd, uint16_t type, const void *body, uint32_t len)
{
    kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL, .type = type, .len = len};
    assert_int_equal(send(fd, &h, sizeof(h), MSG_NOSIGNAL), (ssize_t)sizeof(h));
    if (len) assert_int_equal(send(fd, body, len, MSG_NOSIGNAL), (ssize_t)len);
}

static void raw_read(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, (uint8_t *)buf + got, n - got, 0);
        assert_true(r > 0);
        got += (size_t)r;
    }
}

/* Reads the next control message header that is not a heartbeat. */
static void raw_read_hdr(int fd, kvx_wire_hdr *h)
{
    do
        raw_read(fd, h, sizeof(*h));
    while (h->type == KVX_MSG_HEARTBEAT && h->len == 0);
}

/* Handshakes by hand; returns the control fd and a data fd. */
static void raw_peer(const char *bound, const kv_layout *l, int *ctrl, int *data)
{
    kvx_wire_hello h;
    memset(&h, 0, sizeof(h));
    h.version = KVX_WIRE_VERSION;
    h.layout = KVX_WIRE_LAYOUT_LAYER_MAJOR;
    h.fingerprint = FP;
    h.dtype = l->dtype;
    h.block_size = l->block_size;
    h.block_bytes = kv_layout_block_bytes(l);
    h.n_layers = l->n_layers;
    h.num_blocks = l->num_blocks;
    h.n_data_conns = 1;
    strcpy(h.transport, "tcp");
    *ctrl = raw_dial(bound);
    raw_msg(*ctrl, KVX_MSG_HELLO, &h, sizeof(h));
    kvx_wire_hdr rh;
    kvx_wire_hello ack;
    raw_read(*ctrl, &rh, sizeof(rh));
    assert_int_equal(rh.type, KVX_MSG_HELLO_ACK);
    raw_read(*ctrl, &ack, sizeof(ack));
    *data = raw_dial(bound);
    kvx_wire_data_hello dh = {.token = ack.token, .index = 0};
    raw_msg(*data, KVX_MSG_DATA_HELLO, &dh, sizeof(dh));
}

static void raw_begin(int ctrl, const char *id)
{
    uint8_t buf[sizeof(kvx_wire_req) + 64];
    kvx_wire_req m = {.hash = kvx_req_hash(id), .n = (uint32_t)strlen(id)};
    memcpy(buf, &m, sizeof(m));
    memcpy(buf + sizeof(m), id, m.n);
    raw_msg(ctrl, KVX_MSG_BEGIN, buf, (uint32_t)(sizeof(m) + m.n));
    /* Wait for BEGIN_ACK so the binding is in place before data flows. */
    kvx_wire_hdr h;
    raw_read_hdr(ctrl, &h);
    assert_int_equal(h.type, KVX_MSG_BEGIN_ACK);
    assert_true(h.len <= sizeof(buf));
    raw_read(ctrl, buf, h.len);
}

static int wait_peer_error(kvx_ep *ep, int64_t timeout_ns)
{
    int64_t end = td_now_ns() + timeout_ns;
    while (td_now_ns() < end) {
        kvx_event e;
        if (kvx_ep_wait(ep, &e, 1, 50 * TD_NS_PER_MS) == 1 && e.type == KVX_EV_PEER_ERROR)
            return e.err;
    }
    return 0;
}

/* A tcp receiver for the hand-written senders below, its pool filled with
 * 0xAB (what expect_untouched checks). */
static kvx_ep *raw_rx(kv_layout l, char *bound, size_t n, uint8_t **pool)
{
    kvx_ep *rx = mk_rx("tcp", l, bound, n);
    *pool = kvx_ep_pool(rx);
    memset(*pool, 0xAB, kv_layout_pool_bytes(&l));
    return rx;
}

static void test_bad_frames(void **s)
{
    kv_layout l = small_layout(2, 16);
    size_t bb = kv_layout_block_bytes(&l);
    char bound[128];
    uint8_t *pool;
    kvx_ep *rx = raw_rx(l, bound, sizeof(bound), &pool);
    uint8_t *payload = malloc(bb);
    memset(payload, 0x11, bb);
    uint32_t dst[2] = {4, 5};
    assert_int_equal(kvx_recv_register(rx, "victim", dst, 2, 0), 0);

    /* 1. Garbage instead of a hello: connection dropped, nothing else. */
    int g = raw_dial(bound);
    char junk[512];
    fill_random(junk, sizeof(junk), 3);
    send(g, junk, sizeof(junk), MSG_NOSIGNAL);
    char c;
    assert_true(recv(g, &c, 1, 0) <= 0);
    close(g);

    /* 2. Valid handshake, then a frame for an out-of-range block. */
    int ctrl, data;
    raw_peer(bound, &l, &ctrl, &data);
    raw_begin(ctrl, "victim");
    kvx_wire_frame f = {.magic = KVX_WIRE_MAGIC_FRAME,
                        .layer = 0,
                        .hash = kvx_req_hash("victim"),
                        .dst = 1000000,
                        .len = bb};
    send(data, &f, sizeof(f), MSG_NOSIGNAL);
    send(data, payload, bb, MSG_NOSIGNAL);
    /* The peer is dropped and the request it had begun fails with it. */
    int saw_fail = 0, saw_peer = 0;
    int64_t until = td_now_ns() + 3 * SEC;
    while ((!saw_fail || !saw_peer) && td_now_ns() < until) {
        kvx_event e;
        if (kvx_ep_wait(rx, &e, 1, 50 * TD_NS_PER_MS) != 1) continue;
        if (e.type == KVX_EV_FAILED && !strcmp(e.req_id, "victim")) saw_fail = 1;
        if (e.type == KVX_EV_PEER_ERROR && e.err == TD_EPROTO) saw_peer = 1;
        assert_int_not_equal(e.type, KVX_EV_DONE);
    }
    assert_true(saw_fail && saw_peer);
    close(ctrl);
    close(data);

    /* 3. Oversized length, bad magic, bad layer: each rejected. */
    kvx_wire_frame bad[3] = {
        {.magic = KVX_WIRE_MAGIC_FRAME, .hash = 1, .dst = 4, .len = bb * 1000},
        {.magic = 0xdeadbeef, .hash = 1, .dst = 4, .len = bb},
        {.magic = KVX_WIRE_MAGIC_FRAME, .layer = 99, .hash = 1, .dst = 4, .len = bb},
    };
    for (int i = 0; i < 3; i++) {
        raw_peer(bound, &l, &ctrl, &data);
        send(data, &bad[i], sizeof(bad[i]), MSG_NOSIGNAL);
        assert_int_equal(wait_peer_error(rx, 3 * SEC), TD_EPROTO);
        close(ctrl);
        close(data);
    }

    /* 4. In-range block that belongs to nobody, or to a request this peer
     * did not begin: payload swallowed, memory untouched, peer kept. */
    assert_int_equal(kvx_recv_register(rx, "other", dst, 2, 0), 0);
    kvx_stats st0;
    kvx_ep_stats(rx, &st0);
    raw_peer(bound, &l, &ctrl, &data);
    kvx_wire_frame f2 = {
        .magic = KVX_WIRE_MAGIC_FRAME, .layer = 1, .hash = 77, .dst = 9, .len = bb};
    send(data, &f2, sizeof(f2), MSG_NOSIGNAL);
    send(data, payload, bb, MSG_NOSIGNAL);
    f2.hash = kvx_req_hash("other");
    f2.dst = 4; /* owned by "other", but this peer never sent BEGIN */
    send(data, &f2, sizeof(f2), MSG_NOSIGNAL);
    send(data, payload, bb, MSG_NOSIGNAL);
    int64_t end = td_now_ns() + 2 * SEC;
    kvx_stats st;
    do {
        kvx_ep_stats(rx, &st);
        td_sleep_ns(10 * TD_NS_PER_MS);
    } while (st.frames_rejected < st0.frames_rejected + 2 && td_now_ns() < end);
    assert_int_equal(st.frames_rejected, st0.frames_rejected + 2);
    assert_int_equal(st.peers, 1); /* stale frames do not kill the peer */
    for (size_t i = 0; i < kv_layout_pool_bytes(&l); i++)
        if (pool[i] != 0xAB) fail_msg("pool byte %zu was written", i);
    close(ctrl);
    close(data);
    free(payload);
    kvx_ep_destroy(rx);
}

/* A hand-written sender that dribbles every frame in small pieces (partial
 * headers, partial payloads): the receiver's state machine reassembles them,
 * the request completes byte-exact. Then a cancel arrives while a payload is
 * half read: the rest goes to the sink, not into the released block. */
static void send_slowly(int fd, const void *buf, size_t n, size_t piece)
{
    const uint8_t *b = buf;
    for (size_t off = 0; off < n; off += piece) {
        size_t k = n - off < piece ? n - off : piece;
        assert_int_equal(send(fd, b + off, k, MSG_NOSIGNAL), (ssize_t)k);
        td_sleep_ns(100 * 1000);
    }
}

/* Reads one byte of a block the progress thread is writing into, before the
 * request's final event. The lease says the application must not do that;
 * this test does it only to learn that the first half of a payload has
 * landed before it cancels (no event tells it), and checks the value again
 * after the final event, which orders the read. Hidden from ThreadSanitizer
 * for that reason. */
__attribute__((no_sanitize("thread"))) static uint8_t peek_byte(const uint8_t *p)
{
    return *(const volatile uint8_t *)p;
}

/* Waits (2 s at most) for *p to read v: the half payload sent has landed. */
static void wait_byte(const uint8_t *p, uint8_t v)
{
    int64_t end = td_now_ns() + 2 * SEC;
    while (peek_byte(p) != v && td_now_ns() < end)
        td_sleep_ns(TD_NS_PER_MS);
    assert_int_equal(peek_byte(p), v);
}

/* Cancels id on rx and checks its one final event says so. */
static void cancel_and_check(kvx_ep *rx, const char *id)
{
    assert_int_equal(kvx_cancel(rx, id), 0);
    kvx_event e = wait_final(rx, id, 2 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(e.err, TD_ECANCELED);
}

/* id is DONE, and block dst[i] of each of l's layers holds layer * 16 + i + 1
 * in every byte (what the raw senders here write). */
static void expect_landed(kvx_ep *rx, const char *id, const kv_layout *l, const uint32_t *dst,
                          int n)
{
    kvx_event e = wait_final(rx, id, 5 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_DONE);
    const uint8_t *pool = kvx_ep_pool(rx);
    size_t bb = kv_layout_block_bytes(l);
    for (uint32_t layer = 0; layer < l->n_layers; layer++)
        for (int i = 0; i < n; i++) {
            const uint8_t *b = pool + kv_layout_block_offset(l, layer, dst[i]);
            for (size_t k = 0; k < bb; k++)
                assert_int_equal(b[k], layer * 16 + (uint32_t)i + 1);
        }
}

/* The raw sender's control connection carries a DONE next. */
static void raw_expect_done(int ctrl)
{
    kvx_wire_hdr h;
    raw_read_hdr(ctrl, &h);
    assert_int_equal(h.type, KVX_MSG_DONE);
    kvx_wire_req m;
    raw_read(ctrl, &m, sizeof(m));
}

/* Waits for one more rejected frame than `before`, the peer kept. */
static void wait_one_rejected(kvx_ep *rx, uint64_t before)
{
    kvx_stats st;
    int64_t end = td_now_ns() + 2 * SEC;
    do {
        td_sleep_ns(5 * TD_NS_PER_MS);
        kvx_ep_stats(rx, &st);
    } while (st.frames_rejected == before && td_now_ns() < end);
    assert_int_equal(st.frames_rejected, before + 1);
    assert_int_equal(st.peers, 1);
}

/* Every byte of p[0..n) still holds the pool's fill, 0xAB. */
static void expect_untouched(const uint8_t *p, size_t n, const char *what)
{
    for (size_t k = 0; k < n; k++)
        if (p[k] != 0xAB) fail_msg("%s: byte %zu was written", what, k);
}

static void test_raw_partial_frames_and_cancel(void **s)
{
    kv_layout l = small_layout(2, 16);
    size_t bb = kv_layout_block_bytes(&l);
    char bound[128];
    uint8_t *pool;
    kvx_ep *rx = raw_rx(l, bound, sizeof(bound), &pool);
    uint8_t *payload = malloc(bb);
    uint32_t dst[2] = {7, 3};
    assert_int_equal(kvx_recv_register(rx, "slow-raw", dst, 2, 0), 0);
    int ctrl, data;
    raw_peer(bound, &l, &ctrl, &data);
    raw_begin(ctrl, "slow-raw");
    for (uint32_t layer = 0; layer < 2; layer++)
        for (int i = 0; i < 2; i++) {
            kvx_wire_frame f = {.magic = KVX_WIRE_MAGIC_FRAME,
                                .layer = layer,
                                .hash = kvx_req_hash("slow-raw"),
                                .dst = dst[i],
                                .len = bb};
            memset(payload, (int)(layer * 16 + (uint32_t)i + 1), bb);
            send_slowly(data, &f, sizeof(f), 7);
            send_slowly(data, payload, bb, 3000);
        }
    expect_landed(rx, "slow-raw", &l, dst, 2);
    raw_expect_done(ctrl); /* DONE went back on the control connection */

    /* Half a payload, cancel, the other half. */
    memset(pool, 0xAB, kv_layout_pool_bytes(&l));
    assert_int_equal(kvx_recv_register(rx, "cut", dst, 2, 0), 0);
    raw_begin(ctrl, "cut");
    kvx_wire_frame f = {.magic = KVX_WIRE_MAGIC_FRAME,
                        .layer = 1,
                        .hash = kvx_req_hash("cut"),
                        .dst = 7,
                        .len = bb};
    memset(payload, 0x42, bb);
    send(data, &f, sizeof(f), MSG_NOSIGNAL);
    send(data, payload, bb / 2, MSG_NOSIGNAL);
    const uint8_t *blk = pool + kv_layout_block_offset(&l, 1, 7);
    wait_byte(&blk[bb / 2 - 1], 0x42);
    cancel_and_check(rx, "cut");
    assert_int_equal(blk[bb / 2 - 1], 0x42); /* the first half landed in place */
    send(data, payload + bb / 2, bb - bb / 2, MSG_NOSIGNAL);
    /* A following frame on the same connection is still parsed (the stream
     * stayed in sync) and rejected: its request is gone. */
    kvx_stats st0;
    kvx_ep_stats(rx, &st0);
    send(data, &f, sizeof(f), MSG_NOSIGNAL);
    send(data, payload, bb, MSG_NOSIGNAL);
    wait_one_rejected(rx, st0.frames_rejected);
    expect_untouched(blk + bb / 2, bb - bb / 2, "released block");
    close(ctrl);
    close(data);
    free(payload);
    kvx_ep_destroy(rx);
}

/* Runs on a data connection: [kvx_wire_run][n frame headers][n payloads].
 * A run of four blocks (three of a begun request, one stale) dribbled in
 * small pieces lands byte-exact and the stale payload is swallowed; a cancel
 * while the first block of a run is half read sends the rest of the run's
 * blocks of that request to the sink, not into released memory, and the
 * stream stays in sync; a run head with n = 0 or n > KVX_WIRE_RUN_MAX, or a
 * bad frame header inside a run, drops the peer. */
static size_t build_run(uint8_t *buf, const kvx_wire_frame *f, uint32_t n, const uint8_t *fill,
                        size_t bb)
{
    kvx_wire_run r = {.magic = KVX_WIRE_MAGIC_RUN, .n = n};
    size_t off = 0;
    memcpy(buf, &r, sizeof(r));
    off += sizeof(r);
    memcpy(buf + off, f, n * sizeof(*f));
    off += n * sizeof(*f);
    for (uint32_t i = 0; i < n; i++) {
        memset(buf + off, fill[i], bb);
        off += bb;
    }
    return off;
}

static void test_raw_runs(void **s)
{
    (void)s;
    kv_layout l = small_layout(2, 16);
    size_t bb = kv_layout_block_bytes(&l);
    char bound[128];
    uint8_t *pool;
    kvx_ep *rx = raw_rx(l, bound, sizeof(bound), &pool);
    uint8_t *buf = malloc(sizeof(kvx_wire_run) + 4 * (sizeof(kvx_wire_frame) + bb));
    assert_non_null(buf);
    uint32_t dst[3] = {7, 3, 12};
    assert_int_equal(kvx_recv_register(rx, "run", dst, 3, 0), 0);
    int ctrl, data;
    raw_peer(bound, &l, &ctrl, &data);
    raw_begin(ctrl, "run");
    uint64_t h = kvx_req_hash("run");
    for (uint32_t layer = 0; layer < 2; layer++) {
        kvx_wire_frame f[4] = {
            {.magic = KVX_WIRE_MAGIC_FRAME, .layer = layer, .hash = h, .dst = dst[0], .len = bb},
            {.magic = KVX_WIRE_MAGIC_FRAME, .layer = layer, .hash = 99, .dst = 5, .len = bb},
            {.magic = KVX_WIRE_MAGIC_FRAME, .layer = layer, .hash = h, .dst = dst[1], .len = bb},
            {.magic = KVX_WIRE_MAGIC_FRAME, .layer = layer, .hash = h, .dst = dst[2], .len = bb},
        };
        uint8_t fill[4] = {(uint8_t)(layer * 16 + 1), 0x77, (uint8_t)(layer * 16 + 2),
                           (uint8_t)(layer * 16 + 3)};
        size_t n = build_run(buf, f, 4, fill, bb);
        send_slowly(data, buf, n, layer ? 4093 : 13);
    }
    expect_landed(rx, "run", &l, dst, 3);
    for (uint32_t layer = 0; layer < 2; layer++)
        expect_untouched(pool + kv_layout_block_offset(&l, layer, 5), bb, "stale block");
    raw_expect_done(ctrl);

    /* Cancel while the run's first block is half read. */
    memset(pool, 0xAB, kv_layout_pool_bytes(&l));
    assert_int_equal(kvx_recv_register(rx, "cut-run", dst, 3, 0), 0);
    raw_begin(ctrl, "cut-run");
    h = kvx_req_hash("cut-run");
    kvx_wire_frame f[3];
    for (int i = 0; i < 3; i++)
        f[i] = (kvx_wire_frame){
            .magic = KVX_WIRE_MAGIC_FRAME, .layer = 1, .hash = h, .dst = dst[i], .len = bb};
    uint8_t fill[3] = {0x42, 0x43, 0x44};
    size_t n = build_run(buf, f, 3, fill, bb);
    size_t first_half = sizeof(kvx_wire_run) + 3 * sizeof(kvx_wire_frame) + bb / 2;
    assert_int_equal(send(data, buf, first_half, MSG_NOSIGNAL), (ssize_t)first_half);
    const uint8_t *blk = pool + kv_layout_block_offset(&l, 1, dst[0]);
    wait_byte(&blk[bb / 2 - 1], 0x42);
    cancel_and_check(rx, "cut-run");
    assert_int_equal(send(data, buf + first_half, n - first_half, MSG_NOSIGNAL),
                     (ssize_t)(n - first_half));
    /* A lone frame after the run is still parsed (in sync) and rejected. */
    kvx_stats st0;
    kvx_ep_stats(rx, &st0);
    n = build_run(buf, f, 1, fill, bb);
    assert_int_equal(send(data, buf + sizeof(kvx_wire_run), n - sizeof(kvx_wire_run), MSG_NOSIGNAL),
                     (ssize_t)(n - sizeof(kvx_wire_run)));
    wait_one_rejected(rx, st0.frames_rejected);
    expect_untouched(blk + bb / 2, bb - bb / 2, "released block");
    for (int i = 1; i < 3; i++)
        expect_untouched(pool + kv_layout_block_offset(&l, 1, dst[i]), bb,
                         "a later block of the canceled request in the run");
    close(ctrl);
    close(data);
    assert_int_equal(wait_peer_error(rx, 3 * SEC), TD_ECONNRESET); /* that peer going away */

    /* Bad run heads, a bad header inside a run: the peer is dropped. */
    kvx_wire_run bad_heads[2] = {{.magic = KVX_WIRE_MAGIC_RUN, .n = 0},
                                 {.magic = KVX_WIRE_MAGIC_RUN, .n = KVX_WIRE_RUN_MAX + 1}};
    for (int i = 0; i < 3; i++) {
        raw_peer(bound, &l, &ctrl, &data);
        if (i < 2) {
            send(data, &bad_heads[i], sizeof(bad_heads[i]), MSG_NOSIGNAL);
        } else {
            kvx_wire_frame g[2] = {
                {.magic = KVX_WIRE_MAGIC_FRAME, .hash = 1, .dst = 4, .len = bb},
                {.magic = KVX_WIRE_MAGIC_FRAME, .hash = 1, .dst = 4000, .len = bb},
            };
            n = build_run(buf, g, 2, fill, bb);
            send(data, buf, n, MSG_NOSIGNAL);
        }
        assert_int_equal(wait_peer_error(rx, 3 * SEC), TD_EPROTO);
        close(ctrl);
        close(data);
    }

    /* One block named twice in a run: the claim of the second fails after
     * the first was claimed; the request fails, the peer is dropped, and
     * nothing of the run is written. */
    memset(pool, 0xAB, kv_layout_pool_bytes(&l));
    assert_int_equal(kvx_recv_register(rx, "dup-run", dst, 3, 0), 0);
    raw_peer(bound, &l, &ctrl, &data);
    raw_begin(ctrl, "dup-run");
    h = kvx_req_hash("dup-run");
    kvx_wire_frame dup[2] = {
        {.magic = KVX_WIRE_MAGIC_FRAME, .layer = 0, .hash = h, .dst = dst[1], .len = bb},
        {.magic = KVX_WIRE_MAGIC_FRAME, .layer = 0, .hash = h, .dst = dst[1], .len = bb},
    };
    n = build_run(buf, dup, 2, fill, bb);
    send(data, buf, n, MSG_NOSIGNAL);
    kvx_event fe = wait_final(rx, "dup-run", 3 * SEC, NULL);
    assert_int_equal(fe.type, KVX_EV_FAILED);
    assert_int_equal(fe.err, TD_EPROTO);
    assert_int_equal(wait_peer_error(rx, 3 * SEC), TD_EPROTO);
    expect_untouched(pool + kv_layout_block_offset(&l, 0, dst[1]), bb, "a block named twice");
    close(ctrl);
    close(data);
    free(buf);
    kvx_ep_destroy(rx);
}

/* A tcp peer that claims blocks were written (a POST, as the direct-write
 * transports send) is dropped: nothing arrived, nothing may count as landed. */
static void test_tcp_post_rejected(void **s)
{
    kv_layout l = small_layout(1, 8);
    char bound[128];
    kvx_ep *rx = mk_rx("tcp", l, bound, sizeof(bound));
    uint32_t dst[2] = {1, 2};
    assert_int_equal(kvx_recv_register(rx, "posted", dst, 2, 0), 0);
    int ctrl, data;
    raw_peer(bound, &l, &ctrl, &data);
    raw_begin(ctrl, "posted");
    uint8_t buf[sizeof(kvx_wire_req) + 2 * sizeof(kvx_pair)];
    kvx_wire_req m = {.hash = kvx_req_hash("posted"), .layer = 0, .n = 2};
    kvx_pair pairs[2] = {{0, 1}, {0, 2}};
    memcpy(buf, &m, sizeof(m));
    memcpy(buf + sizeof(m), pairs, sizeof(pairs));
    raw_msg(ctrl, KVX_MSG_POST, buf, sizeof(buf));
    kvx_event e = wait_final(rx, "posted", 3 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(e.err, TD_EPROTO);
    close(ctrl);
    close(data);
    kvx_ep_destroy(rx);
}

/* The last frame of a request lands while the sender's control connection
 * has just been reset: the request ends exactly once, under its own id (DONE
 * when the frame is seen first, FAILED when the reset is), never both.
 * Frames for a request nobody registered come first, so the receiver is
 * still busy on the data connection when the reset arrives; which of the two
 * it sees first is up to the scheduler, hence the rounds. */
static void test_last_frame_races_sender_reset(void **s)
{
    kv_layout l = small_layout(1, 8);
    size_t bb = kv_layout_block_bytes(&l);
    char bound[128];
    kvx_ep *rx = mk_rx("tcp", l, bound, sizeof(bound));
    size_t fb = sizeof(kvx_wire_frame) + bb, n_junk = 96;
    uint8_t *buf = calloc(n_junk + 1, fb);
    assert_non_null(buf);
    int done = 0, failed = 0;
    for (int round = 0; round < 24; round++) {
        char id[32];
        snprintf(id, sizeof(id), "last-%d", round);
        uint32_t dst = 3;
        assert_int_equal(kvx_recv_register(rx, id, &dst, 1, 0), 0);
        int ctrl, data;
        raw_peer(bound, &l, &ctrl, &data);
        raw_begin(ctrl, id);
        for (size_t i = 0; i <= n_junk; i++) {
            kvx_wire_frame f = {.magic = KVX_WIRE_MAGIC_FRAME,
                                .hash = i < n_junk ? 99 : kvx_req_hash(id),
                                .dst = i < n_junk ? 5 : dst,
                                .len = bb};
            memcpy(buf + i * fb, &f, sizeof(f));
        }
        assert_int_equal(send(data, buf, (n_junk + 1) * fb, MSG_NOSIGNAL),
                         (ssize_t)((n_junk + 1) * fb));
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(ctrl, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(ctrl); /* RST */
        int finals = 0, peer_gone = 0;
        int64_t end = td_now_ns() + 3 * SEC;
        while (td_now_ns() < end && !(finals && peer_gone)) {
            kvx_event e;
            if (kvx_ep_wait(rx, &e, 1, 20 * TD_NS_PER_MS) != 1) continue;
            if (e.type == KVX_EV_PEER_ERROR) peer_gone = 1;
            if (e.type != KVX_EV_DONE && e.type != KVX_EV_FAILED) continue;
            assert_string_equal(e.req_id, id);
            finals++;
            done += e.type == KVX_EV_DONE;
            failed += e.type == KVX_EV_FAILED;
        }
        assert_int_equal(finals, 1);
        assert_true(peer_gone);
        /* Nothing else ends afterwards. */
        kvx_event e;
        while (kvx_ep_wait(rx, &e, 1, 20 * TD_NS_PER_MS) == 1)
            assert_true(e.type != KVX_EV_DONE && e.type != KVX_EV_FAILED);
        close(data);
    }
    print_message("last frame vs reset: %d done, %d failed\n", done, failed);
    free(buf);
    kvx_ep_destroy(rx);
}

/* Fuzz: random bytes where a hello, a control message or a data frame
 * should be, with valid headers around random bodies too. The receiver must
 * never write its pool, never crash (ASan build), and still serve a real
 * transfer afterwards. */
static void test_fuzz_wire(void **s)
{
    kv_layout l = small_layout(2, 16);
    char bound[128];
    uint8_t *pool;
    kvx_ep *rx = raw_rx(l, bound, sizeof(bound), &pool);
    uint32_t dst[2] = {2, 9};
    assert_int_equal(kvx_recv_register(rx, "fz", dst, 2, 0), 0);
    uint64_t seed = 99;
    uint8_t junk[4096];
    for (int it = 0; it < 60; it++) {
        fill_random(junk, sizeof(junk), seed++);
        size_t n = 1 + junk[0] * 16u;
        int kind = it % 4;
        if (kind == 0) {
            /* raw bytes instead of a hello, sometimes behind a valid header */
            int fd = raw_dial(bound);
            if (it % 8 == 0) {
                kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL,
                                  .type = KVX_MSG_HELLO,
                                  .len = sizeof(kvx_wire_hello)};
                send(fd, &h, sizeof(h), MSG_NOSIGNAL);
            }
            send(fd, junk, n, MSG_NOSIGNAL);
            close(fd);
            continue;
        }
        int ctrl, data;
        raw_peer(bound, &l, &ctrl, &data);
        if (kind == 1) {
            send(ctrl, junk, n, MSG_NOSIGNAL); /* garbage on control */
        } else if (kind == 2) {
            /* well-formed headers, random types and bodies */
            for (int k = 0; k < 8; k++) {
                uint32_t len = junk[k] % 64u;
                kvx_wire_hdr h = {.magic = KVX_WIRE_MAGIC_CTRL,
                                  .type = (uint16_t)(junk[k + 8] % (KVX_MSG_MAX_TYPE + 2)),
                                  .len = len};
                send(ctrl, &h, sizeof(h), MSG_NOSIGNAL);
                send(ctrl, junk + 64 + 64 * k, len, MSG_NOSIGNAL);
            }
        } else {
            /* frames with valid magic and length, random everything else */
            kvx_wire_frame f;
            memcpy(&f, junk, sizeof(f));
            f.magic = KVX_WIRE_MAGIC_FRAME;
            f.len = kv_layout_block_bytes(&l);
            if (it % 3 == 0) f.dst %= l.num_blocks;
            if (it % 2 == 0) f.layer %= l.n_layers;
            send(data, &f, sizeof(f), MSG_NOSIGNAL);
            send(data, junk, sizeof(junk), MSG_NOSIGNAL);
        }
        td_sleep_ns(2 * TD_NS_PER_MS);
        close(ctrl);
        close(data);
    }
    td_sleep_ns(50 * TD_NS_PER_MS);
    for (size_t i = 0; i < kv_layout_pool_bytes(&l); i++)
        if (pool[i] != 0xAB) fail_msg("pool byte %zu was written by fuzz input", i);
    /* "fz" was never begun by a real peer, so nothing can have failed it
     * unless a fuzz peer sent a valid BEGIN for it (impossible: random
     * bytes). A real transfer still works. */
    kvx_ep *tx = mk_ep("tcp", KVX_ROLE_SEND, l, FP);
    fill_random(kvx_ep_pool(tx), kv_layout_pool_bytes(&l), 4);
    int peer;
    assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
    kvx_pair pairs[2] = {{0, 2}, {1, 9}};
    assert_int_equal(kvx_send_begin(tx, peer, "fz", 0), 0);
    send_all_layers(tx, "fz", &l, pairs, 2);
    assert_int_equal(wait_final(rx, "fz", 5 * SEC, NULL).type, KVX_EV_DONE);
    verify(tx, rx, &l, &l, pairs, 2);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

/* ---------- failure handling ---------- */

/* Child process: a sender that sends `layers` layers of req then waits. */
static void child_sender(const char *transport, kv_layout l, int addr_fd, int sync_fd,
                         const char *id, const kvx_pair *pairs, int n, int layers)
{
    char bound[128] = {0};
    if (read(addr_fd, bound, sizeof(bound) - 1) <= 0) _exit(2);
    kvx_params p = {
        .transport = transport, .role = KVX_ROLE_SEND, .model_fingerprint = FP, .layout = l};
    kvx_ep *tx;
    int peer;
    if (kvx_ep_create(&p, &tx) < 0 || kvx_connect(tx, bound, &peer, NULL, 0) < 0 ||
        kvx_send_begin(tx, peer, id, 0) < 0)
        _exit(3);
    for (int layer = 0; layer < layers; layer++)
        if (kvx_send_layer(tx, id, layer, pairs, n) < 0) _exit(4);
    char b = 1;
    if (write(sync_fd, &b, 1) != 1) _exit(5);
    for (;;)
        pause();
}

static void sender_dies(const char *transport, int sig)
{
    kv_layout l = small_layout(4, 32);
    kvx_pair pairs[4] = {{0, 1}, {1, 3}, {2, 5}, {3, 7}};
    uint32_t dst[4] = {1, 3, 5, 7};
    int ap[2], sp[2];
    assert_int_equal(pipe(ap), 0);
    assert_int_equal(pipe(sp), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(ap[1]);
        close(sp[0]);
        child_sender(transport, l, ap[0], sp[1], "doomed", pairs, 4, 2);
    }
    close(ap[0]);
    close(sp[1]);
    char bound[128];
    kvx_ep *rx = mk_rx(transport, l, bound, sizeof(bound));
    assert_int_equal(kvx_recv_register(rx, "doomed", dst, 4, 0), 0);
    assert_int_equal(write(ap[1], bound, strlen(bound)), (ssize_t)strlen(bound));
    char b;
    assert_int_equal(read(sp[0], &b, 1), 1);
    /* Two of four layers land, then the sender dies (or freezes). */
    int landed = 0;
    int64_t end = td_now_ns() + 5 * SEC;
    while (landed < 2 && td_now_ns() < end) {
        kvx_event e;
        if (kvx_ep_wait(rx, &e, 1, 50 * TD_NS_PER_MS) == 1) {
            assert_int_not_equal(e.type, KVX_EV_DONE);
            landed += e.type == KVX_EV_LAYER_LANDED;
        }
    }
    assert_int_equal(landed, 2);
    int64_t t0 = td_now_ns();
    kill(pid, sig);
    kvx_event e = wait_final(rx, "doomed", 5 * SEC, NULL);
    double waited = td_ns_to_s(td_now_ns() - t0);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_true(e.err == TD_ECONNRESET || e.err == TD_ETIMEDOUT);
    print_message("%s sender %s: receiver failed the request after %.3f s (%s)\n", transport,
                  sig == SIGKILL ? "killed" : "stopped", waited, e.msg);
    assert_true(waited < 2.0);
    /* The lease returned. */
    assert_int_equal(kvx_recv_register(rx, "again", dst, 4, 0), 0);
    if (sig != SIGKILL) kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    close(ap[1]);
    close(sp[0]);
    kvx_ep_destroy(rx);
}

static void test_tcp_sender_killed(void **s)
{
    sender_dies("tcp", SIGKILL);
}
static void test_shm_sender_killed(void **s)
{
    sender_dies("shm", SIGKILL);
}
static void test_tcp_sender_stalled(void **s)
{
    sender_dies("tcp", SIGSTOP);
}

static void receiver_dies(const char *transport, int sig)
{
    kv_layout l = small_layout(4, 32);
    kvx_pair pairs[3] = {{0, 2}, {1, 4}, {2, 6}};
    uint32_t dst[3] = {2, 4, 6};
    int ap[2];
    assert_int_equal(pipe(ap), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(ap[0]);
        kvx_params p = {
            .transport = transport, .role = KVX_ROLE_RECV, .model_fingerprint = FP, .layout = l};
        kvx_ep *rx;
        char a[128], bound[128] = {0};
        if (kvx_ep_create(&p, &rx) < 0 ||
            kvx_listen(rx, addr_for(transport, a, sizeof(a)), bound, sizeof(bound)) < 0 ||
            kvx_recv_register(rx, "orphan", dst, 3, 0) < 0)
            _exit(3);
        if (write(ap[1], bound, sizeof(bound)) != (ssize_t)sizeof(bound)) _exit(4);
        for (;;)
            pause();
    }
    close(ap[1]);
    char bound[128];
    assert_int_equal(read(ap[0], bound, sizeof(bound)), (ssize_t)sizeof(bound));
    kvx_ep *tx = mk_ep(transport, KVX_ROLE_SEND, l, FP);
    int peer;
    assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "orphan", 0), 0);
    assert_int_equal(kvx_send_layer(tx, "orphan", 0, pairs, 3), 0);
    kvx_event e;
    int64_t end = td_now_ns() + 5 * SEC;
    int sent = 0;
    while (!sent && td_now_ns() < end)
        if (kvx_ep_wait(tx, &e, 1, 50 * TD_NS_PER_MS) == 1) sent = e.type == KVX_EV_LAYER_SENT;
    assert_true(sent);
    int64_t t0 = td_now_ns();
    kill(pid, sig);
    /* Posting more either fails at once or ends in FAILED. */
    int rc = kvx_send_layer(tx, "orphan", 1, pairs, 3);
    assert_true(rc == 0 || rc == TD_ECONNRESET || rc == TD_ENOENT);
    e = wait_final(tx, "orphan", 5 * SEC, NULL);
    double waited = td_ns_to_s(td_now_ns() - t0);
    assert_int_equal(e.type, KVX_EV_FAILED);
    print_message("%s receiver %s: sender failed the request after %.3f s (%s)\n", transport,
                  sig == SIGKILL ? "killed" : "stopped", waited, e.msg);
    assert_true(waited < 2.0);
    if (sig != SIGKILL) kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    close(ap[0]);
    kvx_ep_destroy(tx);
}

static void test_tcp_receiver_killed(void **s)
{
    receiver_dies("tcp", SIGKILL);
}
static void test_shm_receiver_killed(void **s)
{
    receiver_dies("shm", SIGKILL);
}
static void test_shm_receiver_stalled(void **s)
{
    receiver_dies("shm", SIGSTOP);
}

/* Cancel after one layer, from either side: both sides fail the request, the
 * receiver's lease returns, and a later request on the same peer works. */
static void cancel_case(const char *transport, int from_receiver)
{
    kv_layout l = small_layout(4, 32);
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 1, &rx, &tx);
    kvx_pair pairs[4] = {{0, 9}, {1, 8}, {2, 7}, {3, 6}};
    uint32_t dst[4] = {9, 8, 7, 6};
    assert_int_equal(kvx_recv_register(rx, "c1", dst, 4, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "c1", 0), 0);
    assert_int_equal(kvx_send_layer(tx, "c1", 0, pairs, 4), 0);
    kvx_event e;
    int64_t end = td_now_ns() + 5 * SEC;
    int landed = 0;
    while (!landed && td_now_ns() < end)
        if (kvx_ep_wait(rx, &e, 1, 50 * TD_NS_PER_MS) == 1) landed = e.type == KVX_EV_LAYER_LANDED;
    assert_true(landed);
    assert_int_equal(kvx_cancel(from_receiver ? rx : tx, "c1"), 0);
    e = wait_final(rx, "c1", 3 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(e.err, TD_ECANCELED);
    e = wait_final(tx, "c1", 3 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(e.err, TD_ECANCELED);
    /* Posting to a canceled request fails. */
    assert_true(kvx_send_layer(tx, "c1", 1, pairs, 4) < 0);
    /* Same blocks, new request, same peer: completes. */
    assert_int_equal(kvx_recv_register(rx, "c2", dst, 4, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "c2", 0), 0);
    send_all_layers(tx, "c2", &l, pairs, 4);
    assert_int_equal(wait_final(rx, "c2", 5 * SEC, NULL).type, KVX_EV_DONE);
    assert_int_equal(wait_final(tx, "c2", 5 * SEC, NULL).type, KVX_EV_DONE);
    verify(tx, rx, &l, &l, pairs, 4);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

static void test_cancel(void **s)
{
    cancel_case("tcp", 1);
    cancel_case("tcp", 0);
    cancel_case("shm", 1);
    cancel_case("shm", 0);
}

/* A partial transfer never completes: deadline fails it, lease returns. */
static void test_partial_deadline(void **s)
{
    const char *transports[] = {"tcp", "shm"};
    for (int t = 0; t < 2; t++) {
        kv_layout l = small_layout(4, 32);
        char bound[128];
        kvx_ep *rx = mk_rx(transports[t], l, bound, sizeof(bound));
        kvx_ep *tx = mk_ep(transports[t], KVX_ROLE_SEND, l, FP);
        int peer;
        assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
        kvx_pair pairs[2] = {{0, 1}, {1, 2}};
        uint32_t dst[2] = {1, 2};
        int64_t dl = td_now_ns() + 300 * TD_NS_PER_MS;
        assert_int_equal(kvx_recv_register(rx, "slow", dst, 2, dl), 0);
        assert_int_equal(kvx_send_begin(tx, peer, "slow", 0), 0);
        /* Layers 0..2 of 4, and only one of the two blocks of layer 3. */
        for (int layer = 0; layer < 3; layer++)
            assert_int_equal(kvx_send_layer(tx, "slow", layer, pairs, 2), 0);
        assert_int_equal(kvx_send_layer(tx, "slow", 3, pairs, 1), 0);
        int layers = 0;
        kvx_event e = wait_final(rx, "slow", 3 * SEC, &layers);
        assert_int_equal(e.type, KVX_EV_FAILED);
        assert_int_equal(e.err, TD_ETIMEDOUT);
        assert_int_equal(layers, 3);
        assert_int_equal(wait_final(tx, "slow", 3 * SEC, NULL).type, KVX_EV_FAILED);
        assert_int_equal(kvx_recv_register(rx, "after", dst, 2, 0), 0);
        kvx_ep_destroy(tx);
        kvx_ep_destroy(rx);
    }
}

/* kvx_recv_landed counts the blocks of a layer that is not whole yet (no
 * KVX_EV_LAYER_LANDED for it), and knows open requests only. */
static void wait_landed(kvx_ep *rx, const char *id, uint64_t want)
{
    uint64_t got = 0;
    int64_t until = td_now_ns() + 3 * SEC;
    while (kvx_recv_landed(rx, id, &got) == 0 && got < want && td_now_ns() < until)
        td_sleep_ns(TD_NS_PER_MS);
    assert_int_equal(got, want);
}

static void test_recv_landed(void **s)
{
    const char *transports[] = {"tcp", "shm"};
    for (int t = 0; t < 2; t++) {
        kvx_ep *rx, *tx;
        int peer = mk_pair(transports[t], small_layout(2, 32), 5, &rx, &tx);
        kvx_pair pairs[2] = {{0, 1}, {1, 2}};
        uint32_t dst[2] = {1, 2};
        uint64_t n = 7;
        assert_int_equal(kvx_recv_landed(rx, "part", &n), TD_ENOENT);
        assert_int_equal(kvx_recv_register(rx, "part", dst, 2, 0), 0);
        assert_int_equal(kvx_recv_landed(rx, "part", &n), 0);
        assert_int_equal(n, 0);
        assert_int_equal(kvx_recv_landed(tx, "part", &n), TD_EINVAL);
        assert_int_equal(kvx_recv_landed(rx, "part", NULL), TD_EINVAL);
        assert_int_equal(kvx_send_begin(tx, peer, "part", 0), 0);
        /* One block of layer 0's two: it lands, the layer is not whole. */
        assert_int_equal(kvx_send_layer(tx, "part", 0, pairs, 1), 0);
        wait_landed(rx, "part", 1);
        kvx_event e;
        assert_int_equal(kvx_ep_poll(rx, &e, 1), 0);
        assert_int_equal(kvx_send_layer(tx, "part", 0, pairs + 1, 1), 0);
        wait_landed(rx, "part", 2);
        assert_int_equal(kvx_ep_wait(rx, &e, 1, 3 * SEC), 1);
        assert_int_equal(e.type, KVX_EV_LAYER_LANDED);
        assert_int_equal(e.layer, 0);
        assert_int_equal(kvx_send_layer(tx, "part", 1, pairs, 2), 0);
        assert_int_equal(wait_final(rx, "part", 3 * SEC, NULL).type, KVX_EV_DONE);
        /* Whole and reported: no longer open. */
        assert_int_equal(kvx_recv_landed(rx, "part", &n), TD_ENOENT);
        assert_int_equal(wait_final(tx, "part", 3 * SEC, NULL).type, KVX_EV_DONE);
        kvx_ep_destroy(tx);
        kvx_ep_destroy(rx);
    }
}

/* Registration rules and sender-side validation. */
static void test_register_and_post_rules(void **s)
{
    kv_layout l = small_layout(2, 16);
    char bound[128];
    kvx_ep *rx = mk_rx("tcp", l, bound, sizeof(bound));
    uint32_t a[3] = {1, 2, 3}, dup[2] = {4, 4}, oob[1] = {16}, overlap[2] = {3, 9};
    assert_int_equal(kvx_recv_register(rx, "a", a, 3, 0), 0);
    assert_int_equal(kvx_recv_register(rx, "a", overlap + 1, 1, 0), TD_EEXIST);
    assert_int_equal(kvx_recv_register(rx, "b", dup, 2, 0), TD_EINVAL);
    assert_int_equal(kvx_recv_register(rx, "b", oob, 1, 0), TD_EINVAL);
    assert_int_equal(kvx_recv_register(rx, "b", overlap, 2, 0), TD_EEXIST);
    assert_int_equal(kvx_recv_register(rx, "", a, 1, 0), TD_EINVAL);
    assert_int_equal(kvx_recv_register(rx, "b", overlap + 1, 1, 0), 0);
    assert_int_equal(kvx_cancel(rx, "nope"), TD_ENOENT);

    kvx_ep *tx = mk_ep("tcp", KVX_ROLE_SEND, l, FP);
    int peer;
    assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer + 5, "a", 0), TD_ENOENT);
    /* Not registered on the receiver: fails. */
    assert_int_equal(kvx_send_begin(tx, peer, "ghost", 0), 0);
    assert_int_equal(wait_final(tx, "ghost", 3 * SEC, NULL).err, TD_ENOENT);
    assert_int_equal(kvx_send_begin(tx, peer, "a", 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "a", 0), TD_EEXIST);
    kvx_pair bad_src = {16, 1}, bad_dst = {0, 99}, not_reg = {0, 9};
    assert_int_equal(kvx_send_layer(tx, "a", 0, &bad_src, 1), TD_EINVAL);
    assert_int_equal(kvx_send_layer(tx, "a", 0, &bad_dst, 1), TD_EINVAL);
    assert_int_equal(kvx_send_layer(tx, "a", 2, &not_reg, 1), TD_EINVAL);
    assert_int_equal(kvx_send_layer(tx, "zzz", 0, &not_reg, 1), TD_ENOENT);
    /* Block 9 belongs to "b", not "a": the sender refuses after the ack. */
    assert_int_equal(kvx_send_layer(tx, "a", 0, &not_reg, 1), 0);
    kvx_event e = wait_final(tx, "a", 3 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(e.err, TD_EINVAL);
    assert_int_equal(wait_final(rx, "a", 3 * SEC, NULL).type, KVX_EV_FAILED);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

/* kvx_recv_register_batch / kvx_send_begin_batch: each entry is decided on
 * its own, in order, as the single call would decide it at that point (an
 * id or block named by an earlier entry is taken); the accepted requests
 * then transfer byte-exact. */
static void batch_open(const char *transport)
{
    kv_layout l = small_layout(3, 16);
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 11, &rx, &tx);

    uint32_t a[3] = {1, 2, 3}, dup[2] = {4, 4}, oob[1] = {16}, taken[2] = {5, 3}, e[2] = {9, 7};
    kvx_recv_reg regs[] = {
        {"a", a, 3, 0},     /* 0: registered */
        {"a", e, 2, 0},     /* 1: id taken by entry 0 */
        {"b", dup, 2, 0},   /* 2: block twice */
        {"c", oob, 1, 0},   /* 3: block beyond the pool */
        {"d", taken, 2, 0}, /* 4: block 3 leased by entry 0 */
        {"", a, 1, 0},      /* 5: empty id */
        {"f", NULL, 1, 0},  /* 6: no blocks */
        {"e", e, 2, 0},     /* 7: registered */
    };
    int rcs[8];
    assert_int_equal(kvx_recv_register_batch(rx, regs, 8, rcs), 2);
    int want[8] = {0, TD_EEXIST, TD_EINVAL, TD_EINVAL, TD_EEXIST, TD_EINVAL, TD_EINVAL, 0};
    for (int i = 0; i < 8; i++)
        assert_int_equal(rcs[i], want[i]);
    /* Entry 4's block 5 went back: it registers now. */
    assert_int_equal(kvx_recv_register(rx, "g", taken, 1, 0), 0);
    /* Calls that look at no entry. */
    assert_int_equal(kvx_recv_register_batch(rx, regs, 0, rcs), TD_EINVAL);
    assert_int_equal(kvx_recv_register_batch(rx, regs, 1, NULL), TD_EINVAL);
    assert_int_equal(kvx_recv_register_batch(tx, regs, 1, rcs), TD_EINVAL);
    assert_int_equal(kvx_recv_register_batch(rx, regs + 5, 2, rcs), 0); /* both refused */

    kvx_begin begins[] = {
        {peer, "a", 0},     /* 0: opened */
        {peer + 5, "x", 0}, /* 1: no such peer */
        {peer, "a", 0},     /* 2: opened by entry 0 */
        {peer, "ghost", 0}, /* 3: opened; the receiver does not know it */
        {peer, "", 0},      /* 4: empty id */
        {peer, "e", 0},     /* 5: opened */
    };
    assert_int_equal(kvx_send_begin_batch(tx, begins, 6, rcs), 3);
    int want_b[6] = {0, TD_ENOENT, TD_EEXIST, 0, TD_EINVAL, 0};
    for (int i = 0; i < 6; i++)
        assert_int_equal(rcs[i], want_b[i]);
    assert_int_equal(kvx_send_begin_batch(rx, begins, 1, rcs), TD_EINVAL);
    assert_int_equal(wait_final(tx, "ghost", 3 * SEC, NULL).err, TD_ENOENT);

    kvx_pair pa[3] = {{0, 1}, {6, 2}, {15, 3}}, pe[2] = {{2, 9}, {3, 7}};
    send_all_layers(tx, "a", &l, pa, 3);
    send_all_layers(tx, "e", &l, pe, 2);
    const char *ids[2] = {"a", "e"};
    for (int i = 0; i < 2; i++) {
        assert_int_equal(wait_final(rx, ids[i], 10 * SEC, NULL).type, KVX_EV_DONE);
        assert_int_equal(wait_final(tx, ids[i], 10 * SEC, NULL).type, KVX_EV_DONE);
    }
    verify(tx, rx, &l, &l, pa, 3);
    verify(tx, rx, &l, &l, pe, 2);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
    n_stash = 0;
}

/* A batch opened toward a receiver that just went away: each entry is
 * either refused (TD_ECONNRESET or TD_ENOENT: the caller owns nothing, and
 * no event ever names it) or opened and then ended by the peer's loss with
 * one FAILED event. (Here the sender's idle progress thread has always seen
 * the loss first, so every entry is refused at the peer lookup; a BEGIN
 * write that fails inside the call: test_begin_write_fails.) Once the
 * sender has reported the loss, every entry is refused. */
static void begin_to_gone_peer(const char *transport)
{
    kv_layout l = small_layout(2, 8);
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 5, &rx, &tx);
    kvx_ep_destroy(rx);
    kvx_begin b[3] = {{peer, "g0", 0}, {peer, "g1", 0}, {peer, "g2", 0}};
    int rcs[3];
    int opened = kvx_send_begin_batch(tx, b, 3, rcs);
    assert_true(opened >= 0 && opened <= 3);
    int want_failed[3], n_open = 0;
    for (int i = 0; i < 3; i++) {
        assert_true(rcs[i] == 0 || rcs[i] == TD_ECONNRESET || rcs[i] == TD_ENOENT);
        want_failed[i] = rcs[i] == 0;
        n_open += rcs[i] == 0;
    }
    assert_int_equal(n_open, opened);
    int failed[3] = {0}, peer_errors = 0;
    int64_t end = td_now_ns() + 3 * SEC;
    while (td_now_ns() < end && (peer_errors == 0 || failed[0] + failed[1] + failed[2] < n_open)) {
        kvx_event e;
        if (kvx_ep_wait(tx, &e, 1, 50 * TD_NS_PER_MS) != 1) continue;
        if (e.type == KVX_EV_PEER_ERROR) {
            peer_errors++;
            continue;
        }
        assert_true(e.req_id[0] == 'g' && e.req_id[1] >= '0' && e.req_id[1] <= '2');
        int i = e.req_id[1] - '0';
        assert_true(want_failed[i]); /* a refused entry never shows up */
        assert_int_equal(e.type, KVX_EV_FAILED);
        failed[i]++;
    }
    assert_true(peer_errors >= 1);
    for (int i = 0; i < 3; i++)
        assert_int_equal(failed[i], want_failed[i]);
    /* Known gone now. */
    kvx_begin again[2] = {{peer, "h0", 0}, {peer, "h1", 0}};
    assert_int_equal(kvx_send_begin_batch(tx, again, 2, rcs), 0);
    for (int i = 0; i < 2; i++)
        assert_true(rcs[i] == TD_ECONNRESET || rcs[i] == TD_ENOENT);
    kvx_event e;
    assert_int_equal(kvx_ep_wait(tx, &e, 1, 200 * TD_NS_PER_MS), 0);
    kvx_ep_destroy(tx);
}

static void test_begin_to_gone_peer(void **s)
{
    begin_to_gone_peer("tcp");
    begin_to_gone_peer("shm");
}

static void test_tcp_batch_open(void **s)
{
    batch_open("tcp");
}
static void test_shm_batch_open(void **s)
{
    batch_open("shm");
}

/* Calls made while the sender has a long run of posts to send: open a second
 * request and cancel the first right after its 64 layers were posted. The
 * cancel may end the first before every layer landed (ECANCELED on both
 * ends) or after (DONE on the receiver, exact bytes; the cancel may find it
 * gone); the second completes byte-exact either way, and every block is
 * free again. */
static void calls_during_copies(const char *transport)
{
    kv_layout l = small_layout(64, 256); /* 128 MiB: 64 MiB per request */
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 13, &rx, &tx);
    enum { N = 128 };
    static kvx_pair pa[N], pb[N];
    static uint32_t da[N], db[N];
    for (int i = 0; i < N; i++) {
        pa[i] = (kvx_pair){.src = (uint32_t)i, .dst = da[i] = (uint32_t)(N + i)};
        pb[i] = (kvx_pair){.src = (uint32_t)(N + i), .dst = db[i] = (uint32_t)i};
    }
    assert_int_equal(kvx_recv_register(rx, "long", da, N, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "long", 0), 0);
    /* Every layer in one call: the progress thread takes them in one pass. */
    static kvx_layer_post posts[64];
    for (int k = 0; k < 64; k++)
        posts[k] = (kvx_layer_post){.req_id = "long", .layer = k, .pairs = pa, .n = N};
    assert_int_equal(kvx_send_layers(tx, posts, 64), 0);
    /* While "long" copies: */
    assert_int_equal(kvx_recv_register(rx, "next", db, N, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "next", 0), 0);
    /* TD_ENOENT: "long" had already ended on both sides. */
    int crc = kvx_cancel(tx, "long");
    assert_true(crc == 0 || crc == TD_ENOENT);
    send_all_layers(tx, "next", &l, pb, N);

    kvx_event er = wait_final(rx, "long", 10 * SEC, NULL);
    kvx_event es = wait_final(tx, "long", 10 * SEC, NULL);
    if (er.type == KVX_EV_FAILED) {
        assert_int_equal(er.err, TD_ECANCELED);
        assert_int_equal(es.type, KVX_EV_FAILED);
        assert_int_equal(es.err, TD_ECANCELED);
    } else {
        /* Every layer had landed when the cancel came: the sender may have
         * ended it before the receiver's DONE reached it. */
        assert_int_equal(er.type, KVX_EV_DONE);
        assert_true(es.type == KVX_EV_DONE || (crc == 0 && es.err == TD_ECANCELED));
        verify(tx, rx, &l, &l, pa, N);
    }
    assert_int_equal(wait_final(rx, "next", 10 * SEC, NULL).type, KVX_EV_DONE);
    assert_int_equal(wait_final(tx, "next", 10 * SEC, NULL).type, KVX_EV_DONE);
    verify(tx, rx, &l, &l, pb, N);
    /* Both leases ended: all 256 blocks register again. */
    static uint32_t all[2 * N];
    for (int i = 0; i < 2 * N; i++)
        all[i] = (uint32_t)i;
    assert_int_equal(kvx_recv_register(rx, "all", all, 2 * N, 0), 0);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
    n_stash = 0;
}

static void test_tcp_calls_during_copies(void **s)
{
    calls_during_copies("tcp");
}
static void test_shm_calls_during_copies(void **s)
{
    calls_during_copies("shm");
}

static void test_params_and_gpu_fallback(void **s)
{
    kv_layout l = small_layout(2, 16);
    kvx_params p = {.transport = "carrier-pigeon", .role = KVX_ROLE_RECV, .layout = l};
    kvx_ep *ep = NULL;
    assert_int_equal(kvx_ep_create(&p, &ep), TD_EUNSUPPORTED);
    p.transport = "tcp";
    p.layout.num_blocks = 0;
    assert_int_equal(kvx_ep_create(&p, &ep), TD_EINVAL);
    p.layout = l;
    char buf[1];
    p.transport = "shm";
    p.pool = buf; /* a shm receiver must own a shareable pool */
    assert_int_equal(kvx_ep_create(&p, &ep), TD_EINVAL);
    assert_true(kvx_transport_available("tcp", NULL, 0));
    assert_true(kvx_transport_available("shm", NULL, 0));
    /* GPU transports: available only with a device; otherwise creating one
     * fails with a clear error and the CPU transports still work. */
    const char *gpu[] = {"cuda_ipc", "nccl"};
    for (int i = 0; i < 2; i++) {
        char why[160];
        if (!kvx_transport_available(gpu[i], why, sizeof(why))) {
            print_message("%s unavailable here: %s\n", gpu[i], why);
            assert_true(why[0] != 0);
            kvx_params g = {.transport = gpu[i], .role = KVX_ROLE_RECV, .layout = l};
            int rc = kvx_ep_create(&g, &ep);
            assert_true(rc == TD_ENODEV || rc == TD_EUNSUPPORTED);
        }
    }
}

/* ---------- kvx_send_layers: batched posts ---------- */

/* Per request id: what each side reported. */
typedef struct ev_tally {
    int finals, done, failed, err, layers, rejected;
} ev_tally;

/* Drains ep's events into tally[] (index from "<prefix><r>" ids); returns the
 * number of events seen. */
static int tally_events(kvx_ep *ep, const char *prefix, ev_tally *tally, int nreq)
{
    kvx_event evs[64];
    int n, total = 0;
    size_t pl = strlen(prefix);
    while ((n = kvx_ep_poll(ep, evs, 64)) > 0) {
        for (int i = 0; i < n; i++) {
            total++;
            if (evs[i].type == KVX_EV_PEER_ERROR || strncmp(evs[i].req_id, prefix, pl) != 0)
                continue;
            int r = atoi(evs[i].req_id + pl);
            assert_true(r >= 0 && r < nreq);
            ev_tally *t = &tally[r];
            switch (evs[i].type) {
            case KVX_EV_DONE:
                t->finals++;
                t->done++;
                break;
            case KVX_EV_FAILED:
                t->finals++;
                t->failed++;
                t->err = evs[i].err;
                break;
            case KVX_EV_POST_REJECTED:
                assert_int_equal(evs[i].err, TD_ENOENT);
                t->rejected++;
                break;
            default:
                t->layers++;
                break;
            }
        }
    }
    return total;
}

static int all_final(const ev_tally *t, const int *expect, int nreq)
{
    for (int r = 0; r < nreq; r++)
        if (expect[r] && t[r].finals == 0) return 0;
    return 1;
}

/* Many requests' layers posted one batch per layer (what a prefill worker
 * does from its per-layer hook), some requests canceled from either side in
 * the middle: every request ends exactly once on each side, the others land
 * whole and byte-exact, each layer once. */
static void batched(const char *transport)
{
    enum { NREQ = 48, NB = 3, NL = 6 };
    kv_layout l = small_layout(NL, NREQ * NB);
    kvx_ep *rx, *tx;
    int peer = mk_pair(transport, l, 21, &rx, &tx);
    static kvx_pair pairs[NREQ][NB];
    char id[NREQ][16];
    int canceled[NREQ], expect[NREQ];
    for (int r = 0; r < NREQ; r++) {
        uint32_t dst[NB];
        for (int i = 0; i < NB; i++) {
            pairs[r][i].dst = dst[i] = (uint32_t)((i * NREQ + r * 5) % (NREQ * NB));
            pairs[r][i].src = (uint32_t)((r * NB + i * 7) % (NREQ * NB));
        }
        snprintf(id[r], sizeof(id[r]), "b%d", r);
        assert_int_equal(kvx_recv_register(rx, id[r], dst, NB, 0), 0);
        assert_int_equal(kvx_send_begin(tx, peer, id[r], 0), 0);
        canceled[r] = r % 6 == 1 ? 1 : r % 6 == 4 ? 2 : 0; /* 1: receiver, 2: sender */
        expect[r] = 1;
    }
    kvx_layer_post posts[NREQ];
    for (int layer = 0; layer < NL; layer++) {
        for (int r = 0; r < NREQ; r++)
            posts[r] =
                (kvx_layer_post){.req_id = id[r], .layer = layer, .pairs = pairs[r], .n = NB};
        assert_int_equal(kvx_send_layers(tx, posts, NREQ), 0);
        if (layer == 2)
            for (int r = 0; r < NREQ; r++)
                if (canceled[r]) assert_int_equal(kvx_cancel(canceled[r] == 1 ? rx : tx, id[r]), 0);
    }
    static ev_tally trx[NREQ], ttx[NREQ];
    memset(trx, 0, sizeof(trx));
    memset(ttx, 0, sizeof(ttx));
    int64_t end = td_now_ns() + 20 * SEC;
    while (!(all_final(trx, expect, NREQ) && all_final(ttx, expect, NREQ)) && td_now_ns() < end) {
        tally_events(rx, "b", trx, NREQ);
        tally_events(tx, "b", ttx, NREQ);
        usleep(2000);
    }
    /* Anything late would be a second final event. */
    usleep(100 * 1000);
    tally_events(rx, "b", trx, NREQ);
    tally_events(tx, "b", ttx, NREQ);
    size_t bb = kv_layout_block_bytes(&l);
    int n_done = 0;
    for (int r = 0; r < NREQ; r++) {
        assert_int_equal(trx[r].finals, 1);
        assert_int_equal(ttx[r].finals, 1);
        if (canceled[r]) {
            assert_int_equal(trx[r].failed, 1);
            assert_int_equal(ttx[r].failed, 1);
            assert_int_equal(trx[r].err, TD_ECANCELED);
            assert_int_equal(ttx[r].err, TD_ECANCELED);
            assert_true(trx[r].layers <= NL && ttx[r].layers <= NL);
            /* A local cancel runs after the posts made before it (a
             * command drains the ring first), so at most the later posts
             * are rejected; a receiver's CANCEL can overtake posts still in
             * the ring, which are then rejected too. */
            assert_true(ttx[r].rejected <= (canceled[r] == 2 ? NL - 3 : NL));
        } else {
            assert_int_equal(trx[r].done, 1);
            assert_int_equal(ttx[r].done, 1);
            assert_int_equal(trx[r].layers, NL); /* LAYER_LANDED once per layer */
            assert_int_equal(ttx[r].layers, NL); /* LAYER_SENT once per post */
            assert_int_equal(ttx[r].rejected, 0);
            verify(tx, rx, &l, &l, pairs[r], NB);
            n_done++;
        }
    }
    kvx_stats st;
    kvx_ep_stats(rx, &st);
    assert_int_equal(st.requests_done, (uint64_t)n_done);
    assert_true(st.bytes_received >= (uint64_t)n_done * NB * NL * bb);
    assert_true(st.bytes_received <= (uint64_t)NREQ * NB * NL * bb);
    kvx_ep_stats(tx, &st);
    assert_int_equal(st.posts_refused, 0);
    assert_int_equal(st.requests_done, (uint64_t)n_done);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

static void test_tcp_batched_posts(void **s)
{
    batched("tcp");
}
static void test_shm_batched_posts(void **s)
{
    batched("shm");
}

/* Waits for a POST_REJECTED of id on tx. */
static kvx_event wait_rejected(kvx_ep *tx, const char *id)
{
    kvx_event e;
    memset(&e, 0, sizeof(e));
    int64_t end = td_now_ns() + 3 * SEC;
    while (td_now_ns() < end)
        if (kvx_ep_wait(tx, &e, 1, 20 * TD_NS_PER_MS) == 1 && e.type == KVX_EV_POST_REJECTED &&
            !strcmp(e.req_id, id))
            return e;
    e.type = 0;
    return e;
}

/* Posts for ids with no open request, for a failed request, for blocks
 * beyond the receiver's pool, and malformed batches (all or nothing). */
static void test_post_unknown_and_failed(void **s)
{
    kv_layout lt = small_layout(4, 16), lr = small_layout(4, 8);
    char bound[128];
    kvx_ep *rx = mk_rx("tcp", lr, bound, sizeof(bound));
    kvx_ep *tx = mk_ep("tcp", KVX_ROLE_SEND, lt, FP);
    fill_random(kvx_ep_pool(tx), kv_layout_pool_bytes(&lt), 3);
    int peer;
    assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
    kvx_pair pr[2] = {{5, 1}, {6, 2}};
    uint32_t dst[2] = {1, 2};

    /* Never begun: reported for that post, and it ends nothing. */
    kvx_layer_post p = {.req_id = "never", .layer = 1, .pairs = pr, .n = 2};
    assert_int_equal(kvx_send_layers(tx, &p, 1), 0);
    kvx_event e = wait_rejected(tx, "never");
    assert_int_equal(e.type, KVX_EV_POST_REJECTED);
    assert_int_equal(e.layer, 1);
    assert_int_equal(e.err, TD_ENOENT);

    /* Failed (the receiver never registered it): one FAILED, then posts are
     * rejected one by one, with no second final event. */
    assert_int_equal(kvx_send_begin(tx, peer, "ghost", 0), 0);
    e = wait_final(tx, "ghost", 3 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(e.err, TD_ENOENT);
    p.req_id = "ghost";
    assert_int_equal(kvx_send_layers(tx, &p, 1), 0);
    assert_int_equal(wait_rejected(tx, "ghost").type, KVX_EV_POST_REJECTED);

    /* A block beyond the receiver's pool (8 blocks; the sender has 16): the
     * request fails on both sides, once. */
    assert_int_equal(kvx_recv_register(rx, "far", dst, 2, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "far", 0), 0);
    kvx_pair beyond[2] = {{5, 1}, {6, 12}};
    p = (kvx_layer_post){.req_id = "far", .layer = 0, .pairs = beyond, .n = 2};
    assert_int_equal(kvx_send_layers(tx, &p, 1), 0);
    e = wait_final(tx, "far", 3 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(e.err, TD_EINVAL);
    e = wait_final(rx, "far", 3 * SEC, NULL);
    assert_int_equal(e.type, KVX_EV_FAILED);

    /* Malformed batches post nothing, not even their good posts: "ok" later
     * gets every layer exactly once (a second copy of layer 0 would fail it
     * with TD_EPROTO, block sent twice). */
    assert_int_equal(kvx_recv_register(rx, "ok", dst, 2, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "ok", 0), 0);
    kvx_pair bad_src[1] = {{16, 1}};
    kvx_layer_post bad[2] = {{.req_id = "ok", .layer = 0, .pairs = pr, .n = 2}};
    bad[1] = (kvx_layer_post){.req_id = "ok", .layer = 4, .pairs = pr, .n = 2};
    assert_int_equal(kvx_send_layers(tx, bad, 2), TD_EINVAL);
    bad[1] = (kvx_layer_post){.req_id = "ok", .layer = 1, .pairs = bad_src, .n = 1};
    assert_int_equal(kvx_send_layers(tx, bad, 2), TD_EINVAL);
    bad[1] = (kvx_layer_post){.req_id = "ok", .layer = 1, .pairs = pr, .n = 0};
    assert_int_equal(kvx_send_layers(tx, bad, 2), TD_EINVAL);
    bad[1] = (kvx_layer_post){.req_id = NULL, .layer = 1, .pairs = pr, .n = 2};
    assert_int_equal(kvx_send_layers(tx, bad, 2), TD_EINVAL);
    bad[1] = (kvx_layer_post){.req_id = "", .layer = 1, .pairs = pr, .n = 2};
    assert_int_equal(kvx_send_layers(tx, bad, 2), TD_EINVAL);
    bad[1] = (kvx_layer_post){.req_id = "ok", .layer = 1, .pairs = NULL, .n = 2};
    assert_int_equal(kvx_send_layers(tx, bad, 2), TD_EINVAL);
    assert_int_equal(kvx_send_layers(tx, bad, 0), TD_EINVAL);
    assert_int_equal(kvx_send_layers(rx, bad, 1), TD_EINVAL); /* not a sender */
    kvx_layer_post all[4];
    for (int layer = 0; layer < 4; layer++)
        all[layer] = (kvx_layer_post){.req_id = "ok", .layer = layer, .pairs = pr, .n = 2};
    assert_int_equal(kvx_send_layers(tx, all, 4), 0);
    int layers = 0;
    assert_int_equal(wait_final(rx, "ok", 3 * SEC, &layers).type, KVX_EV_DONE);
    assert_int_equal(layers, 4);
    assert_int_equal(wait_final(tx, "ok", 3 * SEC, NULL).type, KVX_EV_DONE);
    verify(tx, rx, &lt, &lr, pr, 2);

    /* Nothing further: no second final event for any of them. */
    usleep(100 * 1000);
    kvx_event evs[16];
    int n = kvx_ep_poll(tx, evs, 16);
    for (int i = 0; i < n; i++)
        assert_true(evs[i].type != KVX_EV_DONE && evs[i].type != KVX_EV_FAILED);
    n = kvx_ep_poll(rx, evs, 16);
    for (int i = 0; i < n; i++)
        assert_true(evs[i].type != KVX_EV_DONE && evs[i].type != KVX_EV_FAILED);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

/* A hand-made shm receiver: answers the handshake with a memfd pool, then
 * the test reads the sender's control stream itself (BEGIN, one POST per
 * post) and decides when to send BEGIN_ACK. */
typedef struct fake_rx {
    int lfd, cfd, memfd;
    kv_layout l;
} fake_rx;

static void *fake_rx_handshake(void *arg)
{
    fake_rx *f = arg;
    f->cfd = accept(f->lfd, NULL, NULL);
    if (f->cfd < 0) return NULL;
    kvx_wire_hdr h;
    kvx_wire_hello hello;
    if (recv(f->cfd, &h, sizeof(h), MSG_WAITALL) != (ssize_t)sizeof(h) ||
        recv(f->cfd, &hello, sizeof(hello), MSG_WAITALL) != (ssize_t)sizeof(hello))
        return NULL;
    uint64_t bytes = kv_layout_pool_bytes(&f->l);
    hello.token = 1;
    memcpy(hello.extra, &bytes, sizeof(bytes));
    hello.extra_len = sizeof(bytes);
    uint8_t buf[sizeof(h) + sizeof(hello)];
    h.type = KVX_MSG_HELLO_ACK;
    h.len = sizeof(hello);
    memcpy(buf, &h, sizeof(h));
    memcpy(buf + sizeof(h), &hello, sizeof(hello));
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
    union {
        struct cmsghdr c;
        char b[CMSG_SPACE(sizeof(int))];
    } cm;
    memset(&cm, 0, sizeof(cm));
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof(cm.b)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &f->memfd, sizeof(int));
    if (sendmsg(f->cfd, &mh, MSG_NOSIGNAL) != (ssize_t)sizeof(buf)) return NULL;
    return f;
}

/* Next non-heartbeat message within timeout_ms: its type, body into body
 * (up to cap bytes), or -1 on timeout. */
static int fake_next(int fd, void *body, size_t cap, int timeout_ms)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, timeout_ms) <= 0) return -1;
        kvx_wire_hdr h;
        raw_read(fd, &h, sizeof(h));
        assert_true(h.len <= cap);
        if (h.len) raw_read(fd, body, h.len);
        if (h.type != KVX_MSG_HEARTBEAT) return h.type;
    }
}

/* A sender (stall timeout 20 s, post ring of post_ring_bytes, 0: the
 * default) connected to a hand-made receiver listening on a fresh path
 * (written to path): the handshake is done when it returns. fake_rx_close
 * closes the receiver's descriptors and removes the path. */
static kvx_ep *fake_rx_pair(fake_rx *f, char *path, size_t pathlen, size_t post_ring_bytes,
                            int *peer)
{
    addr_for("shm", path, pathlen);
    struct sockaddr_un su = {.sun_family = AF_UNIX};
    snprintf(su.sun_path, sizeof(su.sun_path), "%s", path);
    f->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    unlink(path);
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&su, sizeof(su)), 0);
    assert_int_equal(listen(f->lfd, 4), 0);
    f->memfd = memfd_create("fake-rx-pool", 0);
    assert_true(f->memfd >= 0);
    assert_int_equal(ftruncate(f->memfd, (off_t)kv_layout_pool_bytes(&f->l)), 0);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, fake_rx_handshake, f), 0);
    kvx_params pp = {.transport = "shm",
                     .role = KVX_ROLE_SEND,
                     .model_fingerprint = FP,
                     .layout = f->l,
                     .stall_timeout_ns = 20 * SEC,
                     .post_ring_bytes = post_ring_bytes};
    kvx_ep *tx = NULL;
    assert_int_equal(kvx_ep_create(&pp, &tx), 0);
    assert_int_equal(kvx_connect(tx, path, peer, NULL, 0), 0);
    void *ok;
    pthread_join(th, &ok);
    assert_non_null(ok);
    return tx;
}

static void fake_rx_close(fake_rx *f, const char *path)
{
    close(f->cfd);
    close(f->lfd);
    close(f->memfd);
    unlink(path);
}

/* The post ring full: TD_EAGAIN and nothing of the refused batch is posted
 * (the receiver sees exactly the accepted posts); room comes back as posts
 * leave; a batch larger than half the ring is TD_ERANGE. */
static void test_post_ring_full(void **s)
{
    enum { NL = 4 };
    fake_rx f = {.l = small_layout(NL, 8), .cfd = -1};
    char path[100];
    int peer;
    kvx_ep *tx = fake_rx_pair(&f, path, sizeof(path), 8192, &peer);
    struct timeval tv = {.tv_sec = 3};
    setsockopt(f.cfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));

    static uint8_t body[1 << 16];
    assert_int_equal(kvx_send_begin(tx, peer, "ring", 0), 0);
    assert_int_equal(fake_next(f.cfd, body, sizeof(body), 3000), KVX_MSG_BEGIN);

    /* No BEGIN_ACK yet: every post waits in the ring. */
    int accepted = 0, rc;
    kvx_pair pr[1];
    for (;;) {
        pr[0] = (kvx_pair){.src = (uint32_t)(accepted % 8), .dst = (uint32_t)(accepted % 4)};
        kvx_layer_post p = {.req_id = "ring", .layer = accepted % NL, .pairs = pr, .n = 1};
        rc = kvx_send_layers(tx, &p, 1);
        if (rc != 0 || accepted > 1000) break;
        accepted++;
    }
    assert_int_equal(rc, TD_EAGAIN);
    print_message("8 KiB post ring: %d one-pair posts before TD_EAGAIN\n", accepted);
    assert_true(accepted >= 8192 / (KVX_POST_HDR_BYTES + 8) - 1 && accepted <= 8192 / 64);
    /* A two-post batch is refused whole. */
    kvx_pair pr2[2][1] = {{{0, 0}}, {{1, 1}}};
    kvx_layer_post two[2] = {{.req_id = "ring", .layer = 0, .pairs = pr2[0], .n = 1},
                             {.req_id = "ring", .layer = 1, .pairs = pr2[1], .n = 1}};
    assert_int_equal(kvx_send_layers(tx, two, 2), TD_EAGAIN);
    kvx_stats st;
    kvx_ep_stats(tx, &st);
    assert_int_equal(st.posts_refused, 2);
    /* More than half the ring in one call can never fit. */
    static kvx_pair big[600];
    for (int i = 0; i < 600; i++)
        big[i] = (kvx_pair){.src = 0, .dst = 0};
    kvx_layer_post bp = {.req_id = "ring", .layer = 0, .pairs = big, .n = 600};
    assert_int_equal(kvx_send_layers(tx, &bp, 1), TD_ERANGE);

    /* BEGIN_ACK: the waiting posts go out, one POST notice each. */
    struct {
        kvx_wire_req m;
        uint32_t blocks[4];
    } ack = {.m = {.hash = kvx_req_hash("ring"), .n = 4}, .blocks = {0, 1, 2, 3}};
    raw_msg(f.cfd, KVX_MSG_BEGIN_ACK, &ack, sizeof(ack));
    int seen = 0;
    while (seen < accepted) {
        int t = fake_next(f.cfd, body, sizeof(body), 3000);
        assert_int_equal(t, KVX_MSG_POST);
        kvx_wire_req m;
        memcpy(&m, body, sizeof(m));
        assert_int_equal(m.n, 1);
        assert_int_equal(m.layer, (uint32_t)(seen % NL));
        seen++;
    }
    /* Room is back once LAYER_SENT was emitted: the refused batch now goes,
     * and exactly its two posts follow. */
    int sent = 0;
    int64_t end = td_now_ns() + 3 * SEC;
    kvx_event e;
    while (sent < accepted && td_now_ns() < end)
        if (kvx_ep_wait(tx, &e, 1, 20 * TD_NS_PER_MS) == 1)
            sent += e.type == KVX_EV_LAYER_SENT && !strcmp(e.req_id, "ring");
    assert_int_equal(sent, accepted);
    assert_int_equal(kvx_send_layers(tx, two, 2), 0);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(fake_next(f.cfd, body, sizeof(body), 3000), KVX_MSG_POST);
        kvx_wire_req m;
        memcpy(&m, body, sizeof(m));
        assert_int_equal(m.layer, (uint32_t)i);
    }
    assert_int_equal(fake_next(f.cfd, body, sizeof(body), 200), -1);
    assert_int_equal(kvx_cancel(tx, "ring"), 0);
    sent = 0;
    e = wait_final(tx, "ring", 3 * SEC, &sent);
    assert_int_equal(e.type, KVX_EV_FAILED);
    assert_int_equal(sent, 2);
    kvx_ep_destroy(tx);
    fake_rx_close(&f, path);
}

/* A batch whose BEGIN write fails inside the call: the sender's own end of
 * the control connection is shut for writing (found by its peer address, the
 * hand-made receiver's socket path) while its progress thread still knows
 * the peer as alive, so begin_batch_fn's flush is the first write to fail.
 * Every entry is refused with TD_ECONNRESET and no event ever names one; the
 * peer's loss is reported once (KVX_EV_PEER_ERROR); later batches are
 * refused. (A heartbeat due in the microseconds between the shutdown and the
 * call would fail the peer first: the same outcome through begin_one.) */
static void test_begin_write_fails(void **s)
{
    fake_rx f = {.l = small_layout(2, 8), .cfd = -1};
    char path[100];
    int peer;
    kvx_ep *tx = fake_rx_pair(&f, path, sizeof(path), 0, &peer);

    int sfd = -1;
    for (int fd = 3; fd < 4096 && sfd < 0; fd++) {
        struct sockaddr_un a;
        socklen_t len = sizeof(a);
        if (fd == f.lfd || fd == f.cfd) continue;
        if (getpeername(fd, (struct sockaddr *)&a, &len) == 0 && a.sun_family == AF_UNIX &&
            len > offsetof(struct sockaddr_un, sun_path) && !strcmp(a.sun_path, path))
            sfd = fd;
    }
    assert_true(sfd >= 0);
    assert_int_equal(shutdown(sfd, SHUT_WR), 0);

    kvx_begin b[3] = {{peer, "w0", 0}, {peer, "w1", 0}, {peer, "w2", 0}};
    int rcs[3];
    assert_int_equal(kvx_send_begin_batch(tx, b, 3, rcs), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(rcs[i], TD_ECONNRESET);
    int peer_errors = 0;
    kvx_event e;
    int64_t end = td_now_ns() + 500 * TD_NS_PER_MS;
    while (td_now_ns() < end) {
        if (kvx_ep_wait(tx, &e, 1, 50 * TD_NS_PER_MS) != 1) continue;
        assert_int_equal(e.type, KVX_EV_PEER_ERROR); /* never a request's event */
        peer_errors++;
    }
    assert_int_equal(peer_errors, 1);
    kvx_begin again = {peer, "w3", 0};
    assert_int_equal(kvx_send_begin_batch(tx, &again, 1, rcs), 0);
    assert_true(rcs[0] == TD_ECONNRESET || rcs[0] == TD_ENOENT);
    assert_int_equal(kvx_ep_wait(tx, &e, 1, 100 * TD_NS_PER_MS), 0);
    kvx_ep_destroy(tx);
    fake_rx_close(&f, path);
}

/* Allocation failures injected at every point of a round of 40 requests
 * (registration, BEGIN_ACK lists, tcp frames, control buffers, queue growth)
 * while nobody polls: every request either is refused by its call, or ends
 * with exactly one final event on each side where it was opened; an event is
 * never lost, so nothing waits forever. 360 receiver events pile up per round
 * (the queue starts at 256). */
static void test_events_survive_alloc_failure(void **s)
{
    enum { NREQ = 40, NL = 8 };
    kv_layout l = small_layout(NL, NREQ);
    char bound[128];
    kvx_ep *rx = mk_rx("tcp", l, bound, sizeof(bound));
    kvx_ep *tx = mk_ep("tcp", KVX_ROLE_SEND, l, FP);
    fill_random(kvx_ep_pool(tx), kv_layout_pool_bytes(&l), 9);
    int peer = -1;
    long hits = 0;
    int rounds = 0, refused = 0, failed = 0, done = 0;
    for (long k = 0; k < 560; k += 7, rounds++) {
        kvx_stats st;
        kvx_ep_stats(tx, &st);
        if (st.peers == 0) assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
        char id[NREQ][24];
        int open_rx[NREQ], open_tx[NREQ];
        kvx_pair pr[NREQ];
        int64_t dl = td_now_ns() + 5 * SEC;
        fail_alloc_arm(k);
        for (int r = 0; r < NREQ; r++) {
            snprintf(id[r], sizeof(id[r]), "m%ld-%d", k, r);
            pr[r] = (kvx_pair){.src = (uint32_t)r, .dst = (uint32_t)(NREQ - 1 - r)};
            open_rx[r] = kvx_recv_register(rx, id[r], &pr[r].dst, 1, dl) == 0;
            open_tx[r] = open_rx[r] && kvx_send_begin(tx, peer, id[r], dl) == 0;
        }
        for (int layer = 0; layer < NL; layer++) {
            kvx_layer_post posts[NREQ];
            int n = 0;
            for (int r = 0; r < NREQ; r++)
                if (open_tx[r])
                    posts[n++] =
                        (kvx_layer_post){.req_id = id[r], .layer = layer, .pairs = &pr[r], .n = 1};
            if (n) assert_int_equal(kvx_send_layers(tx, posts, n), 0);
        }
        /* Still armed while the progress threads work (BEGIN_ACK lists, tcp
         * frames); the events pile up, nobody polls. */
        usleep(20 * 1000);
        hits += fail_alloc_disarm();
        for (int r = 0; r < NREQ; r++) {
            refused += !open_rx[r] || !open_tx[r];
            if (open_rx[r] && !open_tx[r]) assert_int_equal(kvx_cancel(rx, id[r]), 0);
        }
        char prefix[16];
        snprintf(prefix, sizeof(prefix), "m%ld-", k);
        static ev_tally trx[NREQ], ttx[NREQ];
        memset(trx, 0, sizeof(trx));
        memset(ttx, 0, sizeof(ttx));
        int64_t end = td_now_ns() + 8 * SEC;
        while (!(all_final(trx, open_rx, NREQ) && all_final(ttx, open_tx, NREQ)) &&
               td_now_ns() < end) {
            tally_events(rx, prefix, trx, NREQ);
            tally_events(tx, prefix, ttx, NREQ);
            usleep(2000);
        }
        usleep(20 * 1000);
        tally_events(rx, prefix, trx, NREQ);
        tally_events(tx, prefix, ttx, NREQ);
        for (int r = 0; r < NREQ; r++) {
            assert_int_equal(trx[r].finals, open_rx[r]);
            assert_int_equal(ttx[r].finals, open_tx[r]);
            assert_true(trx[r].layers <= NL && ttx[r].layers <= NL);
            /* Posts reach a request only while it is open: after its FAILED
             * (its peer lost to an allocation failure) they are rejected. */
            if (ttx[r].rejected) assert_int_equal(ttx[r].failed, 1);
            if (trx[r].done) {
                assert_int_equal(trx[r].layers, NL);
                done++;
            }
            failed += trx[r].failed;
        }
    }
    print_message("%d rounds, %ld allocations failed: %d requests refused by their call, %d "
                  "failed, %d done; every opened one ended exactly once on each side\n",
                  rounds, hits, refused, failed, done);
    assert_true(hits > 0);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

/* Several application threads post at once (kvx_send_layers may be called
 * from any thread): each owns 8 requests and posts their layers in batches
 * of its own, some split in two posts per layer. Everything lands once. */
enum { CP_THREADS = 4, CP_REQS = 8, CP_NB = 2, CP_NL = 8 };

struct cp_arg {
    kvx_ep *tx;
    int t;
    char (*id)[16];
    kvx_pair (*pairs)[CP_NB];
    int rc;
};

static void *cp_poster(void *arg)
{
    struct cp_arg *a = arg;
    for (int layer = 0; layer < CP_NL && a->rc == 0; layer++) {
        kvx_layer_post posts[2 * CP_REQS];
        int n = 0;
        for (int k = 0; k < CP_REQS; k++) {
            int r = a->t * CP_REQS + k;
            if (k % 2) { /* this layer in two posts of one block each */
                posts[n++] = (kvx_layer_post){a->id[r], layer, &a->pairs[r][0], 1};
                posts[n++] = (kvx_layer_post){a->id[r], layer, &a->pairs[r][1], 1};
            } else {
                posts[n++] = (kvx_layer_post){a->id[r], layer, a->pairs[r], CP_NB};
            }
        }
        a->rc = kvx_send_layers(a->tx, posts, n);
        if (a->rc == TD_EAGAIN) { /* not expected with the default ring; retry */
            usleep(1000);
            a->rc = 0;
            layer--;
        }
    }
    return NULL;
}

static void test_concurrent_posters(void **s)
{
    enum { NREQ = CP_THREADS * CP_REQS };
    kv_layout l = small_layout(CP_NL, NREQ * CP_NB);
    kvx_ep *rx, *tx;
    int peer = mk_pair("tcp", l, 33, &rx, &tx);
    static char id[NREQ][16];
    static kvx_pair pairs[NREQ][CP_NB];
    int expect[NREQ];
    for (int r = 0; r < NREQ; r++) {
        uint32_t dst[CP_NB];
        for (int i = 0; i < CP_NB; i++) {
            pairs[r][i].dst = dst[i] = (uint32_t)(r * CP_NB + i);
            pairs[r][i].src = (uint32_t)(NREQ * CP_NB - 1 - (r * CP_NB + i));
        }
        snprintf(id[r], sizeof(id[r]), "c%d", r);
        assert_int_equal(kvx_recv_register(rx, id[r], dst, CP_NB, 0), 0);
        assert_int_equal(kvx_send_begin(tx, peer, id[r], 0), 0);
        expect[r] = 1;
    }
    pthread_t th[CP_THREADS];
    struct cp_arg args[CP_THREADS];
    for (int t = 0; t < CP_THREADS; t++) {
        args[t] = (struct cp_arg){.tx = tx, .t = t, .id = id, .pairs = pairs};
        assert_int_equal(pthread_create(&th[t], NULL, cp_poster, &args[t]), 0);
    }
    for (int t = 0; t < CP_THREADS; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(args[t].rc, 0);
    }
    static ev_tally trx[NREQ], ttx[NREQ];
    memset(trx, 0, sizeof(trx));
    memset(ttx, 0, sizeof(ttx));
    int64_t end = td_now_ns() + 20 * SEC;
    while (!(all_final(trx, expect, NREQ) && all_final(ttx, expect, NREQ)) && td_now_ns() < end) {
        tally_events(rx, "c", trx, NREQ);
        tally_events(tx, "c", ttx, NREQ);
        usleep(2000);
    }
    for (int r = 0; r < NREQ; r++) {
        assert_int_equal(trx[r].done, 1);
        assert_int_equal(ttx[r].done, 1);
        assert_int_equal(trx[r].layers, CP_NL);
        /* one LAYER_SENT per post: two per layer for the split ones */
        assert_int_equal(ttx[r].layers, (r % CP_REQS) % 2 ? 2 * CP_NL : CP_NL);
        verify(tx, rx, &l, &l, pairs[r], CP_NB);
    }
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

/* ---------- data connection threads, streaming copies ---------- */

static kvx_ep *mk_ep_conns(const char *transport, enum kvx_role role, kv_layout l, int conns)
{
    kvx_params p = {.transport = transport,
                    .role = role,
                    .model_fingerprint = FP,
                    .layout = l,
                    .n_data_conns = conns,
                    .stall_timeout_ns = 1500 * TD_NS_PER_MS};
    kvx_ep *ep = NULL;
    assert_int_equal(kvx_ep_create(&p, &ep), 0);
    return ep;
}

/* 64 KiB blocks: several frames per sendmsg, partial writes, and shm copies
 * long enough for streaming stores. */
static kv_layout wide_layout(uint32_t n_layers, uint32_t num_blocks)
{
    kv_layout l = {.n_layers = n_layers,
                   .num_blocks = num_blocks,
                   .block_size = 16,
                   .n_kv_heads = 8,
                   .head_dim = 128,
                   .dtype = KV_DTYPE_F16};
    return l;
}

/* Per request: events by layer, and finals. */
typedef struct layer_tally {
    int landed[8];
    int done, failed, other;
} layer_tally;

static void tally_layers(kvx_ep *ep, layer_tally *t, int nreq)
{
    kvx_event evs[64];
    int n;
    while ((n = kvx_ep_poll(ep, evs, 64)) > 0)
        for (int i = 0; i < n; i++) {
            int r = -1;
            if (sscanf(evs[i].req_id, "x%d", &r) != 1 || r < 0 || r >= nreq) continue;
            if (evs[i].type == KVX_EV_LAYER_LANDED || evs[i].type == KVX_EV_LAYER_SENT) {
                assert_true(evs[i].layer >= 0 && evs[i].layer < 8);
                t[r].landed[evs[i].layer]++;
            } else if (evs[i].type == KVX_EV_DONE) {
                t[r].done++;
            } else if (evs[i].type == KVX_EV_FAILED) {
                t[r].failed++;
            } else {
                t[r].other++;
            }
        }
}

/* tcp with 1, 3 and 8 data connections (a writer and a reader thread each):
 * 32 requests posted a layer at a time; every block of every layer lands
 * exactly once (a second copy would fail its request: "sent twice"), each
 * side reports each layer of each request once and one DONE, byte-exact. */
static void test_tcp_conn_threads_exactly_once(void **s)
{
    enum { NREQ = 32, NB = 3, NL = 5 };
    int conns[] = {1, 3, 8};
    for (int c = 0; c < 3; c++) {
        kv_layout l = wide_layout(NL, NREQ * NB);
        char bound[128], a[128];
        kvx_ep *rx = mk_ep_conns("tcp", KVX_ROLE_RECV, l, conns[c]);
        assert_int_equal(kvx_listen(rx, addr_for("tcp", a, sizeof(a)), bound, sizeof(bound)), 0);
        kvx_ep *tx = mk_ep_conns("tcp", KVX_ROLE_SEND, l, conns[c]);
        fill_random(kvx_ep_pool(tx), kv_layout_pool_bytes(&l), 31 + (uint64_t)c);
        memset(kvx_ep_pool(rx), 0, kv_layout_pool_bytes(&l));
        int peer;
        assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
        static kvx_pair pairs[NREQ][NB];
        char id[NREQ][16];
        for (int r = 0; r < NREQ; r++) {
            uint32_t dst[NB];
            for (int i = 0; i < NB; i++) {
                pairs[r][i].dst = dst[i] = (uint32_t)((i * NREQ + r * 3) % (NREQ * NB));
                pairs[r][i].src = (uint32_t)((r * NB + i * 5) % (NREQ * NB));
            }
            snprintf(id[r], sizeof(id[r]), "x%d", r);
            assert_int_equal(kvx_recv_register(rx, id[r], dst, NB, 0), 0);
            assert_int_equal(kvx_send_begin(tx, peer, id[r], 0), 0);
        }
        kvx_layer_post posts[NREQ];
        for (int layer = 0; layer < NL; layer++) {
            for (int r = 0; r < NREQ; r++)
                posts[r] =
                    (kvx_layer_post){.req_id = id[r], .layer = layer, .pairs = pairs[r], .n = NB};
            assert_int_equal(kvx_send_layers(tx, posts, NREQ), 0);
        }
        static layer_tally trx[NREQ], ttx[NREQ];
        memset(trx, 0, sizeof(trx));
        memset(ttx, 0, sizeof(ttx));
        int64_t end = td_now_ns() + 20 * SEC;
        for (;;) {
            tally_layers(rx, trx, NREQ);
            tally_layers(tx, ttx, NREQ);
            int fin = 0;
            for (int r = 0; r < NREQ; r++)
                fin += trx[r].done + trx[r].failed + ttx[r].done + ttx[r].failed;
            if (fin == 2 * NREQ || td_now_ns() > end) break;
            usleep(2000);
        }
        usleep(50 * 1000); /* anything late would be a second event */
        tally_layers(rx, trx, NREQ);
        tally_layers(tx, ttx, NREQ);
        for (int r = 0; r < NREQ; r++) {
            assert_int_equal(trx[r].done, 1);
            assert_int_equal(ttx[r].done, 1);
            assert_int_equal(trx[r].failed + ttx[r].failed + trx[r].other + ttx[r].other, 0);
            for (int layer = 0; layer < NL; layer++) {
                assert_int_equal(trx[r].landed[layer], 1);
                assert_int_equal(ttx[r].landed[layer], 1);
            }
            verify(tx, rx, &l, &l, pairs[r], NB);
        }
        kvx_stats st;
        kvx_ep_stats(rx, &st);
        assert_int_equal(st.bytes_received, (uint64_t)NREQ * NB * NL * kv_layout_block_bytes(&l));
        assert_int_equal(st.frames_rejected, 0);
        kvx_ep_destroy(tx);
        kvx_ep_destroy(rx);
    }
}

/* Receiver-side cancels while 4 reader threads are filling the request's
 * blocks: after the FAILED event (the lease is back) nothing writes those
 * blocks any more, the sender ends the request once, and the blocks register
 * again at once. */
static void test_tcp_cancel_under_reader_threads(void **s)
{
    enum { NB = 16, NL = 8, ROUNDS = 6 };
    kv_layout l = wide_layout(NL, NB);
    char bound[128], a[128];
    kvx_ep *rx = mk_ep_conns("tcp", KVX_ROLE_RECV, l, 4);
    assert_int_equal(kvx_listen(rx, addr_for("tcp", a, sizeof(a)), bound, sizeof(bound)), 0);
    kvx_ep *tx = mk_ep_conns("tcp", KVX_ROLE_SEND, l, 4);
    fill_random(kvx_ep_pool(tx), kv_layout_pool_bytes(&l), 41);
    int peer;
    assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
    size_t pool_bytes = kv_layout_pool_bytes(&l);
    uint8_t *snap = malloc(pool_bytes);
    assert_non_null(snap);
    kvx_pair pairs[NB];
    uint32_t dst[NB];
    for (int i = 0; i < NB; i++) {
        pairs[i].src = (uint32_t)i;
        pairs[i].dst = dst[i] = (uint32_t)(NB - 1 - i);
    }
    for (int round = 0; round < ROUNDS; round++) {
        char id[16];
        snprintf(id, sizeof(id), "x%d", round);
        memset(kvx_ep_pool(rx), 0, pool_bytes);
        assert_int_equal(kvx_recv_register(rx, id, dst, NB, 0), 0);
        assert_int_equal(kvx_send_begin(tx, peer, id, 0), 0);
        kvx_layer_post posts[NL];
        for (int layer = 0; layer < NL; layer++)
            posts[layer] = (kvx_layer_post){.req_id = id, .layer = layer, .pairs = pairs, .n = NB};
        assert_int_equal(kvx_send_layers(tx, posts, NL), 0);
        /* Cancel at a different point of the stream each round. */
        usleep((useconds_t)(round * 300));
        int rc = kvx_cancel(rx, id);
        kvx_event er = wait_final(rx, id, 5 * SEC, NULL);
        if (rc == TD_ENOENT) {
            assert_int_equal(er.type, KVX_EV_DONE); /* it had landed whole first */
        } else {
            assert_int_equal(rc, 0);
            assert_int_equal(er.type, KVX_EV_FAILED);
            assert_int_equal(er.err, TD_ECANCELED);
        }
        memcpy(snap, kvx_ep_pool(rx), pool_bytes);
        kvx_event es = wait_final(tx, id, 5 * SEC, NULL);
        assert_true(es.type == KVX_EV_DONE || es.type == KVX_EV_FAILED);
        usleep(20 * 1000); /* frames still on the wire go to the sink */
        assert_memory_equal(snap, kvx_ep_pool(rx), pool_bytes);
        /* The lease is back: the same blocks register again. */
        assert_int_equal(kvx_recv_register(rx, "again", dst, NB, 0), 0);
        assert_int_equal(kvx_cancel(rx, "again"), 0);
        assert_int_equal(wait_final(rx, "again", 5 * SEC, NULL).type, KVX_EV_FAILED);
    }
    free(snap);
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

/* One side's endpoint goes away while frames stream on 4 connections: every
 * request of the other side ends exactly once with FAILED, its leases come
 * back, and nothing is finished or freed twice (ASan in build-asan). */
static void test_tcp_peer_gone_under_threads(void **s)
{
    enum { NREQ = 8, NB = 4, NL = 8 };
    for (int gone_rx = 0; gone_rx <= 1; gone_rx++) {
        kv_layout l = wide_layout(NL, NREQ * NB);
        char bound[128], a[128];
        kvx_ep *rx = mk_ep_conns("tcp", KVX_ROLE_RECV, l, 4);
        assert_int_equal(kvx_listen(rx, addr_for("tcp", a, sizeof(a)), bound, sizeof(bound)), 0);
        kvx_ep *tx = mk_ep_conns("tcp", KVX_ROLE_SEND, l, 4);
        int peer;
        assert_int_equal(kvx_connect(tx, bound, &peer, NULL, 0), 0);
        static kvx_pair pairs[NREQ][NB];
        static uint32_t dst[NREQ][NB];
        char id[NREQ][16];
        for (int r = 0; r < NREQ; r++) {
            for (int i = 0; i < NB; i++) {
                pairs[r][i].src = (uint32_t)(r * NB + i);
                pairs[r][i].dst = dst[r][i] = (uint32_t)((NREQ - 1 - r) * NB + i);
            }
            snprintf(id[r], sizeof(id[r]), "x%d", r);
            assert_int_equal(kvx_recv_register(rx, id[r], dst[r], NB, 0), 0);
            assert_int_equal(kvx_send_begin(tx, peer, id[r], 0), 0);
        }
        kvx_layer_post posts[NREQ];
        for (int layer = 0; layer < NL; layer++) {
            for (int r = 0; r < NREQ; r++)
                posts[r] =
                    (kvx_layer_post){.req_id = id[r], .layer = layer, .pairs = pairs[r], .n = NB};
            assert_int_equal(kvx_send_layers(tx, posts, NREQ), 0);
            if (layer == 1) {
                /* Going away mid-stream. */
                if (gone_rx) {
                    kvx_ep_destroy(rx);
                    rx = NULL;
                } else {
                    kvx_ep_destroy(tx);
                    tx = NULL;
                    break;
                }
            }
        }
        kvx_ep *left = gone_rx ? tx : rx;
        static layer_tally t[NREQ];
        memset(t, 0, sizeof(t));
        int64_t end = td_now_ns() + 10 * SEC;
        for (;;) {
            tally_layers(left, t, NREQ);
            int fin = 0;
            for (int r = 0; r < NREQ; r++)
                fin += t[r].done + t[r].failed;
            if (fin == NREQ || td_now_ns() > end) break;
            usleep(2000);
        }
        usleep(50 * 1000);
        tally_layers(left, t, NREQ);
        for (int r = 0; r < NREQ; r++) {
            /* A request may have landed whole before the end. */
            assert_int_equal(t[r].done + t[r].failed, 1);
            for (int layer = 0; layer < NL; layer++)
                assert_true(t[r].landed[layer] <= 1);
        }
        if (!gone_rx)
            for (int r = 0; r < NREQ; r++) /* leases back */
                assert_int_equal(kvx_recv_register(rx, "again", dst[r], NB, 0) == 0 &&
                                     kvx_cancel(rx, "again") == 0,
                                 1);
        kvx_ep_destroy(left);
        n_stash = 0;
    }
}

/* shm copies runs of adjacent blocks in one go: runs, broken runs and single
 * blocks land byte-exact, every other block untouched. */
static void test_shm_runs(void **s)
{
    kv_layout l = wide_layout(3, 40);
    kvx_ep *rx, *tx;
    int peer = mk_pair("shm", l, 51, &rx, &tx);
    /* 0..4 -> 10..14 (a run of 5), 5 -> 20 and 6 -> 22 (broken), 7,8 ->
     * 30,31, 9 -> 15 (src follows, dst does not), 12,11 -> 2,3 (dst follows,
     * src goes down), 39 -> 39. */
    kvx_pair pairs[] = {{0, 10}, {1, 11}, {2, 12}, {3, 13}, {4, 14}, {5, 20}, {6, 22},
                        {7, 30}, {8, 31}, {9, 16}, {12, 2}, {11, 3}, {39, 39}};
    int n = (int)(sizeof(pairs) / sizeof(pairs[0]));
    uint32_t dst[16];
    for (int i = 0; i < n; i++)
        dst[i] = pairs[i].dst;
    assert_int_equal(kvx_recv_register(rx, "runs", dst, n, 0), 0);
    assert_int_equal(kvx_send_begin(tx, peer, "runs", 0), 0);
    send_all_layers(tx, "runs", &l, pairs, n);
    assert_int_equal(wait_final(rx, "runs", 10 * SEC, NULL).type, KVX_EV_DONE);
    assert_int_equal(wait_final(tx, "runs", 10 * SEC, NULL).type, KVX_EV_DONE);
    verify(tx, rx, &l, &l, pairs, n);
    size_t bb = kv_layout_block_bytes(&l);
    for (uint32_t layer = 0; layer < l.n_layers; layer++)
        for (uint32_t b = 0; b < l.num_blocks; b++) {
            int listed = 0;
            for (int i = 0; i < n; i++)
                listed |= dst[i] == b;
            if (listed) continue;
            const uint8_t *z = (uint8_t *)kvx_ep_pool(rx) + kv_layout_block_offset(&l, layer, b);
            for (size_t i = 0; i < bb; i += 64)
                assert_int_equal(z[i], 0);
        }
    kvx_ep_destroy(tx);
    kvx_ep_destroy(rx);
}

/* kvx__copy (streaming stores for large runs) and both streaming loops at
 * every length against memcpy: lengths around the threshold, the alignment
 * head and the 64-byte body, misaligned ends, guards untouched. */
static void test_copy_edges(void **s)
{
    size_t lens[] = {0, 1, 15, 31, 64, 95, 65535, 65536, 65536 + 17, 65536 + 63, (1u << 20) + 5};
    size_t d_offs[] = {0, 1, 16, 17, 31};
    size_t cap = (1u << 20) + 256;
    uint8_t *src = malloc(cap), *dst = malloc(cap), *ref = malloc(cap);
    assert_true(src && dst && ref);
    fill_random(src, cap, 61);
    int wide_ok = 0;
#if defined(__x86_64__)
    wide_ok = __builtin_cpu_supports("avx");
#endif
    for (int way = 0; way < 3; way++) { /* kvx__copy, 16-byte, 32-byte stores */
        if (way == 2 && !wide_ok) continue;
        for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++)
            for (size_t so = 0; so < 3; so++)
                for (size_t di = 0; di < sizeof(d_offs) / sizeof(d_offs[0]); di++) {
                    size_t n = lens[li], d_off = d_offs[di];
                    memset(dst, 0xee, cap);
                    memset(ref, 0xee, cap);
                    if (way == 0)
                        kvx__copy(dst + 32 + d_off, src + so, n);
                    else
                        kvx__copy_stream(dst + 32 + d_off, src + so, n, way == 2);
                    memcpy(ref + 32 + d_off, src + so, n);
                    assert_memory_equal(dst, ref, cap);
                }
    }
    free(src);
    free(dst);
    free(ref);
}

int main(void)
{
    /* SIGPIPE keeps its default action: a socket write in kvx without
     * MSG_NOSIGNAL to a peer that went away kills this test, as it would a
     * worker. (The test's own socket writes use MSG_NOSIGNAL too.) */
    if (!getenv("TANDEM_LOG_LEVEL")) td_log_set_level(TD_LOG_ERROR);
    if (getenv("KVX_TEST_FILTER")) cmocka_set_test_filter(getenv("KVX_TEST_FILTER"));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_send_ring_resident),
        cmocka_unit_test(test_recv_landed),
        cmocka_unit_test(test_tcp_basic),
        cmocka_unit_test(test_shm_basic),
        cmocka_unit_test(test_tcp_many_layers),
        cmocka_unit_test(test_shm_many_layers),
        cmocka_unit_test(test_tcp_two_senders),
        cmocka_unit_test(test_shm_two_senders),
        cmocka_unit_test(test_tcp_two_receivers),
        cmocka_unit_test(test_shm_two_receivers),
        cmocka_unit_test(test_tcp_hundred_concurrent),
        cmocka_unit_test(test_shm_hundred_concurrent),
        cmocka_unit_test(test_tcp_1gib),
        cmocka_unit_test(test_shm_1gib),
        cmocka_unit_test(test_handshake_mismatch),
        cmocka_unit_test(test_hello_check_fields),
        cmocka_unit_test(test_bad_frames),
        cmocka_unit_test(test_raw_partial_frames_and_cancel),
        cmocka_unit_test(test_raw_runs),
        cmocka_unit_test(test_last_frame_races_sender_reset),
        cmocka_unit_test(test_tcp_post_rejected),
        cmocka_unit_test(test_fuzz_wire),
        cmocka_unit_test(test_tcp_sender_killed),
        cmocka_unit_test(test_shm_sender_killed),
        cmocka_unit_test(test_tcp_sender_stalled),
        cmocka_unit_test(test_tcp_receiver_killed),
        cmocka_unit_test(test_shm_receiver_killed),
        cmocka_unit_test(test_shm_receiver_stalled),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_partial_deadline),
        cmocka_unit_test(test_register_and_post_rules),
        cmocka_unit_test(test_tcp_batch_open),
        cmocka_unit_test(test_shm_batch_open),
        cmocka_unit_test(test_begin_to_gone_peer),
        cmocka_unit_test(test_begin_write_fails),
        cmocka_unit_test(test_tcp_calls_during_copies),
        cmocka_unit_test(test_shm_calls_during_copies),
        cmocka_unit_test(test_params_and_gpu_fallback),
        cmocka_unit_test(test_tcp_batched_posts),
        cmocka_unit_test(test_shm_batched_posts),
        cmocka_unit_test(test_post_unknown_and_failed),
        cmocka_unit_test(test_post_ring_full),
        cmocka_unit_test(test_events_survive_alloc_failure),
        cmocka_unit_test(test_concurrent_posters),
        cmocka_unit_test(test_tcp_conn_threads_exactly_once),
        cmocka_unit_test(test_tcp_cancel_under_reader_threads),
        cmocka_unit_test(test_tcp_peer_gone_under_threads),
        cmocka_unit_test(test_shm_runs),
        cmocka_unit_test(test_copy_edges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
