"""The optimiser step: one vectorised loop over the parameter arena.

Parameters and their gradients live in two arenas of one layout, so SGD,
momentum and Adam are each a single pass over three (or four) flat arrays.
The rule is chosen per call (`mode`), so `grad` and `train_step` share one
compiled function. Clipping by global norm is a first, one-task kernel that
sums the squared gradients and writes the scale min(1, c / norm) into the
hyper-parameters, which the update then reads: still one native call.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from ..types import TensorType
from .base import Op

MODES = {"none": 0, "sgd": 1, "momentum": 2, "adam": 3}
# hyper-parameter slots passed with every call
(LR, MOMENTUM, BETA1, BETA2, EPS, ADAM_STEP_SIZE, ADAM_V_SCALE, WEIGHT_DECAY, CLIP_NORM, CLIP_SCALE,
 VECTOR_DECAY) = range(11)
#: a loss that adds means over different things (trees and nodes) weighs each of its
#: terms by 1 - slot (zero, the default: weight 1); data-parallel training sets them
#: (`structc.denominator`, `structc.distributed`)
LOSS_WEIGHT0, MAX_LOSS_TERMS = 11, 4
#: held-out evaluation's output of term j's unweighted value: `loss_term:<j>` (`structc.heldout`)
TERM_OUTPUT = "loss_term:"
DROPOUT_KEY0, DROPOUT_KEY1, DROPOUT_STEP = 15, 16, 17
N_HYPER = 18     # CLIP_SCALE is written by native code (1 when CLIP_NORM is 0: no clipping)
N_FLOAT_HYPER = 15   # the slots from DROPOUT_KEY0 on hold uint32 bits, not floats: dropout's
# generator key (from the seed) and the step counter its masks are drawn at (`ops/random.py`)
# VECTOR_DECAY: the weight decay of the parameters from `decay_end` on (rank <= 1: biases and
# normalisations' scales and shifts, laid out after the matrices), 0 for `decay_biases=False`
CHUNK = 1 << 14
UPDATE_COST = 16    # the update's work per element, for the threading decision (`Update.lower`)


class Update(Op):
    """params -= step(grads); its inputs are the gradients, read from the arena."""
    name = "update"
    traits = frozenset({"effect"})

    def shape(self, *grads, size: int, decay_end: int | None = None, sparse: tuple = (),
              spans: tuple = ()) -> TensorType:
        return TensorType((), "f32")

    def reference(self, *grads, size, decay_end=None, sparse=(), spans=()):
        return np.zeros(())

    def lower(self, kb, node, epilogue):
        from ..lower.module import run_time_value
        size_attr = node.attrs["size"]
        decay_attr = node.attrs.get("decay_end")
        decay_attr = size_attr if decay_attr is None else decay_attr
        vw = kb.vector_width
        _clip_scale_kernel(kb, node, size_attr)
        # The sizes are read at run time (`run_time_value`): the kernels' text is the
        # same for every model, so an edit of a layer's width never recompiles them.
        # Its cost is its time in the runtime's units (~100 a ns): SGD took 2.2 us a
        # chunk on one core. At 4 an element, `apply_update` of an MLP of 235,000
        # parameters counted as less work than ENTRY_SERIAL_WORK and ran on the caller
        # alone: after a 2-thread `grad_into_arena` it read half the arena from the
        # other core's cache, 122 us against 75 pooled.
        # Explicit vector code (LLVM's short pipeline, `lower.module.VECTOR_CODE`): O3's
        # loop passes left its vector arithmetic as it was, at twice the LLVM time
        # (the Tree-LSTM example's update: 187 ms against 79 here; stop 43).
        with kb.kernel(f"update{node.id}", (size_attr + CHUNK - 1) // CHUNK, cost=CHUNK * UPDATE_COST,
                       vector_code=True) as (cg, lo, hi):
            b = cg.b
            size, decay_end = run_time_value(cg, size_attr), run_time_value(cg, decay_attr)
            params, grads, state = (cg.arena(k) for k in ("params", "grads", "state"))
            mode = cg.mode()
            start = cg.imul(lo, CHUNK)
            stop = cg.imin(cg.imul(hi, CHUNK), size)
            h = {k: cg.splat(cg.hyper(k), vw) for k in range(N_HYPER)}
            one = cg.const(1.0, h[LR])

            def step(rule, lo_j, hi_j, decay):
                whole = b.sdiv(b.sub(hi_j, lo_j), cg.i64(vw))
                with cg.loop(whole, name="u") as v:
                    j = cg.iadd(lo_j, cg.imul(v, vw))
                    _apply(cg, rule, j, vw, params, grads, state, h, one, size, decay)
                # the last (< vw) elements: one masked step. A scalar loop there is what O3's
                # loop vectoriser takes on, versioned for aliasing now that `size` (Adam's v
                # after m) is a run-time value: 4x the LLVM time of the whole kernel
                rest = b.sub(b.sub(hi_j, lo_j), cg.imul(whole, vw))
                with cg.if_(b.icmp_signed(">", rest, cg.i64(0))):
                    _apply(cg, rule, b.sub(hi_j, rest), vw, params, grads, state, h, one, size, decay,
                           mask=cg.lane_mask(rest, vw))

            def ranges(rule, lo_j, hi_j):
                # matrices, then vectors (either range empty in a chunk on the other side, or
                # in a model without one kind): one copy of the code for both ranges
                with cg.loop(2, name="range", unroll=False) as r:
                    matrices = b.icmp_signed("==", r, cg.i64(0))
                    lo_r = b.select(matrices, lo_j, _imax(cg, lo_j, decay_end))
                    hi_r = b.select(matrices, cg.imin(hi_j, decay_end), hi_j)
                    step(rule, lo_r, hi_r, b.select(matrices, h[WEIGHT_DECAY], h[VECTOR_DECAY]))

            tables = _tables(kb, cg, node)
            for rule in ("sgd", "momentum", "adam"):
                with cg.if_(b.icmp_signed("==", mode, cg.i64(MODES[rule]))):
                    if rule == "sgd" and tables:
                        _sparse_sgd(kb, cg, tables, start, stop, size, decay_end, h, partial(ranges, rule),
                                    partial(step, rule))
                    else:
                        ranges(rule, start, stop)


def _tables(kb, cg, node) -> list[tuple]:
    """The update's tables whose gradient is zero outside some rows, each (its
    gradient's address, rows (a value), width, ids node or None, whether the
    runtime may keep a record of its rows): `sparse`, pairs (gradient, ids) of
    the training entry's operands (ids -1: the record alone says which rows);
    `spans`, (offset, rows, width) in the gradient arena, the update entry's
    (`compiler.update_graph`: it has no gradient nodes; data-parallel training
    keeps the records across the ranks' sum, `structc.distributed`)."""
    from ..lower.codegen import F32
    from .embedding import keeps_record
    tables = []
    for k, i in node.attrs.get("sparse", ()):
        grad = node.inputs[k]
        rows_d, width = kb.graph.nodes[grad].shape
        ids = node.inputs[i] if i >= 0 else None
        tables.append((cg.ptr(grad), cg.dim(rows_d), width, ids, ids is None or keeps_record(kb, grad)))
    grads = cg.arena("grads")
    for offset, rows, width in node.attrs.get("spans", ()):
        tables.append((cg.b.gep(grads, [cg.i64(offset)], source_etype=F32), cg.i64(rows), width, None, True))
    return tables


def _sparse_sgd(kb, cg, tables, start, stop, size, decay_end, h, dense, rows):
    """SGD on elements [start, stop) of the arena, where `tables` (`_tables`) are
    parameters whose gradient is zero outside the rows `ids` names, or the
    runtime's record says (`compiler.train_graph`: an embedding's scatter). With no weight decay and
    a clipping scale of 1, a zero gradient leaves its parameter as it is, so
    such a table's rows are updated from the ids alone instead of read whole
    (a vocabulary of 100,000 words of 300 floats: 240 MB of reads a step
    otherwise). A row belongs to the CHUNK of elements that holds its first
    one and is updated once however often its id repeats (a bitmap of the
    chunk's rows): the dense pass's bits, on any number of threads. Where the
    runtime keeps the record of the rows the scatter wrote
    (`embedding.keeps_record`), a chunk reads its rows' bytes of it; else
    each chunk scans all the ids, so a table with more ids per chunk than a
    quarter of its floats stays dense (a small table, or a batch of thousands
    of words; 313 chunks of a 20,000 x 256 table scanned 800 ids each)."""
    from llvmlite import ir

    from ..lower.codegen import I8, I64, PTR
    from ..lower.treemap import load_index
    from .embedding import each_marked_row, row_record
    b = cg.b
    zero = cg.const(0.0, h[LR])
    plain = b.and_(_all_lanes(cg, b.fcmp_ordered("==", h[WEIGHT_DECAY], zero)),
                   _all_lanes(cg, b.fcmp_ordered("==", h[CLIP_SCALE], cg.const(1.0, h[LR]))))
    grads_at = b.ptrtoint(cg.arena("grads"), I64)
    spans = []
    for at, n_rows, width, ids, recorded in tables:
        first = b.sdiv(b.sub(b.ptrtoint(at, I64), grads_at), cg.i64(4))
        end = cg.iadd(first, cg.imul(n_rows, width))
        floats = b.sub(end, first)
        # the rows the scatter wrote, if the runtime keeps them (`embedding.keeps_record`; with no
        # ids, a recursion's parameter program's scatter, `compiler.train_graph`, or the update
        # entry's span): a chunk reads its rows' bytes of the record; else each chunk scans every
        # id, sparse while that is a quarter of the table's floats at most
        record, kept = row_record(cg, at, n_rows, make=False) if recorded else (None, None)
        n = None if ids is None else cg.dim(kb.graph.nodes[ids].shape[0])
        if n is None:
            cheap = kept
        else:
            scans = cg.imul(cg.imul(n, 4), cg.ceil_div(floats, CHUNK))
            cheap = b.icmp_signed("<=", scans, floats) if kept is None else \
                b.or_(kept, b.icmp_signed("<=", scans, floats))
        sparse = b.and_(b.and_(plain, cheap),
                        # the table among the matrices (where the plan puts a gradient)
                        b.and_(b.icmp_signed(">=", first, cg.i64(0)), b.icmp_signed("<=", end, decay_end)))
        # a table updated densely excludes nothing: its span starts and ends past the arena
        spans.append((ids, width, n_rows, n, sparse, b.select(sparse, first, size), b.select(sparse, end, size),
                      record, kept))

    def outside(cur):
        """`cur`, or past every span it falls in (spans may be back to back, in any order)."""
        for _ in spans:
            for *_, lo_t, hi_t, _, _ in spans:
                cur = b.select(b.and_(b.icmp_signed("<=", lo_t, cur), b.icmp_signed("<", cur, hi_t)), hi_t, cur)
        return cur
    # the dense pass over [start, stop) less the spans: a gap before each, and one after
    # (a loop, not unrolled: one copy of the dense code)
    at = cg.var(I64, start)
    with cg.loop(len(spans) + 1, name="gap", unroll=False):
        cur = outside(b.load(at))
        nxt = stop
        for *_, lo_t, hi_t, _, _ in spans:
            nxt = b.select(b.and_(b.icmp_signed(">=", lo_t, cur), b.icmp_signed("<", lo_t, nxt)), lo_t, nxt)
        with cg.if_(b.icmp_signed("<", cur, nxt)):
            dense(cur, nxt)
        b.store(_imax(cg, cur, nxt), at)
    for ids, width, n_rows, n, sparse, lo_t, _, record, kept in spans:
        last = b.sub(n_rows, cg.i64(1))

        def update(k):
            row = cg.iadd(lo_t, cg.imul(k, width))
            rows(row, cg.iadd(row, width), h[WEIGHT_DECAY])

        def by_ids(k0, k1, ids=ids, n=n, last=last):
            seen = cg.eb.alloca(ir.ArrayType(I8, CHUNK // width + 2))
            seen.type = PTR
            idx, dtype = cg.ptr(ids), kb.graph.nodes[ids].type.dtype
            with cg.loop(b.sub(k1, k0), name="clear") as k:
                cg.store(ir.Constant(I8, 0), seen, k, t=I8)
            with cg.loop(n, name="id") as i:
                k = load_index(cg, idx, i, dtype, last)     # clamped as the scatter clamps it
                with cg.if_(b.and_(b.icmp_signed(">=", k, k0), b.icmp_signed("<", k, k1))):
                    local = b.sub(k, k0)
                    with cg.if_(b.icmp_signed("==", cg.load(seen, local, t=I8), ir.Constant(I8, 0))):
                        cg.store(ir.Constant(I8, 1), seen, local, t=I8)
                        update(k)
        with cg.if_(sparse):
            with cg.loop(cg.ceil_div(b.sub(stop, start), CHUNK), name="chunk") as c:
                lo_c = cg.iadd(start, cg.imul(c, CHUNK))
                hi_c = cg.imin(cg.iadd(lo_c, CHUNK), stop)
                # the rows whose first element is in [lo_c, hi_c): k0 <= k < k1
                k0 = cg.ceil_div(_imax(cg, b.sub(lo_c, lo_t), cg.i64(0)), width)
                k1 = cg.imin(cg.ceil_div(_imax(cg, b.sub(hi_c, lo_t), cg.i64(0)), width), n_rows)
                if kept is None:
                    by_ids(k0, k1)
                elif ids is None:   # sparse only with the record
                    each_marked_row(cg, record, k0, k1, update, clear=False)
                else:       # the same rows, each once: those the step's scatter wrote
                    with b.if_else(kept) as (marked, otherwise):
                        with marked:
                            each_marked_row(cg, record, k0, k1, update, clear=False)
                        with otherwise:
                            by_ids(k0, k1)


def _all_lanes(cg, v):
    """Whether every lane of the i1 vector v is set (v itself for a scalar)."""
    from llvmlite import ir
    if not isinstance(v.type, ir.VectorType):
        return v
    n = v.type.count
    it = ir.IntType(n)
    return cg.b.icmp_unsigned("==", cg.b.bitcast(v, it), ir.Constant(it, (1 << n) - 1))


def _clip_scale_kernel(kb, node, size_attr):
    """hyper[CLIP_SCALE] = min(1, c / ||grads||) when clipping (c = hyper[CLIP_NORM] > 0) in a
    training mode, else 1. One task: the update's tasks all need the global norm."""
    from ..lower.codegen import F32, F64, PTR
    from ..lower.module import run_time_value
    vw = kb.vector_width
    with kb.kernel(f"update{node.id}_clip", 1, cost=1) as (cg, lo, hi):
        b = cg.b
        size = run_time_value(cg, size_attr)
        hyper = cg.slot(cg.layout.hyper_slot, PTR)
        clip = cg.hyper(CLIP_NORM)
        scale = cg.var(F32, cg.const(1.0, F32))
        training = b.icmp_signed("!=", cg.mode(), cg.i64(MODES["none"]))
        wanted = b.and_(training, b.fcmp_ordered(">", clip, cg.const(0.0, F32)))
        with cg.if_(wanted):
            grads = cg.arena("grads")
            # f64 partial sums: a million squares summed in f32 would lose digits
            acc = cg.var(_vec(F64, vw), cg.const(0.0, _vec(F64, vw)))
            vectors = b.sdiv(size, cg.i64(vw))
            with cg.loop(vectors, name="n") as v:
                g = b.fpext(cg.load(grads, cg.imul(v, vw), n=vw), _vec(F64, vw))
                b.store(cg.fma(g, g, b.load(acc)), acc)
            # the last (< vw) squares: one masked vector (not a scalar loop, which the loop
            # vectoriser would take on: the size is a run-time value)
            rest = b.sub(size, cg.imul(vectors, vw))
            g = b.fpext(cg.load(grads, cg.imul(vectors, vw), n=vw, mask=cg.lane_mask(rest, vw)), _vec(F64, vw))
            norm = cg.sqrt(b.fadd(cg.hsum(b.load(acc)), cg.hsum(b.fmul(g, g))))
            c64 = b.fpext(clip, F64)
            with cg.if_(b.fcmp_ordered(">", norm, c64)):
                b.store(b.fptrunc(cg.div(c64, norm), F32), scale)
        cg.store(b.load(scale), hyper, cg.i64(CLIP_SCALE))


def _vec(t, n):
    from llvmlite import ir
    return ir.VectorType(t, n) if n > 1 else t


def _any_bits(cg, v):
    """Whether any lane of the float vector v is not +0.0 (its bits not all zero)."""
    from llvmlite import ir
    b = cg.b
    n = v.type.count if isinstance(v.type, ir.VectorType) else 1
    it = ir.IntType(32 * n)         # the lanes' bits as one integer: zero iff every lane is +0.0
    return b.icmp_unsigned("!=", b.bitcast(v, it), ir.Constant(it, 0))


def _imax(cg, a, b):
    return cg.b.select(cg.b.icmp_signed(">", a, b), a, b)


def _apply(cg, rule, j, n, params, grads, state, h, one, size, decay, mask=None):
    """The rule on elements [j, j + n) (the lanes of `mask` only: the others read 0, stored
    nowhere); `decay`: the weight decay of these elements (a vector of n)."""
    p = cg.load(params, j, n=n, mask=mask)
    g = cg.fma(h[CLIP_SCALE], cg.load(grads, j, n=n, mask=mask), cg.mul(decay, p))
    if rule == "sgd":
        # A step of +0 in every lane leaves p as it is, bit for bit: no store, so the
        # rows of an embedding that no word of the batch used stay clean in every cache.
        with cg.if_(_any_bits(cg, g)):
            cg.store(cg.sub(p, cg.mul(h[LR], g)), params, j, mask=mask)
        return
    if rule == "momentum":
        v = cg.fma(h[MOMENTUM], cg.load(state, j, n=n, mask=mask), g)
        cg.store(v, state, j, mask=mask)
        p = cg.sub(p, cg.mul(h[LR], v))
    else:
        j2 = cg.iadd(j, size)
        m = cg.fma(h[BETA1], cg.load(state, j, n=n, mask=mask), cg.mul(cg.sub(one, h[BETA1]), g))
        v = cg.fma(h[BETA2], cg.load(state, j2, n=n, mask=mask), cg.mul(cg.sub(one, h[BETA2]), cg.mul(g, g)))
        cg.store(m, state, j, mask=mask)
        cg.store(v, state, j2, mask=mask)
        # PyTorch's form: lr / (1 - β1^t) · m / (√v / √(1 - β2^t) + ε)
        p = cg.sub(p, cg.div(cg.mul(h[ADAM_STEP_SIZE], m), cg.fma(cg.sqrt(v), h[ADAM_V_SCALE], h[EPS])))
    cg.store(p, params, j, mask=mask)
