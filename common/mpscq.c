#include "mpscq.h"

#include "clock.h"
#include "err.h"
#include "log.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

static void queue_reset(mpscq *q)
{
    atomic_store_explicit(&q->stub.next, NULL, memory_order_relaxed);
    atomic_store_explicit(&q->tail, &q->stub, memory_order_relaxed);
    q->head = &q->stub;
    atomic_store_explicit(&q->signalled, 0, memory_order_relaxed);
}

int mpscq_init(mpscq *q)
{
    if (!q) return TD_EINVAL;
    memset(q, 0, sizeof(*q));
    queue_reset(q);
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        int e = errno;
        td_log_error("mpscq", "eventfd_failed", "errno=%d", e);
        return td_err_from_errno(e);
    }
    return 0;
}

int mpscq_init_wake(mpscq *q, mpscq_wake_fn wake, void *wake_arg)
{
    if (!q || !wake) return TD_EINVAL;
    memset(q, 0, sizeof(*q));
    queue_reset(q);
    q->efd = -1;
    q->wake = wake;
    q->wake_arg = wake_arg;
    return 0;
}

void mpscq_close(mpscq *q)
{
    if (!q) return;
    if (q->efd >= 0) close(q->efd);
    q->efd = -1;
}

/* Links node at the tail. After the exchange the node is the tail, but its
 * predecessor points to it only after the store: that gap is the one window
 * in which pop may see an unfinished list. */
static void link_node(mpscq *q, mpscq_node *node)
{
    atomic_store_explicit(&node->next, NULL, memory_order_relaxed);
    mpscq_node *prev = atomic_exchange_explicit(&q->tail, node, memory_order_acq_rel);
    atomic_store_explicit(&prev->next, node, memory_order_release);
}

static void wake(mpscq *q)
{
    if (q->wake) {
        q->wake(q->wake_arg);
        return;
    }
    uint64_t one = 1;
    /* Can only fail with EAGAIN when the 64-bit counter would overflow, which
     * one write per ack cycle cannot reach; EINTR does not apply (non-blocking). */
    while (write(q->efd, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
}

void mpscq_push(mpscq *q, mpscq_node *node)
{
    link_node(q, node);
    /* seq_cst exchange after the link: if the consumer's ack (also an
     * exchange) comes later in the flag's order it synchronises with us and
     * its pops see the link; if it came earlier we read 0 (or a producer
     * after it did) and a wake-up is on its way. */
    if (atomic_exchange(&q->signalled, 1) == 0) wake(q);
}

mpscq_node *mpscq_pop(mpscq *q)
{
    mpscq_node *head = q->head;
    mpscq_node *next = atomic_load_explicit(&head->next, memory_order_acquire);
    if (head == &q->stub) {
        if (!next) return NULL; /* empty, or the first push is half done */
        q->head = next;
        head = next;
        next = atomic_load_explicit(&head->next, memory_order_acquire);
    }
    if (next) {
        q->head = next;
        return head;
    }
    /* head is the last linked node. If it is not the tail, a producer is
     * between its exchange and its store: come back after its wake-up. */
    if (head != atomic_load_explicit(&q->tail, memory_order_acquire)) return NULL;
    /* Put the stub behind head so head can be handed out while the list
     * stays non-empty for producers. */
    link_node(q, &q->stub);
    next = atomic_load_explicit(&head->next, memory_order_acquire);
    if (next) {
        q->head = next;
        return head;
    }
    return NULL; /* a producer slipped in before the stub and is half done */
}

void mpscq_ack(mpscq *q)
{
    if (q->efd >= 0) {
        uint64_t value;
        /* EAGAIN (counter already zero) is fine: we only want it cleared. */
        while (read(q->efd, &value, sizeof(value)) < 0 && errno == EINTR) {
        }
    }
    (void)atomic_exchange(&q->signalled, 0);
}

int mpscq_fd(const mpscq *q)
{
    return q ? q->efd : -1;
}

int mpscq_wait(mpscq *q, int64_t timeout_ns)
{
    if (!q || q->efd < 0) return TD_EINVAL;
    int64_t deadline = timeout_ns < 0 ? -1 : td_now_ns() + timeout_ns;
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            int64_t left = deadline - td_now_ns();
            if (left < 0) left = 0;
            /* Round up so we never spin on a sub-millisecond remainder. */
            int64_t left_ms = (left + TD_NS_PER_MS - 1) / TD_NS_PER_MS;
            ms = left_ms > 1000000 ? 1000000 : (int)left_ms;
        }
        struct pollfd pfd = {.fd = q->efd, .events = POLLIN};
        int rc = poll(&pfd, 1, ms);
        if (rc > 0) {
            mpscq_ack(q);
            return 0;
        }
        if (rc < 0 && errno != EINTR) return td_err_from_errno(errno);
        if (rc == 0 && deadline >= 0 && td_now_ns() >= deadline) return TD_ETIMEDOUT;
    }
}
