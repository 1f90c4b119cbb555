"""The register-tiled matmul kernel: C = op(A) @ B with a fused epilogue.

A task is one block of rows (at most MB, an even number of blocks when
there are several: `row_blocks`) by one panel of NR = 2 vectors of columns,
numbered row block by row block: the pool's contiguous share per thread is
then a range of whole rows of A and C, the rows the kernels before and after
it (split by rows too) leave in and read from that thread's cache. Numbered
panel by panel, each of 2 threads read all of A and wrote half of every row
of C: a [2000, 64] x [64, 64] product ran 1.6x faster on 2 threads instead
of 1.9x (Intel, where a line crossing cores costs more). A task of a K
longer than KC runs several panels instead, k block by k block over all of
them (`_panel_group`), so that a weight gradient reads each k block of A^T
from beyond L2 once for them all.
Within it, tiles of MR rows x NR columns accumulate in MR*2 vector
registers: each step over k loads two vectors of B and broadcasts MR
elements of A (folded into the FMA as memory operands on x86). With 32
AVX-512 registers, MR = 12 leaves room for the B vectors and the broadcast.

A is read in place through two strides, so `A^T @ B` (a weight gradient)
needs no copy. B must be row-major [K, N]; the `legalize` pass puts a
`transpose` node before a matmul whose right operand is transposed, except
where B is wide and K long, whose tasks copy B's k blocks anyway: that copy
reads the transpose and transposes it (`b_transposed`).

The tile most of C is made of (MR rows, two full vectors) is emitted inline
in each kernel, and its accumulators go through the group's epilogue (bias,
activation, derivative mask...) straight from the registers; an epilogue
of more than HEAVY_EPILOGUE instructions a vector (a gate's sigmoid or
tanh) is emitted once, in a loop over the accumulators, not 24 times. The
remainder tiles (fewer rows, partial vectors) call micro-kernels shared by
every matmul of the module, through one call site: the micro-kernel is
chosen by the panel's column shape and the tile's rows. A finished
remainder tile goes to a small stack buffer and one masked loop applies
the epilogue, so that code exists once per kernel, not once per tile
shape. When N is known at compile time, only the panel shapes it has are
emitted. When K exceeds KC, the k loop is blocked so a B panel block stays
near the core (a wide B's k block is copied, its panels' rows one after
another: `WIDE_ROWS`, and the copy's whole panels run two at a time in
tiles of 6 rows x 4 vectors: `_pair_tiles`); partial sums then go through
the group's first output buffer, straight from the registers; a K known to
be at most KC emits no code for partial sums.

A one-row tile splits k over several accumulator sets (`k_split`), so a
row's sums depend on where the call's rows end. A row-stable kernel
(`row_stable`, a tree body's matmul) has none: see `stable_rows`.

The kernel is explicit vector code (`kb.kernel(..., vector_code=True)`:
LLVM's short pipeline, not O3, whose loop passes unrolled its epilogue
loop eight times and its k loop twice; the hot loops come out the same
either way, at half the LLVM time). Its loops say
`llvm.loop.unroll.disable` as well, should it meet O3 again.
"""
from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

from ..ops.matmul import PANEL
from .codegen import CG, F32, I64, NO_UNROLL, PTR, vector_registers

KC = 384   # k-block: KC x NR floats of B = 48 KiB at NR = 32
MB = 192   # rows per task, at most
#: row blocks of a product with a gate math, at least (`emit_gemm(gate=...)`): its
#: tasks are row blocks only, and an LSTM step's 64 rows would be one task
GATE_BLOCKS = 2
#: steps of k ahead that each step asks for B's row and A's (a hint, `CG.prefetch`). A weight
#: gradient over a batch, a forest or a sequence's positions has K in the thousands: B's rows
#: (2 kB apart at N = 512) and A^T's come from beyond L2 and the hardware's prefetchers followed
#: them late. C [128, 512] over K = 3,200 (an LSTM's weight gradient) ran at 52% of peak, 69%
#: with the hints (benchmarks/RESULTS.md, stop 24)
PREFETCH_AHEAD = 8
#: tiles of fewer rows, or of one vector of columns, ask for nothing: their k steps have
#: too few FMAs for the hints' four more loads (a 12 x 1 tile is already bound by its loads);
#: nor does the inline tile of a K known to fit one k block (`_main_tile`), unless B's rows
#: are FAR_ROWS bytes apart or more
#: (by the vector registers: AVX-512's 12-row main tile and 8-row remainders ask;
#: AVX2's 6-row main tile and 4-row remainders ask too: with 8 for every width
#: none of AVX2's tiles asked; asking, a GRU of 256 units' step ran 13% faster,
#: an LSTM of 512 units' 7-15%, bench_lstm's LSTM of 128 6-10%, none slower; stop 43)
PREFETCH_ROWS = {32: 8, 16: 4}
#: bytes between B's rows (N known at compile time) from which the inline tile of a K known
#: to fit one k block asks ahead too: rows 2 KiB or more apart fall in a few of L1's sets and
#: each on a page of its own, where the hardware's prefetchers stop. An LSTM of 256 units
#: (N = 1024) ran its step 8% faster with the hints, one of 128 units (N = 512) the same
FAR_ROWS = 2048
#: whether a tile that asks ahead asks for its rows of A too, by the vector registers:
#: with AVX2's 16 (6-row tiles), an MLP's weight gradient x^T dY [784, 1024] over a
#: batch of 256 ran 37% slower asking for A, and an LSTM's the same either way (stop 43)
PREFETCH_A = {32: True, 16: False}
#: bytes between B's rows (N known at compile time) from which a task of several panels over
#: a long K (`_panel_group`) with COPY_ROWS rows or more copies their k block of B into a
#: scratch of its thread's (`sc_scratch`, `_copy_panels`), panel after panel, and its
#: tiles read that. In place, rows 4 KiB or more apart each fall on a page of their own and
#: in one or two of L1's sets. Such a product's row blocks are of up to WIDE_MB rows, so
#: that a copy serves more tiles: an LSTM of 512 units' weight gradient [512, 2048] over
#: 3,200 positions ran at 49% of peak in place, 53% copied in blocks of 192 rows and 60%
#: in one block of 512; its step 9% faster (benchmarks/RESULTS.md, stop 28). At 2 KiB
#: (N = 512) and for fewer rows (a [100, 1024] over 1,000: 68% -> 61%) the copy cost more
#: than it saved. From 3 KiB (stop 30): an MLP of 1000 units (rows 4,000 bytes apart,
#: nearly a page: nearly L1's set period) ran its step 10-14% faster copied, one of 768
#: or 800 units and a GRU of 256 (N = 768) the same
WIDE_ROWS = 3072
WIDE_MB = 576
COPY_ROWS = 192
#: ...and from FAR_COPY_ROWS bytes between B's rows (N >= 2048), a task of as few as
#: FAR_COPY_FEW rows: an MLP of 2048 units' step at a batch of 16 to 128 ran 4-10% faster
#: (x @ W in place at 45% of peak at 64 rows), one of 1024 units' the same (stop 30)
FAR_COPY_ROWS = 8192
FAR_COPY_FEW = 16
#: a K known to fit one k block is copied too (a task of one panel then copies that
#: panel's rows): x @ W over 384 inputs to 2048 units, B's rows 8 KiB apart, ran at
#: 127 GFLOP/s in place and 167-178 copied; [512, 256] x [256, 4096] 140 -> 171-181
#: (stop 30). Off, only a K longer than a k block is
ONE_BLOCK_COPY = True


def copies_b(n, k) -> bool:
    """Whether the tasks of a product copy B's k blocks, by B's N and K (ints when
    known at compile time, else None): its rows WIDE_ROWS bytes apart or more,
    over a K longer than a k block, or any K with ONE_BLOCK_COPY (and for a
    task of enough rows: `emit_gemm`)."""
    return isinstance(n, int) and 4 * n >= WIDE_ROWS and (ONE_BLOCK_COPY or not (isinstance(k, int) and k <= KC))


