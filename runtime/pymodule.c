/* `structc._runtime`: the runtime as an importable extension (so pip builds
 * and installs it), plus `invoke`, the fast path from Python into a compiled
 * entry point. It takes data pointers through the buffer protocol and
 * releases the GIL for the duration of the native call. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "structc_rt.h"
#include "sc_pools.h"

typedef int32_t (*entry_fn)(void *params, void *grads, void *state, void *workspace, void **inputs,
                            void **outputs, const int64_t *dims, const float *hyper, int64_t mode);

#define MAX_ARGS 256

static int collect(PyObject *seq, const char *what, Py_buffer *views, void **ptrs, Py_ssize_t *count) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_ARGS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "too many %s (%zd)", what, n);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t k = 0; k < n; k++) {
        int writable = what[0] == 'o';
        if (PyObject_GetBuffer(items[k], &views[k], PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
            for (Py_ssize_t j = 0; j < k; j++) PyBuffer_Release(&views[j]);
            Py_DECREF(fast);
            return -1;
        }
        ptrs[k] = views[k].buf;
    }
    Py_DECREF(fast);
    *count = n;
    return 0;
}

/* invoke(fn, params, grads, state, workspace, inputs, outputs, dims, hyper, mode) -> status
 * fn, params, grads, state, workspace, hyper: addresses (int); inputs, outputs:
 * sequences of C-contiguous buffers; dims: sequence of int. */
static PyObject *invoke(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "invoke takes 10 arguments");
        return NULL;
    }
    void *addr[5];
    const int addr_args[5] = {0, 1, 2, 3, 4};
    for (int k = 0; k < 5; k++) {
        addr[k] = PyLong_AsVoidPtr(args[addr_args[k]]);
        if (PyErr_Occurred()) return NULL;
    }
    void *hyper = PyLong_AsVoidPtr(args[8]);
    long long mode = PyLong_AsLongLong(args[9]);
    if (PyErr_Occurred()) return NULL;

    int64_t dims[MAX_ARGS];
    PyObject *dseq = PySequence_Fast(args[7], "dims");
    if (!dseq) return NULL;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(dseq);
    if (nd > MAX_ARGS) { Py_DECREF(dseq); PyErr_SetString(PyExc_ValueError, "too many dims"); return NULL; }
    for (Py_ssize_t k = 0; k < nd; k++) {
        dims[k] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(dseq, k));
    }
    Py_DECREF(dseq);
    if (PyErr_Occurred()) return NULL;

    Py_buffer in_views[MAX_ARGS], out_views[MAX_ARGS];
    void *in_ptrs[MAX_ARGS], *out_ptrs[MAX_ARGS];
    Py_ssize_t n_in = 0, n_out = 0;
    if (collect(args[5], "inputs", in_views, in_ptrs, &n_in) < 0) return NULL;
    if (collect(args[6], "outputs", out_views, out_ptrs, &n_out) < 0) {
        for (Py_ssize_t j = 0; j < n_in; j++) PyBuffer_Release(&in_views[j]);
        return NULL;
    }
    int32_t status;
    entry_fn fn = (entry_fn)addr[0];
    Py_BEGIN_ALLOW_THREADS
    status = fn(addr[1], addr[2], addr[3], addr[4], in_ptrs, out_ptrs, dims, (const float *)hyper, mode);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < n_in; j++) PyBuffer_Release(&in_views[j]);
    for (Py_ssize_t j = 0; j < n_out; j++) PyBuffer_Release(&out_views[j]);
    return PyLong_FromLong(status);
}

/* first_out_of_range(buffer, lo, hi) -> index of the first element outside
 * [lo, hi), or -1. The buffer holds int32 or int64 (format 'i'/'l'/'q'). */
static PyObject *first_out_of_range(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "first_out_of_range takes 3 arguments");
        return NULL;
    }
    long long lo = PyLong_AsLongLong(args[1]), hi = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[0], &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    Py_ssize_t bad = -1;
    if (v.itemsize == 4) {
        const int32_t *p = (const int32_t *)v.buf;
        Py_ssize_t n = v.len / 4;
        for (Py_ssize_t k = 0; k < n; k++)
            if (p[k] < lo || p[k] >= hi) { bad = k; break; }
    } else if (v.itemsize == 8) {
        const int64_t *p = (const int64_t *)v.buf;
        Py_ssize_t n = v.len / 8;
        for (Py_ssize_t k = 0; k < n; k++)
            if (p[k] < lo || p[k] >= hi) { bad = k; break; }
    } else {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_TypeError, "expected int32 or int64 data");
        return NULL;
    }
    PyBuffer_Release(&v);
    return PyLong_FromSsize_t(bad);
}

/* workspace_size(fn, dims) -> the bytes an entry's workspace-size function
 * (address fn) returns for these dims (a sequence of int): the training path
 * calls it on every batch (forests and graphs bind new dims each time), where
 * a ctypes call cost several microseconds. */
typedef int64_t (*workspace_fn)(const int64_t *dims);

static PyObject *workspace_size(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "workspace_size takes 2 arguments");
        return NULL;
    }
    workspace_fn fn = (workspace_fn)PyLong_AsVoidPtr(args[0]);
    if (PyErr_Occurred()) return NULL;
    if (!fn) {
        PyErr_SetString(PyExc_ValueError, "workspace_size: a null function address");
        return NULL;
    }
    PyObject *dseq = PySequence_Fast(args[1], "dims");
    if (!dseq) return NULL;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(dseq);
    if (nd > MAX_ARGS) { Py_DECREF(dseq); PyErr_SetString(PyExc_ValueError, "too many dims"); return NULL; }
    int64_t dims[MAX_ARGS] = {1};                /* as `_workspace_size` did: at least one slot */
    for (Py_ssize_t k = 0; k < nd; k++) dims[k] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(dseq, k));
    Py_DECREF(dseq);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(fn(dims));
}

