/* Batch assembly for the data sets' pools (`structc.forest.ForestPool`,
 * `structc.graphs.GraphPool`): one batch of a pool's items, from the pool's
 * numpy arrays, in one pass over the batch's nodes and edges. The results are
 * bytes objects (immutable: Python wraps them as read-only arrays, sealed as a
 * Forest's or a Graph's arrays must be), laid out as the Python code that
 * used to make them laid them out, so the batches are the same bit for bit.
 *
 * The pool's arrays come from Python and are trusted for nothing: every index
 * read from them is checked against the array it indexes before it is used. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sc_pools.h"

/* A C-contiguous buffer of `count` items of `itemsize` bytes. */
static int view_of(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->itemsize != itemsize || view->len % itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of %zd bytes, got %zd", what, itemsize, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static void release_all(Py_buffer *views, int count) {
    for (int k = 0; k < count; k++) PyBuffer_Release(&views[k]);
}

static PyObject *bytes_of(Py_ssize_t size, void **data) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, size);
    if (b) *data = PyBytes_AS_STRING(b);
    return b;
}

static int broken_pool(const char *what) {
    PyErr_Format(PyExc_ValueError, "inconsistent pool: %s", what);
    return -1;
}

/* -- forests ------------------------------------------------------------------- */

enum { NODES, TREES, LEAVES, LABELLED, NODE_WORDS, NODE_FEATURES, ARITY, MAX_WORD, NODE_START, TREE_START, ITEM_COLS };

typedef struct {
    const int64_t *items, *roots, *idx;
    const int32_t *block;
    const void *height;
    int height_wide;                      /* int32 heights (else int16) */
    Py_ssize_t pool_items, pool_nodes, pool_trees, batch, cols, width;
} forest_pool;

typedef struct {
    int64_t nodes, trees, leaves, labelled, arity, max_word, node_words, node_features, levels;
} forest_totals;

static inline int64_t height_at(const forest_pool *p, Py_ssize_t row) {
    return p->height_wide ? ((const int32_t *)p->height)[row] : ((const int16_t *)p->height)[row];
}

/* The batch's totals (sums, any, all, max), every item and its ranges checked. */
static int forest_totals_of(const forest_pool *p, forest_totals *t) {
    memset(t, 0, sizeof *t);
    t->node_words = t->node_features = 1;
    for (Py_ssize_t j = 0; j < p->batch; j++) {
        int64_t k = p->idx[j];
        if (k < 0 || k >= p->pool_items) {
            PyErr_Format(PyExc_ValueError, "item %lld is outside the pool's [0, %zd)", (long long)k, p->pool_items);
            return -1;
        }
        const int64_t *it = p->items + k * ITEM_COLS;
        if (it[NODES] < 1 || it[NODE_START] < 0 || it[NODE_START] > p->pool_nodes - it[NODES] || it[TREES] < 1 ||
            it[TREE_START] < 0 || it[TREE_START] > p->pool_trees - it[TREES] || it[LEAVES] < 1 ||
            it[LEAVES] > it[NODES] || it[ARITY] < 1 || it[ARITY] > p->width)
            return broken_pool("an item's rows are outside the pool's arrays");
        t->nodes += it[NODES];
        t->trees += it[TREES];
        t->leaves += it[LEAVES];
        t->labelled |= it[LABELLED] != 0;
        t->node_words &= it[NODE_WORDS] != 0;
        t->node_features &= it[NODE_FEATURES] != 0;
        if (it[ARITY] > t->arity) t->arity = it[ARITY];
        if (j == 0 || it[MAX_WORD] > t->max_word) t->max_word = it[MAX_WORD];
        for (int64_t r = 0; r < it[NODES]; r++) {            /* a node's height is below its forest's size */
            int64_t h = height_at(p, it[NODE_START] + r);
            if (h < 0 || h >= it[NODES]) return broken_pool("a height is out of range");
            if (h + 1 > t->levels) t->levels = h + 1;
        }
    }
    if (t->nodes > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "a forest of %lld nodes is too large for 32-bit indices", (long long)t->nodes);
        return -1;
    }
    if (t->node_words && p->cols < p->width + 4) return broken_pool("no column of words at every node");
    return 0;
}

