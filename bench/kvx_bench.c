/* tandem-kvx-bench: KV block transfer throughput (tcp on loopback, shm) for a
 * 32-layer, 4096-wide f16 KV shape at block sizes of 16 and 64 tokens, each
 * printed beside the limit measured in the same run (a raw socket blast on
 * loopback for tcp; for shm the fastest of memcpy and two streaming-store
 * copies between two buffers of the pool's size, over the same byte count),
 * and the
 * layer-wise overlap:
 * with simulated compute per layer, how much of the transfer is still left
 * after the last layer's compute ends.
 *
 * Posting is done as a prefill worker does it: the pool's blocks are split
 * among a batch of requests, and each layer of the batch is posted by one
 * kvx_send_layers call (the engine's per-layer hook). The time spent inside
 * that call is printed per layer; for bs=16 the same run is repeated posting
 * one kvx_send_layer per request and layer (a round trip each), beside it.
 *
 * Usage: tandem-kvx-bench [--gib X] [--conns N] [--pool-mib M] [--batch B]
 *   --gib      GiB moved per configuration (default 1)
 *   --conns    tcp data connections per peer (default 2)
 *   --pool-mib pool size per side in MiB (default 64)
 *   --batch    requests per prefill batch (default 8; at most one per block)
 *   --rounds   > 1: only the throughput ratios, each kvx point measured
 *              between two measurements of its limit, R rounds; prints the
 *              median and range of each ratio (for shared, noisy hosts)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/clock.h"
#include "common/config.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx.h"

static double g_gib = 1.0;
static int g_conns = 2;
static size_t g_pool_mib = 64;
static int g_batch = 8;
static int g_rounds = 1;
static int g_run_tcp = 1, g_run_shm = 1; /* --transport: which points run */
static int g_pipeline;                   /* --pipeline: two half-pool batches in flight */

static kv_layout bench_layout(uint32_t block_size)
{
    kv_layout l = {.n_layers = 32,
                   .block_size = block_size,
                   .n_kv_heads = 32,
                   .head_dim = 128, /* 32 * 128 = 4096 */
                   .dtype = KV_DTYPE_F16};
    size_t per_block_all_layers = kv_layout_block_bytes(&l) * l.n_layers;
    l.num_blocks = (uint32_t)((g_pool_mib << 20) / per_block_all_layers);
    if (l.num_blocks == 0) l.num_blocks = 1;
    return l;
}

/* CPU seconds this process has used (every thread, user + system). */
static double cpu_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

/* CPU milliseconds per GiB of the last measurement: what moving the bytes
 * cost the host's cores, whatever else ran beside it. */
static double g_cpu_ms_per_gib;

static void note_cpu(double cpu0, size_t bytes)
{
    g_cpu_ms_per_gib = bytes ? (cpu_s() - cpu0) * 1e3 / ((double)bytes / (double)(1ull << 30)) : 0;
}

/* ---------- limits ---------- */

/* The raw blast moves `bytes` in 1 MiB send()s and recv()s. Its buffers are
 * either one 1 MiB buffer per end (span 0: the sender's is calloc'd and never
 * written, so it reads the kernel's shared zero page, and both stay in the
 * cache: the classic loopback figure), or, per stream, `span` bytes written
 * before the clock starts and walked through 1 MiB at a time at both ends,
 * so that the bytes come from memory and go to memory as a pool's blocks do. */
#define BLAST_CHUNK (1u << 20)

/* n bytes of memory of the kind a kvx pool is: anonymous, huge pages where
 * the kernel gives them (a 4 KiB-page buffer costs a raw blast 2x the CPU
 * per byte here, in the kernel's copies), every page faulted in. NULL on
 * failure; munmap to free. */
static uint8_t *pool_like(size_t n)
{
    void *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    (void)madvise(m, n, MADV_HUGEPAGE);
#endif
    memset(m, 0, n);
    return m;
}

struct stream {
    int c, s;
    size_t bytes, span;
    uint8_t *wbuf, *rbuf; /* span bytes each, or BLAST_CHUNK */
    pthread_t reader, writer;
};

static void *blast_reader(void *arg)
{
    struct stream *st = arg;
    pthread_setname_np(pthread_self(), st->span > BLAST_CHUNK ? "mblast-read" : "blast-read");
    size_t got = 0, at = 0;
    while (got < st->bytes) {
        if (at + BLAST_CHUNK > st->span) at = 0;
        ssize_t n = recv(st->s, st->rbuf + at, BLAST_CHUNK, 0);
        if (n <= 0) break;
        got += (size_t)n;
        at += (size_t)n;
    }
    return NULL;
}

