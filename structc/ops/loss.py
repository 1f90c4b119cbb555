"""softmax and the losses.

cross_entropy takes logits and integer classes, with the softmax fused and
computed stably (log-sum-exp around the row maximum):

    loss = mean_n( log Σ_c e^{z_nc} - z_{n,y_n} ),   ∂loss/∂z = (softmax(z) - onehot(y)) / N

binary_cross_entropy takes logits too (the sigmoid fused), mse predictions.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..types import TensorType
from .base import Op, Sample, data_sizes, expect
from .reduce import count


def _row_stats(cg, src, off, n, vw):
    """max_c x[off + c] and Σ_c e^{x - max} over one row of n floats."""
    from ..lower.codegen import F32
    b = cg.b
    vt = ir.VectorType(F32, vw)
    ninf = cg.const(float("-inf"), vt)
    full = b.sdiv(n, cg.i64(vw))
    tail = b.sub(n, cg.imul(full, vw))
    mask = cg.lane_mask(tail, vw)

    mx = cg.var(vt, ninf)
    with cg.loop(full, name="mx") as v:
        b.store(cg.max(b.load(mx), cg.load(src, cg.iadd(off, cg.imul(v, vw)), n=vw)), mx)
    last = cg.select(mask, cg.load(src, cg.iadd(off, cg.imul(full, vw)), n=vw, mask=mask), ninf)
    m = cg.hmax(cg.max(b.load(mx), last))
    msplat = cg.splat(m, vw)

    sm = cg.var(vt, cg.const(0.0, vt))
    with cg.loop(full, name="se") as v:
        e = cg.exp_nonpositive(cg.sub(cg.load(src, cg.iadd(off, cg.imul(v, vw)), n=vw), msplat))
        b.store(cg.add(b.load(sm), e), sm)
    e = cg.exp_nonpositive(cg.sub(cg.load(src, cg.iadd(off, cg.imul(full, vw)), n=vw, mask=mask), msplat))
    s = cg.hsum(cg.add(b.load(sm), cg.select(mask, e, cg.const(0.0, vt))))
    return m, s, full, tail, mask


def _each_vector(cg, n, vw, body):
    """body(j, mask) over [0, n) in vectors, the last one masked."""
    b = cg.b
    full = b.sdiv(n, cg.i64(vw))
    with cg.loop(full, name="ev") as v:
        body(cg.imul(v, vw), None)
    tail = b.sub(n, cg.imul(full, vw))
    with cg.if_(b.icmp_signed(">", tail, cg.i64(0))):
        body(cg.imul(full, vw), cg.lane_mask(tail, vw))


def _rows_and_classes(kb, z):
    shape = kb.graph.nodes[z].shape
    return shape[:-1], shape[-1]


class Softmax(Op):
    """e^{x_i} / Σ_j e^{x_j} along the last axis."""
    name = "softmax"
    floats_only = True
    surface = True

    def shape(self, x) -> TensorType:
        expect(x.rank >= 1, "softmax needs at least one dimension")
        return x

    def vjp(self, b, g, out, x):
        s = b.sum(g * out, axes=(len(x.shape) - 1,), keepdims=True)
        return [out * (g - s)]

    def reference(self, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def pooled_dims(self, graph, node) -> set:
        return data_sizes(graph.nodes[node.inputs[0]].shape[-1:])

    def samples(self):
        return [Sample(((4, 7),)), Sample(((3, 37),)), Sample(((2, 3, 5),))]

    def lower(self, kb, node, epilogue):
        rows_d, c_d = _rows_and_classes(kb, node.inputs[0])
        vw = kb.vector_width
        with kb.kernel(f"softmax{node.id}", lambda cg: cg.numel(rows_d),
                       cost=lambda cg: cg.imul(cg.dim(c_d), 20)) as (cg, lo, hi):
            c = cg.dim(c_d)
            src, dst = cg.ptr(node.inputs[0]), cg.ptr(node.id)
            with cg.loop(hi, start=lo, name="row") as r:
                off = cg.imul(r, c)
                m, s, *_ = _row_stats(cg, src, off, c, vw)
                inv = cg.splat(cg.div(cg.const(1.0, s), s), vw)
                ms = cg.splat(m, vw)

                def body(j, mask):
                    x = cg.load(src, cg.iadd(off, j), n=vw, mask=mask)
                    cg.store(cg.mul(cg.exp_nonpositive(cg.sub(x, ms)), inv), dst, cg.iadd(off, j), mask=mask)
                _each_vector(cg, c, vw, body)


def _check_classes(z, y):
    expect(z.rank >= 2, f"cross_entropy needs logits [batch, classes], got {z}")
    expect(y.dtype in ("i32", "i64"), f"cross_entropy needs integer class labels, got {y}")
    expect(tuple(y.shape) == tuple(z.shape[:-1]),
           f"labels {y} do not match logits {z}: expected one class per row")


def declared_classes(labels) -> int:
    """The class count labels were declared with (`class[N] of C`, a forest's
    `word(vocab=C)`), or 0 when they come from anywhere else."""
    node = labels.node
    return node.attrs.get("classes", 0) if node.op.name == "input" else 0


def check_labels(ctx, logits, labels) -> None:
    """Labels index the logits' last axis, so their declared count must be that
    axis's length: a label past it would read another row's logit (or past the
    buffer), one short of it would leave logits that no label can pick."""
    classes, width = declared_classes(labels), logits.shape[-1]
    if not classes:
        ctx.fail(f"{ctx.fname}: the labels {labels.type} do not say how many classes there are; "
                 f"declare them as `target y: class[...] of {width}` so every label is checked")
    if not isinstance(width, int):
        ctx.fail(f"{ctx.fname}: the logits {logits.type} have a symbolic class axis '{width}', but the labels "
                 f"have {classes} classes: the logits need {classes} columns, a number")
    if width != classes:
        ctx.fail(f"{ctx.fname}: {width} logits per row but {classes} classes in the labels "
                 f"(class[...] of {classes}); the layer that makes the logits needs {classes} outputs")


class CrossEntropy(Op):
    """mean over rows of -log softmax(z)[y]; z are logits, y integer classes."""
    name = "cross_entropy"
    surface = True

    def shape(self, z, y) -> TensorType:
        _check_classes(z, y)
        return TensorType((), "f32")

    def check_values(self, ctx, z, y) -> None:
        check_labels(ctx, z, y)

    def vjp(self, b, g, out, z, y):
        return [b.softmax_ce_grad(z, y, g), None]

    def pooled_dims(self, graph, node) -> set:
        return data_sizes(graph.nodes[node.inputs[0]].shape[:-1])      # a mean over the rows

    def reference(self, z, y):
        m = z.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(axis=-1)) + m[..., 0]
        picked = np.take_along_axis(z, y[..., None].astype(np.int64), axis=-1)[..., 0]
        return np.mean(lse - picked)

    def samples(self):
        return [Sample(((5, 7), ((5,), ("classes", 7)))), Sample(((3, 40), ((3,), ("classes", 40)))),
                Sample(((37, 4), ((37,), ("classes", 4))))]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32, I64
        z, y = node.inputs
        rows_d, c_d = _rows_and_classes(kb, z)
        ydt = kb.graph.nodes[y].type.dtype
        vw = kb.vector_width
        from .node_loss import emit_xent_rows_blocked, small_classes
        if small_classes(kb.graph.nodes[z].shape):     # a few classes: vw rows at a time
            return emit_xent_rows_blocked(kb, f"xent{node.id}", z, y, None, rows_d[0], c_d, ydt, mean_into=node.id)
        with kb.kernel(f"xent{node.id}", 1, cost=1) as (cg, lo, hi):
            b = cg.b
            rows, c = cg.numel(rows_d), cg.dim(c_d)
            src, lab, dst = cg.ptr(z), cg.ptr(y), cg.ptr(node.id)
            total = cg.var(F32, cg.const(0.0, F32))
            with cg.loop(rows, name="row") as r:
                off = cg.imul(r, c)
                m, s, *_ = _row_stats(cg, src, off, c, vw)
                label = cg.load(lab, r, t=ir.IntType(32 if ydt == "i32" else 64))
                if ydt == "i32":
                    label = b.sext(label, I64)
                picked = cg.load(src, cg.iadd(off, label))
                b.store(cg.add(b.load(total), cg.sub(cg.add(m, cg.log(s)), picked)), total)
            cg.store(cg.div(b.load(total), b.sitofp(rows, F32)), dst, cg.i64(0))


class SoftmaxCrossEntropyGrad(Op):
    """(softmax(z) - onehot(y)) * g / rows: the delta of cross_entropy."""
    name = "softmax_ce_grad"

    def shape(self, z, y, g) -> TensorType:
        _check_classes(z, y)
        expect(g.rank == 0, f"the incoming gradient of a loss is a scalar, got {g}")
        return z

    def vjp(self, b, u, out, z, y, g):
        """Second order, through z only: (g/rows) * J_softmax(z)^T u."""
        s = b.softmax(z)
        rows = count(b, z.shape, range(len(z.shape) - 1))
        w = u * (g / rows)
        return [s * (w - b.sum(w * s, axes=(len(z.shape) - 1,), keepdims=True)), None, None]

    def reference(self, z, y, g):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        onehot = np.zeros_like(p)
        np.put_along_axis(onehot, y[..., None].astype(np.int64), 1.0, axis=-1)
        rows = int(np.prod(z.shape[:-1]))
        return (p - onehot) * g / rows

    def samples(self):
        return [Sample(((5, 7), ((5,), ("classes", 7)), ((), "fixed"))),
                Sample(((37, 4), ((37,), ("classes", 4)), ((), "fixed")))]

    def lower(self, kb, node, epilogue):
        from ..lower.codegen import F32, I64
        z, y, g = node.inputs
        rows_d, c_d = _rows_and_classes(kb, z)
        ydt = kb.graph.nodes[y].type.dtype
        gnode = kb.graph.nodes[g]
        vw = kb.vector_width
        from .node_loss import emit_xent_grad_blocked, small_classes
        if small_classes(kb.graph.nodes[z].shape):     # a few classes: vw rows at a time
            def scale_of(cg, r0, rem):
                gval = gnode.op.emit(cg, **gnode.attrs) if "inline" in gnode.op.traits else cg.load(cg.ptr(g), cg.i64(0))
                rows = cg.b.sitofp(cg.dim(rows_d[0]), F32)
                return cg.splat(cg.div(gval, rows), vw)
            return emit_xent_grad_blocked(kb, f"xentgrad{node.id}", z, y, node.id, rows_d[0], c_d, ydt, scale_of)
        with kb.kernel(f"xentgrad{node.id}", lambda cg: cg.numel(rows_d),
                       cost=lambda cg: cg.imul(cg.dim(c_d), 20)) as (cg, lo, hi):
            b = cg.b
            rows, c = cg.numel(rows_d), cg.dim(c_d)
            src, lab, dst = cg.ptr(z), cg.ptr(y), cg.ptr(node.id)
            if "inline" in gnode.op.traits:
                gval = gnode.op.emit(cg, **gnode.attrs)
            else:
                gval = cg.load(cg.ptr(g), cg.i64(0))
            scale = cg.div(gval, b.sitofp(rows, F32))
            with cg.loop(hi, start=lo, name="row") as r:
                off = cg.imul(r, c)
                m, s, *_ = _row_stats(cg, src, off, c, vw)
                k = cg.splat(cg.div(scale, s), vw)
                ms = cg.splat(m, vw)

                def body(j, mask):
                    x = cg.load(src, cg.iadd(off, j), n=vw, mask=mask)
                    cg.store(cg.mul(cg.exp_nonpositive(cg.sub(x, ms)), k), dst, cg.iadd(off, j), mask=mask)
                _each_vector(cg, c, vw, body)
                label = cg.load(lab, r, t=ir.IntType(32 if ydt == "i32" else 64))
                if ydt == "i32":
                    label = b.sext(label, I64)
                at = cg.iadd(off, label)
                cg.store(cg.sub(cg.load(dst, at), scale), dst, at)