/* The gradient arena of data-parallel training: n gradients, then the loss
 * denominator and the weighted loss (structc/distributed.py). Each pass is the
 * numpy expression it replaces, element by element in float32 (IEEE multiply
 * and divide round the same in C), so the bits are the same; vectorised as
 * numpy's loops are. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* one clone per vector width, picked at load time, as numpy picks its loops */
#define SC_VECTORISE __attribute__((optimize("O3"), target_clones("avx512f", "avx2", "default")))
#elif defined(__GNUC__) && !defined(__clang__)
#define SC_VECTORISE __attribute__((optimize("O3")))
#else
#define SC_VECTORISE
#endif

static SC_VECTORISE void scale_by(float *g, Py_ssize_t n, float c) {
    for (Py_ssize_t k = 0; k < n; k++) g[k] *= c;
}

static SC_VECTORISE void divide_by(float *g, Py_ssize_t n, float d) {
    for (Py_ssize_t k = 0; k < n; k++) g[k] /= d;
}

static int arena_view(PyObject *arena, Py_buffer *v) {
    if (PyObject_GetBuffer(arena, v, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) return -1;
    if (v->itemsize != 4 || !v->format || strcmp(v->format, "f") != 0 || v->len / 4 < 2) {
        PyBuffer_Release(v);
        PyErr_SetString(PyExc_TypeError, "expected a float32 gradient arena (the gradients and two floats)");
        return -1;
    }
    return 0;
}

/* weigh_arena(arena, count, loss): the gradients times float32(count), then
 * count and loss * count (in double, stored as float32) in the last two floats:
 * `np.multiply(grads, np.float32(count), out=grads); arena[n], arena[n + 1] = count, loss * count`. */
static PyObject *weigh_arena(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "weigh_arena takes 3 arguments");
        return NULL;
    }
    double count = PyFloat_AsDouble(args[1]), loss = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer v;
    if (arena_view(args[0], &v) < 0) return NULL;
    float *a = (float *)v.buf;
    Py_ssize_t n = v.len / 4 - 2;
    scale_by(a, n, (float)count);
    a[n] = (float)count;
    a[n + 1] = (float)(loss * count);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* unweigh_arena(arena, divisor) -> loss: the gradients divided by float32(divisor)
 * and the weighted loss divided by it, in float32:
 * `np.divide(grads, np.float32(divisor), out=grads); float(arena[n + 1] / np.float32(divisor))`. */
static PyObject *unweigh_arena(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "unweigh_arena takes 2 arguments");
        return NULL;
    }
    double divisor = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer v;
    if (arena_view(args[0], &v) < 0) return NULL;
    float *a = (float *)v.buf, d = (float)divisor;
    Py_ssize_t n = v.len / 4 - 2;
    divide_by(a, n, d);
    float loss = a[n + 1] / d;
    PyBuffer_Release(&v);
    return PyFloat_FromDouble((double)loss);
}

static SC_VECTORISE void add_into(float *out, const float *a, const float *b, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n; k++) out[k] = a[k] + b[k];
}

static SC_VECTORISE void add_to(float *out, const float *a, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n; k++) out[k] += a[k];
}

/* shm_sum(arena, slots, flags, rank, number): structc/shmsum.py's sum of the
 * ranks' arenas through shared memory, in one call. This rank's arena goes into
 * its slot (slots[rank]) and its flag (flags[rank], a uint64 on a cache line of
 * its own) is raised to the sum's `number` (release); once every other rank's
 * flag reached `number` (acquire: their slots are written), arena = the slots
 * added in rank order, so every rank gets the same bits. One call where a
 * copy, two window syncs, an MPI Barrier and an add took five (the Barrier
 * alone ~2.8 us between two local MPICH ranks on a Zen 4). The wait is
 * sc_flag_wait's, with the GIL released. A rank that never
 * arrives (it died) leaves this one waiting, as a Barrier would: the job's
 * abort (distributed.install_abort_hook, mpiexec) ends both. */
static PyObject *shm_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "shm_sum takes (arena, slots, flags, rank, number)");
        return NULL;
    }
    Py_ssize_t rank = PyLong_AsSsize_t(args[3]);
    unsigned long long number = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    PyObject *slots = PySequence_Fast(args[1], "shm_sum: slots must be a sequence of arenas");
    if (!slots) return NULL;
    PyObject *flags = PySequence_Fast(args[2], "shm_sum: flags must be a sequence of buffers");
    if (!flags) {
        Py_DECREF(slots);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(slots);
    Py_buffer out, *views = NULL, *marks = NULL;
    Py_ssize_t held = 0, marked = 0;
    int ok = 0;
    if (count < 2 || count > 4096 || PySequence_Fast_GET_SIZE(flags) != count || rank < 0 || rank >= count) {
        PyErr_SetString(PyExc_ValueError, "shm_sum: 2 to 4096 slots, as many flags, and a rank among them");
        goto release_lists;
    }
    if (arena_view(args[0], &out) < 0) goto release_lists;
    views = PyMem_Calloc((size_t)count, sizeof(Py_buffer));
    marks = PyMem_Calloc((size_t)count, sizeof(Py_buffer));
    if (!views || !marks) {
        PyErr_NoMemory();
        goto release;
    }
    /* everything checked before anything is written or raised */
    for (; held < count; held++)
        if (arena_view(PySequence_Fast_GET_ITEM(slots, held), &views[held]) < 0) goto release;
    for (; marked < count; marked++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(flags, marked), &marks[marked], PyBUF_WRITABLE) < 0)
            goto release;
    for (Py_ssize_t k = 0; k < count; k++) {
        if (views[k].len != out.len || views[k].buf == out.buf) {
            PyErr_SetString(PyExc_ValueError, "shm_sum: every slot must be as long as the arena, and not it");
            goto release;
        }
        if (marks[k].len < 8 || ((uintptr_t)marks[k].buf & 7) != 0) {
            PyErr_SetString(PyExc_ValueError, "shm_sum: every flag must be 8 aligned bytes at least");
            goto release;
        }
    }
    Py_ssize_t n = out.len / 4;
    Py_BEGIN_ALLOW_THREADS
    memcpy(views[rank].buf, out.buf, (size_t)out.len);
    sc_flag_raise(marks[rank].buf, (uint64_t)number);
    for (Py_ssize_t k = 0; k < count; k++)
        if (k != rank) sc_flag_wait(marks[k].buf, (uint64_t)number);
    add_into((float *)out.buf, (const float *)views[0].buf, (const float *)views[1].buf, n);
    for (Py_ssize_t k = 2; k < count; k++) add_to((float *)out.buf, (const float *)views[k].buf, n);
    Py_END_ALLOW_THREADS
    ok = 1;
