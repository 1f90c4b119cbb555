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
    if (t->node_words && p->cols < p->width + 5) return broken_pool("no column of words at every node");
    return 0;
}

/* The outputs, each an array of the sealed buffer or a buffer of its own. */
typedef struct {
    int32_t *children, *height, *level_end, *roots, *tree_of, *words, *labels, *index;
    int32_t *leaf_rows, *node_words;
    int64_t *rows;
} forest_out;

/* Each node's fields written at its place, `next[h]` being the next free place
 * of level h; a child, earlier in its forest, is placed before its parent.
 * `place[at]` is the place of the batch's node `at` (its forests' rows one after
 * the other); `index` numbers the nodes as their forests were given (b[w + 3]). */
static int forest_place(const forest_pool *p, const forest_totals *t, forest_out *o, int64_t *next,
                        int32_t *place) {
    int64_t at = 0, tree_at = 0;                   /* the batch's nodes and trees so far */
    const Py_ssize_t cols = p->cols, w = p->width, a = t->arity;
    for (Py_ssize_t j = 0; j < p->batch; j++) {
        const int64_t *it = p->items + p->idx[j] * ITEM_COLS;
        const int64_t first = at, tree_shift = it[TREE_START] - tree_at;
        for (int64_t r = 0; r < it[NODES]; r++, at++) {
            const int64_t row = it[NODE_START] + r, h = height_at(p, row);
            const int32_t *b = p->block + row * cols;
            const int64_t to = next[h]++;
            if (b[w + 3] < 0 || b[w + 3] >= it[NODES]) return broken_pool("a node's number is outside its forest");
            place[at] = (int32_t)to;
            o->index[first + b[w + 3]] = (int32_t)to;
            o->height[to] = (int32_t)h;
            for (Py_ssize_t c = 0; c < a; c++) {          /* b[c]: how many rows before its parent a child is */
                if (b[c] > r) return broken_pool("a child is outside its forest");
                o->children[to * a + c] = b[c] > 0 ? place[at - b[c]] : -1;
            }
            o->tree_of[to] = (int32_t)(b[w] - tree_shift);
            if (o->labels) o->labels[to] = b[w + 1];
            if (h == 0) {
                if (o->words) o->words[to] = b[w + 2];
                else o->leaf_rows[to] = b[w + 2];
            }
            if (o->node_words) o->node_words[to] = b[w + 4];
            if (o->rows) o->rows[to] = row;
        }
        for (int64_t r = 0; r < it[TREES]; r++) {
            const int64_t root = p->roots[it[TREE_START] + r] - it[NODE_START];
            if (root < 0 || root >= it[NODES]) return broken_pool("a root is outside its forest");
            o->roots[tree_at + r] = place[first + root];
        }
        tree_at += it[TREES];
    }
    return 0;
}

/* Nodes placed level by level: a stable counting sort by height (each forest is in
 * schedule order, so this merges them level by level as a stable sort would). */
static int forest_fill(const forest_pool *p, const forest_totals *t, forest_out *o) {
    int64_t *next = calloc((size_t)t->levels + 1, sizeof *next);
    int32_t *place = malloc((size_t)t->nodes * sizeof *place);
    if (!next || !place) {
        free(next);
        free(place);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < p->batch; j++) {
        const int64_t *it = p->items + p->idx[j] * ITEM_COLS;
        for (int64_t r = 0; r < it[NODES]; r++) next[height_at(p, it[NODE_START] + r) + 1]++;
    }
    for (int64_t h = 0; h < t->levels; h++) {
        next[h + 1] += next[h];
        o->level_end[h] = (int32_t)next[h + 1];
    }
    const int status = next[1] != t->leaves ? broken_pool("the leaves' counts disagree")
                                            : forest_place(p, t, o, next, place);
    free(next);
    free(place);
    return status;
}

/* The batch's arrays as new bytes objects, filled: the sealed buffer (children,
 * height, level_end, roots, tree_of, words if the leaves carry words, labels if
 * any item is labelled, index), then leaf_rows, node_words, rows or None. */
