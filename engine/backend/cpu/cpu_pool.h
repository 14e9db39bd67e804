/* cpu_pool: a fixed pool of worker threads for the CPU backend's parallel
 * loops, created once. cpool_run hands out task indices 0..n_tasks-1 through an
 * atomic counter to the workers and the calling thread, and returns when all
 * are done. Workers spin briefly between runs (a forward issues many short
 * runs back to back), then sleep on a condition variable. */
#ifndef TANDEM_ENGINE_BACKEND_CPU_POOL_H
#define TANDEM_ENGINE_BACKEND_CPU_POOL_H

/* task: 0..n_tasks-1; thread: 0..n_threads-1 (0 is the caller), for per-thread scratch. */
typedef void (*cpool_fn)(void *arg, int task, int thread);

typedef struct cpool cpool;

/* n_threads includes the caller, so n_threads - 1 workers are started.
 * On success *out is owned by the caller (cpool_free). */
int cpool_create(int n_threads, cpool **out);
void cpool_free(cpool *p); /* accepts NULL; joins the workers */
int cpool_threads(const cpool *p);
/* Runs fn for every task; one run at a time, from one thread. */
void cpool_run(cpool *p, cpool_fn fn, void *arg, int n_tasks);

#endif
