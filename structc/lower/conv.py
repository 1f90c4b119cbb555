"""Kernels for the convolution ops: direct, im2col-free cross-correlations.

Layout is NCHW throughout, vectorised along the output row (the widest
contiguous axis) and register-tiled over output channels:

  conv2d              a task is one output row of one image for a tile of OT
                      output channels. OT x V vector accumulators (V vectors
                      cover the row, or a chunk of it) sum over input channels
                      and kernel rows; per kernel column, V input vectors are
                      loaded once and each meets OT broadcast weights. Zero
                      padding is never materialised: kernel rows outside the
                      input are skipped (loop bounds), columns outside it are
                      masked lanes. The accumulators go straight into the
                      group's epilogue (bias, activation, derivative mask).
  conv2d_kernel_grad  a task owns dw[o-tile, c, kh-block]: it reduces over the
                      batch and the output plane with OT x KWT vector
                      accumulators (delta vectors times shifted input
                      vectors), image by image so the delta tile stays in L1,
                      adding into per-lane partial sums; one horizontal sum per
                      weight at the end.

Strided or input-dilated rows (strided convolutions and their input
gradients) read their lanes with a masked gather. Every shape is static
except the batch, so masks and offsets are mostly constants LLVM folds.
"""
from __future__ import annotations

from llvmlite import ir

from ..ops.conv import pair, quad
from .codegen import F32, I1, I64, PTR

ACC = 24            # vector accumulators a tile may use
VMAX = 4            # vectors per output-row chunk
PARTIAL_LIMIT = 64 * 1024   # bytes of per-task partial sums for the kernel gradient


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _split(total: int, most: int) -> tuple[int, int, int]:
    """Split `total` into tiles of at most `most`: (tile, count, last tile)."""
    count = _ceil(total, max(1, most))
    tile = _ceil(total, count)
    return tile, count, total - (count - 1) * tile


class _Geometry:
    """Static shape facts of one cross-correlation."""

    def __init__(self, x_shape, kernel, out_hw, attrs):
        self.N, self.C, self.H, self.W = x_shape
        self.KH, self.KW = kernel
        self.OH, self.OW = out_hw
        self.sh, self.sw = pair(attrs.get("stride", 1))
        self.pt, self.pb, self.pl, self.pr = quad(attrs.get("padding", 0))
        self.dh, self.dw = pair(attrs.get("input_dilation", 1))
        self.Hd = (self.H - 1) * self.dh + 1
        self.Wd = (self.W - 1) * self.dw + 1
        self.contiguous = self.sw == 1 and self.dw == 1

    def row_chunks(self, vw: int) -> tuple[int, int]:
        """(vectors per chunk, chunks) covering an output row."""
        nvec = _ceil(self.OW, vw)
        chunks = _ceil(nvec, VMAX)
        return _ceil(nvec, chunks), chunks


def _lanes(cg, vw):
    return ir.Constant(ir.VectorType(I64, vw), [ir.Constant(I64, k) for k in range(vw)])


def _and(cg, *conds):
    out = conds[0]
    for c in conds[1:]:
        out = cg.b.and_(out, c)
    return out


class _RowReader:
    """Loads V vectors of an input row for one kernel column: lane j of vector
    v reads input column (ow0 + v*vw + j)*sw + kw - pl (in dilated
    coordinates), zero where that is padding, a hole of the dilation or past
    the output row. Masks and gather indices depend only on (ow0, kw, v), so
    they are built once per row chunk, outside the channel loop."""

    def __init__(self, cg, geo: _Geometry, vw: int, ow0, V: int, kws):
        self.cg, self.geo, self.vw, self.V = cg, geo, vw, V
        b = cg.b
        vt_i = ir.VectorType(I64, vw)
        self.masks, self.cols = {}, {}
        lanes = _lanes(cg, vw)
        for v in range(V):
            ow = b.add(cg.splat(cg.iadd(ow0, v * vw), vw), lanes)
            in_row = b.icmp_signed("<", ow, ir.Constant(vt_i, [ir.Constant(I64, geo.OW)] * vw))
            for kw in kws:
                j = b.add(b.mul(ow, cg.splat(cg.i64(geo.sw), vw)) if geo.sw != 1 else ow,
                          ir.Constant(vt_i, [ir.Constant(I64, kw - geo.pl)] * vw))
                ok = _and(cg, in_row, b.icmp_signed(">=", j, ir.Constant(vt_i, [ir.Constant(I64, 0)] * vw)),
                          b.icmp_signed("<", j, ir.Constant(vt_i, [ir.Constant(I64, geo.Wd)] * vw)))
                if geo.dw != 1:
                    dwv = ir.Constant(vt_i, [ir.Constant(I64, geo.dw)] * vw)
                    # j may be negative in masked lanes: srem/sdiv are fine there (never read)
                    ok = b.and_(ok, b.icmp_signed("==", b.srem(j, dwv), ir.Constant(vt_i, [ir.Constant(I64, 0)] * vw)))
                    j = b.sdiv(j, dwv)
                self.masks[v, kw] = ok
                self.cols[v, kw] = j
        self.ow0 = ow0

    def load(self, base, row_off, v: int, kw: int):
        cg, geo, vw = self.cg, self.geo, self.vw
        mask = self.masks[v, kw]
        if geo.contiguous:
            off = cg.iadd(row_off, cg.iadd(cg.iadd(self.ow0, v * vw), kw - geo.pl))
            return cg.load(base, off, F32, vw, mask)
        return gather(cg, base, row_off, self.cols[v, kw], mask)


