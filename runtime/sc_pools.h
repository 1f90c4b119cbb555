/* Batch assembly for the data sets' pools (sc_pools.c), called from Python. */
#ifndef SC_POOLS_H
#define SC_POOLS_H
#include <Python.h>

PyObject *sc_forest_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sc_graph_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