static PyObject *forest_batch(const forest_pool *p, const forest_totals *t, int word_payload) {
    const int64_t n = t->nodes, words = word_payload ? t->leaves : 0, labels = t->labelled ? n : 0;
    const Py_ssize_t size[4] = {4 * (n * t->arity + n + t->levels + t->trees + n + words + labels + n),
                                word_payload ? -1 : 4 * t->leaves, t->node_words ? 4 * n : -1,
                                t->node_features ? 8 * n : -1};
    PyObject *made[4] = {NULL};
    void *data[4] = {NULL};
    forest_out o = {0};
    int32_t *s = NULL;
    for (int k = 0; k < 4; k++) {
        made[k] = size[k] < 0 ? Py_NewRef(Py_None) : bytes_of(size[k], &data[k]);
        if (!made[k]) goto fail;
    }
    o.leaf_rows = data[1], o.node_words = data[2], o.rows = data[3];
    s = data[0];
    o.children = s, s += n * t->arity;
    o.height = s, s += n;
    o.level_end = s, s += t->levels;
    o.roots = s, s += t->trees;
    o.tree_of = s, s += n;
    if (word_payload) o.words = s, s += t->leaves;
    if (t->labelled) o.labels = s, s += n;
    o.index = s;
    if (forest_fill(p, t, &o) < 0) goto fail;
    return Py_BuildValue("(NNNNLLLLLLL)", made[0], made[1], made[2], made[3], (long long)n, (long long)t->trees,
                         (long long)t->leaves, (long long)t->levels, (long long)t->arity, (long long)t->labelled,
                         (long long)t->max_word);
fail:
    for (int k = 0; k < 4; k++) Py_XDECREF(made[k]);
    return NULL;
}

/* The pool's views and shapes from the buffers, or -1 when they disagree. */
static int forest_pool_of(forest_pool *p, const Py_buffer *v, Py_ssize_t width) {
    if ((v[1].itemsize != 2 && v[1].itemsize != 4) || v[1].len % v[1].itemsize) {
        PyErr_SetString(PyExc_TypeError, "height: expected int16 or int32");
        return -1;
    }
    *p = (forest_pool){
        .items = v[0].buf, .height = v[1].buf, .height_wide = v[1].itemsize == 4, .block = v[2].buf,
        .roots = v[3].buf, .idx = v[4].buf, .pool_items = v[0].len / (8 * ITEM_COLS),
        .pool_nodes = v[1].len / v[1].itemsize, .pool_trees = v[3].len / 8, .batch = v[4].len / 8, .width = width,
        .cols = v[2].ndim == 2 ? v[2].shape[1] : 0,
    };
    if (v[0].len % (8 * ITEM_COLS) || v[2].ndim != 2 || v[2].shape[0] != p->pool_nodes || width < 1 ||
        p->cols < width + 4)
        return broken_pool("the arrays' shapes disagree");
    if (p->batch < 1) {
        PyErr_SetString(PyExc_ValueError, "a forest needs at least one tree");
        return -1;
    }
    return 0;
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
    const Py_ssize_t width = PyLong_AsSsize_t(args[5]);
    const int word_payload = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred() || word_payload < 0) return NULL;
    static const char *names[5] = {"items", "height", "block", "roots", "idx"};
    static const Py_ssize_t sizes[5] = {8, 0, 4, 8, 8};       /* height: int16 or int32, checked below */
    Py_buffer v[5];
    int held = 0;
    PyObject *result = NULL;
    for (; held < 5; held++) {
        int bad = sizes[held] ? view_of(args[held], &v[held], sizes[held], names[held])
                              : PyObject_GetBuffer(args[held], &v[held], PyBUF_C_CONTIGUOUS);
        if (bad < 0) goto done;
    }
    forest_pool p;
    forest_totals t;
    if (forest_pool_of(&p, v, width) == 0 && forest_totals_of(&p, &t) == 0) result = forest_batch(&p, &t, word_payload);
done:
    release_all(v, held);
    return result;
}

/* -- graphs -------------------------------------------------------------------- */

enum { G_NODES, G_EDGES, G_GRAPHS };

typedef struct {
    const int64_t *counts, *starts, *max_type, *idx;   /* per item: [3], [3], largest edge type */
    const int32_t *edges, *nodes;                       /* [edge_rows, pool_m], [4, pool_n] */
    const float *x, *edge_x;                            /* [pool_n, dx], [pool_m, de], or NULL */
    Py_ssize_t items, batch, edge_rows, pool_m, pool_n, dx, de;
} graph_pool;

typedef struct {
    int64_t nodes, edges, graphs, max_type;
} graph_totals;