static void *blast_writer(void *arg)
{
    struct stream *st = arg;
    pthread_setname_np(pthread_self(), st->span > BLAST_CHUNK ? "mblast-write" : "blast-write");
    size_t sent = 0, at = 0;
    while (sent < st->bytes) {
        if (at + BLAST_CHUNK > st->span) at = 0;
        ssize_t n = send(st->c, st->wbuf + at, BLAST_CHUNK, MSG_NOSIGNAL);
        if (n <= 0) break;
        sent += (size_t)n;
        at += (size_t)n;
    }
    return NULL;
}

/* GB/s of n TCP streams on 127.0.0.1, one thread per end: what TCP on this
 * host can reach with as many streams as kvx uses. span_total 0: cache-
 * resident 1 MiB buffers; else the streams share span_total bytes at each
 * end (the pool's size), written beforehand. */
static double raw_socket_gbps(size_t bytes, int n, size_t span_total)
{
    struct stream st[16];
    memset(st, 0, sizeof(st));
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    socklen_t sl = sizeof(sa);
    if (n > 16 || ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        listen(ls, 16) < 0 || getsockname(ls, (struct sockaddr *)&sa, &sl) < 0)
        return -1;
    double gbps = -1;
    for (int i = 0; i < n; i++)
        st[i].c = st[i].s = -1;
    for (int i = 0; i < n; i++) {
        st[i].c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(st[i].c, (struct sockaddr *)&sa, sizeof(sa)) < 0) goto out;
        st[i].s = accept(ls, NULL, NULL);
        st[i].bytes = bytes / (size_t)n;
        size_t span = span_total / (size_t)n;
        st[i].span = span < BLAST_CHUNK ? BLAST_CHUNK : span;
        st[i].wbuf = span_total ? pool_like(st[i].span) : calloc(1, BLAST_CHUNK);
        st[i].rbuf = span_total ? pool_like(st[i].span) : malloc(BLAST_CHUNK);
        if (!st[i].wbuf || !st[i].rbuf) goto out;
        if (span_total) memset(st[i].wbuf, 0x5a, st[i].span);
        memset(st[i].rbuf, 0, st[i].span);
    }
    int64_t t0 = td_now_ns();
    double cpu0 = cpu_s();
    for (int i = 0; i < n; i++) {
        pthread_create(&st[i].reader, NULL, blast_reader, &st[i]);
        pthread_create(&st[i].writer, NULL, blast_writer, &st[i]);
    }
    for (int i = 0; i < n; i++) {
        pthread_join(st[i].writer, NULL);
        pthread_join(st[i].reader, NULL);
    }
    double secs = td_ns_to_s(td_now_ns() - t0);
    note_cpu(cpu0, bytes / (size_t)n * (size_t)n);
    gbps = (double)(bytes / (size_t)n * (size_t)n) / secs / 1e9;
out:
    for (int i = 0; i < n; i++) {
        if (st[i].c >= 0) close(st[i].c);
        if (st[i].s >= 0) close(st[i].s);
        if (span_total) {
            if (st[i].wbuf) munmap(st[i].wbuf, st[i].span);
            if (st[i].rbuf) munmap(st[i].rbuf, st[i].span);
        } else {
            free(st[i].wbuf);
            free(st[i].rbuf);
        }
    }
    close(ls);
    return gbps;
}

/* Copies with non-temporal (streaming) stores, written here independently
 * of the library's: the fastest a single thread moves bytes between two
 * buffers that do not fit in the cache on x86-64 hosts, where glibc's memcpy
 * keeps ordinary stores for all but very large copies. 16-byte stores (SSE2)
 * and, where the CPU has AVX, 32-byte ones. dst 32-byte aligned, n a
 * multiple of 64. */
static void stream_copy16(void *dst, const void *src, size_t n)
{
#if defined(__x86_64__)
    __m128i *d = dst;
    const __m128i *s = src;
    for (size_t i = 0; i < n / 16; i += 4) {
        __m128i a = _mm_loadu_si128(s + i), b = _mm_loadu_si128(s + i + 1);
        __m128i c = _mm_loadu_si128(s + i + 2), e = _mm_loadu_si128(s + i + 3);
        _mm_stream_si128(d + i, a);
        _mm_stream_si128(d + i + 1, b);
        _mm_stream_si128(d + i + 2, c);
        _mm_stream_si128(d + i + 3, e);
    }
    _mm_sfence();
#else
    memcpy(dst, src, n);
#endif
}

#if defined(__x86_64__)
__attribute__((target("avx"))) static void stream_copy32(void *dst, const void *src, size_t n)
{
    __m256i *d = dst;
    const __m256i *s = src;
    for (size_t i = 0; i < n / 32; i += 2) {
        __m256i a = _mm256_loadu_si256(s + i), b = _mm256_loadu_si256(s + i + 1);
        _mm256_stream_si256(d + i, a);
        _mm256_stream_si256(d + i + 1, b);
    }
    _mm_sfence();
}
#endif

enum copy_way { COPY_MEMCPY, COPY_STREAM16, COPY_STREAM32 };

static int have_avx(void)
{
#if defined(__x86_64__)
    return __builtin_cpu_supports("avx");
#else
    return 0;
#endif
}

