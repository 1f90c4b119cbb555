/* structc runtime: the thread pool behind sc_parallel_for.
 *
 * A job's tasks [0, n) are cut into one contiguous share per thread (a
 * slot). Each thread claims from the front of its own share, a quarter of
 * what is left at a time, then steals half of what is left from the back of
 * the others'. Consecutive kernels over the same rows so give each thread
 * the same rows (in its own cache), and a thread that shows up late, or not
 * at all, leaves its share to the others: on a loaded machine a worker may
 * not be scheduled for milliseconds, and the caller simply runs its share
 * instead of waiting. A slot packs [lo, hi) in one word, so each claim is one
 * compare-and-swap, and a job's slots are all empty before the next job's
 * are published, so a claim always belongs to the job it runs.
 *
 * Workers spin for about a millisecond after a job (training steps come back
 * to back), then sleep on a condition variable. A call made while the pool is busy (from
 * another Python thread, or nested inside a kernel) runs on its caller, and so
 * does a job below SERIAL_WORK, and every job of an entry point whose kernels
 * add up to less than ENTRY_SERIAL_WORK (sc_entry_begin): a batch-1 forward
 * of a small model is then a straight call that never touches the pool. A forked child starts with no
 * workers (they are not copied) and a fresh pool state.
 *
 * A worker that is preempted while it holds a claim cannot be helped (its
 * tasks are half done): the caller waits for it, which on a loaded machine
 * costs a whole time slice. When a wait exceeds both STALL_NS and the
 * caller's own share of the job, or when the caller itself was off the CPU
 * for much of an entry (judge_entry), the pool backs off: jobs run on the
 * caller for BACKOFF_MIN_NS, doubling with each further stall (within
 * RECALL_NS of the last) up to BACKOFF_MAX_NS. Who runs a task never changes
 * its result, so none of this changes any number. */
#define _POSIX_C_SOURCE 200809L     /* clock_gettime, nanosleep under -std=c11 */
#include "structc_rt.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256
/* A worker polls for the next job this long before it sleeps: about 1 ms
 * (a pause is ~25 ns on Zen 4), longer than the Python work between two
 * training steps (a GNN step's graph binding and checks: ~0.3 ms), so that
 * a step does not start with a sleeping worker (a futex wake on the caller's
 * path, and tens of us before the worker runs). On a loaded machine the pool
 * backs off, posts no jobs, and the workers go to sleep after it. */
#define WORKER_SPIN_ROUNDS 40000  /* STRUCTC_WORKER_SPIN overrides it (read once: for tuning) */
#define WAIT_SPIN_ROUNDS 4000     /* ~100 us of polling for a worker's last claim, then yields */
/* Polls of another process's flag before each poll yields (~6 us): 3 ranks on 2
 * cores took 516-528 us a shared sum at 20,000, 26-29 at 256 (an MPI Barrier: 70). */
#define FLAG_SPIN_ROUNDS 256
/* Jobs below this much work (tasks x cost, roughly flops) run on the caller:
 * STRUCTC_SERIAL_WORK overrides it (read once: for tuning on a quiet machine). */
#define SERIAL_WORK 32768
/* An entry point whose kernels add up to less work than this (about 20 us)
 * runs them all on the caller: a small model's batch-1 forward is a straight
 * call that never touches the pool. STRUCTC_ENTRY_SERIAL_WORK overrides it. */
#define ENTRY_SERIAL_WORK (1 << 21)
#define MAX_POOLED_TASKS 0xFFFFFFFFLL   /* a slot's range packs two task indices in 32 bits each */
/* A wait this long (and longer than the caller's own share of the job) is a
 * preempted worker: a time slice is milliseconds, while a worker's last
 * claim on a quiet machine is a fraction of the job (few-task jobs of
 * unequal tasks, a whole task, are the closest call). */
#define STALL_NS 1000000
#define BACKOFF_MIN_NS 2000000    /* jobs run on the caller for this long after a stall... */
#define BACKOFF_MAX_NS 128000000  /* ...doubling with each further stall, up to this, */
#define RECALL_NS 1000000000      /* while each comes within this of the last back-off's end */
#define WINDOW_NS 4000000         /* entries' time judged at once for preemption of their caller... */
/* ...which backs off when it was off the CPU for more than this share. 40%
 * was tried (to stay parallel beside one other busy thread, which costs a
 * third): at load 4-5 LeNet's 2-thread step was then 0.69x its 1-thread
 * step, against 1.02-1.15x at 25%. */
#define PREEMPTED_PERCENT 25
/* Reading a thread's CPU clock is a system call (about 1 us): entries with
 * at least this much work are all timed, smaller ones one in SAMPLE_ENTRIES. */
#define ALWAYS_TIMED_WORK (1LL << 25)
#define SAMPLE_ENTRIES 16

typedef struct {
    sc_task_fn fn;
    void *frame;
    uint32_t fp_mode;             /* the caller's floating-point control (flush to zero) */
} job_t;

/* Each thread's share of the current job, on a cache line of its own. */
typedef struct {
    _Alignas(64) _Atomic uint64_t range;      /* lo | hi << 32: tasks not claimed yet */
} slot_t;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_t workers[MAX_THREADS];
static int started = 0;                    /* workers running */
static int wanted = 0;                     /* threads requested (0 = not yet decided) */
/* What a worker reads to start a job, on one cache line of its own: one
 * transfer between the cores where the three fields apart took three
 * (a job's hand-off: 0.95 -> 0.77 us over half its tasks' time). */
