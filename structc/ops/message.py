"""Message passing: aggregation along a sparse relation, and its adjoint.

A relation R pairs `rows` with `cols`: the edges of a graph (each edge is an
entry at row = its destination, col = its source), or the membership of
nodes in the graphs of a batch (row = graph, col = node). It arrives as five
int32 arrays that `structc.graphs` builds once per graph and validates:

    ptr   [rows+1]  CSR by row: entries ptr[r] .. ptr[r+1]-1 belong to row r
    idx   [nnz]     the column of each entry (an edge's source)
    ptr_t [cols+1]  the transpose: entries grouped by column
    idx_t [nnz]     the row of each transposed entry (an edge's destination)
    eid_t [nnz]     the CSR position of each transposed entry

Every op here takes those five first, so a VJP can build the op that runs the
other way. The core is the sparse-dense product

    spmm:     out[r] = a[r] · (Σ_{k in row r} c[idx k] · x[idx k]  (+ c[r] x[r] with self loops))

with optional scalings a (at the row) and c (at the column) by a degree
vector d: `norm=mean` is a = 1/in-degree, `norm=gcn` is a = c = in-degree^-½.
Its VJP is the same product over the transposed arrays (the adjoint), so the
backward pass of an aggregation is an aggregation over the reversed edges.
No op stores a message per edge unless the message itself is per edge
(`gather_edges`, `sum_edges`). Max aggregation keeps, per output element,
the CSR position of the winning entry (`max_index`); the values are read
through it (`take_index`) and gradients routed back through it (`put_index`).

Kernels split rows (destinations) into blocks across threads; each task owns
the output rows it writes, so no atomics are needed, forward or backward.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..errors import ShapeMismatch
from ..types import TensorType
from .base import Op, Sample, expect

ROWS_PER_TASK = 16
NORMS = ("none", "mean", "gcn")


# -- shapes -----------------------------------------------------------------

def less_one(d):
    """The row count behind a row-pointer array of length `d` (rows + 1)."""
    if isinstance(d, int):
        if d >= 1:
            return d - 1
    elif isinstance(d, str) and d.endswith("+1"):
        return d[:-2]
    raise ShapeMismatch(f"a row-pointer array has length rows+1, got length {d}")


def _relation(rel) -> tuple:
    """Check the five relation arrays; returns (rows, cols, nnz)."""
    expect(len(rel) == 5, "a relation is five arrays: ptr, idx, ptr_t, idx_t, eid_t")
    for t in rel:
        expect(t.dtype == "i32" and t.rank == 1, f"relation arrays are i32 vectors, got {t}")
    ptr, idx, ptr_t, idx_t, eid_t = rel
    nnz = idx.shape[0]
    expect(idx_t.shape[0] == nnz and eid_t.shape[0] == nnz,
           f"relation arrays disagree on the number of entries: {idx}, {idx_t}, {eid_t}")
    return less_one(ptr.shape[0]), less_one(ptr_t.shape[0]), nnz


def _matrix(x, rows, what: str):
    expect(x.dtype == "f32", f"{what} must be a float tensor, got {x}")
    expect(x.rank == 2, f"{what} must be a matrix [rows, features], got {x}")
    expect(x.shape[0] == rows, f"{what} has {x.shape[0]} rows, the relation needs {rows}")
    expect(isinstance(x.shape[1], int), f"{what} needs a static number of features, got {x}")
    return x.shape[1]


def _degree_vector(d, rows):
    expect(d.dtype == "f32" and tuple(d.shape) == (rows, 1),
           f"a degree vector is f32[{rows}, 1], got {d}")


def _spmm_operands(xs, norm):
    expect(norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    want = 7 if norm != "none" else 6
    expect(len(xs) == want, f"takes {want} operands with norm={norm}, got {len(xs)}")
    return xs[:5], (xs[5:6] if norm != "none" else ()), xs[-1]


class _Relational(Op):
    """Shared by the ops below: attribute printing without the defaults."""
    defaults: dict = {}

    def describe(self, attrs: dict) -> str:
        from ..graph import format_attr
        return ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(attrs.items())
                         if self.defaults.get(k, object()) != v)


# -- numpy references ---------------------------------------------------------

def _rows_of(ptr: np.ndarray) -> np.ndarray:
    """The row of each CSR entry."""
    return np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))


def _spmm_reference(rel, d, x, transpose, self_loops, norm):
    ptr, idx, ptr_t = rel[0], rel[1], rel[2]
    rows, cols = len(ptr) - 1, len(ptr_t) - 1
    dst, src = _rows_of(ptr), idx.astype(np.int64)
    at_row = d[:, 0] if norm in ("mean", "gcn") else np.ones(rows)
    at_col = d[:, 0] if norm == "gcn" else np.ones(cols)
    if not transpose:
        out = np.zeros((rows, x.shape[1]), x.dtype)
        np.add.at(out, dst, at_col[src, None] * x[src])
        if self_loops:
            out += at_col[:, None] * x
        return out * at_row[:, None]
    out = np.zeros((cols, x.shape[1]), x.dtype)
    np.add.at(out, src, at_row[dst, None] * x[dst])
    if self_loops:
        out += at_row[:, None] * x
    return out * at_col[:, None]


# -- kernels ------------------------------------------------------------------

def _f32_vec(vw):
    from ..lower.codegen import F32
    return ir.VectorType(F32, vw)


def _columns(width: int, vw: int):
    from ..lower.codegen import row_columns
    return row_columns(width, vw)


def _row_kernel(kb, name, rows_dim, nnz_dim, width):
    """A kernel over blocks of ROWS_PER_TASK rows; yields (cg, row range)."""
    def tasks(cg):
        return cg.ceil_div(cg.dim(rows_dim), ROWS_PER_TASK)

    def cost(cg):
        rows, nnz = cg.dim(rows_dim), cg.dim(nnz_dim)
        safe = cg.b.select(cg.b.icmp_signed("<", rows, cg.i64(1)), cg.i64(1), rows)
        per_row = cg.iadd(cg.b.sdiv(nnz, safe), 1)
        return cg.imul(per_row, ROWS_PER_TASK * max(1, width))

    return kb.kernel(name, tasks, cost=cost)


def _row_range(cg, lo, hi, rows_dim):
    start = cg.imul(lo, ROWS_PER_TASK)
    stop = cg.imin(cg.imul(hi, ROWS_PER_TASK), cg.dim(rows_dim))
    return start, stop


def _load_index(cg, base, k):
    from ..lower.codegen import I32, I64
    return cg.b.sext(cg.load(base, k, t=I32), I64)


def _entries(cg, ptr, r):
    """[start, end) of row r's entries."""
    return _load_index(cg, ptr, r), _load_index(cg, ptr, cg.iadd(r, 1))


