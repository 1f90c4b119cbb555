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
from .base import Op, Sample
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
        return [Sample(((5, 7), ((5,), ("classes", 7)))), Sample(((3, 40), ((3,), ("classes", 40)))),
                Sample(((37, 3), ((37,), ("classes", 3)))), Sample(((32, 8), ((32,), ("classes", 8))))]

    def lower(self, kb, node, epilogue):
        z, y = node.inputs
        rows_d, c_d = kb.graph.nodes[z].shape[:-1], kb.graph.nodes[z].shape[-1]
        ydt = kb.graph.nodes[y].type.dtype
        vw = kb.vector_width
        if small_classes(kb.graph.nodes[z].shape):
            return emit_xent_rows_blocked(kb, f"xentrows{node.id}", z, y, node.id, rows_d[0], c_d, ydt)
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
        return [Sample(((5, 7), ((5,), ("classes", 7)), (5,))), Sample(((2, 19), ((2,), ("classes", 19)), (2,))),
                Sample(((37, 4), ((37,), ("classes", 4)), (37,)))]

    def lower(self, kb, node, epilogue):
        z, y, g = node.inputs
        rows_d, c_d = kb.graph.nodes[z].shape[:-1], kb.graph.nodes[z].shape[-1]
        ydt = kb.graph.nodes[y].type.dtype
        vw = kb.vector_width
        if small_classes(kb.graph.nodes[z].shape):
            def scale_of(cg, r0, rem):
                return cg.load(cg.ptr(g), r0, n=vw, mask=cg.lane_mask(rem, vw))
            return emit_xent_grad_blocked(kb, f"xentrowsgrad{node.id}", z, y, node.id, rows_d[0], c_d, ydt, scale_of)
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
                    cg.store(cg.mul(cg.exp_nonpositive(cg.sub(x, ms)), k), dst, cg.iadd(off, j), mask=mask)
                _each_vector(cg, c, vw, body)
                at = cg.iadd(off, _label(cg, lab, r, ydt))
                cg.store(cg.sub(cg.load(dst, at), gr), dst, at)


# -- many rows at a time, for a few classes -----------------------------------------------
#
# With a handful of classes (a GNN's node labels), one row fills a fraction of
# a vector and the row-at-a-time kernels are bound by the latency of their
# reductions. For a static C <= SMALL_CLASSES these run `vw` rows per step
# instead: the block of vw x C logits is loaded as C vectors, regrouped into
# one vector per class (lane i = row i), and max, exp, sum and log are plain
# vector arithmetic across rows.

SMALL_CLASSES = 8


def small_classes(shape) -> bool:
    return len(shape) == 2 and isinstance(shape[1], int) and 1 <= shape[1] <= SMALL_CLASSES


def _pick(cg, vectors, picks, vw: int):
    """A vector whose lane k is lane picks[k][1] of vectors[picks[k][0]], built
    from two-operand shuffles (one per source vector)."""
    i32 = ir.IntType(32)
    out = None
    for src in sorted({v for v, _ in picks}):
        if out is None:
            lanes = [lane if v == src else 0 for v, lane in picks]
            out = cg.b.shuffle_vector(vectors[src], ir.Constant(vectors[src].type, ir.Undefined),
                                      ir.Constant(ir.VectorType(i32, vw), lanes))
        else:
            lanes = [vw + lane if v == src else k for k, (v, lane) in enumerate(picks)]
            out = cg.b.shuffle_vector(out, vectors[src], ir.Constant(ir.VectorType(i32, vw), lanes))
    return out


