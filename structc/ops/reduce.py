"""Sums over axes, and `mean` built from a sum and the axis sizes."""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op, Sample, data_sizes, expect


def normalize_axes(axes, rank: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(rank))
    if isinstance(axes, int):
        axes = (axes,)
    expect(isinstance(axes, (tuple, list)) and all(isinstance(a, int) and not isinstance(a, bool) for a in axes),
           f"axes must be an integer or a tuple of integers such as (2, 3), got {axes!r}")
    out = []
    for a in axes:
        expect(-rank <= a < rank, f"axis {a} is out of range for rank {rank}")
        out.append(a % rank)
    expect(len(set(out)) == len(out), f"repeated axis in {tuple(axes)}")
    return tuple(sorted(out))


class Sum(Op):
    """Σ of x over `axes` (all when omitted)."""
    name = "sum"
    floats_only = True
    surface = True
    # "summing": its elements are added, so `fuse` may accumulate it in the loop that computes them
    traits = frozenset({"reduction", "summing"})

    def shape(self, x, *, axes=None, keepdims: bool = False) -> TensorType:
        ax = normalize_axes(axes, x.rank)
        shape = tuple(1 if k in ax else d for k, d in enumerate(x.shape) if keepdims or k not in ax)
        return TensorType(shape, x.dtype)

    def vjp(self, b, g, out, x, *, axes=None, keepdims=False):
        ax = normalize_axes(axes, len(x.shape))
        kept = tuple(1 if k in ax else d for k, d in enumerate(x.shape))
        if g.shape != kept and len(g.shape) > 0:
            g = b.reshape(g, shape=kept)
        return [b.broadcast_to(g, shape=x.shape)]

    def reference(self, x, *, axes=None, keepdims=False):
        ax = normalize_axes(axes, x.ndim)
        return np.sum(x, axis=ax, keepdims=keepdims)

    def pooled_dims(self, graph, node) -> set:
        x = graph.nodes[node.inputs[0]].shape
        return data_sizes(x[k] for k in normalize_axes(node.attrs.get("axes"), len(x)))

    def samples(self):
        x = (3, 4, 21)
        return [Sample((x,), {"axes": a, "keepdims": k})
                for a, k in [((0,), False), ((1,), False), ((2,), False), ((0, 2), False),
                             (None, False), ((1,), True), ((0, 1), True)]] + [Sample(((40,),), {"axes": (0,)})]

    def lower(self, kb, node, epilogue):
        lower_reduction(kb, node, "sum", _Combine(0.0, lambda cg, a, b: cg.add(a, b), lambda cg, v: cg.hsum(v)))

    def legalize(self, b, node):
        """A sum over leading axes (a bias gradient over a batch, a graph's nodes)
        of a few column blocks and many rows, or rows known only at run time, is
        summed in PARTS ranges of rows (`sum_parts`) and then over the parts:
        as one task, one thread read every row, half of them from the other
        core's cache; in parts each thread sums rows it wrote. The parts add
        in a fixed order: the same bits on any number of threads."""
        from .matmul import MIN_PART_ROWS, PARTS
        x = b.value(node.inputs[0])
        rows, cols = _leading_split(x.shape, node.attrs.get("axes"))
        if rows is None or node.attrs.get("keepdims") or not all(isinstance(d, int) for d in cols):
            return None
        width = int(np.prod(cols, dtype=np.int64))
        if width > FEW_COLUMN_TASKS * WIDE_BLOCK * 16:        # wide blocks of 16-lane (AVX-512) vectors
            return None
        if all(isinstance(d, int) for d in rows) and int(np.prod(rows, dtype=np.int64)) < PARTS * MIN_PART_ROWS:
            return None
        if len(rows) > 1:
            flat_rows = _one_dim(rows)
            if flat_rows is None:
                return None
            x = b.reshape(x, shape=(flat_rows, *cols))
        return b.sum(b.sum_parts(x, parts=PARTS), axes=(0,))


#: a leading-axes sum of at most this many wide column blocks (`_lower_column_blocks`) goes in parts
FEW_COLUMN_TASKS = 2


