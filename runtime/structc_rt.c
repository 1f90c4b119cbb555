/* structc runtime: the thread pool behind sc_parallel_for.
 *
 * A job's tasks [0, n) are claimed in chunks from one atomic ticket by
 * whichever threads show up, the caller included. On a loaded machine a
 * worker may not be scheduled for milliseconds: the caller then simply
 * claims every chunk itself instead of waiting, and a late worker finds
 * nothing left. The ticket packs the job's generation with the next task
 * index, so a claim can only ever take a task of the current job.
 *
 * Workers spin briefly after a job (training steps come back to back), then
 * sleep on a condition variable. A call made while the pool is busy (from
 * another Python thread, or nested inside a kernel) runs on its caller, and so
 * does a job below SERIAL_WORK, and every job of an entry point whose kernels
 * add up to less than ENTRY_SERIAL_WORK (sc_entry_begin): a batch-1 forward
 * of a small model is then a straight call that never touches the pool. A forked child starts with no
 * workers (they are not copied) and a fresh pool state. */
#include "structc_rt.h"

#include <pthread.h>
#include <sched.h>
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
#define SPIN_ROUNDS 4000          /* ~100 us of polling before a worker sleeps */
/* Jobs below this much work (tasks x cost, roughly flops) run on the caller:
 * STRUCTC_SERIAL_WORK overrides it (read once: for tuning on a quiet machine). */
#define SERIAL_WORK 32768
/* An entry point whose kernels add up to less work than this (about 20 us)
 * runs them all on the caller: a small model's batch-1 forward is a straight
 * call that never touches the pool. STRUCTC_ENTRY_SERIAL_WORK overrides it. */
#define ENTRY_SERIAL_WORK (1 << 21)
#define CHUNKS_PER_THREAD 4       /* claim granularity: balance vs. atomic traffic */
#define CLOSED 0xFFFFFFFFu        /* task index of a finished job: nothing left to claim */

typedef struct {
    sc_task_fn fn;
    void *frame;
    int64_t n;
    int64_t chunk;
} job_t;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_t workers[MAX_THREADS];
static int started = 0;                    /* workers running */
static int wanted = 0;                     /* threads requested (0 = not yet decided) */
static job_t job;
static _Atomic uint64_t ticket = 0;        /* generation << 32 | next task index */
static _Atomic int64_t done = 0;           /* tasks finished in the current job */
static atomic_int sleepers = 0;
static _Atomic uint64_t handoffs = 0;      /* jobs posted to the pool, ever (for tests) */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static _Thread_local int in_parallel = 0;

