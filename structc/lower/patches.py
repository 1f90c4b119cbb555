"""Kernels for `patches` (im2col) and `patches_grad` (col2im), NCHW.

  patches: a task is one plane of P, [OH, OW] for one (n, c, kh, kw),
      written vector by vector. At stride 1 a vector is a run of one output
      row, read from the input row by a masked load (lanes in the padding
      or past the row read nothing and give 0); at strides 2-16 with rows
      of a vector or more, by s masked loads and s - 1 shuffles
      (`_shuffled_rows`); otherwise it is a run of the whole plane, (i, j) =
      divmod(q, OW) per lane, read by a masked gather (a patch embedding's
      planes are narrower than a vector: 8 x 8). On 8 or 4 lanes at a stride
      of 4 or more, element by element instead (`_by_element`).
      (A task of one input channel, computing each vector's offsets once
      for all its KH·KW taps, took 1.14-1.20 ms for patch_embed's 16x16 /
      16 patches against these planes' 0.90-0.95: it wrote 256 planes at once.)
  patches_grad: a task is one plane of dx, [H, W] for one (n, c): zeroed,
      then for each (kh, kw) in order every vector of P's plane is added to
      the elements it was read from (gather, add, scatter; where patches do
      not overlap, a scatter). For one (kh, kw) the map (i, j) -> (h, w) is
      one to one, so no two lanes of a vector write one element; the (kh, kw)
      come one after another, so the sums' order is fixed: the same bits on
      any number of threads. The group's epilogue (the derivative mask of
      the activation below) then runs over the plane while it is in L1.

Every read and write of an element outside its plane (padding, lanes past
the plane's end) is masked off; only the bounds a shape can break are tested.
"""
from __future__ import annotations

from llvmlite import ir

from ..ops.conv import pair, quad
from .codegen import F32, I1, I32, PTR, VOID
from .conv import MAX_SHUFFLED_STRIDE, _lanes, _picked, gather, in_row
from .pool import _plane_epilogue, _zero


class _Geometry:
    """Sizes of one patches/patches_grad node: x [N, C, H, W], P [N, C·KH·KW, OH, OW]."""

    def __init__(self, x_shape, p_shape, attrs):
        self.N, self.C, self.H, self.W = x_shape
        self.OH, self.OW = p_shape[2:]
        self.KH, self.KW = pair(attrs["kernel"])
        self.sh, self.sw = pair(attrs.get("stride", 1))
        self.pt, _, self.pl, _ = quad(attrs.get("padding", 0))
        self.plane = self.OH * self.OW

    def may_leave(self) -> tuple[bool, bool, bool, bool]:
        """Whether a tap can fall above, below, left of, right of the input."""
        return (self.pt > 0, (self.OH - 1) * self.sh + self.KH - 1 - self.pt >= self.H,
                self.pl > 0, (self.OW - 1) * self.sw + self.KW - 1 - self.pl >= self.W)


def _i32s(cg, values, vw):
    return ir.Constant(ir.VectorType(I32, vw), [ir.Constant(I32, v) for v in values])


def _splat32(cg, v, vw):
    """An i64 scalar (or int) as a vector of i32 lanes."""
    if isinstance(v, int):
        return _i32s(cg, [v] * vw, vw)
    return cg.splat(cg.b.trunc(v, I32), vw)


def _tap(cg, geo: _Geometry, r):
    """(kh, kw) of tap r = kh·KW + kw."""
    return cg.b.sdiv(r, cg.i64(geo.KW)), cg.b.srem(r, cg.i64(geo.KW))


def _taps(cg, geo: _Geometry, kh, kw, v, vw: int):
    """For lanes q = v·vw + l of P's plane and the tap (kh, kw): the input
    offset within x's plane of each lane (i32), the lanes inside the plane,
    and those of them that read the input (not the padding)."""
    b = cg.b
    q = b.add(_splat32(cg, cg.imul(v, vw), vw), _i32s(cg, range(vw), vw))
    i = b.udiv(q, _i32s(cg, [geo.OW] * vw, vw))
    j = b.sub(q, b.mul(i, _i32s(cg, [geo.OW] * vw, vw)))
    h = b.add(b.mul(i, _i32s(cg, [geo.sh] * vw, vw)), _splat32(cg, cg.iadd(kh, -geo.pt), vw))
    w = b.add(b.mul(j, _i32s(cg, [geo.sw] * vw, vw)), _splat32(cg, cg.iadd(kw, -geo.pl), vw))
    inside = b.icmp_signed("<", q, _i32s(cg, [geo.plane] * vw, vw))
    reads = inside
    above, below, left, right = geo.may_leave()
    for leaves, cmp, val, bound in ((above, ">=", h, 0), (below, "<", h, geo.H),
                                    (left, ">=", w, 0), (right, "<", w, geo.W)):
        if leaves:
            reads = b.and_(reads, b.icmp_signed(cmp, val, _i32s(cg, [bound] * vw, vw)))
    return b.add(b.mul(h, _i32s(cg, [geo.W] * vw, vw)), w), inside, reads


