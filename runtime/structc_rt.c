/* structc runtime: the thread pool behind sc_parallel_for.
 *
 * Static partitioning: with T threads, thread t runs tasks
 * [t*n/T, (t+1)*n/T). Kernels are built so tasks cost about the same, and a
 * static split keeps each thread on the same rows of a matrix from one call
 * to the next (warm caches). Workers spin for a short while after a job,
 * then sleep on a condition variable. A call made while the pool is busy
 * (another Python thread, or a nested call) runs on the caller alone. */
#include "structc_rt.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256
#define SPIN_ROUNDS 200000        /* ~ tens of microseconds of spinning */
#define SERIAL_WORK 32768         /* jobs below this much work run on the caller */

typedef struct {
    sc_task_fn fn;
    void *frame;
    int64_t n;
    int nthreads;
} job_t;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_t workers[MAX_THREADS];
static int started = 0;              /* workers running */
static int wanted = 0;               /* threads requested (0 = not yet decided) */
static job_t job;
static atomic_long generation = 0;   /* bumped for every job */
static atomic_int pending = 0;       /* workers still busy with the current job */
static atomic_int sleepers = 0;

static _Thread_local int in_parallel = 0;

static void run_share(const job_t *j, int t) {
    int64_t lo = j->n * t / j->nthreads, hi = j->n * (t + 1) / j->nthreads;
    if (lo < hi) j->fn(j->frame, lo, hi);
}

static void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg;
    long seen = 0;
    in_parallel = 1;
    for (;;) {
        long g;
        int spins = 0;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((g = atomic_load(&generation)) == seen)
                pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
            break;
        }
        seen = g;
        job_t j = job;
        if (id < j.nthreads) run_share(&j, id);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

static int default_threads(void) {
    const char *env = getenv("STRUCTC_NUM_THREADS");
    if (env && atoi(env) > 0) return atoi(env);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int sc_set_num_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&pool_lock);
    wanted = n;
    pthread_mutex_unlock(&pool_lock);
    return n;
}

int sc_get_num_threads(void) {
    if (wanted == 0) sc_set_num_threads(default_threads());
    return wanted;
}

/* Start workers up to `want - 1` (the caller is thread 0). Holds pool_lock. */
static int ensure_workers(int want) {
    while (started < want - 1) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        if (pthread_create(&workers[started], &attr, worker_main, (void *)(intptr_t)(started + 1)) != 0) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        started++;
    }
    return started + 1 < want ? started + 1 : want;
}

void sc_parallel_for(sc_task_fn fn, void *frame, int64_t n, int64_t cost) {
    if (n <= 0) return;
    int want = sc_get_num_threads();
    if (want <= 1 || n == 1 || in_parallel || n * (cost > 0 ? cost : 1) < SERIAL_WORK
        || pthread_mutex_trylock(&pool_lock) != 0) {
        fn(frame, 0, n);
        return;
    }
    int t = ensure_workers(want);
    if ((int64_t)t > n) t = (int)n;
    if (t <= 1) {
        pthread_mutex_unlock(&pool_lock);
        fn(frame, 0, n);
        return;
    }
    job.fn = fn;
    job.frame = frame;
    job.n = n;
    job.nthreads = t;
    atomic_store_explicit(&pending, started, memory_order_release);
    atomic_fetch_add(&generation, 1);   /* seq_cst: pairs with the sleepers count */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    in_parallel = 1;
    run_share(&job, 0);
    in_parallel = 0;
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) CPU_RELAX();
    pthread_mutex_unlock(&pool_lock);
}
