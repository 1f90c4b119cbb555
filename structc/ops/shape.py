"""Ops that move data without arithmetic: reshape (a view), copy, concat, slice."""
from __future__ import annotations

import numpy as np

from ..types import Size, TensorType
from .base import Elementwise, Op, Sample, data_sizes, expect


class Reshape(Op):
    """The same elements under another row-major shape; no data moves."""
    name = "reshape"
    traits = frozenset({"view", "needs_dims"})

    def shape(self, x, *, shape) -> TensorType:
        shape = tuple(shape)
        expect(Size.of(shape) == Size.of(x.shape),
               f"cannot reshape {x} to [{', '.join(map(str, shape))}]: sizes differ")
        return TensorType(shape, x.dtype)

    def vjp(self, b, g, out, x, *, shape):
        return [b.reshape(g, shape=x.shape)]

    def pooled_dims(self, graph, node) -> set:
        """A reshape that keeps the rows (the same data sizes, the first axis first)
        keeps each row's values in its row; another may mix rows."""
        x, y = graph.nodes[node.inputs[0]].shape, node.shape
        sizes = data_sizes(x)
        keeps = sizes == data_sizes(y) and (not sizes or (x[:1] == y[:1] and not data_sizes(x[1:])))
        return set() if keeps else sizes

    def reference(self, x, *, shape, dims=None):
        return x.reshape(tuple(d if isinstance(d, int) else dims[d] for d in shape))

    def samples(self):
        return [Sample(((3, 4),), {"shape": (4, 3)}), Sample(((2, 3, 4),), {"shape": (24,)})]


class Copy(Elementwise):
    """x, stored again (outputs that would otherwise alias another buffer)."""
    name = "copy"
    traits = frozenset({"elementwise", "moves_data"})

    def vjp(self, b, g, out, x):
        return [g]

    def reference(self, x):
        return x.copy()

    def emit(self, cg, x):
        return x


def _axis(axis: int, rank: int) -> int:
    expect(-rank <= axis < rank, f"axis {axis} is out of range for rank {rank}")
    return axis % rank


class Concat(Op):
    """Tensors joined along `axis`."""
    name = "concat"
    traits = frozenset({"moves_data"})      # its values are its operands': row ids stay ids
    surface = True

    def shape(self, *xs, axis: int = -1) -> TensorType:
        expect(len(xs) >= 1, "concat needs at least one tensor")
        # the kernel copies elements as they are: an i32 joined to floats would keep its bits
        expect(all(x.dtype == xs[0].dtype for x in xs), "operands of different dtypes, "
               + ", ".join(map(str, xs)) + " (integers in arithmetic become f32: `k + 0.0`)")
        rank = xs[0].rank
        expect(all(x.rank == rank for x in xs), "concat needs tensors of one rank, got "
               + ", ".join(map(str, xs)))
        ax = _axis(axis, rank)
        total = 0
        for x in xs:
            expect(all(x.shape[k] == xs[0].shape[k] for k in range(rank) if k != ax),
                   "concat: shapes differ off the joined axis: " + ", ".join(map(str, xs)))
            expect(isinstance(x.shape[ax], int), f"concat along a symbolic axis ({x}) is not supported")
            total += x.shape[ax]
        shape = list(xs[0].shape)
        shape[ax] = total
        return TensorType(tuple(shape), xs[0].dtype)

    def vjp(self, b, g, out, *xs, axis=-1):
        ax = _axis(axis, len(out.shape))
        grads, start = [], 0
        for x in xs:
            stop = start + x.shape[ax]
            grads.append(b.slice(g, axis=ax, start=start, stop=stop))
            start = stop
        return grads

    def reference(self, *xs, axis=-1):
        return np.concatenate(xs, axis=axis)

    def samples(self):
        return [Sample(((3, 2), (3, 19)), {"axis": 1}), Sample(((2, 3), (4, 3), (1, 3)), {"axis": 0}),
                Sample(((2, 3, 2), (2, 1, 2)), {"axis": 1})]

    def lower(self, kb, node, epilogue):
        ax = _axis(node.attrs.get("axis", -1), node.type.rank)
        start = 0
        for k, i in enumerate(node.inputs):      # by position: an operand may repeat
            width = kb.graph.nodes[i].shape[ax]
            _copy_block(kb, f"concat{node.id}_{k}", src=i, dst=node.id, shape=node.shape, axis=ax,
                        src_start=0, dst_start=start, width=width, src_axis_len=width,
                        dst_axis_len=node.shape[ax])
            start += width


