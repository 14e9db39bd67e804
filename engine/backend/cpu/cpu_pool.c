#include "engine/backend/cpu/cpu_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "common/err.h"

#define CPOOL_SPIN 20000 /* polls before a thread sleeps or yields (tens of microseconds) */

/* The run word packs [generation:24][next task:20][task count:20]. Claiming a
 * task is one compare-and-swap that also checks the generation, so a worker
 * that wakes late can never take a task of a later run with stale fn/arg:
 * once it holds a claimed task of generation g, the caller cannot finish g
 * (it waits for every task) nor publish g + 1's fn/arg. */
#define CPOOL_TASK_BITS 20
#define CPOOL_MAX_TASKS ((1u << CPOOL_TASK_BITS) - 1)
#define CPOOL_GEN(v)    ((uint32_t)((v) >> (2 * CPOOL_TASK_BITS)))
#define CPOOL_NEXT(v)   ((uint32_t)((v) >> CPOOL_TASK_BITS) & CPOOL_MAX_TASKS)
#define CPOOL_COUNT(v)  ((uint32_t)(v)&CPOOL_MAX_TASKS)
#define CPOOL_PACK(g, nx, n)                                                                       \
    (((uint64_t)((g)&0xffffffu) << (2 * CPOOL_TASK_BITS)) | ((uint64_t)(nx) << CPOOL_TASK_BITS) |  \
     (uint64_t)(n))

struct cpool {
    int n_threads;
    pthread_t *workers;
    int n_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t run;
    atomic_uint completed; /* tasks of the current run finished */
    atomic_int stop;
    cpool_fn fn; /* written only while no run is in flight */
    void *arg;
    int base; /* task index offset of this run (runs are split at CPOOL_MAX_TASKS) */
};

struct cpool_worker_arg {
    cpool *p;
    int index;
};

static inline void cpool__relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims and runs tasks of generation gen until none is left. */
static void cpool__work(cpool *p, uint32_t gen, int thread)
{
    uint64_t v = atomic_load(&p->run);
    for (;;) {
        if (CPOOL_GEN(v) != gen || CPOOL_NEXT(v) >= CPOOL_COUNT(v)) return;
        if (!atomic_compare_exchange_weak(&p->run, &v, v + ((uint64_t)1 << CPOOL_TASK_BITS)))
            continue;
        p->fn(p->arg, p->base + (int)CPOOL_NEXT(v), thread);
        atomic_fetch_add_explicit(&p->completed, 1, memory_order_release);
        v = atomic_load(&p->run);
    }
}

static void *cpool__main(void *varg)
{
    struct cpool_worker_arg *wa = varg;
    cpool *p = wa->p;
    int index = wa->index;
    free(wa);
    uint32_t seen = CPOOL_GEN(atomic_load(&p->run));
    for (;;) {
        uint32_t g = CPOOL_GEN(atomic_load(&p->run));
        for (int i = 0; i < CPOOL_SPIN && g == seen; i++) {
            cpool__relax();
            g = CPOOL_GEN(atomic_load(&p->run));
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = CPOOL_GEN(atomic_load(&p->run))) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        seen = g;
        cpool__work(p, g, index);
    }
    return NULL;
}

int cpool_create(int n_threads, cpool **out)
{
    *out = NULL;
    if (n_threads < 1) n_threads = 1;
    cpool *p = calloc(1, sizeof(*p));
    if (!p) return TD_ENOMEM;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    atomic_init(&p->run, CPOOL_PACK(0, 0, 0));
    atomic_init(&p->completed, 0);
    atomic_init(&p->stop, 0);
    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof(pthread_t));
        if (!p->workers) {
            cpool_free(p);
            return TD_ENOMEM;
        }
        for (int i = 1; i < n_threads; i++) {
            struct cpool_worker_arg *wa = malloc(sizeof(*wa));
            if (!wa) {
                cpool_free(p);
                return TD_ENOMEM;
            }
            wa->p = p;
            wa->index = i;
            int e = pthread_create(&p->workers[i - 1], NULL, cpool__main, wa);
            if (e != 0) {
                free(wa);
                cpool_free(p);
                return td_err_from_errno(e);
            }
            p->n_started++;
        }
    }
    *out = p;
    return 0;
}

/* Publishes a new run word (new generation) and wakes sleeping workers. */
static void cpool__publish(cpool *p, uint32_t count)
{
    uint32_t g = CPOOL_GEN(atomic_load(&p->run)) + 1;
    atomic_store(&p->run, CPOOL_PACK(g, 0, count));
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void cpool_free(cpool *p)
{
    if (!p) return;
    if (p->n_started > 0) {
        atomic_store(&p->stop, 1);
        cpool__publish(p, 0);
        for (int i = 0; i < p->n_started; i++)
            pthread_join(p->workers[i], NULL);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->workers);
    free(p);
}

int cpool_threads(const cpool *p)
{
    return p->n_threads;
}

void cpool_run(cpool *p, cpool_fn fn, void *arg, int n_tasks)
{
    if (n_tasks <= 0) return;
    if (p->n_started == 0 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    for (int base = 0; base < n_tasks; base += (int)CPOOL_MAX_TASKS) {
        uint32_t count = (uint32_t)(n_tasks - base);
        if (count > CPOOL_MAX_TASKS) count = CPOOL_MAX_TASKS;
        p->fn = fn;
        p->arg = arg;
        p->base = base;
        atomic_store(&p->completed, 0);
        cpool__publish(p, count);
        cpool__work(p, CPOOL_GEN(atomic_load(&p->run)), 0);
        /* Wait for tasks other threads claimed; a worker that never woke up
         * claimed nothing and is not waited for. */
        for (int i = 0; atomic_load_explicit(&p->completed, memory_order_acquire) < count; i++) {
            if (i < CPOOL_SPIN)
                cpool__relax();
            else
                sched_yield();
        }
    }
}
