/* Unit tests for common/arena. Run with --bench for a speed figure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/arena.h"
#include "common/clock.h"
#include "common/err.h"
#include "fail_alloc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#ifdef TEST_ASAN
#include <sanitizer/asan_interface.h>
#endif

static void test_init_errors(void **state)
{
    (void)state;
    assert_int_equal(arena_init(NULL, 0), TD_EINVAL);
    arena a;
    assert_int_equal(arena_init(&a, SIZE_MAX), TD_EINVAL);
    assert_int_equal(arena_init(&a, 0), 0);
    assert_int_equal(arena_reserved(&a), 0); /* nothing allocated before first use */
    arena_close(&a);
    arena_close(NULL);
}

static void test_bad_alignment_and_overflow(void **state)
{
    (void)state;
    arena a;
    assert_int_equal(arena_init(&a, 1024), 0);
    assert_null(arena_alloc(&a, 8, 0));
    assert_null(arena_alloc(&a, 8, 3));
    assert_null(arena_alloc(&a, 8, 24));
    assert_null(arena_alloc(&a, 8, ARENA_MAX_ALIGN * 2));
    assert_null(arena_alloc(&a, SIZE_MAX, 8));
    assert_null(arena_alloc(&a, SIZE_MAX - 4, 16));
    assert_null(arena_alloc_array(&a, SIZE_MAX / 2, 4, 4));
    assert_null(arena_alloc(NULL, 8, 8));
    assert_int_equal(arena_used(&a), 0);
    assert_non_null(arena_alloc(&a, 8, ARENA_MAX_ALIGN));
    arena_close(&a);
}

/* Allocations are aligned, disjoint and keep their contents. */
static void test_aligned_disjoint(void **state)
{
    (void)state;
    arena a;
    assert_int_equal(arena_init(&a, 256), 0);
    enum { N = 400 };
    unsigned char *ptr[N];
    size_t len[N];
    for (int i = 0; i < N; i++) {
        size_t align = (size_t)1 << (i % 8); /* 1 .. 128 */
        len[i] = (size_t)(i * 7) % 300;      /* some bigger than a chunk */
        ptr[i] = arena_alloc(&a, len[i], align);
        assert_non_null(ptr[i]);
        assert_int_equal((uintptr_t)ptr[i] % align, 0);
        memset(ptr[i], i & 0xff, len[i]);
    }
    for (int i = 0; i < N; i++)
        for (size_t j = 0; j < len[i]; j++)
            assert_int_equal(ptr[i][j], i & 0xff);
    assert_true(arena_used(&a) >= 400);
    assert_true(arena_reserved(&a) >= arena_used(&a));
    /* A zero-size allocation still gets its own address. */
    void *z1 = arena_alloc(&a, 0, 1), *z2 = arena_alloc(&a, 0, 1);
    assert_non_null(z1);
    assert_ptr_not_equal(z1, z2);
    arena_close(&a);
}

/* After a reset the same sequence reuses the same memory: no new chunk. */
static void test_reset_reuses_chunks(void **state)
{
    (void)state;
    arena a;
    assert_int_equal(arena_init(&a, 512), 0);
    void *first[50];
    for (int i = 0; i < 50; i++)
        first[i] = arena_alloc(&a, 100 + (size_t)i * 13, 16);
    size_t reserved = arena_reserved(&a);
    size_t used = arena_used(&a);
    assert_true(reserved >= used);
    assert_true(used >= 50 * 100);
    for (int round = 0; round < 3; round++) {
        arena_reset(&a);
        assert_int_equal(arena_used(&a), 0);
        for (int i = 0; i < 50; i++)
            assert_ptr_equal(arena_alloc(&a, 100 + (size_t)i * 13, 16), first[i]);
        assert_int_equal(arena_reserved(&a), reserved);
        assert_int_equal(arena_used(&a), used);
    }
    arena_close(&a);
}

/* A big request after a reset does not throw away the small kept chunks: it
 * gets a chunk inserted, and the kept ones are used afterwards. The working
 * set stops growing after one round of a repeating pattern. */
