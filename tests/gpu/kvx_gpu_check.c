/* tandem-kvx-gpu-check: a GPU transport between two processes, checked
 * byte-exact, then timed. The parent is the sender, a forked child the
 * receiver (fork happens before any CUDA call: CUDA does not survive fork).
 *
 * Usage: tandem-kvx-gpu-check [cuda_ipc|nccl] [tx_device] [rx_device]
 * cuda_ipc runs on one GPU (both devices 0 by default); nccl needs two GPUs
 * (NCCL refuses two ranks on one device). Exit 0 = pass, 77 = skipped (no
 * device), anything else = failure. */
#include <cuda_runtime_api.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"
#include "kvtransfer/kvx.h"

#define NB 64 /* blocks per layer in each pool */

static kv_layout layout(void)
{
    kv_layout l = {.n_layers = 32,
                   .num_blocks = NB,
                   .block_size = 16,
                   .n_kv_heads = 8,
                   .head_dim = 128,
                   .dtype = KV_DTYPE_F16}; /* 64 KiB blocks, 128 MiB pool */
    return l;
}

/* Byte i of the source block (layer, src). */
static uint8_t pattern(uint32_t layer, uint32_t src, size_t i)
{
    uint64_t x = ((uint64_t)layer << 40) ^ ((uint64_t)src << 20) ^ i;
    x *= 0x9E3779B97F4A7C15ull;
    return (uint8_t)(x >> 56);
}

/* Request r maps src i -> dst (i * 7 + r) % NB for the first n blocks. */
static void pairs_for(int r, int n, kvx_pair *p, uint32_t *dst)
{
    for (int i = 0; i < n; i++) {
        p[i].src = (uint32_t)i;
        p[i].dst = dst[i] = (uint32_t)((i * 7 + r) % NB);
    }
}

static int wait_final(kvx_ep *ep, const char *id, int64_t timeout_ns)
{
    int64_t end = td_now_ns() + timeout_ns;
    while (td_now_ns() < end) {
        kvx_event e;
        if (kvx_ep_wait(ep, &e, 1, 100 * TD_NS_PER_MS) != 1 || strcmp(e.req_id, id)) continue;
        if (e.type == KVX_EV_DONE) return 0;
        if (e.type == KVX_EV_FAILED) {
            fprintf(stderr, "%s failed: %s %s\n", id, td_err_name(e.err), e.msg);
            return e.err;
        }
    }
    return TD_ETIMEDOUT;
}

enum { CHECK_REQS = 3, BENCH_REQS = 20 };

static int receiver(const char *transport, int dev, int addr_fd)
{
    kv_layout l = layout();
    kvx_params p = {.transport = transport,
                    .role = KVX_ROLE_RECV,
                    .model_fingerprint = 7,
                    .layout = l,
                    .cuda_device = dev};
    kvx_ep *rx;
    int rc = kvx_ep_create(&p, &rx);
    if (rc < 0) {
        fprintf(stderr, "receiver: %s\n", td_strerror(rc));
        return 1;
    }
    char addr[128], bound[128] = {0};
    if (!strcmp(transport, "nccl"))
        snprintf(addr, sizeof(addr), "127.0.0.1:0");
    else
        snprintf(addr, sizeof(addr), "/tmp/tandem-kvx-gpu-%d.sock", (int)getpid());
    if (kvx_listen(rx, addr, bound, sizeof(bound)) < 0) return 1;
    size_t bb = kv_layout_block_bytes(&l);
    uint8_t *host = malloc(kv_layout_pool_bytes(&l));
    int bad = 0;
    for (int r = 0; r < CHECK_REQS + BENCH_REQS && !bad; r++) {
        char id[32];
        snprintf(id, sizeof(id), "gpu-%d", r);
        kvx_pair pairs[NB];
        uint32_t dst[NB];
        int n = r < CHECK_REQS ? NB / 2 + r : NB;
        pairs_for(r, n, pairs, dst);
        cudaMemset(kvx_ep_pool(rx), 0, kv_layout_pool_bytes(&l));
        cudaDeviceSynchronize();
        if (kvx_recv_register(rx, id, dst, n, 0) < 0) return 1;
        if (r == 0 && write(addr_fd, bound, sizeof(bound)) != (ssize_t)sizeof(bound)) return 1;
        if (wait_final(rx, id, 20 * TD_NS_PER_S) < 0) return 1;
        if (r >= CHECK_REQS) continue;
        cudaMemcpy(host, kvx_ep_pool(rx), kv_layout_pool_bytes(&l), cudaMemcpyDeviceToHost);
        for (uint32_t layer = 0; layer < l.n_layers && !bad; layer++)
            for (int i = 0; i < n && !bad; i++) {
                const uint8_t *b = host + kv_layout_block_offset(&l, layer, pairs[i].dst);
                for (size_t k = 0; k < bb; k++)
                    if (b[k] != pattern(layer, pairs[i].src, k)) {
                        fprintf(stderr, "mismatch req=%d layer=%u dst=%u byte=%zu\n", r, layer,
                                pairs[i].dst, k);
                        bad = 1;
                        break;
                    }
            }
    }
    free(host);
    kvx_ep_destroy(rx);
    return bad;
}