def gather(cg, base, row_off, cols, mask):
    """base[row_off + cols[j]] for the set lanes of mask, 0 elsewhere."""
    b = cg.b
    vw = cols.type.count
    row = cg.gep(base, row_off)
    ptrs = b.gep(row, [cols], source_etype=F32)
    vpt = ir.VectorType(PTR, vw)
    ptrs.type = vpt
    vt = ir.VectorType(F32, vw)
    fn = cg.declare(f"llvm.masked.gather.v{vw}f32.v{vw}p0", vt, [vpt, ir.IntType(32), mask.type, vt])
    return b.call(fn, [ptrs, ir.Constant(ir.IntType(32), 4), mask, ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)])


def _rows(cg, geo: _Geometry, o_row, k_extent: int, each):
    """For output row `o_row`, call each(k, input_row) for every kernel row k
    whose input row is inside the input (padding rows are skipped, as are the
    holes of an input dilation)."""
    b = cg.b
    base = cg.iadd(cg.imul(o_row, geo.sh), -geo.pt)    # dilated input row of k = 0
    if geo.dh == 1:
        lo = b.sub(cg.i64(0), base)
        lo = b.select(b.icmp_signed(">", lo, cg.i64(0)), lo, cg.i64(0))
        hi = b.sub(cg.i64(geo.H), base)
        hi = b.select(b.icmp_signed("<", hi, cg.i64(k_extent)), hi, cg.i64(k_extent))
        with cg.loop(hi, start=lo, name="kh") as k:
            each(k, cg.iadd(base, k))
    else:
        with cg.loop(k_extent, name="kh") as k:
            j = cg.iadd(base, k)
            ok = _and(cg, b.icmp_signed(">=", j, cg.i64(0)), b.icmp_signed("<", j, cg.i64(geo.Hd)),
                      b.icmp_signed("==", b.srem(j, cg.i64(geo.dh)), cg.i64(0)))
            with cg.if_(ok):
                each(k, b.sdiv(j, cg.i64(geo.dh)))


def _tile_variants(cg, index, count: int, tile: int, last: int, body):
    """body(size) for tile `index` of `count`: the last tile may be smaller."""
    if last == tile:
        body(tile)
        return
    with cg.b.if_else(cg.b.icmp_signed("==", index, cg.i64(count - 1))) as (then, otherwise):
        with then:
            body(last)
        with otherwise:
            body(tile)


# -- conv2d ------------------------------------------------------------------------