/* GB/s of one thread copying `bytes` between two page-aligned buffers of
 * the pool's size (what a shm transfer copies per batch), pre-faulted, the
 * given way (0 where the CPU cannot). */
static double copy_gbps(size_t bytes, enum copy_way way)
{
    if (way == COPY_STREAM32 && !have_avx()) return 0;
    size_t n = g_pool_mib << 20;
    void *a = NULL, *b = NULL;
    if (posix_memalign(&a, 4096, n) != 0 || posix_memalign(&b, 4096, n) != 0) {
        free(a);
        return -1;
    }
    memset(a, 1, n);
    memset(b, 2, n);
    int64_t t0 = td_now_ns();
    size_t done = 0;
    while (done < bytes) {
        if (way == COPY_MEMCPY)
            memcpy(b, a, n);
        else if (way == COPY_STREAM16)
            stream_copy16(b, a, n);
#if defined(__x86_64__)
        else
            stream_copy32(b, a, n);
#endif
        done += n;
    }
    double secs = td_ns_to_s(td_now_ns() - t0);
    volatile char sink = ((char *)b)[n / 2];
    (void)sink;
    free(a);
    free(b);
    return (double)done / secs / 1e9;
}

/* The shm limit: the fastest of the ways one thread can copy. */
static double best_copy_gbps(size_t bytes)
{
    double best = 0;
    for (int way = COPY_MEMCPY; way <= COPY_STREAM32; way++) {
        double g = copy_gbps(bytes, (enum copy_way)way);
        if (g > best) best = g;
    }
    return best;
}

/* ---------- kvx runs ---------- */

struct pair_eps {
    kvx_ep *rx, *tx;
    int peer;
    kv_layout l;
};

static int open_pair(const char *transport, kv_layout l, struct pair_eps *pe)
{
    memset(pe, 0, sizeof(*pe));
    pe->l = l;
    kvx_params p = {.transport = transport,
                    .role = KVX_ROLE_RECV,
                    .model_fingerprint = 42,
                    .layout = l,
                    .n_data_conns = g_conns};
    int rc = kvx_ep_create(&p, &pe->rx);
    if (rc < 0) return rc;
    p.role = KVX_ROLE_SEND;
    if ((rc = kvx_ep_create(&p, &pe->tx)) < 0) return rc;
    char addr[128], bound[128];
    if (!strcmp(transport, "tcp"))
        snprintf(addr, sizeof(addr), "127.0.0.1:0");
    else
        snprintf(addr, sizeof(addr), "/tmp/tandem-kvx-bench-%d.sock", (int)getpid());
    if ((rc = kvx_listen(pe->rx, addr, bound, sizeof(bound))) < 0) return rc;
    memset(kvx_ep_pool(pe->tx), 0x5a, kv_layout_pool_bytes(&l));
    return kvx_connect(pe->tx, bound, &pe->peer, NULL, 0);
}

static void close_pair(struct pair_eps *pe)
{
    kvx_ep_destroy(pe->tx);
    kvx_ep_destroy(pe->rx);
}

/* Waits for n DONE events on ep (any ids); a FAILED ends the wait. */
static int wait_done(kvx_ep *ep, int n, int64_t *t_done)
{
    int64_t end = td_now_ns() + 30 * TD_NS_PER_S;
    int done = 0;
    while (done < n && td_now_ns() < end) {
        kvx_event evs[64];
        int k = kvx_ep_wait(ep, evs, 64, 100 * TD_NS_PER_MS);
        for (int i = 0; i < k; i++) {
            if (evs[i].type == KVX_EV_FAILED) {
                fprintf(stderr, "request %s failed: %s %s\n", evs[i].req_id,
                        td_err_name(evs[i].err), evs[i].msg);
                return evs[i].err;
            }
            done += evs[i].type == KVX_EV_DONE;
        }
    }
    if (done < n) return TD_ETIMEDOUT;
    if (t_done) *t_done = td_now_ns();
    return 0;
}

/* Time spent inside the post calls of a run. */
struct post_cost {
    int64_t ns;
    int64_t calls;
    int64_t posts;
};

/* A prefill batch on blocks [base, base + n) of the pool: src block i goes
 * to dst nb - 1 - i (block ids out of order on the receiver), split among
 * nreq requests whose ids are "<tag>-<seq>". */
enum { BATCH_MAX = 4096 }; /* blocks in one batch, at most */

struct batch {
    int nreq, rx_done, tx_done, active; /* the last three: --pipeline only */
    char ids[BATCH_MAX][32];
    uint32_t dst[BATCH_MAX];
    kvx_pair pairs[BATCH_MAX];
    kvx_layer_post posts[BATCH_MAX];
    kvx_recv_reg regs[BATCH_MAX];
    kvx_begin begins[BATCH_MAX];
    int rcs[BATCH_MAX];
};

