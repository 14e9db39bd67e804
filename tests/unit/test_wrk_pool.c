/* Unit tests for worker/wrk_pool: objects are recycled, never handed to two
 * holders at once, kept up to `keep`, and safe across threads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "worker/wrk_pool.h"

static void test_init_errors(void **state)
{
    (void)state;
    wrk_pool p;
    assert_int_equal(wrk_pool_init(NULL, 64, 1, 1), TD_EINVAL);
    assert_int_equal(wrk_pool_init(&p, 0, 0, 4), TD_EINVAL);
    wrk_pool_fini(&p);
    assert_int_equal(wrk_pool_init(&p, 64, 5, 4), TD_EINVAL);
    wrk_pool_fini(&p);
    wrk_pool_fini(NULL);
    wrk_pool zero = {0};
    wrk_pool_fini(&zero);
}

/* Live objects are distinct and do not overlap; a put object comes back
 * (last put, first got) instead of a new allocation. */
static void test_no_alias_and_reuse(void **state)
{
    (void)state;
    enum { N = 8, BYTES = 100 };
    wrk_pool p;
    assert_int_equal(wrk_pool_init(&p, BYTES, 4, 8), 0);
    assert_int_equal(p.n_made, 4);
    unsigned char *o[N];
    for (int i = 0; i < N; i++) {
        o[i] = wrk_pool_get(&p);
        assert_non_null(o[i]);
        memset(o[i], i + 1, BYTES); /* all of it is the holder's (ASan checks) */
    }
    assert_int_equal(p.n_made, N); /* four made at init, four on demand */
    assert_int_equal(p.n_out, N);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++)
            if (i != j) assert_true(o[i] + BYTES <= o[j] || o[j] + BYTES <= o[i]);
    for (int i = 0; i < N; i++)
        for (int k = 0; k < BYTES; k++)
            assert_int_equal(o[i][k], i + 1); /* nobody else wrote it */

    unsigned char *freed = o[3];
    wrk_pool_put(&p, freed);
    unsigned char *again = wrk_pool_get(&p);
    assert_ptr_equal(again, freed);
    for (int i = 0; i < N; i++)
        if (i != 3) assert_ptr_not_equal(again, o[i]);
    assert_int_equal(p.n_made, N); /* recycled, not allocated */
    o[3] = again;
    for (int i = 0; i < N; i++)
        wrk_pool_put(&p, o[i]);
    wrk_pool_put(&p, NULL);
    assert_int_equal(p.n_out, 0);
    assert_int_equal(p.n_idle, N);
    wrk_pool_fini(&p);
}

/* A burst beyond keep: the extra objects go back to malloc on put. */
static void test_keep_bound(void **state)
{
    (void)state;
    wrk_pool p;
    assert_int_equal(wrk_pool_init(&p, 32, 2, 3), 0);
    void *o[6];
    for (int i = 0; i < 6; i++)
        assert_non_null(o[i] = wrk_pool_get(&p));
    assert_int_equal(p.n_made, 6);
    for (int i = 0; i < 6; i++)
        wrk_pool_put(&p, o[i]);
    assert_int_equal(p.n_idle, 3);
    assert_int_equal(p.n_out, 0);
    /* The steady state after it: gets and puts below keep make nothing. */
    for (int round = 0; round < 100; round++) {
        void *a = wrk_pool_get(&p), *b = wrk_pool_get(&p);
        assert_non_null(a);
        assert_non_null(b);
        assert_ptr_not_equal(a, b);
        wrk_pool_put(&p, b);
        wrk_pool_put(&p, a);
    }
    assert_int_equal(p.n_made, 6);
    wrk_pool_fini(&p);
}

/* Takers on two threads, a giver on a third (as the gRPC threads take slots
 * and the engine thread gives them back): every object held is held by one
 * thread only, which a stamp written and re-read proves. */
enum { T_ROUNDS = 20000, T_BYTES = 48 };

typedef struct taker {
    wrk_pool *p;
    int id;
    int clashes;
} taker;

static void *taker_run(void *arg)
{
    taker *t = arg;
    for (int i = 0; i < T_ROUNDS; i++) {
        uint32_t *o = wrk_pool_get(t->p);
        if (!o) continue;
        for (int k = 0; k < T_BYTES / 4; k++)
            o[k] = (uint32_t)(t->id << 24 | i);
        for (int k = 0; k < T_BYTES / 4; k++)
            if (o[k] != (uint32_t)(t->id << 24 | i)) t->clashes++;
        wrk_pool_put(t->p, o);
    }
    return NULL;
}

static void test_threads(void **state)
{
    (void)state;
    wrk_pool p;
    assert_int_equal(wrk_pool_init(&p, T_BYTES, 2, 4), 0);
    taker t[3] = {{&p, 1, 0}, {&p, 2, 0}, {&p, 3, 0}};
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(pthread_create(&th[i], NULL, taker_run, &t[i]), 0);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 3; i++)
        assert_int_equal(t[i].clashes, 0);
    assert_int_equal(p.n_out, 0);
    assert_true(p.n_made <= 3); /* never more than the three holders need */
    wrk_pool_fini(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_errors),
        cmocka_unit_test(test_no_alias_and_reuse),
        cmocka_unit_test(test_keep_bound),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