/* The outputs, each an array of the sealed buffer or a buffer of its own. */
typedef struct {
    int32_t *children, *height, *level_end, *roots, *tree_of, *words, *labels, *index;
    int32_t *leaf_rows, *node_words;
    int64_t *rows;
} forest_out;

/* Nodes placed level by level (a stable counting sort by height: each forest is in
 * schedule order, so this merges them level by level as a stable sort would), then
 * each node's fields written at its place; a child, earlier in its forest, is placed
 * before its parent. */
static int forest_fill(const forest_pool *p, const forest_totals *t, forest_out *o) {
    int64_t *next = calloc((size_t)t->levels + 1, sizeof *next);
    if (!next) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t j = 0; j < p->batch; j++) {
        const int64_t *it = p->items + p->idx[j] * ITEM_COLS;
        for (int64_t r = 0; r < it[NODES]; r++) next[height_at(p, it[NODE_START] + r) + 1]++;
    }
    for (int64_t h = 0; h < t->levels; h++) {
        next[h + 1] += next[h];
        o->level_end[h] = (int32_t)next[h + 1];
    }
    int status = 0;
    if (next[1] != t->leaves) { status = broken_pool("the leaves' counts disagree"); goto done; }
    int64_t at = 0, tree_at = 0;                   /* the batch's nodes and trees so far */
    const Py_ssize_t cols = p->cols, w = p->width, a = t->arity;
    for (Py_ssize_t j = 0; j < p->batch; j++) {
        const int64_t *it = p->items + p->idx[j] * ITEM_COLS;
        const int64_t first = at, tree_shift = it[TREE_START] - tree_at;
        for (int64_t r = 0; r < it[NODES]; r++, at++) {
            const int64_t row = it[NODE_START] + r, h = height_at(p, row);
            const int32_t *b = p->block + row * cols;
            const int64_t to = next[h]++;
            o->index[at] = (int32_t)to;
            o->height[to] = (int32_t)h;
            for (Py_ssize_t c = 0; c < a; c++) {          /* b[c]: how many rows before its parent a child is */
                if (b[c] > r) { status = broken_pool("a child is outside its forest"); goto done; }
                o->children[to * a + c] = b[c] > 0 ? o->index[at - b[c]] : -1;
            }
            o->tree_of[to] = (int32_t)(b[w] - tree_shift);
            if (o->labels) o->labels[to] = b[w + 1];
            if (h == 0) {
                if (o->words) o->words[to] = b[w + 2];
                else o->leaf_rows[to] = b[w + 2];
            }
            if (o->node_words) o->node_words[to] = b[w + 3];
            if (o->rows) o->rows[to] = row;
        }
        for (int64_t r = 0; r < it[TREES]; r++) {
            int64_t root = p->roots[it[TREE_START] + r] - it[NODE_START];
            if (root < 0 || root >= it[NODES]) { status = broken_pool("a root is outside its forest"); goto done; }
            o->roots[tree_at + r] = o->index[first + root];
        }
        tree_at += it[TREES];
    }
done:
    free(next);
    return status;
}

/* forest_take(items, height, block, roots, idx, width, word_payload) ->
 *     (sealed, leaf_rows, node_words, rows, nodes, trees, leaves, levels, arity, labelled, max_word)
 * items: int64 [pool items, 10] (ForestPool._items); height: int16 or int32 [pool
 * nodes]; block: int32 [pool nodes, cols]; roots: int64 [pool trees]; idx: int64
 * [batch]; width: the children columns of block; word_payload: leaves carry words
 * (into `sealed`) rather than rows of the pool's features (`leaf_rows`).
 * sealed: int32 children, height, level_end, roots, tree_of, words (if words),
 * labels (if any item is labelled), index, one after the other (Forest's _flat).
 * leaf_rows (int32), node_words (int32), rows (int64, each node's pool row): None
 * unless needed. */
