/* mpscq: a multi-producer, single-consumer queue with a wake-up.
 *
 * Intrusive: the caller embeds a struct mpscq_node in its own struct and
 * pushes a pointer to it, so a push allocates nothing. The queue never owns
 * or frees nodes: a node belongs to the queue from mpscq_push until
 * mpscq_pop returns it, and to the caller otherwise. Order is FIFO per
 * producer thread (pushes from one thread pop in the order they were made).
 *
 * Design: Dmitry Vyukov's intrusive MPSC list. A push is one atomic exchange
 * on the tail plus one store, wait-free, never blocks. The consumer reads the
 * head without atomics read-modify-write. There is one subtle window: between
 * a producer's exchange and its store the list is briefly unlinked, and
 * mpscq_pop returns NULL although an item is on its way; that producer's wake
 * (below) comes after its store, so the consumer is woken again and finds it.
 *
 * Wake-up: a producer that finds the queue "not signalled" sets the flag and
 * wakes the consumer: by default it writes an eventfd (mpscq_fd), or it calls
 * a function given at init (for libuv: uv_async_send). Only the first push
 * after the consumer acknowledged pays for the syscall; the rest only do an
 * atomic exchange on the flag.
 *
 * Consumer protocol (no lost wake-ups, tested with threads):
 *     wait until mpscq_fd(q) is readable (poll/epoll/uv_poll) or your wake
 *     function ran;
 *     mpscq_ack(q);                          -- before draining, not after
 *     while ((n = mpscq_pop(q)) != NULL) handle(n);
 * Every item pushed is either returned by a pop after the latest ack, or its
 * push wakes the consumer again after that ack.
 *
 * With libuv (router): either
 *   - eventfd mode + uv_poll_init(loop, &poll, mpscq_fd(q)) watching
 *     UV_READABLE; the poll callback runs the protocol above; or
 *   - wake mode: mpscq_init_wake(q, wake, &async) where wake calls
 *     uv_async_send(&async); the async callback runs the protocol above.
 *     uv_async_send is safe from any thread and coalesces by itself.
 */
#ifndef TANDEM_COMMON_MPSCQ_H
#define TANDEM_COMMON_MPSCQ_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Embed one in the struct you enqueue. Its contents are private. */
typedef struct mpscq_node {
    _Atomic(struct mpscq_node *) next;
} mpscq_node;

/* Pointer to the struct of type `type` whose member `member` is the node. */
#define mpscq_entry(node, type, member) ((type *)((char *)(node)-offsetof(type, member)))

/* Called by a producer thread to wake the consumer; must be thread-safe and
 * must not block for long (uv_async_send is a good one). */
typedef void (*mpscq_wake_fn)(void *arg);

/* Embeddable; every field is private. The producer side and the consumer
 * side are kept 64 bytes apart so they never share a cache line. (Padding
 * rather than _Alignas(64): the struct stays valid inside malloc'd memory,
 * which is only 16-byte aligned.) */
typedef struct mpscq {
    _Atomic(mpscq_node *) tail; /* producers */
    _Atomic int signalled;      /* producers set, consumer clears */
    char pad_[64];
    mpscq_node *head; /* consumer only */
    mpscq_node stub;
    int efd;            /* eventfd, or -1 in wake mode */
    mpscq_wake_fn wake; /* NULL in eventfd mode */
    void *wake_arg;
} mpscq;

/* Initialises an empty queue with a non-blocking eventfd as its wake-up.
 * Returns 0 or a negative TD_E* code (errno converted). */
int mpscq_init(mpscq *q);

/* Initialises an empty queue whose producers call wake(wake_arg) instead of
 * writing an eventfd. wake_arg is not owned and must outlive the queue.
 * Returns 0 or TD_EINVAL. */
int mpscq_init_wake(mpscq *q, mpscq_wake_fn wake, void *wake_arg);

/* Closes the eventfd. Nodes still queued are not touched (the caller owns
 * them: drain first if they need freeing). No producer may push during or
 * after close. NULL is fine. */
void mpscq_close(mpscq *q);

/* Any thread. Never blocks, never fails, allocates nothing. The node must not
 * be in any queue already. */
void mpscq_push(mpscq *q, mpscq_node *node);

/* Consumer thread only. Returns the oldest node, or NULL when the queue is
 * empty (or a push is half done: a wake-up follows, see above). */
mpscq_node *mpscq_pop(mpscq *q);

/* Consumer thread only: clears the wake-up (reads the eventfd, clears the
 * flag). Call it each time you are woken, before draining with mpscq_pop. */
void mpscq_ack(mpscq *q);

/* The eventfd to poll for readability, or -1 in wake mode. Owned by q. */
int mpscq_fd(const mpscq *q);

/* Consumer thread, eventfd mode: blocks until the fd is readable or timeout_ns
 * passed (negative: forever), then acks. Returns 0 when woken, TD_ETIMEDOUT,
 * or another negative TD_E* code. For threads without an event loop. */
int mpscq_wait(mpscq *q, int64_t timeout_ns);

#endif
