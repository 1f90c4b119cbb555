"""Kernels for the convolution ops: direct, im2col-free cross-correlations.

Layout is NCHW throughout, vectorised along the output row (the widest
contiguous axis) and register-tiled over output channels:

  conv2d              a task is one output row (or P packed rows, below) of one
                      image for a tile of OT output channels. OT x V vector accumulators (V vectors
                      cover the row, or a chunk of it) sum over input channels
                      and kernel rows; per kernel column, V input vectors are
                      loaded once and each meets OT broadcast weights. Zero
                      padding is never materialised: kernel rows outside the
                      input are skipped (loop bounds), columns outside it are
                      masked lanes. The accumulators go straight into the
                      group's epilogue (bias, activation, derivative mask).
  conv2d_kernel_grad  a task owns dw[o-tile, c, kh-block]: per channel and
                      kernel row it reduces over the batch and the output
                      plane with OT x KWT vector accumulators (delta vectors
                      times shifted input vectors). Planes of few vector
                      rows (INNER_IMAGE_ROWS) keep them in registers across
                      the images (image by image, the per-lane sums added to
                      memory after each, LeNet-5's second ran at 45% of the
                      FMA peak; this way 82%); larger planes go image by image
                      so the delta tile stays in L1 across channels and
                      kernel rows. One horizontal sum per weight at the end.
                      Two packed rows whose input rows fit a vector load those
                      rows once and shuffle each kernel column out of them.
                      A 1x1 kernel at stride 1 without padding (pointwise) is
                      a product of flat planes: tiles of output x input
                      channels instead (`_emit_pointwise_kernel_grad`).

Output rows narrower than the vectors are packed end to end (P rows per
task, lanes [p*OW, (p+1)*OW) holding row p): LeNet's 8x8 and 24x24 planes
fill every lane instead of half or three quarters. Rows of a stride s
(2..16) load s vectors and keep every s-th lane by shuffles; an input
dilation of 2 (a stride-2 convolution's input gradient) runs pairs of
vectors by output-column parity, so a kernel column reads every lane of a
vector or none and the holes cost nothing; other strides and dilations
read their lanes with a masked gather. A row of more vectors than one
chunk (VMAX) runs its chunks at the row's ends from constant columns and
those between with unmasked loads. Every shape is static except the
batch, so masks and offsets are mostly constants LLVM folds.
"""
from __future__ import annotations

from llvmlite import ir

from ..ops.conv import pair, quad
from .codegen import F32, I1, I64, PTR, vector_registers

