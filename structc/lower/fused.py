"""Emit a group's elementwise work at one position of its iteration space.

A `FusedExpr` is what fusion buys: the members of a group computed in
registers from their leaves (buffers read with numpy broadcasting, constants
inlined), storing only the group's outputs. The same code runs in a plain
loop (`emit_elementwise_kernel`) and as the epilogue of a matmul tile, where
the anchor's value arrives in registers instead of from memory.

The iteration space is the anchor's shape with adjacent axes coalesced when
every leaf broadcasts them alike, so `[N, 256] + [256]` runs as two loops and
`[N, 256] * [N, 256]` as one.
"""
from __future__ import annotations

from ..types import broadcast_strides
from .codegen import CG, DTYPE_IR, F32, elem, lanes


#: upper bound on the tasks of a kernel that fuses a reduction: each task
#: writes its partial sum to its own slot, summed in order afterwards, so
#: the result is the same whatever thread ran which task
MAX_REDUCTION_TASKS = 64


class FusedExpr:
    def __init__(self, graph, group, coalesce: bool = True):
        self.graph = graph
        self.reductions = list(group.reductions)
        self.members = [m for m in group.members if m not in self.reductions]
        self.member_set = set(self.members)
        self.outputs = [m for m in group.outputs if m not in self.reductions]
        self.anchor = group.anchor
        self._acc: dict[int, object] = {}
        self.shape = tuple(graph.nodes[group.anchor].shape)
        self.leaves = []
        for m in self.members:
            for i in graph.nodes[m].inputs:
                if i not in self.member_set and i not in self.leaves and not self._inline(i):
                    self.leaves.append(i)
        varying = {leaf: broadcast_strides(graph.nodes[leaf].shape, self.shape) for leaf in self.leaves}
        self.axes = self._coalesce(varying) if coalesce else [[a] for a in range(len(self.shape))]
        if not self.axes:
            self.axes = [[]]
        self.varying = {leaf: [all(v[a] for a in ax) if ax else False for ax in self.axes]
                        for leaf, v in varying.items()}

    def _source(self, nid: int) -> int:
        """The node a value is read from, looking through views."""
        while "view" in self.graph.nodes[nid].op.traits:
            nid = self.graph.nodes[nid].inputs[0]
        return nid

    def _inline(self, nid: int) -> bool:
        return "inline" in self.graph.nodes[self._source(nid)].op.traits

    def _coalesce(self, varying) -> list[list[int]]:
        axes: list[list[int]] = []
        for a in range(len(self.shape)):
            if axes and all(v[a] == v[axes[-1][-1]] for v in varying.values()):
                axes[-1].append(a)
            else:
                axes.append([a])
        return axes

    def extents(self, cg: CG) -> list:
        """Runtime extent of each coalesced axis."""
        return [cg.numel([self.shape[a] for a in ax]) for ax in self.axes]

    def _offset(self, cg: CG, idx, varying):
        """Linear element offset of a position in a buffer varying along the marked axes."""
        off = cg.i64(0)
        stride = cg.i64(1)
        for c in reversed(range(len(self.axes))):
            if varying[c]:
                off = cg.iadd(off, cg.imul(idx[c], stride))
                if any(varying[:c]):    # no stride past the outermost axis it varies along
                    stride = cg.imul(stride, cg.numel([self.shape[a] for a in self.axes[c]]))
        return off

    def load_leaf(self, cg: CG, leaf: int, idx, n: int, mask):
        """The leaf's elements as they are stored (integers stay integers)."""
        node = self.graph.nodes[leaf]
        t = DTYPE_IR[node.type.dtype]
        vary = self.varying[leaf]
        base = cg.ptr(leaf)
        off = self._offset(cg, idx, vary)
        if vary[-1]:
            return cg.load(base, off, t, n, mask)
        return cg.splat(cg.load(base, off, t), n)

    def position(self, cg: CG, nid: int, idx):
        """The flat position in `nid`'s own tensor of the element at `idx` (the
        first lane; the others follow along the last axis). Members share the
        anchor's shape (`fuse` groups only such), so it is the anchor's offset."""
        assert tuple(self.graph.nodes[nid].shape) == self.shape, "an indexed op fused at another shape"
        return self._offset(cg, idx, [True] * len(self.axes))

    def store(self, cg: CG, nid: int, value, idx, n: int, mask):
        off = self._offset(cg, idx, [True] * len(self.axes))
        cg.store(value, cg.ptr(nid), off, mask=mask)

    def emit(self, cg: CG, idx, n: int, mask=None, given: dict | None = None) -> dict:
        """Compute every member at `idx` (the last axis spans `n` lanes, some
        maybe masked off), store the outputs, and return the values."""
        vals = dict(given or {})
        leaves: dict[int, object] = {}
        for m in self.members:
            if m not in vals:
                node = self.graph.nodes[m]
                args = []
                for i in node.inputs:
                    if i in vals:
                        a = vals[i]
                    elif self._inline(i):
                        inl = self.graph.nodes[self._source(i)]
                        a = cg.splat(inl.op.emit(cg, **inl.attrs), n)
                    else:
                        if i not in leaves:
                            leaves[i] = self.load_leaf(cg, i, idx, n, mask)
                        a = leaves[i]
                    # Arithmetic is in float32; data movement of integers (a copy,
                    # a broadcast) keeps their bits, exact beyond 2**24.
                    moves_ints = "moves_data" in node.op.traits and not node.type.is_float
                    args.append(a if moves_ints or elem(a.type) == F32 else cg.to_float(a))
                if "indexed" in node.op.traits:     # its values depend on where they are (dropout)
                    v = node.op.emit(cg, *args, index=self.position(cg, m, idx), **node.attrs)
                else:
                    v = node.op.emit(cg, *args, **node.attrs)
                if lanes(v.type) != n:
                    v = cg.splat(v, n)
                vals[m] = v
            if m in self.outputs:
                self.store(cg, m, vals[m], idx, n, mask)
        for r in self.reductions:
            v = vals[self.graph.nodes[r].inputs[0]]
            if mask is not None:
                v = cg.select(mask, v, cg.const(0.0, v))
            acc = self._acc[r]
            cg.b.store(cg.add(cg.b.load(acc), v), acc)
        return vals

    # -- fused reductions: per-task partial sums --------------------------
    def begin_task(self, cg: CG, n: int) -> None:
        from llvmlite import ir
        for r in self.reductions:
            vt = ir.VectorType(F32, n)
            self._acc[r] = cg.var(vt, cg.const(0.0, vt))

    def end_task(self, cg: CG, task) -> None:
        for r in self.reductions:
            total = cg.hsum(cg.b.load(self._acc[r]))
            cg.store(total, cg.partials(r), task)

    def finalize(self, cg: CG, tasks) -> None:
        """In the entry function, after the kernel: each sum in task order."""
        for r in self.reductions:
            total = cg.var(F32, cg.const(0.0, F32))
            with cg.loop(tasks, name="partial") as t:
                cg.b.store(cg.add(cg.b.load(total), cg.load(cg.partials(r), t)), total)
            cg.store(cg.b.load(total), cg.ptr(r), cg.i64(0))