def row_blocks(cg: CG, m, vw: int, least: int = 1, most: int = MB):
    """(blocks, rows per block) of a C of m rows: blocks of at most MB rows,
    an even number of them when there are several (11 blocks of 192 rows
    left one of 2 threads a block more: a [2000, 64] x [64, 64] product ran
    1.72x faster on 2 threads, not 1.9x), each a multiple of the main tile's
    rows, so every tile but the last rows' is a main tile wherever the blocks
    end: the same tiles, and the same bits, as blocks of MB."""
    b, main = cg.b, main_rows(vw)
    n = cg.ceil_div(m, most)
    # integer ops, compares and selects only: the entry numbers those (`module._NumberingBuilder`)
    several_odd = b.and_(b.icmp_signed(">", n, cg.i64(1)), b.icmp_signed("==", b.and_(n, cg.i64(1)), cg.i64(1)))
    n = b.add(n, b.select(several_odd, cg.i64(1), cg.i64(0)))
    n = b.select(b.icmp_signed("<", n, cg.i64(1)), cg.i64(1), n)
    units = cg.ceil_div(m, main)
    if least > 1:       # as many blocks as there are main tiles, up to `least`
        n = b.select(b.icmp_signed("<", n, cg.imin(units, cg.i64(least))), cg.imin(units, cg.i64(least)), n)
    rows = cg.imul(b.sdiv(b.add(units, b.sub(n, cg.i64(1))), n), main)
    rows = b.select(b.icmp_signed("<", rows, cg.i64(main)), cg.i64(main), rows)
    return b.sdiv(b.add(m, b.sub(rows, cg.i64(1))), rows), rows


def main_rows(vw: int) -> int:
    """Rows of the main tile: 12 x 2 vectors take 24 of AVX-512's 32 registers."""
    return 12 if vw == 16 else 6


def tile_rows(vw: int, m=None) -> tuple[int, ...]:
    """Row counts of the tiles a kernel needs, largest first. With M known at
    compile time only the main tile and the one remainder M % main exist
    (row blocks are multiples of the main tile): one tile of exactly the
    remaining rows, so B is streamed once more, not once per halving. With M
    known only at run time, remainders decompose into halving tiles."""
    main = main_rows(vw)
    if isinstance(m, int):
        rest = m % main
        return tuple(r for r in (main if m >= main else 0, rest) if r) or (main,)
    return (12, 4, 1) if vw == 16 else (6, 2, 1)


def same_sums_step(vw: int) -> int:
    """Rows split at multiples of this (the smallest tile of several rows)
    are summed in the same order however M is split: every tile of several
    rows runs one FMA chain per element over k, and the one-row tiles (k split,
    below) are the last M % step rows of a call either way."""
    return min(r for r in tile_rows(vw) if r > 1)


def stable_rows(vw: int) -> tuple[int, ...]:
    """Row counts of a row-stable kernel's tiles (`emit_gemm(row_stable=True)`):
    the main tile, the smallest one of several rows, and one row without a k
    split. A remainder of 2 or 3 rows runs in the tile of several, its missing
    rows clamped to the last one and never stored; a single row alone (a
    sequence of batch 1: each step one row, which in the clamped tile took 4
    rows' FMAs, 6.3 us a step of a [1, 160] x [160, 512] LSTM product). Every
    element is one FMA chain over k in every tile, so a row's result is the
    same bits wherever a call's rows start and end: a tree level may be cut
    anywhere (`treemap.ForestTasks`)."""
    return main_rows(vw), same_sums_step(vw), 1


