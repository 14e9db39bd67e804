/* wrk_pool: fixed-size objects recycled through a free list, so a worker's
 * steady-state requests do not call malloc with a size of their own.
 *
 * Why: a request's buffers (its prompt, its block pairs) were sized to the
 * request, allocated on the gRPC thread and freed on the engine thread:
 * four mallocs of varied sizes per prefill request, spread over two
 * threads' heaps. Objects of one size, made once and handed round, leave
 * nothing behind for the heaps to fragment.
 *
 * Sizing: every object is obj_bytes (the caller sizes it once from its
 * limits, e.g. the longest prompt the engine accepts). wrk_pool_init makes
 * `prealloc` of them and writes each once (resident from the start); when
 * they are all out, wrk_pool_get makes one more (a burst is never refused
 * for want of an object); wrk_pool_put keeps at most `keep` idle objects
 * and frees the rest, so a burst does not pin its peak for ever.
 *
 * Ownership: an object belongs to the caller from wrk_pool_get until it
 * passes it to wrk_pool_put, and to the pool otherwise; two gets never
 * return the same object unless it was put in between. The pool owns the
 * idle objects and frees them in wrk_pool_fini; an object still out then
 * stays the caller's (fini does not free it; put it back first).
 *
 * Threads: get and put may be called from any thread (one mutex). In ASan
 * builds an idle object is poisoned, so a use after put is reported.
 */
#ifndef TANDEM_WORKER_WRK_POOL_H
#define TANDEM_WORKER_WRK_POOL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct wrk_pool_obj wrk_pool_obj;

typedef struct wrk_pool {
    pthread_mutex_t mu;
    size_t obj_bytes;   /* bytes of every object (>= a pointer, malloc-aligned) */
    uint32_t keep;      /* idle objects kept at most */
    uint32_t n_idle;    /* objects on the free list */
    uint32_t n_out;     /* objects handed out and not put back */
    uint64_t n_made;    /* objects ever allocated (a steady state stops adding) */
    wrk_pool_obj *idle; /* free list, last put first */
} wrk_pool;

/* Sets p up for objects of obj_bytes and allocates prealloc of them
 * (prealloc <= keep). TD_EINVAL on a zero size or prealloc > keep,
 * TD_ENOMEM (p left empty and safe to fini) when they cannot be made. */
int wrk_pool_init(wrk_pool *p, size_t obj_bytes, uint32_t prealloc, uint32_t keep);

/* An object of obj_bytes, contents unspecified (the caller initialises
 * what it uses); NULL only when none is idle and malloc fails. */
void *wrk_pool_get(wrk_pool *p);

/* Gives obj (from wrk_pool_get on p; NULL is ignored) back to the pool. */
void wrk_pool_put(wrk_pool *p, void *obj);

/* Frees the idle objects (not those still out: put them back first).
 * Accepts a pool that init never set up (zeroed) or failed on. */
void wrk_pool_fini(wrk_pool *p);

#endif