class Slice(Op):
    """x[..., start:stop, ...] along `axis`."""
    name = "slice"
    traits = frozenset({"moves_data"})

    def shape(self, x, *, axis: int, start: int, stop: int) -> TensorType:
        ax = _axis(axis, x.rank)
        expect(isinstance(x.shape[ax], int) and 0 <= start < stop <= x.shape[ax],
               f"slice [{start}:{stop}] out of range for axis {ax} of {x}")
        shape = list(x.shape)
        shape[ax] = stop - start
        return TensorType(tuple(shape), x.dtype)

    def vjp(self, b, g, out, x, *, axis, start, stop):
        ax = _axis(axis, len(x.shape))
        parts = []
        if start > 0:
            parts.append(b.broadcast_to(b.const(0.0), shape=_with(x.shape, ax, start)))
        parts.append(g)
        if stop < x.shape[ax]:
            parts.append(b.broadcast_to(b.const(0.0), shape=_with(x.shape, ax, x.shape[ax] - stop)))
        return [parts[0] if len(parts) == 1 else b.concat(*parts, axis=ax)]

    def reference(self, x, *, axis, start, stop):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, stop)
        return x[tuple(idx)].copy()

    def samples(self):
        return [Sample(((3, 8),), {"axis": 1, "start": 2, "stop": 5}),
                Sample(((6, 3),), {"axis": 0, "start": 0, "stop": 4}),
                Sample(((2, 5, 3),), {"axis": 1, "start": 1, "stop": 5})]

    def lower(self, kb, node, epilogue):
        ax = _axis(node.attrs["axis"], node.type.rank)
        src_shape = kb.graph.nodes[node.inputs[0]].shape
        _copy_block(kb, f"slice{node.id}", src=node.inputs[0], dst=node.id, shape=node.shape, axis=ax,
                    src_start=node.attrs["start"], dst_start=0, width=node.shape[ax],
                    src_axis_len=src_shape[ax], dst_axis_len=node.shape[ax])


def _with(shape, axis, value):
    s = list(shape)
    s[axis] = value
    return tuple(s)


def _copy_block(kb, name, *, src, dst, shape, axis, src_start, dst_start, width, src_axis_len, dst_axis_len):
    """Copy a [outer, width * inner] block between two row-major buffers."""
    outer_dims, inner_dims = shape[:axis], shape[axis + 1:]
    vw = kb.vector_width

    def tasks(cg):
        return cg.numel(outer_dims)

    with kb.kernel(name, tasks, cost=lambda cg: cg.imul(cg.numel(inner_dims), width)) as (cg, lo, hi):
        inner = cg.numel(inner_dims)
        row = cg.imul(inner, width)
        s, d = cg.ptr(src), cg.ptr(dst)
        with cg.loop(hi, start=lo, name="o") as o:
            s0 = cg.iadd(cg.imul(o, cg.imul(inner, src_axis_len)), cg.imul(inner, src_start))
            d0 = cg.iadd(cg.imul(o, cg.imul(inner, dst_axis_len)), cg.imul(inner, dst_start))
            full = cg.b.sdiv(row, cg.i64(vw))
            with cg.loop(full, name="v") as v:
                j = cg.imul(v, vw)
                cg.store(cg.load(s, cg.iadd(s0, j), n=vw), d, cg.iadd(d0, j))
            with cg.loop(row, start=cg.imul(full, vw), name="t") as j:
                cg.store(cg.load(s, cg.iadd(s0, j)), d, cg.iadd(d0, j))
