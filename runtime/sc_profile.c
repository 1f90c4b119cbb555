/* structc runtime: the kernel profiler's timing shim (structc/profile.py).
 *
 * While a profiled model's machine code is loaded, its `sc_parallel_for`
 * symbol resolves to `sc_prof_parallel_for`, which forwards to the real
 * one and, when recording, writes one event per call (on the calling
 * thread) and one per chunk of tasks (on the thread that ran it) into a
 * buffer owned by Python. It is part of the runtime extension so that
 * profiling needs no C compiler on the user's machine.
 *
 * Each thread takes SC_PROF_BLOCK entries of the buffer at a time and fills
 * them alone: an entry taken per event (one shared counter, neighbours on
 * one cache line) moved lines between the cores at every event, and the
 * tree network's profiled 2-thread step ran 5-24% slower than unprofiled
 * (3.5-9% with blocks: its levels' kernels are many small nested calls). An
 * entry left unwritten (the rest of a thread's last block) keeps fn = 0. */
#define _POSIX_C_SOURCE 199309L   /* clock_gettime under -std=c11 */
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "structc_rt.h"

/* Read by numpy as a structured array: keep in step with profile.EVENT. */
typedef struct {
    int64_t fn;        /* the kernel's address */
    int64_t start_ns;  /* CLOCK_MONOTONIC */
    int64_t end_ns;
    int64_t lo, hi;    /* a chunk's tasks; a call's task count in hi */
    int32_t lane;      /* a number per thread, kept for the process's life */
    int32_t kind;      /* 0: a call of sc_parallel_for; 1: a chunk of it */
    int32_t depth;     /* calls made inside another kernel: > 0 */
    int32_t pad;
} sc_prof_event;

typedef struct {
    sc_task_fn fn;
    void *frame;
} wrapped;

#define SC_PROF_BLOCK 64           /* keep in step with profile.BLOCK */

static sc_prof_event *events;
static int64_t capacity;
static _Atomic int64_t count;      /* entries taken, a block at a time */
static _Atomic int64_t dropped;
static atomic_int recording;
static atomic_int generation;      /* a new recording: every thread's block is stale */
static atomic_int lanes;
static _Thread_local int lane = -1;
static _Thread_local int depth;
static _Thread_local int block_generation = -1;
static _Thread_local int64_t block_next, block_end;    /* this thread's entries left: [next, end) */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void record(sc_task_fn fn, int64_t start, int64_t end, int64_t lo, int64_t hi, int kind, int at_depth) {
    int gen = atomic_load(&generation);
    if (block_generation != gen || block_next >= block_end) {
        int64_t i = atomic_fetch_add(&count, SC_PROF_BLOCK);
        block_generation = gen;
        block_next = i;
        block_end = i + SC_PROF_BLOCK < capacity ? i + SC_PROF_BLOCK : capacity;
    }
    if (block_next >= block_end) {     /* never write past the buffer: count what was lost */
        atomic_fetch_add(&dropped, 1);
        return;
    }
    if (lane < 0) lane = atomic_fetch_add(&lanes, 1);
    sc_prof_event *e = &events[block_next++];
    e->fn = (int64_t)(intptr_t)fn;
    e->start_ns = start;
    e->end_ns = end;
    e->lo = lo;
    e->hi = hi;
    e->lane = lane;
    e->kind = kind;
    e->depth = at_depth;
    e->pad = 0;
}

static void timed_chunk(void *arg, int64_t lo, int64_t hi) {
    wrapped *w = (wrapped *)arg;
    int at = depth++;
    int64_t t0 = now_ns();
    w->fn(w->frame, lo, hi);
    int64_t t1 = now_ns();
    depth--;
    record(w->fn, t0, t1, lo, hi, 1, at);
}

void sc_prof_parallel_for(sc_task_fn fn, void *frame, int64_t n, int64_t cost) {
    if (!atomic_load_explicit(&recording, memory_order_relaxed)) {
        sc_parallel_for(fn, frame, n, cost);
        return;
    }
    wrapped w = {fn, frame};
    int at = depth;
    int64_t t0 = now_ns();
    sc_parallel_for(timed_chunk, &w, n, cost);
    record(fn, t0, now_ns(), 0, n, 0, at);
}

/* Record into `buffer` (room for `cap` events) from now on; NULL stops. */
void sc_prof_start(sc_prof_event *buffer, int64_t cap) {
    atomic_store(&recording, 0);
    events = buffer;
    capacity = buffer ? cap : 0;
    atomic_store(&count, 0);
    atomic_store(&dropped, 0);
    atomic_fetch_add(&generation, 1);
    if (buffer) atomic_store(&recording, 1);
}

/* Stop recording; returns how many entries from the start may hold events
 * (those whose fn is 0 do not), `*lost` the events that did not fit. */
int64_t sc_prof_stop(int64_t *lost) {
    atomic_store(&recording, 0);
    int64_t n = atomic_load(&count);
    *lost = atomic_load(&dropped);
    n = n < capacity ? n : capacity;
    capacity = 0;                  /* a late writer can only count itself lost */
    return n;
}

int64_t sc_prof_now_ns(void) { return now_ns(); }