def emit_conv2d(kb, node, epilogue) -> None:
    graph = kb.graph
    x_id, w_id = node.inputs
    O, C, KH, KW = graph.nodes[w_id].shape
    geo = _Geometry(graph.nodes[x_id].shape, (KH, KW), node.shape[2:], node.attrs)
    vw = kb.vector_width
    V, chunks = geo.row_chunks(vw)
    OT, n_ot, last = _split(O, max(1, min(16, ACC // V)))
    N = geo.N

    def tasks(cg):
        return cg.imul(cg.dim(N), n_ot * geo.OH)

    cost = OT * V * chunks * C * KH * KW

    with kb.kernel(f"conv{node.id}", tasks, cost=cost) as (cg, lo, hi):
        b = cg.b
        X, Wt = cg.ptr(x_id), cg.ptr(w_id)
        vt = ir.VectorType(F32, vw)
        zero = ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)
        with cg.loop(hi, start=lo, name="task") as t:
            oh = b.srem(t, cg.i64(geo.OH))
            rest = b.sdiv(t, cg.i64(geo.OH))
            ot = b.srem(rest, cg.i64(n_ot))
            n = b.sdiv(rest, cg.i64(n_ot))
            o0 = cg.imul(ot, OT)

            def chunk(ow0, ot_size):
                rd = _RowReader(cg, geo, vw, ow0, V, range(KW))
                acc = [[cg.var(vt, zero) for _ in range(V)] for _ in range(ot_size)]

                def kernel_row(kh, ih):
                    def per_channel(c):
                        row = cg.imul(cg.iadd(cg.imul(cg.iadd(cg.imul(n, C), c), geo.H), ih), geo.W)
                        wbase = cg.iadd(cg.imul(cg.iadd(cg.imul(o0, C), c), KH * KW), cg.imul(kh, KW))
                        for kw in range(KW):
                            xv = [rd.load(X, row, v, kw) for v in range(V)]
                            for o in range(ot_size):
                                wv = cg.splat(cg.load(Wt, cg.iadd(wbase, o * C * KH * KW + kw)), vw)
                                for v in range(V):
                                    b.store(cg.fma(wv, xv[v], b.load(acc[o][v])), acc[o][v])
                    with cg.loop(C, name="c") as c:
                        per_channel(c)

                _rows(cg, geo, oh, KH, kernel_row)
                lanes = _lanes(cg, vw)
                for o in range(ot_size):
                    for v in range(V):
                        col = cg.iadd(ow0, v * vw)
                        mask = b.icmp_signed("<", b.add(cg.splat(col, vw), lanes),
                                             cg.splat(cg.i64(geo.OW), vw))
                        epilogue.emit(cg, [n, cg.iadd(o0, o), oh, col], vw, mask,
                                      given={epilogue.anchor: b.load(acc[o][v])})

            def body(ot_size):
                if chunks == 1:
                    chunk(cg.i64(0), ot_size)
                else:
                    with cg.loop(chunks, name="chunk") as ch:
                        chunk(cg.imul(ch, V * vw), ot_size)

            _tile_variants(cg, ot, n_ot, OT, last, body)


# -- conv2d_kernel_grad ----------------------------------------------------------------

def emit_kernel_grad(kb, node) -> None:
    graph = kb.graph
    x_id, g_id = node.inputs
    O, C, KH, KW = node.shape
    gshape = graph.nodes[g_id].shape
    geo = _Geometry(graph.nodes[x_id].shape, (KH, KW), gshape[2:], node.attrs)
    vw = kb.vector_width
    V, chunks = geo.row_chunks(vw)
    KWT, n_kwt, last_kw = _split(KW, 5 if KW % 5 == 0 or KW > 4 else KW)
    # OT delta vectors + KWT input vectors + OT*KWT accumulators in 31 registers
    most = max(1, min(16, (31 - KWT) // (KWT + 1)))
    OT, n_ot, last = _split(O, most)
    kh_blocks = KH if n_ot * C < 8 else 1
    KHB = KH // kh_blocks
    partial = OT * KHB * KW * vw * 4 <= PARTIAL_LIMIT
    N = geo.N

    tasks = n_ot * C * kh_blocks

    def cost(cg):
        return cg.imul(cg.dim(N), geo.OH * V * chunks * OT * KHB * KW)

    with kb.kernel(f"convk{node.id}", tasks, cost=cost) as (cg, lo, hi):
        b = cg.b
        X, G, D = cg.ptr(x_id), cg.ptr(g_id), cg.ptr(node.id)
        vt = ir.VectorType(F32, vw)
        zero = ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)
        if partial:
            part = cg.var(ir.ArrayType(F32, OT * KHB * KW * vw))
            part.type = PTR
        with cg.loop(hi, start=lo, name="task") as t:
            khb = b.srem(t, cg.i64(kh_blocks))
            rest = b.sdiv(t, cg.i64(kh_blocks))
            c = b.srem(rest, cg.i64(C))
            ot = b.sdiv(rest, cg.i64(C))
            o0 = cg.imul(ot, OT)
            kh0 = cg.imul(khb, KHB)

            def dw_index(o, kh, kw):
                # dw[o0 + o, c, kh0 + kh, kw]
                return cg.iadd(cg.imul(cg.iadd(cg.imul(cg.iadd(o0, o), C), c), KH * KW),
                               cg.iadd(cg.imul(cg.iadd(kh0, kh), KW), kw))

            def body(ot_size):
                # zero what this task accumulates into
                if partial:
                    with cg.loop(ot_size * KHB * KW, name="pz") as p:
                        cg.store(zero, part, cg.imul(p, vw))
                else:
                    for o in range(ot_size):
                        with cg.loop(KHB * KW, name="dz") as p:
                            cg.store(cg.const(0.0, F32), D, cg.iadd(dw_index(o, 0, 0), p))

                def image(n):
                    def kernel_row(khl):
                        kh = cg.iadd(kh0, khl)
                        # output rows whose input row kh lands inside the input
                        for kwb in range(n_kwt):
                            kw0 = kwb * KWT
                            kws = list(range(kw0, min(KW, kw0 + KWT)))
                            acc = [[cg.var(vt, zero) for _ in kws] for _ in range(ot_size)]

                            def out_row(oh, ih):
                                grow = cg.imul(cg.iadd(cg.imul(cg.iadd(cg.imul(n, O), o0), geo.OH), oh), geo.OW)
                                xrow = cg.imul(cg.iadd(cg.imul(cg.iadd(cg.imul(n, C), c), geo.H), ih), geo.W)

                                def chunk(ow0):
                                    rd = _RowReader(cg, geo, vw, ow0, V, kws)
                                    lanes = _lanes(cg, vw)
                                    for v in range(V):
                                        col = cg.iadd(ow0, v * vw)
                                        gmask = b.icmp_signed("<", b.add(cg.splat(col, vw), lanes),
                                                              cg.splat(cg.i64(geo.OW), vw))
                                        gv = [cg.load(G, cg.iadd(cg.iadd(grow, o * geo.OH * geo.OW), col),
                                                      F32, vw, gmask) for o in range(ot_size)]
                                        for i, kw in enumerate(kws):
                                            xv = rd.load(X, xrow, v, kw)
                                            for o in range(ot_size):
                                                b.store(cg.fma(gv[o], xv, b.load(acc[o][i])), acc[o][i])

                                if chunks == 1:
                                    chunk(cg.i64(0))
                                else:
                                    with cg.loop(chunks, name="chunk") as ch:
                                        chunk(cg.imul(ch, V * vw))

                            _out_rows(cg, geo, kh, out_row)
                            for o in range(ot_size):
                                for i, kw in enumerate(kws):
                                    a = b.load(acc[o][i])
                                    if partial:
                                        p = cg.imul(cg.iadd(cg.imul(cg.iadd(cg.imul(cg.i64(o), KHB), khl), KW), kw), vw)
                                        cg.store(cg.add(cg.load(part, p, F32, vw), a), part, p)
                                    else:
                                        at = dw_index(o, khl, kw)
                                        cg.store(cg.add(cg.load(D, at), cg.hsum(a)), D, at)

                    with cg.loop(KHB, name="khl") as khl:
                        kernel_row(khl)

                with cg.loop(cg.dim(N), name="n") as n:
                    image(n)

                if partial:
                    for o in range(ot_size):
                        with cg.loop(KHB * KW, name="ps") as p:
                            s = cg.hsum(cg.load(part, cg.imul(cg.iadd(cg.i64(o * KHB * KW), p), vw), F32, vw))
                            cg.store(s, D, cg.iadd(dw_index(o, 0, 0), p))

            _tile_variants(cg, ot, n_ot, OT, last, body)


def _out_rows(cg, geo: _Geometry, kh, each):
    """each(oh, input_row) for the output rows whose input row for kernel row
    kh is inside the input (and not a hole of the input dilation)."""
    b = cg.b
    if geo.dh == 1 and geo.sh == 1:
        # ih = oh + kh - pt in [0, H)
        lo = b.sub(cg.i64(geo.pt), kh)
        lo = b.select(b.icmp_signed(">", lo, cg.i64(0)), lo, cg.i64(0))
        hi = b.sub(cg.i64(geo.H + geo.pt), kh)
        hi = b.select(b.icmp_signed("<", hi, cg.i64(geo.OH)), hi, cg.i64(geo.OH))
        with cg.loop(hi, start=lo, name="oh") as oh:
            each(oh, b.sub(cg.iadd(oh, kh), cg.i64(geo.pt)))
        return
    with cg.loop(geo.OH, name="oh") as oh:
        j = b.sub(cg.iadd(cg.imul(oh, geo.sh), kh), cg.i64(geo.pt))
        ok = _and(cg, b.icmp_signed(">=", j, cg.i64(0)), b.icmp_signed("<", j, cg.i64(geo.Hd)))
        if geo.dh != 1:
            ok = b.and_(ok, b.icmp_signed("==", b.srem(j, cg.i64(geo.dh)), cg.i64(0)))
        with cg.if_(ok):
            each(oh, b.sdiv(j, cg.i64(geo.dh)) if geo.dh != 1 else j)


# -- flip_kernel -------------------------------------------------------------------------

def emit_flip(kb, node) -> None:
    O, C, KH, KW = kb.graph.nodes[node.inputs[0]].shape
    with kb.kernel(f"flip{node.id}", 1, cost=O * C * KH * KW) as (cg, lo, hi):
        src, dst = cg.ptr(node.inputs[0]), cg.ptr(node.id)
        with cg.loop(O * C, name="oc") as oc:
            o = cg.b.sdiv(oc, cg.i64(C))
            c = cg.b.srem(oc, cg.i64(C))
            s0 = cg.imul(oc, KH * KW)
            d0 = cg.imul(cg.iadd(cg.imul(c, O), o), KH * KW)
            with cg.loop(KH * KW, name="k") as k:
                cg.store(cg.load(src, cg.iadd(s0, k)), dst, cg.b.sub(cg.iadd(d0, KH * KW - 1), k))