PyObject *sc_forest_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "forest_take takes 7 arguments");
        return NULL;
    }
    Py_ssize_t width = PyLong_AsSsize_t(args[5]);
    int word_payload = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred() || word_payload < 0) return NULL;
    Py_buffer v[5];
    int got = 0;
    if (view_of(args[0], &v[got], 8, "items") < 0) goto fail;
    got++;
    if (PyObject_GetBuffer(args[1], &v[got], PyBUF_C_CONTIGUOUS) < 0) goto fail;
    got++;
    if ((v[1].itemsize != 2 && v[1].itemsize != 4) || v[1].len % v[1].itemsize) {
        PyErr_SetString(PyExc_TypeError, "height: expected int16 or int32");
        goto fail;
    }
    if (view_of(args[2], &v[got], 4, "block") < 0) goto fail;
    got++;
    if (view_of(args[3], &v[got], 8, "roots") < 0) goto fail;
    got++;
    if (view_of(args[4], &v[got], 8, "idx") < 0) goto fail;
    got++;
    forest_pool p = {
        .items = v[0].buf, .height = v[1].buf, .height_wide = v[1].itemsize == 4, .block = v[2].buf,
        .roots = v[3].buf, .idx = v[4].buf, .pool_items = v[0].len / (8 * ITEM_COLS),
        .pool_nodes = v[1].len / v[1].itemsize, .pool_trees = v[3].len / 8, .batch = v[4].len / 8, .width = width,
    };
    p.cols = v[2].ndim == 2 ? v[2].shape[1] : 0;
    if (v[0].len % (8 * ITEM_COLS) || v[2].ndim != 2 || v[2].shape[0] != p.pool_nodes || width < 1 ||
        p.cols < width + 3) {
        broken_pool("the arrays' shapes disagree");
        goto fail;
    }
    if (p.batch < 1) {
        PyErr_SetString(PyExc_ValueError, "a forest needs at least one tree");
        goto fail;
    }
    forest_totals t;
    if (forest_totals_of(&p, &t) < 0) goto fail;
    const int64_t n = t.nodes, words = word_payload ? t.leaves : 0, labels = t.labelled ? n : 0;
    const int64_t sealed_ints = n * t.arity + n + t.levels + t.trees + n + words + labels + n;
    forest_out o = {0};
    void *data[4] = {0};
    PyObject *made[4] = {bytes_of(4 * sealed_ints, &data[0]), NULL, NULL, NULL};
    if (made[0] && !word_payload) made[1] = bytes_of(4 * t.leaves, &data[1]);
    if (made[0] && t.node_words) made[2] = bytes_of(4 * n, &data[2]);
    if (made[0] && t.node_features) made[3] = bytes_of(8 * n, &data[3]);
    if (!made[0] || (!word_payload && !made[1]) || (t.node_words && !made[2]) || (t.node_features && !made[3]))
        goto fail_made;
    int32_t *s = data[0];
    o.children = s, s += n * t.arity;
    o.height = s, s += n;
    o.level_end = s, s += t.levels;
    o.roots = s, s += t.trees;
    o.tree_of = s, s += n;
    if (word_payload) o.words = s, s += t.leaves;
    if (t.labelled) o.labels = s, s += n;
    o.index = s;
    o.leaf_rows = data[1], o.node_words = data[2], o.rows = data[3];
    if (forest_fill(&p, &t, &o) < 0) goto fail_made;
    release_all(v, got);
    for (int k = 1; k < 4; k++)
        if (!made[k]) made[k] = Py_NewRef(Py_None);
    return Py_BuildValue("(NNNNLLLLLLL)", made[0], made[1], made[2], made[3], (long long)n, (long long)t.trees,
                         (long long)t.leaves, (long long)t.levels, (long long)t.arity, (long long)t.labelled,
                         (long long)t.max_word);
fail_made:
    for (int k = 0; k < 4; k++) Py_XDECREF(made[k]);
fail:
    release_all(v, got);
    return NULL;
}

/* -- graphs -------------------------------------------------------------------- */

enum { G_NODES, G_EDGES, G_GRAPHS };

