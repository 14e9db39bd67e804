/* Unit tests for common/mpscq. Run with --bench for a throughput figure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/mpscq.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct item {
    int producer;
    int seq;
    mpscq_node node;
};

static int fd_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc = poll(&p, 1, 0);
    assert_true(rc >= 0);
    return rc > 0;
}

static void test_init_errors(void **state)
{
    (void)state;
    mpscq q;
    assert_int_equal(mpscq_init(NULL), TD_EINVAL);
    assert_int_equal(mpscq_init_wake(NULL, NULL, NULL), TD_EINVAL);
    assert_int_equal(mpscq_init_wake(&q, NULL, NULL), TD_EINVAL);
    assert_int_equal(mpscq_fd(NULL), -1);
    mpscq_close(NULL);
}

static void test_fifo_and_fd(void **state)
{
    (void)state;
    mpscq q;
    assert_int_equal(mpscq_init(&q), 0);
    int fd = mpscq_fd(&q);
    assert_true(fd >= 0);
    assert_null(mpscq_pop(&q));
    assert_false(fd_readable(fd));

    struct item it[5];
    for (int i = 0; i < 5; i++) {
        it[i].seq = i;
        mpscq_push(&q, &it[i].node);
    }
    assert_true(fd_readable(fd));
    /* Five pushes, one wake-up: only the first push after an ack writes. */
    uint64_t v = 0;
    assert_int_equal(read(fd, &v, sizeof(v)), (ssize_t)sizeof(v));
    assert_int_equal(v, 1);
    mpscq_ack(&q);
    assert_false(fd_readable(fd));
    for (int i = 0; i < 5; i++) {
        mpscq_node *n = mpscq_pop(&q);
        assert_non_null(n);
        assert_int_equal(mpscq_entry(n, struct item, node)->seq, i);
    }
    assert_null(mpscq_pop(&q));
    assert_null(mpscq_pop(&q));

    /* The queue works again after running empty (stub re-linked), and the
     * next push after an ack wakes again. */
    mpscq_push(&q, &it[0].node);
    assert_true(fd_readable(fd));
    mpscq_ack(&q);
    assert_false(fd_readable(fd));
    mpscq_push(&q, &it[1].node);
    assert_true(fd_readable(fd));
    mpscq_ack(&q);
    assert_ptr_equal(mpscq_pop(&q), &it[0].node);
    /* Interleave pushes and pops around the last element. */
    mpscq_push(&q, &it[2].node);
    assert_ptr_equal(mpscq_pop(&q), &it[1].node);
    assert_ptr_equal(mpscq_pop(&q), &it[2].node);
    assert_null(mpscq_pop(&q));
    mpscq_ack(&q);
    mpscq_close(&q);
}

static void noop_wake(void *arg)
{
    (void)arg;
}

static void test_wait_timeout(void **state)
{
    (void)state;
    mpscq q;
    assert_int_equal(mpscq_init(&q), 0);
    int64_t t0 = td_now_ns();
    assert_int_equal(mpscq_wait(&q, 20 * TD_NS_PER_MS), TD_ETIMEDOUT);
    assert_true(td_now_ns() - t0 >= 20 * TD_NS_PER_MS);
    struct item it;
    mpscq_push(&q, &it.node);
    assert_int_equal(mpscq_wait(&q, 0), 0);
    assert_false(fd_readable(mpscq_fd(&q))); /* wait acked */
    assert_ptr_equal(mpscq_pop(&q), &it.node);
    assert_int_equal(mpscq_wait(&q, 0), TD_ETIMEDOUT);
    mpscq_close(&q);

    mpscq w;
    assert_int_equal(mpscq_init_wake(&w, noop_wake, NULL), 0);
    assert_int_equal(mpscq_wait(&w, 0), TD_EINVAL); /* no fd in wake mode */
    mpscq_close(&w);
}

/* Many producers, one consumer that sleeps in poll() between drains. A lost
 * wake-up shows as a poll timeout with items missing; a broken list shows as
 * lost, duplicated or reordered items. */
enum { PRODUCERS = 4, PER_PRODUCER = 40000 };

struct stress {
    mpscq *q;
    struct item *items; /* PRODUCERS * PER_PRODUCER */
    int id;
};

static void *producer(void *arg)
{
    struct stress *s = arg;
    for (int i = 0; i < PER_PRODUCER; i++) {
        struct item *it = &s->items[s->id * PER_PRODUCER + i];
        it->producer = s->id;
        it->seq = i;
        mpscq_push(s->q, &it->node);
        if ((i & 255) == 0) sched_yield(); /* let the consumer run dry and go back to sleep */
    }
    return NULL;
}

static void check_item(mpscq_node *n, int *next_seq, long *total)
{
    struct item *it = mpscq_entry(n, struct item, node);
    assert_true(it->producer >= 0 && it->producer < PRODUCERS);
    assert_int_equal(it->seq, next_seq[it->producer]); /* per-producer FIFO, no dup/loss */
    next_seq[it->producer]++;
    (*total)++;
}