def _chunks(cols, per: int = 8):
    for k in range(0, len(cols), per):
        yield cols[k:k + per]


def emit_spmm(kb, node, epilogue, *, ptr, nbr, rows_dim, nnz_dim, x, width, d=None,
              scale_nbr=False, scale_row=False, self_loops=False, name="spmm"):
    """out[r] = (d[r] if scale_row) * (Σ_k (d[n_k] if scale_nbr) x[n_k] (+ self term)),
    n_k = nbr[k] over row r's entries; the sums stay in registers and go
    through the group's epilogue one vector at a time."""
    vw = kb.vector_width
    vt = _f32_vec(vw)
    cols = _columns(width, vw)
    with _row_kernel(kb, f"{name}{node.id}", rows_dim, nnz_dim, width) as (cg, lo, hi):
        b = cg.b
        P, N, X = cg.ptr(ptr), cg.ptr(nbr), cg.ptr(x)
        D = cg.ptr(d) if d is not None else None
        accs = [cg.var(vt) for _ in cols[:8]]
        start, stop = _row_range(cg, lo, hi, rows_dim)
        with cg.loop(stop, start=start, name="row") as r:
            k0, k1 = _entries(cg, P, r)
            for chunk in _chunks(cols):
                acc = accs[:len(chunk)]
                if self_loops:
                    own = cg.splat(cg.load(D, r), vw) if scale_nbr else None
                    for a, (col, mask) in zip(acc, chunk):
                        v = cg.load(X, cg.iadd(cg.imul(r, width), col), n=vw, mask=mask)
                        b.store(cg.mul(v, own) if own is not None else v, a)
                else:
                    for a in acc:
                        b.store(cg.const(0.0, vt), a)
                with cg.loop(k1, start=k0, name="k") as k:
                    c = _load_index(cg, N, k)
                    row = cg.imul(c, width)
                    s = cg.splat(cg.load(D, c), vw) if scale_nbr else None
                    for a, (col, mask) in zip(acc, chunk):
                        v = cg.load(X, cg.iadd(row, col), n=vw, mask=mask)
                        b.store(cg.fma(s, v, b.load(a)) if s is not None else cg.add(b.load(a), v), a)
                scale = cg.splat(cg.load(D, r), vw) if scale_row else None
                for a, (col, mask) in zip(acc, chunk):
                    v = b.load(a)
                    if scale is not None:
                        v = cg.mul(v, scale)
                    epilogue.emit(cg, [r, cg.i64(col)], vw, mask, given={epilogue.anchor: v})


# -- the ops ----------------------------------------------------------------------

