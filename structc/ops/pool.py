"""Pooling: reduce spatial resolution over windows of `size` at `stride`.

    maxpool2d(x)[n, c, i, j] = max over the window at (i·sh, j·sw)
    avgpool2d(x)[n, c, i, j] = mean over that window

Max-pooling's backward pass routes the delta to the arg-max of each
window: the VJP reads `maxpool2d_argmax(x)` (the position of each window's
first maximum within its plane, i32) and scatters the delta there with
`scatter_argmax`. The fuse pass lowers the arg-max together with the
forward `maxpool2d` of the same input (one loop nest, two stores), so the
arg-max is stored during the forward pass rather than recomputed.

`scatter_argmax` and `avgpool2d_grad` have the `epilogue` trait: the
derivative mask of the activation below a pooling layer is applied as
their planes are stored. The layers `maxpool2d`, `avgpool2d` and
`global_avg_pool` (a mean over the spatial axes) are in `layers/pool.py`.
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .base import Op, Sample, expect
from .conv import _hw, pair


def pool_shape(x: TensorType, size, stride) -> tuple[int, int]:
    H, W = _hw(x, "the input")
    kh, kw = pair(size)
    sh, sw = pair(stride)
    expect(kh >= 1 and kw >= 1 and sh >= 1 and sw >= 1, "pool size and stride must be positive")
    expect(kh <= H and kw <= W, f"window {kh}x{kw} is larger than the input {H}x{W} ({x})")
    return (H - kh) // sh + 1, (W - kw) // sw + 1


def _windows(x, size, stride):
    """[N, C, OH, OW, kh*kw] view of every window's elements, row-major."""
    kh, kw = pair(size)
    sh, sw = pair(stride)
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    parts = [x[:, :, a:a + (oh - 1) * sh + 1:sh, b:b + (ow - 1) * sw + 1:sw] for a in range(kh) for b in range(kw)]
    return np.stack(parts, axis=-1)


def _argmax_positions(x, size, stride):
    """Plane position (row * W + col) of each window's first maximum."""
    kh, kw = pair(size)
    sh, sw = pair(stride)
    win = _windows(x, size, stride)
    k = np.argmax(win, axis=-1)
    oh, ow = win.shape[2:4]
    rows = np.arange(oh)[:, None] * sh + k // kw
    cols = np.arange(ow)[None, :] * sw + k % kw
    return (rows * x.shape[3] + cols).astype(np.int32)


class MaxPool2d(Op):
    """The maximum of each window."""
    name = "maxpool2d"
    floats_only = True
    traits = frozenset({"siblings"})

    def shape(self, x, *, size=(2, 2), stride=(2, 2)) -> TensorType:
        oh, ow = pool_shape(x, size, stride)
        return TensorType((x.shape[0], x.shape[1], oh, ow), x.dtype)

    def vjp(self, b, g, out, x, *, size=(2, 2), stride=(2, 2)):
        idx = b.maxpool2d_argmax(x, size=pair(size), stride=pair(stride))
        return [b.scatter_argmax(g, idx, plane=tuple(x.shape[2:]), size=pair(size), stride=pair(stride))]

    def reference(self, x, *, size=(2, 2), stride=(2, 2)):
        return _windows(x, size, stride).max(axis=-1)

    def samples(self):
        return [Sample(((2, 3, 8, 8),)), Sample(((1, 2, 7, 9),), {"size": (3, 2), "stride": (2, 3)}),
                Sample(((2, 1, 5, 6),), {"size": (3, 3), "stride": (1, 1)}),
                # stride 2 over a row of two output vectors, overlapping windows
                Sample(((1, 2, 5, 37),), {"size": (2, 3), "stride": (1, 2)})]

    def describe(self, attrs):
        return "size=%dx%d, stride=%dx%d" % (pair(attrs.get("size", 2)) + pair(attrs.get("stride", 2)))

    def siblings(self, graph, nid):
        """The arg-max of the same input and window (the backward pass reads
        it): stored by this loop nest, during the forward pass."""
        node = graph.nodes[nid]
        key = (pair(node.attrs.get("size", 2)), pair(node.attrs.get("stride", 2)))
        return [u for u in graph.users(node.inputs[0]) if graph.nodes[u].op.name == "maxpool2d_argmax"
                and (pair(graph.nodes[u].attrs.get("size", 2)), pair(graph.nodes[u].attrs.get("stride", 2))) == key]

    def lower(self, kb, node, epilogue):
        from ..lower.pool import emit_pool
        emit_pool(kb, node, "max")