/* The first error of a batch call's per-entry results. */
static int batch_rc(int n_ok, const int *rcs, int n)
{
    if (n_ok < 0) return n_ok;
    for (int i = 0; i < n; i++)
        if (rcs[i] < 0) return rcs[i];
    return 0;
}

/* Registers the batch's requests on the receiver. */
static int batch_register(struct pair_eps *pe, struct batch *b, int base, int n, int nreq,
                          const char *tag, int *seq)
{
    int nb = (int)pe->l.num_blocks;
    if (n > BATCH_MAX) return TD_ERANGE;
    if (nreq > n) nreq = n;
    for (int i = 0; i < n; i++) {
        b->pairs[i].src = (uint32_t)(base + i);
        b->pairs[i].dst = b->dst[i] = (uint32_t)(nb - 1 - (base + i));
    }
    b->nreq = nreq;
    for (int r = 0; r < nreq; r++) {
        int b0 = r * n / nreq, b1 = (r + 1) * n / nreq;
        snprintf(b->ids[r], sizeof(b->ids[r]), "%s-%d", tag, (*seq)++);
        b->regs[r] =
            (kvx_recv_reg){.req_id = b->ids[r], .dst_blocks = b->dst + b0, .n_blocks = b1 - b0};
        b->begins[r] = (kvx_begin){.peer = pe->peer, .req_id = b->ids[r]};
        b->posts[r] = (kvx_layer_post){.req_id = b->ids[r], .pairs = b->pairs + b0, .n = b1 - b0};
    }
    /* One round trip to the receiver's progress thread for the batch, as a
     * decode worker admitting a burst would make. */
    return batch_rc(kvx_recv_register_batch(pe->rx, b->regs, nreq, b->rcs), b->rcs, nreq);
}

/* Opens the batch's requests on the sender, in one call. */
static int batch_begin(struct pair_eps *pe, struct batch *b)
{
    return batch_rc(kvx_send_begin_batch(pe->tx, b->begins, b->nreq, b->rcs), b->rcs, b->nreq);
}

/* Posts one layer of every request of the batch: one kvx_send_layers call,
 * or (per_post) one kvx_send_layer per request; the time goes to cost. */
static int batch_post_layer(struct pair_eps *pe, struct batch *b, uint32_t layer, int per_post,
                            struct post_cost *cost)
{
    int rc = 0;
    for (int r = 0; r < b->nreq; r++)
        b->posts[r].layer = (int)layer;
    int64_t t0 = td_now_ns();
    if (per_post) {
        for (int r = 0; r < b->nreq && rc >= 0; r++)
            rc = kvx_send_layer(pe->tx, b->ids[r], (int)layer, b->posts[r].pairs, b->posts[r].n);
        cost->calls += b->nreq;
    } else {
        rc = kvx_send_layers(pe->tx, b->posts, b->nreq);
        cost->calls++;
    }
    cost->ns += td_now_ns() - t0;
    cost->posts += b->nreq;
    return rc;
}

/* One prefill batch: every block of the pool, all layers, split among nreq
 * requests. layer_ns > 0 sleeps that long before posting each layer (the
 * simulated compute of that layer). per_post: one kvx_send_layer per request
 * and layer instead of one kvx_send_layers per layer. Returns 0 and fills the
 * times. */
static int run_batch(struct pair_eps *pe, int *seq, int nreq, int per_post, int64_t layer_ns,
                     int64_t *t_start, int64_t *t_compute_end, int64_t *t_done,
                     struct post_cost *cost)
{
    static struct batch b;
    int rc = batch_register(pe, &b, 0, (int)pe->l.num_blocks, nreq, "bench", seq);
    if (rc < 0) return rc;
    *t_start = td_now_ns();
    if ((rc = batch_begin(pe, &b)) < 0) return rc;
    for (uint32_t layer = 0; layer < pe->l.n_layers; layer++) {
        if (layer_ns > 0) td_sleep_ns(layer_ns);
        if ((rc = batch_post_layer(pe, &b, layer, per_post, cost)) < 0) return rc;
    }
    *t_compute_end = td_now_ns();
    if ((rc = wait_done(pe->rx, b.nreq, t_done)) < 0) return rc;
    return wait_done(pe->tx, b.nreq, NULL);
}

/* --pipeline: the batch of one half of the pool (slot 0 the first half, slot
 * 1 the second), g_batch / 2 requests whose ids start "p<slot>-". */
static int half_start(struct pair_eps *pe, struct batch *h, int slot, int *seq,
                      struct post_cost *cost)
{
    int nh = (int)pe->l.num_blocks / 2;
    int rc = batch_register(pe, h, slot * nh, nh, g_batch / 2 < 1 ? 1 : g_batch / 2,
                            slot ? "p1" : "p0", seq);
    if (rc < 0 || (rc = batch_begin(pe, h)) < 0) return rc;
    h->rx_done = h->tx_done = 0;
    h->active = 1;
    for (uint32_t layer = 0; layer < pe->l.n_layers; layer++)
        if ((rc = batch_post_layer(pe, h, layer, 0, cost)) < 0) return rc;
    return 0;
}

