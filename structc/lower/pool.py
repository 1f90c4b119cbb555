"""Kernels for pooling and its backward ops (NCHW, vectorised along the output row).

  maxpool2d / avgpool2d / maxpool2d_argmax: a task is one output row of
      one plane; each window element is one vector: a masked load (stride
      1), two loads and a shuffle taking every other lane (stride 2), a
      gather otherwise. When the fuse pass put a `maxpool2d_argmax` of the same input
      and window in the max-pool's group, the one loop nest stores both
      the maxima and their positions.
  scatter_argmax / avgpool2d_grad: a task is one plane. The delta is
      scattered (added) into the group's output plane, then the group's
      epilogue (the activation's derivative mask) runs over the plane while
      it is still in L1.
"""
from __future__ import annotations

from llvmlite import ir

from ..ops.conv import pair
from .codegen import F32, I32, I64
from .conv import _lanes, gather


def _group_of(graph, nid):
    for gr in graph.groups:
        if nid in gr.members:
            return gr
    return None


def emit_pool(kb, node, kind: str) -> None:
    graph = kb.graph
    x_id = node.inputs[0]
    N, C, H, W = graph.nodes[x_id].shape
    OH, OW = node.shape[2:]
    kh, kw = pair(node.attrs.get("size", 2))
    sh, sw = pair(node.attrs.get("stride", 2))
    vw = kb.vector_width
    value_out = node.id if kind in ("max", "avg") else None
    index_out = node.id if kind == "argmax" else None
    if kind == "max":
        gr = _group_of(graph, node.id)
        for m in (gr.members if gr else []):
            if graph.nodes[m].op.name == "maxpool2d_argmax":
                index_out = m
    nvec = -(-OW // vw)

    def tasks(cg):
        return cg.imul(cg.dim(N), C * OH)

    with kb.kernel(f"{kind}pool{node.id}", tasks, cost=OW * kh * kw) as (cg, lo, hi):
        b = cg.b
        X = cg.ptr(x_id)
        vt_i = ir.VectorType(I64, vw)
        lanes = _lanes(cg, vw)
        with cg.loop(hi, start=lo, name="row") as r:
            oh = b.srem(r, cg.i64(OH))
            plane = b.sdiv(r, cg.i64(OH))
            xplane = cg.imul(plane, H * W)
            with cg.loop(nvec, name="v") as v:
                ow0 = cg.imul(v, vw)
                ow = b.add(cg.splat(ow0, vw), lanes)
                mask = b.icmp_signed("<", ow, ir.Constant(vt_i, [ir.Constant(I64, OW)] * vw))
                best = bidx = None
                for a in range(kh):
                    ih = cg.iadd(cg.imul(oh, sh), a)
                    for c in range(kw):
                        if sw == 1:
                            val = cg.load(X, cg.iadd(cg.iadd(xplane, cg.imul(ih, W)), cg.iadd(ow0, c)), F32, vw, mask)
                            cols = None
                        elif sw == 2:
                            val = _every_other(cg, X, cg.iadd(xplane, cg.imul(ih, W)), ow0, c, min(W, 2 * OW + c), vw)
                        else:
                            cols = b.add(b.mul(ow, cg.splat(cg.i64(sw), vw)), cg.splat(cg.i64(c), vw))
                            val = gather(cg, X, cg.iadd(xplane, cg.imul(ih, W)), cols, mask)
                        if best is None:
                            best = val
                            if index_out is not None:
                                bidx = _position(cg, ih, ow, sw, c, W, vw)
                        elif kind == "avg":
                            best = cg.add(best, val)
                        else:
                            take = cg.beats(val, best)   # a NaN in the window wins, as in numpy
                            best = cg.select(take, val, best)
                            if index_out is not None:
                                bidx = cg.select(take, _position(cg, ih, ow, sw, c, W, vw), bidx)
                out_off = cg.iadd(cg.imul(r, OW), ow0)
                if value_out is not None:
                    if kind == "avg":
                        best = cg.mul(best, cg.const(1.0 / (kh * kw), best))
                    cg.store(best, cg.ptr(value_out), out_off, mask=mask)
                if index_out is not None:
                    cg.store(bidx, cg.ptr(index_out), out_off, t=I32, mask=mask)


def _every_other(cg, X, row, ow0, c, end: int, vw: int):
    """X[row + 2 ow + c] for the vw outputs ow = ow0, ow0 + 1, ...: the row's
    2 vw columns from 2 ow0 + c as two loads (columns from `end` on not read),
    their even lanes taken by one shuffle, where a gather would fetch each
    element on its own (a stride-2 max-pool's window took ~4x as long)."""
    b = cg.b
    lanes = _lanes(cg, vw)
    start = cg.iadd(cg.imul(ow0, 2), c)
    halves = []
    for k in range(2):
        first = cg.iadd(start, k * vw)
        inside = b.icmp_signed("<", b.add(cg.splat(first, vw), lanes), cg.splat(cg.i64(end), vw))
        halves.append(cg.load(X, cg.iadd(row, first), F32, vw, inside))
    even = ir.Constant(ir.VectorType(I32, vw), [ir.Constant(I32, 2 * k) for k in range(vw)])
    return b.shuffle_vector(halves[0], halves[1], even)


def _position(cg, ih, ow, sw, c, W, vw):
    """ih * W + ow * sw + c as an i32 vector."""
    b = cg.b
    col = b.add(b.mul(ow, cg.splat(cg.i64(sw), vw)) if sw != 1 else ow, cg.splat(cg.i64(c), vw))
    pos = b.add(cg.splat(cg.imul(ih, W), vw), col)
    return b.trunc(pos, ir.VectorType(I32, vw))


def _plane_epilogue(kb, cg, epilogue, scratch, plane, n, c, H, W):
    """Run the group's epilogue over one finished [H, W] plane of `scratch`."""
    b = cg.b
    vw = kb.vector_width
    lanes = _lanes(cg, vw)
    with cg.loop(H, name="eh") as h:
        with cg.loop(-(-W // vw), name="ev") as v:
            w0 = cg.imul(v, vw)
            mask = b.icmp_signed("<", b.add(cg.splat(w0, vw), lanes), cg.splat(cg.i64(W), vw))
            value = cg.load(scratch, cg.iadd(cg.iadd(plane, cg.imul(h, W)), w0), F32, vw, mask)
            epilogue.emit(cg, [n, c, h, w0], vw, mask, given={epilogue.anchor: value})


def emit_scatter(kb, node, epilogue) -> None:
    graph = kb.graph
    g_id, i_id = node.inputs
    N, C, OH, OW = graph.nodes[g_id].shape
    H, W = node.attrs["plane"]
    if node.attrs.get("size") is not None:
        (kh, kw), (sh, sw) = pair(node.attrs["size"]), pair(node.attrs["stride"])
        if sh >= kh and sw >= kw and W <= 16 * kb.vector_width:
            _route_disjoint(kb, node, epilogue, (kh, kw), (sh, sw))
            return
    scratch_id = epilogue.outputs[0]

    def tasks(cg):
        return cg.imul(cg.dim(N), C)

    with kb.kernel(f"scatter{node.id}", tasks, cost=2 * H * W + 4 * OH * OW) as (cg, lo, hi):
        b = cg.b
        G, I, S = cg.ptr(g_id), cg.ptr(i_id), cg.ptr(scratch_id)
        with cg.loop(hi, start=lo, name="plane") as p:
            plane = cg.imul(p, H * W)
            _zero(kb, cg, S, plane, H * W)
            src = cg.imul(p, OH * OW)
            with cg.loop(OH * OW, name="k") as k:
                at = cg.iadd(plane, b.sext(cg.load(I, cg.iadd(src, k), I32), I64))
                cg.store(cg.add(cg.load(S, at), cg.load(G, cg.iadd(src, k))), S, at)
            _plane_epilogue(kb, cg, epilogue, S, plane, b.sdiv(p, cg.i64(C)), b.srem(p, cg.i64(C)), H, W)


def _zero(kb, cg, base, start, count: int) -> None:
    vw = kb.vector_width
    zero = cg.const(0.0, ir.VectorType(F32, vw))
    with cg.loop(count // vw, name="z") as z:
        cg.store(zero, base, cg.iadd(start, cg.imul(z, vw)))
    with cg.loop(count, start=count - count % vw, name="zt") as z:
        cg.store(cg.const(0.0, F32), base, cg.iadd(start, z))


def emit_avg_grad(kb, node, epilogue) -> None:
    graph = kb.graph
    g_id = node.inputs[0]
    N, C, OH, OW = graph.nodes[g_id].shape
    H, W = node.attrs["plane"]
    kh, kw = pair(node.attrs["size"])
    sh, sw = pair(node.attrs["stride"])
    scratch_id = epilogue.outputs[0]

    def tasks(cg):
        return cg.imul(cg.dim(N), C)

    with kb.kernel(f"avggrad{node.id}", tasks, cost=2 * H * W + 2 * OH * OW * kh * kw) as (cg, lo, hi):
        b = cg.b
        G, S = cg.ptr(g_id), cg.ptr(scratch_id)
        scale = cg.const(1.0 / (kh * kw), F32)
        with cg.loop(hi, start=lo, name="plane") as p:
            plane = cg.imul(p, H * W)
            _zero(kb, cg, S, plane, H * W)
            src = cg.imul(p, OH * OW)
            with cg.loop(OH, name="i") as i:
                with cg.loop(OW, name="j") as j:
                    gval = cg.mul(cg.load(G, cg.iadd(src, cg.iadd(cg.imul(i, OW), j))), scale)
                    for a in range(kh):
                        for c in range(kw):
                            at = cg.iadd(plane, cg.iadd(cg.imul(cg.iadd(cg.imul(i, sh), a), W),
                                                        cg.iadd(cg.imul(j, sw), c)))
                            cg.store(cg.add(cg.load(S, at), gval), S, at)
            _plane_epilogue(kb, cg, epilogue, S, plane, b.sdiv(p, cg.i64(C)), b.srem(p, cg.i64(C)), H, W)


def emit_gather(kb, node) -> None:
    graph = kb.graph
    x_id, i_id = node.inputs
    N, C, H, W = graph.nodes[x_id].shape
    OH, OW = node.shape[2:]

    def tasks(cg):
        return cg.imul(cg.dim(N), C)

    with kb.kernel(f"gather{node.id}", tasks, cost=OH * OW) as (cg, lo, hi):
        b = cg.b
        X, I, D = cg.ptr(x_id), cg.ptr(i_id), cg.ptr(node.id)
        with cg.loop(hi, start=lo, name="plane") as p:
            src = cg.imul(p, OH * OW)
            with cg.loop(OH * OW, name="k") as k:
                at = cg.iadd(cg.imul(p, H * W), b.sext(cg.load(I, cg.iadd(src, k), I32), I64))
                cg.store(cg.load(X, at), D, cg.iadd(src, k))


def _window_lanes(v: int, vw: int, sw: int, OW: int, W: int):
    """For the vector of plane columns [v*vw, v*vw + vw): the first window
    column j0, each lane's window relative to j0, and which lanes have one."""
    j0 = v * vw // sw
    rel = [(v * vw + l) // sw - j0 for l in range(vw)]
    ok = [v * vw + l < W and (v * vw + l) // sw < OW for l in range(vw)]
    return j0, rel, ok


def _route_disjoint(kb, node, epilogue, size, stride) -> None:
    """Disjoint windows: dx[h, w] = g[i, j] where idx[i, j] == (h, w), with
    (i, j) = (h // sh, w // sw), the one window that can cover (h, w). Each
    output row is computed in registers: a window row loaded once, its lanes
    spread by a shuffle, and the group's epilogue applied as it is stored."""
    graph = kb.graph
    g_id, i_id = node.inputs
    N, C, OH, OW = graph.nodes[g_id].shape
    H, W = node.attrs["plane"]
    sh, sw = stride
    vw = kb.vector_width
    nvec = -(-W // vw)
    I1 = ir.IntType(1)

    def tasks(cg):
        return cg.imul(cg.dim(N), C * H)

    with kb.kernel(f"route{node.id}", tasks, cost=4 * W) as (cg, lo, hi):
        b = cg.b
        G, I = cg.ptr(g_id), cg.ptr(i_id)
        vt_i32 = ir.VectorType(I32, vw)
        lanes = ir.Constant(vt_i32, [ir.Constant(I32, k) for k in range(vw)])
        with cg.loop(hi, start=lo, name="row") as r:
            h = b.srem(r, cg.i64(H))
            plane = b.sdiv(r, cg.i64(H))
            i = b.sdiv(h, cg.i64(sh))
            has_window = b.icmp_signed("<", i, cg.i64(OH))
            src = cg.iadd(cg.imul(plane, OH * OW), cg.imul(i, OW))
            n, c = b.sdiv(plane, cg.i64(C)), b.srem(plane, cg.i64(C))
            pos0 = cg.splat(b.trunc(cg.imul(h, W), I32), vw)
            for v in range(nvec):
                j0, rel, ok = _window_lanes(v, vw, sw, OW, W)
                count = min(vw, OW - j0)
                load_mask = b.and_(ir.Constant(ir.VectorType(I1, vw), [ir.Constant(I1, int(k < count)) for k in range(vw)]),
                                   cg.splat(has_window, vw))
                spread = ir.Constant(ir.VectorType(I32, vw), [ir.Constant(I32, x) for x in rel])
                gv = b.shuffle_vector(cg.load(G, cg.iadd(src, j0), F32, vw, load_mask),
                                      ir.Constant(ir.VectorType(F32, vw), ir.Undefined), spread)
                iv = b.shuffle_vector(cg.load(I, cg.iadd(src, j0), I32, vw, load_mask),
                                      ir.Constant(vt_i32, ir.Undefined), spread)
                here = b.add(pos0, b.add(lanes, ir.Constant(vt_i32, [ir.Constant(I32, v * vw)] * vw)))
                hit = b.and_(b.icmp_signed("==", iv, here), cg.splat(has_window, vw))
                hit = b.and_(hit, ir.Constant(ir.VectorType(I1, vw), [ir.Constant(I1, int(x)) for x in ok]))
                value = cg.select(hit, gv, cg.const(0.0, gv))
                store_mask = ir.Constant(ir.VectorType(I1, vw), [ir.Constant(I1, int(v * vw + l < W))
                                                                  for l in range(vw)])
                epilogue.emit(cg, [n, c, h, cg.i64(v * vw)], vw, store_mask, given={epilogue.anchor: value})