class Spmm(_Relational):
    """Aggregate rows of x along a relation (see the module docstring):
    out[r] = a[r] Σ_{k in r} c[idx k] x[idx k]; `transpose` runs the adjoint,
    out[c] = c[c] Σ_{k in column c} a[row k] x[row k]."""
    name = "spmm"
    traits = frozenset({"epilogue"})
    defaults = {"transpose": False, "self_loops": False, "norm": "none"}

    def shape(self, *xs, transpose: bool = False, self_loops: bool = False, norm: str = "none") -> TensorType:
        rel, d, x = _spmm_operands(xs, norm)
        rows, cols, _ = _relation(rel)
        out_rows, in_rows = (cols, rows) if transpose else (rows, cols)
        width = _matrix(x, in_rows, "the aggregated tensor")
        if self_loops or norm == "gcn":
            expect(rows == cols, f"self loops and gcn normalisation need a square relation, got {rows} x {cols}")
        if d:
            _degree_vector(d[0], rows)
        return TensorType((out_rows, width), "f32")

    def vjp(self, b, g, out, *xs, transpose=False, self_loops=False, norm="none"):
        gx = b.spmm(*xs[:-1], g, transpose=not transpose, self_loops=self_loops, norm=norm)
        return [None] * (len(xs) - 1) + [gx]

    def reference(self, *xs, transpose=False, self_loops=False, norm="none"):
        rel, d, x = xs[:5], (xs[5] if norm != "none" else None), xs[-1]
        return _spmm_reference(rel, d, x, transpose, self_loops, norm)

    def samples(self):
        rel = sample_relation()
        rows = len(rel[0]) - 1
        deg = np.maximum(np.diff(rel[0]), 1).astype(np.float64)[:, None]
        out = []
        for transpose in (False, True):
            out.append(FixedSample((*rel, (rows, 5)), {"transpose": transpose}))
            out.append(FixedSample((*rel, 1.0 / deg, (rows, 19)), {"transpose": transpose, "norm": "mean",
                                                                     "self_loops": True}))
            out.append(FixedSample((*rel, deg ** -0.5, (rows, 40)), {"transpose": transpose, "norm": "gcn"}))
        grp = sample_membership()
        out.append(FixedSample((*grp, (len(grp[2]) - 1, 3))))
        out.append(FixedSample((*grp, (len(grp[0]) - 1, 3)), {"transpose": True}))
        return out

    def lower(self, kb, node, epilogue):
        ins = node.inputs
        transpose, norm = node.attrs.get("transpose", False), node.attrs.get("norm", "none")
        ptr, idx, ptr_t, idx_t = ins[:4]
        d = ins[5] if norm != "none" else None
        shape = kb.graph.nodes
        emit_spmm(kb, node, epilogue, ptr=ptr_t if transpose else ptr, nbr=idx_t if transpose else idx,
                  rows_dim=node.shape[0], nnz_dim=shape[idx].shape[0], x=ins[-1], width=node.shape[1], d=d,
                  scale_nbr=(norm == "gcn") or (transpose and norm == "mean"),
                  scale_row=(norm == "gcn") or (not transpose and norm == "mean"),
                  self_loops=node.attrs.get("self_loops", False))


class FixedSample(Sample):
    """A sample whose integer operands are given arrays (a relation is not
    something to draw at random); shapes stand for random float operands."""

    def arrays(self, rng):
        return [spec.copy() if isinstance(spec, np.ndarray) else Sample((spec,)).arrays(rng)[0]
                for spec in self.inputs]

    def fixed(self):
        """Given float arrays (degree vectors) are inputs, not parameters."""
        return {k for k, spec in enumerate(self.inputs) if isinstance(spec, np.ndarray) and spec.dtype.kind == "f"}


def relation_arrays(rows: int, cols: int, dst, src) -> tuple:
    """The five relation arrays for entries (dst[k], src[k]) (numpy, int32)."""
    dst, src = np.asarray(dst, np.int64), np.asarray(src, np.int64)
    order = np.argsort(dst, kind="stable")
    idx = src[order]
    ptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(dst, minlength=rows), out=ptr[1:])
    order_t = np.argsort(idx, kind="stable")
    ptr_t = np.zeros(cols + 1, np.int64)
    np.cumsum(np.bincount(idx, minlength=cols), out=ptr_t[1:])
    return tuple(a.astype(np.int32) for a in (ptr, idx, ptr_t, dst[order][order_t], order_t))


def sample_relation():
    """7 nodes: a multi-edge (1->2 twice), a self loop (3->3), node 6 isolated,
    node 0 only a source, node 5 only a destination."""
    src = [1, 1, 0, 2, 3, 0, 4, 2, 0]
    dst = [2, 2, 1, 3, 3, 4, 5, 5, 5]
    return relation_arrays(7, 7, dst, src)


def sample_membership():
    """Three graphs over 7 nodes (sizes 3, 0, 4): rows are graphs, columns nodes."""
    graph = np.array([0, 0, 0, 2, 2, 2, 2])
    return relation_arrays(3, 7, graph, np.arange(7))


class Degree(_Relational):
    """d[r] = (entries of row r + plus) ** power, and 0 where that count is 0:
    in-degrees (power 1), mean weights (-1), GCN weights (-½), as f32[rows, 1]."""
    name = "degree"
    defaults = {"plus": 0}

    def shape(self, ptr, *, power: float = 1.0, plus: int = 0) -> TensorType:
        expect(ptr.dtype == "i32" and ptr.rank == 1, f"degree reads a row-pointer array, got {ptr}")
        expect(power in (1.0, -1.0, -0.5), f"power must be 1, -1 or -0.5, got {power}")
        return TensorType((less_one(ptr.shape[0]), 1), "f32")

    def vjp(self, b, g, out, ptr, *, power=1.0, plus=0):
        return [None]

    def reference(self, ptr, *, power=1.0, plus=0):
        c = np.diff(ptr).astype(np.float64) + plus
        with np.errstate(divide="ignore"):
            d = np.where(c > 0, np.power(np.where(c > 0, c, 1.0), power), 0.0)
        return d[:, None]

    def samples(self):
        rel = sample_relation()
        return [FixedSample((rel[0],), {"power": p, "plus": s}) for p, s in ((1.0, 0), (-1.0, 0), (-0.5, 1))]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32
        power, plus = float(node.attrs.get("power", 1.0)), int(node.attrs.get("plus", 0))
        rows_dim = node.shape[0]
        with _row_kernel(kb, f"degree{node.id}", rows_dim, rows_dim, 1) as (cg, lo, hi):
            b = cg.b
            P, out = cg.ptr(node.inputs[0]), cg.ptr(node.id)
            start, stop = _row_range(cg, lo, hi, rows_dim)
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                c = b.sitofp(cg.iadd(b.sub(k1, k0), plus), F32)
                zero = cg.const(0.0, F32)
                if power == 1.0:
                    v = c
                else:
                    base = cg.sqrt(c) if power == -0.5 else c
                    safe = cg.select(cg.gt(c, zero), base, cg.const(1.0, F32))
                    v = cg.select(cg.gt(c, zero), cg.div(cg.const(1.0, F32), safe), zero)
                cg.store(v, out, r)