/* Counts DONE events of ep into their half batch (ids "p<slot>-"); a
 * FAILED is an error. Returns events seen, or a negative TD_E* code. */
static int half_events(kvx_ep *ep, struct batch h[2], int rx)
{
    kvx_event evs[64];
    int k = kvx_ep_poll(ep, evs, 64);
    for (int i = 0; i < k; i++) {
        if (evs[i].type == KVX_EV_FAILED) {
            fprintf(stderr, "request %s failed: %s %s\n", evs[i].req_id, td_err_name(evs[i].err),
                    evs[i].msg);
            return evs[i].err;
        }
        if (evs[i].type != KVX_EV_DONE || evs[i].req_id[0] != 'p') continue;
        struct batch *b = &h[evs[i].req_id[1] == '1'];
        if (rx)
            b->rx_done++;
        else
            b->tx_done++;
    }
    return k;
}

/* Throughput with two batches in flight, each on half of the pool: a half
 * starts again as soon as both ends have reported its requests DONE, as a
 * prefill worker keeps sending while earlier requests finish, so no batch
 * waits for the pipe to drain and a BEGIN round trip before it moves. */
static int pipelined(struct pair_eps *pe, int *seq, size_t target, size_t *moved,
                     struct post_cost *cost)
{
    static struct batch h[2];
    size_t per_half = kv_layout_pool_bytes(&pe->l) / 2, started = 0;
    int rc;
    if (pe->l.num_blocks < 2) return TD_ERANGE;
    for (int slot = 0; slot < 2; slot++) {
        if ((rc = half_start(pe, &h[slot], slot, seq, cost)) < 0) return rc;
        started += per_half;
    }
    int64_t end = td_now_ns() + 60 * TD_NS_PER_S;
    while ((h[0].active || h[1].active) && td_now_ns() < end) {
        int a = half_events(pe->rx, h, 1), b = half_events(pe->tx, h, 0);
        if (a < 0) return a;
        if (b < 0) return b;
        for (int slot = 0; slot < 2; slot++) {
            struct batch *x = &h[slot];
            if (!x->active || x->rx_done < x->nreq || x->tx_done < x->nreq) continue;
            x->active = 0;
            *moved += per_half;
            if (started < target) {
                if ((rc = half_start(pe, x, slot, seq, cost)) < 0) return rc;
                started += per_half;
            }
        }
        if (a == 0 && b == 0) {
            struct pollfd pfd[2] = {{.fd = kvx_ep_event_fd(pe->rx), .events = POLLIN},
                                    {.fd = kvx_ep_event_fd(pe->tx), .events = POLLIN}};
            poll(pfd, 2, 100);
        }
    }
    return h[0].active || h[1].active ? TD_ETIMEDOUT : 0;
}

/* Throughput: batches back to back until g_gib moved (--pipeline: two
 * half-pool batches in flight). */
static double kvx_gbps(const char *transport, uint32_t block_size, int per_post, int *seq,
                       struct post_cost *cost)
{
    struct pair_eps pe;
    kv_layout l = bench_layout(block_size);
    int rc = open_pair(transport, l, &pe);
    if (rc < 0) {
        fprintf(stderr, "%s: setup failed: %s\n", transport, td_strerror(rc));
        close_pair(&pe);
        return -1;
    }
    size_t per_batch = kv_layout_pool_bytes(&l);
    size_t target = (size_t)(g_gib * (double)(1ull << 30));
    size_t moved = 0;
    memset(cost, 0, sizeof(*cost));
    int64_t t0 = td_now_ns();
    double cpu0 = cpu_s();
    if (g_pipeline && !per_post && (rc = pipelined(&pe, seq, target, &moved, cost)) < 0) {
        fprintf(stderr, "%s: transfer failed: %s\n", transport, td_strerror(rc));
        close_pair(&pe);
        return -1;
    }
    while (moved < target) {
        int64_t a, b, c;
        if ((rc = run_batch(&pe, seq, g_batch, per_post, 0, &a, &b, &c, cost)) < 0) {
            fprintf(stderr, "%s: transfer failed: %s\n", transport, td_strerror(rc));
            close_pair(&pe);
            return -1;
        }
        moved += per_batch;
    }
    double secs = td_ns_to_s(td_now_ns() - t0);
    note_cpu(cpu0, moved);
    close_pair(&pe);
    return (double)moved / secs / 1e9;
}

/* Overlap: compute of each layer is simulated by a sleep as long as that
 * layer's transfer takes at the measured rate (a balanced pipeline). Reports
 * the tail (last compute end -> transfer end) as a fraction of the transfer
 * (first post -> transfer end). Without overlap the tail would be the whole
 * transfer; with perfect overlap it is one layer's transfer (1/n_layers). */
