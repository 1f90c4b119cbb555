"""Word embeddings: row gathers, their scatter-add gradient, one-hot codes.

    gather_rows(E, ids)[i] = E[ids[i]]                      (`E[n.word]`, `h(t.root)`)
    scatter_rows(G, ids)[r] = Σ_{i: ids[i] = r} G[i]        (its VJP: only looked-up rows move)
    onehot(ids, C)[i, c] = 1(ids[i] = c)                    (the seed's indicator embedding)

Indices are checked in Python before native code runs (class labels, forest
word ids and roots, and any integer input reaching an op's `index_bounds`);
the kernels also clamp them, so a stray index can never read or write
outside a buffer.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op, Sample, data_sizes, expect


#: inputs that a forest, graph or sequence binder makes: ids within an example
STRUCTURE_KINDS = frozenset({"forest", "graph", "sequence"})


def _check_ids(ids: TensorType) -> None:
    expect(ids.rank == 1 and ids.dtype in ("i32", "i64"), f"indices must be a vector of integers, got {ids}")


class GatherRows(Op):
    """out[i, :] = table[ids[i], :]"""
    name = "gather_rows"

    def shape(self, table, ids) -> TensorType:
        expect(table.rank == 2 and table.is_float, f"can only index the rows of a float matrix, got {table}")
        _check_ids(ids)
        return TensorType((ids.shape[0], table.shape[1]), table.dtype)

    def vjp(self, b, g, out, table, ids):
        return [b.scatter_rows(g, ids, rows=table.shape[0]), None]

    def index_bounds(self, graph, node) -> dict:
        return {1: graph.nodes[node.inputs[0]].shape[0]}

    def pooled_dims(self, graph, node) -> set:
        """Rows of the batch picked by ids the user gives (`h[ids]`: row i reads
        another example's row); a forest's, graph's or sequence's own ids (`h(t.root)`)
        pick within an example."""
        table, ids = (graph.nodes[i] for i in node.inputs)
        return set() if ids.attrs.get("kind") in STRUCTURE_KINDS else data_sizes(table.shape[:1])

    def reference(self, table, ids):
        return table[np.clip(ids, 0, table.shape[0] - 1)]

    def samples(self):
        return [Sample(((7, 5), ((11,), ("classes", 7)))), Sample(((3, 40), ((2,), ("classes", 3))))]

    def lower(self, kb, node, epilogue):
        from ..lower.treemap import copy_row, load_index
        table, ids = node.inputs
        rows_d, width = kb.graph.nodes[table].shape
        idt = kb.graph.nodes[ids].type.dtype
        with kb.kernel(f"gather{node.id}", lambda cg: cg.dim(node.shape[0]), cost=width) as (cg, lo, hi):
            src, dst, idx = cg.ptr(table), cg.ptr(node.id), cg.ptr(ids)
            last = cg.b.sub(cg.dim(rows_d), cg.i64(1))
            with cg.loop(hi, start=lo, name="r") as r:
                k = load_index(cg, idx, r, idt, last)
                copy_row(cg, src, cg.imul(k, width), dst, cg.imul(r, width), width, kb.vector_width)


class ScatterRows(Op):
    """out[r, :] = Σ_{i: ids[i] = r} g[i, :], out having `rows` rows.

    `record` (a trainable embedding's whole gradient, `compiler.train_graph`):
    the output is that table in the gradient arena, and the runtime may keep
    a byte a row of the rows the last call wrote (`sc_rows_record`): the call
    then zeroes those instead of the whole table (20,000 x 256 floats: 20 MB
    a step). Every other row is zero already, while nothing else writes the
    arena, which the Net vouches for (`Net.grads` takes it back)."""
    name = "scatter_rows"
    traits = frozenset({"needs_dims"})

    def shape(self, g, ids, *, rows, record: bool = False) -> TensorType:
        expect(g.rank == 2, f"scatter_rows needs a matrix, got {g}")
        _check_ids(ids)
        expect(ids.shape[0] == g.shape[0], f"{ids} does not index the rows of {g}")
        return TensorType((rows, g.shape[1]), g.dtype)

    def vjp(self, b, u, out, g, ids, *, rows, record=False):
        return [b.gather_rows(u, ids), None]

    def index_bounds(self, graph, node) -> dict:
        return {1: node.attrs["rows"]}

    def reference(self, g, ids, *, rows, record=False, dims=None):
        n = rows if isinstance(rows, int) else dims[rows]
        out = np.zeros((n, g.shape[1]), dtype=g.dtype)
        np.add.at(out, np.clip(ids, 0, n - 1), g)
        return out

    def samples(self):
        return [Sample(((9, 5), ((9,), ("classes", 4))), {"rows": 4}),
                Sample(((3, 33), ((3,), ("classes", 6))), {"rows": 6})]

    def lower(self, kb, node, epilogue):
        from llvmlite import ir

        from ..lower.codegen import I8
        from ..lower.treemap import add_row, load_index, zero_row, zero_rows
        g, ids = node.inputs
        n_d, width = kb.graph.nodes[g].shape
        rows_d = node.shape[0]
        idt = kb.graph.nodes[ids].type.dtype
        recorded = keeps_record(kb, node.id)

        # Rows may repeat, so each output row's adds run in the order of g's rows:
        # a task owns a range of output rows, zeroes them and adds, of every row
        # of g, those whose id falls in its range (every task reads all the ids:
        # 4 bytes against a row's adds). The same bits with any number of threads.
        def cost(cg):
            return cg.imul(cg.dim(n_d), width)

        with kb.kernel(f"scatter{node.id}", SCATTER_TASKS, cost=cost) as (cg, lo, hi):
            b = cg.b
            src, dst, idx = cg.ptr(g), cg.ptr(node.id), cg.ptr(ids)
            rows = cg.dim(rows_d)
            first = b.sdiv(cg.imul(rows, lo), cg.i64(SCATTER_TASKS))
            end = b.sdiv(cg.imul(rows, hi), cg.i64(SCATTER_TASKS))
            kept = record = None
            if recorded:
                record, kept = row_record(cg, dst, rows)
                with b.if_else(kept) as (marked, whole):
                    with marked:
                        each_marked_row(cg, record, first, end,
                                        lambda r: zero_row(cg, dst, cg.imul(r, width), width, kb.vector_width),
                                        clear=True)
                    with whole:
                        zero_rows(cg, dst, first, end, width, kb.vector_width)
            else:
                zero_rows(cg, dst, first, end, width, kb.vector_width)
            last = b.sub(rows, cg.i64(1))
            with cg.loop(cg.dim(n_d), name="r") as r:
                k = load_index(cg, idx, r, idt, last)
                with cg.if_(b.and_(b.icmp_signed(">=", k, first), b.icmp_signed("<", k, end))):
                    add_row(cg, src, cg.imul(r, width), dst, cg.imul(k, width), width, kb.vector_width)
                    if recorded:        # the row may be nonzero now
                        with cg.if_(kept):
                            cg.store(ir.Constant(I8, 1), record, k, t=I8)


def keeps_record(kb, nid: int) -> bool:
    """Whether scatter `nid` keeps a record of the rows it writes: marked so
    (`record`), and its output the table's gradient in the arena, or the output
    of a recursion's parameter program (`compiler.train_graph` marks it where
    that output is the gradient). A buffer of the workspace holds other values
    between calls; the runtime keeps records only inside a registered arena."""
    plan = kb.layout.plan
    node = kb.graph.nodes[nid]
    return node.op.name == "scatter_rows" and node.attrs.get("record", False) \
        and plan.storage[plan.root(nid)].kind in ("grad", "output")


def row_record(cg, table, rows, make: bool = True):
    """(the runtime's record of the rows of `table` written last, whether there is
    one); `make`: a scatter's, which starts one (every row marked), else the
    update's, which reads what the scatter left."""
    from llvmlite import ir

    from ..lower.codegen import I64, PTR
    fn = "sc_rows_record" if make else "sc_rows_find"
    record = cg.b.call(cg.declare(fn, PTR, [PTR, I64]), [table, rows])
    return record, cg.b.icmp_unsigned("!=", record, ir.Constant(PTR, None))


def each_marked_row(cg, record, first, end, body, clear: bool) -> None:
    """body(r) for each row r in [first, end) whose byte in `record` is set
    (`clear`: clearing it): 64 bytes at a time (a 20,000-row table's record is
    313 compares), then the rest one by one. Also the sparse SGD update's
    rows (`optim._sparse_sgd`), which reads the record the scatter left."""
    from llvmlite import ir

    from ..lower.codegen import I8, I64
    b = cg.b
    bytes64 = ir.VectorType(I8, 64)
    nothing = ir.Constant(bytes64, [ir.Constant(I8, 0)] * 64)
    blocks = b.sdiv(b.sub(end, first), cg.i64(64))
    with cg.loop(blocks, name="rb") as k:
        at = cg.iadd(first, cg.imul(k, 64))
        marks = b.bitcast(b.icmp_unsigned("!=", cg.load(record, at, t=I8, n=64), nothing), I64)
        with cg.if_(b.icmp_unsigned("!=", marks, cg.i64(0))):
            if clear:
                cg.store(nothing, record, at, t=I8)
            left = cg.var(I64, marks)
            with cg.loop(cg.intrinsic("ctpop", I64, [marks]), name="rm"):
                m = b.load(left)
                body(cg.iadd(at, cg.intrinsic("cttz", I64, [m, ir.Constant(ir.IntType(1), 1)])))
                b.store(b.and_(m, b.sub(m, cg.i64(1))), left)
    with cg.loop(end, start=cg.iadd(first, cg.imul(blocks, 64)), name="rt") as r:
        with cg.if_(b.icmp_unsigned("!=", cg.load(record, r, t=I8), ir.Constant(I8, 0))):
            if clear:
                cg.store(ir.Constant(I8, 0), record, r, t=I8)
            body(r)


#: tasks of a `scatter_rows` (ranges of output rows; a constant, so that the
#: work of each is the same on any number of threads)
SCATTER_TASKS = 2


class OneHot(Op):
    """out[i, c] = 1 if ids[i] = c else 0: the one-hot word embedding."""
    name = "onehot"

    def shape(self, ids, *, classes: int) -> TensorType:
        _check_ids(ids)
        expect(isinstance(classes, int) and classes > 0, f"onehot needs a positive number of classes, got {classes}")
        return TensorType((ids.shape[0], classes), "f32")

    def vjp(self, b, g, out, ids, *, classes):
        return [None]

    def index_bounds(self, graph, node) -> dict:
        return {0: node.attrs["classes"]}     # an id outside gives a row of zeros

    def reference(self, ids, *, classes):
        return (ids[:, None] == np.arange(classes)[None, :]).astype(np.float64)

    def samples(self):
        return [Sample((((6,), ("classes", 5)),), {"classes": 5}), Sample((((3,), ("classes", 40)),), {"classes": 40})]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32
        from ..lower.treemap import load_index, zero_rows
        ids = node.inputs[0]
        classes = node.attrs["classes"]
        idt = kb.graph.nodes[ids].type.dtype
        with kb.kernel(f"onehot{node.id}", lambda cg: cg.dim(node.shape[0]), cost=classes) as (cg, lo, hi):
            b = cg.b
            dst, idx = cg.ptr(node.id), cg.ptr(ids)
            zero_rows(cg, dst, lo, hi, classes, kb.vector_width)
            with cg.loop(hi, start=lo, name="r") as r:
                k = load_index(cg, idx, r, idt, None)
                inside = b.and_(b.icmp_signed(">=", k, cg.i64(0)), b.icmp_signed("<", k, cg.i64(classes)))
                with cg.if_(inside):
                    cg.store(cg.const(1.0, F32), dst, cg.iadd(cg.imul(r, classes), k))