static struct {
    _Alignas(64) _Atomic uint64_t ticket;  /* job generation << 32 (a new job wakes the workers) */
    atomic_int threads;                     /* slots the current job uses */
    job_t job;
} posted;
static slot_t slots[MAX_THREADS];
static _Atomic int64_t done = 0;           /* tasks finished in the current job */
static atomic_int sleepers = 0;
static _Atomic uint64_t handoffs = 0;      /* jobs given to the pool, ever (for tests) */
static _Atomic uint64_t backoff_jobs = 0;  /* of those, jobs run on the caller while backing off */
static _Atomic uint64_t stalls = 0;        /* waits for a preempted worker detected */
static _Atomic int64_t serial_until = 0;   /* CLOCK_MONOTONIC ns: jobs before it run on the caller */
static _Atomic uint64_t preemptions = 0;   /* entries' windows whose caller was preempted too long */
static _Atomic int64_t debug_stall_ns = 0; /* tests: the next job's worker sleeps this long in its chunk */
static _Atomic int64_t debug_caller_ns = 0; /* tests: the next timed entry's caller sleeps this long */
static atomic_int debug_hold = 0;          /* tests: a back-off started while held lasts until released */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static _Thread_local int in_parallel = 0;

/* -- subnormal results flushed to zero ------------------------------------
 * An outermost entry runs with x86's flush-to-zero on (MXCSR.FTZ), and puts
 * its caller's setting back when it ends; a worker runs a job's tasks with
 * the setting of the job's caller. A result that would be a subnormal float
 * (below 1.2e-38) is then 0, as under XLA on CPU: without it a training
 * step slows down as its values underflow (a GNN fitting its batch: 200 us
 * steps became 530 us, its products of tiny gradients each a microcode
 * assist). Subnormal inputs are read as they are (no DAZ): log(1e-45) is
 * still -103.28. Elsewhere than x86 the setting is left as it is. */
#if defined(__x86_64__)
#define FP_FLUSH 0x8000u          /* MXCSR's flush-to-zero bit */
#define FP_FLAGS 0x3Fu            /* its sticky exception flags: not a mode */
static uint32_t fp_mode_get(void) { return _mm_getcsr(); }
static void fp_mode_set(uint32_t mode) { _mm_setcsr(mode); }
#else
#define FP_FLUSH 0u
#define FP_FLAGS 0u
static uint32_t fp_mode_get(void) { return 0; }
static void fp_mode_set(uint32_t mode) { (void)mode; }
#endif
static int fp_mode_differs(uint32_t a, uint32_t b) { return ((a ^ b) & ~FP_FLAGS) != 0; }
static _Thread_local uint32_t fp_mode_before = 0;    /* the caller's, while its outermost entry runs */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Tests: a worker that has claimed a chunk, or an entry's caller, sleeps (as if preempted). */
static void debug_stall(_Atomic int64_t *armed) {
    int64_t ns = atomic_exchange(armed, 0);
    if (ns > 0) {
        struct timespec ts = {ns / 1000000000, ns % 1000000000};
        nanosleep(&ts, NULL);
    }
}

/* A slot's range of tasks, [lo, hi), packed in one word so that claims from
 * either end are one compare-and-swap. */
static uint64_t pack(int64_t lo, int64_t hi) { return (uint64_t)lo | (uint64_t)hi << 32; }
static int64_t low(uint64_t w) { return (int64_t)(uint32_t)w; }
static int64_t high(uint64_t w) { return (int64_t)(w >> 32); }

/* Claim from the front of slot s (its owner): a quarter of what is left, so
 * the last claims are single tasks and a thief finds the rest at the back. */
static int claim_front(int s, int64_t *lo, int64_t *hi) {
    uint64_t w = atomic_load_explicit(&slots[s].range, memory_order_acquire);
    while (low(w) < high(w)) {
        int64_t size = (high(w) - low(w) + 3) / 4;
        if (atomic_compare_exchange_weak_explicit(&slots[s].range, &w, pack(low(w) + size, high(w)),
                                                  memory_order_acq_rel, memory_order_acquire)) {
            *lo = low(w);
            *hi = low(w) + size;
            return 1;
        }
    }
    return 0;
}

/* Steal from the back of slot s: half of what its owner has not claimed.
 * Thread `self` first takes from its own slot if that has tasks by now: a
 * worker still looping on the last job may find the next one's slots
 * published after its own claim failed; seeing slot s's new range (acquire)
 * it sees its own (published before, for s < self: sc_parallel_for
 * publishes them last to first), so it starts on its own share there too
 * instead of taking half of the caller's. */
static int claim_back(int s, int self, int threads, int64_t *lo, int64_t *hi) {
    uint64_t w = atomic_load_explicit(&slots[s].range, memory_order_acquire);
    if (low(w) < high(w) && self < threads && claim_front(self, lo, hi)) return 1;
    while (low(w) < high(w)) {
        int64_t size = (high(w) - low(w) + 1) / 2;
        if (atomic_compare_exchange_weak_explicit(&slots[s].range, &w, pack(low(w), high(w) - size),
                                                  memory_order_acq_rel, memory_order_acquire)) {
            *lo = high(w) - size;
            *hi = high(w);
            return 1;
        }
    }
    return 0;
}

/* Run the current job's tasks: this thread's slot first (slot 0 is the
 * caller's, slot k worker k's), then what is left in the others'. A claim
 * is of the job that published the range (a job's slots are all empty
 * before the next one is published), and the job's fields are read only
 * after it, so a late thread can never run a task of the wrong job. */
static void work(int self, int is_worker) {
    int threads = atomic_load_explicit(&posted.threads, memory_order_relaxed);
    int64_t ran = 0;
    for (;;) {
        int64_t lo, hi;
        int got = self < threads && claim_front(self, &lo, &hi);
        for (int k = 1; !got && k < threads; k++) got = claim_back((self + k) % threads, self, threads, &lo, &hi);
        if (!got) break;
        /* Holding [lo, hi) keeps the job alive: the caller waits for `done`. */
        if (is_worker && atomic_load_explicit(&debug_stall_ns, memory_order_relaxed) > 0) debug_stall(&debug_stall_ns);
        if (is_worker && fp_mode_differs(fp_mode_get(), posted.job.fp_mode)) fp_mode_set(posted.job.fp_mode);
        posted.job.fn(posted.job.frame, lo, hi);
        ran += hi - lo;
    }
    /* Counted once, when this thread finds nothing left: one write to the line
     * the caller polls, not one per chunk (each moved it between the cores). */
    if (ran > 0) atomic_fetch_add_explicit(&done, ran, memory_order_release);
}

