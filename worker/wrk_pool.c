/* wrk_pool: see wrk_pool.h. */
#include "worker/wrk_pool.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

#if defined(__SANITIZE_ADDRESS__)
#define WRK_POOL_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define WRK_POOL_ASAN 1
#endif
#endif
#ifdef WRK_POOL_ASAN
#include <sanitizer/asan_interface.h>
#define POOL_POISON(a, n)   ASAN_POISON_MEMORY_REGION(a, n)
#define POOL_UNPOISON(a, n) ASAN_UNPOISON_MEMORY_REGION(a, n)
#else
#define POOL_POISON(a, n)   ((void)(a), (void)(n))
#define POOL_UNPOISON(a, n) ((void)(a), (void)(n))
#endif

/* An idle object's first bytes link it into the free list; the rest is
 * poisoned under ASan. */
struct wrk_pool_obj {
    wrk_pool_obj *next;
};

/* Idle objects are poisoned past their link; the link itself is touched
 * only under the pool's mutex. */
static void pool_push(wrk_pool *p, wrk_pool_obj *o)
{
    o->next = p->idle;
    p->idle = o;
    p->n_idle++;
    POOL_POISON((char *)o + sizeof(*o), p->obj_bytes - sizeof(*o));
}

/* Writes every page of a new object once, so the prealloc'd objects are
 * resident from the start (volatile: a memset after malloc may be folded
 * into calloc, which does not touch fresh pages). */
static void pool_touch(void *o, size_t n)
{
    volatile unsigned char *b = o;
    for (size_t off = 0; off < n; off += 4096)
        b[off] = 0;
    b[n - 1] = 0;
}

int wrk_pool_init(wrk_pool *p, size_t obj_bytes, uint32_t prealloc, uint32_t keep)
{
    if (!p) return TD_EINVAL;
    memset(p, 0, sizeof(*p));
    if (obj_bytes == 0 || prealloc > keep) return TD_EINVAL;
    if (obj_bytes < sizeof(wrk_pool_obj)) obj_bytes = sizeof(wrk_pool_obj);
    if (pthread_mutex_init(&p->mu, NULL) != 0) return TD_ENOMEM;
    p->obj_bytes = obj_bytes;
    p->keep = keep;
    for (uint32_t i = 0; i < prealloc; i++) {
        wrk_pool_obj *o = malloc(obj_bytes);
        if (!o) {
            wrk_pool_fini(p);
            return TD_ENOMEM;
        }
        pool_touch(o, obj_bytes);
        p->n_made++;
        pool_push(p, o);
    }
    return 0;
}

void *wrk_pool_get(wrk_pool *p)
{
    pthread_mutex_lock(&p->mu);
    wrk_pool_obj *o = p->idle;
    if (o) {
        p->idle = o->next;
        p->n_idle--;
    }
    if (o) p->n_out++;
    pthread_mutex_unlock(&p->mu);
    if (o) {
        POOL_UNPOISON((char *)o + sizeof(*o), p->obj_bytes - sizeof(*o));
        return o;
    }
    /* All out: one more, of the same size (kept on put while under keep). */
    o = malloc(p->obj_bytes);
    if (!o) return NULL;
    pthread_mutex_lock(&p->mu);
    p->n_made++;
    p->n_out++;
    pthread_mutex_unlock(&p->mu);
    return o;
}

void wrk_pool_put(wrk_pool *p, void *obj)
{
    if (!obj) return;
    wrk_pool_obj *o = obj;
    pthread_mutex_lock(&p->mu);
    assert(p->n_out > 0);
    p->n_out--;
    if (p->n_idle < p->keep) {
        pool_push(p, o);
        o = NULL;
    }
    pthread_mutex_unlock(&p->mu);
    free(o); /* over keep: a burst's extra objects go back to malloc */
}

void wrk_pool_fini(wrk_pool *p)
{
    if (!p || p->obj_bytes == 0) return;
    while (p->idle) {
        wrk_pool_obj *o = p->idle;
        POOL_UNPOISON((char *)o + sizeof(*o), p->obj_bytes - sizeof(*o));
        p->idle = o->next;
        free(o);
    }
    p->n_idle = 0;
    pthread_mutex_destroy(&p->mu);
    p->obj_bytes = 0;
}