class GatherEdges(_Relational):
    """The per-entry copy of a node tensor: out[k] = x[idx k] (end=src, the
    edge's source) or x[row k] (end=dst). Its VJP sums back per node."""
    name = "gather_edges"
    traits = frozenset({"epilogue"})
    defaults = {"end": "src"}

    def shape(self, ptr, idx, ptr_t, idx_t, eid_t, x, *, end: str = "src") -> TensorType:
        rows, cols, nnz = _relation((ptr, idx, ptr_t, idx_t, eid_t))
        expect(end in ("src", "dst"), f"end must be src or dst, got {end!r}")
        width = _matrix(x, cols if end == "src" else rows, "the gathered tensor")
        return TensorType((nnz, width), "f32")

    def vjp(self, b, g, out, *xs, end="src"):
        return [None] * 5 + [b.sum_edges(*xs[:5], g, end=end)]

    def reference(self, ptr, idx, ptr_t, idx_t, eid_t, x, *, end="src"):
        return x[idx] if end == "src" else x[_rows_of(ptr)]

    def samples(self):
        rel = sample_relation()
        return [FixedSample((*rel, (7, 5)), {"end": "src"}), FixedSample((*rel, (7, 17)), {"end": "dst"})]

    def lower(self, kb, node, epilogue):
        ptr, idx = node.inputs[0], node.inputs[1]
        x, width, vw = node.inputs[5], node.shape[1], kb.vector_width
        from_src = node.attrs.get("end", "src") == "src"
        rows_dim = less_one(kb.graph.nodes[ptr].shape[0])
        with _row_kernel(kb, f"gather{node.id}", rows_dim, node.shape[0], width) as (cg, lo, hi):
            P, N, X = cg.ptr(ptr), cg.ptr(idx), cg.ptr(x)
            start, stop = _row_range(cg, lo, hi, rows_dim)
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                with cg.loop(k1, start=k0, name="k") as k:
                    at = cg.imul(_load_index(cg, N, k) if from_src else r, width)
                    for col, mask in _columns(width, vw):
                        v = cg.load(X, cg.iadd(at, col), n=vw, mask=mask)
                        epilogue.emit(cg, [k, cg.i64(col)], vw, mask, given={epilogue.anchor: v})


class SumEdges(_Relational):
    """Per-entry values summed per node: out[r] = Σ_{k in row r} m[k] (end=dst:
    into each edge's destination) or out[c] = Σ_{k in column c} m[k] (end=src)."""
    name = "sum_edges"
    traits = frozenset({"epilogue"})
    defaults = {"end": "dst"}

    def shape(self, ptr, idx, ptr_t, idx_t, eid_t, m, *, end: str = "dst") -> TensorType:
        rows, cols, nnz = _relation((ptr, idx, ptr_t, idx_t, eid_t))
        expect(end in ("src", "dst"), f"end must be src or dst, got {end!r}")
        width = _matrix(m, nnz, "the per-edge tensor")
        return TensorType((rows if end == "dst" else cols, width), "f32")

    def vjp(self, b, g, out, *xs, end="dst"):
        return [None] * 5 + [b.gather_edges(*xs[:5], g, end=end)]

    def reference(self, ptr, idx, ptr_t, idx_t, eid_t, m, *, end="dst"):
        if end == "dst":
            out = np.zeros((len(ptr) - 1, m.shape[1]), m.dtype)
            np.add.at(out, _rows_of(ptr), m)
        else:
            out = np.zeros((len(ptr_t) - 1, m.shape[1]), m.dtype)
            np.add.at(out, idx.astype(np.int64), m)
        return out

    def samples(self):
        rel = sample_relation()
        nnz = len(rel[1])
        return [FixedSample((*rel, (nnz, 5)), {"end": "dst"}), FixedSample((*rel, (nnz, 18)), {"end": "src"})]

    def lower(self, kb, node, epilogue):
        ptr, idx, ptr_t, idx_t, eid_t, m = node.inputs
        width, vw = node.shape[1], kb.vector_width
        by_dst = node.attrs.get("end", "dst") == "dst"
        vt = _f32_vec(vw)
        nnz_dim = kb.graph.nodes[idx].shape[0]
        with _row_kernel(kb, f"sumedges{node.id}", node.shape[0], nnz_dim, width) as (cg, lo, hi):
            b = cg.b
            P, M = cg.ptr(ptr if by_dst else ptr_t), cg.ptr(m)
            E = None if by_dst else cg.ptr(eid_t)
            cols = _columns(width, vw)
            accs = [cg.var(vt) for _ in cols[:8]]
            start, stop = _row_range(cg, lo, hi, node.shape[0])
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                for chunk in _chunks(cols):
                    acc = accs[:len(chunk)]
                    for a in acc:
                        b.store(cg.const(0.0, vt), a)
                    with cg.loop(k1, start=k0, name="k") as k:
                        at = cg.imul(k if by_dst else _load_index(cg, E, k), width)
                        for a, (col, mask) in zip(acc, chunk):
                            b.store(cg.add(b.load(a), cg.load(M, cg.iadd(at, col), n=vw, mask=mask)), a)
                    for a, (col, mask) in zip(acc, chunk):
                        epilogue.emit(cg, [r, cg.i64(col)], vw, mask, given={epilogue.anchor: b.load(a)})


