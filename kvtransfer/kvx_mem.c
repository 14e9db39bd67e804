/* kvx memory: the pools transports allocate themselves, and the copy the
 * same-host transports move blocks with.
 *
 * Pools are touched once when they are made, so that no transfer pays for
 * page faults (a 64 MiB pool is 16384 of them at 4 KiB, each zeroing a page
 * inside the first transfers), and anonymous ones are advised to use huge
 * pages where the kernel allows it (fewer TLB misses while blocks stream
 * through).
 *
 * The copy uses non-temporal (streaming) stores for large runs: a block
 * written into another process's pool is not read again by this core, so
 * pulling its destination lines into the cache first (what ordinary stores
 * do) only costs memory bandwidth. On this kind of host that reads about
 * 1.6x faster than glibc's memcpy for 256 KiB blocks (see
 * docs/kvtransfer.md, "Where the time went"). */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "common/err.h"
#include "kvtransfer/kvx_internal.h"

#if defined(__x86_64__) || defined(__SSE2__)
#include <immintrin.h>
#define KVX__HAVE_STREAM 1
#endif

/* Runs shorter than this are copied with memcpy: they are likely cached,
 * and the fence after streaming stores is not free. Bytes. */
#define KVX__STREAM_MIN (64u << 10)

int kvx__pool_map(size_t bytes, void **out)
{
    *out = NULL;
    if (bytes == 0) return TD_EINVAL;
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return td_err_from_errno(errno);
#ifdef MADV_HUGEPAGE
    /* Advice only: refused where transparent huge pages are off. */
    (void)madvise(m, bytes, MADV_HUGEPAGE);
#endif
    /* Fault every page in now, not during a transfer. MADV_POPULATE_WRITE
     * does it without writing each page a second time after the kernel
     * zeroed it; memset where the kernel is older (EINVAL). */
    int populated = 0;
#ifdef MADV_POPULATE_WRITE
    populated = madvise(m, bytes, MADV_POPULATE_WRITE) == 0;
#endif
    if (!populated) memset(m, 0, bytes);
    *out = m;
    return 0;
}

void kvx__pool_unmap(void *pool, size_t bytes)
{
    if (pool) munmap(pool, bytes);
}

#ifdef KVX__HAVE_STREAM
/* 16-byte streaming stores (SSE2: every x86-64). */
static void copy_stream16(uint8_t *d, const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
}

/* 32-byte streaming stores where the CPU has AVX: half the instructions per
 * line, and 12-20% more bytes per second than the 16-byte loop on the AVX2
 * development host (docs/kvtransfer.md). */
__attribute__((target("avx"))) static void copy_stream32(uint8_t *d, const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(s + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + i + 32));
        _mm256_stream_si256((__m256i *)(d + i), a);
        _mm256_stream_si256((__m256i *)(d + i + 32), b);
    }
}
#endif

void kvx__copy_stream(void *dst, const void *src, size_t n, int wide)
{
#ifdef KVX__HAVE_STREAM
    uint8_t *d = dst;
    const uint8_t *s = src;
    /* Streaming stores need an aligned destination: the bytes up to the
     * next 32-byte boundary go with memcpy, then whole 64-byte lines, then
     * the tail. */
    size_t head = (32 - ((uintptr_t)d & 31)) & 31;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    if (wide)
        copy_stream32(d, s, body);
    else
        copy_stream16(d, s, body);
    /* Streaming stores are weakly ordered: the "written" notice that
     * follows must not overtake them. */
    _mm_sfence();
    memcpy(d + body, s + body, n - body);
#else
    (void)wide;
    memcpy(dst, src, n);
#endif
}

void kvx__copy(void *dst, const void *src, size_t n)
{
#ifdef KVX__HAVE_STREAM
    if (n >= KVX__STREAM_MIN) {
        /* A load and a test: libgcc fills the CPU model before main. */
        kvx__copy_stream(dst, src, n, __builtin_cpu_supports("avx"));
        return;
    }
#endif
    memcpy(dst, src, n);
}
