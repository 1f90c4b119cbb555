"""Attention over a graph's edges (GAT, Veličković et al. 2018), as four ops
on a relation (the five arrays of `ops/message.py`: ptr, idx, ptr_t, idx_t,
eid_t; rows are destinations, columns sources, entries edges in CSR order).
H heads, a node tensor of H·F features is H blocks of F columns:

    edge_score:       e[k, h] = s_src[idx k, h] + s_dst[row k, h]
    segment_softmax:  α[k, h] = exp(e[k, h] - m[r, h]) / Σ_{k' in row r} exp(e[k', h] - m[r, h]),
                      m[r, h] = the row's largest score (so no exp overflows)
    attend:           out[r, hF+f] = Σ_{k in row r} α[k, h] x[idx k, hF+f]
    edge_dot:         out[k, h] = Σ_f a[row k, hF+f] c[idx k, hF+f]     (SDDMM)

Self loops are not entries of the relation (it is the graph as given): a
node's own score e_self [rows, H] and weight α_self [rows, H] are optional
last operands. With them the softmax runs over the row's entries and the
row itself; `segment_softmax` then yields the entries' weights (part=edges)
or the rows' own (part=self), each op one result.

VJPs, written with these ops and those of `ops/message.py`:
  * edge_score: d s_src = Σ of g over each source's edges (sum_edges end=src),
    d s_dst = over each destination's (end=dst);
  * segment_softmax: de = α (dα - Σ_in α dα), the sum gathered back per edge;
  * attend: dx is attend over the transposed arrays (parallel over sources),
    dα is edge_dot(g, x); edge_dot's are two attends, one each way.
Every kernel is parallel over the rows it writes (destinations, or sources
through the transposed arrays): no atomics, forward or backward.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir

from ..types import TensorType
from .base import expect
from .message import (FixedSample, _chunks, _columns, _entries, _f32_vec, _load_index, _matrix, _Relational,
                      _relation, _row_kernel, _row_range, _rows_of, less_one, sample_relation)

PARTS = ("edges", "self")


# -- shapes -------------------------------------------------------------------

def _heads_of(width: int, heads: int, what: str) -> int:
    """F, the features per head, of a row of `width` = heads·F features."""
    expect(isinstance(heads, int) and heads >= 1, f"heads must be a positive integer, got {heads!r}")
    expect(width % heads == 0, f"{what} has {width} features, not a multiple of {heads} heads")
    return width // heads


# -- numpy references ----------------------------------------------------------

def _split(x: np.ndarray, heads: int) -> np.ndarray:
    # the width per head spelt out: reshape(-1) cannot infer it from an empty read (a graph with no edges)
    return x.reshape(x.shape[0], heads, x.shape[1] // heads)


def _softmax_reference(ptr, e, e_self):
    """(α over entries, α over rows' own loops or None), as the kernel computes them."""
    rows, heads = len(ptr) - 1, e.shape[1]
    dst = _rows_of(ptr)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.full((rows, heads), -np.inf, e.dtype) if e_self is None else e_self.copy()
        np.maximum.at(m, dst, e)                  # NaN wins, as in the kernel
        ex = np.exp(e - m[dst])
        total = np.zeros((rows, heads), e.dtype)
        own = None
        if e_self is not None:
            own = np.exp(e_self - m)
            total += own
        np.add.at(total, dst, ex)
        return ex / total[dst], (None if own is None else own / total)


def _attend_reference(ptr, idx, alpha, x, alpha_self, transpose):
    heads = alpha.shape[1]
    dst, src = _rows_of(ptr), idx.astype(np.int64)
    at, read = (src, dst) if transpose else (dst, src)
    out = np.zeros_like(x)
    np.add.at(out, at, (alpha[:, :, None] * _split(x[read], heads)).reshape(len(read), x.shape[1]))
    if alpha_self is not None:
        out += (alpha_self[:, :, None] * _split(x, heads)).reshape(x.shape)
    return out


# -- kernel pieces -----------------------------------------------------------------

def _head_lanes(cg, base, entry, heads: int, per: int, col: int, vw: int):
    """A vector whose lane j holds base[entry, head of feature col + j]: the
    weight of each lane's head (one splat when the vector is within a head)."""
    from ..lower.codegen import I32
    b = cg.b
    last_feature = min(col + vw, heads * per) - 1
    first, last = col // per, last_feature // per
    row = cg.imul(entry, heads)
    if first == last:
        return cg.splat(cg.load(base, cg.iadd(row, first)), vw)
    n = last - first + 1
    mask = ir.Constant(ir.VectorType(ir.IntType(1), vw), [k < n for k in range(vw)])
    v = cg.load(base, cg.iadd(row, first), n=vw, mask=mask)
    lanes = [min((col + j) // per, last) - first for j in range(vw)]
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                            ir.Constant(ir.VectorType(I32, vw), [ir.Constant(I32, k) for k in lanes]))


def _sums_side_by_side(cg, vectors: list, vw: int):
    """One vector holding, in lanes [0, n), the lane sums of n vectors (n a
    power of two <= vw): pairs are folded into one vector half by half (each
    keeps its lanes in a group of vw/2, then vw/4, ...), then each group is
    summed by rotations within it: log2(vw) shuffle-add steps in all, not n."""
    from ..lower.codegen import I32

    def pick(x, y, lanes):
        mask = ir.Constant(ir.VectorType(I32, vw), [ir.Constant(I32, k) for k in lanes])
        return cg.b.shuffle_vector(x, y, mask)
    group = vw
    while len(vectors) > 1:
        half, groups = group // 2, vw // group
        lo = [v * vw + q * group + i for v in (0, 1) for q in range(groups) for i in range(half)]
        hi = [j + half for j in lo]
        vectors = [cg.add(pick(x, y, lo), pick(x, y, hi)) for x, y in zip(vectors[::2], vectors[1::2])]
        group = half
    v = vectors[0]
    step = group // 2
    while step >= 1:
        v = cg.add(v, pick(v, v, [j - j % group + (j % group + step) % group for j in range(vw)]))
        step //= 2
    return pick(v, v, [min(j, vw // group - 1) * group for j in range(vw)])


def _head_sums(cg, products, heads: int, per: int, vw: int) -> list:
    """Per head, the sum of its lanes over a row's product vectors."""
    out = []
    for h in range(heads):
        lo, hi = h * per, (h + 1) * per
        acc = None
        for j, v in enumerate(products):
            start, stop = j * vw, (j + 1) * vw
            if stop <= lo or start >= hi:
                continue
            if not (lo <= start and stop <= hi):
                keep = ir.Constant(ir.VectorType(ir.IntType(1), vw), [lo <= start + k < hi for k in range(vw)])
                v = cg.select(keep, v, cg.const(0.0, v))
            acc = v if acc is None else cg.add(acc, v)
        out.append(cg.hsum(acc))
    return out


# -- the ops ----------------------------------------------------------------------------

class EdgeScore(_Relational):
    """e[k, h] = s_src[idx k, h] + s_dst[row k, h]: an edge's score from its
    source's and its destination's node scores (GAT: a_src·Wh_j + a_dst·Wh_i,
    computed once per node). Elementwise consumers (leaky_relu) fuse in."""
    name = "edge_score"
    traits = frozenset({"epilogue"})

    def shape(self, ptr, idx, ptr_t, idx_t, eid_t, s_src, s_dst):
        rows, cols, nnz = _relation((ptr, idx, ptr_t, idx_t, eid_t))
        heads = _matrix(s_src, cols, "the source scores")
        expect(_matrix(s_dst, rows, "the destination scores") == heads,
               f"source and destination scores differ in heads: {s_src}, {s_dst}")
        return TensorType((nnz, heads), "f32")

    def vjp(self, b, g, out, *xs):
        rel = xs[:5]
        return [None] * 5 + [b.sum_edges(*rel, g, end="src"), b.sum_edges(*rel, g, end="dst")]

    def reference(self, ptr, idx, ptr_t, idx_t, eid_t, s_src, s_dst):
        return s_src[idx.astype(np.int64)] + s_dst[_rows_of(ptr)]

    def samples(self):
        rel = sample_relation()
        return [FixedSample((*rel, (7, 3), (7, 3))), FixedSample((*rel, (7, 19), (7, 19)))]

    def lower(self, kb, node, epilogue):
        ptr, idx, s_src, s_dst = node.inputs[0], node.inputs[1], node.inputs[5], node.inputs[6]
        heads, vw = node.shape[1], kb.vector_width
        rows_dim = less_one(kb.graph.nodes[ptr].shape[0])
        with _row_kernel(kb, f"edgescore{node.id}", rows_dim, node.shape[0], heads) as (cg, lo, hi):
            P, N, S, D = (cg.ptr(i) for i in (ptr, idx, s_src, s_dst))
            start, stop = _row_range(cg, lo, hi, rows_dim)
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                own = [cg.load(D, cg.iadd(cg.imul(r, heads), col), n=vw, mask=mask)
                       for col, mask in _columns(heads, vw)]
                with cg.loop(k1, start=k0, name="k") as k:
                    at = cg.imul(_load_index(cg, N, k), heads)
                    for d, (col, mask) in zip(own, _columns(heads, vw)):
                        v = cg.add(cg.load(S, cg.iadd(at, col), n=vw, mask=mask), d)
                        epilogue.emit(cg, [k, cg.i64(col)], vw, mask, given={epilogue.anchor: v})


class SegmentSoftmax(_Relational):
    """α = softmax of each row's scores over its entries (a node's incoming
    edges), and over the row's own score e_self too when it is given (self
    loops); part=edges yields the entries' α [nnz, H], part=self the rows'
    own [rows, H]. A row with nothing to weigh has no α (its aggregate is 0)."""
    name = "segment_softmax"
    defaults = {"part": "edges"}

    def shape(self, *xs, part: str = "edges"):
        expect(len(xs) in (6, 7), f"takes the relation, the scores and optionally the self-loop scores, "
                                  f"got {len(xs)} operands")
        expect(part in PARTS, f"part must be edges or self, got {part!r}")
        rows, cols, nnz = _relation(xs[:5])
        heads = _matrix(xs[5], nnz, "the edge scores")
        if len(xs) == 7:
            expect(rows == cols, f"self loops need a square relation, got {rows} x {cols}")
            expect(_matrix(xs[6], rows, "the self-loop scores") == heads,
                   f"edge and self-loop scores differ in heads: {xs[5]}, {xs[6]}")
        else:
            expect(part == "edges", "part=self needs the self-loop scores")
        return TensorType((nnz if part == "edges" else rows, heads), "f32")

    def vjp(self, b, g, out, *xs, part="edges"):
        rel, e = xs[:5], xs[5]
        if len(xs) == 6:                                # de = α (g - Σ_in α g)
            s = b.sum_edges(*rel, out * g, end="dst")
            return [None] * 5 + [out * (g - b.gather_edges(*rel, s, end="dst"))]
        e_self = xs[6]
        if part == "edges":
            own = b.segment_softmax(*rel, e, e_self, part="self")
            s = b.sum_edges(*rel, out * g, end="dst")
            return [None] * 5 + [out * (g - b.gather_edges(*rel, s, end="dst")), b.neg(own * s)]
        edges = b.segment_softmax(*rel, e, e_self, part="edges")
        u = out * g
        return [None] * 5 + [b.neg(edges * b.gather_edges(*rel, u, end="dst")), out * g - out * u]

    def reference(self, *xs, part="edges"):
        alpha, own = _softmax_reference(xs[0], xs[5], xs[6] if len(xs) == 7 else None)
        return alpha if part == "edges" else own

    def samples(self):
        rel = sample_relation()
        # 4 heads divide the vector width (one run of floats per row), 3 do not
        return [FixedSample((*rel, (9, 3))), FixedSample((*rel, (9, 4))),
                FixedSample((*rel, (9, 3), (7, 3)), {"part": "edges"}),
                FixedSample((*rel, (9, 3), (7, 3)), {"part": "self"}),
                FixedSample((*rel, (9, 4), (7, 4)), {"part": "edges"}),
                FixedSample((*rel, (9, 4), (7, 4)), {"part": "self"})]

    def lower(self, kb, node, epilogue):
        ptr, e = node.inputs[0], node.inputs[5]
        own = node.inputs[6] if len(node.inputs) == 7 else None
        heads, vw = node.shape[1], kb.vector_width
        rows_dim = less_one(kb.graph.nodes[ptr].shape[0])
        nnz_dim = kb.graph.nodes[e].shape[0]
        with _row_kernel(kb, f"segsoftmax{node.id}", rows_dim, nnz_dim, 3 * heads) as (cg, lo, hi):
            start, stop = _row_range(cg, lo, hi, rows_dim)
            refs = (cg.ptr(ptr), cg.ptr(e), cg.ptr(own) if own is not None else None, cg.ptr(node.id))
            emit = _softmax_flat if vw % heads == 0 else _softmax_per_entry
            emit(cg, refs, start, stop, heads, vw, node.attrs.get("part", "edges"))


def _softmax_flat(cg, refs, start, stop, heads, vw, part):
    """Heads dividing the vector width: a row's scores are one contiguous run
    of (entries x heads) floats, read vw at a time (lane j holds head j mod H);
    the lanes of one head are combined by rotations at the end."""
    b = cg.b
    P, E, S, out = refs
    vt = _f32_vec(vw)
    first = None if heads == vw else ir.Constant(ir.VectorType(ir.IntType(1), vw), [j < heads for j in range(vw)])
    best, total = cg.var(vt), cg.var(vt)
    minus_inf, zero = cg.const(float("-inf"), vt), cg.const(0.0, vt)
    with cg.loop(stop, start=start, name="row") as r:
        k0, k1 = _entries(cg, P, r)
        lo, hi = cg.imul(k0, heads), cg.imul(k1, heads)

        def flat():
            return cg.loop(hi, start=lo, step=vw, name="at")

        def scores(at):
            mask = cg.lane_mask(b.sub(hi, at), vw)
            return cg.load(E, at, n=vw, mask=mask), mask
        mine = cg.load(S, cg.imul(r, heads), n=vw, mask=first) if S else None
        b.store(_lanes(cg, mine, [j % heads for j in range(vw)]) if S else minus_inf, best)
        with flat() as at:                              # llvm.maximum: a NaN wins
            v, mask = scores(at)
            b.store(cg.max(b.load(best), cg.select(mask, v, minus_inf)), best)
        m = _fold_heads(cg, b.load(best), heads, cg.max)
        own = cg.exp_nonpositive(cg.sub(mine, m)) if S else None
        b.store(cg.select(first, own, zero) if S and first is not None else (own if S else zero), total)
        with flat() as at:
            v, mask = scores(at)
            ex = cg.select(mask, cg.exp_nonpositive(cg.sub(v, m)), zero)
            if part == "edges":
                cg.store(ex, out, at, mask=mask)
            b.store(cg.add(b.load(total), ex), total)
        inv = cg.div(cg.const(1.0, vt), _fold_heads(cg, b.load(total), heads, cg.add))
        if part == "self":
            cg.store(cg.mul(own, inv), out, cg.imul(r, heads), mask=first)
        else:
            with flat() as at:
                mask = cg.lane_mask(b.sub(hi, at), vw)
                cg.store(cg.mul(cg.load(out, at, n=vw, mask=mask), inv), out, at, mask=mask)


def _lanes(cg, v, lanes):
    """The vector whose lane j is v's lane lanes[j]."""
    from ..lower.codegen import I32
    return cg.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                               ir.Constant(ir.VectorType(I32, len(lanes)), [ir.Constant(I32, k) for k in lanes]))


def _fold_heads(cg, v, heads, combine):
    """Lane j combines every lane of v congruent to j mod heads (vw / heads a
    power of two): rotations by vw/2, vw/4, ..., heads."""
    vw = v.type.count
    step = vw // 2
    while step >= heads:
        v = combine(v, _lanes(cg, v, [(j + step) % vw for j in range(vw)]))
        step //= 2
    return v


def _softmax_per_entry(cg, refs, start, stop, heads, vw, part):
    """Any number of heads: each entry's heads as one (masked) vector."""
    b = cg.b
    P, E, S, out = refs
    vt = _f32_vec(vw)
    best, total = cg.var(vt), cg.var(vt)
    with cg.loop(stop, start=start, name="row") as r:
        k0, k1 = _entries(cg, P, r)
        for col, mask in _columns(heads, vw):
            def score(k):
                return cg.load(E, cg.iadd(cg.imul(k, heads), col), n=vw, mask=mask)
            mine = cg.load(S, cg.iadd(cg.imul(r, heads), col), n=vw, mask=mask) if S else None
            b.store(mine if S else cg.const(float("-inf"), vt), best)
            with cg.loop(k1, start=k0, name="k") as k:     # llvm.maximum: a NaN wins
                b.store(cg.max(b.load(best), score(k)), best)
            m = b.load(best)
            b.store(cg.exp_nonpositive(cg.sub(mine, m)) if S else cg.const(0.0, vt), total)
            with cg.loop(k1, start=k0, name="k") as k:
                b.store(cg.add(b.load(total), cg.exp_nonpositive(cg.sub(score(k), m))), total)
            inv = cg.div(cg.const(1.0, vt), b.load(total))
            if part == "self":
                cg.store(cg.mul(cg.exp_nonpositive(cg.sub(mine, m)), inv), out, cg.iadd(cg.imul(r, heads), col), mask=mask)
                continue
            with cg.loop(k1, start=k0, name="k") as k:
                cg.store(cg.mul(cg.exp_nonpositive(cg.sub(score(k), m)), inv), out, cg.iadd(cg.imul(k, heads), col), mask=mask)


class Attend(_Relational):
    """out[r, hF+f] = Σ_{k in row r} α[k, h] x[idx k, hF+f] (+ α_self[r, h] x[r, hF+f]
    with self loops): each head's weighted sum of its block of the neighbours'
    features. `transpose` runs the adjoint, over each column's entries:
    out[c] = Σ_{k in column c} α[k, h] x[row k] (+ the same self term)."""
    name = "attend"
    traits = frozenset({"epilogue"})
    defaults = {"transpose": False}

    def shape(self, *xs, transpose: bool = False):
        expect(len(xs) in (7, 8), f"takes the relation, α, x and optionally α of the self loops, got {len(xs)} "
                                  "operands")
        rows, cols, nnz = _relation(xs[:5])
        heads = _matrix(xs[5], nnz, "the attention weights")
        out_rows, in_rows = (cols, rows) if transpose else (rows, cols)
        width = _matrix(xs[6], in_rows, "the attended tensor")
        _heads_of(width, heads, "the attended tensor")
        if len(xs) == 8:
            expect(rows == cols, f"self loops need a square relation, got {rows} x {cols}")
            expect(_matrix(xs[7], rows, "the self-loop weights") == heads,
                   f"edge and self-loop weights differ in heads: {xs[5]}, {xs[7]}")
        return TensorType((out_rows, width), "f32")

    def vjp(self, b, g, out, *xs, transpose=False):
        rel, alpha, x = xs[:5], xs[5], xs[6]
        own = xs[7:]
        heads = alpha.shape[1]
        dx = b.attend(*rel, alpha, g, *own, transpose=not transpose)
        dalpha = b.edge_dot(*rel, x, g, heads=heads) if transpose else b.edge_dot(*rel, g, x, heads=heads)
        grads = [None] * 5 + [dalpha, dx]
        if own:
            n, width = x.shape
            grads.append(b.sum(b.reshape(g * x, shape=(n, heads, width // heads)), axes=(2,)))
        return grads

    def reference(self, *xs, transpose=False):
        return _attend_reference(xs[0], xs[1], xs[5], xs[6], xs[7] if len(xs) == 8 else None, transpose)

    def samples(self):
        rel = sample_relation()
        # 5 or 7 features a head: several heads in a vector (lanes shuffled to their heads); 16: one each
        out = [FixedSample((*rel, (9, 2), (7, 10))), FixedSample((*rel, (9, 1), (7, 4)))]
        for transpose in (False, True):
            t = {"transpose": transpose}
            out += [FixedSample((*rel, (9, 3), (7, 21), (7, 3)), t), FixedSample((*rel, (9, 4), (7, 64), (7, 4)), t)]
        return out

    def lower(self, kb, node, epilogue):
        ptr, idx, ptr_t, idx_t, eid_t, alpha, x = node.inputs[:7]
        own = node.inputs[7] if len(node.inputs) == 8 else None
        transpose = node.attrs.get("transpose", False)
        width, heads, vw = node.shape[1], kb.graph.nodes[alpha].shape[1], kb.vector_width
        per = width // heads
        vt = _f32_vec(vw)
        cols = _columns(width, vw)
        nnz_dim = kb.graph.nodes[idx].shape[0]
        with _row_kernel(kb, f"attend{node.id}", node.shape[0], nnz_dim, width) as (cg, lo, hi):
            b = cg.b
            P, N = cg.ptr(ptr_t if transpose else ptr), cg.ptr(idx_t if transpose else idx)
            A, X = cg.ptr(alpha), cg.ptr(x)
            Eid = cg.ptr(eid_t) if transpose else None
            S = cg.ptr(own) if own is not None else None
            accs = [cg.var(vt) for _ in cols[:8]]
            start, stop = _row_range(cg, lo, hi, node.shape[0])
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                for chunk in _chunks(cols):
                    acc = accs[:len(chunk)]
                    for a, (col, mask) in zip(acc, chunk):
                        if S is None:
                            b.store(cg.const(0.0, vt), a)
                            continue
                        v = cg.load(X, cg.iadd(cg.imul(r, width), col), n=vw, mask=mask)
                        b.store(cg.mul(_head_lanes(cg, S, r, heads, per, col, vw), v), a)
                    with cg.loop(k1, start=k0, name="k") as k:
                        entry = _load_index(cg, Eid, k) if transpose else k
                        row = cg.imul(_load_index(cg, N, k), width)
                        for a, (col, mask) in zip(acc, chunk):
                            w = _head_lanes(cg, A, entry, heads, per, col, vw)
                            v = cg.load(X, cg.iadd(row, col), n=vw, mask=mask)
                            b.store(cg.fma(w, v, b.load(a)), a)
                    for a, (col, mask) in zip(acc, chunk):
                        epilogue.emit(cg, [r, cg.i64(col)], vw, mask, given={epilogue.anchor: b.load(a)})


class EdgeDot(_Relational):
    """out[k, h] = Σ_f a[row k, hF+f] c[idx k, hF+f]: per edge and head, the dot
    product of the destination's block of a with the source's block of c
    (SDDMM; the gradient of attend's weights)."""
    name = "edge_dot"

    def shape(self, ptr, idx, ptr_t, idx_t, eid_t, a, c, *, heads: int = 1):
        rows, cols, nnz = _relation((ptr, idx, ptr_t, idx_t, eid_t))
        width = _matrix(a, rows, "the destination tensor")
        expect(_matrix(c, cols, "the source tensor") == width,
               f"destination and source tensors differ in width: {a}, {c}")
        _heads_of(width, heads, "the tensors")
        return TensorType((nnz, heads), "f32")

    def vjp(self, b, g, out, ptr, idx, ptr_t, idx_t, eid_t, a, c, *, heads=1):
        rel = (ptr, idx, ptr_t, idx_t, eid_t)
        return [None] * 5 + [b.attend(*rel, g, c), b.attend(*rel, g, a, transpose=True)]

    def reference(self, ptr, idx, ptr_t, idx_t, eid_t, a, c, *, heads=1):
        return (_split(a[_rows_of(ptr)], heads) * _split(c[idx.astype(np.int64)], heads)).sum(axis=2)

    def samples(self):
        rel = sample_relation()
        # heads of whole vectors (16 or 32 features: sums side by side, 3 heads padded to 4) and not
        return [FixedSample((*rel, (7, 21), (7, 21)), {"heads": 3}), FixedSample((*rel, (7, 5), (7, 5))),
                FixedSample((*rel, (7, 64), (7, 64)), {"heads": 4}), FixedSample((*rel, (7, 48), (7, 48)), {"heads": 3})]

    def lower(self, kb, node, epilogue):
        ptr, idx, a, c = node.inputs[0], node.inputs[1], node.inputs[5], node.inputs[6]
        heads, vw = node.attrs.get("heads", 1), kb.vector_width
        width = kb.graph.nodes[a].shape[1]
        per = width // heads
        tree = 1 << (heads - 1).bit_length() if per % vw == 0 and heads > 1 and heads <= vw else 0
        first = ir.Constant(ir.VectorType(ir.IntType(1), vw), [j < heads for j in range(vw)])
        rows_dim = less_one(kb.graph.nodes[ptr].shape[0])
        with _row_kernel(kb, f"edgedot{node.id}", rows_dim, node.shape[0], width) as (cg, lo, hi):
            P, N, A, C, out = (cg.ptr(i) for i in (ptr, idx, a, c, node.id))
            start, stop = _row_range(cg, lo, hi, rows_dim)
            with cg.loop(stop, start=start, name="row") as r:
                k0, k1 = _entries(cg, P, r)
                mine = [cg.load(A, cg.iadd(cg.imul(r, width), col), n=vw, mask=mask)
                        for col, mask in _columns(width, vw)]
                with cg.loop(k1, start=k0, name="k") as k:
                    row = cg.imul(_load_index(cg, N, k), width)
                    products = [cg.mul(m, cg.load(C, cg.iadd(row, col), n=vw, mask=mask))
                                for m, (col, mask) in zip(mine, _columns(width, vw))]
                    if tree:                    # each head whole vectors: their sums side by side
                        per_head = [functools.reduce(cg.add, products[h * (per // vw):(h + 1) * (per // vw)])
                                    for h in range(heads)]
                        per_head += [cg.const(0.0, per_head[0])] * (tree - heads)
                        sums = _sums_side_by_side(cg, per_head, vw)
                        cg.store(sums, out, cg.imul(k, heads), mask=first)
                    else:
                        for h, s in enumerate(_head_sums(cg, products, heads, per, vw)):
                            cg.store(s, out, cg.iadd(cg.imul(k, heads), h))