def _leading_split(shape, axes):
    """(rows, cols): the reduced leading dims and the kept trailing ones, or (None, None)."""
    ax = normalize_axes(axes, len(shape))
    k = len(ax)
    if not ax or ax != tuple(range(k)) or k == len(shape):
        return None, None
    return shape[:k], shape[k:]


def _one_dim(dims):
    """dims[0] x dims[1] x ... as one dim (a symbol times 1s, or an int), or None."""
    syms = [d for d in dims if not isinstance(d, int)]
    static = int(np.prod([d for d in dims if isinstance(d, int)], dtype=np.int64))
    if not syms:
        return static
    return syms[0] if len(syms) == 1 and static == 1 else None


class SumParts(Op):
    """out[p] = Σ x[r] over the rows r in [R p / parts, R (p + 1) / parts) of x
    [R, ...]: a leading-axes sum in parts (`Sum.legalize`), summed again over
    axis 0. Made after autodiff, so it has no gradient of its own."""
    name = "sum_parts"
    floats_only = True

    def shape(self, x, *, parts: int = 2) -> TensorType:
        expect(x.rank >= 2, f"sum_parts needs rows and columns, got {x}")
        expect(isinstance(parts, int) and parts >= 1, f"parts must be a positive int, got {parts!r}")
        return TensorType((parts, *x.shape[1:]), x.dtype)

    def reference(self, x, *, parts=2):
        cuts = [len(x) * p // parts for p in range(parts + 1)]
        return np.stack([x[a:z].sum(axis=0) for a, z in zip(cuts, cuts[1:])])

    def samples(self):
        # rows below the parts (empty ones), a ragged split, wide and narrow column blocks
        return [Sample((((k, *cols), "fixed"),), {"parts": p})
                for k, cols, p in ((1, (5,), 2), (7, (3, 4), 2), (300, (40,), 2), (50, (600,), 3))]

    def lower(self, kb, node, epilogue):
        self.lower_rows(kb, node, node.inputs[0], "sumparts")

    @staticmethod
    def lower_rows(kb, node, x, kind):
        """node [parts, cols...] = the parts' sums of the rows of x."""
        rows = kb.graph.nodes[x].shape[0]
        _lower_column_blocks(kb, node, kind, _Combine(0.0, lambda cg, a, b: cg.add(a, b), None),
                             [(True, [rows]), (False, list(node.shape[1:]))], parts=node.attrs.get("parts", 2), x=x)


class Max(Op):
    """The largest entry of x over `axes` (all when omitted), as numpy's max: a
    NaN wins. The gradient is shared evenly among the entries equal to the
    maximum (as PyTorch's amax). `max(h over g.edges)` is graph aggregation
    (`gnn.py`), not this op."""
    name = "max"
    floats_only = True
    surface = True
    traits = frozenset({"reduction"})
    pick = staticmethod(np.max)

    def shape(self, x, *, axes=None, keepdims: bool = False) -> TensorType:
        return Sum.shape(self, x, axes=axes, keepdims=keepdims)

    def vjp(self, b, g, out, x, *, axes=None, keepdims=False):
        ax = normalize_axes(axes, len(x.shape))
        kept = tuple(1 if k in ax else d for k, d in enumerate(x.shape))
        if out.shape != kept and len(out.shape) > 0:
            out, g = b.reshape(out, shape=kept), b.reshape(g, shape=kept)
        winners = b.equal(x, out)           # 0 everywhere in a slice whose maximum is NaN: 0/0 keeps it NaN
        share = g / b.sum(winners, axes=ax, keepdims=True)
        return [b.broadcast_to(share, shape=x.shape) * winners]

    def reference(self, x, *, axes=None, keepdims=False):
        return type(self).pick(x, axis=normalize_axes(axes, x.ndim), keepdims=keepdims)

    def pooled_dims(self, graph, node) -> set:
        return Sum.pooled_dims(self, graph, node)

    def samples(self):
        return Sum.samples(self)

    def lower(self, kb, node, epilogue):
        lower_reduction(kb, node, self.name, _Combine(float("-inf"), lambda cg, a, b: cg.max(a, b),
                                                      lambda cg, v: cg.hmax(v)))


class Min(Max):
    """The smallest entry of x over `axes`, as numpy's min (a NaN wins)."""
    name = "min"
    pick = staticmethod(np.min)

    def lower(self, kb, node, epilogue):
        lower_reduction(kb, node, self.name, _Combine(float("inf"), lambda cg, a, b: cg.min(a, b),
                                                      lambda cg, v: cg.neg(cg.hmax(cg.neg(v)))))


class Argmax(Op):
    """The position (int32) of the largest entry along `axis`, the first one
    on ties, a NaN's if there is one (numpy's argmax). Forward only: an index
    has no gradient."""
    name = "argmax"
    floats_only = True
    surface = True

    def shape(self, x, *, axis: int = -1) -> TensorType:
        expect(x.rank >= 1, f"argmax needs at least one dimension, got {x}")
        (a,) = normalize_axes(axis, x.rank)
        expect(x.shape[a] != 0, "argmax of an empty axis")
        return TensorType(tuple(d for k, d in enumerate(x.shape) if k != a), "i32")

    def vjp(self, b, g, out, x, *, axis=-1):
        return [None]

    def id_range(self, graph, node):
        x = graph.nodes[node.inputs[0]].shape
        return x[normalize_axes(node.attrs.get("axis", -1), len(x))[0]]

    def pooled_dims(self, graph, node) -> set:
        return data_sizes([self.id_range(graph, node)])

    def reference(self, x, *, axis=-1):
        return np.argmax(x, axis=normalize_axes(axis, x.ndim)[0]).astype(np.int32)

    def samples(self):
        return [Sample((((3, 4, 21), "fixed"),), {"axis": a}) for a in (0, 1, -1)] + [Sample((((40,), "fixed"),))]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32, I32
        x = node.inputs[0]
        shape = kb.graph.nodes[x].shape
        (a,) = normalize_axes(node.attrs.get("axis", -1), len(shape))
        outer, along, inner = shape[:a], shape[a], shape[a + 1:]
        with kb.kernel(f"argmax{node.id}", lambda cg: cg.numel(outer),
                       cost=lambda cg: cg.numel(shape[a:])) as (cg, lo, hi):
            src, dst = cg.ptr(x), cg.ptr(node.id)
            n, m = cg.dim(along), cg.numel(inner)
            best, arg = cg.var(F32), cg.var(cg.i64(0).type)
            with cg.loop(hi, start=lo, name="o") as o:
                with cg.loop(m, name="i") as i:
                    base = cg.iadd(cg.imul(cg.imul(o, n), m), i)
                    cg.b.store(cg.load(src, base), best)
                    cg.b.store(cg.i64(0), arg)
                    with cg.loop(n, start=cg.i64(1), name="k") as k:
                        v = cg.load(src, cg.iadd(base, cg.imul(k, m)))
                        win = cg.beats(v, cg.b.load(best))
                        cg.b.store(cg.select(win, v, cg.b.load(best)), best)
                        cg.b.store(cg.select(win, k, cg.b.load(arg)), arg)
                    cg.store(cg.b.trunc(cg.b.load(arg), I32), dst, cg.iadd(cg.imul(o, m), i), t=I32)


class _Combine:
    """How a reduction folds values: its identity, the binary operation (on
    scalars and vectors alike) and the fold of a vector's lanes."""
    def __init__(self, identity: float, op, lanes):
        self.identity, self.op, self.lanes = identity, op, lanes


def lower_reduction(kb, node, kind: str, comb: _Combine):
    """The loop nest of a reduction of node.inputs[0] over node's `axes`."""
    from ..lower.codegen import F32
    from ..lower.module import run_time_numel
    x = node.inputs[0]
    shape = kb.graph.nodes[x].shape
    reduced = normalize_axes(node.attrs.get("axes"), len(shape))
    groups: list[tuple[bool, list]] = []
    for k, d in enumerate(shape):
        r = k in reduced
        if groups and groups[-1][0] == r:
            groups[-1][1].append(d)
        else:
            groups.append((r, [d]))
    if len(groups) == 2 and groups[0][0]:
        _lower_column_blocks(kb, node, kind, comb, groups)
        return
    out_dims = [d for k, d in enumerate(shape) if k not in reduced]
    # The outermost kept axis splits across threads: each task owns its outputs.
    split = bool(groups) and not groups[0][0]
    vw = kb.vector_width

    def tasks(cg):
        return cg.numel(groups[0][1]) if split else cg.i64(1)

    with kb.kernel(f"{kind}{node.id}", tasks, cost=lambda cg: cg.numel(shape), skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        src, dst = cg.ptr(x), cg.ptr(node.id)
        # sizes read at run time: a bias gradient's sum is one text at any width
        ext = [run_time_numel(cg, ds) for _, ds in groups]
        istride, ostride = [cg.i64(1)] * len(groups), [cg.i64(1)] * len(groups)
        acc_i, acc_o = cg.i64(1), cg.i64(1)
        for g in reversed(range(len(groups))):
            istride[g] = acc_i
            acc_i = cg.imul(acc_i, ext[g])
            if not groups[g][0]:
                ostride[g] = acc_o
                acc_o = cg.imul(acc_o, ext[g])
        out_inner = run_time_numel(cg, out_dims[len(groups[0][1]):] if split else out_dims)
        zstart = cg.imul(lo, out_inner) if split else cg.i64(0)
        zstop = cg.imul(hi, out_inner) if split else out_inner
        with cg.loop(zstop, start=zstart, name="z") as z:
            cg.store(cg.const(comb.identity, F32), dst, z)
        if not groups:
            cg.store(cg.load(src, cg.i64(0)), dst, cg.i64(0))
            return

        def level(g, ioff, ooff):
            is_red, _ = groups[g]
            if g == len(groups) - 1:
                _inner(cg, src, dst, ioff, ooff, ext[g], is_red, vw, comb)
                return
            start, stop = (lo, hi) if g == 0 and split else (cg.i64(0), ext[g])
            with cg.loop(stop, start=start, name=f"a{g}") as i:
                level(g + 1, cg.iadd(ioff, cg.imul(i, istride[g])),
                      ooff if is_red else cg.iadd(ooff, cg.imul(i, ostride[g])))

        if len(groups) == 1 and split:
            # Nothing reduced: a plain copy of this task's part.
            with cg.loop(hi, start=lo, name="c") as i:
                cg.store(cg.load(src, i), dst, i)
        else:
            level(0, cg.i64(0), cg.i64(0))


#: vectors of columns a task of a leading-axes reduction owns (`_lower_column_blocks`),
#: as many sums in registers down every row: wide blocks while the columns fill them
#: (a task then reads 1 kB of each row, a stream the prefetcher follows: blocks of
#: 64 floats alone made an LSTM's bias sum over [3264, 512] 1.35x slower than one
#: loop over the rows), narrow ones, masked, for the rest
WIDE_BLOCK, NARROW_BLOCK = 16, 4


def _lower_column_blocks(kb, node, kind: str, comb: _Combine, groups, parts: int = 1, x=None) -> None:
    """x [rows..., cols...] reduced over its leading axes (a bias gradient's sum
    over the batch): each task owns a block of columns and runs their sums in
    registers down every row, so a wide sum splits across threads and no
    partial sum goes through memory. Each column is still summed row by row
    from the identity: the same bits as one loop over the rows. `parts` > 1
    (`sum_parts`): node is [parts, cols...], part p the sum of rows [R p /
    parts, R (p + 1) / parts), the outer task index (each thread's share is
    a range of rows)."""
    from llvmlite import ir
    from ..lower.codegen import F32
    from ..lower.module import run_time_numel
    x = node.inputs[0] if x is None else x
    vw = kb.vector_width
    wide, narrow = WIDE_BLOCK * vw, NARROW_BLOCK * vw
    rows_dims, cols_dims = groups[0][1], groups[1][1]

    def blocks(cg, cols):       # (wide blocks, tasks): the wide ones first, then narrow ones for the rest
        n_wide = cg.b.sdiv(cols, cg.i64(wide))
        return n_wide, cg.iadd(n_wide, cg.ceil_div(cg.b.sub(cols, cg.imul(n_wide, wide)), narrow))

    def tasks(cg):
        return cg.imul(blocks(cg, cg.numel(cols_dims))[1], cg.i64(parts))

    def cost(cg):
        return cg.imul(cg.ceil_div(cg.numel(rows_dims), parts), wide)

    # explicit vector code: the short pipeline gives its row loop the same machine code as
    # MEMORY_TUNING's O3 (16 vaddps from memory a row, sums in registers) at 60% of the LLVM time
    with kb.kernel(f"{kind}{node.id}", tasks, cost=cost, vector_code=True, skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        b = cg.b
        src, dst = cg.ptr(x), cg.ptr(node.id)
        rows, cols = run_time_numel(cg, rows_dims), run_time_numel(cg, cols_dims)
        n_wide, per_part = blocks(cg, cols)
        vt = ir.VectorType(F32, vw)
        span = {}       # this task's rows and where its part's sums go

        def block(c0, vectors, masks):
            acc = [cg.var(vt, cg.const(comb.identity, vt)) for _ in range(vectors)]
            with cg.loop(span["stop"], start=span["start"], name="r") as r:
                at = cg.iadd(cg.imul(r, cols), c0)
                for v in range(vectors):
                    value = cg.load(src, cg.iadd(at, v * vw), n=vw, mask=masks[v])
                    b.store(comb.op(cg, b.load(acc[v]), value), acc[v])
            for v in range(vectors):
                cg.store(b.load(acc[v]), dst, cg.iadd(cg.iadd(span["out"], c0), v * vw), mask=masks[v])

        with cg.loop(hi, start=lo, name="cb") as task:
            if parts > 1:
                part, task = b.sdiv(task, per_part), b.srem(task, per_part)
                span["start"] = b.sdiv(cg.imul(rows, part), cg.i64(parts))
                span["stop"] = b.sdiv(cg.imul(rows, cg.iadd(part, 1)), cg.i64(parts))
                span["out"] = cg.imul(part, cols)
            else:
                span.update(start=cg.i64(0), stop=rows, out=cg.i64(0))
            with b.if_else(b.icmp_signed("<", task, n_wide)) as (is_wide, is_narrow):
                with is_wide:
                    block(cg.imul(task, wide), WIDE_BLOCK, [None] * WIDE_BLOCK)
                with is_narrow:
                    # a vector past the columns has no lane set: it reads and writes nothing
                    c0 = cg.iadd(cg.imul(n_wide, wide), cg.imul(b.sub(task, n_wide), narrow))
                    width = b.sub(cols, c0)
                    block(c0, NARROW_BLOCK, [cg.lane_mask(b.sub(width, cg.i64(v * vw)), vw)
                                             for v in range(NARROW_BLOCK)])


def _inner(cg, src, dst, ioff, ooff, n, reduced: bool, vw: int, comb: _Combine):
    from llvmlite import ir
    from ..lower.codegen import F32
    b = cg.b
    full = b.sdiv(n, cg.i64(vw))
    if reduced:
        acc = cg.var(ir.VectorType(F32, vw), cg.const(comb.identity, ir.VectorType(F32, vw)))
        with cg.loop(full, name="rv") as v:
            b.store(comb.op(cg, b.load(acc), cg.load(src, cg.iadd(ioff, cg.imul(v, vw)), n=vw)), acc)
        total = cg.var(F32, comb.lanes(cg, b.load(acc)))
        with cg.loop(n, start=cg.imul(full, vw), name="rt") as j:
            b.store(comb.op(cg, b.load(total), cg.load(src, cg.iadd(ioff, j))), total)
        cg.store(comb.op(cg, cg.load(dst, ooff), b.load(total)), dst, ooff)
    else:
        with cg.loop(full, name="kv") as v:
            j = cg.imul(v, vw)
            cur = cg.load(dst, cg.iadd(ooff, j), n=vw)
            cg.store(comb.op(cg, cur, cg.load(src, cg.iadd(ioff, j), n=vw)), dst, cg.iadd(ooff, j))
        with cg.loop(n, start=cg.imul(full, vw), name="kt") as j:
            cur = cg.load(dst, cg.iadd(ooff, j))
            cg.store(comb.op(cg, cur, cg.load(src, cg.iadd(ioff, j))), dst, cg.iadd(ooff, j))


def count(b, shape, axes) -> object:
    """The number of elements over `axes` of `shape`, as a float scalar value."""
    n = None
    static = 1
    for k in axes:
        d = shape[k]
        if isinstance(d, int):
            static *= d
        else:
            v = b.dim(dim=d)
            n = v if n is None else n * v
    if n is None:
        return b.const(float(static))
    return n * float(static) if static != 1 else n