def _regroup(cg, vectors, vw: int, width: int, inverse: bool = False):
    """vw rows of `width` values, row-major in `width` vectors, as one vector per
    column (lane i = row i); or, with `inverse`, back."""
    out = []
    for k in range(width):
        if inverse:     # vector k of the row-major block: element e = k*vw + l is (row e // width, column e % width)
            picks = [((k * vw + l) % width, (k * vw + l) // width) for l in range(vw)]
        else:           # column k: row i's value is element i*width + k of the block
            picks = [((i * width + k) // vw, (i * width + k) % vw) for i in range(vw)]
        out.append(_pick(cg, vectors, picks, vw))
    return out


def _block_masks(cg, rem, classes: int, vw: int):
    """Masks for the `classes` vectors of a block of which `rem` rows exist."""
    return [cg.lane_mask(cg.b.sub(cg.imul(rem, classes), cg.i64(k * vw)), vw) for k in range(classes)]


def _labels(cg, lab, r0, rem, ydt, vw):
    from ..lower.codegen import I32
    it = ir.IntType(32 if ydt == "i32" else 64)
    mask = cg.lane_mask(rem, vw)
    v = cg.load(lab, r0, t=it, n=vw, mask=mask)
    return v if ydt == "i32" else cg.b.trunc(v, ir.VectorType(I32, vw))


def xent_block(cg, src, lab, ydt, r0, rem, classes: int, vw: int):
    """Rows [r0, r0 + min(rem, vw)): per class the logits, then max, Σ e^(z - max),
    and the label's logit, each one vector across rows."""
    from ..lower.codegen import I32
    b = cg.b
    masks = _block_masks(cg, rem, classes, vw)
    base = cg.imul(r0, classes)
    raw = [cg.load(src, cg.iadd(base, k * vw), n=vw, mask=masks[k]) for k in range(classes)]
    z = _regroup(cg, raw, vw, classes)
    m = z[0]
    for v in z[1:]:
        m = cg.max(m, v)
    e = [cg.exp_nonpositive(cg.sub(v, m)) for v in z]
    s = e[0]
    for v in e[1:]:
        s = cg.add(s, v)
    y = _labels(cg, lab, r0, rem, ydt, vw)
    picked = cg.const(0.0, z[0].type)
    for c, v in enumerate(z):
        hit = b.icmp_signed("==", y, ir.Constant(ir.VectorType(I32, vw), [ir.Constant(I32, c)] * vw))
        picked = cg.select(hit, v, picked)
    return z, m, e, s, picked, y, masks


def emit_xent_rows_blocked(kb, name, z, y, out, rows_dim, classes, ydt, mean_into=None):
    """Per-row losses into `out` (row-parallel), or, with `mean_into`, their mean
    into that scalar (one task: the sum is ordered)."""
    vw = kb.vector_width
    blocks = lambda cg: cg.ceil_div(cg.dim(rows_dim), vw)
    tasks = blocks if mean_into is None else 1
    with kb.kernel(name, tasks, cost=vw * classes * 30) as (cg, lo, hi):
        b = cg.b
        src, lab = cg.ptr(z), cg.ptr(y)
        rows = cg.dim(rows_dim)
        vt = ir.VectorType(ir.FloatType(), vw)
        total = cg.var(vt, cg.const(0.0, vt))
        start, stop = (lo, hi) if mean_into is None else (cg.i64(0), blocks(cg))
        with cg.loop(stop, start=start, name="block") as blk:
            r0 = cg.imul(blk, vw)
            rem = b.sub(rows, r0)
            _, m, _, s, picked, _, _ = xent_block(cg, src, lab, ydt, r0, rem, classes, vw)
            loss = cg.sub(cg.add(m, cg.log(s)), picked)
            mask = cg.lane_mask(rem, vw)
            if mean_into is None:
                cg.store(loss, cg.ptr(out), r0, mask=mask)
            else:
                b.store(cg.add(b.load(total), cg.select(mask, loss, cg.const(0.0, vt))), total)
        if mean_into is not None:
            cg.store(cg.div(cg.hsum(b.load(total)), b.sitofp(rows, ir.FloatType())), cg.ptr(mean_into), cg.i64(0))


def emit_xent_grad_blocked(kb, name, z, y, out, rows_dim, classes, ydt, scale_of):
    """(softmax(z) - onehot(y)) * scale per row; `scale_of(cg, r0, rem)` gives the
    scales of a block of rows as a vector."""
    from ..lower.codegen import I32
    vw = kb.vector_width
    with kb.kernel(name, lambda cg: cg.ceil_div(cg.dim(rows_dim), vw), cost=vw * classes * 30) as (cg, lo, hi):
        b = cg.b
        src, lab, dst = cg.ptr(z), cg.ptr(y), cg.ptr(out)
        rows = cg.dim(rows_dim)
        with cg.loop(hi, start=lo, name="block") as blk:
            r0 = cg.imul(blk, vw)
            rem = b.sub(rows, r0)
            _, _, e, s, _, yv, masks = xent_block(cg, src, lab, ydt, r0, rem, classes, vw)
            k = cg.div(scale_of(cg, r0, rem), s)
            grads = []
            for c, v in enumerate(e):
                hit = b.icmp_signed("==", yv, ir.Constant(ir.VectorType(I32, vw), [ir.Constant(I32, c)] * vw))
                g = cg.mul(v, k)
                grads.append(cg.select(hit, cg.sub(g, cg.mul(k, s)), g))
            back = _regroup(cg, grads, vw, classes, inverse=True)
            base = cg.imul(r0, classes)
            for j, v in enumerate(back):
                cg.store(v, dst, cg.iadd(base, j * vw), mask=masks[j])