static void overlap(const char *transport, uint32_t block_size, double gbps, int per_post, int *seq)
{
    struct pair_eps pe;
    kv_layout l = bench_layout(block_size);
    if (open_pair(transport, l, &pe) < 0 || gbps <= 0) {
        close_pair(&pe);
        return;
    }
    double layer_bytes = (double)kv_layout_block_bytes(&l) * l.num_blocks;
    int64_t layer_ns = (int64_t)(layer_bytes / (gbps * 1e9) * 1e9);
    double sum_frac = 0, sum_tail_ms = 0, sum_xfer_ms = 0, sum_post_ms = 0;
    int reps = 5, ok = 0;
    for (int r = 0; r < reps; r++) {
        int64_t t0, tc, td;
        struct post_cost cost = {0};
        if (run_batch(&pe, seq, g_batch, per_post, layer_ns, &t0, &tc, &td, &cost) < 0) break;
        /* The transfer starts when layer 0's compute ends. */
        int64_t xfer_start = t0 + layer_ns;
        sum_frac += (double)(td - tc) / (double)(td - xfer_start);
        sum_tail_ms += td_ns_to_ms(td - tc);
        sum_xfer_ms += td_ns_to_ms(td - xfer_start);
        sum_post_ms += td_ns_to_ms(cost.ns);
        ok++;
    }
    close_pair(&pe);
    if (!ok) return;
    /* A post call that waits for the progress thread holds the compute
     * back; that time is in the "in post calls" figure, and it shrinks the
     * tail by making compute end later. */
    printf("overlap %-4s bs=%-3u %s compute/layer=%6.2f ms  in post calls=%6.2f ms  "
           "transfer=%7.2f ms  tail after last layer=%6.2f ms  tail fraction=%.3f (one layer's "
           "share %.3f; no overlap 1.000)\n",
           transport, block_size, per_post ? "kvx_send_layer " : "kvx_send_layers",
           td_ns_to_ms(layer_ns), sum_post_ms / ok, sum_xfer_ms / ok, sum_tail_ms / ok,
           sum_frac / ok, 1.0 / l.n_layers);
}

struct bench_opts {
    double gib;
    int64_t conns, pool_mib, batch, rounds;
    const char *transport;
    bool pipeline;
};

static const struct cfg_option bench_table[] = {
    {"gib", CFG_DOUBLE, "1", "0.001", "1024", NULL, "GiB moved per measured point",
     offsetof(struct bench_opts, gib), 0},
    {"conns", CFG_INT64, "2", "1", "16", NULL, "TCP data connections per peer",
     offsetof(struct bench_opts, conns), 0},
    {"pool-mib", CFG_INT64, "64", "1", "65536", NULL, "KV pool per side (MiB)",
     offsetof(struct bench_opts, pool_mib), 0},
    {"batch", CFG_INT64, "8", "1", "4096", NULL,
     "requests per prefill batch (one kvx_send_layers call per layer)",
     offsetof(struct bench_opts, batch), 0},
    {"rounds", CFG_INT64, "1", "1", "100", NULL,
     "> 1: only the throughput ratios, each kvx point between two measurements of its "
     "limit, this many rounds; prints each ratio's median and range",
     offsetof(struct bench_opts, rounds), 0},
    {"transport", CFG_STRING, "all", NULL, NULL, "all|tcp|shm",
     "which transports' points run (tcp or shm alone: for profiling one of them)",
     offsetof(struct bench_opts, transport), 0},
    {"pipeline", CFG_BOOL, "false", NULL, NULL, NULL,
     "throughput points keep two batches in flight, each on half of the pool, instead of "
     "one whole-pool batch drained before the next",
     offsetof(struct bench_opts, pipeline), 0},
};