# -- per-edge-type (relational) aggregation -------------------------------------

def _typed_operands(xs, types):
    expect(len(xs) == 8, f"takes the relation, edge types (both orders) and x: 8 operands, got {len(xs)}")
    expect(isinstance(types, int) and types >= 1, f"types must be a positive integer, got {types!r}")
    rows, cols, nnz = _relation(xs[:5])
    for t in xs[5:7]:
        expect(t.dtype == "i32" and tuple(t.shape) == (nnz,), f"edge types are i32[{nnz}], got {t}")
    return rows, cols, xs[7]


def _typed_reference(xs, types, transpose):
    ptr, idx, etype, x = xs[0], xs[1].astype(np.int64), xs[5].astype(np.int64), xs[7]
    rows, cols = len(ptr) - 1, len(xs[2]) - 1
    dst = _rows_of(ptr)
    if not transpose:
        width = x.shape[1]
        out = np.zeros((rows, types, width), x.dtype)
        np.add.at(out, (dst, etype), x[idx])
        return out.reshape(rows, types * width)
    width = x.shape[1] // types
    x3 = x.reshape(rows, types, width)
    out = np.zeros((cols, width), x.dtype)
    np.add.at(out, idx, x3[dst, etype])
    return out


class SpmmTyped(_Relational):
    """Aggregation per edge type, into one block of columns per type:
    out[r, t*F:(t+1)*F] = Σ_{k in row r, type k = t} x[idx k]. Followed by a
    matmul with the stacked per-type weights [T*F, units], this is a
    relational layer Σ_t A_t x W_t with no per-edge message stored."""
    name = "spmm_typed"

    def shape(self, *xs, types: int) -> TensorType:
        rows, cols, x = _typed_operands(xs, types)
        width = _matrix(x, cols, "the aggregated tensor")
        return TensorType((rows, types * width), "f32")

    def vjp(self, b, g, out, *xs, types):
        return [None] * 7 + [b.spmm_typed_t(*xs[:7], g, types=types)]

    def reference(self, *xs, types):
        return _typed_reference(xs, types, transpose=False)

    def samples(self):
        rel = sample_relation()
        etype = np.array([0, 2, 1, 1, 0, 2, 2, 0, 1], np.int32)
        return [FixedSample((*rel, etype, etype[rel[4]], (7, 6)), {"types": 3})]

    def lower(self, kb, node, epilogue):
        ptr, idx, _, _, _, etype, _, x = node.inputs
        types = node.attrs["types"]
        width, vw = kb.graph.nodes[x].shape[1], kb.vector_width
        row_width = types * width
        nnz_dim = kb.graph.nodes[idx].shape[0]
        with _row_kernel(kb, f"spmmtyped{node.id}", node.shape[0], nnz_dim, width) as (cg, lo, hi):
            P, N, T, X, out = (cg.ptr(i) for i in (ptr, idx, etype, x, node.id))
            start, stop = _row_range(cg, lo, hi, node.shape[0])
            with cg.loop(stop, start=start, name="row") as r:
                base = cg.imul(r, row_width)
                for col, mask in _columns(row_width, vw):
                    cg.store(cg.const(0.0, _f32_vec(vw)), out, cg.iadd(base, col), mask=mask)
                k0, k1 = _entries(cg, P, r)
                with cg.loop(k1, start=k0, name="k") as k:
                    src = cg.imul(_load_index(cg, N, k), width)
                    dst = cg.iadd(base, cg.imul(_load_index(cg, T, k), width))
                    for col, mask in _columns(width, vw):
                        at = cg.iadd(dst, col)
                        v = cg.add(cg.load(out, at, n=vw, mask=mask), cg.load(X, cg.iadd(src, col), n=vw, mask=mask))
                        cg.store(v, out, at, mask=mask)