def emit_patches(kb, node) -> None:
    x_id = node.inputs[0]
    geo = _Geometry(kb.graph.nodes[x_id].shape, node.shape, node.attrs)
    vw = kb.vector_width
    CKK = node.shape[1]
    KK = geo.KH * geo.KW

    def tasks(cg):
        return cg.imul(cg.dim(geo.N), CKK)

    with kb.kernel(f"patches{node.id}", tasks, cost=geo.plane) as (cg, lo, hi):
        b = cg.b
        X, P = cg.ptr(x_id), cg.ptr(node.id)
        with cg.loop(hi, start=lo, name="plane") as t:
            r = b.srem(t, cg.i64(KK))
            xplane = cg.imul(b.sdiv(t, cg.i64(KK)), geo.H * geo.W)      # t // KK = n·C + c
            out = cg.imul(t, geo.plane)
            if _by_element(geo, vw):
                _elements(cg, geo, X, P, xplane, out, r)
            elif geo.sw == 1 or _shuffled_rows(geo, vw):
                _rows(cg, geo, X, P, xplane, out, r, vw)
            else:
                with cg.loop(-(-geo.plane // vw), name="v") as v:
                    offset, inside, reads = _taps(cg, geo, *_tap(cg, geo, r), v, vw)
                    value = gather(cg, X, xplane, offset, reads)
                    cg.store(value, P, cg.iadd(out, cg.imul(v, vw)), mask=inside)


def _input_row(cg, geo: _Geometry, i, kh):
    """(input row, whether it is inside the input) of output row i for kernel row kh."""
    b = cg.b
    above, below, _, _ = geo.may_leave()
    h = cg.iadd(cg.iadd(cg.imul(i, geo.sh), kh), -geo.pt)
    row_in = ir.Constant(I1, 1)
    if above:
        row_in = b.and_(row_in, b.icmp_signed(">=", h, cg.i64(0)))
    if below:
        row_in = b.and_(row_in, b.icmp_signed("<", h, cg.i64(geo.H)))
    return h, row_in


def _by_element(geo: _Geometry, vw: int) -> bool:
    """Whether a plane is copied element by element: on 8 or 4 lanes (AVX2 and
    SSE, where a gather is slow) at a stride of BY_ELEMENT_STRIDE or more,
    where a vector took as many loads and shuffles, or a gather. A patch
    embedding's 16 x 16 / 16 patches of 128 x 128 images took 9.9 ms a
    batch of 32 by 16 loads and 15 shuffles a vector, 1.3 ms so; an 11x11
    stride-4 stem's step ran 3% faster (Zen 1)."""
    return vw < 16 and geo.sw >= BY_ELEMENT_STRIDE


BY_ELEMENT_STRIDE = 4


def _elements(cg, geo: _Geometry, X, P, xplane, out, r) -> None:
    """P's plane element by element: element (i, j) reads input row
    i·sh + kh - pt, column j·sw + kw - pl, or is 0 in the padding (read at
    the plane's start instead, and dropped)."""
    b = cg.b
    kh, kw = _tap(cg, geo, r)
    _, _, left, right = geo.may_leave()
    leaves = any(geo.may_leave())
    zero = ir.Constant(F32, 0.0)
    with cg.loop(geo.OH, name="i") as i:
        h, row_in = _input_row(cg, geo, i, kh)
        row = cg.imul(h, geo.W)
        dest = cg.iadd(out, cg.imul(i, geo.OW))
        with cg.loop(geo.OW, name="j") as j:
            w = cg.iadd(cg.iadd(cg.imul(j, geo.sw), kw), -geo.pl)
            ok = row_in
            if left:
                ok = b.and_(ok, b.icmp_signed(">=", w, cg.i64(0)))
            if right:
                ok = b.and_(ok, b.icmp_signed("<", w, cg.i64(geo.W)))
            if not leaves:
                cg.store(cg.load(X, cg.iadd(xplane, cg.iadd(row, w))), P, cg.iadd(dest, j))
            else:
                at = b.select(ok, cg.iadd(row, w), cg.i64(0))
                value = cg.load(X, cg.iadd(xplane, at))
                cg.store(b.select(ok, value, zero), P, cg.iadd(dest, j))


def _shuffled_rows(geo: _Geometry, vw: int) -> bool:
    """Whether a strided plane goes row by row, each vector from sw loads and sw - 1
    shuffles (`conv._picked`), not one gather: rows of a vector or more. The column
    phases of an 11x11 stride-4 stem's input (`passes/patches.py`), 32 columns a row,
    took 660 us by gathers at batch 16."""
    return 2 <= geo.sw <= MAX_SHUFFLED_STRIDE and geo.OW >= vw


def _rows(cg, geo: _Geometry, X, P, xplane, out, r, vw: int) -> None:
    """P's plane row by row: row i reads input row i·sh + kh - pt from column
    kw - pl on, every sw-th column: one masked load a vector at stride 1, sw
    masked loads and sw - 1 shuffles at a stride (the loads' masks keep them
    in the row; columns in the padding read as 0)."""
    b = cg.b
    if geo.sw != 1:
        zero = ir.Constant(ir.VectorType(F32, vw), [ir.Constant(F32, 0.0)] * vw)
        picks = [geo.sw * j for j in range(vw)]
    kh, kw = _tap(cg, geo, r)
    _, _, left, right = geo.may_leave()
    lanes = _lanes(cg, vw)
    with cg.loop(geo.OH, name="i") as i:
        h, row_in = _input_row(cg, geo, i, kh)
        col0 = cg.iadd(kw, -geo.pl)
        row = cg.iadd(xplane, cg.imul(h, geo.W))
        with cg.loop(-(-geo.OW // vw), name="v") as v:
            j = b.add(cg.splat(cg.imul(v, vw), vw), lanes)
            inside = b.icmp_signed("<", j, cg.splat(cg.i64(geo.OW), vw))
            dest = cg.iadd(cg.iadd(out, cg.imul(i, geo.OW)), cg.imul(v, vw))
            if geo.sw != 1:
                first = cg.iadd(col0, cg.imul(v, vw * geo.sw))      # lane l reads column first + sw l
                parts = []
                for k in range(geo.sw):
                    at = cg.iadd(first, k * vw)
                    ok = b.and_(cg.splat(row_in, vw), in_row(cg, at, lanes, geo.W))
                    parts.append(cg.load(X, cg.iadd(row, at), F32, vw, ok))
                cg.store(_picked(b, parts, picks, zero), P, dest, mask=inside)
            else:
                w = b.add(j, cg.splat(col0, vw))
                reads = b.and_(inside, cg.splat(row_in, vw))
                if left:
                    reads = b.and_(reads, b.icmp_signed(">=", w, cg.splat(cg.i64(0), vw)))
                if right:
                    reads = b.and_(reads, b.icmp_signed("<", w, cg.splat(cg.i64(geo.W), vw)))
                at = cg.iadd(row, cg.iadd(col0, cg.imul(v, vw)))
                cg.store(cg.load(X, at, F32, vw, reads), P, dest, mask=inside)


def _scatter(cg, base, row_off, offsets, value, mask) -> None:
    """base[row_off + offsets[l]] = value[l] for the set lanes of mask."""
    b = cg.b
    vw = offsets.type.count
    ptrs = b.gep(cg.gep(base, row_off), [offsets], source_etype=F32)
    vpt = ir.VectorType(PTR, vw)
    ptrs.type = vpt
    fn = cg.declare(f"llvm.masked.scatter.v{vw}f32.v{vw}p0", VOID, [value.type, vpt, I32, mask.type])
    b.call(fn, [value, ptrs, ir.Constant(I32, 4), mask])


def emit_patches_grad(kb, node, epilogue) -> None:
    p_id = node.inputs[0]
    geo = _Geometry(node.shape, kb.graph.nodes[p_id].shape, node.attrs)
    vw = kb.vector_width
    KK = geo.KH * geo.KW
    # patches that do not overlap (a stride at least the kernel) give each element one value
    # at most: it is stored, not added (a permutation, and zeros where no patch reads)
    overlap = geo.sh < geo.KH or geo.sw < geo.KW
    # the plane is summed in the group's output, then the group's epilogue (the derivative
    # mask of the activation below) runs over it while it is in L1, as scatter_argmax's does
    scratch_id = epilogue.outputs[0]

    def tasks(cg):
        return cg.imul(cg.dim(geo.N), geo.C)

    with kb.kernel(f"patchesgrad{node.id}", tasks, cost=2 * geo.H * geo.W + 2 * KK * geo.plane) as (cg, lo, hi):
        b = cg.b
        P, D = cg.ptr(p_id), cg.ptr(scratch_id)
        with cg.loop(hi, start=lo, name="plane") as t:
            dplane = cg.imul(t, geo.H * geo.W)
            _zero(kb, cg, D, dplane, geo.H * geo.W)
            with cg.loop(KK, name="tap") as r:
                src = cg.imul(cg.iadd(cg.imul(t, KK), r), geo.plane)       # P's plane (n, c, kh, kw)
                with cg.loop(-(-geo.plane // vw), name="v") as v:
                    offset, inside, writes = _taps(cg, geo, *_tap(cg, geo, r), v, vw)
                    value = cg.load(P, cg.iadd(src, cg.imul(v, vw)), F32, vw, inside)
                    if overlap:
                        value = cg.add(gather(cg, D, dplane, offset, writes), value)
                    _scatter(cg, D, dplane, offset, value, writes)
            _plane_epilogue(kb, cg, epilogue, D, dplane, b.sdiv(t, cg.i64(geo.C)), b.srem(t, cg.i64(geo.C)),
                            geo.H, geo.W)
