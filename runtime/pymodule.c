/* `structc._runtime`: the runtime as an importable extension (so pip builds
 * and installs it), plus `invoke`, the fast path from Python into a compiled
 * entry point. It takes data pointers through the buffer protocol and
 * releases the GIL for the duration of the native call. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "structc_rt.h"

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

static PyObject *debug_stall_worker(PyObject *self, PyObject *arg) { return arm_stall(arg, sc_debug_stall_worker); }

static PyObject *debug_stall_caller(PyObject *self, PyObject *arg) { return arm_stall(arg, sc_debug_stall_caller); }

static PyMethodDef methods[] = {
    {"handoffs", handoffs, METH_NOARGS, "handoffs() -> jobs handed to the thread pool so far"},
    {"pool_workers", pool_workers, METH_NOARGS, "pool_workers() -> worker threads running in this process"},
    {"backoff_jobs", backoff_jobs, METH_NOARGS, "backoff_jobs() -> jobs run on the caller while the pool backs off"},
    {"stalls", stalls, METH_NOARGS, "stalls() -> long waits for a preempted worker (each starts a back-off)"},
    {"debug_stall_worker", debug_stall_worker, METH_O,
     "debug_stall_worker(ns): the next pooled job's worker sleeps ns in its first chunk (tests)"},
    {"set_backoff", set_backoff, METH_O,
     "set_backoff(mode) -> previous: back off after stalls (1), preempted callers (2), both (3), never (0)"},
    {"preemptions", preemptions, METH_NOARGS, "preemptions() -> entries' windows whose caller was preempted too long"},
    {"debug_stall_caller", debug_stall_caller, METH_O,
     "debug_stall_caller(ns): the next entry that may use the pool sleeps ns before it returns (tests)"},
    {"first_out_of_range", (PyCFunction)(void (*)(void))first_out_of_range, METH_FASTCALL,
     "first_out_of_range(buffer, lo, hi) -> index of the first element outside [lo, hi), or -1"},
    {"invoke", (PyCFunction)(void (*)(void))invoke, METH_FASTCALL,
     "invoke(fn, params, grads, state, workspace, inputs, outputs, dims, hyper, mode) -> status"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef runtime_module = {
    PyModuleDef_HEAD_INIT, "_runtime", "structc's native runtime: thread pool and the call path.", -1, methods,
};

PyMODINIT_FUNC PyInit__runtime(void) { return PyModule_Create(&runtime_module); }