def emit_elementwise_kernel(kb, graph, group) -> None:
    """A loop over the coalesced space: outer axes as rows split across
    threads, the innermost axis in vectors with a masked tail."""
    from .module import run_time_numel
    expr = FusedExpr(graph, group)
    if expr.reductions:
        _reducing_kernel(kb, expr)
        return
    vw = kb.vector_width
    inner_chunk = 1 << 14

    if len(expr.axes) == 1:
        # One flat axis: split it into chunks so both cores get work.
        def tasks(cg):
            return cg.ceil_div(expr.extents(cg)[0], inner_chunk)

        with kb.kernel(f"ew{group.id}", tasks, cost=inner_chunk, skippable=True) as (cg, lo, hi):
            if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
                return
            # the size's constant factor is read at run time: the flat loop's text is then the
            # same for every size (batch norm's maths at 6 and 16 channels is one kernel, and an
            # edit of a layer's width leaves its elementwise kernels compiled)
            n = run_time_numel(cg, [expr.shape[a] for a in expr.axes[0]])
            with cg.loop(hi, start=lo, name="chunk") as c:
                start = cg.imul(c, inner_chunk)
                stop = cg.imin(cg.iadd(start, inner_chunk), n)
                _vector_row(cg, expr, [], start, stop, vw)
        return

    def tasks(cg):
        ext = expr.extents(cg)
        rows = cg.i64(1)
        for e in ext[:-1]:
            rows = cg.imul(rows, e)
        return rows

    def cost(cg):
        return expr.extents(cg)[-1]

    with kb.kernel(f"ew{group.id}", tasks, cost=cost, skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        ext = expr.extents(cg)
        with cg.loop(hi, start=lo, name="row") as r:
            outer = []
            rem = r
            for e in reversed(ext[:-1]):
                outer.append(cg.b.srem(rem, e))
                rem = cg.b.sdiv(rem, e)
            outer.reverse()
            _vector_row(cg, expr, outer, cg.i64(0), ext[-1], vw)


def _vector_row(cg: CG, expr: FusedExpr, outer, start, stop, vw: int) -> None:
    """Elements [start, stop) of the innermost axis: full vectors, then one masked."""
    b = cg.b
    count = b.sub(stop, start)
    full = b.sdiv(count, cg.i64(vw))
    with cg.loop(full, name="v") as v:
        j = cg.iadd(start, cg.imul(v, vw))
        expr.emit(cg, outer + [j], vw)
    tail = b.sub(count, cg.imul(full, vw))
    with cg.if_(b.icmp_signed(">", tail, cg.i64(0))):
        j = cg.iadd(start, cg.imul(full, vw))
        expr.emit(cg, outer + [j], vw, mask=cg.lane_mask(tail, vw))


def _reducing_kernel(kb, expr: FusedExpr) -> None:
    """The elementwise loop with fused sums: the space, flattened to rows of
    its innermost axis, is cut into at most MAX_REDUCTION_TASKS tasks of
    whole rows; each task leaves its partial sums in its own slot."""
    vw = kb.vector_width

    def rows_and_tasks(cg):
        ext = expr.extents(cg)
        rows = cg.i64(1)
        for e in ext[:-1]:
            rows = cg.imul(rows, e)
        return ext, rows, cg.imin(rows, cg.i64(MAX_REDUCTION_TASKS))

    def tasks(cg):
        return rows_and_tasks(cg)[2]

    def cost(cg):
        ext, rows, t = rows_and_tasks(cg)
        return cg.b.sdiv(cg.imul(rows, ext[-1]), t)

    with kb.kernel(f"ewsum{expr.anchor}", tasks, cost=cost) as (cg, lo, hi):
        b = cg.b
        ext, rows, ntasks = rows_and_tasks(cg)
        with cg.loop(hi, start=lo, name="task") as t:
            expr.begin_task(cg, vw)
            first = b.sdiv(cg.imul(t, rows), ntasks)
            last = b.sdiv(cg.imul(cg.iadd(t, 1), rows), ntasks)
            with cg.loop(last, start=first, name="row") as r:
                outer, rem = [], r
                for e in reversed(ext[:-1]):
                    outer.append(b.srem(rem, e))
                    rem = b.sdiv(rem, e)
                outer.reverse()
                _vector_row(cg, expr, outer, cg.i64(0), ext[-1], vw)
            expr.end_task(cg, t)
    kb.after_kernel(lambda e: expr.finalize(e, rows_and_tasks(e)[2]))