static _Atomic int64_t serial_work = -1;   /* SERIAL_WORK or the environment's, once read */
static _Atomic int64_t entry_serial_work = -1;
static _Thread_local int serial_entry = 0;     /* this thread runs an entry below the threshold */
static _Thread_local int entry_depth = 0;      /* entries running on this thread (recursion bodies nest) */
static _Thread_local uint64_t entry_calls = 0;  /* outermost entries begun on this thread (sc_forest_parts' cache) */

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

/* `*cached` (a switch: 1 on, 0 off), or the environment's `name` read into it:
 * on unless it is "0". */
static int env_switch(_Atomic int *cached, const char *name) {
    int on = atomic_load_explicit(cached, memory_order_relaxed);
    if (on < 0) {
        const char *env = getenv(name);
        on = !(env && env[0] == '0');
        atomic_store_explicit(cached, on, memory_order_relaxed);
    }
    return on;
}

static int64_t serial_threshold(void) { return threshold(&serial_work, "STRUCTC_SERIAL_WORK", SERIAL_WORK); }

static _Atomic int64_t worker_spin = -1;   /* WORKER_SPIN_ROUNDS or STRUCTC_WORKER_SPIN, once read */

static void *worker_main(void *arg) {
    int self = (int)(intptr_t)arg;
    int64_t spin_rounds = threshold(&worker_spin, "STRUCTC_WORKER_SPIN", WORKER_SPIN_ROUNDS);
    uint32_t seen = 0;
    in_parallel = 1;
    for (;;) {
        uint32_t gen;
        int spins = 0;
        while ((gen = (uint32_t)(atomic_load_explicit(&posted.ticket, memory_order_acquire) >> 32)) == seen) {
            if (++spins < spin_rounds) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((gen = (uint32_t)(atomic_load(&posted.ticket) >> 32)) == seen)
                pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
            break;
        }
        seen = gen;
        work(self, 1);
    }
    return NULL;
}


/* -- backing off on a loaded machine -------------------------------------
 * Two signs that the second thread costs more than it gives: a stall (the
 * caller waited long for a worker holding a chunk: judge_wait) and an
 * entry whose calling thread was preempted for much of its run (its wall
 * time well above its CPU time: judge_entry; the scheduler then shares the
 * cores with others, so a worker only takes time from the caller, and
 * every job's end waits for two threads to be scheduled at once). Either
 * makes jobs run on the caller for a while (serial_until). The state below
 * is guarded by backoff_lock. */
static pthread_mutex_t backoff_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int64_t backoff_mode = -1;  /* SC_BACKOFF_* bits; STRUCTC_BACKOFF, else both */
static int64_t backoff_ns = 0;             /* the last back-off's length */
static int64_t last_stall = 0;             /* when the last back-off ended */

/* Is the pool backing off? (Read without the lock: a stale answer only
 * decides who runs one job.) */
static int backing_off(void) {
    int64_t until = atomic_load_explicit(&serial_until, memory_order_relaxed);
    return until != 0 && now_ns() < until;
}

/* Back off from `end`: twice as long as last time if that back-off ended
 * recently (a loaded machine stays loaded), else BACKOFF_MIN_NS; while
 * backing off already, `extend` keeps the length and moves the end. */
static void back_off(int64_t end, int extend) {
    pthread_mutex_lock(&backoff_lock);
    if (extend && backing_off() && backoff_ns > 0) {
        /* still loaded: the same length again from now */
    } else {
        backoff_ns = last_stall != 0 && end - last_stall < RECALL_NS ? backoff_ns * 2 : BACKOFF_MIN_NS;
        if (backoff_ns > BACKOFF_MAX_NS) backoff_ns = BACKOFF_MAX_NS;
    }
    last_stall = end + backoff_ns;
    int64_t until = atomic_load(&debug_hold) ? INT64_MAX : end + backoff_ns;   /* tests: held until released */
    atomic_store_explicit(&serial_until, until, memory_order_relaxed);
    pthread_mutex_unlock(&backoff_lock);
}

static int64_t backoff_on(int64_t bit) {
    return threshold(&backoff_mode, "STRUCTC_BACKOFF", SC_BACKOFF_STALLS | SC_BACKOFF_PREEMPTED) & bit;
}

int sc_set_backoff(int mode) {
    int before = (int)backoff_on(SC_BACKOFF_STALLS | SC_BACKOFF_PREEMPTED);
    pthread_mutex_lock(&backoff_lock);
    atomic_store(&backoff_mode, mode & (SC_BACKOFF_STALLS | SC_BACKOFF_PREEMPTED));
    backoff_ns = last_stall = 0;
    atomic_store(&serial_until, 0);
    pthread_mutex_unlock(&backoff_lock);
    return before;
}

/* After a pooled job: the caller worked `own` ns and then waited `waited` ns
 * for workers, until `end`. */