/* The pool's views and shapes from the buffers (edges, nodes and features by
 * their 2-D shapes), or -1 when they disagree. */
static int graph_pool_of(graph_pool *p, Py_buffer *v, const Py_buffer *x, const Py_buffer *ex,
                         const Py_buffer *types) {
    *p = (graph_pool){.counts = v[0].buf, .starts = v[1].buf, .edges = v[2].buf, .nodes = v[3].buf,
                      .idx = v[4].buf, .max_type = types->buf, .items = v[0].len / 24, .batch = v[4].len / 8};
    if (v[0].len % 24 || v[1].len != v[0].len || types->len * 3 != v[0].len || v[2].ndim != 2 ||
        v[2].shape[0] < 4 || v[2].shape[0] > 6 || v[3].ndim != 2 || v[3].shape[0] != 4)
        return broken_pool("the arrays' shapes disagree");
    p->edge_rows = v[2].shape[0], p->pool_m = v[2].shape[1], p->pool_n = v[3].shape[1];
    if ((x && (x->ndim != 2 || x->shape[0] != p->pool_n)) || (ex && (ex->ndim != 2 || ex->shape[0] != p->pool_m)))
        return broken_pool("the features' shapes disagree with the blocks'");
    if (x) p->x = x->buf, p->dx = x->shape[1];
    if (ex) p->edge_x = ex->buf, p->de = ex->shape[1];
    return 0;
}

/* The union's sizes and largest edge type, every item and its rows checked. */
static int graph_totals_of(const graph_pool *p, graph_totals *t) {
    *t = (graph_totals){.max_type = -1};
    if (p->batch < 1) {
        PyErr_SetString(PyExc_ValueError, "cannot batch an empty list of items");
        return -1;
    }
    for (Py_ssize_t j = 0; j < p->batch; j++) {
        const int64_t k = p->idx[j];
        if (k < 0 || k >= p->items) {
            PyErr_Format(PyExc_ValueError, "item %lld is outside the pool's [0, %zd)", (long long)k, p->items);
            return -1;
        }
        const int64_t *cnt = p->counts + k * 3, *st = p->starts + k * 3;
        if (cnt[G_NODES] < 1 || cnt[G_EDGES] < 0 || cnt[G_GRAPHS] < 1 || st[G_NODES] < 0 || st[G_EDGES] < 0 ||
            st[G_NODES] > p->pool_n - cnt[G_NODES] || st[G_EDGES] > p->pool_m - cnt[G_EDGES])
            return broken_pool("an item's rows are outside the pool's arrays");
        t->nodes += cnt[G_NODES], t->edges += cnt[G_EDGES], t->graphs += cnt[G_GRAPHS];
        if (p->max_type[k] > t->max_type) t->max_type = p->max_type[k];
    }
    if (t->nodes >= INT32_MAX || t->edges >= INT32_MAX || t->graphs >= INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "batch too large for 32-bit indices: %lld nodes, %lld edges, %lld graphs",
                     (long long)t->nodes, (long long)t->edges, (long long)t->graphs);
        return -1;
    }
    return 0;
}

/* rows [from, from + count) of each row of a block [rows, width], plus add[row],
 * at column `at` of each row of another block [rows, to_width] */
static void copy_rows(int32_t *to, Py_ssize_t to_width, int64_t at, const int32_t *from, Py_ssize_t width,
                      int64_t first, int64_t count, Py_ssize_t rows, const int64_t *add) {
    for (Py_ssize_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < count; i++) to[r * to_width + at + i] = (int32_t)(from[r * width + first + i] + add[r]);
}

/* The union's blocks: each item's rows with its offsets in the union, as `batch`
 * makes them; gptr counted from the nodes' graphs; features copied per item. */
