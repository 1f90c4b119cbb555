/* structc runtime: support code linked into every compiled model.
 *
 * Kernels are functions over a range of tasks; sc_parallel_for splits the
 * range across a pool of threads that is created once and kept spinning
 * briefly between calls, so a training step pays no thread start-up. */
#ifndef STRUCTC_RT_H
#define STRUCTC_RT_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*sc_task_fn)(void *frame, int64_t lo, int64_t hi);

/* Run fn(frame, lo, hi) over [0, n) split across threads; `cost` is the
 * work per task (roughly flops), used to run small jobs on one thread. */
void sc_parallel_for(sc_task_fn fn, void *frame, int64_t n, int64_t cost);

/* Bracket an entry point's kernels: when `work` (the sum of their tasks x
 * cost) is small, every sc_parallel_for until sc_entry_end runs on the
 * caller. Returns the state to restore (entries nest: recursion bodies). */
int32_t sc_entry_begin(int64_t work);
void sc_entry_end(int32_t outer);

/* Threads used by sc_parallel_for (1 = the caller only). Returns the count set. */
int sc_set_num_threads(int n);
int sc_get_num_threads(void);
/* Tasks to cut `rows` rows into at multiples of `step` (a tree level): one per
 * thread, none empty, so a level too small to split is one task (no hand-off). */
int64_t sc_row_tasks(int64_t rows, int64_t step);
/* A forest's trees in `parts` groups, one per thread, each running all its
 * levels with no barrier between them (a node's children are its own tree's).
 * Groups are consecutive trees of about equal inner-node counts; in every
 * level l, group p's rows are [cuts[p * levels + l], cuts[(p + 1) * levels + l])
 * (nodes are in schedule order, each level's rows by tree), and its rows
 * of per-level scratch start at row cuts[(parts + 1) * levels + p] (as many
 * as its largest level: a group reuses them level after level, apart from
 * the others', which may be at another level meanwhile). Returns the
 * groups made (cuts: a buffer of this thread's, until its next call), or
 * NULL when a forest is not split: one thread, an entry running serially, a
 * forest too small or too uneven to gain, or arrays not laid out so (a node
 * reached twice or never, a level's rows out of tree order). */
const int64_t *sc_forest_parts(const int32_t *children, int64_t arity, const int32_t *level_end, int64_t levels,
                               const int32_t *roots, int64_t trees, int64_t nodes, int64_t *parts);
/* A buffer of at least `bytes` bytes, 64-byte aligned, of the calling thread's own
 * (kept and grown, never shrunk; freed when the thread ends), or NULL when
 * memory is short: a kernel's working copy (a weight gradient's k block of a
 * wide B, `lower/gemm.py`), which then reads its operand in place. Its contents
 * are the caller's until its next call on this thread. */
void *sc_scratch(int64_t bytes);

/* Which rows of an embedding's gradient a training step's scatter wrote
 * (ops/embedding.py, `record`), so that the next step zeroes those rows
 * instead of the whole table. A Net registers its gradient arena
 * (sc_rows_arena: 0, or -1 when memory is short) while nothing but its own
 * training entry writes it, and takes it back (sc_rows_forget) once
 * anything else may (the gradients handed out, a data-parallel sum).
 * sc_rows_record returns the record of `rows` bytes (1: the row may be
 * nonzero) of the table at `region` inside a registered arena, made with
 * every row marked; NULL outside one (or when memory is short): the
 * kernel then zeroes the whole table. */
int sc_rows_arena(void *base, int64_t bytes);
void sc_rows_forget(void *base);
uint8_t *sc_rows_record(void *region, int64_t rows);
/* The record sc_rows_record made for `region`, or NULL: no new one (the update reads what a scatter kept). */
uint8_t *sc_rows_find(void *region, int64_t rows);
/* Copy the record of `region` into `buf` (`into_record` 0) or `buf` into it (1),
 * `rows` bytes, under the records' lock; 1 if there is one, else 0 (nothing
 * copied). Data-parallel training (structc/distributed.py): after the ranks'
 * sum, a row any rank's step wrote may be nonzero on every rank. */
int sc_rows_copy(void *region, int64_t rows, uint8_t *buf, int into_record);

/* A flag another process may poll in shared memory (structc/shmsum.py):
 * sc_flag_raise stores `value` (release: the writes before it are seen
 * first); sc_flag_wait returns once the flag holds `value` or more
 * (acquire), polling with pause, then yielding after each poll. `flag` is
 * a uint64, 8-byte aligned. */
void sc_flag_raise(void *flag, uint64_t value);
void sc_flag_wait(const void *flag, uint64_t value);
/* Whether forests are cut so (default on; STRUCTC_FOREST_SPLIT=0 turns it off):
 * to measure against the level by level path. Returns the previous setting. */
int sc_set_forest_split(int on);

/* For tests: worker threads running in this process, and jobs handed to
 * them so far (a job below the serial threshold is not one; a job run on the
 * caller while the pool backs off after a stall is). */
int sc_pool_workers(void);
uint64_t sc_handoffs(void);
/* Jobs run on the caller while backing off; stalls (long waits for a
 * preempted worker) and preemptions (windows of entries whose caller was off
 * the CPU too long) seen so far; each starts a back-off. Tests: the next
 * pooled job's worker sleeps `ns` in the first chunk it claims, or the next
 * entry's caller sleeps `ns` before it returns, as if preempted. */
uint64_t sc_backoff_jobs(void);
/* Which signs start a back-off (default both; STRUCTC_BACKOFF=0 turns it off,
 * to measure scaling itself on a loaded machine); resets any back-off.
 * Returns the previous mode. */
#define SC_BACKOFF_STALLS 1
#define SC_BACKOFF_PREEMPTED 2
int sc_set_backoff(int mode);
/* Whether entries of moderate work are measured serial against pooled and run
 * the faster way (default on; STRUCTC_ADAPT=0 turns it off). Forgets this
 * thread's measurements. Returns the previous setting. */
int sc_set_adaptive(int on);
/* Tests: every timed pooled call of an entry being measured counts this much longer. */
void sc_debug_adapt_pooled(int64_t ns);
uint64_t sc_stalls(void);
uint64_t sc_preemptions(void);
void sc_debug_stall_worker(int64_t ns);
void sc_debug_stall_caller(int64_t ns);
/* Tests: while held, a back-off started (after the hold) does not end with
 * time (a test's steps after it then see it however slowly the machine runs
 * them); released, it ends at its usual time (long past, then). */
void sc_debug_hold_backoff(int hold);

#ifdef __cplusplus
}
#endif
#endif