class MaxPool2dArgmax(Op):
    """Where each window's (first) maximum is: row * W + col within its plane."""
    name = "maxpool2d_argmax"
    floats_only = True

    def shape(self, x, *, size=(2, 2), stride=(2, 2)) -> TensorType:
        oh, ow = pool_shape(x, size, stride)
        return TensorType((x.shape[0], x.shape[1], oh, ow), "i32")

    def vjp(self, b, g, out, x, **attrs):
        return [None]

    def reference(self, x, *, size=(2, 2), stride=(2, 2)):
        return _argmax_positions(x, size, stride)

    def samples(self):
        return [Sample(((2, 3, 8, 8),)), Sample(((1, 2, 7, 9),), {"size": (3, 2), "stride": (2, 3)}),
                Sample(((1, 2, 5, 37),), {"size": (2, 3), "stride": (1, 2)})]

    describe = MaxPool2d.describe

    def lower(self, kb, node, epilogue):
        from ..lower.pool import emit_pool
        emit_pool(kb, node, "argmax")


class ScatterArgmax(Op):
    """dx[n, c, p] = Σ of g[n, c, i, j] over the windows whose arg-max is p:
    max-pooling's delta, routed to where each maximum came from.

    `size` and `stride`, when given, say the indices come from those windows
    (each lies in its own); if the windows do not overlap, every element of
    dx has at most one window to read from, and the kernel gathers instead of
    scattering."""
    name = "scatter_argmax"
    traits = frozenset({"epilogue"})

    def shape(self, g, idx, *, plane, size=None, stride=None) -> TensorType:
        expect(g.rank == 4 and idx.rank == 4 and tuple(g.shape) == tuple(idx.shape),
               f"scatter_argmax needs a delta and indices of one shape, got {g} and {idx}")
        expect(idx.dtype == "i32", f"indices must be i32, got {idx}")
        return TensorType((g.shape[0], g.shape[1], *plane), g.dtype)

    def vjp(self, b, h, out, g, idx, *, plane, size=None, stride=None):
        return [b.gather_argmax(h, idx), None]

    def reference(self, g, idx, *, plane, size=None, stride=None):
        n, c = g.shape[:2]
        out = np.zeros((n * c, plane[0] * plane[1]), g.dtype)
        flat_i = idx.reshape(n * c, -1).astype(np.int64)
        for r in range(n * c):
            np.add.at(out[r], flat_i[r], g.reshape(n * c, -1)[r])
        return out.reshape(n, c, *plane)

    def samples(self):
        # random positions: several windows land on one element, as with overlapping windows
        return [Sample(((2, 3, 3, 3), ((2, 3, 3, 3), ("classes", 56))), {"plane": (7, 8)}),
                Sample(((1, 2, 4, 4), ((1, 2, 4, 4), ("classes", 64))), {"plane": (8, 8)})]

    def describe(self, attrs):
        h, w = attrs["plane"]
        text = f"plane={h}x{w}"
        if attrs.get("size") is not None:
            text += ", size=%dx%d, stride=%dx%d" % (pair(attrs["size"]) + pair(attrs["stride"]))
        return text

    def lower(self, kb, node, epilogue):
        from ..lower.pool import emit_scatter
        emit_scatter(kb, node, epilogue)