release:
    for (Py_ssize_t k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    for (Py_ssize_t k = 0; k < marked; k++) PyBuffer_Release(&marks[k]);
    PyMem_Free(views);
    PyMem_Free(marks);
    PyBuffer_Release(&out);
release_lists:
    Py_DECREF(slots);
    Py_DECREF(flags);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* lpt_owners(costs, size, owner): data-parallel sharding (structc/distributed.py,
 * `balance_batches`). `costs` is float64 [rows, batch], each row an epoch's batch
 * with its costs sorted largest first; each position in turn goes to the least-
 * loaded of `size` ranks (ties to the lowest), whose load grows by its cost, as
 * numpy's argmin and += did; non-finite costs (padding) add nothing. `owner` is
 * int64 [rows, batch], written in place. In C because it is one step per item and
 * runs every epoch. */
static PyObject *lpt_owners(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "lpt_owners takes 3 arguments");
        return NULL;
    }
    long size = PyLong_AsLong(args[1]);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size < 1 || size > (1L << 20)) {
        PyErr_SetString(PyExc_ValueError, "lpt_owners: size must be in [1, 2**20]");
        return NULL;
    }
    Py_buffer c, o;
    if (PyObject_GetBuffer(args[0], &c, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &o, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&c);
        return NULL;
    }
    if (c.ndim != 2 || c.itemsize != 8 || strcmp(c.format, "d") != 0 || o.ndim != 2 || o.itemsize != 8 ||
        (strcmp(o.format, "l") != 0 && strcmp(o.format, "q") != 0) || o.shape[0] != c.shape[0] ||
        o.shape[1] != c.shape[1]) {
        PyBuffer_Release(&c);
        PyBuffer_Release(&o);
        PyErr_SetString(PyExc_TypeError, "lpt_owners: costs float64 [rows, batch] and owner int64 of that shape");
        return NULL;
    }
    double *loads = PyMem_Calloc((size_t)size, sizeof(double));
    if (!loads) {
        PyBuffer_Release(&c);
        PyBuffer_Release(&o);
        return PyErr_NoMemory();
    }
    const double *cost = (const double *)c.buf;
    int64_t *owner = (int64_t *)o.buf;
    Py_ssize_t rows = c.shape[0], batch = c.shape[1];
    for (Py_ssize_t i = 0; i < rows; i++) {
        memset(loads, 0, (size_t)size * sizeof(double));
        for (Py_ssize_t j = 0; j < batch; j++) {
            long least = 0;
            for (long r = 1; r < size; r++)
                if (loads[r] < loads[least]) least = r;
            double v = cost[i * batch + j];
            owner[i * batch + j] = least;
            if (isfinite(v)) loads[least] += v;
        }
    }
    PyMem_Free(loads);
    PyBuffer_Release(&c);
    PyBuffer_Release(&o);
    Py_RETURN_NONE;
}

/* handoffs() -> jobs the thread pool has been handed so far; pool_workers() ->
 * its worker threads in this process. For tests of the threading decisions. */
static PyObject *handoffs(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(sc_handoffs());
}

static PyObject *pool_workers(PyObject *self, PyObject *unused) { return PyLong_FromLong(sc_pool_workers()); }

/* backoff_jobs() / stalls() / preemptions(): jobs run on the caller while the
 * pool backs off, and what started back-offs (see structc_rt.h);
 * debug_stall_worker(ns) / debug_stall_caller(ns): a worker or an entry's
 * caller sleeps as if preempted (tests of the back-off). */
static PyObject *backoff_jobs(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(sc_backoff_jobs());
}

static PyObject *stalls(PyObject *self, PyObject *unused) { return PyLong_FromUnsignedLongLong(sc_stalls()); }

static PyObject *preemptions(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(sc_preemptions());
}

static PyObject *arm_stall(PyObject *arg, void (*arm)(int64_t)) {
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred()) return NULL;
    if (ns < 0) {
        PyErr_SetString(PyExc_ValueError, "a stall's length must be >= 0 ns");
        return NULL;
    }
    arm((int64_t)ns);
    Py_RETURN_NONE;
}

static PyObject *set_backoff(PyObject *self, PyObject *arg) {
    long mode = PyLong_AsLong(arg);
    if (mode == -1 && PyErr_Occurred()) return NULL;
    if (mode < 0 || mode > 3) {
        PyErr_SetString(PyExc_ValueError, "set_backoff: mode is 0..3 (1: stalls, 2: preempted callers)");
        return NULL;
    }
    return PyLong_FromLong(sc_set_backoff((int)mode));
}

/* rows_arena(address, bytes): a Net's gradient arena, written by its training
 * entry alone until rows_forget(address) (sc_rows_arena). */
static PyObject *rows_arena(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "rows_arena(address, bytes)");
        return NULL;
    }
    unsigned long long base = PyLong_AsUnsignedLongLong(args[0]);
    long long bytes = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "rows_arena: bytes must be positive");
        return NULL;
    }
    if (sc_rows_arena((void *)(uintptr_t)base, (int64_t)bytes) != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *rows_forget(PyObject *self, PyObject *arg) {
    unsigned long long base = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    sc_rows_forget((void *)(uintptr_t)base);
    Py_RETURN_NONE;
}

/* rows_copy(address, buffer, into_record) -> bool: the record of the table
 * at `address` (as many rows as the uint8 buffer's bytes) copied into the
 * buffer, or the buffer into it (sc_rows_copy); False when there is none. */
static PyObject *rows_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "rows_copy(address, buffer, into_record)");
        return NULL;
    }
    unsigned long long region = PyLong_AsUnsignedLongLong(args[0]);
    int into = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred() || into < 0) return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    int found = sc_rows_copy((void *)(uintptr_t)region, (int64_t)v.len, (uint8_t *)v.buf, into);
    PyBuffer_Release(&v);
    return PyBool_FromLong(found);
}