int main(int argc, char **argv)
{
    const char *transport = argc > 1 ? argv[1] : "cuda_ipc";
    int txdev = argc > 2 ? atoi(argv[2]) : 0;
    int rxdev = argc > 3 ? atoi(argv[3]) : 0;
    char why[200];
    signal(SIGPIPE, SIG_IGN);
    int fds[2];
    if (pipe(fds) < 0) return 1;
    /* Probe in a child so the parent is still CUDA-free when it forks. */
    pid_t probe = fork();
    if (probe == 0) _exit(kvx_transport_available(transport, why, sizeof(why)) ? 0 : 77);
    int st;
    waitpid(probe, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) == 77) {
        printf("SKIP %s: transport not available here (no device, or not built)\n", transport);
        return 77;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        _exit(receiver(transport, rxdev, fds[1]));
    }
    close(fds[1]);
    char bound[128];
    if (read(fds[0], bound, sizeof(bound)) != (ssize_t)sizeof(bound)) {
        fprintf(stderr, "receiver did not start\n");
        return 1;
    }
    kv_layout l = layout();
    kvx_params p = {.transport = transport,
                    .role = KVX_ROLE_SEND,
                    .model_fingerprint = 7,
                    .layout = l,
                    .cuda_device = txdev};
    kvx_ep *tx;
    int rc = kvx_ep_create(&p, &tx);
    if (rc < 0) {
        fprintf(stderr, "sender: %s\n", td_strerror(rc));
        return 1;
    }
    size_t bb = kv_layout_block_bytes(&l);
    uint8_t *host = malloc(kv_layout_pool_bytes(&l));
    for (uint32_t layer = 0; layer < l.n_layers; layer++)
        for (uint32_t b = 0; b < NB; b++)
            for (size_t k = 0; k < bb; k++)
                host[kv_layout_block_offset(&l, layer, b) + k] = pattern(layer, b, k);
    cudaSetDevice(txdev);
    cudaMemcpy(kvx_ep_pool(tx), host, kv_layout_pool_bytes(&l), cudaMemcpyHostToDevice);
    free(host);
    int peer;
    char msg[200];
    if ((rc = kvx_connect(tx, bound, &peer, msg, sizeof(msg))) < 0) {
        fprintf(stderr, "connect: %s %s\n", td_strerror(rc), msg);
        return 1;
    }
    int64_t t_bench = 0;
    size_t bench_bytes = 0;
    for (int r = 0; r < CHECK_REQS + BENCH_REQS; r++) {
        char id[32];
        snprintf(id, sizeof(id), "gpu-%d", r);
        kvx_pair pairs[NB];
        uint32_t dst[NB];
        int n = r < CHECK_REQS ? NB / 2 + r : NB;
        pairs_for(r, n, pairs, dst);
        /* The receiver registers before we begin: retry a not-yet-known id. */
        int64_t t0 = td_now_ns();
        for (;;) {
            if (kvx_send_begin(tx, peer, id, 0) < 0) return 1;
            for (uint32_t layer = 0; layer < l.n_layers; layer++)
                if (kvx_send_layer(tx, id, (int)layer, pairs, n) < 0) return 1;
            int w = wait_final(tx, id, 20 * TD_NS_PER_S);
            if (w == 0) break;
            if (w != TD_ENOENT) return 1;
            td_sleep_ns(TD_NS_PER_MS);
            t0 = td_now_ns();
        }
        if (r >= CHECK_REQS) {
            t_bench += td_now_ns() - t0;
            bench_bytes += (size_t)n * l.n_layers * bb;
        }
    }
    kvx_stats s;
    kvx_ep_stats(tx, &s);
    kvx_ep_destroy(tx);
    waitpid(pid, &st, 0);
    int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    printf("%s %s: %d requests checked byte-exact; %d x %zu MiB in %.1f ms = %.1f GB/s "
           "(incl. per-request handshake and per-layer events)\n",
           ok ? "PASS" : "FAIL", transport, CHECK_REQS, BENCH_REQS, kv_layout_pool_bytes(&l) >> 20,
           td_ns_to_ms(t_bench), (double)bench_bytes / td_ns_to_s(t_bench) / 1e9);
    if (!strcmp(transport, "nccl"))
        printf("nccl communicators: %d holding %.1f MiB\n", s.comms,
               (double)s.comm_bytes / (1 << 20));
    return ok ? 0 : 1;
}
