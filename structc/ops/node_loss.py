"""Losses over some rows only: node classification trains on labelled nodes.

    cross_entropy_rows(z, y)[r] = log Σ_c e^{z_rc} - z_{r,y_r}      (one loss per row)
    masked_cross_entropy(z, y, m) = Σ_r m_r ce_r / Σ_r m_r          (m: 1 for rows that count)

The per-row loss keeps the softmax fused and stable, as `cross_entropy` does;
its gradient is (softmax(z) - onehot(y)) scaled by each row's incoming gradient.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..types import TensorType
from .base import Op, Sample, surface
from .loss import _check_classes, _each_vector, _row_stats


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _onehot(y, like):
    out = np.zeros_like(like)
    np.put_along_axis(out, y[..., None].astype(np.int64), 1.0, axis=-1)
    return out


def _label(cg, lab, r, ydt):
    from ..lower.codegen import I64
    label = cg.load(lab, r, t=ir.IntType(32 if ydt == "i32" else 64))
    return cg.b.sext(label, I64) if ydt == "i32" else label


class CrossEntropyRows(Op):
    """-log softmax(z)[y] for each row of logits z [rows, classes]."""
    name = "cross_entropy_rows"

    def shape(self, z, y) -> TensorType:
        _check_classes(z, y)
        return TensorType(tuple(z.shape[:-1]), "f32")

    def vjp(self, b, g, out, z, y):
        return [b.cross_entropy_rows_grad(z, y, g), None]

    def reference(self, z, y):
        m = z.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(axis=-1)) + m[..., 0]
        return lse - np.take_along_axis(z, y[..., None].astype(np.int64), axis=-1)[..., 0]

    def samples(self):
        return [Sample(((5, 7), ((5,), ("classes", 7)))), Sample(((3, 40), ((3,), ("classes", 40))))]

    def lower(self, kb, node, epilogue):
        z, y = node.inputs
        rows_d, c_d = kb.graph.nodes[z].shape[:-1], kb.graph.nodes[z].shape[-1]
        ydt = kb.graph.nodes[y].type.dtype
        vw = kb.vector_width
        with kb.kernel(f"xentrows{node.id}", lambda cg: cg.numel(rows_d),
                       cost=lambda cg: cg.imul(cg.dim(c_d), 20)) as (cg, lo, hi):
            c = cg.dim(c_d)
            src, lab, dst = cg.ptr(z), cg.ptr(y), cg.ptr(node.id)
            with cg.loop(hi, start=lo, name="row") as r:
                off = cg.imul(r, c)
                m, s, *_ = _row_stats(cg, src, off, c, vw)
                picked = cg.load(src, cg.iadd(off, _label(cg, lab, r, ydt)))
                cg.store(cg.sub(cg.add(m, cg.log(s)), picked), dst, r)


class CrossEntropyRowsGrad(Op):
    """(softmax(z) - onehot(y)) * g[r]: the delta of cross_entropy_rows."""
    name = "cross_entropy_rows_grad"

    def shape(self, z, y, g) -> TensorType:
        _check_classes(z, y)
        from .base import expect
        expect(tuple(g.shape) == tuple(z.shape[:-1]), f"one incoming gradient per row of {z}, got {g}")
        return z

    def vjp(self, b, u, out, z, y, g):
        s = b.softmax(z)
        last = len(z.shape) - 1
        gcol = b.reshape(g, shape=tuple(g.shape) + (1,))
        w = u * gcol
        dz = s * (w - b.sum(w * s, axes=(last,), keepdims=True))
        ones = b.broadcast_to(b.const(1.0), shape=tuple(g.shape))
        dg = b.sum(u * b.cross_entropy_rows_grad(z, y, ones), axes=(last,))
        return [dz, None, dg]

    def reference(self, z, y, g):
        p = _softmax(z)
        return (p - _onehot(y, p)) * g[..., None]

    def samples(self):
        return [Sample(((5, 7), ((5,), ("classes", 7)), (5,))), Sample(((2, 19), ((2,), ("classes", 19)), (2,)))]

    def lower(self, kb, node, epilogue):
        z, y, g = node.inputs
        rows_d, c_d = kb.graph.nodes[z].shape[:-1], kb.graph.nodes[z].shape[-1]
        ydt = kb.graph.nodes[y].type.dtype
        vw = kb.vector_width
        with kb.kernel(f"xentrowsgrad{node.id}", lambda cg: cg.numel(rows_d),
                       cost=lambda cg: cg.imul(cg.dim(c_d), 20)) as (cg, lo, hi):
            c = cg.dim(c_d)
            src, lab, gp, dst = cg.ptr(z), cg.ptr(y), cg.ptr(g), cg.ptr(node.id)
            with cg.loop(hi, start=lo, name="row") as r:
                off = cg.imul(r, c)
                m, s, *_ = _row_stats(cg, src, off, c, vw)
                gr = cg.load(gp, r)
                k = cg.splat(cg.div(gr, s), vw)
                ms = cg.splat(m, vw)

                def body(j, mask):
                    x = cg.load(src, cg.iadd(off, j), n=vw, mask=mask)
                    cg.store(cg.mul(cg.exp(cg.sub(x, ms)), k), dst, cg.iadd(off, j), mask=mask)
                _each_vector(cg, c, vw, body)
                at = cg.iadd(off, _label(cg, lab, r, ydt))
                cg.store(cg.sub(cg.load(dst, at), gr), dst, at)


@surface("masked_cross_entropy")
def masked_cross_entropy(ctx, logits, labels, mask):
    """masked_cross_entropy(z, y, mask): mean cross-entropy over the rows where mask is 1
    (mask: f32[rows], weights in general: Σ mask·loss / Σ mask)."""
    ctx.expect_tensor(logits, "masked_cross_entropy")
    ctx.expect_tensor(labels, "masked_cross_entropy")
    ctx.expect_tensor(mask, "masked_cross_entropy")
    per_row = ctx.checked(lambda: ctx.b.cross_entropy_rows(logits, labels))
    if tuple(mask.shape) != tuple(per_row.shape) or not mask.type.is_float:
        ctx.fail(f"masked_cross_entropy: the mask must be f32[{', '.join(map(str, per_row.shape))}] "
                 f"(one weight per row), got {mask.type}")
    b = ctx.b
    axes = tuple(range(len(per_row.shape)))
    total = b.sum(per_row * mask, axes=axes)
    return total / b.maximum(b.sum(mask, axes=axes), 1e-12)
