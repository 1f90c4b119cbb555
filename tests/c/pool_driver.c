/* The thread pool on its own (tests/test_threads.py builds it with
 * runtime/structc_rt.c): random jobs at 2-4 threads, each task must run
 * exactly once; and in a job over 256 rows at 2 threads where both threads
 * take part, each starts on its own half (the caller at row 0, the worker at
 * row 128), so that consecutive jobs over the same rows keep them on the
 * same thread. Prints "ok <jobs> <jobs starting right> <jobs tried>" or
 * what went wrong. */
#include "structc_rt.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TASKS 150000
static _Atomic int hits[MAX_TASKS];

static void count(void *frame, int64_t lo, int64_t hi) {
    (void)frame;
    for (int64_t i = lo; i < hi; i++) {
        atomic_fetch_add(&hits[i], 1);
        if ((i & 63) == 0)
            for (volatile int k = 0; k < 200; k++) {}
    }
}

/* A job that records the first row each thread ran; its first claims wait
 * until both threads have one (so neither runs the whole job by arriving first). */
typedef struct {
    long round;
    _Atomic int arrived;
    pthread_t caller;
    int64_t caller_first, worker_first;
} marked_t;

static _Thread_local long my_round = -1;

static void mark(void *frame, int64_t lo, int64_t hi) {
    marked_t *m = frame;
    if (my_round != m->round) {
        my_round = m->round;
        *(pthread_equal(pthread_self(), m->caller) ? &m->caller_first : &m->worker_first) = lo;
        atomic_fetch_add(&m->arrived, 1);
        for (long spins = 0; atomic_load(&m->arrived) < 2 && spins < 2000000000L; spins++) {}
    }
    for (int64_t i = lo; i < hi; i++)
        for (volatile int k = 0; k < 2000; k++) {}
}

int main(int argc, char **argv) {
    long jobs = argc > 1 ? atol(argv[1]) : 3000;
    /* first, while the pool has one worker (more would steal from the start) */
    sc_set_num_threads(2);
    long right = 0, tried = 50;
    for (long round = 0; round < tried; round++) {
        marked_t m = {round, 0, pthread_self(), -1, -1};
        sc_parallel_for(mark, &m, 256, 1 << 20);
        right += m.caller_first == 0 && m.worker_first == 128;
    }
    srand(1);
    for (long j = 0; j < jobs; j++) {
        if (j % 1000 == 0) sc_set_num_threads(2 + (int)(j / 1000) % 3);
        int64_t n = 2 + rand() % (j % 7 == 0 ? MAX_TASKS - 2 : 3000);
        memset(hits, 0, sizeof hits[0] * (size_t)n);
        sc_parallel_for(count, NULL, n, 1 << 20);
        for (int64_t i = 0; i < n; i++)
            if (hits[i] != 1) {
                printf("job %ld (n=%lld): task %lld ran %d times\n", j, (long long)n, (long long)i, hits[i]);
                return 1;
            }
    }
    printf("ok %ld %ld %ld\n", jobs, right, tried);
    return 0;
}