/* Returns 0, CFG_HELP (help printed) or a negative TD_E* code (error printed). */
static int parse_args(int argc, char **argv)
{
    struct bench_opts o;
    cfg *c = NULL;
    int rc = cfg_create(&c, "tandem-kvx-bench", bench_table,
                        sizeof(bench_table) / sizeof(bench_table[0]), &o);
    if (rc != 0) return rc;
    rc = cfg_parse(c, argc, argv);
    int npos = 0;
    char *const *pos = cfg_positional(c, &npos);
    if (rc == CFG_HELP) {
        fputs(cfg_help(c), stdout);
    } else if (rc != 0) {
        fprintf(stderr, "tandem-kvx-bench: %s\n", cfg_error(c));
    } else if (npos > 0) {
        fprintf(stderr, "tandem-kvx-bench: unexpected argument '%s' (see --help)\n", pos[0]);
        rc = TD_EINVAL;
    } else {
        g_gib = o.gib;
        g_conns = (int)o.conns;
        g_pool_mib = (size_t)o.pool_mib;
        g_batch = (int)o.batch;
        g_rounds = (int)o.rounds;
        g_pipeline = o.pipeline;
        g_run_tcp = strcmp(o.transport, "shm") != 0;
        g_run_shm = strcmp(o.transport, "tcp") != 0;
    }
    cfg_free(c);
    return rc;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The limit of a point: tcp, the raw n-stream blast (mem 0: cache-resident
 * buffers; 1: pool-sized memory at both ends); shm, the fastest of the
 * one-thread copies. */
static double point_limit(int tcp, int mem, size_t bytes)
{
    if (tcp) return raw_socket_gbps(bytes, g_conns, mem ? g_pool_mib << 20 : 0);
    return best_copy_gbps(bytes);
}

static void print_median(const char *what, double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    printf("%s: median %.2f (%.2f-%.2f)", what, v[n / 2], v[0], v[n - 1]);
}

/* --rounds: on a shared host the load moves between one measurement and the
 * next, so a ratio against a limit measured once at the start says little.
 * Each kvx point is measured between two measurements of its limit (the mean
 * of both is its denominator), round after round, and the median and range
 * of each ratio over the rounds are printed. tcp has two limits, both
 * measured before and after its point: the blast through cache-resident
 * buffers and the blast from and to pool-sized memory. */
static void ratio_rounds(size_t bytes)
{
    enum { NPT = 4 };
    static const char *names[NPT] = {"tcp bs=16", "tcp bs=64", "shm bs=16", "shm bs=64"};
    double ratio[NPT][100], ratio_mem[NPT][100], gbps[NPT][100], cpu[NPT][100], cpu_mem[NPT][100];
    int seq = 0;
    for (int r = 0; r < g_rounds; r++) {
        for (int k = 0; k < NPT; k++) {
            int tcp = k < 2;
            if (!(tcp ? g_run_tcp : g_run_shm)) continue;
            uint32_t bs = k % 2 ? 64 : 16;
            struct post_cost cost;
            double l0 = point_limit(tcp, 0, bytes), c0 = g_cpu_ms_per_gib;
            double m0 = tcp ? point_limit(tcp, 1, bytes) : 0, cm0 = g_cpu_ms_per_gib;
            double v = kvx_gbps(tcp ? "tcp" : "shm", bs, 0, &seq, &cost);
            double cv = g_cpu_ms_per_gib;
            double m1 = tcp ? point_limit(tcp, 1, bytes) : 0, cm1 = g_cpu_ms_per_gib;
            double l1 = point_limit(tcp, 0, bytes), c1 = g_cpu_ms_per_gib;
            gbps[k][r] = v;
            ratio[k][r] = l0 > 0 && l1 > 0 ? v / ((l0 + l1) / 2) : 0;
            ratio_mem[k][r] = m0 > 0 && m1 > 0 ? v / ((m0 + m1) / 2) : 0;
            /* tcp: the raw blasts' CPU time per GiB against kvx's (for shm
             * the copies' figures are not comparable). */
            cpu[k][r] = tcp && cv > 0 ? (c0 + c1) / 2 / cv : 0;
            cpu_mem[k][r] = tcp && cv > 0 ? (cm0 + cm1) / 2 / cv : 0;
            printf("round %2d  kvx %-9s %6.2f GB/s  limit %6.2f / %6.2f GB/s  ratio %.2f", r + 1,
                   names[k], v, l0, l1, ratio[k][r]);
            if (tcp)
                printf("  memory blast %6.2f / %6.2f GB/s  ratio %.2f  cpu ms/GiB kvx %.0f "
                       "blast %.0f / %.0f memory blast %.0f / %.0f",
                       m0, m1, ratio_mem[k][r], cv, c0, c1, cm0, cm1);
            printf("\n");
            fflush(stdout);
        }
    }
    for (int k = 0; k < 2 && g_run_tcp; k++) {
        printf("summary kvx %-9s CPU time per GiB, blast / kvx", names[k]);
        print_median("", cpu[k], g_rounds);
        print_median("; memory blast / kvx", cpu_mem[k], g_rounds);
        printf(" (1.00: kvx costs the cores what the blast does)\n");
    }
    for (int k = 0; k < NPT; k++) {
        if (!(k < 2 ? g_run_tcp : g_run_shm)) continue;
        printf("summary kvx %-9s", names[k]);
        print_median(" GB/s", gbps[k], g_rounds);
        print_median(k < 2 ? "  ratio to raw tcp blast" : "  ratio to best 1-thread copy", ratio[k],
                     g_rounds);
        if (k < 2) print_median("  to memory blast", ratio_mem[k], g_rounds);
        printf(" over %d rounds\n", g_rounds);
    }
}

int main(int argc, char **argv)
{
    int prc = parse_args(argc, argv);
    if (prc == CFG_HELP) return 0;
    if (prc != 0) return 2;
    signal(SIGPIPE, SIG_IGN);
    if (!getenv("TANDEM_LOG_LEVEL")) td_log_set_level(TD_LOG_WARN);
    size_t limit_bytes = (size_t)(g_gib * (double)(1ull << 30));
    printf("kvx bench: 32 layers, n_kv_heads*head_dim=4096, f16; pool %zu MiB per side; "
           "%.2f GiB per point; tcp data connections=%d; up to %d requests per batch\n",
           g_pool_mib, g_gib, g_conns, g_batch);
    if (g_rounds > 1) {
        printf("ratio rounds: tcp against a raw %d-stream blast, shm against the best one-thread "
               "copy, each measured just before and just after the kvx point\n",
               g_conns);
        ratio_rounds(limit_bytes);
        return 0;
    }
    double raw1 = g_run_tcp ? raw_socket_gbps(limit_bytes, 1, 0) : 0;
    double raw = g_conns == 1 || !g_run_tcp ? raw1 : raw_socket_gbps(limit_bytes, g_conns, 0);
    double raw_mem = g_run_tcp ? raw_socket_gbps(limit_bytes, g_conns, g_pool_mib << 20) : 0;
    double mc_plain = g_run_shm ? copy_gbps(limit_bytes, COPY_MEMCPY) : 0;
    double mc_stream = g_run_shm ? copy_gbps(limit_bytes, COPY_STREAM16) : 0;
    double mc_stream32 = g_run_shm ? copy_gbps(limit_bytes, COPY_STREAM32) : 0;
    /* The copy limit is the fastest way one thread can copy. */
    double mc = mc_stream > mc_plain ? mc_stream : mc_plain;
    if (mc_stream32 > mc) mc = mc_stream32;
    printf("limit  raw tcp socket on 127.0.0.1, 1 stream    %6.2f GB/s\n", raw1);
    printf("limit  raw tcp socket on 127.0.0.1, %d streams   %6.2f GB/s\n", g_conns, raw);
    printf("limit  same, from and to %zu MiB of memory      %6.2f GB/s\n", g_pool_mib, raw_mem);
    printf("limit  memcpy (1 thread)                       %6.2f GB/s\n", mc_plain);
    printf("limit  streaming-store copy, 16 B (1 thread)   %6.2f GB/s\n", mc_stream);
    printf("limit  streaming-store copy, 32 B (1 thread)   %6.2f GB/s%s\n", mc_stream32,
           have_avx() ? "" : " (no AVX)");
    printf("limit  copy, best of the three                 %6.2f GB/s\n", mc);
    int seq = 0;
    uint32_t bss[2] = {16, 64};
    double tcp16 = 0, shm16 = 0;
    for (int i = 0; i < 2; i++) {
        kv_layout l = bench_layout(bss[i]);
        int nreq = g_batch < (int)l.num_blocks ? g_batch : (int)l.num_blocks;
        for (int per_post = 0; per_post <= (i == 0); per_post++) {
            struct post_cost ct, cs;
            double t = g_run_tcp ? kvx_gbps("tcp", bss[i], per_post, &seq, &ct) : 0;
            double s = g_run_shm ? kvx_gbps("shm", bss[i], per_post, &seq, &cs) : 0;
            const char *how = per_post     ? "kvx_send_layer per post "
                              : g_pipeline ? "kvx_send_layers per layer, two halves in flight"
                                           : "kvx_send_layers per layer";
            if (g_run_tcp)
                printf("kvx    tcp bs=%-3u block=%4zu KiB x %3u blocks x 32 layers, %d reqs, %s  "
                       "%6.2f GB/s  = %.2f x raw (%d streams), %.2f x raw from memory, %.2f x "
                       "raw (1 stream); posting %.1f us/layer\n",
                       bss[i], kv_layout_block_bytes(&l) >> 10, l.num_blocks, nreq, how, t,
                       raw > 0 ? t / raw : 0, g_conns, raw_mem > 0 ? t / raw_mem : 0,
                       raw1 > 0 ? t / raw1 : 0,
                       ct.posts ? 1e-3 * (double)ct.ns * nreq / (double)ct.posts : 0);
            if (g_run_shm)
                printf("kvx    shm bs=%-3u block=%4zu KiB x %3u blocks x 32 layers, %d reqs, %s  "
                       "%6.2f "
                       "GB/s  = %.2f x copy; posting %.1f us/layer\n",
                       bss[i], kv_layout_block_bytes(&l) >> 10, l.num_blocks, nreq, how, s,
                       mc > 0 ? s / mc : 0,
                       cs.posts ? 1e-3 * (double)cs.ns * nreq / (double)cs.posts : 0);
            fflush(stdout);
            if (i == 0 && !per_post) {
                tcp16 = t;
                shm16 = s;
            }
        }
    }
    for (int per_post = 0; per_post <= 1; per_post++) {
        if (g_run_tcp) overlap("tcp", 16, tcp16, per_post, &seq);
        if (g_run_shm) overlap("shm", 16, shm16, per_post, &seq);
    }
    return 0;
}
