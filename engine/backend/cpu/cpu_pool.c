#include "engine/backend/cpu/cpu_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "common/err.h"

#define CPOOL_SPIN 20000 /* polls before a worker sleeps (tens of microseconds) */

struct cpool {
    int n_threads;
    pthread_t *workers;
    int n_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen; /* bumped for every run (and for stop) */
    atomic_int next; /* next task index to take */
    atomic_int done; /* workers finished with the current run */
    atomic_int stop;
    cpool_fn fn;
    void *arg;
    int n_tasks;
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

static void cpool__work(cpool *p, int thread)
{
    for (;;) {
        int t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (t >= p->n_tasks) break;
        p->fn(p->arg, t, thread);
    }
}

static void *cpool__main(void *varg)
{
    struct cpool_worker_arg *wa = varg;
    cpool *p = wa->p;
    int index = wa->index;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load(&p->gen);
        for (int i = 0; i < CPOOL_SPIN && g == seen; i++) {
            cpool__relax();
            g = atomic_load(&p->gen);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->gen)) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        seen = g;
        if (atomic_load(&p->stop)) break;
        cpool__work(p, index);
        atomic_fetch_add(&p->done, 1);
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
    atomic_init(&p->gen, 0);
    atomic_init(&p->next, 0);
    atomic_init(&p->done, 0);
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

void cpool_free(cpool *p)
{
    if (!p) return;
    if (p->n_started > 0) {
        atomic_store(&p->stop, 1);
        pthread_mutex_lock(&p->mu);
        atomic_fetch_add(&p->gen, 1);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
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
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->done, 0);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    cpool__work(p, 0);
    for (int i = 0; atomic_load(&p->done) < p->n_started; i++) {
        if (i < CPOOL_SPIN)
            cpool__relax();
        else
            sched_yield();
    }
}