static int graph_fill(const graph_pool *p, const graph_totals *t, void **data) {
    const int64_t n = t->nodes, m = t->edges;
    int32_t *edges = data[0], *nodes = data[1], *gptr = data[2];
    int64_t *order = data[3];
    memset(gptr, 0, 4 * (t->graphs + 1));
    int64_t at[3] = {0, 0, 0};                                   /* the union's nodes, edges, graphs so far */
    for (Py_ssize_t j = 0; j < p->batch; j++) {
        const int64_t *cnt = p->counts + p->idx[j] * 3, *st = p->starts + p->idx[j] * 3;   /* checked */
        /* src and dst_t count nodes, eid_t and order edges, the types stay; ptr and
         * ptr_t count edges, nptr nodes, graph graphs */
        const int64_t edge_add[6] = {at[G_NODES], at[G_NODES], at[G_EDGES], at[G_EDGES], 0, 0};
        const int64_t node_add[4] = {at[G_EDGES], at[G_EDGES], at[G_NODES], at[G_GRAPHS]};
        copy_rows(edges, m, at[G_EDGES], p->edges, p->pool_m, st[G_EDGES], cnt[G_EDGES], p->edge_rows, edge_add);
        copy_rows(nodes, n + 1, at[G_NODES], p->nodes, p->pool_n, st[G_NODES], cnt[G_NODES], 4, node_add);
        for (int64_t i = 0; i < cnt[G_EDGES]; i++) order[at[G_EDGES] + i] = edges[3 * m + at[G_EDGES] + i];
        const int32_t *graph = p->nodes + 3 * p->pool_n + st[G_NODES];
        for (int64_t i = 0; i < cnt[G_NODES]; i++) {
            if (graph[i] < 0 || graph[i] >= cnt[G_GRAPHS]) return broken_pool("a node's graph is outside its item");
            gptr[at[G_GRAPHS] + graph[i] + 1]++;
        }
        if (p->x) memcpy((float *)data[4] + at[G_NODES] * p->dx, p->x + st[G_NODES] * p->dx, 4 * p->dx * cnt[G_NODES]);
        if (p->edge_x)
            memcpy((float *)data[5] + at[G_EDGES] * p->de, p->edge_x + st[G_EDGES] * p->de, 4 * p->de * cnt[G_EDGES]);
        for (int c = 0; c < 3; c++) at[c] += cnt[c];
    }
    const int32_t ends[4] = {(int32_t)m, (int32_t)m, (int32_t)n, (int32_t)t->graphs};
    for (int r = 0; r < 4; r++) nodes[r * (n + 1) + n] = ends[r];
    for (int64_t k = 0; k < t->graphs; k++) gptr[k + 1] += gptr[k];
    return 0;
}

/* The union's arrays as new bytes objects (x and edge_x only where the pool has
 * them), filled; NULL on an error. */
static PyObject *graph_union(const graph_pool *p, const graph_totals *t) {
    const int64_t n = t->nodes, m = t->edges;
    const Py_ssize_t size[6] = {4 * p->edge_rows * m, 4 * 4 * (n + 1), 4 * (t->graphs + 1), 8 * m,
                                p->x ? 4 * p->dx * n : -1, p->edge_x ? 4 * p->de * m : -1};
    PyObject *made[6] = {NULL};
    void *data[6] = {NULL};
    for (int k = 0; k < 6; k++) {
        made[k] = size[k] < 0 ? Py_NewRef(Py_None) : bytes_of(size[k], &data[k]);
        if (!made[k]) goto fail;
    }
    if (graph_fill(p, t, data) < 0) goto fail;
    return Py_BuildValue("(NNNNNNLLLL)", made[0], made[1], made[2], made[3], made[4], made[5], (long long)n,
                         (long long)m, (long long)t->graphs, (long long)t->max_type);
fail:
    for (int k = 0; k < 6; k++) Py_XDECREF(made[k]);
    return NULL;
}

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
    static const char *names[8] = {"counts", "starts", "edges", "nodes", "idx", "x", "edge_x", "max_type"};
    static const Py_ssize_t sizes[8] = {8, 8, 4, 4, 8, 4, 4, 8};
    Py_buffer v[8];
    int held[8] = {0};
    PyObject *result = NULL;
    for (int k = 0; k < 8; k++) {
        if (args[k] == Py_None && (k == 5 || k == 6)) continue;         /* no node or edge features */
        if (view_of(args[k], &v[k], sizes[k], names[k]) < 0) goto done;
        held[k] = 1;
    }
    graph_pool p;
    graph_totals t;
    if (graph_pool_of(&p, v, held[5] ? &v[5] : NULL, held[6] ? &v[6] : NULL, &v[7]) == 0 &&
        graph_totals_of(&p, &t) == 0)
        result = graph_union(&p, &t);
done:
    for (int k = 0; k < 8; k++)
        if (held[k]) PyBuffer_Release(&v[k]);
    return result;
}