static void test_mixed_pattern_stabilises(void **state)
{
    (void)state;
    arena a;
    assert_int_equal(arena_init(&a, 1024), 0);
    static const size_t pattern[] = {900, 5000, 800, 300, 20000, 1000, 10, 700};
    size_t n = sizeof(pattern) / sizeof(pattern[0]);
    for (size_t i = 0; i < n; i++)
        assert_non_null(arena_alloc(&a, pattern[i], 8));
    arena_reset(&a);
    for (size_t i = n; i-- > 0;) /* reversed order: sizes land in other chunks */
        assert_non_null(arena_alloc(&a, pattern[i], 8));
    size_t reserved = arena_reserved(&a);
    for (int round = 0; round < 3; round++) {
        arena_reset(&a);
        for (size_t i = n; i-- > 0;)
            assert_non_null(arena_alloc(&a, pattern[i], 8));
        assert_int_equal(arena_reserved(&a), reserved);
    }
    arena_close(&a);
}

static void test_calloc_and_strndup(void **state)
{
    (void)state;
    arena a;
    assert_int_equal(arena_init(&a, 128), 0);
    unsigned char *p = arena_alloc(&a, 64, 8);
    memset(p, 0xAB, 64);
    arena_reset(&a);
    unsigned char *q = arena_calloc(&a, 64, 8);
    assert_ptr_equal(p, q); /* same memory, now zeroed */
    for (int i = 0; i < 64; i++)
        assert_int_equal(q[i], 0);
    char *s = arena_strndup(&a, "hello world", 5);
    assert_string_equal(s, "hello");
    s = arena_strndup(&a, "hi", 100);
    assert_string_equal(s, "hi");
    assert_null(arena_strndup(&a, NULL, 3));
    int *arr = arena_alloc_array(&a, 10, sizeof(int), _Alignof(int));
    assert_non_null(arr);
    arr[9] = 7;
    arena_close(&a);
}

static void test_asan_poisoning(void **state)
{
    (void)state;
#ifdef TEST_ASAN
    arena a;
    assert_int_equal(arena_init(&a, 256), 0);
    unsigned char *p = arena_alloc(&a, 24, 8);
    assert_false(__asan_address_is_poisoned(p));
    assert_false(__asan_address_is_poisoned(p + 23));
    assert_true(__asan_address_is_poisoned(p + 24)); /* past the end */
    arena_reset(&a);
    assert_true(__asan_address_is_poisoned(p)); /* use after reset */
    arena_close(&a);
#else
    skip();
#endif
}

/* A failed chunk allocation returns NULL and leaves the arena as it was. */
static void test_alloc_failure(void **state)
{
    (void)state;
    arena a;
    assert_int_equal(arena_init(&a, 128), 0);
    fail_alloc_arm(0);
    assert_null(arena_alloc(&a, 16, 8));
    assert_int_equal(fail_alloc_disarm(), 1);
    assert_int_equal(arena_used(&a), 0);
    assert_int_equal(arena_reserved(&a), 0);
    void *p = arena_alloc(&a, 100, 8);
    assert_non_null(p);
    fail_alloc_arm(0); /* the next request needs a second chunk */
    assert_null(arena_alloc(&a, 100, 8));
    assert_int_equal(fail_alloc_disarm(), 1);
    assert_int_equal(arena_used(&a), 100);
    assert_non_null(arena_alloc(&a, 100, 8));
    arena_close(&a);
}

static int bench(void)
{
    enum { ROUNDS = 20000, PER = 256 };
    arena a;
    if (arena_init(&a, 0) != 0) return 1;
    volatile uintptr_t sink = 0;
    int64_t t0 = td_now_ns();
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < PER; i++)
            sink ^= (uintptr_t)arena_alloc(&a, 48 + (size_t)(i & 7) * 8, 16);
        arena_reset(&a);
    }
    int64_t t1 = td_now_ns();
    void *ptrs[PER];
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < PER; i++) {
            ptrs[i] = malloc(48 + (size_t)(i & 7) * 8);
            sink ^= (uintptr_t)ptrs[i];
        }
        for (int i = 0; i < PER; i++)
            free(ptrs[i]);
    }
    int64_t t2 = td_now_ns();
    double n = (double)ROUNDS * PER;
    printf("arena_alloc: %.2f ns/alloc (reset every %d); malloc+free: %.2f ns/alloc\n",
           (double)(t1 - t0) / n, PER, (double)(t2 - t1) / n);
    arena_close(&a);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_errors),
        cmocka_unit_test(test_bad_alignment_and_overflow),
        cmocka_unit_test(test_aligned_disjoint),
        cmocka_unit_test(test_reset_reuses_chunks),
        cmocka_unit_test(test_mixed_pattern_stabilises),
        cmocka_unit_test(test_calloc_and_strndup),
        cmocka_unit_test(test_asan_poisoning),
        cmocka_unit_test(test_alloc_failure),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
