"""The register-tiled matmul kernel: C = op(A) @ B with a fused epilogue.

A task is one block of rows (MB) by one panel of NR = 2 vectors of columns.
Within it, tiles of MR rows x NR columns accumulate in MR*2 vector
registers: each step over k loads two vectors of B and broadcasts MR
elements of A (folded into the FMA as memory operands on x86). With 32
AVX-512 registers, MR = 12 leaves room for the B vectors and the broadcast.

A is read in place through two strides, so `A^T @ B` (a weight gradient)
needs no copy. B must be row-major [K, N]; the `legalize` pass puts a
`transpose` node before a matmul whose right operand is transposed.

The finished tile goes to a small stack buffer, and one masked loop applies
the group's epilogue (bias, activation, derivative mask...) and stores the
group's outputs, so the epilogue is emitted once per kernel, not per tile
shape. When K exceeds KC, the k loop is blocked so a B panel block stays in
L1; partial sums then go through the group's first output buffer.
"""
from __future__ import annotations

from llvmlite import ir

from .codegen import CG, F32, I64, PTR

KC = 384   # k-block: KC x NR floats of B = 48 KiB at NR = 32
MB = 192   # rows per task


def tile_rows(vw: int) -> tuple[int, ...]:
    """Row counts of the tile variants, largest first (remainders by halving)."""
    return (12, 4, 1) if vw == 16 else (6, 2, 1)


def emit_gemm(kb, *, M, N, K, a_buf, a_row_stride, a_k_stride, b_buf, epilogue, scratch, name):
    """Emit the kernel. `M, N, K` and the strides are callables cg -> i64 value
    (they are needed in the entry function for the task count as well as in
    the kernel); `epilogue` is a FusedExpr over [M, N] whose anchor is C;
    `scratch` is an [M, N] f32 buffer the group writes (for partial sums)."""
    vw = kb.vector_width
    nr = 2 * vw
    rows = tile_rows(vw)

    def tasks(cg):
        return cg.imul(cg.ceil_div(N(cg), nr), cg.ceil_div(M(cg), MB))

    def cost(cg):
        return cg.imul(K(cg), 2 * MB * nr)

    with kb.kernel(name, tasks, cost=cost) as (cg, lo, hi):
        b = cg.b
        t = _Ctx(cg, vw, M(cg), N(cg), K(cg), a_row_stride(cg), a_k_stride(cg),
                 cg.ptr(a_buf), cg.ptr(b_buf), cg.ptr(scratch), epilogue)
        t.tile = cg.var(ir.ArrayType(F32, rows[0] * nr))
        t.tile.type = ir.PointerType()
        row_blocks = cg.ceil_div(t.m, MB)
        with cg.loop(hi, start=lo, name="task") as task:
            panel = b.sdiv(task, row_blocks)
            i_begin = cg.imul(b.srem(task, row_blocks), MB)
            i_end = cg.imin(cg.iadd(i_begin, MB), t.m)
            t.j0 = cg.imul(panel, nr)
            t.width = b.sub(cg.imin(cg.iadd(t.j0, nr), t.n), t.j0)
            t.masks = [cg.lane_mask(b.sub(t.width, cg.i64(v * vw)), vw) for v in range(2)]
            # column shape of this panel: two full vectors, two with a partial one, or one partial
            full = b.icmp_signed("==", t.width, cg.i64(nr))
            wide = b.icmp_signed(">", t.width, cg.i64(vw))
            col_kinds = [(full, 2, False), (b.and_(b.not_(full), wide), 2, True),
                         (b.not_(wide), 1, True)]
            with cg.loop(t.k, name="k0", step=KC) as k0:
                t.k0 = k0
                t.k_end = cg.imin(cg.iadd(k0, KC), t.k)
                t.first = b.icmp_signed("==", k0, cg.i64(0))
                t.last = b.icmp_signed("==", t.k_end, t.k)
                i = cg.var(I64, i_begin)
                with cg.while_(lambda: b.icmp_signed("<", b.load(i), i_end)):
                    i0 = b.load(i)
                    rem = b.sub(i_end, i0)
                    # the largest tile that fits the remaining rows
                    mr = cg.i64(rows[-1])
                    for r in reversed(rows[:-1]):
                        mr = b.select(b.icmp_signed(">=", rem, cg.i64(r)), cg.i64(r), mr)
                    for r in rows:
                        for cond, nv, masked in col_kinds:
                            with cg.if_(b.and_(b.icmp_signed("==", mr, cg.i64(r)), cond)):
                                _tile(t, i0, r, nv, masked)
                    _finish(t, i0, mr)
                    b.store(cg.iadd(i0, mr), i)