static void judge_wait(int64_t own, int64_t waited, int64_t end) {
    if (waited <= STALL_NS || waited <= own || !backoff_on(SC_BACKOFF_STALLS)) return;
    atomic_fetch_add_explicit(&stalls, 1, memory_order_relaxed);
    back_off(end, 0);
}

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* -- serial or pooled, as measured -----------------------------------------
 * An entry of moderate work (ENTRY_SERIAL_WORK up to ADAPT_MAX_WORK) may run
 * faster on the caller alone: on an Intel Xeon the digits MLP's step at a
 * batch of 32 took 28 us on one thread and 54 us on two (each job's
 * hand-off, and parameters and activations crossing between the cores),
 * though its work is well past ENTRY_SERIAL_WORK. So each such entry, per
 * size (work in quarter-octave bands), is measured: after ADAPT_WARM pooled
 * calls, a block of pooled calls then a block of serial ones, each block's
 * first untimed; it then runs serially if its serial calls were clearly
 * faster (5%, the middle two of each way's four) than its pooled ones,
 * until it is measured again ADAPT_PERIOD calls later. Who runs a task never
 * changes its result, so this changes no number. Per thread: a slot is the
 * entry (its return address here) and the band. STRUCTC_ADAPT=0 (or
 * sc_set_adaptive(0)) turns it off: every such entry uses the pool. */
#define ADAPT_MAX_WORK (1LL << 26)   /* entries with more work always use the pool */
#define ADAPT_SLOTS 64
#define ADAPT_WARM 3
#define ADAPT_PROBES 4                /* timed calls each way, */
#define ADAPT_BLOCK (ADAPT_PROBES + 1) /* after one untimed */
#define ADAPT_PERIOD 4096

typedef struct {
    uintptr_t entry;              /* 0: empty */
    int32_t band;
    int32_t serial;               /* the decision: 1 serial, 0 pooled */
    uint32_t calls;
    int64_t ns[2][ADAPT_PROBES];  /* this round's pooled [0] and serial [1] calls' times */
} adapt_t;

static _Atomic int adaptive = -1;           /* STRUCTC_ADAPT (default on), or sc_set_adaptive's */
static _Thread_local adapt_t adapt_slots[ADAPT_SLOTS];
static _Thread_local adapt_t *adapt_probe = NULL;   /* the outermost entry being timed, or NULL */
static _Thread_local int adapt_probe_serial = 0;
static _Thread_local int64_t adapt_probe_t0 = 0;
static _Atomic int64_t debug_pooled_ns = 0; /* tests: added to every timed pooled call */

static int adaptive_on(void) { return env_switch(&adaptive, "STRUCTC_ADAPT"); }

int sc_set_adaptive(int on) {
    int before = adaptive_on();                     /* the environment's, if not set yet */
    atomic_store(&adaptive, on ? 1 : 0);
    memset(adapt_slots, 0, sizeof adapt_slots);     /* this thread measures again */
    return before;
}

void sc_debug_adapt_pooled(int64_t ns) { atomic_store(&debug_pooled_ns, ns); }

/* work's band: 4 per octave */
static int32_t work_band(int64_t work) {
    if (work < 1) return 0;
    int32_t octave = 63 - __builtin_clzll((unsigned long long)work);
    int32_t quarter = octave >= 2 ? (int32_t)((work >> (octave - 2)) & 3) : 0;
    return octave * 4 + quarter;
}

/* Whether this outermost entry (work above ENTRY_SERIAL_WORK) runs serially;
 * starts a probe's clock when it is one. */
static int adapt_begin(uintptr_t entry, int64_t work) {
    adapt_probe = NULL;
    if (work >= ADAPT_MAX_WORK || wanted <= 1 || !adaptive_on()) return 0;
    int32_t band = work_band(work);
    adapt_t *a = &adapt_slots[((entry >> 4) ^ ((uintptr_t)band * 0x9E3779B1u)) % ADAPT_SLOTS];
    if (a->entry != entry || a->band != band) {
        a->entry = entry;
        a->band = band;
        a->serial = 0;
        a->calls = 0;
    }
    uint32_t phase = a->calls++ % ADAPT_PERIOD;
    if (phase < ADAPT_WARM || phase >= ADAPT_WARM + 2 * ADAPT_BLOCK) return a->serial;
    /* a block of pooled calls, then one of serial calls: alternating calls would time
     * each with the other way's data placement (a serial call after a pooled one
     * finds half its data in the other core's cache); a block's first is not timed */
    int serial = (phase - ADAPT_WARM) / ADAPT_BLOCK;
    if ((phase - ADAPT_WARM) % ADAPT_BLOCK != 0) {
        adapt_probe = a;
        adapt_probe_serial = serial;
        adapt_probe_t0 = now_ns();
    }
    return serial;
}

/* The sum of the middle two of four times: a probe's typical call, not its luckiest. */
static int64_t middle_two(const int64_t *t) {
    int64_t lo = t[0], hi = t[0], sum = 0;
    for (int k = 0; k < ADAPT_PROBES; k++) {
        sum += t[k];
        if (t[k] < lo) lo = t[k];
        if (t[k] > hi) hi = t[k];
    }
    return sum - lo - hi;
}

/* A probe's time; after the last one of a round, the decision. */
static void adapt_end(void) {
    adapt_t *a = adapt_probe;
    if (!a) return;
    adapt_probe = NULL;
    uint32_t phase = (a->calls - 1) % ADAPT_PERIOD - ADAPT_WARM;
    int64_t extra = adapt_probe_serial ? 0 : atomic_load_explicit(&debug_pooled_ns, memory_order_relaxed);
    a->ns[adapt_probe_serial][phase % ADAPT_BLOCK - 1] = now_ns() - adapt_probe_t0 + extra;
    if (phase == 2 * ADAPT_BLOCK - 1)
        a->serial = middle_two(a->ns[1]) * 20 < middle_two(a->ns[0]) * 19;
}

/* Outermost entries of this thread since the last judgement: wall and CPU time. */
static _Thread_local int64_t window_wall = 0, window_cpu = 0, entry_wall0 = 0, entry_cpu0 = 0;
static _Thread_local int entry_timed = 0;
static _Thread_local uint32_t entry_count = 0;

/* After an entry that could use the pool: once WINDOW_NS of such entries
 * have run, back off if the caller was preempted for more than a
 * PREEMPTED_PERCENT share of that time. */
static void judge_entry(int64_t wall, int64_t cpu, int64_t end) {
    window_wall += wall;
    window_cpu += cpu;
    if (window_wall < WINDOW_NS) return;
    int preempted = (window_wall - window_cpu) * 100 > window_wall * PREEMPTED_PERCENT;
    window_wall = window_cpu = 0;
    if (preempted && backoff_on(SC_BACKOFF_PREEMPTED)) {
        atomic_fetch_add_explicit(&preemptions, 1, memory_order_relaxed);
        back_off(end, 1);
    }
}

/* Only the outermost entry decides: a recursion body's entry, one level of
 * a tree, is small by itself but runs many times inside a kernel whose
 * cost (NESTED_WORK) keeps its own entry off the serial path. */
int32_t sc_entry_begin(int64_t work) {
    int32_t outer = serial_entry;
    if (entry_depth++ == 0) {
        entry_calls++;
        fp_mode_before = fp_mode_get();
        if (!(fp_mode_before & FP_FLUSH) && FP_FLUSH) fp_mode_set(fp_mode_before | FP_FLUSH);
        if (work < threshold(&entry_serial_work, "STRUCTC_ENTRY_SERIAL_WORK", ENTRY_SERIAL_WORK)
            || adapt_begin((uintptr_t)__builtin_return_address(0), work)) {
            serial_entry = 1;
        } else if (wanted > 1 && (work >= ALWAYS_TIMED_WORK || ++entry_count % SAMPLE_ENTRIES == 0)) {
            /* an entry that may use the pool: is its caller preempted? */
            entry_timed = 1;
            entry_wall0 = now_ns();
            entry_cpu0 = thread_cpu_ns();
        }
    }
    return outer;
}

void sc_entry_end(int32_t outer) {
    if (entry_depth == 1) {
        adapt_end();
        if (fp_mode_differs(fp_mode_get(), fp_mode_before)) fp_mode_set(fp_mode_before);
    }
    if (--entry_depth == 0 && entry_timed) {
        entry_timed = 0;
        if (atomic_load_explicit(&debug_caller_ns, memory_order_relaxed) > 0) debug_stall(&debug_caller_ns);
        int64_t end = now_ns();
        judge_entry(end - entry_wall0, thread_cpu_ns() - entry_cpu0, end);
    }
    serial_entry = outer;
}

/* STRUCTC_NUM_THREADS read as Python reads it (structc.native.environment_threads):
 * decimal digits, at least 1 (a count past MAX_THREADS is MAX_THREADS); 0 when it
 * is unset or empty, -1 when it is anything else ("abc", "2x", " 2", "-1", "0"). */
static int environment_threads(const char *env) {
    if (!env || !*env) return 0;
    int64_t n = 0;
    for (const char *c = env; *c; c++) {
        if (*c < '0' || *c > '9') return -1;
        if (n <= MAX_THREADS) n = n * 10 + (*c - '0');     /* stops growing past the cap: no overflow */
    }
    return n < 1 ? -1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

/* The count before any sc_set_num_threads: the environment's, else every core.
 * From Python this never reads the variable (structc sets the count first and
 * refuses junk by name); a library shipped to C says so on stderr. */
static int default_threads(void) {
    const char *env = getenv("STRUCTC_NUM_THREADS");
    int n = environment_threads(env);
    if (n > 0) return n;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 0)
        fprintf(stderr, "structc: STRUCTC_NUM_THREADS must be a positive integer, got '%s'; using %ld threads "
                "(every core)\n", env, cores > 0 ? cores : 1);
    return cores > 0 ? (int)cores : 1;
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

/* One task per thread, but none with fewer than `step` rows: a tree level of
 * fewer than 2 * step rows is one task, which sc_parallel_for runs on its
 * caller. (Split in two, its first share would be empty: the caller handed
 * the whole level to the worker and waited for it.) */
int64_t sc_row_tasks(int64_t rows, int64_t step) {
    int64_t most = step > 1 ? rows / step : rows, threads = sc_get_num_threads();
    return most < 1 ? 1 : most < threads ? most : threads;
}

/* In a forked child only the forking thread exists: forget the parent's
 * workers and any lock another thread held at the fork. */
static void reset_after_fork(void) {
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
    started = 0;
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&backoff_lock, NULL);
    backoff_ns = last_stall = 0;
    atomic_store(&serial_until, 0);
    for (int s = 0; s < MAX_THREADS; s++) atomic_store(&slots[s].range, 0);
    in_parallel = 0;
}

static void install_atfork(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

int sc_pool_workers(void) { return started; }

uint64_t sc_handoffs(void) { return atomic_load(&handoffs); }

uint64_t sc_backoff_jobs(void) { return atomic_load(&backoff_jobs); }

uint64_t sc_stalls(void) { return atomic_load(&stalls); }

uint64_t sc_preemptions(void) { return atomic_load(&preemptions); }

void sc_debug_stall_worker(int64_t ns) { atomic_store(&debug_stall_ns, ns); }

void sc_debug_stall_caller(int64_t ns) { atomic_store(&debug_caller_ns, ns); }

/* Held, a back-off started from now on lasts until released; released, it
 * ends when it would have (last_stall). One started before is not held. */
void sc_debug_hold_backoff(int hold) {
    pthread_mutex_lock(&backoff_lock);
    atomic_store(&debug_hold, hold != 0);
    if (!hold && atomic_load(&serial_until) == INT64_MAX) atomic_store(&serial_until, last_stall);
    pthread_mutex_unlock(&backoff_lock);
}

/* Start workers up to `want - 1` (the caller is the last thread). Holds pool_lock. */
static int ensure_workers(int want) {
    pthread_once(&atfork_once, install_atfork);
    while (started < want - 1) {
        if (pthread_create(&workers[started], NULL, worker_main, (void *)(intptr_t)(started + 1)) != 0) break;
        started++;
    }
    return started + 1 < want ? started + 1 : want;
}

void sc_parallel_for(sc_task_fn fn, void *frame, int64_t n, int64_t cost) {
    if (n <= 0) return;
    int want = sc_get_num_threads();
    if (want <= 1 || n == 1 || n >= MAX_POOLED_TASKS || in_parallel || serial_entry || n * (cost > 0 ? cost : 1) < serial_threshold()
        || pthread_mutex_trylock(&pool_lock) != 0) {
        fn(frame, 0, n);
        return;
    }
    int threads = ensure_workers(want);
    if (threads > 1) atomic_fetch_add_explicit(&handoffs, 1, memory_order_relaxed);
    if (threads <= 1 || backing_off()) {
        if (threads > 1) atomic_fetch_add_explicit(&backoff_jobs, 1, memory_order_relaxed);
        pthread_mutex_unlock(&pool_lock);
        fn(frame, 0, n);
        return;
    }
    posted.job.fn = fn;
    posted.job.frame = frame;
    posted.job.fp_mode = fp_mode_get();
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    atomic_store_explicit(&posted.threads, threads, memory_order_relaxed);
    /* Contiguous shares: consecutive kernels over the same rows give a
     * thread the same rows (its own cache) unless it steals. */
    for (int s = threads - 1; s >= 0; s--)     /* last to first: see claim_back */
        atomic_store_explicit(&slots[s].range, pack(n * s / threads, n * (s + 1) / threads), memory_order_release);
    int64_t posted_at = now_ns();
    uint32_t gen = (uint32_t)(atomic_load(&posted.ticket) >> 32) + 1;
    atomic_store(&posted.ticket, (uint64_t)gen << 32);   /* seq_cst: pairs with the sleepers count */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    in_parallel = 1;
    work(0, 0);
    in_parallel = 0;
    /* Only chunks a worker is still running remain: wait for them. */
    if (atomic_load_explicit(&done, memory_order_acquire) < n) {
        int64_t own = now_ns();
        for (int spins = 0; atomic_load_explicit(&done, memory_order_acquire) < n; spins++) {
            if (spins < WAIT_SPIN_ROUNDS) CPU_RELAX();
            else sched_yield();
        }
        int64_t end = now_ns();
        judge_wait(own - posted_at, end - own, end);
    }
    pthread_mutex_unlock(&pool_lock);
}

void sc_flag_raise(void *flag, uint64_t value) {
    atomic_store_explicit((_Atomic uint64_t *)flag, value, memory_order_release);
}

void sc_flag_wait(const void *flag, uint64_t value) {
    const _Atomic uint64_t *f = (const _Atomic uint64_t *)flag;
    for (int spins = 0; atomic_load_explicit(f, memory_order_acquire) < value; spins++) {
        if (spins < FLAG_SPIN_ROUNDS) CPU_RELAX();
        else sched_yield();
    }
}

/* -- a forest split across threads ------------------------------------------
 * sc_forest_parts: see structc_rt.h. The work is three passes over the
 * nodes (each node's tree from the roots down, the trees' inner-node counts,
 * each level's cut rows), a few us for a batch of a few thousand nodes,
 * against a barrier per level saved on each side of a training step. The
 * training entry's backward pass asks again for the forest its forward pass
 * split: the answer is kept for the rest of the outermost entry (its inputs
 * cannot change while it runs). */
#define FOREST_MAX_PARTS 64
#define FOREST_MIN_INNER 16       /* inner nodes a group gets at least, or no split */
#define FOREST_MAX_SHARE 70       /* percent of the inner nodes no group may exceed (one giant tree) */

typedef struct {
    uint64_t entry;               /* the outermost entry (entry_calls) the cuts were made in, 0: none */
    const void *key[3];           /* ... for these arrays */
    int64_t size[5], parts;       /* ... of these sizes and thread count, giving `parts` groups */
    int32_t *tree;                /* each node's tree */
    int64_t *weight;              /* each tree's inner nodes */
    int64_t *cuts;
    int64_t tree_cap, weight_cap, cuts_cap;
} forest_buf_t;

static _Atomic int forest_split = -1;      /* STRUCTC_FOREST_SPLIT (default on), or sc_set_forest_split's */
static pthread_key_t forest_key;
static pthread_once_t forest_once = PTHREAD_ONCE_INIT;

static void forest_free(void *p) {
    forest_buf_t *f = p;
    free(f->tree);
    free(f->weight);
    free(f->cuts);
    free(f);
}

static void forest_key_make(void) { pthread_key_create(&forest_key, forest_free); }

/* `*buf` with room for `n` elements of `size` bytes (grown, never shrunk). */
static int grow(void **buf, int64_t *cap, int64_t n, size_t size) {
    if (n <= *cap) return 1;
    void *p = realloc(*buf, (size_t)n * size);
    if (!p) return 0;
    *buf = p;
    *cap = n;
    return 1;
}

/* This thread's zeroed struct of `size` bytes under `key` (made on its first use), or NULL. */
static void *thread_own(pthread_key_t key, size_t size) {
    void *p = pthread_getspecific(key);
    if (!p) {
        p = calloc(1, size);
        if (!p || pthread_setspecific(key, p) != 0) {
            free(p);
            return NULL;
        }
    }
    return p;
}

static forest_buf_t *forest_buf(int64_t nodes, int64_t trees, int64_t cuts) {
    pthread_once(&forest_once, forest_key_make);
    forest_buf_t *f = thread_own(forest_key, sizeof *f);
    if (!f) return NULL;
    if (!grow((void **)&f->tree, &f->tree_cap, nodes, sizeof *f->tree) ||
        !grow((void **)&f->weight, &f->weight_cap, trees, sizeof *f->weight) ||
        !grow((void **)&f->cuts, &f->cuts_cap, cuts, sizeof *f->cuts)) return NULL;
    return f;
}

/* -- the rows an embedding's gradient holds ---------------------------------
 * sc_rows_arena, sc_rows_forget, sc_rows_record: see structc_rt.h. A scatter
 * of 20,000 x 256 floats zeroed 20 MB a step, a tenth of a tree-RNN's step,
 * to add a few hundred rows. Few arenas and tables are alive at once (one
 * arena per Net, one record per table), so lists under one lock do; a
 * kernel looks its record up once a task. */
typedef struct rows_map {
    void *region;
    int64_t rows;
    uint8_t *map;
    struct rows_map *next;
} rows_map_t;

typedef struct rows_arena {
    char *base;
    int64_t bytes;
    rows_map_t *maps;
    struct rows_arena *next;
} rows_arena_t;

static pthread_mutex_t rows_lock = PTHREAD_MUTEX_INITIALIZER;
static rows_arena_t *rows_arenas = NULL;

static void rows_free(rows_arena_t *a) {
    for (rows_map_t *m = a->maps, *next; m; m = next) {
        next = m->next;
        free(m->map);
        free(m);
    }
    free(a);
}

/* Unlink the arena at `base` (lock held); returns it, or NULL. */
static rows_arena_t *rows_unlink(const char *base) {
    for (rows_arena_t **p = &rows_arenas; *p; p = &(*p)->next)
        if ((*p)->base == base) {
            rows_arena_t *a = *p;
            *p = a->next;
            return a;
        }
    return NULL;
}

int sc_rows_arena(void *base, int64_t bytes) {
    rows_arena_t *a = calloc(1, sizeof *a);
    if (!a) return -1;
    a->base = base;
    a->bytes = bytes;
    pthread_mutex_lock(&rows_lock);
    rows_arena_t *old = rows_unlink(base);      /* a new arena where a freed one was: nothing of it holds */
    a->next = rows_arenas;
    rows_arenas = a;
    pthread_mutex_unlock(&rows_lock);
    if (old) rows_free(old);
    return 0;
}

void sc_rows_forget(void *base) {
    pthread_mutex_lock(&rows_lock);
    rows_arena_t *a = rows_unlink(base);
    pthread_mutex_unlock(&rows_lock);
    if (a) rows_free(a);
}

/* The arena holding `at` (lock held), or NULL: arenas do not overlap. */
static rows_arena_t *rows_arena_of(const char *at) {
    for (rows_arena_t *a = rows_arenas; a; a = a->next)
        if (at >= a->base && at < a->base + a->bytes) return a;
    return NULL;
}

/* The record of `region` in arena `a` (lock held), or NULL. */
static rows_map_t *rows_map_of(rows_arena_t *a, void *region, int64_t rows) {
    for (rows_map_t *m = a ? a->maps : NULL; m; m = m->next)
        if (m->region == region && m->rows == rows) return m;
    return NULL;
}

/* The record of `region` (made with every row marked when `make`), or NULL. */
static uint8_t *rows_lookup(void *region, int64_t rows, int make) {
    uint8_t *found = NULL;
    if (rows <= 0) return NULL;
    pthread_mutex_lock(&rows_lock);
    rows_arena_t *a = rows_arena_of(region);
    rows_map_t *m = rows_map_of(a, region, rows);
    if (m) {
        found = m->map;
    } else if (a && make) {     /* the table's first step: any row may hold something */
        m = malloc(sizeof *m);
        uint8_t *map = malloc((size_t)rows);
        if (m && map) {
            memset(map, 1, (size_t)rows);
            *m = (rows_map_t){region, rows, map, a->maps};
            a->maps = m;
            found = map;
        } else {
            free(m);
            free(map);
        }
    }
    pthread_mutex_unlock(&rows_lock);
    return found;
}

uint8_t *sc_rows_record(void *region, int64_t rows) { return rows_lookup(region, rows, 1); }

uint8_t *sc_rows_find(void *region, int64_t rows) { return rows_lookup(region, rows, 0); }

int sc_rows_copy(void *region, int64_t rows, uint8_t *buf, int into_record) {
    if (rows <= 0) return 0;
    pthread_mutex_lock(&rows_lock);
    rows_map_t *m = rows_map_of(rows_arena_of(region), region, rows);
    if (m && into_record) memcpy(m->map, buf, (size_t)rows);
    else if (m) memcpy(buf, m->map, (size_t)rows);
    pthread_mutex_unlock(&rows_lock);
    return m != NULL;
}

/* -- a thread's scratch ------------------------------------------------------- */

typedef struct {
    void *data;
    int64_t size;
} scratch_t;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p) {
    scratch_t *s = p;
    free(s->data);
    free(s);
}

static void scratch_key_make(void) { pthread_key_create(&scratch_key, scratch_free); }

void *sc_scratch(int64_t bytes) {
    pthread_once(&scratch_once, scratch_key_make);
    scratch_t *s = thread_own(scratch_key, sizeof *s);
    if (!s) return NULL;
    if (bytes <= s->size) return s->data;
    if (bytes <= 0 || bytes > ((int64_t)1 << 40)) return NULL;
    size_t size = ((size_t)bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, size);
    if (!p) return NULL;
    free(s->data);
    s->data = p;
    s->size = (int64_t)size;
    return p;
}

/* Level l's rows [*lo, *hi), clamped as the kernels clamp them. */
static void level_rows(const int32_t *level_end, int64_t l, int64_t nodes, int64_t *lo, int64_t *hi) {
    int64_t a = level_end[l - 1], b = level_end[l];
    a = a < 0 ? 0 : a > nodes ? nodes : a;
    b = b < 0 ? 0 : b > nodes ? nodes : b;
    *lo = a;
    *hi = b < a ? a : b;
}

static int64_t forest_cuts(const int32_t *children, int64_t arity, const int32_t *level_end, int64_t levels,
                           const int32_t *roots, int64_t trees, int64_t nodes, int64_t want,
                           int32_t *tree, int64_t *weight, int64_t *cuts);

static int forest_split_on(void) { return env_switch(&forest_split, "STRUCTC_FOREST_SPLIT"); }

int sc_set_forest_split(int on) {
    int before = forest_split_on();                 /* the environment's, if not set yet */
    atomic_store(&forest_split, on ? 1 : 0);
    return before;
}

const int64_t *sc_forest_parts(const int32_t *children, int64_t arity, const int32_t *level_end, int64_t levels,
                               const int32_t *roots, int64_t trees, int64_t nodes, int64_t *parts) {
    int64_t want = sc_get_num_threads();
    *parts = 1;
    if (!forest_split_on()) return NULL;
    if (want > FOREST_MAX_PARTS) want = FOREST_MAX_PARTS;
    if (want <= 1 || in_parallel || serial_entry || backing_off() || trees < want || levels < 2 || nodes <= 0
        || arity <= 0 || level_end[0] <= 0 || level_end[levels - 1] != nodes) return NULL;
    forest_buf_t *f = forest_buf(nodes, trees, (want + 1) * levels + want);
    if (!f) return NULL;
    const void *key[3] = {children, level_end, roots};
    int64_t size[5] = {arity, levels, trees, nodes, want};
    if (entry_depth > 0 && f->entry == entry_calls && !memcmp(key, f->key, sizeof key)
        && !memcmp(size, f->size, sizeof size)) {
        *parts = f->parts;
        return f->parts > 1 ? f->cuts : NULL;
    }
    f->entry = 0;
    int32_t *tree = f->tree;
    int64_t *weight = f->weight, *cuts = f->cuts;
    int64_t made = forest_cuts(children, arity, level_end, levels, roots, trees, nodes, want, tree, weight, cuts);
    if (entry_depth > 0) {
        f->entry = entry_calls;
        memcpy(f->key, key, sizeof key);
        memcpy(f->size, size, sizeof size);
        f->parts = made;
    }
    *parts = made;
    return made > 1 ? cuts : NULL;
}

/* sc_forest_parts' work: the groups made (1: not split). */
static int64_t forest_cuts(const int32_t *children, int64_t arity, const int32_t *level_end, int64_t levels,
                           const int32_t *roots, int64_t trees, int64_t nodes, int64_t want,
                           int32_t *tree, int64_t *weight, int64_t *cuts) {
    for (int64_t l = 1; l < levels; l++)
        if (level_end[l] < level_end[l - 1]) return 1;
    for (int64_t r = 0; r < nodes; r++) tree[r] = -1;
    for (int64_t k = 0; k < trees; k++) {
        int64_t r = roots[k];
        if (r < 0 || r >= nodes || tree[r] != -1) return 1;
        tree[r] = (int32_t)k;
        weight[k] = 0;
    }
    /* Each node's tree, from the top level down; every child once, at a lower level. */
    for (int64_t l = levels - 1; l >= 1; l--) {
        int64_t lo, hi;
        level_rows(level_end, l, nodes, &lo, &hi);
        for (int64_t r = lo; r < hi; r++) {
            int32_t t = tree[r];
            if (t < 0 || (r > lo && t < tree[r - 1])) return 1;     /* unreached, or out of tree order */
            weight[t]++;
            for (int64_t a = 0; a < arity; a++) {
                int64_t c = children[r * arity + a];
                if (c < 0 || c >= nodes) continue;                      /* no child (the kernels' rule) */
                if (c >= lo || tree[c] != -1) return 1;
                tree[c] = t;
            }
        }
    }
    for (int64_t r = 0; r < level_end[0]; r++)          /* the leaves: reached, in tree order */
        if (tree[r] < 0 || (r > 0 && tree[r] < tree[r - 1])) return 1;
    /* Consecutive trees of about total / want inner nodes each. */
    int64_t total = 0, bound[FOREST_MAX_PARTS + 1], most = 0;
    for (int64_t k = 0; k < trees; k++) total += weight[k];
    if (total < want * FOREST_MIN_INNER) return 1;
    bound[0] = 0;
    int64_t sum = 0, p = 1;
    for (int64_t k = 0; k < trees && p < want; k++) {
        sum += weight[k];
        if (sum * want >= p * total) bound[p++] = k + 1;
    }
    while (p <= want) bound[p++] = trees;
    for (int64_t q = 0; q < want; q++) {
        int64_t w = 0;
        for (int64_t k = bound[q]; k < bound[q + 1]; k++) w += weight[k];
        if (w > most) most = w;
    }
    if (most * 100 > total * FOREST_MAX_SHARE) return 1;
    /* Each level's first row of each group. */
    for (int64_t l = 0; l < levels; l++) {
        int64_t lo, hi;
        if (l == 0) {
            lo = 0;
            hi = level_end[0];
        } else {
            level_rows(level_end, l, nodes, &lo, &hi);
        }
        int64_t r = lo;
        cuts[l] = lo;
        for (int64_t q = 1; q < want; q++) {
            while (r < hi && tree[r] < bound[q]) r++;
            cuts[q * levels + l] = r;
        }
        cuts[want * levels + l] = hi;
    }
    /* Each group's scratch rows: after the groups before it, as many as its largest level. */
    int64_t *base = cuts + (want + 1) * levels, at = 0;
    for (int64_t q = 0; q < want; q++) {
        int64_t rows = 0;
        for (int64_t l = 1; l < levels; l++) {
            int64_t n = cuts[(q + 1) * levels + l] - cuts[q * levels + l];
            if (n > rows) rows = n;
        }
        base[q] = at;
        at += rows;
    }
    return want;
}