ACC = 24            # vector accumulators a tile may use (but: `_accumulators`)
ACC_FEW = 12        # ... with 16 registers, where each input vector is one load
VMAX = 4            # vectors per output-row chunk
PARTIAL_LIMIT = 64 * 1024   # bytes of per-task partial sums for the kernel gradient
MAX_SHUFFLED_STRIDE = 16    # strides up to which a row's lanes come from loads and shuffles, not a gather
KG_REGS = {32: 31, 16: 15}   # a kernel gradient's tile: OT delta + KWT input vectors + OT*KWT sums, in this many
KG_KWT = {32: 5, 16: 3}      # kernel columns a kernel gradient's tile takes at most
INNER_IMAGE_ROWS = 8        # vector rows an image up to which the kernel gradient's images loop innermost


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class Tiles:
    """`total` split into `count` tiles of at most `most`, as evenly as can
    be: the first `r` tiles have q + 1 elements, the others q."""

    def __init__(self, total: int, most: int):
        self.count = _ceil(total, max(1, most))
        self.q, self.r = divmod(total, self.count)
        self.most = self.q + (self.r > 0)

    def start(self, cg, index):
        if self.r == 0:
            return cg.imul(index, self.q)
        b = cg.b
        extra = b.select(b.icmp_signed("<", index, cg.i64(self.r)), index, cg.i64(self.r))
        return cg.iadd(cg.imul(index, self.q), extra)

    def ranges(self) -> list[list[int]]:
        """The elements of each tile, in order."""
        starts = [k * self.q + min(k, self.r) for k in range(self.count)]
        return [list(range(a, a + self.q + (k < self.r))) for k, a in enumerate(starts)]

    def each_size(self, cg, index, body):
        """body(size) for tile `index`, one variant per tile size."""
        if self.r == 0:
            body(self.q)
            return
        with cg.b.if_else(cg.b.icmp_signed("<", index, cg.i64(self.r))) as (then, otherwise):
            with then:
                body(self.q + 1)
            with otherwise:
                body(self.q)


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

    def __init__(self, cg, geo: _Geometry, vw: int, ow0, V: int, kws, phase: bool = False,
                 interior: bool = False):
        self.cg, self.geo, self.vw, self.V = cg, geo, vw, V
        # every lane of the chunk inside the row and reading the input (`interior_chunk`):
        # plain loads, where masks built from a run-time chunk start outnumber the mask registers
        self.interior = interior
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
        # A stride (a strided convolution) or an input dilation of 2 (its input gradient)
        # reads contiguous input as plain loads and shuffles, where a gather per vector
        # took as long as the 16 FMAs that use it.
        self.paired = _shuffled_stride(geo, vw) or (vw % 2 == 0 and (geo.sw, geo.dw) == (1, 2))
        # An input dilation of 2 with vectors in pairs: vector 2q + p holds the output
        # columns of parity p (`phased`), so a kernel column meets either every lane of
        # a vector or none, and the holes cost nothing (`emit_conv2d` interleaves the pair)
        self.phased = phase and self.paired and geo.dw == 2 and V % 2 == 0
        if self.phased:
            self.spans = {(v, kw): self._phase_span(v, kw, lanes) for v in range(V) for kw in kws
                          if self.meets(v, kw)}
        elif self.paired:
            self.spans = {(v, kw): self._span(v, kw, lanes) for v in range(V) for kw in kws}

    def meets(self, v: int, kw: int) -> bool:
        """Whether kernel column kw reads input (not holes) in vector v."""
        return not self.phased or (v % 2 + kw - self.geo.pl) % 2 == 0

    def _phase_span(self, v: int, kw: int, lanes):
        """(first input column, [(0, mask)], None) of phased vector v at kernel column kw:
        lane j is output column out + 2 j + v % 2, which reads input column
        (out + v % 2 + kw - pl) / 2 + j."""
        cg, geo, vw = self.cg, self.geo, self.vw
        b = cg.b
        out = cg.iadd(self.ow0, (v // 2) * 2 * vw)       # even
        first = cg.iadd(b.ashr(out, cg.i64(1)), (v % 2 + kw - geo.pl) // 2)
        # lanes past the output row read the row's input and are never stored
        return first, [(0, self._in_row(first, lanes))], None

    def _in_row(self, first, lanes):
        return in_row(self.cg, first, lanes, self.geo.W)

    def unphase(self, vectors: list) -> list:
        """Phased accumulators (pairs of even, odd output columns) as output vectors."""
        if not self.phased:
            return vectors
        vw, b = self.vw, self.cg.b
        half = vw // 2

        def pick(base):
            idx = [base + j // 2 + (j % 2) * vw for j in range(vw)]
            return ir.Constant(ir.VectorType(ir.IntType(32), vw), [ir.Constant(ir.IntType(32), k) for k in idx])
        out = []
        for q in range(0, len(vectors), 2):
            even, odd = vectors[q], vectors[q + 1]
            out += [b.shuffle_vector(even, odd, pick(0)), b.shuffle_vector(even, odd, pick(half))]
        return out

    def _span(self, v: int, kw: int, lanes):
        """(first input column, [(offset, mask)] of the vectors to load, shuffle
        indices) of vector v at kernel column kw: the loads' masks keep them in the
        input's row; lanes a hole or padding are zeroed afterwards by `masks`."""
        cg, geo, vw = self.cg, self.geo, self.vw
        b = cg.b
        out = cg.iadd(self.ow0, v * vw)                 # even: chunks start at multiples of vw
        c = kw - geo.pl
        if geo.sw > 1:          # lane j reads column s (out + j) + c: every s-th element of s vectors
            first = cg.iadd(cg.imul(out, geo.sw), c)
            offsets = tuple(k * vw for k in range(geo.sw))
            picks = [geo.sw * j for j in range(vw)]
        else:                   # lane j reads column (out + j + c) / 2 when out + j + c is even
            lo = c % 2           # the first lane that is not a hole
            first = cg.iadd(b.ashr(out, cg.i64(1)), (lo + c) // 2)
            offsets = (0,)
            picks = [(j - lo) // 2 if (j - lo) % 2 == 0 else vw for j in range(vw)]   # vw: a zero
        return first, [(at, self._in_row(cg.iadd(first, at), lanes)) for at in offsets], picks

    def load(self, base, row_off, v: int, kw: int):
        cg, geo, vw = self.cg, self.geo, self.vw
        mask = None if self.interior else self.masks[v, kw]
        if geo.contiguous:
            off = cg.iadd(row_off, cg.iadd(cg.iadd(self.ow0, v * vw), kw - geo.pl))
            return cg.load(base, off, F32, vw, mask)
        if self.paired:
            first, loads, picks = self.spans[v, kw]
            start = cg.iadd(row_off, first)
            parts = [cg.load(base, cg.iadd(start, at), F32, vw, None if self.interior else ok) for at, ok in loads]
            if picks is None:       # phased: the load is the vector
                return parts[0]
            zero = ir.Constant(ir.VectorType(F32, vw), [ir.Constant(F32, 0.0)] * vw)
            picked = _picked(cg.b, parts, picks, zero)
            return picked if mask is None else cg.b.select(mask, picked, zero)
        return gather(cg, base, row_off, self.cols[v, kw], mask)


def in_row(cg, first, lanes, W: int):
    """Lane j of a vector loaded from column first + j of a row of W: inside the row?"""
    b, vw = cg.b, lanes.type.count
    vt_i = ir.VectorType(I64, vw)
    cols = b.add(cg.splat(first, vw), lanes)
    return b.and_(b.icmp_signed(">=", cols, ir.Constant(vt_i, [ir.Constant(I64, 0)] * vw)),
                  b.icmp_signed("<", cols, ir.Constant(vt_i, [ir.Constant(I64, W)] * vw)))


def _shuffled_stride(geo: _Geometry, vw: int) -> bool:
    """Whether a strided row's lanes come from loads and shuffles (`_RowReader.paired`)."""
    return vw % 2 == 0 and geo.dw == 1 and 2 <= geo.sw <= MAX_SHUFFLED_STRIDE


def interior_chunk(geo: _Geometry, ow0: int, V: int, vw: int) -> bool:
    """Whether the chunk of V vectors from output column ow0 reads only the input
    row's columns (no padding) at every kernel column: its loads need no mask.
    Such a chunk is inside the output row too (its last output column reads
    input column s (end - 1) + KW - 1 - pl < W, so end <= OW), so the kernel
    gradient's delta loads need none either. Strided rows load s vectors a
    vector (`_RowReader`)."""
    if geo.dw != 1 or (geo.sw > 1 and not _shuffled_stride(geo, vw)):
        return False
    end = ow0 + V * vw                       # the chunk's output columns [ow0, end)
    first = ow0 * geo.sw - geo.pl
    last = end * geo.sw - 1 + geo.KW - 1 - geo.pl      # a stride's last vector loads s vw columns
    inside = first >= 0 and last < geo.W
    assert end <= geo.OW or not inside
    return inside


def each_chunk(cg, geo: _Geometry, V: int, vw: int, chunks: int, chunk) -> None:
    """chunk(ow0, interior) for every chunk of V vectors of an output row: those at
    the row's ends from constant columns (their masks fold), those between, in no
    padding and inside the row (`interior_chunk`), in one loop of unmasked loads
    (masks from a run-time column outnumbered the mask registers: a 200-wide
    conv1d ran at 49% of the FMA peak, 87% so)."""
    if chunks == 1:
        chunk(cg.i64(0), False)
        return
    inner = [k for k in range(chunks) if interior_chunk(geo, k * V * vw, V, vw)]
    for k in range(chunks):
        if k not in inner:
            chunk(cg.i64(k * V * vw), False)
    if inner:
        assert inner == list(range(inner[0], inner[-1] + 1)), "interior chunks are one run"
        with cg.loop(len(inner), name="chunk") as ch:
            chunk(cg.imul(cg.iadd(ch, inner[0]), V * vw), True)


def _picked(b, parts: list, picks: list, zero):
    """Lane j = element picks[j] of the vectors `parts` end to end (an index past
    them: 0), by two-source shuffles: the first two vectors, then each next one."""
    vw = len(picks)

    def shuffle(x, y, idx):
        return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(ir.IntType(32), vw),
                                                  [ir.Constant(ir.IntType(32), k) for k in idx]))
    n = len(parts)
    out = shuffle(parts[0], parts[1] if n > 1 else zero,
                  [p if p < 2 * vw and (n > 1 or p < vw) else vw for p in picks])
    for k in range(2, n):
        out = shuffle(out, parts[k], [vw + p - k * vw if k * vw <= p < (k + 1) * vw else j
                                      for j, p in enumerate(picks)])
    return out


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


# -- conv2d ------------------------------------------------------------------------

def _pack_rows(geo: _Geometry, vw: int, epilogue) -> int:
    """How many output rows a task covers, packed end to end into its vectors.

    Rows narrower than the vectors would leave lanes idle (LeNet's 8x8 planes
    fill half a 16-lane vector); P consecutive rows are contiguous in NCHW, so
    they can share vectors, lanes [p*OW, (p+1)*OW) holding row p. The group's
    other operands must then vary along rows and columns alike."""
    if not geo.contiguous or geo.dh != 1 or geo.OW > VMAX * vw:
        return 1
    if epilogue is not None and any(v[2] != v[3] for v in epilogue.varying.values()):
        return 1

    def waste(P):
        return _ceil(geo.OH, P) * _ceil(P * geo.OW, vw) * vw - geo.OH * geo.OW

    best = 1
    for P in range(2, geo.OH + 1):
        if P * geo.OW > VMAX * vw:
            break
        if waste(P) < waste(best):
            best = P
    return best


def _two_row_columns(cg, rows, shift: int, OW: int, W: int, vw: int, zero):
    """The input vector of one kernel column for two packed output rows: lane
    j of row p's lanes [p OW, (p + 1) OW) is that row's input column
    j - p OW + shift, zero outside the input; one two-source shuffle of the
    rows (`rows[p]`, loaded whole) and a select, where two masked loads
    with a merge were needed per kernel column."""
    idx, keep = [], []
    for j in range(vw):
        p, src = j // OW, j % OW + shift
        ok = p < 2 and 0 <= src < W
        idx.append(p * vw + src if ok else 0)
        keep.append(ok)
    b = cg.b
    picked = b.shuffle_vector(rows[0], rows[1], ir.Constant(ir.VectorType(ir.IntType(32), vw),
                                                            [ir.Constant(ir.IntType(32), k) for k in idx]))
    return b.select(ir.Constant(ir.VectorType(I1, vw), [ir.Constant(I1, int(k)) for k in keep]), picked, zero)


def _masked_load(cg, base, off, vw, mask, passthru):
    """base[off + lane] where mask is set, passthru elsewhere."""
    vt = ir.VectorType(F32, vw)
    name = f"llvm.masked.load.v{vw}f32.p0"
    fn = cg.declare(name, vt, [PTR, ir.IntType(32), mask.type, vt])
    return cg.b.call(fn, [cg.gep(base, off), ir.Constant(ir.IntType(32), 4), mask, passthru])


def _accumulators(geo: _Geometry, vw: int, P: int, chunks: int) -> int:
    """Vector accumulators a conv2d tile may use. With AVX-512's 32 registers,
    ACC. With 16, ACC spills, and that still costs less than loading each
    input vector again for half the output channels where a vector takes
    several loads (packed rows that share a vector, a stride's loads and
    shuffles, a gather): with ACC_FEW for all, LeNet-5's step ran 18% slower
    (its input gradient packs two 14-wide rows a vector). Where each input
    vector is one load, ACC_FEW: a 1-D convolution over 200-wide rows took
    26% less time, patch_embed's 1x1 convolution 41% less (Zen 1)."""
    if vector_registers(vw) == 32:
        return ACC
    if geo.contiguous and geo.dh == 1 and chunks == 1:      # `packed`: a vector spans rows unless OW % vw == 0
        one_load = P == 1 or geo.OW % vw == 0
    else:                                                   # `chunked`: a load a vector, or phased pairs
        one_load = geo.sw == 1 and geo.dw in (1, 2)
    return ACC_FEW if one_load else ACC


def emit_conv2d(kb, node, epilogue) -> None:
    graph = kb.graph
    x_id, w_id = node.inputs
    O, C, KH, KW = graph.nodes[w_id].shape
    geo = _Geometry(graph.nodes[x_id].shape, (KH, KW), node.shape[2:], node.attrs)
    vw = kb.vector_width
    V, chunks = geo.row_chunks(vw)
    P = _pack_rows(geo, vw, epilogue) if chunks == 1 else 1
    if P > 1:
        V = _ceil(P * geo.OW, vw)
    groups = _ceil(geo.OH, P)
    ot_tiles = Tiles(O, min(16, _accumulators(geo, vw, P, chunks) // V))
    n_ot = ot_tiles.count
    N = geo.N

    def tasks(cg):
        return cg.imul(cg.dim(N), n_ot * groups)

    cost = ot_tiles.most * V * chunks * C * KH * KW

    with kb.kernel(f"conv{node.id}", tasks, cost=cost, skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        b = cg.b
        X, Wt = cg.ptr(x_id), cg.ptr(w_id)
        vt = ir.VectorType(F32, vw)
        zero = ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)
        lanes = _lanes(cg, vw)
        with cg.loop(hi, start=lo, name="task") as t:
            oh = cg.imul(b.srem(t, cg.i64(groups)), P)
            rest = b.sdiv(t, cg.i64(groups))
            ot = b.srem(rest, cg.i64(n_ot))
            n = b.sdiv(rest, cg.i64(n_ot))
            o0 = ot_tiles.start(cg, ot)

            def accumulate(ot_size, acc, kernel_row):
                """Σ over kernel rows and input channels: kernel_row(kh, c, ...) adds one row's worth."""
                def per_kh(kh, valid):
                    with cg.loop(C, name="c") as c:
                        kernel_row(kh, c, valid)
                if P == 1:
                    _rows(cg, geo, oh, KH, lambda kh, ih: per_kh(kh, None))
                    return
                # the union of the packed rows' kernel-row ranges; rows outside are masked lanes
                top = cg.iadd(cg.imul(oh, geo.sh), -geo.pt)
                klo = b.sub(cg.i64(0), cg.iadd(top, (P - 1) * geo.sh))
                klo = b.select(b.icmp_signed(">", klo, cg.i64(0)), klo, cg.i64(0))
                khi = b.sub(cg.i64(geo.H), top)
                khi = b.select(b.icmp_signed("<", khi, cg.i64(KH)), khi, cg.i64(KH))
                with cg.loop(khi, start=klo, name="kh") as kh:
                    valid = []
                    for p in range(P):
                        ih = cg.iadd(cg.iadd(top, p * geo.sh), kh)
                        ok = _and(cg, b.icmp_signed(">=", ih, cg.i64(0)), b.icmp_signed("<", ih, cg.i64(geo.H)),
                                  b.icmp_signed("<", cg.iadd(oh, p), cg.i64(geo.OH)))
                        valid.append(cg.splat(ok, vw))
                    per_kh(kh, valid)

            def packed(ot_size):
                """One chunk covering P whole rows (P = 1: one row): masks are constants."""
                acc = [[cg.var(vt, zero) for _ in range(V)] for _ in range(ot_size)]
                # segments: (vector, packed row, first lane, end lane)
                segs = [(v, p, max(v * vw, p * geo.OW) - v * vw, min((v + 1) * vw, (p + 1) * geo.OW) - v * vw)
                        for v in range(V) for p in range(P)]
                segs = [s for s in segs if s[2] < s[3]]

                def kernel_row(kh, c, valid):
                    top = cg.iadd(cg.imul(oh, geo.sh), -geo.pt)
                    plane = cg.imul(cg.iadd(cg.imul(n, C), c), geo.H * geo.W)
                    wbase = cg.iadd(cg.imul(cg.iadd(cg.imul(o0, C), c), KH * KW), cg.imul(kh, KW))
                    for kw in range(KW):
                        xv = [zero] * V
                        for v, p, a, e in segs:
                            shift = v * vw - p * geo.OW + kw - geo.pl      # input column of lane 0
                            bits = [a <= j < e and 0 <= j + shift < geo.W for j in range(vw)]
                            if not any(bits):
                                continue
                            row = cg.iadd(plane, cg.imul(cg.iadd(cg.iadd(top, p * geo.sh), kh), geo.W))
                            off = cg.iadd(row, shift)
                            mask = ir.Constant(ir.VectorType(I1, vw), [ir.Constant(I1, int(x)) for x in bits])
                            if valid is not None:
                                mask = b.and_(mask, valid[p])
                            if all(bits) and valid is None:
                                xv[v] = cg.load(X, off, F32, vw)
                            else:
                                xv[v] = _masked_load(cg, X, off, vw, mask, xv[v])
                        for o in range(ot_size):
                            wv = cg.splat(cg.load(Wt, cg.iadd(wbase, o * C * KH * KW + kw)), vw)
                            for v in range(V):
                                b.store(cg.fma(wv, xv[v], b.load(acc[o][v])), acc[o][v])

                accumulate(ot_size, acc, kernel_row)
                rows_here = cg.imin(cg.i64(P), b.sub(cg.i64(geo.OH), oh)) if geo.OH % P else cg.i64(P)
                limit = cg.imul(rows_here, geo.OW)
                for o in range(ot_size):
                    for v in range(V):
                        mask = b.icmp_signed("<", b.add(cg.splat(cg.i64(v * vw), vw), lanes), cg.splat(limit, vw))
                        epilogue.emit(cg, [n, cg.iadd(o0, o), oh, cg.i64(v * vw)], vw, mask,
                                      given={epilogue.anchor: b.load(acc[o][v])})

            def chunked(ow0, ot_size, interior=False):
                """A chunk of V vectors of one long (or strided) row."""
                rd = _RowReader(cg, geo, vw, ow0, V, range(KW), phase=True, interior=interior)
                acc = [[cg.var(vt, zero) for _ in range(V)] for _ in range(ot_size)]

                def kernel_row(kh, c, valid):
                    ih = cg.iadd(cg.iadd(cg.imul(oh, geo.sh), -geo.pt), kh)
                    if geo.dh != 1:
                        ih = b.sdiv(ih, cg.i64(geo.dh))
                    row = cg.imul(cg.iadd(cg.imul(cg.iadd(cg.imul(n, C), c), geo.H), ih), geo.W)
                    wbase = cg.iadd(cg.imul(cg.iadd(cg.imul(o0, C), c), KH * KW), cg.imul(kh, KW))
                    for kw in range(KW):
                        vs = [v for v in range(V) if rd.meets(v, kw)]
                        xv = {v: rd.load(X, row, v, kw) for v in vs}
                        for o in range(ot_size):
                            wv = cg.splat(cg.load(Wt, cg.iadd(wbase, o * C * KH * KW + kw)), vw)
                            for v in vs:
                                b.store(cg.fma(wv, xv[v], b.load(acc[o][v])), acc[o][v])

                accumulate(ot_size, acc, kernel_row)
                for o in range(ot_size):
                    sums = rd.unphase([b.load(acc[o][v]) for v in range(V)])
                    for v in range(V):
                        col = cg.iadd(ow0, v * vw)
                        mask = b.icmp_signed("<", b.add(cg.splat(col, vw), lanes),
                                             cg.splat(cg.i64(geo.OW), vw))
                        epilogue.emit(cg, [n, cg.iadd(o0, o), oh, col], vw, mask,
                                      given={epilogue.anchor: sums[v]})

            def body(ot_size):
                if geo.contiguous and geo.dh == 1 and chunks == 1:
                    packed(ot_size)
                else:
                    each_chunk(cg, geo, V, vw, chunks, lambda ow0, interior: chunked(ow0, ot_size, interior))

            ot_tiles.each_size(cg, ot, body)


# -- conv2d_kernel_grad ----------------------------------------------------------------

def bias_sibling(graph, nid):
    """A `sum(delta, axes=(0, 2, 3))` (the bias gradient) the kernel-gradient
    node `nid` can compute while it reads the delta anyway."""
    g_id = graph.nodes[nid].inputs[1]
    for u in graph.users(g_id):
        node = graph.nodes[u]
        if node.op.name == "sum" and not node.attrs.get("keepdims") and \
                tuple(sorted(a % 4 for a in node.attrs.get("axes") or ())) == (0, 2, 3):
            return u
    return None


def emit_kernel_grad(kb, node, parts: int = 1) -> None:
    """`parts` > 1: a `conv2d_kernel_grad_parts`, part p over the images
    [N p / parts, N (p + 1) / parts) into its own [O, C, KH, KW] block (and the
    bias gradient's parts, [parts, O], when they are in its group). The parts
    are the outer task index, so each thread's share is a range of images:
    the delta it wrote (the pooling's routing before splits by images)."""
    graph = kb.graph
    x_id, g_id = node.inputs
    O, C, KH, KW = node.shape[-4:]
    gshape = graph.nodes[g_id].shape
    geo = _Geometry(graph.nodes[x_id].shape, (KH, KW), gshape[2:], node.attrs)
    if _pointwise(geo):
        _emit_pointwise_kernel_grad(kb, node, geo, parts)
        return
    vw = kb.vector_width
    V, chunks = geo.row_chunks(vw)
    P = 1
    if geo.contiguous and geo.dh == 1 and geo.sh == 1 and chunks == 1:
        P = _pack_rows(geo, vw, None)
        V = _ceil(P * geo.OW, vw)
    # two packed rows that each fit a vector: their input rows are loaded once, then shuffled
    two_rows = P == 2 and V == 1 and geo.W <= vw
    # OT delta vectors + KWT input vectors + OT*KWT accumulators in the registers but one.
    # AVX2's 16 take 3 x 3 (OT x KWT): with AVX-512's 7 x 3 (spilling) a CNN of 3x3
    # kernels trained 11% slower a step, LeNet-5 (5x5: 1 x 5 or 4 x 5) 3% (Zen 1)
    regs = vector_registers(vw)
    kw_tiles = Tiles(KW, KG_KWT[regs])
    KWT = kw_tiles.most
    ot_tiles = Tiles(O, max(1, min(16, (KG_REGS[regs] - KWT) // (KWT + 1))))
    OT, n_ot = ot_tiles.most, ot_tiles.count
    # Input channels per task: per-lane partial sums of a task stay within 32 KiB,
    # and the delta tile of an image is read once per block of channels.
    CB = max(1, min(C, (32 * 1024) // (OT * KH * KW * vw * 4)))
    n_cb = _ceil(C, CB)
    CB = _ceil(C, n_cb)
    # Kernel rows as tasks of their own only when there would be one task
    # otherwise (it was: fewer than 8), since each such task reads the whole
    # delta again: LeNet-5's first convolution has 2 tile tasks; split 5 ways
    # they read its 0.9 MB delta 10 times (129 us), as 2 tasks 108 us, and the
    # step ran 2.5% faster at 1 and at 2 threads (Intel, 2 cores)
    kh_blocks = KH if n_ot * n_cb * parts < 2 else 1
    KHB = KH // kh_blocks
    partial = OT * CB * KHB * KW * vw * 4 <= PARTIAL_LIMIT
    # Few vector rows an image (LeNet-5's 8x8 planes, two rows a vector: 4): the
    # per-image partial sums would cost as much as the FMAs, so the loop over the
    # images goes inside the channels and kernel rows, the sums in registers
    # across the batch (45% -> 82% of peak); with more, image by image (the
    # 32x32 planes of the conv benchmark: 1.2x slower the other way, the delta
    # tile read again for every channel and kernel row)
    inner_images = _ceil(geo.OH, P) * V * chunks <= INNER_IMAGE_ROWS
    N = geo.N
    group = next((gr for gr in graph.groups if node.id in gr.members), None)
    bias = next((m for m in (group.members if group else []) if m != node.id), None)

    per_part = n_ot * n_cb * kh_blocks
    tasks = parts * per_part

    def cost(cg):
        return cg.imul(cg.ceil_div(cg.dim(N), parts), geo.OH * V * chunks * OT * CB * KHB * KW)

    with kb.kernel(f"convk{node.id}", tasks, cost=cost, skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        b = cg.b
        X, G, D0 = cg.ptr(x_id), cg.ptr(g_id), cg.ptr(node.id)
        B0 = cg.ptr(bias) if bias is not None else None
        vt = ir.VectorType(F32, vw)
        zero = ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)
        lanes = _lanes(cg, vw)
        if partial and not inner_images:
            part = cg.var(ir.ArrayType(F32, OT * CB * KHB * KW * vw))
            part.type = PTR
        with cg.loop(hi, start=lo, name="task") as t:
            images, t = b.sdiv(t, cg.i64(per_part)), b.srem(t, cg.i64(per_part))
            # this part's images, and where its blocks of the gradients start
            n_lo, n_hi = _part_images(cg, N, images, parts)
            D = b.gep(D0, [cg.imul(images, O * C * KH * KW)], source_etype=F32)
            B = b.gep(B0, [cg.imul(images, O)], source_etype=F32) if B0 is not None else None
            khb = b.srem(t, cg.i64(kh_blocks))
            rest = b.sdiv(t, cg.i64(kh_blocks))
            cb = b.srem(rest, cg.i64(n_cb))
            ot = b.sdiv(rest, cg.i64(n_cb))
            o0 = ot_tiles.start(cg, ot)
            kh0 = cg.imul(khb, KHB)
            c0 = cg.imul(cb, CB)
            c1 = cg.imin(cg.iadd(c0, CB), cg.i64(C))

            def dw_index(o, c, kh, kw):
                # dw[o0 + o, c, kh0 + kh, kw]
                return cg.iadd(cg.imul(cg.iadd(cg.imul(cg.iadd(o0, o), C), c), KH * KW),
                               cg.iadd(cg.imul(cg.iadd(kh0, kh), KW), kw))

            def part_index(o, cl, khl, kw):
                return cg.imul(cg.iadd(cg.imul(cg.iadd(cg.imul(cg.iadd(cg.imul(cg.i64(o), CB), cl), KHB), khl),
                                               KW), kw), vw)

            def packed_rows(kh, xplane, gplane, kws, acc, ot_size):
                """P delta rows at a time, end to end in V vectors (rows narrower than a vector)."""
                # output rows oh with input row oh + kh - pt inside the input
                rlo = b.sub(cg.i64(geo.pt), kh)
                rlo = b.select(b.icmp_signed(">", rlo, cg.i64(0)), rlo, cg.i64(0))
                rhi = b.sub(cg.i64(geo.H + geo.pt), kh)
                rhi = b.select(b.icmp_signed("<", rhi, cg.i64(geo.OH)), rhi, cg.i64(geo.OH))
                count = b.sdiv(cg.iadd(b.sub(rhi, rlo), P - 1), cg.i64(P))
                segs = [(v, p, max(v * vw, p * geo.OW) - v * vw, min((v + 1) * vw, (p + 1) * geo.OW) - v * vw)
                        for v in range(V) for p in range(P)]
                segs = [sg for sg in segs if sg[2] < sg[3]]
                with cg.loop(count, name="ohp") as k:
                    oh = cg.iadd(rlo, cg.imul(k, P))
                    rows_here = cg.imin(cg.i64(P), b.sub(rhi, oh))
                    limit = cg.splat(cg.imul(rows_here, geo.OW), vw)
                    live = [cg.splat(b.icmp_signed("<", cg.i64(p), rows_here), vw) for p in range(P)]
                    top = cg.iadd(xplane, cg.imul(b.sub(cg.iadd(oh, kh), cg.i64(geo.pt)), geo.W))
                    if two_rows:        # both input rows once; each kernel column's vector is one shuffle of them
                        inside = ir.Constant(ir.VectorType(I1, vw),
                                             [ir.Constant(I1, int(j < geo.W)) for j in range(vw)])
                        rows = [_masked_load(cg, X, cg.iadd(top, p * geo.W), vw, b.and_(inside, live[p]), zero)
                                for p in range(2)]

                    def columns(v, kw):     # the input vector meeting delta vector v for kernel column kw
                        if two_rows:
                            return _two_row_columns(cg, rows, kw - geo.pl, geo.OW, geo.W, vw, zero)
                        xv = zero
                        for sv, p, a, e in segs:
                            if sv != v:
                                continue
                            shift = v * vw - p * geo.OW + kw - geo.pl
                            bits = [a <= j < e and 0 <= j + shift < geo.W for j in range(vw)]
                            if not any(bits):
                                continue
                            mask = b.and_(ir.Constant(ir.VectorType(I1, vw), [ir.Constant(I1, int(x)) for x in bits]),
                                          live[p])
                            xv = _masked_load(cg, X, cg.iadd(cg.iadd(top, p * geo.W), shift), vw, mask, xv)
                        return xv

                    for v in range(V):
                        gmask = b.icmp_signed("<", b.add(cg.splat(cg.i64(v * vw), vw), lanes), limit)
                        at = cg.iadd(gplane, cg.iadd(cg.imul(oh, geo.OW), v * vw))
                        gv = [cg.load(G, cg.iadd(at, o * geo.OH * geo.OW), F32, vw, gmask) for o in range(ot_size)]
                        for i, kw in enumerate(kws):
                            xv = columns(v, kw)
                            for o in range(ot_size):
                                b.store(cg.fma(gv[o], xv, b.load(acc[o][i])), acc[o][i])

            def gplane_of(n):       # where image n's delta planes o0, o0 + 1, ... start
                return cg.imul(cg.iadd(cg.imul(n, O), o0), geo.OH * geo.OW)

            def xplane_of(n, c):    # where image n's input plane c starts
                return cg.imul(cg.iadd(cg.imul(n, C), c), geo.H * geo.W)

            def add_bias_sums(gplane, bacc, ot_size):
                """bacc[o] += the lanes of one image's delta plane o0 + o (the bias gradient)."""
                _add_plane_sums(cg, G, gplane, geo.OH * geo.OW, bacc[:ot_size], vw)

            def plane(kh, xplane, gplane, kws, acc, ot_size):
                """acc[o][i] += one image's products for kernel row kh and columns kws."""
                if P != 1:
                    packed_rows(kh, xplane, gplane, kws, acc, ot_size)
                    return

                def out_row(oh, ih):
                    grow = cg.iadd(gplane, cg.imul(oh, geo.OW))
                    xrow = cg.iadd(xplane, cg.imul(ih, geo.W))

                    def chunk(ow0, interior):
                        rd = _RowReader(cg, geo, vw, ow0, V, kws, interior=interior)
                        for v in range(V):
                            col = cg.iadd(ow0, v * vw)
                            gmask = None if interior else \
                                b.icmp_signed("<", b.add(cg.splat(col, vw), lanes), cg.splat(cg.i64(geo.OW), vw))
                            gv = [cg.load(G, cg.iadd(cg.iadd(grow, o * geo.OH * geo.OW), col), F32, vw, gmask)
                                  for o in range(ot_size)]
                            for i, kw in enumerate(kws):
                                xv = rd.load(X, xrow, v, kw)
                                for o in range(ot_size):
                                    b.store(cg.fma(gv[o], xv, b.load(acc[o][i])), acc[o][i])

                    each_chunk(cg, geo, V, vw, chunks, chunk)
                _out_rows(cg, geo, kh, out_row)

            def images_outside(ot_size):
                if partial:
                    with cg.loop(ot_size * CB * KHB * KW, name="pz", unroll=False) as p:
                        cg.store(zero, part, cg.imul(p, vw))
                else:
                    for o in range(ot_size):
                        with cg.loop(c1, start=c0, name="dzc", unroll=False) as c:
                            with cg.loop(KHB * KW, name="dz", unroll=False) as p:
                                cg.store(cg.const(0.0, F32), D, cg.iadd(dw_index(o, c, 0, 0), p))
                if bias is not None:
                    bacc = [cg.var(vt, zero) for _ in range(ot_size)]
                    first = b.and_(b.icmp_signed("==", cb, cg.i64(0)), b.icmp_signed("==", khb, cg.i64(0)))

                def image(n):
                    gplane = gplane_of(n)
                    if bias is not None:
                        # the bias gradient: Σ of the delta, read while it is hot
                        with cg.if_(first):
                            add_bias_sums(gplane, bacc, ot_size)

                    def channel(c):
                        cl = b.sub(c, c0)
                        xplane = xplane_of(n, c)

                        def kernel_row(khl):
                            kh = cg.iadd(kh0, khl)
                            for kws in kw_tiles.ranges():
                                acc = [[cg.var(vt, zero) for _ in kws] for _ in range(ot_size)]
                                plane(kh, xplane, gplane, kws, acc, ot_size)
                                for o in range(ot_size):
                                    for i, kw in enumerate(kws):
                                        a = b.load(acc[o][i])
                                        if partial:
                                            p = part_index(o, cl, khl, kw)
                                            cg.store(cg.add(cg.load(part, p, F32, vw), a), part, p)
                                        else:
                                            at = dw_index(o, c, khl, kw)
                                            cg.store(cg.add(cg.load(D, at), cg.hsum(a)), D, at)

                        with cg.loop(KHB, name="khl") as khl:
                            kernel_row(khl)

                    with cg.loop(c1, start=c0, name="c") as c:
                        channel(c)

                with cg.loop(n_hi, start=n_lo, name="n") as n:
                    image(n)

                if partial:
                    for o in range(ot_size):
                        with cg.loop(c1, start=c0, name="psc", unroll=False) as c:
                            with cg.loop(KHB * KW, name="ps", unroll=False) as p:
                                at = cg.iadd(part_index(o, b.sub(c, c0), 0, 0), cg.imul(p, vw))
                                cg.store(cg.hsum(cg.load(part, at, F32, vw)), D, cg.iadd(dw_index(o, c, 0, 0), p))
                if bias is not None:
                    with cg.if_(first):
                        for o in range(ot_size):
                            cg.store(cg.hsum(b.load(bacc[o])), B, cg.iadd(o0, o))

            def images_inside(ot_size):
                if bias is not None:
                    # the bias gradient: the delta's sum, by the task of the first channels and kernel rows
                    first = b.and_(b.icmp_signed("==", cb, cg.i64(0)), b.icmp_signed("==", khb, cg.i64(0)))
                    with cg.if_(first):
                        bacc = [cg.var(vt, zero) for _ in range(ot_size)]
                        with cg.loop(n_hi, start=n_lo, name="bn") as n:
                            add_bias_sums(gplane_of(n), bacc, ot_size)
                        for o in range(ot_size):
                            cg.store(cg.hsum(b.load(bacc[o])), B, cg.iadd(o0, o))

                def kernel_row(c, khl):
                    kh = cg.iadd(kh0, khl)
                    for kws in kw_tiles.ranges():
                        # the accumulators run over every image: one horizontal sum per weight at the end
                        acc = [[cg.var(vt, zero) for _ in kws] for _ in range(ot_size)]
                        with cg.loop(n_hi, start=n_lo, name="n") as n:
                            plane(kh, xplane_of(n, c), gplane_of(n), kws, acc, ot_size)
                        for o in range(ot_size):
                            for i, kw in enumerate(kws):
                                cg.store(cg.hsum(b.load(acc[o][i])), D, dw_index(o, c, khl, kw))

                # (not unrolled: O3 would copy the whole loop over the images per channel and kernel row)
                with cg.loop(c1, start=c0, name="c", unroll=False) as c:
                    with cg.loop(KHB, name="khl", unroll=False) as khl:
                        kernel_row(c, khl)

            body = images_inside if inner_images else images_outside
            ot_tiles.each_size(cg, ot, body)


def _pointwise(geo: _Geometry) -> bool:
    """A 1x1 kernel over the plane as it is (stride 1, no padding, no dilation):
    the input and delta planes are the same flat vectors."""
    return ((geo.KH, geo.KW, geo.sh, geo.sw, geo.dh, geo.dw) == (1,) * 6
            and (geo.pt, geo.pb, geo.pl, geo.pr) == (0,) * 4)


# a pointwise kernel gradient's tile (OT delta + CT input vectors, OT*CT sums) by vector
# registers: AVX2's 16 take 3 x 4 (4 x 6 spilled: patch_embed's ran at 51% of the FMA peak, 3 x 4 at 99%)
PW_TILE = {32: (4, 6), 16: (3, 4)}


def _emit_pointwise_kernel_grad(kb, node, geo: _Geometry, parts: int) -> None:
    """dw[o, c] = Σ_n Σ_p g[n, o, p] x[n, c, p]: a product of [O, plane] and
    [plane, C] per image. A task owns an OT x CT block of dw and keeps its sums
    in registers over all its images (one horizontal sum per weight at the
    end); each vector step loads OT + CT vectors for OT * CT FMAs. The general
    kernel gradient tiles kernel columns, of which a 1x1 kernel has one: OT + 1
    loads for OT FMAs, 42-58% of the FMA peak on a 96- or 64-channel 1x1
    convolution. Tasks go channel tile by channel tile, the output tiles
    innermost, so a thread's input block stays in cache while the delta
    streams by; the bias gradient (in the group) is summed by the tasks of
    the first channel tile."""
    graph = kb.graph
    x_id, g_id = node.inputs
    N, C, O = geo.N, geo.C, node.shape[-4]
    plane = geo.OH * geo.OW
    vw = kb.vector_width
    full, tail = divmod(plane, vw)
    pw_ot, pw_ct = PW_TILE[vector_registers(vw)]
    ot_tiles, ct_tiles = Tiles(O, pw_ot), Tiles(C, pw_ct)
    per_part = ot_tiles.count * ct_tiles.count
    group = next((gr for gr in graph.groups if node.id in gr.members), None)
    bias = next((m for m in (group.members if group else []) if m != node.id), None)

    def cost(cg):
        return cg.imul(cg.ceil_div(cg.dim(N), parts), plane * ot_tiles.most * ct_tiles.most)

    with kb.kernel(f"convk{node.id}", parts * per_part, cost=cost, skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        b = cg.b
        X, G, D0 = cg.ptr(x_id), cg.ptr(g_id), cg.ptr(node.id)
        B0 = cg.ptr(bias) if bias is not None else None
        vt = ir.VectorType(F32, vw)
        zero = ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)
        tail_mask = ir.Constant(ir.VectorType(I1, vw), [ir.Constant(I1, int(j < tail)) for j in range(vw)])
        with cg.loop(hi, start=lo, name="task") as t:
            images, t = b.sdiv(t, cg.i64(per_part)), b.srem(t, cg.i64(per_part))
            n_lo, n_hi = _part_images(cg, N, images, parts)
            D = b.gep(D0, [cg.imul(images, O * C)], source_etype=F32)
            ct, ot = b.sdiv(t, cg.i64(ot_tiles.count)), b.srem(t, cg.i64(ot_tiles.count))
            o0, c0 = ot_tiles.start(cg, ot), ct_tiles.start(cg, ct)

            def block(ot_size, ct_size):
                acc = [[cg.var(vt, zero) for _ in range(ct_size)] for _ in range(ot_size)]

                def step(gat, xat, mask):
                    gv = [cg.load(G, cg.iadd(gat, o * plane), F32, vw, mask) for o in range(ot_size)]
                    for c in range(ct_size):
                        xv = cg.load(X, cg.iadd(xat, c * plane), F32, vw, mask)
                        for o in range(ot_size):
                            b.store(cg.fma(gv[o], xv, b.load(acc[o][c])), acc[o][c])

                with cg.loop(n_hi, start=n_lo, name="n") as n:
                    gat = cg.imul(cg.iadd(cg.imul(n, O), o0), plane)
                    xat = cg.imul(cg.iadd(cg.imul(n, C), c0), plane)
                    if full:
                        with cg.loop(full, name="v", unroll=False) as v:
                            j = cg.imul(v, vw)
                            step(cg.iadd(gat, j), cg.iadd(xat, j), None)
                    if tail:
                        step(cg.iadd(gat, full * vw), cg.iadd(xat, full * vw), tail_mask)
                for o in range(ot_size):
                    row = cg.imul(cg.iadd(o0, o), C)
                    for c in range(ct_size):
                        cg.store(cg.hsum(b.load(acc[o][c])), D, cg.iadd(row, cg.iadd(c0, c)))

            ot_tiles.each_size(cg, ot, lambda ot_size: ct_tiles.each_size(
                cg, ct, lambda ct_size: block(ot_size, ct_size)))
            if bias is not None:
                # the bias gradient: the delta's sum, by the tasks of the first channel tile
                with cg.if_(b.icmp_signed("==", ct, cg.i64(0))):
                    B = b.gep(B0, [cg.imul(images, O)], source_etype=F32)

                    def bias_sums(ot_size):
                        bacc = [cg.var(vt, zero) for _ in range(ot_size)]
                        with cg.loop(n_hi, start=n_lo, name="bn") as n:
                            _add_plane_sums(cg, G, cg.imul(cg.iadd(cg.imul(n, O), o0), plane), plane, bacc, vw)
                        for o in range(ot_size):
                            cg.store(cg.hsum(b.load(bacc[o])), B, cg.iadd(o0, o))
                    ot_tiles.each_size(cg, ot, bias_sums)


def emit_bias_grad_parts(kb, node) -> None:
    """A `conv2d_bias_grad_parts` outside its kernel gradient's group: one task
    per part and channel, the sum of its images' planes of the delta."""
    g_id = node.inputs[1]
    N, O, OH, OW = kb.graph.nodes[g_id].shape
    parts = node.attrs["parts"]
    vw = kb.vector_width
    plane = OH * OW
    with kb.kernel(f"biasparts{node.id}", parts * O, cost=lambda cg: cg.imul(cg.dim(N), plane)) as (cg, lo, hi):
        b = cg.b
        G, out = cg.ptr(g_id), cg.ptr(node.id)
        zero = cg.const(0.0, ir.VectorType(F32, vw))
        with cg.loop(hi, start=lo, name="task") as t:
            part, o = b.sdiv(t, cg.i64(O)), b.srem(t, cg.i64(O))
            n_lo, n_hi = _part_images(cg, N, part, parts)
            acc = cg.var(zero.type, zero)
            with cg.loop(n_hi, start=n_lo, name="n") as n:
                _add_plane_sums(cg, G, cg.imul(cg.iadd(cg.imul(n, O), o), plane), plane, [acc], vw)
            cg.store(cg.hsum(b.load(acc)), out, t)


def _part_images(cg, N, part, parts: int):
    """[N part / parts, N (part + 1) / parts): the images of a part of the batch."""
    b = cg.b
    return (b.sdiv(cg.imul(cg.dim(N), part), cg.i64(parts)),
            b.sdiv(cg.imul(cg.dim(N), cg.iadd(part, 1)), cg.i64(parts)))


def _add_plane_sums(cg, G, at, plane: int, accs, vw: int) -> None:
    """accs[k] += the lanes of the `plane` floats of G from at + k * plane (vector slots)."""
    b = cg.b
    with cg.loop(_ceil(plane, vw), name="bv") as bv:
        j = cg.imul(bv, vw)
        m = b.icmp_signed("<", b.add(cg.splat(j, vw), _lanes(cg, vw)), cg.splat(cg.i64(plane), vw))
        for k, acc in enumerate(accs):
            b.store(cg.add(b.load(acc), cg.load(G, cg.iadd(at, cg.iadd(j, k * plane)), F32, vw, m)), acc)


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