static PyObject *set_adaptive(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    return PyBool_FromLong(sc_set_adaptive(on));
}

static PyObject *debug_stall_worker(PyObject *self, PyObject *arg) { return arm_stall(arg, sc_debug_stall_worker); }

static PyObject *debug_stall_caller(PyObject *self, PyObject *arg) { return arm_stall(arg, sc_debug_stall_caller); }

static PyObject *debug_adapt_pooled(PyObject *self, PyObject *arg) { return arm_stall(arg, sc_debug_adapt_pooled); }

/* debug_hold_backoff(flag): a started back-off lasts until released (tests). */
static PyObject *debug_hold_backoff(PyObject *self, PyObject *arg) {
    int hold = PyObject_IsTrue(arg);
    if (hold < 0) return NULL;
    sc_debug_hold_backoff(hold);
    Py_RETURN_NONE;
}

/* ---- The call plan: `net(x=x)` on dense ndarrays without the Python checks ----
 *
 * A CallPlan is built once per entry in Python (structc/model.py, `_call_plan`)
 * from what `Net._bind` checks: each input's name, buffer format, alignment,
 * rank, and each axis either a fixed size or a symbol; each output's dtype and
 * shape in the same terms. `plan.run(kwargs)` checks the inputs exactly as
 * `_bind` would accept them without converting anything, binds the symbols,
 * allocates the outputs (numpy.empty), takes the Net's lock, runs the entry
 * with the GIL released and returns the outputs by name. It returns None, and
 * changes nothing, for any call it does not handle (a missing or extra name, a
 * value that is not an exact ndarray of the declared dtype, C-contiguous and
 * aligned, a shape or symbol mismatch, a class label out of range, a workspace
 * larger than the one allocated): the Python path then runs and converts the
 * value or raises its usual error. No numpy C API: buffers only. */

#define PLAN_MAX_RANK 16
#define PLAN_MAX_SYMBOLS 64

typedef int64_t (*workspace_fn)(const int64_t *dims);

typedef struct {
    PyObject *name;                 /* str */
    char format[8];                 /* the buffer format numpy gives the declared dtype ("f", "l", ...) */
    Py_ssize_t itemsize, align;
    int ndim;
    int64_t dim[PLAN_MAX_RANK];     /* >= 0: that size; < 0: symbol -1 - dim */
    int64_t classes;                /* > 0: integer labels in [0, classes) */
    int sealed;                     /* made by a binder from a Graph: an array no caller holds, of bytes
                                       nothing changes, so the last one accepted is still as checked */
    PyObject *seen;                 /* (sealed) the last value accepted, its data and shape */
    void *seen_buf;
    int64_t seen_shape[PLAN_MAX_RANK];
} plan_input;

typedef struct {
    PyObject *name, *dtype;         /* str; the numpy dtype given to numpy.empty */
    Py_ssize_t itemsize;
    int ndim;
    int64_t dim[PLAN_MAX_RANK];
} plan_output;

typedef struct {
    PyObject_HEAD
    entry_fn fn;
    workspace_fn ws_fn;
    void *params, *grads, *state;
    const float *hyper;
    int64_t mode;
    PyObject *model;                /* the model's name, for the error message */
    PyObject *ndarray, *empty;      /* numpy.ndarray, numpy.empty */
    PyObject *acquire, *release;    /* the Net's lock's bound methods */
    PyObject *ws_owner;             /* keeps the workspace alive; set under the lock */
    PyObject *symbols;              /* the symbols' names (a tuple), for dims bound by binders; or NULL */
    PyObject *known;                /* the model's inputs (a frozenset): a binder's arrays this entry does
                                       not read may be given too, as `_bind` allows; or NULL */
    void *ws_addr;
    int64_t ws_size;
    Py_ssize_t n_in, n_out, n_sym;
    plan_input in[MAX_ARGS];
    plan_output out[MAX_ARGS];
    unsigned long long calls;       /* calls the plan ran (tests: the fast path is taken) */
    unsigned long long native_ns;   /* their time in the entry (bench_threads --breakdown: the rest is Python) */
} CallPlan;

static void plan_dealloc(CallPlan *p) {
    for (Py_ssize_t k = 0; k < p->n_in; k++) {
        Py_XDECREF(p->in[k].name);
        Py_XDECREF(p->in[k].seen);
    }
    for (Py_ssize_t k = 0; k < p->n_out; k++) {
        Py_XDECREF(p->out[k].name);
        Py_XDECREF(p->out[k].dtype);
    }
    Py_XDECREF(p->model);
    Py_XDECREF(p->ndarray);
    Py_XDECREF(p->empty);
    Py_XDECREF(p->acquire);
    Py_XDECREF(p->release);
    Py_XDECREF(p->ws_owner);
    Py_XDECREF(p->symbols);
    Py_XDECREF(p->known);
    PyObject_Free(p);
}

/* A shape tuple of ints (negative: a symbol's index) into `dim`; -1 on error. */
static int plan_shape(PyObject *shape, Py_ssize_t n_sym, int *ndim, int64_t *dim) {
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) > PLAN_MAX_RANK) {
        PyErr_SetString(PyExc_ValueError, "a plan shape is a tuple of at most 16 ints");
        return -1;
    }
    *ndim = (int)PyTuple_GET_SIZE(shape);
    for (int k = 0; k < *ndim; k++) {
        dim[k] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, k));
        if (dim[k] == -1 && PyErr_Occurred()) return -1;
        if (dim[k] < -n_sym) {
            PyErr_SetString(PyExc_ValueError, "a plan shape names a symbol that does not exist");
            return -1;
        }
    }
    return 0;
}