/* graph_take(counts, starts, edges, nodes, idx, x, edge_x, max_type) ->
 *     (edges, nodes, gptr, order, x, edge_x, nodes, edges, graphs, max_type)
 * counts, starts: int64 [pool items, 3] (nodes, edges, graphs of each, and where
 * they start); edges: int32 [rows, pool edges] (src, dst_t, eid_t, order, then the
 * types); nodes: int32 [4, pool nodes] (ptr, ptr_t, nptr, graph); idx: int64
 * [batch]; x, edge_x: float32 [pool nodes or edges, width] or None; max_type: int64
 * [pool items], each item's largest edge type (-1: none).
 * Returns the union's blocks (int32 [rows, edges], int32 [4, nodes + 1]), gptr
 * (int32 [graphs + 1]), order (int64 [edges]), x and edge_x (float32, or None), its
 * size and its largest edge type. */
PyObject *sc_graph_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "graph_take takes 8 arguments");
        return NULL;
    }
    Py_buffer v[8];
    int got = 0, feats[2] = {args[5] != Py_None, args[6] != Py_None};
    const char *names[5] = {"counts", "starts", "edges", "nodes", "idx"};
    const Py_ssize_t sizes[5] = {8, 8, 4, 4, 8};
    for (int k = 0; k < 5; k++, got++)
        if (view_of(args[k], &v[got], sizes[k], names[k]) < 0) goto fail;
    for (int k = 0; k < 2; k++)
        if (feats[k]) {
            if (view_of(args[5 + k], &v[got], 4, k ? "edge_x" : "x") < 0) goto fail;
            got++;
        }
    Py_buffer *types = &v[got];
    if (view_of(args[7], types, 8, "max_type") < 0) goto fail;
    got++;
    const int64_t *counts = v[0].buf, *starts = v[1].buf, *idx = v[4].buf;
    const int32_t *pool_edges = v[2].buf, *pool_nodes = v[3].buf;
    const Py_ssize_t items = v[0].len / 24, batch = v[4].len / 8;
    /* the blocks' shapes: edges [rows, pool edges], nodes [4, pool nodes], features [rows, width] */
    if (v[0].len % 24 || v[1].len != v[0].len || types->len * 3 != v[0].len || v[2].ndim != 2 ||
        v[2].shape[0] < 4 || v[2].shape[0] > 6 || v[3].ndim != 2 || v[3].shape[0] != 4) {
        broken_pool("the arrays' shapes disagree");
        goto fail;
    }
    const Py_ssize_t edge_rows = v[2].shape[0], pool_m = v[2].shape[1], pool_n = v[3].shape[1];
    const Py_buffer *xv = feats[0] ? &v[5] : NULL, *exv = feats[1] ? &v[5 + feats[0]] : NULL;
    if ((xv && (xv->ndim != 2 || xv->shape[0] != pool_n)) || (exv && (exv->ndim != 2 || exv->shape[0] != pool_m))) {
        broken_pool("the features' shapes disagree with the blocks'");
        goto fail;
    }
    const Py_ssize_t dx = xv ? xv->shape[1] : 0, de = exv ? exv->shape[1] : 0;
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "cannot batch an empty list of items");
        goto fail;
    }
    int64_t total[3] = {0, 0, 0}, max_type = -1;
    for (Py_ssize_t j = 0; j < batch; j++) {
        if (idx[j] < 0 || idx[j] >= items) {
            PyErr_Format(PyExc_ValueError, "item %lld is outside the pool's [0, %zd)", (long long)idx[j], items);
            goto fail;
        }
        const int64_t *cnt = counts + idx[j] * 3, *st = starts + idx[j] * 3;
        if (cnt[G_NODES] < 1 || cnt[G_EDGES] < 0 || cnt[G_GRAPHS] < 1 || st[G_NODES] < 0 || st[G_EDGES] < 0 ||
            st[G_NODES] > pool_n - cnt[G_NODES] || st[G_EDGES] > pool_m - cnt[G_EDGES]) {
            broken_pool("an item's rows are outside the pool's arrays");
            goto fail;
        }
        for (int c = 0; c < 3; c++) total[c] += cnt[c];
        const int64_t top = ((const int64_t *)types->buf)[idx[j]];
        if (top > max_type) max_type = top;
    }
    if (total[0] >= INT32_MAX || total[1] >= INT32_MAX || total[2] >= INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "batch too large for 32-bit indices: %lld nodes, %lld edges, %lld graphs",
                     (long long)total[0], (long long)total[1], (long long)total[2]);
        goto fail;
    }
    const int64_t n = total[0], m = total[1], g = total[2];
    void *data[6] = {0};
    PyObject *made[6] = {bytes_of(4 * edge_rows * m, &data[0]), bytes_of(4 * 4 * (n + 1), &data[1]),
                         bytes_of(4 * (g + 1), &data[2]), bytes_of(8 * m, &data[3]), NULL, NULL};
    if (feats[0]) made[4] = bytes_of(4 * dx * n, &data[4]);
    if (feats[1]) made[5] = bytes_of(4 * de * m, &data[5]);
    for (int k = 0; k < 6; k++)
        if (!made[k] && (k < 4 || feats[k - 4])) goto fail_made;
    int32_t *e = data[0], *nd = data[1], *gptr = data[2];
    int64_t *order = data[3];
    memset(gptr, 0, 4 * (g + 1));
    int64_t at[3] = {0, 0, 0};                       /* the union's nodes, edges, graphs so far */
    for (Py_ssize_t j = 0; j < batch; j++) {
        const int64_t *cnt = counts + idx[j] * 3, *st = starts + idx[j] * 3;     /* checked above */
        /* src and dst_t count nodes, eid_t and order edges; the types stay as they are */
        const int64_t add[6] = {at[G_NODES], at[G_NODES], at[G_EDGES], at[G_EDGES], 0, 0};
        for (Py_ssize_t r = 0; r < edge_rows; r++) {
            const int32_t *from = pool_edges + r * pool_m + st[G_EDGES];
            int32_t *to = e + r * m + at[G_EDGES];
            for (int64_t i = 0; i < cnt[G_EDGES]; i++) to[i] = (int32_t)(from[i] + add[r]);
        }
        for (int64_t i = 0; i < cnt[G_EDGES]; i++) order[at[G_EDGES] + i] = e[3 * m + at[G_EDGES] + i];
        /* ptr and ptr_t count edges, nptr nodes, graph graphs */
        const int64_t shift[4] = {at[G_EDGES], at[G_EDGES], at[G_NODES], at[G_GRAPHS]};
        for (int r = 0; r < 4; r++) {
            const int32_t *from = pool_nodes + r * pool_n + st[G_NODES];
            int32_t *to = nd + r * (n + 1) + at[G_NODES];
            for (int64_t i = 0; i < cnt[G_NODES]; i++) to[i] = (int32_t)(from[i] + shift[r]);
        }
        const int32_t *graph = pool_nodes + 3 * pool_n + st[G_NODES];
        for (int64_t i = 0; i < cnt[G_NODES]; i++) {          /* each graph's nodes, counted for gptr */
            if (graph[i] < 0 || graph[i] >= cnt[G_GRAPHS]) {
                broken_pool("a node's graph is outside its item");
                goto fail_made;
            }
            gptr[at[G_GRAPHS] + graph[i] + 1]++;
        }
        if (feats[0]) memcpy((float *)data[4] + at[G_NODES] * dx, (const float *)xv->buf + st[G_NODES] * dx,
                             4 * dx * cnt[G_NODES]);
        if (feats[1]) memcpy((float *)data[5] + at[G_EDGES] * de,
                             (const float *)exv->buf + st[G_EDGES] * de, 4 * de * cnt[G_EDGES]);
        for (int c = 0; c < 3; c++) at[c] += cnt[c];
    }
    const int32_t ends[4] = {(int32_t)m, (int32_t)m, (int32_t)n, (int32_t)g};
    for (int r = 0; r < 4; r++) nd[r * (n + 1) + n] = ends[r];
    for (int64_t k = 0; k < g; k++) gptr[k + 1] += gptr[k];
    release_all(v, got);
    for (int k = 4; k < 6; k++)
        if (!made[k]) made[k] = Py_NewRef(Py_None);
    return Py_BuildValue("(NNNNNNLLLL)", made[0], made[1], made[2], made[3], made[4], made[5], (long long)n,
                         (long long)m, (long long)g, (long long)max_type);
fail_made:
    for (int k = 0; k < 6; k++) Py_XDECREF(made[k]);
fail:
    release_all(v, got);
    return NULL;
}
