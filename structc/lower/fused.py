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
from .codegen import CG, DTYPE_IR, F32, lanes


class FusedExpr:
    def __init__(self, graph, group, coalesce: bool = True):
        self.graph = graph
        self.members = list(group.members)
        self.member_set = set(self.members)
        self.outputs = list(group.outputs)
        self.anchor = group.anchor
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
        ext = self.extents(cg)
        off = cg.i64(0)
        stride = cg.i64(1)
        for c in reversed(range(len(self.axes))):
            if varying[c]:
                off = cg.iadd(off, cg.imul(idx[c], stride))
                stride = cg.imul(stride, ext[c])
        return off

    def load_leaf(self, cg: CG, leaf: int, idx, n: int, mask):
        node = self.graph.nodes[leaf]
        t = DTYPE_IR[node.type.dtype]
        vary = self.varying[leaf]
        base = cg.ptr(leaf)
        off = self._offset(cg, idx, vary)
        if vary[-1]:
            v = cg.load(base, off, t, n, mask)
        else:
            v = cg.splat(cg.load(base, off, t), n)
        return cg.to_float(v) if t != F32 else v

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
                        args.append(vals[i])
                    elif self._inline(i):
                        inl = self.graph.nodes[self._source(i)]
                        args.append(cg.splat(inl.op.emit(cg, **inl.attrs), n))
                    else:
                        if i not in leaves:
                            leaves[i] = self.load_leaf(cg, i, idx, n, mask)
                        args.append(leaves[i])
                v = node.op.emit(cg, *args, **node.attrs)
                if lanes(v.type) != n:
                    v = cg.splat(v, n)
                vals[m] = v
            if m in self.outputs:
                self.store(cg, m, vals[m], idx, n, mask)
        return vals


def emit_elementwise_kernel(kb, graph, group) -> None:
    """A loop over the coalesced space: outer axes as rows split across
    threads, the innermost axis in vectors with a masked tail."""
    expr = FusedExpr(graph, group)
    vw = kb.vector_width
    inner_chunk = 1 << 14

    if len(expr.axes) == 1:
        # One flat axis: split it into chunks so both cores get work.
        def tasks(cg):
            return cg.ceil_div(expr.extents(cg)[0], inner_chunk)

        with kb.kernel(f"ew{group.id}", tasks, cost=inner_chunk) as (cg, lo, hi):
            n = expr.extents(cg)[0]
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

    with kb.kernel(f"ew{group.id}", tasks, cost=cost) as (cg, lo, hi):
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