class _Ctx:
    def __init__(self, cg, vw, m, n, k, a_si, a_sk, A, B, C, epilogue):
        self.cg, self.vw, self.m, self.n, self.k = cg, vw, m, n, k
        self.a_si, self.a_sk, self.A, self.B, self.C = a_si, a_sk, A, B, C
        self.epilogue = epilogue


def _tile(t: _Ctx, i0, mr: int, nv: int, masked: bool) -> None:
    """Accumulate an MR x nv-vector tile over k in [k0, k_end) into t.tile."""
    cg = t.cg
    fn = microkernel(cg.module, t.vw, mr, nv, masked)
    cg.b.call(fn, [t.A, t.a_si, t.a_sk, t.B, t.n, t.C, i0, t.j0, t.k0, t.k_end, t.first,
                   t.masks[nv - 1], t.tile])


def microkernel(module: ir.Module, vw: int, mr: int, nv: int, masked: bool) -> ir.Function:
    """`void mk(A, a_si, a_sk, B, ldb, C, i0, j0, k0, k_end, first, mask, tile)`:
    one tile shape, shared by every matmul of the module (noinline, so each
    call site costs a call, not a copy of the unrolled loop)."""
    name = f"sc_mk{mr}x{nv}{'m' if masked else ''}_v{vw}"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    mask_t = ir.VectorType(ir.IntType(1), vw)
    args = [PTR, I64, I64, PTR, I64, PTR, I64, I64, I64, I64, ir.IntType(1), mask_t, PTR]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), args), name=name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    A, a_si, a_sk, B, n, C, i0, j0, k0, k_end, first, mask, tile = fn.args
    for p in (A, B, C, tile):
        p.add_attribute("noalias")
    cg = CG(module, fn)
    b = cg.b
    vt = ir.VectorType(F32, vw)
    col_masks = [mask if masked and v == nv - 1 else None for v in range(nv)]
    cols = [cg.iadd(j0, v * vw) for v in range(nv)]
    # Partial sums from earlier k-blocks; nothing is read on the first block.
    none = ir.Constant(mask_t, [0] * vw)
    every = ir.Constant(mask_t, [1] * vw)
    init_masks = [b.select(first, none, m if m is not None else every) for m in col_masks]
    acc = []
    for r in range(mr):
        row_off = cg.imul(cg.iadd(i0, r), n)
        acc.append([cg.var(vt, cg.load(C, cg.iadd(row_off, cols[v]), F32, vw, init_masks[v]))
                    for v in range(nv)])
    a_rows = [cg.imul(cg.iadd(i0, r), a_si) for r in range(mr)]
    with cg.loop(k_end, start=k0, name="k") as k:
        b_row = cg.imul(k, n)
        bv = [cg.load(B, cg.iadd(b_row, cols[v]), F32, vw, col_masks[v]) for v in range(nv)]
        a_k = cg.imul(k, a_sk)
        for r in range(mr):
            a = cg.splat(cg.load(A, cg.iadd(a_rows[r], a_k)), vw)
            for v in range(nv):
                b.store(cg.fma(a, bv[v], b.load(acc[r][v])), acc[r][v])
    for r in range(mr):
        for v in range(nv):
            cg.store(b.load(acc[r][v]), tile, cg.i64((r * 2 + v) * vw))
    b.ret_void()
    cg.finish()
    return fn


def _finish(t: _Ctx, i0, rows) -> None:
    """Tile buffer -> partial sums (not the last k-block) or the epilogue."""
    cg, b, vw = t.cg, t.cg.b, t.vw
    nvec = cg.ceil_div(t.width, vw)
    with cg.loop(rows, name="er") as r:
        with cg.loop(nvec, name="ev") as v:
            mask = b.select(b.icmp_signed("==", v, cg.i64(0)), t.masks[0], t.masks[1])
            value = cg.load(t.tile, cg.iadd(cg.imul(r, 2 * vw), cg.imul(v, vw)), F32, vw)
            row, col = cg.iadd(i0, r), cg.iadd(t.j0, cg.imul(v, vw))
            with b.if_else(t.last) as (then, otherwise):
                with then:
                    t.epilogue.emit(cg, [row, col], vw, mask, given={t.epilogue.anchor: value})
                with otherwise:
                    cg.store(value, t.C, cg.iadd(cg.imul(row, t.n), col), mask=mask)