static int plan_add_input(CallPlan *p, PyObject *item) {
    plan_input *in = &p->in[p->n_in];
    PyObject *name, *shape;
    const char *format;
    long long classes;
    int sealed = 0;
    if (!PyArg_ParseTuple(item, "UsnnOL|p", &name, &format, &in->itemsize, &in->align, &shape, &classes, &sealed))
        return -1;
    in->sealed = sealed && classes <= 0;
    in->seen = NULL;
    in->seen_buf = NULL;
    if (strlen(format) >= sizeof in->format || in->itemsize < 1 || in->align < 1) {
        PyErr_SetString(PyExc_ValueError, "bad input format in a call plan");
        return -1;
    }
    if (classes > 0 && in->itemsize != 4 && in->itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "class labels are int32 or int64");
        return -1;
    }
    strcpy(in->format, format);
    in->classes = classes;
    if (plan_shape(shape, p->n_sym, &in->ndim, in->dim) < 0) return -1;
    Py_INCREF(name);
    in->name = name;
    p->n_in++;
    return 0;
}

static int plan_add_output(CallPlan *p, PyObject *item) {
    plan_output *out = &p->out[p->n_out];
    PyObject *name, *dtype, *shape;
    if (!PyArg_ParseTuple(item, "UOnO", &name, &dtype, &out->itemsize, &shape)) return -1;
    if (plan_shape(shape, p->n_sym, &out->ndim, out->dim) < 0) return -1;
    Py_INCREF(name);
    Py_INCREF(dtype);
    out->name = name;
    out->dtype = dtype;
    p->n_out++;
    return 0;
}

static PyTypeObject CallPlanType;

/* call_plan(fn, workspace_fn, params, grads, state, hyper, mode, n_symbols, inputs, outputs,
 *           model, ndarray, empty, lock[, symbols, known]) -> CallPlan
 * inputs: (name, format, itemsize, align, shape, classes) tuples; outputs: (name, dtype,
 * itemsize, shape); a shape holds sizes >= 0 and symbols as -1 - index; symbols: their
 * names (a tuple of n_symbols str), which `train` needs to read the binders' dims;
 * known: every input name of the model (a frozenset), the names a call may give. */
static PyObject *call_plan(PyObject *self, PyObject *args) {
    PyObject *a_fn, *a_ws, *a_p, *a_g, *a_s, *a_h, *inputs, *outputs, *model, *ndarray, *empty, *lock;
    PyObject *symbols = NULL, *known = NULL;
    long long mode;
    Py_ssize_t n_sym;
    if (!PyArg_ParseTuple(args, "OOOOOOLnO!O!UOOO|O!O!", &a_fn, &a_ws, &a_p, &a_g, &a_s, &a_h, &mode, &n_sym,
                          &PyList_Type, &inputs, &PyList_Type, &outputs, &model, &ndarray, &empty, &lock,
                          &PyTuple_Type, &symbols, &PyFrozenSet_Type, &known))
        return NULL;
    if (n_sym < 0 || n_sym > PLAN_MAX_SYMBOLS || PyList_GET_SIZE(inputs) > MAX_ARGS
        || PyList_GET_SIZE(outputs) > MAX_ARGS || (symbols && PyTuple_GET_SIZE(symbols) != n_sym)) {
        PyErr_SetString(PyExc_ValueError, "too many symbols, inputs or outputs for a call plan");
        return NULL;
    }
    CallPlan *p = PyObject_New(CallPlan, &CallPlanType);
    if (!p) return NULL;
    p->n_in = p->n_out = 0;
    p->n_sym = n_sym;
    p->model = p->ndarray = p->empty = p->acquire = p->release = p->ws_owner = NULL;
    Py_XINCREF(symbols);
    p->symbols = symbols;
    Py_XINCREF(known);
    p->known = known;
    p->ws_addr = NULL;
    p->ws_size = 0;
    p->calls = p->native_ns = 0;
    p->mode = mode;
    p->fn = (entry_fn)PyLong_AsVoidPtr(a_fn);
    p->ws_fn = (workspace_fn)PyLong_AsVoidPtr(a_ws);
    p->params = PyLong_AsVoidPtr(a_p);
    p->grads = PyLong_AsVoidPtr(a_g);
    p->state = PyLong_AsVoidPtr(a_s);
    p->hyper = (const float *)PyLong_AsVoidPtr(a_h);
    if (PyErr_Occurred()) goto fail;
    if (!p->fn || !p->ws_fn) {
        PyErr_SetString(PyExc_ValueError, "a call plan needs the entry's and its workspace function's addresses");
        goto fail;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(inputs); k++)
        if (plan_add_input(p, PyList_GET_ITEM(inputs, k)) < 0) goto fail;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(outputs); k++)
        if (plan_add_output(p, PyList_GET_ITEM(outputs, k)) < 0) goto fail;
    p->acquire = PyObject_GetAttrString(lock, "acquire");
    p->release = p->acquire ? PyObject_GetAttrString(lock, "release") : NULL;
    if (!p->release) goto fail;
    Py_INCREF(model);
    Py_INCREF(ndarray);
    Py_INCREF(empty);
    p->model = model;
    p->ndarray = ndarray;
    p->empty = empty;
    return (PyObject *)p;
fail:
    Py_DECREF(p);
    return NULL;
}

/* set_workspace(owner, address, size): the workspace the Net grew (called holding its lock). */
static PyObject *plan_set_workspace(CallPlan *p, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "set_workspace takes 3 arguments");
        return NULL;
    }
    void *addr = PyLong_AsVoidPtr(args[1]);
    long long size = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(p->ws_owner, args[0]);
    p->ws_addr = addr;
    p->ws_size = size;
    Py_RETURN_NONE;
}

