/* Allocation failure injection for unit tests.
 *
 * A test that includes this header must be linked with
 *   -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=strdup,--wrap=aligned_alloc
 * (see common/CMakeLists.txt): calls from the library objects linked into the
 * test then go through the wrappers below, which pass through to the real
 * allocator unless a failure is armed. Only the armed call fails; later ones
 * succeed, which exercises the cleanup after a partial failure. */
#ifndef TANDEM_TESTS_FAIL_ALLOC_H
#define TANDEM_TESTS_FAIL_ALLOC_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

static _Atomic long fail_alloc_countdown = -1; /* -1: off; n: fail the call that finds 0 */
static _Atomic long fail_alloc_hits;

static void fail_alloc_arm(long n)
{
    atomic_store(&fail_alloc_hits, 0);
    atomic_store(&fail_alloc_countdown, n);
}

/* Disarms; returns how many allocations were failed since arming. */
static long fail_alloc_disarm(void)
{
    atomic_store(&fail_alloc_countdown, -1);
    return atomic_load(&fail_alloc_hits);
}

static bool fail_alloc_now(void)
{
    long n = atomic_load(&fail_alloc_countdown);
    while (n >= 0) {
        if (atomic_compare_exchange_weak(&fail_alloc_countdown, &n, n - 1)) {
            if (n == 0) {
                atomic_fetch_add(&fail_alloc_hits, 1);
                return true;
            }
            return false;
        }
    }
    return false;
}

void *__real_malloc(size_t size);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t size);
char *__real_strdup(const char *s);
void *__real_aligned_alloc(size_t align, size_t size);

void *__wrap_malloc(size_t size);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t size);
char *__wrap_strdup(const char *s);
void *__wrap_aligned_alloc(size_t align, size_t size);

void *__wrap_malloc(size_t size)
{
    return fail_alloc_now() ? NULL : __real_malloc(size);
}

void *__wrap_calloc(size_t n, size_t size)
{
    return fail_alloc_now() ? NULL : __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t size)
{
    return fail_alloc_now() ? NULL : __real_realloc(p, size);
}

char *__wrap_strdup(const char *s)
{
    return fail_alloc_now() ? NULL : __real_strdup(s);
}

void *__wrap_aligned_alloc(size_t align, size_t size)
{
    return fail_alloc_now() ? NULL : __real_aligned_alloc(align, size);
}

#endif