class SpmmTypedT(_Relational):
    """The adjoint of spmm_typed: out[c] = Σ_{k in column c} x[row k, block type k]."""
    name = "spmm_typed_t"
    traits = frozenset({"epilogue"})

    def shape(self, *xs, types: int) -> TensorType:
        rows, cols, x = _typed_operands(xs, types)
        width = _matrix(x, rows, "the aggregated tensor")
        expect(width % types == 0, f"{x} does not split into {types} blocks of columns")
        return TensorType((cols, width // types), "f32")

    def vjp(self, b, g, out, *xs, types):
        return [None] * 7 + [b.spmm_typed(*xs[:7], g, types=types)]

    def reference(self, *xs, types):
        return _typed_reference(xs, types, transpose=True)

    def samples(self):
        rel = sample_relation()
        etype = np.array([0, 2, 1, 1, 0, 2, 2, 0, 1], np.int32)
        return [FixedSample((*rel, etype, etype[rel[4]], (7, 3 * 17)), {"types": 3})]

    def lower(self, kb, node, epilogue):
        _, idx, ptr_t, idx_t, _, _, etype_t, x = node.inputs
        types, width, vw = node.attrs["types"], node.shape[1], kb.vector_width
        vt = _f32_vec(vw)
        nnz_dim = kb.graph.nodes[idx].shape[0]
        with _row_kernel(kb, f"spmmtypedt{node.id}", node.shape[0], nnz_dim, width) as (cg, lo, hi):
            b = cg.b
            P, N, T, X = (cg.ptr(i) for i in (ptr_t, idx_t, etype_t, x))
            cols = _columns(width, vw)
            accs = [cg.var(vt) for _ in cols[:8]]
            start, stop = _row_range(cg, lo, hi, node.shape[0])
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                for chunk in _chunks(cols):
                    acc = accs[:len(chunk)]
                    for a in acc:
                        b.store(cg.const(0.0, vt), a)
                    with cg.loop(k1, start=k0, name="k") as k:
                        at = cg.iadd(cg.imul(_load_index(cg, N, k), types * width),
                                     cg.imul(_load_index(cg, T, k), width))
                        for a, (col, mask) in zip(acc, chunk):
                            b.store(cg.add(b.load(a), cg.load(X, cg.iadd(at, col), n=vw, mask=mask)), a)
                    for a, (col, mask) in zip(acc, chunk):
                        epilogue.emit(cg, [r, cg.i64(col)], vw, mask, given={epilogue.anchor: b.load(a)})


# -- max aggregation ---------------------------------------------------------------
#
# An index a[r, f] names the entry whose value won: a CSR position k in
# [0, nnz), nnz + r for the row's own value (self loops), or -1 for a row
# with nothing to aggregate (whose result is 0). With `source=node` the value
# of entry k is x[idx k, f]; with `source=edge` it is x[k, f] (a per-edge
# message). Storing the entry rather than the node routes the gradient of a
# multi-edge to one of its copies, once.

def _max_operands(xs, source, self_loops):
    expect(source in ("node", "edge"), f"source must be node or edge, got {source!r}")
    rows, cols, nnz = _relation(xs[:5])
    if self_loops:
        expect(source == "node" and rows == cols, "self loops need node values and a square relation")
    return rows, cols, nnz


def _value_rows(source, cols, nnz):
    return cols if source == "node" else nnz


def _max_reference(ptr, idx, x, source, self_loops):
    rows, width, nnz = len(ptr) - 1, x.shape[1], len(idx)
    arg = np.full((rows, width), -1, np.int64)
    best = np.zeros((rows, width), x.dtype)
    for r in range(rows):
        cands = ([(nnz + r, x[r])] if self_loops else []) + \
                [(k, x[idx[k]] if source == "node" else x[k]) for k in range(ptr[r], ptr[r + 1])]
        for code, v in cands:
            # as numpy's argmax: the first NaN wins and stays
            take = (v > best[r]) | (np.isnan(v) & ~np.isnan(best[r])) | (arg[r] == -1)
            best[r] = np.where(take, v, best[r])
            arg[r] = np.where(take, code, arg[r])
    return arg


def _winners(ptr, idx, a, source, self_loops):
    """(output row, value row, column) of every element with a winner."""
    nnz = len(idx)
    r, f = np.nonzero(a >= 0)
    k = a[r, f].astype(np.int64)
    own = k >= nnz
    at = np.where(own, k - nnz, 0)
    if source == "node":
        at = np.where(own, at, idx[np.where(own, 0, k)] if nnz else 0)
    else:
        at = np.where(own, at, k)
    return r, at.astype(np.int64), f


class MaxIndex(_Relational):
    """a[r, f] = the entry holding max over row r's values in column f (see above)."""
    name = "max_index"
    defaults = {"source": "node", "self_loops": False}

    def shape(self, ptr, idx, ptr_t, idx_t, eid_t, x, *, source: str = "node",
              self_loops: bool = False) -> TensorType:
        rows, cols, nnz = _max_operands((ptr, idx, ptr_t, idx_t, eid_t), source, self_loops)
        width = _matrix(x, _value_rows(source, cols, nnz), "the aggregated tensor")
        return TensorType((rows, width), "i32")

    def vjp(self, b, g, out, *xs, source="node", self_loops=False):
        return [None] * 6

    def reference(self, ptr, idx, ptr_t, idx_t, eid_t, x, *, source="node", self_loops=False):
        return _max_reference(ptr, idx, x, source, self_loops).astype(np.int32)

    def samples(self):
        rel = sample_relation()
        return [FixedSample((*rel, (7, 5)), {"self_loops": True}),
                FixedSample((*rel, (len(rel[1]), 18)), {"source": "edge"})]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import I32
        ptr, idx, x = node.inputs[0], node.inputs[1], node.inputs[5]
        source, self_loops = node.attrs.get("source", "node"), node.attrs.get("self_loops", False)
        width, vw = node.shape[1], kb.vector_width
        vt, it = _f32_vec(vw), ir.VectorType(I32, vw)
        nnz_dim = kb.graph.nodes[idx].shape[0]
        with _row_kernel(kb, f"maxindex{node.id}", node.shape[0], nnz_dim, width) as (cg, lo, hi):
            b = cg.b
            P, N, X, out = cg.ptr(ptr), cg.ptr(idx), cg.ptr(x), cg.ptr(node.id)
            nnz = cg.dim(nnz_dim)
            best, arg = cg.var(vt), cg.var(it)
            start, stop = _row_range(cg, lo, hi, node.shape[0])
            none = ir.Constant(it, [ir.Constant(I32, -1)] * vw)
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                for col, mask in _columns(width, vw):
                    if self_loops:
                        b.store(cg.load(X, cg.iadd(cg.imul(r, width), col), n=vw, mask=mask), best)
                        b.store(cg.splat(b.trunc(cg.iadd(nnz, r), I32), vw), arg)
                    else:
                        b.store(cg.const(0.0, vt), best)
                        b.store(none, arg)
                    with cg.loop(k1, start=k0, name="k") as k:
                        at = _load_index(cg, N, k) if source == "node" else k
                        v = cg.load(X, cg.iadd(cg.imul(at, width), col), n=vw, mask=mask)
                        old = b.load(arg)
                        win = b.or_(cg.beats(v, b.load(best)), b.icmp_signed("==", old, none))
                        b.store(cg.select(win, v, b.load(best)), best)
                        b.store(cg.select(win, cg.splat(b.trunc(k, I32), vw), old), arg)
                    cg.store(b.load(arg), out, cg.iadd(cg.imul(r, width), col), t=I32, mask=mask)


def _index_samples(out_rows: bool):
    """Winners as max_index would find them, on a relation where every row has
    entries (the op tests feed no -1; rows with nothing are covered by model tests)."""
    rel = relation_arrays(4, 4, [0, 1, 1, 2, 3, 3, 3, 2], [1, 0, 2, 2, 3, 1, 1, 0])
    nnz, rng = len(rel[1]), np.random.default_rng(7)
    a_node = _max_reference(rel[0], rel[1], rng.normal(size=(4, 5)), "node", True).astype(np.int32)
    a_edge = _max_reference(rel[0], rel[1], rng.normal(size=(nnz, 17)), "edge", False).astype(np.int32)
    return [FixedSample((*rel, a_node, (4, 5)), {"self_loops": True}),
            FixedSample((*rel, a_edge, (4, 17) if out_rows else (nnz, 17)), {"source": "edge"})]


class TakeIndex(_Relational):
    """out[r, f] = the value of entry a[r, f] (0 where a is -1): the max itself."""
    name = "take_index"
    defaults = {"source": "node", "self_loops": False}

    def shape(self, ptr, idx, ptr_t, idx_t, eid_t, a, x, *, source: str = "node",
              self_loops: bool = False) -> TensorType:
        rows, cols, nnz = _max_operands((ptr, idx, ptr_t, idx_t, eid_t), source, self_loops)
        width = _matrix(x, _value_rows(source, cols, nnz), "the aggregated tensor")
        expect(a.dtype == "i32" and tuple(a.shape) == (rows, width), f"expected an index i32[{rows}, {width}], got {a}")
        return TensorType((rows, width), "f32")

    def vjp(self, b, g, out, *xs, source="node", self_loops=False):
        return [None] * 6 + [b.put_index(*xs[:6], g, source=source, self_loops=self_loops)]

    def reference(self, ptr, idx, ptr_t, idx_t, eid_t, a, x, *, source="node", self_loops=False):
        out = np.zeros(a.shape, x.dtype)
        r, at, f = _winners(ptr, idx, a, source, self_loops)
        out[r, f] = x[at, f]
        return out

    def samples(self):
        return _index_samples(out_rows=False)

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32, I32
        idx, a, x = node.inputs[1], node.inputs[5], node.inputs[6]
        source, self_loops = node.attrs.get("source", "node"), node.attrs.get("self_loops", False)
        width = node.shape[1]
        nnz_dim = kb.graph.nodes[idx].shape[0]
        with _row_kernel(kb, f"takeindex{node.id}", node.shape[0], nnz_dim, width) as (cg, lo, hi):
            b = cg.b
            N, A, X, out = cg.ptr(idx), cg.ptr(a), cg.ptr(x), cg.ptr(node.id)
            nnz = cg.dim(nnz_dim)
            value = cg.var(F32)
            start, stop = _row_range(cg, lo, hi, node.shape[0])
            with cg.loop(stop, start=start, name="row") as r:
                with cg.loop(width, name="f") as f:
                    at = cg.iadd(cg.imul(r, width), f)
                    k = b.sext(cg.load(A, at, t=I32), nnz.type)
                    b.store(cg.const(0.0, F32), value)
                    with cg.if_(b.icmp_signed(">=", k, cg.i64(0))):
                        def read(row):
                            b.store(cg.load(X, cg.iadd(cg.imul(row, width), f)), value)
                        if self_loops:
                            with b.if_else(b.icmp_signed(">=", k, nnz)) as (own, entry):
                                with own:
                                    read(b.sub(k, nnz))
                                with entry:
                                    read(_load_index(cg, N, k) if source == "node" else k)
                        else:
                            read(_load_index(cg, N, k) if source == "node" else k)
                    cg.store(b.load(value), out, at)


class PutIndex(_Relational):
    """The adjoint of take_index: each g[r, f] goes to the value that won,
    out[at, f] += g[r, f]; gathered per output row (transposed arrays for
    node values), so no two tasks write one row."""
    name = "put_index"
    defaults = {"source": "node", "self_loops": False}

    def shape(self, ptr, idx, ptr_t, idx_t, eid_t, a, g, *, source: str = "node",
              self_loops: bool = False) -> TensorType:
        rows, cols, nnz = _max_operands((ptr, idx, ptr_t, idx_t, eid_t), source, self_loops)
        width = _matrix(g, rows, "the incoming gradient")
        expect(a.dtype == "i32" and tuple(a.shape) == (rows, width), f"expected an index i32[{rows}, {width}], got {a}")
        return TensorType((_value_rows(source, cols, nnz), width), "f32")

    def vjp(self, b, g, out, *xs, source="node", self_loops=False):
        return [None] * 6 + [b.take_index(*xs[:6], g, source=source, self_loops=self_loops)]

    def reference(self, ptr, idx, ptr_t, idx_t, eid_t, a, g, *, source="node", self_loops=False):
        rows_out = len(ptr_t) - 1 if source == "node" else len(idx)
        out = np.zeros((rows_out, g.shape[1]), g.dtype)
        r, at, f = _winners(ptr, idx, a, source, self_loops)
        np.add.at(out, (at, f), g[r, f])
        return out

    def samples(self):
        return _index_samples(out_rows=True)

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import I32
        ptr, idx, ptr_t, idx_t, eid_t, a, g = node.inputs
        source, self_loops = node.attrs.get("source", "node"), node.attrs.get("self_loops", False)
        width, vw = node.shape[1], kb.vector_width
        vt = _f32_vec(vw)
        nnz_dim = kb.graph.nodes[idx].shape[0]
        zero = ir.Constant(vt, [ir.Constant(vt.element, 0.0)] * vw)
        if source == "edge":
            rows_dim = kb.graph.nodes[a].shape[0]
            with _row_kernel(kb, f"putindex{node.id}", rows_dim, nnz_dim, width) as (cg, lo, hi):
                b = cg.b
                P, A, G, out = cg.ptr(ptr), cg.ptr(a), cg.ptr(g), cg.ptr(node.id)
                start, stop = _row_range(cg, lo, hi, rows_dim)
                with cg.loop(stop, start=start, name="row") as r:
                    k0, k1 = _entries(cg, P, r)
                    for col, mask in _columns(width, vw):
                        at = cg.iadd(cg.imul(r, width), col)
                        av, gv = cg.load(A, at, t=I32, n=vw, mask=mask), cg.load(G, at, n=vw, mask=mask)
                        with cg.loop(k1, start=k0, name="k") as k:
                            win = b.icmp_signed("==", av, cg.splat(b.trunc(k, I32), vw))
                            cg.store(cg.select(win, gv, zero), out, cg.iadd(cg.imul(k, width), col), mask=mask)
            return
        with _row_kernel(kb, f"putindex{node.id}", node.shape[0], nnz_dim, width) as (cg, lo, hi):
            b = cg.b
            P, R, E, A, G, out = (cg.ptr(i) for i in (ptr_t, idx_t, eid_t, a, g, node.id))
            nnz = cg.dim(nnz_dim)
            acc = cg.var(vt)
            start, stop = _row_range(cg, lo, hi, node.shape[0])
            with cg.loop(stop, start=start, name="col") as c:
                k0, k1 = _entries(cg, P, c)
                for col, mask in _columns(width, vw):
                    b.store(zero, acc)
                    if self_loops:
                        at = cg.iadd(cg.imul(c, width), col)
                        own = b.icmp_signed("==", cg.load(A, at, t=I32, n=vw, mask=mask),
                                            cg.splat(b.trunc(cg.iadd(nnz, c), I32), vw))
                        b.store(cg.select(own, cg.load(G, at, n=vw, mask=mask), zero), acc)
                    with cg.loop(k1, start=k0, name="k") as k:
                        at = cg.iadd(cg.imul(_load_index(cg, R, k), width), col)
                        code = cg.splat(cg.load(E, k, t=I32), vw)
                        win = b.icmp_signed("==", cg.load(A, at, t=I32, n=vw, mask=mask), code)
                        b.store(cg.add(b.load(acc), cg.select(win, cg.load(G, at, n=vw, mask=mask), zero)), acc)
                    cg.store(b.load(acc), out, cg.iadd(cg.imul(c, width), col), mask=mask)