/* Whether the labels of a C-contiguous int32/int64 buffer all lie in [0, classes). */
static int labels_in_range(const Py_buffer *v, int64_t classes) {
    Py_ssize_t n = v->len / v->itemsize;
    if (v->itemsize == 4) {
        const int32_t *q = (const int32_t *)v->buf;
        for (Py_ssize_t k = 0; k < n; k++)
            if (q[k] < 0 || q[k] >= classes) return 0;
    } else {
        const int64_t *q = (const int64_t *)v->buf;
        for (Py_ssize_t k = 0; k < n; k++)
            if (q[k] < 0 || q[k] >= classes) return 0;
    }
    return 1;
}

/* Whether an array of shape `shape` agrees with the dims bound so far (binding the new ones). */
static int plan_bind_shape(const plan_input *in, const int64_t *shape, int64_t *dims) {
    for (int k = 0; k < in->ndim; k++) {
        int64_t n = shape[k], d = in->dim[k];
        if (d >= 0) { if (n != d) return 0; }
        else if (dims[-1 - d] >= 0) { if (n != dims[-1 - d]) return 0; }
        else if (n >= 1) dims[-1 - d] = n;
        else return 0;
    }
    return 1;
}

/* The data of input `in` if `value` is what `_bind` passes on untouched and agrees
 * with the dims bound so far (binding the new ones), its buffer held in `v`; NULL
 * (no buffer held) if not. A sealed input's last accepted value is taken again
 * without a buffer request (numpy's, with cold caches after a native step, costs
 * about 2 us an array): the caller's kwargs hold it for the call. */
static void *plan_take_input(CallPlan *p, plan_input *in, PyObject *value, Py_buffer *v, int64_t *dims) {
    v->obj = NULL;                               /* PyBuffer_Release then does nothing */
    if (in->sealed && value == in->seen)
        return plan_bind_shape(in, in->seen_shape, dims) ? in->seen_buf : NULL;
    if (Py_TYPE(value) != (PyTypeObject *)p->ndarray) return NULL;
    if (PyObject_GetBuffer(value, v, PyBUF_RECORDS_RO) < 0) {   /* e.g. an object array: Python says why */
        PyErr_Clear();
        v->obj = NULL;
        return NULL;
    }
    int64_t shape[PLAN_MAX_RANK];
    int ok = v->ndim == in->ndim && v->itemsize == in->itemsize && v->format && strcmp(v->format, in->format) == 0
             && (uintptr_t)v->buf % (uintptr_t)in->align == 0 && PyBuffer_IsContiguous(v, 'C');
    for (int k = 0; ok && k < in->ndim; k++) shape[k] = v->shape[k];
    ok = ok && plan_bind_shape(in, shape, dims);
    if (ok && in->classes > 0) ok = labels_in_range(v, in->classes);
    if (!ok) {
        PyBuffer_Release(v);
        return NULL;
    }
    if (in->sealed) {                           /* checked: remember it */
        Py_INCREF(value);
        Py_XSETREF(in->seen, value);
        in->seen_buf = v->buf;
        memcpy(in->seen_shape, shape, sizeof shape[0] * (size_t)in->ndim);
    }
    return v->buf;
}