static void test_threads_eventfd(void **state)
{
    (void)state;
    mpscq q;
    assert_int_equal(mpscq_init(&q), 0);
    struct item *items = calloc(PRODUCERS * PER_PRODUCER, sizeof(*items));
    assert_non_null(items);
    struct stress s[PRODUCERS];
    pthread_t th[PRODUCERS];
    for (int p = 0; p < PRODUCERS; p++) {
        s[p] = (struct stress){.q = &q, .items = items, .id = p};
        assert_int_equal(pthread_create(&th[p], NULL, producer, &s[p]), 0);
    }
    int next_seq[PRODUCERS] = {0};
    long total = 0, wakeups = 0;
    while (total < (long)PRODUCERS * PER_PRODUCER) {
        struct pollfd p = {.fd = mpscq_fd(&q), .events = POLLIN};
        int rc = poll(&p, 1, 10000);
        assert_int_equal(rc, 1); /* 10 s without a wake-up: one was lost */
        wakeups++;
        mpscq_ack(&q);
        mpscq_node *n;
        while ((n = mpscq_pop(&q)) != NULL)
            check_item(n, next_seq, &total);
    }
    for (int p = 0; p < PRODUCERS; p++) {
        assert_int_equal(pthread_join(th[p], NULL), 0);
        assert_int_equal(next_seq[p], PER_PRODUCER);
    }
    assert_null(mpscq_pop(&q));
    assert_true(wakeups >= 1);
    mpscq_close(&q);
    free(items);
}

/* Same with a wake function (the uv_async_send pattern), here a semaphore. */
static void sem_wake(void *arg)
{
    sem_post(arg);
}

static void test_threads_wake_fn(void **state)
{
    (void)state;
    sem_t sem;
    assert_int_equal(sem_init(&sem, 0, 0), 0);
    mpscq q;
    assert_int_equal(mpscq_init_wake(&q, sem_wake, &sem), 0);
    assert_int_equal(mpscq_fd(&q), -1);
    struct item *items = calloc(PRODUCERS * PER_PRODUCER, sizeof(*items));
    assert_non_null(items);
    struct stress s[PRODUCERS];
    pthread_t th[PRODUCERS];
    for (int p = 0; p < PRODUCERS; p++) {
        s[p] = (struct stress){.q = &q, .items = items, .id = p};
        assert_int_equal(pthread_create(&th[p], NULL, producer, &s[p]), 0);
    }
    int next_seq[PRODUCERS] = {0};
    long total = 0;
    while (total < (long)PRODUCERS * PER_PRODUCER) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 10;
        int rc;
        while ((rc = sem_timedwait(&sem, &ts)) != 0 && errno == EINTR) {
        }
        assert_int_equal(rc, 0); /* lost wake-up */
        mpscq_ack(&q);
        mpscq_node *n;
        while ((n = mpscq_pop(&q)) != NULL)
            check_item(n, next_seq, &total);
    }
    for (int p = 0; p < PRODUCERS; p++)
        assert_int_equal(pthread_join(th[p], NULL), 0);
    mpscq_close(&q);
    sem_destroy(&sem);
    free(items);
}

struct bench_arg {
    mpscq *q;
    struct item *items;
    int n;
};

static void *bench_producer(void *arg)
{
    struct bench_arg *b = arg;
    for (int i = 0; i < b->n; i++)
        mpscq_push(b->q, &b->items[i].node);
    return NULL;
}

static int bench(void)
{
    enum { N = 2000000 };
    for (int producers = 1; producers <= 2; producers++) {
        mpscq q;
        if (mpscq_init(&q) != 0) return 1;
        struct item *items = calloc((size_t)N * producers, sizeof(*items));
        if (!items) return 1;
        pthread_t th[2];
        struct bench_arg args[2];
        int64_t t0 = td_now_ns();
        for (int p = 0; p < producers; p++) {
            args[p] = (struct bench_arg){.q = &q, .items = items + (size_t)p * N, .n = N};
            pthread_create(&th[p], NULL, bench_producer, &args[p]);
        }
        long got = 0, wakeups = 0;
        while (got < (long)N * producers) {
            if (mpscq_wait(&q, 5 * TD_NS_PER_S) != 0) return 1;
            wakeups++;
            while (mpscq_pop(&q))
                got++;
        }
        int64_t dt = td_now_ns() - t0;
        for (int p = 0; p < producers; p++)
            pthread_join(th[p], NULL);
        printf("mpscq: %d producer(s) -> 1 consumer: %.1f M items/s, %.1f ns/item, "
               "%ld wake-ups for %ld items\n",
               producers, (double)got / ((double)dt / 1e9) / 1e6, (double)dt / (double)got, wakeups,
               got);
        mpscq_close(&q);
        free(items);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_errors),     cmocka_unit_test(test_fifo_and_fd),
        cmocka_unit_test(test_wait_timeout),    cmocka_unit_test(test_threads_eventfd),
        cmocka_unit_test(test_threads_wake_fn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