class GatherArgmax(Op):
    """out[n, c, i, j] = x[n, c, idx[n, c, i, j]] (the adjoint of scatter_argmax)."""
    name = "gather_argmax"

    def shape(self, x, idx) -> TensorType:
        expect(x.rank == 4 and idx.rank == 4 and tuple(x.shape[:2]) == tuple(idx.shape[:2]),
               f"gather_argmax needs [N, C, ...] operands, got {x} and {idx}")
        return TensorType(tuple(idx.shape), x.dtype)

    def vjp(self, b, g, out, x, idx):
        return [b.scatter_argmax(g, idx, plane=tuple(x.shape[2:])), None]

    def reference(self, x, idx):
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        return np.take_along_axis(flat, idx.reshape(n, c, -1).astype(np.int64), axis=-1).reshape(idx.shape)

    def samples(self):
        return [Sample(((2, 3, 7, 8), ((2, 3, 3, 3), ("classes", 56))))]

    def lower(self, kb, node, epilogue):
        from ..lower.pool import emit_gather
        emit_gather(kb, node)


class AvgPool2d(Op):
    """The mean of each window."""
    name = "avgpool2d"
    floats_only = True

    def shape(self, x, *, size=(2, 2), stride=(2, 2)) -> TensorType:
        oh, ow = pool_shape(x, size, stride)
        return TensorType((x.shape[0], x.shape[1], oh, ow), x.dtype)

    def vjp(self, b, g, out, x, *, size=(2, 2), stride=(2, 2)):
        return [b.avgpool2d_grad(g, size=pair(size), stride=pair(stride), plane=tuple(x.shape[2:]))]

    def reference(self, x, *, size=(2, 2), stride=(2, 2)):
        return _windows(x, size, stride).mean(axis=-1)

    def samples(self):
        return [Sample(((2, 3, 8, 8),)), Sample(((1, 2, 7, 9),), {"size": (3, 2), "stride": (2, 3)}),
                Sample(((2, 1, 5, 6),), {"size": (3, 3), "stride": (1, 1)}),
                # stride 2 over a row of two output vectors, overlapping windows
                Sample(((1, 2, 5, 37),), {"size": (2, 3), "stride": (1, 2)})]

    describe = MaxPool2d.describe

    def lower(self, kb, node, epilogue):
        from ..lower.pool import emit_pool
        emit_pool(kb, node, "avg")


class AvgPool2dGrad(Op):
    """dx: each window's delta spread evenly over the window (avgpool2d's adjoint)."""
    name = "avgpool2d_grad"
    traits = frozenset({"epilogue"})

    def shape(self, g, *, size, stride, plane) -> TensorType:
        expect(g.rank == 4, f"avgpool2d_grad needs a [N, C, H, W] delta, got {g}")
        return TensorType((g.shape[0], g.shape[1], *plane), g.dtype)

    def vjp(self, b, h, out, g, *, size, stride, plane):
        return [b.avgpool2d(h, size=size, stride=stride)]

    def reference(self, g, *, size, stride, plane):
        kh, kw = pair(size)
        sh, sw = pair(stride)
        out = np.zeros((*g.shape[:2], *plane), g.dtype)
        oh, ow = g.shape[2:]
        for a in range(kh):
            for c in range(kw):
                out[:, :, a:a + (oh - 1) * sh + 1:sh, c:c + (ow - 1) * sw + 1:sw] += g / (kh * kw)
        return out

    def samples(self):
        return [Sample(((2, 3, 4, 4),), {"size": (2, 2), "stride": (2, 2), "plane": (8, 8)}),
                Sample(((1, 2, 3, 3),), {"size": (3, 2), "stride": (2, 3), "plane": (7, 9)})]

    describe = MaxPool2d.describe

    def lower(self, kb, node, epilogue):
        from ..lower.pool import emit_avg_grad
        emit_avg_grad(kb, node, epilogue)