/* numpy.empty of output `out` at these dims, its buffer in `v`; NULL (no error set) on failure. */
static PyObject *plan_new_output(CallPlan *p, const plan_output *out, const int64_t *dims, Py_buffer *v) {
    PyObject *shape = PyTuple_New(out->ndim);
    if (!shape) goto fail;
    Py_ssize_t count = 1;
    for (int k = 0; k < out->ndim; k++) {
        int64_t n = out->dim[k] >= 0 ? out->dim[k] : dims[-1 - out->dim[k]];
        PyObject *size = PyLong_FromLongLong(n);
        if (!size) { Py_DECREF(shape); goto fail; }
        PyTuple_SET_ITEM(shape, k, size);
        count = n > 0 && count > PY_SSIZE_T_MAX / n ? -1 : count * n;
        if (count < 0) { Py_DECREF(shape); goto fail; }
    }
    PyObject *argv[2] = {shape, out->dtype};
    PyObject *arr = PyObject_Vectorcall(p->empty, argv, 2, NULL);
    Py_DECREF(shape);
    if (!arr) goto fail;
    if (PyObject_GetBuffer(arr, v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) { Py_DECREF(arr); goto fail; }
    if (count > PY_SSIZE_T_MAX / out->itemsize || v->len != count * out->itemsize) {   /* never write past it */
        PyBuffer_Release(v);
        Py_DECREF(arr);
        goto fail;
    }
    return arr;
fail:
    PyErr_Clear();          /* the Python path allocates again and raises its own error */
    return NULL;
}

/* Whether a call gives exactly this entry's inputs, or (with `known`) more of the
 * model's: each input is then looked up by name, and a missing one declines. */
static int plan_names_known(CallPlan *p, PyObject *kwargs) {
    Py_ssize_t n = PyDict_GET_SIZE(kwargs), at = 0;
    if (n == p->n_in) return 1;
    if (!p->known || n < p->n_in) return 0;
    PyObject *key, *value;
    while (PyDict_Next(kwargs, &at, &key, &value)) {
        int in = PySet_Contains(p->known, key);
        if (in != 1) {
            if (in < 0) PyErr_Clear();
            return 0;
        }
    }
    return 1;
}

/* The dims a call's binders bound (`bound`: {symbol name: size}) into `dims`; 0 if
 * one is not an int64 (the Python path then says why). */
static int plan_preset(CallPlan *p, PyObject *bound, int64_t *dims) {
    if (!p->symbols || !PyDict_CheckExact(bound)) return 0;
    for (Py_ssize_t k = 0; k < p->n_sym; k++) {
        PyObject *v = PyDict_GetItemWithError(bound, PyTuple_GET_ITEM(p->symbols, k));    /* borrowed */
        if (!v) {
            if (PyErr_Occurred()) { PyErr_Clear(); return 0; }
            continue;
        }
        long long n = PyLong_AsLongLong(v);
        if (n == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
        dims[k] = n;
    }
    return 1;
}

/* {name: output} (`single`: the output itself when there is one), or None when
 * the Python path must take this call. With `bound` (a dict) the symbols it
 * names start bound, as the binders leave them for `_bind`; with `before`, it is
 * called holding the lock before the entry runs and returns (mode, anything):
 * the result is then ({name: output}, what before returned). */
static PyObject *plan_execute(CallPlan *p, PyObject *kwargs, int single, PyObject *bound, PyObject *before) {
    if (!PyDict_CheckExact(kwargs) || !plan_names_known(p, kwargs)) Py_RETURN_NONE;
    int64_t dims[PLAN_MAX_SYMBOLS] = {0};      /* all set: nothing uninitialised reaches the entry */
    for (Py_ssize_t k = 0; k < p->n_sym; k++) dims[k] = -1;
    if (bound && !plan_preset(p, bound, dims)) Py_RETURN_NONE;
    Py_buffer in_views[MAX_ARGS], out_views[MAX_ARGS];
    void *in_ptrs[MAX_ARGS], *out_ptrs[MAX_ARGS];
    PyObject *outs[MAX_ARGS];
    Py_ssize_t n_in = 0, n_out = 0;
    PyObject *result = NULL, *ran = NULL;
    int64_t mode = p->mode;
    for (; n_in < p->n_in; n_in++) {
        PyObject *value = PyDict_GetItemWithError(kwargs, p->in[n_in].name);    /* borrowed */
        if (!value) { PyErr_Clear(); goto decline; }
        in_ptrs[n_in] = plan_take_input(p, &p->in[n_in], value, &in_views[n_in], dims);
        if (!in_ptrs[n_in]) goto decline;
    }
    for (Py_ssize_t k = 0; k < p->n_sym; k++)
        if (dims[k] < 0) dims[k] = 1;           /* as `_run`: a symbol no input binds is 1 */
    int64_t need = p->ws_fn(dims);
    /* overflow, a first call or growth: the Python path checks the size and grows the workspace */
    if (need < 0 || need > p->ws_size || !p->ws_addr) goto decline;
    for (; n_out < p->n_out; n_out++) {
        outs[n_out] = plan_new_output(p, &p->out[n_out], dims, &out_views[n_out]);
        if (!outs[n_out]) goto decline;
        out_ptrs[n_out] = out_views[n_out].buf;
    }
    /* The Net's lock, as `_run` takes it: one native call on a Net at a time (the
     * arenas, the hyper-parameters and the workspace are shared). Acquiring it
     * releases the GIL while it waits; the workspace only grows, under this lock,
     * so its address is read holding it. */
    PyObject *got = PyObject_CallNoArgs(p->acquire);
    if (!got) goto done;                        /* interrupted while waiting: raise that */
    Py_DECREF(got);
    if (before) {                               /* the step's hyper-parameters, under the lock */
        ran = PyObject_CallNoArgs(before);
        if (ran && (!PyTuple_Check(ran) || PyTuple_GET_SIZE(ran) < 1)) {
            PyErr_SetString(PyExc_TypeError, "a call plan's before() returns (mode, ...)");
            Py_CLEAR(ran);
        }
        if (ran) mode = PyLong_AsLongLong(PyTuple_GET_ITEM(ran, 0));
        if (!ran || (mode == -1 && PyErr_Occurred())) {     /* release the lock, raise what before raised */
            PyObject *type, *value, *trace;
            PyErr_Fetch(&type, &value, &trace);
            got = PyObject_CallNoArgs(p->release);
            Py_XDECREF(got);
            PyErr_Restore(type, value, trace);
            goto done;
        }
    }
    entry_fn fn = p->fn;
    void *ws = p->ws_addr;
    int32_t status;
    struct timespec t0, t1;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &t0);
    status = fn(p->params, p->grads, p->state, ws, in_ptrs, out_ptrs, dims, p->hyper, mode);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    Py_END_ALLOW_THREADS
    p->native_ns += (unsigned long long)((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
    got = PyObject_CallNoArgs(p->release);
    if (!got) goto done;
    Py_DECREF(got);
    if (status != 0) {
        PyErr_Format(PyExc_RuntimeError, "%U: native code reported error %d", p->model, (int)status);
        goto done;
    }
    if (single && n_out == 1) {
        result = outs[0];
        Py_INCREF(result);
    } else {
        result = PyDict_New();
        for (Py_ssize_t k = 0; result && k < n_out; k++)
            if (PyDict_SetItem(result, p->out[k].name, outs[k]) < 0) Py_CLEAR(result);
    }
    if (result && ran) Py_SETREF(result, PyTuple_Pack(2, result, ran));
    if (result) p->calls++;
    goto done;
decline:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(ran);
    for (Py_ssize_t k = 0; k < n_in; k++) PyBuffer_Release(&in_views[k]);
    for (Py_ssize_t k = 0; k < n_out; k++) {
        PyBuffer_Release(&out_views[k]);
        Py_DECREF(outs[k]);
    }
    return result;
}

static PyObject *plan_run(CallPlan *p, PyObject *kwargs) { return plan_execute(p, kwargs, 0, NULL, NULL); }

static PyObject *plan_call(CallPlan *p, PyObject *kwargs) { return plan_execute(p, kwargs, 1, NULL, NULL); }

/* train(kwargs, bound, before): a training call (Net.train_step): the inputs as the
 * binders expanded them, the dims they bound, and before(), which sets the step's
 * hyper-parameters under the lock and returns (mode, ...). */
static PyObject *plan_train(CallPlan *p, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "train takes (kwargs, bound dims, before)");
        return NULL;
    }
    return plan_execute(p, args[0], 0, args[1], args[2]);
}

static PyObject *plan_calls(CallPlan *p, void *closure) { return PyLong_FromUnsignedLongLong(p->calls); }

static PyObject *plan_native_seconds(CallPlan *p, void *closure) { return PyFloat_FromDouble(p->native_ns * 1e-9); }

static PyMethodDef plan_methods[] = {
    {"run", (PyCFunction)plan_run, METH_O, "run(kwargs) -> {name: output}, or None: the Python path takes the call"},
    {"call", (PyCFunction)plan_call, METH_O, "call(kwargs) -> as run, but the output itself when there is one"},
    {"train", (PyCFunction)(void (*)(void))plan_train, METH_FASTCALL,
     "train(kwargs, bound, before) -> ({name: output}, before()), or None: the Python path takes the call"},
    {"set_workspace", (PyCFunction)(void (*)(void))plan_set_workspace, METH_FASTCALL,
     "set_workspace(owner, address, size): the workspace grown by the Net, under its lock"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef plan_getset[] = {
    {"calls", (getter)plan_calls, NULL, "calls this plan ran (not counting those it left to Python)", NULL},
    {"native_seconds", (getter)plan_native_seconds, NULL, "the time those calls spent in the entry", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CallPlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "structc._runtime.CallPlan",
    .tp_basicsize = sizeof(CallPlan),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One entry's checked call on dense ndarrays (see call_plan).",
    .tp_methods = plan_methods,
    .tp_getset = plan_getset,
};

/* ---- end of the call plan ---- */

static PyMethodDef methods[] = {
    {"handoffs", handoffs, METH_NOARGS, "handoffs() -> jobs handed to the thread pool so far"},
    {"pool_workers", pool_workers, METH_NOARGS, "pool_workers() -> worker threads running in this process"},
    {"backoff_jobs", backoff_jobs, METH_NOARGS, "backoff_jobs() -> jobs run on the caller while the pool backs off"},
    {"stalls", stalls, METH_NOARGS, "stalls() -> long waits for a preempted worker (each starts a back-off)"},
    {"debug_stall_worker", debug_stall_worker, METH_O,
     "debug_stall_worker(ns): the next pooled job's worker sleeps ns in its first chunk (tests)"},
    {"debug_adapt_pooled", debug_adapt_pooled, METH_O,
     "debug_adapt_pooled(ns): tests: each timed pooled call of an entry being measured counts ns longer"},
    {"set_adaptive", set_adaptive, METH_O,
     "set_adaptive(on) -> previous: entries of moderate work run serial or pooled, whichever measured faster"},
    {"rows_arena", (PyCFunction)(void (*)(void))rows_arena, METH_FASTCALL,
     "rows_arena(address, bytes): a gradient arena only its Net's training entry writes (sc_rows_arena)"},
    {"rows_forget", rows_forget, METH_O, "rows_forget(address): anything may write that arena now"},
    {"rows_copy", (PyCFunction)(void (*)(void))rows_copy, METH_FASTCALL,
     "rows_copy(address, buffer, into_record) -> bool: a table's record of rows out to buffer, or in from it"},
    {"set_backoff", set_backoff, METH_O,
     "set_backoff(mode) -> previous: back off after stalls (1), preempted callers (2), both (3), never (0)"},
    {"preemptions", preemptions, METH_NOARGS, "preemptions() -> entries' windows whose caller was preempted too long"},
    {"debug_stall_caller", debug_stall_caller, METH_O,
     "debug_stall_caller(ns): the next entry that may use the pool sleeps ns before it returns (tests)"},
    {"debug_hold_backoff", debug_hold_backoff, METH_O,
     "debug_hold_backoff(flag): while true, a started back-off does not end with time (tests)"},
    {"first_out_of_range", (PyCFunction)(void (*)(void))first_out_of_range, METH_FASTCALL,
     "first_out_of_range(buffer, lo, hi) -> index of the first element outside [lo, hi), or -1"},
    {"invoke", (PyCFunction)(void (*)(void))invoke, METH_FASTCALL,
     "invoke(fn, params, grads, state, workspace, inputs, outputs, dims, hyper, mode) -> status"},
    {"workspace_size", (PyCFunction)(void (*)(void))workspace_size, METH_FASTCALL,
     "workspace_size(fn, dims) -> bytes: the entry's workspace-size function at address fn, called on dims"},
    {"weigh_arena", (PyCFunction)(void (*)(void))weigh_arena, METH_FASTCALL,
     "weigh_arena(arena, count, loss): data-parallel's gradients times count, then count, loss * count"},
    {"unweigh_arena", (PyCFunction)(void (*)(void))unweigh_arena, METH_FASTCALL,
     "unweigh_arena(arena, divisor) -> loss: the summed gradients and weighted loss divided by divisor"},
    {"shm_sum", (PyCFunction)(void (*)(void))shm_sum, METH_FASTCALL,
     "shm_sum(arena, slots, flags, rank, number): the ranks' arenas summed through shared memory (shmsum.py)"},
    {"lpt_owners", (PyCFunction)(void (*)(void))lpt_owners, METH_FASTCALL,
     "lpt_owners(costs, size, owner): each row's sorted costs, in turn, to the least-loaded of size ranks"},
    {"call_plan", call_plan, METH_VARARGS,
     "call_plan(fn, workspace_fn, params, grads, state, hyper, mode, n_symbols, inputs, outputs, model, "
     "ndarray, empty, lock[, symbols]) -> CallPlan"},
    /* batch assembly for the data sets' pools (sc_pools.c) */
    {"forest_take", (PyCFunction)(void (*)(void))sc_forest_take, METH_FASTCALL,
     "forest_take(items, height, block, roots, idx, width, word_payload) -> a ForestPool batch's arrays"},
    {"graph_take", (PyCFunction)(void (*)(void))sc_graph_take, METH_FASTCALL,
     "graph_take(counts, starts, edges, nodes, idx, x, edge_x, max_type) -> a GraphPool batch's arrays"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef runtime_module = {
    PyModuleDef_HEAD_INIT, "_runtime", "structc's native runtime: thread pool and the call path.", -1, methods,
};

PyMODINIT_FUNC PyInit__runtime(void) {
    if (PyType_Ready(&CallPlanType) < 0) return NULL;
    return PyModule_Create(&runtime_module);
}