/* Claim and run chunks of the job of generation `gen` until none are left. */
static void work(uint32_t gen) {
    for (;;) {
        uint64_t t = atomic_load_explicit(&ticket, memory_order_acquire);
        if ((uint32_t)(t >> 32) != gen) return;
        int64_t lo = (int64_t)(uint32_t)t;
        if (lo >= job.n) return;
        int64_t hi = lo + job.chunk < job.n ? lo + job.chunk : job.n;
        uint64_t next = ((uint64_t)gen << 32) | (uint64_t)hi;
        if (!atomic_compare_exchange_weak_explicit(&ticket, &t, next, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        /* Holding [lo, hi) keeps the job alive: the caller waits for `done`. */
        job.fn(job.frame, lo, hi);
        atomic_fetch_add_explicit(&done, hi - lo, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    uint32_t seen = 0;
    in_parallel = 1;
    for (;;) {
        uint32_t gen;
        int spins = 0;
        while ((gen = (uint32_t)(atomic_load_explicit(&ticket, memory_order_acquire) >> 32)) == seen) {
            if (++spins < SPIN_ROUNDS) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((gen = (uint32_t)(atomic_load(&ticket) >> 32)) == seen)
                pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
            break;
        }
        seen = gen;
        work(gen);
    }
    return NULL;
}

static _Atomic int64_t serial_work = -1;   /* SERIAL_WORK or the environment's, once read */
static _Atomic int64_t entry_serial_work = -1;
static _Thread_local int serial_entry = 0;     /* this thread runs an entry below the threshold */
static _Thread_local int entry_depth = 0;      /* entries running on this thread (recursion bodies nest) */

/* `*cached`, or the environment's `name` (else `fallback`) read into it. */
static int64_t threshold(_Atomic int64_t *cached, const char *name, int64_t fallback) {
    int64_t w = atomic_load_explicit(cached, memory_order_relaxed);
    if (w < 0) {            /* every thread that gets here computes the same value */
        const char *env = getenv(name);
        long long v = env ? atoll(env) : -1;
        w = v >= 0 ? (int64_t)v : fallback;
        atomic_store_explicit(cached, w, memory_order_relaxed);
    }
    return w;
}

static int64_t serial_threshold(void) { return threshold(&serial_work, "STRUCTC_SERIAL_WORK", SERIAL_WORK); }

/* Only the outermost entry decides: a recursion body's entry, one level of
 * a tree, is small by itself but runs many times inside a kernel whose
 * cost (NESTED_WORK) keeps its own entry off the serial path. */
int32_t sc_entry_begin(int64_t work) {
    int32_t outer = serial_entry;
    if (entry_depth++ == 0
        && work < threshold(&entry_serial_work, "STRUCTC_ENTRY_SERIAL_WORK", ENTRY_SERIAL_WORK))
        serial_entry = 1;
    return outer;
}

void sc_entry_end(int32_t outer) {
    entry_depth--;
    serial_entry = outer;
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

/* In a forked child only the forking thread exists: forget the parent's
 * workers and any lock another thread held at the fork. */
static void reset_after_fork(void) {
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
    started = 0;
    atomic_store(&sleepers, 0);
    atomic_store(&ticket, (atomic_load(&ticket) & ~(uint64_t)0xFFFFFFFFu) | CLOSED);
    in_parallel = 0;
}

static void install_atfork(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

int sc_pool_workers(void) { return started; }

uint64_t sc_handoffs(void) { return atomic_load(&handoffs); }

/* Start workers up to `want - 1` (the caller is the last thread). Holds pool_lock. */
static int ensure_workers(int want) {
    pthread_once(&atfork_once, install_atfork);
    while (started < want - 1) {
        if (pthread_create(&workers[started], NULL, worker_main, NULL) != 0) break;
        started++;
    }
    return started + 1 < want ? started + 1 : want;
}

void sc_parallel_for(sc_task_fn fn, void *frame, int64_t n, int64_t cost) {
    if (n <= 0) return;
    int want = sc_get_num_threads();
    if (want <= 1 || n == 1 || n >= (int64_t)CLOSED || in_parallel || serial_entry || n * (cost > 0 ? cost : 1) < serial_threshold()
        || pthread_mutex_trylock(&pool_lock) != 0) {
        fn(frame, 0, n);
        return;
    }
    int threads = ensure_workers(want);
    if (threads <= 1) {
        pthread_mutex_unlock(&pool_lock);
        fn(frame, 0, n);
        return;
    }
    int64_t chunk = n / ((int64_t)threads * CHUNKS_PER_THREAD);
    job.fn = fn;
    job.frame = frame;
    job.n = n;
    job.chunk = chunk > 0 ? chunk : 1;
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&handoffs, 1, memory_order_relaxed);
    uint32_t gen = (uint32_t)(atomic_load(&ticket) >> 32) + 1;
    atomic_store(&ticket, (uint64_t)gen << 32);   /* seq_cst: pairs with the sleepers count */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    in_parallel = 1;
    work(gen);
    in_parallel = 0;
    /* Only chunks a worker is still running remain: wait for them. */
    for (int spins = 0; atomic_load_explicit(&done, memory_order_acquire) < n; spins++) {
        if (spins < SPIN_ROUNDS) CPU_RELAX();
        else sched_yield();
    }
    /* Close the job before its fields are reused: a worker that read this
     * generation's ticket can no longer claim anything with it. */
    atomic_store(&ticket, ((uint64_t)gen << 32) | CLOSED);
    pthread_mutex_unlock(&pool_lock);
}