def k_split(mr: int, nv: int) -> int:
    """Independent accumulator sets along k for a one-row tile, so that 8 FMA
    chains are in flight (two FMA pipes x four cycles of latency): a 1 x 2
    tile alone would wait on its own sums three cycles in four. Tiles of more
    rows are bound by their loads about as much as by latency, and each split
    costs compile time in every module."""
    return min(4, 8 // nv) if mr == 1 else 1


def emit_gemm(kb, *, M, N, K, a_buf, a_row_stride, a_k_stride, b_buf, epilogue, scratch, name,
              static_m=None, static_n=None, row_stable=False, parts=1, colsum=None, second=None, gate=None,
              packed=False, b_transposed=False):
    """Emit the kernel. `M, N, K` and the strides are callables cg -> i64 value
    (they are needed in the entry function for the task count as well as in
    the kernel); `epilogue` is a FusedExpr over [M, N] whose anchor is C;
    `scratch` is an [M, N] f32 buffer the group writes (for partial sums);
    `static_m`, `static_n` are M and N as the graph has them (ints when known
    at compile time, symbols otherwise); `row_stable`: each row's sums in
    the same order however M is cut (`stable_rows`).

    `parts` > 1: C is [parts, M, N], part p the product over k in
    [K p / parts, K (p + 1) / parts) (`matmul_parts`), with no epilogue
    (`epilogue` None: the sums go straight to C). The parts are the outer
    task index, so each thread's share is a range of k: the rows of A and B
    it wrote itself. A part with no k stores zeros. `colsum`: a [parts, N]
    buffer that also gets each part's column sums of B (`matmul_colsum_parts`,
    a bias gradient), summed by the task of the part's first row block while
    the panel of B is near the core.

    `second` = (buffer, K2): C = A @ B[:K] + A2 @ B[K:K + K2] (`matmul_pair`),
    A2 row-major [M, K2], K a constant with K + K2 <= KC (one k block): each
    tile runs over A's K and then over A2's into the same sums.

    `gate`: a cell's gate math (`recurrent.GateMath`) as the epilogue: C is
    the gates, `gate.blocks` blocks of `gate.units` columns (a multiple of the
    panel's width), K within one k block. A task is a block of rows (at least
    `GATE_BLOCKS` of them, for two threads): its tiles of every panel (the
    epilogue as given, bias and all, into C), then the gate math on its rows,
    reading their gates back from L1 or L2 and writing the cell's results:
    one kernel and one pass, where the gates' product and a row kernel
    reading them back were two. The tiles are those of the plain product, so
    the results are its bits.

    `packed`: B is in panels (`pack_panels`): [panels, K (+ K2), NR], each panel's
    rows one after another, the last panel's missing columns zeros: the tiles
    read a panel's rows contiguous, not N floats apart (a wide B's rows fall in
    a few of L1's sets and each on a page of its own).

    `b_transposed`: `b_buf` is B^T, W [N, K] row-major (a product `X @ W^T`,
    `MatMul.legalize`), for a wide B over a K known at compile time only: every
    task copies its panels' k blocks of B, reading W's rows and transposing them
    (`_copy_transposed`), where a transpose kernel wrote all of B^T beforehand
    and the copy read it again. A task whose thread has no scratch copies one
    panel at a time to a buffer on its stack."""
    vw = kb.vector_width
    nr = 2 * vw
    if gate is not None:
        assert parts == 1 and colsum is None and gate.units % nr == 0 and gate.lanes == nr
    assert not packed or (parts == 1 and colsum is None), "packed B: one part, no column sums of B"
    rows = stable_rows(vw) if row_stable and not isinstance(static_m, int) else tile_rows(vw, static_m)
    clamped = row_stable and not isinstance(static_m, int)      # the last tile may be short

    narrow = isinstance(static_n, int) and static_n <= nr     # one panel: nothing to group
    # a wide B, for some K: tasks copy their panels of it (`copies_b`)
    wide_b = (copies_b(static_n, None) and not packed and parts == 1
              and colsum is None and second is None and gate is None)

    def wide(cg):
        k = K(cg)
        return wide_b and copies_b(static_n, k.constant if isinstance(k, ir.Constant) else None)
    assert not b_transposed or wide_b, "B given transposed: a wide B's copy only"

    def block_most(cg):
        return WIDE_MB if wide(cg) else MB

    def part_k(cg, k):      # the k of a task: a part's
        return k if parts == 1 else cg.ceil_div(k, parts)

    def tasks(cg):
        if gate is not None:
            return row_blocks(cg, M(cg), vw, GATE_BLOCKS)[0]
        panels, n_blocks = cg.ceil_div(N(cg), nr), row_blocks(cg, M(cg), vw, most=block_most(cg))[0]
        groups = cg.ceil_div(panels, _panel_group(cg, part_k(cg, K(cg)), narrow, panels, n_blocks))
        return cg.imul(cg.imul(groups, n_blocks), cg.i64(parts))

    def cost(cg):       # a task's rows are at most a block's (a batch-1 call's are 1), its k a part's
        k = part_k(cg, K(cg))
        if second is not None:
            k = cg.iadd(k, second[1])
        if gate is not None:        # every panel, and about 40 operations a unit of gate math
            return cg.imul(cg.iadd(cg.imul(k, 2 * gate.blocks), 40), cg.imul(cg.imin(M(cg), cg.i64(MB)), gate.units))
        # the most panels a task may run (the exact count needs the row blocks: entry code)
        return cg.imul(cg.imul(cg.imul(k, cg.imin(M(cg), cg.i64(block_most(cg)))), 2 * nr), _panel_group(cg, k, narrow))

    kinds = _column_kinds(static_n, vw)
    # the inline main tile, only if C has such tiles
    inline_main = kinds[0] and rows[0] == main_rows(vw)

    with kb.kernel(name, tasks, cost=cost, vector_code=True, skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        b = cg.b
        t = _Ctx(cg, vw, M(cg), N(cg), K(cg), a_row_stride(cg), a_k_stride(cg),
                 cg.ptr(a_buf), cg.ptr(b_buf), cg.ptr(scratch), epilogue)
        if second is not None:
            a2, k2 = second
            assert parts == 1 and colsum is None and isinstance(t.k, ir.Constant) and t.k.constant + k2 <= KC
            # A2 [M, K2] row-major, and B's rows from K on
            t.second = (cg.ptr(a2), cg.i64(k2))
        t.far_rows = isinstance(static_n, int) and 4 * static_n >= FAR_ROWS and not packed
        if packed:      # a panel's rows: K, and K2 on
            t.panel_rows = t.k if second is None else cg.iadd(t.k, second[1])
        t.tile = cg.var(ir.ArrayType(F32, rows[0] * nr))
        t.tile.type = ir.PointerType()
        if gate is not None:        # its tiles finish in one pass over K (else only a block's sums)
            assert _one_k_block(t.k), "a gated product's K must fit one k block"
            _gated_tasks(t, gate, lo, hi, rows, inline_main, clamped)
            return
        panels = cg.ceil_div(t.n, nr)
        n_blocks, block_rows = row_blocks(cg, t.m, vw, most=block_most(cg))
        group = _panel_group(cg, part_k(cg, t.k), narrow, panels, n_blocks)
        groups = cg.ceil_div(panels, group)
        per_part = cg.imul(groups, n_blocks)
        c_base = t.C
        # a copying task's whole panels two at a time (`_pair_tiles`)
        pairs = wide_b and PAIR_TILES and vw in PAIR_WIDTHS and inline_main and not clamped and static_n % nr == 0
        if wide(cg):        # a copy for a task of several panels, where the thread has the memory for it
            t.copy = cg.b.call(cg.declare("sc_scratch", PTR, [I64]), [cg.i64(copy_bytes(vw))])
            scratch = t.copy
            t.copying = has_scratch = b.icmp_unsigned("!=", t.copy, ir.Constant(PTR, None))
            if not b_transposed:
                least = FAR_COPY_FEW if 4 * static_n >= FAR_COPY_ROWS else COPY_ROWS
                # a task of one panel copies only a K known to fit one k block
                several = _TRUE if _one_k_block(t.k) else b.icmp_signed(">", group, cg.i64(1))
                t.copying = b.and_(b.and_(several, b.icmp_signed(">=", block_rows, cg.i64(least))), t.copying)
        else:
            assert not b_transposed, "B given transposed needs its tasks to copy it (`wide`)"
        if b_transposed:        # W's rows, transposed by the copy (a panel on the stack without scratch)
            t.b_transposed = True
            stack = cg.var(ir.ArrayType(F32, _copied_panel(vw)))
            stack.type = ir.PointerType()

        def each_panel(first_panel, body, end=None):
            """body(kernels, full) for every panel of the task (up to `end`), t set up for it"""
            if end is None and isinstance(group, ir.Constant) and group.constant == 1:
                body(*_panel_setup(t, first_panel, kinds, rows, inline_main, clamped))
                return
            end = cg.imin(cg.iadd(first_panel, group), panels) if end is None else end
            with cg.loop(end, start=first_panel, name="panel", unroll=False) as panel:
                body(*_panel_setup(t, panel, kinds, rows, inline_main, clamped))

        with cg.loop(hi, start=lo, name="task") as task:
            if parts > 1:       # this task's part: where C's block starts, and its range of k
                part, task = b.sdiv(task, per_part), b.srem(task, per_part)
                t.C = b.gep(c_base, [cg.imul(part, cg.imul(t.m, t.n))], source_etype=F32)
                t.k_lo = b.sdiv(cg.imul(t.k, part), cg.i64(parts))
                t.k_hi = b.sdiv(cg.imul(t.k, cg.iadd(part, 1)), cg.i64(parts))
            first_panel = cg.imul(b.srem(task, groups), group)
            i_begin = cg.imul(b.sdiv(task, groups), block_rows)
            i_end = cg.imin(cg.iadd(i_begin, block_rows), t.m)
            if colsum is not None:
                with cg.if_(b.icmp_signed("==", i_begin, cg.i64(0))):
                    each_panel(first_panel, lambda kernels, full: _column_sums(t, cg.ptr(colsum), part))
            blocks = _part_blocks(cg, t.k_lo, t.k_hi) if parts > 1 else _k_blocks(cg, t.k)
            with blocks as k0:
                t.k0 = k0
                if parts > 1:
                    t.k_end = cg.imin(cg.iadd(k0, KC), t.k_hi)
                    t.first = b.icmp_signed("==", k0, t.k_lo)
                    t.last = b.icmp_signed(">=", t.k_end, t.k_hi)
                elif isinstance(k0, ir.Constant):     # K <= KC known: one block, no partial sums
                    t.k_end, t.first, t.last = t.k, _TRUE, _TRUE
                else:
                    t.k_end = cg.imin(cg.iadd(k0, KC), t.k)
                    t.first = b.icmp_signed("==", k0, cg.i64(0))
                    t.last = b.icmp_signed("==", t.k_end, t.k)
                # partial sums, and a finished tile nothing is fused into, go
                # from the registers straight to C; others through the epilogue
                t.direct = _not(b, t.last) if t.epilogue_work else _TRUE

                def row_block(kernels, full):
                    _row_block(t, i_begin, i_end, rows, kernels, inline_main, clamped, full)

                def from_copy(copy, first, end):
                    """B^T's panels [first, end) transposed into `copy`, then their tiles"""
                    t.copy, t.first_panel, t.copying = copy, first, _TRUE
                    _copy_panels(t, first, b.sub(end, first))
                    if pairs:
                        _pair_tiles(t, first, b.sub(end, first), i_begin, i_end, rows, kinds, inline_main)
                    else:
                        each_panel(first, row_block, end)

                def one_by_one():       # no scratch: each panel through the stack's buffer
                    with cg.loop(end, start=first_panel, name="alone", unroll=False) as panel:
                        from_copy(stack, panel, cg.iadd(panel, 1))

                if t.copy is None:
                    each_panel(first_panel, row_block)
                else:
                    end = cg.imin(cg.iadd(first_panel, group), panels)
                    if b_transposed:
                        _branch(cg, has_scratch, lambda: from_copy(scratch, first_panel, end), one_by_one)
                    else:       # copy B's k block if the task does, then run its panels from the copy
                        t.first_panel = first_panel
                        count = b.sub(end, first_panel)
                        with cg.if_(t.copying):
                            _copy_panels(t, first_panel, count)
                        _branch(cg, t.copying if pairs else _FALSE,
                                lambda: _pair_tiles(t, first_panel, count, i_begin, i_end, rows, kinds, inline_main),
                                lambda: each_panel(first_panel, row_block))


def _panel_setup(t: _Ctx, panel, kinds, rows, inline_main: bool, clamped: bool):
    """t pointed at the panel's columns; (its micro-kernel per row count, whether
    it is two whole vectors)."""
    cg, b, vw = t.cg, t.cg.b, t.vw
    nr = 2 * vw
    _point_at_panel(t, panel)
    t.width = b.sub(cg.imin(cg.iadd(t.j0, nr), t.n), t.j0)
    t.masks = [cg.lane_mask(b.sub(t.width, cg.i64(v * vw)), vw) for v in range(2)]
    # column shape of this panel: two full vectors, two with a partial one, or one partial
    full = b.icmp_signed("==", t.width, cg.i64(nr))
    wide = b.icmp_signed(">", t.width, cg.i64(vw))
    col_kinds = [kind for kind, possible in zip(
        [(full, 2, False), (b.and_(b.not_(full), wide), 2, True), (b.not_(wide), 1, True)],
        kinds) if possible]
    t.last_mask = b.select(wide, t.masks[1], t.masks[0])    # of the panel's last vector
    kernels = {r: _panel_kernel(t, r, col_kinds, skip_full=inline_main and r == rows[0], stable=clamped)
               for r in rows}
    return kernels, full


def _point_at_panel(t: _Ctx, panel) -> None:
    """t.j0 at the panel's first column, and t.Bk, t.ldb where the tiles find
    B's row k of it: k * ldb + j0 + column. In place, B itself and N; packed,
    the rows of the `pack_panels` panel holding it (PANEL floats a row: two
    AVX-512 vectors, so an AVX2 tile's panel is a half of one, SSE's a
    quarter), less j0."""
    cg, b = t.cg, t.cg.b
    nr = 2 * t.vw
    t.j0 = cg.imul(panel, nr)
    if t.panel_rows is not None:
        assert PANEL % nr == 0, (PANEL, nr)
        per = PANEL // nr       # the tiles' panels in a packed one
        packed, part = (panel, cg.i64(0)) if per == 1 else (b.sdiv(panel, cg.i64(per)), b.srem(panel, cg.i64(per)))
        start = cg.iadd(cg.imul(packed, cg.imul(t.panel_rows, PANEL)), cg.imul(part, nr))
        t.Bk, t.ldb = b.gep(t.B, [b.sub(start, t.j0)], source_etype=F32), cg.i64(PANEL)
    elif t.copy is not None:        # the task's copy of the k block (`_copy_panels`), when it made one
        start = b.sub(_copy_index(t, b.sub(panel, t.first_panel), cg.i64(0)), t.j0)
        t.Bk = b.select(t.copying, b.gep(t.copy, [start], source_etype=F32), t.B)
        t.ldb = b.select(t.copying, cg.i64(nr), t.n)


def copy_bytes(vw: int) -> int:
    """The scratch a task's copy of a wide B needs: a k block of its panels."""
    return LONG_K_PANELS * _copied_panel(vw) * 4


def _copied_panel(vw: int) -> int:
    """Floats from one panel's copy to the next: a k block of NR floats a row."""
    return KC * 2 * vw


def _copy_index(t: _Ctx, p, k):
    """Where the task's copy holds row k of its p-th panel (from `first_panel`):
    (p KC + k - k0) NR, the copy's one layout (`_copy_panels`)."""
    cg = t.cg
    return cg.iadd(cg.imul(p, _copied_panel(t.vw)), cg.imul(cg.b.sub(k, t.k0), 2 * t.vw))


def _copy_panels(t: _Ctx, first_panel, count) -> None:
    """B's rows [k0, k_end) of `count` panels from `first_panel` into the task's
    copy at `_copy_index` (panel p's row k at ((p - first_panel) KC + k - k0) NR),
    missing columns zeros. B's rows are read whole (the panels' part of them),
    one after another."""
    if t.b_transposed:
        _copy_transposed(t, first_panel, count)
        return
    cg, b, vw = t.cg, t.cg.b, t.vw
    nr = 2 * vw
    j_first = cg.imul(first_panel, nr)
    whole = isinstance(t.n, ir.Constant) and t.n.constant % nr == 0     # no partial panel: no masks
    with cg.loop(t.k_end, start=t.k0, name="cp", unroll=False) as k:
        src = cg.iadd(cg.imul(k, t.n), j_first)
        with cg.loop(count, name="cq", unroll=False) as p:
            for v in range(2):
                col = cg.iadd(cg.imul(p, nr), v * vw)
                mask = None if whole else cg.lane_mask(b.sub(b.sub(t.n, j_first), col), vw)
                value = cg.load(t.B, cg.iadd(src, col), F32, vw, mask)
                cg.store(value, t.copy, cg.iadd(_copy_index(t, p, k), v * vw))


def _copy_transposed(t: _Ctx, first_panel, count) -> None:
    """`_copy_panels` from B^T, W [N, K] row-major (`b_transposed`): panel p's
    row k is column k of W's rows j0(p) .. j0(p) + NR, read vw rows of W at a
    time along k (vw x vw blocks, transposed in registers), the block's last
    columns (fewer than vw) one by one. W's rows past N are read as the last
    row's and stored as zeros (no masked loads: valgrind could not translate
    a block of them; the tiles do not store those columns anyway)."""
    from ..ops.matmul import transpose_block
    cg, b, vw = t.cg, t.cg.b, t.vw
    nr = 2 * vw
    whole_n = isinstance(t.n, ir.Constant) and t.n.constant % nr == 0
    whole_k = isinstance(t.k, ir.Constant) and t.k.constant % vw == 0 and KC % vw == 0
    last = b.sub(t.n, cg.i64(1))

    def row_of(j):
        """W's row j, clamped into W, and whether it is one"""
        if whole_n:
            return j, None
        return cg.imin(j, last), b.icmp_signed("<", j, t.n)

    with cg.loop(count, name="tp", unroll=False) as p:
        j_panel = cg.imul(cg.iadd(first_panel, p), nr)
        vectors_end = b.sub(t.k_end, b.srem(b.sub(t.k_end, t.k0), cg.i64(vw)))
        with cg.loop(t.k_end if whole_k else vectors_end, start=t.k0, step=vw, name="tk", unroll=False) as k:
            for v in range(2):
                rows = []
                for r in range(vw):
                    row, inside = row_of(cg.iadd(j_panel, v * vw + r))
                    value = cg.load(t.B, cg.iadd(cg.imul(row, t.k), k), F32, vw)
                    rows.append(value if inside is None else b.select(inside, value, cg.const(0.0, value.type)))
                at = _copy_index(t, p, k)
                for c, column in enumerate(transpose_block(cg, rows)):
                    cg.store(column, t.copy, cg.iadd(at, c * nr + v * vw))
        if not whole_k:
            with cg.loop(t.k_end, start=vectors_end, name="tc", unroll=False) as k:
                with cg.loop(cg.i64(nr), name="tj", unroll=False) as jj:
                    row, inside = row_of(cg.iadd(j_panel, jj))
                    value = cg.load(t.B, cg.iadd(cg.imul(row, t.k), k))
                    if inside is not None:
                        value = b.select(inside, value, cg.const(0.0, F32))
                    cg.store(value, t.copy, cg.iadd(_copy_index(t, p, k), jj))


def _pair_tiles(t: _Ctx, first_panel, count, i_begin, i_end, rows, kinds, inline_main: bool) -> None:
    """The task's copied panels (`_copy_panels`, all whole) two at a time: tiles
    of half the main tile's rows x 4 vectors over the rows the main tiles would
    cover (a step over k loads 4 vectors of B and broadcasts 6 elements of A for
    24 FMAs, where the main tile loads 2 and broadcasts 12); the rows past the
    last whole main tile, and an odd last panel, as a single panel's. Every
    element is the one FMA chain over k a main tile makes: the same bits."""
    cg, b, vw = t.cg, t.cg.b, t.vw
    nr, main = 2 * vw, main_rows(vw)
    whole = cg.iadd(i_begin, cg.imul(b.sdiv(b.sub(i_end, i_begin), cg.i64(main)), main))
    with cg.loop(b.sdiv(count, cg.i64(2)), name="pair", unroll=False) as pair:
        panel = cg.iadd(first_panel, cg.imul(pair, 2))
        _point_at_panel(t, panel)
        # the next panel's copy starts KC rows of NR floats after this one's
        b_cols = [cg.iadd(t.j0, v % 2 * vw + v // 2 * _copied_panel(vw)) for v in range(4)]
        with cg.loop(whole, start=i_begin, step=main // 2, name="pr", unroll=False) as i0:
            _main_tile(t, i0, main // 2, nv=4, b_cols=b_cols)
        with cg.loop(cg.i64(2), name="pq", unroll=False) as q:
            kernels, full = _panel_setup(t, cg.iadd(panel, q), kinds, rows, inline_main, False)
            _row_block(t, whole, i_end, rows, kernels, inline_main, False, full)
    with cg.if_(b.icmp_signed("==", b.and_(count, cg.i64(1)), cg.i64(1))):
        kernels, full = _panel_setup(t, b.sub(cg.iadd(first_panel, count), cg.i64(1)), kinds, rows, inline_main,
                                     False)
        _row_block(t, i_begin, i_end, rows, kernels, inline_main, False, full)


#: a pair tile (`_pair_tiles`): 6 rows x 4 vectors take 24 of AVX-512's 32 registers, as
#: the main tile's 12 x 2, for 10 loads a step over k instead of 14. Products whose tasks copy B
#: (one thread, one process, alternating): a [512, 2048] x [2048, 2048] 138 -> 155 GFLOP/s, the
#: step of an MLP 2048 -> 2048 -> 2048 (batch 512) 8% faster, an LSTM of 512 units' 4%
#: (benchmarks/RESULTS.md, stop 29). With B in place (its rows N floats apart) they are not used
PAIR_TILES = True       # off: every panel alone (tests compare the two)
#: vector widths that pair: with AVX2's 16 registers the pair tile is 3 rows x 4 vectors,
#: and the same MLP's step ran 9% slower with it (the valgrind test turns it on there: memcheck
#: runs AVX2 code only)
PAIR_WIDTHS = (16,)

#: panels a task of a long K runs at most (`_panel_group`), and tasks a kernel keeps at least
LONG_K_PANELS = 8
LONG_K_TASKS = 4


def _panel_group(cg: CG, k, narrow: bool, panels=None, n_blocks=None):
    """Panels a task runs, k block by k block over all of them: when k (a task's)
    is longer than KC, up to LONG_K_PANELS while the kernel keeps LONG_K_TASKS
    tasks per part, else 1; with no `panels` and `n_blocks`, the most it can be.
    A weight gradient over a batch, a forest or a sequence's positions then reads
    each k block of A^T (the task's rows of C) from beyond L2 once for several
    panels, not once a panel. The sums are the same bits: the same k blocks, in
    the same order. No code for it where K is known to fit one block or C
    (`narrow`) to be one panel wide."""
    if _one_k_block(k) or narrow:
        return cg.i64(1)
    b = cg.b
    if panels is None:
        group = cg.i64(LONG_K_PANELS)
    else:
        spare = b.sdiv(cg.imul(panels, n_blocks), cg.i64(LONG_K_TASKS))
        group = cg.imin(cg.i64(LONG_K_PANELS), b.select(b.icmp_signed("<", spare, cg.i64(1)), cg.i64(1), spare))
    return b.select(b.icmp_signed(">", k, cg.i64(KC)), group, cg.i64(1))


_TRUE = ir.Constant(ir.IntType(1), 1)
_FALSE = ir.Constant(ir.IntType(1), 0)


def _row_block(t: _Ctx, i_begin, i_end, rows, kernels, inline_main: bool, clamped: bool, full) -> None:
    """The tiles of rows [i_begin, i_end) of the panel at t.j0 (`full`: the
    panel is two whole vectors): each the largest that fits the rows left, the
    main tile inline, the others through their micro-kernels."""
    cg, b = t.cg, t.cg.b
    i = cg.var(I64, i_begin)
    with _row_tiles(cg, lambda: b.icmp_signed("<", b.load(i), i_end)):
        i0 = b.load(i)
        rem = b.sub(i_end, i0)
        mr = cg.i64(rows[-1])
        for r in reversed(rows[:-1]):
            mr = b.select(b.icmp_signed(">=", rem, cg.i64(r)), cg.i64(r), mr)
        if clamped:         # (`stable_rows`) 2 or 3 rows left: one clamped tile, not one-row tiles in turn
            few = b.and_(b.icmp_signed(">", rem, cg.i64(1)), b.icmp_signed("<", rem, cg.i64(rows[-2])))
            mr = b.select(few, cg.i64(rows[-2]), mr)
        valid = cg.imin(mr, rem) if clamped else None      # the tile's rows that exist
        if inline_main:
            main = b.icmp_signed("==", mr, cg.i64(rows[0]))
            with b.if_else(main if full is _TRUE else b.and_(main, full)) as (inline, shared):
                with inline:
                    _main_tile(t, i0, rows[0])
                with shared:
                    _shared_tile(t, i0, mr, kernels, valid)
        else:
            _shared_tile(t, i0, mr, kernels, valid)
        b.store(cg.iadd(i0, mr if valid is None else valid), i)


def _gated_tasks(t: _Ctx, gate, lo, hi, rows, inline_main: bool, clamped: bool) -> None:
    """Tasks [lo, hi) of a product with a gate math (`emit_gemm(gate=...)`):
    one block of rows each (`GATE_BLOCKS` at least)."""
    cg, vw = t.cg, t.vw
    nr = 2 * vw
    at = gate.bind(cg)
    _, block_rows = row_blocks(cg, t.m, vw, GATE_BLOCKS)
    # every panel is two full vectors, and K one k block: tiles finish in one pass
    t.width = cg.i64(nr)
    every = ir.Constant(ir.VectorType(ir.IntType(1), vw), [1] * vw)
    t.masks, t.last_mask = [every, every], every
    kernels = {r: _panel_kernel(t, r, [(_TRUE, 2, False)], skip_full=inline_main and r == rows[0], stable=clamped)
               for r in rows}
    t.k0, t.k_end, t.first, t.last = cg.i64(0), t.k, _TRUE, _TRUE
    t.direct = _FALSE if t.epilogue_work else _TRUE
    with cg.loop(hi, start=lo, name="task") as task:
        i_begin = cg.imul(task, block_rows)
        i_end = cg.imin(cg.iadd(i_begin, block_rows), t.m)
        # panel by panel over the block's rows, as the plain product runs (a panel of
        # B stays in L1 over them: a row tile of every gate in turn read four panels
        # a tile: the LSTM cell's kernel 8% slower than the two it replaces) ...
        with cg.loop(cg.i64(gate.blocks * gate.units // nr), name="panel", unroll=False) as panel:
            _point_at_panel(t, panel)
            _row_block(t, i_begin, i_end, rows, kernels, inline_main, clamped, _TRUE)
        # ... then the gate math on the block, row by row (a task of a panel's units
        # wrote every row's results in pieces a row apart: the gate math took 40% longer)
        with cg.loop(i_end, start=i_begin, name="gr", unroll=False) as r:
            with cg.loop(cg.i64(gate.units // nr), name="gu", unroll=False) as u:
                at(r, cg.imul(u, nr), None)


def _column_sums(t: _Ctx, out, part) -> None:
    """out[part, panel's columns] = Σ B[k, those columns] over the part's k, row by
    row from zero (the bits of a `sum_parts` of B)."""
    cg, b, vw = t.cg, t.cg.b, t.vw
    vt = ir.VectorType(F32, vw)
    acc = [cg.var(vt, ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)) for _ in range(2)]
    cols = [cg.iadd(t.j0, v * vw) for v in range(2)]
    with cg.loop(t.k_hi, start=t.k_lo, name="cs", unroll=False) as k:
        row = cg.imul(k, t.n)
        for v in range(2):
            b.store(cg.add(b.load(acc[v]), cg.load(t.B, cg.iadd(row, cols[v]), F32, vw, t.masks[v])), acc[v])
    for v in range(2):
        cg.store(b.load(acc[v]), out, cg.iadd(cg.imul(part, t.n), cols[v]), mask=t.masks[v])


@contextmanager
def _row_tiles(cg: CG, cond):
    """`cg.while_` over a block's row tiles, not unrolled: with M known and
    at most MB, O3 would unroll it whole (one copy of the tile calls per
    tile), for compile time and nothing at run time."""
    with cg.while_(cond):
        yield
        latch = cg.b.block
    no_unroll = cg.module.add_metadata([ir.MetaDataString(cg.module, NO_UNROLL)])
    latch.terminator.set_metadata("llvm.loop", no_unroll)


@contextmanager
def _part_blocks(cg: CG, k_lo, k_hi):
    """for k0 in range(k_lo, k_hi, KC), but at least once: an empty part's
    block has no k, so its tiles store the zeros they start from."""
    b = cg.b
    blocks = cg.ceil_div(b.sub(k_hi, k_lo), KC)
    count = b.select(b.icmp_signed("<", blocks, cg.i64(1)), cg.i64(1), blocks)
    with cg.loop(count, name="kb") as kb:
        yield cg.iadd(k_lo, cg.imul(kb, KC))


def _one_k_block(k) -> bool:
    """Whether K is known at compile time to be at most KC: one k block."""
    return isinstance(k, ir.Constant) and k.constant <= KC


@contextmanager
def _k_blocks(cg: CG, k):
    """for k0 in range(0, K, KC): yields k0. A K known to be at most KC is
    one block at the constant 0: the code for partial sums (resuming from
    C, storing unfinished tiles) is then not emitted at all."""
    if _one_k_block(k):
        yield cg.i64(0)
        return
    with cg.loop(k, name="k0", step=KC) as k0:
        yield k0


def _not(b, cond):
    return ir.Constant(cond.type, 1 - cond.constant) if isinstance(cond, ir.Constant) else b.not_(cond)


def _branch(cg: CG, cond, then, otherwise) -> None:
    """then() if cond else otherwise(); only one of them emitted when cond is a constant."""
    if isinstance(cond, ir.Constant):
        (then if cond.constant else otherwise)()
        return
    with cg.b.if_else(cond) as (yes, no):
        with yes:
            then()
        with no:
            otherwise()


def _column_kinds(n, vw: int) -> tuple[bool, bool, bool]:
    """Which panel shapes occur: two full vectors, two with the second
    partial, one partial. All three when N is only known at run time; code
    for the others is not emitted."""
    if not isinstance(n, int):
        return True, True, True
    tail = n % (2 * vw)
    return n >= 2 * vw, tail > vw, 0 < tail <= vw


def _panel_kernel(t, mr: int, col_kinds, skip_full: bool, stable: bool = False):
    """The micro-kernel of `mr` rows for this panel's column shape (a select
    over the shapes C has), or None when no such shared tile occurs (the
    main rows of a C of full panels only, which are inline)."""
    b = t.cg.b
    shapes = [(cond, microkernel(t.cg.module, t.vw, mr, nv, masked, stable))
              for cond, nv, masked in col_kinds if not (skip_full and not masked)]
    if not shapes:
        return None
    fn = shapes[-1][1]
    for cond, other in reversed(shapes[:-1]):      # the shapes exclude each other
        fn = b.select(cond, other, fn)
    return fn


def _shared_tile(t, i0, mr, kernels, valid=None) -> None:
    """The tile of `mr` rows at i0 through a shared micro-kernel: one call
    site (through a pointer chosen by `mr`), not one per tile shape; of
    its rows only the first `valid` exist (row-stable kernels)."""
    cg, b = t.cg, t.cg.b
    present = [(r, fn) for r, fn in kernels.items() if fn is not None]
    if not present:         # every tile is the inline main tile (M and N multiples of it)
        return
    fn = present[-1][1]
    for r, other in reversed(present[:-1]):
        fn = b.select(b.icmp_signed("==", mr, cg.i64(r)), other, fn)
    extra = [] if valid is None else [valid]
    if t.second is None:
        b.call(fn, [t.A, t.a_si, t.a_sk, t.Bk, t.ldb, t.C, t.n, i0, t.j0, t.k0, t.k_end, t.first, t.last_mask,
                    t.tile, t.direct] + extra)
    else:       # A's K into C, then A2's K on from there (one k block: t.k0 is 0)
        a2, k2 = t.second
        b.call(fn, [t.A, t.a_si, t.a_sk, t.Bk, t.ldb, t.C, t.n, i0, t.j0, t.k0, t.k_end, _TRUE, t.last_mask,
                    t.tile, _TRUE] + extra)
        b.call(fn, [a2, k2, cg.i64(1), _second_rows(t), t.ldb, t.C, t.n, i0, t.j0, cg.i64(0), k2, _FALSE,
                    t.last_mask, t.tile, t.direct] + extra)
    rows = mr if valid is None else valid
    if not isinstance(t.direct, ir.Constant):
        with cg.if_(b.not_(t.direct)):
            _finish(t, i0, rows)
    elif not t.direct.constant:
        _finish(t, i0, rows)


def _second_rows(t: _Ctx):
    """Where A2's rows of B start (row K), as the tiles index it."""
    return t.cg.b.gep(t.Bk, [t.cg.imul(t.k, t.ldb)], source_etype=F32)


class _Ctx:
    def __init__(self, cg, vw, m, n, k, a_si, a_sk, A, B, C, epilogue):
        self.cg, self.vw, self.m, self.n, self.k = cg, vw, m, n, k
        self.a_si, self.a_sk, self.A, self.B, self.C = a_si, a_sk, A, B, C
        self.epilogue = epilogue
        self.epilogue_work = epilogue_work(epilogue)
        self.second = None      # (A2 [M, K2] row-major, K2): `emit_gemm(second=...)`
        self.far_rows = False   # B's rows FAR_ROWS apart or more: the inline tile asks ahead whatever K is
        self.Bk, self.ldb = B, n    # B as the tiles index it: row k at k * ldb + j0 (`_point_at_panel`)
        self.panel_rows = None      # packed B (`emit_gemm(packed=True)`): the rows of a panel
        self.copy = None            # a wide B's scratch (`WIDE_ROWS`), and whether a task uses it
        self.copying = self.first_panel = None
        self.b_transposed = False   # B given as W = B^T (`emit_gemm(b_transposed=True)`): the copy transposes


def epilogue_work(epilogue) -> bool:
    """Whether the epilogue does anything beyond storing the product itself."""
    return epilogue is not None and (epilogue.members != [epilogue.anchor]
                                     or epilogue.outputs != [epilogue.anchor])


def _main_tile(t: _Ctx, i0, mr: int, nv: int = 2, b_cols=None) -> None:
    """The tile most of C is made of (MR rows, two full vectors), inline in
    the kernel: its accumulators go through the epilogue straight from the
    registers. With a short K (a weight gradient over a batch, a layer of 32
    or 64 features) the round trip through the tile buffer would cost a
    sixth of the tile's time. `nv` = 4 with `b_cols` (where B's row holds
    each vector of columns): the pair tile of two panels (`_pair_tiles`)."""
    cg, b, vw = t.cg, t.cg.b, t.vw
    vt = ir.VectorType(F32, vw)
    zero = ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)
    cols = [cg.iadd(t.j0, v * vw) for v in range(nv)]
    row_offs = [cg.imul(cg.iadd(i0, r), t.n) for r in range(mr)]
    acc = [[cg.var(vt) for _ in range(nv)] for _ in range(mr)]

    def fresh():
        for r in range(mr):
            for v in range(nv):
                b.store(zero, acc[r][v])

    def resume():
        for r in range(mr):
            for v in range(nv):
                b.store(cg.load(t.C, cg.iadd(row_offs[r], cols[v]), F32, vw), acc[r][v])

    def done():
        # the first vector inline; what it cost says whether the others are copied too
        block, before = b.block, len(b.block.instructions)
        t.epilogue.emit(cg, [i0, cols[0]], vw, None, given={t.epilogue.anchor: b.load(acc[0][0])})
        rest = [(r, v) for r in range(mr) for v in range(nv)][1:]
        if b.block is block and len(block.instructions) - before <= HEAVY_EPILOGUE:
            for r, v in rest:
                t.epilogue.emit(cg, [cg.iadd(i0, r), cols[v]], vw, None,
                                given={t.epilogue.anchor: b.load(acc[r][v])})
            return
        _epilogue_loop(t, i0, [b.load(acc[r][v]) for r, v in rest], first=1, per_row=nv)

    def partial():
        for r in range(mr):
            for v in range(nv):
                cg.store(b.load(acc[r][v]), t.C, cg.iadd(row_offs[r], cols[v]))

    _branch(cg, t.first, fresh, resume)
    # a K known to be short (a layer's features) has its B and A near the core already
    _accumulate(cg, vw, acc, t.A, i0, t.a_si, t.a_sk, t.Bk, t.ldb, b_cols or cols, [None] * nv, t.k0, t.k_end,
                ahead=t.far_rows or not _one_k_block(t.k))
    if t.second is not None:        # A2's K on into the same sums
        a2, k2 = t.second
        _accumulate(cg, vw, acc, a2, i0, k2, cg.i64(1), _second_rows(t), t.ldb, cols, [None, None], cg.i64(0), k2,
                    ahead=t.far_rows)
    _branch(cg, t.last, done if t.epilogue is not None else partial, partial)


#: instructions of one vector's epilogue above which the inline tile runs it in a
#: loop over its accumulators (through the tile buffer) instead of copying it
#: 24 times: a gate's sigmoid or tanh is ~50 instructions, bias + relu ~10
HEAVY_EPILOGUE = 24


def _epilogue_loop(t: _Ctx, i0, values, first: int, per_row: int = 2) -> None:
    """The epilogue of the main tile's vectors `first`, first + 1, ... (row-major,
    `per_row` a row, a power of two), stored to the tile buffer then run in one
    loop: one copy of the epilogue's code, not one per vector."""
    cg, b, vw = t.cg, t.cg.b, t.vw
    for k, value in enumerate(values):
        cg.store(value, t.tile, cg.i64((first + k) * vw))
    with cg.loop(first + len(values), start=first, name="ei", unroll=False) as k:
        row = cg.iadd(i0, b.lshr(k, cg.i64(per_row.bit_length() - 1)))
        col = cg.iadd(t.j0, cg.imul(b.and_(k, cg.i64(per_row - 1)), vw))
        value = cg.load(t.tile, cg.imul(k, vw), F32, vw)
        t.epilogue.emit(cg, [row, col], vw, None, given={t.epilogue.anchor: value})


def microkernel(module: ir.Module, vw: int, mr: int, nv: int, masked: bool, stable: bool = False) -> ir.Function:
    """`void mk(A, a_si, a_sk, B, ldb, C, n, i0, j0, k0, k_end, first, mask, tile, direct)`:
    one tile shape, shared by every matmul of the module (noinline, so each
    call site costs a call, not a copy of the unrolled loop). The sums go to
    C when `direct` (partial sums, or a product nothing is fused into), to
    the tile buffer for the epilogue otherwise. `stable`: one FMA chain per
    element, and a last argument `valid`, the tile's rows that exist (rows
    past it read the last one and store nothing: `stable_rows`)."""
    name = f"sc_mk{mr}x{nv}{'m' if masked else ''}{'s' if stable else ''}_v{vw}"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    mask_t = ir.VectorType(ir.IntType(1), vw)
    args = [PTR, I64, I64, PTR, I64, PTR, I64, I64, I64, I64, I64, ir.IntType(1), mask_t, PTR, ir.IntType(1)]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), args + [I64] * stable), name=name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    fn.structc_vector_code = True      # explicit vector code: the short LLVM pipeline (`lower.module.VECTOR_CODE`)
    A, a_si, a_sk, B, ldb, C, n, i0, j0, k0, k_end, first, mask, tile, direct = fn.args[:15]
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
    if stable:      # rows past the valid ones repeat the last: every read stays in bounds
        last = b.sub(fn.args[15], cg.i64(1))
        row = [cg.iadd(i0, cg.imin(cg.i64(r), last)) for r in range(mr)].__getitem__
    else:
        row = lambda r: cg.iadd(i0, r)      # noqa: E731
    acc = []
    for r in range(mr):
        row_off = cg.imul(row(r), n)
        acc.append([cg.var(vt, cg.load(C, cg.iadd(row_off, cols[v]), F32, vw, init_masks[v]))
                    for v in range(nv)])
    _accumulate(cg, vw, acc, A, [row(r) for r in range(mr)] if stable else i0, a_si, a_sk, B, ldb, cols, col_masks,
                k0, k_end, 1 if stable else k_split(mr, nv))
    with b.if_else(direct) as (to_c, to_tile):
        with to_c:
            for r in range(mr):
                row_off = cg.imul(row(r), n)
                for v in range(nv):
                    store = lambda: cg.store(b.load(acc[r][v]), C, cg.iadd(row_off, cols[v]), mask=col_masks[v])
                    if stable and r > 0:        # a clamped row stores nothing
                        with cg.if_(b.icmp_signed("<", cg.i64(r), fn.args[15])):
                            store()
                    else:
                        store()
        with to_tile:
            for r in range(mr):
                for v in range(nv):
                    cg.store(b.load(acc[r][v]), tile, cg.i64((r * 2 + v) * vw))
    b.ret_void()
    cg.finish()
    return fn


def _accumulate(cg: CG, vw: int, acc, A, i0, a_si, a_sk, B, ldb, cols, masks, k0, k_end, split: int = 1,
                ahead: bool = True) -> None:
    """acc[r][v] += A[i0 + r, k] * B[k, cols[v]:+vw] for k in [k0, k_end): per
    step, one vector of B per column vector, one broadcast of A per row. With
    `split` > 1, consecutive k go to `split` accumulator sets (summed at the end).
    `i0` may be a list: each accumulator row's own row of A."""
    b = cg.b
    if isinstance(i0, list):
        a_rows = [cg.imul(r, a_si) for r in i0]
    else:
        a_rows = [cg.imul(cg.iadd(i0, r), a_si) for r in range(len(acc))]
    if split == 1:
        with cg.loop(k_end, start=k0, name="k", unroll=False) as k:
            _k_step(cg, vw, acc, A, a_rows, a_sk, B, ldb, cols, masks, k, ahead)
        return
    vt = ir.VectorType(F32, vw)
    zero = ir.Constant(vt, [ir.Constant(F32, 0.0)] * vw)
    sets = [acc] + [[[cg.var(vt, zero) for _ in row] for row in acc] for _ in range(split - 1)]
    whole = cg.iadd(k0, cg.imul(b.sdiv(b.sub(k_end, k0), cg.i64(split)), split))
    with cg.loop(whole, start=k0, step=split, name="ks") as k:
        for s, part in enumerate(sets):
            _k_step(cg, vw, part, A, a_rows, a_sk, B, ldb, cols, masks, cg.iadd(k, s), ahead)
    with cg.loop(k_end, start=whole, name="kt") as k:
        _k_step(cg, vw, acc, A, a_rows, a_sk, B, ldb, cols, masks, k, ahead)
    for r, row in enumerate(acc):
        for v, slot in enumerate(row):
            total = b.load(slot)
            for part in sets[1:]:
                total = b.fadd(total, b.load(part[r][v]))
            b.store(total, slot)


def _k_step(cg: CG, vw: int, acc, A, a_rows, a_sk, B, ldb, cols, masks, k, ahead: bool = True) -> None:
    b = cg.b
    if ahead and (len(acc) >= PREFETCH_ROWS[vector_registers(vw)] and len(cols) == 2 or len(cols) == 4):
        # B's row and the tile's first and last rows of A, PREFETCH_AHEAD steps of k
        # ahead; past K's end they point outside the buffers, harmless for a hint.
        # A pair tile's B is its task's copy, read in order: the hardware follows that
        later = cg.iadd(k, PREFETCH_AHEAD)
        b_ahead = cg.imul(later, ldb)
        for col in cols if len(cols) == 2 else []:
            cg.prefetch(B, cg.iadd(b_ahead, col))
        a_ahead = cg.imul(later, a_sk)
        for a_row in (a_rows[:1] + a_rows[1:][-1:]) if PREFETCH_A[vector_registers(vw)] else []:
            cg.prefetch(A, cg.iadd(a_row, a_ahead))
    b_row = cg.imul(k, ldb)
    bv = [cg.load(B, cg.iadd(b_row, col), F32, vw, m) for col, m in zip(cols, masks)]
    a_k = cg.imul(k, a_sk)
    for a_row, row in zip(a_rows, acc):
        a = cg.splat(cg.load(A, cg.iadd(a_row, a_k)), vw)
        for bvec, slot in zip(bv, row):
            b.store(cg.fma(a, bvec, b.load(slot)), slot)


def _finish(t: _Ctx, i0, rows) -> None:
    """The finished tile, from its buffer, through the epilogue."""
    cg, b, vw = t.cg, t.cg.b, t.vw
    nvec = cg.ceil_div(t.width, vw)
    with cg.loop(rows, name="er", unroll=False) as r:
        with cg.loop(nvec, name="ev", unroll=False) as v:
            mask = b.select(b.icmp_signed("==", v, cg.i64(0)), t.masks[0], t.masks[1])
            value = cg.load(t.tile, cg.iadd(cg.imul(r, 2 * vw), cg.imul(v, vw)), F32, vw)
            row, col = cg.iadd(i0, r), cg.iadd(t.j0, cg.imul(v, vw))
            t.epilogue.emit(cg, [row, col], vw, mask, given={t.epilogue.anchor: value})


#: C's widths the narrow kernel takes: a vector of B's flat rows then holds vw / N whole rows
NARROW_N = (1, 2, 4)
NARROW_ROWS = 8     # rows sharing each vector of B (eight FMA chains in flight)
NARROW_MB = 64      # rows per task


def emit_narrow(kb, *, M, K, n: int, a_buf, b_buf, epilogue, name):
    """C = A @ B for a C of n (in NARROW_N) columns, A row-major [M, K], B [K, n].
    The column-panel kernel would fill n of each vector's lanes; here vectors
    run along k instead: B's flat data is vw/n consecutive rows of B, so lane
    l multiplies A[i, k + l // n] (a short load of A spread by a shuffle) by
    B[k + l // n, l % n], and folding the vector's halves leaves C[i, :].
    Explicit vector code (the short LLVM pipeline): O3 unrolled its k loop
    four times and grew the kernel by half, for no speed."""
    vw = kb.vector_width
    ks = vw // n                                   # k values per vector

    def tasks(cg):
        return cg.ceil_div(M(cg), NARROW_MB)

    with kb.kernel(name, tasks, cost=lambda cg: cg.imul(K(cg), 2 * n * NARROW_MB), vector_code=True,
                   skippable=True) as (cg, lo, hi):
        if cg is None:      # lowered before: its recorded text stands in (`KernelBuilder.kernel`)
            return
        b = cg.b
        m, k = M(cg), K(cg)
        A, B = cg.ptr(a_buf), cg.ptr(b_buf)
        i_end = cg.imin(cg.imul(hi, NARROW_MB), m)
        i = cg.var(I64, cg.imul(lo, NARROW_MB))
        whole = b.sub(i_end, cg.i64(NARROW_ROWS - 1))
        with _row_tiles(cg, lambda: b.icmp_signed("<", b.load(i), whole)):
            _narrow_rows(cg, vw, n, ks, A, B, m, k, b.load(i), NARROW_ROWS, epilogue)
            b.store(cg.iadd(b.load(i), NARROW_ROWS), i)
        with _row_tiles(cg, lambda: b.icmp_signed("<", b.load(i), i_end)):
            _narrow_rows(cg, vw, n, ks, A, B, m, k, b.load(i), 1, epilogue)
            b.store(cg.iadd(b.load(i), 1), i)


def _narrow_rows(cg, vw, n, ks, A, B, m, k, i0, rows, epilogue) -> None:
    """C[i0 : i0 + rows, :] through the epilogue."""
    b = cg.b
    vt = ir.VectorType(F32, vw)
    acc = [cg.var(vt, cg.const(0.0, vt)) for _ in range(rows)]
    a_rows = [cg.imul(cg.iadd(i0, r), k) for r in range(rows)]
    spread = ir.Constant(ir.VectorType(ir.IntType(32), vw), [l // n for l in range(vw)])

    def step(k0, masked):
        b_mask = cg.lane_mask(b.sub(cg.imul(k, n), cg.imul(k0, n)), vw) if masked else None
        a_mask = cg.lane_mask(b.sub(k, k0), ks) if masked else None
        bv = cg.load(B, cg.imul(k0, n), F32, vw, b_mask)
        for a_row, slot in zip(a_rows, acc):
            a = cg.load(A, cg.iadd(a_row, k0), F32, ks, a_mask)
            if ks != vw:
                a = b.shuffle_vector(a, ir.Constant(a.type, ir.Undefined), spread)
            b.store(cg.fma(a, bv, b.load(slot)), slot)

    full = cg.imul(b.sdiv(k, cg.i64(ks)), ks)
    with cg.loop(full, step=ks, name="nk", unroll=False) as k0:
        step(k0, False)
    with cg.if_(b.icmp_signed("<", full, k)):
        step(full, True)
    out_mask = cg.lane_mask(cg.i64(n), vw)
    for r, slot in enumerate(acc):
        v = b.load(slot)
        width = vw
        while width > n:            # lanes l and l + width/2 hold the same column
            half = width // 2
            lo_ = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half))))
            hi_ = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half, width))))
            v, width = b.fadd(lo_, hi_), half
        wide = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), vw), [l % n for l in range(vw)]))
        epilogue.emit(cg, [cg.iadd(i0, r), cg.i64(0)], vw, out_mask, given={epilogue.anchor: wide})
