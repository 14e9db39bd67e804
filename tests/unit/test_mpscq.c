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
#include <stdbool.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

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
        if ((i & 63) == 0) sched_yield(); /* let the consumer run dry and go back to sleep */
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

/* The two libuv patterns the router can use: uv_async as the wake function,
 * or uv_poll on the eventfd. The loop drains on each callback; a timer fails
 * the test if items stop arriving (a lost wake-up). */
struct uvctx {
    mpscq q;
    uv_async_t async;
    uv_poll_t poll;
    uv_timer_t timer;
    int next_seq[PRODUCERS];
    long total;
    bool timed_out;
};

static void uv_drain(struct uvctx *u)
{
    mpscq_ack(&u->q);
    mpscq_node *n;
    while ((n = mpscq_pop(&u->q)) != NULL)
        check_item(n, u->next_seq, &u->total);
    if (u->total == (long)PRODUCERS * PER_PRODUCER) {
        if (!uv_is_closing((uv_handle_t *)&u->timer)) uv_close((uv_handle_t *)&u->timer, NULL);
        if (u->async.loop && !uv_is_closing((uv_handle_t *)&u->async))
            uv_close((uv_handle_t *)&u->async, NULL);
        if (u->poll.loop && !uv_is_closing((uv_handle_t *)&u->poll))
            uv_close((uv_handle_t *)&u->poll, NULL);
    }
}

static void on_async(uv_async_t *a)
{
    uv_drain(a->data);
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    assert_int_equal(status, 0);
    assert_true(events & UV_READABLE);
    uv_drain(p->data);
}

static void on_timeout(uv_timer_t *t)
{
    struct uvctx *u = t->data;
    u->timed_out = true;
    uv_stop(t->loop);
}

static void uv_async_wake(void *arg)
{
    uv_async_send(arg);
}

static void run_uv(bool use_poll)
{
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    struct uvctx *u = calloc(1, sizeof(*u));
    assert_non_null(u);
    if (use_poll) {
        assert_int_equal(mpscq_init(&u->q), 0);
        assert_int_equal(uv_poll_init(&loop, &u->poll, mpscq_fd(&u->q)), 0);
        u->poll.data = u;
        assert_int_equal(uv_poll_start(&u->poll, UV_READABLE, on_poll), 0);
    } else {
        assert_int_equal(uv_async_init(&loop, &u->async, on_async), 0);
        u->async.data = u;
        assert_int_equal(mpscq_init_wake(&u->q, uv_async_wake, &u->async), 0);
    }
    assert_int_equal(uv_timer_init(&loop, &u->timer), 0);
    u->timer.data = u;
    assert_int_equal(uv_timer_start(&u->timer, on_timeout, 10000, 0), 0);

    struct item *items = calloc(PRODUCERS * PER_PRODUCER, sizeof(*items));
    assert_non_null(items);
    struct stress s[PRODUCERS];
    pthread_t th[PRODUCERS];
    for (int p = 0; p < PRODUCERS; p++) {
        s[p] = (struct stress){.q = &u->q, .items = items, .id = p};
        assert_int_equal(pthread_create(&th[p], NULL, producer, &s[p]), 0);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int p = 0; p < PRODUCERS; p++)
        assert_int_equal(pthread_join(th[p], NULL), 0);
    if (u->timed_out) /* a failed test may leak; it stops here */
        fail_msg("no wake-up for 10 s: %ld of %d items", u->total, PRODUCERS * PER_PRODUCER);
    assert_int_equal(u->total, (long)PRODUCERS * PER_PRODUCER);
    assert_int_equal(uv_loop_close(&loop), 0);
    mpscq_close(&u->q);
    free(u);
    free(items);
}

static void test_libuv_async(void **state)
{
    (void)state;
    run_uv(false);
}

static void test_libuv_poll(void **state)
{
    (void)state;
    run_uv(true);
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
        cmocka_unit_test(test_threads_wake_fn), cmocka_unit_test(test_libuv_async),
        cmocka_unit_test(test_libuv_poll),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
